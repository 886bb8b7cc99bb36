//! nash plugin: stabilization techniques for adversarial and autoencoder training.

use nash_core::registry::Registry;

nash_core::declare_plugin!(register);

/// Registers every type this plugin brings.
pub fn register(_registry: &mut Registry) -> nash_core::Result<()> {
    Ok(())
}
