//! Data sources (indexed data sets, typetag-configured) and the seeded loader that batches them.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::StateDict;
use crate::tensor::{Device, FeatureShape, Matrix, Rng};
use dfdx::shapes::HasShape;

/// Which part of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training samples.
    Train,
    /// Held-out samples.
    Test,
}

/// A batch of samples: one per row of `inputs`, with optional class labels.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[batch, numel]` values.
    pub inputs: Matrix,
    /// The per-sample shape.
    pub shape: FeatureShape,
    /// One class index per sample, for labelled data.
    pub labels: Option<Vec<usize>>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.inputs.shape().0
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a model needs to know about the data to wire itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// Shape of one sample.
    pub sample_shape: FeatureShape,
    /// Number of classes, for labelled data.
    pub num_classes: Option<usize>,
    /// The range sample values lie in, `(low, high)`.
    pub value_range: (f32, f32),
}

/// A mixture of isotropic Gaussians with known modes, for mode-coverage metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mixture {
    /// The mode centers.
    pub centers: Vec<Vec<f32>>,
    /// The standard deviation of each component.
    pub sigma: f32,
}

/// An indexed data set with a train and a test split.
pub trait DataSource {
    /// A one-line description.
    fn describe(&self) -> String;
    /// Shapes, classes and value range.
    fn info(&self) -> DataInfo;
    /// Number of samples in `split`.
    fn len(&self, split: Split) -> usize;
    /// The samples at `indices` of `split`, as a batch on `device`.
    fn batch(&self, split: Split, indices: &[usize], device: &Device) -> Result<Batch>;
    /// The generating mixture, if the data is a known Gaussian mixture.
    fn mixture(&self) -> Option<&Mixture> {
        None
    }
}

/// Serializable description of a [`DataSource`]; `type = "ring"` in pipeline files.
#[typetag::serde(tag = "type")]
pub trait DataSourceConfig: std::fmt::Debug + Send + Sync {
    /// Builds (loads or synthesizes) the data set; synthetic sources draw from `seed`.
    fn build(&self, seed: u64) -> Result<Box<dyn DataSource>>;
}

/// Shuffles a split once per epoch with a seeded generator and hands out batches; its position is
/// part of a checkpoint so that a resumed run sees the same batches.
#[derive(Clone, Debug)]
pub struct DataLoader {
    split: Split,
    batch_size: usize,
    seed: u64,
    len: usize,
    epoch: u64,
    position: usize,
    order: Vec<usize>,
}

impl DataLoader {
    /// A loader over `len` samples of `split`, shuffled per epoch from `seed`.
    pub fn new(split: Split, len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::config("training.batch_size", "must be at least 1"));
        }
        if len < batch_size {
            return Err(Error::config(
                "training.batch_size",
                format!("the {split:?} split has {len} samples, fewer than one batch of {batch_size}"),
            ));
        }
        let mut loader = DataLoader {
            split,
            batch_size,
            seed,
            len,
            epoch: 0,
            position: 0,
            order: Vec::new(),
        };
        loader.shuffle();
        Ok(loader)
    }
    fn shuffle(&mut self) {
        let mut rng = Rng::seed_from_u64(self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.order = (0..self.len).collect();
        self.order.shuffle(&mut rng);
    }
    /// The next batch (dropping an incomplete last one), starting a new epoch when needed.
    pub fn next_batch(&mut self, data: &dyn DataSource, device: &Device) -> Result<Batch> {
        let idx = &self.order[self.position..self.position + self.batch_size];
        let batch = data.batch(self.split, idx, device)?;
        self.position += self.batch_size;
        if self.position + self.batch_size > self.len {
            // The epoch is complete: the next batch starts a freshly shuffled one.
            self.epoch += 1;
            self.position = 0;
            self.shuffle();
        }
        Ok(batch)
    }
    /// Completed epochs.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.len / self.batch_size
    }
    /// Epoch and position, for checkpoints.
    pub fn state(&self) -> StateDict {
        let mut s = StateDict::default();
        s.meta.insert("epoch".into(), self.epoch.into());
        s.meta.insert("position".into(), self.position.into());
        s
    }
    /// Restores [`DataLoader::state`].
    pub fn load_state(&mut self, state: &StateDict) -> Result<()> {
        self.epoch = state.meta("epoch")?;
        self.position = state.meta("position")?;
        self.shuffle();
        Ok(())
    }
}

/// Deterministic batches covering a whole split in order (the last may be smaller).
pub fn eval_batches(data: &dyn DataSource, split: Split, batch_size: usize, device: &Device) -> Result<Vec<Batch>> {
    let n = data.len(split);
    (0..n)
        .step_by(batch_size.max(1))
        .map(|start| {
            let idx: Vec<usize> = (start..(start + batch_size).min(n)).collect();
            data.batch(split, &idx, device)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfdx::tensor::TensorFromVec;

    /// Ten samples whose single feature is their index.
    struct Indices;

    impl DataSource for Indices {
        fn describe(&self) -> String {
            "indices".into()
        }
        fn info(&self) -> DataInfo {
            DataInfo {
                sample_shape: FeatureShape::Flat(1),
                num_classes: None,
                value_range: (0.0, 9.0),
            }
        }
        fn len(&self, _split: Split) -> usize {
            10
        }
        fn batch(&self, _split: Split, indices: &[usize], device: &Device) -> Result<Batch> {
            let values = indices.iter().map(|&i| i as f32).collect();
            Ok(Batch {
                inputs: device.tensor_from_vec(values, (indices.len(), 1)),
                shape: FeatureShape::Flat(1),
                labels: None,
            })
        }
    }

    fn take(loader: &mut DataLoader, device: &Device) -> Vec<usize> {
        loader
            .next_batch(&Indices, device)
            .unwrap()
            .inputs
            .as_vec()
            .iter()
            .map(|&v| v as usize)
            .collect()
    }

    #[test]
    fn epochs_visit_distinct_samples_and_count_when_complete() {
        let device = Device::default();
        let mut loader = DataLoader::new(Split::Train, 10, 3, 7).unwrap();
        assert_eq!(loader.batches_per_epoch(), 3);
        let mut seen: Vec<usize> = (0..3).flat_map(|_| take(&mut loader, &device)).collect();
        assert_eq!(loader.epoch(), 1, "three batches of three complete an epoch of ten");
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 9, "an epoch never repeats a sample");
        let second: Vec<usize> = (0..3).flat_map(|_| take(&mut loader, &device)).collect();
        assert_eq!(loader.epoch(), 2);
        assert_ne!(second, (0..9).collect::<Vec<_>>(), "epochs are shuffled");
    }

    #[test]
    fn state_round_trip_resumes_the_same_batches() {
        let device = Device::default();
        let mut straight = DataLoader::new(Split::Train, 10, 3, 11).unwrap();
        let mut resumed = DataLoader::new(Split::Train, 10, 3, 11).unwrap();
        for _ in 0..4 {
            take(&mut straight, &device);
            take(&mut resumed, &device);
        }
        let state = resumed.state();
        let mut fresh = DataLoader::new(Split::Train, 10, 3, 11).unwrap();
        fresh.load_state(&state).unwrap();
        for _ in 0..5 {
            assert_eq!(take(&mut straight, &device), take(&mut fresh, &device));
        }
    }

    #[test]
    fn refuses_batches_larger_than_the_split() {
        let err = DataLoader::new(Split::Test, 5, 8, 0).unwrap_err().to_string();
        assert!(
            err.contains("training.batch_size") && err.contains("5 samples"),
            "{err}"
        );
    }
}
