//! `reconstruction_error`: how well an autoencoder reproduces held-out data.
//!
//! Runs [`Model::reconstruct`] over every sample of a split (the test split by default) in order, in
//! batches from [`eval_batches`], and reports, accumulated in f64:
//!
//! - `reconstruction_mse` = mean (x̂ - x)² and `reconstruction_mae` = mean |x̂ - x| over all samples
//!   and features;
//! - `reconstruction_psnr`: the mean over samples of `10 · log10(L² / mse_i)` dB, `mse_i` the
//!   sample's own mean squared error and `L` the width of the data's value range
//!   ([`nash_core::data::DataInfo::value_range`]); a sample reproduced exactly counts as
//!   [`PSNR_CAP_DB`] = 100 dB instead of infinity (see [`crate::image_similarity`]);
//! - `reconstruction_ssim`, for image data (`FeatureShape::Image`) of at least 11x11 pixels only:
//!   the mean over samples and channels of the structural similarity of each channel of the
//!   reconstruction with the original (Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03, data range
//!   `L`, valid windows; scikit-image's `structural_similarity(..., gaussian_weights=True,
//!   sigma=1.5, use_sample_covariance=False, data_range=L)`, see [`crate::image_similarity`]).
//!   Flat data and smaller images report no SSIM.
//!
//! Data whose declared value range has no positive, finite width report MSE and MAE only.
//!
//! ```toml
//! [[metrics]]
//! type = "reconstruction_error"
//! split = "test"      # or "train"
//! batch_size = 256
//! ```

use std::collections::BTreeMap;

use nash_core::data::{eval_batches, DataSource};
use nash_core::error::{Error, Result};
use nash_core::metric::{Metric, MetricConfig};
use nash_core::model::{EvalContext, Model};

#[cfg(doc)]
use crate::image_similarity::PSNR_CAP_DB;
use crate::image_similarity::{psnr, ssim, SSIM_WINDOW};
use nash_core::prelude::HasShape;
use nash_core::tensor::FeatureShape;
use serde::{Deserialize, Serialize};

use crate::{require_split, SplitConfig};

/// Configuration of [`ReconstructionError`]: the split and batch size ([`SplitConfig`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReconstructionErrorConfig(pub SplitConfig);

#[typetag::serde(name = "reconstruction_error")]
impl MetricConfig for ReconstructionErrorConfig {
    fn build(&self) -> Result<Box<dyn Metric>> {
        self.0.check("reconstruction_error")?;
        Ok(Box::new(ReconstructionError { config: *self }))
    }
}

/// Mean squared and mean absolute reconstruction error, PSNR and (for images) SSIM over a split
/// (see the module docs).
#[derive(Clone, Debug)]
pub struct ReconstructionError {
    config: ReconstructionErrorConfig,
}

impl Metric for ReconstructionError {
    fn name(&self) -> &str {
        "reconstruction_error"
    }

    fn evaluate(
        &mut self,
        model: &mut dyn Model,
        data: &dyn DataSource,
        ctx: &mut EvalContext<'_>,
    ) -> Result<BTreeMap<String, f64>> {
        let split = self.config.0.split;
        require_split("reconstruction_error", data, split)?;
        let info = data.info();
        // PSNR and SSIM need a data range of positive width; SSIM also an 11x11 window per channel.
        let range = (info.value_range.1 - info.value_range.0) as f64;
        let range_ok = range.is_finite() && range > 0.0;
        let image = match info.sample_shape {
            FeatureShape::Image {
                channels,
                height,
                width,
            } if range_ok && height >= SSIM_WINDOW && width >= SSIM_WINDOW => Some((channels, height, width)),
            _ => None,
        };
        let (mut squared, mut absolute, mut count) = (0.0f64, 0.0f64, 0usize);
        let (mut psnr_sum, mut ssim_sum, mut samples, mut channels_seen) = (0.0f64, 0.0f64, 0usize, 0usize);
        for batch in eval_batches(data, split, self.config.0.batch_size, ctx.device)? {
            let recon = model.reconstruct(&batch, ctx)?.ok_or_else(|| {
                Error::unsupported(
                    "the `reconstruction_error` metric",
                    format!("the `{}` model cannot reconstruct its inputs", model.family()),
                )
            })?;
            if recon.shape() != batch.inputs.shape() {
                return Err(Error::shape(
                    "reconstruction_error: reconstructions",
                    format!("{:?}, like the inputs", batch.inputs.shape()),
                    format!("{:?}", recon.shape()),
                ));
            }
            let (recon, inputs) = (recon.as_vec(), batch.inputs.as_vec());
            let cols = batch.inputs.shape().1;
            if cols == 0 || cols != info.sample_shape.numel() {
                return Err(Error::shape(
                    "reconstruction_error: data batch",
                    format!(
                        "{} features per sample ({})",
                        info.sample_shape.numel(),
                        info.sample_shape
                    ),
                    cols,
                ));
            }
            for (r_row, x_row) in recon.chunks(cols).zip(inputs.chunks(cols)) {
                let mut sample_squared = 0.0f64;
                for (&r, &x) in r_row.iter().zip(x_row) {
                    let e = r as f64 - x as f64;
                    sample_squared += e * e;
                    absolute += e.abs();
                }
                squared += sample_squared;
                count += cols;
                psnr_sum += psnr(sample_squared / cols as f64, range);
                samples += 1;
                if let Some((channels, height, width)) = image {
                    let plane = height * width;
                    for c in 0..channels {
                        let span = c * plane..(c + 1) * plane;
                        ssim_sum += ssim(&r_row[span.clone()], &x_row[span], height, width, range)?;
                        channels_seen += 1;
                    }
                }
            }
        }
        let mut out = BTreeMap::new();
        out.insert("reconstruction_mse".into(), squared / count as f64);
        out.insert("reconstruction_mae".into(), absolute / count as f64);
        if range_ok {
            out.insert("reconstruction_psnr".into(), psnr_sum / samples as f64);
        }
        if image.is_some() {
            out.insert("reconstruction_ssim".into(), ssim_sum / channels_seen as f64);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests_support::{FakeData, FakeModel};
    use nash_core::data::Split;
    use nash_core::rand::SeedableRng;
    use nash_core::tensor::{Device, Rng};

    fn run(cfg: ReconstructionErrorConfig, model: &mut FakeModel, data: &FakeData) -> Result<BTreeMap<String, f64>> {
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        cfg.build()?.evaluate(model, data, &mut ctx)
    }

    #[test]
    fn errors_over_the_whole_test_split_by_hand() {
        // Five test samples of two features; the fake model reconstructs every input as 0, so the
        // errors are the inputs themselves:
        // mse = (1 + 4 + 0 + 1 + 9 + 16 + 0.25 + 0.25 + 4 + 0) / 10 = 3.55
        // mae = (1 + 2 + 0 + 1 + 3 + 4 + 0.5 + 0.5 + 2 + 0) / 10 = 1.4
        let test = vec![1.0, -2.0, 0.0, 1.0, 3.0, -4.0, 0.5, -0.5, 2.0, 0.0];
        let data = FakeData::plain(test, 2);
        let mut model = FakeModel::reconstructor(|x| vec![0.0; x.len()]);
        // Batches of 2: 2 + 2 + 1 samples; every sample counts once.
        let cfg = ReconstructionErrorConfig(SplitConfig {
            batch_size: 2,
            ..Default::default()
        });
        let m = run(cfg, &mut model, &data).unwrap();
        assert!((m["reconstruction_mse"] - 3.55).abs() < 1e-9, "{m:?}");
        assert!((m["reconstruction_mae"] - 1.4).abs() < 1e-9, "{m:?}");
        assert_eq!(model.reconstructed_rows, 5);
        // A perfect reconstruction scores 0; the train split is measured when asked.
        let mut identity = FakeModel::reconstructor(|x| x.to_vec());
        let m = run(ReconstructionErrorConfig::default(), &mut identity, &data).unwrap();
        assert_eq!(m["reconstruction_mse"], 0.0);
        let mut shift = FakeModel::reconstructor(|x| x.iter().map(|v| v + 0.5).collect());
        let train = ReconstructionErrorConfig(SplitConfig {
            split: Split::Train,
            ..Default::default()
        });
        let m = run(train, &mut shift, &data).unwrap();
        assert!((m["reconstruction_mse"] - 0.25).abs() < 1e-9 && (m["reconstruction_mae"] - 0.5).abs() < 1e-9);
        assert_eq!(shift.reconstructed_rows, 3);
    }

    #[test]
    fn psnr_per_sample_on_flat_data_and_no_ssim() {
        // FakeData's range is (-10, 10): L = 20. Reconstructing as 0, the samples' own MSEs are
        // (1 + 4) / 2 = 2.5, 0.5, 12.5, 0.25 and 2, so
        // psnr = mean_i 10 log10(400 / mse_i)
        //      = (22.0412 + 29.0309 + 15.0515 + 32.0412 + 23.0103) / 5 = 24.23502...
        // python: np.mean(10 * np.log10(400 / np.array([2.5, 0.5, 12.5, 0.25, 2])))  # 24.235019852575363
        let data = FakeData::plain(vec![1.0, -2.0, 0.0, 1.0, 3.0, -4.0, 0.5, -0.5, 2.0, 0.0], 2);
        let mut zero = FakeModel::reconstructor(|x| vec![0.0; x.len()]);
        let m = run(ReconstructionErrorConfig::default(), &mut zero, &data).unwrap();
        assert!(
            (m["reconstruction_psnr"] - 24.235_019_852_575_363).abs() < 1e-9,
            "{m:?}"
        );
        assert!(!m.contains_key("reconstruction_ssim"), "flat data have no SSIM: {m:?}");
        // A perfect reconstruction is capped at 100 dB rather than infinite.
        let mut identity = FakeModel::reconstructor(|x| x.to_vec());
        let m = run(ReconstructionErrorConfig::default(), &mut identity, &data).unwrap();
        assert_eq!(m["reconstruction_psnr"], crate::image_similarity::PSNR_CAP_DB);
    }

    /// Two 2-channel 16x16 images in [0, 1]: sample 0 is (x, y), sample 1 is (y, x), with x and y
    /// the pinned pair of [`crate::image_similarity`]'s tests.
    struct TwoImages;

    impl DataSource for TwoImages {
        fn describe(&self) -> String {
            "two images".into()
        }
        fn info(&self) -> nash_core::data::DataInfo {
            nash_core::data::DataInfo {
                sample_shape: FeatureShape::image(2, 16, 16),
                num_classes: None,
                value_range: (0.0, 1.0),
            }
        }
        fn len(&self, _split: Split) -> usize {
            2
        }
        fn batch(&self, _split: Split, indices: &[usize], device: &Device) -> Result<nash_core::data::Batch> {
            let (x, y) = crate::image_similarity::tests::pair();
            let mut values = Vec::new();
            for &i in indices {
                let (a, b) = if i == 0 { (&x, &y) } else { (&y, &x) };
                values.extend_from_slice(a);
                values.extend_from_slice(b);
            }
            Ok(nash_core::data::Batch {
                inputs: nash_core::tensor::matrix_from_vec(device, values, indices.len(), 512)?,
                shape: FeatureShape::image(2, 16, 16),
                labels: None,
            })
        }
    }

    #[test]
    fn psnr_and_ssim_on_images_match_scikit_image() {
        // Reconstructing each sample with its channels swapped compares x with y in every channel
        // of every sample, so the means are the scikit-image values pinned in image_similarity.rs:
        // SSIM(x, y, L = 1) = 0.8581831186856289 and PSNR = 23.4587348105909 dB.
        let mut swap = FakeModel::reconstructor(|x| [&x[256..], &x[..256]].concat());
        let cfg = ReconstructionErrorConfig(SplitConfig {
            batch_size: 1,
            ..Default::default()
        });
        let device = Device::default();
        let mut rng = Rng::seed_from_u64(0);
        let mut ctx = EvalContext {
            device: &device,
            rng: &mut rng,
        };
        let m = cfg.build().unwrap().evaluate(&mut swap, &TwoImages, &mut ctx).unwrap();
        assert!(
            (m["reconstruction_ssim"] - 0.858_183_118_685_628_9).abs() < 1e-9,
            "{m:?}"
        );
        assert!((m["reconstruction_psnr"] - 23.458_734_810_590_9).abs() < 1e-9, "{m:?}");
        let mut identity = FakeModel::reconstructor(|x| x.to_vec());
        let m = cfg
            .build()
            .unwrap()
            .evaluate(&mut identity, &TwoImages, &mut ctx)
            .unwrap();
        assert!((m["reconstruction_ssim"] - 1.0).abs() < 1e-12, "{m:?}");
    }

    #[test]
    fn models_that_cannot_reconstruct_are_refused() {
        let data = FakeData::plain(vec![1.0, 2.0], 2);
        let mut model = FakeModel::sampler(vec![0.0, 0.0], 2);
        let err = run(ReconstructionErrorConfig::default(), &mut model, &data).unwrap_err();
        assert!(err.to_string().contains("cannot reconstruct"), "{err}");
        let mut wrong = FakeModel::reconstructor(|x| x[..1].to_vec());
        let err = run(ReconstructionErrorConfig::default(), &mut wrong, &data).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        let zero = ReconstructionErrorConfig(SplitConfig {
            batch_size: 0,
            ..Default::default()
        });
        assert!(matches!(zero.build(), Err(Error::Config { .. })));
    }
}
