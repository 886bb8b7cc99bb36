//! Preprocessing shared by the file-backed sources: scaling to [0, 1] or [-1, 1], seeded
//! (stratified) train/test splits, class subsets and size limits.
//!
//! Shuffling for training is not done here: the trainer's seeded
//! [`DataLoader`](nash_core::data::DataLoader) shuffles every epoch.

use std::collections::BTreeMap;
use std::path::Path;

use nash_core::error::{Error, Result};
use nash_core::rand::seq::SliceRandom;
use nash_core::rand::SeedableRng;
use nash_core::tensor::Rng;

use crate::table::{Table, MAX_VALUES};
use crate::Scale;

/// Maps bytes 0..=255 onto `scale`: `v / 255` for `unit`, `2 v / 255 - 1` for `symmetric`.
pub fn scale_u8(v: u8, scale: Scale) -> f32 {
    let unit = f32::from(v) / 255.0;
    match scale {
        Scale::Unit => unit,
        Scale::Symmetric => 2.0 * unit - 1.0,
    }
}

/// Rescales `values` from `from = (low, high)` onto `to` linearly. Every value must lie in `from`
/// (`what` names the data in the error); a degenerate `from` (low == high) maps everything to the
/// middle of `to`.
pub fn rescale(values: &mut [f32], from: (f32, f32), to: Scale, what: &Path) -> Result<()> {
    let (lo, hi) = from;
    let (a, b) = to.range();
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !(lo..=hi).contains(*v)) {
        return Err(Error::Data {
            path: what.to_path_buf(),
            message: format!(
                "value {v} at flat index {i} lies outside the input range [{lo}, {hi}] that `scale` maps from; \
                 widen `input_range` or leave it out to use the observed range"
            ),
        });
    }
    let span = hi - lo;
    for v in values.iter_mut() {
        let t = if span > 0.0 { (*v - lo) / span } else { 0.5 };
        *v = a + t * (b - a);
    }
    Ok(())
}

/// The smallest and largest finite value of every slice together; `None` if there are none.
/// Any NaN or infinity is an error naming `what`.
pub fn observed_range<'a>(parts: impl IntoIterator<Item = &'a [f32]>, what: &Path) -> Result<Option<(f32, f32)>> {
    let mut range: Option<(f32, f32)> = None;
    for part in parts {
        for (i, &v) in part.iter().enumerate() {
            if !v.is_finite() {
                return Err(Error::Data {
                    path: what.to_path_buf(),
                    message: format!("non-finite value {v} at flat index {i}"),
                });
            }
            range = Some(match range {
                None => (v, v),
                Some((lo, hi)) => (lo.min(v), hi.max(v)),
            });
        }
    }
    Ok(range)
}

/// Checks that `test_fraction` (at config path `path`) lies strictly between 0 and 1.
pub fn check_fraction(path: &str, test_fraction: f64) -> Result<()> {
    if test_fraction.is_finite() && test_fraction > 0.0 && test_fraction < 1.0 {
        Ok(())
    } else {
        Err(Error::config(
            path,
            format!("must lie strictly between 0 and 1, got {test_fraction}"),
        ))
    }
}

/// Splits `n` samples into `(train, test)` index lists, each in ascending order. With labels the
/// split is stratified: every class contributes `round(test_fraction * count)` samples to the test
/// split (so class proportions match), chosen by a generator seeded from `seed`. Errors when either
/// split would be empty.
pub fn split_indices(
    n: usize,
    labels: Option<&[usize]>,
    test_fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    check_fraction("data.test_fraction", test_fraction)?;
    let mut rng = Rng::seed_from_u64(seed);
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        groups.entry(labels.map_or(0, |l| l[i])).or_default().push(i);
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (_, mut members) in groups {
        members.shuffle(&mut rng);
        let k = (test_fraction * members.len() as f64).round() as usize;
        test.extend_from_slice(&members[..k]);
        train.extend_from_slice(&members[k..]);
    }
    if train.is_empty() || test.is_empty() {
        return Err(Error::config(
            "data.test_fraction",
            format!(
                "{test_fraction} of {n} samples leaves {} training and {} test samples; both splits need at least one",
                train.len(),
                test.len()
            ),
        ));
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok((train, test))
}

/// The rows `indices` of a row-major table of `dim` features, with their labels.
pub fn gather(values: &[f32], labels: Option<&[usize]>, dim: usize, indices: &[usize]) -> Table {
    let mut out = Vec::with_capacity(indices.len() * dim);
    for &i in indices {
        out.extend_from_slice(&values[i * dim..(i + 1) * dim]);
    }
    Table {
        values: out,
        labels: labels.map(|l| indices.iter().map(|&i| l[i]).collect()),
    }
}

/// Checks that `rows` samples of `dim` values fit in memory ([`MAX_VALUES`] values in all);
/// `what` names the file.
pub fn check_total(rows: usize, dim: usize, what: &Path) -> Result<()> {
    match rows.checked_mul(dim) {
        Some(total) if total <= MAX_VALUES => Ok(()),
        _ => Err(Error::Data {
            path: what.to_path_buf(),
            message: format!(
                "{rows} samples of {dim} values exceed the in-memory limit of {MAX_VALUES} values; \
                 use a subset (a limit field or a smaller file)"
            ),
        }),
    }
}

/// A class subset: maps an original label to its position in `classes` (the new label), checking
/// that every listed class is below `num_classes` and listed once. Config path `path`.
pub fn class_map(classes: &[usize], num_classes: usize, path: &str) -> Result<Vec<Option<usize>>> {
    if classes.is_empty() {
        return Err(Error::config(path, "lists no class; leave it out to keep every class"));
    }
    let mut map = vec![None; num_classes];
    for (new, &c) in classes.iter().enumerate() {
        match map.get_mut(c) {
            None => {
                return Err(Error::config(
                    path,
                    format!(
                        "class {c} does not exist: classes are 0..{}",
                        num_classes.saturating_sub(1)
                    ),
                ))
            }
            Some(Some(_)) => return Err(Error::config(path, format!("class {c} is listed twice"))),
            Some(slot) => *slot = Some(new),
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u8_scaling_hits_both_ends() {
        assert_eq!(scale_u8(0, Scale::Unit), 0.0);
        assert_eq!(scale_u8(255, Scale::Unit), 1.0);
        assert_eq!(scale_u8(0, Scale::Symmetric), -1.0);
        assert_eq!(scale_u8(255, Scale::Symmetric), 1.0);
        assert!((scale_u8(51, Scale::Unit) - 0.2).abs() < 1e-7);
    }

    #[test]
    fn rescale_maps_ranges_and_refuses_outliers() {
        let mut v = vec![2.0, 4.0, 3.0];
        rescale(&mut v, (2.0, 4.0), Scale::Symmetric, Path::new("x")).unwrap();
        assert_eq!(v, vec![-1.0, 1.0, 0.0]);
        let err = rescale(&mut [5.0], (0.0, 4.0), Scale::Unit, Path::new("a.npy")).unwrap_err();
        assert!(
            err.to_string().contains("a.npy") && err.to_string().contains("input range"),
            "{err}"
        );
        let err = observed_range([&[1.0, f32::NAN][..]], Path::new("b.csv")).unwrap_err();
        assert!(err.to_string().contains("b.csv"), "{err}");
    }

    #[test]
    fn stratified_split_keeps_class_proportions_and_is_seeded() {
        let labels: Vec<usize> = (0..100).map(|i| usize::from(i >= 80)).collect();
        let (train, test) = split_indices(100, Some(&labels), 0.25, 3).unwrap();
        assert_eq!((train.len(), test.len()), (75, 25));
        assert_eq!(
            test.iter().filter(|&&i| labels[i] == 1).count(),
            5,
            "20 of class 1 -> 5 in test"
        );
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(split_indices(100, Some(&labels), 0.25, 3).unwrap().1, test);
        assert_ne!(split_indices(100, Some(&labels), 0.25, 4).unwrap().1, test);
        assert!(split_indices(1, None, 0.5, 0).is_err());
        assert!(
            matches!(split_indices(10, None, 1.0, 0), Err(Error::Config { path, .. }) if path == "data.test_fraction")
        );
    }

    #[test]
    fn class_maps_renumber_and_refuse_bad_lists() {
        assert_eq!(class_map(&[7, 2], 10, "c").unwrap()[7], Some(0));
        assert_eq!(class_map(&[7, 2], 10, "c").unwrap()[2], Some(1));
        assert!(class_map(&[10], 10, "data.classes")
            .unwrap_err()
            .to_string()
            .contains("0..9"));
        assert!(class_map(&[1, 1], 10, "c").is_err());
        assert!(class_map(&[], 10, "c").is_err());
    }
}
