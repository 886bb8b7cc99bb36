//! Fully connected layer: `y = x·W + b`, with `W` stored `[in, out]`.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::init::Init;
use super::{BuildContext, ForwardContext, Layer, LayerConfig};
use crate::error::{Error, Result};
use crate::tensor::{Activation, FeatureShape, Param, ParamRole, Parameterized};

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
            return Err(Error::shape("linear", format!("{} input features", self.in_features), input));
        }
        Ok(FeatureShape::Flat(self.out_features))
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        self.output_shape(input.shape)?;
        let batch = input.batch_size();
        let w = self.weight.as_matrix(self.in_features, self.out_features);
        let y = input.value.try_matmul(w)?;
        let y = match &self.bias {
            Some(b) => y.try_add(b.value.clone().try_broadcast_like(&(batch, self.out_features))?)?,
            None => y,
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;

    #[test]
    fn gradients_match_finite_differences() {
        for bias in [true, false] {
            let cfg = LinearConfig::new(3).with_bias(bias);
            check_layer(&cfg, FeatureShape::Flat(4), 3, Mode::Train, 1);
        }
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
