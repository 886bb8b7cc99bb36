//! `reconstruction_error`: how well an autoencoder reproduces held-out data.
//!
//! Runs [`Model::reconstruct`] over every sample of a split (the test split by default) in order, in
//! batches from [`eval_batches`], and reports over all samples and features
//! `reconstruction_mse` = mean (x̂ - x)² and `reconstruction_mae` = mean |x̂ - x|, accumulated in f64.

use std::collections::BTreeMap;

use nash_core::data::{eval_batches, DataSource, Split};
use nash_core::error::{Error, Result};
use nash_core::metric::{Metric, MetricConfig};
use nash_core::model::{EvalContext, Model};
use nash_core::prelude::HasShape;
use serde::{Deserialize, Serialize};

/// Configuration of [`ReconstructionError`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconstructionErrorConfig {
    /// The split to measure on.
    pub split: Split,
    /// Samples per reconstruction batch.
    pub batch_size: usize,
}

impl Default for ReconstructionErrorConfig {
    fn default() -> Self {
        ReconstructionErrorConfig {
            split: Split::Test,
            batch_size: 256,
        }
    }
}

#[typetag::serde(name = "reconstruction_error")]
impl MetricConfig for ReconstructionErrorConfig {
    fn build(&self) -> Result<Box<dyn Metric>> {
        if self.batch_size == 0 {
            return Err(Error::config(
                "metrics.reconstruction_error.batch_size",
                "must be at least 1",
            ));
        }
        Ok(Box::new(ReconstructionError { config: self.clone() }))
    }
}

/// Mean squared and mean absolute reconstruction error over a split (see the module docs).
#[derive(Clone, Debug)]
pub struct ReconstructionError {
    config: ReconstructionErrorConfig,
}

impl Metric for ReconstructionError {
    fn name(&self) -> &str {
        "reconstruction_error"
    }

    fn evaluate(
        &mut self,
        model: &mut dyn Model,
        data: &dyn DataSource,
        ctx: &mut EvalContext<'_>,
    ) -> Result<BTreeMap<String, f64>> {
        let split = self.config.split;
        if data.len(split) == 0 {
            return Err(Error::unsupported(
                "the `reconstruction_error` metric",
                format!("the {split:?} split of `{}` is empty", data.describe()),
            ));
        }
        let (mut squared, mut absolute, mut count) = (0.0f64, 0.0f64, 0usize);
        for batch in eval_batches(data, split, self.config.batch_size, ctx.device)? {
            let recon = model.reconstruct(&batch, ctx)?.ok_or_else(|| {
                Error::unsupported(
                    "the `reconstruction_error` metric",
                    format!("the `{}` model cannot reconstruct its inputs", model.family()),
                )
            })?;
            if recon.shape() != batch.inputs.shape() {
                return Err(Error::shape(
                    "reconstruction_error: reconstructions",
                    format!("{:?}, like the inputs", batch.inputs.shape()),
                    format!("{:?}", recon.shape()),
                ));
            }
            for (r, x) in recon.as_vec().into_iter().zip(batch.inputs.as_vec()) {
                let e = r as f64 - x as f64;
                squared += e * e;
                absolute += e.abs();
                count += 1;
            }
        }
        let mut out = BTreeMap::new();
        out.insert("reconstruction_mse".into(), squared / count as f64);
        out.insert("reconstruction_mae".into(), absolute / count as f64);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests_support::{FakeData, FakeModel};
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{Device, Rng};

    fn run(cfg: ReconstructionErrorConfig, model: &mut FakeModel, data: &FakeData) -> Result<BTreeMap<String, f64>> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        cfg.build()?.evaluate(model, data, &mut ctx)
    }

    #[test]
    fn errors_over_the_whole_test_split_by_hand() {
        // Five test samples of two features; the fake model reconstructs every input as 0, so the
        // errors are the inputs themselves:
        // mse = (1 + 4 + 0 + 1 + 9 + 16 + 0.25 + 0.25 + 4 + 0) / 10 = 3.55
        // mae = (1 + 2 + 0 + 1 + 3 + 4 + 0.5 + 0.5 + 2 + 0) / 10 = 1.4
        let test = vec![1.0, -2.0, 0.0, 1.0, 3.0, -4.0, 0.5, -0.5, 2.0, 0.0];
        let data = FakeData::plain(test, 2);
        let mut model = FakeModel::reconstructor(|x| vec![0.0; x.len()]);
        // Batches of 2: 2 + 2 + 1 samples; every sample counts once.
        let cfg = ReconstructionErrorConfig {
            batch_size: 2,
            ..Default::default()
        };
        let m = run(cfg, &mut model, &data).unwrap();
        assert!((m["reconstruction_mse"] - 3.55).abs() < 1e-9, "{m:?}");
        assert!((m["reconstruction_mae"] - 1.4).abs() < 1e-9, "{m:?}");
        assert_eq!(model.reconstructed_rows, 5);
        // A perfect reconstruction scores 0; the train split is measured when asked.
        let mut identity = FakeModel::reconstructor(|x| x.to_vec());
        let m = run(ReconstructionErrorConfig::default(), &mut identity, &data).unwrap();
        assert_eq!(m["reconstruction_mse"], 0.0);
        let mut shift = FakeModel::reconstructor(|x| x.iter().map(|v| v + 0.5).collect());
        let train = ReconstructionErrorConfig {
            split: Split::Train,
            ..Default::default()
        };
        let m = run(train, &mut shift, &data).unwrap();
        assert!((m["reconstruction_mse"] - 0.25).abs() < 1e-9 && (m["reconstruction_mae"] - 0.5).abs() < 1e-9);
        assert_eq!(shift.reconstructed_rows, 3);
    }

    #[test]
    fn models_that_cannot_reconstruct_are_refused() {
        let data = FakeData::plain(vec![1.0, 2.0], 2);
        let mut model = FakeModel::sampler(vec![0.0, 0.0], 2);
        let err = run(ReconstructionErrorConfig::default(), &mut model, &data).unwrap_err();
        assert!(err.to_string().contains("cannot reconstruct"), "{err}");
        let mut wrong = FakeModel::reconstructor(|x| x[..1].to_vec());
        let err = run(ReconstructionErrorConfig::default(), &mut wrong, &data).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        let zero = ReconstructionErrorConfig {
            batch_size: 0,
            ..Default::default()
        };
        assert!(matches!(zero.build(), Err(Error::Config { .. })));
    }
}
