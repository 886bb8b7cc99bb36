//! The plugin loader against real plugin libraries: the workspace's plugins and the example
//! third-party plugin load and register their types, the example's loss is used from a
//! pipeline-shaped TOML file, and incompatible or broken libraries are refused with clear errors
//! before any of their code runs.
//!
//! The loader is the trainer's own module, compiled here from its source. Tests that change
//! process-wide state (loading a second copy of a plugin, typetag's registry, environment
//! variables) run in a process of their own.

#[path = "../../trainer/src/loader.rs"]
#[allow(dead_code)]
mod loader;

use std::path::{Path, PathBuf};
use std::process::Command;

use loader::PluginSet;
use nash_core::loss::LossConfig;
use nash_core::plugin::PluginDeclaration;
use nash_core::prelude::{AsArray, Trace};
use nash_core::registry::Kind;
use nash_core::serde_json;
use nash_core::tensor::{matrix_from_vec, Device};
use nash_tests::support;

const EXAMPLE: &str = "nash-huber-loss";

fn expect_refusal(result: nash_core::Result<()>, path: &Path, needles: &[&str]) -> String {
    let err = result.expect_err("the library must be refused");
    assert!(
        matches!(&err, nash_core::Error::Plugin { path: p, .. } if p.file_name() == path.file_name()),
        "expected a plugin error about {}, got {err:?}",
        path.display()
    );
    let message = err.to_string();
    assert!(
        message.contains(&*path.file_name().unwrap().to_string_lossy()),
        "{message}"
    );
    for needle in needles {
        assert!(message.contains(needle), "`{needle}` missing from: {message}");
    }
    message
}

/// The workspace packages that build a `cdylib`: the plugins `load_all` must find.
fn workspace_plugin_packages() -> Vec<String> {
    let output = support::run_ok(support::cargo().args(["metadata", "--no-deps", "--format-version", "1"]));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("cargo metadata JSON");
    metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["crate_types"].as_array().unwrap().iter().any(|c| c == "cdylib"))
        })
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn workspace_plugins_load_from_beside_the_executable() {
    if !support::in_own_process("workspace_plugins_load_from_beside_the_executable") {
        return;
    }
    support::build_workspace();
    let expected = workspace_plugin_packages();
    assert!(
        expected.iter().any(|p| p == EXAMPLE),
        "the example plugin must be a workspace member: {expected:?}"
    );
    let set = PluginSet::load_all(&[]).unwrap_or_else(|e| panic!("{e}"));
    let exe_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .canonicalize()
        .unwrap();
    for package in &expected {
        let plugin = set
            .plugins
            .iter()
            .find(|p| &p.name == package)
            .unwrap_or_else(|| panic!("plugin {package} was not loaded; loaded: {:?}", set.plugins));
        assert_eq!(plugin.path.parent().unwrap(), exe_dir);
        assert_eq!(plugin.version, env!("CARGO_PKG_VERSION"));
        assert!(
            set.registry.types().iter().any(|t| &t.plugin == package),
            "plugin {package} registered no type"
        );
    }
    assert_eq!(set.plugins.len(), expected.len(), "{:?}", set.plugins);
    // nash-core's own types come first and are attributed to it.
    assert_eq!(set.registry.types()[0].plugin, "nash-core");
    assert_eq!(set.registry.find(Kind::Loss, "huber").unwrap().plugin, EXAMPLE);
}

#[test]
fn example_plugin_is_used_from_a_pipeline_file() {
    if !support::in_own_process("example_plugin_is_used_from_a_pipeline_file") {
        return;
    }
    let library = support::plugin_library(EXAMPLE);
    let mut set = PluginSet::core_only().unwrap();
    set.load(&library).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.plugins.len(), 1);
    assert_eq!(set.plugins[0].name, EXAMPLE);
    assert_eq!(set.plugins[0].path, library.canonicalize().unwrap());
    let huber = set.registry.find(Kind::Loss, "huber").expect("huber is registered");
    assert_eq!(huber.plugin, EXAMPLE);
    assert_eq!(huber.fields.len(), 1);
    assert_eq!(huber.fields[0].name, "delta");
    assert_eq!(huber.fields[0].default, serde_json::json!(1.0));
    // Loading the same file again (here through the uplifted and the deps/ hard link) is a no-op.
    set.load(&library).unwrap();
    assert_eq!(set.plugins.len(), 1);

    #[derive(nash_core::serde::Deserialize)]
    #[serde(crate = "nash_core::serde")]
    struct Pipeline {
        #[allow(dead_code)]
        plugins: Vec<PathBuf>,
        loss: Box<dyn LossConfig>,
    }
    let pipeline: Pipeline = toml::from_str(&format!(
        "plugins = [{:?}]\n[loss]\ntype = \"huber\"\ndelta = 0.5\n",
        library.display().to_string()
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let loss = pipeline.loss.build().unwrap();
    assert_eq!(loss.name(), "huber");
    let dev = Device::default();
    let prediction = matrix_from_vec(&dev, vec![0.3, -1.7, 2.5, 0.05], 2, 2).unwrap();
    let target = matrix_from_vec(&dev, vec![0.1, 0.2, -0.5, 0.0], 2, 2).unwrap();
    let value = loss.compute(prediction.leaky_trace(), &target).unwrap().array();
    // torch.nn.HuberLoss(delta=0.5)(p, t): r = [0.2, -1.9, 3.0, 0.05] →
    // mean([0.5*0.2², 0.5*(1.9-0.25), 0.5*(3.0-0.25), 0.5*0.05²]) = (0.02+0.825+1.375+0.00125)/4
    let expected = (0.02 + 0.825 + 1.375 + 0.00125) / 4.0;
    assert!((value - expected).abs() < 1e-6, "{value} vs {expected}");
}

#[test]
fn plugin_directories_skip_other_libraries() {
    let library = support::plugin_library(EXAMPLE);
    let dir = support::scratch_dir("plugin-dir");
    std::os::unix::fs::symlink(&library, dir.join("libnash_huber_loss.so")).unwrap();
    std::os::unix::fs::symlink(
        support::profile_dir().join("libnash_core.so"),
        dir.join("libnash_core.so"),
    )
    .unwrap();
    std::fs::write(dir.join("libc.so"), "/* GNU ld script */\nINPUT(-lc)\n").unwrap();
    std::fs::write(dir.join("README.txt"), "not a library").unwrap();
    let mut set = PluginSet::core_only().unwrap();
    set.load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = set.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, [EXAMPLE]);
}

#[test]
fn plugin_path_entries_are_loaded_and_missing_ones_named() {
    let library = support::plugin_library(EXAMPLE);
    let dir = support::scratch_dir("plugin-path");
    let link = dir.join("libhuber_link.so");
    std::os::unix::fs::symlink(&library, &link).unwrap();
    if !support::in_own_process_with(
        "plugin_path_entries_are_loaded_and_missing_ones_named",
        &[(loader::PLUGIN_PATH_VAR, dir.as_os_str())],
    ) {
        return;
    }
    // The example is found beside the executable and again on NASH_PLUGIN_PATH (a link to the
    // same file): it is loaded once.
    let set = PluginSet::load_all(&[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        set.plugins.iter().filter(|p| p.name == EXAMPLE).count(),
        1,
        "{:?}",
        set.plugins
    );
    // Entries may be files too; an entry that does not exist is refused, naming it.
    let missing = dir.join("no-such-dir");
    std::env::set_var(
        loader::PLUGIN_PATH_VAR,
        std::env::join_paths([link.clone(), missing.clone()]).unwrap(),
    );
    let err = PluginSet::load_all(&[]).expect_err("the missing entry is refused");
    let message = err.to_string();
    assert!(message.contains(&*missing.to_string_lossy()), "{message}");
    assert!(message.contains("NASH_PLUGIN_PATH"), "{message}");
}

#[test]
fn missing_file_is_refused_naming_it() {
    let path = support::target_dir().join("nash-tests/no-such-dir/libnash_missing.so");
    let mut set = PluginSet::core_only().unwrap();
    let message = expect_refusal(set.load(&path), &path, &["cannot open the plugin library"]);
    assert!(message.contains(&*path.to_string_lossy()), "{message}");
}

#[test]
fn files_that_are_not_plugins_are_refused() {
    let dir = support::scratch_dir("not-plugins");
    let text = dir.join("libnotes.so");
    std::fs::write(&text, "just some text\n").unwrap();
    let mut set = PluginSet::core_only().unwrap();
    expect_refusal(set.load(&text), &text, &["not a 64-bit ELF shared library"]);

    // A real shared library that is not a plugin: nash-core itself.
    support::build_workspace();
    let core = support::profile_dir().join("libnash_core.so");
    expect_refusal(
        set.load(&core),
        &core,
        &["not a nash plugin", "NASH_PLUGIN_DECLARATION", "declare_plugin!"],
    );
    assert!(set.plugins.is_empty());
}

/// Compiles a fake plugin `lib<name>.so` with the workspace's rustc, outside cargo: it exports a
/// declaration-sized `NASH_PLUGIN_DECLARATION`, so only its links can tell it apart from a plugin,
/// and calls into std, so that a `-C prefer-dynamic` build really links libstd-<hash>.so.
/// `extra_source` is appended to its source and `extra_args` to rustc's arguments.
fn compile_fake_plugin(
    name: &str,
    prefer_dynamic: bool,
    extra_source: &str,
    extra_args: &[&std::ffi::OsStr],
) -> PathBuf {
    let dir = support::scratch_dir(&format!("fake-{name}"));
    let size = std::mem::size_of::<PluginDeclaration>();
    let source = format!(
        "#[no_mangle]\npub static NASH_PLUGIN_DECLARATION: [u8; {size}] = [0; {size}];\n\
         #[no_mangle]\npub extern \"C\" fn nash_fake_args() -> usize {{ std::env::args().count() }}\n{extra_source}"
    );
    std::fs::write(dir.join("fake.rs"), source).unwrap();
    let out = dir.join(format!("lib{name}.so"));
    let mut cmd = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()));
    cmd.current_dir(support::workspace_root())
        .args(["--edition", "2021", "--crate-type", "cdylib", "-o"])
        .arg(&out)
        .arg(dir.join("fake.rs"))
        .args(extra_args);
    if prefer_dynamic {
        cmd.args(["-C", "prefer-dynamic"]);
    }
    support::run_ok(&mut cmd);
    out
}

#[test]
fn library_with_static_std_is_refused() {
    let path = compile_fake_plugin("static_std", false, "", &[]);
    let mut set = PluginSet::core_only().unwrap();
    expect_refusal(
        set.load(&path),
        &path,
        &["links Rust's std statically", "-C prefer-dynamic"],
    );
}

#[test]
fn library_without_libnash_core_is_refused() {
    let path = compile_fake_plugin("own_core", true, "", &[]);
    let mut set = PluginSet::core_only().unwrap();
    expect_refusal(
        set.load(&path),
        &path,
        &["does not link libnash_core.so", "its own static copy of nash-core"],
    );
}

/// A Rust function that libnash_core.so defines, as a legacy-mangled name ending in its hash
/// (`...17h<16 hex digits>E`).
fn core_function_symbol() -> String {
    use object::{Object, ObjectSymbol, SymbolKind};
    support::build_workspace();
    let data = std::fs::read(support::profile_dir().join("libnash_core.so")).unwrap();
    let file = object::File::parse(&*data).expect("libnash_core.so is an object file");
    let name = file
        .dynamic_symbols()
        .filter(|s| s.is_definition() && s.kind() == SymbolKind::Text)
        .filter_map(|s| s.name().ok())
        .find(|n| n.starts_with("_ZN9nash_core") && n.len() > 20 && n[n.len() - 20..].starts_with("17h"))
        .expect("libnash_core.so exports legacy-mangled nash_core functions");
    name.to_string()
}

#[test]
fn plugin_importing_another_core_builds_symbols_is_refused() {
    // What a plugin built against another nash-core build looks like to the loader (the real
    // build is `plugin_built_against_another_core_build_is_refused`, ignored for its cost): it
    // links libstd and libnash_core.so like a workspace plugin, but some of its nash_core imports
    // carry another hash, so the loaded libnash_core.so does not define them. The fake imports
    // one function libnash_core.so defines (so the link to it is kept) and the same name with
    // its hash changed.
    let real = core_function_symbol();
    let hash_at = real.len() - 17;
    let flipped: String = real[hash_at..hash_at + 16]
        .chars()
        .map(|c| std::char::from_digit(15 - c.to_digit(16).unwrap(), 16).unwrap())
        .collect();
    let other = format!("{}{flipped}E", &real[..hash_at]);
    let source = format!(
        "#[link(name = \"nash_core\", kind = \"dylib\")]\nextern \"C\" {{\n\
         #[link_name = \"{real}\"] fn real();\n#[link_name = \"{other}\"] fn other();\n}}\n\
         #[no_mangle]\npub extern \"C\" fn nash_fake_imports() -> usize {{ real as usize + other as usize }}\n"
    );
    let mut search = std::ffi::OsString::from("native=");
    search.push(support::profile_dir());
    let path = compile_fake_plugin("other_core", true, &source, &["-L".as_ref(), search.as_os_str()]);
    let mut set = PluginSet::core_only().unwrap();
    let message = expect_refusal(
        set.load(&path),
        &path,
        &[
            "built against another nash-core build",
            "1 of its 2 nash-core imports are not defined",
            "cargo build --workspace",
        ],
    );
    assert!(message.contains(&other), "the missing import is named: {message}");
    assert!(set.plugins.is_empty());
}

#[test]
#[ignore = "builds nash-core and dfdx a second time (about 5 minutes on 2 cores); run with `cargo test -- --ignored`"]
fn plugin_built_against_another_core_build_is_refused() {
    // The example plugin built the way a user outside the workspace might: its own workspace with
    // a path dependency on nash-core, the workspace's Cargo.lock, profiles and rustflags (cargo runs
    // in the workspace root, so its .cargo/config.toml applies) — and its own target directory, as
    // a second nash-core build in the shared one would overwrite `deps/libnash_core.so`. Cargo
    // hashes a path package outside the workspace by its absolute path, so nash-core gets another
    // `-C metadata`: another build, with other symbol hashes. (This is the suite's one extra build
    // of dfdx; its target directory is kept between runs.)
    support::build_workspace();
    let root = support::workspace_root();
    let crate_dir = support::target_dir().join("nash-tests/standalone-huber");
    std::fs::create_dir_all(crate_dir.join("src")).unwrap();
    let example = root.join("examples/plugin-huber-loss");
    let manifest = std::fs::read_to_string(example.join("Cargo.toml")).unwrap().replace(
        "path = \"../../core\"",
        &format!("path = {:?}", root.join("core").display().to_string()),
    );
    let root_manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let profiles = &root_manifest[root_manifest.find("[profile.").expect("the workspace sets profiles")..];
    write_if_changed(
        &crate_dir.join("Cargo.toml"),
        &format!("{manifest}\n[workspace]\n\n{profiles}"),
    );
    write_if_changed(
        &crate_dir.join("src/lib.rs"),
        &std::fs::read_to_string(example.join("src/lib.rs")).unwrap(),
    );
    if !crate_dir.join("Cargo.lock").exists() {
        std::fs::copy(root.join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
    }
    let started = std::time::Instant::now();
    support::run_ok(
        support::cargo()
            .arg("build")
            .arg("--manifest-path")
            .arg(crate_dir.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(crate_dir.join("target"))
            .arg("--profile")
            .arg(support::cargo_profile()),
    );
    eprintln!("built the standalone plugin in {:.1}s", started.elapsed().as_secs_f64());
    let path = crate_dir
        .join("target")
        .join(support::profile_dir().file_name().unwrap())
        .join("libnash_huber_loss.so");
    let mut set = PluginSet::core_only().unwrap();
    expect_refusal(
        set.load(&path),
        &path,
        &[
            "built against another nash-core build",
            "nash-core imports are not defined",
            "cargo build --workspace",
        ],
    );
    assert!(set.plugins.is_empty());
}

fn write_if_changed(path: &Path, contents: &str) {
    if std::fs::read_to_string(path).ok().as_deref() != Some(contents) {
        std::fs::write(path, contents).unwrap();
    }
}

#[test]
fn duplicate_tag_is_refused_naming_both_plugins() {
    let library = support::plugin_library(EXAMPLE);
    let dir = support::scratch_dir("duplicate");
    let copy = dir.join("libhuber_copy.so");
    std::fs::copy(&library, &copy).unwrap();
    if !support::in_own_process("duplicate_tag_is_refused_naming_both_plugins") {
        return;
    }
    let mut set = PluginSet::core_only().unwrap();
    set.load(&library).unwrap_or_else(|e| panic!("{e}"));
    let first = library.canonicalize().unwrap();
    let message = expect_refusal(
        set.load(&copy),
        &copy,
        &[
            "duplicate loss tag `huber`",
            "registered by plugin `nash-huber-loss` and again by plugin `nash-huber-loss`",
            "second copy",
        ],
    );
    assert!(
        message.contains(&*first.to_string_lossy()),
        "the first file is named: {message}"
    );
    assert!(
        message.contains(&*copy.canonicalize().unwrap().to_string_lossy()),
        "{message}"
    );
    assert_eq!(set.plugins.len(), 1);
}
