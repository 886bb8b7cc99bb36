//! `began`: the Boundary Equilibrium GAN (Berthelot et al. 2017), whose discriminator is an
//! autoencoder, plus the helpers the other autoencoder-inside-a-GAN models share (the
//! autoencoder discriminator, default MLP stacks sized from the data, reconstruction errors).
//!
//! Equations, with `L(v) = mean |v - D(v)|` (L1, η = 1, averaged over samples and features)
//! and `D(v) = decoder(encoder(v))`:
//!
//! - discriminator: `L_D = L(x) - k_t · L(G(z_D))` (the fakes detached from the generator);
//! - generator: `L_G = L(G(z_G))` (fresh latent codes, through the discriminator);
//! - equilibrium: `k_{t+1} = clip(k_t + λ_k (γ L(x) - L(G(z_D))), 0, 1)`, using the values of
//!   the discriminator update (before it);
//! - convergence measure: `M = L(x) + |γ L(x) - L(G(z_D))|`, reported as `began/convergence`.

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::activation::{SigmoidConfig, TanhConfig};
use nash_core::layers::{
    reestimate_statistics, BuildContext, ForwardContext, LayerConfig, Mode, Sequential, SequentialConfig,
};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::stabilizer::{InputRole, LossSite};
use nash_core::state::StateDict;
use nash_core::tensor::{
    check_finite, join_name, Activation, Device, FeatureShape, Matrix, Param, Parameterized, Rng, Scalar, Tape, Vector,
};
use serde::{Deserialize, Serialize};

use crate::mlp_gan::{mlp, Latent};
use crate::step::{refuse_sample_selection, refuse_unrolling, schedule_discriminator_steps};

/// Prefixes parameter names with `prefix.`.
pub(crate) fn prefixed<P>(params: Vec<(String, P)>, prefix: &str) -> Vec<(String, P)> {
    params.into_iter().map(|(n, p)| (join_name(prefix, &n), p)).collect()
}

/// The layers of a stack, one per line, indented.
pub(crate) fn describe_stack(stack: &Sequential) -> String {
    stack
        .layers()
        .iter()
        .map(|l| format!("    {}", l.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The output activation that maps onto the data's value range: tanh for `[-1, 1]`, sigmoid for
/// `[0, 1]`, none (linear) otherwise.
pub(crate) fn output_activation(data: &DataInfo) -> Option<Box<dyn LayerConfig>> {
    match data.value_range {
        (lo, hi) if lo == -1.0 && hi == 1.0 => Some(Box::new(TanhConfig::default())),
        (lo, hi) if lo == 0.0 && hi == 1.0 => Some(Box::new(SigmoidConfig::default())),
        _ => None,
    }
}

/// `configured`, or `default` when the pipeline left the stack out.
pub(crate) fn stack_or<'a>(
    configured: &'a Option<SequentialConfig>,
    default: &'a SequentialConfig,
) -> &'a SequentialConfig {
    configured.as_ref().unwrap_or(default)
}

/// Builds a stack and checks that it produces `want` features per sample; errors name `path`
/// and say how to fix the last layer.
pub(crate) fn build_stack(
    cfg: &SequentialConfig,
    input: FeatureShape,
    want: Option<(usize, &str)>,
    ctx: &mut BuildContext<'_>,
    path: &str,
) -> Result<Sequential> {
    let stack = cfg.build(input, ctx, path)?;
    if let Some((n, what)) = want {
        let got = stack.output_shape().numel();
        if got != n {
            return Err(Error::config(
                path,
                format!(
                    "this stack must produce {what} ({n} features per sample) but produces {} ({got} features); \
                     make its last linear layer's out_features {n}",
                    stack.output_shape()
                ),
            ));
        }
    }
    Ok(stack)
}

/// Checks that a data batch has `shape.numel()` columns and wraps it on a fresh tape.
pub(crate) fn data_input(model: &str, x: &Matrix, shape: FeatureShape) -> Result<Activation> {
    let cols = x.shape().1;
    if cols != shape.numel() {
        return Err(Error::shape(
            format!("{model} input batch"),
            format!("{} features per sample ({shape})", shape.numel()),
            cols,
        ));
    }
    Activation::data(x, shape)
}

/// Refuses empty batches.
pub(crate) fn non_empty(model: &str, batch: &Batch) -> Result<()> {
    if batch.is_empty() {
        return Err(Error::shape(format!("{model} batch"), "at least one sample", 0));
    }
    Ok(())
}

/// Runs `stack` on `input` in `mode`.
pub(crate) fn run(stack: &mut Sequential, input: Activation, mode: Mode, rng: &mut Rng) -> Result<Activation> {
    stack.forward(input, &mut ForwardContext { mode, rng })
}

/// Runs `stack` on a constant matrix read as `shape`, then reinterprets the output as `out`.
pub(crate) fn run_const(
    stack: &mut Sequential,
    x: &Matrix,
    shape: FeatureShape,
    out: FeatureShape,
    mode: Mode,
    rng: &mut Rng,
) -> Result<Activation> {
    let y = run(stack, Activation::data(x, shape)?, mode, rng)?;
    Activation::new(y.value, out)
}

/// Host value of a scalar loss, refusing NaN and infinities with the loss's name.
pub(crate) fn finite(name: &str, loss: &Scalar) -> Result<f64> {
    Ok(check_finite(name, loss.array())? as f64)
}

/// An autoencoder used as a discriminator (BEGAN, EBGAN): `encoder` maps a sample to a code,
/// `decoder` maps the code back to a sample. Parameter names `encoder.<i>.<p>`, `decoder.<i>.<p>`.
pub struct AutoencoderCritic {
    encoder: Sequential,
    decoder: Sequential,
    data_shape: FeatureShape,
}

/// What one pass through an [`AutoencoderCritic`] gives, on the tape.
pub struct CriticPass {
    /// The encoder's codes, `[batch, code]` (an empty tape sharing the codes' id).
    pub codes: Matrix<Tape>,
    /// The reconstructions, `[batch, features]` (the whole tape).
    pub reconstruction: Matrix<Tape>,
    /// The input as the critic saw it (an empty tape sharing its id), the reconstruction target.
    pub target: Matrix<Tape>,
}

impl AutoencoderCritic {
    /// Builds the encoder and decoder for samples of `data_shape`; the decoder must give back
    /// one sample. `path` is the model's config path (`model`).
    pub fn build(
        encoder: &SequentialConfig,
        decoder: &SequentialConfig,
        data_shape: FeatureShape,
        ctx: &mut BuildContext<'_>,
        path: &str,
    ) -> Result<Self> {
        let encoder = build_stack(encoder, data_shape, None, ctx, &format!("{path}.encoder"))?;
        let decoder = build_stack(
            decoder,
            encoder.output_shape(),
            Some((data_shape.numel(), "one data sample")),
            ctx,
            &format!("{path}.decoder"),
        )?;
        Ok(AutoencoderCritic {
            encoder,
            decoder,
            data_shape,
        })
    }
    /// The encoder.
    pub fn encoder(&self) -> &Sequential {
        &self.encoder
    }
    /// The decoder.
    pub fn decoder(&self) -> &Sequential {
        &self.decoder
    }
    /// Number of code features.
    pub fn code_dim(&self) -> usize {
        self.encoder.output_shape().numel()
    }
    /// Encodes and decodes `input` (which must have the data's shape), keeping the tape.
    pub fn pass(&mut self, input: Activation, mode: Mode, rng: &mut Rng) -> Result<CriticPass> {
        let target = input.value.with_empty_tape();
        let code = run(&mut self.encoder, input, mode, rng)?;
        let codes = code.value.with_empty_tape();
        let reconstruction = run(&mut self.decoder, code, mode, rng)?.value;
        Ok(CriticPass {
            codes,
            reconstruction,
            target,
        })
    }
    /// Describes both stacks.
    pub fn describe(&self) -> String {
        format!(
            "  discriminator encoder {} -> {}:\n{}\n  discriminator decoder {} -> {} (read as {}):\n{}",
            self.encoder.input_shape(),
            self.encoder.output_shape(),
            describe_stack(&self.encoder),
            self.decoder.input_shape(),
            self.decoder.output_shape(),
            self.data_shape,
            describe_stack(&self.decoder),
        )
    }
}

impl Parameterized for AutoencoderCritic {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.encoder.named_params(), "encoder");
        all.extend(prefixed(self.decoder.named_params(), "decoder"));
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = prefixed(self.encoder.named_params_mut(), "encoder");
        all.extend(prefixed(self.decoder.named_params_mut(), "decoder"));
        all
    }
}

/// BEGAN's `L(v) = mean |v - D(v)|` over samples and features, on the tape.
pub fn l1_reconstruction(pass: CriticPass) -> Scalar {
    (pass.reconstruction - pass.target).abs().mean()
}

/// Per-sample mean squared reconstruction error `mean_j (D(v)_j - v_j)²`, `[batch]`, on the tape
/// (EBGAN's energy).
pub fn mse_energy(pass: CriticPass) -> Vector<Tape> {
    (pass.reconstruction - pass.target).square().mean::<(usize,), Axis<1>>()
}

/// The default generator: `latent -> hidden -> hidden -> data`, LeakyReLU(0.2), with the output
/// activation that fits the data's range.
pub(crate) fn default_generator(data: &DataInfo, hidden: usize) -> SequentialConfig {
    mlp(&[hidden, hidden], data.sample_shape.numel(), output_activation(data))
}

/// Config of [`Began`], `type = "began"` in pipeline files. Stacks left out are MLPs sized from
/// the data: generator latent-h-h-data (LeakyReLU(0.2), output activation from the data's range),
/// discriminator encoder data-h-code and decoder code-h-data (linear output).
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BeganConfig {
    /// Size of the latent code.
    pub latent_dim: usize,
    /// Distribution of the latent code.
    pub latent: Latent,
    /// Width of the hidden layers of the default stacks.
    pub hidden_dim: usize,
    /// Width of the discriminator's code in the default encoder and decoder.
    pub code_dim: usize,
    /// The generator, from `[latent_dim]` to one sample (default: MLP).
    pub generator: Option<SequentialConfig>,
    /// The discriminator's encoder, from one sample to a code (default: MLP).
    pub encoder: Option<SequentialConfig>,
    /// The discriminator's decoder, from the code back to one sample (default: MLP).
    pub decoder: Option<SequentialConfig>,
    /// The diversity ratio γ = E[L(G(z))] / E[L(x)] the equilibrium aims at, in (0, 1].
    pub gamma: f64,
    /// The learning rate λ_k of the equilibrium term k_t.
    pub lambda_k: f64,
    /// The initial k_0, in [0, 1].
    pub k_init: f64,
}

impl Default for BeganConfig {
    fn default() -> Self {
        BeganConfig {
            latent_dim: 32,
            latent: Latent::Normal,
            hidden_dim: 128,
            code_dim: 32,
            generator: None,
            encoder: None,
            decoder: None,
            gamma: 0.5,
            lambda_k: 0.001,
            k_init: 0.0,
        }
    }
}

/// Checks the sizes every autoencoder-in-a-GAN config shares.
pub(crate) fn check_sizes(latent_dim: usize, hidden_dim: usize, code_dim: Option<usize>) -> Result<()> {
    if latent_dim == 0 {
        return Err(Error::config("model.latent_dim", "must be at least 1"));
    }
    if hidden_dim == 0 {
        return Err(Error::config("model.hidden_dim", "must be at least 1"));
    }
    if code_dim == Some(0) {
        return Err(Error::config("model.code_dim", "must be at least 1"));
    }
    Ok(())
}

impl BeganConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_began(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Began> {
        check_sizes(self.latent_dim, self.hidden_dim, Some(self.code_dim))?;
        self.latent.check("model.latent")?;
        if !(self.gamma.is_finite() && self.gamma > 0.0 && self.gamma <= 1.0) {
            return Err(Error::config(
                "model.gamma",
                format!("the diversity ratio must lie in (0, 1], got {}", self.gamma),
            ));
        }
        if !(self.lambda_k.is_finite() && self.lambda_k >= 0.0) {
            return Err(Error::config(
                "model.lambda_k",
                format!("must be a finite number >= 0, got {}", self.lambda_k),
            ));
        }
        if !(0.0..=1.0).contains(&self.k_init) {
            return Err(Error::config(
                "model.k_init",
                format!("must lie in [0, 1], got {}", self.k_init),
            ));
        }
        let data_shape = data.sample_shape;
        let n = data_shape.numel();
        let h = self.hidden_dim;
        let (default_g, default_e, default_d) = (
            default_generator(data, h),
            mlp(&[h], self.code_dim, None),
            mlp(&[h], n, None),
        );
        let generator = build_stack(
            stack_or(&self.generator, &default_g),
            FeatureShape::Flat(self.latent_dim),
            Some((n, "one data sample")),
            ctx,
            "model.generator",
        )?;
        let critic = AutoencoderCritic::build(
            stack_or(&self.encoder, &default_e),
            stack_or(&self.decoder, &default_d),
            data_shape,
            ctx,
            "model",
        )?;
        Ok(Began {
            generator,
            critic,
            latent: self.latent,
            latent_dim: self.latent_dim,
            data_shape,
            gamma: self.gamma,
            lambda_k: self.lambda_k,
            k: self.k_init,
        })
    }
}

#[typetag::serde(name = "began")]
impl ModelConfig for BeganConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_began(data, ctx)?))
    }
}

/// BEGAN. Parameter groups `discriminator` (names `discriminator.encoder.*`,
/// `discriminator.decoder.*`) and `generator` (`generator.*`). The equilibrium term k_t is model
/// state and is saved in checkpoints ([`Model::extra_state`]).
///
/// Stabilizers: discriminator inputs pass through `transform_input` (the reconstruction target is
/// the transformed input), generator steps collect extra terms at [`LossSite::Generator`], and
/// both groups update through `apply_gradients`. The discriminator is an autoencoder, not a
/// scorer, so no terms are requested at [`LossSite::Discriminator`] (gradient penalties on a score
/// do not apply) and there are no real/fake targets to transform.
pub struct Began {
    generator: Sequential,
    critic: AutoencoderCritic,
    latent: Latent,
    latent_dim: usize,
    data_shape: FeatureShape,
    gamma: f64,
    lambda_k: f64,
    k: f64,
}

/// BEGAN's equilibrium update and convergence measure from one discriminator update's
/// reconstruction errors: returns `(k_{t+1}, M)`.
pub fn began_update(k: f64, gamma: f64, lambda_k: f64, real_loss: f64, fake_loss: f64) -> (f64, f64) {
    let balance = gamma * real_loss - fake_loss;
    ((k + lambda_k * balance).clamp(0.0, 1.0), real_loss + balance.abs())
}

/// What a BEGAN discriminator update measured.
struct BeganDStep {
    loss: f64,
    real: f64,
    fake: f64,
    grad_norm: f64,
}

impl Began {
    /// The equilibrium term k_t.
    pub fn k(&self) -> f64 {
        self.k
    }
    /// The autoencoder discriminator.
    pub fn critic(&self) -> &AutoencoderCritic {
        &self.critic
    }
    /// Draws `n` latent codes.
    fn sample_latent(&self, n: usize, device: &Device, rng: &mut Rng) -> Matrix {
        self.latent.sample(n, self.latent_dim, device, rng)
    }
    /// Runs the generator on `n` fresh codes, on the tape.
    fn generate(&mut self, n: usize, mode: Mode, device: &Device, rng: &mut Rng) -> Result<Activation> {
        let z = self.sample_latent(n, device, rng);
        run_const(
            &mut self.generator,
            &z,
            FeatureShape::Flat(self.latent_dim),
            self.data_shape,
            mode,
            rng,
        )
    }

    /// `L_D = L(x) - k_t L(G(z))` with the fakes detached; updates only the discriminator.
    fn discriminator_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<BeganDStep> {
        let real_in = data_input("began", &batch.inputs, self.data_shape)?;
        let fake = self.generate(batch.len(), Mode::Train, ctx.device, ctx.rng)?.detach();
        let fake_in = Activation::data(&fake, self.data_shape)?;
        let (real_in, fake_in) = {
            let (stabilizers, mut hooks) = ctx.hooks();
            let r = stabilizers.transform_input(InputRole::Real, real_in, &mut hooks)?;
            let f = stabilizers.transform_input(InputRole::Fake, fake_in, &mut hooks)?;
            (r, f)
        };
        let real = l1_reconstruction(self.critic.pass(real_in, Mode::Train, ctx.rng)?);
        let fake = l1_reconstruction(self.critic.pass(fake_in, Mode::Train, ctx.rng)?);
        let (real_v, fake_v) = (
            finite("began/real_reconstruction", &real)?,
            finite("began/fake_reconstruction", &fake)?,
        );
        let loss = real - fake * (self.k as f32);
        let value = finite("loss/discriminator", &loss)?;
        let grads = loss.backward();
        let mut params = prefixed(self.critic.named_params_mut(), "discriminator");
        let grad_norm = ctx.apply_gradients("discriminator", &mut params, grads)?;
        Ok(BeganDStep {
            loss: value,
            real: real_v,
            fake: fake_v,
            grad_norm,
        })
    }

    /// `L_G = L(G(z))` through the discriminator; updates only the generator.
    fn generator_step(&mut self, n: usize, ctx: &mut TrainContext<'_>, report: &mut StepReport) -> Result<()> {
        let fake = self.generate(n, Mode::Train, ctx.device, ctx.rng)?;
        let fake_in = {
            let (stabilizers, mut hooks) = ctx.hooks();
            stabilizers.transform_input(InputRole::Fake, fake, &mut hooks)?
        };
        let mut loss = l1_reconstruction(self.critic.pass(fake_in, Mode::Train, ctx.rng)?);
        report.loss("loss/generator", finite("loss/generator", &loss)?);
        let (stabilizers, mut hooks) = ctx.hooks();
        for (name, term) in stabilizers.extra_losses(&mut LossSite::Generator, &mut hooks)? {
            let key = format!("loss/generator/{name}");
            report.loss(key.clone(), finite(&key, &term)?);
            loss = loss + term;
        }
        let grads = loss.backward();
        let mut params = prefixed(self.generator.named_params_mut(), "generator");
        let norm = ctx.apply_gradients("generator", &mut params, grads)?;
        report.diagnostic("grad_norm/generator", norm);
        Ok(())
    }

    /// `L(v)` in eval mode for constant samples.
    fn reconstruction_error(&mut self, x: &Matrix, rng: &mut Rng) -> Result<f64> {
        let input = Activation::data(x, self.data_shape)?;
        Ok(l1_reconstruction(self.critic.pass(input, Mode::Eval, rng)?).array() as f64)
    }
}

impl Parameterized for Began {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.critic.named_params(), "discriminator");
        all.extend(prefixed(self.generator.named_params(), "generator"));
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = prefixed(self.critic.named_params_mut(), "discriminator");
        all.extend(prefixed(self.generator.named_params_mut(), "generator"));
        all
    }
}

impl Model for Began {
    fn family(&self) -> &str {
        "gan"
    }
    fn describe(&self) -> String {
        format!(
            "began: latent {} ({:?}), gamma {}, lambda_k {}, k {}, data {}\n  generator {} -> {}:\n{}\n{}",
            self.latent_dim,
            self.latent,
            self.gamma,
            self.lambda_k,
            self.k,
            self.data_shape,
            self.generator.input_shape(),
            self.generator.output_shape(),
            describe_stack(&self.generator),
            self.critic.describe(),
        )
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["discriminator".into(), "generator".into()]
    }
    /// One discriminator update, the k_t update from its reconstruction errors, then one
    /// generator update. Reports `began/k` (after the update) and `began/convergence`.
    /// Runs the discriminator's single update only when the stabilizers' schedule (from 1, capped at 1,
    /// reported as `discriminator_steps`) keeps it: an adaptive step ratio may skip it (0); it
    /// cannot add updates. Unrolling is refused. A skipped update leaves k_t as it is (its
    /// reconstruction errors are not measured).
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        non_empty("began", batch)?;
        refuse_unrolling("began", ctx)?;
        refuse_sample_selection("began", ctx)?;
        let mut report = StepReport::default();
        if schedule_discriminator_steps(1, 1, ctx, &mut report) == 1 {
            let d = self.discriminator_step(batch, ctx)?;
            let (k, convergence) = began_update(self.k, self.gamma, self.lambda_k, d.real, d.fake);
            self.k = k;
            report.loss("loss/discriminator", d.loss);
            report.diagnostic("began/real_reconstruction", d.real);
            report.diagnostic("began/fake_reconstruction", d.fake);
            report.diagnostic("began/convergence", convergence);
            report.diagnostic("grad_norm/discriminator", d.grad_norm);
        }
        report.diagnostic("began/k", self.k);
        self.generator_step(batch.len(), ctx, &mut report)?;
        Ok(report)
    }
    /// Reconstruction errors of real and fresh generated samples, the losses they give with the
    /// current k_t, and the convergence measure; no updates.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        non_empty("began evaluation", batch)?;
        data_input("began", &batch.inputs, self.data_shape)?;
        let fake = self.generate(batch.len(), Mode::Eval, ctx.device, ctx.rng)?.detach();
        let real = self.reconstruction_error(&batch.inputs, ctx.rng)?;
        let fake = self.reconstruction_error(&fake, ctx.rng)?;
        let (_, convergence) = began_update(self.k, self.gamma, self.lambda_k, real, fake);
        Ok(BTreeMap::from([
            ("loss/discriminator".to_string(), real - self.k * fake),
            ("loss/generator".to_string(), fake),
            ("began/real_reconstruction".to_string(), real),
            ("began/fake_reconstruction".to_string(), fake),
            ("began/convergence".to_string(), convergence),
        ]))
    }
    fn sample(&mut self, n: usize, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        Ok(Some(self.generate(n, Mode::Eval, ctx.device, ctx.rng)?.detach()))
    }
    fn reestimates_statistics(&self, group: &str) -> bool {
        group == "generator"
    }
    fn reestimate_statistics(
        &mut self,
        group: &str,
        batches: usize,
        batch_size: usize,
        ctx: &mut EvalContext<'_>,
    ) -> Result<bool> {
        if group != "generator" {
            return Ok(false);
        }
        reestimate_statistics(
            self,
            |gan| &mut gan.generator,
            batches,
            |gan| gan.generate(batch_size, Mode::Train, ctx.device, ctx.rng).map(drop),
        )?;
        Ok(true)
    }
    fn extra_state(&self) -> StateDict {
        let mut state = StateDict::default();
        state.meta.insert("k".into(), nash_core::serde_json::json!(self.k));
        state
    }
    fn load_extra_state(&mut self, state: &StateDict) -> Result<()> {
        let k: f64 = state.meta("k")?;
        if !(0.0..=1.0).contains(&k) {
            return Err(Error::state("k", format!("BEGAN's k_t must lie in [0, 1], found {k}")));
        }
        self.k = k;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nash_core::optim::adam::AdamConfig;
    use nash_core::optim::sgd::SgdConfig;
    use nash_core::optim::{Optimizer, OptimizerConfig};
    use nash_core::rand::{Rng as _, SeedableRng};
    use nash_core::stabilizer::StabilizerStack;

    /// Data description for `n` features in `[-1, 1]`.
    pub(crate) fn info(n: usize) -> DataInfo {
        DataInfo {
            sample_shape: FeatureShape::Flat(n),
            num_classes: None,
            value_range: (-1.0, 1.0),
        }
    }

    /// One optimizer of `cfg` per group.
    pub(crate) fn optimizers(groups: &[&str], cfg: &dyn OptimizerConfig) -> BTreeMap<String, Box<dyn Optimizer>> {
        groups.iter().map(|g| (g.to_string(), cfg.build().unwrap())).collect()
    }

    /// SGD(0.1) per group.
    pub(crate) fn sgd(groups: &[&str]) -> BTreeMap<String, Box<dyn Optimizer>> {
        optimizers(
            groups,
            &SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
    }

    /// Adam(lr) per group.
    pub(crate) fn adam(groups: &[&str], lr: f64) -> BTreeMap<String, Box<dyn Optimizer>> {
        optimizers(
            groups,
            &AdamConfig {
                lr,
                betas: [0.5, 0.999],
                ..Default::default()
            },
        )
    }

    /// Uniform data in `[-1, 1]`.
    pub(crate) fn batch(device: &Device, rows: usize, dim: usize, rng: &mut Rng) -> Batch {
        let values: Vec<f32> = (0..rows * dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        Batch {
            inputs: device.tensor_from_vec(values, (rows, dim)),
            shape: FeatureShape::Flat(dim),
            labels: None,
        }
    }

    /// A batch of `rows` points on a noisy 1-D curve in `dim` dimensions (learnable structure).
    pub(crate) fn curve_batch(device: &Device, rows: usize, dim: usize, rng: &mut Rng) -> Batch {
        let mut values = Vec::with_capacity(rows * dim);
        for _ in 0..rows {
            let t: f32 = rng.gen_range(-1.0f32..1.0);
            for j in 0..dim {
                values.push(0.8 * (t * (j as f32 + 1.0)).sin() + 0.02 * rng.gen_range(-1.0f32..1.0));
            }
        }
        Batch {
            inputs: device.tensor_from_vec(values, (rows, dim)),
            shape: FeatureShape::Flat(dim),
            labels: None,
        }
    }

    /// Every parameter's values by name.
    pub(crate) fn snapshot(model: &dyn Model) -> BTreeMap<String, Vec<f32>> {
        model.named_params().into_iter().map(|(n, p)| (n, p.to_vec())).collect()
    }

    /// Names of the parameters that differ between two snapshots (sorted).
    pub(crate) fn changed(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> Vec<String> {
        a.iter().filter(|(k, v)| b[*k] != **v).map(|(k, _)| k.clone()).collect()
    }

    /// Names starting with `prefix`, sorted.
    pub(crate) fn names_with(model: &dyn Model, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = model
            .named_params()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with(prefix))
            .collect();
        v.sort();
        v
    }

    /// Runs `steps` training steps on curve data, returning every report.
    pub(crate) fn train(
        model: &mut dyn Model,
        opts: &mut BTreeMap<String, Box<dyn Optimizer>>,
        dim: usize,
        steps: u64,
        seed: u64,
    ) -> Vec<StepReport> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(seed);
        let mut stabilizers = StabilizerStack::default();
        (0..steps)
            .map(|step| {
                let data = curve_batch(&device, 32, dim, &mut rng);
                let mut ctx = TrainContext {
                    step,
                    device: &device,
                    rng: &mut rng,
                    optimizers: opts,
                    stabilizers: &mut stabilizers,
                };
                let report = model.train_step(&data, &mut ctx).unwrap();
                assert!(report.first_non_finite().is_none(), "step {step}: {report:?}");
                report
            })
            .collect()
    }

    /// Mean of `key` (a loss or diagnostic) over `reports`.
    pub(crate) fn mean_of(reports: &[StepReport], key: &str) -> f64 {
        reports
            .iter()
            .map(|r| r.losses.get(key).or_else(|| r.diagnostics.get(key)).copied().unwrap())
            .sum::<f64>()
            / reports.len() as f64
    }

    fn tiny() -> BeganConfig {
        BeganConfig {
            latent_dim: 3,
            hidden_dim: 16,
            code_dim: 4,
            ..Default::default()
        }
    }

    fn build(cfg: &BeganConfig, dim: usize) -> Result<Began> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        cfg.build_began(
            &info(dim),
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    }

    #[test]
    fn equilibrium_update_and_convergence_measure_match_hand_computation() {
        // k = 0.3, γ = 0.5, λ = 0.1, L(x) = 0.8, L(G(z)) = 0.2:
        // balance = 0.5·0.8 - 0.2 = 0.2; k' = 0.3 + 0.1·0.2 = 0.32; M = 0.8 + |0.2| = 1.0.
        let (k, m) = began_update(0.3, 0.5, 0.1, 0.8, 0.2);
        assert!((k - 0.32).abs() < 1e-12 && (m - 1.0).abs() < 1e-12, "{k} {m}");
        // Negative balance: 0.5·0.2 - 0.6 = -0.5; k' = 0.3 - 0.05 = 0.25; M = 0.2 + 0.5 = 0.7.
        let (k, m) = began_update(0.3, 0.5, 0.1, 0.2, 0.6);
        assert!((k - 0.25).abs() < 1e-12 && (m - 0.7).abs() < 1e-12, "{k} {m}");
        // Clipped to [0, 1].
        assert_eq!(began_update(0.0, 0.5, 1.0, 0.0, 5.0).0, 0.0);
        assert_eq!(began_update(0.99, 1.0, 1.0, 5.0, 0.0).0, 1.0);
    }

    #[test]
    fn a_training_step_reports_k_and_convergence_from_its_reconstruction_errors() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(1);
        let mut cfg = tiny();
        cfg.lambda_k = 0.5;
        cfg.k_init = 0.25;
        let mut model = build(&cfg, 5).unwrap();
        let data = batch(&device, 8, 5, &mut rng);
        let mut opts = sgd(&["discriminator", "generator"]);
        let mut stabilizers = StabilizerStack::default();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        let before = snapshot(&model);
        let r = model.train_step(&data, &mut ctx).unwrap();
        let (real, fake) = (
            r.diagnostics["began/real_reconstruction"],
            r.diagnostics["began/fake_reconstruction"],
        );
        // Hand computation from the step's own reconstruction errors.
        let balance = 0.5 * real - fake;
        let want_k = (0.25 + 0.5 * balance).clamp(0.0, 1.0);
        assert!((r.diagnostics["began/k"] - want_k).abs() < 1e-9, "{r:?}");
        assert!((model.k() - want_k).abs() < 1e-9);
        assert!((r.diagnostics["began/convergence"] - (real + balance.abs())).abs() < 1e-9);
        // L_D = L(x) - k_0 L(G(z)) with the k before the update.
        assert!(
            (r.losses["loss/discriminator"] - (real - 0.25 * fake)).abs() < 1e-5,
            "{r:?}"
        );
        // The reconstruction error is a mean absolute value: check it by hand for the real batch
        // on the updated model, through the public critic.
        let x = data.inputs.as_vec();
        let mut m = model;
        let pass = m
            .critic
            .pass(
                Activation::input(&data.inputs, FeatureShape::Flat(5)).unwrap(),
                Mode::Eval,
                &mut rng,
            )
            .unwrap();
        let recon = pass.reconstruction.retaped::<NoneTape>().as_vec();
        let hand = x.iter().zip(&recon).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / x.len() as f64;
        assert!((l1_reconstruction(pass).array() as f64 - hand).abs() < 1e-6);
        // Both groups moved.
        let after = snapshot(&m);
        let moved = changed(&before, &after);
        assert!(moved.iter().any(|n| n.starts_with("discriminator.encoder.")));
        assert!(moved.iter().any(|n| n.starts_with("discriminator.decoder.")));
        assert!(moved.iter().any(|n| n.starts_with("generator.")));
    }

    #[test]
    fn k_stays_in_the_unit_interval_and_round_trips_through_extra_state() {
        let mut cfg = tiny();
        cfg.lambda_k = 10.0; // large steps hit both clips
        cfg.gamma = 1.0;
        let mut model = build(&cfg, 4).unwrap();
        let mut opts = adam(&["discriminator", "generator"], 1e-2);
        let reports = train(&mut model, &mut opts, 4, 30, 2);
        for r in &reports {
            let k = r.diagnostics["began/k"];
            assert!((0.0..=1.0).contains(&k), "{k}");
        }
        let state = model.extra_state();
        let mut other = build(&cfg, 4).unwrap();
        assert_eq!(other.k(), 0.0);
        other.load_extra_state(&state).unwrap();
        assert_eq!(other.k(), model.k());
        // The JSON round trip the checkpoint goes through keeps it.
        let json = nash_core::serde_json::to_string(&state).unwrap();
        let back: StateDict = nash_core::serde_json::from_str(&json).unwrap();
        other.load_extra_state(&back).unwrap();
        assert_eq!(other.k(), model.k());
        // Out-of-range and missing values are refused by key.
        let mut bad = StateDict::default();
        bad.put_meta("k", 1.5).unwrap();
        assert!(other.load_extra_state(&bad).unwrap_err().to_string().contains('k'));
        assert!(other.load_extra_state(&StateDict::default()).is_err());
    }

    #[test]
    fn losses_are_finite_and_the_discriminator_learns_to_reconstruct() {
        let mut model = build(&tiny(), 6).unwrap();
        let mut opts = adam(&["discriminator", "generator"], 3e-3);
        let reports = train(&mut model, &mut opts, 6, 60, 3);
        let early = mean_of(&reports[..10], "began/real_reconstruction");
        let late = mean_of(&reports[50..], "began/real_reconstruction");
        assert!(late < 0.8 * early, "L(x) {early} -> {late}");
        let early = mean_of(&reports[..10], "loss/generator");
        let late = mean_of(&reports[50..], "loss/generator");
        assert!(
            (early - late).abs() > 1e-3,
            "generator loss did not move: {early} {late}"
        );
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(9);
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let eval = model
            .evaluate(&curve_batch(&device, 16, 6, ectx.rng), &mut ectx)
            .unwrap();
        assert!(eval.values().all(|v| v.is_finite()), "{eval:?}");
        assert_eq!(*model.sample(3, &mut ectx).unwrap().unwrap().shape(), (3, 6));
    }

    #[test]
    fn wiring_errors_name_config_paths() {
        let mut cfg = tiny();
        cfg.generator = Some(mlp(&[4], 3, None));
        let err = build(&cfg, 5).err().unwrap().to_string();
        assert!(
            err.contains("model.generator") && err.contains("out_features 5"),
            "{err}"
        );
        let mut cfg = tiny();
        cfg.decoder = Some(mlp(&[4], 2, None));
        let err = build(&cfg, 5).err().unwrap().to_string();
        assert!(err.contains("model.decoder") && err.contains("out_features 5"), "{err}");
        for (field, cfg) in [
            ("model.gamma", BeganConfig { gamma: 0.0, ..tiny() }),
            (
                "model.lambda_k",
                BeganConfig {
                    lambda_k: -1.0,
                    ..tiny()
                },
            ),
            ("model.k_init", BeganConfig { k_init: 2.0, ..tiny() }),
            (
                "model.latent_dim",
                BeganConfig {
                    latent_dim: 0,
                    ..tiny()
                },
            ),
        ] {
            let err = build(&cfg, 5).err().unwrap().to_string();
            assert!(err.contains(field), "{err}");
        }
        let json = r#"{"type": "began", "gama": 0.5}"#;
        let err = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gama"), "{err}");
        let mut model = build(&tiny(), 5).unwrap();
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let wrong = batch(&device, 4, 3, &mut rng);
        let err = model
            .evaluate(
                &wrong,
                &mut EvalContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 features per sample"), "{err}");
    }
}
