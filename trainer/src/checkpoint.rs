//! Checkpoints: everything a run needs to continue bit for bit, written atomically.
//!
//! A checkpoint is a folder `<run>/checkpoints/step-XXXXXXXX/` holding
//! - `params.safetensors`: every model parameter by its full name, f32, in its logical shape;
//! - `state.safetensors`: the tensors of the optimizers, stabilizers, model and data loader state
//!   ([`StateDict`]s), under the prefixes `optimizers.<group>.`, `stabilizers.`, `model.` and `loader.`;
//! - `state.json`: the step, the pipeline hash, the nash version, the training generator's
//!   position, the metadata of those state dictionaries (floats stored with their exact bits) and
//!   what the summary needs (the baseline evaluation, the wall time so far, the last evaluation).
//!
//! A checkpoint is written into `step-XXXXXXXX.tmp/`, each file and the folder are synced, and the
//! folder is renamed to its final name: a crash leaves either a complete checkpoint or a `.tmp`
//! folder that is ignored and removed by the next write. `checkpoints/latest` names the newest
//! one and `checkpoints/best.json` the best by [`CheckpointConfig::best_metric`]; both are
//! replaced by renaming a synced temporary file. Older checkpoints are removed only after a new
//! one is complete; the newest [`CheckpointConfig::keep_last`] and the best are kept.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use nash_core::rand::SeedableRng;
use nash_core::serde_json::{self, json, Value};
use nash_core::state::StateDict;
use nash_core::tensor::Rng;
use nash_core::tracing;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

/// The folder of a run that holds its checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The version of the checkpoint layout written by this build.
pub const FORMAT_VERSION: u64 = 1;
/// The parameter file of a checkpoint.
pub const PARAMS_FILE: &str = "params.safetensors";
/// The state tensor file of a checkpoint.
pub const STATE_TENSORS_FILE: &str = "state.safetensors";
/// The JSON file of a checkpoint.
pub const STATE_FILE: &str = "state.json";

/// Which way a best metric improves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BestMode {
    /// Lower is better (losses, distances).
    #[default]
    Min,
    /// Higher is better (coverage, accuracy).
    Max,
}

/// The `[training.checkpoint]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many steps (0: only at the end and when interrupted).
    pub every: u64,
    /// Keep the newest this many checkpoints (at least 1); the best is kept besides.
    pub keep_last: usize,
    /// The value that ranks checkpoints: `metrics.<key>` or `eval.<key>` of the evaluation at the
    /// checkpoint's step (checkpoints without an evaluation at their step are not ranked).
    pub best_metric: Option<String>,
    /// Whether lower (`min`) or higher (`max`) values of `best_metric` are better.
    pub best_mode: BestMode,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: 0,
            keep_last: 3,
            best_metric: None,
            best_mode: BestMode::Min,
        }
    }
}

impl CheckpointConfig {
    /// Checks the ranges, naming the config path of a bad value.
    pub fn validate(&self) -> nash_core::Result<()> {
        if self.keep_last == 0 {
            return Err(nash_core::Error::config(
                "training.checkpoint.keep_last",
                "must be at least 1 (the newest checkpoint is always kept)",
            ));
        }
        if let Some(m) = &self.best_metric {
            let ok = m
                .strip_prefix("metrics.")
                .or_else(|| m.strip_prefix("eval."))
                .is_some_and(|k| !k.is_empty());
            if !ok {
                return Err(nash_core::Error::config(
                    "training.checkpoint.best_metric",
                    format!("`{m}` must be `metrics.<key>` or `eval.<key>` (e.g. `metrics.mode_coverage`)"),
                ));
            }
        }
        Ok(())
    }
}

/// Reads a map of values in which JSON wrote an undefined value (NaN, ±inf: a reverse KL with no mode
/// captured, say) as `null`, back with NaN in its place.
fn values_with_nulls<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let values: BTreeMap<String, Option<f64>> = Deserialize::deserialize(d)?;
    Ok(values.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
}

/// One evaluation: held-out losses and metric values at a step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The step it was made after.
    pub step: u64,
    /// Held-out losses.
    #[serde(deserialize_with = "values_with_nulls")]
    pub eval: BTreeMap<String, f64>,
    /// Metric values.
    #[serde(deserialize_with = "values_with_nulls")]
    pub metrics: BTreeMap<String, f64>,
}

impl Evaluation {
    /// The value `metrics.<key>` or `eval.<key>` names.
    pub fn value(&self, name: &str) -> Option<f64> {
        if let Some(k) = name.strip_prefix("metrics.") {
            self.metrics.get(k).copied()
        } else {
            name.strip_prefix("eval.").and_then(|k| self.eval.get(k).copied())
        }
    }
}

/// What the run summary carries across a resume.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Held-out losses before the first step.
    #[serde(deserialize_with = "values_with_nulls")]
    pub initial_eval: BTreeMap<String, f64>,
    /// Metric values before the first step.
    #[serde(deserialize_with = "values_with_nulls")]
    pub initial_metrics: BTreeMap<String, f64>,
    /// Wall time of the training so far, in seconds.
    pub wall_time_s: f64,
    /// Completed epochs.
    pub epochs: u64,
    /// The latest evaluation, if any.
    pub last_evaluation: Option<Evaluation>,
}

/// The exact position of the training generator (ChaCha8: key, stream and word position).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte key, in hex.
    pub seed: String,
    /// The stream number.
    pub stream: u64,
    /// The word position (a u128, in decimal).
    pub word_pos: String,
}

impl RngState {
    /// The state of `rng`.
    pub fn capture(rng: &Rng) -> Self {
        RngState {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }
    /// A generator at exactly this state.
    pub fn restore(&self) -> nash_core::Result<Rng> {
        let bad = |m: &str| nash_core::Error::state("rng", m.to_string());
        if self.seed.len() != 64 || !self.seed.is_ascii() {
            return Err(bad("the seed must be 64 hex digits"));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad("the seed is not hex"))?;
        }
        let pos: u128 = self
            .word_pos
            .parse()
            .map_err(|_| bad("the word position is not a number"))?;
        let mut rng = Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// A parameter: full name, logical shape, values.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// The full name (`generator.layers.0.weight`).
    pub name: String,
    /// The logical shape.
    pub shape: Vec<usize>,
    /// The values.
    pub values: Vec<f32>,
}

/// Everything a checkpoint holds, in memory. The training loop captures it after a step and
/// restores it to continue exactly (see `train.rs`); [`write_checkpoint`] and [`load_checkpoint`]
/// move it to and from disk.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingState {
    /// Training steps completed.
    pub step: u64,
    /// Every model parameter.
    pub params: Vec<NamedTensor>,
    /// Optimizer (`optimizers.<group>`), stabilizer (`stabilizers`), model (`model`) and data
    /// loader (`loader`) state.
    pub state: StateDict,
    /// The training generator.
    pub rng: RngState,
    /// [`pipeline_hash`] of the pipeline that trained it.
    pub pipeline_hash: String,
    /// The nash version that wrote it.
    pub nash_version: String,
    /// What the summary carries across a resume.
    pub record: RunRecord,
}

/// A stable hash (FNV-1a, 64 bits) of `pipeline` serialized as JSON (floats to 12 significant
/// digits), without the values that do not change the trained numbers (`training.steps`,
/// `training.out_dir`, `training.checkpoint`).
pub fn pipeline_hash(pipeline: &impl Serialize) -> anyhow::Result<String> {
    let mut value = serde_json::to_value(pipeline)?;
    if let Some(t) = value.get_mut("training").and_then(Value::as_object_mut) {
        // `adaptive_splitting` changes how fast a step runs, never its numbers (the split governor
        // keeps the bits), so a run may resume with it changed, and checkpoints written before it
        // existed still resume.
        for k in ["steps", "out_dir", "checkpoint", "adaptive_splitting"] {
            t.remove(k);
        }
    }
    let text = serde_json::to_string(&round_floats(&value))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(format!("fnv1a64:{h:016x}"))
}

/// `value` with every float written to 12 significant digits: the resumed pipeline is read back
/// from `pipeline.resolved.json`, and JSON text parsing may move a float by its last bit.
fn round_floats(value: &Value) -> Value {
    match value {
        Value::Number(n) if n.is_f64() => Value::String(format!("{:.11e}", n.as_f64().unwrap_or_default())),
        Value::Array(a) => Value::Array(a.iter().map(round_floats).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), round_floats(v))).collect()),
        other => other.clone(),
    }
}

/// The folder name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn step_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Replaces every float of `value` by `{"f64": value, "bits": "<hex of its bits>"}`, so that it
/// reads back exactly (JSON text parsing may round the last bit).
fn encode_floats(value: &Value) -> Value {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            json!({"f64": f, "bits": format!("{:016x}", f.to_bits())})
        }
        Value::Array(a) => Value::Array(a.iter().map(encode_floats).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), encode_floats(v))).collect()),
        other => other.clone(),
    }
}

/// Reverses [`encode_floats`].
fn decode_floats(value: &Value) -> anyhow::Result<Value> {
    Ok(match value {
        Value::Object(o) if o.len() == 2 && o.contains_key("f64") && o.contains_key("bits") => {
            let bits = o["bits"]
                .as_str()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| anyhow!("a float's `bits` must be 16 hex digits, got {}", o["bits"]))?;
            let f = f64::from_bits(bits);
            Value::Number(serde_json::Number::from_f64(f).ok_or_else(|| anyhow!("a stored float is not finite"))?)
        }
        Value::Array(a) => Value::Array(a.iter().map(decode_floats).collect::<anyhow::Result<_>>()?),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| Ok((k.clone(), decode_floats(v)?)))
                .collect::<anyhow::Result<_>>()?,
        ),
        other => other.clone(),
    })
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Serializes `(name, shape, values)` triples as safetensors bytes.
fn safetensors_bytes<'a>(tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [f32])>) -> anyhow::Result<Vec<u8>> {
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .map(|(n, s, v)| (n.to_string(), s.to_vec(), to_bytes(v)))
        .collect();
    let views = owned
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Reads every tensor of a safetensors file as f32, naming the file in errors.
fn read_safetensors(path: &Path) -> anyhow::Result<Vec<NamedTensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow!(
            "{} is not a complete safetensors file ({e}); the checkpoint is damaged",
            path.display()
        )
    })?;
    let mut out = Vec::with_capacity(file.len());
    for (name, view) in file.iter() {
        if view.dtype() != Dtype::F32 {
            bail!(
                "{}: tensor `{name}` is {:?}, expected F32",
                path.display(),
                view.dtype()
            );
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push(NamedTensor {
            name: name.to_string(),
            shape: view.shape().to_vec(),
            values,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Writes `bytes` to `path` and syncs it to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {} (is the disk full?)", path.display()))
}

/// Syncs a folder, so that the renames inside it are on disk.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the folder {}", dir.display()))
}

/// Replaces `path` by a synced file holding `bytes` (written beside it, then renamed).
fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// The `state.json` document of `state`.
fn state_json(state: &TrainingState) -> anyhow::Result<Value> {
    let meta = encode_floats(&serde_json::to_value(&state.state.meta)?);
    Ok(json!({
        "format": "nash-checkpoint",
        "format_version": FORMAT_VERSION,
        "nash_version": state.nash_version,
        "step": state.step,
        "pipeline_hash": state.pipeline_hash,
        "rng": state.rng,
        "params": state.params.iter().map(|p| json!({"name": p.name, "shape": p.shape})).collect::<Vec<_>>(),
        "state_tensors": state.state.tensors.iter().map(|(k, (s, _))| json!({"name": k, "shape": s})).collect::<Vec<_>>(),
        "state_meta": meta,
        "record": state.record,
    }))
}

/// Writes `state` as the checkpoint `<run_dir>/checkpoints/step-XXXXXXXX/` (atomically, see the
/// module docs), points `latest` at it, updates `best.json` when `config.best_metric` ranks it
/// first, removes checkpoints beyond `config.keep_last` (never the best) and stale `.tmp`
/// folders, and returns its folder. On error the earlier checkpoints are untouched.
pub fn write_checkpoint(run_dir: &Path, state: &TrainingState, config: &CheckpointConfig) -> anyhow::Result<PathBuf> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = checkpoint_name(state.step);
    let tmp = root.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let params = safetensors_bytes(
        state
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.shape.as_slice(), p.values.as_slice())),
    )?;
    write_synced(&tmp.join(PARAMS_FILE), &params)?;
    let tensors = safetensors_bytes(
        state
            .state
            .tensors
            .iter()
            .map(|(k, (s, v))| (k.as_str(), s.as_slice(), v.as_slice())),
    )?;
    write_synced(&tmp.join(STATE_TENSORS_FILE), &tensors)?;
    let text = serde_json::to_string_pretty(&state_json(state)?)? + "\n";
    write_synced(&tmp.join(STATE_FILE), text.as_bytes())?;
    sync_dir(&tmp)?;
    let dir = root.join(&name);
    if dir.exists() {
        // The same step again (a resume that stopped where it started): swap the old one out.
        let old = root.join(format!("{name}.old.tmp"));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&dir, &old).with_context(|| format!("cannot move {} aside", dir.display()))?;
        std::fs::rename(&tmp, &dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    }
    sync_dir(&root)?;
    replace_file(&root.join("latest"), format!("{name}\n").as_bytes())?;
    let best = update_best(&root, &name, state, config)?;
    prune(&root, config.keep_last.max(1), best.as_deref())?;
    Ok(dir)
}

/// Records `name` in `best.json` if it beats the best so far; returns the best checkpoint's name.
fn update_best(
    root: &Path,
    name: &str,
    state: &TrainingState,
    config: &CheckpointConfig,
) -> anyhow::Result<Option<String>> {
    let Some(metric) = &config.best_metric else {
        return Ok(None);
    };
    let path = root.join("best.json");
    let current: Option<Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|v: &Value| {
            v["metric"] == metric.as_str() && root.join(v["checkpoint"].as_str().unwrap_or("-")).is_dir()
        });
    let evaluation = state.record.last_evaluation.as_ref().filter(|e| e.step == state.step);
    let value = evaluation.and_then(|e| e.value(metric)).filter(|v| v.is_finite());
    if let (Some(e), None) = (evaluation, value) {
        let keys: Vec<String> = (e.metrics.keys().map(|k| format!("metrics.{k}")))
            .chain(e.eval.keys().map(|k| format!("eval.{k}")))
            .collect();
        tracing::warn!(
            "training.checkpoint.best_metric `{metric}` is not a finite value of the evaluation at step {}; known: {}",
            e.step,
            keys.join(", ")
        );
    }
    let better = match (value, current.as_ref().and_then(|c| c["value"].as_f64())) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(v), Some(b)) => match config.best_mode {
            BestMode::Min => v < b,
            BestMode::Max => v > b,
        },
    };
    if better {
        let doc =
            json!({"checkpoint": name, "step": state.step, "metric": metric, "mode": config.best_mode, "value": value});
        replace_file(&path, (serde_json::to_string_pretty(&doc)? + "\n").as_bytes())?;
        return Ok(Some(name.to_string()));
    }
    Ok(current.and_then(|c| c["checkpoint"].as_str().map(str::to_string)))
}

/// Removes complete checkpoints older than the newest `keep`, except `best`, and stale `.tmp` folders.
fn prune(root: &Path, keep: usize, best: Option<&str>) -> anyhow::Result<()> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".tmp") && entry.path().is_dir() {
            let _ = std::fs::remove_dir_all(entry.path());
        } else if let Some(step) = step_of(&name) {
            steps.push((step, name));
        }
    }
    steps.sort();
    let n = steps.len();
    for (_, name) in steps.into_iter().take(n.saturating_sub(keep)) {
        if Some(name.as_str()) != best {
            let path = root.join(&name);
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove the old checkpoint {}", path.display()))?;
        }
    }
    Ok(())
}

/// Reads the checkpoint in `dir`; every error names the file and what was expected.
pub fn load_checkpoint(dir: &Path) -> anyhow::Result<TrainingState> {
    let json_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&json_path).with_context(|| {
        format!(
            "{} is not a complete checkpoint: cannot read {STATE_FILE}",
            dir.display()
        )
    })?;
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON; the checkpoint is damaged", json_path.display()))?;
    if doc["format"] != "nash-checkpoint" {
        bail!("{}: `format` must be \"nash-checkpoint\"", json_path.display());
    }
    let version = doc["format_version"].as_u64().unwrap_or(0);
    if version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format version {version}, this nash reads version {FORMAT_VERSION}",
            json_path.display()
        );
    }
    let field = |k: &str| {
        doc.get(k)
            .cloned()
            .ok_or_else(|| anyhow!("{}: missing `{k}`", json_path.display()))
    };
    let step = field("step")?
        .as_u64()
        .ok_or_else(|| anyhow!("{}: `step` must be a whole number", json_path.display()))?;
    let rng: RngState =
        serde_json::from_value(field("rng")?).with_context(|| format!("{}: `rng`", json_path.display()))?;
    let record: RunRecord =
        serde_json::from_value(field("record")?).with_context(|| format!("{}: `record`", json_path.display()))?;
    let meta: BTreeMap<String, Value> = serde_json::from_value(decode_floats(&field("state_meta")?)?)
        .with_context(|| format!("{}: `state_meta`", json_path.display()))?;
    let listed = |k: &str| -> anyhow::Result<Vec<(String, Vec<usize>)>> {
        let v = field(k)?;
        let items: Vec<BTreeMap<String, Value>> =
            serde_json::from_value(v).with_context(|| format!("{}: `{k}`", json_path.display()))?;
        items
            .into_iter()
            .map(|m| {
                let name = m.get("name").and_then(Value::as_str).map(str::to_string);
                let shape = m.get("shape").and_then(|s| serde_json::from_value(s.clone()).ok());
                name.zip(shape)
                    .ok_or_else(|| anyhow!("{}: `{k}` entries need `name` and `shape`", json_path.display()))
            })
            .collect()
    };
    let params = read_safetensors(&dir.join(PARAMS_FILE))?;
    check_listing(&dir.join(PARAMS_FILE), &params, &listed("params")?)?;
    let state_tensors = read_safetensors(&dir.join(STATE_TENSORS_FILE))?;
    check_listing(&dir.join(STATE_TENSORS_FILE), &state_tensors, &listed("state_tensors")?)?;
    let state = StateDict {
        tensors: state_tensors
            .into_iter()
            .map(|t| (t.name, (t.shape, t.values)))
            .collect(),
        meta,
    };
    Ok(TrainingState {
        step,
        params,
        state,
        rng,
        pipeline_hash: doc["pipeline_hash"].as_str().unwrap_or_default().to_string(),
        nash_version: doc["nash_version"].as_str().unwrap_or_default().to_string(),
        record,
    })
}

/// Checks that a safetensors file holds exactly the tensors `state.json` lists.
fn check_listing(path: &Path, tensors: &[NamedTensor], listed: &[(String, Vec<usize>)]) -> anyhow::Result<()> {
    let found: BTreeMap<&str, &[usize]> = tensors.iter().map(|t| (t.name.as_str(), t.shape.as_slice())).collect();
    for (name, shape) in listed {
        match found.get(name.as_str()) {
            None => bail!("{}: tensor `{name}` (shape {shape:?}) is missing", path.display()),
            Some(s) if *s != shape.as_slice() => {
                bail!(
                    "{}: tensor `{name}` has shape {s:?}, state.json says {shape:?}",
                    path.display()
                )
            }
            _ => {}
        }
    }
    if found.len() != listed.len() {
        let extra: Vec<&str> = found
            .keys()
            .filter(|k| !listed.iter().any(|(n, _)| n == *k))
            .copied()
            .collect();
        bail!("{}: tensors {extra:?} are not listed in state.json", path.display());
    }
    Ok(())
}

/// The complete-looking checkpoints of a run (named `step-XXXXXXXX`, not `.tmp`), oldest first.
pub fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            step_of(&name).filter(|_| e.path().is_dir()).map(|s| (s, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest checkpoint of `run_dir` that loads completely, and its state; damaged newer ones
/// are reported and skipped.
pub fn load_latest(run_dir: &Path) -> anyhow::Result<(PathBuf, TrainingState)> {
    let all = list_checkpoints(run_dir);
    if all.is_empty() {
        bail!(
            "{} has no checkpoints (expected {}/step-XXXXXXXX/)",
            run_dir.display(),
            run_dir.join(CHECKPOINTS_DIR).display()
        );
    }
    let mut errors = Vec::new();
    for (_, dir) in all.into_iter().rev() {
        match load_checkpoint(&dir) {
            Ok(state) => {
                for e in &errors {
                    tracing::warn!("skipped a damaged checkpoint: {e:#}");
                }
                return Ok((dir, state));
            }
            Err(e) => errors.push(e),
        }
    }
    let list: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
    bail!("no complete checkpoint in {}: {}", run_dir.display(), list.join("; "))
}

/// Resolves a run folder or a checkpoint folder to `(run folder, checkpoint folder, state)`: a
/// checkpoint folder (one with `state.json`) is loaded as is, a run folder gives its newest
/// complete checkpoint.
pub fn resolve(path: &Path) -> anyhow::Result<(PathBuf, PathBuf, TrainingState)> {
    if !path.exists() {
        bail!(
            "{} does not exist (expected a run folder or a checkpoint folder)",
            path.display()
        );
    }
    if path.join(STATE_FILE).exists() || step_of(&path.file_name().unwrap_or_default().to_string_lossy()).is_some() {
        let run_dir = path
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| anyhow!("{} is not inside a run folder's checkpoints/", path.display()))?
            .to_path_buf();
        let state = load_checkpoint(path)?;
        return Ok((run_dir, path.to_path_buf(), state));
    }
    let (dir, state) = load_latest(path)?;
    Ok((path.to_path_buf(), dir, state))
}

/// Writes `values` (`shape`, f32) as a NumPy `.npy` file (format 1.0, little endian, C order).
pub fn write_npy(path: &Path, shape: &[usize], values: &[f32]) -> anyhow::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + header length (2) + header + '\n' is a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + values.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&to_bytes(values));
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nash-ckpt-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn state(step: u64, metric: f64) -> TrainingState {
        let mut sd = StateDict::default();
        sd.put_tensor(
            "optimizers.model.m.w",
            vec![2, 2],
            vec![1.0, -2.5, 3.0e-30, f32::MIN_POSITIVE],
        );
        // 0.1 + 0.2 has a 17-digit shortest form; exact bits must survive.
        sd.put_meta("stabilizers.0.lecam.alpha", 0.1f64 + 0.2f64).unwrap();
        sd.put_meta("loader.position", 48u64).unwrap();
        let mut rng = Rng::seed_from_u64(9);
        let _ = nash_core::rand::RngCore::next_u32(&mut rng);
        TrainingState {
            step,
            params: vec![NamedTensor {
                name: "model.w".into(),
                shape: vec![3],
                values: vec![0.1, 0.2, 1.0 / 3.0],
            }],
            state: sd,
            rng: RngState::capture(&rng),
            pipeline_hash: "fnv1a64:0".into(),
            nash_version: "0".into(),
            record: RunRecord {
                last_evaluation: Some(Evaluation {
                    step,
                    eval: BTreeMap::new(),
                    metrics: BTreeMap::from([("kl".to_string(), metric)]),
                }),
                ..Default::default()
            },
        }
    }

    #[test]
    fn round_trip_is_exact_and_the_rng_continues() {
        let run = scratch("roundtrip");
        let s = state(7, 1.0);
        let dir = write_checkpoint(&run, &s, &CheckpointConfig::default()).unwrap();
        assert_eq!(dir, run.join("checkpoints/step-00000007"));
        let back = load_checkpoint(&dir).unwrap();
        assert_eq!(back, s);
        let mut a = s.rng.restore().unwrap();
        let mut rng = Rng::seed_from_u64(9);
        let _ = nash_core::rand::RngCore::next_u32(&mut rng);
        for _ in 0..5 {
            assert_eq!(
                nash_core::rand::RngCore::next_u64(&mut a),
                nash_core::rand::RngCore::next_u64(&mut rng)
            );
        }
        assert_eq!(
            std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(),
            "step-00000007\n"
        );
        let _ = std::fs::remove_dir_all(&run);
    }

    #[test]
    fn the_pipeline_hash_ignores_what_cannot_change_the_numbers() {
        let pipeline = |training: serde_json::Value| serde_json::json!({"seed": 3, "training": training});
        let base = pipeline_hash(&pipeline(serde_json::json!({"batch_size": 64, "threads": 2}))).unwrap();
        let same = pipeline(serde_json::json!({
            "batch_size": 64, "threads": 2, "steps": 10, "adaptive_splitting": false, "out_dir": "x"
        }));
        assert_eq!(pipeline_hash(&same).unwrap(), base);
        let other = pipeline(serde_json::json!({"batch_size": 32, "threads": 2}));
        assert_ne!(pipeline_hash(&other).unwrap(), base);
    }

    /// An undefined metric (NaN: a reverse KL with no mode captured) is written as JSON `null` and
    /// must not make the checkpoint unloadable.
    #[test]
    fn undefined_metric_values_load_back_as_nan() {
        let run = scratch("nan");
        let mut s = state(3, f64::NAN);
        s.record.initial_metrics.insert("reverse_kl".into(), f64::INFINITY);
        let dir = write_checkpoint(&run, &s, &CheckpointConfig::default()).unwrap();
        let back = load_checkpoint(&dir).unwrap();
        assert!(back.record.last_evaluation.unwrap().metrics["kl"].is_nan());
        assert!(back.record.initial_metrics["reverse_kl"].is_nan());
        assert_eq!(back.params, s.params);
        let _ = std::fs::remove_dir_all(&run);
    }

    #[test]
    fn keeps_the_last_n_and_the_best() {
        let run = scratch("keep");
        let cfg = CheckpointConfig {
            every: 1,
            keep_last: 2,
            best_metric: Some("metrics.kl".into()),
            best_mode: BestMode::Min,
        };
        for (step, kl) in [(1, 5.0), (2, 0.5), (3, 4.0), (4, 3.0), (5, 2.0)] {
            write_checkpoint(&run, &state(step, kl), &cfg).unwrap();
        }
        let steps: Vec<u64> = list_checkpoints(&run).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [2, 4, 5]);
        let best: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/best.json")).unwrap()).unwrap();
        assert_eq!(
            (best["checkpoint"].as_str(), best["value"].as_f64()),
            (Some("step-00000002"), Some(0.5))
        );
        let _ = std::fs::remove_dir_all(&run);
    }

    #[test]
    fn damaged_checkpoints_are_named_and_skipped() {
        let run = scratch("damaged");
        let cfg = CheckpointConfig::default();
        write_checkpoint(&run, &state(1, 1.0), &cfg).unwrap();
        let newest = write_checkpoint(&run, &state(2, 1.0), &cfg).unwrap();
        // Truncate the newest parameter file: it is named, and the older checkpoint is used.
        let p = newest.join(PARAMS_FILE);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let msg = format!("{:#}", load_checkpoint(&newest).unwrap_err());
        assert!(msg.contains("params.safetensors") && msg.contains("damaged"), "{msg}");
        let (dir, s) = load_latest(&run).unwrap();
        assert_eq!((dir.file_name().unwrap().to_str(), s.step), (Some("step-00000001"), 1));
        // A missing file and a half-written `.tmp` folder.
        std::fs::remove_file(dir.join(STATE_TENSORS_FILE)).unwrap();
        std::fs::create_dir_all(run.join("checkpoints/step-00000003.tmp")).unwrap();
        let msg = format!("{:#}", load_latest(&run).unwrap_err());
        assert!(
            msg.contains("state.safetensors") && msg.contains("no complete checkpoint"),
            "{msg}"
        );
        // A wrong listing: state.json names a tensor the file lacks.
        let dir = write_checkpoint(&run, &state(4, 1.0), &cfg).unwrap();
        let text = std::fs::read_to_string(dir.join(STATE_FILE))
            .unwrap()
            .replace("model.w", "model.v");
        std::fs::write(dir.join(STATE_FILE), text).unwrap();
        let msg = format!("{:#}", load_checkpoint(&dir).unwrap_err());
        assert!(msg.contains("`model.v`") && msg.contains("missing"), "{msg}");
        let _ = std::fs::remove_dir_all(&run);
    }

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let run = scratch("npy");
        let path = run.join("x.npy");
        write_npy(&path, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'), "{header}");
        assert_eq!(bytes.len(), 10 + hlen + 24);
        assert_eq!(f32::from_le_bytes(bytes[10 + hlen + 20..].try_into().unwrap()), 6.0);
        let _ = std::fs::remove_dir_all(&run);
    }

    #[test]
    fn config_ranges_name_their_path() {
        let bad = CheckpointConfig {
            keep_last: 0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("training.checkpoint.keep_last"));
        let bad = CheckpointConfig {
            best_metric: Some("kl".into()),
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("training.checkpoint.best_metric"));
    }
}
