//! nash plugin: stabilization techniques for adversarial and autoencoder training.
//!
//! The catalog is organised by the hook a technique acts through, one module per family:
//!
//! - [`clipping`]: parameter and gradient bounds — `weight_clipping` (WGAN, after each update) and
//!   `gradient_norm_clipping` (global L2 norm, before each update).
//! - [`scope`]: what every stabilizer here shares — the `kind@group` naming convention and the table
//!   of techniques that cannot act on the same parameter group, with the reason.
//!
//! New techniques go in the module of their family (penalties, normalizations, averaging, input
//! and label transforms), register below, and add their incompatibilities to
//! [`scope::CONFLICTS`].

pub mod clipping;
pub mod scope;

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
    Ok(())
}
