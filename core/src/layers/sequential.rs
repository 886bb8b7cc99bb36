//! A stack of layers applied in order (OWNED BY THE LAYERS HELPER: the signatures below are the
//! agreed API; bodies are to be implemented).

use serde::{Deserialize, Serialize};

use super::{BuildContext, ForwardContext, Layer, LayerConfig};
use crate::error::Result;
use crate::tensor::{Activation, FeatureShape, Param, Parameterized};

/// A stack of layers; parameter names are `<index>.<param>` (`0.weight`, `2.bias`).
pub struct Sequential {
    layers: Vec<Box<dyn Layer>>,
    input: FeatureShape,
    output: FeatureShape,
}

/// Config of a [`Sequential`]: `layers = [{ type = "linear", out_features = 128 }, { type = "relu" }]`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SequentialConfig {
    /// The layers, in order.
    pub layers: Vec<Box<dyn LayerConfig>>,
}

impl SequentialConfig {
    /// Builds every layer for inputs of shape `input`. `path` is the config path used in errors
    /// (`model.encoder` gives `model.encoder.layers[2]: ...`).
    pub fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>, path: &str) -> Result<Sequential> {
        let _ = (input, ctx, path);
        unimplemented!("layers helper")
    }
}

impl Sequential {
    /// A stack of already built layers, checking that their shapes chain from `input`.
    pub fn new(layers: Vec<Box<dyn Layer>>, input: FeatureShape) -> Result<Self> {
        let mut shape = input;
        for l in &layers {
            shape = l.output_shape(shape)?;
        }
        Ok(Sequential {
            layers,
            input,
            output: shape,
        })
    }
    /// The per-sample input shape.
    pub fn input_shape(&self) -> FeatureShape {
        self.input
    }
    /// The per-sample output shape.
    pub fn output_shape(&self) -> FeatureShape {
        self.output
    }
    /// The layers.
    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }
    /// Runs every layer.
    pub fn forward(&mut self, input: Activation, ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        let _ = (input, ctx);
        unimplemented!("layers helper")
    }
    /// Runs the stack and also returns ∂(Σ outputs)/∂input per sample, built from differentiable
    /// ops sharing one tape with the forward pass: a penalty on it (WGAN-GP, R1) backpropagates
    /// exactly into the parameters. Requires a single output feature or sums over them.
    pub fn forward_with_input_grad(
        &mut self,
        input: Activation,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<(Activation, Activation)> {
        let _ = (input, ctx);
        unimplemented!("layers helper")
    }
}

impl Parameterized for Sequential {
    fn named_params(&self) -> Vec<(String, &Param)> {
        unimplemented!("layers helper")
    }
    fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        unimplemented!("layers helper")
    }
}
