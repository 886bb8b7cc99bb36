//! `adversarial_autoencoder`: the adversarial autoencoder of Makhzani et al. 2015 ("Adversarial
//! Autoencoders").
//!
//! An encoder and a decoder are trained on reconstruction, and a discriminator on the code tells
//! the encoder's codes from samples of a chosen prior (`normal`, `uniform`, or a `mixture` of 2-D
//! Gaussians on a circle); the encoder, acting as the generator, learns to make its codes
//! indistinguishable from the prior's samples, so decoding prior samples generates data.
//!
//! **Parameter groups.** Two: `autoencoder` (`autoencoder.encoder.*`, `autoencoder.decoder.*`) and
//! `discriminator` (`discriminator.*`). The encoder takes part in both of the paper's phases, so
//! the reconstruction and regularization phases share one update of the `autoencoder` group:
//! each step first updates the discriminator (codes detached, so nothing else moves), then takes
//! one step of the `autoencoder` optimizer on
//!
//! `reconstruction(decoder(encoder(x)), x) + regularization_weight · BCE(D(encoder(x)), 1)`
//!
//! whose second term reaches only the encoder (the discriminator's gradients are computed but not
//! handed to an optimizer). One optimizer state per parameter and one update per step keeps Adam's
//! moments consistent; with separate phases the encoder would take two optimizer steps per
//! training step.
//!
//! The adversarial losses are the non-saturating GAN's, computed locally with core's
//! binary cross-entropy on logits: discriminator `BCE(D(prior), t_real) + BCE(D(codes), t_fake)`
//! (targets 1 and 0 unless a stabilizer changes them), generator `BCE(D(codes), 1)`. The
//! discriminator phase calls the stabilizer hooks as `mlp_gan` does (prior samples are the real
//! inputs, codes the fake ones); the autoencoder update adds the terms at
//! [`LossSite::Autoencoder`].

use std::collections::BTreeMap;
use std::f32::consts::PI;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::activation::{LeakyReluConfig, ReluConfig, SigmoidConfig};
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::{BuildContext, ForwardContext, LayerConfig, Mode, Sequential, SequentialConfig};
use nash_core::loss::basic::{BceWithLogits, MseConfig};
use nash_core::loss::{Loss, LossConfig};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::rand::Rng as _;
use nash_core::rand_distr::{Distribution, StandardNormal};
use nash_core::stabilizer::{InputRole, LossSite, Targets};
use nash_core::tensor::{
    check_finite, join_name, Activation, Device, FeatureShape, Matrix, Param, Parameterized, Rng, Scalar, Tape,
};
use serde::{Deserialize, Serialize};

/// The distribution the codes are matched to: `prior = { kind = "normal", std = 1.0 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Prior {
    /// Independent `N(0, std²)` in every code dimension.
    Normal {
        /// Standard deviation.
        std: f32,
    },
    /// Independent `U(low, high)` in every code dimension.
    Uniform {
        /// Lower bound.
        low: f32,
        /// Upper bound.
        high: f32,
    },
    /// For 2-D codes: an equal mixture of `components` isotropic Gaussians of standard deviation
    /// `std`, centered at `radius · (cos 2πk/components, sin 2πk/components)`.
    Mixture {
        /// Number of Gaussians.
        components: usize,
        /// Distance of their centers from the origin.
        radius: f32,
        /// Standard deviation of each.
        std: f32,
    },
}

impl Default for Prior {
    fn default() -> Self {
        Prior::Normal { std: 1.0 }
    }
}

impl Prior {
    /// Checks the parameters and that codes of `dim` values fit, naming `model.prior.*` otherwise.
    pub fn validate(&self, dim: usize) -> Result<()> {
        let positive = |name: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::config(
                    format!("model.prior.{name}"),
                    format!("must be a positive number, got {v}"),
                ))
            }
        };
        match *self {
            Prior::Normal { std } => positive("std", std),
            Prior::Uniform { low, high } => {
                if low.is_finite() && high.is_finite() && low < high {
                    Ok(())
                } else {
                    Err(Error::config(
                        "model.prior.high",
                        format!("the uniform prior needs finite bounds with low < high, got [{low}, {high}]"),
                    ))
                }
            }
            Prior::Mixture {
                components,
                radius,
                std,
            } => {
                if components == 0 {
                    return Err(Error::config("model.prior.components", "must be at least 1"));
                }
                if !(radius.is_finite() && radius >= 0.0) {
                    return Err(Error::config(
                        "model.prior.radius",
                        format!("must be a finite number >= 0, got {radius}"),
                    ));
                }
                positive("std", std)?;
                if dim != 2 {
                    return Err(Error::config(
                        "model.prior",
                        format!(
                            "the mixture prior is a mixture of 2-D Gaussians but the encoder outputs {dim} values \
                             per sample; make the encoder's last out_features 2, or use a normal or uniform prior"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
    /// Draws `n` codes of `dim` values.
    pub fn sample(&self, n: usize, dim: usize, device: &Device, rng: &mut Rng) -> Matrix {
        let values: Vec<f32> = match *self {
            Prior::Normal { std } => (0..n * dim)
                .map(|_| std * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, rng))
                .collect(),
            Prior::Uniform { low, high } => (0..n * dim).map(|_| rng.gen_range(low..high)).collect(),
            Prior::Mixture {
                components,
                radius,
                std,
            } => {
                let mut v = Vec::with_capacity(n * dim);
                for _ in 0..n {
                    let k = rng.gen_range(0..components);
                    let angle = 2.0 * PI * k as f32 / components as f32;
                    let centre = [radius * angle.cos(), radius * angle.sin()];
                    for c in centre.iter().take(dim) {
                        let e: f32 = StandardNormal.sample(rng);
                        v.push(c + std * e);
                    }
                }
                v
            }
        };
        device.tensor_from_vec(values, (n, dim))
    }
    /// The mean and standard deviation of one code value (over all dimensions, for mixtures).
    pub fn moments(&self) -> (f64, f64) {
        match *self {
            Prior::Normal { std } => (0.0, std as f64),
            Prior::Uniform { low, high } => ((low as f64 + high as f64) / 2.0, (high - low) as f64 / 12f64.sqrt()),
            Prior::Mixture {
                components,
                radius,
                std,
            } => {
                // Pooled over x and y: with one component the centre is (r, 0), so the mean is
                // r/2 and the spread of the centre coordinates r²/4; with two or more, the
                // centres' coordinates average 0 with mean square r²/2.
                let (r, s) = (radius as f64, std as f64);
                if components == 1 {
                    (r / 2.0, (r * r / 4.0 + s * s).sqrt())
                } else {
                    (0.0, (r * r / 2.0 + s * s).sqrt())
                }
            }
        }
    }
}

/// Config of [`AdversarialAutoencoder`], `type = "adversarial_autoencoder"` in pipeline files
/// (see the module docs).
///
/// The defaults suit 784-dimensional data in `[0, 1]`: encoder 784-256-128-8 (ReLU hidden,
/// linear code), decoder 8-128-256-784 (ReLU hidden, sigmoid output), discriminator 8-64-64-1
/// (LeakyReLU 0.2, raw logit), a standard normal prior, MSE, regularization weight 3e-4 (see
/// [`AdversarialAutoencoderConfig::regularization_weight`]).
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdversarialAutoencoderConfig {
    /// The encoder, from one data sample to the code.
    pub encoder: SequentialConfig,
    /// The decoder, from the code back to one data sample.
    pub decoder: SequentialConfig,
    /// The discriminator on codes, from one code to one raw logit.
    pub discriminator: SequentialConfig,
    /// The distribution the codes are matched to.
    pub prior: Prior,
    /// The reconstruction loss between the decoder's output and the input.
    pub loss: Box<dyn LossConfig>,
    /// Weight of the encoder's adversarial (regularization) loss in the autoencoder update.
    ///
    /// The two terms share one optimizer step, so their scales matter: an element-mean
    /// reconstruction loss (`mse`) on `D` features has gradients ~1/D of a per-sample sum, while the
    /// adversarial loss is a per-sample mean. Start near `0.1 / D`: on 784-dimensional
    /// `latent_manifold` data, 1e-2 and above kept the held-out MSE at ~0.005 (the decoder barely
    /// uses the code); 1e-4 and 3e-4 reached 0.0017 after 1000 steps (0.0010 without the term) and
    /// about 0.0002 and 0.0006 after 3000, 3e-4 matching the prior more closely (the default).
    pub regularization_weight: f32,
}

fn linear(out: usize) -> Box<dyn LayerConfig> {
    Box::new(LinearConfig::new(out))
}

fn relu() -> Box<dyn LayerConfig> {
    Box::new(ReluConfig::default())
}

fn leaky() -> Box<dyn LayerConfig> {
    Box::new(LeakyReluConfig::new(0.2))
}

impl Default for AdversarialAutoencoderConfig {
    fn default() -> Self {
        AdversarialAutoencoderConfig {
            encoder: SequentialConfig {
                layers: vec![linear(256), relu(), linear(128), relu(), linear(8)],
            },
            decoder: SequentialConfig {
                layers: vec![
                    linear(128),
                    relu(),
                    linear(256),
                    relu(),
                    linear(784),
                    Box::new(SigmoidConfig::default()),
                ],
            },
            discriminator: SequentialConfig {
                layers: vec![linear(64), leaky(), linear(64), leaky(), linear(1)],
            },
            prior: Prior::default(),
            loss: Box::new(MseConfig::default()),
            regularization_weight: 3e-4,
        }
    }
}

impl AdversarialAutoencoderConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_aae(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<AdversarialAutoencoder> {
        if !(self.regularization_weight.is_finite() && self.regularization_weight >= 0.0) {
            return Err(Error::config(
                "model.regularization_weight",
                format!("must be a finite weight >= 0, got {}", self.regularization_weight),
            ));
        }
        let shape = data.sample_shape;
        let encoder = self.encoder.build(shape, ctx, "model.encoder")?;
        let code_shape = encoder.output_shape();
        self.prior.validate(code_shape.numel())?;
        let decoder = self.decoder.build(code_shape, ctx, "model.decoder")?;
        let produced = decoder.output_shape().numel();
        if produced != shape.numel() {
            return Err(Error::config(
                "model.decoder",
                format!(
                    "the decoder produces {produced} features per sample but the data's samples are {shape} ({} \
                     features); make its last layer produce {}",
                    shape.numel(),
                    shape.numel()
                ),
            ));
        }
        let discriminator = self.discriminator.build(code_shape, ctx, "model.discriminator")?;
        let scores = discriminator.output_shape();
        if scores.numel() != 1 {
            return Err(Error::config(
                "model.discriminator",
                format!(
                    "the discriminator must output one logit per code, but produces {scores}; make its last linear \
                     layer's out_features 1 (and leave its output as a raw logit)"
                ),
            ));
        }
        Ok(AdversarialAutoencoder {
            encoder,
            decoder,
            discriminator,
            prior: self.prior.clone(),
            loss: self.loss.build()?,
            regularization_weight: self.regularization_weight,
            shape,
        })
    }
}

#[typetag::serde(name = "adversarial_autoencoder")]
impl ModelConfig for AdversarialAutoencoderConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_aae(data, ctx)?))
    }
}

/// An adversarial autoencoder (see the module docs). Parameter groups `autoencoder` and
/// `discriminator`.
pub struct AdversarialAutoencoder {
    encoder: Sequential,
    decoder: Sequential,
    discriminator: Sequential,
    prior: Prior,
    loss: Box<dyn Loss>,
    regularization_weight: f32,
    shape: FeatureShape,
}

fn prefixed<P>(params: Vec<(String, P)>, prefix: &str) -> Vec<(String, P)> {
    params.into_iter().map(|(n, p)| (join_name(prefix, &n), p)).collect()
}

fn describe_stack(stack: &Sequential) -> String {
    stack
        .layers()
        .iter()
        .map(|l| format!("    {}", l.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Mean of `sigmoid` over logits.
fn mean_sigmoid(logits: &[f32]) -> f64 {
    if logits.is_empty() {
        return 0.0;
    }
    logits.iter().map(|&l| 1.0 / (1.0 + (-(l as f64)).exp())).sum::<f64>() / logits.len() as f64
}

/// Mean and standard deviation (population) of every value of `m`.
fn moments(values: &[f32]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// `BCE(logits, target)` averaged, with a constant target of the logits' shape.
fn bce_to(logits: Matrix<Tape>, value: f32) -> Result<Scalar> {
    let target = logits.device().ones_like(logits.shape()) * value;
    BceWithLogits.compute(logits, &target)
}

/// What the discriminator update measured.
struct DiscriminatorStep {
    loss: f64,
    real_mean: f64,
    fake_mean: f64,
    grad_norm: f64,
    extras: Vec<(String, f64)>,
}

impl AdversarialAutoencoder {
    /// The encoder.
    pub fn encoder(&self) -> &Sequential {
        &self.encoder
    }
    /// The decoder.
    pub fn decoder(&self) -> &Sequential {
        &self.decoder
    }
    /// The discriminator on codes.
    pub fn discriminator(&self) -> &Sequential {
        &self.discriminator
    }
    /// The prior.
    pub fn prior(&self) -> &Prior {
        &self.prior
    }
    /// The per-sample shape of the code.
    pub fn code_shape(&self) -> FeatureShape {
        self.encoder.output_shape()
    }

    fn input(&self, x: &Matrix) -> Result<Activation> {
        let cols = x.shape().1;
        if cols != self.shape.numel() {
            return Err(Error::shape(
                "adversarial_autoencoder input batch",
                format!("{} features per sample ({})", self.shape.numel(), self.shape),
                cols,
            ));
        }
        Activation::input(x, self.shape)
    }

    /// The codes of `x` (`[n, code features]`), in eval mode.
    pub fn encode(&mut self, x: &Matrix, ctx: &mut EvalContext<'_>) -> Result<Matrix> {
        let input = self.input(x)?;
        let z = self.encoder.forward(
            input,
            &mut ForwardContext {
                mode: Mode::Eval,
                rng: ctx.rng,
            },
        )?;
        Ok(z.detach())
    }

    /// Decodes codes `z` (`[n, code features]`), in eval mode.
    pub fn decode(&mut self, z: &Matrix, ctx: &mut EvalContext<'_>) -> Result<Matrix> {
        let code_shape = self.code_shape();
        if z.shape().1 != code_shape.numel() {
            return Err(Error::shape(
                "adversarial_autoencoder codes",
                format!("{} features per code ({code_shape})", code_shape.numel()),
                z.shape().1,
            ));
        }
        let out = self.decoder.forward(
            Activation::input(z, code_shape)?,
            &mut ForwardContext {
                mode: Mode::Eval,
                rng: ctx.rng,
            },
        )?;
        Ok(out.detach())
    }

    /// One discriminator update: prior samples are the real inputs, `codes` (detached) the fake
    /// ones; the stabilizers transform inputs and targets and add their terms; only the
    /// discriminator's parameters are updated.
    fn discriminator_step(&mut self, codes: &Matrix, ctx: &mut TrainContext<'_>) -> Result<DiscriminatorStep> {
        let code_shape = self.code_shape();
        let n = codes.shape().0;
        let prior = self.prior.sample(n, code_shape.numel(), ctx.device, ctx.rng);
        let real_in = Activation::input(&prior, code_shape)?;
        let fake_in = Activation::input(codes, code_shape)?;
        let (real_in, fake_in) = {
            let (stabilizers, mut hooks) = ctx.hooks();
            let r = stabilizers.transform_input(InputRole::Real, real_in, &mut hooks)?;
            let f = stabilizers.transform_input(InputRole::Fake, fake_in, &mut hooks)?;
            (r, f)
        };
        let real_seen = real_in.detach();
        let fake_seen = fake_in.detach();
        let seen_shape = real_in.shape;
        let mut fwd = ForwardContext {
            mode: Mode::Train,
            rng: ctx.rng,
        };
        let real_out = self.discriminator.forward(real_in, &mut fwd)?;
        let fake_out = self.discriminator.forward(fake_in, &mut fwd)?;
        let real_mean = mean_sigmoid(&real_out.detach().as_vec());
        let fake_mean = mean_sigmoid(&fake_out.detach().as_vec());
        let (stabilizers, mut hooks) = ctx.hooks();
        let mut targets = Targets {
            real: hooks.device.ones_like(real_out.value.shape()),
            fake: hooks.device.zeros_like(fake_out.value.shape()),
            fake_weight: 1.0,
        };
        stabilizers.transform_targets(&mut targets, &mut hooks)?;
        let mut loss = BceWithLogits.compute(real_out.value, &targets.real)?
            + BceWithLogits.compute(fake_out.value, &targets.fake)?;
        let objective_value = check_finite("loss/discriminator", loss.array())? as f64;
        let terms = stabilizers.extra_losses(
            &mut LossSite::Discriminator {
                critic: &mut self.discriminator,
                real: &real_seen,
                fake: &fake_seen,
                shape: seen_shape,
            },
            &mut hooks,
        )?;
        let mut extras = Vec::with_capacity(terms.len());
        for (name, term) in terms {
            let key = format!("loss/discriminator/{name}");
            extras.push((key.clone(), check_finite(&key, term.array())? as f64));
            loss = loss + term;
        }
        let grads = loss.backward();
        let mut params = prefixed(self.discriminator.named_params_mut(), "discriminator");
        let grad_norm = ctx.apply_gradients("discriminator", &mut params, grads)?;
        Ok(DiscriminatorStep {
            loss: objective_value,
            real_mean,
            fake_mean,
            grad_norm,
            extras,
        })
    }

    fn autoencoder_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = prefixed(self.encoder.named_params_mut(), "autoencoder.encoder");
        all.extend(prefixed(self.decoder.named_params_mut(), "autoencoder.decoder"));
        all
    }
}

impl Parameterized for AdversarialAutoencoder {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.encoder.named_params(), "autoencoder.encoder");
        all.extend(prefixed(self.decoder.named_params(), "autoencoder.decoder"));
        all.extend(prefixed(self.discriminator.named_params(), "discriminator"));
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = prefixed(self.encoder.named_params_mut(), "autoencoder.encoder");
        all.extend(prefixed(self.decoder.named_params_mut(), "autoencoder.decoder"));
        all.extend(prefixed(self.discriminator.named_params_mut(), "discriminator"));
        all
    }
}

impl Model for AdversarialAutoencoder {
    fn family(&self) -> &str {
        "autoencoder"
    }
    fn describe(&self) -> String {
        format!(
            "adversarial_autoencoder: data {}, code {}, prior {:?}, regularization weight {}, loss {}\n  encoder:\n{}\n  \
             decoder:\n{}\n  discriminator:\n{}",
            self.shape,
            self.code_shape(),
            self.prior,
            self.regularization_weight,
            self.loss.name(),
            describe_stack(&self.encoder),
            describe_stack(&self.decoder),
            describe_stack(&self.discriminator),
        )
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["autoencoder".into(), "discriminator".into()]
    }
    /// Encodes the batch once; updates the discriminator on prior samples against the (detached)
    /// codes; then one `autoencoder` update on reconstruction + weighted regularization through the
    /// updated discriminator.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(Error::shape("adversarial_autoencoder batch", "at least one sample", 0));
        }
        let mut report = StepReport::default();
        let input = self.input(&batch.inputs)?;
        let codes = self.encoder.forward(
            input,
            &mut ForwardContext {
                mode: Mode::Train,
                rng: ctx.rng,
            },
        )?;
        let code_values = codes.detach();
        let (code_mean, code_std) = moments(&code_values.as_vec());
        report.diagnostic("code/mean", code_mean);
        report.diagnostic("code/std", code_std);

        let d = self.discriminator_step(&code_values, ctx)?;
        report.loss("loss/discriminator", d.loss);
        for (k, v) in d.extras {
            report.loss(k, v);
        }
        report.diagnostic("d_real_mean", d.real_mean);
        report.diagnostic("d_fake_mean", d.fake_mean);
        report.diagnostic("grad_norm/discriminator", d.grad_norm);

        let codes_again = codes.reuse();
        let out = self.decoder.forward(
            codes,
            &mut ForwardContext {
                mode: Mode::Train,
                rng: ctx.rng,
            },
        )?;
        let reconstruction = self.loss.compute(out.value, &batch.inputs)?;
        report.loss(
            "loss/reconstruction",
            check_finite("loss/reconstruction", reconstruction.array())? as f64,
        );
        let fake_in = {
            let (stabilizers, mut hooks) = ctx.hooks();
            stabilizers.transform_input(InputRole::Fake, codes_again, &mut hooks)?
        };
        // Frozen: only the autoencoder is updated here.
        let scores = self.discriminator.forward_frozen(
            fake_in,
            &mut ForwardContext {
                mode: Mode::Train,
                rng: ctx.rng,
            },
        )?;
        let regularization = bce_to(scores.value, 1.0)?;
        report.loss(
            "loss/regularization",
            check_finite("loss/regularization", regularization.array())? as f64,
        );
        let mut loss = reconstruction + regularization * self.regularization_weight;
        let (stabilizers, mut hooks) = ctx.hooks();
        for (name, term) in stabilizers.extra_losses(&mut LossSite::Autoencoder, &mut hooks)? {
            let key = format!("loss/autoencoder/{name}");
            report.loss(key.clone(), check_finite(&key, term.array())? as f64);
            loss = loss + term;
        }
        let grads = loss.backward();
        let mut params = self.autoencoder_params_mut();
        let norm = ctx.apply_gradients("autoencoder", &mut params, grads)?;
        report.diagnostic("grad_norm/autoencoder", norm);
        Ok(report)
    }
    /// Reconstruction, discriminator and regularization losses and the codes' moments on a
    /// held-out batch (fresh prior samples), in eval mode.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        if batch.is_empty() {
            return Err(Error::shape(
                "adversarial_autoencoder evaluation batch",
                "at least one sample",
                0,
            ));
        }
        let codes = self.encode(&batch.inputs, ctx)?;
        let reconstruction = self.decode(&codes, ctx)?;
        let recon_loss = self.loss.compute(reconstruction.leaky_trace(), &batch.inputs)?.array() as f64;
        let code_shape = self.code_shape();
        let prior = self.prior.sample(batch.len(), code_shape.numel(), ctx.device, ctx.rng);
        let mut fwd = ForwardContext {
            mode: Mode::Eval,
            rng: ctx.rng,
        };
        let real = self
            .discriminator
            .forward(Activation::input(&prior, code_shape)?, &mut fwd)?
            .detach();
        let fake = self
            .discriminator
            .forward(Activation::input(&codes, code_shape)?, &mut fwd)?
            .detach();
        let d_loss = (bce_to(real.leaky_trace(), 1.0)? + bce_to(fake.leaky_trace(), 0.0)?).array() as f64;
        let g_loss = bce_to(fake.leaky_trace(), 1.0)?.array() as f64;
        let (mean, std) = moments(&codes.as_vec());
        Ok(BTreeMap::from([
            ("loss/reconstruction".to_string(), recon_loss),
            ("loss/discriminator".to_string(), d_loss),
            ("loss/regularization".to_string(), g_loss),
            ("code/mean".to_string(), mean),
            ("code/std".to_string(), std),
            ("d_real_mean".to_string(), mean_sigmoid(&real.as_vec())),
            ("d_fake_mean".to_string(), mean_sigmoid(&fake.as_vec())),
        ]))
    }
    /// Decodes samples of the prior.
    fn sample(&mut self, n: usize, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        if n == 0 {
            return Ok(Some(ctx.device.zeros_like(&(0, self.shape.numel()))));
        }
        let z = self.prior.sample(n, self.code_shape().numel(), ctx.device, ctx.rng);
        Ok(Some(self.decode(&z, ctx)?))
    }
    fn reconstruct(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        let codes = self.encode(&batch.inputs, ctx)?;
        Ok(Some(self.decode(&codes, ctx)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::optim::adam::AdamConfig;
    use nash_core::optim::{Optimizer, OptimizerConfig};
    use nash_core::rand::SeedableRng;
    use nash_core::stabilizer::StabilizerStack;

    fn info(n: usize) -> DataInfo {
        DataInfo {
            sample_shape: FeatureShape::Flat(n),
            num_classes: None,
            value_range: (0.0, 1.0),
        }
    }

    fn stack(layers: Vec<Box<dyn LayerConfig>>) -> SequentialConfig {
        SequentialConfig { layers }
    }

    /// Data of `dim` features, a `code`-value code: encoder dim-16-code, decoder code-16-dim
    /// (sigmoid), discriminator code-16-16-1.
    fn tiny_config(dim: usize, code: usize, prior: Prior) -> AdversarialAutoencoderConfig {
        AdversarialAutoencoderConfig {
            encoder: stack(vec![linear(16), relu(), linear(code)]),
            decoder: stack(vec![
                linear(16),
                relu(),
                linear(dim),
                Box::new(SigmoidConfig::default()),
            ]),
            discriminator: stack(vec![linear(16), leaky(), linear(16), leaky(), linear(1)]),
            prior,
            // 6 features: the reconstruction's gradients are not diluted as on 784.
            regularization_weight: 1.0,
            ..Default::default()
        }
    }

    fn build(cfg: &AdversarialAutoencoderConfig, dim: usize) -> Result<AdversarialAutoencoder> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        cfg.build_aae(
            &info(dim),
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    }

    fn batch(device: &Device, rows: usize, dim: usize, rng: &mut Rng) -> Batch {
        let u: Vec<f32> = (0..dim).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        let mut values = Vec::with_capacity(rows * dim);
        for _ in 0..rows {
            let a = rng.gen_range(-2.0f32..2.0);
            values.extend((0..dim).map(|j| 1.0 / (1.0 + (-(a * u[j])).exp())));
        }
        Batch {
            inputs: device.tensor_from_vec(values, (rows, dim)),
            shape: FeatureShape::Flat(dim),
            labels: None,
        }
    }

    fn optimizers(lr: f64) -> BTreeMap<String, Box<dyn Optimizer>> {
        let cfg = AdamConfig {
            lr,
            betas: [0.5, 0.999],
            ..Default::default()
        };
        ["autoencoder", "discriminator"]
            .into_iter()
            .map(|g| (g.to_string(), cfg.build().unwrap()))
            .collect()
    }

    fn snapshot(model: &AdversarialAutoencoder) -> BTreeMap<String, Vec<f32>> {
        model.named_params().into_iter().map(|(n, p)| (n, p.to_vec())).collect()
    }

    fn changed(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> Vec<String> {
        a.iter().filter(|(k, v)| b[*k] != **v).map(|(k, _)| k.clone()).collect()
    }

    #[test]
    fn groups_and_names_agree_and_each_phase_moves_only_its_networks() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(1);
        let mut model = build(&tiny_config(6, 2, Prior::default()), 6).unwrap();
        let groups = model.param_groups();
        assert_eq!(groups, ["autoencoder", "discriminator"]);
        let names: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
        for n in &names {
            assert!(groups.iter().any(|g| n.starts_with(&format!("{g}."))), "{n}");
        }
        assert!(names.contains(&"autoencoder.encoder.0.weight".to_string()), "{names:?}");
        assert!(names.contains(&"autoencoder.decoder.2.bias".to_string()), "{names:?}");
        let mut d_names: Vec<String> = names
            .iter()
            .filter(|n| n.starts_with("discriminator."))
            .cloned()
            .collect();
        d_names.sort();
        let mut ae_names: Vec<String> = names
            .iter()
            .filter(|n| n.starts_with("autoencoder."))
            .cloned()
            .collect();
        ae_names.sort();

        let data = batch(&device, 16, 6, &mut rng);
        let mut opts = optimizers(1e-2);
        let mut stabilizers = StabilizerStack::default();
        let mut ctx = TrainContext {
            step: 0,
            device: &device,
            rng: &mut rng,
            optimizers: &mut opts,
            stabilizers: &mut stabilizers,
        };
        // The discriminator phase changes the discriminator only.
        let codes = {
            let mut ectx = EvalContext {
                device: &device,
                rng: &mut Rng::seed_from_u64(2),
            };
            model.encode(&data.inputs, &mut ectx).unwrap()
        };
        let before = snapshot(&model);
        let d = model.discriminator_step(&codes, &mut ctx).unwrap();
        assert!(d.loss.is_finite() && d.grad_norm > 0.0);
        assert_eq!(changed(&before, &snapshot(&model)), d_names);
        // A whole step moves both groups (which gradients reach which network is checked in
        // `the_regularization_term_reaches_only_the_encoder`).
        let before = snapshot(&model);
        let report = model.train_step(&data, &mut ctx).unwrap();
        let mut all: Vec<String> = d_names.iter().chain(&ae_names).cloned().collect();
        all.sort();
        assert_eq!(changed(&before, &snapshot(&model)), all);
        assert!(report.first_non_finite().is_none(), "{report:?}");
        for key in ["loss/reconstruction", "loss/discriminator", "loss/regularization"] {
            assert!(report.losses.contains_key(key), "{key}: {report:?}");
        }
        for key in [
            "grad_norm/autoencoder",
            "grad_norm/discriminator",
            "code/mean",
            "code/std",
        ] {
            assert!(report.diagnostics.contains_key(key), "{key}: {report:?}");
        }
    }

    #[test]
    fn the_regularization_term_reaches_only_the_encoder() {
        // The gradients of the autoencoder update's loss with and without the regularization
        // term (same initialization): the decoder's are identical, the encoder's differ.
        let device = Device::default();
        let data = batch(&device, 8, 6, &mut Rng::seed_from_u64(3));
        let grads_of = |weight: f32| -> BTreeMap<String, Vec<f32>> {
            let mut cfg = tiny_config(6, 2, Prior::default());
            cfg.regularization_weight = weight;
            let mut model = build(&cfg, 6).unwrap();
            let mut rng = Rng::seed_from_u64(4);
            let mut fwd = ForwardContext {
                mode: Mode::Train,
                rng: &mut rng,
            };
            let codes = model
                .encoder
                .forward(model.input(&data.inputs).unwrap(), &mut fwd)
                .unwrap();
            let again = codes.reuse();
            let out = model.decoder.forward(codes, &mut fwd).unwrap();
            let recon = model.loss.compute(out.value, &data.inputs).unwrap();
            let scores = model.discriminator.forward(again, &mut fwd).unwrap();
            let loss = recon + bce_to(scores.value, 1.0).unwrap() * weight;
            let mut grads = loss.backward();
            model
                .named_params()
                .into_iter()
                .map(|(n, p)| (n, nash_core::tensor::grad_to_vec(&mut grads, p).unwrap()))
                .collect()
        };
        let (plain, regularized) = (grads_of(0.0), grads_of(1.0));
        for (name, g) in &plain {
            if name.starts_with("autoencoder.decoder.") {
                assert_eq!(g, &regularized[name], "{name}");
            }
        }
        assert_ne!(
            plain["autoencoder.encoder.0.weight"],
            regularized["autoencoder.encoder.0.weight"]
        );
    }

    #[test]
    fn codes_move_toward_the_prior() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(5);
        let data = batch(&device, 64, 6, &mut rng);
        // A prior far from where the untrained codes lie (mean ~0, small spread).
        let prior = Prior::Uniform { low: 2.0, high: 4.0 };
        let (target_mean, target_std) = prior.moments();
        assert!((target_mean - 3.0).abs() < 1e-9 && (target_std - 2.0 / 12f64.sqrt()).abs() < 1e-9);
        let mut model = build(&tiny_config(6, 2, prior), 6).unwrap();
        let mut opts = optimizers(5e-3);
        let mut stabilizers = StabilizerStack::default();
        let mut reports = Vec::new();
        for step in 0..150 {
            let mut ctx = TrainContext {
                step,
                device: &device,
                rng: &mut rng,
                optimizers: &mut opts,
                stabilizers: &mut stabilizers,
            };
            let r = model.train_step(&data, &mut ctx).unwrap();
            assert!(r.first_non_finite().is_none(), "{r:?}");
            reports.push(r);
        }
        let gap = |r: &StepReport| (r.diagnostics["code/mean"] - target_mean).abs();
        let (first, last) = (gap(&reports[0]), gap(&reports[149]));
        assert!(last < 0.3 * first, "|code mean - 3| went from {first} to {last}");
        let mut ectx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let eval = model.evaluate(&data, &mut ectx).unwrap();
        assert!((eval["code/mean"] - target_mean).abs() < 0.3 * first, "{eval:?}");
        // Samples decode prior draws into data-shaped rows.
        assert_eq!(*model.sample(0, &mut ectx).unwrap().unwrap().shape(), (0, 6));
        let s = model.sample(7, &mut ectx).unwrap().unwrap();
        assert_eq!(*s.shape(), (7, 6));
        let r = model.reconstruct(&data, &mut ectx).unwrap().unwrap();
        assert_eq!(*r.shape(), (64, 6));
    }

    #[test]
    fn priors_sample_what_they_describe() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(6);
        for prior in [
            Prior::Normal { std: 2.0 },
            Prior::Uniform { low: -1.0, high: 3.0 },
            Prior::Mixture {
                components: 8,
                radius: 3.0,
                std: 0.1,
            },
        ] {
            let m = prior.sample(20_000, 2, &device, &mut rng);
            let (mean, std) = moments(&m.as_vec());
            let (want_mean, want_std) = prior.moments();
            assert!((mean - want_mean).abs() < 0.05, "{prior:?}: mean {mean}");
            assert!(
                (std - want_std).abs() < 0.05 * want_std,
                "{prior:?}: std {std} vs {want_std}"
            );
        }
        // Mixture samples lie near the circle of the centres.
        let m = Prior::Mixture {
            components: 4,
            radius: 2.0,
            std: 0.05,
        }
        .sample(100, 2, &device, &mut rng)
        .as_vec();
        for p in m.chunks(2) {
            let r = (p[0] * p[0] + p[1] * p[1]).sqrt();
            assert!((r - 2.0).abs() < 0.3, "{p:?}");
        }
    }

    #[test]
    fn wiring_errors_name_the_config_path() {
        let mixture = Prior::Mixture {
            components: 10,
            radius: 4.0,
            std: 0.5,
        };
        let err = build(&tiny_config(6, 3, mixture.clone()), 6).err().unwrap().to_string();
        assert!(err.contains("model.prior") && err.contains("out_features 2"), "{err}");
        assert!(build(&tiny_config(6, 2, mixture), 6).is_ok());
        let err = build(&tiny_config(6, 2, Prior::Uniform { low: 1.0, high: 1.0 }), 6)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.prior.high"), "{err}");
        let err = build(&tiny_config(6, 2, Prior::Normal { std: 0.0 }), 6)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.prior.std"), "{err}");
        let mut cfg = tiny_config(6, 2, Prior::default());
        cfg.discriminator = stack(vec![linear(4)]);
        let err = build(&cfg, 6).err().unwrap().to_string();
        assert!(
            err.contains("model.discriminator") && err.contains("out_features 1"),
            "{err}"
        );
        let mut cfg = tiny_config(6, 2, Prior::default());
        cfg.decoder = stack(vec![linear(5)]);
        let err = build(&cfg, 6).err().unwrap().to_string();
        assert!(err.contains("model.decoder") && err.contains("produce 6"), "{err}");
        let mut cfg = tiny_config(6, 2, Prior::default());
        cfg.regularization_weight = f32::NAN;
        assert!(build(&cfg, 6)
            .err()
            .unwrap()
            .to_string()
            .contains("model.regularization_weight"));
        // Pipeline tables: the prior by `kind`, unknown fields refused.
        let json = r#"{"type": "adversarial_autoencoder", "prior": {"kind": "uniform", "low": -1, "high": 1}}"#;
        let cfg: Box<dyn ModelConfig> = nash_core::serde_json::from_str(json).unwrap();
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let model = cfg
            .build(
                &info(784),
                &mut BuildContext {
                    device: &device,
                    rng: &mut rng,
                },
            )
            .unwrap();
        assert!(model.describe().contains("Uniform"), "{}", model.describe());
        for bad in [
            r#"{"type": "adversarial_autoencoder", "prior": {"kind": "normal", "sd": 1}}"#,
            r#"{"type": "adversarial_autoencoder", "prior": {"kind": "cauchy"}}"#,
        ] {
            let err = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("sd") || err.contains("cauchy"), "{err}");
        }
    }
}
