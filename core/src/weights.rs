//! Weight files: a model's parameters in one safetensors file with string metadata, written
//! atomically and identified by the SHA-256 of their bytes; and nash's cache folder, where weights
//! that nash makes for itself (the feature network of sample-quality metrics) are kept.
//!
//! A weight file holds every parameter and buffer of [`Parameterized::named_params`] under its
//! dotted name with its logical shape, in f32. [`load_params`] refuses a file whose names or
//! shapes differ from the model's and says which.

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
}
