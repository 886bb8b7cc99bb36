//! The runtime-shaped layer toolkit: layers whose sizes come from pipeline files.
//!
//! dfdx's own `nn` modules are const-generic, and its convolutions need a nightly compiler, so
//! nash owns its layers. Each layer is built from a typetag-serialized [`LayerConfig`] (so plugins
//! can add layers), runs forward on an [`Activation`] carrying the tape, and can express the
//! gradient of its output with respect to its input as ordinary differentiable tensor ops
//! ([`Layer::input_grad`]): dfdx has no double backward, and exact gradient penalties (WGAN-GP, R1,
//! R2, DRAGAN) differentiate through that expression.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::tensor::{Activation, Device, FeatureShape, Parameterized, Rng};

/// Whether a forward pass trains (batch statistics, dropout) or evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Training: batch norm uses and updates batch statistics, dropout drops.
    Train,
    /// Evaluation: running statistics, no dropout.
    Eval,
}

/// What a forward pass needs besides its input.
pub struct ForwardContext<'a> {
    /// Train or eval.
    pub mode: Mode,
    /// Randomness (dropout masks), seeded by the run.
    pub rng: &'a mut Rng,
}

/// What building a layer needs: the device and a seeded generator for initialization.
pub struct BuildContext<'a> {
    /// Where parameters live.
    pub device: &'a Device,
    /// Seeded generator for initializers.
    pub rng: &'a mut Rng,
}

/// A layer with runtime shapes.
pub trait Layer: Parameterized {
    /// A one-line description (`linear 784 -> 128`).
    fn describe(&self) -> String;
    /// The per-sample shape this layer produces from `input`, or an error saying what it accepts.
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape>;
    /// Runs the layer. Layers with mode-dependent behavior (batch norm, dropout) remember what
    /// the last forward pass used (batch statistics, mask) for [`Layer::input_grad`].
    fn forward(&mut self, input: Activation, ctx: &mut ForwardContext<'_>) -> Result<Activation>;
    /// Given `input` (the value the last [`Layer::forward`] received, shared via
    /// [`Activation::reuse`]) and `grad_output` (∂L/∂output), returns ∂L/∂input built from
    /// differentiable ops on the tape, so that a penalty on it can be differentiated with respect
    /// to the parameters. Layers that couple samples (batch norm in train mode) return
    /// [`crate::Error::Unsupported`] with the reason.
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation>;
    /// Runs the layer so that [`Layer::input_grad`] can follow: the same as
    /// [`Layer::forward`] except for containers ([`Sequential`]), which then run their layers
    /// one by one, unfused, keeping every layer's input.
    fn forward_for_input_grad(&mut self, input: Activation, ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        self.forward(input, ctx)
    }
    /// The elementwise function this layer applies, if it is a plain activation that the layer
    /// before it may fuse into its own op ([`Layer::forward_activated`]).
    fn elementwise_activation(&self) -> Option<ActivationFn> {
        None
    }
    /// Whether [`Layer::forward_activated`] fuses the activation into this layer's op (a linear
    /// layer does: no separate pass, buffer or tape op for the activation).
    fn fuses_activation(&self) -> bool {
        false
    }
    /// Runs the layer and then `f` on its output: one op where [`Layer::fuses_activation`], else
    /// the layer's own forward pass followed by `f`'s.
    fn forward_activated(
        &mut self,
        input: Activation,
        f: ActivationFn,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Activation> {
        let output = self.forward(input, ctx)?;
        Activate::new(f).forward(output, ctx)
    }
    /// The layer's name within a network, if it has one (`conv1`); used by stabilizers that
    /// select layers by pattern.
    fn name(&self) -> Option<&str> {
        None
    }
    /// Switches how training-mode passes update running statistics (batch norm): `true` forgets
    /// them and averages every following batch equally, `false` returns to the layer's
    /// exponential update. Returns whether the layer keeps running statistics.
    fn set_statistics_reestimation(&mut self, _on: bool) -> bool {
        false
    }
}

/// Re-estimates the running statistics (batch norm) of `owner`'s `network` for its current
/// parameters, as PyTorch's `torch.optim.swa_utils.update_bn` does for averaged weights: forgets
/// them, calls `run_batch` `batches` times (each runs the network on fresh inputs in training
/// mode) and keeps the plain average of the batches' statistics; the exponential update returns
/// afterwards, also when a batch fails. Parameters are not touched. Returns whether the network
/// keeps running statistics (when it does not, nothing runs).
pub fn reestimate_statistics<M: ?Sized>(
    owner: &mut M,
    network: impl Fn(&mut M) -> &mut dyn Layer,
    batches: usize,
    mut run_batch: impl FnMut(&mut M) -> Result<()>,
) -> Result<bool> {
    if !network(owner).set_statistics_reestimation(true) {
        return Ok(false);
    }
    let result = (0..batches).try_for_each(|_| run_batch(owner));
    network(owner).set_statistics_reestimation(false);
    result.map(|()| true)
}

/// Serializable description of a layer; `type = "linear"` etc. in pipeline files.
#[typetag::serde(tag = "type")]
pub trait LayerConfig: std::fmt::Debug + Send + Sync {
    /// Builds the layer for samples of shape `input`.
    fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>>;
}

pub mod activation;
pub mod conv;
pub mod dropout;
pub mod embedding;
pub mod init;
pub mod linear;
pub mod norm;
pub mod reshape;
pub mod sequential;
#[cfg(test)]
pub(crate) mod testing;

pub use activation::{
    Activate, ActivationFn, EluConfig, GeluConfig, LeakyReluConfig, OverFunction, ReluConfig, SigmoidConfig, TanhConfig,
};
pub use conv::{Conv2d, Conv2dConfig, ConvGeometry, ConvTranspose2d, ConvTranspose2dConfig};
pub use dropout::{Dropout, DropoutConfig};
pub use embedding::{Embedding, EmbeddingConfig};
pub use init::{FanMode, Init, Nonlinearity};
pub use linear::{Linear, LinearConfig, Maxout, MaxoutConfig};
pub use norm::{BatchNorm, BatchNormConfig, LayerNorm, LayerNormConfig};
pub use reshape::{Flatten, FlattenConfig, Reshape, ReshapeConfig};
pub use sequential::{Sequential, SequentialConfig};

/// Registers the layer types of nash-core.
pub fn register(registry: &mut crate::registry::Registry) -> Result<()> {
    registry.layer::<LinearConfig>("fully connected layer y = x·W + b")?;
    registry.layer::<MaxoutConfig>("linear maxout: each unit is the max of `pieces` linear functions")?;
    registry.layer::<Conv2dConfig>("2-D convolution on [c, h, w] images (square kernel, stride, padding)")?;
    registry
        .layer::<ConvTranspose2dConfig>("2-D transposed convolution (the adjoint of conv2d), with output_padding")?;
    registry.layer::<BatchNormConfig>("batch normalization, per feature (flat) or per channel (images)")?;
    registry.layer::<LayerNormConfig>("layer normalization over each sample")?;
    registry.layer::<DropoutConfig>("inverted dropout, active in training only")?;
    registry.layer::<EmbeddingConfig>("lookup table from a class index to a vector")?;
    registry.layer::<ReluConfig>("max(x, 0)")?;
    registry.layer::<LeakyReluConfig>("x if x > 0 else negative_slope·x")?;
    registry.layer::<EluConfig>("x if x > 0 else alpha·(exp(x) − 1)")?;
    registry.layer::<TanhConfig>("hyperbolic tangent")?;
    registry.layer::<SigmoidConfig>("logistic sigmoid")?;
    registry.layer::<GeluConfig>("GELU, tanh approximation")?;
    registry.layer::<ReshapeConfig>("give each sample a new shape ([n] or [c, h, w])")?;
    registry.layer::<FlattenConfig>("flatten images to feature vectors")?;
    registry.layer::<SequentialConfig>("a nested stack of layers")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::registry::{Kind, Registry};

    #[test]
    fn registers_every_layer_with_its_fields() {
        let mut r = Registry::new();
        r.set_current_plugin("nash-core");
        super::register(&mut r).unwrap();
        assert_eq!(
            r.tags(Kind::Layer),
            [
                "batch_norm",
                "conv2d",
                "conv_transpose2d",
                "dropout",
                "elu",
                "embedding",
                "flatten",
                "gelu",
                "layer_norm",
                "leaky_relu",
                "linear",
                "maxout",
                "relu",
                "reshape",
                "sequential",
                "sigmoid",
                "tanh"
            ]
        );
        let lin = r.find(Kind::Layer, "linear").unwrap();
        let names: Vec<&str> = lin.fields.iter().map(|f| f.name.as_str()).collect();
        for f in ["out_features", "bias", "init"] {
            assert!(names.contains(&f), "{names:?}");
        }
        let ct = r.find(Kind::Layer, "conv_transpose2d").unwrap();
        assert!(ct.fields.iter().any(|f| f.name == "output_padding"));
        // Registering twice is refused.
        assert!(super::register(&mut r).is_err());
    }
}
