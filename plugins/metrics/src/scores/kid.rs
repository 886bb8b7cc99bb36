//! Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").
//!
//! As torch-fidelity's `kid` and the authors' `polynomial_mmd` (`mmd_est = 'unbiased'`): for each
//! of `subsets` draws, `m` rows are sampled without replacement from each set, and
//!
//! `MMD²_u = (Σ_{i≠j} k(x_i, x_j) + Σ_{i≠j} k(y_i, y_j)) / (m (m - 1)) - 2 Σ_{i,j} k(x_i, y_j) / m²`
//!
//! with the cubic polynomial kernel `k(x, y) = (x·y / d + 1)³`. The score is the mean over
//! subsets, reported with the population standard deviation over subsets (`np.std`, ddof 0, as
//! torch-fidelity). `m = min(subset_size, rows of real, rows of fake)`. The estimator is unbiased,
//! so it can be slightly negative for matching distributions; it is not clamped.

use nash_core::error::{Error, Result};
use nash_core::rand::seq::index::sample;
use nash_core::tensor::Rng;

use super::{check_same_dim, map_rows_dots, Features};

/// KID: mean and standard deviation over `subsets` random subsets of `min(subset_size, rows)`
/// rows of each set of the unbiased MMD² with kernel `(x·y/d + 1)³`. Errors on mismatched
/// dimensions, `subsets == 0`, or fewer than 2 rows per subset.
pub fn kernel_inception_distance(
    real: &Features,
    fake: &Features,
    subsets: usize,
    subset_size: usize,
    rng: &mut Rng,
) -> Result<(f64, f64)> {
    check_same_dim("kernel inception distance", real, fake)?;
    if subsets == 0 {
        return Err(Error::config("subsets", "must be at least 1"));
    }
    let m = subset_size.min(real.rows()).min(fake.rows());
    if m < 2 {
        return Err(Error::config(
            "subset_size",
            format!(
                "each KID subset needs at least 2 rows of each set; got subset_size {subset_size}, {} real and {} \
                 fake rows",
                real.rows(),
                fake.rows()
            ),
        ));
    }
    let mut values = Vec::with_capacity(subsets);
    for _ in 0..subsets {
        let x = real.select(&sample(rng, real.rows(), m).into_vec());
        let y = fake.select(&sample(rng, fake.rows(), m).into_vec());
        values.push(unbiased_polynomial_mmd2(&x, &y));
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / values.len() as f64;
    if !mean.is_finite() {
        return Err(Error::NonFinite {
            what: "kernel inception distance".into(),
        });
    }
    Ok((mean, var.sqrt()))
}

/// Unbiased MMD² between the rows of `x` and of `y` (both at least 2 rows, same dimension) with
/// the cubic polynomial kernel. Sets may differ in size: the cross term divides by `|x| |y|`.
pub fn unbiased_polynomial_mmd2(x: &Features, y: &Features) -> f64 {
    let inv_d = 1.0 / x.dim() as f64;
    let kernel = |dot: f64| {
        let v = dot * inv_d + 1.0;
        v * v * v
    };
    let within = |s: &Features| -> f64 {
        let sums = map_rows_dots(s, s, |i, dots| {
            dots.iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &d)| kernel(d))
                .sum::<f64>()
        });
        let n = s.rows() as f64;
        sums.iter().sum::<f64>() / (n * (n - 1.0))
    };
    let cross_sums = map_rows_dots(x, y, |_, dots| dots.iter().map(|&d| kernel(d)).sum::<f64>());
    let cross = cross_sums.iter().sum::<f64>() / (x.rows() as f64 * y.rows() as f64);
    within(x) + within(y) - 2.0 * cross
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::rand::{Rng as _, SeedableRng};

    fn rng(seed: u64) -> Rng {
        Rng::seed_from_u64(seed)
    }

    #[test]
    fn matches_polynomial_mmd_reference_on_fixed_sets() {
        // Bińkowski et al.'s `polynomial_mmd` / torch-fidelity `mmd`, unbiased estimator, numpy:
        // import numpy as np
        // def poly(a, b): return (a @ b.T / a.shape[1] + 1) ** 3
        // def mmd2(x, y):  # _mmd2_and_variance(..., mmd_est='unbiased'), here on equal sizes m
        //     m = x.shape[0]; kxx, kyy, kxy = poly(x, x), poly(y, y), poly(x, y)
        //     return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) \
        //            - 2 * kxy.sum() / (m * m)
        // x, y = X[:5], Y          # the FID reference sets, real capped to 5 rows (subset_size = 5)
        // print(repr(mmd2(np.array(x), np.array(y))))  -> 3.952671854074074
        let (x, y) = crate::scores::fid::tests::reference_sets();
        let x5 = x.select(&[0, 1, 2, 3, 4]);
        let direct = unbiased_polynomial_mmd2(&x5, &y);
        assert!((direct - 3.952671854074074).abs() < 1e-12, "{direct}");
        // One subset of all rows: the sampled permutation does not change the value.
        let (mean, std) = kernel_inception_distance(&x5, &y, 1, 100, &mut rng(0)).unwrap();
        assert!((mean - 3.952671854074074).abs() < 1e-12, "{mean}");
        assert_eq!(std, 0.0);
    }

    #[test]
    fn same_distribution_scores_near_zero_and_shift_scores_positive() {
        let mut r = rng(9);
        let (n, d) = (400, 8);
        let draw = |r: &mut Rng, shift: f64| {
            Features::new(n, d, (0..n * d).map(|_| r.gen_range(-1.0..1.0) + shift).collect()).unwrap()
        };
        let (a, b, c) = (draw(&mut r, 0.0), draw(&mut r, 0.0), draw(&mut r, 0.7));
        let (same, same_std) = kernel_inception_distance(&a, &b, 10, 100, &mut r).unwrap();
        let (shifted, _) = kernel_inception_distance(&a, &c, 10, 100, &mut r).unwrap();
        assert!(same.abs() < 3.0 * same_std.max(1e-3), "{same} ± {same_std}");
        assert!(shifted > 10.0 * same.abs().max(1e-3), "{shifted} vs {same}");
        assert!(same_std > 0.0);
    }

    #[test]
    fn is_reproducible_with_the_seed() {
        let (x, y) = crate::scores::fid::tests::reference_sets();
        let first = kernel_inception_distance(&x, &y, 5, 3, &mut rng(4)).unwrap();
        let again = kernel_inception_distance(&x, &y, 5, 3, &mut rng(4)).unwrap();
        assert_eq!(first, again);
    }

    #[test]
    fn errors_on_bad_input() {
        let (x, y) = crate::scores::fid::tests::reference_sets();
        assert!(kernel_inception_distance(&x, &y, 0, 4, &mut rng(0)).is_err());
        assert!(kernel_inception_distance(&x, &y, 2, 1, &mut rng(0)).is_err());
        let one = Features::new(1, 3, vec![0.0; 3]).unwrap();
        assert!(kernel_inception_distance(&x, &one, 2, 10, &mut rng(0)).is_err());
        let other = Features::new(4, 2, vec![0.0; 8]).unwrap();
        assert!(kernel_inception_distance(&x, &other, 2, 4, &mut rng(0)).is_err());
    }
}
