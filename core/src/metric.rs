//! Metrics: measurements of a model against data (held-out reconstruction error, mode coverage,
//! sample quality on a feature network).

use std::collections::BTreeMap;

use crate::data::DataSource;
use crate::error::Result;
use crate::model::{EvalContext, Model};

/// A measurement of a model, returning named values (`modes_captured`, `high_quality_share`).
pub trait Metric {
    /// The metric's name.
    fn name(&self) -> &str;
    /// Evaluates `model` against `data`.
    fn evaluate(
        &mut self,
        model: &mut dyn Model,
        data: &dyn DataSource,
        ctx: &mut EvalContext<'_>,
    ) -> Result<BTreeMap<String, f64>>;
    /// What a reader needs to interpret the values, by name: the feature network's id, the
    /// reference split (`feature_network = "fashion_classifier@sha256:1f2e..."`). The trainer
    /// records it beside the values (summary, `nash eval`, report). Called after `evaluate`.
    fn provenance(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}

/// Serializable description of a [`Metric`]; `type = "mode_coverage"` in pipeline files.
#[typetag::serde(tag = "type")]
pub trait MetricConfig: std::fmt::Debug {
    /// Builds the metric.
    fn build(&self) -> Result<Box<dyn Metric>>;
}
