//! Variational autoencoders: `vae` (dense stacks) and `conv_vae` (convolutional stacks), with
//! β-VAE weighting.
//!
//! The encoder maps a sample to `2·latent_dim` features: the mean `μ` (first half) and the
//! log-variance `log σ²` (second half) of the Gaussian posterior `q(z|x)`. Training draws
//! `ε ~ N(0, I)` from the run's generator and decodes `z = μ + exp(log σ² / 2) ⊙ ε` (the
//! reparameterization trick). The loss per sample is the negative ELBO
//! `−log p(x|z) + KL(q(z|x) ‖ N(0, I))` with
//! `KL = −½ Σ_j (1 + log σ²_j − μ_j² − σ²_j)`; both terms are summed over features and averaged
//! over the batch, in nats. The minimized objective is `reconstruction + β · KL` (β = 1 is the
//! plain VAE).
//!
//! Likelihoods: `bernoulli` (the decoder outputs logits; `−log p(x|z)` is the binary
//! cross-entropy with logits summed over features; data must lie in [0, 1]; reconstructions and
//! samples are `sigmoid(logits)`), or `gaussian` with a FIXED standard deviation `std` (the decoder
//! outputs the mean; `−log p(x|z) = Σ_j (x_j − m_j)² / (2 std²) + D (ln std + ½ ln 2π)`).
//!
//! Reported: `loss/reconstruction`, `loss/kl`, `loss/elbo` (the negative ELBO per sample, nats;
//! with β ≠ 1 the minimized objective differs from it) and, in evaluation, `bits_per_dim`
//! (`loss/elbo / (D ln 2)`; for continuous data this is a density, not a code length).

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::activation::ReluConfig;
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::{BuildContext, ForwardContext, Mode, Sequential, SequentialConfig};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::rand_distr::{Distribution, StandardNormal};
use nash_core::stabilizer::LossSite;
use nash_core::tensor::{
    check_finite, matrix_from_vec, Activation, FeatureShape, Matrix, Param, Parameterized, Rng, Scalar, Tape,
};
use serde::{Deserialize, Serialize};

use crate::conv::{conv_decoder_28, conv_encoder_28};
use crate::dense::{build_stack, check_decoder_output, describe_stack, network_input, prefixed};

/// The decoder's likelihood `p(x|z)` (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Likelihood {
    /// Independent Bernoulli pixels; the decoder outputs logits. Data must lie in [0, 1].
    #[default]
    Bernoulli,
    /// Independent Gaussians with the decoder's output as mean and a fixed standard deviation.
    Gaussian {
        /// The fixed standard deviation, positive.
        std: f32,
    },
}

impl Likelihood {
    fn validate(&self, data: &DataInfo) -> Result<()> {
        match *self {
            Likelihood::Bernoulli => {
                let (lo, hi) = data.value_range;
                if lo < 0.0 || hi > 1.0 {
                    return Err(Error::config(
                        "model.likelihood",
                        format!(
                            "the bernoulli likelihood needs data in [0, 1], but the data lie in [{lo}, {hi}]; \
                             scale the data to [0, 1] or use `{{ type = \"gaussian\", std = 0.1 }}`"
                        ),
                    ));
                }
            }
            Likelihood::Gaussian { std } if !(std.is_finite() && std > 0.0) => {
                return Err(Error::config(
                    "model.likelihood.std",
                    format!("the standard deviation must be finite and positive, got {std}"),
                ));
            }
            Likelihood::Gaussian { .. } => {}
        }
        Ok(())
    }

    /// `−log p(x|z)` summed over features and averaged over the batch, from the decoder's output.
    pub fn negative_log_likelihood(&self, output: Matrix<Tape>, x: &Matrix) -> Result<Scalar> {
        let (batch, dim) = *output.shape();
        if *x.shape() != (batch, dim) {
            return Err(Error::shape(
                "vae likelihood target",
                format!("[{batch}, {dim}]"),
                format!("[{}, {}]", x.shape().0, x.shape().1),
            ));
        }
        let per_sample = 1.0 / batch as f32;
        Ok(match *self {
            Likelihood::Bernoulli => output.bce_with_logits(x.clone()).sum() * per_sample,
            Likelihood::Gaussian { std } => {
                let constant = dim as f32 * (std.ln() + 0.5 * (2.0 * std::f32::consts::PI).ln());
                (output - x.clone()).square().sum() * (per_sample / (2.0 * std * std)) + constant
            }
        })
    }

    /// The mean of `p(x|z)` from the decoder's output: `sigmoid(logits)` or the Gaussian mean.
    pub fn mean(&self, output: Matrix) -> Matrix {
        match self {
            Likelihood::Bernoulli => output.sigmoid(),
            Likelihood::Gaussian { .. } => output,
        }
    }
}

/// `KL(N(μ, diag σ²) ‖ N(0, I))` per sample, averaged over the batch:
/// `½ Σ (μ² + σ² − log σ² − 1) / batch`, on the tape (`mu` and `logvar` are `[batch, latent]`).
pub fn kl_divergence(mu: Matrix<Tape>, logvar: Matrix<Tape>) -> Scalar {
    let batch = mu.shape().0.max(1);
    let var = logvar.with_empty_tape().exp();
    ((mu.square() + var - logvar) - 1.0).sum() * (0.5 / batch as f32)
}

/// `n` rows of standard normal noise with `cols` columns, drawn from `rng`.
pub fn standard_normal(device: &nash_core::tensor::Device, n: usize, cols: usize, rng: &mut Rng) -> Result<Matrix> {
    let values = (0..n * cols).map(|_| StandardNormal.sample(rng)).collect();
    matrix_from_vec(device, values, n, cols)
}

macro_rules! vae_config {
    ($(#[$doc:meta])* $name:ident, $tag:literal, $encoder:expr, $decoder:expr) => {
        $(#[$doc])*
        #[derive(Debug, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            /// Dimension of the latent code `z`.
            pub latent_dim: usize,
            /// The encoder, from one sample to `2·latent_dim` features (mean, then log-variance).
            pub encoder: SequentialConfig,
            /// The decoder, from `latent_dim` features to one sample (logits for `bernoulli`, the
            /// mean for `gaussian`; no output activation).
            pub decoder: SequentialConfig,
            /// `{ type = "bernoulli" }` (default) or `{ type = "gaussian", std = 0.1 }` (fixed std).
            pub likelihood: Likelihood,
            /// Weight β of the KL term in the objective (β-VAE); 1 is the plain VAE.
            pub beta: f32,
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    latent_dim: 16,
                    encoder: $encoder(2 * 16),
                    decoder: $decoder,
                    likelihood: Likelihood::Bernoulli,
                    beta: 1.0,
                }
            }
        }

        impl $name {
            /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
            pub fn build_vae(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Vae> {
                Vae::build(
                    $tag,
                    self.latent_dim,
                    &self.encoder,
                    &self.decoder,
                    &self.likelihood,
                    self.beta,
                    data,
                    ctx,
                )
            }
        }

        #[typetag::serde(name = $tag)]
        impl ModelConfig for $name {
            fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
                Ok(Box::new(self.build_vae(data, ctx)?))
            }
        }
    };
}

fn dense_encoder(out: usize) -> SequentialConfig {
    SequentialConfig::default()
        .push(LinearConfig::new(256))
        .push(ReluConfig::default())
        .push(LinearConfig::new(out))
}

fn dense_decoder() -> SequentialConfig {
    SequentialConfig::default()
        .push(LinearConfig::new(256))
        .push(ReluConfig::default())
        .push(LinearConfig::new(784))
}

vae_config!(
    /// Config of a dense [`Vae`], `type = "vae"` in pipeline files. Defaults, for 784-dimensional
    /// data in [0, 1]: encoder 784-256-32 (ReLU), a 16-unit code, decoder 16-256-784 (ReLU,
    /// logits), Bernoulli likelihood, β = 1.
    VaeConfig,
    "vae",
    dense_encoder,
    dense_decoder()
);

vae_config!(
    /// Config of a convolutional [`Vae`], `type = "conv_vae"` in pipeline files. Defaults, for
    /// 28x28 single-channel images in [0, 1]: the `conv_autoencoder` stacks
    /// ([`conv_encoder_28`] ending in 32 = 2·16 features, [`conv_decoder_28`] producing logits),
    /// a 16-unit code, Bernoulli likelihood, β = 1.
    ConvVaeConfig,
    "conv_vae",
    conv_encoder_28,
    conv_decoder_28(1)
);

/// The two terms of the negative ELBO for one batch, on the tape (each per sample, in nats).
pub struct VaeLosses {
    /// `−log p(x|z)`, averaged over the batch.
    pub reconstruction: Scalar,
    /// `KL(q(z|x) ‖ p(z))`, averaged over the batch.
    pub kl: Scalar,
}

/// A variational autoencoder (see the module docs). One parameter group, `model`; parameter
/// names `model.encoder.<index>.<param>` and `model.decoder.<index>.<param>`.
pub struct Vae {
    kind: &'static str,
    encoder: Sequential,
    decoder: Sequential,
    latent: usize,
    likelihood: Likelihood,
    beta: f32,
    shape: FeatureShape,
}

impl Vae {
    /// Builds and wires a VAE for `data`, with errors naming the config path.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        kind: &'static str,
        latent_dim: usize,
        encoder: &SequentialConfig,
        decoder: &SequentialConfig,
        likelihood: &Likelihood,
        beta: f32,
        data: &DataInfo,
        ctx: &mut BuildContext<'_>,
    ) -> Result<Vae> {
        if latent_dim == 0 {
            return Err(Error::config("model.latent_dim", "must be at least 1"));
        }
        if !(beta.is_finite() && beta >= 0.0) {
            return Err(Error::config(
                "model.beta",
                format!("must be finite and at least 0, got {beta}"),
            ));
        }
        likelihood.validate(data)?;
        let shape = data.sample_shape;
        let encoder = build_stack(encoder, shape, ctx, "model.encoder")?;
        let want = FeatureShape::Flat(2 * latent_dim);
        if encoder.output_shape() != want {
            return Err(Error::config(
                "model.encoder",
                format!(
                    "the encoder produces {} per sample, but a VAE's encoder outputs a mean and a log-variance \
                     per latent unit: end it with a linear layer of out_features {} (2 x latent_dim {latent_dim})",
                    encoder.output_shape(),
                    2 * latent_dim
                ),
            ));
        }
        let decoder = build_stack(decoder, FeatureShape::Flat(latent_dim), ctx, "model.decoder")?;
        check_decoder_output("model.decoder", decoder.output_shape(), shape)?;
        Ok(Vae {
            kind,
            encoder,
            decoder,
            latent: latent_dim,
            likelihood: likelihood.clone(),
            beta,
            shape,
        })
    }
    /// Dimension of the latent code.
    pub fn latent_dim(&self) -> usize {
        self.latent
    }
    /// The encoder (to mean and log-variance).
    pub fn encoder(&self) -> &Sequential {
        &self.encoder
    }
    /// The decoder (to logits or means).
    pub fn decoder(&self) -> &Sequential {
        &self.decoder
    }
    /// The likelihood.
    pub fn likelihood(&self) -> &Likelihood {
        &self.likelihood
    }
    /// The KL weight β.
    pub fn beta(&self) -> f32 {
        self.beta
    }

    /// The posterior's mean and log-variance on the tape (the mean carries an empty tape sharing
    /// the encoder's output id; combine both before `backward`).
    fn posterior(&mut self, x: &Matrix, mode: Mode, rng: &mut Rng) -> Result<(Matrix<Tape>, Matrix<Tape>)> {
        let input = network_input(&format!("{} input batch", self.kind), x, self.shape)?;
        let h = self.encoder.forward(input, &mut ForwardContext { mode, rng })?.value;
        let k = self.latent;
        let mu = h.with_empty_tape().try_slice((.., ..k))?;
        let logvar = h.try_slice((.., k..))?;
        Ok((mu, logvar))
    }

    /// The negative-ELBO terms of batch `x` with the reparameterization noise `eps` (`[batch,
    /// latent_dim]`) given, on the tape: `z = μ + exp(log σ² / 2) ⊙ ε`.
    pub fn losses_with_eps(&mut self, x: &Matrix, eps: &Matrix, mode: Mode, rng: &mut Rng) -> Result<VaeLosses> {
        let batch = x.shape().0;
        if *eps.shape() != (batch, self.latent) {
            return Err(Error::shape(
                "vae reparameterization noise",
                format!("[{batch}, {}]", self.latent),
                format!("[{}, {}]", eps.shape().0, eps.shape().1),
            ));
        }
        let (mu, logvar) = self.posterior(x, mode, rng)?;
        let kl = kl_divergence(mu.with_empty_tape(), logvar.with_empty_tape());
        let std = (logvar * 0.5).exp();
        let z = mu + std * eps.clone();
        let out = self.decoder.forward(
            Activation::new(z, FeatureShape::Flat(self.latent))?,
            &mut ForwardContext { mode, rng },
        )?;
        let reconstruction = self.likelihood.negative_log_likelihood(out.value, x)?;
        Ok(VaeLosses { reconstruction, kl })
    }

    /// The minimized objective `reconstruction + β · KL`.
    pub fn objective(&self, losses: VaeLosses) -> Scalar {
        losses.reconstruction + losses.kl * self.beta
    }

    /// The posterior means and log-variances of `x`, `[n, latent_dim]` each, in eval mode.
    pub fn encode(&mut self, x: &Matrix, ctx: &mut EvalContext<'_>) -> Result<(Matrix, Matrix)> {
        let (mu, logvar) = self.posterior(x, Mode::Eval, ctx.rng)?;
        Ok((mu.retaped(), logvar.retaped()))
    }

    /// The means of `p(x|z)` for codes `z` (`[n, latent_dim]`), in eval mode.
    pub fn decode(&mut self, z: &Matrix, ctx: &mut EvalContext<'_>) -> Result<Matrix> {
        let z = network_input(&format!("{} codes", self.kind), z, FeatureShape::Flat(self.latent))?;
        let out = self.decoder.forward(
            z,
            &mut ForwardContext {
                mode: Mode::Eval,
                rng: ctx.rng,
            },
        )?;
        Ok(self.likelihood.mean(out.detach()))
    }

    fn check_batch(&self, batch: &Batch, what: &str) -> Result<()> {
        if batch.is_empty() {
            return Err(Error::shape(format!("{} {what}", self.kind), "at least one sample", 0));
        }
        Ok(())
    }
}

impl Parameterized for Vae {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.encoder.named_params(), "model.encoder");
        all.extend(prefixed(self.decoder.named_params(), "model.decoder"));
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = prefixed(self.encoder.named_params_mut(), "model.encoder");
        all.extend(prefixed(self.decoder.named_params_mut(), "model.decoder"));
        all
    }
}

impl Model for Vae {
    fn family(&self) -> &str {
        "autoencoder"
    }
    fn describe(&self) -> String {
        format!(
            "{}: data {}, latent {}, likelihood {:?}, beta {}\n  encoder:\n{}\n  decoder:\n{}",
            self.kind,
            self.shape,
            self.latent,
            self.likelihood,
            self.beta,
            describe_stack(&self.encoder),
            describe_stack(&self.decoder),
        )
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["model".into()]
    }
    /// One reparameterized sample per input; minimizes `reconstruction + β · KL` plus the
    /// stabilizers' terms at [`LossSite::Autoencoder`].
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        self.check_batch(batch, "batch")?;
        let eps = standard_normal(ctx.device, batch.len(), self.latent, ctx.rng)?;
        let losses = self.losses_with_eps(&batch.inputs, &eps, Mode::Train, ctx.rng)?;
        let recon = check_finite("loss/reconstruction", losses.reconstruction.array())? as f64;
        let kl = check_finite("loss/kl", losses.kl.array())? as f64;
        let mut report = StepReport::default();
        report.loss("loss/reconstruction", recon);
        report.loss("loss/kl", kl);
        report.loss("loss/elbo", recon + kl);
        let mut loss = self.objective(losses);
        let (stabilizers, mut hooks) = ctx.hooks();
        for (name, term) in stabilizers.extra_losses(&mut LossSite::Autoencoder, &mut hooks)? {
            let key = format!("loss/model/{name}");
            report.loss(key.clone(), check_finite(&key, term.array())? as f64);
            loss = loss + term;
        }
        let grads = loss.backward();
        let mut params = self.named_params_mut();
        let norm = ctx.apply_gradients("model", &mut params, grads)?;
        report.diagnostic("grad_norm/model", norm);
        Ok(report)
    }
    /// A one-sample estimate of the negative ELBO on a held-out batch (eval mode), its terms and
    /// `bits_per_dim`.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        self.check_batch(batch, "evaluation batch")?;
        let eps = standard_normal(ctx.device, batch.len(), self.latent, ctx.rng)?;
        let losses = self.losses_with_eps(&batch.inputs, &eps, Mode::Eval, ctx.rng)?;
        let recon = losses.reconstruction.array() as f64;
        let kl = losses.kl.array() as f64;
        let elbo = recon + kl;
        Ok(BTreeMap::from([
            ("loss/reconstruction".to_string(), recon),
            ("loss/kl".to_string(), kl),
            ("loss/elbo".to_string(), elbo),
            (
                "bits_per_dim".to_string(),
                elbo / (self.shape.numel() as f64 * std::f64::consts::LN_2),
            ),
        ]))
    }
    /// `n` samples: decoder means at `z ~ N(0, I)`.
    fn sample(&mut self, n: usize, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        let z = standard_normal(ctx.device, n, self.latent, ctx.rng)?;
        Ok(Some(self.decode(&z, ctx)?))
    }
    /// Decoder means at the posterior means.
    fn reconstruct(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        let (mu, _) = self.encode(&batch.inputs, ctx)?;
        Ok(Some(self.decode(&mu, ctx)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use nash_core::layers::activation::TanhConfig;
    use nash_core::layers::conv::{Conv2dConfig, ConvTranspose2dConfig};
    use nash_core::layers::reshape::{FlattenConfig, ReshapeConfig};
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{grad_to_vec, Device, Grads};

    /// A VAE for 6-dimensional data in [0, 1] with a 2-unit code: 6-16-4 and 2-16-6, tanh.
    fn tiny(likelihood: Likelihood, beta: f32) -> VaeConfig {
        tiny_for(6, likelihood, beta)
    }

    /// [`tiny`] for `dim`-dimensional data.
    fn tiny_for(dim: usize, likelihood: Likelihood, beta: f32) -> VaeConfig {
        VaeConfig {
            latent_dim: 2,
            encoder: SequentialConfig::default()
                .push(LinearConfig::new(16))
                .push(TanhConfig::default())
                .push(LinearConfig::new(4)),
            decoder: SequentialConfig::default()
                .push(LinearConfig::new(16))
                .push(TanhConfig::default())
                .push(LinearConfig::new(dim)),
            likelihood,
            beta,
        }
    }

    fn build_tiny(cfg: &VaeConfig, seed: u64) -> Result<Vae> {
        with_build(seed, |ctx| cfg.build_vae(&info(FeatureShape::Flat(6), (0.0, 1.0)), ctx))
    }

    /// The closed form in f64: ½ Σ (μ² + e^{lv} − lv − 1) / batch.
    fn kl_host(mu: &[f64], lv: &[f64], batch: usize) -> f64 {
        mu.iter().zip(lv).map(|(m, l)| m * m + l.exp() - l - 1.0).sum::<f64>() * 0.5 / batch as f64
    }

    #[test]
    fn kl_matches_the_closed_form_and_its_gradient() {
        let device = Device::default();
        let mu = [0.5f32, -1.0, 0.0, 2.0];
        let lv = [0.0f32, 1.0, -0.5, 0.3];
        let mu_t: Matrix = device.tensor_from_vec(mu.to_vec(), (2, 2));
        let lv_t: Matrix = device.tensor_from_vec(lv.to_vec(), (2, 2));
        let kl = kl_divergence(mu_t.leaky_trace(), lv_t.leaky_trace());
        // By hand: sample 1: 0.25 + 1 - 0 - 1 = 0.25 and 1 + e - 1 - 1 = 1.71828;
        // sample 2: 0 + e^-0.5 + 0.5 - 1 = 0.10653 and 4 + e^0.3 - 0.3 - 1 = 4.04986;
        // KL = ½ (0.25 + 1.71828 + 0.10653 + 4.04986) / 2 = 1.53117.
        assert!((kl.array() - 1.531_17).abs() < 1e-4, "{}", kl.array());
        assert!((kl.array() as f64 - kl_host(&[0.5, -1.0, 0.0, 2.0], &[0.0, 1.0, -0.5, 0.3], 2)).abs() < 1e-5);
        let grads = kl.backward();
        let (gm, gl) = (grads.get(&mu_t).as_vec(), grads.get(&lv_t).as_vec());
        let mu64: Vec<f64> = mu.iter().map(|&v| v as f64).collect();
        let lv64: Vec<f64> = lv.iter().map(|&v| v as f64).collect();
        let h = 1e-5;
        let numeric = |which: usize, i: usize| {
            let (mut m, mut l) = (mu64.clone(), lv64.clone());
            let v = if which == 0 { &mut m } else { &mut l };
            v[i] += h;
            let plus = kl_host(&m, &l, 2);
            let (mut m, mut l) = (mu64.clone(), lv64.clone());
            let v = if which == 0 { &mut m } else { &mut l };
            v[i] -= h;
            (plus - kl_host(&m, &l, 2)) / (2.0 * h)
        };
        assert_close(
            "dKL/dmu",
            &gm,
            &(0..4).map(|i| numeric(0, i)).collect::<Vec<_>>(),
            1e-3,
            1e-6,
        );
        assert_close(
            "dKL/dlogvar",
            &gl,
            &(0..4).map(|i| numeric(1, i)).collect::<Vec<_>>(),
            1e-3,
            1e-6,
        );
        // KL of the prior itself is 0.
        let zero = device.zeros_like(&(3, 2));
        assert_eq!(kl_divergence(zero.leaky_trace(), zero.leaky_trace()).array(), 0.0);
    }

    /// The smallest possible Bernoulli reconstruction term of `data`: Σ_j H(x_j) per sample, in nats.
    fn bernoulli_floor(data: &Batch) -> f64 {
        let h = |p: f64| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
        data.inputs.as_vec().iter().map(|&x| h(x as f64)).sum::<f64>() / data.len() as f64
    }

    /// [`low_rank_batch`] data pushed towards 0 and 1 (`x ↦ σ(4 logit(x))`), so that a Bernoulli
    /// model has structure to learn well above the data's entropy.
    fn contrasty_batch(device: &Device, rows: usize, shape: FeatureShape, rng: &mut Rng) -> Batch {
        let b = low_rank_batch(device, rows, shape, (0.0, 1.0), rng);
        let v: Vec<f32> = b
            .inputs
            .as_vec()
            .iter()
            .map(|&x| 1.0 / (1.0 + (-4.0 * (x / (1.0 - x)).ln()).exp()))
            .collect();
        Batch {
            inputs: device.tensor_from_vec(v, (rows, shape.numel())),
            ..b
        }
    }

    #[test]
    fn reparameterization_gradient_reaches_the_encoder() {
        for likelihood in [Likelihood::Bernoulli, Likelihood::Gaussian { std: 0.5 }] {
            let device = Device::default();
            let mut rng = Rng::seed_from_u64(4);
            let data = low_rank_batch(&device, 4, FeatureShape::Flat(6), (0.0, 1.0), &mut rng);
            let eps = standard_normal(&device, 4, 2, &mut rng).unwrap();
            let mut model = build_tiny(&tiny(likelihood.clone(), 1.0), 0).unwrap();
            // Only the reconstruction term: it reaches the encoder through z = μ + σ ⊙ ε alone.
            let loss = model
                .losses_with_eps(&data.inputs, &eps, Mode::Train, &mut rng)
                .unwrap()
                .reconstruction;
            let mut grads: Grads = loss.backward();
            let names: Vec<String> = model.named_params().iter().map(|(n, _)| n.clone()).collect();
            for (i, name) in names.iter().enumerate().filter(|(_, n)| n.starts_with("model.encoder")) {
                let analytic = grad_to_vec(&mut grads, model.named_params()[i].1).unwrap();
                assert!(analytic.iter().any(|g| g.abs() > 1e-4), "{name}: {analytic:?}");
                let numeric = numeric_param_grad(&mut model, i, 1e-2, |m| {
                    let mut r = Rng::seed_from_u64(0);
                    let l = m.losses_with_eps(&data.inputs, &eps, Mode::Train, &mut r).unwrap();
                    l.reconstruction.array() as f64
                });
                assert_close(
                    &format!("{likelihood:?} d recon / d {name}"),
                    &analytic,
                    &numeric,
                    2e-2,
                    2e-4,
                );
            }
        }
    }

    #[test]
    fn beta_scales_the_kl_term() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(5);
        let data = low_rank_batch(&device, 4, FeatureShape::Flat(6), (0.0, 1.0), &mut rng);
        let eps = standard_normal(&device, 4, 2, &mut rng).unwrap();
        let mut run = |beta: f32| {
            let mut model = build_tiny(&tiny(Likelihood::Bernoulli, beta), 1).unwrap();
            let l = model
                .losses_with_eps(&data.inputs, &eps, Mode::Train, &mut rng)
                .unwrap();
            let (r, k) = (l.reconstruction.array(), l.kl.array());
            let objective = model.objective(l);
            assert!((objective.array() - (r + beta * k)).abs() < 1e-5);
            let mut grads = objective.backward();
            let p = model.named_params()[0].1;
            (k, grad_to_vec(&mut grads, p).unwrap())
        };
        let (k0, g0) = run(0.0);
        let (k1, g1) = run(1.0);
        let (k4, g4) = run(4.0);
        assert!(k0 > 0.0 && k0 == k1 && k1 == k4, "same parameters, same KL");
        // The objective's gradient is g_recon + β g_kl: (g4 − g0) = 4 (g1 − g0).
        for ((a, b), c) in g0.iter().zip(&g1).zip(&g4) {
            assert!(((c - a) - 4.0 * (b - a)).abs() < 1e-4, "{g0:?} {g1:?} {g4:?}");
        }
        assert!(
            g0.iter().zip(&g1).any(|(a, b)| (a - b).abs() > 1e-4),
            "the KL term has a gradient"
        );
    }

    #[test]
    fn training_lowers_the_negative_elbo_and_evaluation_reports_bits() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(6);
        let shape = FeatureShape::Flat(24);
        let data = contrasty_batch(&device, 32, shape, &mut rng);
        for likelihood in [Likelihood::Bernoulli, Likelihood::Gaussian { std: 0.3 }] {
            let cfg = tiny_for(24, likelihood.clone(), 1.0);
            let mut model = with_build(2, |ctx| cfg.build_vae(&info(shape, (0.0, 1.0)), ctx)).unwrap();
            let reports = train(&mut model, &data, 60, 3e-2, &mut rng);
            for r in &reports {
                let sum = r.losses["loss/reconstruction"] + r.losses["loss/kl"];
                assert!((r.losses["loss/elbo"] - sum).abs() < 1e-9 && r.losses["loss/kl"] >= 0.0);
            }
            let (first, last) = first_last(&reports, "loss/elbo", 5);
            // The reducible part of the negative ELBO (above the Bernoulli entropy of the data).
            let floor = if likelihood == Likelihood::Bernoulli {
                bernoulli_floor(&data)
            } else {
                0.0
            };
            assert!(
                last - floor < 0.5 * (first - floor),
                "{likelihood:?}: floor {floor}, elbo {first} -> {last}"
            );
            let mut ectx = eval_ctx(&device, &mut rng);
            let eval = model.evaluate(&data, &mut ectx).unwrap();
            let bits = eval["loss/elbo"] / (24.0 * std::f64::consts::LN_2);
            assert!((eval["bits_per_dim"] - bits).abs() < 1e-9, "{eval:?}");
            assert!(eval["loss/elbo"] < first, "{eval:?}");
        }
    }

    #[test]
    fn encode_decode_sample_and_reconstruct_shapes() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(7);
        let data = low_rank_batch(&device, 5, FeatureShape::Flat(6), (0.0, 1.0), &mut rng);
        let mut model = build_tiny(&tiny(Likelihood::Bernoulli, 1.0), 3).unwrap();
        assert_eq!(model.param_groups(), ["model"]);
        let mut ectx = eval_ctx(&device, &mut rng);
        let (mu, logvar) = model.encode(&data.inputs, &mut ectx).unwrap();
        assert_eq!((*mu.shape(), *logvar.shape()), ((5, 2), (5, 2)));
        let recon = model.reconstruct(&data, &mut ectx).unwrap().unwrap();
        assert_eq!(recon.as_vec(), model.decode(&mu, &mut ectx).unwrap().as_vec());
        let samples = model.sample(7, &mut ectx).unwrap().unwrap();
        assert_eq!(*samples.shape(), (7, 6));
        assert!(samples.as_vec().iter().all(|&v| v > 0.0 && v < 1.0), "Bernoulli means");
        let err = model.decode(&data.inputs, &mut ectx).unwrap_err().to_string();
        assert!(err.contains("2 features per sample"), "{err}");
    }

    /// A conv VAE for 1x8x8 images: conv 1→4 k4 s2 p1 (4x4), flatten, linear 2·3; linear 64,
    /// reshape [4, 4, 4], conv-transpose 4→1 k4 s2 p1 (8x8).
    fn tiny_conv() -> ConvVaeConfig {
        ConvVaeConfig {
            latent_dim: 3,
            encoder: SequentialConfig::default()
                .push(Conv2dConfig::new(4, 4).with_stride(2).with_padding(1))
                .push(ReluConfig::default())
                .push(FlattenConfig::default())
                .push(LinearConfig::new(6)),
            decoder: SequentialConfig::default()
                .push(LinearConfig::new(64))
                .push(ReluConfig::default())
                .push(ReshapeConfig::image(4, 4, 4))
                .push(ConvTranspose2dConfig::new(1, 4).with_stride(2).with_padding(1)),
            likelihood: Likelihood::Bernoulli,
            beta: 1.0,
        }
    }

    #[test]
    fn conv_vae_trains_and_samples_images() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(8);
        let shape = FeatureShape::image(1, 8, 8);
        let data = contrasty_batch(&device, 16, shape, &mut rng);
        let mut model = with_build(0, |ctx| tiny_conv().build_vae(&info(shape, (0.0, 1.0)), ctx)).unwrap();
        let reports = train(&mut model, &data, 60, 3e-2, &mut rng);
        let (first, last) = first_last(&reports, "loss/elbo", 5);
        let floor = bernoulli_floor(&data);
        assert!(
            last - floor < 0.5 * (first - floor),
            "floor {floor}, elbo {first} -> {last}"
        );
        let mut ectx = eval_ctx(&device, &mut rng);
        assert_eq!(*model.sample(3, &mut ectx).unwrap().unwrap().shape(), (3, 64));
        assert!(model.describe().starts_with("conv_vae"));
        // The default conv VAE wires 28x28 images: 14x14 and 7x7 feature maps, a 16-unit code.
        let mnist = info(FeatureShape::image(1, 28, 28), (0.0, 1.0));
        let model = with_build(0, |ctx| ConvVaeConfig::default().build_vae(&mnist, ctx)).unwrap();
        let shapes: Vec<String> = model.encoder().layers().iter().map(|l| l.describe()).collect();
        assert_eq!(model.encoder().output_shape(), FeatureShape::Flat(32), "{shapes:?}");
        assert_eq!(model.decoder().output_shape(), FeatureShape::image(1, 28, 28));
        let dense = with_build(0, |ctx| {
            VaeConfig::default().build_vae(&info(FeatureShape::Flat(784), (0.0, 1.0)), ctx)
        });
        assert_eq!(dense.unwrap().latent_dim(), 16);
    }

    #[test]
    fn wrong_wiring_names_the_config_path() {
        let err = |cfg: &VaeConfig, data: DataInfo| {
            with_build(0, |ctx| cfg.build_vae(&data, ctx))
                .err()
                .unwrap()
                .to_string()
        };
        let flat = info(FeatureShape::Flat(6), (0.0, 1.0));
        let mut cfg = tiny(Likelihood::Bernoulli, 1.0);
        cfg.latent_dim = 3;
        let e = err(&cfg, flat.clone());
        assert!(e.contains("`model.encoder`") && e.contains("out_features 6"), "{e}");
        cfg.latent_dim = 2;
        cfg.decoder = SequentialConfig::default().push(LinearConfig::new(5));
        let e = err(&cfg, flat.clone());
        assert!(e.contains("`model.decoder`") && e.contains("out_features 6"), "{e}");
        let e = err(
            &tiny(Likelihood::Bernoulli, 1.0),
            info(FeatureShape::Flat(6), (-1.0, 1.0)),
        );
        assert!(e.contains("`model.likelihood`") && e.contains("gaussian"), "{e}");
        let e = err(&tiny(Likelihood::Gaussian { std: 0.0 }, 1.0), flat.clone());
        assert!(e.contains("model.likelihood.std"), "{e}");
        let e = err(&tiny(Likelihood::Bernoulli, -1.0), flat);
        assert!(e.contains("model.beta"), "{e}");
        // A conv VAE on flat data points at the layer and at the data's image shape.
        let e = with_build(0, |ctx| {
            ConvVaeConfig::default().build_vae(&info(FeatureShape::Flat(784), (0.0, 1.0)), ctx)
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("model.encoder.layers[0]") && e.contains("image_shape"),
            "{e}"
        );
        // Pipeline tables parse, and typos are refused.
        let cfg: Box<dyn ModelConfig> = nash_core::serde_json::from_str(
            r#"{"type": "vae", "latent_dim": 16, "beta": 4.0, "likelihood": {"type": "gaussian", "std": 0.1}}"#,
        )
        .unwrap();
        assert!(format!("{cfg:?}").contains("std: 0.1"));
        let typo = r#"{"type": "conv_vae", "laten_dim": 4}"#;
        let e = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(typo)
            .unwrap_err()
            .to_string();
        assert!(e.contains("laten_dim"), "{e}");
    }
}
