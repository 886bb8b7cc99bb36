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
pub trait DataSourceConfig: std::fmt::Debug {
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
        if self.position + self.batch_size > self.len {
            self.epoch += 1;
            self.position = 0;
            self.shuffle();
        }
        let idx = &self.order[self.position..self.position + self.batch_size];
        self.position += self.batch_size;
        data.batch(self.split, idx, device)
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
