//! Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
//! for Assessing Generative Models"; reference `ManifoldEstimator` in NVlabs/stylegan2-ada
//! `metrics/precision_recall.py`).
//!
//! Each set's manifold is the union of balls around its rows, the radius of row `i` being the
//! distance to its `k`-th nearest neighbour in the same set (excluding the row itself; a duplicate
//! of it counts as a neighbour at distance 0). A row is inside a manifold if its distance to some
//! centre is `<=` that centre's radius (the reference's `distance_batch <= radii`).
//!
//! - precision: share of fake rows inside the real manifold;
//! - recall: share of real rows inside the fake manifold.
//!
//! Squared distances come from `‖x‖² + ‖y‖² - 2 x·y` (clamped at 0) with blocked, threaded dot
//! products; nothing of size `rows x rows` is stored.

use nash_core::error::{Error, Result};

use super::{check_same_dim, map_rows_dots, Features};

/// Precision and recall of `fake` against `real` with `k`-nearest-neighbour balls. Errors on
/// `k == 0`, mismatched dimensions, or a set with `k` rows or fewer.
pub fn precision_recall(real: &Features, fake: &Features, k: usize) -> Result<(f64, f64)> {
    check_same_dim("precision and recall", real, fake)?;
    if k == 0 {
        return Err(Error::config("k", "the neighbourhood size must be at least 1"));
    }
    for (name, set) in [("real", real), ("fake", fake)] {
        if set.rows() <= k {
            return Err(Error::config(
                "k",
                format!(
                    "the {k}-th nearest neighbour needs more than {k} {name} rows, got {}; use a smaller k or more \
                     samples",
                    set.rows()
                ),
            ));
        }
    }
    let real_norms = real.squared_norms();
    let fake_norms = fake.squared_norms();
    let real_radii = squared_knn_radii(real, &real_norms, k);
    let fake_radii = squared_knn_radii(fake, &fake_norms, k);
    let precision = share_inside(fake, &fake_norms, real, &real_norms, &real_radii);
    let recall = share_inside(real, &real_norms, fake, &fake_norms, &fake_radii);
    Ok((precision, recall))
}

/// Squared distance to the `k`-th nearest other row, for every row of `set`.
pub fn squared_knn_radii(set: &Features, norms: &[f64], k: usize) -> Vec<f64> {
    map_rows_dots(set, set, |i, dots| {
        let mut others: Vec<f64> = dots
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(j, &d)| (norms[i] + norms[j] - 2.0 * d).max(0.0))
            .collect();
        *others.select_nth_unstable_by(k - 1, f64::total_cmp).1
    })
}

/// Share of the rows of `points` within the squared radius of some row of `centres`.
fn share_inside(
    points: &Features,
    point_norms: &[f64],
    centres: &Features,
    centre_norms: &[f64],
    squared_radii: &[f64],
) -> f64 {
    let inside = map_rows_dots(points, centres, |i, dots| {
        dots.iter()
            .zip(centre_norms.iter().zip(squared_radii))
            .any(|(&d, (&n, &r))| (point_norms[i] + n - 2.0 * d).max(0.0) <= r)
    });
    inside.iter().filter(|&&b| b).count() as f64 / points.rows() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::rand::{Rng as _, SeedableRng};

    fn line(points: &[f64]) -> Features {
        Features::new(points.len(), 1, points.to_vec()).unwrap()
    }

    #[test]
    fn one_dimensional_cases_by_hand() {
        // k = 1. real {0, 1, 2, 10, 11}: every radius 1. fake {0.5, 1.5, 30, 31}: every radius 1.
        // precision: 0.5 (0.5 from 0) and 1.5 are inside, 30 and 31 are not -> 2/4.
        // recall: 0, 1, 2 are within 0.5 of a fake point; 10 and 11 are 8.5+ away -> 3/5.
        let (p, r) = precision_recall(&line(&[0.0, 1.0, 2.0, 10.0, 11.0]), &line(&[0.5, 1.5, 30.0, 31.0]), 1).unwrap();
        assert_eq!((p, r), (0.5, 0.6));
        // The boundary counts as inside (<=): real {0, 1}, fake {2, 3}, all radii 1. Fake 2 is at
        // distance 1 from real 1, fake 3 at 2 -> precision 1/2; real 1 is at 1 from fake 2 -> recall 1/2.
        let (p, r) = precision_recall(&line(&[0.0, 1.0]), &line(&[2.0, 3.0]), 1).unwrap();
        assert_eq!((p, r), (0.5, 0.5));
        // k = 2 excludes the row itself: real {0, 1, 3}: radii 3 (0: 1, 3), 2 (1: 1, 2), 3 (3: 2, 3).
        // fake {-3, 5, 7, 6.5}: -3 is 3 from 0 (radius 3) -> in; 5 is 2 from 3 -> in; 6.5 is 3.5 > 3 -> out;
        // 7 is 4 from 3 -> out. precision 2/4.
        // fake radii (k = 2, second-nearest other fake): -3 -> 9.5, 5 -> 2, 7 -> 2, 6.5 -> 1.5.
        // recall: every real point is within 9.5 of -3 -> 3/3.
        let (p, r) = precision_recall(&line(&[0.0, 1.0, 3.0]), &line(&[-3.0, 5.0, 7.0, 6.5]), 2).unwrap();
        assert_eq!((p, r), (0.5, 1.0));
    }

    #[test]
    fn knn_radii_exclude_self() {
        let set = line(&[0.0, 1.0, 3.0, 3.0]);
        let norms = set.squared_norms();
        assert_eq!(squared_knn_radii(&set, &norms, 1), vec![1.0, 1.0, 0.0, 0.0]);
        assert_eq!(squared_knn_radii(&set, &norms, 2), vec![9.0, 4.0, 4.0, 4.0]);
    }

    fn cloud(rng: &mut nash_core::tensor::Rng, n: usize, d: usize, shift: f64) -> Features {
        Features::new(n, d, (0..n * d).map(|_| rng.gen_range(-1.0..1.0) + shift).collect()).unwrap()
    }

    #[test]
    fn identical_disjoint_and_subset_sets() {
        let mut rng = nash_core::tensor::Rng::seed_from_u64(2);
        let real = cloud(&mut rng, 60, 5, 0.0);
        assert_eq!(precision_recall(&real, &real.clone(), 3).unwrap(), (1.0, 1.0));
        let far = cloud(&mut rng, 50, 5, 100.0);
        assert_eq!(precision_recall(&real, &far, 3).unwrap(), (0.0, 0.0));
        // Fake = a tight subset of real (the 20 rows nearest the first one): every fake row is a real
        // centre (precision 1) but the fake balls cannot reach the rest of the cloud.
        let mut order: Vec<usize> = (0..real.rows()).collect();
        let dist = |j: usize| -> f64 { real.row(0).iter().zip(real.row(j)).map(|(a, b)| (a - b).powi(2)).sum() };
        order.sort_by(|&a, &b| dist(a).total_cmp(&dist(b)));
        let fake = real.select(&order[..20]);
        let (p, r) = precision_recall(&real, &fake, 3).unwrap();
        assert_eq!(p, 1.0);
        assert!((20.0 / 60.0..1.0).contains(&r), "{r}");
    }

    #[test]
    fn errors_on_bad_input() {
        let a = line(&[0.0, 1.0, 2.0]);
        assert!(precision_recall(&a, &a, 0).is_err());
        assert!(precision_recall(&a, &a, 3).is_err());
        assert!(precision_recall(&a, &line(&[0.0, 1.0]), 2).is_err());
        let b = Features::new(3, 2, vec![0.0; 6]).unwrap();
        assert!(precision_recall(&a, &b, 1).is_err());
    }

    /// Timing of 5,000 x 5,000 rows of 128 features, release: `cargo test --release -p nash-metrics
    /// precision_recall_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn precision_recall_timing() {
        let mut rng = nash_core::tensor::Rng::seed_from_u64(1);
        let real = cloud(&mut rng, 5_000, 128, 0.0);
        let fake = cloud(&mut rng, 5_000, 128, 0.1);
        let t = std::time::Instant::now();
        let (p, r) = precision_recall(&real, &fake, 3).unwrap();
        println!("precision/recall 5000 x 5000 x 128: {:?} (P {p}, R {r})", t.elapsed());
    }
}
