//! The pieces of an alternating discriminator/generator update that every GAN model of this
//! plugin shares, so that each calls the stabilizer hooks at the same points and reports the same
//! keys.
//!
//! A discriminator update is, in order:
//! 1. [`transform_inputs`]: the stabilizers' `transform_input` on the real, then the fake input;
//! 2. the model's own forward passes (its discriminator may take labels, have two heads, ...);
//! 3. [`discriminator_loss`]: the stabilizers' `transform_targets`, the objective against those
//!    targets, then the stabilizers' `extra_losses` at [`LossSite::Discriminator`] with a
//!    [`CriticSite`], each term added to the loss;
//! 4. `backward`, then [`TrainContext::apply_gradients`] on the `discriminator` group only.
//!
//! A generator update transforms its fakes with [`transform_fake`], computes the objective's
//! generator loss, adds the stabilizers' terms at [`LossSite::Generator`] with
//! [`generator_loss_terms`], and applies the gradients to the `generator` group only.
//! [`DiscriminatorStep::report`] averages several discriminator updates (n_critic) into a report.
//!
//! The update schedule is shared too: [`schedule_discriminator_steps`] asks the stabilizers how
//! many discriminator updates to run this step (an adaptive step ratio may return 0 or more than
//! configured) and reports the count as `discriminator_steps`; [`with_unrolled_discriminator`]
//! runs the generator's update against a discriminator unrolled `k` updates ahead (unrolled GAN)
//! and rewinds it afterwards; [`refuse_unrolling`] is what models that cannot unroll call.
//! [`keep_best_fakes`] keeps the fakes the discriminator scores highest for the generator's loss
//! (top-k training); [`refuse_sample_selection`] is what models that cannot select call.
//!
//! This API is stable: the models `mlp_gan`, `dcgan`, `conditional_gan` and `ac_gan` use it, and
//! other models of the plugin may.

use nash_core::data::Batch;
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::Sequential;
use nash_core::loss::AdversarialObjective;
use nash_core::model::{StepReport, TrainContext};
use nash_core::stabilizer::{InputRole, LossSite, Targets};
use nash_core::tensor::{check_finite, join_name, Activation, FeatureShape, Matrix, Param, Scalar, Tape};

/// The models that unroll the discriminator for the generator's update.
pub const UNROLLING_MODELS: &str = "mlp_gan, dcgan";

/// The number of discriminator updates to run this step: `configured` passed through the
/// stabilizers' `discriminator_steps` (an adaptive step ratio), at most `cap` (models with a single
/// fixed discriminator update pass 1: they run it or, for 0, skip it). Called once per step, before
/// the discriminator updates; the count is reported as the diagnostic `discriminator_steps`.
pub fn schedule_discriminator_steps(
    configured: usize,
    cap: usize,
    ctx: &mut TrainContext<'_>,
    report: &mut StepReport,
) -> usize {
    let (stabilizers, mut hooks) = ctx.hooks();
    let steps = stabilizers.discriminator_steps(configured, &mut hooks).min(cap);
    report.diagnostic("discriminator_steps", steps as f64);
    steps
}

/// Refuses a non-zero `unrolled_steps` of the stabilizers for a model (`kind`) that cannot unroll
/// its discriminator, naming the models that can.
pub fn refuse_unrolling(kind: &str, ctx: &TrainContext<'_>) -> Result<()> {
    let k = ctx.stabilizers.unrolled_steps();
    if k == 0 {
        return Ok(());
    }
    Err(Error::unsupported(
        format!("{k} unrolled discriminator step(s) with the `{kind}` model"),
        format!(
            "only {UNROLLING_MODELS} unroll the discriminator for the generator's update; remove the `unrolled` \
             stabilizer or use one of those models"
        ),
    ))
}

/// The models whose generator loss keeps only the best-scored fakes (top-k training).
pub const SELECTING_MODELS: &str = "mlp_gan, dcgan, conditional_gan, ac_gan";

/// The rows of `scores` (the discriminator's raw outputs on the generator update's fakes,
/// `[batch, 1]`, higher meaning more real for every objective) that the generator's loss keeps:
/// with a selecting stabilizer (top-k training, [`StabilizerStack::generator_samples_kept`]) the
/// `k` highest, best first, reported as the diagnostic `generator_samples_kept`; otherwise all of
/// them, unchanged. The gradient reaches the generator through the kept rows only.
///
/// [`StabilizerStack::generator_samples_kept`]: nash_core::stabilizer::StabilizerStack::generator_samples_kept
pub fn keep_best_fakes(scores: Matrix<Tape>, ctx: &TrainContext<'_>, report: &mut StepReport) -> Result<Matrix<Tape>> {
    let (batch, columns) = *scores.shape();
    let Some(kept) = ctx.stabilizers.generator_samples_kept(batch, ctx.step) else {
        return Ok(scores);
    };
    report.diagnostic("generator_samples_kept", kept as f64);
    if kept == batch {
        return Ok(scores);
    }
    if columns != 1 {
        return Err(Error::shape(
            "top-k selection of the generator's fakes (discriminator outputs)",
            "[batch, 1]",
            format!("[{batch}, {columns}]"),
        ));
    }
    let values = scores.as_vec();
    let mut order: Vec<usize> = (0..batch).collect();
    // Descending; a NaN score sorts first and the loss's finiteness check reports it.
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order.truncate(kept);
    let rows = scores.device().tensor_from_vec(order, (kept,));
    Ok(scores.gather(rows))
}

/// Refuses a selecting stabilizer (top-k training) for a model (`kind`) whose generator loss
/// cannot keep a subset of its fakes, naming the models that can.
pub fn refuse_sample_selection(kind: &str, ctx: &TrainContext<'_>) -> Result<()> {
    if ctx.stabilizers.generator_samples_kept(1, ctx.step).is_none() {
        return Ok(());
    }
    Err(Error::unsupported(
        format!("selecting the generator's best fakes (top_k) with the `{kind}` model"),
        format!("only {SELECTING_MODELS} select the fakes of the generator's loss; remove the `top_k` stabilizer or use one of those models"),
    ))
}

/// A GAN whose discriminator update can be run ahead of the generator's update (unrolled GAN).
pub trait UnrollDiscriminator {
    /// One normal discriminator update on `batch`'s real samples and fresh fakes (through every
    /// stabilizer hook and the `discriminator` optimizer).
    fn unrolled_update(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<DiscriminatorStep>;
    /// Every parameter of the discriminator (buffers included), named as in the model.
    fn discriminator_params_mut(&mut self) -> Vec<(String, &mut Param)>;
}

/// Unrolled GAN (Metz et al. 2017, "Unrolled Generative Adversarial Networks"), first-order:
/// snapshots the discriminator's parameters and its optimizer's state, runs `steps` normal
/// discriminator updates on the step's real batch with fresh latent codes (only the current batch
/// is at hand; common implementations do the same), runs `update` (the generator's update, which
/// then sees the unrolled discriminator), and restores the snapshot, also when anything failed.
///
/// First-order: the generator's gradient is taken through the unrolled discriminator's
/// parameters, not through the unrolled updates themselves (the paper's full variant
/// differentiates through them; dfdx has no double backward). Stabilizer state advanced by the
/// look-ahead updates' hooks is not rewound. Reports `unrolled_steps` and
/// `unrolled/discriminator_loss` (the objective at the last look-ahead update). With `steps = 0`
/// it just runs `update`.
pub fn with_unrolled_discriminator<M: UnrollDiscriminator, T>(
    model: &mut M,
    batch: &Batch,
    steps: usize,
    ctx: &mut TrainContext<'_>,
    report: &mut StepReport,
    update: impl FnOnce(&mut M, &mut TrainContext<'_>, &mut StepReport) -> Result<T>,
) -> Result<T> {
    if steps == 0 {
        return update(model, ctx, report);
    }
    let params: Vec<Vec<f32>> = model
        .discriminator_params_mut()
        .iter()
        .map(|(_, p)| p.to_vec())
        .collect();
    let optimizer_state = ctx
        .optimizers
        .get("discriminator")
        .ok_or_else(|| {
            Error::config(
                "optimizers.discriminator",
                "no optimizer configured for this parameter group",
            )
        })?
        .state();
    let run = || -> Result<T> {
        let mut last = None;
        for _ in 0..steps {
            last = Some(model.unrolled_update(batch, ctx)?);
        }
        report.diagnostic("unrolled_steps", steps as f64);
        if let Some(d) = last {
            report.diagnostic("unrolled/discriminator_loss", d.loss);
        }
        update(model, ctx, report)
    };
    let out = run();
    for ((_, p), values) in model.discriminator_params_mut().into_iter().zip(&params) {
        p.set(values)?;
    }
    if let Some(opt) = ctx.optimizers.get_mut("discriminator") {
        opt.load_state(&optimizer_state)?;
    }
    out
}

/// Mean of `sign(x)` over raw outputs (`sign(0) = 0`; 0 for none): ADA's overfitting heuristic
/// `r_t = E[sign(D(x_real))]` (Karras et al. 2020).
pub fn mean_sign(outputs: &[f32]) -> f64 {
    if outputs.is_empty() {
        return 0.0;
    }
    let sign = |x: f32| {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    outputs.iter().map(|&x| sign(x)).sum::<f64>() / outputs.len() as f64
}

/// Prefixes parameter names with `prefix.`.
pub fn prefixed<P>(params: Vec<(String, P)>, prefix: &str) -> Vec<(String, P)> {
    params.into_iter().map(|(n, p)| (join_name(prefix, &n), p)).collect()
}

/// Mean of the logistic sigmoid over raw logits (0 for none): the discriminator's mean belief that
/// its inputs are real.
pub fn mean_sigmoid(logits: &[f32]) -> f64 {
    if logits.is_empty() {
        return 0.0;
    }
    logits.iter().map(|&l| 1.0 / (1.0 + (-(l as f64)).exp())).sum::<f64>() / logits.len() as f64
}

/// The layers of a stack, one per line, indented by four spaces.
pub fn describe_stack(stack: &Sequential) -> String {
    stack
        .layers()
        .iter()
        .map(|l| format!("    {}", l.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the stabilizers' input transforms on a discriminator update's real and fake inputs (real
/// first).
pub fn transform_inputs(
    ctx: &mut TrainContext<'_>,
    real: Activation,
    fake: Activation,
) -> Result<(Activation, Activation)> {
    let (stabilizers, mut hooks) = ctx.hooks();
    let r = stabilizers.transform_input(InputRole::Real, real, &mut hooks)?;
    let f = stabilizers.transform_input(InputRole::Fake, fake, &mut hooks)?;
    Ok((r, f))
}

/// Runs the stabilizers' input transform on a generator update's fakes.
pub fn transform_fake(ctx: &mut TrainContext<'_>, fake: Activation) -> Result<Activation> {
    let (stabilizers, mut hooks) = ctx.hooks();
    stabilizers.transform_input(InputRole::Fake, fake, &mut hooks)
}

/// What stabilizers see at [`LossSite::Discriminator`]: the network that maps `shape`-shaped
/// inputs to one raw score, and the real and fake inputs it saw (without tape).
pub struct CriticSite<'a> {
    /// The discriminator (or the part of it that maps an input to its adversarial score).
    pub critic: &'a mut Sequential,
    /// Real inputs as the critic saw them.
    pub real: &'a Matrix,
    /// Fake inputs as the critic saw them.
    pub fake: &'a Matrix,
    /// Their per-sample shape.
    pub shape: FeatureShape,
}

/// A discriminator loss ready for `backward`, with the values to report.
pub struct DiscriminatorLoss {
    /// The objective plus every stabilizer term, on the tape.
    pub loss: Scalar,
    /// The objective's value alone.
    pub objective: f64,
    /// Each stabilizer term's value, keyed `loss/discriminator/<name>`.
    pub extras: Vec<(String, f64)>,
    /// Mean sign of the raw outputs on real samples (ADA's r_t).
    pub real_sign: f64,
    /// The objective's real-sample and fake-sample halves (unweighted), where it splits.
    pub halves: Option<(f64, f64)>,
}

/// Targets (through the stabilizers' `transform_targets`), the objective on the raw outputs
/// `real_out` and `fake_out` (`[batch, 1]`), then the stabilizers' extra terms at
/// [`LossSite::Discriminator`] for `site`, added to the loss. Every value is checked finite.
///
/// With the targets' `fake_weight` at 1 the objective is `discriminator_loss_with_targets`, and
/// its halves are computed on the side for the report where the objective splits. With another
/// fake weight (the `equilibrium` stabilizer) the objective is `real_half + fake_weight·fake_half`
/// from `discriminator_loss_halves`; objectives that do not split are refused.
pub fn discriminator_loss(
    objective: &dyn AdversarialObjective,
    real_out: Matrix<Tape>,
    fake_out: Matrix<Tape>,
    site: CriticSite<'_>,
    ctx: &mut TrainContext<'_>,
) -> Result<DiscriminatorLoss> {
    let (stabilizers, mut hooks) = ctx.hooks();
    let mut targets = Targets {
        real: hooks.device.ones_like(real_out.shape()),
        fake: hooks.device.zeros_like(fake_out.shape()),
        fake_weight: 1.0,
    };
    stabilizers.transform_targets(&mut targets, &mut hooks)?;
    let real_values = real_out.retaped::<NoneTape>();
    let real_sign = mean_sign(&real_values.as_vec());
    let (mut loss, halves) = if targets.fake_weight == 1.0 {
        // Halves for the report only, from constant copies of the outputs.
        let fake_values = fake_out.retaped::<NoneTape>();
        let halves =
            match objective.discriminator_loss_halves(real_values.leaky_trace(), fake_values.leaky_trace(), &targets) {
                Ok((r, f)) => Some((r.array() as f64, f.array() as f64)),
                Err(Error::Unsupported { .. }) => None,
                Err(e) => return Err(e),
            };
        (
            objective.discriminator_loss_with_targets(real_out, fake_out, &targets)?,
            halves,
        )
    } else {
        let weight = targets.fake_weight;
        if !weight.is_finite() || weight < 0.0 {
            return Err(Error::config(
                "stabilizers",
                format!("the discriminator's fake-sample weight must be finite and >= 0, a stabilizer set {weight}"),
            ));
        }
        let (r, f) = match objective.discriminator_loss_halves(real_out, fake_out, &targets) {
            Err(Error::Unsupported { why, .. }) => {
                return Err(Error::unsupported(
                    format!(
                        "a fake-sample weight of {weight} (the `equilibrium` stabilizer) with the `{}` objective",
                        objective.name()
                    ),
                    format!(
                        "{why}; use non_saturating, minimax, least_squares, hinge or wasserstein, or remove the \
                         `equilibrium` stabilizer"
                    ),
                ))
            }
            other => other?,
        };
        let halves = (r.array() as f64, f.array() as f64);
        (r + f * weight, Some(halves))
    };
    let objective_value = check_finite("loss/discriminator", loss.array())? as f64;
    let terms = stabilizers.extra_losses(
        &mut LossSite::Discriminator {
            critic: site.critic,
            real: site.real,
            fake: site.fake,
            shape: site.shape,
        },
        &mut hooks,
    )?;
    let mut extras = Vec::with_capacity(terms.len());
    for (name, term) in terms {
        let key = format!("loss/discriminator/{name}");
        extras.push((key.clone(), check_finite(&key, term.array())? as f64));
        loss = loss + term;
    }
    Ok(DiscriminatorLoss {
        loss,
        objective: objective_value,
        extras,
        real_sign,
        halves,
    })
}

/// Adds the stabilizers' extra terms at [`LossSite::Generator`] to `loss`, recording each as
/// `loss/generator/<name>` in `report`.
pub fn generator_loss_terms(mut loss: Scalar, ctx: &mut TrainContext<'_>, report: &mut StepReport) -> Result<Scalar> {
    let (stabilizers, mut hooks) = ctx.hooks();
    for (name, term) in stabilizers.extra_losses(&mut LossSite::Generator, &mut hooks)? {
        let key = format!("loss/generator/{name}");
        report.loss(key.clone(), check_finite(&key, term.array())? as f64);
        loss = loss + term;
    }
    Ok(loss)
}

/// What one discriminator update measured.
#[derive(Clone, Debug)]
pub struct DiscriminatorStep {
    /// The objective's value.
    pub loss: f64,
    /// Mean sigmoid of the outputs on real samples.
    pub real_mean: f64,
    /// Mean sigmoid of the outputs on fake samples.
    pub fake_mean: f64,
    /// The global gradient norm of the discriminator's parameters.
    pub grad_norm: f64,
    /// Stabilizer terms (and model-specific terms), keyed by their report name.
    pub extras: Vec<(String, f64)>,
    /// The raw outputs on this step's real samples, before the update (for relativistic
    /// generator losses).
    pub real_scores: Matrix,
    /// Mean sign of the raw outputs on real samples (ADA's r_t), from [`DiscriminatorLoss`].
    pub real_sign: f64,
    /// The objective's real-sample and fake-sample halves, where it splits.
    pub halves: Option<(f64, f64)>,
}

impl DiscriminatorStep {
    /// Records the mean over `steps` of every measurement: `loss/discriminator`, the extra terms,
    /// `d_real_mean`, `d_fake_mean`, `d_real_sign`, `grad_norm/discriminator`, and `d_loss_real` /
    /// `d_loss_fake` when every step has the objective's halves. Does nothing for no steps.
    pub fn report(steps: &[DiscriminatorStep], report: &mut StepReport) {
        if steps.is_empty() {
            return;
        }
        let k = steps.len() as f64;
        let mean = |f: fn(&DiscriminatorStep) -> f64| steps.iter().map(f).sum::<f64>() / k;
        report.loss("loss/discriminator", mean(|d| d.loss));
        let mut extras: std::collections::BTreeMap<String, f64> = Default::default();
        for d in steps {
            for (key, v) in &d.extras {
                *extras.entry(key.clone()).or_default() += v;
            }
        }
        for (key, v) in extras {
            report.loss(key, v / k);
        }
        report.diagnostic("d_real_mean", mean(|d| d.real_mean));
        report.diagnostic("d_fake_mean", mean(|d| d.fake_mean));
        report.diagnostic("grad_norm/discriminator", mean(|d| d.grad_norm));
        report.diagnostic("d_real_sign", mean(|d| d.real_sign));
        if steps.iter().all(|d| d.halves.is_some()) {
            report.diagnostic("d_loss_real", mean(|d| d.halves.map_or(0.0, |h| h.0)));
            report.diagnostic("d_loss_fake", mean(|d| d.halves.map_or(0.0, |h| h.1)));
        }
    }
}

/// Helpers shared by the models' tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::BTreeMap;

    use nash_core::optim::adam::AdamConfig;
    use nash_core::optim::{Optimizer, OptimizerConfig};
    use nash_core::tensor::Parameterized;

    /// One optimizer per GAN group built from `cfg`.
    pub fn optimizers(cfg: &dyn OptimizerConfig) -> BTreeMap<String, Box<dyn Optimizer>> {
        ["discriminator", "generator"]
            .into_iter()
            .map(|g| (g.to_string(), cfg.build().unwrap()))
            .collect()
    }

    /// Adam with `lr` and β = (0.5, 0.999), per group.
    pub fn adam(lr: f64) -> BTreeMap<String, Box<dyn Optimizer>> {
        optimizers(&AdamConfig {
            lr,
            betas: [0.5, 0.999],
            ..Default::default()
        })
    }

    /// Every parameter's values by name.
    pub fn snapshot(model: &dyn Parameterized) -> BTreeMap<String, Vec<f32>> {
        model.named_params().into_iter().map(|(n, p)| (n, p.to_vec())).collect()
    }

    /// The names (sorted) of the parameters that differ between two snapshots.
    pub fn changed(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> Vec<String> {
        a.iter().filter(|(k, v)| b[*k] != **v).map(|(k, _)| k.clone()).collect()
    }

    /// The trainable parameter names of `model` starting with `prefix`, sorted.
    pub fn trainable_with_prefix(model: &dyn Parameterized, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = model
            .named_params()
            .into_iter()
            .filter(|(n, p)| n.starts_with(prefix) && p.trainable())
            .map(|(n, _)| n)
            .collect();
        v.sort();
        v
    }
}

/// The update schedule through the models: scheduled discriminator counts, the fake-sample weight,
/// the reported halves and sign, and unrolling (against the same steps run by hand).
#[cfg(test)]
mod schedule_tests {
    use std::cell::Cell;
    use std::collections::BTreeMap;
    use std::rc::Rc;

    use nash_core::data::{Batch, DataInfo};
    use nash_core::layers::BuildContext;
    use nash_core::model::Model;
    use nash_core::optim::sgd::SgdConfig;
    use nash_core::optim::Optimizer;
    use nash_core::rand::{Rng as _, SeedableRng};
    use nash_core::stabilizer::{HookContext, Stabilizer, StabilizerStack};
    use nash_core::tensor::{Device, Rng};

    use super::test_support::{adam, changed, optimizers, snapshot, trainable_with_prefix};
    use super::*;
    use crate::began::{Began, BeganConfig};
    use crate::mlp_gan::{mlp, MlpGan, MlpGanConfig};
    use crate::objective::RelativisticAverageConfig;

    /// A stabilizer that fixes the schedule: discriminator updates (`None`: as configured), look-ahead
    /// updates and the fake-sample weight; counts the discriminator's optimizer updates.
    #[derive(Default)]
    struct Fixed {
        steps: Option<usize>,
        unrolled: usize,
        fake_weight: Option<f32>,
        kept: Option<usize>,
        d_updates: Rc<Cell<usize>>,
    }

    impl Stabilizer for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn discriminator_steps(&mut self, steps: usize, _: &mut HookContext<'_>) -> usize {
            self.steps.unwrap_or(steps)
        }
        fn unrolled_steps(&self) -> usize {
            self.unrolled
        }
        fn generator_samples_kept(&self, _: usize, _: u64) -> Option<usize> {
            self.kept
        }
        fn transform_targets(&mut self, targets: &mut Targets, _: &mut HookContext<'_>) -> Result<()> {
            if let Some(w) = self.fake_weight {
                targets.fake_weight = w;
            }
            Ok(())
        }
        fn after_update(&mut self, group: &str, _: &mut [(String, &mut Param)], _: &mut HookContext<'_>) -> Result<()> {
            if group == "discriminator" {
                self.d_updates.set(self.d_updates.get() + 1);
            }
            Ok(())
        }
    }

    fn info(dim: usize) -> DataInfo {
        DataInfo {
            sample_shape: FeatureShape::Flat(dim),
            num_classes: None,
            value_range: (-1.0, 1.0),
        }
    }

    fn gan(configure: impl FnOnce(&mut MlpGanConfig)) -> MlpGan {
        let mut cfg = MlpGanConfig {
            latent_dim: 3,
            generator: mlp(&[8], 2, None),
            discriminator: mlp(&[8], 1, None),
            ..Default::default()
        };
        configure(&mut cfg);
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        cfg.build_gan(
            &info(2),
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
        .unwrap()
    }

    /// A tiny BEGAN: a model with one fixed discriminator update that cannot unroll or select.
    fn began() -> Began {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        BeganConfig {
            latent_dim: 3,
            hidden_dim: 8,
            code_dim: 2,
            ..Default::default()
        }
        .build_began(
            &info(2),
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
        .unwrap()
    }

    fn batch(device: &Device, rng: &mut Rng) -> Batch {
        let values: Vec<f32> = (0..16).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        Batch {
            inputs: device.tensor_from_vec(values, (8, 2)),
            shape: FeatureShape::Flat(2),
            labels: None,
        }
    }

    fn sgd() -> BTreeMap<String, Box<dyn Optimizer>> {
        optimizers(&SgdConfig {
            lr: 0.1,
            ..Default::default()
        })
    }

    /// One `train_step` of `model` on a seeded batch with `stabilizer`.
    fn step(
        model: &mut dyn Model,
        stabilizer: Fixed,
        opts: &mut BTreeMap<String, Box<dyn Optimizer>>,
        seed: u64,
    ) -> Result<StepReport> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(seed);
        let data = batch(&device, &mut rng);
        let mut stabilizers = StabilizerStack::new(vec![Box::new(stabilizer)]).unwrap();
        model.train_step(
            &data,
            &mut TrainContext {
                step: 0,
                device: &device,
                rng: &mut rng,
                optimizers: opts,
                stabilizers: &mut stabilizers,
            },
        )
    }

    #[test]
    fn the_stabilizers_decide_the_number_of_discriminator_updates() {
        let mut model = gan(|c| c.discriminator_steps = 2);
        let d_names = trainable_with_prefix(&model, "discriminator.");
        let g_names = trainable_with_prefix(&model, "generator.");
        // As configured.
        let count = Rc::new(Cell::new(0));
        let report = step(
            &mut model,
            Fixed {
                d_updates: count.clone(),
                ..Default::default()
            },
            &mut sgd(),
            1,
        )
        .unwrap();
        assert_eq!((count.get(), report.diagnostics["discriminator_steps"]), (2, 2.0));
        // Skipped: the discriminator is untouched, the generator still updates.
        let count = Rc::new(Cell::new(0));
        let before = snapshot(&model);
        let fixed = Fixed {
            steps: Some(0),
            d_updates: count.clone(),
            ..Default::default()
        };
        let report = step(&mut model, fixed, &mut sgd(), 2).unwrap();
        assert_eq!((count.get(), report.diagnostics["discriminator_steps"]), (0, 0.0));
        assert_eq!(changed(&before, &snapshot(&model)), g_names);
        assert!(!report.losses.contains_key("loss/discriminator"), "{report:?}");
        // More than configured.
        let count = Rc::new(Cell::new(0));
        let before = snapshot(&model);
        let fixed = Fixed {
            steps: Some(3),
            d_updates: count.clone(),
            ..Default::default()
        };
        let report = step(&mut model, fixed, &mut sgd(), 3).unwrap();
        assert_eq!((count.get(), report.diagnostics["discriminator_steps"]), (3, 3.0));
        let mut all = d_names.clone();
        all.extend(g_names);
        all.sort();
        assert_eq!(changed(&before, &snapshot(&model)), all);
        // A relativistic objective without any discriminator update takes its real scores from an
        // eval-mode pass.
        let mut model = gan(|c| c.objective = Box::new(RelativisticAverageConfig {}));
        let fixed = Fixed {
            steps: Some(0),
            ..Default::default()
        };
        assert!(step(&mut model, fixed, &mut sgd(), 4).unwrap().losses["loss/generator"].is_finite());
    }

    #[test]
    fn single_update_models_skip_their_update_or_run_it_once() {
        let mut model = began();
        for (steps, want) in [(0, 0), (3, 1), (1, 1)] {
            let count = Rc::new(Cell::new(0));
            let k = model.k();
            let fixed = Fixed {
                steps: Some(steps),
                d_updates: count.clone(),
                ..Default::default()
            };
            let report = step(&mut model, fixed, &mut sgd(), 5).unwrap();
            assert_eq!(count.get(), want, "{steps}");
            assert_eq!(report.diagnostics["discriminator_steps"], want as f64);
            if want == 0 {
                assert_eq!(model.k(), k, "a skipped update keeps k_t");
            }
        }
        let fixed = Fixed {
            unrolled: 2,
            ..Default::default()
        };
        let err = step(&mut model, fixed, &mut sgd(), 6).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(
            err.to_string().contains("mlp_gan, dcgan") && err.to_string().contains("began"),
            "{err}"
        );
    }

    #[test]
    fn the_real_sign_and_the_loss_halves_are_reported() {
        let device = Device::default();
        let mut model = gan(|_| {});
        let mut rng = Rng::seed_from_u64(7);
        let data = batch(&device, &mut rng);
        // The discriminator's outputs on the real batch before the update (no dropout or
        // normalization: eval and train passes agree).
        let scores = model.score(&data.inputs, &mut rng).unwrap().as_vec();
        let sign = scores.iter().map(|&s| if s > 0.0 { 1.0 } else { -1.0 }).sum::<f64>() / 8.0;
        // Non-saturating real half: mean BCE(s, 1) = mean softplus(−s).
        let real_half = scores.iter().map(|&s| (1.0 + (-(s as f64)).exp()).ln()).sum::<f64>() / 8.0;
        let report = step(&mut model, Fixed::default(), &mut sgd(), 7).unwrap();
        let d = &report.diagnostics;
        assert!(
            (d["d_real_sign"] - sign).abs() < 1e-12,
            "{} vs {sign}",
            d["d_real_sign"]
        );
        assert!(
            (d["d_loss_real"] - real_half).abs() < 1e-5,
            "{} vs {real_half}",
            d["d_loss_real"]
        );
        let sum = d["d_loss_real"] + d["d_loss_fake"];
        assert!((sum - report.losses["loss/discriminator"]).abs() < 1e-5, "{report:?}");
        // A relativistic objective does not split: no halves, but the sign.
        let mut model = gan(|c| c.objective = Box::new(RelativisticAverageConfig {}));
        let report = step(&mut model, Fixed::default(), &mut sgd(), 7).unwrap();
        assert!(!report.diagnostics.contains_key("d_loss_real"));
        assert!(report.diagnostics.contains_key("d_real_sign"));
    }

    #[test]
    fn the_fake_weight_scales_the_fake_half() {
        // Plain SGD moves the discriminator by −lr·(∇real + w·∇fake): linear in w on the same data
        // and fakes, so the update at w = 0.25 is 0.75·(update at 0) + 0.25·(update at 1).
        let run = |w: f32| {
            let mut model = gan(|_| {});
            let fixed = Fixed {
                fake_weight: Some(w),
                ..Default::default()
            };
            let report = step(&mut model, fixed, &mut sgd(), 9).unwrap();
            (snapshot(&model), report)
        };
        let before = snapshot(&gan(|_| {}));
        let ((p0, _), (p1, _), (pw, report)) = (run(0.0), run(1.0), run(0.25));
        for name in trainable_with_prefix(&gan(|_| {}), "discriminator.") {
            for (((b, a0), a1), aw) in before[&name].iter().zip(&p0[&name]).zip(&p1[&name]).zip(&pw[&name]) {
                let want = b + 0.75 * (a0 - b) + 0.25 * (a1 - b);
                assert!((aw - want).abs() < 1e-5, "{name}: {aw} vs {want}");
            }
        }
        let (r, f) = (report.diagnostics["d_loss_real"], report.diagnostics["d_loss_fake"]);
        assert!(
            (report.losses["loss/discriminator"] - (r + 0.25 * f)).abs() < 1e-5,
            "{report:?}"
        );
        // Objectives that do not split are refused, naming the objective and the stabilizer.
        let mut model = gan(|c| c.objective = Box::new(RelativisticAverageConfig {}));
        let fixed = Fixed {
            fake_weight: Some(0.5),
            ..Default::default()
        };
        let err = step(&mut model, fixed, &mut sgd(), 9).unwrap_err().to_string();
        assert!(
            err.contains("relativistic_average") && err.contains("equilibrium"),
            "{err}"
        );
    }

    #[test]
    fn the_generator_loss_keeps_the_best_scored_fakes_and_only_they_get_gradient() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut opts = BTreeMap::new();
        let select = |kept: Option<usize>| {
            StabilizerStack::new(vec![Box::new(Fixed {
                kept,
                ..Default::default()
            })])
            .unwrap()
        };
        let scores: Matrix = device.tensor_from_vec(vec![0.1, 3.0, -2.0, 1.0, 0.5], (5, 1));
        let mut run = |kept: Option<usize>| {
            let mut stabilizers = select(kept);
            let ctx = TrainContext {
                step: 0,
                device: &device,
                rng: &mut rng,
                optimizers: &mut opts,
                stabilizers: &mut stabilizers,
            };
            let mut report = StepReport::default();
            let traced = scores.leaky_trace();
            let out = keep_best_fakes(traced, &ctx, &mut report).unwrap();
            let values = out.as_vec();
            // Weight each kept row differently so the gradient shows which row went where.
            let weights = device.tensor_from_vec((1..=values.len()).map(|w| w as f32).collect(), (values.len(), 1));
            let grads = (out * weights).sum().backward();
            (
                values,
                grads.get(&scores).as_vec(),
                report.diagnostics.get("generator_samples_kept").copied(),
            )
        };
        // Top 2, best first; the gradient reaches rows 1 and 3 only.
        assert_eq!(run(Some(2)), (vec![3.0, 1.0], vec![0.0, 1.0, 0.0, 2.0, 0.0], Some(2.0)));
        // Keeping all, or no selecting stabilizer, leaves the scores as they were.
        let all = (vec![0.1, 3.0, -2.0, 1.0, 0.5], vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        let (v, g, d) = run(Some(5));
        assert_eq!(((v, g), d), (all.clone(), Some(5.0)));
        let (v, g, d) = run(None);
        assert_eq!(((v, g), d), (all, None));
    }

    #[test]
    fn top_k_trains_the_generator_and_models_that_cannot_select_refuse_it() {
        let mut model = gan(|_| {});
        let g_names = trainable_with_prefix(&model, "generator.");
        let before = snapshot(&model);
        let fixed = Fixed {
            kept: Some(3),
            ..Default::default()
        };
        let report = step(&mut model, fixed, &mut sgd(), 4).unwrap();
        assert_eq!(report.diagnostics["generator_samples_kept"], 3.0);
        assert!(report.losses["loss/generator"].is_finite());
        let moved = changed(&before, &snapshot(&model));
        assert!(g_names.iter().all(|n| moved.contains(n)), "{moved:?}");

        let mut began = began();
        let fixed = Fixed {
            kept: Some(3),
            ..Default::default()
        };
        let err = step(&mut began, fixed, &mut sgd(), 4).unwrap_err().to_string();
        assert!(
            err.contains("top_k") && err.contains("began") && err.contains(SELECTING_MODELS),
            "{err}"
        );
    }

    #[test]
    fn unrolling_updates_the_generator_against_the_look_ahead_and_restores_the_discriminator() {
        // With Adam, whose moments make the optimizer state matter.
        let k = 2;
        let mut unrolled = gan(|_| {});
        let mut opts = adam(0.01);
        let fixed = Fixed {
            unrolled: k,
            ..Default::default()
        };
        let report = step(&mut unrolled, fixed, &mut opts, 11).unwrap();
        assert_eq!(report.diagnostics["unrolled_steps"], k as f64);
        assert!(report.diagnostics["unrolled/discriminator_loss"].is_finite());

        // The same step by hand: one discriminator update (kept), k look-ahead updates, the
        // generator's update, then the discriminator and its optimizer as after the first update.
        let mut by_hand = gan(|_| {});
        let mut hand_opts = adam(0.01);
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(11);
        let data = batch(&device, &mut rng);
        let mut stabilizers = StabilizerStack::default();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut hand_opts,
            stabilizers: &mut stabilizers,
        };
        let d = by_hand.discriminator_step(&data, &mut ctx).unwrap();
        let d_after = snapshot(&by_hand);
        let d_state = ctx.optimizers["discriminator"].state();
        for _ in 0..k {
            by_hand.discriminator_step(&data, &mut ctx).unwrap();
        }
        let mut hand_report = StepReport::default();
        by_hand
            .generator_step(8, &d.real_scores, &mut ctx, &mut hand_report)
            .unwrap();
        let after = snapshot(&unrolled);
        let hand = snapshot(&by_hand);
        for (name, values) in &after {
            let want = if name.starts_with("generator.") {
                &hand[name]
            } else {
                &d_after[name]
            };
            assert_eq!(values, want, "{name}");
        }
        assert_eq!(opts["discriminator"].state(), d_state);
        assert_eq!(opts["generator"].state(), hand_opts["generator"].state());
        assert_eq!(report.losses["loss/generator"], hand_report.losses["loss/generator"]);

        // Without unrolling the generator's update differs (the discriminator does not).
        let mut plain = gan(|_| {});
        let mut plain_opts = adam(0.01);
        step(&mut plain, Fixed::default(), &mut plain_opts, 11).unwrap();
        let plain = snapshot(&plain);
        let differ = changed(&plain, &after);
        assert!(
            !differ.is_empty() && differ.iter().all(|n| n.starts_with("generator.")),
            "{differ:?}"
        );
        assert_eq!(plain_opts["discriminator"].state(), opts["discriminator"].state());
    }
}
