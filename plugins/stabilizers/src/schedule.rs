//! The update schedule: `unrolled` (look-ahead discriminator updates for the generator's update),
//! `adaptive_step_ratio` (how many discriminator updates each step runs, from the last losses) and
//! `equilibrium` (BEGAN's k_t as a weight on the discriminator's fake-sample loss).
//!
//! These act through the hooks an adversarial model calls once per step
//! ([`Stabilizer::unrolled_steps`], [`Stabilizer::discriminator_steps`],
//! [`Stabilizer::transform_targets`]) and adapt in [`Stabilizer::end_step`] from the step's report
//! (`loss/discriminator`, `d_loss_real`, `d_loss_fake`, `discriminator_steps`).

use nash_core::error::{Error, Result};
use nash_core::model::{Model, StepReport};
use nash_core::registry::Registry;
use nash_core::serde_json::json;
use nash_core::stabilizer::{HookContext, Stabilizer, StabilizerConfig, Targets};
use nash_core::state::StateDict;
use serde::{Deserialize, Serialize};

use crate::scope::{check_group, conflict, require_positive};

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.stabilizer::<UnrolledConfig>(
        "unrolled GAN (first-order): the generator's update sees the discriminator `steps` updates ahead",
    )?;
    registry.stabilizer::<AdaptiveStepRatioConfig>(
        "skip discriminator updates while its loss is below min_d_loss, run max_steps while above max_d_loss",
    )?;
    registry.stabilizer::<EquilibriumConfig>(
        "BEGAN's k_t equilibrium control as a weight on the discriminator's fake-sample loss",
    )?;
    Ok(())
}

/// Unrolled GAN (Metz et al. 2017, "Unrolled Generative Adversarial Networks"): before each
/// generator update the model runs `steps` look-ahead discriminator updates (the step's real batch
/// with fresh latent codes), takes the generator's loss against that unrolled discriminator, then
/// restores the discriminator's parameters and optimizer state. First-order variant: no gradient
/// through the unrolled updates themselves (dfdx has no double backward). Supported by `mlp_gan`
/// and `dcgan`; other models refuse it at their first step. Config: `steps` (default 5, the
/// paper's 5-10).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnrolledConfig {
    /// Look-ahead discriminator updates per generator update (at least 1).
    pub steps: usize,
}

impl Default for UnrolledConfig {
    fn default() -> Self {
        UnrolledConfig { steps: 5 }
    }
}

#[typetag::serde(name = "unrolled")]
impl StabilizerConfig for UnrolledConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        if self.steps == 0 {
            return Err(Error::config(
                "stabilizers.unrolled.steps",
                "must be at least 1 (look-ahead discriminator updates); remove the stabilizer for none",
            ));
        }
        Ok(Box::new(Unrolled { steps: self.steps }))
    }
}

/// See [`UnrolledConfig`]. Stateless: the models keep and restore the snapshot within a step.
#[derive(Clone, Debug)]
pub struct Unrolled {
    steps: usize,
}

impl Stabilizer for Unrolled {
    fn name(&self) -> &str {
        "unrolled"
    }
    fn validate(&self, model: &dyn Model) -> Result<()> {
        check_group(model, "discriminator", "stabilizers.unrolled")
    }
    fn unrolled_steps(&self) -> usize {
        self.steps
    }
    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict("unrolled", None, other)
    }
}

/// An adaptive discriminator/generator step ratio, the loss-threshold heuristic of "How to train a
/// GAN" (Chintala et al., NIPS 2016 workshop, ganhacks tip 14: `while lossD > A: train D`). With
/// `L` the previous step's reported `loss/discriminator` and `n` the configured (or earlier
/// stabilizer's) number of updates, this step runs:
///
/// - `0` updates while `L < min_d_loss` (the discriminator is winning: let the generator catch up);
/// - `max(n, max_steps)` updates while `L > max_d_loss` (the discriminator is losing);
/// - `n` otherwise, and when the previous step reported no discriminator loss (the first step, or a
///   step that skipped the discriminator: so while it keeps winning it is updated every other step).
///
/// The defaults suit the BCE objectives (`non_saturating`, `minimax`), whose discriminator loss is
/// 2 ln 2 ≈ 1.39 at equilibrium; set the thresholds for other objectives. Models with one fixed
/// discriminator update (`began`, `ebgan`, `bigan`, `vae_gan`) honour the skip but not the extra
/// updates. State: the last loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveStepRatioConfig {
    /// Below this discriminator loss the discriminator skips its updates.
    pub min_d_loss: f64,
    /// Above this discriminator loss the discriminator gets `max_steps` updates.
    pub max_d_loss: f64,
    /// Discriminator updates while its loss is above `max_d_loss` (at least 1).
    pub max_steps: usize,
}

impl Default for AdaptiveStepRatioConfig {
    fn default() -> Self {
        AdaptiveStepRatioConfig {
            min_d_loss: 0.5,
            max_d_loss: 2.0,
            max_steps: 3,
        }
    }
}

#[typetag::serde(name = "adaptive_step_ratio")]
impl StabilizerConfig for AdaptiveStepRatioConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        for (field, v) in [("min_d_loss", self.min_d_loss), ("max_d_loss", self.max_d_loss)] {
            if !v.is_finite() {
                return Err(Error::config(
                    format!("stabilizers.adaptive_step_ratio.{field}"),
                    format!("must be a finite number, got {v}"),
                ));
            }
        }
        if self.min_d_loss >= self.max_d_loss {
            return Err(Error::config(
                "stabilizers.adaptive_step_ratio.max_d_loss",
                format!(
                    "must be greater than min_d_loss ({}), got {}",
                    self.min_d_loss, self.max_d_loss
                ),
            ));
        }
        if self.max_steps == 0 {
            return Err(Error::config(
                "stabilizers.adaptive_step_ratio.max_steps",
                "must be at least 1 (discriminator updates while its loss is above max_d_loss)",
            ));
        }
        Ok(Box::new(AdaptiveStepRatio {
            config: self.clone(),
            last_d_loss: None,
        }))
    }
}

/// See [`AdaptiveStepRatioConfig`].
#[derive(Clone, Debug)]
pub struct AdaptiveStepRatio {
    config: AdaptiveStepRatioConfig,
    /// The previous step's `loss/discriminator`, if it reported one.
    last_d_loss: Option<f64>,
}

impl Stabilizer for AdaptiveStepRatio {
    fn name(&self) -> &str {
        "adaptive_step_ratio"
    }
    fn validate(&self, model: &dyn Model) -> Result<()> {
        check_group(model, "discriminator", "stabilizers.adaptive_step_ratio")
    }
    fn discriminator_steps(&mut self, steps: usize, _ctx: &mut HookContext<'_>) -> usize {
        match self.last_d_loss {
            Some(l) if l < self.config.min_d_loss => 0,
            Some(l) if l > self.config.max_d_loss => steps.max(self.config.max_steps),
            _ => steps,
        }
    }
    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict("adaptive_step_ratio", None, other)
    }
    fn end_step(&mut self, report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        self.last_d_loss = report.losses.get("loss/discriminator").copied();
        Ok(())
    }
    fn state(&self) -> StateDict {
        let mut state = StateDict::default();
        state.meta.insert("last_d_loss".into(), json!(self.last_d_loss));
        state
    }
    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        let last: Option<f64> = state.meta("last_d_loss")?;
        if last.is_some_and(|l| !l.is_finite()) {
            return Err(Error::state("last_d_loss", format!("must be finite, found {last:?}")));
        }
        self.last_d_loss = last;
        Ok(())
    }
}

/// Equilibrium control: BEGAN's k_t (Berthelot et al. 2017, "BEGAN: Boundary Equilibrium
/// Generative Adversarial Networks", eq. 4) as a general stabilizer. The discriminator's loss
/// becomes `L_real + k_t·L_fake` (the objective's halves, `targets.fake_weight = k_t`), and after
/// each step
///
/// `k_{t+1} = clip(k_t + λ_k·(L_fake − γ·L_real), 0, 1)`
///
/// from the step's reported `d_loss_real` / `d_loss_fake` (unweighted halves). This is BEGAN's rule
/// `k += λ_k (γ L(x) − L(G(z)))` transposed to losses the discriminator minimises on both halves:
/// in BEGAN a small fake energy L(G(z)) relative to γ L(x) means the discriminator is doing badly
/// on fakes and k grows; here that is a large fake-half loss relative to γ times the real half, so
/// the fake half gets more weight when the discriminator does badly on fakes and less when it
/// rejects them easily (leaving the generator room), holding `E[L_fake] = γ E[L_real]`. Reports
/// `equilibrium/k` and `equilibrium/convergence = L_real + |L_fake − γ·L_real|` (BEGAN's M_global).
/// Needs an objective whose loss splits (`non_saturating`, `minimax`, `least_squares`, `hinge`,
/// `wasserstein`) and a model that reports the halves (`mlp_gan`, `dcgan`, `conditional_gan`,
/// `ac_gan`). Config: `gamma` (default 1), `lambda_k` (default 0.001, BEGAN's), `initial_k`
/// (default 1: start as the plain objective; BEGAN starts at 0). State: k.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EquilibriumConfig {
    /// The target ratio γ of fake-half to real-half loss.
    pub gamma: f64,
    /// The controller's gain λ_k.
    pub lambda_k: f64,
    /// k_0, in [0, 1].
    pub initial_k: f64,
}

impl Default for EquilibriumConfig {
    fn default() -> Self {
        EquilibriumConfig {
            gamma: 1.0,
            lambda_k: 0.001,
            initial_k: 1.0,
        }
    }
}

#[typetag::serde(name = "equilibrium")]
impl StabilizerConfig for EquilibriumConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        require_positive("stabilizers.equilibrium.gamma", self.gamma)?;
        require_positive("stabilizers.equilibrium.lambda_k", self.lambda_k)?;
        if !(0.0..=1.0).contains(&self.initial_k) {
            return Err(Error::config(
                "stabilizers.equilibrium.initial_k",
                format!("must lie in [0, 1], got {}", self.initial_k),
            ));
        }
        Ok(Box::new(Equilibrium {
            config: self.clone(),
            k: self.initial_k,
        }))
    }
}

/// See [`EquilibriumConfig`].
#[derive(Clone, Debug)]
pub struct Equilibrium {
    config: EquilibriumConfig,
    k: f64,
}

impl Equilibrium {
    /// The current k_t.
    pub fn k(&self) -> f64 {
        self.k
    }
}

impl Stabilizer for Equilibrium {
    fn name(&self) -> &str {
        "equilibrium"
    }
    fn validate(&self, model: &dyn Model) -> Result<()> {
        check_group(model, "discriminator", "stabilizers.equilibrium")
    }
    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict("equilibrium", None, other)
    }
    /// Multiplies the fake-sample weight by k_t (it is 1 unless another stabilizer set it).
    fn transform_targets(&mut self, targets: &mut Targets, _ctx: &mut HookContext<'_>) -> Result<()> {
        targets.fake_weight *= self.k as f32;
        Ok(())
    }
    fn end_step(&mut self, report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        let halves = (
            report.diagnostics.get("d_loss_real").copied(),
            report.diagnostics.get("d_loss_fake").copied(),
        );
        match halves {
            (Some(real), Some(fake)) => {
                let gamma = self.config.gamma;
                let balance = fake - gamma * real;
                self.k = (self.k + self.config.lambda_k * balance).clamp(0.0, 1.0);
                report.diagnostic("equilibrium/convergence", real + balance.abs());
            }
            _ if report.diagnostics.get("discriminator_steps") == Some(&0.0) => {}
            _ => {
                return Err(Error::unsupported(
                    "the `equilibrium` stabilizer with this model or objective",
                    "the step reported no `d_loss_real`/`d_loss_fake`: equilibrium control needs a model that \
                     reports the discriminator loss's halves (mlp_gan, dcgan, conditional_gan, ac_gan) and an \
                     objective that splits (non_saturating, minimax, least_squares, hinge, wasserstein)",
                ))
            }
        }
        report.diagnostic("equilibrium/k", self.k);
        Ok(())
    }
    fn state(&self) -> StateDict {
        let mut state = StateDict::default();
        state.meta.insert("k".into(), json!(self.k));
        state
    }
    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        let k: f64 = state.meta("k")?;
        if !(0.0..=1.0).contains(&k) {
            return Err(Error::state("k", format!("k_t must lie in [0, 1], found {k}")));
        }
        self.k = k;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{Device, Rng};

    use crate::testutil::TwoGroups;

    fn hooks<'a>(device: &'a Device, rng: &'a mut Rng) -> HookContext<'a> {
        HookContext { step: 0, device, rng }
    }

    fn parse(json: &str) -> std::result::Result<Box<dyn StabilizerConfig>, String> {
        nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(json).map_err(|e| e.to_string())
    }

    fn build_err(json: &str) -> String {
        match parse(json).unwrap().build() {
            Ok(_) => panic!("{json} built"),
            Err(e) => e.to_string(),
        }
    }

    fn report(losses: &[(&str, f64)], diagnostics: &[(&str, f64)]) -> StepReport {
        let mut r = StepReport::default();
        for (k, v) in losses {
            r.loss(*k, *v);
        }
        for (k, v) in diagnostics {
            r.diagnostic(*k, *v);
        }
        r
    }

    #[test]
    fn unrolled_reports_its_steps_and_rejects_zero() {
        let s = parse(r#"{"type": "unrolled"}"#).unwrap().build().unwrap();
        assert_eq!((s.name(), s.unrolled_steps()), ("unrolled", 5));
        let s = parse(r#"{"type": "unrolled", "steps": 2}"#).unwrap().build().unwrap();
        assert_eq!(s.unrolled_steps(), 2);
        // No other hook changes anything: the steps it asks for are the configured ones.
        let (device, mut rng) = (Device::default(), Rng::seed_from_u64(0));
        let mut s = s;
        assert_eq!(s.discriminator_steps(3, &mut hooks(&device, &mut rng)), 3);
        assert!(build_err(r#"{"type": "unrolled", "steps": 0}"#).contains("stabilizers.unrolled.steps"));
        assert!(parse(r#"{"type": "unrolled", "step": 3}"#)
            .unwrap_err()
            .contains("step"));
        let model = TwoGroups::new(&device);
        s.validate(&model).unwrap();
    }

    #[test]
    fn adaptive_step_ratio_follows_the_threshold_rule() {
        let (device, mut rng) = (Device::default(), Rng::seed_from_u64(0));
        let mut ctx = hooks(&device, &mut rng);
        let mut s = AdaptiveStepRatioConfig {
            min_d_loss: 0.5,
            max_d_loss: 2.0,
            max_steps: 3,
        }
        .build()
        .unwrap();
        // No history: the configured count.
        assert_eq!(s.discriminator_steps(1, &mut ctx), 1);
        // (previous loss, configured) -> scheduled, by the rule in the doc comment.
        let cases = [
            (Some(0.3), 1, 0),
            (None, 1, 1),
            (Some(2.5), 1, 3),
            (Some(2.5), 5, 5),
            (Some(1.0), 2, 2),
            (Some(0.5), 1, 1),
            (Some(2.0), 1, 1),
        ];
        for (loss, configured, want) in cases {
            let mut r = match loss {
                Some(l) => report(&[("loss/discriminator", l)], &[]),
                None => report(&[], &[("discriminator_steps", 0.0)]),
            };
            s.end_step(&mut r, &mut ctx).unwrap();
            assert_eq!(
                s.discriminator_steps(configured, &mut ctx),
                want,
                "{loss:?}, {configured}"
            );
        }
        // State round trip: the last loss decides the next step.
        s.end_step(&mut report(&[("loss/discriminator", 0.1)], &[]), &mut ctx)
            .unwrap();
        let state = s.state();
        let mut fresh = AdaptiveStepRatioConfig::default().build().unwrap();
        assert_eq!(fresh.discriminator_steps(1, &mut ctx), 1);
        fresh.load_state(&state).unwrap();
        assert_eq!(fresh.discriminator_steps(1, &mut ctx), 0);
        let mut bad = StateDict::default();
        bad.meta.insert("last_d_loss".into(), json!("x"));
        assert!(fresh.load_state(&bad).is_err());
    }

    #[test]
    fn adaptive_step_ratio_config_rejects_bad_values_with_their_path() {
        let s = parse(r#"{"type": "adaptive_step_ratio", "min_d_loss": 0.2, "max_d_loss": 1.0, "max_steps": 4}"#)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(s.name(), "adaptive_step_ratio");
        let err = build_err(r#"{"type": "adaptive_step_ratio", "min_d_loss": 2.0, "max_d_loss": 1.0}"#);
        assert!(err.contains("stabilizers.adaptive_step_ratio.max_d_loss"), "{err}");
        let err = build_err(r#"{"type": "adaptive_step_ratio", "max_steps": 0}"#);
        assert!(err.contains("stabilizers.adaptive_step_ratio.max_steps"), "{err}");
        assert!(parse(r#"{"type": "adaptive_step_ratio", "min_loss": 1}"#)
            .unwrap_err()
            .contains("min_loss"));
    }

    #[test]
    fn equilibrium_weights_the_fake_half_and_updates_k_by_the_began_rule() {
        let (device, mut rng) = (Device::default(), Rng::seed_from_u64(0));
        let mut ctx = hooks(&device, &mut rng);
        let mut s = EquilibriumConfig {
            gamma: 0.5,
            lambda_k: 0.1,
            initial_k: 0.2,
        }
        .build()
        .unwrap();
        let mut targets = Targets::standard(&device, (4, 1), (4, 1));
        s.transform_targets(&mut targets, &mut ctx).unwrap();
        assert!((targets.fake_weight - 0.2).abs() < 1e-7);
        // k = clip(0.2 + 0.1·(0.9 − 0.5·0.6), 0, 1) = 0.26; M = 0.6 + |0.9 − 0.3| = 1.2.
        let mut r = report(&[], &[("d_loss_real", 0.6), ("d_loss_fake", 0.9)]);
        s.end_step(&mut r, &mut ctx).unwrap();
        assert!((r.diagnostics["equilibrium/k"] - 0.26).abs() < 1e-12, "{r:?}");
        assert!((r.diagnostics["equilibrium/convergence"] - 1.2).abs() < 1e-12, "{r:?}");
        let mut targets = Targets::standard(&device, (4, 1), (4, 1));
        targets.fake_weight = 0.5;
        s.transform_targets(&mut targets, &mut ctx).unwrap();
        assert!((targets.fake_weight - 0.13).abs() < 1e-6, "weights compose");
        // k = clip(0.26 + 0.1·(0.1 − 0.5·8), 0, 1) = 0 (clipped below); M = 8 + 3.9.
        let mut r = report(&[], &[("d_loss_real", 8.0), ("d_loss_fake", 0.1)]);
        s.end_step(&mut r, &mut ctx).unwrap();
        assert_eq!(r.diagnostics["equilibrium/k"], 0.0);
        assert!((r.diagnostics["equilibrium/convergence"] - 11.9).abs() < 1e-12);
        // Clipped above.
        for _ in 0..3 {
            s.end_step(
                &mut report(&[], &[("d_loss_real", 0.0), ("d_loss_fake", 5.0)]),
                &mut ctx,
            )
            .unwrap();
        }
        let mut r = report(&[], &[("discriminator_steps", 0.0)]);
        s.end_step(&mut r, &mut ctx).unwrap();
        assert_eq!(r.diagnostics["equilibrium/k"], 1.0, "a skipped update keeps k");
        let err = s.end_step(&mut report(&[], &[]), &mut ctx).unwrap_err().to_string();
        assert!(err.contains("d_loss_real") && err.contains("equilibrium"), "{err}");
    }

    #[test]
    fn equilibrium_state_round_trips_and_config_is_checked() {
        let (device, mut rng) = (Device::default(), Rng::seed_from_u64(0));
        let mut ctx = hooks(&device, &mut rng);
        let mut s = parse(r#"{"type": "equilibrium", "lambda_k": 0.5, "initial_k": 0.5}"#)
            .unwrap()
            .build()
            .unwrap();
        // k = 0.5 + 0.5·(0.2 − 1·0.6) = 0.3.
        s.end_step(
            &mut report(&[], &[("d_loss_real", 0.6), ("d_loss_fake", 0.2)]),
            &mut ctx,
        )
        .unwrap();
        let mut fresh = EquilibriumConfig::default().build().unwrap();
        fresh.load_state(&s.state()).unwrap();
        let mut targets = Targets::standard(&device, (2, 1), (2, 1));
        fresh.transform_targets(&mut targets, &mut ctx).unwrap();
        assert!((targets.fake_weight - 0.3).abs() < 1e-6);
        let mut bad = StateDict::default();
        bad.meta.insert("k".into(), json!(1.5));
        assert!(fresh.load_state(&bad).unwrap_err().to_string().contains("[0, 1]"));
        for (json, path) in [
            (
                r#"{"type": "equilibrium", "gamma": 0}"#,
                "stabilizers.equilibrium.gamma",
            ),
            (
                r#"{"type": "equilibrium", "lambda_k": -1}"#,
                "stabilizers.equilibrium.lambda_k",
            ),
            (
                r#"{"type": "equilibrium", "initial_k": 2}"#,
                "stabilizers.equilibrium.initial_k",
            ),
        ] {
            let err = build_err(json);
            assert!(err.contains(path), "{err}");
        }
        assert!(parse(r#"{"type": "equilibrium", "k": 1}"#).unwrap_err().contains('k'));
        let mut registry = Registry::new();
        crate::register(&mut registry).unwrap();
        for (kind, field) in [
            ("unrolled", "steps"),
            ("adaptive_step_ratio", "max_steps"),
            ("equilibrium", "lambda_k"),
        ] {
            let info = registry.find(nash_core::registry::Kind::Stabilizer, kind).unwrap();
            assert!(info.fields.iter().any(|f| f.name == field), "{kind}");
        }
    }
}
