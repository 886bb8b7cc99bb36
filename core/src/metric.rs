//! Metrics: measurements of a model against data (held-out reconstruction error, mode coverage).

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
}

/// Serializable description of a [`Metric`]; `type = "mode_coverage"` in pipeline files.
#[typetag::serde(tag = "type")]
pub trait MetricConfig: std::fmt::Debug {
    /// Builds the metric.
    fn build(&self) -> Result<Box<dyn Metric>>;
}
