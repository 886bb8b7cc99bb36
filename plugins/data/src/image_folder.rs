//! `image_folder`: PNG and JPEG images laid out as `root/<class>/<image>`.
//!
//! Each subfolder of `root` is a class; classes are numbered by their sorted folder names, images
//! within a class are read in sorted file-name order. Files ending in `.png`, `.jpg` or `.jpeg`
//! (any case) are read, with the format detected from their content; other files are ignored, as
//! are files directly in `root`. Every image is converted to grayscale (`channels = 1`) or RGB
//! (`channels = 3`), resized to `size = [height, width]` with a bilinear filter (aspect ratio not
//! kept), and scaled to [0, 1] or [-1, 1]. A seeded, stratified `test_fraction` of each class is
//! held out for testing.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use nash_core::data::{DataSource, DataSourceConfig};
use nash_core::error::{Error, Result};
use nash_core::tensor::FeatureShape;
use serde::{Deserialize, Serialize};

use crate::preprocess::{check_fraction, check_total, gather, scale_u8, split_indices};
use crate::table::InMemoryData;
use crate::Scale;

/// A folder of class subfolders of images (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageFolderConfig {
    /// The folder whose subfolders are the classes.
    pub root: String,
    /// `[height, width]` every image is resized to.
    pub size: [usize; 2],
    /// 1 for grayscale, 3 for RGB.
    pub channels: usize,
    /// `unit` maps pixels to [0, 1], `symmetric` to [-1, 1].
    pub scale: Scale,
    /// Fraction of each class held out for testing.
    pub test_fraction: f64,
    /// Seed of that split (fixed, so runs with different seeds evaluate on the same images).
    pub split_seed: u64,
}

impl Default for ImageFolderConfig {
    fn default() -> Self {
        ImageFolderConfig {
            root: String::new(),
            size: [64, 64],
            channels: 3,
            scale: Scale::Unit,
            test_fraction: 0.1,
            split_seed: 0,
        }
    }
}

fn data_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<Vec<_>>>()?;
    entries.sort();
    Ok(entries)
}

fn is_image(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
}

impl ImageFolderConfig {
    /// Decodes, converts and resizes one image to channel-major values.
    fn load(&self, path: &Path, out: &mut Vec<f32>) -> Result<()> {
        let [h, w] = self.size;
        let img = image::ImageReader::open(path)
            .map_err(|e| Error::io(path, e))?
            .with_guessed_format()
            .map_err(|e| Error::io(path, e))?
            .decode()
            .map_err(|e| data_err(path, format!("cannot decode as PNG or JPEG: {e}")))?;
        let (w32, h32) = (w as u32, h as u32);
        if self.channels == 1 {
            let gray = image::imageops::resize(&img.to_luma8(), w32, h32, FilterType::Triangle);
            out.extend(gray.as_raw().iter().map(|&v| scale_u8(v, self.scale)));
        } else {
            let rgb = image::imageops::resize(&img.to_rgb8(), w32, h32, FilterType::Triangle);
            let raw = rgb.as_raw();
            for c in 0..3 {
                out.extend(raw.chunks_exact(3).map(|px| scale_u8(px[c], self.scale)));
            }
        }
        Ok(())
    }
}

#[typetag::serde(name = "image_folder")]
impl DataSourceConfig for ImageFolderConfig {
    fn build(&self, _seed: u64) -> Result<Box<dyn DataSource>> {
        if self.root.is_empty() {
            return Err(Error::config(
                "data.root",
                "is required: a folder with one subfolder of PNG/JPEG images per class",
            ));
        }
        if self.channels != 1 && self.channels != 3 {
            return Err(Error::config(
                "data.channels",
                format!("must be 1 (grayscale) or 3 (RGB), got {}", self.channels),
            ));
        }
        let [h, w] = self.size;
        if h == 0 || w == 0 || h > 4096 || w > 4096 {
            return Err(Error::config(
                "data.size",
                format!("must be [height, width] with each in 1..=4096, got [{h}, {w}]"),
            ));
        }
        check_fraction("data.test_fraction", self.test_fraction)?;
        let root = Path::new(&self.root);
        if !root.is_dir() {
            return Err(data_err(
                root,
                "not a folder; set `data.root` to a folder with one subfolder of images per class",
            ));
        }
        let classes: Vec<PathBuf> = sorted_entries(root)?.into_iter().filter(|p| p.is_dir()).collect();
        if classes.is_empty() {
            return Err(data_err(
                root,
                "has no subfolders: expected root/<class>/<image>.png, one subfolder per class",
            ));
        }
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for (class, dir) in classes.iter().enumerate() {
            let images: Vec<PathBuf> = sorted_entries(dir)?.into_iter().filter(|p| is_image(p)).collect();
            if images.is_empty() {
                return Err(data_err(
                    dir,
                    "class folder holds no .png, .jpg or .jpeg image; remove it or add images",
                ));
            }
            labels.extend(std::iter::repeat_n(class, images.len()));
            files.extend(images);
        }
        let dim = self.channels * h * w;
        check_total(files.len(), dim, root)?;
        let mut values = Vec::with_capacity(files.len() * dim);
        for f in &files {
            self.load(f, &mut values)?;
        }
        let (train, test) = split_indices(files.len(), Some(&labels), self.test_fraction, self.split_seed)?;
        let names: Vec<String> = classes
            .iter()
            .map(|c| {
                c.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            })
            .collect();
        let description = format!(
            "image_folder: {} ({} train / {} test images resized to {}x{h}x{w}, classes {names:?})",
            self.root,
            train.len(),
            test.len(),
            self.channels
        );
        let data = InMemoryData::new(
            description,
            FeatureShape::image(self.channels, h, w),
            Some(self.scale.range()),
            gather(&values, Some(&labels), dim, &train),
            gather(&values, Some(&labels), dim, &test),
            None,
        )?
        .with_num_classes(classes.len())?;
        Ok(Box::new(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use nash_core::data::Split;
    use nash_core::tensor::Device;

    /// Writes `n` 4x4 RGB PNGs of one solid colour into `root/<class>/`.
    fn write_class(dir: &TempDir, class: &str, n: usize, rgb: [u8; 3]) {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_pixel(4, 4, image::Rgb(rgb));
            img.save(dir.path().join(class).join(format!("{i}.png"))).unwrap();
        }
    }

    fn all(data: &dyn DataSource, split: Split) -> (Vec<f32>, Vec<usize>) {
        let idx: Vec<usize> = (0..data.len(split)).collect();
        let b = data.batch(split, &idx, &Device::default()).unwrap();
        (b.inputs.as_vec(), b.labels.unwrap())
    }

    #[test]
    fn two_classes_of_pngs_resize_split_and_label() {
        let dir = TempDir::new("imgfolder");
        write_class(&dir, "b_red", 4, [255, 0, 0]);
        write_class(&dir, "a_blue", 6, [0, 0, 255]);
        // One JPEG among the blue images (lossy: a solid colour decodes to within a few levels).
        let jpeg = image::RgbImage::from_pixel(8, 8, image::Rgb([0, 0, 255]));
        jpeg.save(dir.path().join("a_blue").join("z.JPG")).unwrap();
        dir.write("notes.txt", b"ignored");
        dir.write("a_blue/readme.md", b"ignored");
        let cfg = ImageFolderConfig {
            root: dir.path().display().to_string(),
            size: [2, 3],
            test_fraction: 0.5,
            ..Default::default()
        };
        let data = cfg.build(0).unwrap();
        let info = data.info();
        assert_eq!(info.sample_shape, FeatureShape::image(3, 2, 3));
        assert_eq!((info.num_classes, info.value_range), (Some(2), (0.0, 1.0)));
        assert_eq!((data.len(Split::Train), data.len(Split::Test)), (5, 6));
        let (x_test, y_test) = all(data.as_ref(), Split::Test);
        assert_eq!(
            y_test.iter().filter(|&&c| c == 0).count(),
            4,
            "stratified: round(half of the seven blue images)"
        );
        let (mut x, mut y) = all(data.as_ref(), Split::Train);
        x.extend(x_test);
        y.extend(y_test);
        for (s, &label) in y.iter().enumerate() {
            let sample = &x[s * 18..(s + 1) * 18];
            // Channel-major: red plane, green plane, blue plane of 6 pixels each.
            let (r, b) = (sample[0], sample[12]);
            let (want_r, want_b) = if label == 0 { (0.0, 1.0) } else { (1.0, 0.0) };
            assert!(
                (r - want_r).abs() < 0.03 && (b - want_b).abs() < 0.03,
                "sample {s}: {r} {b}"
            );
            assert!(sample[6..12].iter().all(|&g| g < 0.03));
        }
        // Grayscale, symmetric: red's luma is 0.2126 * 255 -> about 54.
        let gray = ImageFolderConfig {
            channels: 1,
            scale: Scale::Symmetric,
            ..cfg.clone()
        }
        .build(0)
        .unwrap();
        assert_eq!(gray.info().sample_shape, FeatureShape::image(1, 2, 3));
        let (x, y) = all(gray.as_ref(), Split::Train);
        let red = y.iter().position(|&c| c == 1).unwrap();
        let v = x[red * 6];
        assert!((v - (2.0 * 54.0 / 255.0 - 1.0)).abs() < 0.02, "{v}");
    }

    #[test]
    fn bad_folders_and_files_are_named() {
        let dir = TempDir::new("imgfolder-err");
        let cfg = ImageFolderConfig {
            root: dir.path().display().to_string(),
            ..Default::default()
        };
        let err = |c: &ImageFolderConfig| c.build(0).err().unwrap().to_string();
        assert!(err(&cfg).contains("has no subfolders"));
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        let e = err(&cfg);
        assert!(e.contains("empty") && e.contains("no .png"), "{e}");
        dir.write("empty/broken.png", b"not a png at all");
        let e = err(&cfg);
        assert!(e.contains("broken.png") && e.contains("cannot decode"), "{e}");
        let e = err(&ImageFolderConfig {
            channels: 2,
            ..cfg.clone()
        });
        assert!(e.contains("data.channels"), "{e}");
        let e = err(&ImageFolderConfig {
            root: dir.path().join("missing").display().to_string(),
            ..cfg
        });
        assert!(e.contains("missing") && e.contains("data.root"), "{e}");
    }
}
