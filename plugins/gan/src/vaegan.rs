//! `vae_gan`: the VAE-GAN of Larsen et al. 2016, "Autoencoding beyond pixels using a learned
//! similarity metric": a VAE whose reconstruction error is measured in the feature space of a
//! GAN discriminator.
//!
//! Networks: an encoder (a trunk, then two linear heads giving `μ(x)` and `log σ²(x)`), a
//! decoder that is also the generator, and a discriminator `D` whose hidden layer
//! `feature_layer` gives the features `D_l`. With a data batch `x` of `N` samples,
//! `z = μ + exp(½ log σ²) ⊙ ε`, `x̃ = Dec(z)`, `z_p ~ N(0, I)`, `x_p = Dec(z_p)`, and
//! `ℓ_D`, `ℓ_G` the configured objective's discriminator and generator losses
//! (`non_saturating`: `ℓ_D(r, f) = BCE(r, 1) + BCE(f, 0)`, `ℓ_G(f) = BCE(f, 1)`), the exact
//! equations used are:
//!
//! - prior: `L_prior = 1/N Σ_i Σ_j ½ (μ_ij² + σ_ij² - 1 - log σ_ij²)` (closed-form KL to `N(0, I)`);
//! - feature reconstruction, the negative log-likelihood of `D_l(x)` under a unit-variance
//!   Gaussian centred on `D_l(x̃)` up to its constant (a squared error summed over the features,
//!   like the KL is summed over latent dimensions, so neither drowns the other as widths change):
//!   `L_llike = 1/N Σ_i Σ_k ½ (D_l(x̃)_ik - D_l(x)_ik)²`;
//! - discriminator: `L_GAN^D = ½ [ℓ_D(D(x), D(x̃)) + ℓ_D(D(x), D(x_p))]`;
//! - decoder's adversarial part: `L_GAN^Dec = ½ [ℓ_G(D(x̃)) + ℓ_G(D(x_p))]` (the non-saturating
//!   form of the paper's `-L_GAN`).
//!
//! Updates, each from its own forward pass, in this order within a step:
//! discriminator `∇ L_GAN^D`, encoder `∇ (L_prior + L_llike)`, decoder
//! `∇ (γ L_llike + L_GAN^Dec)`. `D_l(x)` is a constant target in the encoder and decoder updates.

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::{reestimate_statistics, BuildContext, ForwardContext, Mode, Sequential, SequentialConfig};
use nash_core::loss::{AdversarialObjective, AdversarialObjectiveConfig};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::rand_distr::{Distribution, StandardNormal};
use nash_core::stabilizer::{InputRole, LossSite, Targets};
use nash_core::tensor::{Activation, Device, FeatureShape, Matrix, Param, Parameterized, Rng, Scalar, Tape};
use serde::{Deserialize, Serialize};

use crate::began::{
    build_stack, check_sizes, data_input, default_generator, describe_stack, finite, non_empty, prefixed, run, stack_or,
};
use crate::mlp_gan::mlp;
use crate::objective::NonSaturatingConfig;
use crate::step::{refuse_sample_selection, refuse_unrolling, schedule_discriminator_steps};

/// The closed-form KL divergence of `N(μ, diag σ²)` from `N(0, I)`, summed over latent
/// dimensions and averaged over the batch: `1/N Σ_ij ½ (μ² + e^{log σ²} - 1 - log σ²)`.
pub fn kl_divergence(mu: Matrix<Tape>, logvar: Matrix<Tape>) -> Scalar {
    let n = mu.shape().0.max(1) as f32;
    let lv = logvar.with_empty_tape();
    ((mu.square() + logvar.exp() - lv) - 1.0).sum::<(), _>() * (0.5 / n)
}

/// The feature reconstruction `1/N Σ_i Σ_k ½ (f_ik - t_ik)²` between features on the tape and
/// constant target features (the unit-variance Gaussian negative log-likelihood up to its
/// constant, averaged over the batch).
pub fn feature_reconstruction(features: Matrix<Tape>, target: &Matrix) -> Scalar {
    let n = features.shape().0.max(1) as f32;
    (features - target.clone()).square().sum::<(), _>() * (0.5 / n)
}

/// Config of [`VaeGan`], `type = "vae_gan"` in pipeline files. Stacks left out are MLPs sized
/// from the data: encoder trunk data-h (LeakyReLU(0.2)) then linear heads for μ and log σ²;
/// decoder latent-h-h-data (output activation from the data's range); discriminator
/// data-h-h-1 with LeakyReLU(0.2), whose layer 3 (the second hidden activation) gives the
/// features by default.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeGanConfig {
    /// Size of the latent code.
    pub latent_dim: usize,
    /// Width of the hidden layers of the default stacks.
    pub hidden_dim: usize,
    /// The encoder's trunk, from one sample to the features the μ and log σ² heads read
    /// (default: MLP). The heads are linear layers of `latent_dim` outputs, built here.
    pub encoder: Option<SequentialConfig>,
    /// The decoder (generator), from `[latent_dim]` to one sample (default: MLP).
    pub decoder: Option<SequentialConfig>,
    /// The discriminator, from one sample to one raw score (default: MLP).
    pub discriminator: Option<SequentialConfig>,
    /// Index of the discriminator layer whose output is the feature space `D_l` the
    /// reconstruction is measured in.
    pub feature_layer: usize,
    /// Weight γ of the feature reconstruction in the decoder's loss, against the GAN term.
    pub gamma: f64,
    /// The adversarial objective.
    pub objective: Box<dyn AdversarialObjectiveConfig>,
}

impl Default for VaeGanConfig {
    fn default() -> Self {
        VaeGanConfig {
            latent_dim: 32,
            hidden_dim: 128,
            encoder: None,
            decoder: None,
            discriminator: None,
            feature_layer: 3,
            gamma: 1.0,
            objective: Box::new(NonSaturatingConfig::default()),
        }
    }
}

impl VaeGanConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_vae_gan(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<VaeGan> {
        check_sizes(self.latent_dim, self.hidden_dim, None)?;
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return Err(Error::config(
                "model.gamma",
                format!("must be a finite number >= 0, got {}", self.gamma),
            ));
        }
        let data_shape = data.sample_shape;
        let n = data_shape.numel();
        let (h, l) = (self.hidden_dim, self.latent_dim);
        let mut default_trunk = mlp(&[h], 1, None);
        default_trunk.layers.pop(); // data-h with LeakyReLU, no output layer
        let (default_dec, default_d) = (default_generator(data, h), mlp(&[h, h], 1, None));
        let trunk = build_stack(
            stack_or(&self.encoder, &default_trunk),
            data_shape,
            None,
            ctx,
            "model.encoder",
        )?;
        let head = SequentialConfig::new(vec![Box::new(LinearConfig::new(l))]);
        let mu = head.build(trunk.output_shape(), ctx, "model.encoder (mu head)")?;
        let logvar = head.build(trunk.output_shape(), ctx, "model.encoder (logvar head)")?;
        let decoder = build_stack(
            stack_or(&self.decoder, &default_dec),
            FeatureShape::Flat(l),
            Some((n, "one data sample")),
            ctx,
            "model.decoder",
        )?;
        let discriminator = build_stack(
            stack_or(&self.discriminator, &default_d),
            data_shape,
            Some((1, "one raw score")),
            ctx,
            "model.discriminator",
        )?;
        if self.feature_layer >= discriminator.len() {
            return Err(Error::config(
                "model.feature_layer",
                format!(
                    "the discriminator has {} layers (indices 0..{}): {}; pick the index of a hidden layer",
                    discriminator.len(),
                    discriminator.len().saturating_sub(1),
                    discriminator.summary().join(", ")
                ),
            ));
        }
        Ok(VaeGan {
            trunk,
            mu,
            logvar,
            decoder,
            discriminator,
            objective: self.objective.build()?,
            feature_layer: self.feature_layer,
            gamma: self.gamma as f32,
            latent_dim: l,
            data_shape,
        })
    }
}

#[typetag::serde(name = "vae_gan")]
impl ModelConfig for VaeGanConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_vae_gan(data, ctx)?))
    }
}

/// VAE-GAN. Parameter groups `encoder` (`encoder.trunk.*`, `encoder.mu.*`, `encoder.logvar.*`),
/// `decoder` (`decoder.*`) and `discriminator` (`discriminator.*`).
///
/// Stabilizers: discriminator inputs pass through `transform_input` (`real` for `x`, `fake` for
/// `x̃` and `x_p`; the feature reconstruction uses untransformed samples), targets through
/// `transform_targets` (shared by both fake kinds), extra terms are collected at
/// [`LossSite::Discriminator`] (with `x` and the prior samples `x_p`) and, for the decoder, at
/// [`LossSite::Generator`].
pub struct VaeGan {
    trunk: Sequential,
    mu: Sequential,
    logvar: Sequential,
    decoder: Sequential,
    discriminator: Sequential,
    objective: Box<dyn AdversarialObjective>,
    feature_layer: usize,
    gamma: f32,
    latent_dim: usize,
    data_shape: FeatureShape,
}

/// The parameters of group `encoder`: `encoder.trunk.*`, `encoder.mu.*`, `encoder.logvar.*`.
fn encoder_group<'a>(
    trunk: &'a mut Sequential,
    mu: &'a mut Sequential,
    logvar: &'a mut Sequential,
) -> Vec<(String, &'a mut Param)> {
    let mut all = prefixed(trunk.named_params_mut(), "encoder.trunk");
    all.extend(prefixed(mu.named_params_mut(), "encoder.mu"));
    all.extend(prefixed(logvar.named_params_mut(), "encoder.logvar"));
    all
}

/// Standard normal noise `[rows, cols]`.
fn normal(rows: usize, cols: usize, device: &Device, rng: &mut Rng) -> Matrix {
    let v: Vec<f32> = (0..rows * cols).map(|_| StandardNormal.sample(rng)).collect();
    device.tensor_from_vec(v, (rows, cols))
}

impl VaeGan {
    /// The discriminator.
    pub fn discriminator(&self) -> &Sequential {
        &self.discriminator
    }
    /// `(μ(x), log σ²(x))` on the tape (one shared trunk pass).
    fn encode(&mut self, x: &Matrix, mode: Mode, rng: &mut Rng) -> Result<(Matrix<Tape>, Matrix<Tape>)> {
        let h = run(&mut self.trunk, data_input("vae_gan", x, self.data_shape)?, mode, rng)?;
        let mu = run(&mut self.mu, h.reuse(), mode, rng)?.value;
        let logvar = run(&mut self.logvar, h, mode, rng)?.value;
        Ok((mu, logvar))
    }
    /// `z = μ + exp(½ log σ²) ⊙ ε` with fresh `ε`.
    fn reparameterize(mu: Matrix<Tape>, logvar: Matrix<Tape>, device: &Device, rng: &mut Rng) -> Matrix<Tape> {
        let (n, l) = *mu.shape();
        let eps = normal(n, l, device, rng);
        mu + (logvar * 0.5).exp() * eps
    }
    /// `Dec(z)` on the tape, read as data samples.
    fn decode(&mut self, z: Matrix<Tape>, mode: Mode, rng: &mut Rng) -> Result<Activation> {
        let out = run(
            &mut self.decoder,
            Activation::new(z, FeatureShape::Flat(self.latent_dim))?,
            mode,
            rng,
        )?;
        Activation::new(out.value, self.data_shape)
    }
    /// A posterior sample `z ~ q(z | x)` without tape.
    fn posterior_sample(&mut self, x: &Matrix, device: &Device, rng: &mut Rng) -> Result<Matrix> {
        let (mu, logvar) = self.encode(x, Mode::Train, rng)?;
        let (mu, logvar) = (mu.retaped::<NoneTape>(), logvar.retaped::<NoneTape>());
        Ok(Self::reparameterize(mu.leaky_trace(), logvar.leaky_trace(), device, rng).retaped::<NoneTape>())
    }
    /// The discriminator's features `D_l(v)`: layers `0..=feature_layer`, on the tape.
    fn features(&mut self, v: Activation, mode: Mode, rng: &mut Rng) -> Result<Matrix<Tape>> {
        let mut x = v;
        let mut ctx = ForwardContext { mode, rng };
        for layer in &mut self.discriminator.layers_mut()[..=self.feature_layer] {
            x = layer.forward(x, &mut ctx)?;
        }
        Ok(x.value)
    }
    /// Constant target features `D_l(x)`.
    fn target_features(&mut self, x: &Matrix, rng: &mut Rng) -> Result<Matrix> {
        let input = data_input("vae_gan", x, self.data_shape)?;
        Ok(self.features(input, Mode::Train, rng)?.retaped::<NoneTape>())
    }
    /// The discriminator's raw scores on `v`, on the tape.
    fn score(&mut self, v: Activation, rng: &mut Rng) -> Result<Matrix<Tape>> {
        Ok(run(&mut self.discriminator, v, Mode::Train, rng)?.value)
    }

    /// `L_GAN^D`; updates only the discriminator.
    fn discriminator_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>, report: &mut StepReport) -> Result<()> {
        let n = batch.len();
        let z = self.posterior_sample(&batch.inputs, ctx.device, ctx.rng)?;
        let recon = self.decode(z.leaky_trace(), Mode::Train, ctx.rng)?.detach();
        let prior = self
            .decode(
                normal(n, self.latent_dim, ctx.device, ctx.rng).leaky_trace(),
                Mode::Train,
                ctx.rng,
            )?
            .detach();
        let real_in = data_input("vae_gan", &batch.inputs, self.data_shape)?;
        let (real_in, recon_in, prior_in) = {
            let (stabilizers, mut hooks) = ctx.hooks();
            let r = stabilizers.transform_input(InputRole::Real, real_in, &mut hooks)?;
            let t =
                stabilizers.transform_input(InputRole::Fake, Activation::data(&recon, self.data_shape)?, &mut hooks)?;
            let p =
                stabilizers.transform_input(InputRole::Fake, Activation::data(&prior, self.data_shape)?, &mut hooks)?;
            (r, t, p)
        };
        let (real_seen, prior_seen, shape) = (real_in.detach(), prior_in.detach(), real_in.shape);
        let real_out = self.score(real_in, ctx.rng)?;
        let recon_out = self.score(recon_in, ctx.rng)?;
        let prior_out = self.score(prior_in, ctx.rng)?;
        let sig = |m: &Matrix<Tape>| {
            let v = m.retaped::<NoneTape>().as_vec();
            v.iter().map(|&l| 1.0 / (1.0 + (-(l as f64)).exp())).sum::<f64>() / v.len().max(1) as f64
        };
        report.diagnostic("d_real_mean", sig(&real_out));
        report.diagnostic("d_reconstruction_mean", sig(&recon_out));
        report.diagnostic("d_fake_mean", sig(&prior_out));
        let (stabilizers, mut hooks) = ctx.hooks();
        let mut targets = Targets {
            real: hooks.device.ones_like(real_out.shape()),
            fake: hooks.device.zeros_like(prior_out.shape()),
            fake_weight: 1.0,
        };
        stabilizers.transform_targets(&mut targets, &mut hooks)?;
        let real_again = real_out.with_empty_tape();
        let mut loss = (self
            .objective
            .discriminator_loss_with_targets(real_out, recon_out, &targets)?
            + self
                .objective
                .discriminator_loss_with_targets(real_again, prior_out, &targets)?)
            * 0.5;
        report.loss("loss/discriminator", finite("loss/discriminator", &loss)?);
        let terms = stabilizers.extra_losses(
            &mut LossSite::Discriminator {
                critic: &mut self.discriminator,
                real: &real_seen,
                fake: &prior_seen,
                shape,
            },
            &mut hooks,
        )?;
        for (name, term) in terms {
            let key = format!("loss/discriminator/{name}");
            report.loss(key.clone(), finite(&key, &term)?);
            loss = loss + term;
        }
        let grads = loss.backward();
        let mut params = prefixed(self.discriminator.named_params_mut(), "discriminator");
        let norm = ctx.apply_gradients("discriminator", &mut params, grads)?;
        report.diagnostic("grad_norm/discriminator", norm);
        Ok(())
    }

    /// `L_prior + L_llike`; updates only the encoder.
    fn encoder_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>, report: &mut StepReport) -> Result<()> {
        let target = self.target_features(&batch.inputs, ctx.rng)?;
        let (mu, logvar) = self.encode(&batch.inputs, Mode::Train, ctx.rng)?;
        let kl = kl_divergence(mu.with_empty_tape(), logvar.with_empty_tape());
        let z = Self::reparameterize(mu, logvar, ctx.device, ctx.rng);
        let recon = self.decode(z, Mode::Train, ctx.rng)?;
        let llike = feature_reconstruction(self.features(recon, Mode::Train, ctx.rng)?, &target);
        report.loss("loss/encoder/kl", finite("loss/encoder/kl", &kl)?);
        report.loss(
            "loss/encoder/feature_reconstruction",
            finite("loss/encoder/feature_reconstruction", &llike)?,
        );
        let loss = llike + kl;
        report.loss("loss/encoder", finite("loss/encoder", &loss)?);
        let grads = loss.backward();
        let mut params = self.encoder_params_mut();
        let norm = ctx.apply_gradients("encoder", &mut params, grads)?;
        report.diagnostic("grad_norm/encoder", norm);
        Ok(())
    }

    /// `γ L_llike + L_GAN^Dec`; updates only the decoder.
    fn decoder_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>, report: &mut StepReport) -> Result<()> {
        let n = batch.len();
        let target = self.target_features(&batch.inputs, ctx.rng)?;
        let real_scores = self
            .score(data_input("vae_gan", &batch.inputs, self.data_shape)?, ctx.rng)?
            .retaped::<NoneTape>();
        let z = self.posterior_sample(&batch.inputs, ctx.device, ctx.rng)?;
        let recon = self.decode(z.leaky_trace(), Mode::Train, ctx.rng)?;
        let prior = self.decode(
            normal(n, self.latent_dim, ctx.device, ctx.rng).leaky_trace(),
            Mode::Train,
            ctx.rng,
        )?;
        let llike = feature_reconstruction(self.features(recon.reuse(), Mode::Train, ctx.rng)?, &target);
        let (recon_in, prior_in) = {
            let (stabilizers, mut hooks) = ctx.hooks();
            let t = stabilizers.transform_input(InputRole::Fake, recon, &mut hooks)?;
            let p = stabilizers.transform_input(InputRole::Fake, prior, &mut hooks)?;
            (t, p)
        };
        let recon_out = self.score(recon_in, ctx.rng)?;
        let prior_out = self.score(prior_in, ctx.rng)?;
        let gan = (self.objective.generator_loss(recon_out, Some(&real_scores))?
            + self.objective.generator_loss(prior_out, Some(&real_scores))?)
            * 0.5;
        report.loss("loss/decoder/gan", finite("loss/decoder/gan", &gan)?);
        let mut loss = llike * self.gamma + gan;
        let (stabilizers, mut hooks) = ctx.hooks();
        for (name, term) in stabilizers.extra_losses(&mut LossSite::Generator, &mut hooks)? {
            let key = format!("loss/decoder/{name}");
            report.loss(key.clone(), finite(&key, &term)?);
            loss = loss + term;
        }
        report.loss("loss/decoder", finite("loss/decoder", &loss)?);
        let grads = loss.backward();
        let mut params = prefixed(self.decoder.named_params_mut(), "decoder");
        let norm = ctx.apply_gradients("decoder", &mut params, grads)?;
        report.diagnostic("grad_norm/decoder", norm);
        Ok(())
    }

    /// The encoder's parameters: trunk and both heads.
    fn encoder_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        encoder_group(&mut self.trunk, &mut self.mu, &mut self.logvar)
    }

    /// `Dec(μ(x))` in eval mode.
    fn reconstruction(&mut self, x: &Matrix, rng: &mut Rng) -> Result<Matrix> {
        let (mu, _) = self.encode(x, Mode::Eval, rng)?;
        Ok(self
            .decode(mu.retaped::<NoneTape>().leaky_trace(), Mode::Eval, rng)?
            .detach())
    }
}

impl Parameterized for VaeGan {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.trunk.named_params(), "encoder.trunk");
        all.extend(prefixed(self.mu.named_params(), "encoder.mu"));
        all.extend(prefixed(self.logvar.named_params(), "encoder.logvar"));
        all.extend(prefixed(self.decoder.named_params(), "decoder"));
        all.extend(prefixed(self.discriminator.named_params(), "discriminator"));
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = encoder_group(&mut self.trunk, &mut self.mu, &mut self.logvar);
        all.extend(prefixed(self.decoder.named_params_mut(), "decoder"));
        all.extend(prefixed(self.discriminator.named_params_mut(), "discriminator"));
        all
    }
}

impl Model for VaeGan {
    fn family(&self) -> &str {
        "gan"
    }
    fn describe(&self) -> String {
        format!(
            "vae_gan: latent {}, objective {}, gamma {}, features from discriminator layer {}, data {}\n  \
             encoder trunk {} -> {} (then linear mu and logvar heads -> [{}]):\n{}\n  decoder {} -> {}:\n{}\n  \
             discriminator {} -> {}:\n{}",
            self.latent_dim,
            self.objective.name(),
            self.gamma,
            self.feature_layer,
            self.data_shape,
            self.trunk.input_shape(),
            self.trunk.output_shape(),
            self.latent_dim,
            describe_stack(&self.trunk),
            self.decoder.input_shape(),
            self.decoder.output_shape(),
            describe_stack(&self.decoder),
            self.discriminator.input_shape(),
            self.discriminator.output_shape(),
            describe_stack(&self.discriminator),
        )
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["encoder".into(), "decoder".into(), "discriminator".into()]
    }
    /// Discriminator, encoder, then decoder update, each from its own forward pass.
    /// Runs the discriminator's single update only when the stabilizers' schedule (from 1, capped at 1,
    /// reported as `discriminator_steps`) keeps it: an adaptive step ratio may skip it (0); it
    /// cannot add updates. Unrolling is refused.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        non_empty("vae_gan", batch)?;
        refuse_unrolling("vae_gan", ctx)?;
        refuse_sample_selection("vae_gan", ctx)?;
        let mut report = StepReport::default();
        if schedule_discriminator_steps(1, 1, ctx, &mut report) == 1 {
            self.discriminator_step(batch, ctx, &mut report)?;
        }
        self.encoder_step(batch, ctx, &mut report)?;
        self.decoder_step(batch, ctx, &mut report)?;
        Ok(report)
    }
    /// KL, feature reconstruction (through the posterior mean), pixel MSE of `Dec(μ(x))`, and
    /// the discriminator loss against prior samples, in eval mode without updates.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        non_empty("vae_gan evaluation", batch)?;
        let x = &batch.inputs;
        let (mu, logvar) = self.encode(x, Mode::Eval, ctx.rng)?;
        let mu = mu.retaped::<NoneTape>();
        let kl = kl_divergence(mu.leaky_trace(), logvar.retaped::<NoneTape>().leaky_trace()).array() as f64;
        let recon = self.decode(mu.leaky_trace(), Mode::Eval, ctx.rng)?.detach();
        let target = self
            .features(Activation::data(x, self.data_shape)?, Mode::Eval, ctx.rng)?
            .retaped::<NoneTape>();
        let feats = self.features(Activation::data(&recon, self.data_shape)?, Mode::Eval, ctx.rng)?;
        let llike = feature_reconstruction(feats, &target).array() as f64;
        let (xs, rs) = (x.as_vec(), recon.as_vec());
        let mse = xs.iter().zip(&rs).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / xs.len() as f64;
        let prior = self
            .decode(
                normal(batch.len(), self.latent_dim, ctx.device, ctx.rng).leaky_trace(),
                Mode::Eval,
                ctx.rng,
            )?
            .detach();
        let real_out = run(
            &mut self.discriminator,
            Activation::data(x, self.data_shape)?,
            Mode::Eval,
            ctx.rng,
        )?;
        let prior_out = run(
            &mut self.discriminator,
            Activation::data(&prior, self.data_shape)?,
            Mode::Eval,
            ctx.rng,
        )?;
        let d = self
            .objective
            .discriminator_loss(real_out.value, prior_out.value)?
            .array() as f64;
        Ok(BTreeMap::from([
            ("loss/encoder/kl".to_string(), kl),
            ("loss/encoder/feature_reconstruction".to_string(), llike),
            ("loss/discriminator".to_string(), d),
            ("vae_gan/reconstruction_mse".to_string(), mse),
        ]))
    }
    fn sample(&mut self, n: usize, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        let z = normal(n, self.latent_dim, ctx.device, ctx.rng);
        Ok(Some(self.decode(z.leaky_trace(), Mode::Eval, ctx.rng)?.detach()))
    }
    fn reestimates_statistics(&self, group: &str) -> bool {
        group == "decoder"
    }
    fn reestimate_statistics(
        &mut self,
        group: &str,
        batches: usize,
        batch_size: usize,
        ctx: &mut EvalContext<'_>,
    ) -> Result<bool> {
        if group != "decoder" {
            return Ok(false);
        }
        reestimate_statistics(
            self,
            |gan| &mut gan.decoder,
            batches,
            |gan| {
                let z = normal(batch_size, gan.latent_dim, ctx.device, ctx.rng);
                gan.decode(z.leaky_trace(), Mode::Train, ctx.rng).map(drop)
            },
        )?;
        Ok(true)
    }
    /// `Dec(μ(x))`.
    fn reconstruct(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        non_empty("vae_gan reconstruction", batch)?;
        Ok(Some(self.reconstruction(&batch.inputs, ctx.rng)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::began::tests::{adam, batch, changed, info, mean_of, names_with, sgd, snapshot, train};
    use nash_core::rand::SeedableRng;
    use nash_core::stabilizer::StabilizerStack;

    fn tiny() -> VaeGanConfig {
        VaeGanConfig {
            latent_dim: 3,
            hidden_dim: 16,
            ..Default::default()
        }
    }

    fn build(cfg: &VaeGanConfig, dim: usize) -> Result<VaeGan> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        cfg.build_vae_gan(
            &info(dim),
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    }

    #[test]
    fn kl_matches_the_closed_form_and_its_gradient() {
        // μ = [[0.5, -1], [0, 0]], log σ² = [[0, ln 2], [0, 0]], N = 2:
        // row 0: ½(0.25 + 1 - 1 - 0) + ½(1 + 2 - 1 - ln 2) = 0.125 + 0.6534264; row 1: 0.
        // KL = (0.7784264) / 2 = 0.3892132.
        let device = Device::default();
        let mu: Matrix = device.tensor_from_vec(vec![0.5, -1.0, 0.0, 0.0], (2, 2));
        let lv: Matrix = device.tensor_from_vec(vec![0.0, 2f32.ln(), 0.0, 0.0], (2, 2));
        let kl = kl_divergence(mu.leaky_trace(), lv.leaky_trace());
        assert!((kl.array() - 0.3892132).abs() < 1e-6, "{}", kl.array());
        // ∂KL/∂μ = μ / N, ∂KL/∂log σ² = ½(e^{log σ²} - 1) / N.
        let grads = kl_divergence(mu.leaky_trace(), lv.leaky_trace()).backward();
        let (gm, gl) = (grads.get(&mu).as_vec(), grads.get(&lv).as_vec());
        for (g, want) in gm.iter().zip([0.25, -0.5, 0.0, 0.0]) {
            assert!((g - want).abs() < 1e-6, "{gm:?}");
        }
        for (g, want) in gl.iter().zip([0.0, 0.25, 0.0, 0.0]) {
            assert!((g - want).abs() < 1e-6, "{gl:?}");
        }
    }

    #[test]
    fn feature_reconstruction_is_the_gaussian_negative_log_likelihood() {
        // f = [[1, 2], [0, -1]], t = [[0, 0], [0, 1]]: ½(1 + 4) + ½(0 + 4) = 4.5 over N = 2 -> 2.25.
        let device = Device::default();
        let f: Matrix = device.tensor_from_vec(vec![1.0, 2.0, 0.0, -1.0], (2, 2));
        let t: Matrix = device.tensor_from_vec(vec![0.0, 0.0, 0.0, 1.0], (2, 2));
        let loss = feature_reconstruction(f.leaky_trace(), &t);
        assert!((loss.array() - 2.25).abs() < 1e-6);
        // Gradient (f - t) / N.
        let g = feature_reconstruction(f.leaky_trace(), &t).backward().get(&f).as_vec();
        assert_eq!(g, vec![0.5, 1.0, 0.0, -1.0]);
    }

    #[test]
    fn each_groups_step_changes_only_that_groups_parameters() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(1);
        let mut model = build(&tiny(), 5).unwrap();
        let data = batch(&device, 8, 5, &mut rng);
        let mut opts = sgd(&["encoder", "decoder", "discriminator"]);
        let mut stabilizers = StabilizerStack::default();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        let mut report = StepReport::default();
        let before = snapshot(&model);
        model.discriminator_step(&data, &mut ctx, &mut report).unwrap();
        assert_eq!(
            changed(&before, &snapshot(&model)),
            names_with(&model, "discriminator.")
        );
        let before = snapshot(&model);
        model.encoder_step(&data, &mut ctx, &mut report).unwrap();
        let enc = names_with(&model, "encoder.");
        assert_eq!(changed(&before, &snapshot(&model)), enc);
        assert!(
            enc.iter().any(|n| n.starts_with("encoder.mu.")) && enc.iter().any(|n| n.starts_with("encoder.logvar."))
        );
        let before = snapshot(&model);
        model.decoder_step(&data, &mut ctx, &mut report).unwrap();
        assert_eq!(changed(&before, &snapshot(&model)), names_with(&model, "decoder."));
        for key in [
            "loss/encoder/kl",
            "loss/encoder/feature_reconstruction",
            "loss/decoder/gan",
            "loss/discriminator",
        ] {
            assert!(report.losses[key].is_finite(), "{key}: {report:?}");
        }
        assert_eq!(model.param_groups(), ["encoder", "decoder", "discriminator"]);
    }

    #[test]
    fn the_feature_reconstruction_uses_the_chosen_discriminator_layer() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(2);
        let mut model = build(
            &VaeGanConfig {
                feature_layer: 1,
                ..tiny()
            },
            5,
        )
        .unwrap();
        let data = batch(&device, 4, 5, &mut rng);
        // Layers 0 (linear 5 -> 16) and 1 (LeakyReLU): features are 16 wide and nonnegative
        // slope-scaled copies of the first linear layer's output.
        let f = model.target_features(&data.inputs, &mut rng).unwrap();
        assert_eq!(*f.shape(), (4, 16));
        let mut model = build(
            &VaeGanConfig {
                feature_layer: 4,
                ..tiny()
            },
            5,
        )
        .unwrap();
        assert_eq!(*model.target_features(&data.inputs, &mut rng).unwrap().shape(), (4, 1));
    }

    #[test]
    fn losses_are_finite_and_the_reconstruction_improves() {
        let mut model = build(&tiny(), 6).unwrap();
        let mut opts = adam(&["encoder", "decoder", "discriminator"], 3e-3);
        let reports = train(&mut model, &mut opts, 6, 40, 3);
        let early = mean_of(&reports[..8], "loss/encoder");
        let late = mean_of(&reports[32..], "loss/encoder");
        assert!((early - late).abs() > 1e-3, "{early} {late}");
        let early = mean_of(&reports[..8], "loss/decoder");
        let late = mean_of(&reports[32..], "loss/decoder");
        assert!((early - late).abs() > 1e-3, "{early} {late}");
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(9);
        let data = batch(&device, 6, 6, &mut rng);
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let eval = model.evaluate(&data, &mut ectx).unwrap();
        assert!(eval.values().all(|v| v.is_finite()), "{eval:?}");
        assert_eq!(*model.reconstruct(&data, &mut ectx).unwrap().unwrap().shape(), (6, 6));
        assert_eq!(*model.sample(2, &mut ectx).unwrap().unwrap().shape(), (2, 6));
    }

    #[test]
    fn wiring_errors_name_config_paths() {
        let err = build(
            &VaeGanConfig {
                feature_layer: 5,
                ..tiny()
            },
            5,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("model.feature_layer") && err.contains("5 layers"), "{err}");
        let mut cfg = tiny();
        cfg.decoder = Some(mlp(&[4], 3, None));
        let err = build(&cfg, 5).err().unwrap().to_string();
        assert!(err.contains("model.decoder") && err.contains("out_features 5"), "{err}");
        let mut cfg = tiny();
        cfg.discriminator = Some(mlp(&[4], 3, None));
        let err = build(&cfg, 5).err().unwrap().to_string();
        assert!(
            err.contains("model.discriminator") && err.contains("out_features 1"),
            "{err}"
        );
        let err = build(&VaeGanConfig { gamma: -1.0, ..tiny() }, 5)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.gamma"), "{err}");
        let json = r#"{"type": "vae_gan", "feature_layers": 2}"#;
        let err = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("feature_layers"), "{err}");
    }
}
