//! `nash bench stability` end to end: a two-entry suite on the quick ring (30 steps, 2 seeds, 2 jobs)
//! trains four child runs and prints the table beside the published rows; `results.json` holds both
//! seeds of each entry; a second invocation reuses every run; a pipeline on other data is refused
//! with an error naming it. The runs' summaries and `nash eval --json` carry the `mode_coverage`
//! metric's provenance. An interrupted run continues from its newest checkpoint.

use std::path::Path;
use std::process::Command;
use std::time::{Instant, SystemTime};

use nash_core::serde_json::{self, Value};
use nash_tests::support;

fn nash() -> Command {
    let mut cmd = Command::new(support::nash_binary());
    cmd.env_remove("NASH_PLUGIN_PATH");
    cmd
}

/// The modification times of every `summary.json` below `dir`, sorted by path.
fn summaries(dir: &Path) -> Vec<(String, SystemTime)> {
    let mut out = Vec::new();
    for data in std::fs::read_dir(dir).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for entry in std::fs::read_dir(data.path()).unwrap().flatten() {
            for run in std::fs::read_dir(entry.path()).unwrap().flatten() {
                let s = run.path().join("summary.json");
                if s.exists() {
                    out.push((s.display().to_string(), s.metadata().unwrap().modified().unwrap()));
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn stability_benchmark_trains_reuses_and_refuses() {
    let root = support::workspace_root();
    let dir = support::scratch_dir("bench-stability");
    let suite = dir.join("suite.toml");
    let ring = root.join("examples/stability/quick_ring.toml");
    std::fs::write(
        &suite,
        format!(
            "[[entry]]\nname = \"gan\"\npipeline = {ring:?}\nset = [\"training.sample_count=0\"]\n\n\
             [[entry]]\nname = \"pacgan2\"\npipeline = {ring:?}\n\
             set = [\"model.discriminator.layers[0].samples=2\", \"training.sample_count=0\"]\n",
            ring = ring.display().to_string()
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let bench = |extra: &[&str]| {
        let mut cmd = nash();
        cmd.args(["bench", "stability", "--suite"])
            .arg(&suite)
            .args(["--steps", "30", "--seeds", "2", "--jobs", "2", "--out"])
            .arg(&out)
            .args(extra);
        cmd
    };

    let started = Instant::now();
    let first = support::run_ok(&mut bench(&[]));
    let first_time = started.elapsed();
    let table = String::from_utf8_lossy(&first.stdout);
    assert!(table.contains("### ring (8 modes)"), "{table}");
    assert!(
        table.contains("| data | entry | modes captured | high-quality samples (%) | reverse KL | steps/s | seeds |"),
        "{table}"
    );
    for name in ["gan", "pacgan2"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| ring | {name} | ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"));
        assert!(row.contains(" ± ") && row.ends_with("| 2 |"), "{row}");
    }
    assert!(table.contains("| ring | published GAN (PacGAN paper) | 6.3 ± 0.5 | 98.2 ± 0.2 | 0.45 ± 0.09 |"));
    assert!(!table.contains("### grid"), "{table}");
    assert_eq!(std::fs::read_to_string(out.join("results.md")).unwrap(), table);

    let results: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let entries = results["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for e in entries {
        let runs = e["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "{e}");
        for (seed, run) in runs.iter().enumerate() {
            assert_eq!(run["seed"], seed as u64);
            assert_eq!(run["status"], "completed", "{run}");
            let modes = run["modes_captured"].as_f64().unwrap();
            assert!((0.0..=8.0).contains(&modes), "{run}");
        }
        assert_eq!(e["data"], "ring");
        assert_eq!(e["aggregate"]["seeds_finished"], 2);
        assert!(e["meets_goal"].is_null());
    }
    // The child runs used the entry's overrides and the seed.
    let run = out.join("ring/pacgan2/seed-1");
    let resolved: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("pipeline.resolved.json")).unwrap()).unwrap();
    assert_eq!(resolved["seed"], 1);
    assert_eq!(resolved["training"]["steps"], 30);
    assert_eq!(resolved["model"]["discriminator"]["layers"][0]["samples"], 2);

    // Provenance: the mode_coverage metric's reaches summary.json and `nash eval --json`.
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let provenance = &summary["metric_provenance"]["mode_coverage"];
    assert_eq!(provenance["samples"], "2500", "{summary}");
    assert_eq!(provenance["threshold_sigmas"], "3");
    let eval = support::run_ok(nash().arg("eval").arg(&run).arg("--json"));
    let eval: Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(eval["metric_provenance"], summary["metric_provenance"], "{eval}");
    assert_eq!(eval["step"], 30);
    let text = support::run_ok(nash().arg("eval").arg(&run));
    assert!(String::from_utf8_lossy(&text.stdout).contains("(mode_coverage: reference = "));

    // A second invocation trains nothing: the same summaries, no new run folder, quickly.
    let before = summaries(&out);
    assert_eq!(before.len(), 4, "{before:?}");
    let started = Instant::now();
    let again = support::run_ok(&mut bench(&["--json"]));
    assert!(started.elapsed() < first_time, "reusing took longer than training");
    assert_eq!(summaries(&out), before);
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    for e in again["entries"].as_array().unwrap() {
        for run in e["runs"].as_array().unwrap() {
            assert_eq!(run["status"], "reused", "{run}");
        }
    }
    assert_eq!(
        again["entries"][0]["aggregate"], results["entries"][0]["aggregate"],
        "reused runs give the same aggregates"
    );

    // A pipeline whose data is not the 2-D ring or grid is refused before anything runs.
    let refused = nash()
        .args(["bench", "stability", "--steps", "30", "--seeds", "1", "--out"])
        .arg(dir.join("refused"))
        .arg(root.join("examples/autoencoder.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{err}");
    assert!(
        err.contains("entry `autoencoder`") && err.contains("`ring` or `grid`"),
        "{err}"
    );
    assert!(!dir.join("refused").exists());
}

/// The final `mode_coverage` values of one run in a `results.json`.
fn final_values(results: &Value) -> Vec<Value> {
    let run = &results["entries"][0]["runs"][0];
    ["modes_captured", "high_quality_share", "reverse_kl"]
        .iter()
        .map(|k| run[*k].clone())
        .collect()
}

#[test]
fn an_interrupted_run_continues_from_its_newest_checkpoint_to_the_same_result() {
    let root = support::workspace_root();
    let dir = support::scratch_dir("bench-stability-resume");
    let suite = dir.join("suite.toml");
    std::fs::write(
        &suite,
        format!(
            "[[entry]]\nname = \"gan\"\npipeline = {ring:?}\n\
             set = [\"training.sample_count=0\", \"training.checkpoint.every=10\", \"training.checkpoint.keep_last=5\"]\n",
            ring = root.join("examples/stability/quick_ring.toml").display().to_string()
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let bench = || {
        let mut cmd = nash();
        cmd.args(["bench", "stability", "--json", "--suite"])
            .arg(&suite)
            .args(["--steps", "30", "--seeds", "1", "--jobs", "1", "--out"])
            .arg(&out);
        support::run_ok(&mut cmd)
    };
    let first: Value = serde_json::from_slice(&bench().stdout).unwrap();
    assert_eq!(first["entries"][0]["runs"][0]["status"], "completed", "{first}");

    // Make the run look interrupted after step 10: no summary, no later checkpoint.
    let run = out.join("ring/gan/seed-0");
    std::fs::remove_file(run.join("summary.json")).unwrap();
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(run.join("checkpoints")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name == "step-00000010" {
            kept.push(name);
        } else if entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path()).unwrap();
        }
    }
    assert_eq!(kept, ["step-00000010"]);

    let second: Value = serde_json::from_slice(&bench().stdout).unwrap();
    assert_eq!(second["entries"][0]["runs"][0]["status"], "resumed", "{second}");
    // Training is deterministic from a checkpoint: the resumed run ends where the whole one did.
    assert_eq!(final_values(&second), final_values(&first));
    assert!(run.join("checkpoints/step-00000030").is_dir());
}
