//! Elementwise activations: ReLU, LeakyReLU, ELU, Tanh, Sigmoid and GELU.
//!
//! Each one's [`Layer::input_grad`] is `g ⊙ f'(x)`. For (leaky) ReLU, `f'` is a constant mask read
//! from the forward values (its own derivative is zero almost everywhere). For ELU, Tanh, Sigmoid
//! and GELU, `f'(x)` is built from differentiable ops on the reused input, so the second-order
//! terms of a gradient penalty flow back into earlier layers' parameters.

use std::mem::MaybeUninit;

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::{BuildContext, ForwardContext, Layer, LayerConfig};
use crate::error::{Error, Result};
use crate::tensor::{Activation, FeatureShape, Matrix, Param, Parameterized, Tape};

/// An elementwise function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActivationFn {
    /// max(x, 0).
    Relu,
    /// x if x > 0, else slope·x.
    LeakyRelu(f32),
    /// x if x > 0, else α(eˣ − 1).
    Elu(f32),
    /// tanh(x).
    Tanh,
    /// 1 / (1 + e⁻ˣ).
    Sigmoid,
    /// GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) (PyTorch's `approximate="tanh"`).
    Gelu,
}

const GELU_BETA: f32 = 0.797_884_6; // sqrt(2/pi)
const GELU_KAPPA: f32 = 0.044715;

/// A computation over an activation's function `x ↦ (f(x), f'(x))`, compiled once per variant
/// ([`ActivationFn::with_function`]): a loop that applies the activation on the way (batch norm's
/// normalization writes the activated output and its slopes in the pass that computes it).
pub trait OverFunction {
    /// What the computation returns.
    type Output;
    /// Runs the computation with the variant's function `f`.
    fn run<F: Fn(f32) -> (f32, f32) + Copy + Send + Sync>(self, f: F) -> Self::Output;
}

impl ActivationFn {
    fn name(&self) -> String {
        match self {
            ActivationFn::Relu => "relu".into(),
            ActivationFn::LeakyRelu(s) => format!("leaky_relu({s})"),
            ActivationFn::Elu(a) => format!("elu({a})"),
            ActivationFn::Tanh => "tanh".into(),
            ActivationFn::Sigmoid => "sigmoid".into(),
            ActivationFn::Gelu => "gelu(tanh)".into(),
        }
    }

    /// Constant matrices `(x > 0 ? 1 : 0, x > 0 ? 0 : 1)` from the values of `x`.
    fn masks(x: &Matrix<Tape>) -> (Matrix, Matrix) {
        let v = x.as_vec();
        let pos: Vec<f32> = v.iter().map(|&a| if a > 0.0 { 1.0 } else { 0.0 }).collect();
        let neg: Vec<f32> = pos.iter().map(|&p| 1.0 - p).collect();
        let dev = x.device();
        (
            dev.tensor_from_vec(pos, *x.shape()),
            dev.tensor_from_vec(neg, *x.shape()),
        )
    }

    /// Applies the function: one tape op on the CPU ([`pointwise`]), dfdx's ops with `cuda`.
    pub fn apply(&self, x: Matrix<Tape>) -> Result<Matrix<Tape>> {
        #[cfg(not(feature = "cuda"))]
        return Ok(pointwise(x, *self));
        #[cfg(feature = "cuda")]
        self.composite(x)
    }

    /// Replaces every value `x` by `f(x)` and returns the slopes `f'(x)`, in one pass (the slopes
    /// written once, without a zero-fill first).
    pub fn apply_in_place(&self, values: &mut [f32]) -> Vec<f32> {
        let len = values.len();
        let mut slopes = Vec::with_capacity(len);
        self.apply_with_slopes(values, &mut slopes.spare_capacity_mut()[..len]);
        // SAFETY: `apply_with_slopes` wrote one slope per value.
        unsafe { slopes.set_len(len) };
        slopes
    }

    /// Replaces every value `x` by `f(x)` and writes the slopes `f'(x)` into `slopes` (as long as
    /// `values`: every one of them written), in one pass on the widest vectors, split across the
    /// pool's threads in tasks of [`crate::kernels::ELEMENTWISE_VALUES_PER_TASK`] values.
    pub fn apply_with_slopes(&self, values: &mut [f32], slopes: &mut [MaybeUninit<f32>]) {
        self.apply_after_bias(values, &[], slopes)
    }

    /// Replaces every value `x` of each row of `values` (rows as long as `bias`) by `f(x + b)`,
    /// `b` its column's bias, and returns the slopes `f'(x + b)`, in one pass: a linear layer adds
    /// its bias in its activation's pass instead of writing the bias rows first.
    pub fn apply_after_bias_in_place(&self, values: &mut [f32], bias: &[f32]) -> Vec<f32> {
        assert!(
            !bias.is_empty() && values.len().is_multiple_of(bias.len()),
            "whole rows as long as the bias"
        );
        let len = values.len();
        let mut slopes = Vec::with_capacity(len);
        self.apply_after_bias(values, bias, &mut slopes.spare_capacity_mut()[..len]);
        // SAFETY: `apply_after_bias` wrote one slope per value.
        unsafe { slopes.set_len(len) };
        slopes
    }

    /// The pass of [`ActivationFn::apply_with_slopes`] (`bias` empty) and
    /// [`ActivationFn::apply_after_bias_in_place`] (`values` in rows as long as `bias`); tasks
    /// hold whole rows.
    fn apply_after_bias(&self, values: &mut [f32], bias: &[f32], slopes: &mut [MaybeUninit<f32>]) {
        use rayon::prelude::*;
        #[inline(always)]
        fn run(
            values: &mut [f32],
            bias: &[f32],
            slopes: &mut [MaybeUninit<f32>],
            f: impl Fn(f32) -> (f32, f32) + Sync + Copy,
        ) {
            let serial = |values: &mut [f32], slopes: &mut [MaybeUninit<f32>]| {
                // Indexed loops over slices of one length, compiled for the CPU's widest vectors.
                crate::kernels::on_widest_vectors(
                    #[inline(always)]
                    || {
                        // A local copy of the function (its parameters): read through the
                        // closure's reference, LLVM cannot tell that the stores below leave them
                        // unchanged, reloads them every value and keeps the loop scalar.
                        let local = f;
                        if bias.is_empty() {
                            let slopes = &mut slopes[..values.len()];
                            for i in 0..values.len() {
                                let (value, slope) = local(values[i]);
                                values[i] = value;
                                slopes[i].write(slope);
                            }
                            return;
                        }
                        let width = bias.len();
                        for (row, row_slopes) in values.chunks_exact_mut(width).zip(slopes.chunks_exact_mut(width)) {
                            for i in 0..width {
                                let (value, slope) = local(row[i] + bias[i]);
                                row[i] = value;
                                row_slopes[i].write(slope);
                            }
                        }
                    },
                )
            };
            let per_task = crate::kernels::ELEMENTWISE_VALUES_PER_TASK;
            if values.len() <= per_task {
                return serial(values, slopes);
            }
            // Whole rows per task (at least one).
            let per_task = match bias.len() {
                0 => per_task,
                width => (per_task / width).max(1) * width,
            };
            values
                .par_chunks_mut(per_task)
                .zip(slopes.par_chunks_mut(per_task))
                .with_min_len(crate::kernels::min_items_per_task(1))
                .for_each(|(values, slopes)| serial(values, slopes));
        }
        assert_eq!(values.len(), slopes.len(), "one slope per value");
        /// The pass, over the variant's function.
        struct Apply<'a> {
            values: &'a mut [f32],
            bias: &'a [f32],
            slopes: &'a mut [MaybeUninit<f32>],
        }
        impl OverFunction for Apply<'_> {
            type Output = ();
            fn run<F: Fn(f32) -> (f32, f32) + Copy + Send + Sync>(self, f: F) {
                run(self.values, self.bias, self.slopes, f)
            }
        }
        self.with_function(Apply { values, bias, slopes })
    }

    /// `body` run with this activation's `x ↦ (f(x), f'(x))` as a closure of the variant's own
    /// type, so that the loops in `body` are compiled (and vectorized) for the function itself
    /// (through the enum, every value would take the variant's branch).
    #[inline(always)]
    pub fn with_function<B: OverFunction>(&self, body: B) -> B::Output {
        match *self {
            ActivationFn::Relu => body.run(move |v| ActivationFn::Relu.value_and_slope(v)),
            ActivationFn::LeakyRelu(s) => body.run(move |v| ActivationFn::LeakyRelu(s).value_and_slope(v)),
            ActivationFn::Elu(a) => body.run(move |v| ActivationFn::Elu(a).value_and_slope(v)),
            ActivationFn::Tanh => body.run(move |v| ActivationFn::Tanh.value_and_slope(v)),
            ActivationFn::Sigmoid => body.run(move |v| ActivationFn::Sigmoid.value_and_slope(v)),
            ActivationFn::Gelu => body.run(move |v| ActivationFn::Gelu.value_and_slope(v)),
        }
    }

    /// `(f(x), f'(x))` at one point.
    #[inline(always)]
    pub fn value_and_slope(&self, x: f32) -> (f32, f32) {
        match *self {
            ActivationFn::Relu => {
                if x > 0.0 {
                    (x, 1.0)
                } else {
                    (0.0, 0.0)
                }
            }
            ActivationFn::LeakyRelu(s) => {
                if x > 0.0 {
                    (x, 1.0)
                } else {
                    (s * x, s)
                }
            }
            ActivationFn::Elu(alpha) => {
                if x > 0.0 {
                    (x, 1.0)
                } else {
                    // α(eˣ − 1), whose derivative αeˣ is the value plus α.
                    let e = alpha * x.exp_m1();
                    (e, e + alpha)
                }
            }
            ActivationFn::Tanh => {
                let t = fast_tanh(x);
                (t, 1.0 - t * t)
            }
            ActivationFn::Sigmoid => {
                // σ(x) = (1 + tanh(x/2)) / 2, so that it vectorizes with `fast_tanh`.
                let s = 0.5 + 0.5 * fast_tanh(0.5 * x);
                (s, s * (1.0 - s))
            }
            ActivationFn::Gelu => {
                let t = fast_tanh(GELU_BETA * (x + GELU_KAPPA * x * x * x));
                let slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_BETA * (1.0 + 3.0 * GELU_KAPPA * x * x);
                (0.5 * x * (1.0 + t), slope)
            }
        }
    }

    /// The function from dfdx's ops (the CUDA path, and the reference `pointwise` is tested
    /// against).
    #[cfg(any(test, feature = "cuda"))]
    fn composite(&self, x: Matrix<Tape>) -> Result<Matrix<Tape>> {
        Ok(match *self {
            ActivationFn::Relu => x.try_relu()?,
            ActivationFn::LeakyRelu(s) => {
                let (pos, neg) = Self::masks(&x);
                let slope = pos.try_add(neg.try_mul(s)?)?;
                x.try_mul(slope)?
            }
            ActivationFn::Elu(alpha) => {
                // x⁺ + α(exp(x⁻) − 1)⊙[x ≤ 0], with x⁻ = x⊙[x ≤ 0].
                let (pos, neg) = Self::masks(&x);
                let x2 = x.with_empty_tape();
                let left = x.try_mul(pos)?;
                let right = x2
                    .try_mul(neg.clone())?
                    .try_exp()?
                    .try_sub(1.0)?
                    .try_mul(alpha)?
                    .try_mul(neg)?;
                left.try_add(right)?
            }
            ActivationFn::Tanh => x.try_tanh()?,
            ActivationFn::Sigmoid => x.try_sigmoid()?,
            ActivationFn::Gelu => x.try_fast_gelu()?,
        })
    }

    /// f'(x) as a taped matrix of the reused input (a constant for (leaky) ReLU).
    pub fn derivative(&self, input: &Activation) -> Result<Matrix<Tape>> {
        let x = || input.value.with_empty_tape();
        Ok(match *self {
            ActivationFn::Relu | ActivationFn::LeakyRelu(_) => {
                let s = if let ActivationFn::LeakyRelu(s) = *self { s } else { 0.0 };
                let (pos, neg) = Self::masks(&input.value);
                // No tape: the derivative of a piecewise-linear function is piecewise constant.
                pos.try_add(neg.try_mul(s)?)?.retaped::<Tape>()
            }
            ActivationFn::Elu(alpha) => {
                let (pos, neg) = Self::masks(&input.value);
                // [x > 0] + α·exp(x⊙[x ≤ 0])⊙[x ≤ 0]
                x().try_mul(neg.clone())?
                    .try_exp()?
                    .try_mul(alpha)?
                    .try_mul(neg)?
                    .try_add(pos)?
            }
            ActivationFn::Tanh => {
                // 1 − tanh²(x)
                x().try_tanh()?.try_square()?.try_negate()?.try_add(1.0)?
            }
            ActivationFn::Sigmoid => {
                // σ(x) − σ(x)²
                let s = x().try_sigmoid()?;
                let s2 = s.with_empty_tape().try_square()?;
                s.try_sub(s2)?
            }
            ActivationFn::Gelu => {
                // t = tanh(β(x + κx³)); f' = ½(1 + t) + ½·x·(1 − t²)·β(1 + 3κx²)
                let u = x().try_powi(3)?.try_mul(GELU_KAPPA)?.try_add(x())?.try_mul(GELU_BETA)?;
                let t = u.try_tanh()?;
                let t2 = t.with_empty_tape();
                let left = t.try_add(1.0)?.try_mul(0.5)?;
                let inner = x().try_square()?.try_mul(3.0 * GELU_KAPPA)?.try_add(1.0)?;
                let right = t2
                    .try_square()?
                    .try_negate()?
                    .try_add(1.0)?
                    .try_mul(x())?
                    .try_mul(inner)?
                    .try_mul(0.5 * GELU_BETA)?;
                left.try_add(right)?
            }
        })
    }
}

/// tanh as Eigen's `generic_fast_tanh_float` (Eigen/src/Core/MathFunctionsImpl.h): ±1 beyond
/// |x| = 9 (where tanh rounds to ±1 in f32), else a 13/6-degree rational interpolant
/// `x·P(x²)/Q(x²)`; within 4.5e-7 of tanh on [-12, 12] (tested). Only multiply-adds, one
/// division and a select, so loops of it vectorize, unlike libm's `tanhf`. Exactly ±1 when
/// saturated, so that derivatives built from it (GELU's) vanish there as they should.
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    // Eigen's coefficients, verbatim.
    #[allow(clippy::excessive_precision)]
    const ALPHA: [f32; 7] = [
        4.89352455891786e-03,
        6.37261928875436e-04,
        1.48572235717979e-05,
        5.12229709037114e-08,
        -8.60467152213735e-11,
        2.00018790482477e-13,
        -2.76076847742355e-16,
    ];
    #[allow(clippy::excessive_precision)]
    const BETA: [f32; 4] = [
        4.89352518554385e-03,
        2.26843463243900e-03,
        1.18534705686654e-04,
        1.19825839466702e-06,
    ];
    let clamped = x.clamp(-9.0, 9.0);
    let x2 = clamped * clamped;
    // Horner's rule in fused multiply-adds, as Eigen's `pmadd`: one rounding per step, and one
    // instruction where the CPU has FMA (every `on_widest_vectors` build); elsewhere `mul_add`
    // computes the same exactly rounded value in software.
    let horner = |c: &[f32]| {
        c[..c.len() - 1]
            .iter()
            .rev()
            .fold(c[c.len() - 1], |acc, &a| acc.mul_add(x2, a))
    };
    let p = horner(&ALPHA) * clamped;
    let q = horner(&BETA);
    if x.abs() >= 9.0 {
        x.signum()
    } else {
        p / q
    }
}

/// `f(x)` elementwise as one tape op: one pass writes the values and the slopes
/// ([`ActivationFn::apply_in_place`]); the backward pass adds `dy ⊙ f'(x)` into the input's
/// gradient, moving `dy` out of the gradient store and back instead of copying it. dfdx's
/// composite took up to six ops for leaky ReLU and ELU, each allocating a full-size buffer
/// forward and backward. CPU only: gradient buffers are host slices.
#[cfg(not(feature = "cuda"))]
fn pointwise(x: Matrix<Tape>, f: ActivationFn) -> Matrix<Tape> {
    let (x, mut tape) = x.split_tape();
    let mut values = crate::kernels::host(&x);
    let slopes = f.apply_in_place(&mut values);
    let y = x.device().tensor_from_vec(values, *x.shape());
    let (xg, yg) = (x.ghost(), y.ghost());
    dfdx::tensor::Tape::add_backward_op(&mut tape, move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&yg)?);
        let dx = &mut grads.get_or_alloc_mut(&xg)?[..];
        crate::kernels::on_widest_vectors(
            #[inline(always)]
            || {
                let n = dx.len();
                let (dy, slopes) = (&dy[..n], &slopes[..n]);
                for i in 0..n {
                    dx[i] += dy[i] * slopes[i];
                }
            },
        );
        **grads.get_or_alloc_mut(&yg)? = dy;
        Ok(())
    });
    y.put_tape(tape)
}

/// An elementwise activation layer (no parameters; the shape is unchanged).
#[derive(Debug, Clone)]
pub struct Activate {
    f: ActivationFn,
}

impl Activate {
    /// A layer applying `f`.
    pub fn new(f: ActivationFn) -> Self {
        Activate { f }
    }
    /// The function.
    pub fn function(&self) -> ActivationFn {
        self.f
    }
}

impl Parameterized for Activate {
    fn named_params(&self) -> Vec<(String, &Param)> {
        Vec::new()
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        Vec::new()
    }
}

impl Layer for Activate {
    fn describe(&self) -> String {
        self.f.name()
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        Ok(input)
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        let shape = input.shape;
        Activation::new(self.f.apply(input.value)?, shape)
    }
    fn elementwise_activation(&self) -> Option<ActivationFn> {
        Some(self.f)
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        if grad_output.value.shape() != input.value.shape() {
            return Err(Error::shape(
                format!("{} input gradient", self.f.name()),
                format!("{:?}", input.value.shape()),
                format!("{:?}", grad_output.value.shape()),
            ));
        }
        let d = self.f.derivative(input)?;
        Activation::new(grad_output.value.try_mul(d)?, input.shape)
    }
}

macro_rules! activation_config {
    ($(#[$doc:meta])* $name:ident, $tag:literal, { $($(#[$fdoc:meta])* $field:ident : $ty:ty = $default:expr),* }, |$s:ident| $f:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty,)*
        }
        impl Default for $name {
            fn default() -> Self {
                $name { $($field: $default,)* }
            }
        }
        impl $name {
            /// The function this config applies.
            pub fn function(&self) -> ActivationFn {
                let $s = self;
                $f
            }
        }
        #[typetag::serde(name = $tag)]
        impl LayerConfig for $name {
            fn build(&self, _input: FeatureShape, _ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
                let f = self.function();
                let ok = match f {
                    ActivationFn::LeakyRelu(v) | ActivationFn::Elu(v) => v.is_finite(),
                    _ => true,
                };
                if !ok {
                    return Err(Error::config($tag, format!("{} needs a finite parameter", f.name())));
                }
                Ok(Box::new(Activate::new(f)))
            }
        }
    };
}

activation_config!(
    /// `{ type = "relu" }`.
    ReluConfig, "relu", {}, |_s| ActivationFn::Relu);
activation_config!(
    /// `{ type = "leaky_relu", negative_slope = 0.2 }` (default 0.2, the GAN convention).
    LeakyReluConfig, "leaky_relu", {
        /// Slope for negative inputs.
        negative_slope: f32 = 0.2
    }, |s| ActivationFn::LeakyRelu(s.negative_slope));
activation_config!(
    /// `{ type = "elu", alpha = 1.0 }`.
    EluConfig, "elu", {
        /// Saturation value for negative inputs.
        alpha: f32 = 1.0
    }, |s| ActivationFn::Elu(s.alpha));
activation_config!(
    /// `{ type = "tanh" }`.
    TanhConfig, "tanh", {}, |_s| ActivationFn::Tanh);
activation_config!(
    /// `{ type = "sigmoid" }`.
    SigmoidConfig, "sigmoid", {}, |_s| ActivationFn::Sigmoid);
activation_config!(
    /// `{ type = "gelu" }`: the tanh approximation (PyTorch `GELU(approximate="tanh")`).
    GeluConfig, "gelu", {}, |_s| ActivationFn::Gelu);

impl LeakyReluConfig {
    /// A leaky ReLU with the given negative slope.
    pub fn new(negative_slope: f32) -> Self {
        LeakyReluConfig { negative_slope }
    }
}

impl EluConfig {
    /// An ELU with the given α.
    pub fn new(alpha: f32) -> Self {
        EluConfig { alpha }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;

    fn all() -> Vec<Box<dyn LayerConfig>> {
        vec![
            Box::new(ReluConfig::default()),
            Box::new(LeakyReluConfig::default()),
            Box::new(EluConfig::new(0.7)),
            Box::new(TanhConfig::default()),
            Box::new(SigmoidConfig::default()),
            Box::new(GeluConfig::default()),
        ]
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn the_pointwise_kernel_matches_the_composite_dfdx_path_with_gradients() {
        let h = Harness::new(0);
        let (rows, cols) = (5, 13);
        // Values on both sides of 0 (and 0 itself), large enough to saturate tanh and sigmoid.
        let xs: Vec<f32> = (0..rows * cols).map(|i| (i as f32 - 32.0) * 0.37).collect();
        let weights: Vec<f32> = (0..rows * cols).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let fns = [
            ActivationFn::Relu,
            ActivationFn::LeakyRelu(0.2),
            ActivationFn::Elu(0.7),
            ActivationFn::Tanh,
            ActivationFn::Sigmoid,
            ActivationFn::Gelu,
        ];
        for f in fns {
            let run = |fused: bool| {
                let x = h.dev.tensor_from_vec(xs.clone(), (rows, cols));
                let y = if fused {
                    f.apply(x.leaky_trace()).unwrap()
                } else {
                    f.composite(x.leaky_trace()).unwrap()
                };
                let values = y.with_empty_tape().as_vec();
                let w = h.dev.tensor_from_vec(weights.clone(), (rows, cols));
                let grads = (y * w).sum::<(), _>().backward();
                (values, grads.get(&x).as_vec())
            };
            let ((v, g), (cv, cg)) = (run(true), run(false));
            let to64 = |a: &[f32]| a.iter().map(|&v| v as f64).collect::<Vec<_>>();
            assert_close(&format!("{} values", f.name()), &v, &to64(&cv), 1e-5, 1e-6);
            assert_close(&format!("{} gradients", f.name()), &g, &to64(&cg), 1e-4, 1e-5);
        }
    }

    #[test]
    fn the_wide_vector_pass_gives_the_portable_bits() {
        // `apply_in_place` runs compiled for AVX-512 or AVX2 where the CPU has them, split across
        // a pool's threads in tasks of `ELEMENTWISE_VALUES_PER_TASK` values; this test's own loop
        // is the portable build on one thread. 3 full tasks and a part (200 rows of 1,003 below):
        // whole vectors and a tail.
        let n = 200 * 1003;
        assert!(
            n > 3 * crate::kernels::ELEMENTWISE_VALUES_PER_TASK && n < 4 * crate::kernels::ELEMENTWISE_VALUES_PER_TASK
        );
        let xs: Vec<f32> = (0..n).map(|i| (i % 1003) as f32 * 0.027 - 13.5).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let functions = [
            ActivationFn::Relu,
            ActivationFn::LeakyRelu(0.2),
            ActivationFn::Elu(1.0),
            ActivationFn::Tanh,
            ActivationFn::Sigmoid,
            ActivationFn::Gelu,
        ];
        // The bias form: rows of 1,003 (no divisor of a task's values), so that tasks are cut
        // at whole rows, and `f(x + b)` is the same bits as the portable loop's.
        let bias: Vec<f32> = (0..1003).map(|j| (j % 7) as f32 * 0.31 - 0.9).collect();
        for f in functions {
            let mut values = xs.clone();
            let slopes = pool.install(|| f.apply_in_place(&mut values));
            let mut biased = xs.clone();
            let biased_slopes = pool.install(|| f.apply_after_bias_in_place(&mut biased, &bias));
            for (i, &x) in xs.iter().enumerate() {
                let (value, slope) = std::hint::black_box(f).value_and_slope(x);
                assert_eq!(
                    (values[i].to_bits(), slopes[i].to_bits()),
                    (value.to_bits(), slope.to_bits()),
                    "{f:?} at {x}"
                );
                let z = x + std::hint::black_box(bias[i % bias.len()]);
                let (value, slope) = std::hint::black_box(f).value_and_slope(z);
                assert_eq!(
                    (biased[i].to_bits(), biased_slopes[i].to_bits()),
                    (value.to_bits(), slope.to_bits()),
                    "{f:?} at {x} + bias"
                );
            }
        }
    }

    #[test]
    fn fast_tanh_stays_within_4_5e_7_of_tanh_and_saturates_exactly() {
        let mut worst = 0.0f64;
        for i in -240_000..=240_000 {
            let x = i as f32 * 5e-5; // [-12, 12]
            let exact = (x as f64).tanh();
            worst = worst.max((fast_tanh(x) as f64 - exact).abs());
        }
        assert!(worst < 4.5e-7, "largest error {worst}");
        assert_eq!((fast_tanh(0.0), fast_tanh(30.0), fast_tanh(-30.0)), (0.0, 1.0, -1.0));
        assert!(fast_tanh(f32::NAN).is_nan());
    }

    #[test]
    fn gradients_and_input_grads_match() {
        for cfg in all() {
            check_layer(cfg.as_ref(), FeatureShape::image(1, 2, 2), 2, Mode::Train, 3);
        }
    }

    #[test]
    fn values_match_formulas() {
        let h = Harness::new(0);
        let xs = vec![-2.0f32, -0.5, 0.3, 1.7];
        type Reference = fn(f64) -> f64;
        let cases: Vec<(ActivationFn, Reference)> = vec![
            (ActivationFn::Relu, |x| x.max(0.0)),
            (ActivationFn::LeakyRelu(0.2), |x| if x > 0.0 { x } else { 0.2 * x }),
            (
                ActivationFn::Elu(0.7),
                |x| if x > 0.0 { x } else { 0.7 * (x.exp() - 1.0) },
            ),
            (ActivationFn::Tanh, f64::tanh),
            (ActivationFn::Sigmoid, |x| 1.0 / (1.0 + (-x).exp())),
            // torch.nn.functional.gelu(x, approximate="tanh")
            (ActivationFn::Gelu, |x| {
                0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
            }),
        ];
        for (f, reference) in cases {
            let x = h.input(xs.clone(), 1, FeatureShape::Flat(4));
            let y = f.apply(x.value).unwrap().as_vec();
            for (a, &xv) in y.iter().zip(&xs) {
                assert!((*a as f64 - reference(xv as f64)).abs() < 1e-5, "{f:?}({xv}) = {a}");
            }
        }
    }

    #[test]
    fn configs_parse_with_defaults() {
        let c: Box<dyn LayerConfig> = serde_json::from_str(r#"{"type": "leaky_relu"}"#).unwrap();
        assert_eq!(format!("{c:?}"), format!("{:?}", LeakyReluConfig::new(0.2)));
        assert!(serde_json::from_str::<Box<dyn LayerConfig>>(r#"{"type": "relu", "slope": 1}"#).is_err());
    }
}
