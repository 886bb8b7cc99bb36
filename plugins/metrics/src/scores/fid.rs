//! Fréchet distance between Gaussians fitted to two feature sets (FID, Heusel et al. 2017).
//!
//! pytorch-fid (`calculate_frechet_distance`) computes
//! `‖μa - μb‖² + tr(Sa) + tr(Sb) - 2 tr(sqrtm(Sa Sb))` with scipy's general (Schur) `sqrtm` of the
//! non-symmetric product. For positive semi-definite `Sa`, `Sb` the product `Sa Sb` is similar to
//! the symmetric PSD matrix `√Sa Sb √Sa` (`√Sa⁻¹ (√Sa Sb √Sa) √Sa = Sa Sb` when `Sa` is invertible,
//! and by continuity otherwise), so both have the same eigenvalues `λ ≥ 0` and
//! `tr((Sa Sb)^½) = Σ √λ`. We compute it that way: one symmetric eigen-decomposition for `√Sa`,
//! two products, and the eigenvalues of the symmetrized `√Sa Sb √Sa`, with round-off negatives
//! clamped to 0 — no complex arithmetic and no `eps` retry is needed.

use nash_core::error::{Error, Result};

use super::{linalg, map_rows_dots, Features};

/// Mean and unbiased covariance of a feature set (divides by `n - 1`, like `numpy.cov` as
/// pytorch-fid uses it).
#[derive(Clone, Debug, PartialEq)]
pub struct Gaussian {
    /// Mean of the rows, `dim` values.
    pub mean: Vec<f64>,
    /// Covariance, `dim x dim` row-major.
    pub covariance: Vec<f64>,
    /// Feature dimension.
    pub dim: usize,
    /// Number of rows it was fitted to.
    pub count: usize,
}

impl Gaussian {
    /// Fits mean and unbiased covariance (two-pass: rows are centered before the products); needs
    /// at least 2 rows.
    pub fn fit(features: &Features) -> Result<Self> {
        let (n, d) = (features.rows(), features.dim());
        if n < 2 {
            return Err(Error::shape(
                "Gaussian fit (FID)",
                "at least 2 feature rows for a covariance",
                format!("{n} rows"),
            ));
        }
        let mut mean = vec![0.0; d];
        for i in 0..n {
            for (m, x) in mean.iter_mut().zip(features.row(i)) {
                *m += x;
            }
        }
        for m in &mut mean {
            *m /= n as f64;
        }
        let mut centered = features.values().to_vec();
        for row in centered.chunks_exact_mut(d) {
            for (x, m) in row.iter_mut().zip(&mean) {
                *x -= m;
            }
        }
        // Columns of the centered matrix as rows: covariance[a][b] = col_a · col_b / (n - 1).
        let columns = Features::new(n, d, centered)?.transposed();
        let scale = 1.0 / (n as f64 - 1.0);
        let rows = map_rows_dots(&columns, &columns, |_, dots| {
            dots.iter().map(|v| v * scale).collect::<Vec<f64>>()
        });
        let mut covariance = rows.concat();
        // Exactly symmetric (the two triangles are computed identically already; this is cheap insurance).
        for a in 0..d {
            for b in a + 1..d {
                let v = 0.5 * (covariance[a * d + b] + covariance[b * d + a]);
                covariance[a * d + b] = v;
                covariance[b * d + a] = v;
            }
        }
        Ok(Gaussian {
            mean,
            covariance,
            dim: d,
            count: n,
        })
    }

    /// A Gaussian from given moments (`covariance` is `dim x dim` row-major, symmetric PSD); errors
    /// on mismatched lengths or non-finite values. `count` is informational.
    pub fn from_moments(mean: Vec<f64>, covariance: Vec<f64>, count: usize) -> Result<Self> {
        let dim = mean.len();
        if dim == 0 || covariance.len() != dim * dim {
            return Err(Error::shape(
                "Gaussian moments",
                format!("a non-empty mean and a {dim} x {dim} covariance"),
                format!("mean of {dim}, covariance of {} values", covariance.len()),
            ));
        }
        if mean.iter().chain(&covariance).any(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "Gaussian moments".into(),
            });
        }
        Ok(Gaussian {
            mean,
            covariance,
            dim,
            count,
        })
    }
}

/// Fréchet distance `‖μa - μb‖² + tr(Sa) + tr(Sb) - 2 tr((Sa Sb)^½)` between two Gaussians, with
/// the trace term computed as `Σ √max(λ, 0)` over the eigenvalues of `√Sa Sb √Sa` (see the module
/// docs). Errors if the dimensions differ. The result is clamped at 0 (round-off can make
/// identical Gaussians come out at -1e-13).
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> Result<f64> {
    let n = a.dim;
    if b.dim != n || a.mean.len() != n || b.mean.len() != n {
        return Err(Error::shape(
            "Fréchet distance",
            format!("two Gaussians of dimension {n}"),
            format!("dimensions {} and {}", a.dim, b.dim),
        ));
    }
    if a.covariance.len() != n * n || b.covariance.len() != n * n {
        return Err(Error::shape(
            "Fréchet distance",
            format!("{n} x {n} covariances"),
            format!("{} and {} values", a.covariance.len(), b.covariance.len()),
        ));
    }
    let mean_term: f64 = a.mean.iter().zip(&b.mean).map(|(x, y)| (x - y) * (x - y)).sum();
    let trace = |c: &[f64]| (0..n).map(|i| c[i * n + i]).sum::<f64>();
    let root_a = linalg::sqrtm_psd(&a.covariance, n);
    let product = linalg::matmul(&linalg::matmul(&root_a, &b.covariance, n), &root_a, n);
    let cross: f64 = linalg::symmetric_eigenvalues(&product, n)
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .sum();
    let fid = mean_term + trace(&a.covariance) + trace(&b.covariance) - 2.0 * cross;
    if !fid.is_finite() {
        return Err(Error::NonFinite {
            what: "Fréchet distance".into(),
        });
    }
    Ok(fid.max(0.0))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::scores::linalg::{matmul, symmetric_eigen};
    use nash_core::rand::{Rng as _, SeedableRng};

    fn rng(seed: u64) -> nash_core::tensor::Rng {
        nash_core::tensor::Rng::seed_from_u64(seed)
    }

    fn gaussian(mean: Vec<f64>, covariance: Vec<f64>) -> Gaussian {
        Gaussian::from_moments(mean, covariance, 0).unwrap()
    }

    fn diag(values: &[f64]) -> Vec<f64> {
        let n = values.len();
        let mut m = vec![0.0; n * n];
        for (i, v) in values.iter().enumerate() {
            m[i * n + i] = *v;
        }
        m
    }

    fn transpose(m: &[f64], n: usize) -> Vec<f64> {
        let mut t = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                t[j * n + i] = m[i * n + j];
            }
        }
        t
    }

    /// A random orthogonal matrix: the eigenvectors of a random symmetric matrix.
    fn random_rotation(n: usize, rng: &mut nash_core::tensor::Rng) -> Vec<f64> {
        let m: Vec<f64> = (0..n * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        symmetric_eigen(&m, n).1
    }

    #[test]
    fn diagonal_covariances_match_closed_form() {
        // FID(N(μa, diag a), N(μb, diag b)) = Σ(μa-μb)² + Σ(√a_i - √b_i)².
        let (ma, mb) = (vec![0.5, -1.0, 2.0, 0.0], vec![1.5, 1.0, 2.0, -3.0]);
        let (va, vb) = ([4.0, 1.0, 0.25, 9.0], [1.0, 1.0, 2.25, 0.0]);
        let expected: f64 = ma
            .iter()
            .zip(&mb)
            .map(|(x, y): (&f64, &f64)| (x - y).powi(2))
            .sum::<f64>()
            + va.iter()
                .zip(&vb)
                .map(|(x, y): (&f64, &f64)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        assert!((expected - (1.0 + 4.0 + 0.0 + 9.0 + 1.0 + 0.0 + 1.0 + 9.0)).abs() < 1e-12);
        let fid = frechet_distance(&gaussian(ma, diag(&va)), &gaussian(mb, diag(&vb))).unwrap();
        assert!((fid - expected).abs() < 1e-10, "{fid} vs {expected}");
    }

    #[test]
    fn commuting_covariances_match_closed_form_on_eigenvalues() {
        // Sa = Q diag(a) Qᵀ, Sb = Q diag(b) Qᵀ share eigenvectors, so tr((Sa Sb)^½) = Σ √(a_i b_i) and
        // FID = ‖μa-μb‖² + Σ(√a_i - √b_i)².
        let mut rng = rng(11);
        for n in [2, 5, 16] {
            let q = random_rotation(n, &mut rng);
            let a: Vec<f64> = (0..n).map(|_| rng.gen_range(0.0..3.0)).collect();
            let b: Vec<f64> = (0..n).map(|_| rng.gen_range(0.0..3.0)).collect();
            let sa = matmul(&matmul(&q, &diag(&a), n), &transpose(&q, n), n);
            let sb = matmul(&matmul(&q, &diag(&b), n), &transpose(&q, n), n);
            let ma: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mb: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let expected: f64 = ma.iter().zip(&mb).map(|(x, y)| (x - y).powi(2)).sum::<f64>()
                + a.iter()
                    .zip(&b)
                    .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
                    .sum::<f64>();
            let fid = frechet_distance(&gaussian(ma, sa), &gaussian(mb, sb)).unwrap();
            assert!(
                (fid - expected).abs() < 1e-9 * expected.max(1.0),
                "n = {n}: {fid} vs {expected}"
            );
        }
    }

    #[test]
    fn identical_gaussians_are_at_distance_zero() {
        let mut rng = rng(5);
        let (n, d) = (200, 24);
        let x = Features::new(n, d, (0..n * d).map(|_| rng.gen_range(-2.0..2.0)).collect()).unwrap();
        let g = Gaussian::fit(&x).unwrap();
        let trace: f64 = (0..d).map(|i| g.covariance[i * d + i]).sum();
        let fid = frechet_distance(&g, &g.clone()).unwrap();
        assert!(fid <= 1e-9 * trace, "{fid} (trace {trace})");
    }

    #[test]
    fn non_commuting_2x2_matches_scipy() {
        // import numpy as np, scipy.linalg as sl
        // ma, mb = np.array([0.0, 1.0]), np.array([1.0, -1.0])
        // sa = np.array([[2.0, 0.5], [0.5, 1.0]]); sb = np.array([[1.0, -0.3], [-0.3, 3.0]])
        // covmean = sl.sqrtm(sa @ sb).real
        // print(repr(((ma - mb) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean)))
        // -> 5.929311854967773  (tr sqrtm(sa @ sb) = 3.0353440725161134)
        let a = gaussian(vec![0.0, 1.0], vec![2.0, 0.5, 0.5, 1.0]);
        let b = gaussian(vec![1.0, -1.0], vec![1.0, -0.3, -0.3, 3.0]);
        let fid = frechet_distance(&a, &b).unwrap();
        assert!((fid - 5.929311854967773).abs() < 1e-12, "{fid}");
        // Symmetric in its arguments.
        let back = frechet_distance(&b, &a).unwrap();
        assert!((back - fid).abs() < 1e-12);
    }

    #[test]
    fn small_feature_sets_match_pytorch_fid_formula() {
        // import numpy as np, scipy.linalg as sl
        // x = np.array(X); y = np.array(Y)     # the rows below
        // mu1, s1 = x.mean(0), np.cov(x, rowvar=False); mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
        // covmean = sl.sqrtm(s1.dot(s2)).real   # pytorch-fid calculate_frechet_distance
        // print(repr((mu1 - mu2).dot(mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))
        // -> 1.8772463072925927
        let (x, y) = reference_sets();
        let fid = frechet_distance(&Gaussian::fit(&x).unwrap(), &Gaussian::fit(&y).unwrap()).unwrap();
        assert!((fid - 1.8772463072925927).abs() < 1e-10, "{fid}");
    }

    /// Two small fixed feature sets (6 x 3 and 5 x 3), shared with the KID reference test.
    pub(crate) fn reference_sets() -> (Features, Features) {
        let x = [
            [0.1, 1.2, -0.3],
            [0.8, -0.5, 0.4],
            [-1.1, 0.3, 0.9],
            [0.5, 0.5, 0.5],
            [1.4, -0.2, -0.7],
            [-0.3, 0.9, 0.2],
        ];
        let y = [
            [1.0, 2.0, 0.5],
            [0.2, 1.1, 1.6],
            [1.8, 0.4, 0.9],
            [0.9, 1.7, -0.2],
            [1.3, 0.6, 1.2],
        ];
        (
            Features::new(6, 3, x.concat()).unwrap(),
            Features::new(5, 3, y.concat()).unwrap(),
        )
    }

    #[test]
    fn fit_uses_the_unbiased_covariance() {
        // Rows (0, 0), (2, 0), (1, 3): mean (1, 1); centered (-1,-1), (1,-1), (0,2);
        // covariance / (n-1) = [[2, 0], [0, 6]] / 2.
        let x = Features::new(3, 2, vec![0.0, 0.0, 2.0, 0.0, 1.0, 3.0]).unwrap();
        let g = Gaussian::fit(&x).unwrap();
        assert_eq!(g.mean, vec![1.0, 1.0]);
        assert_eq!(g.covariance, vec![1.0, 0.0, 0.0, 3.0]);
        assert_eq!((g.dim, g.count), (2, 3));
    }

    #[test]
    fn errors_on_bad_input() {
        let one = Features::new(1, 2, vec![0.0, 1.0]).unwrap();
        assert!(Gaussian::fit(&one).is_err());
        let a = gaussian(vec![0.0, 0.0], diag(&[1.0, 1.0]));
        let b = gaussian(vec![0.0; 3], diag(&[1.0; 3]));
        assert!(frechet_distance(&a, &b).is_err());
        assert!(Gaussian::from_moments(vec![0.0], vec![f64::NAN], 1).is_err());
        assert!(Gaussian::from_moments(vec![0.0, 1.0], vec![1.0], 1).is_err());
    }

    /// Timing of a 128-d FID (2,000 rows per set), release: `cargo test --release -p nash-metrics
    /// fid_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn fid_timing() {
        let mut rng = rng(1);
        for d in [128, 512] {
            let n = 2_000;
            let x = Features::new(n, d, (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect()).unwrap();
            let y = Features::new(n, d, (0..n * d).map(|_| rng.gen_range(-1.0..1.5)).collect()).unwrap();
            let t = std::time::Instant::now();
            let (gx, gy) = (Gaussian::fit(&x).unwrap(), Gaussian::fit(&y).unwrap());
            let fit = t.elapsed();
            let t = std::time::Instant::now();
            let fid = frechet_distance(&gx, &gy).unwrap();
            println!(
                "d = {d}: fit 2 x {n} rows {fit:?}, Fréchet distance {:?} (FID {fid})",
                t.elapsed()
            );
        }
    }
}
