//! `nash validate`, exit codes and `nash new-plugin` against the real plugins and binary: every
//! example validates, mangled examples never panic and every error names where it is, the exit
//! code tells config, data, plugin, training and usage failures apart, and the committed
//! `examples/plugin-template` (the scaffold's output, a workspace member) loads and trains.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nash_core::rand::{Rng as _, SeedableRng};
use nash_core::serde_json::{self, Value};
use nash_core::tensor::Rng;
use nash_tests::support;
use nash_trainer::validate::{exit, validate_with, IssueKind, Report};
use nash_trainer::{Format, PipelineSource, PluginSet};

/// Every pipeline of `examples/` (top level, and the two example plugins').
fn example_pipelines() -> Vec<PathBuf> {
    let root = support::workspace_root().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files.push(root.join("plugin-huber-loss/autoencoder_huber.toml"));
    files.push(root.join("plugin-template/pipeline.toml"));
    files
}

/// Every plugin of the workspace, loaded (the test binary's own folder holds copies of them).
fn all_plugins() -> PluginSet {
    support::build_workspace();
    let mut set = PluginSet::load_all(&[]).unwrap_or_else(|e| panic!("{e}"));
    set.load_dir(&support::profile_dir()).unwrap_or_else(|e| panic!("{e}"));
    set
}

fn check_text(set: &mut PluginSet, origin: &str, text: &str, base: &Path) -> Report {
    let src = PipelineSource::from_text(origin, "p", text, Format::Toml, base);
    validate_with(src, &[], set)
}

/// Data sources that read large files: their wiring is checked once, not in every mangled case.
fn reads_big_files(text: &str) -> bool {
    text.contains("\"idx\"") || text.contains("\"image_folder\"")
}

#[test]
fn every_example_validates() {
    if !support::in_own_process("every_example_validates") {
        return;
    }
    let mut set = all_plugins();
    for path in example_pipelines() {
        let text = std::fs::read_to_string(&path).unwrap();
        let report = check_text(&mut set, &path.display().to_string(), &text, path.parent().unwrap());
        // Datasets from Debian packages may be missing here; nothing else may be wrong.
        assert!(
            report.errors.iter().all(|e| e.kind == IssueKind::Data),
            "{}",
            report.to_text()
        );
        if report.is_ok() {
            for section in ["data", "model", "training"] {
                assert!(
                    report.sections.iter().any(|s| s.path == section),
                    "{section} missing:\n{}",
                    report.to_text()
                );
            }
        }
    }
}

/// One seeded mangling of a pipeline text.
fn mangle(text: &str, rng: &mut Rng) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let n = lines.len().max(1);
    match rng.gen_range(0..8) {
        0 => {
            lines.remove(rng.gen_range(0..n).min(lines.len().saturating_sub(1)));
        }
        1 => {
            let i = rng.gen_range(0..n).min(lines.len().saturating_sub(1));
            let line = lines[i].clone();
            lines.insert(i, line);
        }
        2 => {
            let mut chars: Vec<char> = text.chars().collect();
            if chars.len() > 2 {
                let i = rng.gen_range(0..chars.len() - 1);
                let j = rng.gen_range(0..chars.len());
                chars.swap(i, j);
            }
            return chars.into_iter().collect();
        }
        3..=5 => {
            // Replace a number by -1, 0, 1e40 or "x".
            let numeric: Vec<usize> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| {
                    !l.trim_start().starts_with('#') && l.contains('=') && l.chars().any(|c| c.is_ascii_digit())
                })
                .map(|(i, _)| i)
                .collect();
            if let Some(&i) = numeric.get(rng.gen_range(0..numeric.len().max(1))) {
                let replacement = ["-1", "0", "1e40", "\"x\""][rng.gen_range(0..4)];
                let line = &lines[i];
                let start = line.find(|c: char| c.is_ascii_digit()).unwrap();
                let start = if start > 0 && line.as_bytes()[start - 1] == b'-' {
                    start - 1
                } else {
                    start
                };
                let end = start
                    + line[start..]
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_'))
                        .unwrap_or(line.len() - start);
                lines[i] = format!("{}{replacement}{}", &line[..start], &line[end..]);
            }
        }
        6 => {
            let cut = rng.gen_range(0..text.len().max(1));
            let cut = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            return text[..cut].to_string();
        }
        _ => {
            let garbage = [
                "]]",
                "x = [",
                "[data",
                "type = 3",
                "= =",
                "\"",
                "[training]\nsteps = 0",
                "{}",
                "é\u{0}",
            ];
            let i = rng.gen_range(0..=lines.len());
            lines.insert(i, garbage[rng.gen_range(0..garbage.len())].to_string());
        }
    }
    lines.join("\n") + "\n"
}

#[test]
fn mangled_examples_never_panic_and_every_error_has_a_location() {
    if !support::in_own_process("mangled_examples_never_panic_and_every_error_has_a_location") {
        return;
    }
    let mut set = all_plugins();
    let examples: Vec<(PathBuf, String)> = example_pipelines()
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .filter(|(_, text)| !reads_big_files(text))
        .collect();
    let mut rng = Rng::seed_from_u64(5);
    let (mut cases, mut failing, mut syntax) = (0, 0, 0);
    let started = std::time::Instant::now();
    for round in 0..8 {
        for (path, text) in &examples {
            let mangled = mangle(text, &mut rng);
            let origin = format!("{}#{round}", path.display());
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check_text(&mut set, &origin, &mangled, path.parent().unwrap())
            }));
            let report =
                result.unwrap_or_else(|_| panic!("validate panicked on this mangling of {origin}:\n{mangled}"));
            cases += 1;
            failing += usize::from(!report.is_ok());
            for e in &report.errors {
                assert_ne!(e.kind, IssueKind::Internal, "{}\n{mangled}", report.to_text());
                let located = if e.kind == IssueKind::Syntax {
                    // `file:line:column`.
                    let mut parts = e.location.rsplitn(3, ':');
                    let col = parts.next().and_then(|c| c.parse::<usize>().ok());
                    let line = parts.next().and_then(|l| l.parse::<usize>().ok());
                    syntax += 1;
                    col.is_some() && line.is_some() && parts.next() == Some(origin.as_str())
                } else {
                    !e.location.is_empty() && e.location != "(top level)"
                };
                assert!(located, "no location in {e:?}\n{}\n{mangled}", report.to_text());
                assert!(!e.message.trim().is_empty(), "{e:?}");
            }
        }
    }
    eprintln!(
        "{cases} mangled pipelines, {failing} invalid ({syntax} syntax errors), in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(cases >= 200, "{cases}");
    // The mangler must find real errors, and not only syntax errors.
    assert!(
        failing > cases / 3 && syntax > 0 && syntax < failing,
        "{failing} of {cases}, {syntax} syntax"
    );
}

fn nash(args: &[&str]) -> Output {
    Command::new(support::nash_binary())
        .args(args)
        .current_dir(support::workspace_root())
        .env_remove("NASH_PLUGIN_PATH")
        .output()
        .unwrap()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn validate_reports_every_error_with_exit_code_3() {
    let dir = support::scratch_dir("validate-cli");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "seed = 1\n[data]\ntype = \"ring\"\nmodes = 8\n[model]\ntype = \"mlp_ganx\"\n\
         [optimizers.generator]\ntype = \"adam\"\nlr = 0\n[training]\nbatch_size = 0\nsteps = 3\n",
    )
    .unwrap();
    let out = nash(&["validate", bad.to_str().unwrap()]);
    assert_eq!(code(&out), i32::from(exit::CONFIG), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 errors"), "{stdout}");
    assert!(
        stdout.contains("1. model.type: unknown model type `mlp_ganx` (did you mean `mlp_gan`?)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("optimizers.generator") && stdout.contains("> 0"),
        "{stdout}"
    );
    assert!(stdout.contains("training.batch_size: must be at least 1"), "{stdout}");
    let out = nash(&["validate", "--json", bad.to_str().unwrap()]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["errors"].as_array().unwrap().len(), 3);

    let out = nash(&["validate", "examples/ring_gan.toml"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("examples/ring_gan.toml: ok"), "{stdout}");
    assert!(
        stdout.contains("  model: ") && stdout.contains("  optimizers.generator: adam"),
        "{stdout}"
    );
    // Overrides are checked too; wiring errors are found without training.
    let out = nash(&[
        "validate",
        "examples/ring_gan.toml",
        "--set",
        "data.modes=0",
        "--set",
        "training.steps=0",
    ]);
    assert_eq!(code(&out), i32::from(exit::CONFIG), "{}", text(&out));
    assert!(text(&out).contains("training.steps"), "{}", text(&out));
}

#[test]
fn exit_codes_tell_failures_apart() {
    let dir = support::scratch_dir("exit-codes");
    let run = |name: &str, pipeline: &str, extra: &[&str]| {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, pipeline).unwrap();
        let out_dir = dir.join(name);
        let mut args = vec![
            "--quiet",
            "train",
            path.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        nash(&args)
    };
    let ring = std::fs::read_to_string(support::workspace_root().join("examples/ring_gan.toml")).unwrap();
    // Usage.
    let out = nash(&["frobnicate"]);
    assert_eq!(code(&out), i32::from(exit::USAGE), "{}", text(&out));
    // Config: a syntax error and a range error.
    let out = run("syntax", "seed = = 1\n", &[]);
    assert_eq!(code(&out), i32::from(exit::CONFIG), "{}", text(&out));
    assert!(text(&out).contains("syntax.toml:1:8"), "{}", text(&out));
    let out = run("range", &ring, &["--set", "training.batch_size=0"]);
    assert_eq!(code(&out), i32::from(exit::CONFIG), "{}", text(&out));
    // Data: a missing file.
    let csv = dir.join("nope.csv").display().to_string();
    let data = format!("data={{ type = \"csv\", path = {csv:?} }}");
    let out = run("data", &ring, &["--set", &data]);
    assert_eq!(code(&out), i32::from(exit::DATA), "{}", text(&out));
    assert!(text(&out).contains("nope.csv"), "{}", text(&out));
    // Plugin: a missing library.
    let out = run("plugin", &ring, &["--set", "plugins=[\"libnope.so\"]"]);
    assert_eq!(code(&out), i32::from(exit::PLUGIN), "{}", text(&out));
    // Training: a learning rate that diverges at once.
    let out = run(
        "diverge",
        &ring,
        &[
            "--set",
            "optimizers.generator.lr=1e30",
            "--set",
            "optimizers.discriminator.lr=1e30",
            "--steps",
            "50",
        ],
    );
    assert_eq!(code(&out), i32::from(exit::TRAINING), "{}", text(&out));
    assert!(
        text(&out).contains("non-finite") || text(&out).contains("diverged"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
}

#[test]
fn new_plugin_matches_the_committed_template_which_loads_and_trains() {
    let root = support::workspace_root();
    // Scaffolded elsewhere in the workspace, the files equal examples/plugin-template's but for
    // the crate's place (its member path and the relative path to core/).
    let scratch = support::scratch_dir("new-plugin");
    let out = nash(&["new-plugin", "template", "--dir", scratch.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let member = scratch
        .join("plugin-template")
        .strip_prefix(&root)
        .unwrap()
        .display()
        .to_string();
    assert!(text(&out).contains(&format!("    \"{member}\",")), "{}", text(&out));
    let depth = Path::new(&member).components().count();
    for file in ["Cargo.toml", "README.md", "pipeline.toml", "src/lib.rs"] {
        let made = std::fs::read_to_string(scratch.join("plugin-template").join(file)).unwrap();
        let committed = std::fs::read_to_string(root.join("examples/plugin-template").join(file)).unwrap();
        let made = made
            .replace(&format!("{}core", "../".repeat(depth)), "../../core")
            .replace(&member, "examples/plugin-template");
        assert!(made == committed, "{file} differs from examples/plugin-template/{file}");
    }
    // Outside the workspace: refused with a config error.
    let outside = std::env::temp_dir().join(format!("nash-new-plugin-{}", std::process::id()));
    let out = nash(&["new-plugin", "x", "--dir", outside.to_str().unwrap()]);
    assert_eq!(code(&out), i32::from(exit::CONFIG), "{}", text(&out));
    assert!(text(&out).contains("not inside the nash workspace"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&outside);

    // The committed template is built beside `nash` as a workspace member, found, and trains.
    let out = nash(&["plugins", "show", "template_charbonnier"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("nash-plugin-template"), "{}", text(&out));
    let out = nash(&["validate", "examples/plugin-template/pipeline.toml"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let run_dir = support::scratch_dir("template-run");
    let out = nash(&[
        "--quiet",
        "train",
        "examples/plugin-template/pipeline.toml",
        "--steps",
        "5",
        "--out",
        run_dir.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 5);
    let resolved = std::fs::read_to_string(run_dir.join("pipeline.resolved.json")).unwrap();
    assert!(resolved.contains("template_charbonnier"), "{resolved}");
}
