//! Optimizers and learning-rate schedules, owned by nash so their state checkpoints.
//!
//! dfdx's optimizers are `!Send`, keep private state and need compile-time model types; nash's
//! work on named flat [`Param`]s and expose their state as a [`StateDict`] keyed by parameter name.

use crate::error::Result;
use crate::state::StateDict;
use crate::tensor::{Grads, Param};

/// Updates parameters from their gradients.
pub trait Optimizer {
    /// The optimizer's name in logs (`adam`).
    fn name(&self) -> &str;
    /// One update of every trainable parameter in `params` that has a gradient in `grads`
    /// (parameters without one are left untouched, and their state is not advanced).
    fn step(&mut self, params: &mut [(String, &mut Param)], grads: &mut Grads) -> Result<()>;
    /// The learning rate the next step will use (after the schedule and any scaling).
    fn learning_rate(&self) -> f64;
    /// Multiplies the scheduled learning rate by `factor` from now on (used by rollback policies
    /// and two-time-scale rules). Factors compose multiplicatively.
    fn scale_learning_rate(&mut self, factor: f64);
    /// Everything needed to resume exactly: moments, step counts, scale.
    fn state(&self) -> StateDict;
    /// Restores [`Optimizer::state`].
    fn load_state(&mut self, state: &StateDict) -> Result<()>;
}

/// Serializable description of an [`Optimizer`]; `type = "adam"` in pipeline files.
#[typetag::serde(tag = "type")]
pub trait OptimizerConfig: std::fmt::Debug + Send + Sync {
    /// Builds the optimizer.
    fn build(&self) -> Result<Box<dyn Optimizer>>;
}

pub mod adam;
pub mod common;
pub mod rmsprop;
pub mod schedule;
pub mod sgd;
#[cfg(test)]
mod tests;

pub use adam::{Adam, AdamConfig, AdamWConfig};
pub use common::{with_gradient, LearningRate, ParamState, ParamStates};
pub use rmsprop::{RmsProp, RmsPropConfig};
pub use schedule::Schedule;
pub use sgd::{Sgd, SgdConfig};

/// Registers the optimizers of nash-core.
pub fn register(registry: &mut crate::registry::Registry) -> Result<()> {
    registry.optimizer::<SgdConfig>("SGD with momentum, Nesterov and weight decay (PyTorch SGD)")?;
    registry.optimizer::<AdamConfig>("Adam with L2 weight decay and optional AMSGrad (PyTorch Adam)")?;
    registry.optimizer::<AdamWConfig>("Adam with decoupled weight decay (PyTorch AdamW)")?;
    registry.optimizer::<RmsPropConfig>("RMSprop with momentum, centering and weight decay (PyTorch RMSprop)")?;
    Ok(())
}
