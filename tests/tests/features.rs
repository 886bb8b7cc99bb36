//! `nash features`: building a feature network trains its classifier pipeline, scores it on the
//! whole test split and caches `weights.safetensors` and `network.json` with the weights' SHA-256;
//! a second build is a no-op; `list` shows it and reports a corrupted weight file (exit code 4).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nash_core::serde_json::{self, Value};
use nash_core::weights::sha256_file;
use nash_tests::support;

fn nash(cache: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(support::nash_binary());
    cmd.args(args)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--quiet")
        .env_remove("NASH_PLUGIN_PATH");
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `nash ARGS` with the cache folder given as `NASH_CACHE_DIR`, as metrics find it.
fn nash_with_cache_env(cache: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(support::nash_binary());
    cmd.args(args)
        .arg("--quiet")
        .env("NASH_CACHE_DIR", cache)
        .env_remove("NASH_PLUGIN_PATH");
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn fixture() -> PathBuf {
    support::workspace_root().join("tests/fixtures/ring_classifier.toml")
}

#[test]
fn build_caches_checksummed_weights_and_list_catches_corruption() {
    let cache = support::scratch_dir("features_build");
    let pipeline = fixture();
    let build = [
        "features",
        "build",
        "--pipeline",
        pipeline.to_str().unwrap(),
        "--name",
        "ring_net",
    ];
    let out = nash(&cache, &build);
    assert!(out.status.success(), "{}", text(&out));

    let dir = cache.join("features").join("ring_net");
    let entry: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("network.json")).unwrap()).unwrap();
    let sha = sha256_file(&dir.join("weights.safetensors")).unwrap();
    assert_eq!(entry["format"], 1);
    assert_eq!(entry["name"], "ring_net");
    assert_eq!(entry["weights_sha256"], sha.as_str());
    assert_eq!(entry["id"], format!("ring_net@sha256:{}", &sha[..12]).as_str());
    assert_eq!(entry["model"]["type"], "classifier");
    assert_eq!(entry["data"]["num_classes"], 4);
    assert_eq!(entry["test_samples"], 500, "the whole test split");
    assert_eq!(entry["steps"], 100);
    let accuracy = entry["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.95, "4 well separated ring modes: {accuracy}");
    assert!(entry["pipeline_hash"].as_str().is_some_and(|h| !h.is_empty()));
    assert!(entry["created"].as_str().is_some_and(|c| c.ends_with('Z')));
    assert!(dir.join("run").join("summary.json").exists());
    // The weights hold every parameter, named as the model names them, with the network's name.
    let bytes = std::fs::read(dir.join("weights.safetensors")).unwrap();
    let (_, meta) = nash_core::safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let tensors = meta.tensors();
    let mut names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "model.network.0.bias",
            "model.network.0.weight",
            "model.network.2.bias",
            "model.network.2.weight"
        ]
    );
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("nash.feature_network"))
            .map(String::as_str),
        Some("ring_net")
    );

    // A second build finds the valid entry and does nothing.
    let written = std::fs::metadata(dir.join("weights.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let again = nash(&cache, &build);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("already built"),
        "{}",
        text(&again)
    );
    assert_eq!(
        std::fs::metadata(dir.join("weights.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        written
    );

    // `list` shows it, with its id and accuracy.
    let listed = nash(&cache, &["features", "list"]);
    assert!(listed.status.success(), "{}", text(&listed));
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(
        stdout.contains("ring_net") && stdout.contains(entry["id"].as_str().unwrap()),
        "{stdout}"
    );
    let json = nash(&cache, &["features", "list", "--json"]);
    let all: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(all[0]["status"], "ok");
    assert_eq!(all[0]["test_samples"], 500);

    // The network scores a GAN during training: `sample_quality` at every evaluation, cited by id, and
    // the checkpoint with the lowest FID is kept; the real-vs-real floor (train split against the test
    // split) scores far better than a GAN after 60 steps.
    let id = entry["id"].as_str().unwrap();
    let run = scored_gan_run(&cache, id);
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let metrics = &summary["final_metrics"];
    for key in ["fid", "kid", "precision", "recall", "classifier_score"] {
        assert!(metrics[key].as_f64().is_some_and(f64::is_finite), "{key}: {metrics}");
    }
    assert_eq!(metrics["quality_samples"].as_f64(), Some(300.0));
    let provenance = &summary["metric_provenance"]["sample_quality"];
    assert_eq!(provenance["feature_network"], id, "{summary}");
    assert_eq!(provenance["reference_split"], "test");
    let best = std::fs::read_to_string(run.join("checkpoints").join("best.json")).unwrap_or_default();
    assert!(best.contains("step-"), "a best checkpoint by metrics.fid: {best:?}");
    let floor = nash_with_cache_env(
        &cache,
        &[
            "eval",
            run.to_str().unwrap(),
            "--json",
            "--set",
            r#"metrics=[{ type = "sample_quality", feature_network = "ring_net", samples = 300, candidates = "train", kid_subset_size = 100 }]"#,
        ],
    );
    assert!(floor.status.success(), "{}", text(&floor));
    let floor: Value = serde_json::from_slice(&floor.stdout).unwrap();
    let (floor_fid, gan_fid) = (
        floor["metrics"]["fid"].as_f64().unwrap(),
        metrics["fid"].as_f64().unwrap(),
    );
    assert!(
        floor_fid < gan_fid,
        "real vs real {floor_fid} against the GAN's {gan_fid}"
    );
    assert_eq!(floor["metric_provenance"]["sample_quality"]["candidates"], "train");

    // Corrupted weights: `list` says so, names the fix and exits with 4 (data).
    let mut corrupt = bytes.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x55;
    std::fs::write(dir.join("weights.safetensors"), &corrupt).unwrap();
    let listed = nash(&cache, &["features", "list"]);
    assert_eq!(listed.status.code(), Some(4), "{}", text(&listed));
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(
        stdout.contains("corrupt") && stdout.contains("nash features build --force --name ring_net"),
        "{}",
        text(&listed)
    );
}

/// Trains examples/ring_gan.toml for 60 steps with `sample_quality` on the cached `ring_net` (in
/// `cache`, through `NASH_CACHE_DIR`) and the best checkpoint by FID; returns the run folder.
fn scored_gan_run(cache: &Path, id: &str) -> PathBuf {
    let out = support::scratch_dir("features_scored_gan");
    let metric =
        r#"metrics=[{ type = "sample_quality", feature_network = "ring_net", samples = 300, kid_subset_size = 100 }]"#;
    let ring_gan = support::workspace_root().join("examples/ring_gan.toml");
    #[rustfmt::skip]
    let args = [
        "train", ring_gan.to_str().unwrap(), "--steps", "60", "--out", out.to_str().unwrap(),
        "--set", metric,
        "--set", "training.eval_every=30", "--set", "training.sample_every=0",
        "--set", "training.checkpoint.every=30",
        "--set", r#"training.checkpoint.best_metric="metrics.fid""#,
        "--set", r#"training.checkpoint.best_mode="min""#,
    ];
    let result = nash_with_cache_env(cache, &args);
    assert!(result.status.success(), "training scored by {id}: {}", text(&result));
    out
}
