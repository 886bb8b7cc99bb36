//! nash plugin: evaluation metrics.
//!
//! - [`coverage`]: `mode_coverage`, the PacGAN mode-collapse protocol on Gaussian-mixture data
//!   (modes captured, share of high-quality samples, reverse KL over modes).
//! - [`classifier`]: the `classifier` model (softmax cross-entropy on labelled data), nash's own
//!   feature network for sample-quality metrics (`nash features build` trains it).
//! - [`reconstruction`]: `reconstruction_error`, mean squared and mean absolute error, PSNR and (for
//!   images) SSIM of an autoencoder's reconstructions over a whole split.
//! - [`image_similarity`]: PSNR and SSIM (Wang et al. 2004, scikit-image's Gaussian-window convention).
//! - [`likelihood`]: `elbo`, a VAE's negative ELBO, its reconstruction and KL terms, and bits per
//!   dimension over a whole split.
//! - [`codebook`]: `codebook_usage`, a VQ-VAE's codebook perplexity and codes used over a whole split.
//! - [`scores`]: the numerical core of the image sample-quality scores as pure functions on
//!   feature matrices (FID, KID, improved precision/recall, classifier score, PSD matrix square root).
//! - [`feature_network`]: loading a cached, checksum-verified feature network (`nash features build`).
//! - [`sample_quality`]: `sample_quality`, FID, KID, precision/recall and classifier score of samples
//!   on a feature network's features.

pub mod classifier;
pub mod codebook;
pub mod coverage;
pub mod feature_network;
pub mod image_similarity;
pub mod likelihood;
pub mod reconstruction;
pub mod sample_quality;
pub mod scores;

use nash_core::data::{DataSource, Split};
use nash_core::error::{Error, Result};
use nash_core::registry::Registry;
use serde::{Deserialize, Serialize};

pub use classifier::{Classifier, ClassifierConfig};
pub use codebook::{CodebookUsage, CodebookUsageConfig};
pub use coverage::{ModeCoverage, ModeCoverageConfig};
pub use likelihood::{Elbo, ElboConfig};
pub use reconstruction::{ReconstructionError, ReconstructionErrorConfig};
pub use sample_quality::{SampleQuality, SampleQualityConfig};

nash_core::declare_plugin!(register);

/// The config of a metric measured over one whole data split in batches (`reconstruction_error`,
/// `elbo`, `codebook_usage`): those configs wrap it transparently, so their pipeline format is
/// exactly these two fields, both optional, and nothing else.
///
/// ```toml
/// split = "test"      # or "train"
/// batch_size = 256
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitConfig {
    /// The split to measure on.
    pub split: Split,
    /// Samples per batch.
    pub batch_size: usize,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            split: Split::Test,
            batch_size: 256,
        }
    }
}

impl SplitConfig {
    /// Checks the config of metric `metric` (its tag): `batch_size` must be at least 1
    /// (`metrics.<metric>.batch_size`).
    pub fn check(&self, metric: &str) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config(
                format!("metrics.{metric}.batch_size"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Refuses to measure metric `metric` (its tag) on an empty `split` of `data`.
pub fn require_split(metric: &str, data: &dyn DataSource, split: Split) -> Result<()> {
    if data.len(split) == 0 {
        return Err(Error::unsupported(
            format!("the `{metric}` metric"),
            format!("the {split:?} split of `{}` is empty", data.describe()),
        ));
    }
    Ok(())
}

/// Registers every type this plugin brings.
pub fn register(registry: &mut Registry) -> nash_core::Result<()> {
    registry.model::<ClassifierConfig>(
        "softmax classifier on labelled data; the feature network of FID, KID, precision/recall and classifier score",
    )?;
    registry.metric::<ModeCoverageConfig>(
        "PacGAN mode coverage on mixture data: modes captured, high-quality share, reverse KL over modes",
    )?;
    registry.metric::<ReconstructionErrorConfig>(
        "mean squared and mean absolute reconstruction error, PSNR and (images) SSIM of an autoencoder over a data split",
    )?;
    registry.metric::<ElboConfig>(
        "negative ELBO (nats per sample), its reconstruction and KL terms and bits per dimension of a VAE over a data split",
    )?;
    registry.metric::<CodebookUsageConfig>(
        "codebook perplexity, codes used and code assignments of a VQ-VAE over a whole data split",
    )?;
    registry.metric::<SampleQualityConfig>(
        "FID, KID, precision/recall and classifier score of samples on a cached feature network (`nash features build`)",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use nash_core::registry::{Kind, Registry};

    #[test]
    fn registers_the_classifier_model_and_every_metric() {
        let mut registry = Registry::new();
        super::register(&mut registry).unwrap();
        assert_eq!(registry.tags(Kind::Model), vec!["classifier"]);
        assert_eq!(
            registry.tags(Kind::Metric),
            vec![
                "codebook_usage",
                "elbo",
                "mode_coverage",
                "reconstruction_error",
                "sample_quality"
            ]
        );
        let coverage = registry.find(Kind::Metric, "mode_coverage").unwrap();
        assert!(coverage.fields.iter().any(|f| f.name == "threshold_sigmas"));
    }

    #[test]
    fn split_configs_keep_their_format_and_error_paths() {
        use nash_core::metric::MetricConfig;
        use nash_core::serde_json::{self, json};
        for tag in ["reconstruction_error", "elbo", "codebook_usage"] {
            // Both fields are optional, with the defaults test / 256, and serialize flat beside the tag.
            let config: Box<dyn MetricConfig> = serde_json::from_value(json!({"type": tag})).unwrap();
            assert_eq!(
                serde_json::to_value(&config).unwrap(),
                json!({"type": tag, "split": "test", "batch_size": 256})
            );
            let config: Box<dyn MetricConfig> =
                serde_json::from_value(json!({"type": tag, "split": "train", "batch_size": 8})).unwrap();
            assert_eq!(
                serde_json::to_value(&config).unwrap(),
                json!({"type": tag, "split": "train", "batch_size": 8})
            );
            // Unknown fields are refused, naming them.
            let err = serde_json::from_value::<Box<dyn MetricConfig>>(json!({"type": tag, "batchsize": 8}))
                .unwrap_err()
                .to_string();
            assert!(err.contains("batchsize"), "{err}");
            // A zero batch size is refused at build time with the config path.
            let zero: Box<dyn MetricConfig> = serde_json::from_value(json!({"type": tag, "batch_size": 0})).unwrap();
            let err = zero.build().err().unwrap().to_string();
            assert!(err.contains(&format!("metrics.{tag}.batch_size")), "{err}");
        }
    }
}

/// Tiny fake models and data sets for the unit tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use std::collections::BTreeMap;

    use nash_core::data::{Batch, DataInfo, DataSource, Mixture, Split};
    use nash_core::error::{Error, Result};
    use nash_core::model::{EvalContext, Model, StepReport, TrainContext};
    use nash_core::prelude::HasShape;
    use nash_core::tensor::{matrix_from_vec, Device, FeatureShape, Matrix, Param, Parameterized};

    /// A data set of `dim`-feature rows: the test split holds all of `rows`, the train split the
    /// first half of them (rounded up); optionally with a mixture.
    pub struct FakeData {
        pub rows: Vec<f32>,
        pub dim: usize,
        pub mixture: Option<Mixture>,
    }

    impl FakeData {
        /// Rows without a mixture.
        pub fn plain(rows: Vec<f32>, dim: usize) -> Self {
            FakeData {
                rows,
                dim,
                mixture: None,
            }
        }
        /// A mixture's centers as the rows.
        pub fn mixture(m: Mixture) -> Self {
            FakeData {
                rows: m.centers.concat(),
                dim: m.centers[0].len(),
                mixture: Some(m),
            }
        }
    }

    impl DataSource for FakeData {
        fn describe(&self) -> String {
            "fake data".into()
        }
        fn info(&self) -> DataInfo {
            DataInfo {
                sample_shape: FeatureShape::Flat(self.dim),
                num_classes: None,
                value_range: (-10.0, 10.0),
            }
        }
        fn len(&self, split: Split) -> usize {
            let n = self.rows.len() / self.dim;
            match split {
                Split::Test => n,
                Split::Train => n.div_ceil(2),
            }
        }
        fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
            let mut values = Vec::new();
            for &i in indices {
                if i >= self.len(split) {
                    return Err(Error::Other(format!("index {i} out of range")));
                }
                values.extend_from_slice(&self.rows[i * self.dim..(i + 1) * self.dim]);
            }
            Ok(Batch {
                inputs: matrix_from_vec(device, values, indices.len(), self.dim)?,
                shape: FeatureShape::Flat(self.dim),
                labels: None,
            })
        }
        fn mixture(&self) -> Option<&Mixture> {
            self.mixture.as_ref()
        }
    }

    type Recon = fn(&[f32]) -> Vec<f32>;

    /// A model without parameters that either samples by cycling through fixed rows, or
    /// reconstructs each row with a fixed function.
    pub struct FakeModel {
        pattern: Vec<f32>,
        dim: usize,
        cursor: usize,
        recon: Option<Recon>,
        pub sample_calls: Vec<usize>,
        pub reconstructed_rows: usize,
    }

    impl FakeModel {
        /// Samples cycle through the rows of `pattern` (continuing across calls).
        pub fn sampler(pattern: Vec<f32>, dim: usize) -> Self {
            FakeModel {
                pattern,
                dim,
                cursor: 0,
                recon: None,
                sample_calls: Vec::new(),
                reconstructed_rows: 0,
            }
        }
        /// Reconstructs each row `x` as `f(x)`; cannot sample.
        pub fn reconstructor(f: Recon) -> Self {
            FakeModel {
                recon: Some(f),
                ..Self::sampler(Vec::new(), 1)
            }
        }
    }

    impl Parameterized for FakeModel {
        fn named_params(&self) -> Vec<(String, &Param)> {
            Vec::new()
        }
        fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
            Vec::new()
        }
    }

    impl Model for FakeModel {
        fn family(&self) -> &str {
            "fake"
        }
        fn describe(&self) -> String {
            "fake model".into()
        }
        fn param_groups(&self) -> Vec<String> {
            Vec::new()
        }
        fn train_step(&mut self, _batch: &Batch, _ctx: &mut TrainContext<'_>) -> Result<StepReport> {
            Err(Error::unsupported("training", "fake model"))
        }
        fn evaluate(&mut self, _batch: &Batch, _ctx: &mut EvalContext<'_>) -> Result<BTreeMap<String, f64>> {
            Ok(BTreeMap::new())
        }
        fn sample(&mut self, n: usize, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
            if self.recon.is_some() {
                return Ok(None);
            }
            self.sample_calls.push(n);
            let rows = self.pattern.len() / self.dim;
            let mut values = Vec::with_capacity(n * self.dim);
            for _ in 0..n {
                let r = self.cursor % rows;
                values.extend_from_slice(&self.pattern[r * self.dim..(r + 1) * self.dim]);
                self.cursor += 1;
            }
            Ok(Some(matrix_from_vec(ctx.device, values, n, self.dim)?))
        }
        fn reconstruct(&mut self, batch: &Batch, ctx: &mut EvalContext<'_>) -> Result<Option<Matrix>> {
            let Some(f) = self.recon else {
                return Ok(None);
            };
            let (rows, cols) = *batch.inputs.shape();
            self.reconstructed_rows += rows;
            let out: Vec<f32> = batch.inputs.as_vec().chunks(cols).flat_map(f).collect();
            let out_cols = out.len().checked_div(rows).unwrap_or(cols);
            Ok(Some(matrix_from_vec(ctx.device, out, rows, out_cols)?))
        }
    }
}
