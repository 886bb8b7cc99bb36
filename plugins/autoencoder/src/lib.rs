//! nash plugin: the autoencoder family.
//!
//! Brings the model `dense_autoencoder` ([`DenseAutoencoderConfig`]): an encoder and a decoder of
//! runtime-shaped layers trained on reconstruction, one parameter group `model`.

use nash_core::registry::Registry;

pub mod dense;

pub use dense::{DenseAutoencoder, DenseAutoencoderConfig};

nash_core::declare_plugin!(register);

/// Registers every type this plugin brings.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.model::<DenseAutoencoderConfig>(
        "dense autoencoder: encoder and decoder layer stacks trained to reconstruct their input \
         (default: the reference 784-128-64-16 / 16-64-784 ReLU network with a sigmoid output, MSE)",
    )?;
    Ok(())
}
