//! `nash validate`: checks a pipeline without training it and reports every error at once.
//!
//! The checks, in order: syntax (`file:line:column` of the first syntax error, where parsing
//! stops); the plugin list and each plugin library; each section deserialized on its own (`data`,
//! `model`, each optimizer, each stabilizer, each metric, `training`), so one bad section does not
//! hide another; ranges (`training.*`, and each optimizer's, stabilizer's and metric's own checks
//! in their `build`); then the wiring: the data source is built (missing or truncated files), the
//! model is built against its data (decoder size, labels), optimizer groups are matched against
//! the model's parameter groups, and the stabilizers are checked against the model and each other.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use nash_core::data::{DataLoader, DataSource, DataSourceConfig, Split};
use nash_core::layers::BuildContext;
use nash_core::metric::MetricConfig;
use nash_core::model::{Model, ModelConfig};
use nash_core::optim::OptimizerConfig;
use nash_core::rand::SeedableRng;
use nash_core::registry::{Kind, Registry};
use nash_core::serde_json::{self, json, Value};
use nash_core::stabilizer::{HookContext, StabilizerConfig, StabilizerStack};
use nash_core::tensor::{Device, Rng};
use nash_core::Error;
use serde::Serialize;

use crate::pipeline::{deserialize_value, suggest, Override, PipelineDoc, PipelineSource, TrainingConfig};
use crate::PluginSet;

/// What kind of problem an [`Issue`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IssueKind {
    /// The file is not valid TOML or JSON.
    Syntax,
    /// A value is missing, mistyped, unknown or out of range.
    Config,
    /// A data file is missing, truncated or mis-shaped.
    Data,
    /// A plugin library is missing or refused.
    Plugin,
    /// Sections that are each valid do not fit together (sizes, groups, labels, conflicts).
    Wiring,
    /// A plugin or nash itself panicked on this input: a bug.
    Internal,
}

/// One problem found in a pipeline.
#[derive(Clone, Debug, Serialize)]
pub struct Issue {
    /// Its kind.
    pub kind: IssueKind,
    /// Where: `file:line:column` for syntax errors, else the config path (`optimizers.model.lr`).
    pub location: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

/// A section that validated, with a one-line summary.
#[derive(Clone, Debug, Serialize)]
pub struct Section {
    /// Its config path (`data`, `optimizers.generator`, `stabilizers[0]`).
    pub path: String,
    /// What it describes.
    pub summary: String,
}

/// The result of validating a pipeline.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The pipeline file (or `<embedded ...>`).
    pub pipeline: String,
    /// The sections that validated, in pipeline order.
    pub sections: Vec<Section>,
    /// Every problem found.
    pub errors: Vec<Issue>,
}

impl Report {
    fn new(pipeline: &str) -> Self {
        Report {
            pipeline: pipeline.to_string(),
            sections: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Whether the pipeline is valid.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// The report as text: `ok` with a line per section, or the numbered list of errors.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if self.is_ok() {
            let _ = writeln!(s, "{}: ok", self.pipeline);
            for sec in &self.sections {
                let _ = writeln!(s, "  {}: {}", sec.path, sec.summary);
            }
        } else {
            let n = self.errors.len();
            let _ = writeln!(s, "{}: {n} error{}", self.pipeline, if n == 1 { "" } else { "s" });
            for (i, e) in self.errors.iter().enumerate() {
                let mut lines = e.message.lines();
                let _ = writeln!(s, "  {}. {}: {}", i + 1, e.location, lines.next().unwrap_or_default());
                for line in lines {
                    let _ = writeln!(s, "     {line}");
                }
            }
        }
        s
    }

    /// The report as JSON: `{"pipeline", "ok", "sections": [...], "errors": [...]}`.
    pub fn to_json(&self) -> Value {
        json!({
            "pipeline": self.pipeline,
            "ok": self.is_ok(),
            "sections": self.sections,
            "errors": self.errors,
        })
    }

    fn section(&mut self, path: impl Into<String>, summary: impl Into<String>) {
        self.sections.push(Section {
            path: path.into(),
            summary: summary.into(),
        });
    }

    fn push(&mut self, kind: IssueKind, location: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Issue {
            kind,
            location: location.into(),
            message: message.into(),
        });
    }

    /// Records `err`, found while checking `location`; a config error names its own path.
    fn error(&mut self, kind: IssueKind, location: &str, err: &Error) {
        let (kind, location, message) = match err {
            Error::Config { path, message } => {
                let loc = if path.is_empty() || path == "(top level)" {
                    location.to_string()
                } else if path.starts_with(location) || location.is_empty() {
                    path.clone()
                } else {
                    // Plugins name paths relative to themselves (`adam.lr`): keep both.
                    format!("{location} ({path})")
                };
                let kind = if kind == IssueKind::Wiring {
                    kind
                } else {
                    IssueKind::Config
                };
                (kind, loc, message.clone())
            }
            Error::Data { .. } => (IssueKind::Data, location.to_string(), err.to_string()),
            Error::Plugin { .. } => (IssueKind::Plugin, location.to_string(), err.to_string()),
            _ => (kind, location.to_string(), err.to_string()),
        };
        let location = if location.is_empty() {
            "(top level)".to_string()
        } else {
            location
        };
        self.push(kind, location, message);
    }
}

/// Runs `f`, turning a panic into an [`IssueKind::Internal`] issue at `location`.
fn guarded<T>(report: &mut Report, location: &str, f: impl FnOnce() -> T) -> Option<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            report.push(
                IssueKind::Internal,
                location,
                format!("internal error (a bug in nash or a plugin): {message}; please report it"),
            );
            None
        }
    }
}

/// Validates a pipeline: parses it, loads the plugins beside the executable, on
/// `NASH_PLUGIN_PATH`, in its `plugins` list and `extra_plugins`, and checks it.
pub fn validate(source: PipelineSource, overrides: &[Override], extra_plugins: &[PathBuf]) -> Report {
    let mut report = Report::new(&source.origin);
    let mut set = match PluginSet::load_all(&[]) {
        Ok(set) => set,
        Err(e) => {
            report.error(IssueKind::Plugin, "plugins", &e);
            match PluginSet::core_only() {
                Ok(set) => set,
                Err(e) => {
                    report.error(IssueKind::Internal, "(nash-core)", &e);
                    return report;
                }
            }
        }
    };
    for path in extra_plugins {
        if let Err(e) = set.load(path) {
            report.error(IssueKind::Plugin, "--plugin", &e);
        }
    }
    let mut rest = validate_with(source, overrides, &mut set);
    report.errors.append(&mut rest.errors);
    report.sections = rest.sections;
    report
}

/// Validates a pipeline with the plugins of `set`, loading those its `plugins` list names into it.
pub fn validate_with(source: PipelineSource, overrides: &[Override], set: &mut PluginSet) -> Report {
    let mut report = Report::new(&source.origin);
    let doc = match PipelineDoc::parse(source, overrides) {
        Ok(doc) => doc,
        Err(e) => {
            // Syntax errors start with `file:line:column:`; override errors name their path.
            let text = e.to_string();
            match &e {
                Error::Config { .. } => report.error(IssueKind::Config, "--set", &e),
                _ => {
                    let location = text.split(": ").next().unwrap_or_default().to_string();
                    let message = text[location.len()..].trim_start_matches(": ").to_string();
                    report.push(IssueKind::Syntax, location, message);
                }
            }
            return report;
        }
    };
    match doc.plugin_paths() {
        Ok(paths) => {
            for (i, path) in paths.iter().enumerate() {
                if let Err(e) = set.load(path) {
                    report.error(IssueKind::Plugin, &format!("plugins[{i}]"), &e);
                }
            }
        }
        Err(e) => report.error(IssueKind::Config, "plugins", &e),
    }
    check(&doc, &set.registry, &mut report);
    report
}

/// The pipeline's top-level keys.
const TOP_LEVEL: [&str; 9] = [
    "plugins",
    "name",
    "seed",
    "data",
    "model",
    "optimizers",
    "stabilizers",
    "metrics",
    "training",
];

/// The `type` tag of a table, for summaries.
fn tag(value: &Value) -> &str {
    value.get("type").and_then(Value::as_str).unwrap_or("?")
}

/// Deserializes `value` at `path`, recording an error; `None` if it did not deserialize.
fn section<T: serde::de::DeserializeOwned>(
    report: &mut Report,
    value: &Value,
    path: &str,
    registry: &Registry,
) -> Option<T> {
    match guarded(report, path, || deserialize_value::<T>(value, path, registry))? {
        Ok(v) => Some(v),
        Err(e) => {
            report.error(IssueKind::Config, path, &e);
            None
        }
    }
}

fn missing(report: &mut Report, registry: &Registry, path: &str, kind: Kind) {
    let tags = registry.tags(kind);
    let known = if tags.is_empty() {
        format!("no {kind} types are registered (is a plugin missing?)")
    } else {
        format!("known {kind} types: {}", tags.join(", "))
    };
    report.push(
        IssueKind::Config,
        path,
        format!("missing: every pipeline needs `[{path}]` with a `type`; {known}"),
    );
}

/// Checks a parsed pipeline against `registry`, adding every problem to `report`.
fn check(doc: &PipelineDoc, registry: &Registry, report: &mut Report) {
    let Value::Object(root) = &doc.value else {
        report.push(IssueKind::Config, "(top level)", "a pipeline must be a table");
        return;
    };
    for key in root.keys().filter(|k| !TOP_LEVEL.contains(&k.as_str())) {
        let hint = match suggest(key, TOP_LEVEL) {
            Some(s) => format!(" (did you mean `{s}`?)"),
            None => String::new(),
        };
        report.push(
            IssueKind::Config,
            key.clone(),
            format!(
                "unknown top-level key `{key}`{hint}; expected one of {}",
                TOP_LEVEL.join(", ")
            ),
        );
    }
    let seed: u64 = match root.get("seed") {
        Some(v) => section(report, v, "seed", registry).unwrap_or(0),
        None => 0,
    };
    if let Some(v) = root.get("name") {
        section::<String>(report, v, "name", registry);
    }

    // Each section on its own.
    let data: Option<Box<dyn DataSourceConfig>> = match root.get("data") {
        Some(v) => section(report, v, "data", registry),
        None => {
            missing(report, registry, "data", Kind::Data);
            None
        }
    };
    let model: Option<Box<dyn ModelConfig>> = match root.get("model") {
        Some(v) => section(report, v, "model", registry),
        None => {
            missing(report, registry, "model", Kind::Model);
            None
        }
    };
    let mut optimizers: BTreeMap<String, Option<Box<dyn OptimizerConfig>>> = BTreeMap::new();
    let mut optimizers_ok = true;
    match root.get("optimizers") {
        Some(Value::Object(map)) => {
            for (group, v) in map {
                let path = format!("optimizers.{group}");
                let opt = section::<Box<dyn OptimizerConfig>>(report, v, &path, registry);
                optimizers_ok &= opt.is_some();
                optimizers.insert(group.clone(), opt);
            }
        }
        Some(_) => {
            optimizers_ok = false;
            report.push(
                IssueKind::Config,
                "optimizers",
                "expected a table of optimizers by parameter group (`[optimizers.model]`)",
            );
        }
        None => {
            optimizers_ok = false;
            missing(report, registry, "optimizers.<group>", Kind::Optimizer);
        }
    }
    let stabilizers = list::<Box<dyn StabilizerConfig>>(report, root.get("stabilizers"), "stabilizers", registry);
    let metrics = list::<Box<dyn MetricConfig>>(report, root.get("metrics"), "metrics", registry);
    let training: Option<TrainingConfig> = match root.get("training") {
        Some(v) => section(report, v, "training", registry),
        None => Some(TrainingConfig::default()),
    };

    // Ranges: the trainer's own, then each component's `build` checks.
    let training = training.filter(|t| {
        let errors = t.check();
        for e in &errors {
            report.error(IssueKind::Config, "training", e);
        }
        errors.is_empty()
    });
    let mut built_optimizers = 0;
    for (group, cfg) in &optimizers {
        let Some(cfg) = cfg else { continue };
        let path = format!("optimizers.{group}");
        match guarded(report, &path, || cfg.build()) {
            Some(Ok(opt)) => {
                built_optimizers += 1;
                report.section(
                    path,
                    format!("{} (lr {})", tag(&root["optimizers"][group]), opt.learning_rate()),
                );
            }
            Some(Err(e)) => report.error(IssueKind::Config, &path, &e),
            None => {}
        }
    }
    let optimizers_ok = optimizers_ok && built_optimizers == optimizers.len();
    let mut built_stabilizers = Vec::new();
    let mut stabilizers_ok = stabilizers.is_some();
    for (i, cfg) in stabilizers.iter().flatten().enumerate() {
        let path = format!("stabilizers[{i}]");
        let Some(cfg) = cfg else {
            stabilizers_ok = false;
            continue;
        };
        match guarded(report, &path, || cfg.build()) {
            Some(Ok(s)) => {
                report.section(path, s.name().to_string());
                built_stabilizers.push(s);
            }
            Some(Err(e)) => {
                stabilizers_ok = false;
                report.error(IssueKind::Config, &path, &e);
            }
            None => stabilizers_ok = false,
        }
    }
    for (i, cfg) in metrics.iter().flatten().enumerate() {
        let path = format!("metrics[{i}]");
        let Some(cfg) = cfg else { continue };
        match guarded(report, &path, || cfg.build()) {
            Some(Ok(m)) => report.section(path, m.name().to_string()),
            Some(Err(e)) => report.error(IssueKind::Config, &path, &e),
            None => {}
        }
    }
    let stack = if built_stabilizers.is_empty() {
        None
    } else {
        match StabilizerStack::new(built_stabilizers) {
            Ok(stack) => Some(stack),
            Err(e) => {
                report.error(IssueKind::Wiring, "stabilizers", &e);
                stabilizers_ok = false;
                None
            }
        }
    };

    // Wiring: data, then the model on it, then groups and stabilizers against the model.
    let Some(data) = data else { return };
    let data: Box<dyn DataSource> = match guarded(report, "data", || data.build(seed)) {
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            let kind = if matches!(e, Error::Io { .. }) {
                IssueKind::Data
            } else {
                IssueKind::Config
            };
            report.error(kind, "data", &e);
            return;
        }
        None => return,
    };
    report.section("data", data.describe().lines().next().unwrap_or_default().to_string());
    if let Some(training) = &training {
        let len = data.len(Split::Train);
        if let Err(e) = DataLoader::new(Split::Train, len, training.batch_size, seed) {
            report.error(IssueKind::Wiring, "training.batch_size", &e);
        } else {
            report.section(
                "training",
                format!("{} steps of batch {}", training.steps, training.batch_size),
            );
        }
    }
    let Some(model_cfg) = model else { return };
    let device = Device::seed_from_u64(seed);
    let mut rng = Rng::seed_from_u64(seed);
    let info = data.info();
    let built = guarded(report, "model", || {
        model_cfg.build(
            &info,
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    });
    let mut model: Box<dyn Model> = match built {
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            report.error(IssueKind::Wiring, "model", &e);
            return;
        }
        None => return,
    };
    let groups: BTreeSet<String> = model.param_groups().into_iter().collect();
    report.section(
        "model",
        format!(
            "{} `{}`, parameter groups {}",
            model.family(),
            tag(&root["model"]),
            groups.iter().cloned().collect::<Vec<_>>().join(", ")
        ),
    );
    if optimizers_ok || root.get("optimizers").is_some_and(Value::is_object) {
        let given: BTreeSet<String> = optimizers.keys().cloned().collect();
        let list = |s: &BTreeSet<String>| s.iter().map(|g| format!("`{g}`")).collect::<Vec<_>>().join(", ");
        for g in groups.difference(&given) {
            report.push(
                IssueKind::Wiring,
                format!("optimizers.{g}"),
                format!(
                    "missing: the {} model has parameter groups {} and each needs `[optimizers.{g}]`",
                    model.family(),
                    list(&groups)
                ),
            );
        }
        for g in given.difference(&groups) {
            report.push(
                IssueKind::Wiring,
                format!("optimizers.{g}"),
                format!(
                    "the {} model has no parameter group `{g}` (its groups: {}); remove it",
                    model.family(),
                    list(&groups)
                ),
            );
        }
    }
    if let (Some(mut stack), true) = (stack, stabilizers_ok) {
        match guarded(report, "stabilizers", || stack.validate(model.as_ref())) {
            Some(Ok(())) => {
                let setup = guarded(report, "stabilizers", || {
                    stack.setup(
                        model.as_mut(),
                        &mut HookContext {
                            step: 0,
                            device: &device,
                            rng: &mut rng,
                        },
                    )
                });
                if let Some(Err(e)) = setup {
                    report.error(IssueKind::Wiring, "stabilizers", &e);
                }
            }
            Some(Err(e)) => report.error(IssueKind::Wiring, "stabilizers", &e),
            None => {}
        }
    }
}

/// Deserializes each entry of an optional list section on its own; `None` if it is not a list.
fn list<T: serde::de::DeserializeOwned>(
    report: &mut Report,
    value: Option<&Value>,
    path: &str,
    registry: &Registry,
) -> Option<Vec<Option<T>>> {
    match value {
        None => Some(Vec::new()),
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| section(report, v, &format!("{path}[{i}]"), registry))
                .collect(),
        ),
        Some(other) => {
            report.push(
                IssueKind::Config,
                path,
                format!(
                    "expected a list (`[[{path}]]` tables), found {}",
                    serde_json::to_string(other).unwrap_or_default()
                ),
            );
            None
        }
    }
}

/// The `nash` process's exit codes.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other failure (an output folder that cannot be written, ...).
    pub const OTHER: u8 = 1;
    /// Bad command-line usage (clap's own code).
    pub const USAGE: u8 = 2;
    /// The pipeline is invalid: syntax, unknown types or fields, ranges, wiring.
    pub const CONFIG: u8 = 3;
    /// A data file is missing, truncated or mis-shaped.
    pub const DATA: u8 = 4;
    /// A plugin library is missing, incompatible or failed to register.
    pub const PLUGIN: u8 = 5;
    /// Training failed: a non-finite loss, or a step failed.
    pub const TRAINING: u8 = 6;
    /// A panic: a bug in nash or a plugin.
    pub const INTERNAL: u8 = 101;
    /// Interrupted (Ctrl-C, SIGINT).
    pub const INTERRUPTED: u8 = 130;
}

/// The exit code for `err`, by the kind of [`Error`] in its chain: plugin, data and non-finite
/// errors wherever they are, then failures inside a training step (marked by the training loop's
/// [`crate::train::TrainingFailed`] context), then I/O on data files, then
/// configuration errors; anything else is [`exit::OTHER`].
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let core: Vec<&Error> = err.chain().filter_map(|c| c.downcast_ref::<Error>()).collect();
    for e in &core {
        match e {
            Error::Plugin { .. } => return exit::PLUGIN,
            Error::Data { .. } => return exit::DATA,
            Error::NonFinite { .. } => return exit::TRAINING,
            _ => {}
        }
    }
    if err.downcast_ref::<crate::train::TrainingFailed>().is_some() {
        return exit::TRAINING;
    }
    let contexts: Vec<String> = err.chain().map(|c| c.to_string()).collect();
    let in_data = contexts.iter().any(|c| c.starts_with("cannot build the data source"));
    for e in &core {
        match e {
            Error::Io { .. } if in_data => return exit::DATA,
            Error::Config { .. } | Error::Shape { .. } | Error::Unsupported { .. } | Error::Json(_) => {
                return exit::CONFIG
            }
            _ => {}
        }
    }
    if contexts
        .first()
        .is_some_and(|c| c.starts_with("cannot read pipeline") || c.starts_with("cannot read the pipeline"))
    {
        return exit::CONFIG;
    }
    exit::OTHER
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Format;
    use std::path::Path;

    fn run(text: &str) -> Report {
        let src = PipelineSource::from_text("p.toml", "p", text, Format::Toml, Path::new("."));
        validate_with(src, &[], &mut PluginSet::core_only().unwrap())
    }

    #[test]
    fn every_section_is_reported_at_once() {
        // Core registers optimizers; data and model types come from plugins, absent here.
        let text = "seed = 1\nbogus = 2\n[data]\ntype = \"nope\"\n[model]\ntype = \"nada\"\n\
                    [optimizers.model]\ntype = \"adam\"\nlr = -1.0\n[optimizers.d]\ntype = \"adamm\"\n\
                    [training]\nsteps = 0\nbatch_size = 0\n";
        let r = run(text);
        let locs: Vec<&str> = r.errors.iter().map(|e| e.location.as_str()).collect();
        for want in [
            "bogus",
            "data.type",
            "model.type",
            "optimizers.d.type",
            "training.steps",
            "training.batch_size",
        ] {
            assert!(locs.contains(&want), "{want} missing from {locs:?}\n{}", r.to_text());
        }
        assert!(
            r.errors
                .iter()
                .any(|e| e.location.starts_with("optimizers.model") && e.message.contains("> 0")),
            "{}",
            r.to_text()
        );
        assert!(r.to_text().contains("did you mean `adam`?"), "{}", r.to_text());
        assert!(r.to_text().starts_with("p.toml: 7 errors"), "{}", r.to_text());
        assert_eq!(r.to_json()["ok"], false);
    }

    #[test]
    fn syntax_error_has_a_position_and_missing_sections_are_named() {
        let r = run("seed = = 1\n");
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.errors[0].kind, IssueKind::Syntax);
        assert_eq!(r.errors[0].location, "p.toml:1:8");
        let r = run("seed = 1\n");
        let locs: Vec<&str> = r.errors.iter().map(|e| e.location.as_str()).collect();
        assert_eq!(locs, ["data", "model", "optimizers.<group>"], "{}", r.to_text());
        assert!(r.errors[2].message.contains("adam"), "{}", r.to_text());
    }

    #[test]
    fn wrong_shapes_of_sections_are_errors_not_panics() {
        let r =
            run("data = 3\nmodel = []\noptimizers = 1\nstabilizers = {}\nmetrics = \"x\"\ntraining = 5\nseed = -1\n");
        let locs: Vec<&str> = r.errors.iter().map(|e| e.location.as_str()).collect();
        for want in [
            "data",
            "model",
            "optimizers",
            "stabilizers",
            "metrics",
            "training",
            "seed",
        ] {
            assert!(locs.contains(&want), "{want} missing from {locs:?}");
        }
        assert!(r.errors.iter().all(|e| e.kind != IssueKind::Internal));
    }

    #[test]
    fn exit_codes_follow_the_error_kind() {
        use anyhow::Context;
        let wrap = |e: Error, ctx: &str| Err::<(), _>(e).context(ctx.to_string()).unwrap_err();
        let cfg = Error::config("training.steps", "must be at least 1");
        assert_eq!(exit_code(&wrap(cfg, "pipeline p.toml is invalid")), exit::CONFIG);
        let plugin = Error::Plugin {
            path: "libx.so".into(),
            message: "refused".into(),
        };
        assert_eq!(exit_code(&wrap(plugin, "cannot load plugins")), exit::PLUGIN);
        let data = Error::Data {
            path: "x.npy".into(),
            message: "truncated".into(),
        };
        assert_eq!(
            exit_code(&wrap(data, "cannot build the data source (`data`)")),
            exit::DATA
        );
        let io = Error::io("x.csv", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(
            exit_code(&wrap(io, "cannot build the data source (`data`)")),
            exit::DATA
        );
        let nf = Error::NonFinite { what: "loss".into() };
        assert_eq!(exit_code(&wrap(nf, "training diverged at step 3")), exit::TRAINING);
        // A failed step is marked by the training loop's typed context, whatever its wording.
        let step = Err::<(), _>(Error::shape("linear", "3", "4"))
            .context(crate::train::TrainingFailed::new("step 2 went wrong".to_string()))
            .unwrap_err();
        assert_eq!(exit_code(&step), exit::TRAINING);
        let untyped = Error::shape("linear", "3", "4");
        assert_eq!(exit_code(&wrap(untyped, "training step 2 failed")), exit::CONFIG);
        let io = Error::io("runs/x", std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(exit_code(&wrap(io, "cannot create the run folder runs/x")), exit::OTHER);
        let io = Error::io("p.toml", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(exit_code(&wrap(io, "cannot read the pipeline")), exit::CONFIG);
    }
}
