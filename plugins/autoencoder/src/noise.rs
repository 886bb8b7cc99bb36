//! Denoising: input corruptions for the dense and convolutional autoencoders.
//!
//! `noise = { type = "gaussian", std = 0.1 }`, `{ type = "masking", p = 0.3 }` or
//! `{ type = "salt_and_pepper", p = 0.1 }` in a model table. The corruption is applied to the
//! encoder's input during training only; the reconstruction target stays the clean input, and
//! evaluation, reconstruction and encoding see clean inputs.

use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::rand::Rng as _;
use nash_core::rand_distr::{Distribution, StandardNormal};
use nash_core::tensor::{matrix_from_vec, Matrix, Rng};
use serde::{Deserialize, Serialize};

/// An input corruption (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NoiseConfig {
    /// Adds `N(0, std²)` to every input value (values are not clipped to the data range).
    Gaussian {
        /// Standard deviation of the added noise, at least 0.
        std: f32,
    },
    /// Sets each input value to 0 with probability `p` (masking noise).
    Masking {
        /// Fraction of values zeroed, in [0, 1].
        p: f32,
    },
    /// With probability `p` sets a value to the data's minimum or maximum (each with probability 1/2).
    SaltAndPepper {
        /// Fraction of values replaced, in [0, 1].
        p: f32,
    },
}

impl NoiseConfig {
    /// Checks the parameters; `path` is the config path used in errors (`model.noise`).
    pub fn validate(&self, path: &str) -> Result<()> {
        match *self {
            NoiseConfig::Gaussian { std } if !(std.is_finite() && std >= 0.0) => Err(Error::config(
                format!("{path}.std"),
                format!("the standard deviation must be finite and at least 0, got {std}"),
            )),
            NoiseConfig::Masking { p } | NoiseConfig::SaltAndPepper { p } if !(0.0..=1.0).contains(&p) => {
                Err(Error::config(
                    format!("{path}.p"),
                    format!("a probability must lie in [0, 1], got {p}"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The corrupted copy of `x`; `range` is the data's `(min, max)` (salt and pepper values).
    pub fn corrupt(&self, x: &Matrix, range: (f32, f32), rng: &mut Rng) -> Result<Matrix> {
        let (rows, cols) = *x.shape();
        let mut values = x.as_vec();
        match *self {
            NoiseConfig::Gaussian { std } => {
                for v in &mut values {
                    let e: f32 = StandardNormal.sample(rng);
                    *v += std * e;
                }
            }
            NoiseConfig::Masking { p } => {
                for v in &mut values {
                    if rng.gen::<f32>() < p {
                        *v = 0.0;
                    }
                }
            }
            NoiseConfig::SaltAndPepper { p } => {
                for v in &mut values {
                    if rng.gen::<f32>() < p {
                        *v = if rng.gen_bool(0.5) { range.1 } else { range.0 };
                    }
                }
            }
        }
        matrix_from_vec(x.device(), values, rows, cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::Device;

    /// 20,000 values spread over (0.1, 0.9): the statistics below are tested on these.
    fn clean(device: &Device) -> Matrix {
        let values: Vec<f32> = (0..20_000)
            .map(|i| 0.1 + 0.8 * ((i * 37) % 1000) as f32 / 1000.0)
            .collect();
        device.tensor_from_vec(values, (200, 100))
    }

    #[test]
    fn gaussian_noise_has_the_configured_moments() {
        let device = Device::default();
        let x = clean(&device);
        let mut rng = Rng::seed_from_u64(0);
        let y = NoiseConfig::Gaussian { std: 0.3 }
            .corrupt(&x, (0.0, 1.0), &mut rng)
            .unwrap();
        let d: Vec<f64> = y
            .as_vec()
            .iter()
            .zip(x.as_vec())
            .map(|(&a, b)| (a - b) as f64)
            .collect();
        let n = d.len() as f64;
        let mean = d.iter().sum::<f64>() / n;
        let std = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        // Standard errors: 0.3/√20000 ≈ 0.002 for the mean, ≈ 0.0015 for the std.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((std - 0.3).abs() < 0.01, "std {std}");
    }

    #[test]
    fn masking_zeroes_the_configured_fraction() {
        let device = Device::default();
        let x = clean(&device);
        let mut rng = Rng::seed_from_u64(1);
        let y = NoiseConfig::Masking { p: 0.25 }
            .corrupt(&x, (0.0, 1.0), &mut rng)
            .unwrap();
        let (xs, ys) = (x.as_vec(), y.as_vec());
        let zeroed = ys.iter().filter(|&&v| v == 0.0).count() as f64 / ys.len() as f64;
        // Binomial standard error √(0.25·0.75/20000) ≈ 0.003.
        assert!((zeroed - 0.25).abs() < 0.015, "{zeroed}");
        assert!(
            xs.iter().zip(&ys).all(|(a, b)| *b == 0.0 || a == b),
            "kept values are unchanged"
        );
    }

    #[test]
    fn salt_and_pepper_uses_the_data_range() {
        let device = Device::default();
        let x = clean(&device);
        let mut rng = Rng::seed_from_u64(2);
        let y = NoiseConfig::SaltAndPepper { p: 0.2 }
            .corrupt(&x, (-1.0, 1.0), &mut rng)
            .unwrap();
        let (xs, ys) = (x.as_vec(), y.as_vec());
        let n = ys.len() as f64;
        let low = ys.iter().filter(|&&v| v == -1.0).count() as f64 / n;
        let high = ys.iter().filter(|&&v| v == 1.0).count() as f64 / n;
        assert!((low - 0.1).abs() < 0.01 && (high - 0.1).abs() < 0.01, "{low} {high}");
        assert!(xs.iter().zip(&ys).all(|(a, b)| b.abs() == 1.0 || a == b));
    }

    #[test]
    fn parses_and_validates_with_paths() {
        let cfg: NoiseConfig = nash_core::serde_json::from_str(r#"{"type": "salt_and_pepper", "p": 0.1}"#).unwrap();
        assert_eq!(cfg, NoiseConfig::SaltAndPepper { p: 0.1 });
        assert!(nash_core::serde_json::from_str::<NoiseConfig>(r#"{"type": "masking", "q": 0.1}"#).is_err());
        let err = NoiseConfig::Masking { p: 1.5 }
            .validate("model.noise")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.noise.p") && err.contains("[0, 1]"), "{err}");
        let err = NoiseConfig::Gaussian { std: -1.0 }
            .validate("model.noise")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.noise.std"), "{err}");
    }
}
