//! The training-health monitor through the `nash` binary, on runs made to fail: an absurd learning
//! rate that overflows (rolled back, continued at a lower learning rate) and a discriminator that
//! learns much faster than its generator (divergence, stopped with exit code 6), a generator shrunk
//! to a point by weight decay (mode collapse, stopped) and learning rates so high that the losses
//! swing up and down (oscillation, warned about). Each detector's
//! rules are unit-tested on synthetic series in `trainer/src/health.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nash_core::serde_json::{self, Value};
use nash_tests::support;
use nash_trainer::validate::exit;

/// A small GAN on the ring; `{g_lr}`, `{d_lr}` and `{health}` are filled in.
const GAN: &str = r#"
name = "health_gan"
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
lr = {g_lr}
[optimizers.discriminator]
type = "adam"
lr = {d_lr}
[[metrics]]
type = "mode_coverage"
[training]
steps = 200
batch_size = 64
log_every = 10
eval_every = 100
eval_batches = 1
sample_count = 16
[training.health]
{health}
"#;

fn gan(dir: &Path, g_lr: &str, d_lr: &str, health: &str) -> PathBuf {
    let text = GAN
        .replace("{g_lr}", g_lr)
        .replace("{d_lr}", d_lr)
        .replace("{health}", health);
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn train(pipeline: &Path, out: &Path) -> Output {
    Command::new(support::nash_binary())
        .env_remove("NASH_PLUGIN_PATH")
        .arg("--quiet")
        .arg("train")
        .arg(pipeline)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(run: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn an_overflowing_learning_rate_is_rolled_back_and_training_continues_lower() {
    let dir = support::scratch_dir("health-rollback");
    // Adam's first update moves every weight by about lr = 1e30: the next step overflows. The
    // rollback restores step 0 and scales the learning rates by 1e-33, to 1e-3.
    let pipeline = gan(
        &dir,
        "1e30",
        "1e30",
        "policy = { non_finite = \"rollback\" }\nlr_factor = 1e-33",
    );
    let run = dir.join("run");
    let out = train(&pipeline, &run);
    assert!(out.status.success(), "{}", text(&out));
    let s = summary(&run);
    assert_eq!(s["status"], "completed");
    assert_eq!(s["steps"], 200);
    assert_eq!(s["health"]["rollbacks"], 1, "{}", s["health"]);
    assert_eq!(s["health"]["events"]["non_finite"], 1, "{}", s["health"]);
    // The health log names the key that became non-finite and what was done.
    let events = json_lines(&run.join("health.jsonl"));
    let nf: Vec<&Value> = events.iter().filter(|e| e["kind"] == "non_finite").collect();
    assert_eq!(nf.len(), 1, "{events:?}");
    let key = nf[0]["key"].as_str().unwrap();
    assert!(
        !key.is_empty() && nf[0]["message"].as_str().unwrap().contains(key),
        "{events:?}"
    );
    assert!(
        nf[0]["action"]
            .as_str()
            .unwrap()
            .starts_with("rollback 1 of 3 to step 0"),
        "{events:?}"
    );
    // After the rollback every logged step trains at the lowered rate, with finite losses.
    let lines = json_lines(&run.join("metrics.jsonl"));
    let train: Vec<&Value> = lines.iter().filter(|l| l.get("lr").is_some()).collect();
    assert_eq!(train.len(), 20);
    for l in &train {
        for group in ["generator", "discriminator"] {
            let lr = l["lr"][group].as_f64().unwrap();
            assert!((lr / 1e-3 - 1.0).abs() < 1e-6, "{l}");
        }
        assert!(l["losses"]["loss/generator"].is_f64(), "{l}");
    }
    let health_line = lines.iter().find(|l| l["split"] == "health").unwrap();
    assert_eq!(health_line["step"], 0);
    // The report shows the event.
    let html = std::fs::read_to_string(run.join("index.html")).unwrap();
    assert!(html.contains("non_finite") && html.contains("rollback 1 of 3"));
}

#[test]
fn a_discriminator_that_wins_is_a_divergence_that_stops_the_run() {
    let dir = support::scratch_dir("health-divergence");
    // D learns 50,000 times faster than G: its loss drops near 0 within ~50 steps while the
    // generator's loss climbs from about 0.7 to above 6.
    let pipeline = gan(&dir, "1e-6", "0.05", "warmup = 5\npolicy = { divergence = \"stop\" }");
    let run = dir.join("run");
    let out = train(&pipeline, &run);
    assert_eq!(out.status.code(), Some(i32::from(exit::TRAINING)), "{}", text(&out));
    assert!(text(&out).contains("stopped by the health monitor"), "{}", text(&out));
    let s = summary(&run);
    assert_eq!(s["status"], "failed");
    assert_eq!(s["health"]["stopped_by"], "divergence");
    let stopped_at = s["steps"].as_u64().unwrap();
    assert!((20..200).contains(&stopped_at), "{stopped_at}");
    let events = json_lines(&run.join("health.jsonl"));
    let last = events.last().unwrap();
    assert_eq!(
        (last["kind"].as_str(), last["action"].as_str()),
        (Some("divergence"), Some("stop"))
    );
    assert_eq!(last["key"], "loss/discriminator");
    // The sample-diversity statistic is part of every evaluation of a generative model.
    assert!(s["initial_metrics"]["sample_diversity"].as_f64().unwrap() > 0.0, "{s}");
    // The failed run still gets its report, with the event.
    let html = std::fs::read_to_string(run.join("index.html")).unwrap();
    assert!(html.contains("the discriminator wins"));

    // The same pipeline with the default policy only warns, and completes.
    let pipeline = gan(&dir, "1e-6", "0.05", "warmup = 5");
    let run = dir.join("run-warn");
    let out = train(&pipeline, &run);
    assert!(out.status.success(), "{}", text(&out));
    let s = summary(&run);
    assert_eq!(s["status"], "completed");
    assert!(s["health"]["events"]["divergence"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["health"]["stopped_by"].is_null());
}

/// A heavy weight decay on every generator parameter (`rate = 0.5` per update, weights and
/// biases): whatever Adam adds, the parameters shrink towards 0 and every latent code maps to
/// (almost) the same point, so the fixed-seed samples lose their spread.
const SHRINK_G: &str = r#"
[[stabilizers]]
type = "weight_decay"
group = "generator"
rate = 0.5
roles = ["weight", "bias"]
"#;

#[test]
fn a_generator_whose_samples_collapse_to_a_point_is_a_mode_collapse_that_stops_the_run() {
    let dir = support::scratch_dir("health-mode-collapse");
    // Measured (seed 1): sample_diversity 0.267 at step 0, about 3e-7 at step 100 (below
    // 0.25 x 0.267); without the decay it grows to 0.38 at step 100 and 0.65 at step 200.
    let health = format!("policy = {{ mode_collapse = \"stop\" }}\n{SHRINK_G}");
    let pipeline = gan(&dir, "1e-3", "1e-3", &health);
    let run = dir.join("run");
    let out = train(&pipeline, &run);
    assert_eq!(out.status.code(), Some(i32::from(exit::TRAINING)), "{}", text(&out));
    assert!(text(&out).contains("stopped by the health monitor"), "{}", text(&out));
    let s = summary(&run);
    assert_eq!(s["status"], "failed");
    assert_eq!(s["health"]["stopped_by"], "mode_collapse", "{}", s["health"]);
    // Detected at the first evaluation after the start (eval_every = 100).
    assert_eq!(s["steps"], 100, "{s}");
    let initial = s["initial_metrics"]["sample_diversity"].as_f64().unwrap();
    assert!(initial > 0.1, "{s}");
    let events = json_lines(&run.join("health.jsonl"));
    let last = events.last().unwrap();
    assert_eq!(
        (last["kind"].as_str(), last["action"].as_str(), last["key"].as_str()),
        (Some("mode_collapse"), Some("stop"), Some("sample_diversity")),
        "{events:?}"
    );
    assert_eq!(last["step"], 100);
    // The evaluation that fired shows the collapsed diversity.
    let lines = json_lines(&run.join("metrics.jsonl"));
    let eval = lines.iter().find(|l| l["split"] == "test" && l["step"] == 100).unwrap();
    let collapsed = eval["metrics"]["sample_diversity"].as_f64().unwrap();
    assert!(collapsed < 0.25 * initial.min(1.0), "{eval}");

    // The same GAN without the decay keeps its spread: no mode-collapse event, and it completes.
    let pipeline = gan(&dir, "1e-3", "1e-3", "policy = { mode_collapse = \"stop\" }");
    let run = dir.join("run-healthy");
    let out = train(&pipeline, &run);
    assert!(out.status.success(), "{}", text(&out));
    let s = summary(&run);
    assert_eq!(s["status"], "completed");
    assert!(s["health"]["events"].is_object(), "{}", s["health"]);
    assert!(s["health"]["events"].get("mode_collapse").is_none(), "{}", s["health"]);
}

/// The oscillation detector tuned to runs of a few hundred steps: a 100-step window, a faster
/// moving average, and swings of 20 % of the loss's level.
const OSCILLATION: &str =
    "ema = 0.3\noscillation_window = 100\noscillation_amplitude = 0.2\noscillation_min_swing = 0.05\n\
                           oscillation_flips = 5\npolicy = { oscillation = \"warn\" }";

#[test]
fn losses_that_swing_up_and_down_are_an_oscillation_that_is_logged_and_warned_about() {
    let dir = support::scratch_dir("health-oscillation");
    // Adam at lr 0.05 on both networks overshoots back and forth: measured with these thresholds,
    // 7 to 16 reversals of a smoothed loss within 100 steps (seeds 1, 2, 3; 9 for seed 1 by step
    // 100), against at most 1 at lr 1e-3.
    let pipeline = gan(&dir, "0.05", "0.05", OSCILLATION);
    let run = dir.join("run");
    let out = train(&pipeline, &run);
    assert!(out.status.success(), "{}", text(&out));
    let s = summary(&run);
    assert_eq!(s["status"], "completed");
    assert_eq!(s["steps"], 200);
    let count = s["health"]["events"]["oscillation"].as_u64().unwrap_or(0);
    assert!(count >= 1, "{}", s["health"]);
    assert!(s["health"]["stopped_by"].is_null());
    let events = json_lines(&run.join("health.jsonl"));
    let osc: Vec<&Value> = events.iter().filter(|e| e["kind"] == "oscillation").collect();
    assert_eq!(osc.len() as u64, count, "{events:?}");
    for e in &osc {
        assert_eq!(e["action"], "warn", "{e}");
        assert!(e["key"].as_str().unwrap().starts_with("loss/"), "{e}");
        assert!(e["message"].as_str().unwrap().contains("reversed direction"), "{e}");
        // A full window is needed first.
        assert!((100..=200).contains(&e["step"].as_u64().unwrap()), "{e}");
    }

    // A calm run (lr 1e-3) with the same thresholds has no oscillation.
    let pipeline = gan(&dir, "1e-3", "1e-3", OSCILLATION);
    let run = dir.join("run-calm");
    let out = train(&pipeline, &run);
    assert!(out.status.success(), "{}", text(&out));
    let s = summary(&run);
    assert!(s["health"]["events"].is_object(), "{}", s["health"]);
    assert!(s["health"]["events"].get("oscillation").is_none(), "{}", s["health"]);
}
