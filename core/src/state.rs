//! Serializable state of optimizers, stabilizers, models and data loaders, for checkpoints.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A named bag of tensors (host copies) and JSON metadata: what a component must save to be
/// resumed exactly. Tensors go to safetensors files, metadata to JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateDict {
    /// Tensors by name: shape and values.
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// Scalars and other small values.
    pub meta: BTreeMap<String, serde_json::Value>,
}

impl StateDict {
    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty() && self.meta.is_empty()
    }
    /// Stores a tensor.
    pub fn put_tensor(&mut self, key: impl Into<String>, shape: Vec<usize>, values: Vec<f32>) {
        self.tensors.insert(key.into(), (shape, values));
    }
    /// A stored tensor, or an error naming the key.
    pub fn tensor(&self, key: &str) -> Result<&(Vec<usize>, Vec<f32>)> {
        self.tensors
            .get(key)
            .ok_or_else(|| Error::state(key, "missing from the saved state"))
    }
    /// Stores a metadata value.
    pub fn put_meta(&mut self, key: impl Into<String>, value: impl Serialize) -> Result<()> {
        self.meta.insert(key.into(), serde_json::to_value(value)?);
        Ok(())
    }
    /// A stored metadata value, deserialized, or an error naming the key.
    pub fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        let v = self
            .meta
            .get(key)
            .ok_or_else(|| Error::state(key, "missing from the saved state"))?;
        serde_json::from_value(v.clone()).map_err(|e| Error::state(key, e.to_string()))
    }
    /// Copies every entry of `other` under `prefix.`.
    pub fn extend_prefixed(&mut self, prefix: &str, other: StateDict) {
        for (k, v) in other.tensors {
            self.tensors.insert(format!("{prefix}.{k}"), v);
        }
        for (k, v) in other.meta {
            self.meta.insert(format!("{prefix}.{k}"), v);
        }
    }
    /// The entries under `prefix.`, with the prefix removed.
    pub fn sub(&self, prefix: &str) -> StateDict {
        let p = format!("{prefix}.");
        StateDict {
            tensors: self
                .tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(&p).map(|k| (k.to_string(), v.clone())))
                .collect(),
            meta: self
                .meta
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(&p).map(|k| (k.to_string(), v.clone())))
                .collect(),
        }
    }
}
