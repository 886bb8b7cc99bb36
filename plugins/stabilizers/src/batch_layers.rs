//! Layers that look across the batch, registered as layer plugins for discriminator stacks:
//!
//! - `pack` (PacGAN, Lin et al. 2018): concatenates `samples` consecutive samples into one, so the
//!   discriminator judges packs and the objective's targets follow the packed batch.
//! - `minibatch_stddev` (Karras et al. 2018, ProGAN): appends the mean over features of the
//!   per-feature standard deviation across a group of samples, as one feature or one channel.
//! - `minibatch_discrimination` (Salimans et al. 2016): appends, per kernel, how close each
//!   sample's projection is to the others' (`Σ_j exp(−‖M_i,b − M_j,b‖₁)`).

use nash_core::dfdx::prelude::*;
use nash_core::error::{Error, Result};
use nash_core::layers::{BuildContext, ForwardContext, Init, Layer, LayerConfig};
use nash_core::registry::Registry;
use nash_core::tensor::{Activation, FeatureShape, Param, ParamRole, Parameterized};
use serde::{Deserialize, Serialize};

/// A taped `[G, M, F]` tensor.
type Taped3 = Tensor<(usize, usize, usize), f32, nash_core::tensor::Device, nash_core::tensor::Tape>;
/// A taped `[M, F]` tensor.
type Taped2 = Tensor<(usize, usize), f32, nash_core::tensor::Device, nash_core::tensor::Tape>;

/// ProGAN's epsilon under the square root of the variance.
const STDDEV_EPS: f32 = 1e-8;

/// Registers this module's types.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.layer::<PackConfig>(
        "PacGAN packing: concatenate `samples` consecutive samples into one (put it first in a discriminator)",
    )?;
    registry.layer::<MinibatchStddevConfig>(
        "ProGAN minibatch standard deviation: append the mean per-feature std over a group as one feature/channel",
    )?;
    registry.layer::<MinibatchDiscriminationConfig>(
        "minibatch discrimination (Salimans et al. 2016): append per-kernel closeness to the other samples",
    )?;
    Ok(())
}

fn no_params() -> Vec<(String, &'static Param)> {
    Vec::new()
}

/// `{ type = "pack", samples = 2 }`: PacGAN packing. `[B, d]` becomes `[B/m, m·d]` (an image
/// `[c, h, w]` becomes `[m·c, h, w]`): rows are contiguous, so this is a pure reshape of memory.
/// The batch must be divisible by `samples`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PackConfig {
    /// How many samples form one pack (PacGAN's m).
    pub samples: usize,
}

impl Default for PackConfig {
    fn default() -> Self {
        PackConfig { samples: 2 }
    }
}

#[typetag::serde(name = "pack")]
impl LayerConfig for PackConfig {
    fn build(&self, input: FeatureShape, _ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        if self.samples == 0 {
            return Err(Error::config("pack.samples", "must be at least 1"));
        }
        let layer = Pack {
            samples: self.samples,
            input,
        };
        layer.output_shape(input)?;
        Ok(Box::new(layer))
    }
}

/// See [`PackConfig`].
#[derive(Clone, Debug)]
pub struct Pack {
    samples: usize,
    input: FeatureShape,
}

impl Pack {
    fn packed_rows(&self, batch: usize) -> Result<usize> {
        if !batch.is_multiple_of(self.samples) {
            return Err(Error::shape(
                format!("pack (samples = {})", self.samples),
                format!("a batch divisible by {}", self.samples),
                format!("a batch of {batch}"),
            ));
        }
        Ok(batch / self.samples)
    }
}

impl Parameterized for Pack {
    fn named_params(&self) -> Vec<(String, &Param)> {
        no_params()
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        Vec::new()
    }
}

impl Layer for Pack {
    fn describe(&self) -> String {
        format!(
            "pack {} samples: {} -> {}",
            self.samples,
            self.input,
            self.output_shape(self.input).map(|s| s.to_string()).unwrap_or_default()
        )
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        let m = self.samples;
        Ok(match input {
            FeatureShape::Flat(d) => FeatureShape::Flat(m * d),
            FeatureShape::Image {
                channels,
                height,
                width,
            } => FeatureShape::image(m * channels, height, width),
        })
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        let out = self.output_shape(input.shape)?;
        let rows = self.packed_rows(input.batch_size())?;
        let value = input.value.try_reshape_like(&(rows, out.numel()))?;
        Activation::new(value, out)
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        let rows = self.packed_rows(input.batch_size())?;
        if grad_output.batch_size() != rows {
            return Err(Error::shape(
                "pack input gradient",
                format!("{rows} packed rows"),
                grad_output.batch_size(),
            ));
        }
        let value = grad_output
            .value
            .try_reshape_like(&(input.batch_size(), input.shape.numel()))?;
        Activation::new(value, input.shape)
    }
}

/// `{ type = "minibatch_stddev" }`: ProGAN's minibatch standard deviation. The batch is split
/// into groups of `group_size` samples, strided as in the reference code (sample `i` belongs to
/// group `i mod (B / group_size)`); for each group the standard deviation of every feature over
/// the group's samples (biased, `sqrt(var + 1e-8)`) is averaged over features, and that number is
/// appended to each of the group's samples: one feature for flat inputs, one constant channel for
/// images (`[c, h, w]` becomes `[c + 1, h, w]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MinibatchStddevConfig {
    /// Samples per group (capped at the batch size); the whole batch when unset. The batch must be
    /// divisible by it.
    pub group_size: Option<usize>,
}

#[typetag::serde(name = "minibatch_stddev")]
impl LayerConfig for MinibatchStddevConfig {
    fn build(&self, input: FeatureShape, _ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        if self.group_size == Some(0) {
            return Err(Error::config(
                "minibatch_stddev.group_size",
                "must be at least 1, or left out for the whole batch",
            ));
        }
        Ok(Box::new(MinibatchStddev {
            group_size: self.group_size,
            input,
        }))
    }
}

/// See [`MinibatchStddevConfig`].
#[derive(Clone, Debug)]
pub struct MinibatchStddev {
    group_size: Option<usize>,
    input: FeatureShape,
}

impl MinibatchStddev {
    /// `(groups G, samples per group position M)` for a batch: the batch is `[G, M]` row-major.
    fn grouping(&self, batch: usize) -> Result<(usize, usize)> {
        let g = self.group_size.unwrap_or(batch).min(batch);
        if g == 0 || !batch.is_multiple_of(g) {
            return Err(Error::shape(
                format!("minibatch_stddev (group_size = {g})"),
                format!("a non-empty batch divisible by {g}"),
                format!("a batch of {batch}"),
            ));
        }
        Ok((g, batch / g))
    }
    /// Values appended per sample: 1 (flat) or `h·w` (one image channel).
    fn extra(&self, shape: FeatureShape) -> usize {
        match shape {
            FeatureShape::Flat(_) => 1,
            FeatureShape::Image { height, width, .. } => height * width,
        }
    }
}

/// `x − mean` over the group axis and `sqrt(var + ε)`, for `x` viewed as `[G, M, F]`. Both keep
/// their part of the tape: use both (they merge when combined), or [`group_std`] for `std` alone.
fn group_deviation(x: Taped3) -> Result<(Taped3, Taped2)> {
    let diff = centered(x)?;
    let std = std_of(diff.with_empty_tape())?;
    Ok((diff, std))
}

/// `sqrt(var + ε)` over the group axis, for `x` viewed as `[G, M, F]`, with the whole tape.
fn group_std(x: Taped3) -> Result<Taped2> {
    std_of(centered(x)?)
}

fn centered(x: Taped3) -> Result<Taped3> {
    let shape = *x.shape();
    let mean = x.with_empty_tape().try_mean::<(usize, usize), Axis<0>>()?;
    Ok(x.try_sub(mean.try_broadcast_like::<_, Axis<0>>(&shape)?)?)
}

fn std_of(diff: Taped3) -> Result<Taped2> {
    Ok(diff
        .try_square()?
        .try_mean::<(usize, usize), Axis<0>>()?
        .try_add(STDDEV_EPS)?
        .try_sqrt()?)
}

impl Parameterized for MinibatchStddev {
    fn named_params(&self) -> Vec<(String, &Param)> {
        no_params()
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        Vec::new()
    }
}

impl Layer for MinibatchStddev {
    fn describe(&self) -> String {
        match self.group_size {
            Some(g) => format!("minibatch stddev (groups of {g}) {}", self.input),
            None => format!("minibatch stddev (whole batch) {}", self.input),
        }
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        Ok(match input {
            FeatureShape::Flat(d) => FeatureShape::Flat(d + 1),
            FeatureShape::Image {
                channels,
                height,
                width,
            } => FeatureShape::image(channels + 1, height, width),
        })
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        let out = self.output_shape(input.shape)?;
        let b = input.batch_size();
        let f = input.shape.numel();
        let (g, m) = self.grouping(b)?;
        let k = self.extra(input.shape);
        let x3 = input.value.with_empty_tape().try_reshape_like(&(g, m, f))?;
        let stat = group_std(x3)?
            .try_mean::<(usize,), Axis<1>>()?
            .try_broadcast_like::<_, Axes2<0, 2>>(&(g, m, k))?
            .try_reshape_like(&(b, k))?;
        let value = (input.value, stat).try_concat_along(Axis::<1>)?;
        Activation::new(value, out)
    }
    /// Exact, as differentiable ops: `∂L/∂x[g,m,f] = gout_x + γ[m]·(x − μ)[g,m,f] / (F·G·std[m,f])`,
    /// with `γ[m]` the sum of the appended outputs' gradients over the group's samples.
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        let b = input.batch_size();
        let f = input.shape.numel();
        let (g, m) = self.grouping(b)?;
        let k = self.extra(input.shape);
        if grad_output.value.shape() != &(b, f + k) {
            return Err(Error::shape(
                "minibatch_stddev input gradient",
                format!("[{b}, {}]", f + k),
                format!("{:?}", grad_output.value.shape()),
            ));
        }
        let gout = grad_output.value;
        let gx = gout.with_empty_tape().try_slice((.., ..f))?;
        let gamma = gout
            .try_slice((.., f..))?
            .try_sum::<(usize,), Axis<1>>()?
            .try_reshape_like(&(g, m))?
            .try_sum::<(usize,), Axis<0>>()?;
        let x3 = input.value.with_empty_tape().try_reshape_like(&(g, m, f))?;
        let (diff, std) = group_deviation(x3)?;
        let term = diff
            .try_mul(gamma.try_broadcast_like::<_, Axes2<0, 2>>(&(g, m, f))?)?
            .try_div(std.try_broadcast_like::<_, Axis<0>>(&(g, m, f))?)?
            .try_mul(1.0 / (f * g) as f32)?
            .try_reshape_like(&(b, f))?;
        Activation::new(gx.try_add(term)?, input.shape)
    }
}

/// `{ type = "minibatch_discrimination", kernels = 100, kernel_dim = 5 }` (Salimans et al. 2016,
/// the improved-GAN code's defaults). With `T` the `[d, kernels·kernel_dim]` parameter `weight`,
/// `M = x·T` viewed `[n, kernels, kernel_dim]`, and `o_b(x_i) = Σ_j exp(−‖M_i,b − M_j,b‖₁)` (the sum
/// includes `j = i`, as the reference code), the output is the flat `[x, o(x)]` of `d + kernels`
/// features (images are flattened).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MinibatchDiscriminationConfig {
    /// Number of kernels B (appended features).
    pub kernels: usize,
    /// Dimension C of each kernel's projection.
    pub kernel_dim: usize,
    /// Initializer of `T`; N(0, 0.05²) as the reference code when absent.
    pub init: Option<Init>,
}

impl Default for MinibatchDiscriminationConfig {
    fn default() -> Self {
        MinibatchDiscriminationConfig {
            kernels: 100,
            kernel_dim: 5,
            init: None,
        }
    }
}

#[typetag::serde(name = "minibatch_discrimination")]
impl LayerConfig for MinibatchDiscriminationConfig {
    fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        if self.kernels == 0 || self.kernel_dim == 0 {
            return Err(Error::config(
                "minibatch_discrimination",
                format!(
                    "kernels and kernel_dim must be at least 1, got {} and {}",
                    self.kernels, self.kernel_dim
                ),
            ));
        }
        let d = input.numel();
        let cols = self.kernels * self.kernel_dim;
        let init = self.init.clone().unwrap_or(Init::Normal { mean: 0.0, std: 0.05 });
        init.validate("minibatch_discrimination.init")?;
        let values = init.sample(d * cols, d, cols, ctx.rng)?;
        Ok(Box::new(MinibatchDiscrimination {
            in_features: d,
            kernels: self.kernels,
            kernel_dim: self.kernel_dim,
            weight: Param::from_vec(ctx.device, values, vec![d, cols], ParamRole::Weight)?,
        }))
    }
}

/// See [`MinibatchDiscriminationConfig`].
#[derive(Debug)]
pub struct MinibatchDiscrimination {
    in_features: usize,
    kernels: usize,
    kernel_dim: usize,
    weight: Param,
}

impl Parameterized for MinibatchDiscrimination {
    fn named_params(&self) -> Vec<(String, &Param)> {
        vec![("weight".to_string(), &self.weight)]
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        vec![("weight".to_string(), &mut self.weight)]
    }
}

impl Layer for MinibatchDiscrimination {
    fn describe(&self) -> String {
        format!(
            "minibatch discrimination {} -> {} ({} kernels of dim {})",
            self.in_features,
            self.in_features + self.kernels,
            self.kernels,
            self.kernel_dim
        )
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        if input.numel() != self.in_features {
            return Err(Error::shape(
                "minibatch_discrimination",
                format!("{} input features", self.in_features),
                input,
            ));
        }
        Ok(FeatureShape::Flat(self.in_features + self.kernels))
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        let out = self.output_shape(input.shape)?;
        let n = input.batch_size();
        let (b, c) = (self.kernels, self.kernel_dim);
        let t = self.weight.as_matrix(self.in_features, b * c);
        let mm = input
            .value
            .with_empty_tape()
            .try_matmul(t)?
            .try_reshape_like(&(n, b, c))?;
        let pairs = (n, n, b, c);
        // [i, j, b, c] = M[i, b, c] − M[j, b, c].
        // Broadcasts keep their source's id, so the second operand is the negation (a new tensor):
        // a binary op's backward needs distinct ids.
        let mi = mm.with_empty_tape().try_broadcast_like::<_, Axis<1>>(&pairs)?;
        let neg_mj = mm.try_negate()?.try_broadcast_like::<_, Axis<0>>(&pairs)?;
        let o = mi
            .try_add(neg_mj)?
            .try_abs()?
            .try_sum::<(usize, usize, usize), Axis<3>>()?
            .try_negate()?
            .try_exp()?
            .try_sum::<(usize, usize), Axis<1>>()?;
        let value = (input.value, o).try_concat_along(Axis::<1>)?;
        Activation::new(value, out)
    }
    fn input_grad(&self, _input: &Activation, _grad_output: Activation) -> Result<Activation> {
        Err(Error::unsupported(
            "the input gradient of minibatch_discrimination",
            "each sample's output depends on every other sample through pairwise L1 distances, so the \
             input gradient is a full cross-sample Jacobian product with |sign| kinks; gradient penalties \
             (WGAN-GP, R1, DRAGAN) cannot differentiate through it — use minibatch_stddev or pack instead",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::layers::Mode;
    use nash_core::rand::{Rng as _, SeedableRng};
    use nash_core::tensor::{Device, Grads, Matrix, Rng};

    struct H {
        dev: Device,
        rng: Rng,
    }

    impl H {
        fn new() -> Self {
            H {
                dev: Device::default(),
                rng: Rng::seed_from_u64(7),
            }
        }
        fn build(&mut self, cfg: &dyn LayerConfig, shape: FeatureShape) -> Result<Box<dyn Layer>> {
            cfg.build(
                shape,
                &mut BuildContext {
                    device: &self.dev,
                    rng: &mut self.rng,
                },
            )
        }
        fn run(&mut self, layer: &mut dyn Layer, x: Activation) -> Result<Activation> {
            let mut rng = Rng::seed_from_u64(0);
            layer.forward(
                x,
                &mut ForwardContext {
                    mode: Mode::Train,
                    rng: &mut rng,
                },
            )
        }
        fn input(&self, values: &[f32], batch: usize, shape: FeatureShape) -> Activation {
            let m: Matrix = self.dev.tensor_from_vec(values.to_vec(), (batch, shape.numel()));
            Activation::input(&m, shape).unwrap()
        }
        fn values(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.rng.gen_range(-1.5f32..1.5)).collect()
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    fn central(x: &[f32], h: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
        let mut x = x.to_vec();
        (0..x.len())
            .map(|i| {
                let o = x[i];
                x[i] = o + h;
                let p = f(&x);
                x[i] = o - h;
                let m = f(&x);
                x[i] = o;
                (p - m) / (2.0 * h as f64)
            })
            .collect()
    }

    fn assert_close(what: &str, analytic: &[f32], numeric: &[f64]) {
        assert_eq!(analytic.len(), numeric.len(), "{what}");
        for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
            let (a, n) = (a as f64, n);
            assert!(
                (a - n).abs() <= 2e-3 + 1e-2 * a.abs().max(n.abs()),
                "{what}[{i}]: {a} vs {n}\n{analytic:?}\n{numeric:?}"
            );
        }
    }

    /// `L = Σ y ⊙ r`: its gradients by backward against central differences, for the input and
    /// every parameter; returns the backward input gradient.
    fn check_grads(h: &mut H, layer: &mut dyn Layer, x0: &[f32], batch: usize, shape: FeatureShape) -> Vec<f32> {
        let out = layer.output_shape(shape).unwrap();
        let x = h.input(x0, batch, shape);
        let leaf = x.detach();
        let y = h.run(layer, x).unwrap();
        let rows = y.batch_size();
        let r = h.values(rows * out.numel());
        let rt: Matrix = h.dev.tensor_from_vec(r.clone(), (rows, out.numel()));
        let grads: Grads = y.value.try_mul(rt).unwrap().sum::<(), _>().backward();
        let loss = |layer: &mut dyn Layer, h: &mut H, xv: &[f32]| {
            let y = h.run(layer, h.input(xv, batch, shape)).unwrap();
            dot(&y.detach().as_vec(), &r)
        };
        let input_grad = grads.get(&leaf).as_vec();
        let numeric = central(x0, 1e-3, |xv| loss(layer, h, xv));
        assert_close("dL/dx", &input_grad, &numeric);
        for i in 0..layer.named_params().len() {
            let analytic = grads.get(layer.named_params()[i].1.value()).as_vec();
            let orig = layer.named_params()[i].1.to_vec();
            let numeric = central(&orig, 1e-3, |pv| {
                layer.named_params_mut()[i].1.set(pv).unwrap();
                loss(layer, h, x0)
            });
            layer.named_params_mut()[i].1.set(&orig).unwrap();
            assert_close("dL/dparam", &analytic, &numeric);
        }
        input_grad
    }

    #[test]
    fn pack_reshapes_rows_and_images_and_refuses_odd_batches() {
        let mut h = H::new();
        let mut pack = h.build(&PackConfig { samples: 2 }, FeatureShape::Flat(2)).unwrap();
        assert_eq!(pack.output_shape(FeatureShape::Flat(2)).unwrap(), FeatureShape::Flat(4));
        let x = h.input(&[1., 2., 3., 4., 5., 6., 7., 8.], 4, FeatureShape::Flat(2));
        let y = h.run(pack.as_mut(), x).unwrap();
        assert_eq!(y.value.shape(), &(2, 4));
        assert_eq!(y.detach().as_vec(), vec![1., 2., 3., 4., 5., 6., 7., 8.]);
        let x0 = h.values(8);
        let backward = check_grads(&mut h, pack.as_mut(), &x0, 4, FeatureShape::Flat(2));
        // input_grad is the reverse reshape.
        let keep = h.input(&x0, 4, FeatureShape::Flat(2));
        let gout = h.input(&[0.5, -1., 2., 3., 4., 5., 6., 7.], 2, FeatureShape::Flat(4));
        let gi = pack.input_grad(&keep, gout).unwrap();
        assert_eq!((gi.shape, gi.value.shape()), (FeatureShape::Flat(2), &(4, 2)));
        assert_eq!(gi.detach().as_vec(), vec![0.5, -1., 2., 3., 4., 5., 6., 7.]);
        assert_eq!(backward.len(), 8);

        let img = FeatureShape::image(1, 1, 2);
        let mut pack4 = h.build(&PackConfig { samples: 4 }, img).unwrap();
        assert_eq!(pack4.output_shape(img).unwrap(), FeatureShape::image(4, 1, 2));
        let y = h
            .run(pack4.as_mut(), h.input(&[1., 2., 3., 4., 5., 6., 7., 8.], 4, img))
            .unwrap();
        assert_eq!(y.value.shape(), &(1, 8));

        let err = h.run(pack4.as_mut(), h.input(&[0.; 6], 3, img)).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Shape { .. }) && msg.contains("pack") && msg.contains("3"),
            "{msg}"
        );
        assert!(matches!(
            h.build(&PackConfig { samples: 0 }, img),
            Err(Error::Config { path, .. }) if path == "pack.samples"
        ));
    }

    #[test]
    fn minibatch_stddev_values_by_hand() {
        let mut h = H::new();
        let mut layer = h
            .build(&MinibatchStddevConfig::default(), FeatureShape::Flat(2))
            .unwrap();
        // Features [1, 3] (mean 2, biased var 1) and [2, 6] (mean 4, var 4): stds 1 and 2, mean 1.5.
        let y = h
            .run(layer.as_mut(), h.input(&[1., 2., 3., 6.], 2, FeatureShape::Flat(2)))
            .unwrap();
        assert_eq!(y.shape, FeatureShape::Flat(3));
        let want = [1., 2., 1.5, 3., 6., 1.5];
        for (a, b) in y.detach().as_vec().iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // Groups of 2 on a batch of 4, strided: {0, 2} and {1, 3}.
        let mut grouped = h
            .build(&MinibatchStddevConfig { group_size: Some(2) }, FeatureShape::Flat(1))
            .unwrap();
        let y = h
            .run(grouped.as_mut(), h.input(&[0., 10., 2., 20.], 4, FeatureShape::Flat(1)))
            .unwrap();
        // Group {0, 2}: values 0, 2 -> std 1. Group {1, 3}: 10, 20 -> std 5.
        let v = y.detach().as_vec();
        let extra: Vec<f32> = v.chunks(2).map(|r| r[1]).collect();
        for (a, b) in extra.iter().zip([1., 5., 1., 5.]) {
            assert!((a - b).abs() < 1e-5, "{extra:?}");
        }
        // Images gain one constant channel.
        let img = FeatureShape::image(1, 1, 2);
        let mut il = h.build(&MinibatchStddevConfig::default(), img).unwrap();
        let y = h.run(il.as_mut(), h.input(&[1., 2., 3., 6.], 2, img)).unwrap();
        assert_eq!(y.shape, FeatureShape::image(2, 1, 2));
        for (a, b) in y.detach().as_vec().iter().zip([1., 2., 1.5, 1.5, 3., 6., 1.5, 1.5]) {
            assert!((a - b).abs() < 1e-6);
        }
        let err = h
            .run(grouped.as_mut(), h.input(&[0.; 3], 3, FeatureShape::Flat(1)))
            .unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        assert!(h.build(&MinibatchStddevConfig { group_size: Some(0) }, img).is_err());
    }

    #[test]
    fn minibatch_stddev_gradients_and_exact_input_grad() {
        let mut h = H::new();
        for (cfg, batch, shape) in [
            (MinibatchStddevConfig::default(), 3, FeatureShape::Flat(3)),
            (
                MinibatchStddevConfig { group_size: Some(2) },
                4,
                FeatureShape::image(1, 2, 1),
            ),
        ] {
            let mut layer = h.build(&cfg, shape).unwrap();
            let out = layer.output_shape(shape).unwrap();
            let x0 = h.values(batch * shape.numel());
            let backward = check_grads(&mut h, layer.as_mut(), &x0, batch, shape);
            // For a fresh r, input_grad(x, r) must equal the backward gradient of Σ y ⊙ r.
            let r = h.values(batch * out.numel());
            let rt: Matrix = h.dev.tensor_from_vec(r.clone(), (batch, out.numel()));
            let x = h.input(&x0, batch, shape);
            let leaf = x.detach();
            let y = h.run(layer.as_mut(), x).unwrap();
            let grads: Grads = y.value.try_mul(rt.clone()).unwrap().sum::<(), _>().backward();
            let want: Vec<f64> = grads.get(&leaf).as_vec().iter().map(|&v| v as f64).collect();
            let gi = layer
                .input_grad(&h.input(&x0, batch, shape), Activation::input(&rt, out).unwrap())
                .unwrap();
            assert_close("input_grad vs backward", &gi.detach().as_vec(), &want);
            assert_eq!(backward.len(), x0.len());
            // The penalty P = Σ input_grad(x, r) ⊙ s is differentiable in x (second-order path).
            let s = h.values(batch * shape.numel());
            let st: Matrix = h.dev.tensor_from_vec(s.clone(), (batch, shape.numel()));
            let keep = h.input(&x0, batch, shape);
            let keep_leaf = keep.detach();
            let gi = layer.input_grad(&keep, Activation::input(&rt, out).unwrap()).unwrap();
            let pg: Grads = gi.value.try_mul(st).unwrap().sum::<(), _>().backward();
            let analytic = pg.get(&keep_leaf).as_vec();
            let numeric = central(&x0, 1e-3, |xv| {
                let gi = layer
                    .input_grad(&h.input(xv, batch, shape), Activation::input(&rt, out).unwrap())
                    .unwrap();
                dot(&gi.detach().as_vec(), &s)
            });
            assert_close("dP/dx", &analytic, &numeric);
        }
    }

    #[test]
    fn minibatch_discrimination_values_by_hand() {
        let mut h = H::new();
        let cfg = MinibatchDiscriminationConfig {
            kernels: 1,
            kernel_dim: 2,
            init: None,
        };
        let mut layer = h.build(&cfg, FeatureShape::Flat(1)).unwrap();
        assert_eq!(layer.named_params()[0].1.shape, vec![1, 2]);
        layer.named_params_mut()[0].1.set(&[1., 2.]).unwrap();
        // M = x·[1, 2]: [0, 0], [1, 2], [3, 6]; L1 distances 0-1: 3, 0-2: 9, 1-2: 6.
        let y = h
            .run(layer.as_mut(), h.input(&[0., 1., 3.], 3, FeatureShape::Flat(1)))
            .unwrap();
        assert_eq!(y.shape, FeatureShape::Flat(2));
        let e = |d: f32| (-d).exp();
        let want = [0., 1. + e(3.) + e(9.), 1., e(3.) + 1. + e(6.), 3., e(9.) + e(6.) + 1.];
        for (a, b) in y.detach().as_vec().iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let err = layer
            .input_grad(
                &h.input(&[0.; 3], 3, FeatureShape::Flat(1)),
                h.input(&[0.; 6], 3, FeatureShape::Flat(2)),
            )
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(layer.output_shape(FeatureShape::Flat(2)).is_err());
        let bad = MinibatchDiscriminationConfig {
            kernels: 0,
            ..Default::default()
        };
        assert!(matches!(
            h.build(&bad, FeatureShape::Flat(1)),
            Err(Error::Config { .. })
        ));
    }

    #[test]
    fn minibatch_discrimination_gradients_match_finite_differences() {
        let mut h = H::new();
        let cfg = MinibatchDiscriminationConfig {
            kernels: 2,
            kernel_dim: 2,
            init: Some(Init::Normal { mean: 0.0, std: 0.5 }),
        };
        let mut layer = h.build(&cfg, FeatureShape::Flat(3)).unwrap();
        assert_eq!(
            layer.output_shape(FeatureShape::Flat(3)).unwrap(),
            FeatureShape::Flat(5)
        );
        let x0 = h.values(9);
        check_grads(&mut h, layer.as_mut(), &x0, 3, FeatureShape::Flat(3));
    }

    #[test]
    fn configs_deserialize_through_typetag_and_register() {
        let cfg: Box<dyn LayerConfig> = nash_core::serde_json::from_str(r#"{"type": "pack", "samples": 4}"#).unwrap();
        let mut h = H::new();
        let l = h.build(cfg.as_ref(), FeatureShape::Flat(2)).unwrap();
        assert_eq!(l.output_shape(FeatureShape::Flat(2)).unwrap(), FeatureShape::Flat(8));
        for (json, field) in [
            (r#"{"type": "pack", "sample": 4}"#, "sample"),
            (r#"{"type": "minibatch_stddev", "group": 4}"#, "group"),
            (r#"{"type": "minibatch_discrimination", "kernel": 4}"#, "kernel"),
        ] {
            let err = nash_core::serde_json::from_str::<Box<dyn LayerConfig>>(json).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        let mut registry = Registry::new();
        register(&mut registry).unwrap();
        let kd = registry
            .find(nash_core::registry::Kind::Layer, "minibatch_discrimination")
            .unwrap();
        assert!(kd.fields.iter().any(|f| f.name == "kernel_dim"));
        assert!(registry
            .find(nash_core::registry::Kind::Layer, "minibatch_stddev")
            .is_some());
    }
}
