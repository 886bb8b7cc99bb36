//! # nash-core: the contract every nash plugin is written against
//!
//! nash trains autoencoders and GANs from pipeline files. Every moving part is a plugin: models,
//! losses, adversarial objectives, optimizers, stabilizers, data sources and metrics. This crate
//! defines those traits ([`model`], [`loss`], [`optim`], [`stabilizer`], [`data`], [`metric`]),
//! the [`registry`] a plugin fills, the binary [`plugin`] ABI the trainer checks before it runs a
//! plugin's code, and the runtime-shaped [`layers`] toolkit and optimizers built on dfdx.
//!
//! `nash-core` is built as a Rust `dylib` and re-exports every third-party crate a plugin needs
//! (dfdx, serde, serde_json, typetag, tracing, rand), so that exactly one copy of each lives in the
//! process: dfdx numbers tensors from a static counter and typetag keeps one registry per copy.
//! Plugins depend on `nash-core` plus `serde` and `typetag` directly (their derive macros expand to
//! those paths), which the linker resolves to this crate's copies.

pub mod data;
pub mod error;
pub mod kernels;
pub mod layers;
pub mod loss;
pub mod metric;
pub mod model;
pub mod optim;
pub mod plugin;
pub mod registry;
pub mod stabilizer;
pub mod state;
pub mod tensor;
pub mod weights;

pub use error::{Error, Result};

// Re-exported so that plugins link these exact copies through the nash-core dylib.
pub use dfdx;
pub use inventory;
pub use rand;
pub use rand_chacha;
pub use rand_distr;
pub use safetensors;
pub use serde;
pub use serde_json;
pub use tracing;
pub use typetag;

/// The names most plugins need, in one import: `use nash_core::prelude::*;`.
pub mod prelude {
    pub use crate::data::{Batch, DataSource, DataSourceConfig, Split};
    pub use crate::error::{Error, Result};
    pub use crate::layers::{Layer, LayerConfig, Sequential};
    pub use crate::loss::{AdversarialObjective, AdversarialObjectiveConfig, Loss, LossConfig};
    pub use crate::metric::{Metric, MetricConfig};
    pub use crate::model::{Model, ModelConfig, StepReport, TrainContext};
    pub use crate::optim::{Optimizer, OptimizerConfig};
    pub use crate::registry::{Kind, Registry};
    pub use crate::stabilizer::{Stabilizer, StabilizerConfig, StabilizerStack};
    pub use crate::state::StateDict;
    pub use crate::tensor::{
        Activation, Device, FeatureShape, Grads, Matrix, Param, ParamRole, Parameterized, Rng, Scalar, Tape, Vector,
    };
    pub use dfdx::prelude::*;
}
