//! nash plugin: data sources, synthetic and file-backed.
//!
//! Every source is materialized once as a train and a test split held in memory ([`table`]); the
//! trainer's seeded loader shuffles and batches them. Synthetic sources draw from the seed given to
//! [`DataSourceConfig::build`](nash_core::data::DataSourceConfig::build):
//!
//! - [`mixture`]: Gaussian mixtures with known modes — the PacGAN `ring` (8 modes on the unit
//!   circle, σ = 0.01) and `grid` (25 modes at {-4,-2,0,2,4}², σ = 0.05) benchmarks, and general
//!   `gaussian_mixture` blobs. They expose their [`Mixture`](nash_core::data::Mixture) and label each
//!   sample with its mode, for mode-coverage metrics.
//! - [`vectors`]: `random_vectors`, i.i.d. uniform or normal vectors.
//! - [`manifold`]: `latent_manifold`, pixel-like data on a low-dimensional nonlinear manifold that an
//!   autoencoder can compress.
//!
//! File-backed sources (shared preprocessing — scaling, seeded stratified splits, class subsets —
//! in [`preprocess`]):
//!
//! - [`idx`]: `idx`, MNIST-format IDX files, gzipped or raw. `type = "idx"` with its defaults is
//!   Fashion-MNIST from `/usr/share/datasets/fashion-mnist` (`apt-get install dataset-fashion-mnist`).
//! - [`image_folder`]: `image_folder`, PNG/JPEG images in `root/<class>/`, resized, grayscale or RGB.
//! - [`numpy`]: `npy`, NumPy `.npy` arrays and `.npz` archives.
//! - [`csv`]: `csv`, numeric CSV tables with an optional label column.

pub mod csv;
pub mod idx;
pub mod image_folder;
pub mod manifold;
pub mod mixture;
pub mod numpy;
pub mod preprocess;
pub mod table;
#[cfg(test)]
pub(crate) mod testutil;
pub mod vectors;

use nash_core::registry::Registry;
use serde::{Deserialize, Serialize};

pub use csv::{CsvConfig, LabelColumn};
pub use idx::IdxConfig;
pub use image_folder::ImageFolderConfig;
pub use manifold::LatentManifoldConfig;
pub use mixture::{GaussianMixtureConfig, GridConfig, RingConfig};
pub use numpy::NpyConfig;
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
    registry.data::<IdxConfig>(
        "MNIST-format IDX files, gzipped or raw; the defaults read Fashion-MNIST from /usr/share/datasets/fashion-mnist",
    )?;
    registry.data::<ImageFolderConfig>(
        "PNG/JPEG images in root/<class>/, resized, grayscale or RGB, with a seeded stratified test split",
    )?;
    registry.data::<NpyConfig>(
        "NumPy .npy/.npz arrays (f32, f64, u8, i32, i64), optional labels, fixed or seeded test split",
    )?;
    registry.data::<CsvConfig>("numeric CSV table with an optional label column and a seeded test split")?;
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
            vec![
                "csv",
                "gaussian_mixture",
                "grid",
                "idx",
                "image_folder",
                "latent_manifold",
                "npy",
                "random_vectors",
                "ring"
            ]
        );
        let ring = registry.find(Kind::Data, "ring").unwrap();
        let sigma = ring.fields.iter().find(|f| f.name == "sigma").unwrap();
        assert_eq!(sigma.default, nash_core::serde_json::json!(0.01));
        let idx = registry.find(Kind::Data, "idx").unwrap();
        let dir = idx.fields.iter().find(|f| f.name == "dir").unwrap();
        assert_eq!(
            dir.default,
            nash_core::serde_json::json!("/usr/share/datasets/fashion-mnist")
        );
    }
}
