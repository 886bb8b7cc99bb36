//! Helpers for integration tests: where the workspace and its build outputs are, building the
//! whole workspace once per test process (so that plugin `cdylib`s and the `nash` binary exist),
//! scratch directories, and running one test in a process of its own.
//!
//! `cargo test` does not build other packages' `cdylib`s or binaries, so a test that loads a
//! plugin or runs `nash` calls [`build_workspace`] first (or [`nash_binary`] / [`plugin_library`],
//! which do). It builds the profile the tests run in, into the same target directory, with the
//! workspace's own `.cargo/config.toml`, so every library links the same `libnash_core.so`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The environment variable that tells a test binary which test runs in its own process.
pub const OWN_PROCESS_VAR: &str = "NASH_TEST_OWN_PROCESS";

/// The workspace root (the directory of the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the workspace root")
        .to_path_buf()
}

/// The profile output directory the running test binary was built into (`target/debug`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("test binaries live in <target>/<profile>/deps");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("<target>/<profile>").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The target directory (`target`), the parent of [`profile_dir`].
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .expect("the profile directory has a parent")
        .to_path_buf()
}

/// The cargo profile matching [`profile_dir`]: `dev` for `debug`, otherwise the directory's name.
pub fn cargo_profile() -> String {
    match profile_dir().file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".into(),
        Some(name) => name.to_string(),
    }
}

/// A `cargo` command (the cargo running the tests, else the one on `PATH`) in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd`, panicking with its full output if it fails; returns the output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let output = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Builds every package of the workspace (libraries, plugin `cdylib`s, the `nash` binary) in the
/// profile and target directory of the running tests, once per test process.
pub fn build_workspace() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let started = std::time::Instant::now();
        run_ok(
            cargo()
                .args(["build", "--workspace", "--profile"])
                .arg(cargo_profile())
                .arg("--target-dir")
                .arg(target_dir()),
        );
        eprintln!("built the workspace in {:.1}s", started.elapsed().as_secs_f64());
        assert_core_unchanged();
    });
}

/// Panics with an explanation if `libnash_core.so` on disk is no longer the file this process
/// mapped: the workspace build rebuilt nash-core, so its plugins link another nash-core build than
/// this test binary (the loader would rightly refuse them, and child processes would not start).
/// Cargo resolves dependency features per selected package set, so `cargo test -p nash-tests`
/// can build nash-core differently from `cargo build --workspace`.
fn assert_core_unchanged() {
    use std::os::unix::fs::MetadataExt;
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let Some(line) = maps.lines().find(|l| l.contains("/libnash_core.so")) else {
        return;
    };
    let fields: Vec<&str> = line.split_whitespace().collect();
    let mapped_inode: u64 = fields.get(4).and_then(|i| i.parse().ok()).unwrap_or(0);
    let path = PathBuf::from(&line[line.find('/').unwrap()..]);
    let on_disk = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
    assert!(
        mapped_inode == on_disk && !line.ends_with("(deleted)"),
        "`cargo build --workspace` rebuilt {}, so this test binary links another nash-core build than the \
         workspace's plugins: nash-core's sources changed after this binary was built, or the tests were run with \
         another feature resolution than the workspace's (`cargo test -p nash-tests` resolves dependency features \
         for that package alone). Run them as `cargo test --workspace` (optionally `--test <name>`).",
        path.display()
    );
}

/// The `nash` binary, built.
pub fn nash_binary() -> PathBuf {
    build_workspace();
    profile_dir().join("nash")
}

/// The shared library of the workspace plugin package `package` (`nash-huber-loss` →
/// `target/debug/libnash_huber_loss.so`), built.
pub fn plugin_library(package: &str) -> PathBuf {
    build_workspace();
    profile_dir().join(format!("lib{}.so", package.replace('-', "_")))
}

/// A fresh, empty scratch directory `target/nash-tests/<name>` (removed first if it exists).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = target_dir().join("nash-tests").join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("cannot clear {}: {e}", dir.display()));
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Runs the test `name` of this test binary in a process of its own, for tests that change
/// process-wide state (environment variables, loaded libraries, typetag's registry, which freezes
/// on the first deserialization). Use it as the first line of the test:
///
/// ```ignore
/// #[test]
/// fn my_test() {
///     if !support::in_own_process("my_test") { return; }
///     // the test, run in the child process only
/// }
/// ```
///
/// Returns `true` in the child, which then runs the test body. In the parent it runs the child
/// (with `NASH_PLUGIN_PATH` removed and `env` set), panics with its output if the test failed or
/// did not run, and returns `false`.
pub fn in_own_process_with(name: &str, env: &[(&str, &std::ffi::OsStr)]) -> bool {
    if std::env::var(OWN_PROCESS_VAR).as_deref() == Ok(name) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = Command::new(exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(OWN_PROCESS_VAR, name)
        .env_remove("NASH_PLUGIN_PATH");
    for (key, value) in env {
        cmd.env(key, value);
    }
    let output = run_ok(&mut cmd);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("1 passed"),
        "the test `{name}` did not run in its own process (wrong name?)\n{stdout}"
    );
    false
}

/// [`in_own_process_with`] without extra environment variables.
pub fn in_own_process(name: &str) -> bool {
    in_own_process_with(name, &[])
}
