//! Normalization: BatchNorm (per feature for flat inputs, per channel for images) and LayerNorm.
//!
//! BatchNorm follows PyTorch: in training it normalizes with the biased batch variance and updates
//! `running_mean ← (1 − m)·running_mean + m·mean` and `running_var ← (1 − m)·running_var +
//! m·var_unbiased` (momentum `m = 0.1`); in evaluation it uses the running statistics.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

#[cfg(not(feature = "cuda"))]
use super::OverFunction;
use super::{ActivationFn, BuildContext, ForwardContext, Layer, LayerConfig, Mode};
use crate::error::{Error, Result};
use crate::tensor::{Activation, FeatureShape, Param, ParamRole, Parameterized, Tape};

/// Values per task when the batch-norm kernel splits a pass across the pool's threads: enough
/// to outweigh handing a task to another thread.
#[cfg(not(feature = "cuda"))]
const MIN_VALUES_PER_TASK: usize = 1 << 14;

/// The least number of items (channels or samples of `values_per_item` values each) per task
/// (all of them while splitting is suspended, [`crate::kernels::with_splitting`]).
#[cfg(not(feature = "cuda"))]
fn min_items_per_task(values_per_item: usize) -> usize {
    crate::kernels::min_items_per_task(MIN_VALUES_PER_TASK.div_ceil(values_per_item.max(1)))
}

type Tensor3<T = Tape> = Tensor<(usize, usize, usize), f32, crate::tensor::Device, T>;

/// A training-mode normalization's output with the batch mean and biased variance per channel.
type Normalized = (Tensor3, Vec<f32>, Vec<f32>);

fn positive_finite(path: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::config(path, format!("must be a finite number > 0, got {v}")))
    }
}

/// `{ type = "batch_norm", momentum = 0.1, eps = 1e-5, affine = true }`: 1d over the features of
/// flat inputs, 2d per channel of image inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchNormConfig {
    /// Weight of the newest batch in the running statistics.
    pub momentum: f64,
    /// Added to the variance.
    pub eps: f64,
    /// Whether to learn a per-feature scale (`weight`) and shift (`bias`).
    pub affine: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            momentum: 0.1,
            eps: 1e-5,
            affine: true,
        }
    }
}

impl BatchNormConfig {
    /// PyTorch's defaults (momentum 0.1, eps 1e-5, affine).
    pub fn new() -> Self {
        Self::default()
    }
}

#[typetag::serde(name = "batch_norm")]
impl LayerConfig for BatchNormConfig {
    fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        Ok(Box::new(self.build_batch_norm(input, ctx)?))
    }
}

impl BatchNormConfig {
    /// Builds the layer for samples of shape `input` (the typed form of [`LayerConfig::build`]).
    pub fn build_batch_norm(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<BatchNorm> {
        positive_finite("eps", self.eps)?;
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::config(
                "momentum",
                format!("must be in [0, 1], got {}", self.momentum),
            ));
        }
        let (c, hw) = match input {
            FeatureShape::Flat(n) => (n, 1),
            FeatureShape::Image {
                channels,
                height,
                width,
            } => (channels, height * width),
        };
        if c == 0 || hw == 0 {
            return Err(Error::shape("batch_norm", "a non-empty input", input));
        }
        let p = |v: f32, role| Param::from_vec(ctx.device, vec![v; c], vec![c], role);
        let (weight, bias) = if self.affine {
            (Some(p(1.0, ParamRole::Scale)?), Some(p(0.0, ParamRole::Shift)?))
        } else {
            (None, None)
        };
        Ok(BatchNorm {
            channels: c,
            spatial: hw,
            momentum: self.momentum as f32,
            eps: self.eps as f32,
            weight,
            bias,
            running_mean: p(0.0, ParamRole::Buffer)?,
            running_var: p(1.0, ParamRole::Buffer)?,
            last_mode: None,
            reestimated_batches: None,
        })
    }
}

/// Batch normalization; `running_mean` / `running_var` are [`ParamRole::Buffer`] parameters.
#[derive(Debug)]
pub struct BatchNorm {
    channels: usize,
    spatial: usize,
    momentum: f32,
    eps: f32,
    weight: Option<Param>,
    bias: Option<Param>,
    running_mean: Param,
    running_var: Param,
    last_mode: Option<Mode>,
    /// While re-estimating ([`Layer::set_statistics_reestimation`]): the batches averaged so far.
    reestimated_batches: Option<u32>,
}

impl BatchNorm {
    fn bcast(&self, v: crate::tensor::Vector, b: usize) -> Result<Tensor3<NoneTape>> {
        Ok(v.try_broadcast_like::<_, Axes2<0, 2>>(&(b, self.channels, self.spatial))?)
    }
    /// Applies the affine scale and shift (if any) to normalized values.
    fn affine(&self, xhat: Tensor3, b: usize) -> Result<Tensor3> {
        match (&self.weight, &self.bias) {
            (Some(w), Some(s)) => Ok(xhat
                .try_mul(self.bcast(w.value().clone(), b)?)?
                .try_add(self.bcast(s.value().clone(), b)?)?),
            _ => Ok(xhat),
        }
    }
    /// Training-mode normalization from dfdx ops: `(y, batch mean, biased batch variance)`, `x`
    /// being `[batch, channels, pixels]` (the reference for [`BatchNorm::normalize_batch`], and the
    /// CUDA path).
    #[cfg(any(feature = "cuda", test))]
    fn composite_normalize_batch(&self, x: Tensor3) -> Result<Normalized> {
        let dims = *x.shape();
        let mean = x.with_empty_tape().try_mean::<(usize,), Axes2<0, 2>>()?;
        let mean_host = mean.as_vec();
        let centered = x.try_sub(mean.try_broadcast_like::<_, Axes2<0, 2>>(&dims)?)?;
        let var = centered
            .with_empty_tape()
            .try_square()?
            .try_mean::<(usize,), Axes2<0, 2>>()?;
        let var_host = var.as_vec();
        let std = var.try_add(self.eps)?.try_sqrt()?;
        let xhat = centered.try_div(std.try_broadcast_like::<_, Axes2<0, 2>>(&dims)?)?;
        Ok((self.affine(xhat, dims.0)?, mean_host, var_host))
    }

    /// Training-mode normalization as one tape op on the host: per channel `c` over its `n =
    /// batch·pixels` values, `x̂ = (x − μ)/√(σ² + ε)` with the biased variance, `y = γ·x̂ + β`; the
    /// backward pass adds `Σ dy·x̂` to `γ`, `Σ dy` to `β` and
    /// `γ/(n·√(σ² + ε)) · (n·dy − Σ dy − x̂·Σ dy·x̂)` to `x` (the batch-statistics gradient).
    /// Returns `(y, μ, σ²)`; equal to [`BatchNorm::composite_normalize_batch`] up to rounding (tested).
    /// The sums run per channel and the elementwise passes per sample, each in parallel on the
    /// pool's threads and on the widest vectors. CPU only: gradient buffers are host slices.
    ///
    /// With `activation`, the op goes on to apply it to `y` in place and keeps its slopes, whose
    /// product with the output's gradient then stands for `dy` in the backward pass (as a linear
    /// layer fuses the activation after it: no separate pass, buffer or tape op).
    #[cfg(not(feature = "cuda"))]
    fn normalize_batch(&self, x: Tensor3, activation: Option<ActivationFn>) -> Result<Normalized> {
        use rayon::prelude::*;
        let (batch, channels, pixels) = *x.shape();
        let (x, mut tape) = x.split_tape();
        let mut xhat = crate::kernels::host(&x);
        let n = (batch * pixels) as f64;
        let blocks =
            move |c: usize| (0..batch).map(move |b| (b * channels + c) * pixels..(b * channels + c + 1) * pixels);
        // Values per sample (a chunk length, so never 0).
        let row = (channels * pixels).max(1);
        let gamma = self.weight.as_ref().map(|w| w.host_values());
        let beta = self.bias.as_ref().map(|b| b.host_values());
        // Per channel (in parallel over channels): the mean and the biased variance, in f64 over
        // eight lanes per block, on the widest vectors.
        let statistics: Vec<(f64, f64, f64)> = (0..channels)
            .into_par_iter()
            .with_min_len(min_items_per_task(batch * pixels))
            .map(|c| {
                crate::kernels::on_widest_vectors(
                    #[inline(always)]
                    || {
                        use crate::kernels::sum_blocks_in_lanes;
                        let mu = sum_blocks_in_lanes(blocks(c).map(|r| &xhat[r]), |v| v as f64) / n;
                        let centered = |v: f32| {
                            let d = v as f64 - mu;
                            d * d
                        };
                        let sigma2 = sum_blocks_in_lanes(blocks(c).map(|r| &xhat[r]), centered) / n;
                        (mu, sigma2, 1.0 / (sigma2 + self.eps as f64).sqrt())
                    },
                )
            })
            .collect();
        let mean: Vec<f32> = statistics.iter().map(|s| s.0 as f32).collect();
        let var: Vec<f32> = statistics.iter().map(|s| s.1 as f32).collect();
        let inv_std: Vec<f32> = statistics.iter().map(|s| s.2 as f32).collect();
        // x̂ and y = f(γ·x̂ + β) with the slopes f' of a fused activation f, in one pass in
        // parallel over samples; `y` and the slopes written once, without a zero-fill first (the
        // activation's own pass over `y` afterwards was 1.1% of the DCGAN's step).
        let len = xhat.len();
        let mut y: Vec<f32> = Vec::with_capacity(len);
        let mut slopes: Option<Vec<f32>> = activation.map(|_| Vec::with_capacity(len));
        let rows = NormalizedRows {
            xhat: &mut xhat,
            y: &mut y.spare_capacity_mut()[..len],
            slopes: slopes.as_mut().map(|s| &mut s.spare_capacity_mut()[..len]),
            row,
            pixels,
            statistics: &statistics,
            affine: gamma
                .as_deref()
                .zip(beta.as_deref())
                .map(|(g, b)| (g.as_slice(), b.as_slice())),
        };
        match activation {
            Some(f) => f.with_function(rows),
            None => rows.run(|v| (v, 1.0)),
        }
        // SAFETY: every sample's `channels·pixels` values of `y` (and of the slopes, with an
        // activation) were written above (`statistics` has one entry per channel, and each
        // sample's chunks of `y` and the slopes are as long as its chunk of `x̂`).
        unsafe {
            y.set_len(len);
            if let Some(slopes) = &mut slopes {
                slopes.set_len(len);
            }
        }
        let y = x.device().tensor_from_vec(y, (batch, channels, pixels));
        let (xg, yg) = (x.ghost(), y.ghost());
        // A frozen `γ` or `β` (`Param::requires_grad`) gets no gradient.
        let ghost = |p: &Option<Param>| {
            p.as_ref()
                .filter(|p| p.requires_grad())
                .map(|p| p.with_id(|t| t.ghost()))
        };
        let (wg, bg) = (ghost(&self.weight), ghost(&self.bias));
        dfdx::tensor::Tape::add_backward_op(&mut tape, move |grads| {
            // Moved out and back, not copied: dfdx lends no `&` and `&mut` to two gradients at once.
            let dy_store = std::mem::take(&mut **grads.get_or_alloc_mut(&yg)?);
            // Before a fused activation: dy ⊙ f'.
            let dy = crate::kernels::before_activation(&dy_store, slopes.as_deref());
            // Per channel (in parallel over channels): Σ dy and Σ dy·x̂.
            let sums: Vec<(f64, f64)> = (0..channels)
                .into_par_iter()
                .with_min_len(min_items_per_task(batch * pixels))
                .map(|c| {
                    crate::kernels::on_widest_vectors(
                        #[inline(always)]
                        || crate::kernels::sum_and_dot_blocks_in_lanes(blocks(c).map(|r| (&dy[r.clone()], &xhat[r]))),
                    )
                })
                .collect();
            let (sum_dy, sum_dy_xhat): (Vec<f64>, Vec<f64>) = sums.into_iter().unzip();
            if let Some(wg) = &wg {
                for (d, s) in grads.get_or_alloc_mut(wg)?.iter_mut().zip(&sum_dy_xhat) {
                    *d += *s as f32;
                }
            }
            if let Some(bg) = &bg {
                for (d, s) in grads.get_or_alloc_mut(bg)?.iter_mut().zip(&sum_dy) {
                    *d += *s as f32;
                }
            }
            // dx += γ/(n·σ) · (n·dy − Σ dy − x̂·Σ dy·x̂), in parallel over samples.
            let dx = grads.get_or_alloc_mut(&xg)?;
            dx.par_chunks_mut(row)
                .zip(dy.par_chunks(row).zip(xhat.par_chunks(row)))
                .with_min_len(min_items_per_task(row))
                .for_each(|(dxs, (dys, xs))| {
                    crate::kernels::on_widest_vectors(
                        #[inline(always)]
                        || {
                            for c in 0..channels {
                                let scale = gamma.as_ref().map_or(1.0, |g| g[c] as f64) * inv_std[c] as f64 / n;
                                let (sum, dot) = (sum_dy[c], sum_dy_xhat[c]);
                                let block = c * pixels..(c + 1) * pixels;
                                for ((d, g), h) in
                                    dxs[block.clone()].iter_mut().zip(&dys[block.clone()]).zip(&xs[block])
                                {
                                    *d += (scale * (n * *g as f64 - sum - *h as f64 * dot)) as f32;
                                }
                            }
                        },
                    )
                });
            **grads.get_or_alloc_mut(&yg)? = dy_store;
            Ok(())
        });
        Ok((y.put_tape(tape), mean, var))
    }

    /// The running statistics `(mean, var)`.
    pub fn running_stats(&self) -> (Vec<f32>, Vec<f32>) {
        (self.running_mean.to_vec(), self.running_var.to_vec())
    }
}

/// Batch norm's elementwise pass over the samples (in parallel): `x̂ = (x − μ)·inv_std` in place
/// of `x`, `y = f(γ·x̂ + β)` and, where `slopes` are wanted, `f'(γ·x̂ + β)` ([`OverFunction`]: `f`
/// is a fused activation, or the identity).
#[cfg(not(feature = "cuda"))]
struct NormalizedRows<'a> {
    /// `x` in, `x̂` out, `[batch, channels, pixels]`.
    xhat: &'a mut [f32],
    /// The output.
    y: &'a mut [std::mem::MaybeUninit<f32>],
    /// The activation's slopes, when one is fused.
    slopes: Option<&'a mut [std::mem::MaybeUninit<f32>]>,
    /// Values per sample, `channels·pixels`.
    row: usize,
    /// Values per channel of a sample.
    pixels: usize,
    /// Per channel: `(μ, σ², 1/√(σ² + ε))`.
    statistics: &'a [(f64, f64, f64)],
    /// `(γ, β)`, when the layer has them.
    affine: Option<(&'a [f32], &'a [f32])>,
}

#[cfg(not(feature = "cuda"))]
impl OverFunction for NormalizedRows<'_> {
    type Output = ();
    fn run<F: Fn(f32) -> (f32, f32) + Copy + Send + Sync>(self, f: F) {
        use rayon::prelude::*;
        let NormalizedRows {
            xhat,
            y,
            slopes,
            row,
            pixels,
            statistics,
            affine,
        } = self;
        // One sample: per channel, its block of values.
        let sample = |xs: &mut [f32],
                      ys: &mut [std::mem::MaybeUninit<f32>],
                      mut ss: Option<&mut [std::mem::MaybeUninit<f32>]>| {
            crate::kernels::on_widest_vectors(
                #[inline(always)]
                || {
                    // A local copy of the function (see `ActivationFn::apply_with_slopes`).
                    let local = f;
                    for (c, &(mu, _, inv)) in statistics.iter().enumerate() {
                        let (scale, shift) = affine.map_or((1.0, 0.0), |(g, b)| (g[c], b[c]));
                        let block = c * pixels..(c + 1) * pixels;
                        let (xb, yb) = (&mut xs[block.clone()], &mut ys[block.clone()]);
                        match ss.as_deref_mut() {
                            Some(ss) => {
                                let sb = &mut ss[block];
                                for i in 0..xb.len() {
                                    let v = ((xb[i] as f64 - mu) * inv) as f32;
                                    xb[i] = v;
                                    let (value, slope) = local(scale * v + shift);
                                    yb[i].write(value);
                                    sb[i].write(slope);
                                }
                            }
                            None => {
                                for i in 0..xb.len() {
                                    let v = ((xb[i] as f64 - mu) * inv) as f32;
                                    xb[i] = v;
                                    yb[i].write(local(scale * v + shift).0);
                                }
                            }
                        }
                    }
                },
            )
        };
        let per_task = crate::kernels::min_items_per_task(row);
        match slopes {
            Some(slopes) => xhat
                .par_chunks_mut(row)
                .zip(y.par_chunks_mut(row))
                .zip(slopes.par_chunks_mut(row))
                .with_min_len(per_task)
                .for_each(|((xs, ys), ss)| sample(xs, ys, Some(ss))),
            None => xhat
                .par_chunks_mut(row)
                .zip(y.par_chunks_mut(row))
                .with_min_len(per_task)
                .for_each(|(xs, ys)| sample(xs, ys, None)),
        }
    }
}

impl Parameterized for BatchNorm {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut v = Vec::new();
        if let (Some(w), Some(b)) = (&self.weight, &self.bias) {
            v.push(("weight".to_string(), w));
            v.push(("bias".to_string(), b));
        }
        v.push(("running_mean".to_string(), &self.running_mean));
        v.push(("running_var".to_string(), &self.running_var));
        v
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut v = Vec::new();
        if let (Some(w), Some(b)) = (&mut self.weight, &mut self.bias) {
            v.push(("weight".to_string(), w));
            v.push(("bias".to_string(), b));
        }
        v.push(("running_mean".to_string(), &mut self.running_mean));
        v.push(("running_var".to_string(), &mut self.running_var));
        v
    }
}

impl BatchNorm {
    /// The layer's pass, followed by `activation` when given: fused into the training-mode
    /// kernel (`normalize_batch`), the activation's own op otherwise.
    fn run(
        &mut self,
        input: Activation,
        ctx: &mut ForwardContext<'_>,
        activation: Option<ActivationFn>,
    ) -> Result<Activation> {
        let shape = self.output_shape(input.shape)?;
        let b = input.batch_size();
        let (c, hw) = (self.channels, self.spatial);
        let dims = (b, c, hw);
        let x: Tensor3 = input.value.try_reshape_like(&dims)?;
        let y = match ctx.mode {
            Mode::Train => {
                let n = b * hw;
                if n < 2 {
                    return Err(Error::shape(
                        "batch_norm in training mode",
                        "more than one value per channel (a batch of at least 2)",
                        format!("{n} value per channel"),
                    ));
                }
                #[cfg(not(feature = "cuda"))]
                let (y, mean_host, var_host) = self.normalize_batch(x, activation)?;
                #[cfg(feature = "cuda")]
                let (y, mean_host, var_host) = self.composite_normalize_batch(x)?;
                // PyTorch: running stats use the unbiased variance. While re-estimating, the n-th
                // batch gets weight 1/n: the running statistics are the batches' plain average.
                let m = match &mut self.reestimated_batches {
                    Some(seen) => {
                        *seen += 1;
                        1.0 / *seen as f32
                    }
                    None => self.momentum,
                };
                let unbias = n as f32 / (n as f32 - 1.0);
                let rm: Vec<f32> = self
                    .running_mean
                    .to_vec()
                    .iter()
                    .zip(&mean_host)
                    .map(|(&r, &v)| (1.0 - m) * r + m * v)
                    .collect();
                let rv: Vec<f32> = self
                    .running_var
                    .to_vec()
                    .iter()
                    .zip(&var_host)
                    .map(|(&r, &v)| (1.0 - m) * r + m * v * unbias)
                    .collect();
                self.running_mean.set(&rm)?;
                self.running_var.set(&rv)?;
                y
            }
            Mode::Eval => {
                let dev = x.device().clone();
                let inv: Vec<f32> = self
                    .running_var
                    .to_vec()
                    .iter()
                    .map(|&v| 1.0 / (v + self.eps).sqrt())
                    .collect();
                let rm = self.running_mean.value().clone();
                let inv = dev.tensor_from_vec(inv, (c,));
                let xhat = x.try_sub(self.bcast(rm, b)?)?.try_mul(self.bcast(inv, b)?)?;
                self.affine(xhat, b)?
            }
        };
        self.last_mode = Some(ctx.mode);
        let y = y.try_reshape_like(&(b, c * hw))?;
        // Fused in the training-mode kernel; the activation's own op otherwise.
        let fused = cfg!(not(feature = "cuda")) && ctx.mode == Mode::Train;
        let y = match activation {
            Some(f) if !fused => f.apply(y)?,
            _ => y,
        };
        Activation::new(y, shape)
    }
}

impl Layer for BatchNorm {
    fn describe(&self) -> String {
        if self.spatial == 1 {
            format!("batch_norm1d({})", self.channels)
        } else {
            format!("batch_norm2d({} channels)", self.channels)
        }
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        let ok = match input {
            FeatureShape::Flat(n) => self.spatial == 1 && n == self.channels,
            FeatureShape::Image {
                channels,
                height,
                width,
            } => channels == self.channels && height * width == self.spatial,
        };
        if !ok {
            let expected = if self.spatial == 1 {
                format!("[{}] features", self.channels)
            } else {
                format!("{} channels of {} pixels", self.channels, self.spatial)
            };
            return Err(Error::shape("batch_norm", expected, input));
        }
        Ok(input)
    }
    fn forward(&mut self, input: Activation, ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        self.run(input, ctx, None)
    }
    #[cfg(not(feature = "cuda"))]
    fn fuses_activation(&self) -> bool {
        true
    }
    #[cfg(not(feature = "cuda"))]
    fn forward_activated(
        &mut self,
        input: Activation,
        f: ActivationFn,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Activation> {
        self.run(input, ctx, Some(f))
    }
    fn set_statistics_reestimation(&mut self, on: bool) -> bool {
        self.reestimated_batches = on.then_some(0);
        true
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        if self.last_mode != Some(Mode::Eval) {
            return Err(Error::unsupported(
                "the input gradient of batch_norm in training mode",
                "batch statistics couple the samples, so one sample's gradient depends on the whole batch; \
                 run the critic in eval mode, or use layer_norm (or no normalization) in a critic with a gradient penalty",
            ));
        }
        self.output_shape(input.shape)?;
        let b = input.batch_size();
        let dims = (b, self.channels, self.spatial);
        let inv: Vec<f32> = self
            .running_var
            .to_vec()
            .iter()
            .map(|&v| 1.0 / (v + self.eps).sqrt())
            .collect();
        let inv = grad_output.value.device().tensor_from_vec(inv, (self.channels,));
        let g: Tensor3 = grad_output.value.try_reshape_like(&dims)?;
        let g = match &self.weight {
            Some(w) => g.try_mul(self.bcast(w.value().clone(), b)?)?,
            None => g,
        };
        let g = g.try_mul(self.bcast(inv, b)?)?;
        Activation::new(g.try_reshape_like(&(b, self.channels * self.spatial))?, input.shape)
    }
}

/// `{ type = "layer_norm", eps = 1e-5, elementwise_affine = true }`: normalizes each sample over
/// all of its values (PyTorch `LayerNorm(sample_shape)`), with a per-value scale and shift.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayerNormConfig {
    /// Added to the variance.
    pub eps: f64,
    /// Whether to learn a per-value scale (`weight`) and shift (`bias`).
    pub elementwise_affine: bool,
}

impl Default for LayerNormConfig {
    fn default() -> Self {
        LayerNormConfig {
            eps: 1e-5,
            elementwise_affine: true,
        }
    }
}

impl LayerNormConfig {
    /// PyTorch's defaults.
    pub fn new() -> Self {
        Self::default()
    }
}

#[typetag::serde(name = "layer_norm")]
impl LayerConfig for LayerNormConfig {
    fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        positive_finite("eps", self.eps)?;
        let n = input.numel();
        if n == 0 {
            return Err(Error::shape("layer_norm", "a non-empty input", input));
        }
        let affine = if self.elementwise_affine {
            Some((
                Param::from_vec(ctx.device, vec![1.0; n], vec![n], ParamRole::Scale)?,
                Param::from_vec(ctx.device, vec![0.0; n], vec![n], ParamRole::Shift)?,
            ))
        } else {
            None
        };
        Ok(Box::new(LayerNorm {
            shape: input,
            eps: self.eps as f32,
            affine,
        }))
    }
}

/// Layer normalization over each sample.
#[derive(Debug)]
pub struct LayerNorm {
    shape: FeatureShape,
    eps: f32,
    affine: Option<(Param, Param)>,
}

type M<T = Tape> = crate::tensor::Matrix<T>;

impl LayerNorm {
    /// `(x̂, σ)` of each row, both taped from `x`.
    fn normalize(&self, x: M) -> Result<(M, M)> {
        let dims = *x.shape();
        let mean = x.with_empty_tape().try_mean::<(usize,), Axis<1>>()?;
        let centered = x.try_sub(mean.try_broadcast_like::<_, Axis<1>>(&dims)?)?;
        let var = centered
            .with_empty_tape()
            .try_square()?
            .try_mean::<(usize,), Axis<1>>()?;
        let std = var
            .try_add(self.eps)?
            .try_sqrt()?
            .try_broadcast_like::<_, Axis<1>>(&dims)?;
        let std2 = std.with_empty_tape();
        Ok((centered.try_div(std)?, std2))
    }
    fn bcast(v: &Param, dims: (usize, usize)) -> Result<M<NoneTape>> {
        Ok(v.value().clone().try_broadcast_like::<_, Axis<0>>(&dims)?)
    }
}

impl Parameterized for LayerNorm {
    fn named_params(&self) -> Vec<(String, &Param)> {
        match &self.affine {
            Some((w, b)) => vec![("weight".into(), w), ("bias".into(), b)],
            None => Vec::new(),
        }
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        match &mut self.affine {
            Some((w, b)) => vec![("weight".into(), w), ("bias".into(), b)],
            None => Vec::new(),
        }
    }
}

impl Layer for LayerNorm {
    fn describe(&self) -> String {
        format!("layer_norm({})", self.shape)
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        if input.numel() != self.shape.numel() {
            return Err(Error::shape("layer_norm", self.shape, input));
        }
        Ok(input)
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        let shape = self.output_shape(input.shape)?;
        let dims = *input.value.shape();
        let (xhat, _) = self.normalize(input.value)?;
        let y = match &self.affine {
            Some((w, b)) => xhat.try_mul(Self::bcast(w, dims)?)?.try_add(Self::bcast(b, dims)?)?,
            None => xhat,
        };
        Activation::new(y, shape)
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        self.output_shape(input.shape)?;
        let dims = *input.value.shape();
        // With a = g⊙γ: ∂L/∂x = (a − mean(a) − x̂⊙mean(a⊙x̂)) / σ, per row.
        let a = match &self.affine {
            Some((w, _)) => grad_output.value.try_mul(Self::bcast(w, dims)?)?,
            None => grad_output.value,
        };
        let (xhat, std) = self.normalize(input.value.with_empty_tape())?;
        let mean_a = a
            .with_empty_tape()
            .try_mean::<(usize,), Axis<1>>()?
            .try_broadcast_like::<_, Axis<1>>(&dims)?;
        let mean_ax = a
            .with_empty_tape()
            .try_mul(xhat.with_empty_tape())?
            .try_mean::<(usize,), Axis<1>>()?
            .try_broadcast_like::<_, Axis<1>>(&dims)?;
        let g = a.try_sub(mean_a)?.try_sub(xhat.try_mul(mean_ax)?)?.try_div(std)?;
        Activation::new(g, input.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::activation::ReluConfig;
    use crate::layers::testing::*;
    use crate::layers::{reestimate_statistics, Sequential, SequentialConfig};

    fn set_affine(layer: &mut dyn Layer, h: &mut Harness) {
        // Non-trivial scale and shift so their gradients are exercised.
        for (name, p) in layer.named_params_mut() {
            if name == "weight" || name == "bias" {
                let v = h.values(p.numel());
                p.set(&v).unwrap();
            }
        }
    }

    fn check_with_params(cfg: &dyn LayerConfig, shape: FeatureShape, mode: Mode, ig: InputGrad) {
        // check_layer_with builds its own layer; affine defaults (1, 0) are still exercised through
        // gradients, and the eval path is checked after setting running stats below.
        check_layer_with(
            cfg,
            shape,
            Check {
                batch: 3,
                mode,
                seed: 4,
                input_grad: ig,
                input_differentiable: true,
                h: 1e-2,
            },
        );
    }

    #[test]
    fn batch_norm_gradients() {
        let cfg = BatchNormConfig::new();
        check_with_params(&cfg, FeatureShape::Flat(3), Mode::Train, InputGrad::Unsupported);
        check_with_params(&cfg, FeatureShape::image(2, 1, 2), Mode::Train, InputGrad::Unsupported);
        check_with_params(&cfg, FeatureShape::Flat(3), Mode::Eval, InputGrad::Exact);
        check_with_params(&cfg, FeatureShape::image(2, 1, 2), Mode::Eval, InputGrad::Exact);
    }

    #[test]
    fn layer_norm_gradients() {
        check_with_params(
            &LayerNormConfig::new(),
            FeatureShape::Flat(4),
            Mode::Train,
            InputGrad::Exact,
        );
        let no_affine = LayerNormConfig {
            elementwise_affine: false,
            ..Default::default()
        };
        check_with_params(&no_affine, FeatureShape::image(1, 2, 2), Mode::Train, InputGrad::Exact);
    }

    #[test]
    fn batch_norm_eval_with_learned_params_input_grad_matches_backward() {
        let mut h = Harness::new(9);
        let mut bn = BatchNormConfig::new()
            .build(FeatureShape::image(2, 1, 2), &mut h.build_ctx())
            .unwrap();
        set_affine(bn.as_mut(), &mut h);
        let v = h.values(12);
        let x = h.input(v, 3, FeatureShape::image(2, 1, 2));
        let _ = bn.forward(x, &mut h.fwd_ctx(Mode::Train)).unwrap();
        let v = h.values(12);
        let x = h.input(v, 3, FeatureShape::image(2, 1, 2));
        let keep = x.reuse();
        let leaf = x.detach();
        let y = bn.forward(x, &mut h.fwd_ctx(Mode::Eval)).unwrap();
        let r = h.values(12);
        let rt = h.dev.tensor_from_vec(r, (3, 4));
        let grads = (y.value * rt.clone()).sum::<(), _>().backward();
        let g = bn.input_grad(&keep, Activation::input(&rt, y.shape).unwrap()).unwrap();
        let b = grads.get(&leaf).as_vec();
        assert_close(
            "bn input_grad",
            &g.detach().as_vec(),
            &b.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            1e-5,
            1e-6,
        );
    }

    #[test]
    fn batch_norm_running_stats_follow_torch() {
        // Reference (PyTorch semantics, momentum 0.1, running stats start at mean 0, var 1):
        //   x = [[1, 2], [3, 6], [5, 10]] (batch 3, 2 features)
        //   batch mean = [3, 6], biased var = [8/3, 32/3], unbiased var = [4, 16]
        //   running_mean = 0.9*0 + 0.1*[3, 6] = [0.3, 0.6]
        //   running_var  = 0.9*1 + 0.1*[4, 16] = [1.3, 2.5]
        //   normalized first row = (1 - 3)/sqrt(8/3 + 1e-5) = -1.2247426, (2 - 6)/sqrt(32/3 + 1e-5) = -1.2247443
        // torch: bn = nn.BatchNorm1d(2); y = bn(torch.tensor([[1.,2.],[3.,6.],[5.,10.]]))
        let mut h = Harness::new(0);
        let mut bn = BatchNormConfig::new()
            .build(FeatureShape::Flat(2), &mut h.build_ctx())
            .unwrap();
        let x = h.input(vec![1., 2., 3., 6., 5., 10.], 3, FeatureShape::Flat(2));
        let y = bn.forward(x, &mut h.fwd_ctx(Mode::Train)).unwrap().detach().as_vec();
        assert!(
            (y[0] + 1.2247426).abs() < 1e-5 && (y[1] + 1.2247443).abs() < 1e-5,
            "{y:?}"
        );
        let params = bn.named_params();
        let get = |n: &str| params.iter().find(|(k, _)| k == n).unwrap().1.to_vec();
        let (rm, rv) = (get("running_mean"), get("running_var"));
        assert!((rm[0] - 0.3).abs() < 1e-6 && (rm[1] - 0.6).abs() < 1e-6, "{rm:?}");
        assert!((rv[0] - 1.3).abs() < 1e-6 && (rv[1] - 2.5).abs() < 1e-6, "{rv:?}");
        assert!(!params.iter().find(|(k, _)| k == "running_var").unwrap().1.trainable());
        // Eval: (x - 0.3)/sqrt(1.3 + 1e-5) for feature 0.
        let x = h.input(vec![1.3, 0.6], 1, FeatureShape::Flat(2));
        let y = bn.forward(x, &mut h.fwd_ctx(Mode::Eval)).unwrap().detach().as_vec();
        assert!(
            (y[0] - 1.0 / (1.3f32 + 1e-5).sqrt()).abs() < 1e-5 && y[1].abs() < 1e-6,
            "{y:?}"
        );
        // A single sample cannot be normalized in training mode.
        let x = h.input(vec![1.0, 2.0], 1, FeatureShape::Flat(2));
        assert!(bn.forward(x, &mut h.fwd_ctx(Mode::Train)).is_err());
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn the_batch_kernel_gives_the_same_bits_on_one_thread_and_on_three() {
        // Large enough for several tasks per pass (MIN_VALUES_PER_TASK), in both directions.
        let (batch, channels, pixels) = (6, 5, 2000);
        let mut h = Harness::new(4);
        let mut bn = BatchNormConfig::default()
            .build_batch_norm(FeatureShape::image(channels, 40, 50), &mut h.build_ctx())
            .unwrap();
        set_affine(&mut bn, &mut h);
        let xv = h.values(batch * channels * pixels);
        let rv = h.values(batch * channels * pixels);
        let run = |threads: usize, activation: Option<ActivationFn>| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let x = h.dev.tensor_from_vec(xv.clone(), (batch, channels, pixels));
                let r = h.dev.tensor_from_vec(rv.clone(), (batch, channels, pixels));
                let (y, mean, var) = bn.normalize_batch(x.leaky_trace(), activation).unwrap();
                let mut out = vec![y.with_empty_tape().as_vec(), mean, var];
                let mut grads = (y * r).sum::<(), _>().backward();
                out.push(grads.get(&x).as_vec());
                for (_, p) in bn.named_params().iter().filter(|(_, p)| p.trainable()) {
                    out.push(grads.get_or_alloc_mut(p.value()).unwrap().to_vec());
                }
                out.iter()
                    .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            })
        };
        for activation in [None, Some(ActivationFn::Elu(1.0))] {
            assert_eq!(run(3, activation), run(1, activation));
        }
    }

    #[test]
    fn the_batch_kernel_matches_the_composite_dfdx_path_with_gradients() {
        for (batch, channels, pixels, affine) in [(7, 6, 1, true), (5, 3, 4, true), (4, 2, 9, false), (3, 2, 21, true)]
        {
            let mut h = Harness::new(11);
            let cfg = BatchNormConfig {
                affine,
                ..Default::default()
            };
            let shape = if pixels == 1 {
                FeatureShape::Flat(channels)
            } else {
                FeatureShape::image(channels, 1, pixels)
            };
            let mut bn = cfg.build_batch_norm(shape, &mut h.build_ctx()).unwrap();
            set_affine(&mut bn, &mut h);
            let bn = &bn;
            let xv = h.values(batch * channels * pixels);
            let rv = h.values(batch * channels * pixels);
            let r = h.dev.tensor_from_vec(rv, (batch, channels, pixels));
            let run = |op: &dyn Fn(Tensor3) -> Result<Normalized>| {
                let x = h.dev.tensor_from_vec(xv.clone(), (batch, channels, pixels));
                let (y, mean, var) = op(x.leaky_trace()).unwrap();
                let values = y.with_empty_tape().as_vec();
                let mut grads = (y * r.clone()).sum::<(), _>().backward();
                let mut out = vec![values, mean, var, grads.get(&x).as_vec()];
                for (_, p) in bn.named_params().iter().filter(|(_, p)| p.trainable()) {
                    out.push(grads.get_or_alloc_mut(p.value()).unwrap().to_vec());
                }
                out
            };
            // Without an activation, and with one fused into the kernel against the activation's
            // own op after the composite path.
            for activation in [None, Some(ActivationFn::LeakyRelu(0.2)), Some(ActivationFn::Tanh)] {
                let fused = run(&|x| bn.normalize_batch(x, activation));
                let composite = run(&|x| {
                    let (y, mean, var) = bn.composite_normalize_batch(x)?;
                    let y = match activation {
                        Some(f) => f
                            .apply(y.try_reshape_like(&(batch, channels * pixels))?)?
                            .try_reshape_like(&(batch, channels, pixels))?,
                        None => y,
                    };
                    Ok((y, mean, var))
                });
                assert_eq!(fused.len(), if affine { 6 } else { 4 });
                for (what, (a, b)) in ["y", "mean", "var", "dx", "dgamma", "dbeta"]
                    .iter()
                    .zip(fused.iter().zip(&composite))
                {
                    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
                    assert_close(&format!("{what} ({activation:?})"), a, &b64, 1e-4, 1e-5);
                }
            }
        }
    }

    #[test]
    fn reestimated_statistics_are_the_plain_average_of_the_batches() {
        // Batch 1: x = [[1, 2], [3, 6], [5, 10]]: mean [3, 6], unbiased var [4, 16].
        // Batch 2: x = [[0, 0], [2, -4]]:          mean [1, -2], unbiased var [2, 8].
        // Re-estimated (PyTorch's momentum = None, the cumulative average): mean [2, 2], var [3, 12],
        // whatever the statistics were before; afterwards the momentum-0.1 update returns.
        let mut h = Harness::new(0);
        let mut net = SequentialConfig::default()
            .push(BatchNormConfig::new())
            .push(ReluConfig::default())
            .build(FeatureShape::Flat(2), &mut h.build_ctx(), "net")
            .unwrap();
        let stats = |net: &Sequential| {
            let params = net.named_params();
            let get = |n: &str| params.iter().find(|(k, _)| k == n).unwrap().1.to_vec();
            (get("0.running_mean"), get("0.running_var"))
        };
        let batches = [vec![1., 2., 3., 6., 5., 10.], vec![0., 0., 2., -4.]];
        let x = h.input(vec![9., 9., -9., 9.], 2, FeatureShape::Flat(2));
        net.forward(x, &mut h.fwd_ctx(Mode::Train)).unwrap();
        let mut next = 0;
        let found = reestimate_statistics(
            &mut net,
            |net| net,
            2,
            |net| {
                let v = batches[next].clone();
                next += 1;
                let x = h.input(v.clone(), v.len() / 2, FeatureShape::Flat(2));
                net.forward(x, &mut h.fwd_ctx(Mode::Train)).map(drop)
            },
        )
        .unwrap();
        assert!(found);
        let (rm, rv) = stats(&net);
        assert!((rm[0] - 2.0).abs() < 1e-6 && (rm[1] - 2.0).abs() < 1e-6, "{rm:?}");
        assert!((rv[0] - 3.0).abs() < 1e-5 && (rv[1] - 12.0).abs() < 1e-5, "{rv:?}");
        // Back to momentum 0.1: mean [2, 2] -> 0.9 * [2, 2] + 0.1 * [1, -2].
        let x = h.input(batches[1].clone(), 2, FeatureShape::Flat(2));
        net.forward(x, &mut h.fwd_ctx(Mode::Train)).unwrap();
        let (rm, _) = stats(&net);
        assert!((rm[0] - 1.9).abs() < 1e-6 && (rm[1] - 1.6).abs() < 1e-6, "{rm:?}");

        // A failing batch still ends the re-estimation; a network without statistics runs nothing.
        let failed = reestimate_statistics(&mut net, |net| net, 3, |_| Err(Error::Other("no inputs".into())));
        assert!(failed.is_err());
        let x = h.input(batches[1].clone(), 2, FeatureShape::Flat(2));
        net.forward(x, &mut h.fwd_ctx(Mode::Train)).unwrap();
        let (rm, _) = stats(&net);
        assert!((rm[0] - (0.9 * 1.9 + 0.1)).abs() < 1e-6, "{rm:?}");
        let mut plain = SequentialConfig::default()
            .push(ReluConfig::default())
            .build(FeatureShape::Flat(2), &mut h.build_ctx(), "net")
            .unwrap();
        let ran = reestimate_statistics(&mut plain, |net| net, 2, |_| panic!("nothing to re-estimate")).unwrap();
        assert!(!ran);
    }

    #[test]
    fn batch_norm_2d_is_per_channel() {
        // 2 samples, 2 channels of 2 pixels: channel 0 values {0, 2, 4, 6} (mean 3, unbiased var 20/3),
        // channel 1 values {1, 1, 1, 1} (mean 1, var 0).
        let mut h = Harness::new(0);
        let mut bn = BatchNormConfig::new()
            .build(FeatureShape::image(2, 1, 2), &mut h.build_ctx())
            .unwrap();
        let x = h.input(vec![0., 2., 1., 1., 4., 6., 1., 1.], 2, FeatureShape::image(2, 1, 2));
        let y = bn.forward(x, &mut h.fwd_ctx(Mode::Train)).unwrap().detach().as_vec();
        assert!(y[2].abs() < 1e-6 && y[3].abs() < 1e-6);
        let rm = bn.named_params()[2].1.to_vec();
        let rv = bn.named_params()[3].1.to_vec();
        assert!((rm[0] - 0.3).abs() < 1e-6 && (rm[1] - 0.1).abs() < 1e-6);
        assert!((rv[0] - (0.9 + 0.1 * 20.0 / 3.0)).abs() < 1e-5 && (rv[1] - 0.9).abs() < 1e-6);
    }
}
