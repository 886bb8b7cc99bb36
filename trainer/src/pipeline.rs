//! Pipeline files: reading them (TOML or JSON by extension), `--set` overrides, the plugin list
//! read before anything else, and deserialization into a [`Pipeline`] with errors that name the
//! file position (syntax) or the config path (meaning), and what would be valid there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nash_core::data::DataSourceConfig;
use nash_core::metric::MetricConfig;
use nash_core::model::ModelConfig;
use nash_core::optim::OptimizerConfig;
use nash_core::registry::{Kind, Registry};
use nash_core::serde_json::{self, Value};
use nash_core::stabilizer::StabilizerConfig;
use nash_core::{Error, Result};
use serde::de::DeserializeOwned;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};

/// A whole training pipeline, as a pipeline file describes it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Plugin libraries to load, relative to the pipeline file (resolved paths after loading).
    #[serde(default)]
    pub plugins: Vec<PathBuf>,
    /// The run's name (defaults to the file's stem); names the run folder.
    #[serde(default)]
    pub name: Option<String>,
    /// Seeds data synthesis, initialization, shuffling and every random draw of the run.
    #[serde(default)]
    pub seed: u64,
    /// The data source.
    pub data: Box<dyn DataSourceConfig>,
    /// The model.
    pub model: Box<dyn ModelConfig>,
    /// One optimizer per parameter group of the model (`model`, or `discriminator` and `generator`).
    pub optimizers: BTreeMap<String, Box<dyn OptimizerConfig>>,
    /// Stabilizers, applied in this order.
    #[serde(default)]
    pub stabilizers: Vec<Box<dyn StabilizerConfig>>,
    /// Metrics run at every evaluation.
    #[serde(default)]
    pub metrics: Vec<Box<dyn MetricConfig>>,
    /// Step counts, batch size and output settings.
    #[serde(default)]
    pub training: TrainingConfig,
}

/// The `[training]` table: how long, how often, where.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingConfig {
    /// Number of training steps.
    pub steps: u64,
    /// Samples per training batch (and per evaluation batch).
    pub batch_size: usize,
    /// Write a line to `metrics.jsonl` every this many steps (0: never).
    pub log_every: u64,
    /// Evaluate held-out losses and metrics every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Number of test batches the held-out losses are averaged over (0: skip held-out losses).
    pub eval_batches: usize,
    /// Write generated samples every this many steps (0: only at the end, for generative models).
    pub sample_every: u64,
    /// Number of samples written each time.
    pub sample_count: usize,
    /// Threads of the run's compute pool: matrix products, optimizer updates, convolution patches
    /// (default: one per core, or `RAYON_NUM_THREADS`).
    pub threads: Option<usize>,
    /// Measure every few seconds whether splitting a step's kernels across the threads makes it
    /// faster, and keep steps on one thread while it does not (a virtual machine's CPUs that
    /// share no cache for a while, a busy machine); `false` splits every step large enough.
    pub adaptive_splitting: bool,
    /// The run folder (default: `runs/<name>-<YYYYmmdd-HHMMSS>`).
    pub out_dir: Option<PathBuf>,
    /// Checkpoints: how often, how many are kept, which is the best (`[training.checkpoint]`).
    pub checkpoint: crate::checkpoint::CheckpointConfig,
    /// The training-health monitor: detectors and their policies (`[training.health]`).
    pub health: crate::health::HealthConfig,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            steps: 1000,
            batch_size: 64,
            log_every: 100,
            eval_every: 0,
            eval_batches: 8,
            sample_every: 0,
            sample_count: 64,
            threads: None,
            adaptive_splitting: true,
            out_dir: None,
            checkpoint: crate::checkpoint::CheckpointConfig::default(),
            health: crate::health::HealthConfig::default(),
        }
    }
}

/// The syntax of a pipeline file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// TOML (`.toml`).
    Toml,
    /// JSON (`.json`).
    Json,
}

/// The text of a pipeline and where it came from.
#[derive(Clone, Debug)]
pub struct PipelineSource {
    /// How errors name it: the file path, or `<embedded ...>`.
    pub origin: String,
    /// The folder plugin paths are relative to.
    pub base_dir: PathBuf,
    /// The default run name (the file's stem).
    pub stem: String,
    /// The file's text.
    pub text: String,
    /// Its syntax.
    pub format: Format,
}

impl PipelineSource {
    /// Reads a pipeline file; the syntax follows the extension (`.toml` or `.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("toml") => Format::Toml,
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            _ => {
                return Err(Error::Other(format!(
                    "{}: a pipeline file must end in `.toml` or `.json`",
                    path.display()
                )))
            }
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(PipelineSource {
            origin: path.display().to_string(),
            base_dir,
            stem: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "pipeline".into()),
            text,
            format,
        })
    }

    /// A pipeline given as text; plugin paths are relative to `base_dir`.
    pub fn from_text(origin: &str, stem: &str, text: &str, format: Format, base_dir: &Path) -> Self {
        PipelineSource {
            origin: origin.to_string(),
            base_dir: base_dir.to_path_buf(),
            stem: stem.to_string(),
            text: text.to_string(),
            format,
        }
    }
}

/// One `--set path=value` override: a dotted path (`training.steps`, `stabilizers[1].clip`,
/// `optimizers.generator.lr`) and a value parsed as a TOML literal (or JSON), else a string.
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    /// The dotted path, as written.
    pub path: String,
    /// The value to put there.
    pub value: Value,
}

impl FromStr for Override {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (path, raw) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not `path=value` (for example `training.steps=500`)"))?;
        let path = path.trim();
        parse_path(path)?;
        Ok(Override {
            path: path.to_string(),
            value: parse_literal(raw.trim()),
        })
    }
}

/// A value written on the command line: a TOML literal (`3`, `1e-4`, `true`, `[1, 2]`,
/// `{ type = "adam" }`), else JSON, else the text itself as a string.
fn parse_literal(raw: &str) -> Value {
    if let Ok(mut table) = toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        if let Some(v) = table.remove("v") {
            if let Ok(v) = toml_to_json(v, "") {
                return v;
            }
        }
    }
    if let Ok(v) = serde_json::from_str::<Value>(raw) {
        return v;
    }
    Value::String(raw.to_string())
}

/// A segment of a config path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> std::result::Result<Vec<Seg>, String> {
    let bad = |why: &str| format!("bad override path `{path}`: {why}");
    if path.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut segs = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if key.is_empty() && rest.is_empty() {
            return Err(bad("it has an empty segment"));
        }
        if !key.is_empty() {
            match key.parse::<usize>() {
                Ok(i) if segs.last().is_some() => segs.push(Seg::Index(i)),
                _ => segs.push(Seg::Key(key.to_string())),
            }
        }
        while !rest.is_empty() {
            let close = rest.find(']').ok_or_else(|| bad("a `[` is not closed"))?;
            let index = rest[1..close]
                .parse::<usize>()
                .map_err(|_| bad(&format!("`{}` is not an index", &rest[..=close])))?;
            segs.push(Seg::Index(index));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(bad("write `a[1].b`, not `a[1]b`"));
            }
        }
    }
    Ok(segs)
}

fn display_path(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => {
                let _ = write!(s, "[{i}]");
            }
        }
    }
    s
}

/// Puts `value` at `path` inside `root`, creating missing tables.
fn apply_override(root: &mut Value, ov: &Override) -> Result<()> {
    let segs = parse_path(&ov.path).map_err(Error::Other)?;
    let mut cur = root;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let here = display_path(&segs[..i]);
        let where_ = if here.is_empty() {
            "the top level".to_string()
        } else {
            format!("`{here}`")
        };
        cur = match (seg, cur) {
            (Seg::Key(k), Value::Object(map)) => {
                if last {
                    map.insert(k.clone(), ov.value.clone());
                    return Ok(());
                }
                map.entry(k.clone())
                    .or_insert_with(|| Value::Object(Default::default()))
            }
            (Seg::Index(idx), Value::Array(items)) => {
                let len = items.len();
                if *idx > len || (*idx == len && !last) {
                    return Err(Error::config(
                        &ov.path,
                        format!("--set: {where_} has {len} entries, so index {idx} does not exist"),
                    ));
                }
                if last {
                    if *idx == len {
                        items.push(ov.value.clone());
                    } else {
                        items[*idx] = ov.value.clone();
                    }
                    return Ok(());
                }
                &mut items[*idx]
            }
            (Seg::Key(k), other) => {
                return Err(Error::config(
                    &ov.path,
                    format!(
                        "--set: {where_} is {}, not a table, so it has no key `{k}`",
                        describe(other)
                    ),
                ))
            }
            (Seg::Index(idx), other) => {
                return Err(Error::config(
                    &ov.path,
                    format!(
                        "--set: {where_} is {}, not an array, so it has no index {idx}",
                        describe(other)
                    ),
                ))
            }
        };
    }
    Ok(())
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

/// Converts a TOML value to JSON; `path` names it in errors.
fn toml_to_json(v: toml::Value, path: &str) -> Result<Value> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => match serde_json::Number::from_f64(f) {
            Some(n) => Value::Number(n),
            None => {
                return Err(Error::config(
                    path,
                    format!("`{f}` is not a finite number; only finite numbers are accepted"),
                ))
            }
        },
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(
            a.into_iter()
                .enumerate()
                .map(|(i, v)| toml_to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_>>()?,
        ),
        toml::Value::Table(t) => Value::Object(
            t.into_iter()
                .map(|(k, v)| {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    toml_to_json(v, &p).map(|v| (k, v))
                })
                .collect::<Result<_>>()?,
        ),
    })
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// `origin:line:col: message`, then the offending line with a caret under the column.
fn syntax_error(source: &PipelineSource, line: usize, col: usize, message: &str) -> Error {
    let mut s = format!("{}:{line}:{col}: {}", source.origin, message.trim());
    if let Some(text) = source.text.lines().nth(line.saturating_sub(1)) {
        let num = line.to_string();
        let pad = " ".repeat(num.len());
        let caret_pad: String = text
            .chars()
            .take(col.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let _ = write!(s, "\n {pad} |\n {num} | {text}\n {pad} | {caret_pad}^");
    }
    Error::Other(s)
}

/// serde_json's message without its ` at line L column C` suffix.
fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_string()
}

/// A parsed pipeline document with overrides applied, not yet deserialized (plugin types may not
/// be loaded yet).
#[derive(Clone, Debug)]
pub struct PipelineDoc {
    /// Where it came from.
    pub source: PipelineSource,
    /// The document, as JSON.
    pub value: Value,
}

impl PipelineDoc {
    /// Parses the source (syntax errors give `file:line:column`) and applies `overrides` in order.
    pub fn parse(source: PipelineSource, overrides: &[Override]) -> Result<Self> {
        let mut value = match source.format {
            Format::Toml => match toml::from_str::<toml::Table>(&source.text) {
                Ok(t) => toml_to_json(toml::Value::Table(t), "")?,
                Err(e) => {
                    let (line, col) = e.span().map_or((1, 1), |s| line_col(&source.text, s.start));
                    return Err(syntax_error(&source, line, col, e.message()));
                }
            },
            Format::Json => match serde_json::from_str::<Value>(&source.text) {
                Ok(v) => v,
                Err(e) => return Err(syntax_error(&source, e.line(), e.column(), &json_message(&e))),
            },
        };
        if !value.is_object() {
            return Err(Error::Other(format!(
                "{}: a pipeline must be a table (a JSON object), not {}",
                source.origin,
                describe(&value)
            )));
        }
        for ov in overrides {
            apply_override(&mut value, ov)?;
        }
        Ok(PipelineDoc { source, value })
    }

    /// The `plugins = [...]` list, resolved against the pipeline's folder. Read before anything
    /// else, so the plugins can be loaded before the rest is deserialized.
    pub fn plugin_paths(&self) -> Result<Vec<PathBuf>> {
        let Some(list) = self.value.get("plugins") else {
            return Ok(Vec::new());
        };
        let bad = |what: &str| {
            Error::config(
                "plugins",
                format!("{what}; write `plugins = [\"path/to/libplugin.so\"]`"),
            )
        };
        let Value::Array(items) = list else {
            return Err(bad(&format!(
                "expected a list of library paths, found {}",
                describe(list)
            )));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(self.source.base_dir.join(s)),
                other => Err(Error::config(
                    format!("plugins[{i}]"),
                    format!("expected a library path (a string), found {}", describe(other)),
                )),
            })
            .collect()
    }

    /// Deserializes the whole pipeline; every type tag must be registered by now. `registry`
    /// supplies the known tags for errors.
    /// Checks the ranges of the `[training]` values too (the first error is returned; `nash validate`
    /// reports them all).
    pub fn deserialize(&self, registry: &Registry) -> Result<Pipeline> {
        let mut pipeline: Pipeline = deserialize_value(&self.value, "", registry)?;
        pipeline.plugins = self.plugin_paths()?;
        if let Some(e) = pipeline.training.check().into_iter().next() {
            return Err(e);
        }
        Ok(pipeline)
    }
}

/// Deserializes `value`, found at config path `path` (`""` for the whole pipeline), into `T`;
/// errors name the full config path and what would be valid there (known tags, nearest field).
pub fn deserialize_value<T: DeserializeOwned>(value: &Value, path: &str, registry: &Registry) -> Result<T> {
    let prefix = if path.is_empty() {
        Vec::new()
    } else {
        parse_path(path).map_err(Error::Other)?
    };
    let text = serde_json::to_string(&TypeFirst(value))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let mut segs = prefix;
            segs.extend(e.path().iter().filter_map(|s| match s {
                serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
                serde_path_to_error::Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
                serde_path_to_error::Segment::Unknown => None,
            }));
            Err(explain(&segs, &json_message(e.inner()), registry))
        }
    }
}

impl TrainingConfig {
    /// The range errors of these values (empty when every value is usable), each naming its
    /// `training.*` path and the valid range.
    pub fn check(&self) -> Vec<Error> {
        let mut errors = Vec::new();
        if self.steps == 0 {
            errors.push(Error::config("training.steps", "must be at least 1, got 0"));
        }
        if self.batch_size == 0 {
            errors.push(Error::config("training.batch_size", "must be at least 1, got 0"));
        }
        if self.threads == Some(0) {
            errors.push(Error::config(
                "training.threads",
                "must be at least 1, got 0 (leave it out for one thread per core)",
            ));
        }
        if self.sample_every > 0 && self.sample_count == 0 {
            errors.push(Error::config(
                "training.sample_count",
                "must be at least 1 when `training.sample_every` is set, got 0",
            ));
        }
        errors.extend(self.health.check());
        errors
    }
}

/// Serializes a JSON value with every table's `type` key first, so that typetag reads the tag
/// before the fields and the path tracker sees every field (typetag buffers a table whose tag
/// comes later, and paths inside it would be lost).
struct TypeFirst<'a>(&'a Value);

impl Serialize for TypeFirst<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                if let Some(t) = m.get("type") {
                    map.serialize_entry("type", &TypeFirst(t))?;
                }
                for (k, v) in m.iter().filter(|(k, _)| *k != "type") {
                    map.serialize_entry(k, &TypeFirst(v))?;
                }
                map.end()
            }
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&TypeFirst(v))?;
                }
                seq.end()
            }
            other => other.serialize(s),
        }
    }
}

/// Which kind of plugin type the table at `segs` holds, where it can be told.
fn kind_at(segs: &[Seg]) -> Option<Kind> {
    use Seg::*;
    match segs {
        [Key(k)] if k == "data" => return Some(Kind::Data),
        [Key(k)] if k == "model" => return Some(Kind::Model),
        [Key(k), Key(_)] if k == "optimizers" => return Some(Kind::Optimizer),
        [Key(k), Index(_)] if k == "stabilizers" => return Some(Kind::Stabilizer),
        [Key(k), Index(_)] if k == "metrics" => return Some(Kind::Metric),
        [.., Key(k), Index(_)] if k == "layers" => return Some(Kind::Layer),
        _ => {}
    }
    // Nested fields of plugin configs: go by the last key (ignoring list indices).
    let key = segs.iter().rev().find_map(|s| match s {
        Key(k) => Some(k.as_str()),
        Index(_) => None,
    })?;
    match key {
        "objective" | "adversarial_objective" => Some(Kind::Objective),
        "loss" | "losses" | "reconstruction_loss" => Some(Kind::Loss),
        "optimizer" => Some(Kind::Optimizer),
        "stabilizer" => Some(Kind::Stabilizer),
        "metric" => Some(Kind::Metric),
        "data" => Some(Kind::Data),
        "layer" | "activation" => Some(Kind::Layer),
        _ => None,
    }
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo ("did you mean").
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= (word.chars().count() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn backticked(s: &str) -> Option<&str> {
    let start = s.find('`')? + 1;
    let len = s[start..].find('`')?;
    Some(&s[start..start + len])
}

const PLUGIN_HINT: &str = "types from plugins need their plugin loaded: list it in `plugins = [...]`, put it beside \
                           the nash executable or on NASH_PLUGIN_PATH; `nash plugins` lists what is loaded";

/// Turns a deserialization error at `segs` into a config error that says what would be valid.
fn explain(segs: &[Seg], message: &str, registry: &Registry) -> Error {
    let path = display_path(segs);
    let shown_path = if path.is_empty() {
        "(top level)".to_string()
    } else {
        path.clone()
    };
    // An unknown tag: `unknown variant `foo`, expected one of ...` at `<table>.type`.
    if let (Some(Seg::Key(last)), true) = (segs.last(), message.starts_with("unknown variant")) {
        if last == "type" {
            if let Some(tag) = backticked(message) {
                let table = &segs[..segs.len() - 1];
                return Error::config(shown_path, unknown_tag(tag, kind_at(table), message, registry));
            }
        }
    }
    if message == "missing field `type`" {
        let msg = match kind_at(segs) {
            Some(kind) => format!(
                "missing `type`: say which {kind} this is ({})",
                known_list(&registry.tags(kind), kind)
            ),
            None => "missing `type`: this table describes a plugin type and must name it".to_string(),
        };
        return Error::config(shown_path, msg);
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // `unknown field `x`, expected one of `a`, `b``: suggest the nearest field name.
        let field = rest.split('`').next().unwrap_or_default();
        let expected: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        if let Some(s) = suggest(field, expected) {
            return Error::config(shown_path, format!("{message} (did you mean `{s}`?)"));
        }
    }
    Error::config(shown_path, message.to_string())
}

fn article(kind: Kind) -> &'static str {
    if kind.as_str().starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn known_list(tags: &[&str], kind: Kind) -> String {
    if tags.is_empty() {
        format!("no {kind} types are registered; {PLUGIN_HINT}")
    } else {
        format!("known {kind} types: {}", tags.join(", "))
    }
}

fn unknown_tag(tag: &str, kind: Option<Kind>, typetag_message: &str, registry: &Registry) -> String {
    let mut msg = match kind {
        Some(kind) => {
            let tags = registry.tags(kind);
            let mut m = format!("unknown {kind} type `{tag}`");
            if let Some(s) = suggest(tag, tags.iter().copied()) {
                let _ = write!(m, " (did you mean `{s}`?)");
            }
            let _ = write!(m, "; {}", known_list(&tags, kind));
            m
        }
        // The kind cannot be told from the path: typetag's own message lists the valid tags.
        None => format!("unknown type `{tag}`: {typetag_message}"),
    };
    let elsewhere: Vec<String> = registry
        .find_tag(tag)
        .into_iter()
        .filter(|t| Some(t.kind) != kind)
        .map(|t| format!("{} {} (from plugin `{}`)", article(t.kind), t.kind, t.plugin))
        .collect();
    if !elsewhere.is_empty() {
        let _ = write!(msg, "; `{tag}` is {}, which does not fit here", elsewhere.join(" and "));
    } else {
        let _ = write!(msg, "; {PLUGIN_HINT}");
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::data::{DataInfo, DataSource};
    use nash_core::layers::BuildContext;
    use nash_core::model::Model;
    use nash_core::optim::Optimizer;

    // Test-only types, registered with typetag like a plugin's would be.
    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TestData {
        #[serde(default = "default_n")]
        n: usize,
    }
    fn default_n() -> usize {
        16
    }
    #[typetag::serde(name = "test_points")]
    impl DataSourceConfig for TestData {
        fn build(&self, _seed: u64) -> Result<Box<dyn DataSource>> {
            Err(Error::unsupported("test_points", "parse-only test type"))
        }
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TestModel {
        hidden: usize,
        #[serde(default)]
        objective: Option<Box<dyn DataSourceConfig>>,
    }
    #[typetag::serde(name = "test_model")]
    impl ModelConfig for TestModel {
        fn build(&self, _data: &DataInfo, _ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
            Err(Error::unsupported("test_model", "parse-only test type"))
        }
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TestOpt {
        #[serde(default)]
        lr: f64,
    }
    #[typetag::serde(name = "test_sgd")]
    impl OptimizerConfig for TestOpt {
        fn build(&self) -> Result<Box<dyn Optimizer>> {
            Err(Error::unsupported("test_sgd", "parse-only test type"))
        }
    }

    fn registry() -> Registry {
        let mut r = Registry::new();
        nash_core::registry::register_core(&mut r).unwrap();
        r.set_current_plugin("trainer-tests");
        r.data::<TestData>("points for tests").unwrap();
        r.model::<TestModel>("a model for tests").unwrap();
        r.optimizer::<TestOpt>("an optimizer for tests").unwrap();
        r
    }

    const GOOD: &str = r#"
name = "t"
seed = 7

[data]
type = "test_points"
n = 32

[model]
hidden = 8
type = "test_model"

[optimizers.model]
type = "test_sgd"
lr = 0.1

[training]
steps = 5
"#;

    fn toml_src(text: &str) -> PipelineSource {
        PipelineSource::from_text("p.toml", "p", text, Format::Toml, Path::new("/pipelines"))
    }

    fn parse_err(text: &str, format: Format, overrides: &[Override]) -> String {
        let src = PipelineSource::from_text("p.x", "p", text, format, Path::new("."));
        match PipelineDoc::parse(src, overrides).and_then(|d| d.deserialize(&registry())) {
            Ok(p) => panic!("expected an error, got {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn good_pipeline_parses_with_type_after_fields_and_defaults() {
        let doc = PipelineDoc::parse(toml_src(GOOD), &[]).unwrap();
        let p = doc.deserialize(&registry()).unwrap();
        assert_eq!(p.seed, 7);
        assert_eq!(p.name.as_deref(), Some("t"));
        assert_eq!(p.training.steps, 5);
        assert_eq!(p.training.batch_size, TrainingConfig::default().batch_size);
        assert_eq!(p.optimizers.keys().collect::<Vec<_>>(), ["model"]);
        // Resolved form: typetag tags and defaults appear.
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["model"]["type"], "test_model");
        assert_eq!(json["model"]["hidden"], 8);
        assert_eq!(json["data"]["n"], 32);
        assert_eq!(json["training"]["log_every"], 100);
    }

    #[test]
    fn malformed_toml_reports_file_line_column() {
        let text = "seed = 1\n[data]\ntype = = \"x\"\n";
        let e = parse_err(text, Format::Toml, &[]);
        assert!(e.starts_with("p.x:3:8: "), "{e}");
        assert!(e.contains("3 | type = = \"x\""), "{e}");
    }

    #[test]
    fn malformed_json_reports_file_line_column() {
        let text = "{\n  \"seed\": 1,\n  \"data\": {\"type\": \"test_points\",}\n}";
        let e = parse_err(text, Format::Json, &[]);
        assert!(e.starts_with("p.x:3:"), "{e}");
        assert!(e.contains("trailing comma"), "{e}");
    }

    #[test]
    fn unknown_model_tag_lists_known_models_and_suggests() {
        let e = parse_err(&GOOD.replace("\"test_model\"", "\"test_modle\""), Format::Toml, &[]);
        assert!(e.contains("`model.type`"), "{e}");
        assert!(e.contains("unknown model type `test_modle`"), "{e}");
        assert!(e.contains("did you mean `test_model`?"), "{e}");
        assert!(e.contains("known model types: test_model"), "{e}");
    }

    #[test]
    fn tag_of_another_kind_is_named() {
        let e = parse_err(&GOOD.replace("\"test_model\"", "\"test_sgd\""), Format::Toml, &[]);
        assert!(e.contains("unknown model type `test_sgd`"), "{e}");
        assert!(
            e.contains("`test_sgd` is an optimizer (from plugin `trainer-tests`)"),
            "{e}"
        );
    }

    #[test]
    fn unknown_optimizer_tag_has_optimizer_path() {
        let text = GOOD.replace("type = \"test_sgd\"", "type = \"nope\"");
        let e = parse_err(&text, Format::Toml, &[]);
        assert!(e.contains("`optimizers.model.type`"), "{e}");
        assert!(e.contains("unknown optimizer type `nope`"), "{e}");
        assert!(e.contains("test_sgd"), "{e}");
    }

    #[test]
    fn unknown_tag_in_a_list_and_nested_field() {
        let text = format!("{GOOD}\n[[metrics]]\ntype = \"fid\"\n");
        let e = parse_err(&text, Format::Toml, &[]);
        assert!(e.contains("`metrics[0].type`"), "{e}");
        assert!(e.contains("unknown metric type `fid`"), "{e}");
        // A nested plugin field of a model (here typed as a data source) is tracked too.
        let text = GOOD.replace("hidden = 8", "hidden = 8\nobjective = { type = \"ns\" }");
        let e = parse_err(&text, Format::Toml, &[]);
        assert!(e.contains("`model.objective.type`"), "{e}");
        assert!(
            e.contains("unknown objective type `ns`") || e.contains("unknown type `ns`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_and_missing_fields_report_the_path() {
        let e = parse_err(&GOOD.replace("n = 32", "n = 32\nsize = 3"), Format::Toml, &[]);
        assert!(
            e.contains("`data.size`") && e.contains("unknown field `size`, expected `n`"),
            "{e}"
        );
        let e = parse_err(&GOOD.replace("hidden = 8", ""), Format::Toml, &[]);
        assert!(e.contains("`model`") && e.contains("missing field `hidden`"), "{e}");
        let e = parse_err(&GOOD.replace("steps = 5", "step = 5"), Format::Toml, &[]);
        assert!(
            e.contains("`training.step`") && e.contains("unknown field `step`"),
            "{e}"
        );
        assert!(e.contains("(did you mean `steps`?)"), "{e}");
        let e = parse_err(&GOOD.replace("lr = 0.1", "lr = \"fast\""), Format::Toml, &[]);
        assert!(e.contains("`optimizers.model.lr`") && e.contains("invalid type"), "{e}");
        let e = parse_err(&GOOD.replace("type = \"test_points\"", ""), Format::Toml, &[]);
        assert!(e.contains("`data`") && e.contains("missing `type`"), "{e}");
        assert!(e.contains("known data types: test_points"), "{e}");
        let e = parse_err("seed = 1", Format::Toml, &[]);
        assert!(e.contains("(top level)") && e.contains("missing field"), "{e}");
    }

    #[test]
    fn overrides_apply_before_deserialization() {
        let ovs: Vec<Override> = [
            "training.steps=9",
            "optimizers.model.lr=1e-3",
            "name=sweep-a",
            "training.out_dir=out/x",
            "plugins=[\"libp.so\"]",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let doc = PipelineDoc::parse(toml_src(GOOD), &ovs).unwrap();
        assert_eq!(doc.plugin_paths().unwrap(), [PathBuf::from("/pipelines/libp.so")]);
        let p = doc.deserialize(&registry()).unwrap();
        assert_eq!(p.training.steps, 9);
        assert_eq!(p.name.as_deref(), Some("sweep-a"));
        assert_eq!(p.training.out_dir, Some(PathBuf::from("out/x")));
        assert_eq!(serde_json::to_value(&p).unwrap()["optimizers"]["model"]["lr"], 1e-3);
    }

    #[test]
    fn override_paths_into_lists_and_errors() {
        let mut v = serde_json::json!({"stabilizers": [{"type": "a"}, {"type": "b", "c": 1}]});
        apply_override(&mut v, &"stabilizers[1].c=0.5".parse().unwrap()).unwrap();
        apply_override(&mut v, &"stabilizers.0.type=z".parse().unwrap()).unwrap();
        apply_override(&mut v, &"stabilizers[2]={ type = \"new\" }".parse().unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"stabilizers": [{"type": "z"}, {"type": "b", "c": 0.5}, {"type": "new"}]})
        );
        let e = apply_override(&mut v, &"stabilizers[7].c=1".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("has 3 entries"), "{e}");
        let e = apply_override(&mut v, &"stabilizers[0].type.x=1".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("is a string, not a table"), "{e}");
        assert!("novalue".parse::<Override>().unwrap_err().contains("path=value"));
        assert!("a[x]=1".parse::<Override>().unwrap_err().contains("not an index"));
        assert_eq!("a=true".parse::<Override>().unwrap().value, Value::Bool(true));
        assert_eq!(
            "a=hello world".parse::<Override>().unwrap().value,
            Value::from("hello world")
        );
    }

    #[test]
    fn json_pipeline_parses() {
        let text = r#"{"data": {"type": "test_points"}, "model": {"hidden": 2, "type": "test_model"},
                       "optimizers": {"model": {"type": "test_sgd"}}}"#;
        let src = PipelineSource::from_text("p.json", "p", text, Format::Json, Path::new("."));
        let p = PipelineDoc::parse(src, &[]).unwrap().deserialize(&registry()).unwrap();
        assert_eq!(p.training, TrainingConfig::default());
        assert!(p.stabilizers.is_empty() && p.metrics.is_empty() && p.plugins.is_empty());
    }

    #[test]
    fn bad_plugin_list_and_non_finite_values() {
        let doc = PipelineDoc::parse(toml_src("plugins = \"libx.so\""), &[]).unwrap();
        let e = doc.plugin_paths().unwrap_err().to_string();
        assert!(e.contains("`plugins`") && e.contains("expected a list"), "{e}");
        let src = toml_src("plugins = [1]");
        let e = PipelineDoc::parse(src, &[])
            .unwrap()
            .plugin_paths()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`plugins[0]`"), "{e}");
        let e = parse_err("[training]\nx = nan", Format::Toml, &[]);
        assert!(e.contains("`training.x`") && e.contains("finite"), "{e}");
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
        assert_eq!(line_col("x", 0), (1, 1));
    }
}
