//! Training through dynamically loaded plugins, end to end: the `nash` binary trains the reference
//! autoencoder and the MLP GAN from pipeline files, and a model built by a plugin computes exactly
//! the gradients an in-process copy of it computes.

use std::path::{Path, PathBuf};
use std::process::Command;

use nash_core::data::DataInfo;
use nash_core::layers::{BuildContext, ForwardContext, Mode, SequentialConfig};
use nash_core::loss::{Loss, Mse};
use nash_core::model::{ModelConfig, TrainContext};
use nash_core::optim::{OptimizerConfig, SgdConfig};
use nash_core::prelude::*;
use nash_core::rand::SeedableRng;
use nash_core::serde_json::{self, json, Value};
use nash_core::stabilizer::StabilizerStack;
use nash_core::tensor::matrix_from_vec;
use nash_tests::support;
use nash_trainer::PluginSet;

/// Runs `nash train <pipeline>` with `args` into a fresh run folder and returns its summary.
fn train(name: &str, pipeline: &Path, args: &[&str]) -> (PathBuf, Value) {
    let out = support::scratch_dir(name);
    let output = support::run_ok(
        Command::new(support::nash_binary())
            .arg("train")
            .arg(pipeline)
            .args(["--quiet", "--out"])
            .arg(&out)
            .args(args)
            .env_remove("NASH_PLUGIN_PATH"),
    );
    let summary = std::fs::read_to_string(out.join("summary.json")).unwrap_or_else(|e| {
        panic!(
            "no summary.json ({e}); nash printed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (out, serde_json::from_str(&summary).expect("summary.json is JSON"))
}

fn number(summary: &Value, section: &str, key: &str) -> f64 {
    summary[section][key]
        .as_f64()
        .unwrap_or_else(|| panic!("summary has no numeric {section}.{key}: {summary:#}"))
}

fn example(file: &str) -> PathBuf {
    support::workspace_root().join("examples").join(file)
}

/// The reference dense autoencoder (784-128-64-16 / 16-64-784) on 784-dimensional data with an
/// 8-dimensional latent structure: the held-out reconstruction error falls at least tenfold.
#[test]
fn reference_autoencoder_compresses_structured_data_tenfold() {
    let (_, summary) = train(
        "autoencoder_tenfold",
        &example("autoencoder.toml"),
        &[
            "--set",
            "data.train_samples=4096",
            "--set",
            "data.test_samples=512",
            "--set",
            "training.steps=600",
            "--set",
            "training.eval_every=600",
        ],
    );
    assert_eq!(summary["status"], "completed", "{summary:#}");
    let before = number(&summary, "initial_metrics", "reconstruction_mse");
    let after = number(&summary, "final_metrics", "reconstruction_mse");
    eprintln!(
        "held-out reconstruction MSE: {before:.5} -> {after:.5} ({:.1}x)",
        before / after
    );
    assert!(
        after * 10.0 <= before,
        "held-out reconstruction MSE fell only from {before} to {after}"
    );
}

/// The MLP GAN on the 8-mode ring: generated samples move onto the modes (the share within 3σ of a
/// mode rises far above its value at initialization) and both losses stay finite.
#[test]
fn mlp_gan_moves_samples_onto_the_ring_modes() {
    let (_, summary) = train(
        "ring_gan_modes",
        &example("ring_gan.toml"),
        &[
            "--set",
            "data.train_samples=12800",
            "--set",
            "training.steps=1500",
            "--set",
            "training.eval_every=1500",
        ],
    );
    assert_eq!(summary["status"], "completed", "{summary:#}");
    let before = number(&summary, "initial_metrics", "high_quality_share");
    let after = number(&summary, "final_metrics", "high_quality_share");
    let modes = number(&summary, "final_metrics", "modes_captured");
    eprintln!("share within 3 sigma of a mode: {before:.4} -> {after:.4}; modes captured {modes}");
    assert!(
        after >= 0.1 && after >= 20.0 * before.max(0.001),
        "share {before} -> {after}"
    );
    assert!(modes >= 6.0, "only {modes} of 8 modes captured");
    for key in ["loss/discriminator", "loss/generator"] {
        let v = number(&summary, "final_losses", key);
        assert!(v.is_finite(), "{key} = {v}");
    }
}

/// Four stabilizers composed in one pipeline (instance noise, R1, an EMA of the generator and
/// gradient-norm clipping) train the ring GAN together, each acting at its hook.
#[test]
fn composed_stabilizers_train_together() {
    let (dir, summary) = train(
        "composed_stabilizers",
        &example("ring_gan.toml"),
        &[
            "--set",
            "data.train_samples=12800",
            "--set",
            "training.steps=1500",
            "--set",
            "training.eval_every=1500",
            "--set",
            r#"stabilizers=[{type="instance_noise", sigma=0.05, anneal_steps=1000},
                {type="r1", gamma=0.1}, {type="ema", decay=0.99},
                {type="gradient_norm_clipping", group="generator", max_norm=10.0}]"#,
        ],
    );
    assert_eq!(summary["status"], "completed", "{summary:#}");
    let resolved = std::fs::read_to_string(dir.join("pipeline.resolved.json")).unwrap();
    let resolved: Value = serde_json::from_str(&resolved).unwrap();
    let kinds: Vec<&str> = resolved["stabilizers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["instance_noise", "r1", "ema", "gradient_norm_clipping"]);
    // Each acted: the penalty is in the loss, the noise level was annealed to 0 by the end.
    let r1 = number(&summary, "final_losses", "loss/discriminator/r1");
    assert!(r1.is_finite() && r1 > 0.0, "r1 term {r1}");
    let sigma = number(&summary, "final_diagnostics", "instance_noise/sigma");
    assert_eq!(sigma, 0.0, "instance noise not annealed: {summary:#}");
    let before = number(&summary, "initial_metrics", "high_quality_share");
    let after = number(&summary, "final_metrics", "high_quality_share");
    let modes = number(&summary, "final_metrics", "modes_captured");
    eprintln!("composed: share {before:.4} -> {after:.4}; modes {modes}");
    assert!(
        after >= 0.05 && after >= 10.0 * before.max(0.001),
        "share {before} -> {after}"
    );
    assert!(modes >= 6.0, "only {modes} of 8 modes captured");
}

/// Every example pipeline (each needs only the standard plugins), and those of the stability
/// benchmark in examples/stability, parses and trains a few steps.
#[test]
fn every_example_pipeline_runs() {
    let mut ran = 0;
    let examples = support::workspace_root().join("examples");
    let mut paths: Vec<PathBuf> = Vec::new();
    for dir in [examples.clone(), examples.join("stability")] {
        for entry in std::fs::read_dir(dir).unwrap() {
            paths.push(entry.unwrap().path());
        }
    }
    paths.sort();
    for path in paths {
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = format!("example_{}", path.file_stem().unwrap().to_string_lossy());
        if std::fs::read_to_string(&path).unwrap().contains("[[entry]]") {
            suite_runs(&name, &path);
            ran += 1;
            continue;
        }
        let (_, summary) = train(
            &name,
            &path,
            &[
                "--steps",
                "3",
                "--set",
                "training.eval_every=0",
                "--set",
                "training.eval_batches=1",
            ],
        );
        assert_eq!(summary["status"], "completed", "{}: {summary:#}", path.display());
        assert_eq!(summary["steps"], 3, "{}", path.display());
        ran += 1;
    }
    assert!(ran >= 4, "expected the example pipelines, found {ran}");
}

/// A stability-benchmark suite file (examples/stability/quick.toml, ...) runs every entry for one
/// seed and 3 steps through `nash bench stability`, and its table lists every entry.
fn suite_runs(name: &str, suite: &Path) {
    let out = support::scratch_dir(name);
    let output = support::run_ok(
        Command::new(support::nash_binary())
            .args(["bench", "stability", "--suite"])
            .arg(suite)
            .args(["--seeds", "1", "--steps", "3", "--jobs", "2", "--quiet", "--out"])
            .arg(&out)
            .env_remove("NASH_PLUGIN_PATH"),
    );
    let table = String::from_utf8_lossy(&output.stdout);
    let results: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let text = std::fs::read_to_string(suite).unwrap();
    let entries = text.matches("[[entry]]").count();
    let runs = results.to_string().matches("\"completed\"").count();
    assert!(
        runs >= entries,
        "{}: {runs} completed runs for {entries} entries\n{table}",
        suite.display()
    );
}

/// `nash plugins` prints every registered type with its kind, tag, plugin and fields.
#[test]
fn nash_plugins_prints_the_table() {
    let output = support::run_ok(
        Command::new(support::nash_binary())
            .arg("plugins")
            .env_remove("NASH_PLUGIN_PATH"),
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.lines().next().unwrap().contains("KIND"), "{table}");
    for (kind, tag, plugin) in [
        ("model", "dense_autoencoder", "nash-autoencoder"),
        ("model", "mlp_gan", "nash-gan"),
        ("objective", "non_saturating", "nash-gan"),
        ("stabilizer", "weight_clipping", "nash-stabilizers"),
        ("data", "ring", "nash-data"),
        ("metric", "mode_coverage", "nash-metrics"),
        ("optimizer", "adam", "nash-core"),
        ("layer", "conv2d", "nash-core"),
        ("loss", "huber", "nash-huber-loss"),
    ] {
        assert!(
            table.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() >= 3 && cols[0] == kind && cols[1] == tag && cols[2] == plugin
            }),
            "no row `{kind} {tag} {plugin}` in:\n{table}"
        );
    }
    assert!(
        table.contains("clip: float = 0.01"),
        "weight_clipping's field and default:\n{table}"
    );
}

const ENCODER: &str = r#"{ "layers": [
    { "type": "linear", "out_features": 6 }, { "type": "tanh" },
    { "type": "linear", "out_features": 3 }, { "type": "leaky_relu" } ] }"#;
const DECODER: &str = r#"{ "layers": [
    { "type": "linear", "out_features": 6 }, { "type": "elu" },
    { "type": "linear", "out_features": 8 }, { "type": "sigmoid" } ] }"#;

/// A model built by the dynamically loaded autoencoder plugin computes bit for bit the loss and
/// gradients that the same network built in this process computes: one copy of dfdx (tensor ids,
/// tapes) is shared across the plugin boundary.
#[test]
fn plugin_built_model_matches_in_process_gradients_exactly() {
    if !support::in_own_process("plugin_built_model_matches_in_process_gradients_exactly") {
        return;
    }
    let mut plugins = PluginSet::load_all(&[]).expect("core types");
    plugins
        .load(&support::plugin_library("nash-autoencoder"))
        .expect("the autoencoder plugin loads");

    let device = Device::default();
    let info = DataInfo {
        sample_shape: FeatureShape::Flat(8),
        num_classes: None,
        value_range: (0.0, 1.0),
    };
    let values: Vec<f32> = (0..5 * 8).map(|i| ((i * 37 % 23) as f32) / 23.0).collect();
    let x = matrix_from_vec(&device, values, 5, 8).unwrap();

    // Through the plugin: one SGD step with lr = 1 moves every parameter by exactly its gradient.
    let config: Box<dyn ModelConfig> = serde_json::from_value(json!({
        "type": "dense_autoencoder",
        "encoder": serde_json::from_str::<Value>(ENCODER).unwrap(),
        "decoder": serde_json::from_str::<Value>(DECODER).unwrap(),
    }))
    .expect("the plugin's model config deserializes through typetag");
    let mut rng = Rng::seed_from_u64(42);
    let mut model = config
        .build(
            &info,
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
        .unwrap();
    let before: Vec<(String, Vec<f32>)> = model.named_params().into_iter().map(|(n, p)| (n, p.to_vec())).collect();
    let sgd: Box<dyn OptimizerConfig> = Box::new(SgdConfig {
        lr: 1.0,
        ..SgdConfig::default()
    });
    let mut optimizers = std::collections::BTreeMap::from([("model".to_string(), sgd.build().unwrap())]);
    let mut stabilizers = StabilizerStack::default();
    let mut step_rng = Rng::seed_from_u64(7);
    let batch = Batch {
        inputs: x.clone(),
        shape: FeatureShape::Flat(8),
        labels: None,
    };
    let report = model
        .train_step(
            &batch,
            &mut TrainContext {
                step: 0,
                device: &device,
                rng: &mut step_rng,
                optimizers: &mut optimizers,
                stabilizers: &mut stabilizers,
            },
        )
        .unwrap();
    let after: Vec<(String, Vec<f32>)> = model.named_params().into_iter().map(|(n, p)| (n, p.to_vec())).collect();

    // In process: the same layers from the same seed, forward, MSE, backward.
    let mut rng = Rng::seed_from_u64(42);
    let mut ctx = BuildContext {
        device: &device,
        rng: &mut rng,
    };
    let encoder_config: SequentialConfig = serde_json::from_str(ENCODER).unwrap();
    let decoder_config: SequentialConfig = serde_json::from_str(DECODER).unwrap();
    let mut encoder = encoder_config
        .build(FeatureShape::Flat(8), &mut ctx, "encoder")
        .unwrap();
    let mut decoder = decoder_config
        .build(encoder.output_shape(), &mut ctx, "decoder")
        .unwrap();
    let mut fwd_rng = Rng::seed_from_u64(7);
    let mut fwd = ForwardContext {
        mode: Mode::Train,
        rng: &mut fwd_rng,
    };
    let code = encoder
        .forward(Activation::input(&x, FeatureShape::Flat(8)).unwrap(), &mut fwd)
        .unwrap();
    let out = decoder.forward(code, &mut fwd).unwrap();
    let loss = Mse.compute(out.value, &x).unwrap();
    assert_eq!(
        report.losses["loss/reconstruction"],
        loss.array() as f64,
        "the plugin's loss differs from the in-process loss"
    );
    let mut grads = loss.backward();

    let mut local: Vec<(String, &Param)> = Vec::new();
    local.extend(
        encoder
            .named_params()
            .into_iter()
            .map(|(n, p)| (format!("model.encoder.{n}"), p)),
    );
    local.extend(
        decoder
            .named_params()
            .into_iter()
            .map(|(n, p)| (format!("model.decoder.{n}"), p)),
    );
    assert_eq!(local.len(), before.len(), "parameter lists differ");
    let mut compared = 0;
    for (((name, param), (plugin_name, old)), (_, new)) in local.iter().zip(&before).zip(&after) {
        assert_eq!(name, plugin_name);
        assert_eq!(&param.to_vec(), old, "{name}: initial values differ");
        let grad = nash_core::tensor::grad_to_vec(&mut grads, param).unwrap();
        assert!(grad.iter().any(|g| *g != 0.0), "{name}: no gradient reached it");
        // SGD with lr 1, no momentum or decay: p' = p - 1 * g, computed the same way.
        let expected: Vec<f32> = old.iter().zip(&grad).map(|(p, g)| p - 1.0 * g).collect();
        assert_eq!(new, &expected, "{name}: the plugin's update is not exactly -gradient");
        compared += 1;
    }
    assert_eq!(compared, 8, "four linear layers, weights and biases");
}

/// The example third-party plugin's loss, used from a pipeline file and trained through `nash`.
#[test]
fn example_plugin_loss_trains_from_a_pipeline_file() {
    let (dir, summary) = train(
        "example_plugin_huber",
        &example("plugin-huber-loss/autoencoder_huber.toml"),
        &[
            "--set",
            "data.train_samples=2048",
            "--set",
            "data.test_samples=256",
            "--set",
            "training.steps=200",
            "--set",
            "training.eval_every=200",
        ],
    );
    assert_eq!(summary["status"], "completed", "{summary:#}");
    let plugins: Vec<&str> = summary["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(plugins.contains(&"nash-huber-loss"), "{plugins:?}");
    let resolved: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pipeline.resolved.json")).unwrap()).unwrap();
    assert_eq!(resolved["model"]["loss"], json!({ "type": "huber", "delta": 0.1 }));
    let before = number(&summary, "initial_eval", "loss/reconstruction");
    let after = number(&summary, "final_eval", "loss/reconstruction");
    assert!(
        after < before / 2.0,
        "the Huber reconstruction loss fell only from {before} to {after}"
    );
}
