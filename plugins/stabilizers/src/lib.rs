//! nash plugin: stabilization techniques for adversarial and autoencoder training.
//!
//! The catalog is organised by the hook a technique acts through, one module per family:
//!
//! - [`clipping`]: parameter and gradient bounds — `weight_clipping` (WGAN, after each update) and
//!   `gradient_norm_clipping` (global L2 norm, before each update).
//! - [`penalty`]: exact gradient penalties on the critic's input gradient — WGAN-GP, R1, R2, DRAGAN.
//! - [`regularization`]: L2 regularization and decoupled weight decay.
//! - [`labels`]: target transforms — one-sided label smoothing, label flipping and noise.
//! - [`noise`]: instance noise with an annealed σ.
//! - [`averaging`]: EMA of the generator's weights (used for evaluation and sampling) and
//!   historical averaging.
//! - [`spectral`]: spectral normalization of chosen layers' weights (power iteration).
//! - [`batch_layers`]: layers that look across the batch — PacGAN packing, minibatch
//!   discrimination, the minibatch standard-deviation feature.
//! - [`augment`]: differentiable augmentation (DiffAugment) and the adaptive augmentation
//!   controller (ADA).
//! - [`consistency`]: consistency regularization (bCR).
//! - [`lecam`]: LeCam regularization.
//! - [`schedule`]: the update schedule — unrolled discriminator steps, an adaptive
//!   discriminator/generator step ratio, BEGAN-style equilibrium control.
//! - [`selection`]: which fakes the generator learns from — top-k training.
//! - [`scope`]: what every stabilizer here shares — the `kind@group` naming convention, group
//!   checks, and the table of techniques that cannot act on the same parameter group, with the reason.
//!
//! New techniques go in the module of their family, register in that module's `register`, and add
//! their incompatibilities to [`scope::CONFLICTS`].

pub mod augment;
pub mod averaging;
pub mod batch_layers;
pub mod clipping;
pub mod consistency;
pub mod labels;
pub mod lecam;
pub mod noise;
pub mod penalty;
pub mod regularization;
pub mod schedule;
pub mod scope;
pub mod selection;
pub mod spectral;
#[cfg(test)]
pub(crate) mod testutil;

use nash_core::registry::Registry;

pub use clipping::{GradientNormClipping, GradientNormClippingConfig, WeightClipping, WeightClippingConfig};

nash_core::declare_plugin!(register);

/// Registers every type this plugin brings.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.stabilizer::<WeightClippingConfig>(
        "WGAN weight clipping: clamp a group's weights and biases to [-clip, clip] after each update",
    )?;
    registry.stabilizer::<GradientNormClippingConfig>(
        "rescale a group's gradients so their global L2 norm is at most max_norm (clip_grad_norm_)",
    )?;
    penalty::register(registry)?;
    regularization::register(registry)?;
    labels::register(registry)?;
    noise::register(registry)?;
    averaging::register(registry)?;
    spectral::register(registry)?;
    batch_layers::register(registry)?;
    augment::register(registry)?;
    consistency::register(registry)?;
    lecam::register(registry)?;
    schedule::register(registry)?;
    selection::register(registry)?;
    Ok(())
}
