//! Fully connected layer: `y = x·W + b`, with `W` stored `[in, out]`.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

#[cfg(any(not(feature = "cuda"), test))]
use super::activation::ActivationFn;
use super::init::Init;
use super::{BuildContext, ForwardContext, Layer, LayerConfig};
use crate::error::{Error, Result};
use crate::tensor::{Activation, FeatureShape, Matrix, Param, ParamRole, Parameterized, Tape};

/// Config of a [`Linear`] layer: `{ type = "linear", out_features = 128 }`. The input width is
/// the flattened size of whatever arrives (images are flattened channel-major).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinearConfig {
    /// Output width.
    pub out_features: usize,
    /// Whether to add a bias.
    pub bias: bool,
    /// Weight initializer; PyTorch's default (U(±1/√in)) when absent.
    pub init: Option<Init>,
    /// Bias initializer; PyTorch's default (U(±1/√in)) when absent.
    pub bias_init: Option<Init>,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig {
            out_features: 1,
            bias: true,
            init: None,
            bias_init: None,
        }
    }
}

impl LinearConfig {
    /// A linear layer with `out_features` outputs, a bias and PyTorch's initialization.
    pub fn new(out_features: usize) -> Self {
        LinearConfig {
            out_features,
            ..Default::default()
        }
    }
    /// Sets whether there is a bias.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
    /// Sets the weight initializer.
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = Some(init);
        self
    }
    /// Sets the bias initializer.
    pub fn with_bias_init(mut self, init: Init) -> Self {
        self.bias_init = Some(init);
        self
    }
}

#[typetag::serde(name = "linear")]
impl LayerConfig for LinearConfig {
    fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        Ok(Box::new(Linear::new(self, input.numel(), ctx)?))
    }
}

/// A fully connected layer.
#[derive(Debug)]
pub struct Linear {
    in_features: usize,
    out_features: usize,
    weight: Param,
    bias: Option<Param>,
}

impl Linear {
    /// Builds the layer for `in_features` inputs, drawing parameters from `ctx.rng`.
    pub fn new(cfg: &LinearConfig, in_features: usize, ctx: &mut BuildContext<'_>) -> Result<Self> {
        if cfg.out_features == 0 {
            return Err(Error::config("out_features", "must be at least 1"));
        }
        if in_features == 0 {
            return Err(Error::shape("linear", "at least one input feature", 0));
        }
        let (i, o) = (in_features, cfg.out_features);
        let winit = cfg.init.clone().unwrap_or_else(Init::torch_default_weight);
        winit.validate("init")?;
        // Drawn in PyTorch's [out, in] order, stored transposed as [in, out].
        let w_oi = winit.sample(i * o, i, o, ctx.rng)?;
        let mut w = vec![0.0; i * o];
        for r in 0..o {
            for c in 0..i {
                w[c * o + r] = w_oi[r * i + c];
            }
        }
        let weight = Param::from_vec(ctx.device, w, vec![i, o], ParamRole::Weight)?;
        let bias = if cfg.bias {
            let binit = cfg.bias_init.clone().unwrap_or_else(|| Init::torch_default_bias(i));
            binit.validate("bias_init")?;
            let b = binit.sample(o, i, o, ctx.rng)?;
            Some(Param::from_vec(ctx.device, b, vec![o], ParamRole::Bias)?)
        } else {
            None
        };
        Ok(Linear {
            in_features: i,
            out_features: o,
            weight,
            bias,
        })
    }
    /// The weight, `[in, out]`.
    pub fn weight(&self) -> &Param {
        &self.weight
    }
    /// The bias, `[out]`, if any.
    pub fn bias(&self) -> Option<&Param> {
        self.bias.as_ref()
    }
}

impl Parameterized for Linear {
    fn named_params(&self) -> Vec<(String, &Param)> {
        let mut v = vec![("weight".to_string(), &self.weight)];
        if let Some(b) = &self.bias {
            v.push(("bias".to_string(), b));
        }
        v
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut v = vec![("weight".to_string(), &mut self.weight)];
        if let Some(b) = &mut self.bias {
            v.push(("bias".to_string(), b));
        }
        v
    }
}

impl Layer for Linear {
    fn describe(&self) -> String {
        format!(
            "linear {} -> {}{}",
            self.in_features,
            self.out_features,
            if self.bias.is_some() { "" } else { " (no bias)" }
        )
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        if input.numel() != self.in_features {
            return Err(Error::shape(
                "linear",
                format!("{} input features", self.in_features),
                input,
            ));
        }
        Ok(FeatureShape::Flat(self.out_features))
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        self.output_shape(input.shape)?;
        let shape = (self.in_features, self.out_features);
        #[cfg(not(feature = "cuda"))]
        let y = affine(
            input.value,
            &self.weight,
            self.bias.as_ref(),
            shape,
            input.requires_grad,
            None,
        )?;
        #[cfg(feature = "cuda")]
        let y = composite_affine(input.value, &self.weight, self.bias.as_ref(), shape)?;
        Activation::new(y, FeatureShape::Flat(self.out_features))
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
        _ctx: &mut ForwardContext<'_>,
    ) -> Result<Activation> {
        self.output_shape(input.shape)?;
        let y = affine(
            input.value,
            &self.weight,
            self.bias.as_ref(),
            (self.in_features, self.out_features),
            input.requires_grad,
            Some(f),
        )?;
        Activation::new(y, FeatureShape::Flat(self.out_features))
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        self.output_shape(input.shape)?;
        // ∂L/∂x = g·Wᵀ; the transposed view keeps W's id, so a penalty on it reaches W.
        let wt = self
            .weight
            .as_matrix(self.in_features, self.out_features)
            .try_permute::<_, Axes2<1, 0>>()?;
        let g = grad_output.value.try_matmul(wt)?;
        Activation::new(g, input.shape)
    }
}

/// `x·W + b` from dfdx ops: a matmul and a broadcast add (the reference for [`affine`], and the
/// CUDA path).
#[cfg(any(feature = "cuda", test))]
fn composite_affine(
    x: Matrix<Tape>,
    weight: &Param,
    bias: Option<&Param>,
    (inputs, outputs): (usize, usize),
) -> Result<Matrix<Tape>> {
    let batch = x.shape().0;
    let y = x.try_matmul(weight.as_matrix(inputs, outputs))?;
    Ok(match bias {
        Some(b) => y.try_add(b.value().clone().try_broadcast_like::<_, Axis<0>>(&(batch, outputs))?)?,
        None => y,
    })
}

/// `f(x·W + b)` (`x` `[batch, inputs]`, `W` `[inputs, outputs]`, `f` the optional fused
/// activation) as one tape op on the host: the product writes the output and the bias is added
/// in `f`'s pass, which keeps the slopes `f'` (without `f` the output starts as the bias rows and
/// the product is accumulated into them). The backward pass forms `dz = dy ⊙ f'` (or takes `dy`
/// as it is) and adds `xᵀ·dz`, the column sums of `dz` and `dz·Wᵀ` straight into the gradient
/// buffers of `W`, `b` and `x`, leaving out a frozen `W` or `b` ([`Param::requires_grad`]) and,
/// when `input_gradient` is false, `x`. Equal to [`composite_affine`] followed by the activation
/// up to rounding (tested). CPU only: gradient buffers are host slices.
#[cfg(not(feature = "cuda"))]
fn affine(
    x: Matrix<Tape>,
    weight: &Param,
    bias: Option<&Param>,
    (inputs, outputs): (usize, usize),
    input_gradient: bool,
    activation: Option<ActivationFn>,
) -> Result<Matrix<Tape>> {
    let batch = x.shape().0;
    // Gradients are written in logical order: operate on contiguous values.
    let x = x.try_reshape_like(&(batch, inputs))?;
    let (x, mut tape) = x.split_tape();
    // The weight's host copy is shared, not copied: the parameter keeps it between updates.
    let (xv, wv) = (crate::kernels::host(&x), weight.host_values());
    // The product alone writes the output (never zero-filled first) where the bias is added in
    // the activation's pass or there is none; otherwise the output starts as the bias rows and
    // the product is added into them.
    let (y, slopes) = match (bias, activation) {
        (Some(b), None) => {
            let mut y = b.host_values().repeat(batch);
            crate::kernels::matmul((batch, inputs, outputs), &xv, false, &wv, false, &mut y, true);
            (y, None)
        }
        (bias, activation) => {
            use crate::kernels::StridedMatrix;
            let mut y = Vec::with_capacity(batch * outputs);
            crate::kernels::matmul_strided_uninit(
                (batch, inputs, outputs),
                StridedMatrix {
                    values: &xv,
                    strides: (inputs, 1),
                },
                StridedMatrix {
                    values: &wv,
                    strides: (outputs, 1),
                },
                &mut y.spare_capacity_mut()[..batch * outputs],
                outputs,
            );
            // SAFETY: the product wrote each of its `batch` rows of `outputs` values, contiguous.
            unsafe { y.set_len(batch * outputs) };
            let slopes = activation.map(|f| match bias {
                Some(b) => f.apply_after_bias_in_place(&mut y, &b.host_values()),
                None => f.apply_in_place(&mut y),
            });
            (y, slopes)
        }
    };
    let y = x.device().tensor_from_vec(y, (batch, outputs));
    // Frozen parameters (`Param::requires_grad`) get no gradient: no product for `dW`.
    let (xg, yg) = (x.ghost(), y.ghost());
    let wg = weight.requires_grad().then(|| weight.with_id(|w| w.ghost()));
    let bg = bias.filter(|b| b.requires_grad()).map(|b| b.with_id(|b| b.ghost()));
    dfdx::tensor::Tape::add_backward_op(&mut tape, move |grads| {
        // Moved out and back, not copied: dfdx lends no `&` and `&mut` to two gradients at once.
        let dy_store = std::mem::take(&mut **grads.get_or_alloc_mut(&yg)?);
        // The bias gradient (the rows' sums) is added in the pass through the activation.
        let dz = match &bg {
            Some(bg) => crate::kernels::before_activation_adding_rows(
                &dy_store,
                slopes.as_deref(),
                &mut grads.get_or_alloc_mut(bg)?[..],
            ),
            None => crate::kernels::before_activation(&dy_store, slopes.as_deref()),
        };
        let dy: &[f32] = &dz;
        if let Some(wg) = &wg {
            let dw = grads.get_or_alloc_mut(wg)?;
            crate::kernels::matmul((inputs, batch, outputs), &xv, true, dy, false, &mut dw[..], true);
        }
        if input_gradient {
            let dx = grads.get_or_alloc_mut(&xg)?;
            crate::kernels::matmul((batch, outputs, inputs), dy, false, &wv, true, &mut dx[..], true);
        }
        **grads.get_or_alloc_mut(&yg)? = dy_store;
        Ok(())
    });
    Ok(y.put_tape(tape))
}

/// `y[i] = z[index[i]]` (flat indices into the row-major `z`, whose values are `values`) as one
/// tape op shaped `shape`, whose backward pass adds `dy[i]` into `dz[index[i]]`. CPU only.
#[cfg(not(feature = "cuda"))]
fn gather(z: Matrix<Tape>, values: &[f32], index: Vec<usize>, shape: (usize, usize)) -> Matrix<Tape> {
    let (z, mut tape) = z.split_tape();
    let y: Vec<f32> = index.iter().map(|&i| values[i]).collect();
    let y = z.device().tensor_from_vec(y, shape);
    let (zg, yg) = (z.ghost(), y.ghost());
    dfdx::tensor::Tape::add_backward_op(&mut tape, move |grads| {
        // Moved out and back, not copied: dfdx lends no `&` and `&mut` to two gradients at once.
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&yg)?);
        let dz = grads.get_or_alloc_mut(&zg)?;
        for (&i, g) in index.iter().zip(&dy) {
            dz[i] += g;
        }
        **grads.get_or_alloc_mut(&yg)? = dy;
        Ok(())
    });
    y.put_tape(tape)
}

/// Config of a [`Maxout`] layer (a linear maxout unit, as in PacGAN's discriminator):
/// `{ type = "maxout", out_features = 200, pieces = 5 }`. Each output is the maximum of `pieces`
/// linear functions of the input.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaxoutConfig {
    /// Output width (units).
    pub out_features: usize,
    /// Linear pieces per unit.
    pub pieces: usize,
    /// Whether the pieces have biases.
    pub bias: bool,
    /// Weight initializer; PyTorch's `Linear` default when absent.
    pub init: Option<Init>,
    /// Bias initializer; PyTorch's `Linear` default when absent.
    pub bias_init: Option<Init>,
}

impl Default for MaxoutConfig {
    fn default() -> Self {
        MaxoutConfig {
            out_features: 1,
            pieces: 5,
            bias: true,
            init: None,
            bias_init: None,
        }
    }
}

impl MaxoutConfig {
    /// `out_features` units of `pieces` pieces each.
    pub fn new(out_features: usize, pieces: usize) -> Self {
        MaxoutConfig {
            out_features,
            pieces,
            ..Default::default()
        }
    }
    /// Sets the weight initializer.
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = Some(init);
        self
    }
    /// Sets the bias initializer.
    pub fn with_bias_init(mut self, init: Init) -> Self {
        self.bias_init = Some(init);
        self
    }
}

#[typetag::serde(name = "maxout")]
impl LayerConfig for MaxoutConfig {
    fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        if self.pieces == 0 || self.out_features == 0 {
            return Err(Error::config("maxout", "out_features and pieces must be at least 1"));
        }
        let lin = LinearConfig {
            out_features: self.out_features * self.pieces,
            bias: self.bias,
            init: self.init.clone(),
            bias_init: self.bias_init.clone(),
        };
        Ok(Box::new(Maxout {
            linear: Linear::new(&lin, input.numel(), ctx)?,
            units: self.out_features,
            pieces: self.pieces,
            mask: None,
        }))
    }
}

/// A linear maxout layer: `y[u] = max_k (x·W + b)[u·pieces + k]`. Its parameters are those of
/// the underlying linear map (`weight` `[in, units·pieces]`, `bias`).
#[derive(Debug)]
pub struct Maxout {
    linear: Linear,
    units: usize,
    pieces: usize,
    /// One-hot of the winning piece per unit, from the last forward pass.
    mask: Option<crate::tensor::Matrix>,
}

impl Parameterized for Maxout {
    fn named_params(&self) -> Vec<(String, &Param)> {
        self.linear.named_params()
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        self.linear.named_params_mut()
    }
}

impl Layer for Maxout {
    fn describe(&self) -> String {
        format!(
            "maxout {} -> {} x {} pieces",
            self.linear.in_features, self.units, self.pieces
        )
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        self.linear.output_shape(input)?;
        Ok(FeatureShape::Flat(self.units))
    }
    fn forward(&mut self, input: Activation, ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        let z = self.linear.forward(input, ctx)?.value;
        let (b, n) = *z.shape();
        let k = self.pieces;
        let zv = crate::kernels::host(&z);
        let mut mask = vec![0.0f32; zv.len()];
        let mut winners = Vec::with_capacity(b * self.units);
        for (unit, (row, m)) in zv.chunks(k).zip(mask.chunks_mut(k)).enumerate() {
            let best = row
                .iter()
                .enumerate()
                .fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
            m[best] = 1.0;
            winners.push(unit * k + best);
        }
        let mask = z.device().tensor_from_vec(mask, (b, n));
        #[cfg(not(feature = "cuda"))]
        let y = gather(z, &zv, winners, (b, self.units));
        #[cfg(feature = "cuda")]
        let y = {
            drop(winners);
            z.try_mul(mask.clone())?
                .try_reshape_like(&(b, self.units, k))?
                .try_sum::<(usize, usize), Axis<2>>()?
        };
        self.mask = Some(mask);
        Activation::new(y, FeatureShape::Flat(self.units))
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        let Some(mask) = &self.mask else {
            return Err(Error::Other(
                "maxout input gradient requested before a forward pass".into(),
            ));
        };
        let b = grad_output.value.shape().0;
        let n = self.units * self.pieces;
        if mask.shape() != &(b, n) {
            return Err(Error::shape(
                "maxout input gradient (the last forward pass)",
                format!("{:?}", mask.shape()),
                format!("{b} samples"),
            ));
        }
        // Route each unit's gradient to its winning piece, then through the linear map.
        let g = grad_output
            .value
            .try_broadcast_like::<_, Axis<2>>(&(b, self.units, self.pieces))?
            .try_reshape_like(&(b, n))?
            .try_mul(mask.clone())?;
        self.linear
            .input_grad(input, Activation::new(g, FeatureShape::Flat(n))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn the_affine_kernel_matches_the_composite_dfdx_path_with_gradients() {
        // Sizes past gemm's small-matrix paths; a loss sum(y ⊙ r) gives every output its own
        // gradient.
        let (batch, inputs, outputs) = (37, 70, 130);
        for with_bias in [true, false] {
            let mut h = Harness::new(3);
            let cfg = LinearConfig::new(outputs).with_bias(with_bias);
            let layer = Linear::new(&cfg, inputs, &mut h.build_ctx()).unwrap();
            let xv = h.values(batch * inputs);
            let rv = h.values(batch * outputs);
            let r = h.dev.tensor_from_vec(rv, (batch, outputs));
            let run = |op: &dyn Fn(Matrix<Tape>) -> Result<Matrix<Tape>>| {
                let x = h.dev.tensor_from_vec(xv.clone(), (batch, inputs));
                let y = op(x.leaky_trace()).unwrap();
                let values = y.with_empty_tape().as_vec();
                let mut grads = (y * r.clone()).sum::<(), _>().backward();
                let grad_of = |t: &crate::tensor::Vector, grads: &mut crate::tensor::Grads| {
                    grads.get_or_alloc_mut(t).unwrap().to_vec()
                };
                let dx = grads.get_or_alloc_mut(&x).unwrap().to_vec();
                let mut out = vec![values, dx, grad_of(layer.weight.value(), &mut grads)];
                if let Some(b) = &layer.bias {
                    out.push(grad_of(b.value(), &mut grads));
                }
                out
            };
            let shape = (inputs, outputs);
            let fused = run(&|x| affine(x, &layer.weight, layer.bias.as_ref(), shape, true, None));
            let composite = run(&|x| composite_affine(x, &layer.weight, layer.bias.as_ref(), shape));
            for (what, (a, b)) in ["y", "dx", "dW", "db"].iter().zip(fused.iter().zip(&composite)) {
                assert_eq!(a.len(), b.len(), "{what}");
                let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
                assert_close(what, a, &b64, 1e-4, 1e-5);
            }
            // With a fused activation: the same as the affine op followed by the activation's.
            for f in [
                ActivationFn::Relu,
                ActivationFn::LeakyRelu(0.2),
                ActivationFn::Elu(0.7),
                ActivationFn::Tanh,
                ActivationFn::Sigmoid,
                ActivationFn::Gelu,
            ] {
                let fused = run(&|x| affine(x, &layer.weight, layer.bias.as_ref(), shape, true, Some(f)));
                let separate = run(&|x| f.apply(affine(x, &layer.weight, layer.bias.as_ref(), shape, true, None)?));
                for (what, (a, b)) in ["y", "dx", "dW", "db"].iter().zip(fused.iter().zip(&separate)) {
                    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
                    assert_close(&format!("{f:?} {what}"), a, &b64, 1e-5, 1e-6);
                }
            }
            // Without the input gradient: the same values and parameter gradients, and `dx` never
            // written (zeros once allocated).
            let skipped = run(&|x| affine(x, &layer.weight, layer.bias.as_ref(), shape, false, None));
            assert!(skipped[1].iter().all(|&d| d == 0.0));
            for i in [0, 2, 3].into_iter().filter(|&i| i < fused.len()) {
                assert_eq!(skipped[i], fused[i]);
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for bias in [true, false] {
            let cfg = LinearConfig::new(3).with_bias(bias);
            check_layer(&cfg, FeatureShape::Flat(4), 3, Mode::Train, 1);
        }
    }

    #[test]
    fn maxout_gradients_and_values() {
        check_layer_with(
            &MaxoutConfig::new(3, 3),
            FeatureShape::Flat(4),
            Check {
                batch: 3,
                mode: Mode::Train,
                seed: 8,
                input_grad: InputGrad::Exact,
                input_differentiable: true,
                h: 1e-3,
            },
        );
        let mut h = Harness::new(1);
        let cfg = MaxoutConfig::new(2, 2)
            .with_init(Init::Zeros)
            .with_bias_init(Init::Zeros);
        let mut m = cfg.build(FeatureShape::Flat(1), &mut h.build_ctx()).unwrap();
        // z = x·[1, -1, 2, 3]: units max(x, -x) = |x| and max(2x, 3x).
        m.named_params_mut()[0].1.set(&[1., -1., 2., 3.]).unwrap();
        let x = h.input(vec![-2.0, 1.5], 2, FeatureShape::Flat(1));
        let y = m.forward(x, &mut h.fwd_ctx(Mode::Eval)).unwrap();
        assert_eq!(y.detach().as_vec(), vec![2.0, -4.0, 1.5, 4.5]);
    }

    #[test]
    fn default_init_is_torch_bounds_and_custom_init_applies() {
        let mut h = Harness::new(5);
        let l = Linear::new(&LinearConfig::new(50), 25, &mut h.build_ctx()).unwrap();
        let w = l.weight().to_vec();
        assert!(w.iter().all(|&v| v.abs() <= 0.2) && w.iter().any(|&v| v.abs() > 0.19));
        let b = l.bias().unwrap().to_vec();
        assert!(b.iter().all(|&v| v.abs() <= 0.2));
        let cfg = LinearConfig::new(4).with_init(Init::Ones).with_bias_init(Init::Zeros);
        let l = Linear::new(&cfg, 2, &mut h.build_ctx()).unwrap();
        assert_eq!(l.weight().to_vec(), vec![1.0; 8]);
        assert_eq!(l.bias().unwrap().to_vec(), vec![0.0; 4]);
        assert_eq!(l.weight().shape, vec![2, 4]);
    }

    #[test]
    fn forward_is_x_w_plus_b() {
        let mut h = Harness::new(1);
        let mut l = Linear::new(&LinearConfig::new(2), 3, &mut h.build_ctx()).unwrap();
        l.weight.set(&[1., 2., 3., 4., 5., 6.]).unwrap(); // [[1,2],[3,4],[5,6]]
        l.bias.as_mut().unwrap().set(&[0.5, -0.5]).unwrap();
        let x = h.input(vec![1., 0., -1., 2., 1., 0.], 2, FeatureShape::Flat(3));
        let y = l.forward(x, &mut h.fwd_ctx(Mode::Eval)).unwrap();
        // [1,0,-1]·W = [-4,-4]; [2,1,0]·W = [5,8]
        assert_eq!(y.detach().as_vec(), vec![-3.5, -4.5, 5.5, 7.5]);
        assert!(l.output_shape(FeatureShape::Flat(4)).is_err());
    }
}
