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
//! This API is stable: the models `mlp_gan`, `dcgan`, `conditional_gan` and `ac_gan` use it, and
//! other models of the plugin may.

use nash_core::dfdx::prelude::*;
use nash_core::error::Result;
use nash_core::layers::Sequential;
use nash_core::loss::AdversarialObjective;
use nash_core::model::{StepReport, TrainContext};
use nash_core::stabilizer::{InputRole, LossSite, Targets};
use nash_core::tensor::{check_finite, join_name, Activation, FeatureShape, Matrix, Scalar, Tape};

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
}

/// Targets (through the stabilizers' `transform_targets`), the objective on the raw outputs
/// `real_out` and `fake_out` (`[batch, 1]`), then the stabilizers' extra terms at
/// [`LossSite::Discriminator`] for `site`, added to the loss. Every value is checked finite.
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
    let mut loss = objective.discriminator_loss_with_targets(real_out, fake_out, &targets)?;
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
}

impl DiscriminatorStep {
    /// Records the mean over `steps` of every measurement: `loss/discriminator`, the extra terms,
    /// `d_real_mean`, `d_fake_mean` and `grad_norm/discriminator`. Does nothing for no steps.
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
