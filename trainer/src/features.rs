//! `nash features`: nash's own feature network for sample-quality metrics (FID, KID, precision
//! and recall, classifier score). It is made, never downloaded: [`build`] trains a classifier
//! pipeline (by default the embedded `examples/fashion_classifier.toml`), scores it on the whole
//! test split and caches its weights with their SHA-256. [`list`] shows the cache and re-checks
//! every checksum.
//!
//! The cache layout (`<cache>/features/<name>/{network.json, weights.safetensors, run/}`), the
//! entry record and the network ids are defined once, in [`nash_core::weights::feature_networks`],
//! which the metrics' loader reads too. `<cache>` is `--cache-dir`, else
//! [`nash_core::weights::cache_dir`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context};
use nash_core::data::Split;
use nash_core::model::EvalContext;
use nash_core::rand::SeedableRng;
use nash_core::serde_json::{self, Value};
use nash_core::tensor::Rng;
use nash_core::tracing;
use nash_core::weights::feature_networks::make_id;
use nash_core::weights::{save_params, sha256_file, write_atomically};

pub use nash_core::weights::feature_networks::{
    features_root, FeatureNetworkEntry, ENTRY_FILE, FORMAT as ENTRY_FORMAT, WEIGHTS_FILE, WEIGHTS_METADATA_KEY,
};

use crate::pipeline::{Format, Override, PipelineSource};
use crate::train::RunOptions;

/// The default feature network's pipeline, embedded so that `nash features build` works outside
/// the repository.
pub const FASHION_CLASSIFIER_PIPELINE: &str = include_str!("../../examples/fashion_classifier.toml");

/// The embedded default pipeline as a source (plugin paths relative to the current folder).
pub fn default_pipeline_source() -> PipelineSource {
    PipelineSource::from_text(
        "<embedded examples/fashion_classifier.toml>",
        "fashion_classifier",
        FASHION_CLASSIFIER_PIPELINE,
        Format::Toml,
        Path::new("."),
    )
}

/// What `nash features build` is asked to do.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// The classifier pipeline (default: the embedded `examples/fashion_classifier.toml`).
    pub pipeline: Option<PathBuf>,
    /// The network's name (default: the pipeline's name).
    pub name: Option<String>,
    /// The cache folder (default: [`nash_core::weights::cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Pipeline overrides, as for `nash train --set`.
    pub overrides: Vec<Override>,
    /// Replaces `training.steps`.
    pub steps: Option<u64>,
    /// Rebuild even if a valid entry exists.
    pub force: bool,
    /// Extra plugin libraries.
    pub extra_plugins: Vec<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
}

/// The result of [`build`].
#[derive(Clone, Debug)]
pub struct Built {
    /// The entry (new, or the valid one already there).
    pub entry: FeatureNetworkEntry,
    /// The network's folder.
    pub dir: PathBuf,
    /// Whether it was trained now (false: a valid entry existed and nothing was done).
    pub trained: bool,
    /// Wall time of the build in seconds (0 when nothing was done).
    pub wall_time_s: f64,
}

/// Whether `name` is a safe folder name: ASCII letters, digits, `_`, `-`, `.`, not starting with `.`.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(nash_core::Error::config(
            "--name",
            format!("`{name}` is not a valid feature network name: use letters, digits, `_`, `-` and `.`"),
        )
        .into())
    }
}

/// Reads and checks the entry in `dir`: `network.json` parses, and `weights.safetensors` has the
/// SHA-256 it records. Errors are [`nash_core::Error::Data`] naming the file and the fix.
pub fn check_entry(dir: &Path) -> nash_core::Result<FeatureNetworkEntry> {
    let entry_path = dir.join(ENTRY_FILE);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rebuild = format!("rebuild with `nash features build --force --name {name}`");
    let text = std::fs::read_to_string(&entry_path).map_err(|e| nash_core::Error::Data {
        path: entry_path.clone(),
        message: format!("incomplete: cannot read it ({e}); {rebuild}"),
    })?;
    let entry: FeatureNetworkEntry = serde_json::from_str(&text).map_err(|e| nash_core::Error::Data {
        path: entry_path.clone(),
        message: format!("corrupt: not a feature network entry ({e}); {rebuild}"),
    })?;
    if entry.format != ENTRY_FORMAT {
        return Err(nash_core::Error::Data {
            path: entry_path,
            message: format!(
                "format {} is not the format this nash reads ({ENTRY_FORMAT}); {rebuild}",
                entry.format
            ),
        });
    }
    let weights = dir.join(WEIGHTS_FILE);
    let sha = sha256_file(&weights).map_err(|e| nash_core::Error::Data {
        path: weights.clone(),
        message: format!("corrupt: cannot read the weights ({e}); {rebuild}"),
    })?;
    if sha != entry.weights_sha256 {
        return Err(nash_core::Error::Data {
            path: weights,
            message: format!(
                "corrupt: the weights' SHA-256 is {sha}, network.json records {}; {rebuild}",
                entry.weights_sha256
            ),
        });
    }
    Ok(entry)
}

/// `nash features build`: trains the classifier pipeline into `<cache>/features/<name>/run/`,
/// measures its accuracy on the whole test split with the final (evaluation) parameters, writes
/// `weights.safetensors` and then `network.json`. When a valid entry exists and `force` is off,
/// returns it without doing anything.
pub fn build(opts: &BuildOptions) -> anyhow::Result<Built> {
    let started = Instant::now();
    let source = match &opts.pipeline {
        Some(path) => PipelineSource::from_file(path).context("cannot read the pipeline")?,
        None => default_pipeline_source(),
    };
    let run_opts = RunOptions {
        steps: opts.steps,
        progress: opts.progress,
        ..RunOptions::default()
    };
    let prepared = crate::prepare(source, &opts.overrides, &opts.extra_plugins, &run_opts)?;
    let name = opts.name.clone().unwrap_or_else(|| prepared.name.clone());
    check_name(&name)?;
    let cache = opts.cache_dir.clone().unwrap_or_else(nash_core::weights::cache_dir);
    let dir = features_root(&cache).join(&name);
    if dir.join(ENTRY_FILE).exists() {
        match check_entry(&dir) {
            Ok(entry) if !opts.force => {
                return Ok(Built {
                    entry,
                    dir,
                    trained: false,
                    wall_time_s: 0.0,
                })
            }
            Ok(_) => tracing::info!("--force: rebuilding {}", dir.display()),
            Err(e) => tracing::warn!("rebuilding the feature network: {e}"),
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // The old entry goes first: an interrupted rebuild must not leave it describing new weights.
    let entry_path = dir.join(ENTRY_FILE);
    if entry_path.exists() {
        std::fs::remove_file(&entry_path).with_context(|| format!("cannot remove {}", entry_path.display()))?;
    }

    let run_dir = dir.join("run");
    let pipeline = &prepared.pipeline;
    let summary = crate::train::train(pipeline, &name, &run_dir, &prepared.plugins.plugins, &run_opts)?;
    if summary.status != "completed" {
        return Err(anyhow!(
            "training the feature network stopped ({}{}); see {}",
            summary.status,
            summary.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default(),
            run_dir.display()
        ));
    }
    tracing::info!(
        "trained {} steps in {:.0} s ({:.2} steps/s)",
        summary.steps,
        summary.wall_time_s,
        summary.steps_per_s
    );

    // The final parameters, as `nash eval` uses them (the stabilizers' evaluation parameters, an
    // EMA, when there are any).
    let (origin, saved) = crate::checkpoint::load_latest(&run_dir)?;
    let mut rng = Rng::seed_from_u64(pipeline.seed);
    let mut run = crate::run::build(pipeline, pipeline.seed, &mut rng)?;
    run.restore(&saved, &mut rng, None, &origin)?;
    let info = run.data.info();
    if info.num_classes.is_none() {
        return Err(nash_core::Error::config("data", "a feature network needs labelled data").into());
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let batch_size = pipeline.training.batch_size.max(1);
    let (test_accuracy, test_samples, weights_sha256) = run.with_evaluation_params(|run| {
        let n = run.data.len(Split::Test);
        if n == 0 {
            return Err(anyhow!("the data's test split is empty: cannot measure the accuracy"));
        }
        let mut eval_rng = Rng::seed_from_u64(crate::run::eval_seed(pipeline.seed));
        let mut correct = 0usize;
        for start in (0..n).step_by(batch_size) {
            let indices: Vec<usize> = (start..(start + batch_size).min(n)).collect();
            let batch = run.data.batch(Split::Test, &indices, &run.device)?;
            let labels = batch
                .labels
                .clone()
                .ok_or_else(|| anyhow!("the data's test split has no labels"))?;
            let mut ctx = EvalContext {
                device: &run.device,
                rng: &mut eval_rng,
            };
            let family = run.model.family().to_string();
            let out = run
                .model
                .classify(&batch.inputs, &mut ctx)?
                .ok_or_else(|| anyhow!("the {family} model is not a classifier (use `type = \"classifier\"`)"))?;
            correct += out
                .predicted_classes()
                .iter()
                .zip(&labels)
                .filter(|(predicted, label)| predicted == label)
                .count();
        }
        let metadata = BTreeMap::from([(WEIGHTS_METADATA_KEY.to_string(), name.clone())]);
        let sha = save_params(&weights_path, &run.model.named_params(), &metadata)?;
        Ok((correct as f64 / n as f64, n, sha))
    })?;

    let entry = FeatureNetworkEntry {
        format: ENTRY_FORMAT,
        name: name.clone(),
        id: make_id(&name, &weights_sha256),
        weights_sha256,
        model: serde_json::to_value(&pipeline.model)?,
        data: info,
        test_accuracy,
        test_samples,
        steps: summary.steps,
        pipeline_hash: crate::checkpoint::pipeline_hash(pipeline)?,
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        nash_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let text = serde_json::to_string_pretty(&entry)? + "\n";
    write_atomically(&entry_path, text.as_bytes())?;
    Ok(Built {
        entry,
        dir,
        trained: true,
        wall_time_s: started.elapsed().as_secs_f64(),
    })
}

/// One folder of the cache, as `nash features list` shows it.
#[derive(Clone, Debug)]
pub struct Listed {
    /// The folder's name.
    pub name: String,
    /// The folder.
    pub dir: PathBuf,
    /// The checked entry, or why it is not usable.
    pub entry: Result<FeatureNetworkEntry, String>,
}

impl Listed {
    /// The JSON `nash features list --json` prints.
    pub fn to_json(&self) -> Value {
        match &self.entry {
            Ok(e) => serde_json::json!({
                "name": e.name, "id": e.id, "test_accuracy": e.test_accuracy,
                "test_samples": e.test_samples, "path": self.dir, "status": "ok",
            }),
            Err(message) => serde_json::json!({
                "name": self.name, "path": self.dir, "status": "corrupt", "message": message,
            }),
        }
    }
}

/// Every feature network under `<cache>/features`, sorted by name, each re-checked against its
/// checksum ([`check_entry`]). A missing folder is an empty cache.
pub fn list(cache: &Path) -> anyhow::Result<Vec<Listed>> {
    let root = features_root(cache);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in std::fs::read_dir(&root).with_context(|| format!("cannot read {}", root.display()))? {
        let item = item.with_context(|| format!("cannot read {}", root.display()))?;
        let dir = item.path();
        if !dir.is_dir() {
            continue;
        }
        let name = item.file_name().to_string_lossy().into_owned();
        let entry = check_entry(&dir).map_err(|e| e.to_string());
        out.push(Listed { name, dir, entry });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::data::DataInfo;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nash-features-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_entry(dir: &Path, weights: &[u8]) -> FeatureNetworkEntry {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(WEIGHTS_FILE), weights).unwrap();
        let sha = nash_core::weights::sha256_hex(weights);
        let entry = FeatureNetworkEntry {
            format: ENTRY_FORMAT,
            name: "net".into(),
            id: make_id("net", &sha),
            weights_sha256: sha,
            model: serde_json::json!({"type": "classifier"}),
            data: DataInfo {
                sample_shape: nash_core::tensor::FeatureShape::Flat(2),
                num_classes: Some(3),
                value_range: (0.0, 1.0),
            },
            test_accuracy: 0.9,
            test_samples: 10,
            steps: 5,
            pipeline_hash: "0".into(),
            created: "2026-01-01T00:00:00Z".into(),
            nash_version: "0".into(),
        };
        std::fs::write(dir.join(ENTRY_FILE), serde_json::to_string(&entry).unwrap()).unwrap();
        entry
    }

    #[test]
    fn the_embedded_pipeline_is_the_example() {
        let on_disk =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fashion_classifier.toml"))
                .unwrap();
        assert_eq!(on_disk, FASHION_CLASSIFIER_PIPELINE);
        assert!(FASHION_CLASSIFIER_PIPELINE.contains("name = \"fashion_classifier\""));
    }

    #[test]
    fn list_checks_every_checksum_and_names_the_fix() {
        let cache = scratch("list");
        let root = features_root(&cache);
        let good = write_entry(&root.join("good"), b"weights");
        write_entry(&root.join("bad"), b"weights");
        std::fs::write(root.join("bad").join(WEIGHTS_FILE), b"tampered").unwrap();
        std::fs::create_dir_all(root.join("half")).unwrap();
        let listed = list(&cache).unwrap();
        let names: Vec<&str> = listed.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["bad", "good", "half"]);
        assert_eq!(listed[1].entry.as_ref().unwrap(), &good);
        let bad = listed[0].entry.as_ref().unwrap_err();
        assert!(
            bad.contains("corrupt")
                && bad.contains("nash features build --force --name bad")
                && bad.contains("weights.safetensors"),
            "{bad}"
        );
        let half = listed[2].entry.as_ref().unwrap_err();
        assert!(half.contains("network.json") && half.contains("--name half"), "{half}");
        assert!(list(&cache.join("nowhere")).unwrap().is_empty());
        std::fs::remove_dir_all(&cache).ok();
    }

    #[test]
    fn names_must_be_folder_names() {
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        check_name("fashion_classifier-2.v1").unwrap();
    }
}
