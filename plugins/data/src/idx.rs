//! `idx`: MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST), gzipped or raw.
//!
//! `type = "idx"` with every field left at its default is **Fashion-MNIST**, read from
//! `/usr/share/datasets/fashion-mnist`, where Debian's `dataset-fashion-mnist` package installs it
//! (`apt-get install dataset-fashion-mnist`). For MNIST, point `dir` at a folder holding the four
//! MNIST files (same names).
//!
//! The IDX format: a 4-byte magic `00 00 <type> <ndims>` (type `0x08` = unsigned byte, the only one
//! image data sets use), `ndims` big-endian u32 dimensions, then the values row-major. Image files
//! are `[n, rows, cols]`, label files `[n]`. Gzip is detected from the magic bytes `1f 8b`, not the
//! file name. Samples are images `[1, rows, cols]` scaled to [0, 1] or [-1, 1].

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

use nash_core::data::{DataSource, DataSourceConfig};
use nash_core::error::{Error, Result};
use nash_core::tensor::FeatureShape;
use serde::{Deserialize, Serialize};

use crate::preprocess::{check_total, class_map, scale_u8};
use crate::table::{InMemoryData, Table};
use crate::Scale;

/// Where Debian's `dataset-fashion-mnist` package installs Fashion-MNIST.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// IDX image and label files with a fixed train/test split (the defaults read Fashion-MNIST).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdxConfig {
    /// The folder holding the four files.
    pub dir: String,
    /// Training images (`[n, rows, cols]`), relative to `dir`; the name without `.gz` is tried too.
    pub train_images: String,
    /// Training labels (`[n]`), relative to `dir`.
    pub train_labels: String,
    /// Test images, relative to `dir`.
    pub test_images: String,
    /// Test labels, relative to `dir`.
    pub test_labels: String,
    /// `unit` maps pixels to [0, 1], `symmetric` to [-1, 1].
    pub scale: Scale,
    /// Keep only the first N training samples (after the class filter).
    pub train_limit: Option<usize>,
    /// Keep only the first N test samples (after the class filter).
    pub test_limit: Option<usize>,
    /// Keep only these classes; they are renumbered 0..k-1 in the order listed.
    pub classes: Option<Vec<usize>>,
    /// Number of classes in the files (10 for MNIST and Fashion-MNIST); every label must be below it.
    pub num_classes: usize,
}

impl Default for IdxConfig {
    fn default() -> Self {
        IdxConfig {
            dir: FASHION_MNIST_DIR.into(),
            train_images: "train-images-idx3-ubyte.gz".into(),
            train_labels: "train-labels-idx1-ubyte.gz".into(),
            test_images: "t10k-images-idx3-ubyte.gz".into(),
            test_labels: "t10k-labels-idx1-ubyte.gz".into(),
            scale: Scale::Unit,
            train_limit: None,
            test_limit: None,
            classes: None,
            num_classes: 10,
        }
    }
}

/// An open IDX stream positioned after its header.
struct IdxReader {
    path: PathBuf,
    dims: Vec<usize>,
    reader: Box<dyn Read>,
}

fn data_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads exactly `buf.len()` bytes, turning an early end into an error that says what the header
/// promised (`promised`) and a corrupt gzip stream into an error naming the file.
fn read_full(reader: &mut dyn Read, buf: &mut [u8], path: &Path, promised: &str) -> Result<()> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => data_err(path, format!("truncated: the file ends before {promised}")),
        ErrorKind::InvalidInput | ErrorKind::InvalidData => {
            data_err(path, format!("corrupt gzip stream ({e}) before {promised}"))
        }
        _ => Error::io(path, e),
    })
}

impl IdxReader {
    /// Opens `path` (gzipped or raw, by magic bytes) and reads the header, which must have
    /// `ndims` dimensions of unsigned bytes.
    fn open(path: &Path, ndims: usize, what: &str) -> Result<Self> {
        let mut file = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
        let mut first = [0u8; 2];
        read_full(&mut file, &mut first, path, "the 4-byte IDX magic")?;
        let head = std::io::Cursor::new(first).chain(file);
        let mut reader: Box<dyn Read> = if first == [0x1f, 0x8b] {
            Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(head)))
        } else {
            Box::new(head)
        };
        let mut magic = [0u8; 4];
        read_full(&mut reader, &mut magic, path, "the 4-byte IDX magic")?;
        let expected = format!("an IDX {what} file: magic 00 00 08 {ndims:02x} (unsigned bytes, {ndims} dimensions)");
        if magic[..2] != [0, 0] {
            return Err(data_err(
                path,
                format!("bad magic {magic:02x?}: not an IDX file (expected {expected})"),
            ));
        }
        if magic[2] != 0x08 || usize::from(magic[3]) != ndims {
            return Err(data_err(
                path,
                format!(
                    "IDX type 0x{:02x} with {} dimensions, expected {expected}",
                    magic[2], magic[3]
                ),
            ));
        }
        let mut raw = vec![0u8; 4 * ndims];
        read_full(&mut reader, &mut raw, path, &format!("the {ndims} header dimensions"))?;
        let dims = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect::<Vec<usize>>();
        if dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none() {
            return Err(data_err(
                path,
                format!("header dimensions {dims:?} overflow: not a valid IDX {what} file"),
            ));
        }
        Ok(IdxReader {
            path: path.to_path_buf(),
            dims,
            reader,
        })
    }

    /// Values per item (the product of the dimensions after the first).
    fn item_len(&self) -> usize {
        self.dims[1..].iter().product()
    }

    /// Reads item `i` into `buf`.
    fn read_item(&mut self, i: usize, buf: &mut [u8]) -> Result<()> {
        let promised = format!(
            "item {i} of the {} its header promises ({:?} = {} bytes of data)",
            self.dims[0],
            self.dims,
            self.dims.iter().product::<usize>()
        );
        read_full(&mut self.reader, buf, &self.path, &promised)
    }

    /// Fails if bytes remain after the last item the header promises.
    fn expect_end(&mut self) -> Result<()> {
        let mut extra = [0u8; 1];
        match self.reader.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(data_err(
                &self.path,
                format!(
                    "longer than its header {:?} promises: bytes follow the last item; is it the right file?",
                    self.dims
                ),
            )),
            Err(e) => Err(data_err(&self.path, format!("corrupt gzip stream ({e}) at its end"))),
        }
    }
}

impl IdxConfig {
    /// Resolves `name` under `dir`, trying the name with and without `.gz`; `field` is the config
    /// field that names it.
    fn resolve(&self, name: &str, field: &str) -> Result<PathBuf> {
        let path = Path::new(&self.dir).join(name);
        let alternative = match name.strip_suffix(".gz") {
            Some(stem) => Path::new(&self.dir).join(stem),
            None => Path::new(&self.dir).join(format!("{name}.gz")),
        };
        if path.is_file() {
            Ok(path)
        } else if alternative.is_file() {
            Ok(alternative)
        } else {
            let hint = if self.dir == FASHION_MNIST_DIR {
                "; `apt-get install dataset-fashion-mnist` provides Fashion-MNIST there"
            } else {
                ""
            };
            Err(data_err(
                &path,
                format!(
                    "not found (nor {}){hint}; set `data.dir` to the folder with your IDX files, or `data.{field}` to the file name",
                    alternative.display()
                ),
            ))
        }
    }

    /// Reads one split: labels first, then images until `limit` samples of the kept classes.
    fn read_split(
        &self,
        images: &str,
        labels: &str,
        prefix: &str,
        limit: Option<usize>,
        keep: Option<&[Option<usize>]>,
    ) -> Result<(Table, (usize, usize))> {
        let label_path = self.resolve(labels, &format!("{prefix}_labels"))?;
        let image_path = self.resolve(images, &format!("{prefix}_images"))?;
        let mut lab = IdxReader::open(&label_path, 1, "label")?;
        let n = lab.dims[0];
        check_total(n, 1, &label_path)?;
        let mut all_labels = vec![0u8; n];
        read_full(
            &mut lab.reader,
            &mut all_labels,
            &label_path,
            &format!("the {n} labels its header promises"),
        )?;
        lab.expect_end()?;
        if let Some((i, &c)) = all_labels
            .iter()
            .enumerate()
            .find(|(_, &c)| usize::from(c) >= self.num_classes)
        {
            return Err(data_err(
                &label_path,
                format!(
                    "label {c} at index {i} is not below num_classes = {} (set `data.num_classes` for data sets with more classes)",
                    self.num_classes
                ),
            ));
        }
        let mut img = IdxReader::open(&image_path, 3, "image")?;
        if img.dims[0] != n {
            return Err(data_err(
                &image_path,
                format!(
                    "holds {} images but {} holds {n} labels: the counts must match",
                    img.dims[0],
                    label_path.display()
                ),
            ));
        }
        let (rows, cols) = (img.dims[1], img.dims[2]);
        if rows == 0 || cols == 0 {
            return Err(data_err(
                &image_path,
                format!("images of {rows}x{cols} pixels: expected at least 1x1"),
            ));
        }
        let item = img.item_len();
        let want = limit.unwrap_or(n).min(n);
        check_total(want, item, &image_path)?;
        let mut values = Vec::with_capacity(want * item);
        let mut kept = Vec::with_capacity(want);
        let mut buf = vec![0u8; item];
        let mut consumed = 0;
        for &label in &all_labels {
            if kept.len() == want {
                break;
            }
            img.read_item(consumed, &mut buf)?;
            consumed += 1;
            let new_label = match keep {
                Some(map) => match map[usize::from(label)] {
                    Some(l) => l,
                    None => continue,
                },
                None => usize::from(label),
            };
            kept.push(new_label);
            values.extend(buf.iter().map(|&v| scale_u8(v, self.scale)));
        }
        if consumed == n {
            img.expect_end()?;
        }
        if kept.is_empty() {
            return Err(data_err(
                &image_path,
                format!("no {prefix} sample is left after `data.classes` and `data.{prefix}_limit`"),
            ));
        }
        Ok((
            Table {
                values,
                labels: Some(kept),
            },
            (rows, cols),
        ))
    }
}

#[typetag::serde(name = "idx")]
impl DataSourceConfig for IdxConfig {
    fn build(&self, _seed: u64) -> Result<Box<dyn DataSource>> {
        if self.num_classes == 0 || self.num_classes > 256 {
            return Err(Error::config(
                "data.num_classes",
                format!("must be 1..=256 (IDX labels are bytes), got {}", self.num_classes),
            ));
        }
        for (field, limit) in [("train_limit", self.train_limit), ("test_limit", self.test_limit)] {
            if limit == Some(0) {
                return Err(Error::config(
                    format!("data.{field}"),
                    "must be at least 1 (leave it out for every sample)",
                ));
            }
        }
        let map = self
            .classes
            .as_deref()
            .map(|c| class_map(c, self.num_classes, "data.classes"))
            .transpose()?;
        let (train, train_hw) = self.read_split(
            &self.train_images,
            &self.train_labels,
            "train",
            self.train_limit,
            map.as_deref(),
        )?;
        let (test, test_hw) = self.read_split(
            &self.test_images,
            &self.test_labels,
            "test",
            self.test_limit,
            map.as_deref(),
        )?;
        if train_hw != test_hw {
            return Err(data_err(
                &Path::new(&self.dir).join(&self.test_images),
                format!(
                    "test images are {}x{} but training images are {}x{}",
                    test_hw.0, test_hw.1, train_hw.0, train_hw.1
                ),
            ));
        }
        let num_classes = self.classes.as_ref().map_or(self.num_classes, Vec::len);
        let (rows, cols) = train_hw;
        let n_train = train.labels.as_ref().map_or(0, Vec::len);
        let n_test = test.labels.as_ref().map_or(0, Vec::len);
        let description = format!(
            "idx: {} ({n_train} train / {n_test} test images of 1x{rows}x{cols}, {num_classes} classes, values in [{}, {}])",
            self.dir,
            self.scale.range().0,
            self.scale.range().1
        );
        let data = InMemoryData::new(
            description,
            FeatureShape::image(1, rows, cols),
            Some(self.scale.range()),
            train,
            test,
            None,
        )?
        .with_num_classes(num_classes)?;
        Ok(Box::new(data))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use nash_core::data::Split;
    use nash_core::tensor::Device;
    use std::io::Write;

    /// An IDX file of unsigned bytes with the given dimensions.
    pub(crate) fn idx_bytes(dims: &[usize], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 0x08, dims.len() as u8];
        for &d in dims {
            out.extend_from_slice(&(d as u32).to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// Writes a 2x3-pixel data set: `n_train` and `n_test` images whose pixel j of image i is
    /// `(i * 6 + j) * 10 % 256`, labels `i % 3`. Gzipped names end in `.gz`.
    fn write_set(dir: &TempDir, gz: bool, n_train: usize, n_test: usize) {
        for (prefix, n) in [("train", n_train), ("t10k", n_test)] {
            let pixels: Vec<u8> = (0..n * 6).map(|k| (k * 10 % 256) as u8).collect();
            let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
            let (img, lab) = (idx_bytes(&[n, 2, 3], &pixels), idx_bytes(&[n], &labels));
            if gz {
                dir.write(&format!("{prefix}-images-idx3-ubyte.gz"), &gzip(&img));
                dir.write(&format!("{prefix}-labels-idx1-ubyte.gz"), &gzip(&lab));
            } else {
                dir.write(&format!("{prefix}-images-idx3-ubyte"), &img);
                dir.write(&format!("{prefix}-labels-idx1-ubyte"), &lab);
            }
        }
    }

    fn config(dir: &TempDir) -> IdxConfig {
        IdxConfig {
            dir: dir.path().display().to_string(),
            ..Default::default()
        }
    }

    fn all(data: &dyn DataSource, split: Split) -> (Vec<f32>, Vec<usize>) {
        let idx: Vec<usize> = (0..data.len(split)).collect();
        let b = data.batch(split, &idx, &Device::default()).unwrap();
        (b.inputs.as_vec(), b.labels.unwrap())
    }

    #[test]
    fn reads_raw_and_gzipped_files_with_values_labels_and_scale() {
        for gz in [false, true] {
            let dir = TempDir::new("idx-read");
            write_set(&dir, gz, 5, 4);
            let data = config(&dir).build(0).unwrap();
            let info = data.info();
            assert_eq!(info.sample_shape, FeatureShape::image(1, 2, 3));
            assert_eq!((info.num_classes, info.value_range), (Some(10), (0.0, 1.0)));
            assert_eq!((data.len(Split::Train), data.len(Split::Test)), (5, 4));
            let (x, y) = all(data.as_ref(), Split::Train);
            assert_eq!(y, vec![0, 1, 2, 0, 1]);
            // pixel 1 of image 2 is byte (2*6+1)*10 = 130.
            assert!((x[2 * 6 + 1] - 130.0 / 255.0).abs() < 1e-6, "gz {gz}");
            let sym = IdxConfig {
                scale: Scale::Symmetric,
                ..config(&dir)
            }
            .build(0)
            .unwrap();
            assert_eq!(sym.info().value_range, (-1.0, 1.0));
            let (xs, _) = all(sym.as_ref(), Split::Test);
            assert!((xs[13] - (2.0 * 130.0 / 255.0 - 1.0)).abs() < 1e-6);
            assert_eq!(xs[0], -1.0);
        }
    }

    #[test]
    fn limits_and_class_subsets_renumber_labels() {
        let dir = TempDir::new("idx-classes");
        write_set(&dir, true, 9, 6);
        let data = IdxConfig {
            classes: Some(vec![2, 0]),
            train_limit: Some(3),
            ..config(&dir)
        }
        .build(0)
        .unwrap();
        assert_eq!(data.info().num_classes, Some(2));
        let (x, y) = all(data.as_ref(), Split::Train);
        // Original labels 0,1,2,0,1,2,...: the kept samples are 0 (class 0), 2 (class 2), 3 (class 0).
        assert_eq!(y, vec![1, 0, 1]);
        assert!(
            (x[6] - (12.0 * 10.0) / 255.0).abs() < 1e-6,
            "second kept sample is image 2"
        );
        assert_eq!(data.len(Split::Test), 4);
        let bad = IdxConfig {
            classes: Some(vec![10]),
            ..config(&dir)
        };
        assert!(matches!(bad.build(0), Err(Error::Config { path, .. }) if path == "data.classes"));
    }

    fn err_of(cfg: &IdxConfig) -> String {
        match cfg.build(0) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn missing_truncated_and_mis_shaped_files_name_the_file() {
        let dir = TempDir::new("idx-errors");
        write_set(&dir, false, 4, 2);
        let cfg = config(&dir);
        // Missing file: names the path, the package and the field.
        let err = err_of(&IdxConfig {
            train_images: "nope.gz".into(),
            ..cfg.clone()
        });
        assert!(err.contains("nope.gz") && err.contains("data.train_images"), "{err}");
        let err = err_of(&IdxConfig::default_with_dir("/nonexistent/fm"));
        assert!(err.contains("/nonexistent/fm/t") && err.contains("data.dir"), "{err}");
        // Truncated image file (raw and gzipped).
        for gz in [false, true] {
            let pixels: Vec<u8> = vec![7; 4 * 6 - 5];
            let bytes = idx_bytes(&[4, 2, 3], &pixels);
            dir.write("train-images-idx3-ubyte", &if gz { gzip(&bytes) } else { bytes });
            let err = err_of(&cfg);
            assert!(
                err.contains("train-images-idx3-ubyte") && err.contains("truncated") && err.contains("[4, 2, 3]"),
                "{err}"
            );
        }
        // Trailing bytes.
        dir.write("train-images-idx3-ubyte", &idx_bytes(&[4, 2, 3], &[1; 4 * 6 + 2]));
        assert!(err_of(&cfg).contains("longer than its header"));
        // Bad magic.
        dir.write("train-images-idx3-ubyte", b"\x89PNG\r\n\x1a\n........................");
        let err = err_of(&cfg);
        assert!(
            err.contains("train-images-idx3-ubyte") && err.contains("bad magic"),
            "{err}"
        );
        // Labels file given as images: wrong number of dimensions.
        dir.write("train-images-idx3-ubyte", &idx_bytes(&[4], &[0; 4]));
        let err = err_of(&cfg);
        assert!(err.contains("1 dimensions") && err.contains("image file"), "{err}");
        // Label count differs from image count.
        dir.write("train-images-idx3-ubyte", &idx_bytes(&[3, 2, 3], &[0; 18]));
        let err = err_of(&cfg);
        assert!(
            err.contains("train-images-idx3-ubyte") && err.contains("3 images") && err.contains("4 labels"),
            "{err}"
        );
        // Truncated label file, and a label out of range.
        dir.write("train-images-idx3-ubyte", &idx_bytes(&[4, 2, 3], &[0; 24]));
        dir.write("train-labels-idx1-ubyte", &idx_bytes(&[4], &[0; 2]));
        let err = err_of(&cfg);
        assert!(
            err.contains("train-labels-idx1-ubyte") && err.contains("4 labels its header promises"),
            "{err}"
        );
        dir.write("train-labels-idx1-ubyte", &idx_bytes(&[4], &[0, 1, 12, 0]));
        let err = err_of(&cfg);
        assert!(err.contains("label 12 at index 2"), "{err}");
        // A header whose dimensions overflow.
        dir.write("train-labels-idx1-ubyte", &idx_bytes(&[4], &[0; 4]));
        let mut huge = vec![0, 0, 0x08, 3];
        for _ in 0..3 {
            huge.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        dir.write("train-images-idx3-ubyte", &huge);
        assert!(err_of(&cfg).contains("overflow"));
        // An empty file.
        dir.write("train-labels-idx1-ubyte", b"");
        assert!(err_of(&cfg).contains("truncated"));
    }

    impl IdxConfig {
        fn default_with_dir(dir: &str) -> Self {
            IdxConfig {
                dir: dir.into(),
                ..Default::default()
            }
        }
    }

    #[test]
    fn reads_the_installed_fashion_mnist() {
        if !Path::new(FASHION_MNIST_DIR).is_dir() {
            println!("skipped: {FASHION_MNIST_DIR} is absent (apt-get install dataset-fashion-mnist)");
            return;
        }
        let data = IdxConfig {
            train_limit: Some(100),
            test_limit: Some(100),
            ..Default::default()
        }
        .build(0)
        .unwrap();
        assert_eq!(data.info().sample_shape, FeatureShape::image(1, 28, 28));
        assert_eq!(data.len(Split::Test), 100);
        let (x, y) = all(data.as_ref(), Split::Test);
        assert_eq!(x.len(), 100 * 784);
        assert!(x.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(x.contains(&1.0) && x.contains(&0.0));
        assert!(y.iter().all(|&c| c < 10));
        // The first Fashion-MNIST test labels: ankle boot, pullover, trouser, trouser.
        assert_eq!(&y[..4], &[9, 2, 1, 1]);
        let mut classes = y.clone();
        classes.sort_unstable();
        classes.dedup();
        assert_eq!(classes.len(), 10, "100 test images cover all ten classes");
    }
}
