//! Image grids: tiles of samples laid out near-square with padding, values mapped from the data's
//! range to bytes, encoded as PNG.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context};
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

/// Gray level of the padding between tiles: distinct from both black and white backgrounds.
pub const PAD_VALUE: u8 = 128;

/// The shape of one tile: `channels` (1: grayscale, 3: RGB) planes of `height` x `width`, stored
/// channel-major like [`nash_core::tensor::FeatureShape::Image`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileShape {
    /// 1 or 3.
    pub channels: usize,
    /// Rows of pixels.
    pub height: usize,
    /// Columns of pixels.
    pub width: usize,
}

impl TileShape {
    /// Number of values in one tile.
    pub fn numel(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// An 8-bit picture, row-major, `channels` interleaved bytes per pixel (1: gray, 3: RGB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canvas {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// 1 (gray) or 3 (RGB).
    pub channels: usize,
    /// `height * width * channels` bytes.
    pub pixels: Vec<u8>,
}

impl Canvas {
    /// A canvas filled with `value`.
    pub fn filled(width: usize, height: usize, channels: usize, value: u8) -> Self {
        Canvas {
            width,
            height,
            channels,
            pixels: vec![value; width * height * channels],
        }
    }

    /// Encodes the canvas as a PNG file at `path`.
    pub fn write_png(&self, path: &Path) -> anyhow::Result<()> {
        let color = match self.channels {
            1 => ExtendedColorType::L8,
            3 => ExtendedColorType::Rgb8,
            c => bail!(
                "cannot write a {c}-channel picture to {}: 1 or 3 channels",
                path.display()
            ),
        };
        let (w, h) = (u32::try_from(self.width)?, u32::try_from(self.height)?);
        let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        PngEncoder::new(BufWriter::new(file))
            .write_image(&self.pixels, w, h, color)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Rows and columns of a near-square grid holding `n` tiles: `cols = ⌈√n⌉`, `rows = ⌈n / cols⌉`
/// (so `rows ≤ cols ≤ rows + 1` and no row is empty). `(0, 0)` for no tiles.
pub fn grid_layout(n: usize) -> (usize, usize) {
    if n == 0 {
        return (0, 0);
    }
    let mut cols = (n as f64).sqrt() as usize;
    while cols * cols < n {
        cols += 1;
    }
    while cols > 1 && (cols - 1) * (cols - 1) >= n {
        cols -= 1;
    }
    (n.div_ceil(cols), cols)
}

/// Maps `v` linearly from `range = (low, high)` to `0..=255`, rounding and clamping: `low` and
/// below give 0, `high` and above give 255, NaN gives 0. A range with `high <= low` is a step at
/// `low` (below: 0, at or above: 255).
pub fn to_byte(v: f32, range: (f32, f32)) -> u8 {
    let (lo, hi) = range;
    if v.is_nan() {
        return 0;
    }
    if hi <= lo || !(hi - lo).is_finite() {
        return if v >= lo { 255 } else { 0 };
    }
    let t = (f64::from(v) - f64::from(lo)) / (f64::from(hi) - f64::from(lo));
    (t * 255.0).round().clamp(0.0, 255.0) as u8
}

/// Lays out tiles on a grid of `cols` columns (as many rows as `cells` needs), row by row, with
/// `pad` pixels of [`PAD_VALUE`] around and between tiles and `pad` more between every
/// `group_rows` rows (2 puts pairs of rows together: inputs above their reconstructions). A
/// `None` cell is left as padding. Every present cell must hold `tile.numel()` values.
pub fn render_grid(
    cells: &[Option<&[f32]>],
    cols: usize,
    tile: TileShape,
    range: (f32, f32),
    pad: usize,
    group_rows: usize,
) -> anyhow::Result<Canvas> {
    if !matches!(tile.channels, 1 | 3) {
        bail!(
            "a grid tile has 1 (grayscale) or 3 (RGB) channels, not {}",
            tile.channels
        );
    }
    if cols == 0 {
        bail!("a grid needs at least one column");
    }
    let rows = cells.len().div_ceil(cols);
    // Extra padding goes between groups of rows only when rows are grouped.
    let gap_before = |r: usize| if group_rows > 1 { (r / group_rows) * pad } else { 0 };
    let width = cols * tile.width + (cols + 1) * pad;
    let height = rows * tile.height + (rows + 1) * pad + gap_before(rows.saturating_sub(1));
    let c = tile.channels;
    let mut canvas = Canvas::filled(width, height, c, PAD_VALUE);
    let plane = tile.height * tile.width;
    for (i, cell) in cells.iter().enumerate() {
        let Some(values) = cell else { continue };
        if values.len() != tile.numel() {
            bail!(
                "grid tile {i} has {} values; a {}x{}x{} tile needs {}",
                values.len(),
                tile.channels,
                tile.height,
                tile.width,
                tile.numel()
            );
        }
        let (r, col) = (i / cols, i % cols);
        let x0 = pad + col * (tile.width + pad);
        let y0 = pad + r * (tile.height + pad) + gap_before(r);
        for y in 0..tile.height {
            for x in 0..tile.width {
                let at = ((y0 + y) * width + x0 + x) * c;
                for ch in 0..c {
                    canvas.pixels[at + ch] = to_byte(values[ch * plane + y * tile.width + x], range);
                }
            }
        }
    }
    Ok(canvas)
}

/// A near-square grid ([`grid_layout`]) of the `rows` of `values` (each one tile), padded by
/// `pad` pixels.
pub fn sample_grid(values: &[f32], tile: TileShape, range: (f32, f32), pad: usize) -> anyhow::Result<Canvas> {
    let cells: Vec<Option<&[f32]>> = values.chunks(tile.numel().max(1)).map(Some).collect();
    let (_, cols) = grid_layout(cells.len());
    render_grid(&cells, cols.max(1), tile, range, pad, 1)
}

/// Inputs and their reconstructions in pairs of rows: a row of inputs, the row of their
/// reconstructions below it, a gap, the next pair. The number of columns makes the whole picture
/// near-square (`⌈√(2n)⌉` for `n` inputs).
pub fn pairs_grid(
    inputs: &[f32],
    reconstructions: &[f32],
    tile: TileShape,
    range: (f32, f32),
    pad: usize,
) -> anyhow::Result<Canvas> {
    if inputs.len() != reconstructions.len() {
        bail!(
            "{} input values but {} reconstructed values",
            inputs.len(),
            reconstructions.len()
        );
    }
    let inputs: Vec<&[f32]> = inputs.chunks(tile.numel().max(1)).collect();
    let recons: Vec<&[f32]> = reconstructions.chunks(tile.numel().max(1)).collect();
    let (_, cols) = grid_layout(2 * inputs.len());
    let cols = cols.clamp(1, inputs.len().max(1));
    let mut cells = Vec::new();
    for (ins, outs) in inputs.chunks(cols).zip(recons.chunks(cols)) {
        for row in [ins, outs] {
            cells.extend(row.iter().map(|&t| Some(t)));
            cells.extend(std::iter::repeat_n(None, cols - row.len()));
        }
    }
    render_grid(&cells, cols, tile, range, pad, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_near_square_and_holds_every_tile() {
        assert_eq!(grid_layout(0), (0, 0));
        assert_eq!(grid_layout(1), (1, 1));
        assert_eq!(grid_layout(2), (1, 2));
        assert_eq!(grid_layout(3), (2, 2));
        assert_eq!(grid_layout(4), (2, 2));
        assert_eq!(grid_layout(5), (2, 3));
        assert_eq!(grid_layout(7), (3, 3));
        assert_eq!(grid_layout(10), (3, 4));
        assert_eq!(grid_layout(64), (8, 8));
        assert_eq!(grid_layout(65), (8, 9));
        assert_eq!(grid_layout(128), (11, 12));
        for n in 1..300 {
            let (r, c) = grid_layout(n);
            assert!(r * c >= n && (r - 1) * c < n, "{n}: {r}x{c} holds n with no empty row");
            assert!(r <= c && c <= r + 1, "{n}: {r}x{c} is near-square");
        }
    }

    #[test]
    fn values_map_linearly_and_clamp() {
        assert_eq!(to_byte(0.0, (0.0, 1.0)), 0);
        assert_eq!(to_byte(1.0, (0.0, 1.0)), 255);
        assert_eq!(to_byte(0.5, (0.0, 1.0)), 128); // 127.5 rounds up
        assert_eq!(to_byte(0.0, (-1.0, 1.0)), 128);
        assert_eq!(to_byte(-0.5, (-1.0, 1.0)), 64); // 63.75
        assert_eq!(to_byte(0.2, (0.0, 1.0)), 51);
        assert_eq!(to_byte(-3.0, (-1.0, 1.0)), 0);
        assert_eq!(to_byte(7.0, (-1.0, 1.0)), 255);
        assert_eq!(to_byte(f32::INFINITY, (0.0, 1.0)), 255);
        assert_eq!(to_byte(f32::NEG_INFINITY, (0.0, 1.0)), 0);
        assert_eq!(to_byte(f32::NAN, (0.0, 1.0)), 0);
        assert_eq!(to_byte(0.5, (2.0, 2.0)), 0);
        assert_eq!(to_byte(2.0, (2.0, 2.0)), 255);
    }

    fn temp_png(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("nash-grid-test-{}-{name}.png", std::process::id()))
    }

    #[test]
    fn grid_png_decodes_to_the_expected_size_and_pixels() {
        let tile = TileShape {
            channels: 1,
            height: 3,
            width: 4,
        };
        // Five tiles; tile k is filled with k / 4 in range (0, 1).
        let values: Vec<f32> = (0..5).flat_map(|k| vec![k as f32 / 4.0; 12]).collect();
        let canvas = sample_grid(&values, tile, (0.0, 1.0), 2).unwrap();
        // 2 rows x 3 columns: width 3*4 + 4*2 = 20, height 2*3 + 3*2 = 12.
        assert_eq!((canvas.width, canvas.height, canvas.channels), (20, 12, 1));
        let path = temp_png("gray");
        canvas.write_png(&path).unwrap();
        let img = image::open(&path).unwrap().into_luma8();
        assert_eq!(img.dimensions(), (20, 12));
        assert_eq!(img.get_pixel(0, 0).0[0], PAD_VALUE);
        assert_eq!(img.get_pixel(2, 2).0[0], 0, "tile 0, top left");
        assert_eq!(img.get_pixel(2 + 6, 2).0[0], 64, "tile 1 = 0.25");
        assert_eq!(img.get_pixel(2 + 6 + 3, 2 + 2).0[0], 64, "tile 1, bottom right");
        assert_eq!(img.get_pixel(2, 2 + 5).0[0], 191, "tile 3 = 0.75 starts the second row");
        assert_eq!(img.get_pixel(2 + 6, 2 + 5).0[0], 255, "tile 4 = 1 beside it");
        assert_eq!(img.get_pixel(2 + 6, 2 + 4).0[0], PAD_VALUE, "padding between the rows");
        assert_eq!(img.get_pixel(2 + 12, 2 + 5).0[0], PAD_VALUE, "the sixth cell is empty");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn rgb_tiles_are_channel_major() {
        let tile = TileShape {
            channels: 3,
            height: 2,
            width: 2,
        };
        // One tile: red plane 1, green plane 0, blue plane 0.5, in range (-1, 1).
        let values = [[1.0f32; 4], [-1.0; 4], [0.0; 4]].concat();
        let canvas = sample_grid(&values, tile, (-1.0, 1.0), 2).unwrap();
        let path = temp_png("rgb");
        canvas.write_png(&path).unwrap();
        let img = image::open(&path).unwrap().into_rgb8();
        assert_eq!(img.dimensions(), (6, 6));
        assert_eq!(img.get_pixel(3, 3).0, [255, 0, 128]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn pairs_put_reconstructions_below_their_inputs() {
        let tile = TileShape {
            channels: 1,
            height: 2,
            width: 2,
        };
        // Input k is k/5, its reconstruction 1 - k/5.
        let inputs: Vec<f32> = (0..5).flat_map(|k| vec![k as f32 * 0.2; 4]).collect();
        let recons: Vec<f32> = (0..5).flat_map(|k| vec![1.0 - k as f32 * 0.2; 4]).collect();
        let canvas = pairs_grid(&inputs, &recons, tile, (0.0, 1.0), 2).unwrap();
        // 10 tiles: 4 columns, so two pairs of rows (the second pair holds one input).
        // Width 4*2 + 5*2 = 18; height 4*2 + 5*2 + 2 (gap between the pairs) = 20.
        assert_eq!((canvas.width, canvas.height), (18, 20));
        let px = |x: usize, y: usize| canvas.pixels[y * canvas.width + x];
        assert_eq!(px(2 + 4, 2), 51, "input 1 (0.2) in the first row");
        assert_eq!(px(2 + 4, 2 + 4), 204, "its reconstruction (0.8) below it");
        // The second pair starts after 2 rows, their padding and the extra gap: y = 2 + 2*4 + 2.
        assert_eq!(px(2, 12), 204, "input 4 (0.8) starts the second pair");
        assert_eq!(px(2, 16), 51, "its reconstruction (0.2)");
        assert_eq!(px(2 + 4, 12), PAD_VALUE, "nothing beside it");
        assert!(pairs_grid(&inputs, &recons[..4], tile, (0.0, 1.0), 2).is_err());
    }

    #[test]
    fn bad_tiles_are_errors() {
        let tile = TileShape {
            channels: 2,
            height: 2,
            width: 2,
        };
        assert!(sample_grid(&[0.0; 8], tile, (0.0, 1.0), 2).is_err());
        let tile = TileShape { channels: 1, ..tile };
        let short = [0.0f32; 3];
        assert!(render_grid(&[Some(&short[..])], 1, tile, (0.0, 1.0), 2, 1).is_err());
    }
}
