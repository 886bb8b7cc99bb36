//! Inverted dropout: in [`Mode::Train`] each value is zeroed with probability `p` and the rest
//! are scaled by `1 / (1 − p)`; in [`Mode::Eval`] it is the identity.

use dfdx::prelude::*;
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use super::{BuildContext, ForwardContext, Layer, LayerConfig, Mode};
use crate::error::{Error, Result};
use crate::tensor::{Activation, FeatureShape, Matrix, Param, Parameterized};

/// `{ type = "dropout", p = 0.5 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DropoutConfig {
    /// Probability of zeroing a value, in `[0, 1]`.
    pub p: f64,
}

impl Default for DropoutConfig {
    fn default() -> Self {
        DropoutConfig { p: 0.5 }
    }
}

impl DropoutConfig {
    /// Dropout with probability `p`.
    pub fn new(p: f64) -> Self {
        DropoutConfig { p }
    }
}

#[typetag::serde(name = "dropout")]
impl LayerConfig for DropoutConfig {
    fn build(&self, _input: FeatureShape, _ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        if !(0.0..=1.0).contains(&self.p) {
            return Err(Error::config("p", format!("must be in [0, 1], got {}", self.p)));
        }
        Ok(Box::new(Dropout { p: self.p, mask: None }))
    }
}

/// The dropout layer; it keeps the last training mask for [`Layer::input_grad`].
#[derive(Debug)]
pub struct Dropout {
    p: f64,
    mask: Option<Matrix>,
}

impl Parameterized for Dropout {
    fn named_params(&self) -> Vec<(String, &Param)> {
        Vec::new()
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        Vec::new()
    }
}

impl Layer for Dropout {
    fn describe(&self) -> String {
        format!("dropout(p = {})", self.p)
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        Ok(input)
    }
    fn forward(&mut self, input: Activation, ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        if ctx.mode == Mode::Eval || self.p == 0.0 {
            self.mask = None;
            return Ok(input);
        }
        let shape = *input.value.shape();
        let scale = if self.p < 1.0 {
            (1.0 / (1.0 - self.p)) as f32
        } else {
            0.0
        };
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| if ctx.rng.gen_bool(self.p) { 0.0 } else { scale })
            .collect();
        let mask = input.value.device().tensor_from_vec(values, shape);
        let y = input.value.try_mul(mask.clone())?;
        self.mask = Some(mask);
        Activation::new(y, input.shape)
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        match &self.mask {
            None => Ok(Activation::new(grad_output.value, input.shape)?),
            Some(m) => {
                if m.shape() != grad_output.value.shape() {
                    return Err(Error::shape(
                        "dropout input gradient (the mask of the last forward pass)",
                        format!("{:?}", m.shape()),
                        format!("{:?}", grad_output.value.shape()),
                    ));
                }
                Activation::new(grad_output.value.try_mul(m.clone())?, input.shape)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;

    #[test]
    fn gradients_match_in_train_and_eval() {
        check_layer(&DropoutConfig::new(0.4), FeatureShape::Flat(5), 3, Mode::Train, 2);
        check_layer(&DropoutConfig::new(0.4), FeatureShape::Flat(5), 3, Mode::Eval, 2);
    }

    #[test]
    fn identity_in_eval_keeps_one_minus_p_in_train() {
        let mut h = Harness::new(1);
        let mut d = DropoutConfig::new(0.3)
            .build(FeatureShape::Flat(100), &mut h.build_ctx())
            .unwrap();
        let x = h.input(vec![1.0; 4000], 40, FeatureShape::Flat(100));
        let y = d
            .forward(x.reuse(), &mut h.fwd_ctx(Mode::Eval))
            .unwrap()
            .detach()
            .as_vec();
        assert!(y.iter().all(|&v| v == 1.0));
        let y = d.forward(x, &mut h.fwd_ctx(Mode::Train)).unwrap().detach().as_vec();
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
        assert!((kept - 0.7).abs() < 0.03, "kept {kept}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
        let mean = y.iter().map(|&v| v as f64).sum::<f64>() / y.len() as f64;
        assert!((mean - 1.0).abs() < 0.05);
        assert!(DropoutConfig::new(1.5)
            .build(FeatureShape::Flat(1), &mut h.build_ctx())
            .is_err());
    }
}
