//! (being written)

use nash_core::registry::Registry;

/// Registers this module's types.
pub fn register(_registry: &mut Registry) -> nash_core::Result<()> {
    Ok(())
}
