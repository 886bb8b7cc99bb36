//! Which generated samples the generator learns from: `top_k`.
//!
//! Acts through [`Stabilizer::generator_samples_kept`]: the model keeps the fakes its
//! discriminator scores highest for the generator's loss (`keep_best_fakes` in the GAN plugin).

use nash_core::error::{Error, Result};
use nash_core::model::Model;
use nash_core::registry::Registry;
use nash_core::stabilizer::{Stabilizer, StabilizerConfig};
use serde::{Deserialize, Serialize};

use crate::scope::check_group;

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.stabilizer::<TopKConfig>(
        "top-k training: the generator's loss keeps only the fakes the discriminator scores highest, k annealed \
         from the batch to min_fraction of it",
    )
}

/// Top-k training (Sinha et al. 2020, "Top-k Training of GANs: Improving GAN Performance by
/// Throwing Away Bad Samples"): the generator's update computes its loss on only the `k` of its `b`
/// fakes that the discriminator scores highest. The gradients of the worst fakes point towards
/// regions the discriminator finds least real (on a mixture, between the modes) and would drag the
/// generator there; dropping them lets the good samples lead. `k` starts at the batch and is
/// annealed as in the paper's reference code, `k = max(⌊decay^e · b⌋, ⌊min_fraction · b⌋, 1)`
/// with `e = ⌊step / decay_every⌋`. The paper anneals once per epoch with `decay = 0.99`; set
/// `decay_every` to the run's steps per epoch (training samples / batch size; 1000 for the
/// stability benchmark's 2-D mixtures). Supported by `mlp_gan`, `dcgan`, `conditional_gan` and
/// `ac_gan`; other models refuse it at their first step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopKConfig {
    /// Factor applied to the kept fraction every `decay_every` steps, in (0, 1].
    pub decay: f64,
    /// Steps between two decays (an epoch in the paper), at least 1.
    pub decay_every: u64,
    /// The smallest fraction of the batch kept, in (0, 1].
    pub min_fraction: f64,
}

impl Default for TopKConfig {
    fn default() -> Self {
        TopKConfig {
            decay: 0.99,
            decay_every: 1000,
            min_fraction: 0.5,
        }
    }
}

/// Checks that `value` is a finite number in (0, 1].
fn require_unit_fraction(path: &str, value: f64, what: &str) -> Result<()> {
    if value.is_finite() && value > 0.0 && value <= 1.0 {
        Ok(())
    } else {
        Err(Error::config(path, format!("must be in (0, 1] ({what}), got {value}")))
    }
}

#[typetag::serde(name = "top_k")]
impl StabilizerConfig for TopKConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        require_unit_fraction("stabilizers.top_k.decay", self.decay, "1 keeps k at the batch size")?;
        require_unit_fraction(
            "stabilizers.top_k.min_fraction",
            self.min_fraction,
            "the share of the batch kept once annealed",
        )?;
        if self.decay_every == 0 {
            return Err(Error::config(
                "stabilizers.top_k.decay_every",
                "must be at least 1 (steps between decays; an epoch in the paper)",
            ));
        }
        Ok(Box::new(TopK { config: self.clone() }))
    }
}

/// See [`TopKConfig`]. Stateless: `k` is a function of the step.
#[derive(Clone, Debug)]
pub struct TopK {
    config: TopKConfig,
}

impl TopK {
    /// The fraction of the batch kept at `step`, before rounding.
    fn fraction(&self, step: u64) -> f64 {
        let decays = (step / self.config.decay_every).min(i32::MAX as u64) as i32;
        self.config.decay.powi(decays).max(self.config.min_fraction)
    }
}

impl Stabilizer for TopK {
    fn name(&self) -> &str {
        "top_k"
    }
    fn validate(&self, model: &dyn Model) -> Result<()> {
        check_group(model, "generator", "stabilizers.top_k")
    }
    fn generator_samples_kept(&self, batch: usize, step: u64) -> Option<usize> {
        let kept = (self.fraction(step) * batch as f64 + 1e-9).floor() as usize;
        Some(kept.clamp(batch.min(1), batch))
    }
}

#[cfg(test)]
mod tests {
    use nash_core::stabilizer::StabilizerStack;

    use super::*;

    fn build(json: &str) -> Result<Box<dyn Stabilizer>> {
        let config: Box<dyn StabilizerConfig> = nash_core::serde_json::from_str(json).unwrap();
        config.build()
    }

    #[test]
    fn k_follows_the_papers_schedule() {
        // Reference: k = max(int(gamma ** epoch * batch), int(nu * batch)), gamma 0.99, nu 0.5.
        let s = build(r#"{"type": "top_k"}"#).unwrap();
        let kept = |step| s.generator_samples_kept(64, step).unwrap();
        assert_eq!(kept(0), 64);
        assert_eq!(kept(999), 64);
        assert_eq!(kept(1000), 63); // 0.99 · 64 = 63.36
        assert_eq!(kept(10_000), 57); // 0.99^10 · 64 = 57.88
        assert_eq!(kept(68_000), 32); // 0.99^68 · 64 = 32.3
        assert_eq!(kept(69_000), 32); // 0.99^69 · 64 = 31.99, floored at 0.5 · 64
        assert_eq!(kept(u64::MAX), 32);

        let s = build(r#"{"type": "top_k", "decay": 0.5, "decay_every": 1, "min_fraction": 0.1}"#).unwrap();
        let kept = |batch, step| s.generator_samples_kept(batch, step).unwrap();
        assert_eq!(
            (kept(100, 0), kept(100, 1), kept(100, 3), kept(100, 9)),
            (100, 50, 12, 10)
        );
        // Never below one sample, never above the batch.
        assert_eq!((kept(3, 9), kept(1, 9), kept(0, 0)), (1, 1, 0));
    }

    #[test]
    fn the_stack_keeps_the_fewest_and_none_without_a_selecting_stabilizer() {
        let stack = StabilizerStack::new(vec![
            build(r#"{"type": "top_k", "decay": 1.0, "min_fraction": 0.75}"#).unwrap(),
            build(r#"{"type": "top_k", "decay": 0.5, "decay_every": 1, "min_fraction": 0.5}"#).unwrap(),
        ])
        .unwrap();
        assert_eq!(stack.generator_samples_kept(100, 0), Some(100));
        assert_eq!(stack.generator_samples_kept(100, 1), Some(50));
        assert_eq!(
            StabilizerStack::new(vec![]).unwrap().generator_samples_kept(100, 5),
            None
        );
    }

    #[test]
    fn bad_settings_name_the_field_and_the_valid_range() {
        let err = |json: &str| build(json).err().expect("refused").to_string();
        assert!(err(r#"{"type": "top_k", "decay": 0}"#).contains("stabilizers.top_k.decay"));
        assert!(err(r#"{"type": "top_k", "decay": 1.5}"#).contains("(0, 1]"));
        assert!(err(r#"{"type": "top_k", "min_fraction": -0.1}"#).contains("stabilizers.top_k.min_fraction"));
        assert!(err(r#"{"type": "top_k", "decay_every": 0}"#).contains("stabilizers.top_k.decay_every"));
        let unknown = nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(r#"{"type": "top_k", "k": 3}"#);
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
    }
}
