//! nash plugin: synthetic data sources.
//!
//! Every source here is synthesized from the seed given to
//! [`DataSourceConfig::build`](nash_core::data::DataSourceConfig::build) and materialized once as a
//! train and a test split held in memory ([`table`]):
//!
//! - [`mixture`]: Gaussian mixtures with known modes — the PacGAN `ring` (8 modes on the unit
//!   circle, σ = 0.01) and `grid` (25 modes at {-4,-2,0,2,4}², σ = 0.05) benchmarks, and general
//!   `gaussian_mixture` blobs. They expose their [`Mixture`](nash_core::data::Mixture) and label each
//!   sample with its mode, for mode-coverage metrics.
//! - [`vectors`]: `random_vectors`, i.i.d. uniform or normal vectors.
//! - [`manifold`]: `latent_manifold`, pixel-like data on a low-dimensional nonlinear manifold that an
//!   autoencoder can compress.

pub mod manifold;
pub mod mixture;
pub mod table;
pub mod vectors;

use nash_core::registry::Registry;
use serde::{Deserialize, Serialize};

pub use manifold::LatentManifoldConfig;
pub use mixture::{GaussianMixtureConfig, GridConfig, RingConfig};
pub use vectors::{RandomVectorsConfig, VectorDistribution};

nash_core::declare_plugin!(register);

/// Registers every type this plugin brings.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.data::<RingConfig>("PacGAN 2D ring: 8 Gaussian modes on the unit circle, sigma 0.01, labelled by mode")?;
    registry
        .data::<GridConfig>("PacGAN 2D grid: 25 Gaussian modes at {-4,-2,0,2,4}^2, sigma 0.05, labelled by mode")?;
    registry.data::<GaussianMixtureConfig>(
        "Gaussian blobs: given centers, or seeded random centers (count, dim, spread), common sigma",
    )?;
    registry.data::<RandomVectorsConfig>("i.i.d. uniform or normal random vectors of a given dimension")?;
    registry.data::<LatentManifoldConfig>(
        "pixel-like data on a k-dimensional manifold: N(0, I_k) through a fixed random tanh network and a sigmoid",
    )?;
    Ok(())
}

/// The value range of bounded sources: `unit` = [0, 1], `symmetric` = [-1, 1].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// Values in [0, 1], like pixel intensities.
    #[default]
    Unit,
    /// Values in [-1, 1], matching a tanh generator output.
    Symmetric,
}

impl Scale {
    /// The `(low, high)` bounds.
    pub fn range(self) -> (f32, f32) {
        match self {
            Scale::Unit => (0.0, 1.0),
            Scale::Symmetric => (-1.0, 1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use nash_core::registry::{Kind, Registry};

    #[test]
    fn registers_every_source_with_its_fields() {
        let mut registry = Registry::new();
        super::register(&mut registry).unwrap();
        assert_eq!(
            registry.tags(Kind::Data),
            vec!["gaussian_mixture", "grid", "latent_manifold", "random_vectors", "ring"]
        );
        let ring = registry.find(Kind::Data, "ring").unwrap();
        let sigma = ring.fields.iter().find(|f| f.name == "sigma").unwrap();
        assert_eq!(sigma.default, nash_core::serde_json::json!(0.01));
    }
}
