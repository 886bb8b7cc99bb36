//! Weight files: a model's parameters in one safetensors file with string metadata, written
//! atomically and identified by the SHA-256 of their bytes; and nash's cache folder, where weights
//! that nash makes for itself (the feature network of sample-quality metrics) are kept.
//!
//! A weight file holds every parameter and buffer of [`Parameterized::named_params`] under its
//! dotted name with its logical shape, in f32. [`load_params`] refuses a file whose names or
//! shapes differ from the model's and says which.
//!
//! [`feature_networks`] defines the cache layout of nash's feature networks, which `nash features
//! build` writes and the sample-quality metrics read.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::tensor::Param;

/// The folder nash caches what it makes for itself in: `$NASH_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/nash`, else `$HOME/.cache/nash`, else `.nash-cache` in the working folder.
pub fn cache_dir() -> PathBuf {
    let non_empty = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty("NASH_CACHE_DIR") {
        return dir;
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return dir.join("nash");
    }
    if let Some(home) = non_empty("HOME") {
        return home.join(".cache").join("nash");
    }
    PathBuf::from(".nash-cache")
}

/// The SHA-256 of `bytes` as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The SHA-256 of the file at `path` as 64 lowercase hex digits.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `params` (name, parameter) with `metadata` to `path` as safetensors: to a temporary
/// file in the same folder, synced, then renamed over `path`, so a crash leaves either the old
/// file or the new one. Returns the SHA-256 of the bytes written.
pub fn save_params(path: &Path, params: &[(String, &Param)], metadata: &BTreeMap<String, String>) -> Result<String> {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|(name, p)| {
            let bytes = p.to_vec().iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), p.shape.clone(), bytes)
        })
        .collect();
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::Other(format!("weights `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Other(format!("cannot encode weights for {}: {e}", path.display())))?;
    write_atomically(path, &bytes)?;
    Ok(sha256_hex(&bytes))
}

/// Writes `bytes` to `path` through a synced temporary file renamed over it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all().ok();
        }
        Ok(())
    })();
    result.map_err(|e| {
        std::fs::remove_file(&tmp).ok();
        Error::io(path, e)
    })
}

/// Loads the weight file at `path` into `params`, which must match it name for name and shape for
/// shape (in any order). Returns the file's metadata.
pub fn load_params(path: &Path, params: Vec<(String, &mut Param)>) -> Result<BTreeMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let data_error = |message: String| Error::Data {
        path: path.to_path_buf(),
        message,
    };
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| data_error(format!("not a safetensors weight file ({e})")))?;
    let metadata: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let file =
        SafeTensors::deserialize(&bytes).map_err(|e| data_error(format!("not a safetensors weight file ({e})")))?;
    let expected: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    let mut stored: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    stored.sort();
    for name in &stored {
        if !expected.contains(&name.as_str()) {
            return Err(data_error(format!(
                "holds `{name}`, which the model does not have (the model's parameters: {})",
                expected.join(", ")
            )));
        }
    }
    for (name, param) in params {
        let view = file
            .tensor(&name)
            .map_err(|_| data_error(format!("has no parameter `{name}` (it holds: {})", stored.join(", "))))?;
        if view.dtype() != Dtype::F32 || view.shape() != param.shape.as_slice() {
            return Err(data_error(format!(
                "`{name}` is {:?} {:?}, the model expects F32 {:?}",
                view.dtype(),
                view.shape(),
                param.shape
            )));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        param.set(&values)?;
    }
    Ok(metadata)
}

/// The cache layout of nash's feature networks: the one definition shared by the producer
/// (`nash features build` / `list`) and the consumer (the sample-quality metrics' loader).
///
/// ```text
/// <cache>/features/<name>/weights.safetensors   every parameter and buffer (batch-norm running
///                                               statistics included), metadata {"nash.feature_network": name}
/// <cache>/features/<name>/network.json          written last: a pretty-printed [`FeatureNetworkEntry`]
/// <cache>/features/<name>/run/                  the training run folder (metrics, checkpoints)
/// ```
///
/// `<cache>` is [`cache_dir`](super::cache_dir) unless a command is told otherwise. An entry is
/// valid when `network.json` parses with [`FORMAT`] and the SHA-256 of `weights.safetensors` equals
/// its `weights_sha256`.
pub mod feature_networks {
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Serialize};

    use crate::data::DataInfo;

    /// The version of the `network.json` layout.
    pub const FORMAT: u32 = 1;
    /// The entry file of a cached feature network.
    pub const ENTRY_FILE: &str = "network.json";
    /// The weight file of a cached feature network.
    pub const WEIGHTS_FILE: &str = "weights.safetensors";
    /// The metadata key of the weight file whose value names the network.
    pub const WEIGHTS_METADATA_KEY: &str = "nash.feature_network";
    /// The sub-folder of the cache that holds one folder per feature network.
    pub const FEATURES_DIR: &str = "features";

    /// `<cache>/features`: the folder of every cached feature network.
    pub fn features_root(cache: &Path) -> PathBuf {
        cache.join(FEATURES_DIR)
    }

    /// `<name>@sha256:<first 12 hex digits of sha256>`: the id of network `name` whose weights hash
    /// to `sha256`, which scores cite.
    pub fn make_id(name: &str, sha256: &str) -> String {
        format!("{name}@sha256:{}", &sha256[..sha256.len().min(12)])
    }

    /// `network.json`: what a cached feature network is and how good it is. The fields are written
    /// in this order.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct FeatureNetworkEntry {
        /// The layout version ([`FORMAT`]).
        pub format: u32,
        /// The network's name (its folder's name).
        pub name: String,
        /// [`make_id`]`(name, weights_sha256)`: what scores cite.
        pub id: String,
        /// The SHA-256 of `weights.safetensors`, 64 lowercase hex digits.
        pub weights_sha256: String,
        /// The model config as in a pipeline file (typetag JSON, `{"type": "classifier", ...}`);
        /// deserialize it into a `Box<dyn ModelConfig>` with the plugin that provides the type loaded.
        pub model: serde_json::Value,
        /// The data the model was built for (sample shape, classes, value range).
        pub data: DataInfo,
        /// Accuracy over the whole test split.
        pub test_accuracy: f64,
        /// Number of test samples it was measured on.
        pub test_samples: usize,
        /// Training steps.
        pub steps: u64,
        /// The training pipeline's hash (as checkpoints record it).
        pub pipeline_hash: String,
        /// When it was made (UTC, RFC 3339).
        pub created: String,
        /// The nash version that made it.
        pub nash_version: String,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{Device, ParamRole};

    #[test]
    fn sha256_matches_the_standard_test_vector() {
        // FIPS 180-2, appendix B.1: SHA-256("abc").
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn params_round_trip_with_metadata_and_mismatches_are_named() {
        let device = Device::default();
        let dir = std::env::temp_dir().join(format!("nash-weights-test-{}", std::process::id()));
        let path = dir.join("w.safetensors");
        let a = Param::from_vec(&device, vec![1.0, -2.5, 3.0, 0.25], vec![2, 2], ParamRole::Weight).unwrap();
        let b = Param::from_vec(&device, vec![7.0], vec![1], ParamRole::Bias).unwrap();
        let meta = BTreeMap::from([("model".to_string(), "{\"type\":\"x\"}".to_string())]);
        let digest = save_params(&path, &[("net.w".into(), &a), ("net.b".into(), &b)], &meta).unwrap();
        assert_eq!(digest, sha256_file(&path).unwrap());

        let mut a2 = Param::from_vec(&device, vec![0.0; 4], vec![2, 2], ParamRole::Weight).unwrap();
        let mut b2 = Param::from_vec(&device, vec![0.0], vec![1], ParamRole::Bias).unwrap();
        let read = load_params(&path, vec![("net.b".into(), &mut b2), ("net.w".into(), &mut a2)]).unwrap();
        assert_eq!(read, meta);
        assert_eq!(a2.to_vec(), a.to_vec());
        assert_eq!(b2.to_vec(), vec![7.0]);

        let mut wrong = Param::from_vec(&device, vec![0.0; 2], vec![2], ParamRole::Weight).unwrap();
        let mut b3 = b2.clone();
        let err = load_params(&path, vec![("net.w".into(), &mut wrong), ("net.b".into(), &mut b3)]).unwrap_err();
        assert!(err.to_string().contains("`net.w` is F32 [2, 2]"), "{err}");
        let err = load_params(&path, vec![("net.w".into(), &mut a2)]).unwrap_err();
        assert!(err.to_string().contains("holds `net.b`"), "{err}");
        std::fs::write(&path, b"not weights").unwrap();
        let err = load_params(&path, vec![("net.w".into(), &mut a2)]).unwrap_err();
        assert!(err.to_string().contains("not a safetensors weight file"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn feature_network_entries_keep_their_layout() {
        use super::feature_networks::*;
        let sha = "0123456789abcdef".repeat(4);
        assert_eq!(make_id("f", &sha), "f@sha256:0123456789ab");
        assert_eq!(make_id("f", "abc"), "f@sha256:abc");
        assert_eq!(
            features_root(Path::new("/c")).join("n").join(ENTRY_FILE),
            Path::new("/c/features/n/network.json")
        );
        let entry = FeatureNetworkEntry {
            format: FORMAT,
            name: "n".into(),
            id: make_id("n", &sha),
            weights_sha256: sha.clone(),
            model: serde_json::json!({"type": "classifier"}),
            data: crate::data::DataInfo {
                sample_shape: crate::tensor::FeatureShape::Flat(2),
                num_classes: Some(3),
                value_range: (0.0, 1.0),
            },
            test_accuracy: 0.5,
            test_samples: 4,
            steps: 7,
            pipeline_hash: "h".into(),
            created: "2026-01-01T00:00:00Z".into(),
            nash_version: "0.1.0".into(),
        };
        // The field order of network.json is part of the layout (`nash features build` writes it
        // pretty-printed): the keys come out in declaration order.
        let text = serde_json::to_string(&entry).unwrap();
        let keys = [
            "format",
            "name",
            "id",
            "weights_sha256",
            "model",
            "data",
            "test_accuracy",
            "test_samples",
            "steps",
            "pipeline_hash",
            "created",
            "nash_version",
        ];
        let positions: Vec<usize> = keys.iter().map(|k| text.find(&format!("\"{k}\":")).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert_eq!(serde_json::from_str::<FeatureNetworkEntry>(&text).unwrap(), entry);
    }
}
