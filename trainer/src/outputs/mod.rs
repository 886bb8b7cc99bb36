//! Pictures written during training into `<run>/samples/`, beside the JSON rows of samples:
//!
//! - `step-XXXXXXXX.png`: a near-square grid of generated samples, for image-shaped data
//!   (`FeatureShape::Image` with 1 or 3 channels: grayscale or RGB). Flat samples whose size is a
//!   perfect square `s²` with `s ≥ 4` (784 -> 28x28) are drawn as `s`x`s` grayscale images too: flat
//!   data of that size is almost always a flattened square image, and a wrong guess only costs a
//!   picture. Other flat sizes get no grid.
//! - `reconstructions-step-XXXXXXXX.png`: for models that reconstruct (autoencoders), the first
//!   samples of the test split (the same ones every time) in a row with their reconstructions in
//!   the row below, pair after pair, for image-shaped data as above.
//! - `scatter-step-XXXXXXXX.png`: for 2-D samples (`FeatureShape::Flat(2)`), the generated points
//!   over the data's mixture modes (with 3σ circles) or, without a known mixture, over real points;
//!   the axes are fixed from the data so the frames of a run compare.
//!
//! Values map from the data's `value_range` to 0..255, clamped ([`grid::to_byte`]).
//!
//! [`curves`] draws the line plots of `metrics.jsonl` into `<run>/curves/`.

pub mod curves;
pub mod grid;
pub mod scatter;

use std::path::{Path, PathBuf};

use anyhow::Context;
use nash_core::data::{DataSource, Mixture, Split};
use nash_core::tensor::{Device, FeatureShape};
use nash_core::tracing;

pub use grid::{grid_layout, to_byte, Canvas, TileShape};
pub use scatter::{Backdrop, Limits};

/// Padding between grid tiles, in pixels.
pub const PAD: usize = 2;
/// Width and height of scatter plots, in pixels.
pub const SCATTER_SIZE: u32 = 600;
/// Real points drawn under a scatter plot when the data has no known mixture.
pub const REFERENCE_POINTS: usize = 2000;
/// Smallest side of a square flat sample drawn as an image.
pub const MIN_SQUARE_SIDE: usize = 4;

/// How a data set's samples are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleView {
    /// As image tiles of this shape.
    Images(TileShape),
    /// As points of a 2-D scatter plot.
    Scatter,
    /// Not drawn.
    Nothing,
}

/// How samples of `shape` are drawn: images with 1 or 3 channels as tiles, flat `s²` values with
/// `s ≥` [`MIN_SQUARE_SIDE`] as `s`x`s` grayscale tiles, 2 values as scatter points, else nothing.
pub fn sample_view(shape: &FeatureShape) -> SampleView {
    match *shape {
        FeatureShape::Image {
            channels,
            height,
            width,
        } if matches!(channels, 1 | 3) && height > 0 && width > 0 => SampleView::Images(TileShape {
            channels,
            height,
            width,
        }),
        FeatureShape::Image { .. } => SampleView::Nothing,
        FeatureShape::Flat(2) => SampleView::Scatter,
        FeatureShape::Flat(n) => match exact_sqrt(n) {
            Some(s) if s >= MIN_SQUARE_SIDE => SampleView::Images(TileShape {
                channels: 1,
                height: s,
                width: s,
            }),
            _ => SampleView::Nothing,
        },
    }
}

/// `s` with `s * s == n`, if there is one.
fn exact_sqrt(n: usize) -> Option<usize> {
    let mut s = (n as f64).sqrt() as usize;
    while s * s > n {
        s -= 1;
    }
    while (s + 1) * (s + 1) <= n {
        s += 1;
    }
    (s * s == n).then_some(s)
}

/// The path of the sample grid for `step`.
pub fn grid_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}.png"))
}
/// The path of the reconstruction pairs for `step`.
pub fn reconstructions_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("reconstructions-step-{step:08}.png"))
}
/// The path of the scatter plot for `step`.
pub fn scatter_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("scatter-step-{step:08}.png"))
}

/// What a run needs to draw its pictures, fixed when training starts so every frame uses the same
/// axes, value range and backdrop.
#[derive(Clone, Debug)]
pub struct Pictures {
    view: SampleView,
    range: (f32, f32),
    mixture: Option<Mixture>,
    reference: Vec<[f32; 2]>,
    limits: Option<Limits>,
    warned: bool,
}

impl Pictures {
    /// Reads the sample shape, value range and (for 2-D data) the mixture or a sample of real
    /// training points from `data`.
    pub fn new(data: &dyn DataSource, device: &Device) -> anyhow::Result<Self> {
        let info = data.info();
        let view = sample_view(&info.sample_shape);
        let mut mixture = None;
        let mut reference = Vec::new();
        let mut limits = None;
        if view == SampleView::Scatter {
            mixture = data
                .mixture()
                .filter(|m| m.centers.iter().any(|c| c.len() >= 2))
                .cloned();
            limits = mixture.as_ref().and_then(Limits::for_mixture);
            if limits.is_none() {
                let n = data.len(Split::Train).min(REFERENCE_POINTS);
                let idx: Vec<usize> = (0..n).collect();
                if n > 0 {
                    let batch = data
                        .batch(Split::Train, &idx, device)
                        .context("cannot read real points for the scatter plots")?;
                    reference = batch.inputs.as_vec().chunks_exact(2).map(|p| [p[0], p[1]]).collect();
                }
                limits = Limits::for_points(&reference);
            }
        }
        Ok(Pictures {
            view,
            range: info.value_range,
            mixture,
            reference,
            limits,
            warned: false,
        })
    }

    /// How samples are drawn.
    pub fn view(&self) -> SampleView {
        self.view
    }

    /// The scatter plot axes (2-D data with a mixture or real points only).
    pub fn limits(&self) -> Option<Limits> {
        self.limits
    }

    fn warn_once(&mut self, what: String) {
        if !self.warned {
            tracing::warn!("{what}; no pictures are drawn");
            self.warned = true;
        }
    }

    /// Draws generated `samples` (`features` values per row) for `step` into `dir`: a grid or a
    /// scatter plot, whichever the data's shape calls for. Returns the file written.
    pub fn write_samples(
        &mut self,
        dir: &Path,
        step: u64,
        samples: &[f32],
        features: usize,
    ) -> anyhow::Result<Option<PathBuf>> {
        match self.view {
            SampleView::Images(tile) => {
                if features != tile.numel() {
                    self.warn_once(format!(
                        "the model samples {features} values per row, the data's {}x{}x{} images have {}",
                        tile.channels,
                        tile.height,
                        tile.width,
                        tile.numel()
                    ));
                    return Ok(None);
                }
                let path = grid_path(dir, step);
                grid::sample_grid(samples, tile, self.range, PAD)?.write_png(&path)?;
                Ok(Some(path))
            }
            SampleView::Scatter => {
                let Some(limits) = self.limits else { return Ok(None) };
                if features != 2 {
                    self.warn_once(format!("the model samples {features} values per row, the data has 2"));
                    return Ok(None);
                }
                let points: Vec<[f32; 2]> = samples.chunks_exact(2).map(|p| [p[0], p[1]]).collect();
                let backdrop = match &self.mixture {
                    Some(m) => Backdrop::Modes(m),
                    None => Backdrop::Points(&self.reference),
                };
                let path = scatter_path(dir, step);
                scatter::write_scatter(&path, &points, backdrop, limits, SCATTER_SIZE)?;
                Ok(Some(path))
            }
            SampleView::Nothing => Ok(None),
        }
    }

    /// Draws `inputs` beside their `reconstructions` (same shape, one sample per row) for `step`
    /// into `dir`, for image-shaped data. Returns the file written.
    pub fn write_reconstructions(
        &mut self,
        dir: &Path,
        step: u64,
        inputs: &[f32],
        reconstructions: &[f32],
    ) -> anyhow::Result<Option<PathBuf>> {
        let SampleView::Images(tile) = self.view else {
            return Ok(None);
        };
        if inputs.len() != reconstructions.len() {
            self.warn_once(format!(
                "the model's reconstructions have {} values for {} input values",
                reconstructions.len(),
                inputs.len()
            ));
            return Ok(None);
        }
        let path = reconstructions_path(dir, step);
        grid::pairs_grid(inputs, reconstructions, tile, self.range, PAD)?.write_png(&path)?;
        Ok(Some(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_follow_the_sample_shape() {
        let tile = |c, h, w| {
            SampleView::Images(TileShape {
                channels: c,
                height: h,
                width: w,
            })
        };
        assert_eq!(sample_view(&FeatureShape::image(3, 32, 32)), tile(3, 32, 32));
        assert_eq!(sample_view(&FeatureShape::image(1, 28, 20)), tile(1, 28, 20));
        assert_eq!(sample_view(&FeatureShape::image(2, 8, 8)), SampleView::Nothing);
        assert_eq!(sample_view(&FeatureShape::Flat(784)), tile(1, 28, 28));
        assert_eq!(sample_view(&FeatureShape::Flat(16)), tile(1, 4, 4));
        assert_eq!(sample_view(&FeatureShape::Flat(9)), SampleView::Nothing);
        assert_eq!(sample_view(&FeatureShape::Flat(785)), SampleView::Nothing);
        assert_eq!(sample_view(&FeatureShape::Flat(2)), SampleView::Scatter);
        assert_eq!(sample_view(&FeatureShape::Flat(1)), SampleView::Nothing);
        assert_eq!(exact_sqrt(0), Some(0));
        assert_eq!(exact_sqrt(1 << 40), Some(1 << 20));
        assert_eq!(exact_sqrt((1 << 40) - 1), None);
    }
}
