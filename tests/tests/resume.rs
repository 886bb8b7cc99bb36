//! Checkpoints and exact resume through the `nash` binary: training 2N steps gives bit-identical
//! parameters and optimizer/stabilizer state to training N, resuming and training N more (a GAN
//! with Adam, a learning-rate schedule, weight clipping, gradient-norm clipping and an EMA of the
//! generator; and an autoencoder); Ctrl-C writes a checkpoint that resumes exactly; `sample` and
//! `eval` rebuild the model from a checkpoint; damaged checkpoints are named and skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nash_core::serde_json::{self, Value};
use nash_tests::support;

const GAN: &str = r#"
name = "resume_gan"
seed = 5
[data]
type = "ring"
train_samples = 512
test_samples = 256
[model]
type = "mlp_gan"
latent_dim = 4
discriminator_steps = 2
[model.generator]
layers = [{ type = "linear", out_features = 16 }, { type = "batch_norm" }, { type = "leaky_relu", negative_slope = 0.2 }, { type = "linear", out_features = 2 }]
[model.discriminator]
layers = [{ type = "linear", out_features = 16 }, { type = "leaky_relu", negative_slope = 0.2 }, { type = "linear", out_features = 1 }]
[optimizers.generator]
type = "adam"
lr = 1e-3
betas = [0.5, 0.999]
schedule = { kind = "cosine", total_steps = 60, min_lr = 1e-5 }
[optimizers.discriminator]
type = "adam"
lr = 1e-3
[[stabilizers]]
type = "weight_clipping"
group = "discriminator"
clip = 0.5
[[stabilizers]]
type = "gradient_norm_clipping"
max_norm = 1.0
[[stabilizers]]
type = "ema"
group = "generator"
decay = 0.9
[[metrics]]
type = "mode_coverage"
[training]
steps = 40
batch_size = 32
log_every = 5
eval_every = 20
eval_batches = 2
sample_count = 16
[training.checkpoint]
every = 20
keep_last = 5
best_metric = "metrics.reverse_kl"
best_mode = "min"
"#;

const AUTOENCODER: &str = r#"
name = "resume_ae"
seed = 2
[data]
type = "latent_manifold"
dim = 16
latent_dim = 2
train_samples = 256
test_samples = 64
[model]
type = "dense_autoencoder"
loss = { type = "mse" }
[model.encoder]
layers = [{ type = "linear", out_features = 8 }, { type = "relu" }, { type = "linear", out_features = 4 }]
[model.decoder]
layers = [{ type = "linear", out_features = 8 }, { type = "relu" }, { type = "linear", out_features = 16 }, { type = "sigmoid" }]
[optimizers.model]
type = "adam"
lr = 1e-2
[training]
steps = 40
batch_size = 16
log_every = 5
eval_every = 20
eval_batches = 2
sample_count = 4
[training.checkpoint]
every = 10
keep_last = 3
"#;

fn nash() -> Command {
    let mut cmd = Command::new(support::nash_binary());
    cmd.env_remove("NASH_PLUGIN_PATH").arg("--quiet");
    cmd
}

/// Writes `text` as `<dir>/<name>.toml`.
fn pipeline(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn train(pipeline: &Path, out: &Path, steps: u64) -> Output {
    support::run_ok(
        nash()
            .arg("train")
            .arg(pipeline)
            .arg("--out")
            .arg(out)
            .args(["--steps", &steps.to_string()]),
    )
}

fn checkpoint(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:08}"))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&read(path)).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The training lines of `metrics.jsonl` without their wall-clock field.
fn training_lines(run: &Path) -> Vec<Value> {
    String::from_utf8(read(&run.join("metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("elapsed_s");
            }
            v
        })
        .collect()
}

/// Asserts that two checkpoints hold bit-identical parameters and state tensors.
fn assert_same_checkpoint(a: &Path, b: &Path) {
    for file in ["params.safetensors", "state.safetensors"] {
        let (x, y) = (read(&a.join(file)), read(&b.join(file)));
        assert!(
            x == y,
            "{} and {} differ ({} vs {} bytes)",
            a.join(file).display(),
            b.join(file).display(),
            x.len(),
            y.len()
        );
    }
    let (sa, sb) = (json(&a.join("state.json")), json(&b.join("state.json")));
    for key in ["step", "rng", "state_meta", "pipeline_hash"] {
        assert_eq!(sa[key], sb[key], "state.json `{key}` differs");
    }
}

/// Trains 2N steps in one go and N + resume N, and checks both end bit-identical.
fn exact_resume(name: &str, text: &str, n: u64) {
    let dir = support::scratch_dir(name);
    let p = pipeline(&dir, name, text);
    let (full, half) = (dir.join("full"), dir.join("half"));
    train(&p, &full, 2 * n);
    train(&p, &half, n);
    assert_same_checkpoint(&checkpoint(&full, n), &checkpoint(&half, n));
    support::run_ok(nash().arg("resume").arg(&half).args(["--steps", &(2 * n).to_string()]));
    assert_same_checkpoint(&checkpoint(&full, 2 * n), &checkpoint(&half, 2 * n));
    assert_eq!(training_lines(&full), training_lines(&half), "metrics.jsonl differs");
    let (sf, sh) = (json(&full.join("summary.json")), json(&half.join("summary.json")));
    for key in [
        "status",
        "steps",
        "final_losses",
        "final_eval",
        "final_metrics",
        "initial_eval",
    ] {
        assert_eq!(sf[key], sh[key], "summary `{key}` differs");
    }
    assert_eq!(sh["status"], "completed");
    assert_eq!(
        std::fs::read_to_string(full.join("checkpoints/latest")).unwrap(),
        format!("step-{:08}\n", 2 * n)
    );
}

#[test]
fn gan_with_adam_and_stateful_stabilizers_resumes_bit_identically() {
    exact_resume("resume-gan", GAN, 20);
}

#[test]
fn evaluation_never_disturbs_training() {
    // The GAN's evaluations swap in the EMA of the generator and re-estimate its batch-norm
    // statistics for it; training with them every 10 steps ends bit-identical to training
    // without any.
    let dir = support::scratch_dir("eval-undisturbed");
    let p = pipeline(&dir, "gan", GAN);
    let (evaluated, plain) = (dir.join("evaluated"), dir.join("plain"));
    support::run_ok(nash().arg("train").arg(&p).arg("--out").arg(&evaluated).args([
        "--steps",
        "40",
        "--set",
        "training.eval_every=10",
    ]));
    support::run_ok(nash().arg("train").arg(&p).arg("--out").arg(&plain).args([
        "--steps",
        "40",
        "--set",
        "training.eval_every=0",
    ]));
    let evaluations = training_lines(&evaluated)
        .iter()
        .filter(|l| l.get("metrics").is_some())
        .count();
    assert!(evaluations >= 4, "{evaluations} evaluations");
    for file in ["params.safetensors", "state.safetensors"] {
        let (a, b) = (checkpoint(&evaluated, 40).join(file), checkpoint(&plain, 40).join(file));
        assert!(read(&a) == read(&b), "{} and {} differ", a.display(), b.display());
    }
}

#[test]
fn autoencoder_resumes_bit_identically_and_keeps_the_last_n() {
    exact_resume("resume-ae", AUTOENCODER, 20);
    // keep_last = 3 of the checkpoints at 10, 20, 30, 40.
    let run = support::target_dir().join("nash-tests/resume-ae/full");
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "step-00000020", "step-00000030", "step-00000040"]);
}

#[test]
fn sample_and_eval_rebuild_the_model_and_damage_is_named() {
    let dir = support::scratch_dir("resume-sample");
    let p = pipeline(&dir, "gan", GAN);
    let run = dir.join("run");
    train(&p, &run, 40);
    let summary = json(&run.join("summary.json"));
    // The best checkpoint by reverse KL is recorded and kept.
    let best = json(&run.join("checkpoints/best.json"));
    assert!(run
        .join("checkpoints")
        .join(best["checkpoint"].as_str().unwrap())
        .is_dir());

    // `eval` on the run's newest checkpoint reproduces the final evaluation exactly.
    let out = support::run_ok(nash().arg("eval").arg(&run).arg("--json"));
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["step"], 40);
    assert_eq!(e["metrics"], summary["final_metrics"]);
    assert_eq!(e["eval"], summary["final_eval"]);

    // `sample` writes an .npy of [count, 2] f32 values and a PNG scatter plot.
    let npy = dir.join("s.npy");
    support::run_ok(
        nash()
            .arg("sample")
            .arg(checkpoint(&run, 40))
            .args(["--count", "16", "--seed", "3", "--out"])
            .arg(&npy),
    );
    let bytes = read(&npy);
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(
        header.contains("'shape': (16, 2)") && header.contains("'<f4'"),
        "{header}"
    );
    assert_eq!(bytes.len(), 10 + hlen + 16 * 2 * 4);
    let values: Vec<f32> = bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(values.iter().all(|v| v.is_finite()) && values.iter().any(|v| *v != values[0]));
    let png = dir.join("s.png");
    support::run_ok(nash().arg("sample").arg(&run).arg("--out").arg(&png));
    assert_eq!(&read(&png)[1..4], b"PNG");

    // A truncated parameter file: `eval` of that checkpoint names it; of the run, falls back to step 20.
    let params = checkpoint(&run, 40).join("params.safetensors");
    let bytes = read(&params);
    std::fs::write(&params, &bytes[..bytes.len() / 2]).unwrap();
    let out = nash().arg("eval").arg(checkpoint(&run, 40)).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("params.safetensors"), "{err}");
    let out = support::run_ok(nash().arg("eval").arg(&run).arg("--json"));
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["step"], 20);
    // A checkpoint of another model: wrong parameter names are named with the file.
    let other = dir.join("other");
    train(&pipeline(&dir, "ae", AUTOENCODER), &other, 10);
    let foreign = checkpoint(&other, 10);
    let target = run.join("checkpoints/step-00000050");
    std::fs::create_dir_all(&target).unwrap();
    for f in ["params.safetensors", "state.safetensors", "state.json"] {
        std::fs::copy(foreign.join(f), target.join(f)).unwrap();
    }
    let out = nash().arg("eval").arg(&target).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("params.safetensors") && err.contains("not a parameter of this model"),
        "{err}"
    );
}

#[test]
fn ctrl_c_writes_a_checkpoint_that_resumes_exactly() {
    let dir = support::scratch_dir("resume-sigint");
    let p = pipeline(&dir, "ae", AUTOENCODER);
    let run = dir.join("run");
    let child = nash()
        .arg("train")
        .arg(&p)
        .arg("--out")
        .arg(&run)
        .args(["--steps", "1000000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few logged steps, then send SIGINT.
    let started = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 3 {
        assert!(started.elapsed() < Duration::from_secs(120), "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("nash resume"), "{err}");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "interrupted");
    let step = summary["steps"].as_u64().unwrap();
    assert!(step > 0 && step < 1_000_000);
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{step:08}"));

    // Resuming for 7 more steps ends where an uninterrupted run of step + 7 steps ends.
    let total = step + 7;
    support::run_ok(nash().arg("resume").arg(&run).args(["--steps", &total.to_string()]));
    let straight = dir.join("straight");
    train(&p, &straight, total);
    assert_same_checkpoint(&checkpoint(&straight, total), &checkpoint(&run, total));
    assert_eq!(json(&run.join("summary.json"))["status"], "completed");
}
