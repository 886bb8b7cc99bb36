//! Instance noise: Gaussian noise with an annealed σ on every discriminator input.

use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::model::StepReport;
use nash_core::rand_distr::{Distribution, StandardNormal};
use nash_core::registry::Registry;
use nash_core::stabilizer::{HookContext, InputRole, Stabilizer, StabilizerConfig};
use nash_core::tensor::Activation;
use serde::{Deserialize, Serialize};

use crate::scope::require_positive;

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.stabilizer::<InstanceNoiseConfig>(
        "instance noise (Sønderby et al. 2016): add N(0, σ_t²) to real and fake discriminator inputs, σ_t annealed",
    )?;
    Ok(())
}

/// How σ goes from `sigma` to `final_sigma` over `anneal_steps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Anneal {
    /// `σ_t = sigma + (final_sigma - sigma) * min(t / anneal_steps, 1)`.
    Linear,
    /// Geometric: `σ_t = sigma * (final_sigma / sigma)^min(t / anneal_steps, 1)`; needs `final_sigma > 0`.
    Exponential,
}

/// Instance noise (Sønderby et al. 2016, "Amortised MAP inference for image super-resolution";
/// Arjovsky & Bottou 2017, "Towards principled methods for training GANs"): every discriminator
/// input, real and fake, in the discriminator's and the generator's updates, gets independent
/// N(0, σ_t²) noise, so that the two distributions overlap and the discriminator cannot separate
/// them perfectly. σ_t is annealed from `sigma` at step 0 to `final_sigma` at step `anneal_steps`
/// (then stays there). The noise is a constant added to the taped input, so gradients flow through
/// it to the generator unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceNoiseConfig {
    /// σ at step 0.
    pub sigma: f32,
    /// σ from step `anneal_steps` on.
    pub final_sigma: f32,
    /// Steps over which σ is annealed (≥ 1; for a constant σ set `final_sigma = sigma`).
    pub anneal_steps: u64,
    /// `linear` or `exponential`.
    pub schedule: Anneal,
}

impl Default for InstanceNoiseConfig {
    fn default() -> Self {
        InstanceNoiseConfig {
            sigma: 0.1,
            final_sigma: 0.0,
            anneal_steps: 10_000,
            schedule: Anneal::Linear,
        }
    }
}

impl InstanceNoiseConfig {
    /// σ_t at step `step`.
    pub fn sigma_at(&self, step: u64) -> f32 {
        let frac = (step as f64 / self.anneal_steps as f64).min(1.0);
        let (s0, s1) = (self.sigma as f64, self.final_sigma as f64);
        let s = match self.schedule {
            Anneal::Linear => s0 + (s1 - s0) * frac,
            Anneal::Exponential => s0 * (s1 / s0).powf(frac),
        };
        s as f32
    }
}

#[typetag::serde(name = "instance_noise")]
impl StabilizerConfig for InstanceNoiseConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        require_positive("stabilizers.instance_noise.sigma", self.sigma)?;
        if !(self.final_sigma.is_finite() && self.final_sigma >= 0.0) {
            return Err(Error::config(
                "stabilizers.instance_noise.final_sigma",
                format!("must be a finite number >= 0, got {}", self.final_sigma),
            ));
        }
        if self.anneal_steps == 0 {
            return Err(Error::config(
                "stabilizers.instance_noise.anneal_steps",
                "must be at least 1; for a constant σ set final_sigma equal to sigma",
            ));
        }
        if self.schedule == Anneal::Exponential && self.final_sigma == 0.0 {
            return Err(Error::config(
                "stabilizers.instance_noise.final_sigma",
                "an exponential schedule never reaches 0: set final_sigma > 0 (e.g. 0.001), or use schedule = \"linear\"",
            ));
        }
        Ok(Box::new(InstanceNoise {
            config: self.clone(),
            last_sigma: None,
        }))
    }
}

/// See [`InstanceNoiseConfig`].
#[derive(Clone, Debug)]
pub struct InstanceNoise {
    config: InstanceNoiseConfig,
    /// σ used in the current step, for the diagnostic.
    last_sigma: Option<f32>,
}

impl Stabilizer for InstanceNoise {
    fn name(&self) -> &str {
        "instance_noise"
    }

    fn transform_input(
        &mut self,
        _role: InputRole,
        input: Activation,
        ctx: &mut HookContext<'_>,
    ) -> Result<Activation> {
        let sigma = self.config.sigma_at(ctx.step);
        self.last_sigma = Some(sigma);
        if sigma == 0.0 {
            return Ok(input);
        }
        let shape = *input.value.shape();
        let noise: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| sigma * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, ctx.rng))
            .collect();
        let noise = ctx.device.tensor_from_vec(noise, shape);
        Activation::new(input.value + noise, input.shape)
    }

    fn end_step(&mut self, report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        if let Some(sigma) = self.last_sigma.take() {
            report.diagnostic("instance_noise/sigma", sigma as f64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{matrix_from_vec, Device, FeatureShape, Rng};

    fn ctx<'a>(step: u64, device: &'a Device, rng: &'a mut Rng) -> HookContext<'a> {
        HookContext { step, device, rng }
    }

    #[test]
    fn sigma_follows_the_schedule() {
        let linear = InstanceNoiseConfig {
            sigma: 0.2,
            final_sigma: 0.0,
            anneal_steps: 100,
            schedule: Anneal::Linear,
        };
        // 0.2 + (0 - 0.2) * t / 100
        for (t, want) in [(0, 0.2), (25, 0.15), (50, 0.1), (100, 0.0), (1000, 0.0)] {
            assert!(
                (linear.sigma_at(t) - want).abs() < 1e-7,
                "t={t}: {}",
                linear.sigma_at(t)
            );
        }
        let exp = InstanceNoiseConfig {
            sigma: 1.0,
            final_sigma: 0.01,
            anneal_steps: 100,
            schedule: Anneal::Exponential,
        };
        // 1.0 * (0.01 / 1.0)^(t / 100): 1, 0.1 at the middle, 0.01 from the end on.
        for (t, want) in [(0, 1.0), (50, 0.1), (25, 0.316_227_77), (100, 0.01), (500, 0.01)] {
            assert!((exp.sigma_at(t) - want).abs() < 1e-6, "t={t}: {}", exp.sigma_at(t));
        }
    }

    #[test]
    fn noise_has_sigma_t_and_gradients_pass_through_unchanged() {
        let device = Device::default();
        let cfg = InstanceNoiseConfig {
            sigma: 0.5,
            final_sigma: 0.0,
            anneal_steps: 4,
            schedule: Anneal::Linear,
        };
        let mut s = cfg.build().unwrap();
        let mut rng = Rng::seed_from_u64(1);
        let (rows, cols) = (2000, 2);
        let x = matrix_from_vec(&device, vec![0.25; rows * cols], rows, cols).unwrap();
        // Step 2: σ = 0.5 * (1 - 2/4) = 0.25.
        let out = s
            .transform_input(
                InputRole::Fake,
                Activation::input(&x, FeatureShape::Flat(cols)).unwrap(),
                &mut ctx(2, &device, &mut rng),
            )
            .unwrap();
        assert_eq!(out.shape, FeatureShape::Flat(cols));
        let noise: Vec<f64> = out.detach().as_vec().iter().map(|&v| v as f64 - 0.25).collect();
        let n = noise.len() as f64;
        let mean = noise.iter().sum::<f64>() / n;
        let sd = (noise.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        // Standard errors: mean 0.25 / sqrt(4000) = 0.004, sd 0.25 / sqrt(8000) = 0.003.
        assert!(mean.abs() < 0.016 && (sd - 0.25).abs() < 0.012, "mean {mean}, sd {sd}");
        let mut report = StepReport::default();
        s.end_step(&mut report, &mut ctx(2, &device, &mut rng)).unwrap();
        assert_eq!(report.diagnostics["instance_noise/sigma"], 0.25);

        // d/dx sum(w ⊙ (x + noise)) = w: the noise is a constant on the fake's tape.
        let x = matrix_from_vec(&device, vec![0.1, -0.2, 0.3, 0.4, 0.5, -0.6], 3, 2).unwrap();
        let w = matrix_from_vec(&device, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2).unwrap();
        let input = Activation::input(&x, FeatureShape::Flat(2)).unwrap();
        let out = s
            .transform_input(InputRole::Real, input, &mut ctx(0, &device, &mut rng))
            .unwrap();
        assert_ne!(out.detach().as_vec(), x.as_vec());
        let grads = (out.value * w.clone()).sum().backward();
        assert_eq!(grads.get(&x).as_vec(), w.as_vec());

        // At σ = 0 the input passes through untouched.
        let mut rng = Rng::seed_from_u64(1);
        let out = s
            .transform_input(
                InputRole::Real,
                Activation::input(&x, FeatureShape::Flat(2)).unwrap(),
                &mut ctx(4, &device, &mut rng),
            )
            .unwrap();
        assert_eq!(out.detach().as_vec(), x.as_vec());
    }

    #[test]
    fn config_deserializes_and_refuses_bad_values_with_their_path() {
        let cfg: Box<dyn StabilizerConfig> = nash_core::serde_json::from_str(
            r#"{"type": "instance_noise", "sigma": 0.3, "final_sigma": 0.01, "schedule": "exponential"}"#,
        )
        .unwrap();
        assert_eq!(cfg.build().unwrap().name(), "instance_noise");
        let err = nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(
            r#"{"type": "instance_noise", "schedule": "cosine"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("linear"), "{err}");
        let path_of = |cfg: InstanceNoiseConfig| match cfg.build() {
            Err(Error::Config { path, .. }) => path,
            _ => panic!("{cfg:?} accepted"),
        };
        let base = InstanceNoiseConfig::default;
        assert!(path_of(InstanceNoiseConfig { sigma: 0.0, ..base() }).ends_with(".sigma"));
        assert!(path_of(InstanceNoiseConfig {
            final_sigma: -1.0,
            ..base()
        })
        .ends_with(".final_sigma"));
        assert!(path_of(InstanceNoiseConfig {
            anneal_steps: 0,
            ..base()
        })
        .ends_with(".anneal_steps"));
        assert!(path_of(InstanceNoiseConfig {
            schedule: Anneal::Exponential,
            ..base()
        })
        .ends_with(".final_sigma"));
    }
}
