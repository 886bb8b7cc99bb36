//! `mode_coverage`: the PacGAN mode-collapse protocol (Lin et al. 2018, fjxmlzn/PacGAN,
//! `synthetic_data_experiments/PacGAN/pacgan/extensions.py`, `MetricLogger.do`).
//!
//! Draw `samples` points from the model. Each point is assigned to its nearest mode of the data's
//! [`Mixture`] by the σ-normalized distance `‖x - μ_k‖ / σ`; it is *high quality* if that distance is
//! below `threshold_sigmas` (3, strict `<` as in the reference). Reported:
//!
//! - `modes_captured`: modes with at least one high-quality sample;
//! - `high_quality_share`: high-quality samples / all samples;
//! - `reverse_kl`: KL(p_model ‖ p_data) = Σ_k p_k ln(p_k / q_k) in nats, where `p` is the histogram of
//!   the high-quality samples' modes (normalized over high-quality samples only) and `q` is uniform
//!   over the modes. As in the reference's `KLD`, terms with `p_k = 0` contribute 0 (the convention
//!   0 ln 0 = 0) and no smoothing is applied — none is needed because `q` has no zeros. A model whose
//!   high-quality samples all sit on one of K modes scores ln K; one that matches the uniform
//!   histogram scores 0. With no high-quality sample at all, `p` is undefined (0/0 in the
//!   reference) and `reverse_kl` is reported as NaN;
//! - `num_modes`: the number of modes of the data, for reading `modes_captured`.

use std::collections::BTreeMap;

use nash_core::data::{DataSource, Mixture};
use nash_core::error::{Error, Result};
use nash_core::metric::{Metric, MetricConfig};
use nash_core::model::{EvalContext, Model};
use nash_core::prelude::HasShape;
use serde::{Deserialize, Serialize};

/// Configuration of [`ModeCoverage`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModeCoverageConfig {
    /// Number of generated samples (PacGAN: 2,500).
    pub samples: usize,
    /// A sample is high quality within this many σ of its nearest mode (PacGAN: 3).
    pub threshold_sigmas: f64,
    /// Samples requested from the model per call.
    pub batch_size: usize,
}

impl Default for ModeCoverageConfig {
    fn default() -> Self {
        ModeCoverageConfig {
            samples: 2_500,
            threshold_sigmas: 3.0,
            batch_size: 2_500,
        }
    }
}

#[typetag::serde(name = "mode_coverage")]
impl MetricConfig for ModeCoverageConfig {
    fn build(&self) -> Result<Box<dyn Metric>> {
        if self.samples == 0 {
            return Err(Error::config("metrics.mode_coverage.samples", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::config("metrics.mode_coverage.batch_size", "must be at least 1"));
        }
        if !(self.threshold_sigmas.is_finite() && self.threshold_sigmas > 0.0) {
            return Err(Error::config(
                "metrics.mode_coverage.threshold_sigmas",
                format!("must be a finite number > 0, got {}", self.threshold_sigmas),
            ));
        }
        Ok(Box::new(ModeCoverage { config: self.clone() }))
    }
}

/// The PacGAN mode-coverage metric (see the module docs).
#[derive(Clone, Debug)]
pub struct ModeCoverage {
    config: ModeCoverageConfig,
}

/// Counts per mode of the high-quality samples among `rows` (row-major, `dim` features each).
pub fn high_quality_counts(mixture: &Mixture, rows: &[f32], dim: usize, threshold_sigmas: f64) -> Vec<usize> {
    let mut counts = vec![0usize; mixture.centers.len()];
    let sigma = mixture.sigma as f64;
    for x in rows.chunks(dim) {
        let nearest = mixture
            .centers
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let d2: f64 = x.iter().zip(c).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
                (k, d2)
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((k, d2)) = nearest {
            if d2.sqrt() / sigma < threshold_sigmas {
                counts[k] += 1;
            }
        }
    }
    counts
}

/// KL(p ‖ uniform) in nats for the histogram `counts` (terms with zero count contribute 0); NaN if
/// every count is zero.
pub fn reverse_kl_to_uniform(counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    if total == 0 {
        return f64::NAN;
    }
    let q = 1.0 / counts.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            p * (p / q).ln()
        })
        .sum()
}

impl Metric for ModeCoverage {
    fn name(&self) -> &str {
        "mode_coverage"
    }

    fn evaluate(
        &mut self,
        model: &mut dyn Model,
        data: &dyn DataSource,
        ctx: &mut EvalContext<'_>,
    ) -> Result<BTreeMap<String, f64>> {
        let mixture = data.mixture().ok_or_else(|| {
            Error::unsupported(
                "the `mode_coverage` metric on this data",
                format!(
                    "it needs a Gaussian-mixture data source with known modes (ring, grid, gaussian_mixture), and `{}` has none",
                    data.describe()
                ),
            )
        })?;
        let dim = mixture.centers.first().map(Vec::len).ok_or_else(|| {
            Error::unsupported(
                "the `mode_coverage` metric on this data",
                "the data's mixture has no modes",
            )
        })?;
        let mut counts = vec![0usize; mixture.centers.len()];
        let mut drawn = 0;
        while drawn < self.config.samples {
            let n = self.config.batch_size.min(self.config.samples - drawn);
            let samples = model.sample(n, ctx)?.ok_or_else(|| {
                Error::unsupported(
                    "the `mode_coverage` metric",
                    format!("the `{}` model cannot generate samples", model.family()),
                )
            })?;
            let (rows, cols) = *samples.shape();
            if rows != n || cols != dim {
                return Err(Error::shape(
                    "mode_coverage: generated samples",
                    format!("{n} samples of {dim} features, like the data's modes"),
                    format!("{rows} x {cols}"),
                ));
            }
            let c = high_quality_counts(mixture, &samples.as_vec(), dim, self.config.threshold_sigmas);
            counts.iter_mut().zip(c).for_each(|(a, b)| *a += b);
            drawn += n;
        }
        let high_quality: usize = counts.iter().sum();
        let mut out = BTreeMap::new();
        out.insert(
            "modes_captured".into(),
            counts.iter().filter(|&&c| c > 0).count() as f64,
        );
        out.insert("high_quality_share".into(), high_quality as f64 / drawn as f64);
        out.insert("reverse_kl".into(), reverse_kl_to_uniform(&counts));
        out.insert("num_modes".into(), counts.len() as f64);
        Ok(out)
    }

    /// The reference (the data's known mixture modes, not a data split), the number of generated
    /// samples and the high-quality threshold.
    fn provenance(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("reference".to_string(), "the data's mixture modes".to_string()),
            ("samples".to_string(), self.config.samples.to_string()),
            ("threshold_sigmas".to_string(), self.config.threshold_sigmas.to_string()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests_support::{FakeData, FakeModel};
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{Device, Rng};

    /// Four modes at (±1, 0), (0, ±1), σ = 0.1.
    fn four_modes() -> Mixture {
        Mixture {
            centers: vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![-1.0, 0.0], vec![0.0, -1.0]],
            sigma: 0.1,
        }
    }

    fn run(cfg: ModeCoverageConfig, model: &mut FakeModel, data: &FakeData) -> Result<BTreeMap<String, f64>> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        cfg.build()?.evaluate(model, data, &mut ctx)
    }

    fn cfg(samples: usize, batch_size: usize) -> ModeCoverageConfig {
        ModeCoverageConfig {
            samples,
            batch_size,
            ..Default::default()
        }
    }

    #[test]
    fn a_perfect_sampler_captures_every_mode() {
        let data = FakeData::mixture(four_modes());
        let rows = four_modes().centers.concat();
        let mut model = FakeModel::sampler(rows, 2);
        // 400 samples in batches of 150 (the last one smaller), cycling through the four centers.
        let m = run(cfg(400, 150), &mut model, &data).unwrap();
        assert_eq!(m["modes_captured"], 4.0);
        assert_eq!(m["num_modes"], 4.0);
        assert_eq!(m["high_quality_share"], 1.0);
        assert!(m["reverse_kl"].abs() < 1e-12);
        assert_eq!(model.sample_calls, vec![150, 150, 100]);
    }

    #[test]
    fn a_collapsed_sampler_captures_one_mode() {
        let data = FakeData::mixture(four_modes());
        let mut model = FakeModel::sampler(vec![0.02, 1.03], 2);
        let m = run(cfg(100, 100), &mut model, &data).unwrap();
        assert_eq!(m["modes_captured"], 1.0);
        assert_eq!(m["high_quality_share"], 1.0);
        // KL(delta_k || uniform over 4) = ln 4.
        assert!((m["reverse_kl"] - 4f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn values_by_hand() {
        let data = FakeData::mixture(four_modes());
        // Three samples on mode 0 (one at 2.9 sigma), one on mode 1, one at 3.1 sigma from mode 2
        // (not high quality), one far from every mode.
        let rows = vec![1.0, 0.0, 1.29, 0.0, 1.0, -0.05, 0.0, 0.98, -0.69, 0.0, 5.0, 5.0];
        let mut model = FakeModel::sampler(rows, 2);
        let m = run(cfg(6, 6), &mut model, &data).unwrap();
        assert_eq!(m["modes_captured"], 2.0);
        assert!((m["high_quality_share"] - 4.0 / 6.0).abs() < 1e-12);
        // p = (3/4, 1/4, 0, 0), q = 1/4: KL = 3/4 ln 3 + 1/4 ln 1 = 0.8239592165010822.
        assert!(
            (m["reverse_kl"] - 0.823_959_216_501_082_2).abs() < 1e-12,
            "{}",
            m["reverse_kl"]
        );
        assert_eq!(
            high_quality_counts(&four_modes(), &[1.31, 0.0], 2, 3.0),
            vec![0, 0, 0, 0]
        );
        assert!(reverse_kl_to_uniform(&[0, 0, 0]).is_nan());
    }

    #[test]
    fn clear_errors_without_a_mixture_or_a_sampler() {
        let mut model = FakeModel::sampler(vec![0.0, 0.0], 2);
        let err = run(cfg(10, 10), &mut model, &FakeData::plain(vec![0.0; 4], 2)).unwrap_err();
        assert!(err.to_string().contains("Gaussian-mixture"), "{err}");
        let mut model = FakeModel::reconstructor(|x| x.to_vec());
        let err = run(cfg(10, 10), &mut model, &FakeData::mixture(four_modes())).unwrap_err();
        assert!(err.to_string().contains("cannot generate"), "{err}");
        let mut model = FakeModel::sampler(vec![0.0, 0.0, 0.0], 3);
        let err = run(cfg(10, 10), &mut model, &FakeData::mixture(four_modes())).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        assert!(matches!(cfg(0, 1).build(), Err(Error::Config { .. })));
        let bad = ModeCoverageConfig {
            threshold_sigmas: -1.0,
            ..Default::default()
        };
        assert!(matches!(bad.build(), Err(Error::Config { path, .. }) if path.ends_with("threshold_sigmas")));
    }
}
