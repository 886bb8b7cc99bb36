//! Output folders that cannot be written, through the `nash` binary: a run folder that cannot be
//! created is a clear error naming it (exit code 1), and a checkpoint that cannot be written stops
//! the run with the last good checkpoint intact, loadable and resumable.
//!
//! Tests may run as root, for whom permission bits do not stop writes: the blocked paths here are
//! made with a regular file where a folder must go (`ENOTDIR` for everyone); the read-only-folder
//! case runs only where permissions are enforced.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nash_tests::support;
use nash_trainer::validate::exit;

/// A tiny GAN on the ring with a checkpoint every 10 steps.
const GAN: &str = r#"
name = "bad_output"
seed = 1
[data]
type = "ring"
train_samples = 1024
test_samples = 256
[model]
type = "mlp_gan"
latent_dim = 4
[model.generator]
layers = [{ type = "linear", out_features = 32 }, { type = "leaky_relu", negative_slope = 0.2 }, { type = "linear", out_features = 2 }]
[model.discriminator]
layers = [{ type = "linear", out_features = 32 }, { type = "leaky_relu", negative_slope = 0.2 }, { type = "linear", out_features = 1 }]
[optimizers.generator]
type = "adam"
lr = 1e-3
[optimizers.discriminator]
type = "adam"
lr = 1e-3
[training]
steps = 20
batch_size = 64
log_every = 10
eval_every = 10
eval_batches = 1
sample_count = 16
[training.checkpoint]
every = 10
"#;

fn pipeline(dir: &Path) -> PathBuf {
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, GAN).unwrap();
    path
}

fn nash() -> Command {
    let mut cmd = Command::new(support::nash_binary());
    cmd.env_remove("NASH_PLUGIN_PATH").arg("--quiet");
    cmd
}

fn train(pipeline: &Path, out: &Path) -> Output {
    nash()
        .arg("train")
        .arg(pipeline)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Asserts a clean failure with exit code 1 whose message names `folder`.
fn assert_output_error(out: &Output, folder: &Path) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(i32::from(exit::OTHER)), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(&folder.display().to_string()), "{err}");
}

#[test]
fn a_run_folder_that_cannot_be_created_is_a_clear_error_with_exit_code_1() {
    let dir = support::scratch_dir("bad-output-folder");
    let pipeline = pipeline(&dir);

    // A regular file where a folder must go: refused for root too.
    let file = dir.join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let out_dir = file.join("run");
    let out = train(&pipeline, &out_dir);
    assert_output_error(&out, &out_dir);
    assert!(
        stderr(&out).contains("cannot create the run folder"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a folder");

    // A read-only folder, where permissions are enforced (not for root).
    let read_only = dir.join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = read_only.join("probe");
    if std::fs::write(&probe, "").is_ok() {
        std::fs::remove_file(&probe).unwrap();
        eprintln!("permissions are not enforced for this user: the read-only-folder case is skipped");
    } else {
        let out_dir = read_only.join("run");
        let out = train(&pipeline, &out_dir);
        assert_output_error(&out, &out_dir);
        assert!(!out_dir.exists());
    }
    std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_checkpoint_that_cannot_be_written_leaves_the_last_good_one_intact() {
    let dir = support::scratch_dir("bad-output-checkpoint");
    let pipeline = pipeline(&dir);
    let run = dir.join("run");
    let out = train(&pipeline, &run);
    assert!(out.status.success(), "{}", stderr(&out));
    let checkpoints = run.join("checkpoints");
    let good = checkpoints.join("step-00000020");
    let files = ["params.safetensors", "state.safetensors", "state.json"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(good.join(f)).unwrap()).collect();
    let eval_before = support::run_ok(nash().arg("eval").arg(&run).arg("--json"));

    // The resume's first checkpoint (step 30) is written into `step-00000030.tmp/`: a regular
    // file of that name cannot be cleared or replaced by a folder, for root too.
    let blocker = checkpoints.join("step-00000030.tmp");
    std::fs::write(&blocker, "in the way").unwrap();
    let out = nash().arg("resume").arg(&run).args(["--steps", "40"]).output().unwrap();
    assert_output_error(&out, &blocker);

    // The last good checkpoint is untouched, still the latest, and loads.
    for (f, bytes) in files.iter().zip(&before) {
        assert!(std::fs::read(good.join(f)).unwrap() == *bytes, "{f} changed");
    }
    assert_eq!(
        std::fs::read_to_string(checkpoints.join("latest")).unwrap().trim(),
        "step-00000020"
    );
    assert!(!checkpoints.join("step-00000030").exists());
    let eval_after = support::run_ok(nash().arg("eval").arg(&run).arg("--json"));
    assert_eq!(eval_after.stdout, eval_before.stdout);

    // Once the path is free again the run resumes from it and completes.
    std::fs::remove_file(&blocker).unwrap();
    support::run_ok(nash().arg("resume").arg(&run).args(["--steps", "40"]));
    assert_eq!(
        std::fs::read_to_string(checkpoints.join("latest")).unwrap().trim(),
        "step-00000040"
    );
}
