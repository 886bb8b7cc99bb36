//! `codebook_usage`: how much of a discrete autoencoder's codebook a whole split uses.
//!
//! Runs [`Model::latent_codes`] on every batch of a split (the test split by default) from
//! [`eval_batches`], accumulates one histogram of code indices over the whole split, and reports
//!
//! - `codebook_perplexity` = `exp(−Σ_k p_k ln p_k)`, `p_k` the share of all code assignments that
//!   went to code `k`: the number of equally used codes the usage amounts to (1 when one code takes
//!   everything, the codebook size when all are used equally);
//! - `codes_used`: the number of distinct codes assigned at least once;
//! - `code_assignments`: the number of assignments (samples × code vectors per sample).
//!
//! The `vq_vae` model's own `codebook/perplexity` (logged per training step and per evaluation
//! batch) is computed from one batch's histogram; a batch of B samples with V vectors each can show
//! at most B·V codes, and codes used by other batches are not counted, so that per-batch value
//! underestimates the usage of the whole split. This metric is the split-wide figure. Models
//! without a codebook (no `latent_codes`) are refused.
//!
//! ```toml
//! [[metrics]]
//! type = "codebook_usage"
//! split = "test"      # or "train"
//! batch_size = 256
//! ```

use std::collections::BTreeMap;

use nash_core::data::{eval_batches, DataSource};
use nash_core::error::{Error, Result};
use nash_core::metric::{Metric, MetricConfig};
use nash_core::model::{EvalContext, Model};
use serde::{Deserialize, Serialize};

use crate::{require_split, SplitConfig};

/// Configuration of [`CodebookUsage`]: the split and batch size ([`SplitConfig`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CodebookUsageConfig(pub SplitConfig);

#[typetag::serde(name = "codebook_usage")]
impl MetricConfig for CodebookUsageConfig {
    fn build(&self) -> Result<Box<dyn Metric>> {
        self.0.check("codebook_usage")?;
        Ok(Box::new(CodebookUsage { config: *self }))
    }
}

/// Split-wide codebook perplexity, codes used and assignments (see the module docs).
#[derive(Clone, Debug)]
pub struct CodebookUsage {
    config: CodebookUsageConfig,
}

/// `exp(−Σ p ln p)` of a histogram of code counts (0 for an empty histogram).
pub fn perplexity(counts: &BTreeMap<usize, u64>) -> f64 {
    nash_core::metric::perplexity(counts.values().copied())
}

impl Metric for CodebookUsage {
    fn name(&self) -> &str {
        "codebook_usage"
    }

    fn evaluate(
        &mut self,
        model: &mut dyn Model,
        data: &dyn DataSource,
        ctx: &mut EvalContext<'_>,
    ) -> Result<BTreeMap<String, f64>> {
        let split = self.config.0.split;
        require_split("codebook_usage", data, split)?;
        let mut counts: BTreeMap<usize, u64> = BTreeMap::new();
        for batch in eval_batches(data, split, self.config.0.batch_size, ctx.device)? {
            let codes = model.latent_codes(&batch, ctx)?.ok_or_else(|| {
                Error::unsupported(
                    "the `codebook_usage` metric",
                    format!(
                        "the `{}` model has no discrete codes (`latent_codes`); codebook usage is reported by \
                         vector-quantized models (`vq_vae`)",
                        model.family()
                    ),
                )
            })?;
            for code in codes {
                *counts.entry(code).or_default() += 1;
            }
        }
        let assignments: u64 = counts.values().sum();
        if assignments == 0 {
            return Err(Error::unsupported(
                "the `codebook_usage` metric",
                format!(
                    "the `{}` model assigned no codes to the {split:?} split",
                    model.family()
                ),
            ));
        }
        Ok(BTreeMap::from([
            ("codebook_perplexity".to_string(), perplexity(&counts)),
            ("codes_used".to_string(), counts.len() as f64),
            ("code_assignments".to_string(), assignments as f64),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests_support::{FakeData, FakeModel};
    use nash_core::data::Batch;
    use nash_core::model::{StepReport, TrainContext};
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{Device, Param, Parameterized, Rng};

    /// A model with two code vectors per sample: the sample's two features, as code indices.
    struct FeatureCodes {
        calls: usize,
    }

    impl Parameterized for FeatureCodes {
        fn named_params(&self) -> Vec<(String, &Param)> {
            Vec::new()
        }
        fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
            Vec::new()
        }
    }

    impl Model for FeatureCodes {
        fn family(&self) -> &str {
            "feature_codes"
        }
        fn describe(&self) -> String {
            "feature codes".into()
        }
        fn param_groups(&self) -> Vec<String> {
            Vec::new()
        }
        fn train_step(&mut self, _batch: &Batch, _ctx: &mut TrainContext<'_>) -> Result<StepReport> {
            Err(Error::unsupported("training", "a test model"))
        }
        fn evaluate(&mut self, _batch: &Batch, _ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
            Ok(BTreeMap::new())
        }
        fn latent_codes(&mut self, batch: &Batch, _ctx: &mut EvalContext<'_>) -> Result<Option<Vec<usize>>> {
            self.calls += 1;
            Ok(Some(batch.inputs.as_vec().iter().map(|&v| v as usize).collect()))
        }
    }

    fn run(cfg: CodebookUsageConfig, model: &mut dyn Model, data: &FakeData) -> Result<BTreeMap<String, f64>> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        cfg.build()?.evaluate(model, data, &mut ctx)
    }

    #[test]
    fn split_wide_histogram_by_hand() {
        // Four samples of two codes each, in batches of one: codes 0 0 | 1 1 | 2 2 | 3 0. Each
        // batch alone has perplexity 1 or 2, but the split uses codes 0, 1, 2, 3 with counts
        // 3, 2, 2, 1 of 8: exp(-Σ p ln p) = exp(-(3/8 ln 3/8 + 2·2/8 ln 2/8 + 1/8 ln 1/8))
        // python: import math; math.exp(-sum(c/8 * math.log(c/8) for c in [3, 2, 2, 1]))
        //         # 3.7467482975009925
        let data = FakeData::plain(vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 0.0], 2);
        let mut model = FeatureCodes { calls: 0 };
        let cfg = CodebookUsageConfig(SplitConfig {
            batch_size: 1,
            ..Default::default()
        });
        let m = run(cfg, &mut model, &data).unwrap();
        assert_eq!(model.calls, 4);
        assert!(
            (m["codebook_perplexity"] - 3.746_748_297_500_992_5).abs() < 1e-12,
            "{m:?}"
        );
        assert_eq!(m["codes_used"], 4.0);
        assert_eq!(m["code_assignments"], 8.0);
        // Equal use of k codes gives perplexity k; one code gives 1.
        assert!((perplexity(&BTreeMap::from([(4, 5), (9, 5), (11, 5)])) - 3.0).abs() < 1e-12);
        assert_eq!(perplexity(&BTreeMap::from([(7, 12)])), 1.0);
        assert_eq!(perplexity(&BTreeMap::new()), 0.0);
    }

    #[test]
    fn models_without_codes_are_refused() {
        let data = FakeData::plain(vec![1.0, 2.0], 2);
        let mut model = FakeModel::reconstructor(|x| x.to_vec());
        let err = run(CodebookUsageConfig::default(), &mut model, &data).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("`fake` model") && text.contains("vq_vae"), "{text}");
        let zero = CodebookUsageConfig(SplitConfig {
            batch_size: 0,
            ..Default::default()
        });
        assert!(matches!(zero.build(), Err(Error::Config { .. })));
    }
}
