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
    /// The layer's name within a network, if it has one (`conv1`); used by stabilizers that
    /// select layers by pattern.
    fn name(&self) -> Option<&str> {
        None
    }
}

/// Serializable description of a layer; `type = "linear"` etc. in pipeline files.
#[typetag::serde(tag = "type")]
pub trait LayerConfig: std::fmt::Debug {
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

pub use sequential::{Sequential, SequentialConfig};

/// Registers the layer types of nash-core.
pub fn register(_registry: &mut crate::registry::Registry) -> Result<()> {
    Ok(())
}
