//! In-memory train/test splits and the [`DataSource`] implementation every synthetic source shares,
//! plus the checks on sample counts every config makes.

use nash_core::data::{Batch, DataInfo, DataSource, Mixture, Split};
use nash_core::error::{Error, Result};
use nash_core::tensor::{matrix_from_vec, Device, FeatureShape};

/// The most values (rows x features, both splits together) a synthetic source may materialize:
/// 2^28 f32 values = 1 GiB.
pub const MAX_VALUES: usize = 1 << 28;

/// One split: `rows` samples of `dim` features, row-major, with optional labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// Row-major values, `rows * dim` of them.
    pub values: Vec<f32>,
    /// One label per row, for labelled data.
    pub labels: Option<Vec<usize>>,
}

impl Table {
    /// Number of rows for `dim` features.
    fn rows(&self, dim: usize) -> usize {
        self.values.len() / dim.max(1)
    }
}

/// A materialized synthetic data set.
#[derive(Clone, Debug)]
pub struct InMemoryData {
    description: String,
    info: DataInfo,
    train: Table,
    test: Table,
    mixture: Option<Mixture>,
}

impl InMemoryData {
    /// A data set from its splits. `value_range` of `None` means "the observed min and max over both
    /// splits" (for unbounded distributions).
    pub fn new(
        description: String,
        sample_shape: FeatureShape,
        value_range: Option<(f32, f32)>,
        train: Table,
        test: Table,
        mixture: Option<Mixture>,
    ) -> Result<Self> {
        let dim = sample_shape.numel();
        for (name, t) in [("train", &train), ("test", &test)] {
            if dim == 0 || t.values.len() % dim != 0 {
                return Err(Error::shape(
                    format!("{name} split"),
                    format!("a multiple of {dim} values"),
                    t.values.len(),
                ));
            }
            if let Some(l) = &t.labels {
                if l.len() != t.rows(dim) {
                    return Err(Error::shape(format!("{name} labels"), t.rows(dim), l.len()));
                }
            }
        }
        let num_classes = mixture.as_ref().map(|m| m.centers.len());
        let value_range = value_range.unwrap_or_else(|| observed_range(&train.values, &test.values));
        Ok(InMemoryData {
            description,
            info: DataInfo {
                sample_shape,
                num_classes,
                value_range,
            },
            train,
            test,
            mixture,
        })
    }

    /// Declares labelled data with `num_classes` classes (for sources without a [`Mixture`]); every
    /// label of both splits must be below it.
    pub fn with_num_classes(mut self, num_classes: usize) -> Result<Self> {
        for (name, t) in [("train", &self.train), ("test", &self.test)] {
            if let Some(bad) = t.labels.as_ref().and_then(|l| l.iter().find(|&&c| c >= num_classes)) {
                return Err(Error::shape(
                    format!("{name} labels"),
                    format!("class indices below {num_classes}"),
                    bad,
                ));
            }
        }
        self.info.num_classes = Some(num_classes);
        Ok(self)
    }

    /// The split's table.
    pub fn table(&self, split: Split) -> &Table {
        match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        }
    }
}

/// The smallest and largest value over both splits (`(0, 0)` when empty).
fn observed_range(a: &[f32], b: &[f32]) -> (f32, f32) {
    let mut it = a.iter().chain(b).copied();
    let Some(first) = it.next() else {
        return (0.0, 0.0);
    };
    it.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

impl DataSource for InMemoryData {
    fn describe(&self) -> String {
        self.description.clone()
    }
    fn info(&self) -> DataInfo {
        self.info.clone()
    }
    fn len(&self, split: Split) -> usize {
        self.table(split).rows(self.info.sample_shape.numel())
    }
    fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
        let dim = self.info.sample_shape.numel();
        let table = self.table(split);
        let n = table.rows(dim);
        let mut values = Vec::with_capacity(indices.len() * dim);
        let mut labels = table.labels.as_ref().map(|_| Vec::with_capacity(indices.len()));
        for &i in indices {
            if i >= n {
                return Err(Error::shape(
                    format!("batch index into the {split:?} split"),
                    format!("an index below {n}"),
                    i,
                ));
            }
            values.extend_from_slice(&table.values[i * dim..(i + 1) * dim]);
            if let (Some(out), Some(all)) = (labels.as_mut(), table.labels.as_ref()) {
                out.push(all[i]);
            }
        }
        Ok(Batch {
            inputs: matrix_from_vec(device, values, indices.len(), dim)?,
            shape: self.info.sample_shape,
            labels,
        })
    }
    fn mixture(&self) -> Option<&Mixture> {
        self.mixture.as_ref()
    }
}

/// Checks split sizes: both at least 1, and together at most [`MAX_VALUES`] values of `dim` features.
pub fn check_sizes(train_samples: usize, test_samples: usize, dim: usize) -> Result<()> {
    if train_samples == 0 {
        return Err(Error::config("data.train_samples", "must be at least 1"));
    }
    if test_samples == 0 {
        return Err(Error::config(
            "data.test_samples",
            "must be at least 1 (evaluation and metrics use the test split)",
        ));
    }
    let limit = MAX_VALUES / dim.max(1);
    if train_samples > limit {
        return Err(Error::config(
            "data.train_samples",
            format!("{train_samples} samples of {dim} features exceed the limit of {MAX_VALUES} values; use at most {limit}"),
        ));
    }
    if test_samples > limit - train_samples {
        return Err(Error::config(
            "data.test_samples",
            format!(
                "{test_samples} test samples on top of {train_samples} training samples of {dim} features exceed the limit of {MAX_VALUES} values; use at most {}",
                limit - train_samples
            ),
        ));
    }
    Ok(())
}

/// Checks that `value` is finite and positive.
pub fn check_positive(path: &str, value: f32) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::config(path, format!("must be a finite number > 0, got {value}")))
    }
}
