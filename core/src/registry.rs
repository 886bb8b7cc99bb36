//! The registry of what each plugin brings: every configurable type, by kind and tag, with its
//! plugin, a summary and its config fields with defaults (for `nash plugins`).
//!
//! Deserialization itself goes through typetag, whose registry fills when a plugin library is
//! loaded; this registry is the human-facing catalog and the place duplicates are refused.
//! A type's tag and fields are read by serializing its `Default` config through typetag, so
//! they can never disagree with what pipeline files must say.

use serde::{Deserialize, Serialize};

use crate::data::DataSourceConfig;
use crate::error::{Error, Result};
use crate::layers::LayerConfig;
use crate::loss::{AdversarialObjectiveConfig, LossConfig};
use crate::metric::MetricConfig;
use crate::model::ModelConfig;
use crate::optim::OptimizerConfig;
use crate::stabilizer::StabilizerConfig;

/// The kinds of plugin types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// [`ModelConfig`].
    Model,
    /// [`LayerConfig`].
    Layer,
    /// [`LossConfig`].
    Loss,
    /// [`AdversarialObjectiveConfig`].
    Objective,
    /// [`OptimizerConfig`].
    Optimizer,
    /// [`StabilizerConfig`].
    Stabilizer,
    /// [`DataSourceConfig`].
    Data,
    /// [`MetricConfig`].
    Metric,
}

impl Kind {
    /// Every kind, in display order.
    pub const ALL: [Kind; 8] = [
        Kind::Model,
        Kind::Layer,
        Kind::Loss,
        Kind::Objective,
        Kind::Optimizer,
        Kind::Stabilizer,
        Kind::Data,
        Kind::Metric,
    ];
    /// The kind's name as `nash plugins` prints it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::Layer => "layer",
            Kind::Loss => "loss",
            Kind::Objective => "objective",
            Kind::Optimizer => "optimizer",
            Kind::Stabilizer => "stabilizer",
            Kind::Data => "data",
            Kind::Metric => "metric",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One config field: its name, default value and JSON type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldInfo {
    /// The key in pipeline files.
    pub name: String,
    /// The default value.
    pub default: serde_json::Value,
}

impl FieldInfo {
    /// The value's type as pipeline files write it.
    pub fn type_name(&self) -> &'static str {
        match &self.default {
            serde_json::Value::Null => "optional",
            serde_json::Value::Bool(_) => "bool",
            serde_json::Value::Number(n) if n.is_f64() => "float",
            serde_json::Value::Number(_) => "integer",
            serde_json::Value::String(_) => "string",
            serde_json::Value::Array(_) => "array",
            serde_json::Value::Object(o) if o.contains_key("type") => "plugin table",
            serde_json::Value::Object(_) => "table",
        }
    }
}

/// A registered type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TypeInfo {
    /// What it is.
    pub kind: Kind,
    /// The `type = "..."` tag in pipeline files.
    pub tag: String,
    /// The plugin that brought it.
    pub plugin: String,
    /// One line on what it does.
    pub summary: String,
    /// Config fields with defaults.
    pub fields: Vec<FieldInfo>,
}

/// The catalog every plugin's `register` function fills.
#[derive(Debug, Default)]
pub struct Registry {
    current_plugin: String,
    types: Vec<TypeInfo>,
}

macro_rules! register_fn {
    ($(#[$doc:meta])* $fn_name:ident, $trait_:ident, $kind:expr) => {
        $(#[$doc])*
        pub fn $fn_name<C: $trait_ + Default + 'static>(&mut self, summary: &str) -> Result<()> {
            let boxed: Box<dyn $trait_> = Box::new(C::default());
            let value = serde_json::to_value(&boxed)?;
            self.add($kind, value, summary)
        }
    };
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the plugin name that following registrations are attributed to (the loader does this).
    pub fn set_current_plugin(&mut self, name: &str) {
        self.current_plugin = name.to_string();
    }
    register_fn!(/// Registers a model config type.
        model, ModelConfig, Kind::Model);
    register_fn!(/// Registers a layer config type.
        layer, LayerConfig, Kind::Layer);
    register_fn!(/// Registers a loss config type.
        loss, LossConfig, Kind::Loss);
    register_fn!(/// Registers an adversarial objective config type.
        objective, AdversarialObjectiveConfig, Kind::Objective);
    register_fn!(/// Registers an optimizer config type.
        optimizer, OptimizerConfig, Kind::Optimizer);
    register_fn!(/// Registers a stabilizer config type.
        stabilizer, StabilizerConfig, Kind::Stabilizer);
    register_fn!(/// Registers a data source config type.
        data, DataSourceConfig, Kind::Data);
    register_fn!(/// Registers a metric config type.
        metric, MetricConfig, Kind::Metric);

    fn add(&mut self, kind: Kind, value: serde_json::Value, summary: &str) -> Result<()> {
        let serde_json::Value::Object(mut map) = value else {
            return Err(Error::Other(format!(
                "a {kind} config must serialize as a table, got {value}"
            )));
        };
        let tag = match map.remove("type") {
            Some(serde_json::Value::String(t)) => t,
            _ => {
                return Err(Error::Other(format!(
                    "a {kind} config has no `type` tag: is it #[typetag::serde(name = \"...\")]?"
                )))
            }
        };
        if let Some(existing) = self.types.iter().find(|t| t.kind == kind && t.tag == tag) {
            return Err(Error::Other(format!(
                "duplicate {kind} tag `{tag}`: registered by plugin `{}` and again by plugin `{}`; rename one (typetag name = \"...\")",
                existing.plugin, self.current_plugin
            )));
        }
        let fields = map
            .into_iter()
            .map(|(name, default)| FieldInfo { name, default })
            .collect();
        self.types.push(TypeInfo {
            kind,
            tag,
            plugin: self.current_plugin.clone(),
            summary: summary.to_string(),
            fields,
        });
        Ok(())
    }
    /// Every registered type, in registration order.
    pub fn types(&self) -> &[TypeInfo] {
        &self.types
    }
    /// The tags of `kind`, sorted.
    pub fn tags(&self, kind: Kind) -> Vec<&str> {
        let mut t: Vec<&str> = self
            .types
            .iter()
            .filter(|t| t.kind == kind)
            .map(|t| t.tag.as_str())
            .collect();
        t.sort_unstable();
        t
    }
    /// The type of `kind` tagged `tag`.
    pub fn find(&self, kind: Kind, tag: &str) -> Option<&TypeInfo> {
        self.types.iter().find(|t| t.kind == kind && t.tag == tag)
    }
    /// Every type tagged `tag`, of any kind.
    pub fn find_tag(&self, tag: &str) -> Vec<&TypeInfo> {
        self.types.iter().filter(|t| t.tag == tag).collect()
    }
}

/// Registers the types nash-core itself provides (layers, basic losses, optimizers).
pub fn register_core(registry: &mut Registry) -> Result<()> {
    registry.set_current_plugin("nash-core");
    crate::layers::register(registry)?;
    crate::loss::basic::register(registry)?;
    crate::optim::register(registry)?;
    Ok(())
}
