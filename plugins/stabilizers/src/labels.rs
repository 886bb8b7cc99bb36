//! Target transforms for the discriminator: `label_smoothing` and `label_noise`.
//!
//! Both act through [`Stabilizer::transform_targets`], so they only change objectives that use
//! labels (the non-saturating and minimax GAN losses, least squares); objectives without labels
//! (Wasserstein, hinge) ignore the targets.

use nash_core::error::{Error, Result};
use nash_core::model::StepReport;
use nash_core::rand::Rng as _;
use nash_core::registry::Registry;
use nash_core::stabilizer::{HookContext, Stabilizer, StabilizerConfig, Targets};
use nash_core::tensor::{Device, Matrix};
use serde::{Deserialize, Serialize};

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.stabilizer::<LabelSmoothingConfig>(
        "label smoothing (Salimans et al. 2016): real targets become `real` (0.9), fake ones `fake` (0)",
    )?;
    registry.stabilizer::<LabelNoiseConfig>(
        "label noise: flip each discriminator target with probability `flip`, add uniform noise of width `jitter`",
    )?;
    Ok(())
}

/// Applies `f` to every entry of `m`, keeping its shape (host round trip; targets are `[batch, 1]`).
fn map_matrix(device: &Device, m: &Matrix, mut f: impl FnMut(f32) -> f32) -> Matrix {
    use nash_core::dfdx::prelude::*;
    let shape = *m.shape();
    let values: Vec<f32> = m.as_vec().into_iter().map(&mut f).collect();
    device.tensor_from_vec(values, shape)
}

/// Label smoothing (Salimans et al. 2016, "Improved techniques for training GANs"): the
/// discriminator's target for real samples becomes `real` (0.9) instead of 1; one-sided by default,
/// fake targets stay 0 unless `fake` is set (two-sided smoothing).
///
/// Targets are mapped by the affine map that sends 1 to `real` and 0 to `fake`,
/// `t -> fake + (real - fake) * t`, so the standard 1/0 targets become exactly `real`/`fake`, and
/// targets another stabilizer already changed (label noise listed earlier) are smoothed the same way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelSmoothingConfig {
    /// The target for real samples.
    pub real: f32,
    /// The target for fake samples (0: one-sided smoothing).
    pub fake: f32,
}

impl Default for LabelSmoothingConfig {
    fn default() -> Self {
        LabelSmoothingConfig { real: 0.9, fake: 0.0 }
    }
}

#[typetag::serde(name = "label_smoothing")]
impl StabilizerConfig for LabelSmoothingConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        for (field, v) in [("real", self.real), ("fake", self.fake)] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                return Err(Error::config(
                    format!("stabilizers.label_smoothing.{field}"),
                    format!("must be a number in [0, 1], got {v}"),
                ));
            }
        }
        if self.fake >= self.real {
            return Err(Error::config(
                "stabilizers.label_smoothing",
                format!(
                    "`fake` ({}) must be below `real` ({}): the discriminator must still tell the two apart",
                    self.fake, self.real
                ),
            ));
        }
        Ok(Box::new(LabelSmoothing { config: self.clone() }))
    }
}

/// See [`LabelSmoothingConfig`].
#[derive(Clone, Debug)]
pub struct LabelSmoothing {
    config: LabelSmoothingConfig,
}

impl Stabilizer for LabelSmoothing {
    fn name(&self) -> &str {
        "label_smoothing"
    }

    fn transform_targets(&mut self, targets: &mut Targets, ctx: &mut HookContext<'_>) -> Result<()> {
        let (real, fake) = (self.config.real, self.config.fake);
        let smooth = |t: f32| fake + (real - fake) * t;
        targets.real = map_matrix(ctx.device, &targets.real, smooth);
        targets.fake = map_matrix(ctx.device, &targets.fake, smooth);
        Ok(())
    }
}

/// Label noise: each discriminator target is flipped (real <-> fake, `t -> 1 - t`) with
/// probability `flip`, then, if `jitter > 0`, moved by uniform noise drawn from
/// `[-jitter/2, jitter/2]` and clamped to [0, 1]. Draws come from the run's seeded generator, real
/// targets first, then fake ones, flip before jitter for each entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelNoiseConfig {
    /// Probability of flipping each target, in [0, 1].
    pub flip: f64,
    /// Width of the uniform noise added to each target, in [0, 1] (0: none).
    pub jitter: f32,
}

impl Default for LabelNoiseConfig {
    fn default() -> Self {
        LabelNoiseConfig {
            flip: 0.05,
            jitter: 0.0,
        }
    }
}

#[typetag::serde(name = "label_noise")]
impl StabilizerConfig for LabelNoiseConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        if !(self.flip.is_finite() && (0.0..=1.0).contains(&self.flip)) {
            return Err(Error::config(
                "stabilizers.label_noise.flip",
                format!("must be a probability in [0, 1], got {}", self.flip),
            ));
        }
        if !(self.jitter.is_finite() && (0.0..=1.0).contains(&self.jitter)) {
            return Err(Error::config(
                "stabilizers.label_noise.jitter",
                format!("must be a width in [0, 1], got {}", self.jitter),
            ));
        }
        if self.flip == 0.0 && self.jitter == 0.0 {
            return Err(Error::config(
                "stabilizers.label_noise",
                "with flip = 0 and jitter = 0 it does nothing; set flip (e.g. 0.05) or jitter (e.g. 0.2)",
            ));
        }
        Ok(Box::new(LabelNoise {
            config: self.clone(),
            flipped: 0,
            seen: 0,
        }))
    }
}

/// See [`LabelNoiseConfig`].
#[derive(Clone, Debug)]
pub struct LabelNoise {
    config: LabelNoiseConfig,
    /// Targets flipped since the last `end_step`.
    flipped: u64,
    /// Targets seen since the last `end_step`.
    seen: u64,
}

impl Stabilizer for LabelNoise {
    fn name(&self) -> &str {
        "label_noise"
    }

    fn transform_targets(&mut self, targets: &mut Targets, ctx: &mut HookContext<'_>) -> Result<()> {
        let (flip, jitter) = (self.config.flip, self.config.jitter);
        let (mut flipped, mut seen) = (0u64, 0u64);
        let rng = &mut *ctx.rng;
        let mut noisy = |t: f32| {
            seen += 1;
            let mut t = t;
            if flip > 0.0 && rng.gen_bool(flip) {
                t = 1.0 - t;
                flipped += 1;
            }
            if jitter > 0.0 {
                t = (t + jitter * (rng.gen::<f32>() - 0.5)).clamp(0.0, 1.0);
            }
            t
        };
        targets.real = map_matrix(ctx.device, &targets.real, &mut noisy);
        targets.fake = map_matrix(ctx.device, &targets.fake, &mut noisy);
        self.flipped += flipped;
        self.seen += seen;
        Ok(())
    }

    fn end_step(&mut self, report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        if self.seen > 0 {
            report.diagnostic("label_noise/flipped_share", self.flipped as f64 / self.seen as f64);
        }
        (self.flipped, self.seen) = (0, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::dfdx::shapes::HasShape;
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{matrix_from_vec, Rng};

    fn targets(device: &Device, n: usize) -> Targets {
        Targets::standard(device, (n, 1), (n, 1))
    }

    fn transform(s: &mut dyn Stabilizer, t: &mut Targets, device: &Device, seed: u64) {
        let mut rng = Rng::seed_from_u64(seed);
        let mut ctx = HookContext {
            step: 0,
            device,
            rng: &mut rng,
        };
        s.transform_targets(t, &mut ctx).unwrap();
    }

    #[test]
    fn label_smoothing_sets_exact_targets_and_keeps_the_fake_weight() {
        let device = Device::default();
        let mut s = LabelSmoothingConfig::default().build().unwrap();
        let mut t = targets(&device, 3);
        t.fake_weight = 0.25;
        transform(s.as_mut(), &mut t, &device, 0);
        assert_eq!(t.real.as_vec(), vec![0.9; 3]);
        assert_eq!(t.fake.as_vec(), vec![0.0; 3]);
        assert_eq!(t.fake_weight, 0.25);
        assert_eq!(*t.real.shape(), (3, 1));

        // Two-sided: 1 -> 0.8, 0 -> 0.1, and 0.5 -> 0.1 + 0.7 * 0.5 = 0.45.
        let mut two = LabelSmoothingConfig { real: 0.8, fake: 0.1 }.build().unwrap();
        let mut t = targets(&device, 2);
        t.fake = matrix_from_vec(&device, vec![0.0, 0.5], 2, 1).unwrap();
        transform(two.as_mut(), &mut t, &device, 0);
        assert_eq!(t.real.as_vec(), vec![0.8, 0.8]);
        let f = t.fake.as_vec();
        assert!((f[0] - 0.1).abs() < 1e-7 && (f[1] - 0.45).abs() < 1e-7, "{f:?}");
    }

    #[test]
    fn label_noise_flips_at_the_configured_rate() {
        let device = Device::default();
        let n = 1000;
        let mut s = LabelNoiseConfig { flip: 0.2, jitter: 0.0 }.build().unwrap();
        let mut t = targets(&device, n);
        transform(s.as_mut(), &mut t, &device, 7);
        let real = t.real.as_vec();
        let fake = t.fake.as_vec();
        // Every entry is still a hard label, flipped or not.
        assert!(real.iter().chain(&fake).all(|&v| v == 0.0 || v == 1.0));
        let flipped = real.iter().filter(|&&v| v == 0.0).count() + fake.iter().filter(|&&v| v == 1.0).count();
        // Binomial(2000, 0.2): mean 400, sd = sqrt(2000 * 0.2 * 0.8) = 17.9; within 4 sd.
        assert!((400 - 72..=400 + 72).contains(&flipped), "{flipped} flips");
        let mut report = StepReport::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = HookContext {
            step: 0,
            device: &device,
            rng: &mut rng,
        };
        s.end_step(&mut report, &mut ctx).unwrap();
        assert_eq!(report.diagnostics["label_noise/flipped_share"], flipped as f64 / 2000.0);
        // The same seed gives the same flips.
        let mut again = targets(&device, n);
        transform(s.as_mut(), &mut again, &device, 7);
        assert_eq!(again.real.as_vec(), real);
    }

    #[test]
    fn label_noise_jitter_stays_within_its_width_and_in_range() {
        let device = Device::default();
        let mut s = LabelNoiseConfig { flip: 0.0, jitter: 0.3 }.build().unwrap();
        let mut t = targets(&device, 500);
        transform(s.as_mut(), &mut t, &device, 3);
        let real = t.real.as_vec();
        let fake = t.fake.as_vec();
        assert!(real.iter().all(|&v| (0.85..=1.0).contains(&v)), "{real:?}");
        assert!(fake.iter().all(|&v| (0.0..=0.15).contains(&v)), "{fake:?}");
        // About half the real draws are pushed above 1 and clamped back; the rest are spread below.
        let below = real.iter().filter(|&&v| v < 1.0).count();
        assert!((200..=300).contains(&below), "{below}");
        assert!(real.iter().any(|&v| v < 0.9));
    }

    #[test]
    fn configs_deserialize_and_refuse_bad_values_with_their_path() {
        let cfg: Box<dyn StabilizerConfig> =
            nash_core::serde_json::from_str(r#"{"type": "label_smoothing", "real": 0.8}"#).unwrap();
        assert_eq!(cfg.build().unwrap().name(), "label_smoothing");
        let cfg: Box<dyn StabilizerConfig> =
            nash_core::serde_json::from_str(r#"{"type": "label_noise", "flip": 0.1, "jitter": 0.2}"#).unwrap();
        assert_eq!(cfg.build().unwrap().name(), "label_noise");
        let err = nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(r#"{"type": "label_noise", "p": 1}"#)
            .unwrap_err();
        assert!(err.to_string().contains("`p`"), "{err}");
        let path_of = |cfg: &dyn StabilizerConfig| match cfg.build() {
            Err(Error::Config { path, .. }) => path,
            other => panic!("{other:?}", other = other.map(|s| s.name().to_string())),
        };
        assert_eq!(
            path_of(&LabelSmoothingConfig { real: 1.5, fake: 0.0 }),
            "stabilizers.label_smoothing.real"
        );
        assert_eq!(
            path_of(&LabelSmoothingConfig { real: 0.3, fake: 0.4 }),
            "stabilizers.label_smoothing"
        );
        assert_eq!(
            path_of(&LabelNoiseConfig {
                flip: -0.1,
                jitter: 0.0
            }),
            "stabilizers.label_noise.flip"
        );
        assert_eq!(
            path_of(&LabelNoiseConfig {
                flip: 0.1,
                jitter: f32::NAN
            }),
            "stabilizers.label_noise.jitter"
        );
        assert_eq!(
            path_of(&LabelNoiseConfig { flip: 0.0, jitter: 0.0 }),
            "stabilizers.label_noise"
        );
        let mut registry = Registry::new();
        register(&mut registry).unwrap();
        let info = registry
            .find(nash_core::registry::Kind::Stabilizer, "label_noise")
            .unwrap();
        assert!(info.fields.iter().any(|f| f.name == "jitter"));
    }
}
