//! `elbo`: the evidence lower bound of a variational autoencoder over a whole split.
//!
//! Runs [`Model::evaluate`] on every batch of a split (the test split by default) from
//! [`eval_batches`] and averages, weighting each batch by its number of samples (the last batch
//! may be smaller), what the model reports per batch as the mean over its samples:
//!
//! - `negative_elbo`: the mean of `loss/elbo`, the negative ELBO in nats per sample
//!   (reconstruction negative log-likelihood + KL(q(z|x) ‖ p(z)); lower is better);
//! - `reconstruction_nats` and `kl_nats`: the means of `loss/reconstruction` and `loss/kl`, when
//!   the model reports them on every batch (the `vae` and `conv_vae` models do);
//! - `bits_per_dim` = `negative_elbo / (D · ln 2)`, `D` the number of values per sample. For
//!   continuous data under a density model this is a density, not a code length.
//!
//! The `vae` / `conv_vae` evaluation draws one posterior sample per data sample from the
//! evaluation generator, so the value is a single-sample Monte Carlo estimate of the bound (not an
//! importance-weighted log-likelihood). A model whose `evaluate` reports no `loss/elbo` is refused.
//!
//! ```toml
//! [[metrics]]
//! type = "elbo"
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

/// Configuration of [`Elbo`]: the split and batch size ([`SplitConfig`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ElboConfig(pub SplitConfig);

#[typetag::serde(name = "elbo")]
impl MetricConfig for ElboConfig {
    fn build(&self) -> Result<Box<dyn Metric>> {
        self.0.check("elbo")?;
        Ok(Box::new(Elbo { config: *self }))
    }
}

/// The negative ELBO, its two terms and bits per dimension over a split (see the module docs).
#[derive(Clone, Debug)]
pub struct Elbo {
    config: ElboConfig,
}

/// The per-batch keys averaged, and the names they are reported under.
const TERMS: [(&str, &str); 3] = [
    ("loss/elbo", "negative_elbo"),
    ("loss/reconstruction", "reconstruction_nats"),
    ("loss/kl", "kl_nats"),
];

impl Metric for Elbo {
    fn name(&self) -> &str {
        "elbo"
    }

    fn evaluate(
        &mut self,
        model: &mut dyn Model,
        data: &dyn DataSource,
        ctx: &mut EvalContext<'_>,
    ) -> Result<BTreeMap<String, f64>> {
        let split = self.config.0.split;
        require_split("elbo", data, split)?;
        // Sample-weighted sums, and how many batches reported each term.
        let mut sums = [0.0f64; 3];
        let mut reported = [0usize; 3];
        let (mut samples, mut batches) = (0usize, 0usize);
        for batch in eval_batches(data, split, self.config.0.batch_size, ctx.device)? {
            let values = model.evaluate(&batch, ctx)?;
            if !values.contains_key(TERMS[0].0) {
                return Err(Error::unsupported(
                    "the `elbo` metric",
                    format!(
                        "the `{}` model's evaluation reports no `loss/elbo` (it reports {:?}); the ELBO is \
                         reported by variational autoencoders (`vae`, `conv_vae`)",
                        model.family(),
                        values.keys().collect::<Vec<_>>()
                    ),
                ));
            }
            let n = batch.len();
            for (i, (key, _)) in TERMS.iter().enumerate() {
                if let Some(v) = values.get(*key) {
                    sums[i] += v * n as f64;
                    reported[i] += 1;
                }
            }
            samples += n;
            batches += 1;
        }
        let mut out = BTreeMap::new();
        for (i, (_, name)) in TERMS.iter().enumerate() {
            if reported[i] == batches {
                out.insert(name.to_string(), sums[i] / samples as f64);
            }
        }
        let dims = data.info().sample_shape.numel() as f64;
        out.insert(
            "bits_per_dim".into(),
            out["negative_elbo"] / (dims * std::f64::consts::LN_2),
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests_support::{FakeData, FakeModel};
    use nash_core::data::Batch;
    use nash_core::data::Split;
    use nash_core::model::{StepReport, TrainContext};
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{Device, Param, Parameterized, Rng};

    /// A model whose evaluation of a batch reports, as per-sample means, `loss/elbo` = the mean of
    /// the batch's first features, `loss/reconstruction` = 3/4 of it and `loss/kl` = 1/4 of it.
    struct MeanElbo {
        batch_sizes: Vec<usize>,
    }

    impl Parameterized for MeanElbo {
        fn named_params(&self) -> Vec<(String, &Param)> {
            Vec::new()
        }
        fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
            Vec::new()
        }
    }

    impl Model for MeanElbo {
        fn family(&self) -> &str {
            "mean_elbo"
        }
        fn describe(&self) -> String {
            "mean elbo".into()
        }
        fn param_groups(&self) -> Vec<String> {
            Vec::new()
        }
        fn train_step(&mut self, _batch: &Batch, _ctx: &mut TrainContext<'_>) -> Result<StepReport> {
            Err(Error::unsupported("training", "a test model"))
        }
        fn evaluate(&mut self, batch: &Batch, _ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
            self.batch_sizes.push(batch.len());
            let cols = batch.shape.numel();
            let firsts: Vec<f64> = batch.inputs.as_vec().chunks(cols).map(|r| r[0] as f64).collect();
            let mean = firsts.iter().sum::<f64>() / firsts.len() as f64;
            Ok(BTreeMap::from([
                ("loss/elbo".to_string(), mean),
                ("loss/reconstruction".to_string(), 0.75 * mean),
                ("loss/kl".to_string(), 0.25 * mean),
            ]))
        }
    }

    fn run(cfg: ElboConfig, model: &mut dyn Model, data: &FakeData) -> Result<BTreeMap<String, f64>> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        cfg.build()?.evaluate(model, data, &mut ctx)
    }

    #[test]
    fn sample_weighted_mean_over_every_batch() {
        // Five test samples of two features whose first features are 1, 2, 3, 4, 10. Batches of
        // 2: means 1.5, 3.5 and 10 over 2, 2 and 1 samples. The sample-weighted mean is the mean of
        // all five, (1 + 2 + 3 + 4 + 10) / 5 = 4; an unweighted mean of batch means would be 5.
        let data = FakeData::plain(vec![1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0, 10.0, 0.0], 2);
        let mut model = MeanElbo {
            batch_sizes: Vec::new(),
        };
        let cfg = ElboConfig(SplitConfig {
            batch_size: 2,
            ..Default::default()
        });
        let m = run(cfg, &mut model, &data).unwrap();
        assert_eq!(model.batch_sizes, [2, 2, 1]);
        assert!((m["negative_elbo"] - 4.0).abs() < 1e-12, "{m:?}");
        assert!((m["reconstruction_nats"] - 3.0).abs() < 1e-12, "{m:?}");
        assert!((m["kl_nats"] - 1.0).abs() < 1e-12, "{m:?}");
        // 4 nats over 2 dimensions: 4 / (2 ln 2) = 2.8853900817779268 bits per dimension.
        assert!((m["bits_per_dim"] - 2.885_390_081_777_926_8).abs() < 1e-12, "{m:?}");
        // The train split (the first three samples): (1 + 2 + 3) / 3 = 2.
        let train = ElboConfig(SplitConfig {
            split: Split::Train,
            ..Default::default()
        });
        let m = run(train, &mut model, &data).unwrap();
        assert!((m["negative_elbo"] - 2.0).abs() < 1e-12, "{m:?}");
    }

    #[test]
    fn models_without_an_elbo_are_refused() {
        let data = FakeData::plain(vec![1.0, 2.0], 2);
        let mut model = FakeModel::reconstructor(|x| x.to_vec());
        let err = run(ElboConfig::default(), &mut model, &data).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("`fake` model") && text.contains("loss/elbo") && text.contains("vae"),
            "{text}"
        );
        let zero = ElboConfig(SplitConfig {
            batch_size: 0,
            ..Default::default()
        });
        assert!(matches!(zero.build(), Err(Error::Config { .. })));
        let empty = FakeData::plain(Vec::new(), 2);
        assert!(run(ElboConfig::default(), &mut model, &empty).is_err());
    }
}
