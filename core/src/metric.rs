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
pub trait MetricConfig: std::fmt::Debug + Send + Sync {
    /// Builds the metric.
    fn build(&self) -> Result<Box<dyn Metric>>;
}

/// The perplexity `exp(−Σ p ln p)` of a histogram of counts (how many equally used categories it
/// amounts to: codebook usage, mode usage); 0 for an empty histogram.
pub fn perplexity(counts: impl IntoIterator<Item = u64>) -> f64 {
    let counts: Vec<u64> = counts.into_iter().filter(|&c| c > 0).collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let entropy: f64 = counts
        .iter()
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    entropy.exp()
}

#[cfg(test)]
mod tests {
    use super::perplexity;

    #[test]
    fn perplexity_counts_equally_used_categories() {
        assert!((perplexity([5, 5, 5, 5]) - 4.0).abs() < 1e-12);
        assert!((perplexity([0, 7, 0, 7, 7]) - 3.0).abs() < 1e-12);
        assert!((perplexity([10, 0, 0]) - 1.0).abs() < 1e-12);
        // exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = 1.7547654...
        assert!((perplexity([3, 1]) - 1.754_765_4).abs() < 1e-6);
        assert_eq!(perplexity([0, 0]), 0.0);
        assert_eq!(perplexity([]), 0.0);
    }
}
