//! TODO(helper): basic losses
/// Registers the basic losses.
pub fn register(_registry: &mut crate::registry::Registry) -> crate::Result<()> {
    Ok(())
}
