//! Reshape and Flatten: free changes of the per-sample shape (the `[batch, features]` values are
//! untouched; images are stored channel-major, so flattening an image is a no-op on the data).

use serde::{Deserialize, Serialize};

use super::{BuildContext, ForwardContext, Layer, LayerConfig};
use crate::error::{Error, Result};
use crate::tensor::{Activation, FeatureShape, Param, Parameterized};

/// `{ type = "reshape", shape = [64, 7, 7] }` (an image `[c, h, w]`) or `shape = [3136]` (flat).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReshapeConfig {
    /// The target per-sample shape: one number (flat) or three (`[channels, height, width]`).
    pub shape: Vec<usize>,
}

impl ReshapeConfig {
    /// Reshape to an image `[channels, height, width]`.
    pub fn image(channels: usize, height: usize, width: usize) -> Self {
        ReshapeConfig {
            shape: vec![channels, height, width],
        }
    }
    /// Reshape to a flat vector of `n` features.
    pub fn flat(n: usize) -> Self {
        ReshapeConfig { shape: vec![n] }
    }
    /// The target as a [`FeatureShape`].
    pub fn target(&self) -> Result<FeatureShape> {
        match self.shape[..] {
            [n] if n > 0 => Ok(FeatureShape::Flat(n)),
            [c, h, w] if c > 0 && h > 0 && w > 0 => Ok(FeatureShape::image(c, h, w)),
            _ => Err(Error::config(
                "shape",
                format!(
                    "expected [features] or [channels, height, width] with positive sizes, got {:?}",
                    self.shape
                ),
            )),
        }
    }
}

#[typetag::serde(name = "reshape")]
impl LayerConfig for ReshapeConfig {
    fn build(&self, input: FeatureShape, _ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        let layer = Reshape { target: self.target()? };
        layer.output_shape(input)?;
        Ok(Box::new(layer))
    }
}

/// `{ type = "flatten" }`: an image `[c, h, w]` becomes `[c·h·w]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlattenConfig {}

#[typetag::serde(name = "flatten")]
impl LayerConfig for FlattenConfig {
    fn build(&self, _input: FeatureShape, _ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        Ok(Box::new(Flatten))
    }
}

/// Gives every sample a new shape with the same number of values.
#[derive(Clone, Debug)]
pub struct Reshape {
    target: FeatureShape,
}

impl Reshape {
    /// A reshape to `target`.
    pub fn new(target: FeatureShape) -> Self {
        Reshape { target }
    }
}

/// Flattens images to feature vectors.
#[derive(Clone, Debug)]
pub struct Flatten;

fn relabel(a: Activation, shape: FeatureShape) -> Result<Activation> {
    Activation::new(a.value, shape)
}

impl Parameterized for Reshape {
    fn named_params(&self) -> Vec<(String, &Param)> {
        Vec::new()
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        Vec::new()
    }
}

impl Layer for Reshape {
    fn describe(&self) -> String {
        format!("reshape -> {}", self.target)
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        if input.numel() != self.target.numel() {
            return Err(Error::shape(
                format!("reshape to {}", self.target),
                format!("an input of {} values", self.target.numel()),
                format!("{input} = {} values", input.numel()),
            ));
        }
        Ok(self.target)
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        let s = self.output_shape(input.shape)?;
        relabel(input, s)
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        relabel(grad_output, input.shape)
    }
}

impl Parameterized for Flatten {
    fn named_params(&self) -> Vec<(String, &Param)> {
        Vec::new()
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        Vec::new()
    }
}

impl Layer for Flatten {
    fn describe(&self) -> String {
        "flatten".into()
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        Ok(FeatureShape::Flat(input.numel()))
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        let s = FeatureShape::Flat(input.shape.numel());
        relabel(input, s)
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        relabel(grad_output, input.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;

    #[test]
    fn gradients_and_shapes() {
        check_layer(&ReshapeConfig::image(2, 1, 2), FeatureShape::Flat(4), 2, Mode::Train, 0);
        check_layer(
            &FlattenConfig::default(),
            FeatureShape::image(1, 2, 2),
            2,
            Mode::Train,
            0,
        );
        let mut h = Harness::new(0);
        assert!(ReshapeConfig::image(2, 2, 2)
            .build(FeatureShape::Flat(7), &mut h.build_ctx())
            .is_err());
        assert!(ReshapeConfig { shape: vec![2, 3] }
            .build(FeatureShape::Flat(6), &mut h.build_ctx())
            .is_err());
        let x = h.input(vec![1., 2., 3., 4.], 1, FeatureShape::image(1, 2, 2));
        let y = Flatten.forward(x, &mut h.fwd_ctx(Mode::Eval)).unwrap();
        assert_eq!(
            (y.shape, y.detach().as_vec()),
            (FeatureShape::Flat(4), vec![1., 2., 3., 4.])
        );
    }
}
