//! `npy`: NumPy `.npy` arrays and `.npz` archives.
//!
//! Supported element types (little-endian, C order): `f32` (`<f4`), `f64` (`<f8`), `u8` (`|u1`),
//! `i32` (`<i4`) and `i64` (`<i8`). Fortran-ordered and big-endian arrays are refused with the
//! NumPy call that fixes them. The first axis indexes samples; the trailing axes give the sample
//! shape:
//!
//! | array shape | sample shape |
//! |---|---|
//! | `[n]` | one feature |
//! | `[n, d]` | `d` features |
//! | `[n, h, w]` | a 1-channel `h x w` image |
//! | `[n, c, h, w]` | a `c`-channel image (channel-major, as nash stores images) |
//! | `[n, h, w, c]` with `channels_last = true` | transposed to `[c, h, w]` |
//!
//! A `.npz` archive holds named arrays (`np.savez(path, x=..., y=...)`, stored or deflated); `key`
//! picks the samples and `labels` the labels. Keras-style archives with `x_train`, `y_train`,
//! `x_test`, `y_test` map to `key`, `labels`, `test_key`, `test_labels`. For `.npy` files, `labels`
//! and `test_labels` are paths to `.npy` label files.
//!
//! Without a test file or key, a seeded (stratified, when labelled) `test_fraction` split is made.
//! Values are kept as they are unless `scale` is set; `u8` data with `scale` maps 0..255, other data
//! its observed range (or `input_range`) onto [0, 1] or [-1, 1].

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use nash_core::data::{DataSource, DataSourceConfig};
use nash_core::error::{Error, Result};
use nash_core::tensor::FeatureShape;
use serde::{Deserialize, Serialize};

use crate::preprocess::{check_fraction, check_total, gather, observed_range, rescale, split_indices};
use crate::table::{InMemoryData, Table};
use crate::Scale;

/// NumPy arrays as a data set (see the module docs for shapes, dtypes and `.npz` keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NpyConfig {
    /// The `.npy` or `.npz` file with the training samples (all samples when no test split is given).
    pub path: String,
    /// The array of samples inside a `.npz` (default: its only array besides the labels).
    pub key: Option<String>,
    /// Labels: a key in the `.npz`, or the path of a `.npy` label file. Integer class indices >= 0.
    pub labels: Option<String>,
    /// A separate `.npy`/`.npz` file with the test samples (default: `path`, when `test_key` is set).
    pub test_path: Option<String>,
    /// The array of test samples inside a `.npz`.
    pub test_key: Option<String>,
    /// Test labels: a key in the test `.npz`, or the path of a `.npy` label file.
    pub test_labels: Option<String>,
    /// `[n, h, w, c]` arrays are channels-last: transpose each sample to `[c, h, w]`.
    pub channels_last: bool,
    /// Rescale values to `unit` [0, 1] or `symmetric` [-1, 1]; leave out to keep raw values.
    pub scale: Option<Scale>,
    /// The `[low, high]` range `scale` maps from (default: 0..255 for `u8`, else the observed range).
    pub input_range: Option<[f32; 2]>,
    /// Fraction of samples held out for testing when no test file or key is given.
    pub test_fraction: f64,
    /// Seed of that split (fixed, so runs with different seeds evaluate on the same samples).
    pub split_seed: u64,
}

impl Default for NpyConfig {
    fn default() -> Self {
        NpyConfig {
            path: String::new(),
            key: None,
            labels: None,
            test_path: None,
            test_key: None,
            test_labels: None,
            channels_last: false,
            scale: None,
            input_range: None,
            test_fraction: 0.1,
            split_seed: 0,
        }
    }
}

/// The element types read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `<f4`.
    F32,
    /// `<f8`.
    F64,
    /// `|u1`.
    U8,
    /// `<i4`.
    I32,
    /// `<i8`.
    I64,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
        }
    }
}

/// A decoded array: its shape, element type and values as `f64` (exact for every supported type
/// within ±2^53).
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// The array's shape.
    pub shape: Vec<usize>,
    /// The element type in the file.
    pub dtype: Dtype,
    /// The values, C order.
    pub values: Vec<f64>,
}

fn data_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The value of `key` in a NumPy header dict: the text after `'key':` up to the matching end.
fn header_value<'a>(header: &'a str, key: &str, path: &Path) -> Result<&'a str> {
    let pat = format!("'{key}':");
    let start = header
        .find(&pat)
        .ok_or_else(|| data_err(path, format!("the .npy header `{header}` has no '{key}' entry")))?
        + pat.len();
    Ok(header[start..].trim_start())
}

/// Parses a `.npy` file's bytes (`what` names it in errors).
pub fn parse_npy(bytes: &[u8], what: &Path) -> Result<Array> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(data_err(
            what,
            "not a .npy file: it does not start with the magic \\x93NUMPY",
        ));
    }
    let (header_len, offset) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => {
            return Err(data_err(
                what,
                format!(".npy format version {v} is not supported (1, 2 or 3)"),
            ))
        }
    };
    let header = bytes.get(offset..offset + header_len).ok_or_else(|| {
        data_err(
            what,
            format!("truncated: the header promises {header_len} header bytes"),
        )
    })?;
    let header = std::str::from_utf8(header).map_err(|_| data_err(what, "the .npy header is not text"))?;
    let descr = header_value(header, "descr", what)?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| data_err(what, format!("cannot read 'descr' in the .npy header `{header}`")))?;
    let dtype = match descr {
        "<f4" => Dtype::F32,
        "<f8" => Dtype::F64,
        "|u1" | "<u1" => Dtype::U8,
        "<i4" => Dtype::I32,
        "<i8" => Dtype::I64,
        d if d.starts_with('>') => {
            return Err(data_err(
                what,
                format!("big-endian dtype `{d}` is not supported; save with arr.astype(arr.dtype.newbyteorder('<'))"),
            ))
        }
        d => {
            return Err(data_err(
                what,
                format!("dtype `{d}` is not supported: use float32 (<f4), float64 (<f8), uint8 (|u1), int32 (<i4) or int64 (<i8)"),
            ))
        }
    };
    let fortran = header_value(header, "fortran_order", what)?;
    if fortran.starts_with("True") {
        return Err(data_err(
            what,
            "Fortran-ordered arrays are not supported; save np.ascontiguousarray(arr) instead",
        ));
    }
    let shape_text = header_value(header, "shape", what)?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| data_err(what, format!("cannot read 'shape' in the .npy header `{header}`")))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| data_err(what, format!("cannot read the shape ({shape_text}) in the .npy header")))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| data_err(what, format!("shape {shape:?} is too large")))?;
    let data = &bytes[offset + header_len..];
    let expected = count
        .checked_mul(dtype.size())
        .ok_or_else(|| data_err(what, format!("shape {shape:?} is too large")))?;
    if data.len() != expected {
        return Err(data_err(
            what,
            format!(
                "{}: the header promises shape {shape:?} of {descr} = {expected} data bytes, the file has {}",
                if data.len() < expected { "truncated" } else { "too long" },
                data.len()
            ),
        ));
    }
    let values = match dtype {
        Dtype::U8 => data.iter().map(|&v| f64::from(v)).collect(),
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::I32 => data
            .chunks_exact(4)
            .map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8")))
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8")) as f64)
            .collect(),
    };
    Ok(Array { shape, dtype, values })
}

fn is_npz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz"))
}

fn read_file(path: &Path, field: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            data_err(
                path,
                format!("not found; set `data.{field}` to an existing .npy or .npz file"),
            )
        } else {
            Error::io(path, e)
        }
    })
}

/// The names of the arrays in a `.npz` archive.
pub fn npz_keys(path: &Path) -> Result<Vec<String>> {
    Ok(archive_keys(&open_npz(path, "path")?))
}

/// The array names (member names without `.npy`) of an open archive.
fn archive_keys(archive: &zip::ZipArchive<File>) -> Vec<String> {
    let mut keys: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.strip_suffix(".npy"))
        .map(String::from)
        .collect();
    keys.sort();
    keys
}

fn open_npz(path: &Path, field: &str) -> Result<zip::ZipArchive<File>> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            data_err(
                path,
                format!("not found; set `data.{field}` to an existing .npy or .npz file"),
            )
        } else {
            Error::io(path, e)
        }
    })?;
    zip::ZipArchive::new(file).map_err(|e| data_err(path, format!("not a readable .npz (zip) archive: {e}")))
}

/// Reads the array `key` of the `.npz` at `path`; with no key, the only array not in `exclude`.
fn read_npz(path: &Path, key: Option<&str>, exclude: &[&str], field: &str) -> Result<(String, Array)> {
    let mut archive = open_npz(path, field)?;
    let keys = archive_keys(&archive);
    let key = match key {
        Some(k) => k.to_string(),
        None => {
            let candidates: Vec<&String> = keys.iter().filter(|k| !exclude.contains(&k.as_str())).collect();
            match candidates.as_slice() {
                [only] => (*only).clone(),
                _ => {
                    return Err(data_err(
                        path,
                        format!("holds the arrays {keys:?}: set `data.key` (and `data.test_key`) to choose"),
                    ))
                }
            }
        }
    };
    let mut entry = archive.by_name(&format!("{key}.npy")).map_err(|_| {
        data_err(
            path,
            format!("has no array `{key}`; it holds {keys:?} (check `data.{field}` and the key fields)"),
        )
    })?;
    let mut bytes = Vec::new();
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| data_err(path, format!("cannot decompress array `{key}`: {e}")))?;
    let what = PathBuf::from(format!("{}[{key}]", path.display()));
    Ok((key, parse_npy(&bytes, &what)?))
}

/// Samples and labels of one split, values still unscaled.
struct Part {
    shape: FeatureShape,
    dtype: Dtype,
    values: Vec<f32>,
    labels: Option<Vec<usize>>,
    what: PathBuf,
}

/// The sample shape of an array and its values rearranged channel-major.
fn samples(array: Array, channels_last: bool, what: &Path) -> Result<(FeatureShape, Vec<f32>)> {
    let dims = &array.shape;
    let shape = match (dims.len(), channels_last) {
        (1, false) => FeatureShape::Flat(1),
        (2, false) => FeatureShape::Flat(dims[1]),
        (3, false) => FeatureShape::image(1, dims[1], dims[2]),
        (4, false) => FeatureShape::image(dims[1], dims[2], dims[3]),
        (4, true) => FeatureShape::image(dims[3], dims[1], dims[2]),
        (_, true) => {
            return Err(data_err(
                what,
                format!("`data.channels_last` needs a 4-D [n, h, w, c] array, got shape {dims:?}"),
            ))
        }
        _ => {
            return Err(data_err(
                what,
                format!("shape {dims:?}: expected [n], [n, d], [n, h, w] or [n, c, h, w] (1 to 4 dimensions)"),
            ))
        }
    };
    let n = dims[0];
    let dim = shape.numel();
    if n == 0 || dim == 0 {
        return Err(data_err(what, format!("shape {dims:?} holds no sample values")));
    }
    check_total(n, dim, what)?;
    let mut values: Vec<f32> = array.values.iter().map(|&v| v as f32).collect();
    if channels_last {
        let (c, h, w) = (dims[3], dims[1], dims[2]);
        let src = values;
        values = vec![0.0; src.len()];
        for s in 0..n {
            let (from, to) = (&src[s * dim..(s + 1) * dim], &mut values[s * dim..(s + 1) * dim]);
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..c {
                        to[(ch * h + y) * w + x] = from[(y * w + x) * c + ch];
                    }
                }
            }
        }
    }
    Ok((shape, values))
}

/// Labels from an array: `[n]` or `[n, 1]` non-negative integers.
fn labels_of(array: &Array, n: usize, what: &Path) -> Result<Vec<usize>> {
    let ok_shape = array.shape == [n] || array.shape == [n, 1];
    if !ok_shape {
        return Err(data_err(
            what,
            format!(
                "labels of shape {:?}: expected [{n}] to match the {n} samples",
                array.shape
            ),
        ));
    }
    array
        .values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v >= 0.0 && v.fract() == 0.0 && v < 1e9 {
                Ok(v as usize)
            } else {
                Err(data_err(
                    what,
                    format!("label {v} at index {i}: labels must be non-negative integer class indices"),
                ))
            }
        })
        .collect()
}

impl NpyConfig {
    /// Reads samples (`path`, `key`) and labels (`labels`) of one part; `prefix` is `""` or `"test_"`.
    fn read_part(&self, path: &Path, key: Option<&str>, labels: Option<&str>, prefix: &str) -> Result<Part> {
        let path_field = if prefix.is_empty() { "path" } else { "test_path" };
        let (array, what, label_array) = if is_npz(path) {
            let exclude: Vec<&str> = labels.into_iter().collect();
            let (key, array) = read_npz(path, key, &exclude, path_field)?;
            let what = PathBuf::from(format!("{}[{key}]", path.display()));
            let label_array = labels
                .map(|l| read_npz(path, Some(l), &[], &format!("{prefix}labels")))
                .transpose()?
                .map(|(k, a)| (PathBuf::from(format!("{}[{k}]", path.display())), a));
            (array, what, label_array)
        } else {
            if let Some(k) = key {
                return Err(Error::config(
                    format!("data.{prefix}key"),
                    format!(
                        "`{k}` selects an array inside a .npz, but {} is not a .npz",
                        path.display()
                    ),
                ));
            }
            let array = parse_npy(&read_file(path, path_field)?, path)?;
            let label_array = labels
                .map(|l| {
                    let lp = PathBuf::from(l);
                    let bytes = read_file(&lp, &format!("{prefix}labels"))?;
                    Ok::<_, Error>((lp.clone(), parse_npy(&bytes, &lp)?))
                })
                .transpose()?;
            (array, path.to_path_buf(), label_array)
        };
        let dtype = array.dtype;
        let n = array.shape.first().copied().unwrap_or(0);
        if array.shape.is_empty() {
            return Err(data_err(&what, "a 0-dimensional array holds no samples"));
        }
        let (shape, values) = samples(array, self.channels_last, &what)?;
        let labels = label_array.map(|(lp, a)| labels_of(&a, n, &lp)).transpose()?;
        Ok(Part {
            shape,
            dtype,
            values,
            labels,
            what,
        })
    }
}

#[typetag::serde(name = "npy")]
impl DataSourceConfig for NpyConfig {
    fn build(&self, _seed: u64) -> Result<Box<dyn DataSource>> {
        if self.path.is_empty() {
            return Err(Error::config(
                "data.path",
                "is required: the .npy or .npz file with the samples",
            ));
        }
        let path = PathBuf::from(&self.path);
        let train = self.read_part(&path, self.key.as_deref(), self.labels.as_deref(), "")?;
        let fixed_test = self.test_path.is_some() || self.test_key.is_some();
        let test = if fixed_test {
            let test_path = self.test_path.as_ref().map_or_else(|| path.clone(), PathBuf::from);
            let test = self.read_part(
                &test_path,
                self.test_key.as_deref(),
                self.test_labels.as_deref(),
                "test_",
            )?;
            if test.shape != train.shape {
                return Err(data_err(
                    &test.what,
                    format!(
                        "test samples of shape {:?} differ from the training samples' {:?} ({})",
                        test.shape,
                        train.shape,
                        train.what.display()
                    ),
                ));
            }
            if test.labels.is_some() != train.labels.is_some() {
                return Err(Error::config(
                    "data.test_labels",
                    "give labels for both splits (`labels` and `test_labels`) or for neither",
                ));
            }
            Some(test)
        } else {
            check_fraction("data.test_fraction", self.test_fraction)?;
            if self.test_labels.is_some() {
                return Err(Error::config(
                    "data.test_labels",
                    "applies only with a separate test split (`test_path` or `test_key`)",
                ));
            }
            None
        };
        let shape = train.shape;
        let dim = shape.numel();
        let (mut train_t, mut test_t, test_what) = match test {
            Some(t) => (
                Table {
                    values: train.values,
                    labels: train.labels,
                },
                Table {
                    values: t.values,
                    labels: t.labels,
                },
                t.what,
            ),
            None => {
                let n = train.values.len() / dim;
                let (tr, te) = split_indices(n, train.labels.as_deref(), self.test_fraction, self.split_seed)?;
                (
                    gather(&train.values, train.labels.as_deref(), dim, &tr),
                    gather(&train.values, train.labels.as_deref(), dim, &te),
                    train.what.clone(),
                )
            }
        };
        check_total((train_t.values.len() + test_t.values.len()) / dim, dim, &train.what)?;
        let observed = observed_range([train_t.values.as_slice()], &train.what)?;
        let observed_test = observed_range([test_t.values.as_slice()], &test_what)?;
        let merged = match (observed, observed_test) {
            (Some(a), Some(b)) => (a.0.min(b.0), a.1.max(b.1)),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => (0.0, 0.0),
        };
        let value_range = match self.scale {
            None => {
                if self.input_range.is_some() {
                    return Err(Error::config(
                        "data.input_range",
                        "applies only together with `data.scale`",
                    ));
                }
                merged
            }
            Some(scale) => {
                let from = match (self.input_range, train.dtype) {
                    (Some([lo, hi]), _) => {
                        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                            return Err(Error::config(
                                "data.input_range",
                                format!("must be [low, high] with low < high, got [{lo}, {hi}]"),
                            ));
                        }
                        (lo, hi)
                    }
                    (None, Dtype::U8) => (0.0, 255.0),
                    (None, _) => merged,
                };
                rescale(&mut train_t.values, from, scale, &train.what)?;
                rescale(&mut test_t.values, from, scale, &test_what)?;
                scale.range()
            }
        };
        let num_classes = train_t
            .labels
            .iter()
            .chain(&test_t.labels)
            .flatten()
            .max()
            .map(|&m| m + 1);
        let n_train = train_t.values.len() / dim;
        let n_test = test_t.values.len() / dim;
        let description = format!(
            "npy: {} ({n_train} train / {n_test} test samples of {shape:?}{}, values in [{}, {}])",
            self.path,
            num_classes.map_or(String::new(), |k| format!(", {k} classes")),
            value_range.0,
            value_range.1
        );
        let data = InMemoryData::new(description, shape, Some(value_range), train_t, test_t, None)?;
        Ok(Box::new(match num_classes {
            Some(k) => data.with_num_classes(k)?,
            None => data,
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use nash_core::data::Split;
    use nash_core::tensor::Device;
    use std::io::Write;

    /// A version-1 `.npy` file: header dict padded with spaces to a multiple of 64 bytes, then `data`.
    pub(crate) fn npy_bytes(descr: &str, shape: &[usize], fortran: bool, data: &[u8]) -> Vec<u8> {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let shape_text = if dims.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        let fortran = if fortran { "True" } else { "False" };
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape_text}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn f64s(v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn i64s(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn npz(dir: &TempDir, name: &str, arrays: &[(&str, Vec<u8>)]) -> PathBuf {
        let path = dir.path().join(name);
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        for (key, bytes) in arrays {
            let opts = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Deflated);
            zip.start_file(format!("{key}.npy"), opts).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    fn all(data: &dyn DataSource, split: Split) -> (Vec<f32>, Option<Vec<usize>>) {
        let idx: Vec<usize> = (0..data.len(split)).collect();
        let b = data.batch(split, &idx, &Device::default()).unwrap();
        (b.inputs.as_vec(), b.labels)
    }

    #[test]
    fn header_parser_reads_f64_u8_and_refuses_bad_layouts() {
        let p = Path::new("a.npy");
        let a = parse_npy(&npy_bytes("<f8", &[2, 2], false, &f64s(&[1.5, -2.0, 3.0, 4.25])), p).unwrap();
        assert_eq!((a.shape.clone(), a.dtype), (vec![2, 2], Dtype::F64));
        assert_eq!(a.values, vec![1.5, -2.0, 3.0, 4.25]);
        let u = parse_npy(&npy_bytes("|u1", &[3], false, &[0, 7, 255]), p).unwrap();
        assert_eq!(u.values, vec![0.0, 7.0, 255.0]);
        let i = parse_npy(&npy_bytes("<i8", &[2], false, &i64s(&[-3, 9])), p).unwrap();
        assert_eq!(i.values, vec![-3.0, 9.0]);
        let err = |b: Vec<u8>| parse_npy(&b, p).unwrap_err().to_string();
        assert!(err(npy_bytes("<f4", &[2, 2], true, &f32s(&[0.0; 4]))).contains("ascontiguousarray"));
        assert!(err(npy_bytes(">f4", &[1], false, &f32s(&[0.0]))).contains("big-endian"));
        let e = err(npy_bytes("<c8", &[1], false, &[0; 8]));
        assert!(e.contains("a.npy") && e.contains("`<c8` is not supported"), "{e}");
        let e = err(npy_bytes("<f4", &[2, 3], false, &f32s(&[0.0; 5])));
        assert!(
            e.contains("truncated") && e.contains("[2, 3]") && e.contains("24 data bytes"),
            "{e}"
        );
        assert!(err(b"PK\x03\x04 not numpy".to_vec()).contains("magic"));
    }

    #[test]
    fn npy_images_split_with_labels_and_scale() {
        let dir = TempDir::new("npy-split");
        // Ten 1x2x2 u8 images, sample i filled with 10 * i; labels i % 2.
        let pixels: Vec<u8> = (0..10u8).flat_map(|i| [10 * i; 4]).collect();
        let x = dir.write("x.npy", &npy_bytes("|u1", &[10, 2, 2], false, &pixels));
        let y = dir.write(
            "y.npy",
            &npy_bytes("<i8", &[10], false, &i64s(&[0, 1, 0, 1, 0, 1, 0, 1, 0, 1])),
        );
        let cfg = NpyConfig {
            path: x.display().to_string(),
            labels: Some(y.display().to_string()),
            test_fraction: 0.2,
            scale: Some(Scale::Symmetric),
            ..Default::default()
        };
        let data = cfg.build(0).unwrap();
        let info = data.info();
        assert_eq!(info.sample_shape, FeatureShape::image(1, 2, 2));
        assert_eq!((info.num_classes, info.value_range), (Some(2), (-1.0, 1.0)));
        assert_eq!((data.len(Split::Train), data.len(Split::Test)), (8, 2));
        let (xt, yt) = all(data.as_ref(), Split::Test);
        let yt = yt.unwrap();
        assert_eq!(
            yt.iter().filter(|&&c| c == 0).count(),
            1,
            "stratified: one of each class"
        );
        for (s, &label) in yt.iter().enumerate() {
            // Undo the scaling: value = 2 * (10 i) / 255 - 1; its parity must match the label.
            let i = ((xt[s * 4] + 1.0) / 2.0 * 255.0 / 10.0).round() as usize;
            assert_eq!(i % 2, label);
        }
        // Raw values are kept without `scale`, and the range is the observed one.
        let raw = NpyConfig {
            scale: None,
            ..cfg.clone()
        }
        .build(0)
        .unwrap();
        assert_eq!(raw.info().value_range, (0.0, 90.0));
        // Label count mismatch names the label file.
        dir.write("y.npy", &npy_bytes("<i8", &[9], false, &i64s(&[0; 9])));
        let err = cfg.build(0).err().unwrap().to_string();
        assert!(err.contains("y.npy") && err.contains("expected [10]"), "{err}");
        let err = NpyConfig {
            path: dir.path().join("none.npy").display().to_string(),
            ..Default::default()
        }
        .build(0)
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("none.npy") && err.contains("data.path"), "{err}");
    }

    #[test]
    fn channels_last_transposes_to_channel_major() {
        let dir = TempDir::new("npy-hwc");
        // One 1x2 image with 3 channels: pixel (0, x) channel c = 10 x + c.
        let v = [0.0f32, 1.0, 2.0, 10.0, 11.0, 12.0];
        let x = dir.write(
            "x.npy",
            &npy_bytes("<f4", &[2, 1, 2, 3], false, &f32s(&[v, v].concat())),
        );
        let cfg = NpyConfig {
            path: x.display().to_string(),
            channels_last: true,
            test_fraction: 0.5,
            ..Default::default()
        };
        let data = cfg.build(0).unwrap();
        assert_eq!(data.info().sample_shape, FeatureShape::image(3, 1, 2));
        assert_eq!(
            all(data.as_ref(), Split::Train).0,
            vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]
        );
        let err = NpyConfig {
            channels_last: false,
            ..cfg
        }
        .build(0)
        .unwrap()
        .info();
        assert_eq!(err.sample_shape, FeatureShape::image(1, 2, 3));
    }

    #[test]
    fn npz_with_keras_style_keys_and_a_fixed_split() {
        let dir = TempDir::new("npz");
        let path = npz(
            &dir,
            "d.npz",
            &[
                (
                    "x_train",
                    npy_bytes("<f8", &[3, 2], false, &f64s(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])),
                ),
                ("y_train", npy_bytes("|u1", &[3], false, &[0, 2, 1])),
                ("x_test", npy_bytes("<f8", &[1, 2], false, &f64s(&[6.0, 7.0]))),
                ("y_test", npy_bytes("|u1", &[1], false, &[2])),
            ],
        );
        let cfg = NpyConfig {
            path: path.display().to_string(),
            key: Some("x_train".into()),
            labels: Some("y_train".into()),
            test_key: Some("x_test".into()),
            test_labels: Some("y_test".into()),
            scale: Some(Scale::Unit),
            input_range: Some([0.0, 10.0]),
            ..Default::default()
        };
        let data = cfg.build(0).unwrap();
        assert_eq!(data.info().sample_shape, FeatureShape::Flat(2));
        assert_eq!(data.info().num_classes, Some(3));
        assert_eq!(
            all(data.as_ref(), Split::Train),
            (vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5], Some(vec![0, 2, 1]))
        );
        assert_eq!(all(data.as_ref(), Split::Test), (vec![0.6, 0.7], Some(vec![2])));
        let err = NpyConfig {
            key: Some("x".into()),
            ..cfg.clone()
        }
        .build(0)
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("d.npz") && err.contains("has no array `x`") && err.contains("x_train"),
            "{err}"
        );
        let err = NpyConfig { key: None, ..cfg }.build(0).err().unwrap().to_string();
        assert!(err.contains("data.key"), "{err}");
        // A single-array archive needs no key.
        let one = npz(
            &dir,
            "one.npz",
            &[("arr_0", npy_bytes("<f4", &[4], false, &f32s(&[1.0, 2.0, 3.0, 4.0])))],
        );
        let data = NpyConfig {
            path: one.display().to_string(),
            test_fraction: 0.25,
            ..Default::default()
        }
        .build(0)
        .unwrap();
        assert_eq!((data.len(Split::Train), data.len(Split::Test)), (3, 1));
        assert_eq!(npz_keys(&one).unwrap(), vec!["arr_0".to_string()]);
    }
}
