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
            .map(|(name, default)| FieldInfo {
                name,
                default: shortest_floats(default),
            })
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

/// Rewrites numbers that are f32 values widened to f64 (`0.009999999776482582`) as the shortest
/// decimal that reads back as the same f32 (`0.01`), so defaults print as they were written.
fn shortest_floats(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let v = n.as_f64().unwrap_or_default();
            let narrow = v as f32;
            if f64::from(narrow) == v {
                if let Some(short) = format!("{narrow}")
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                {
                    return Value::Number(short);
                }
            }
            Value::Number(n)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(shortest_floats).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, shortest_floats(v))).collect()),
        other => other,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_types_register_with_tags_fields_and_defaults() {
        let mut registry = Registry::new();
        register_core(&mut registry).unwrap();
        let adam = registry.find(Kind::Optimizer, "adam").expect("adam is registered");
        assert_eq!(adam.plugin, "nash-core");
        let lr = adam.fields.iter().find(|f| f.name == "lr").expect("adam has lr");
        assert_eq!(lr.default, serde_json::json!(0.001));
        assert_eq!(lr.type_name(), "float");
        assert!(registry.tags(Kind::Layer).contains(&"conv2d"));
        assert!(registry.tags(Kind::Loss).contains(&"bce_with_logits"));
    }

    #[test]
    fn a_duplicate_tag_names_both_plugins() {
        let mut registry = Registry::new();
        registry.set_current_plugin("first");
        crate::loss::basic::register(&mut registry).unwrap();
        registry.set_current_plugin("second");
        let err = crate::loss::basic::register(&mut registry).unwrap_err().to_string();
        assert!(
            err.contains("duplicate loss tag") && err.contains("`first`") && err.contains("`second`"),
            "{err}"
        );
    }

    #[test]
    fn widened_f32_defaults_print_as_written() {
        let widened = serde_json::json!({ "clip": f64::from(0.01f32), "lr": 1e-3, "n": 3, "xs": [f64::from(0.2f32)] });
        let short = shortest_floats(widened);
        assert_eq!(
            short,
            serde_json::json!({ "clip": 0.01, "lr": 1e-3, "n": 3, "xs": [0.2] })
        );
    }
}
