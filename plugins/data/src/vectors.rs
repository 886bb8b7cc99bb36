//! `random_vectors`: i.i.d. random vectors, a baseline with no structure to learn.

use nash_core::data::{DataSource, DataSourceConfig};
use nash_core::error::{Error, Result};
use nash_core::rand::{Rng as _, SeedableRng};
use nash_core::rand_distr::{Distribution, StandardNormal};
use nash_core::tensor::{FeatureShape, Rng};
use serde::{Deserialize, Serialize};

use crate::table::{check_positive, check_sizes, InMemoryData, Table};
use crate::Scale;

/// The distribution of every coordinate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VectorDistribution {
    /// Uniform over the range given by `scale`.
    #[default]
    Uniform,
    /// Normal N(0, std²).
    Normal,
}

/// i.i.d. vectors of `dim` coordinates. `uniform` draws from [0, 1] or [-1, 1] (`scale`), and reports
/// that range; `normal` draws from N(0, std²) (`scale` does not apply) and reports the observed
/// minimum and maximum as the value range.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RandomVectorsConfig {
    /// Coordinates per vector.
    pub dim: usize,
    /// `uniform` or `normal`.
    pub distribution: VectorDistribution,
    /// Range of uniform vectors: `unit` [0, 1] or `symmetric` [-1, 1].
    pub scale: Scale,
    /// Standard deviation of normal vectors.
    pub std: f32,
    /// Training samples.
    pub train_samples: usize,
    /// Test samples.
    pub test_samples: usize,
}

impl Default for RandomVectorsConfig {
    fn default() -> Self {
        RandomVectorsConfig {
            dim: 16,
            distribution: VectorDistribution::Uniform,
            scale: Scale::Unit,
            std: 1.0,
            train_samples: 10_000,
            test_samples: 1_000,
        }
    }
}

#[typetag::serde(name = "random_vectors")]
impl DataSourceConfig for RandomVectorsConfig {
    fn build(&self, seed: u64) -> Result<Box<dyn DataSource>> {
        if self.dim == 0 {
            return Err(Error::config("data.dim", "must be at least 1"));
        }
        check_positive("data.std", self.std)?;
        check_sizes(self.train_samples, self.test_samples, self.dim)?;
        let mut rng = Rng::seed_from_u64(seed);
        let (lo, hi) = self.scale.range();
        let mut draw = |n: usize| -> Table {
            let values = (0..n * self.dim)
                .map(|_| match self.distribution {
                    VectorDistribution::Uniform => rng.gen_range(lo..=hi),
                    VectorDistribution::Normal => {
                        let e: f32 = StandardNormal.sample(&mut rng);
                        self.std * e
                    }
                })
                .collect();
            Table { values, labels: None }
        };
        let train = draw(self.train_samples);
        let test = draw(self.test_samples);
        let (range, what) = match self.distribution {
            VectorDistribution::Uniform => (Some((lo, hi)), format!("uniform on [{lo}, {hi}]")),
            VectorDistribution::Normal => (None, format!("normal N(0, {}^2)", self.std)),
        };
        let description = format!(
            "random_vectors: {} i.i.d. {what} coordinates, {} train / {} test samples",
            self.dim, self.train_samples, self.test_samples
        );
        Ok(Box::new(InMemoryData::new(
            description,
            FeatureShape::Flat(self.dim),
            range,
            train,
            test,
            None,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::data::Split;
    use nash_core::tensor::Device;

    fn values(data: &dyn DataSource, split: Split) -> Vec<f32> {
        let idx: Vec<usize> = (0..data.len(split)).collect();
        data.batch(split, &idx, &Device::default()).unwrap().inputs.as_vec()
    }

    #[test]
    fn uniform_vectors_fill_their_range() {
        for (scale, lo, hi) in [(Scale::Unit, 0.0, 1.0), (Scale::Symmetric, -1.0, 1.0)] {
            let cfg = RandomVectorsConfig {
                dim: 4,
                scale,
                train_samples: 1_000,
                test_samples: 10,
                ..Default::default()
            };
            let data = cfg.build(2).unwrap();
            assert_eq!(data.info().value_range, (lo, hi));
            assert!(data
                .batch(Split::Train, &[0], &Device::default())
                .unwrap()
                .labels
                .is_none());
            let x = values(data.as_ref(), Split::Train);
            assert_eq!(x.len(), 4_000);
            assert!(x.iter().all(|&v| (lo..=hi).contains(&v)));
            let mean = x.iter().sum::<f32>() / x.len() as f32;
            assert!((mean - (lo + hi) / 2.0).abs() < 0.03, "mean {mean}");
        }
    }

    #[test]
    fn normal_vectors_have_the_requested_std_and_observed_range() {
        let cfg = RandomVectorsConfig {
            dim: 8,
            distribution: VectorDistribution::Normal,
            std: 2.0,
            train_samples: 1_000,
            test_samples: 100,
            ..Default::default()
        };
        let data = cfg.build(11).unwrap();
        let mut x = values(data.as_ref(), Split::Train);
        let var = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
        x.extend(values(data.as_ref(), Split::Test));
        let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(data.info().value_range, (lo, hi));
        assert_ne!(
            values(data.as_ref(), Split::Test),
            values(cfg.build(12).unwrap().as_ref(), Split::Test)
        );
    }

    #[test]
    fn zero_dim_is_refused() {
        let cfg = RandomVectorsConfig {
            dim: 0,
            ..Default::default()
        };
        assert!(matches!(cfg.build(0), Err(Error::Config { path, .. }) if path == "data.dim"));
    }
}
