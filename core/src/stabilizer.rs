//! Stabilizers: the techniques that keep training from oscillating, collapsing or diverging.
//!
//! Shaped like tracing-subscriber's `Layer`: many hooks with no-op defaults at fixed points of a
//! training step, so a stabilizer implements only what it needs. Several compose in the order the
//! pipeline lists them ([`StabilizerStack`]).

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::layers::Sequential;
use crate::model::{Model, StepReport};
use crate::state::StateDict;
use crate::tensor::{Activation, Device, Grads, Matrix, Param, Rng, Scalar};

/// What every hook receives.
pub struct HookContext<'a> {
    /// The global step.
    pub step: u64,
    /// Where tensors live.
    pub device: &'a Device,
    /// The run's seeded generator.
    pub rng: &'a mut Rng,
}

/// Which discriminator input is being transformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputRole {
    /// Samples from the data.
    Real,
    /// Samples from the generator.
    Fake,
}

/// The discriminator's targets for real and fake samples (`[batch, 1]`), ones and zeros unless a
/// stabilizer changes them (label smoothing, label noise). Objectives without labels ignore them.
#[derive(Clone, Debug)]
pub struct Targets {
    /// Targets for real samples.
    pub real: Matrix,
    /// Targets for fake samples.
    pub fake: Matrix,
    /// Weight of the fake-sample half of the discriminator's loss: 1 unless an equilibrium
    /// controller (BEGAN's k_t as a stabilizer) changes it. Applied by the model's discriminator
    /// step through [`crate::loss::AdversarialObjective::discriminator_loss_halves`].
    pub fake_weight: f32,
}

impl Targets {
    /// Ones for real samples and zeros for fake ones, shaped like the discriminator's outputs
    /// `real_shape` and `fake_shape` (`[batch, 1]`), with fake weight 1.
    pub fn standard(device: &Device, real_shape: (usize, usize), fake_shape: (usize, usize)) -> Self {
        use dfdx::tensor::{OnesTensor, ZerosTensor};
        Targets {
            real: device.ones_like(&real_shape),
            fake: device.zeros_like(&fake_shape),
            fake_weight: 1.0,
        }
    }
}

/// Where an extra loss term is being asked for, and what is available there.
#[non_exhaustive]
pub enum LossSite<'a> {
    /// The discriminator's update. `real` and `fake` are the discriminator's inputs (after input
    /// transforms), without tape.
    Discriminator {
        /// The discriminator network.
        critic: &'a mut Sequential,
        /// Real samples as the discriminator saw them.
        real: &'a Matrix,
        /// Generated samples as the discriminator saw them.
        fake: &'a Matrix,
        /// The per-sample shape of both.
        shape: crate::tensor::FeatureShape,
    },
    /// The generator's update.
    Generator,
    /// An autoencoder's update.
    Autoencoder,
}

impl LossSite<'_> {
    /// The parameter group the term will be added to.
    pub fn group(&self) -> &'static str {
        match self {
            LossSite::Discriminator { .. } => "discriminator",
            LossSite::Generator => "generator",
            LossSite::Autoencoder => "model",
        }
    }
}

/// A stabilization technique. Every hook has a no-op default.
pub trait Stabilizer {
    /// The stabilizer's name in logs.
    fn name(&self) -> &str;
    /// Checks, before any step, that the stabilizer fits the model (the layers it targets exist,
    /// the groups it names exist). Errors say why.
    fn validate(&self, _model: &dyn Model) -> Result<()> {
        Ok(())
    }
    /// Prepares the stabilizer for `model` once, after the model is built and before the first
    /// step (spectral normalization's first normalization, the EMA's shadow copy). After a
    /// checkpoint is restored it runs again, following [`Stabilizer::load_state`].
    fn setup(&mut self, _model: &mut dyn Model, _ctx: &mut HookContext<'_>) -> Result<()> {
        Ok(())
    }
    /// Parameter values, by full parameter name, that stand in for the trained ones while the
    /// model is evaluated and sampled (an EMA of the generator's weights). Empty: the trained ones.
    fn evaluation_params(&self) -> Vec<(String, Vec<f32>)> {
        Vec::new()
    }
    /// Parameter groups whose running statistics (batch norm) are re-estimated for the
    /// evaluation parameters, with the number of batches to average
    /// ([`Model::reestimate_statistics`]). Empty: the evaluation parameters' own buffers are used.
    fn evaluation_statistics(&self) -> Vec<(String, usize)> {
        Vec::new()
    }
    /// The number of discriminator updates to run in this step, given the number the pipeline
    /// configured (or the previous stabilizer decided): an adaptive step ratio. Called once per
    /// step by adversarial models, before their discriminator updates.
    fn discriminator_steps(&mut self, steps: usize, _ctx: &mut HookContext<'_>) -> usize {
        steps
    }
    /// How many discriminator updates the generator's update looks ahead through (unrolled GAN);
    /// 0 for none. Models that cannot unroll refuse a non-zero value at their first step.
    fn unrolled_steps(&self) -> usize {
        0
    }
    /// How many of the `batch` generated samples of the generator's update at `step` its loss keeps:
    /// the ones the discriminator scores highest (top-k training). `None`: this stabilizer does not
    /// select. Models that cannot select refuse a selecting stabilizer at their first step.
    fn generator_samples_kept(&self, _batch: usize, _step: u64) -> Option<usize> {
        None
    }
    /// Why this stabilizer cannot be combined with `other` (given by name), if it cannot.
    fn conflicts_with(&self, _other: &dyn Stabilizer) -> Option<String> {
        None
    }
    /// Transforms a discriminator input (instance noise, augmentation, packing).
    fn transform_input(
        &mut self,
        _role: InputRole,
        input: Activation,
        _ctx: &mut HookContext<'_>,
    ) -> Result<Activation> {
        Ok(input)
    }
    /// Transforms the discriminator's targets (label smoothing, label noise).
    fn transform_targets(&mut self, _targets: &mut Targets, _ctx: &mut HookContext<'_>) -> Result<()> {
        Ok(())
    }
    /// An extra loss term at `site` (gradient penalties, consistency terms), with its name.
    fn extra_loss(&mut self, _site: &mut LossSite<'_>, _ctx: &mut HookContext<'_>) -> Result<Option<(String, Scalar)>> {
        Ok(None)
    }
    /// Edits the gradients of `group` before its optimizer step (gradient clipping).
    fn edit_gradients(
        &mut self,
        _group: &str,
        _params: &[(String, &mut Param)],
        _grads: &mut Grads,
        _ctx: &mut HookContext<'_>,
    ) -> Result<()> {
        Ok(())
    }
    /// Acts on the parameters of `group` after its optimizer step (weight clipping, EMA).
    fn after_update(
        &mut self,
        _group: &str,
        _params: &mut [(String, &mut Param)],
        _ctx: &mut HookContext<'_>,
    ) -> Result<()> {
        Ok(())
    }
    /// Adapts at the end of a step from what the step reported; may add diagnostics.
    fn end_step(&mut self, _report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        Ok(())
    }
    /// State for checkpoints.
    fn state(&self) -> StateDict {
        StateDict::default()
    }
    /// Restores [`Stabilizer::state`].
    fn load_state(&mut self, _state: &StateDict) -> Result<()> {
        Ok(())
    }
}

/// Serializable description of a [`Stabilizer`]; `type = "weight_clipping"` in pipeline files.
#[typetag::serde(tag = "type")]
pub trait StabilizerConfig: std::fmt::Debug + Send + Sync {
    /// Builds the stabilizer.
    fn build(&self) -> Result<Box<dyn Stabilizer>>;
}

/// The pipeline's stabilizers, applied in order. Also a stabilizer itself.
#[derive(Default)]
pub struct StabilizerStack {
    stabilizers: Vec<Box<dyn Stabilizer>>,
}

impl StabilizerStack {
    /// A stack of `stabilizers`, checked pairwise for conflicts.
    pub fn new(stabilizers: Vec<Box<dyn Stabilizer>>) -> Result<Self> {
        for (i, a) in stabilizers.iter().enumerate() {
            for b in &stabilizers[i + 1..] {
                if let Some(why) = a.conflicts_with(b.as_ref()).or_else(|| b.conflicts_with(a.as_ref())) {
                    return Err(crate::Error::config(
                        "stabilizers",
                        format!("`{}` and `{}` cannot be combined: {why}", a.name(), b.name()),
                    ));
                }
            }
        }
        Ok(StabilizerStack { stabilizers })
    }
    /// The stabilizers, in order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Stabilizer> {
        self.stabilizers.iter().map(|s| s.as_ref())
    }
    /// Number of stabilizers.
    pub fn len(&self) -> usize {
        self.stabilizers.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.stabilizers.is_empty()
    }
    /// Each stabilizer's state under `index.name`.
    pub fn state(&self) -> StateDict {
        let mut all = StateDict::default();
        for (i, s) in self.stabilizers.iter().enumerate() {
            all.extend_prefixed(&format!("{i}.{}", s.name()), s.state());
        }
        all
    }
    /// Restores [`StabilizerStack::state`].
    pub fn load_state(&mut self, state: &StateDict) -> Result<()> {
        for (i, s) in self.stabilizers.iter_mut().enumerate() {
            let sub = state.sub(&format!("{i}.{}", s.name()));
            s.load_state(&sub)?;
        }
        Ok(())
    }
    /// Runs [`Stabilizer::validate`] for each.
    pub fn validate(&self, model: &dyn Model) -> Result<()> {
        self.stabilizers.iter().try_for_each(|s| s.validate(model))
    }
    /// Runs [`Stabilizer::setup`] for each, in order.
    pub fn setup(&mut self, model: &mut dyn Model, ctx: &mut HookContext<'_>) -> Result<()> {
        self.stabilizers.iter_mut().try_for_each(|s| s.setup(model, ctx))
    }
    /// Every stabilizer's [`Stabilizer::evaluation_params`]; for a name given by several, the
    /// last stabilizer's values.
    pub fn evaluation_params(&self) -> Vec<(String, Vec<f32>)> {
        let mut by_name = std::collections::BTreeMap::new();
        for s in &self.stabilizers {
            by_name.extend(s.evaluation_params());
        }
        by_name.into_iter().collect()
    }
    /// Every stabilizer's [`Stabilizer::evaluation_statistics`]; for a group given by several, the
    /// last stabilizer's number of batches.
    pub fn evaluation_statistics(&self) -> Vec<(String, usize)> {
        let mut by_group = std::collections::BTreeMap::new();
        for s in &self.stabilizers {
            by_group.extend(s.evaluation_statistics());
        }
        by_group.into_iter().collect()
    }
    /// The discriminator updates for this step: `configured`, passed through each stabilizer's
    /// [`Stabilizer::discriminator_steps`] in order.
    pub fn discriminator_steps(&mut self, configured: usize, ctx: &mut HookContext<'_>) -> usize {
        self.stabilizers
            .iter_mut()
            .fold(configured, |steps, s| s.discriminator_steps(steps, ctx))
    }
    /// The largest [`Stabilizer::unrolled_steps`] of the stack (0: no unrolling).
    pub fn unrolled_steps(&self) -> usize {
        self.stabilizers.iter().map(|s| s.unrolled_steps()).max().unwrap_or(0)
    }
    /// The fewest [`Stabilizer::generator_samples_kept`] of the stack, between 1 and `batch`;
    /// `None` when no stabilizer selects.
    pub fn generator_samples_kept(&self, batch: usize, step: u64) -> Option<usize> {
        self.stabilizers
            .iter()
            .filter_map(|s| s.generator_samples_kept(batch, step))
            .min()
            .map(|k| k.clamp(batch.min(1), batch))
    }
    /// Runs [`Stabilizer::transform_input`] through each, in order.
    pub fn transform_input(
        &mut self,
        role: InputRole,
        mut input: Activation,
        ctx: &mut HookContext<'_>,
    ) -> Result<Activation> {
        for s in &mut self.stabilizers {
            input = s.transform_input(role, input, ctx)?;
        }
        Ok(input)
    }
    /// Runs [`Stabilizer::transform_targets`] through each, in order.
    pub fn transform_targets(&mut self, targets: &mut Targets, ctx: &mut HookContext<'_>) -> Result<()> {
        self.stabilizers
            .iter_mut()
            .try_for_each(|s| s.transform_targets(targets, ctx))
    }
    /// Collects every stabilizer's extra loss term at `site`.
    pub fn extra_losses(
        &mut self,
        site: &mut LossSite<'_>,
        ctx: &mut HookContext<'_>,
    ) -> Result<Vec<(String, Scalar)>> {
        let mut terms = Vec::new();
        for s in &mut self.stabilizers {
            if let Some(t) = s.extra_loss(site, ctx)? {
                terms.push(t);
            }
        }
        Ok(terms)
    }
    /// Runs [`Stabilizer::edit_gradients`] through each, in order.
    pub fn edit_gradients(
        &mut self,
        group: &str,
        params: &[(String, &mut Param)],
        grads: &mut Grads,
        ctx: &mut HookContext<'_>,
    ) -> Result<()> {
        self.stabilizers
            .iter_mut()
            .try_for_each(|s| s.edit_gradients(group, params, grads, ctx))
    }
    /// Runs [`Stabilizer::after_update`] through each, in order.
    pub fn after_update(
        &mut self,
        group: &str,
        params: &mut [(String, &mut Param)],
        ctx: &mut HookContext<'_>,
    ) -> Result<()> {
        self.stabilizers
            .iter_mut()
            .try_for_each(|s| s.after_update(group, params, ctx))
    }
    /// Runs [`Stabilizer::end_step`] through each, in order.
    pub fn end_step(&mut self, report: &mut StepReport, ctx: &mut HookContext<'_>) -> Result<()> {
        self.stabilizers.iter_mut().try_for_each(|s| s.end_step(report, ctx))
    }
}
