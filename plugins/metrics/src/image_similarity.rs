//! Image similarity: peak signal-to-noise ratio and the structural similarity index.
//!
//! - [`psnr`]: `10 · log10(L² / mse)` in decibels, `L` the data's value range width
//!   ([`nash_core::data::DataInfo::value_range`]). A perfect reconstruction (`mse = 0`) has an infinite
//!   PSNR (scikit-image's `peak_signal_noise_ratio` and torchmetrics return `inf`); here every value is
//!   capped at [`PSNR_CAP_DB`] = 100 dB so that means over samples stay finite and comparable (f32 data
//!   in `[0, 1]` cannot be reproduced much closer than that anyway: its rounding error alone is ~130 dB).
//! - [`ssim`]: SSIM of Wang et al. 2004 for one single-channel image pair, with an 11x11 Gaussian
//!   window of σ = 1.5 (radius 5, weights `exp(-d²/2σ²)` normalized), K1 = 0.01, K2 = 0.03, data range
//!   `L`, population (not sample) covariances, averaged over the **valid** window positions only (the
//!   `(H − 10) x (W − 10)` centres whose window lies inside the image). This is exactly scikit-image's
//!   `structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
//!   data_range=L)`: scikit-image filters the whole image (reflecting at the border) but then averages
//!   only over the image cropped by `(win_size − 1) / 2 = 5` pixels on each side, i.e. over the same
//!   valid centres, whose windows never touch the reflected border. Images must be at least 11x11.
//!
//! Arithmetic is in f64.

use nash_core::error::{Error, Result};

/// The PSNR reported for a sample reproduced exactly (or closer than this), in decibels.
pub const PSNR_CAP_DB: f64 = 100.0;
/// Side of the square Gaussian window.
pub const SSIM_WINDOW: usize = 11;
/// Standard deviation of the Gaussian window, in pixels.
pub const SSIM_SIGMA: f64 = 1.5;
/// SSIM's luminance constant factor: `C1 = (K1 · L)²`.
pub const SSIM_K1: f64 = 0.01;
/// SSIM's contrast constant factor: `C2 = (K2 · L)²`.
pub const SSIM_K2: f64 = 0.03;

/// `10 · log10(range² / mse)` in decibels, capped at [`PSNR_CAP_DB`] (so `mse = 0` gives the cap).
pub fn psnr(mse: f64, range: f64) -> f64 {
    if mse <= 0.0 {
        return PSNR_CAP_DB;
    }
    (10.0 * (range * range / mse).log10()).min(PSNR_CAP_DB)
}

/// The normalized 1-D Gaussian weights of the window (the 2-D window is their outer product).
pub fn gaussian_window() -> [f64; SSIM_WINDOW] {
    let r = (SSIM_WINDOW / 2) as f64;
    let mut w = [0.0; SSIM_WINDOW];
    for (i, v) in w.iter_mut().enumerate() {
        let d = i as f64 - r;
        *v = (-0.5 * d * d / (SSIM_SIGMA * SSIM_SIGMA)).exp();
    }
    let sum: f64 = w.iter().sum();
    w.iter_mut().for_each(|v| *v /= sum);
    w
}

/// Valid 2-D filtering of the `height x width` row-major `image` with the separable `window`:
/// `(height − k + 1) x (width − k + 1)` outputs.
fn filter_valid(image: &[f64], height: usize, width: usize, window: &[f64]) -> Vec<f64> {
    let k = window.len();
    let (oh, ow) = (height + 1 - k, width + 1 - k);
    // Rows first: height x ow.
    let mut rows = vec![0.0; height * ow];
    for y in 0..height {
        let line = &image[y * width..(y + 1) * width];
        for x in 0..ow {
            rows[y * ow + x] = window.iter().zip(&line[x..x + k]).map(|(w, v)| w * v).sum();
        }
    }
    // Then columns: oh x ow.
    let mut out = vec![0.0; oh * ow];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = window.iter().enumerate().map(|(i, w)| w * rows[(y + i) * ow + x]).sum();
        }
    }
    out
}

/// The mean SSIM of the single-channel `height x width` images `x` and `y` (row-major) for data
/// range `range`, over the valid window positions (see the module docs).
pub fn ssim(x: &[f32], y: &[f32], height: usize, width: usize, range: f64) -> Result<f64> {
    if height < SSIM_WINDOW || width < SSIM_WINDOW {
        return Err(Error::shape(
            "ssim image",
            format!("at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (the Gaussian window's size)"),
            format!("{height}x{width}"),
        ));
    }
    if x.len() != height * width || y.len() != height * width {
        return Err(Error::shape(
            "ssim images",
            format!("{} values each ({height}x{width})", height * width),
            format!("{} and {}", x.len(), y.len()),
        ));
    }
    if !(range.is_finite() && range > 0.0) {
        return Err(Error::Other(format!(
            "ssim needs a positive, finite data range, got {range}"
        )));
    }
    let window = gaussian_window();
    let xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let ys: Vec<f64> = y.iter().map(|&v| v as f64).collect();
    let product = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(p, q)| p * q).collect() };
    let f = |img: &[f64]| filter_valid(img, height, width, &window);
    let (ux, uy) = (f(&xs), f(&ys));
    let (uxx, uyy, uxy) = (f(&product(&xs, &xs)), f(&product(&ys, &ys)), f(&product(&xs, &ys)));
    let c1 = (SSIM_K1 * range).powi(2);
    let c2 = (SSIM_K2 * range).powi(2);
    let mut total = 0.0;
    for i in 0..ux.len() {
        let (mx, my) = (ux[i], uy[i]);
        let vx = uxx[i] - mx * mx;
        let vy = uyy[i] - my * my;
        let vxy = uxy[i] - mx * my;
        total += ((2.0 * mx * my + c1) * (2.0 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2));
    }
    Ok(total / ux.len() as f64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two fixed 16x16 images in [0, 1] made from a formula, computed in f64 and rounded to f32
    /// (exactly as the NumPy code in [`ssim_matches_scikit_image`] makes them).
    pub(crate) fn pair() -> (Vec<f32>, Vec<f32>) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..16 {
            for j in 0..16 {
                let (fi, fj) = (i as f64, j as f64);
                x.push((0.5 + 0.4 * (0.3 * fi).sin() * (0.2 * fj).cos()) as f32);
                let bump = 0.05 * ((i * j) % 3) as f64 / 2.0;
                y.push((0.5 + 0.35 * (0.3 * fi + 0.1).sin() * (0.25 * fj).cos() + bump) as f32);
            }
        }
        (x, y)
    }

    /// Reference values from scikit-image 0.26.0 (numpy 2.4.6):
    ///
    /// ```python
    /// import numpy as np
    /// from skimage.metrics import structural_similarity, peak_signal_noise_ratio
    /// i, j = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    /// x = (0.5 + 0.4 * np.sin(0.3 * i) * np.cos(0.2 * j)).astype(np.float32)
    /// y = (0.5 + 0.35 * np.sin(0.3 * i + 0.1) * np.cos(0.25 * j) + 0.05 * ((i * j) % 3) / 2.0).astype(np.float32)
    /// x64, y64 = x.astype(np.float64), y.astype(np.float64)
    /// s = lambda a, b, L: structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    ///                                           use_sample_covariance=False, data_range=L)
    /// s(x64, y64, 1.0)             # 0.8581831186856289
    /// s(x64, y64, 2.0)             # 0.8812183493499431
    /// s(x64[:12], y64[:12], 1.0)   # 0.9271094925622531  (12x16: 2x6 valid centres)
    /// peak_signal_noise_ratio(x64, y64, data_range=1.0)   # 23.4587348105909
    /// c = lambda v: np.full((16, 16), np.float32(v), dtype=np.float64)   # f32 constants, as in Rust
    /// s(c(0.2), c(0.6), 1.0)       # 0.6000999630808523
    /// ```
    #[test]
    fn ssim_matches_scikit_image() {
        let (x, y) = pair();
        let close = |got: f64, want: f64| assert!((got - want).abs() < 1e-9, "{got} vs scikit-image {want}");
        close(ssim(&x, &y, 16, 16, 1.0).unwrap(), 0.858_183_118_685_628_9);
        close(ssim(&x, &y, 16, 16, 2.0).unwrap(), 0.881_218_349_349_943_1);
        close(
            ssim(&x[..12 * 16], &y[..12 * 16], 12, 16, 1.0).unwrap(),
            0.927_109_492_562_253_1,
        );
        let mse = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            / 256.0;
        close(psnr(mse, 1.0), 23.458_734_810_590_9);
        // Constant images: only the luminance term is left, (2 a b + C1) / (a² + b² + C1).
        close(
            ssim(&[0.2; 256], &[0.6; 256], 16, 16, 1.0).unwrap(),
            0.600_099_963_080_852_3,
        );
    }

    #[test]
    fn ssim_is_one_on_identical_images_and_symmetric() {
        let (x, y) = pair();
        assert!((ssim(&x, &x, 16, 16, 1.0).unwrap() - 1.0).abs() < 1e-12);
        assert!((ssim(&[0.3; 121], &[0.3; 121], 11, 11, 1.0).unwrap() - 1.0).abs() < 1e-12);
        let (a, b) = (ssim(&x, &y, 16, 16, 1.0).unwrap(), ssim(&y, &x, 16, 16, 1.0).unwrap());
        assert!((a - b).abs() < 1e-14, "{a} vs {b}");
        // A negated image is anti-correlated: SSIM < 0.
        let neg: Vec<f32> = x.iter().map(|v| 1.0 - v).collect();
        assert!(ssim(&x, &neg, 16, 16, 1.0).unwrap() < 0.0);
    }

    #[test]
    fn ssim_refuses_small_or_mismatched_images() {
        let err = ssim(&[0.0; 100], &[0.0; 100], 10, 10, 1.0).unwrap_err().to_string();
        assert!(err.contains("11x11") && err.contains("10x10"), "{err}");
        assert!(ssim(&[0.0; 121], &[0.0; 120], 11, 11, 1.0).is_err());
        assert!(ssim(&[0.0; 121], &[0.0; 121], 11, 11, 0.0).is_err());
    }

    #[test]
    fn psnr_by_the_formula_and_capped() {
        // 10 log10(1 / 0.01) = 20 dB; range 2 adds 20 log10 2 = 6.0206 dB.
        assert!((psnr(0.01, 1.0) - 20.0).abs() < 1e-12);
        assert!((psnr(0.01, 2.0) - 26.020_599_913_279_625).abs() < 1e-12);
        assert_eq!(psnr(0.0, 1.0), PSNR_CAP_DB);
        assert_eq!(psnr(1e-30, 1.0), PSNR_CAP_DB);
    }

    #[test]
    fn window_matches_scipy() {
        // scipy.ndimage's Gaussian kernel for sigma 1.5, truncate 3.5 (radius 5), as scikit-image
        // uses it: w = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2); w /= w.sum(); w[5], w[0]
        // -> 0.26601172486179436, 0.0010283800844791092
        let w = gaussian_window();
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert!((w[5] - 0.266_011_724_861_794_36).abs() < 1e-15, "{w:?}");
        assert!((w[0] - 0.001_028_380_084_479_109_2).abs() < 1e-15, "{w:?}");
        assert_eq!(w[0], w[10]);
    }
}
