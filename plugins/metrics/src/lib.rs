//! nash plugin: evaluation metrics.
//!
//! - [`coverage`]: `mode_coverage`, the PacGAN mode-collapse protocol on Gaussian-mixture data
//!   (modes captured, share of high-quality samples, reverse KL over modes).
//! - [`reconstruction`]: `reconstruction_error`, mean squared and mean absolute error of an
//!   autoencoder's reconstructions over a whole split.

pub mod coverage;
pub mod reconstruction;

use nash_core::registry::Registry;

pub use coverage::{ModeCoverage, ModeCoverageConfig};
pub use reconstruction::{ReconstructionError, ReconstructionErrorConfig};

nash_core::declare_plugin!(register);

/// Registers every type this plugin brings.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.metric::<ModeCoverageConfig>(
        "PacGAN mode coverage on mixture data: modes captured, high-quality share, reverse KL over modes",
    )?;
    registry.metric::<ReconstructionErrorConfig>(
        "mean squared and mean absolute reconstruction error of an autoencoder over a data split",
    )?;
    Ok(())
}
