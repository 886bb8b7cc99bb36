//! `vq_vae`: the vector-quantized variational autoencoder (van den Oord et al. 2017, "Neural
//! Discrete Representation Learning").
//!
//! The encoder maps a sample to continuous codes `z_e`, which are split into `num_vectors`
//! vectors of `code_dim` values each:
//!
//! - a **flat** encoder output of `F` features holds `F / code_dim` vectors, vector `v` being
//!   features `v·code_dim .. (v+1)·code_dim` (so `F` must be a multiple of `code_dim`);
//! - an **image** encoder output `[channels, height, width]` (a convolutional encoder) holds one
//!   vector per spatial position, its `channels` values being the vector (so `code_dim` must
//!   equal `channels`), as in the paper.
//!
//! Each vector is replaced by its nearest codebook entry (`codebook_size x code_dim`, Euclidean
//! distance, ties to the lowest index) giving `z_q`. The decoder sees `z_e + sg[z_q − z_e]` (the
//! straight-through estimator: its value is `z_q`, its gradient reaches the encoder unchanged).
//! The loss is
//!
//! `reconstruction(decoder(z_q), x) + mean(sg[z_e] − e)² + β · mean(z_e − sg[e])²`
//!
//! (codebook and commitment terms as element means, as PyTorch implementations write them with
//! `F.mse_loss`). With `ema = { decay, epsilon }` the codebook is not trained by the optimizer:
//! it is a buffer updated after each step by exponential moving averages of the assigned encoder
//! outputs (the paper's appendix A.1), and the codebook term is dropped. With
//! `dead_code_reset = { after_steps }`, a code no batch has used for `after_steps` steps is
//! re-initialized to a random encoder output of the current batch.
//!
//! `sample` decodes codes drawn uniformly from the codebook: a learned prior over codes (the
//! paper's PixelCNN) is out of scope, so samples show what the codebook spans rather than the data
//! distribution.
//!
//! One parameter group, `model`: `model.encoder.*`, `model.decoder.*`, `model.codebook`
//! ([`ParamRole::Embedding`], or [`ParamRole::Buffer`] with EMA), and the buffers
//! `model.ema_cluster_size`, `model.ema_embed_sum` (with EMA) and `model.code_idle_steps` (with
//! dead-code reset), so that checkpoints restore them.

use std::collections::BTreeMap;

use nash_core::data::{Batch, DataInfo};
use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::activation::{ReluConfig, SigmoidConfig};
use nash_core::layers::linear::LinearConfig;
use nash_core::layers::{BuildContext, ForwardContext, LayerConfig, Mode, Sequential, SequentialConfig};
use nash_core::loss::basic::MseConfig;
use nash_core::loss::{Loss, LossConfig};
use nash_core::model::{EvalContext, Model, ModelConfig, StepReport, TrainContext};
use nash_core::rand::Rng as _;
use nash_core::stabilizer::LossSite;
use nash_core::tensor::{
    check_finite, join_name, Activation, Device, FeatureShape, Matrix, Param, ParamRole, Parameterized, Rng, Tape,
};
use serde::{Deserialize, Serialize};

/// Exponential-moving-average codebook updates: `ema = { decay = 0.99, epsilon = 1e-5 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    /// Decay of the moving averages, in `[0, 1)`.
    pub decay: f32,
    /// Laplace smoothing of the cluster sizes (keeps `e = m / N` finite for unused codes).
    pub epsilon: f32,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig {
            decay: 0.99,
            epsilon: 1e-5,
        }
    }
}

/// Re-initializes codes that no batch used for `after_steps` steps: `dead_code_reset = { after_steps = 100 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadCodeResetConfig {
    /// Consecutive steps without use after which a code is replaced by a random encoder output.
    pub after_steps: u64,
}

impl Default for DeadCodeResetConfig {
    fn default() -> Self {
        DeadCodeResetConfig { after_steps: 100 }
    }
}

/// Config of [`VqVae`], `type = "vq_vae"` in pipeline files (see the module docs).
///
/// The defaults suit 784-dimensional data in `[0, 1]`: encoder 784-256-64 (ReLU hidden, linear
/// output: 8 vectors of 8 values), a codebook of 64 codes, decoder 64-256-784 with a sigmoid
/// output, MSE, β = 0.25, codebook trained by its loss.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VqVaeConfig {
    /// The encoder, from one data sample to `num_vectors · code_dim` continuous code values (flat),
    /// or to a `[code_dim, h, w]` feature map (one vector per position).
    pub encoder: SequentialConfig,
    /// The decoder, from the quantized codes (the encoder's output shape) to one data sample.
    pub decoder: SequentialConfig,
    /// Values per code vector.
    pub code_dim: usize,
    /// Number of codebook entries.
    pub codebook_size: usize,
    /// Weight β of the commitment loss.
    pub beta: f32,
    /// EMA codebook updates instead of the codebook loss; absent: the optimizer trains the codebook.
    pub ema: Option<EmaConfig>,
    /// Re-initialization of unused codes; absent: never.
    pub dead_code_reset: Option<DeadCodeResetConfig>,
    /// The reconstruction loss between the decoder's output and the input.
    pub loss: Box<dyn LossConfig>,
}

fn linear(out: usize) -> Box<dyn LayerConfig> {
    Box::new(LinearConfig::new(out))
}

fn relu() -> Box<dyn LayerConfig> {
    Box::new(ReluConfig::default())
}

impl Default for VqVaeConfig {
    fn default() -> Self {
        VqVaeConfig {
            encoder: SequentialConfig {
                layers: vec![linear(256), relu(), linear(64)],
            },
            decoder: SequentialConfig {
                layers: vec![linear(256), relu(), linear(784), Box::new(SigmoidConfig::default())],
            },
            code_dim: 8,
            codebook_size: 64,
            beta: 0.25,
            ema: None,
            dead_code_reset: None,
            loss: Box::new(MseConfig::default()),
        }
    }
}

/// How the encoder's per-sample output is split into code vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeLayout {
    /// A flat code: `vectors` consecutive runs of `dim` values.
    Flat {
        /// Vectors per sample.
        vectors: usize,
        /// Values per vector.
        dim: usize,
    },
    /// A channel-major feature map: one vector of `channels` values per spatial position.
    Spatial {
        /// Values per vector (the channels).
        channels: usize,
        /// Positions per sample (`height · width`).
        positions: usize,
    },
}

impl CodeLayout {
    /// The layout of codes of per-sample shape `shape` with vectors of `code_dim` values, or an
    /// error at `model.code_dim` saying what would fit.
    pub fn new(shape: FeatureShape, code_dim: usize) -> Result<Self> {
        if code_dim == 0 {
            return Err(Error::config("model.code_dim", "must be at least 1"));
        }
        match shape {
            FeatureShape::Flat(f) => {
                if f == 0 || f % code_dim != 0 {
                    return Err(Error::config(
                        "model.code_dim",
                        format!(
                            "the encoder outputs {f} features per sample, which do not split into vectors of \
                             {code_dim}; make the encoder's last out_features a multiple of {code_dim} \
                             (num_vectors · code_dim)"
                        ),
                    ));
                }
                Ok(CodeLayout::Flat {
                    vectors: f / code_dim,
                    dim: code_dim,
                })
            }
            FeatureShape::Image {
                channels,
                height,
                width,
            } => {
                if channels != code_dim {
                    return Err(Error::config(
                        "model.code_dim",
                        format!(
                            "the encoder outputs feature maps {shape}, one code vector per position of {channels} \
                             channels; set code_dim = {channels} (or give the encoder's last layer {code_dim} \
                             channels)"
                        ),
                    ));
                }
                Ok(CodeLayout::Spatial {
                    channels,
                    positions: height * width,
                })
            }
        }
    }
    /// Vectors per sample.
    pub fn vectors(&self) -> usize {
        match *self {
            CodeLayout::Flat { vectors, .. } => vectors,
            CodeLayout::Spatial { positions, .. } => positions,
        }
    }
    /// Values per vector.
    pub fn dim(&self) -> usize {
        match *self {
            CodeLayout::Flat { dim, .. } => dim,
            CodeLayout::Spatial { channels, .. } => channels,
        }
    }
    /// Rows of per-sample codes (`[batch, vectors · dim]`, row-major) to one vector per row
    /// (`[batch · vectors, dim]`): sample `b`'s vector `v` is row `b · vectors + v`.
    pub fn to_vectors(&self, flat: &[f32]) -> Vec<f32> {
        match *self {
            CodeLayout::Flat { .. } => flat.to_vec(),
            CodeLayout::Spatial { channels, positions } => {
                let per = channels * positions;
                let mut out = vec![0.0; flat.len()];
                for (b, sample) in flat.chunks(per).enumerate() {
                    for c in 0..channels {
                        for p in 0..positions {
                            out[(b * positions + p) * channels + c] = sample[c * positions + p];
                        }
                    }
                }
                out
            }
        }
    }
    /// The inverse of [`CodeLayout::to_vectors`].
    pub fn from_vectors(&self, vectors: &[f32]) -> Vec<f32> {
        match *self {
            CodeLayout::Flat { .. } => vectors.to_vec(),
            CodeLayout::Spatial { channels, positions } => {
                let per = channels * positions;
                let mut out = vec![0.0; vectors.len()];
                for (b, sample) in out.chunks_mut(per).enumerate() {
                    for c in 0..channels {
                        for p in 0..positions {
                            sample[c * positions + p] = vectors[(b * positions + p) * channels + c];
                        }
                    }
                }
                out
            }
        }
    }
}

/// `exp(−Σ p ln p)` of the code usage `counts` (the number of equally used codes it amounts to).
pub fn perplexity(counts: &[usize]) -> f64 {
    nash_core::metric::perplexity(counts.iter().map(|&c| c as u64))
}

/// The straight-through estimator: `z_e + sg[z_q − z_e]`, whose value is `z_q` and whose gradient
/// with respect to `z_e` is the gradient with respect to the result, unchanged.
pub fn straight_through(z_e: Matrix<Tape>, z_q: &Matrix) -> Result<Matrix<Tape>> {
    if z_e.shape() != z_q.shape() {
        return Err(Error::shape(
            "straight-through estimator",
            format!("{:?} like the encoder output", z_e.shape()),
            format!("{:?}", z_q.shape()),
        ));
    }
    let gap = z_q.clone() - z_e.retaped::<NoneTape>();
    Ok(z_e + gap)
}

/// The result of quantizing a batch of codes.
#[derive(Clone, Debug)]
pub struct Quantized {
    /// The chosen code of each vector, `batch · num_vectors` of them (sample-major).
    pub indices: Vec<usize>,
    /// The encoder outputs as vectors, `[batch · num_vectors, code_dim]` row-major.
    pub vectors: Vec<f32>,
    /// The quantized codes in the encoder's output layout, `[batch, num_vectors · code_dim]`.
    pub z_q: Matrix,
    /// How often each code was chosen.
    pub counts: Vec<usize>,
}

/// The EMA codebook state (see [`EmaConfig`]).
struct EmaState {
    config: EmaConfig,
    /// `N_k`: moving average of how many vectors code `k` is assigned (unsmoothed).
    cluster_size: Param,
    /// `m_k`: moving average of the sum of the vectors assigned to code `k`.
    embed_sum: Param,
}

/// Dead-code tracking (see [`DeadCodeResetConfig`]).
struct DeadCodes {
    after_steps: u64,
    /// Steps since each code was last used.
    idle: Param,
}

/// A VQ-VAE (see the module docs). One parameter group, `model`.
pub struct VqVae {
    encoder: Sequential,
    decoder: Sequential,
    loss: Box<dyn Loss>,
    codebook: Param,
    codebook_size: usize,
    layout: CodeLayout,
    beta: f32,
    ema: Option<EmaState>,
    dead: Option<DeadCodes>,
    shape: FeatureShape,
}

impl VqVaeConfig {
    /// Builds the model for `data` (the typed form of [`ModelConfig::build`]).
    pub fn build_vq_vae(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<VqVae> {
        if self.codebook_size == 0 {
            return Err(Error::config("model.codebook_size", "must be at least 1"));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(Error::config(
                "model.beta",
                format!("must be a finite weight >= 0 (the paper uses 0.25), got {}", self.beta),
            ));
        }
        if let Some(ema) = &self.ema {
            if !(0.0..1.0).contains(&ema.decay) {
                return Err(Error::config(
                    "model.ema.decay",
                    format!("must be in [0, 1) (0.99 is usual), got {}", ema.decay),
                ));
            }
            if !(ema.epsilon.is_finite() && ema.epsilon > 0.0) {
                return Err(Error::config(
                    "model.ema.epsilon",
                    format!("must be a small positive number (1e-5 is usual), got {}", ema.epsilon),
                ));
            }
        }
        if let Some(dead) = &self.dead_code_reset {
            if dead.after_steps == 0 {
                return Err(Error::config("model.dead_code_reset.after_steps", "must be at least 1"));
            }
        }
        let shape = data.sample_shape;
        let encoder = self.encoder.build(shape, ctx, "model.encoder")?;
        let code_shape = encoder.output_shape();
        let layout = CodeLayout::new(code_shape, self.code_dim)?;
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
        let (k, d) = (self.codebook_size, self.code_dim);
        // The usual initialization (PyTorch implementations): uniform in ±1/K.
        let bound = 1.0 / k as f32;
        let init: Vec<f32> = (0..k * d).map(|_| ctx.rng.gen_range(-bound..=bound)).collect();
        let role = if self.ema.is_some() {
            ParamRole::Buffer
        } else {
            ParamRole::Embedding
        };
        let codebook = Param::from_vec(ctx.device, init.clone(), vec![k, d], role)?;
        let ema = match &self.ema {
            // As if every code had been assigned its own value once: `e = m / N` holds from the
            // start, and a code no batch uses keeps its value instead of being divided by ~epsilon.
            Some(cfg) => Some(EmaState {
                config: cfg.clone(),
                cluster_size: Param::from_vec(ctx.device, vec![1.0; k], vec![k], ParamRole::Buffer)?,
                embed_sum: Param::from_vec(ctx.device, init, vec![k, d], ParamRole::Buffer)?,
            }),
            None => None,
        };
        let dead = match &self.dead_code_reset {
            Some(cfg) => Some(DeadCodes {
                after_steps: cfg.after_steps,
                idle: Param::from_vec(ctx.device, vec![0.0; k], vec![k], ParamRole::Buffer)?,
            }),
            None => None,
        };
        Ok(VqVae {
            encoder,
            decoder,
            loss: self.loss.build()?,
            codebook,
            codebook_size: k,
            layout,
            beta: self.beta,
            ema,
            dead,
            shape,
        })
    }
}

#[typetag::serde(name = "vq_vae")]
impl ModelConfig for VqVaeConfig {
    fn build(&self, data: &DataInfo, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Model>> {
        Ok(Box::new(self.build_vq_vae(data, ctx)?))
    }
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

/// Index of the smallest value (the first one on ties).
fn argmin(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v < values[best] {
            best = i;
        }
    }
    best
}

impl VqVae {
    /// The encoder.
    pub fn encoder(&self) -> &Sequential {
        &self.encoder
    }
    /// The decoder.
    pub fn decoder(&self) -> &Sequential {
        &self.decoder
    }
    /// The codebook, `[codebook_size, code_dim]`.
    pub fn codebook(&self) -> &Param {
        &self.codebook
    }
    /// How codes are split into vectors.
    pub fn layout(&self) -> CodeLayout {
        self.layout
    }
    /// The per-sample shape of the (continuous and quantized) codes.
    pub fn code_shape(&self) -> FeatureShape {
        self.encoder.output_shape()
    }

    fn input(&self, x: &Matrix) -> Result<Activation> {
        let cols = x.shape().1;
        if cols != self.shape.numel() {
            return Err(Error::shape(
                "vq_vae input batch",
                format!("{} features per sample ({})", self.shape.numel(), self.shape),
                cols,
            ));
        }
        Activation::input(x, self.shape)
    }

    /// Replaces every vector of the codes `z_e` (`[batch, num_vectors · code_dim]`, no tape) by its
    /// nearest codebook entry. Distances `|e_k|² − 2 z·e_k` (the `|z|²` term is the same for every
    /// code) use a matrix product on the device; the arg-min runs on the host.
    pub fn quantize(&self, z_e: &Matrix) -> Result<Quantized> {
        let (batch, cols) = *z_e.shape();
        let (k, d) = (self.codebook_size, self.layout.dim());
        if cols != self.layout.vectors() * d {
            return Err(Error::shape(
                "vq_vae codes",
                format!("{} values per sample", self.layout.vectors() * d),
                cols,
            ));
        }
        let vectors = self.layout.to_vectors(&z_e.as_vec());
        let n = batch * self.layout.vectors();
        let device = z_e.device().clone();
        let z: Matrix = device.tensor_from_vec(vectors.clone(), (n, d));
        let book = self.codebook.as_matrix(k, d);
        let cross = z.matmul(book.permute::<_, Axes2<1, 0>>()).as_vec();
        let table = self.codebook.to_vec();
        let norms: Vec<f32> = table.chunks(d).map(|e| e.iter().map(|v| v * v).sum()).collect();
        let mut indices = Vec::with_capacity(n);
        let mut counts = vec![0usize; k];
        let mut dist = vec![0.0f32; k];
        let mut quantized = Vec::with_capacity(n * d);
        for row in cross.chunks(k) {
            for (j, (c, nrm)) in row.iter().zip(&norms).enumerate() {
                dist[j] = nrm - 2.0 * c;
            }
            let best = argmin(&dist);
            indices.push(best);
            counts[best] += 1;
            quantized.extend_from_slice(&table[best * d..(best + 1) * d]);
        }
        let z_q = device.tensor_from_vec(self.layout.from_vectors(&quantized), (batch, cols));
        Ok(Quantized {
            indices,
            vectors,
            z_q,
            counts,
        })
    }

    /// The continuous codes `z_e` of `x` (`[n, num_vectors · code_dim]`), in eval mode.
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

    /// Decodes quantized codes `z_q` (`[n, num_vectors · code_dim]`), in eval mode.
    pub fn decode(&mut self, z_q: &Matrix, ctx: &mut EvalContext<'_>) -> Result<Matrix> {
        let code_shape = self.code_shape();
        if z_q.shape().1 != code_shape.numel() {
            return Err(Error::shape(
                "vq_vae codes to decode",
                format!("{} values per code ({code_shape})", code_shape.numel()),
                z_q.shape().1,
            ));
        }
        let out = self.decoder.forward(
            Activation::input(z_q, code_shape)?,
            &mut ForwardContext {
                mode: Mode::Eval,
                rng: ctx.rng,
            },
        )?;
        Ok(out.detach())
    }

    /// The codebook loss `mean(e − sg[z_e])²` on the tape of the codebook, for the chosen codes.
    fn codebook_loss(&self, q: &Quantized, device: &Device) -> Result<nash_core::tensor::Scalar> {
        let (k, d) = (self.codebook_size, self.layout.dim());
        let n = q.indices.len();
        let idx = device.tensor_from_vec(q.indices.clone(), (n,));
        let table = self.codebook.as_matrix(k, d).put_tape(Tape::default());
        let chosen: Matrix<Tape> = table.try_gather(idx)?;
        let target: Matrix = device.tensor_from_vec(q.vectors.clone(), (n, d));
        Ok((chosen - target).square().mean())
    }

    /// One EMA step of the codebook from the assignments in `q` (the paper's appendix A.1, with
    /// Laplace smoothing of the cluster sizes):
    /// `N_k ← γ N_k + (1−γ) n_k`, `m_k ← γ m_k + (1−γ) Σ_{z→k} z`,
    /// `Ñ_k = (N_k + ε) / (Σ N + K ε) · Σ N`, `e_k = m_k / Ñ_k`.
    fn ema_update(&mut self, q: &Quantized) -> Result<()> {
        let Some(ema) = &mut self.ema else {
            return Ok(());
        };
        let (k, d) = (self.codebook_size, self.layout.dim());
        let (gamma, eps) = (ema.config.decay as f64, ema.config.epsilon as f64);
        let mut sums = vec![0.0f64; k * d];
        for (i, &code) in q.indices.iter().enumerate() {
            for j in 0..d {
                sums[code * d + j] += q.vectors[i * d + j] as f64;
            }
        }
        let sizes: Vec<f64> = ema
            .cluster_size
            .to_vec()
            .iter()
            .zip(&q.counts)
            .map(|(&n, &c)| gamma * n as f64 + (1.0 - gamma) * c as f64)
            .collect();
        let embed: Vec<f64> = ema
            .embed_sum
            .to_vec()
            .iter()
            .zip(&sums)
            .map(|(&m, &s)| gamma * m as f64 + (1.0 - gamma) * s)
            .collect();
        let total: f64 = sizes.iter().sum();
        let mut book = vec![0.0f32; k * d];
        for code in 0..k {
            let smoothed = (sizes[code] + eps) / (total + k as f64 * eps) * total;
            for j in 0..d {
                book[code * d + j] = (embed[code * d + j] / smoothed) as f32;
            }
        }
        ema.cluster_size
            .set(&sizes.iter().map(|&v| v as f32).collect::<Vec<_>>())?;
        ema.embed_sum
            .set(&embed.iter().map(|&v| v as f32).collect::<Vec<_>>())?;
        self.codebook.set(&book)
    }

    /// Counts idle steps and re-initializes codes idle for `after_steps` steps to random vectors
    /// of this batch's encoder outputs. Returns how many codes were reset.
    fn reset_dead_codes(&mut self, q: &Quantized, rng: &mut Rng) -> Result<usize> {
        let Some(dead) = &mut self.dead else {
            return Ok(0);
        };
        let d = self.layout.dim();
        let n = q.indices.len();
        let mut idle = dead.idle.to_vec();
        let mut book = self.codebook.to_vec();
        let mut ema = self
            .ema
            .as_ref()
            .map(|e| (e.cluster_size.to_vec(), e.embed_sum.to_vec()));
        let mut reset = 0;
        for (code, steps) in idle.iter_mut().enumerate() {
            if q.counts[code] > 0 {
                *steps = 0.0;
                continue;
            }
            *steps += 1.0;
            if (*steps as u64) < dead.after_steps || n == 0 {
                continue;
            }
            let pick = rng.gen_range(0..n);
            let value = &q.vectors[pick * d..(pick + 1) * d];
            book[code * d..(code + 1) * d].copy_from_slice(value);
            if let Some((sizes, sums)) = &mut ema {
                // A fresh average of one assignment of `value`.
                sizes[code] = 1.0;
                sums[code * d..(code + 1) * d].copy_from_slice(value);
            }
            *steps = 0.0;
            reset += 1;
        }
        dead.idle.set(&idle)?;
        if reset > 0 {
            self.codebook.set(&book)?;
            if let (Some(state), Some((sizes, sums))) = (&mut self.ema, ema) {
                state.cluster_size.set(&sizes)?;
                state.embed_sum.set(&sums)?;
            }
        }
        Ok(reset)
    }

    /// Encode, quantize and decode `x` in eval mode: the reconstruction and the quantization.
    fn reconstruct_eval(&mut self, x: &Matrix, rng: &mut Rng) -> Result<(Activation, Matrix, Quantized)> {
        let input = self.input(x)?;
        let mut fwd = ForwardContext { mode: Mode::Eval, rng };
        let z_e = self.encoder.forward(input, &mut fwd)?.detach();
        let q = self.quantize(&z_e)?;
        let out = self
            .decoder
            .forward(Activation::input(&q.z_q, self.code_shape())?, &mut fwd)?;
        Ok((out, z_e, q))
    }
}

impl Parameterized for VqVae {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut all = prefixed(self.encoder.named_params(), "model.encoder");
        all.extend(prefixed(self.decoder.named_params(), "model.decoder"));
        all.push(("model.codebook".into(), &self.codebook));
        if let Some(ema) = &self.ema {
            all.push(("model.ema_cluster_size".into(), &ema.cluster_size));
            all.push(("model.ema_embed_sum".into(), &ema.embed_sum));
        }
        if let Some(dead) = &self.dead {
            all.push(("model.code_idle_steps".into(), &dead.idle));
        }
        all
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut all = prefixed(self.encoder.named_params_mut(), "model.encoder");
        all.extend(prefixed(self.decoder.named_params_mut(), "model.decoder"));
        all.push(("model.codebook".into(), &mut self.codebook));
        if let Some(ema) = &mut self.ema {
            all.push(("model.ema_cluster_size".into(), &mut ema.cluster_size));
            all.push(("model.ema_embed_sum".into(), &mut ema.embed_sum));
        }
        if let Some(dead) = &mut self.dead {
            all.push(("model.code_idle_steps".into(), &mut dead.idle));
        }
        all
    }
}

impl Model for VqVae {
    fn family(&self) -> &str {
        "autoencoder"
    }
    fn describe(&self) -> String {
        let layout = match self.layout {
            CodeLayout::Flat { .. } => "flat",
            CodeLayout::Spatial { .. } => "one per position",
        };
        format!(
            "vq_vae: data {}, codes {} = {} vectors of {} ({layout}), codebook {} x {} ({}), β {}{}, loss {}\n  \
             encoder:\n{}\n  decoder:\n{}",
            self.shape,
            self.code_shape(),
            self.layout.vectors(),
            self.layout.dim(),
            self.codebook_size,
            self.layout.dim(),
            match &self.ema {
                Some(e) => format!("EMA decay {}, epsilon {}", e.config.decay, e.config.epsilon),
                None => "trained by the codebook loss".into(),
            },
            self.beta,
            match &self.dead {
                Some(d) => format!(", dead codes reset after {} idle steps", d.after_steps),
                None => String::new(),
            },
            self.loss.name(),
            describe_stack(&self.encoder),
            describe_stack(&self.decoder),
        )
    }
    fn param_groups(&self) -> Vec<String> {
        vec!["model".into()]
    }
    /// Encode, quantize, decode through the straight-through estimator; reconstruction +
    /// codebook (unless EMA) + β · commitment + the stabilizers' terms at
    /// [`LossSite::Autoencoder`]; one update of group `model`; then the EMA codebook step and the
    /// dead-code reset.
    fn train_step(&mut self, batch: &Batch, ctx: &mut TrainContext<'_>) -> Result<StepReport> {
        if batch.is_empty() {
            return Err(Error::shape("vq_vae batch", "at least one sample", 0));
        }
        let mut report = StepReport::default();
        let input = self.input(&batch.inputs)?;
        let code_shape = self.code_shape();
        let z_e = self.encoder.forward(
            input,
            &mut ForwardContext {
                mode: Mode::Train,
                rng: ctx.rng,
            },
        )?;
        let q = self.quantize(&z_e.detach())?;
        let z_e_again = z_e.value.with_empty_tape();
        let decoder_input = straight_through(z_e.value, &q.z_q)?;
        let out = self.decoder.forward(
            Activation::new(decoder_input, code_shape)?,
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
        let distance = (z_e_again - q.z_q.clone()).square().mean();
        let distance_value = check_finite("codebook/quantization_error", distance.array())? as f64;
        report.diagnostic("codebook/quantization_error", distance_value);
        report.loss("loss/commitment", self.beta as f64 * distance_value);
        let mut loss = reconstruction + distance * self.beta;
        if self.ema.is_none() {
            let codebook = self.codebook_loss(&q, ctx.device)?;
            report.loss("loss/codebook", check_finite("loss/codebook", codebook.array())? as f64);
            loss = loss + codebook;
        }
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
        self.ema_update(&q)?;
        let reset = self.reset_dead_codes(&q, ctx.rng)?;
        if self.dead.is_some() {
            report.diagnostic("codebook/reset", reset as f64);
        }
        report.diagnostic("codebook/perplexity", perplexity(&q.counts));
        report.diagnostic("codebook/used", q.counts.iter().filter(|&&c| c > 0).count() as f64);
        Ok(report)
    }
    /// Reconstruction loss, commitment loss, perplexity and codes used on a held-out batch, in
    /// eval mode.
    fn evaluate(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
        if batch.is_empty() {
            return Err(Error::shape("vq_vae evaluation batch", "at least one sample", 0));
        }
        let (out, z_e, q) = self.reconstruct_eval(&batch.inputs, ctx.rng)?;
        let reconstruction = self.loss.compute(out.value, &batch.inputs)?.array() as f64;
        let distance = (z_e - q.z_q.clone()).square().mean::<(), _>().array() as f64;
        Ok(BTreeMap::from([
            ("loss/reconstruction".to_string(), reconstruction),
            ("loss/commitment".to_string(), self.beta as f64 * distance),
            ("codebook/quantization_error".to_string(), distance),
            ("codebook/perplexity".to_string(), perplexity(&q.counts)),
            (
                "codebook/used".to_string(),
                q.counts.iter().filter(|&&c| c > 0).count() as f64,
            ),
        ]))
    }
    /// Decodes codes drawn uniformly from the codebook (no learned prior; see the module docs).
    fn sample(&mut self, n: usize, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        if n == 0 {
            return Ok(Some(ctx.device.zeros_like(&(0, self.shape.numel()))));
        }
        let d = self.layout.dim();
        let table = self.codebook.to_vec();
        let mut vectors = Vec::with_capacity(n * self.layout.vectors() * d);
        for _ in 0..n * self.layout.vectors() {
            let code = ctx.rng.gen_range(0..self.codebook_size);
            vectors.extend_from_slice(&table[code * d..(code + 1) * d]);
        }
        let z_q = ctx
            .device
            .tensor_from_vec(self.layout.from_vectors(&vectors), (n, self.code_shape().numel()));
        Ok(Some(self.decode(&z_q, ctx)?))
    }
    fn reconstruct(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
        Ok(Some(self.reconstruct_eval(&batch.inputs, ctx.rng)?.0.detach()))
    }
    /// The nearest codebook entry of every code vector, in eval mode, exactly as [`VqVae::quantize`]
    /// picks it: sample after sample, each sample's `num_vectors` indices in vector order.
    fn latent_codes(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<Option<Vec<usize>>> {
        let z_e = self.encode(&batch.inputs, ctx)?;
        Ok(Some(self.quantize(&z_e)?.indices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::layers::activation::TanhConfig;
    use nash_core::layers::reshape::{FlattenConfig, ReshapeConfig};
    use nash_core::optim::adam::AdamConfig;
    use nash_core::optim::{Optimizer, OptimizerConfig};
    use nash_core::rand::SeedableRng;
    use nash_core::stabilizer::StabilizerStack;
    use nash_core::tensor::Grads;

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

    /// Data of `dim` features; encoder dim-16-(vectors·code_dim), decoder -16-dim with a sigmoid.
    fn tiny_config(dim: usize, vectors: usize, code_dim: usize, codebook_size: usize) -> VqVaeConfig {
        VqVaeConfig {
            encoder: stack(vec![linear(16), relu(), linear(vectors * code_dim)]),
            decoder: stack(vec![
                linear(16),
                relu(),
                linear(dim),
                Box::new(SigmoidConfig::default()),
            ]),
            code_dim,
            codebook_size,
            ..Default::default()
        }
    }

    fn build(cfg: &VqVaeConfig, dim: usize) -> Result<VqVae> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        cfg.build_vq_vae(
            &info(dim),
            &mut BuildContext {
                device: &device,
                rng: &mut rng,
            },
        )
    }

    /// `rows` samples of rank-2 data in (0, 1): `x = σ(a u + b v)` for fixed directions u, v.
    fn low_rank_batch(device: &Device, rows: usize, dim: usize, rng: &mut Rng) -> Batch {
        let u: Vec<f32> = (0..dim).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        let v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        let mut values = Vec::with_capacity(rows * dim);
        for _ in 0..rows {
            let (a, b) = (rng.gen_range(-2.0f32..2.0), rng.gen_range(-2.0f32..2.0));
            values.extend((0..dim).map(|j| 1.0 / (1.0 + (-(a * u[j] + b * v[j])).exp())));
        }
        Batch {
            inputs: device.tensor_from_vec(values, (rows, dim)),
            shape: FeatureShape::Flat(dim),
            labels: None,
        }
    }

    fn adam(lr: f64) -> BTreeMap<String, Box<dyn Optimizer>> {
        let cfg = AdamConfig {
            lr,
            ..Default::default()
        };
        BTreeMap::from([("model".to_string(), cfg.build().unwrap())])
    }

    fn matrix(values: &[f32], rows: usize, cols: usize) -> Matrix {
        Device::default().tensor_from_vec(values.to_vec(), (rows, cols))
    }

    fn assert_all_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}\n{a:?}\n{b:?}"
            );
        }
    }

    #[test]
    fn straight_through_passes_the_decoder_input_gradient_to_the_encoder_output() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(4);
        let mut decoder = stack(vec![linear(5), Box::new(TanhConfig::default()), linear(3)])
            .build(
                FeatureShape::Flat(4),
                &mut BuildContext {
                    device: &device,
                    rng: &mut rng,
                },
                "decoder",
            )
            .unwrap();
        let z_e = matrix(&[0.3, -1.2, 0.7, 0.1, 2.0, -0.4, 0.9, -0.6], 2, 4);
        let z_q = matrix(&[0.5, -1.0, 0.5, 0.0, 1.5, 0.0, 1.0, -0.5], 2, 4);
        let weights = matrix(&[1.0, -2.0, 0.5, 0.3, 0.7, -1.1], 2, 3);
        let mut run = |x: Matrix<Tape>| -> (Vec<f32>, Grads) {
            let out = decoder
                .forward(
                    Activation::new(x, FeatureShape::Flat(4)).unwrap(),
                    &mut ForwardContext {
                        mode: Mode::Train,
                        rng: &mut rng,
                    },
                )
                .unwrap();
            let values = out.detach().as_vec();
            (values, (out.value * weights.clone()).sum().backward())
        };
        // Through the estimator, with z_e as the leaf.
        let (out_st, grads_st) = run(straight_through(z_e.leaky_trace(), &z_q).unwrap());
        // The decoder run directly on z_q, with z_q as the leaf.
        let (out_q, grads_q) = run(z_q.leaky_trace());
        assert_all_close("decoder output (the value is z_q)", &out_st, &out_q, 1e-6);
        let g_e = grads_st.get(&z_e).as_vec();
        let g_q = grads_q.get(&z_q).as_vec();
        assert!(g_q.iter().any(|g| g.abs() > 1e-3), "{g_q:?}");
        assert_all_close("dL/dz_e == dL/d(decoder input)", &g_e, &g_q, 1e-6);
        // A mismatched z_q is refused.
        assert!(straight_through(z_e.leaky_trace(), &matrix(&[0.0; 4], 1, 4)).is_err());
    }

    #[test]
    fn quantization_picks_the_nearest_code() {
        // 3 features -> 4 code values = 2 vectors of 2; codebook (0, 0), (1, 1), (-1, 2).
        let mut model = build(&tiny_config(3, 2, 2, 3), 3).unwrap();
        model.codebook.set(&[0.0, 0.0, 1.0, 1.0, -1.0, 2.0]).unwrap();
        let z_e = matrix(&[0.9, 1.2, -0.2, 0.1, -0.8, 1.5, 0.6, 0.3], 2, 4);
        let q = model.quantize(&z_e).unwrap();
        // Squared distances: (0.9, 1.2): 2.25, 0.05, 4.25 -> 1; (-0.2, 0.1): 0.05, 2.25, 4.25 -> 0;
        // (-0.8, 1.5): 2.89, 3.49, 0.29 -> 2; (0.6, 0.3): 0.45, 0.65, 5.45 -> 0.
        assert_eq!(q.indices, [1, 0, 2, 0]);
        assert_eq!(q.counts, [2, 1, 1]);
        assert_eq!(q.z_q.as_vec(), [1.0, 1.0, 0.0, 0.0, -1.0, 2.0, 0.0, 0.0]);
        assert_eq!(q.vectors, z_e.as_vec());
        // Ties go to the lowest index.
        model.codebook.set(&[1.0, 0.0, 0.0, 1.0, 5.0, 5.0]).unwrap();
        let q = model.quantize(&matrix(&[0.5, 0.5, 3.0, 3.0], 1, 4)).unwrap();
        assert_eq!(q.indices, [0, 2]);
        // Codes of the wrong width are refused.
        let err = model.quantize(&matrix(&[0.0; 3], 1, 3)).unwrap_err().to_string();
        assert!(err.contains("4 values per sample"), "{err}");
    }

    #[test]
    fn the_codebook_loss_gradient_pulls_chosen_codes_toward_their_vectors() {
        let mut model = build(&tiny_config(3, 2, 2, 3), 3).unwrap();
        model.codebook.set(&[0.0, 0.0, 1.0, 1.0, -1.0, 2.0]).unwrap();
        let z_e = matrix(&[0.9, 1.2, -0.2, 0.1, -0.8, 1.5, 0.6, 0.3], 2, 4);
        let q = model.quantize(&z_e).unwrap();
        let loss = model.codebook_loss(&q, &Device::default()).unwrap();
        // mean over N·D = 8 values of (e − z)²: code 1 vs (0.9, 1.2); code 0 vs (−0.2, 0.1) and
        // (0.6, 0.3); code 2 vs (−0.8, 1.5).
        let want = (0.01 + 0.04 + 0.04 + 0.01 + 0.36 + 0.09 + 0.04 + 0.25) / 8.0;
        assert!((loss.array() - want).abs() < 1e-6, "{} vs {want}", loss.array());
        let mut grads = loss.backward();
        let g = nash_core::tensor::grad_to_vec(&mut grads, &model.codebook).unwrap();
        // ∂/∂e_k = 2/(N·D) Σ_{i → k} (e_k − z_i).
        let by_hand = [
            2.0 / 8.0 * ((0.0 + 0.2) + (0.0 - 0.6)),
            2.0 / 8.0 * ((0.0 - 0.1) + (0.0 - 0.3)),
            2.0 / 8.0 * (1.0 - 0.9),
            2.0 / 8.0 * (1.0 - 1.2),
            2.0 / 8.0 * (-1.0 + 0.8),
            2.0 / 8.0 * (2.0 - 1.5),
        ];
        assert_all_close("codebook gradient", &g, &by_hand, 1e-5);
    }

    #[test]
    fn spatial_codes_are_one_vector_per_position() {
        let layout = CodeLayout::new(FeatureShape::image(2, 2, 2), 2).unwrap();
        assert_eq!(layout.vectors(), 4);
        // Channel-major sample [c0: 0 1 2 3 | c1: 10 11 12 13] -> vectors (0,10), (1,11), (2,12), (3,13).
        let flat = [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0];
        let v = layout.to_vectors(&flat);
        assert_eq!(v, [0.0, 10.0, 1.0, 11.0, 2.0, 12.0, 3.0, 13.0]);
        assert_eq!(layout.from_vectors(&v), flat);
        // A model with a feature-map code: encoder 6 -> 8 -> [2, 2, 2]; decoder flattens.
        let cfg = VqVaeConfig {
            encoder: stack(vec![linear(8), Box::new(ReshapeConfig::image(2, 2, 2))]),
            decoder: stack(vec![Box::new(FlattenConfig::default()), linear(6)]),
            code_dim: 2,
            codebook_size: 4,
            ..Default::default()
        };
        let mut model = build(&cfg, 6).unwrap();
        assert_eq!(
            model.layout(),
            CodeLayout::Spatial {
                channels: 2,
                positions: 4
            }
        );
        model
            .codebook
            .set(&[0.0, 0.0, 10.0, 10.0, 0.0, 10.0, 10.0, 0.0])
            .unwrap();
        let q = model
            .quantize(&matrix(&[1.0, 9.0, 1.0, 9.0, 1.0, 1.0, 9.0, 9.0], 1, 8))
            .unwrap();
        // Positions: (1, 1) -> 0, (9, 1) -> 3, (1, 9) -> 2, (9, 9) -> 1.
        assert_eq!(q.indices, [0, 3, 2, 1]);
        assert_eq!(q.z_q.as_vec(), [0.0, 10.0, 0.0, 10.0, 0.0, 0.0, 10.0, 10.0]);
        // A channel count that is not code_dim names the field.
        let err = build(&VqVaeConfig { code_dim: 3, ..cfg }, 6).err().unwrap().to_string();
        assert!(err.contains("model.code_dim") && err.contains("code_dim = 2"), "{err}");
    }

    #[test]
    fn perplexity_by_hand() {
        assert!((perplexity(&[5, 5, 5, 5]) - 4.0).abs() < 1e-12);
        assert!((perplexity(&[0, 7, 0, 7, 7]) - 3.0).abs() < 1e-12);
        assert!((perplexity(&[10, 0, 0]) - 1.0).abs() < 1e-12);
        // exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = 1.7547654...
        assert!((perplexity(&[3, 1]) - 1.754_765_4).abs() < 1e-6);
        assert_eq!(perplexity(&[0, 0]), 0.0);
    }

    #[test]
    fn ema_update_matches_the_formula() {
        let mut cfg = tiny_config(3, 3, 1, 2);
        cfg.ema = Some(EmaConfig {
            decay: 0.5,
            epsilon: 0.1,
        });
        let mut model = build(&cfg, 3).unwrap();
        assert_eq!(model.codebook.role, ParamRole::Buffer);
        let names: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.ema_cluster_size".to_string()), "{names:?}");
        assert!(names.contains(&"model.ema_embed_sum".to_string()), "{names:?}");
        model.codebook.set(&[0.0, 1.0]).unwrap();
        let ema = model.ema.as_mut().unwrap();
        assert_eq!(ema.cluster_size.to_vec(), [1.0, 1.0]);
        ema.embed_sum.set(&[0.0, 1.0]).unwrap();
        // Vectors 0.2, 0.4 -> code 0 and 0.9 -> code 1: n = (2, 1), sums = (0.6, 0.9).
        let q = model.quantize(&matrix(&[0.2, 0.4, 0.9], 1, 3)).unwrap();
        assert_eq!(q.indices, [0, 0, 1]);
        model.ema_update(&q).unwrap();
        // N = 0.5·(1, 1) + 0.5·(2, 1) = (1.5, 1.0); m = 0.5·(0, 1) + 0.5·(0.6, 0.9) = (0.3, 0.95);
        // Ñ = (N + 0.1) / (2.5 + 2·0.1) · 2.5; e = m / Ñ = (0.3·2.7 / (1.6·2.5), 0.95·2.7 / (1.1·2.5)).
        let ema = model.ema.as_ref().unwrap();
        assert_all_close("N", &ema.cluster_size.to_vec(), &[1.5, 1.0], 1e-6);
        assert_all_close("m", &ema.embed_sum.to_vec(), &[0.3, 0.95], 1e-6);
        assert_all_close("e", &model.codebook.to_vec(), &[0.2025, 2.565 / 2.75], 1e-6);
    }

    #[test]
    fn dead_codes_are_reset_to_batch_encoder_outputs() {
        let mut cfg = tiny_config(3, 2, 2, 3);
        cfg.dead_code_reset = Some(DeadCodeResetConfig { after_steps: 2 });
        let mut model = build(&cfg, 3).unwrap();
        model.codebook.set(&[0.0, 0.0, 50.0, 50.0, -50.0, 50.0]).unwrap();
        let z_e = matrix(&[0.1, 0.2, 0.3, -0.1, -0.2, 0.0, 0.4, 0.4], 2, 4);
        let q = model.quantize(&z_e).unwrap();
        assert_eq!(q.counts, [4, 0, 0]);
        let mut rng = Rng::seed_from_u64(9);
        // One idle step: nothing is reset yet.
        assert_eq!(model.reset_dead_codes(&q, &mut rng).unwrap(), 0);
        assert_eq!(model.dead.as_ref().unwrap().idle.to_vec(), [0.0, 1.0, 1.0]);
        // The second idle step resets codes 1 and 2 to vectors of the batch; code 0 is kept.
        assert_eq!(model.reset_dead_codes(&q, &mut rng).unwrap(), 2);
        assert_eq!(model.dead.as_ref().unwrap().idle.to_vec(), [0.0, 0.0, 0.0]);
        let book = model.codebook.to_vec();
        assert_eq!(&book[..2], [0.0, 0.0]);
        let batch_vectors: Vec<&[f32]> = q.vectors.chunks(2).collect();
        for code in 1..3 {
            let row = &book[code * 2..code * 2 + 2];
            assert!(
                batch_vectors.contains(&row),
                "code {code} = {row:?} not in {batch_vectors:?}"
            );
        }
        // The reset codes are now in use.
        let q = model.quantize(&z_e).unwrap();
        assert!(q.counts.iter().filter(|&&c| c > 0).count() >= 2, "{:?}", q.counts);
    }

    fn train(model: &mut VqVae, data: &Batch, steps: u64, rng: &mut Rng) -> Vec<StepReport> {
        let device = Device::default();
        let mut opts = adam(1e-2);
        let mut stabilizers = StabilizerStack::default();
        (0..steps)
            .map(|step| {
                let mut ctx = TrainContext {
                    step,
                    device: &device,
                    rng,
                    optimizers: &mut opts,
                    stabilizers: &mut stabilizers,
                };
                model.train_step(data, &mut ctx).unwrap()
            })
            .collect()
    }

    #[test]
    fn training_lowers_the_reconstruction_loss_with_either_codebook_update() {
        let device = Device::default();
        for ema in [false, true] {
            let mut rng = Rng::seed_from_u64(1);
            let data = low_rank_batch(&device, 32, 12, &mut rng);
            let mut cfg = tiny_config(12, 2, 2, 16);
            cfg.dead_code_reset = Some(DeadCodeResetConfig { after_steps: 5 });
            if ema {
                cfg.ema = Some(EmaConfig::default());
            }
            let mut model = build(&cfg, 12).unwrap();
            let encoder_before = model.encoder.named_params()[0].1.to_vec();
            let codebook_before = model.codebook.to_vec();
            let reports = train(&mut model, &data, 50, &mut rng);
            for r in &reports {
                assert!(r.first_non_finite().is_none(), "{r:?}");
                assert_eq!(r.losses.contains_key("loss/codebook"), !ema, "{r:?}");
                for key in ["loss/commitment", "loss/reconstruction"] {
                    assert!(r.losses.contains_key(key), "{key}: {r:?}");
                }
                for key in [
                    "codebook/perplexity",
                    "codebook/used",
                    "codebook/reset",
                    "grad_norm/model",
                ] {
                    assert!(r.diagnostics.contains_key(key), "{key}: {r:?}");
                }
                assert!(r.diagnostics["codebook/perplexity"] <= r.diagnostics["codebook/used"] + 1e-9);
            }
            let first = reports[0].losses["loss/reconstruction"];
            let last = reports[49].losses["loss/reconstruction"];
            assert!(
                last < 0.6 * first,
                "ema {ema}: reconstruction went from {first} to {last}"
            );
            // The straight-through gradient reached the encoder; the codebook moved.
            assert_ne!(model.encoder.named_params()[0].1.to_vec(), encoder_before);
            assert_ne!(model.codebook.to_vec(), codebook_before);
            assert!(reports[49].diagnostics["codebook/used"] > 1.0, "{:?}", reports[49]);
            // Evaluation reports the same quantities without updating anything.
            let mut ectx = EvalContext {
                device: &device,
                rng: &mut rng,
            };
            let before: Vec<Vec<f32>> = model.named_params().iter().map(|(_, p)| p.to_vec()).collect();
            let eval = model.evaluate(&data, &mut ectx).unwrap();
            assert!(eval["loss/reconstruction"] < 0.6 * first, "{eval:?}");
            assert!(
                eval["codebook/perplexity"] >= 1.0 && eval["codebook/used"] >= 1.0,
                "{eval:?}"
            );
            let after: Vec<Vec<f32>> = model.named_params().iter().map(|(_, p)| p.to_vec()).collect();
            assert_eq!(before, after);
            // Samples and reconstructions have the data's shape.
            assert_eq!(*model.sample(0, &mut ectx).unwrap().unwrap().shape(), (0, 12));
            let samples = model.sample(5, &mut ectx).unwrap().unwrap();
            assert_eq!(*samples.shape(), (5, 12));
            let recon = model.reconstruct(&data, &mut ectx).unwrap().unwrap();
            assert_eq!(*recon.shape(), (32, 12));
        }
    }

    #[test]
    fn latent_codes_are_the_codes_evaluation_decodes() {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(3);
        let data = low_rank_batch(&device, 10, 12, &mut rng);
        // A flat code (3 vectors of 2) and a spatial one (a [2, 2, 2] map: 4 vectors of 2).
        let spatial = VqVaeConfig {
            encoder: stack(vec![linear(8), Box::new(ReshapeConfig::image(2, 2, 2))]),
            decoder: stack(vec![Box::new(FlattenConfig::default()), linear(12)]),
            code_dim: 2,
            codebook_size: 8,
            ..Default::default()
        };
        for cfg in [tiny_config(12, 3, 2, 8), spatial] {
            let mut model = build(&cfg, 12).unwrap();
            // Codebook entries spread like the encoder outputs, so that several codes are used.
            let outputs = {
                let mut ectx = EvalContext {
                    device: &device,
                    rng: &mut rng,
                };
                model.encode(&data.inputs, &mut ectx).unwrap()
            };
            let spread = model.layout().to_vectors(&outputs.as_vec());
            model.codebook.set(&spread[..16]).unwrap();
            let mut ectx = EvalContext {
                device: &device,
                rng: &mut rng,
            };
            let codes = model.latent_codes(&data, &mut ectx).unwrap().unwrap();
            let vectors = model.layout().vectors();
            assert_eq!(codes.len(), 10 * vectors);
            assert!(codes.iter().all(|&c| c < 8), "{codes:?}");
            // Decoding the codebook vectors of the returned codes gives the model's reconstruction.
            let table = model.codebook.to_vec();
            let chosen: Vec<f32> = codes.iter().flat_map(|&c| table[c * 2..c * 2 + 2].to_vec()).collect();
            let z_q = matrix(&model.layout().from_vectors(&chosen), 10, vectors * 2);
            let decoded = model.decode(&z_q, &mut ectx).unwrap().as_vec();
            let recon = model.reconstruct(&data, &mut ectx).unwrap().unwrap().as_vec();
            assert_eq!(decoded, recon);
            // The batch's perplexity from the codes is the one evaluation reports.
            let mut counts = vec![0usize; 8];
            codes.iter().for_each(|&c| counts[c] += 1);
            let eval = model.evaluate(&data, &mut ectx).unwrap();
            assert_eq!(perplexity(&counts), eval["codebook/perplexity"]);
            assert!(eval["codebook/used"] >= 2.0, "{eval:?}");
        }
    }

    #[test]
    fn wiring_errors_name_the_config_path() {
        let mut cfg = tiny_config(3, 2, 2, 4);
        cfg.encoder = stack(vec![linear(5)]);
        let err = build(&cfg, 3).err().unwrap().to_string();
        assert!(err.contains("model.code_dim") && err.contains("multiple of 2"), "{err}");
        let mut cfg = tiny_config(3, 2, 2, 4);
        cfg.decoder = stack(vec![linear(5)]);
        let err = build(&cfg, 3).err().unwrap().to_string();
        assert!(err.contains("model.decoder") && err.contains("produce 3"), "{err}");
        let mut cfg = tiny_config(3, 2, 2, 4);
        cfg.ema = Some(EmaConfig {
            decay: 1.0,
            epsilon: 1e-5,
        });
        assert!(build(&cfg, 3).err().unwrap().to_string().contains("model.ema.decay"));
        let mut cfg = tiny_config(3, 2, 2, 0);
        assert!(build(&cfg, 3)
            .err()
            .unwrap()
            .to_string()
            .contains("model.codebook_size"));
        cfg.codebook_size = 4;
        cfg.dead_code_reset = Some(DeadCodeResetConfig { after_steps: 0 });
        assert!(build(&cfg, 3)
            .err()
            .unwrap()
            .to_string()
            .contains("model.dead_code_reset.after_steps"));
        // A pipeline table: defaults fill in, unknown fields are refused.
        let json = r#"{"type": "vq_vae", "ema": {"decay": 0.9}, "dead_code_reset": {}}"#;
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
        let text = model.describe();
        assert!(
            text.contains("8 vectors of 8") && text.contains("EMA decay 0.9"),
            "{text}"
        );
        assert!(text.contains("after 100 idle steps"), "{text}");
        let typo = r#"{"type": "vq_vae", "ema": {"decya": 0.9}}"#;
        let err = nash_core::serde_json::from_str::<Box<dyn ModelConfig>>(typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("decya"), "{err}");
    }
}
