//! The numerical core of the image sample-quality scores, as pure functions on feature matrices.
//!
//! - [`Features`]: a row-major f64 matrix of `rows` samples by `dim` features (finite values only).
//! - [`Gaussian`] and [`frechet_distance`]: FID (Heusel et al. 2017) as pytorch-fid computes it.
//! - [`kernel_inception_distance`]: KID (Bińkowski et al. 2018), unbiased MMD² with the cubic
//!   polynomial kernel over random subsets, as torch-fidelity computes it.
//! - [`precision_recall`]: improved precision and recall (Kynkäänniemi et al. 2019), k-NN balls.
//! - [`classifier_score`] and [`softmax_rows`]: the Inception-score analogue (Salimans et al. 2016).
//! - [`linalg`]: symmetric eigen-decomposition and PSD matrix square root (f64).
//!
//! Every function returns `nash_core::Error` (never panics) on mismatched dimensions, too few rows,
//! invalid parameters or non-finite values. Pairwise work (k-NN, kernels, covariance) runs on
//! blocked dot products split over `std::thread::available_parallelism()` scoped threads; results
//! do not depend on the thread count.

pub mod classifier_score;
pub mod fid;
pub mod kid;
pub mod linalg;
pub mod precision_recall;

use nash_core::error::{Error, Result};

pub use classifier_score::{classifier_score, softmax_rows};
pub use fid::{frechet_distance, Gaussian};
pub use kid::kernel_inception_distance;
pub use precision_recall::precision_recall;

/// Row-major f64 feature matrix: `rows` samples of `dim` features, all finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Features {
    rows: usize,
    dim: usize,
    values: Vec<f64>,
}

impl Features {
    /// A matrix from row-major values; errors unless `values.len() == rows * dim`, `dim >= 1` and
    /// every value is finite.
    pub fn new(rows: usize, dim: usize, values: Vec<f64>) -> Result<Self> {
        if dim == 0 {
            return Err(Error::shape("features", "at least 1 feature per row", "0"));
        }
        if values.len() != rows * dim {
            return Err(Error::shape(
                "features",
                format!("{rows} x {dim} = {} values", rows * dim),
                format!("{} values", values.len()),
            ));
        }
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("features (row {}, column {}: {})", at / dim, at % dim, values[at]),
            });
        }
        Ok(Features { rows, dim, values })
    }

    /// A matrix from row-major f32 values (widened to f64), with the checks of [`Features::new`].
    pub fn from_f32(rows: usize, dim: usize, values: &[f32]) -> Result<Self> {
        Features::new(rows, dim, values.iter().map(|&v| f64::from(v)).collect())
    }

    /// Number of samples.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of features per sample.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Row `i` (panics if `i >= rows()`, like slice indexing).
    pub fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// All values, row-major.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// The rows at `indices`, in that order (repeats allowed; panics on an index `>= rows()`, like
    /// slice indexing).
    pub fn select(&self, indices: &[usize]) -> Features {
        let mut values = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            values.extend_from_slice(self.row(i));
        }
        Features {
            rows: indices.len(),
            dim: self.dim,
            values,
        }
    }

    /// `self`'s rows followed by `other`'s; errors if the feature dimensions differ.
    pub fn concat(&self, other: &Features) -> Result<Features> {
        check_same_dim("concatenated features", self, other)?;
        let mut values = Vec::with_capacity(self.values.len() + other.values.len());
        values.extend_from_slice(&self.values);
        values.extend_from_slice(&other.values);
        Ok(Features {
            rows: self.rows + other.rows,
            dim: self.dim,
            values,
        })
    }

    /// The transpose: `dim` rows of `rows` values.
    pub(crate) fn transposed(&self) -> Features {
        let mut values = vec![0.0; self.values.len()];
        for i in 0..self.rows {
            for j in 0..self.dim {
                values[j * self.rows + i] = self.values[i * self.dim + j];
            }
        }
        Features {
            rows: self.dim,
            dim: self.rows,
            values,
        }
    }

    /// Squared Euclidean norm of every row (computed with the same dot product as
    /// [`map_rows_dots`], so `‖x‖² + ‖x‖² - 2 x·x` is exactly 0 for a repeated row).
    pub(crate) fn squared_norms(&self) -> Vec<f64> {
        (0..self.rows).map(|i| linalg::dot(self.row(i), self.row(i))).collect()
    }
}

/// Errors unless `a` and `b` have the same feature dimension.
pub(crate) fn check_same_dim(context: &str, a: &Features, b: &Features) -> Result<()> {
    if a.dim != b.dim {
        return Err(Error::shape(
            context,
            format!("both sets with {} features per row", a.dim),
            format!("{} and {}", a.dim, b.dim),
        ));
    }
    Ok(())
}

/// Rows of `a` handled per work item; the dot buffer of one item is `CHUNK_ROWS x b.rows()`.
const CHUNK_ROWS: usize = 16;
/// Rows of `b` per cache block (128 rows of 512 f64 features = 512 KiB at most).
const BLOCK_COLS: usize = 128;

/// For every row `i` of `a`, computes the dot products `a_i · b_j` for all rows `j` of `b` and
/// returns `f(i, &dots)`, in row order. Work is split in chunks of rows over scoped threads (when it
/// is large enough to pay); every dot product is computed identically whatever the split.
pub(crate) fn map_rows_dots<T, F>(a: &Features, b: &Features, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &[f64]) -> T + Sync,
{
    debug_assert_eq!(a.dim, b.dim);
    let chunks = a.rows.div_ceil(CHUNK_ROWS);
    let work = a.rows as f64 * b.rows as f64 * a.dim as f64;
    let threads = if work < 4e6 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(chunks)
    };
    let run_chunk = |c: usize| -> Vec<T> {
        let start = c * CHUNK_ROWS;
        let end = (start + CHUNK_ROWS).min(a.rows);
        let nb = b.rows;
        let mut buffer = vec![0.0; (end - start) * nb];
        for j0 in (0..nb).step_by(BLOCK_COLS) {
            let j1 = (j0 + BLOCK_COLS).min(nb);
            let block = &b.values[j0 * b.dim..j1 * b.dim];
            for i in start..end {
                let out = &mut buffer[(i - start) * nb + j0..(i - start) * nb + j1];
                linalg::fill_dots(a.row(i), block, out);
            }
        }
        (start..end)
            .map(|i| f(i, &buffer[(i - start) * nb..(i - start + 1) * nb]))
            .collect()
    };
    if threads <= 1 {
        return (0..chunks).flat_map(run_chunk).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut parts: Vec<(usize, Vec<T>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if c >= chunks {
                            break done;
                        }
                        done.push((c, run_chunk(c)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(done) => done,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    parts.sort_by_key(|(c, _)| *c);
    parts.into_iter().flat_map(|(_, v)| v).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_check_shape_and_finiteness() {
        assert!(Features::new(2, 3, vec![0.0; 5]).is_err());
        assert!(Features::new(2, 0, vec![]).is_err());
        let err = Features::new(2, 2, vec![0.0, 1.0, f64::NAN, 2.0]).unwrap_err();
        assert!(err.to_string().contains("row 1, column 0"), "{err}");
        assert!(Features::from_f32(1, 2, &[1.0, f32::INFINITY]).is_err());
        let f = Features::from_f32(3, 2, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!((f.rows(), f.dim()), (3, 2));
        assert_eq!(f.row(1), &[3.0, 4.0]);
        let s = f.select(&[2, 0, 2]);
        assert_eq!(s.values(), &[5.0, 6.0, 1.0, 2.0, 5.0, 6.0]);
        let c = f.concat(&s).unwrap();
        assert_eq!(c.rows(), 6);
        assert_eq!(c.row(3), &[5.0, 6.0]);
        let other = Features::new(1, 3, vec![0.0; 3]).unwrap();
        assert!(f.concat(&other).is_err());
        assert_eq!(f.transposed().values(), &[1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn map_rows_dots_matches_naive_single_and_multi_threaded() {
        use nash_core::rand::{Rng as _, SeedableRng};
        let mut rng = nash_core::tensor::Rng::seed_from_u64(3);
        // Small (single-threaded path) and large enough for threads, with ragged chunk and block edges.
        for (na, nb, d) in [(5, 7, 3), (70, 300, 200)] {
            let a = Features::new(na, d, (0..na * d).map(|_| rng.gen_range(-1.0..1.0)).collect()).unwrap();
            let b = Features::new(nb, d, (0..nb * d).map(|_| rng.gen_range(-1.0..1.0)).collect()).unwrap();
            let got = map_rows_dots(&a, &b, |i, dots| (i, dots.to_vec()));
            assert_eq!(got.len(), na);
            for (i, (gi, dots)) in got.iter().enumerate() {
                assert_eq!(*gi, i);
                for (j, &v) in dots.iter().enumerate() {
                    let naive: f64 = a.row(i).iter().zip(b.row(j)).map(|(x, y)| x * y).sum();
                    assert!((v - naive).abs() < 1e-12, "({i}, {j}): {v} vs {naive}");
                }
            }
        }
    }
}
