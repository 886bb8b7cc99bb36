//! Differentiable augmentation of the discriminator's inputs: `diff_augment` (DiffAugment, Zhao et
//! al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training") and `ada` (adaptive
//! discriminator augmentation, Karras et al. 2020, "Training Generative Adversarial Networks with
//! Limited Data").
//!
//! Both transform real and fake images alike, every time the discriminator sees them — including
//! the generator's update, whose fakes pass through [`Stabilizer::transform_input`] with role
//! `fake`; so every augmentation here is built from differentiable tensor ops that keep the tape
//! (affine maps with constant per-sample coefficients, per-sample means on the tape, and a
//! per-sample gather for translations and flips), and the generator's gradient flows through them.
//! Augmentation never changes the batch size or the sample order, so labels and targets stay valid.
//!
//! The augmentations follow the reference PyTorch code (mit-han-lab/data-efficient-gans,
//! `DiffAugment_pytorch.py`), per sample:
//! - `color`: brightness `x + (u - 0.5)`, then saturation `(x - mean_c(x))·2u + mean_c(x)` (RGB
//!   only: the mean is over channels, per pixel), then contrast `(x - mean(x))·(u + 0.5) + mean(x)`
//!   (the mean is over the whole sample), with a fresh `u ~ U(0, 1)` each;
//! - `translation`: shift by integers in `[-s, s]` along each axis, `s = int(size·ratio + 0.5)`,
//!   zero padding;
//! - `cutout`: zero a `int(size·ratio + 0.5)` square (clipped at the border) centred at a random
//!   position.

use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::model::StepReport;
use nash_core::rand::Rng as _;
use nash_core::registry::Registry;
use nash_core::stabilizer::{HookContext, InputRole, Stabilizer, StabilizerConfig};
use nash_core::state::StateDict;
use nash_core::tensor::{Activation, Device, FeatureShape, Matrix, Rng, Tape};
use serde::{Deserialize, Serialize};

use crate::scope::conflict;

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.stabilizer::<DiffAugmentConfig>(
        "DiffAugment: differentiable color/translation/cutout augmentation of real and fake images",
    )?;
    registry.stabilizer::<AdaConfig>(
        "ADA: the same augmentations applied with a probability p adapted from the sign of D on real data",
    )?;
    Ok(())
}

/// One family of augmentations, as named in DiffAugment's `policy` string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AugmentPolicy {
    /// Brightness, saturation (RGB only) and contrast.
    Color,
    /// Integer translation with zero padding.
    Translation,
    /// Zeroing a square at a random position.
    Cutout,
}

/// One augmentation with its per-sample parameters (identity values leave a sample unchanged).
#[derive(Clone, Debug, PartialEq)]
pub enum Augmentation {
    /// `x + offset` per sample (identity: 0).
    Brightness(Vec<f32>),
    /// `(x - mean over channels)·factor + mean over channels` per sample (identity: 1).
    Saturation(Vec<f32>),
    /// `(x - mean over the sample)·factor + mean over the sample` per sample (identity: 1).
    Contrast(Vec<f32>),
    /// Shift by `(rows, columns)` per sample: output pixel `(i, j)` is input pixel
    /// `(i + rows, j + columns)`, zero outside the image (identity: `(0, 0)`).
    Translation(Vec<(isize, isize)>),
    /// Mirror left-right per sample (identity: false).
    Flip(Vec<bool>),
    /// Zero the rows `r0..r1` × columns `c0..c1` per sample, as `[r0, r1, c0, c1]` (identity: an
    /// empty range).
    Cutout(Vec<[usize; 4]>),
}

impl Augmentation {
    /// Whether every sample is left unchanged.
    fn is_identity(&self) -> bool {
        match self {
            Augmentation::Brightness(v) => v.iter().all(|&o| o == 0.0),
            Augmentation::Saturation(v) | Augmentation::Contrast(v) => v.iter().all(|&f| f == 1.0),
            Augmentation::Translation(v) => v.iter().all(|&t| t == (0, 0)),
            Augmentation::Flip(v) => v.iter().all(|&f| !f),
            Augmentation::Cutout(v) => v.iter().all(|r| r[0] >= r[1] || r[2] >= r[3]),
        }
    }
}

/// The geometry of the images being augmented: `(channels, height, width)`.
pub type ImageDims = (usize, usize, usize);

/// What to draw: the policies and their sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct AugmentSpec {
    /// The policies, applied in order.
    pub policies: Vec<AugmentPolicy>,
    /// Largest shift as a share of the image size.
    pub translation_ratio: f64,
    /// Cutout square side as a share of the image size.
    pub cutout_ratio: f64,
}

/// Draws a uniform integer in `lo..hi` (`hi > lo`).
fn randint(rng: &mut Rng, lo: isize, hi: isize) -> isize {
    rng.gen_range(lo..hi)
}

impl AugmentSpec {
    /// Draws the augmentations for `batch` samples of `dims`. Each augmentation is applied to each
    /// sample with probability `p` (1 for DiffAugment; ADA's adaptive p), identity otherwise.
    pub fn draw(&self, batch: usize, dims: ImageDims, p: f64, rng: &mut Rng) -> Vec<Augmentation> {
        let (c, h, w) = dims;
        // The gate is drawn only when p < 1, so DiffAugment's draws match the reference's.
        let gate = |rng: &mut Rng| p >= 1.0 || rng.gen::<f64>() < p;
        let mut out = Vec::new();
        for policy in &self.policies {
            match policy {
                AugmentPolicy::Color => {
                    let draw = |identity: f32, f: &dyn Fn(f32) -> f32, rng: &mut Rng| -> Vec<f32> {
                        (0..batch)
                            .map(|_| if gate(rng) { f(rng.gen::<f32>()) } else { identity })
                            .collect()
                    };
                    out.push(Augmentation::Brightness(draw(0.0, &|u| u - 0.5, rng)));
                    if c > 1 {
                        out.push(Augmentation::Saturation(draw(1.0, &|u| u * 2.0, rng)));
                    }
                    out.push(Augmentation::Contrast(draw(1.0, &|u| u + 0.5, rng)));
                }
                AugmentPolicy::Translation => {
                    let sh = (h as f64 * self.translation_ratio + 0.5) as isize;
                    let sw = (w as f64 * self.translation_ratio + 0.5) as isize;
                    let shifts = (0..batch)
                        .map(|_| {
                            if gate(rng) {
                                (randint(rng, -sh, sh + 1), randint(rng, -sw, sw + 1))
                            } else {
                                (0, 0)
                            }
                        })
                        .collect();
                    out.push(Augmentation::Translation(shifts));
                }
                AugmentPolicy::Cutout => {
                    let kh = (h as f64 * self.cutout_ratio + 0.5) as usize;
                    let kw = (w as f64 * self.cutout_ratio + 0.5) as usize;
                    let rects = (0..batch)
                        .map(|_| {
                            if !gate(rng) {
                                return [0, 0, 0, 0];
                            }
                            // offset in [0, size + (1 - k % 2)), square from offset - k/2, clipped.
                            let oh = randint(rng, 0, (h + 1 - kh % 2) as isize);
                            let ow = randint(rng, 0, (w + 1 - kw % 2) as isize);
                            let r0 = oh - (kh / 2) as isize;
                            let c0 = ow - (kw / 2) as isize;
                            let clip = |v: isize, n: usize| v.clamp(0, n as isize) as usize;
                            [
                                clip(r0, h),
                                clip(r0 + kh as isize, h),
                                clip(c0, w),
                                clip(c0 + kw as isize, w),
                            ]
                        })
                        .collect();
                    out.push(Augmentation::Cutout(rects));
                }
            }
        }
        out
    }
}

/// Per-sample values spread over each sample's `numel` features: `[batch, numel]`.
fn per_sample(dev: &Device, values: &[f32], numel: usize) -> Matrix {
    let mut v = Vec::with_capacity(values.len() * numel);
    for &x in values {
        v.extend(std::iter::repeat_n(x, numel));
    }
    dev.tensor_from_vec(v, (values.len(), numel))
}

/// `x·factor + mean·(1 - factor)` per sample, with `mean` a differentiable function of `x`.
fn blend_with_mean(x: Matrix<Tape>, mean: Matrix<Tape>, factors: &[f32]) -> Result<Matrix<Tape>> {
    let dev = x.device().clone();
    let numel = x.shape().1;
    let f = per_sample(&dev, factors, numel);
    let one_minus: Vec<f32> = factors.iter().map(|f| 1.0 - f).collect();
    let g = per_sample(&dev, &one_minus, numel);
    Ok(x.try_mul(f)?.try_add(mean.try_mul(g)?)?)
}

/// Moves pixels per sample: output pixel `(i, j)` of sample `b` is input pixel `source(b, i, j)`,
/// or zero when `None`. A gather on the tape (its backward scatters the gradient back) times a
/// constant mask.
fn remap(
    x: Matrix<Tape>,
    dims: ImageDims,
    source: impl Fn(usize, usize, usize) -> Option<(usize, usize)>,
) -> Result<Matrix<Tape>> {
    let (c, h, w) = dims;
    let (batch, numel) = *x.shape();
    let dev = x.device().clone();
    let mut idx = vec![0usize; batch * numel];
    let mut mask = vec![0.0f32; batch * numel];
    for b in 0..batch {
        for i in 0..h {
            for j in 0..w {
                if let Some((si, sj)) = source(b, i, j) {
                    for ch in 0..c {
                        let at = b * numel + (ch * h + i) * w + j;
                        idx[at] = (ch * h + si) * w + sj;
                        mask[at] = 1.0;
                    }
                }
            }
        }
    }
    let idx = dev.tensor_from_vec(idx, (batch, numel));
    let mask = dev.tensor_from_vec(mask, (batch, numel));
    let moved: Matrix<Tape> = x.try_gather(idx)?;
    Ok(moved.try_mul(mask)?)
}

/// Applies `augmentations` in order to `x` (`[batch, c·h·w]`, channel-major), keeping the tape.
pub fn apply(x: Matrix<Tape>, dims: ImageDims, augmentations: &[Augmentation]) -> Result<Matrix<Tape>> {
    let (c, h, w) = dims;
    let (batch, numel) = *x.shape();
    if numel != c * h * w {
        return Err(Error::shape(
            "augmentation input",
            format!("{c}x{h}x{w} features"),
            numel,
        ));
    }
    let mut x = x;
    for aug in augmentations {
        if aug.is_identity() {
            continue;
        }
        let dev = x.device().clone();
        x = match aug {
            Augmentation::Brightness(offsets) => x.try_add(per_sample(&dev, offsets, numel))?,
            Augmentation::Saturation(factors) => {
                // Mean over channels per pixel, broadcast back over the channels.
                let mean = x
                    .with_empty_tape()
                    .try_reshape_like(&(batch, c, h * w))?
                    .try_mean::<(usize, usize), Axis<1>>()?
                    .try_broadcast_like::<_, Axis<1>>(&(batch, c, h * w))?
                    .try_reshape_like(&(batch, numel))?;
                blend_with_mean(x, mean, factors)?
            }
            Augmentation::Contrast(factors) => {
                let mean = x
                    .with_empty_tape()
                    .try_mean::<(usize,), Axis<1>>()?
                    .try_broadcast_like::<_, Axis<1>>(&(batch, numel))?;
                blend_with_mean(x, mean, factors)?
            }
            Augmentation::Translation(shifts) => remap(x, dims, |b, i, j| {
                let (di, dj) = shifts[b];
                let (si, sj) = (i as isize + di, j as isize + dj);
                (si >= 0 && si < h as isize && sj >= 0 && sj < w as isize).then_some((si as usize, sj as usize))
            })?,
            Augmentation::Flip(flips) => remap(x, dims, |b, i, j| Some((i, if flips[b] { w - 1 - j } else { j })))?,
            Augmentation::Cutout(rects) => {
                let mut mask = vec![1.0f32; batch * numel];
                for (b, r) in rects.iter().enumerate() {
                    for ch in 0..c {
                        for i in r[0]..r[1] {
                            for j in r[2]..r[3] {
                                mask[b * numel + (ch * h + i) * w + j] = 0.0;
                            }
                        }
                    }
                }
                x.try_mul(dev.tensor_from_vec(mask, (batch, numel)))?
            }
        };
    }
    Ok(x)
}

/// The image dimensions of `shape`, or an error at `path` saying that only images are augmented.
fn image_dims(shape: FeatureShape, path: &str) -> Result<ImageDims> {
    shape.as_image().ok_or_else(|| {
        Error::config(
            path,
            format!(
                "augments images only (inputs shaped [channels, height, width]); the discriminator's inputs are \
                 flat vectors {shape}; use it with an image model (dcgan, conv discriminators) or drop it"
            ),
        )
    })
}

/// Checks the shared augmentation fields of a config at `path`.
fn check_spec(spec: &AugmentSpec, path: &str) -> Result<()> {
    if spec.policies.is_empty() {
        return Err(Error::config(
            format!("{path}.policies"),
            "must list at least one of color, translation, cutout",
        ));
    }
    for (name, v) in [
        ("translation_ratio", spec.translation_ratio),
        ("cutout_ratio", spec.cutout_ratio),
    ] {
        if !(v.is_finite() && v > 0.0 && v <= 1.0) {
            return Err(Error::config(
                format!("{path}.{name}"),
                format!("must be in (0, 1] (a share of the image size), got {v}"),
            ));
        }
    }
    Ok(())
}

/// DiffAugment (Zhao et al. 2020): every real and fake image the discriminator sees — in its own
/// update and in the generator's — passes through the same random, differentiable augmentations,
/// drawn afresh per sample and per call. The paper's defaults: all three policies,
/// `translation_ratio` 1/8, `cutout_ratio` 1/2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffAugmentConfig {
    /// The policies, applied in order: `color`, `translation`, `cutout`.
    pub policies: Vec<AugmentPolicy>,
    /// Largest shift as a share of the image size.
    pub translation_ratio: f64,
    /// Cutout square side as a share of the image size.
    pub cutout_ratio: f64,
}

impl Default for DiffAugmentConfig {
    fn default() -> Self {
        DiffAugmentConfig {
            policies: vec![AugmentPolicy::Color, AugmentPolicy::Translation, AugmentPolicy::Cutout],
            translation_ratio: 0.125,
            cutout_ratio: 0.5,
        }
    }
}

impl DiffAugmentConfig {
    fn spec(&self) -> AugmentSpec {
        AugmentSpec {
            policies: self.policies.clone(),
            translation_ratio: self.translation_ratio,
            cutout_ratio: self.cutout_ratio,
        }
    }
}

#[typetag::serde(name = "diff_augment")]
impl StabilizerConfig for DiffAugmentConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        let spec = self.spec();
        check_spec(&spec, "stabilizers.diff_augment")?;
        Ok(Box::new(DiffAugment { spec }))
    }
}

/// See [`DiffAugmentConfig`].
#[derive(Clone, Debug)]
pub struct DiffAugment {
    spec: AugmentSpec,
}

impl Stabilizer for DiffAugment {
    fn name(&self) -> &str {
        "diff_augment"
    }

    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict("diff_augment", None, other)
    }

    fn transform_input(
        &mut self,
        _role: InputRole,
        input: Activation,
        ctx: &mut HookContext<'_>,
    ) -> Result<Activation> {
        let dims = image_dims(input.shape, "stabilizers.diff_augment")?;
        let augs = self.spec.draw(input.batch_size(), dims, 1.0, ctx.rng);
        Activation::new(apply(input.value, dims, &augs)?, input.shape)
    }
}

/// ADA (Karras et al. 2020): the DiffAugment augmentations, each applied per sample with
/// probability `p`. Every `interval` steps, `r_t` = the mean over those steps of the step
/// report's `d_real_sign` (E[sign(D(x_real))] on raw outputs) moves p by
/// `sign(r_t − target) · batch · interval / speed_images`, clamped to [0, 1]. The paper: target
/// 0.6, interval 4, p reaching 1 from 0 in 500k images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaConfig {
    /// The policies, applied in order: `color`, `translation`, `cutout`.
    pub policies: Vec<AugmentPolicy>,
    /// Largest shift as a share of the image size.
    pub translation_ratio: f64,
    /// Cutout square side as a share of the image size.
    pub cutout_ratio: f64,
    /// The overfitting heuristic's target for r_t = E[sign(D(x_real))].
    pub target: f64,
    /// Steps between adjustments of p.
    pub interval: u64,
    /// Images (samples) over which p can move from 0 to 1.
    pub speed_images: f64,
    /// p at the start.
    pub initial_p: f64,
}

impl Default for AdaConfig {
    fn default() -> Self {
        AdaConfig {
            policies: vec![AugmentPolicy::Color, AugmentPolicy::Translation, AugmentPolicy::Cutout],
            translation_ratio: 0.125,
            cutout_ratio: 0.5,
            target: 0.6,
            interval: 4,
            speed_images: 500_000.0,
            initial_p: 0.0,
        }
    }
}

#[typetag::serde(name = "ada")]
impl StabilizerConfig for AdaConfig {
    fn build(&self) -> Result<Box<dyn Stabilizer>> {
        let spec = AugmentSpec {
            policies: self.policies.clone(),
            translation_ratio: self.translation_ratio,
            cutout_ratio: self.cutout_ratio,
        };
        check_spec(&spec, "stabilizers.ada")?;
        if !(self.target.is_finite() && (-1.0..=1.0).contains(&self.target)) {
            return Err(Error::config(
                "stabilizers.ada.target",
                format!("must be in [-1, 1] (a mean of signs), got {}", self.target),
            ));
        }
        if self.interval == 0 {
            return Err(Error::config("stabilizers.ada.interval", "must be at least 1 step"));
        }
        if !(self.speed_images.is_finite() && self.speed_images > 0.0) {
            return Err(Error::config(
                "stabilizers.ada.speed_images",
                format!("must be a finite number of images > 0, got {}", self.speed_images),
            ));
        }
        if !(0.0..=1.0).contains(&self.initial_p) {
            return Err(Error::config(
                "stabilizers.ada.initial_p",
                format!("must be a probability in [0, 1], got {}", self.initial_p),
            ));
        }
        Ok(Box::new(Ada {
            config: self.clone(),
            spec,
            p: self.initial_p,
            sign_sum: 0.0,
            sign_steps: 0,
            batch: 0,
        }))
    }
}

/// See [`AdaConfig`].
#[derive(Clone, Debug)]
pub struct Ada {
    config: AdaConfig,
    spec: AugmentSpec,
    /// The augmentation probability.
    p: f64,
    /// Sum of `d_real_sign` over the steps since the last adjustment.
    sign_sum: f64,
    /// Number of those steps.
    sign_steps: u64,
    /// The batch size of the last real input.
    batch: usize,
}

impl Ada {
    /// The current augmentation probability.
    pub fn p(&self) -> f64 {
        self.p
    }
}

impl Stabilizer for Ada {
    fn name(&self) -> &str {
        "ada"
    }

    fn conflicts_with(&self, other: &dyn Stabilizer) -> Option<String> {
        conflict("ada", None, other)
    }

    fn transform_input(&mut self, role: InputRole, input: Activation, ctx: &mut HookContext<'_>) -> Result<Activation> {
        let dims = image_dims(input.shape, "stabilizers.ada")?;
        if role == InputRole::Real {
            self.batch = input.batch_size();
        }
        if self.p <= 0.0 {
            return Ok(input);
        }
        let augs = self.spec.draw(input.batch_size(), dims, self.p, ctx.rng);
        Activation::new(apply(input.value, dims, &augs)?, input.shape)
    }

    fn end_step(&mut self, report: &mut StepReport, _ctx: &mut HookContext<'_>) -> Result<()> {
        let sign = *report.diagnostics.get("d_real_sign").ok_or_else(|| {
            Error::unsupported(
                "stabilizer `ada`",
                "the model's step report has no `d_real_sign` diagnostic (the mean of sign(D(x_real)) on raw \
                 outputs), which ADA adapts p from; use a GAN model that reports it",
            )
        })?;
        self.sign_sum += sign;
        self.sign_steps += 1;
        if self.sign_steps >= self.config.interval {
            let r_t = self.sign_sum / self.sign_steps as f64;
            let adjust = (r_t - self.config.target).signum() * (self.batch as f64 * self.sign_steps as f64)
                / self.config.speed_images;
            if r_t != self.config.target {
                self.p = (self.p + adjust).clamp(0.0, 1.0);
            }
            report.diagnostic("ada/r_t", r_t);
            self.sign_sum = 0.0;
            self.sign_steps = 0;
        }
        report.diagnostic("ada/p", self.p);
        Ok(())
    }

    fn state(&self) -> StateDict {
        let mut s = StateDict::default();
        // put_meta only fails on values serde_json cannot represent; these are plain numbers.
        let _ = s.put_meta("p", self.p);
        let _ = s.put_meta("sign_sum", self.sign_sum);
        let _ = s.put_meta("sign_steps", self.sign_steps);
        let _ = s.put_meta("batch", self.batch);
        s
    }

    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        let p: f64 = state.meta("p")?;
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::state("p", format!("must be a probability in [0, 1], got {p}")));
        }
        self.p = p;
        self.sign_sum = state.meta("sign_sum")?;
        self.sign_steps = state.meta("sign_steps")?;
        self.batch = state.meta("batch")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::rand::SeedableRng;

    fn taped(dev: &Device, v: &[f32], rows: usize, cols: usize) -> Matrix<Tape> {
        dev.tensor_from_vec(v.to_vec(), (rows, cols)).leaky_trace()
    }

    /// Output values and the gradient of Σ out·weights with respect to the input.
    fn value_and_grad(
        x: &[f32],
        batch: usize,
        dims: ImageDims,
        augs: &[Augmentation],
        weights: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let dev = Device::default();
        let n = dims.0 * dims.1 * dims.2;
        let xt = dev.tensor_from_vec(x.to_vec(), (batch, n));
        let y = apply(xt.leaky_trace(), dims, augs).unwrap();
        let wt = dev.tensor_from_vec(weights.to_vec(), (batch, n));
        let out = y.retaped::<NoneTape>().as_vec();
        let grads = y.try_mul(wt).unwrap().sum::<(), _>().backward();
        (out, grads.get(&xt).as_vec())
    }

    #[test]
    fn translation_shifts_with_zero_padding_and_its_backward_is_the_inverse_shift() {
        // One 1x3x3 image per sample; sample 0 moves by (+1, 0), sample 1 by (0, -1).
        let x: Vec<f32> = (1..=18).map(|v| v as f32).collect();
        let augs = [Augmentation::Translation(vec![(1, 0), (0, -1)])];
        let g: Vec<f32> = (0..18).map(|v| 0.5 + v as f32).collect();
        let (y, dx) = value_and_grad(&x, 2, (1, 3, 3), &augs, &g);
        // out(i, j) = x(i + di, j + dj), zero outside.
        #[rustfmt::skip]
        let want = [4., 5., 6., 7., 8., 9., 0., 0., 0.,
                    0., 10., 11., 0., 13., 14., 0., 16., 17.];
        assert_eq!(y, want);
        // ∂/∂x(k, l) = g(k - di, l - dj) where that is inside, else 0: the inverse shift.
        #[rustfmt::skip]
        let want_dx = [0., 0., 0., 0.5, 1.5, 2.5, 3.5, 4.5, 5.5,
                       10.5, 11.5, 0., 13.5, 14.5, 0., 16.5, 17.5, 0.];
        assert_eq!(dx, want_dx);
    }

    #[test]
    fn cutout_zeroes_exactly_the_square_in_every_channel() {
        let dims = (2, 4, 4);
        let x = vec![1.0f32; 32];
        let augs = [Augmentation::Cutout(vec![[1, 3, 0, 2]])];
        let (y, dx) = value_and_grad(&x, 1, dims, &augs, &[1.0; 32]);
        for ch in 0..2 {
            for i in 0..4 {
                for j in 0..4 {
                    let inside = (1..3).contains(&i) && (0..2).contains(&j);
                    let at = (ch * 4 + i) * 4 + j;
                    assert_eq!(y[at], if inside { 0.0 } else { 1.0 });
                    assert_eq!(dx[at], y[at]);
                }
            }
        }
    }

    #[test]
    fn flip_mirrors_columns() {
        let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let (y, _) = value_and_grad(&x, 1, (1, 2, 3), &[Augmentation::Flip(vec![true])], &[1.0; 6]);
        assert_eq!(y, [2., 1., 0., 5., 4., 3.]);
    }

    #[test]
    fn color_matches_the_reference_and_finite_differences() {
        // An RGB 3x1x2 image per sample, two samples.
        let dims = (3, 1, 2);
        let x: Vec<f32> = vec![0.1, -0.4, 0.7, 0.2, -0.9, 0.5, 0.3, 0.3, -0.2, 0.8, 0.6, -0.1];
        let augs = [
            Augmentation::Brightness(vec![0.2, -0.3]),
            Augmentation::Saturation(vec![1.5, 0.4]),
            Augmentation::Contrast(vec![0.7, 1.3]),
        ];
        // Reference (DiffAugment_pytorch.py with the draws fixed), per sample in f64:
        //   x = x + b; m = x.mean(dim=1, keepdim=True); x = (x - m) * s + m
        //   m = x.mean(dim=[1, 2, 3], keepdim=True); x = (x - m) * c + m
        let reference = |x: &[f64]| -> Vec<f64> {
            let (b, s, c) = ([0.2, -0.3], [1.5, 0.4], [0.7, 1.3]);
            let mut out = Vec::new();
            for k in 0..2 {
                let mut v: Vec<f64> = x[k * 6..k * 6 + 6].iter().map(|v| v + b[k]).collect();
                for p in 0..2 {
                    let m = (v[p] + v[2 + p] + v[4 + p]) / 3.0;
                    for ch in 0..3 {
                        v[ch * 2 + p] = (v[ch * 2 + p] - m) * s[k] + m;
                    }
                }
                let m = v.iter().sum::<f64>() / 6.0;
                out.extend(v.iter().map(|e| (e - m) * c[k] + m));
            }
            out
        };
        let weights: Vec<f32> = (0..12).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        let (y, dx) = value_and_grad(&x, 2, dims, &augs, &weights);
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for (got, want) in y.iter().zip(reference(&x64)) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
        let objective = |x: &[f64]| -> f64 { reference(x).iter().zip(&weights).map(|(y, w)| y * *w as f64).sum() };
        for k in 0..12 {
            let (mut up, mut down) = (x64.clone(), x64.clone());
            up[k] += 1e-5;
            down[k] -= 1e-5;
            let fd = (objective(&up) - objective(&down)) / 2e-5;
            assert!(
                (dx[k] as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()),
                "x[{k}]: {} vs {fd}",
                dx[k]
            );
        }
    }

    #[test]
    fn draws_follow_the_policy_and_grayscale_has_no_saturation() {
        let spec = DiffAugmentConfig::default().spec();
        let mut rng = Rng::seed_from_u64(3);
        let augs = spec.draw(64, (1, 16, 16), 1.0, &mut rng);
        assert_eq!(augs.len(), 4, "brightness, contrast, translation, cutout: {augs:?}");
        let Augmentation::Brightness(b) = &augs[0] else {
            panic!("{augs:?}")
        };
        assert!(b.iter().all(|v| (-0.5..0.5).contains(v)));
        let Augmentation::Contrast(c) = &augs[1] else {
            panic!("{augs:?}")
        };
        assert!(c.iter().all(|v| (0.5..1.5).contains(v)));
        let Augmentation::Translation(t) = &augs[2] else {
            panic!("{augs:?}")
        };
        // int(16 / 8 + 0.5) = 2.
        assert!(t.iter().all(|&(a, b)| a.abs() <= 2 && b.abs() <= 2));
        assert!(t.iter().any(|&(a, _)| a == 2) && t.iter().any(|&(a, _)| a == -2));
        let Augmentation::Cutout(r) = &augs[3] else {
            panic!("{augs:?}")
        };
        // An 8x8 square, clipped at the border.
        assert!(r
            .iter()
            .all(|r| r[1] - r[0] <= 8 && r[1] - r[0] >= 4 && r[3] - r[2] >= 4 && r[3] <= 16));
        assert!(r.iter().any(|r| r[1] - r[0] == 8 && r[3] - r[2] == 8));
        let rgb = spec.draw(2, (3, 4, 4), 1.0, &mut rng);
        assert!(matches!(rgb[1], Augmentation::Saturation(_)));
        // ADA's gate: p = 0 draws identities only; p = 0.5 about half.
        assert!(spec.draw(64, (1, 8, 8), 0.0, &mut rng).iter().all(|a| a.is_identity()));
        let half = spec.draw(1000, (1, 8, 8), 0.5, &mut rng);
        let Augmentation::Brightness(b) = &half[0] else {
            panic!()
        };
        let applied = b.iter().filter(|&&v| v != 0.0).count();
        assert!((400..600).contains(&applied), "{applied}");
    }

    fn ctx_parts() -> (Device, Rng) {
        (Device::default(), Rng::seed_from_u64(0))
    }

    #[test]
    fn diff_augment_keeps_batch_and_order_and_refuses_flat_inputs() {
        let (dev, mut rng) = ctx_parts();
        let mut ctx = HookContext {
            step: 0,
            device: &dev,
            rng: &mut rng,
        };
        let mut s = DiffAugmentConfig {
            policies: vec![AugmentPolicy::Translation],
            ..Default::default()
        }
        .build()
        .unwrap();
        // Each sample constant in its own value: a translation only zeroes some pixels, so every
        // row keeps its own value (order kept) and the batch size is unchanged.
        let x: Vec<f32> = (0..5).flat_map(|b| vec![b as f32 + 1.0; 64]).collect();
        let base = dev.tensor_from_vec(x, (5, 64));
        let input = Activation::new(base.leaky_trace(), FeatureShape::image(1, 8, 8)).unwrap();
        let out = s.transform_input(InputRole::Fake, input, &mut ctx).unwrap();
        assert_eq!(out.value.shape(), &(5, 64));
        let v = out.detach().as_vec();
        // The tape is kept: ∂Σout/∂x is 1 on every pixel that moved somewhere, 0 on those pushed
        // out; as many of each as the output has kept and padded pixels.
        let dx = out.value.sum::<(), _>().backward().get(&base).as_vec();
        assert!(dx.iter().all(|&g| g == 0.0 || g == 1.0));
        for b in 0..5 {
            let kept = v[b * 64..(b + 1) * 64].iter().filter(|&&e| e != 0.0).count();
            assert_eq!(dx[b * 64..(b + 1) * 64].iter().filter(|&&g| g == 1.0).count(), kept);
        }
        for b in 0..5 {
            assert!(v[b * 64..(b + 1) * 64].iter().all(|&e| e == 0.0 || e == b as f32 + 1.0));
            // At most 1 row and 1 column (int(8/8 + 0.5) = 1) are padded: 49 pixels survive.
            assert!(v[b * 64..(b + 1) * 64].iter().filter(|&&e| e != 0.0).count() >= 49);
        }
        let flat = Activation::new(taped(&dev, &[0.0; 4], 2, 2), FeatureShape::Flat(2)).unwrap();
        let err = s.transform_input(InputRole::Real, flat, &mut ctx).unwrap_err();
        assert!(
            matches!(&err, Error::Config { path, .. } if path == "stabilizers.diff_augment")
                && err.to_string().contains("images only"),
            "{err}"
        );
    }

    #[test]
    fn ada_adapts_p_from_the_sign_of_real_outputs_and_round_trips_its_state() {
        let (dev, mut rng) = ctx_parts();
        let mut ctx = HookContext {
            step: 0,
            device: &dev,
            rng: &mut rng,
        };
        let cfg = AdaConfig {
            interval: 2,
            speed_images: 100.0,
            ..Default::default()
        };
        let mut ada = cfg.build().unwrap();
        let real = || Activation::new(taped(&dev, &[0.5; 40], 10, 4), FeatureShape::image(1, 2, 2)).unwrap();
        let step = |ada: &mut Box<dyn Stabilizer>, ctx: &mut HookContext<'_>, sign: f64| {
            let out = ada.transform_input(InputRole::Real, real(), ctx).unwrap();
            assert_eq!(out.value.shape(), &(10, 4));
            let mut report = StepReport::default();
            report.diagnostic("d_real_sign", sign);
            ada.end_step(&mut report, ctx).unwrap();
            report
        };
        // p = 0: inputs pass unchanged.
        let out = ada.transform_input(InputRole::Real, real(), &mut ctx).unwrap();
        assert_eq!(out.detach().as_vec(), vec![0.5; 40]);
        // r_t = (0.9 + 0.7) / 2 = 0.8 > 0.6: p += 10 · 2 / 100 = 0.2 after the second step.
        assert_eq!(step(&mut ada, &mut ctx, 0.9).diagnostics["ada/p"], 0.0);
        let r = step(&mut ada, &mut ctx, 0.7);
        assert!((r.diagnostics["ada/r_t"] - 0.8).abs() < 1e-12);
        assert!((r.diagnostics["ada/p"] - 0.2).abs() < 1e-12, "{r:?}");
        // p > 0 augments: the constant images change.
        let out = ada.transform_input(InputRole::Real, real(), &mut ctx).unwrap();
        assert_ne!(out.detach().as_vec(), vec![0.5; 40]);
        // State mid-interval round-trips.
        step(&mut ada, &mut ctx, 0.1);
        let saved = ada.state();
        let mut restored = cfg.build().unwrap();
        restored.load_state(&saved).unwrap();
        assert_eq!(restored.state(), saved);
        // r_t = (0.1 + 0.3) / 2 = 0.2 < 0.6: p -= 0.2, back to 0, in both.
        for s in [&mut ada, &mut restored] {
            let r = step(s, &mut ctx, 0.3);
            assert!(r.diagnostics["ada/p"].abs() < 1e-12, "{r:?}");
        }
        // Clamped at 0.
        step(&mut ada, &mut ctx, -1.0);
        assert_eq!(step(&mut ada, &mut ctx, -1.0).diagnostics["ada/p"], 0.0);
        // A report without the diagnostic is an error naming it.
        let err = ada.end_step(&mut StepReport::default(), &mut ctx).unwrap_err();
        assert!(err.to_string().contains("d_real_sign"), "{err}");
        let mut bad = StateDict::default();
        bad.put_meta("p", 1.5).unwrap();
        assert!(restored.load_state(&bad).is_err());
    }

    #[test]
    fn configs_deserialize_through_typetag_and_reject_bad_values() {
        let cfg: Box<dyn StabilizerConfig> = nash_core::serde_json::from_str(
            r#"{"type": "diff_augment", "policies": ["translation", "cutout"], "cutout_ratio": 0.25}"#,
        )
        .unwrap();
        assert_eq!(cfg.build().unwrap().name(), "diff_augment");
        assert!(nash_core::serde_json::from_str::<Box<dyn StabilizerConfig>>(
            r#"{"type": "diff_augment", "policies": ["rotate"]}"#
        )
        .is_err());
        let ada: Box<dyn StabilizerConfig> =
            nash_core::serde_json::from_str(r#"{"type": "ada", "speed_images": 1000, "interval": 8}"#).unwrap();
        assert_eq!(ada.build().unwrap().name(), "ada");
        let bad = [
            (
                Box::new(DiffAugmentConfig {
                    policies: vec![],
                    ..Default::default()
                }) as Box<dyn StabilizerConfig>,
                "policies",
            ),
            (
                Box::new(DiffAugmentConfig {
                    translation_ratio: 0.0,
                    ..Default::default()
                }),
                "translation_ratio",
            ),
            (
                Box::new(AdaConfig {
                    cutout_ratio: 1.5,
                    ..Default::default()
                }),
                "cutout_ratio",
            ),
            (
                Box::new(AdaConfig {
                    interval: 0,
                    ..Default::default()
                }),
                "interval",
            ),
            (
                Box::new(AdaConfig {
                    speed_images: -1.0,
                    ..Default::default()
                }),
                "speed_images",
            ),
            (
                Box::new(AdaConfig {
                    target: 2.0,
                    ..Default::default()
                }),
                "target",
            ),
            (
                Box::new(AdaConfig {
                    initial_p: 1.1,
                    ..Default::default()
                }),
                "initial_p",
            ),
        ];
        for (cfg, field) in bad {
            let err = cfg.build().err().unwrap();
            assert!(
                matches!(&err, Error::Config { path, .. } if path.ends_with(field)),
                "{field}: {err}"
            );
        }
        let mut registry = Registry::new();
        register(&mut registry).unwrap();
        let info = registry.find(nash_core::registry::Kind::Stabilizer, "ada").unwrap();
        assert!(info.fields.iter().any(|f| f.name == "speed_images"));
    }
}
