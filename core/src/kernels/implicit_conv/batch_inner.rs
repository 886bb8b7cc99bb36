//! The batch-innermost route of [`super::convolve`] and [`super::weight_gradient`].
//!
//! [`convolve`]: the input is laid out `[pixel, channel, sample]` once per call, so that the 32
//! columns of a tile are 32 samples at one grid point and every contraction row of the tile is one
//! contiguous run of 32 input values. The microkernel then reads its rows in place: no panel is
//! packed, no padded copy of the input is made (a tap that falls outside the input is left out of
//! the tile's contraction instead of multiplied by zeros: 14% of the products of a 4x4, stride-2,
//! padding-1 convolution onto 7x7), and each row of a tile is 32 contiguous values of a `[pixel,
//! row, sample]` result, which is laid back out to `[sample, row, pixel]` once at the end. The price
//! is the two layout passes over the input and the result, against the packing (each input value
//! gathered once per tap that reads it) and the strided write-back of [`super::convolve`]'s route.
//! Its sums are those of [`super::convolve`] in the same order, without the terms of taps outside
//! the input (each a multiply-add of a zero, which leaves a finite sum unchanged).
//!
//! [`weight_gradient`]: the input and the output gradient are laid out `[pixel, sample, channel]`,
//! and a tile is 12 output channels by 32 input channels of one tap, contracted over the grid
//! points whose pixel under the tap is inside the input and over their samples: each contraction
//! row is 32 contiguous input values and 12 contiguous gradient values, read in place.
//!
//! Both layouts leave a gap of 16 values (`PIXEL_GAP`) between two pixels' blocks.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{Gather, Microkernel, Product, SharedOutput, TILE_COLUMNS, TILE_ROWS};
use crate::kernels::{transpose_strided, transpose_strided_uninit, Strided, StridedMut};

/// Whether [`convolve`] computes a call of `batch` samples of `channels` channels with these
/// products: tiles of samples at least three quarters full ([`fills_tiles`]), some rows and
/// channels, and products whose pixels cover the output planes once (every output value is then
/// one tile's, and the result needs no zero-fill).
pub fn fits(batch: usize, channels: usize, gather: &Gather<'_>, products: &[Product<'_>]) -> bool {
    let Some(first) = products.first() else {
        return false;
    };
    if !fills_tiles(batch) || channels == 0 || first.weights.rows == 0 {
        return false;
    }
    let planes = first.scatter.planes;
    let mut covered = vec![false; planes.0 * planes.1];
    for product in products {
        let (stride, offset) = (product.scatter.stride, product.scatter.offset);
        if product.scatter.planes != planes {
            return false;
        }
        for oy in 0..gather.grid.0 {
            for ox in 0..gather.grid.1 {
                let (y, x) = (oy * stride + offset.0, ox * stride + offset.1);
                if y >= planes.0 || x >= planes.1 || std::mem::replace(&mut covered[y * planes.1 + x], true) {
                    return false;
                }
            }
        }
    }
    covered.iter().all(|&c| c)
}

/// Whether `batch` samples fill their tiles of 32 to three quarters or more (32 or more, or 24 to
/// 32; 48 and up to 64, ...): a tile's columns are samples, and a batch of 16 would leave half of
/// every multiply-add's lanes empty, where the padded route's tiles are always full.
pub fn fills_tiles(batch: usize) -> bool {
    batch > 0 && 4 * batch >= 3 * batch.div_ceil(TILE_COLUMNS) * TILE_COLUMNS
}

/// Whether [`weight_gradient`] computes the weight gradient of a convolution of `batch` samples
/// with `channels` input channels and `rows` output channels: whole tiles of channels.
pub fn fits_weight_gradient(batch: usize, channels: usize, rows: usize) -> bool {
    batch > 0 && rows > 0 && channels > 0 && channels.is_multiple_of(TILE_COLUMNS)
}

/// [`super::convolve`] of `x` (`[batch, channels, h, w]`, not padded) through the batch-innermost
/// layout, for calls that [`fits`] allows.
///
/// # Panics
/// When the operands do not have these shapes or the call does not fit (bugs in the calling
/// kernel, never user input).
#[allow(clippy::too_many_arguments)]
pub fn convolve(
    x: &[f32],
    (batch, channels): (usize, usize),
    (h, w): (usize, usize),
    gather: &Gather<'_>,
    products: &[Product<'_>],
    bias: Option<&[f32]>,
    out: &mut [f32],
    accumulate: bool,
    kernel: Microkernel,
) {
    assert!(
        fits(batch, channels, gather, products),
        "batch-inner conv: the call does not fit the route"
    );
    let (rows, planes) = super::check_products(products, channels, gather);
    let (pixels, out_pixels) = (h * w, planes.0 * planes.1);
    assert!(
        x.len() >= batch * channels * pixels,
        "batch-inner conv: input too short"
    );
    assert!(
        out.len() >= batch * rows * out_pixels,
        "batch-inner conv: output too short"
    );
    assert!(bias.is_none_or(|b| b.len() >= rows), "batch-inner conv: bias too short");
    let input_stride = channels * batch + PIXEL_GAP;
    let input = to_pixel_major(x, (batch, channels, pixels), input_stride, Within::Swapped);
    // `[out pixel, row, sample]`: every value written by one tile (the products cover the planes);
    // each pixel's block `pixel_stride` values from the last, the gap zero.
    let pixel_stride = rows * batch + PIXEL_GAP;
    let len = out_pixels * pixel_stride;
    let mut result: Vec<f32> = Vec::with_capacity(len);
    for gap in result.spare_capacity_mut()[..len].chunks_exact_mut(pixel_stride) {
        gap[rows * batch..].fill(MaybeUninit::new(0.0));
    }
    let output = SharedOutput(result.spare_capacity_mut().as_mut_ptr().cast());
    let sample_blocks = batch.div_ceil(TILE_COLUMNS);
    let grid_pixels = gather.grid.0 * gather.grid.1;
    (0..grid_pixels * sample_blocks)
        .into_par_iter()
        .with_min_len(crate::kernels::min_items_per_task(2))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(segments, block_segments): &mut (Segments, Segments), task| {
                let (point, block) = (task / sample_blocks, task % sample_blocks);
                let (oy, ox) = (point / gather.grid.1, point % gather.grid.1);
                let first_sample = block * TILE_COLUMNS;
                let columns = TILE_COLUMNS.min(batch - first_sample);
                for product in products {
                    let (stride, offset) = (product.scatter.stride, product.scatter.offset);
                    let out_pixel = (oy * stride + offset.0) * planes.1 + ox * stride + offset.1;
                    // The product's taps inside the input: (where its rows start, first contraction row).
                    segments.clear();
                    for (i, &t) in product.taps.iter().enumerate() {
                        if let Some(pixel) = gather.input_pixel((oy, ox), t, (h, w)) {
                            segments.push((pixel * input_stride + first_sample, i * channels));
                        }
                    }
                    for first_row in (0..rows).step_by(TILE_ROWS) {
                        let block_rows = TILE_ROWS.min(rows - first_row);
                        let weights = product.weights.block(first_row);
                        // The block's weights: `block_rows` per contraction row.
                        block_segments.clear();
                        block_segments.extend(segments.iter().map(|&(start, first)| (start, first * block_rows)));
                        let tile_bias = bias.map(|b| &b[first_row..first_row + block_rows]);
                        // SAFETY: the tile's rows are the `block_rows` runs of `columns` values of
                        // output pixel `out_pixel`, rows `first_row..`, samples `first_sample..` of
                        // `result`, which only this task writes (one pixel per product and grid point,
                        // the products' pixels distinct: `fits`); each segment's `channels` rows of
                        // `columns` values at stride `batch` lie inside `input` (the pixel is inside
                        // the planes, `first_sample + columns <= batch`), and `weights` holds
                        // `block_rows` values per contraction row of the product.
                        unsafe {
                            let tile = output.at(out_pixel * pixel_stride + first_row * batch + first_sample);
                            multiply_rows(
                                kernel,
                                block_rows,
                                Rows {
                                    values: &input,
                                    segments: block_segments,
                                    count: channels,
                                    stride: batch,
                                    weight_stride: block_rows,
                                    columns,
                                },
                                weights,
                                tile_bias,
                                tile,
                                batch,
                            );
                        }
                    }
                }
            },
        );
    // SAFETY: every `(out pixel, row, sample)` value was written by its tile above, every gap
    // before the tiles.
    unsafe { result.set_len(len) };
    from_batch_inner(&result, pixel_stride, (batch, rows, out_pixels), out, accumulate);
}

/// `dw +=` the gradient of [`convolve`]'s weights from `x` (`[batch, channels, h, w]`, not padded)
/// and `grad`, the gradient of its output on the grid (`[batch, rows, grid pixels]`); `dw` is
/// `[rows, channels, taps]` row-major, as [`super::weight_gradient`]'s. Both operands are laid out
/// `[pixel, sample, channel]` once; a tile is 12 rows by 32 channels of one tap, whose contraction
/// runs over every grid point whose pixel under the tap is inside the input, and over its samples:
/// each contraction row is 32 contiguous input values and 12 contiguous gradient values, read in
/// place. The tiles' sums (grid points, then samples, in order: the same bits on any number of
/// threads) go to a `[rows, taps, channels]` buffer, added into `dw` at the end.
///
/// # Panics
/// When the operands do not have these shapes or the call does not fit (bugs in the calling
/// kernel, never user input).
#[allow(clippy::too_many_arguments)]
pub fn weight_gradient(
    x: &[f32],
    (batch, channels): (usize, usize),
    (h, w): (usize, usize),
    gather: &Gather<'_>,
    grad: &[f32],
    rows: usize,
    dw: &mut [f32],
    kernel: Microkernel,
) {
    assert!(
        fits_weight_gradient(batch, channels, rows),
        "batch-inner weight gradient: the call does not fit the route"
    );
    let (pixels, grid_pixels, taps) = (h * w, gather.grid.0 * gather.grid.1, gather.taps.len());
    assert!(
        x.len() >= batch * channels * pixels,
        "batch-inner weight gradient: input too short"
    );
    assert!(
        grad.len() >= batch * rows * grid_pixels,
        "batch-inner weight gradient: gradient too short"
    );
    assert!(
        dw.len() >= rows * channels * taps,
        "batch-inner weight gradient: weights too short"
    );
    if taps == 0 || grid_pixels == 0 {
        return;
    }
    let input_stride = batch * channels + PIXEL_GAP;
    let input = to_pixel_major(x, (batch, channels, pixels), input_stride, Within::Kept);
    let grad_stride = batch * rows + PIXEL_GAP;
    let grad = to_pixel_major(grad, (batch, rows, grid_pixels), grad_stride, Within::Kept);
    // `[rows, taps, channels]`: every value written by one tile.
    let len = rows * taps * channels;
    let mut sums: Vec<f32> = Vec::with_capacity(len);
    let output = SharedOutput(sums.spare_capacity_mut().as_mut_ptr().cast());
    let (row_blocks, channel_blocks) = (rows.div_ceil(TILE_ROWS), channels / TILE_COLUMNS);
    (0..taps * row_blocks * channel_blocks)
        .into_par_iter()
        .with_min_len(crate::kernels::min_items_per_task(2))
        .for_each_init(Vec::new, |segments: &mut Segments, task| {
            let (t, block) = (
                task / (row_blocks * channel_blocks),
                task % (row_blocks * channel_blocks),
            );
            // Row blocks innermost: a thread's neighbouring tasks read the same input channels.
            let (first_row, first_channel) = ((block % row_blocks) * TILE_ROWS, (block / row_blocks) * TILE_COLUMNS);
            let block_rows = TILE_ROWS.min(rows - first_row);
            // Per grid point whose pixel under tap `t` is inside the input: where its samples'
            // channels and gradient rows start.
            segments.clear();
            for point in 0..grid_pixels {
                let (oy, ox) = (point / gather.grid.1, point % gather.grid.1);
                if let Some(pixel) = gather.input_pixel((oy, ox), t, (h, w)) {
                    segments.push((pixel * input_stride + first_channel, point * grad_stride + first_row));
                }
            }
            // SAFETY: the tile's rows are `first_row..first_row + block_rows` of `sums` at tap `t`,
            // channels `first_channel..+32`, which only this task writes; each segment's `batch`
            // rows of 32 channels (stride `channels`) lie inside `input` and their `block_rows`
            // gradient values (stride `rows`) inside `grad`.
            unsafe {
                let tile = output.at((first_row * taps + t) * channels + first_channel);
                multiply_rows(
                    kernel,
                    block_rows,
                    Rows {
                        values: &input,
                        segments,
                        count: batch,
                        stride: channels,
                        weight_stride: rows,
                        columns: TILE_COLUMNS,
                    },
                    &grad,
                    None,
                    tile,
                    taps * channels,
                );
            }
        });
    // SAFETY: every `(row, tap, channel)` value was written by its tile above.
    unsafe { sums.set_len(len) };
    for (m, row) in dw[..rows * channels * taps]
        .chunks_exact_mut(channels * taps)
        .enumerate()
    {
        // `[taps, channels]` of row `m` added into its `[channels, taps]`.
        transpose_strided(
            Strided(&sums[m * taps * channels..], channels),
            (taps, channels),
            StridedMut(row, taps),
            true,
        );
    }
}

/// Pixels per task of the layout passes into a pixel-major layout ([`to_pixel_major`]): one tile
/// of the transposition, so that each task writes its part of the layout in order.
const LAYOUT_BLOCK: usize = 8;

/// The order of the two leading indices of `[outer, inner, pixels]` values within each pixel's
/// block of a pixel-major layout ([`to_pixel_major`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Within {
    /// `[pixels, outer, inner]`.
    Kept,
    /// `[pixels, inner, outer]`: the batch-innermost layout of `[batch, channels, pixels]`.
    Swapped,
}

/// `x` (`[outer, inner, pixels]`) laid out pixel-major (`within` orders each pixel's block), each
/// pixel's block `pixel_stride` values from the last (the gap zero, see [`PIXEL_GAP`]), in parallel
/// over blocks of [`LAYOUT_BLOCK`] pixels (each a contiguous block of the result, written in order).
fn to_pixel_major(
    x: &[f32],
    (outer, inner, pixels): (usize, usize, usize),
    pixel_stride: usize,
    within: Within,
) -> Vec<f32> {
    assert!(
        pixel_stride >= outer * inner && x.len() >= outer * inner * pixels,
        "pixel-major layout: pixel blocks overlap, or the input is too short"
    );
    let len = pixel_stride * pixels;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(LAYOUT_BLOCK * pixel_stride)
        .with_min_len(8)
        .enumerate()
        .for_each(|(chunk, dst): (usize, &mut [MaybeUninit<f32>])| {
            let first = chunk * LAYOUT_BLOCK;
            let count = dst.len() / pixel_stride;
            let (parts, rows) = match within {
                Within::Kept => (outer, inner),
                Within::Swapped => (inner, outer),
            };
            for part in 0..parts {
                // Where the transposition reads, its source's row stride, where it goes in a block.
                let (source, stride, at) = match within {
                    // Rows: the inner index; columns: this block's pixels of outer index `part`.
                    Within::Kept => (part * inner * pixels, pixels, part * inner),
                    // Rows: the outer index; columns: this block's pixels of inner index `part`.
                    Within::Swapped => (part * pixels, inner * pixels, part * outer),
                };
                transpose_strided_uninit(
                    Strided(&x[source + first..], stride),
                    (rows, count),
                    &mut dst[at..],
                    pixel_stride,
                );
            }
            for gap in dst.chunks_exact_mut(pixel_stride) {
                gap[outer * inner..].fill(MaybeUninit::new(0.0));
            }
        });
    // SAFETY: each block's `count` pixels of every outer and inner index were written above, and
    // their gaps.
    unsafe { out.set_len(len) };
    out
}

/// Values between the blocks of two pixels in the batch-innermost layouts: a block's length is a
/// multiple of 32 samples' rows, often a power of two, and the pixels of one row would then share
/// the cache's sets (the layout passes read or write across the pixels: 2.5-4x slower).
const PIXEL_GAP: usize = 16;

/// `out (+)=` `result` (`[pixels, rows, batch]`, each pixel's block `pixel_stride` values from the
/// last) laid out as `[batch, rows, pixels]`, in parallel over blocks of samples (each a
/// contiguous block of `out`).
fn from_batch_inner(
    result: &[f32],
    pixel_stride: usize,
    (batch, rows, pixels): (usize, usize, usize),
    out: &mut [f32],
    accumulate: bool,
) {
    // Whole tiles of samples per task: each reads the result's runs of 32 values.
    let per_block = TILE_COLUMNS;
    out[..batch * rows * pixels]
        .par_chunks_mut(per_block * rows * pixels)
        .with_min_len(2)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let first = chunk * per_block;
            let count = dst.len() / (rows * pixels);
            for m in 0..rows {
                // Rows: the pixels; columns: this block's samples of row `m`.
                transpose_strided(
                    Strided(&result[m * batch + first..], pixel_stride),
                    (pixels, count),
                    StridedMut(&mut dst[m * pixels..], rows * pixels),
                    accumulate,
                );
            }
        });
}

/// A tile's segments of contraction rows ([`Rows`]): where their values and their weights start.
type Segments = Vec<(usize, usize)>;

/// Contraction rows read in place: per segment `(start, weights_start)`, `count` rows of `columns`
/// values (1 to 32: a tile's columns past them are left out) from `values[start..]` on, `stride`
/// apart, whose weights (one per tile row, contiguous) are at `weights[weights_start..]` on,
/// `weight_stride` apart.
struct Rows<'a> {
    values: &'a [f32],
    segments: &'a [(usize, usize)],
    count: usize,
    stride: usize,
    weight_stride: usize,
    columns: usize,
}

/// `tile[r·tile_stride + i] = bias[r] + Σ_j w_j[r] · row_j[i]` for the tile's `rows` rows (1 to
/// [`TILE_ROWS`]) of `source.columns` values (the rest of the tile's 32 untouched), `j` over the contraction rows of `source`'s segments in order (the
/// sum in that order, the bias added last), `w_j` the row's `rows` weights.
///
/// # Safety
/// For every `r < rows`, the `source.columns` values from `tile + r·tile_stride` on must be valid
/// for writes and
/// no other thread may touch them during the call; every segment's rows must lie inside
/// `source.values` and its rows' `rows` weights inside `weights`.
#[allow(clippy::too_many_arguments)]
unsafe fn multiply_rows(
    kernel: Microkernel,
    rows: usize,
    source: Rows<'_>,
    weights: &[f32],
    bias: Option<&[f32]>,
    tile: *mut f32,
    tile_stride: usize,
) {
    macro_rules! dispatch {
        ($run:ident) => {
            match rows {
                1 => $run::<1>(&source, weights, bias, tile, tile_stride),
                2 => $run::<2>(&source, weights, bias, tile, tile_stride),
                3 => $run::<3>(&source, weights, bias, tile, tile_stride),
                4 => $run::<4>(&source, weights, bias, tile, tile_stride),
                5 => $run::<5>(&source, weights, bias, tile, tile_stride),
                6 => $run::<6>(&source, weights, bias, tile, tile_stride),
                7 => $run::<7>(&source, weights, bias, tile, tile_stride),
                8 => $run::<8>(&source, weights, bias, tile, tile_stride),
                9 => $run::<9>(&source, weights, bias, tile, tile_stride),
                10 => $run::<10>(&source, weights, bias, tile, tile_stride),
                11 => $run::<11>(&source, weights, bias, tile, tile_stride),
                _ => $run::<12>(&source, weights, bias, tile, tile_stride),
            }
        };
    }
    assert!(rows <= TILE_ROWS && bias.is_none_or(|b| b.len() == rows));
    assert!((1..=TILE_COLUMNS).contains(&source.columns), "a tile's columns");
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 (the microkernel was chosen for it); the rest is the caller's.
        Microkernel::Avx512 => unsafe { dispatch!(avx512_rows) },
        // SAFETY: as this function's.
        Microkernel::Portable => unsafe { dispatch!(portable_rows) },
    }
}

/// The portable tile of `R` rows (multiply, then add, as [`super::portable_tile`]).
///
/// # Safety
/// As [`multiply_rows`]'s, for `R` rows.
unsafe fn portable_rows<const R: usize>(
    source: &Rows<'_>,
    weights: &[f32],
    bias: Option<&[f32]>,
    tile: *mut f32,
    tile_stride: usize,
) {
    let mut sums = [[0.0f32; TILE_COLUMNS]; R];
    for &(start, first) in source.segments {
        for k in 0..source.count {
            let values = &source.values[start + k * source.stride..][..source.columns];
            let row_weights = &weights[first + k * source.weight_stride..][..R];
            for (sum, &w) in sums.iter_mut().zip(row_weights) {
                for (s, &v) in sum.iter_mut().zip(values) {
                    *s += w * v;
                }
            }
        }
    }
    for (r, sum) in sums.iter().enumerate() {
        let add = bias.map_or(0.0, |b| b[r]);
        for (i, &s) in sum[..source.columns].iter().enumerate() {
            // SAFETY: value `i < columns` of row `r` of the caller's tile.
            unsafe { *tile.add(r * tile_stride + i) = s + add };
        }
    }
}

/// The AVX-512 tile of `R` rows: the 2·`R` accumulators in registers, one fused multiply-add per
/// register and contraction row, as [`super::avx512::multiply_tile`]; a full tile with plain loads
/// and stores, a partial one with masked ones (which made full tiles 4-6% slower).
///
/// # Safety
/// As [`multiply_rows`]'s, for `R` rows; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_rows<const R: usize>(
    source: &Rows<'_>,
    weights: &[f32],
    bias: Option<&[f32]>,
    tile: *mut f32,
    tile_stride: usize,
) {
    // SAFETY: as this function's.
    unsafe {
        if source.columns == TILE_COLUMNS {
            avx512_tile::<R, true>(source, weights, bias, tile, tile_stride)
        } else {
            avx512_tile::<R, false>(source, weights, bias, tile, tile_stride)
        }
    }
}

/// [`avx512_rows`] for a full tile (`FULL`: every one of its 32 columns) or a partial one.
///
/// # Safety
/// As [`avx512_rows`]'s; with `FULL`, `source.columns` is 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_tile<const R: usize, const FULL: bool>(
    source: &Rows<'_>,
    weights: &[f32],
    bias: Option<&[f32]>,
    tile: *mut f32,
    tile_stride: usize,
) {
    use std::arch::x86_64::*;
    let mut low: [__m512; R] = [_mm512_setzero_ps(); R];
    let mut high: [__m512; R] = [_mm512_setzero_ps(); R];
    let values = source.values.as_ptr();
    // A partial tile's columns in each half: its masked loads and stores read and write no others.
    let lanes = |n: usize| if n >= 16 { 0xffff } else { (1u16 << n) - 1 };
    let (low_mask, high_mask) = (lanes(source.columns), lanes(source.columns.saturating_sub(16)));
    for &(start, first) in source.segments {
        // SAFETY (the loads): the segment's rows lie inside `source.values`, its weights inside
        // `weights` (the caller's).
        let mut row = unsafe { values.add(start) };
        let mut row_weights = unsafe { weights.as_ptr().add(first) };
        for _ in 0..source.count {
            unsafe {
                let (values_low, values_high) = if FULL {
                    (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16)))
                } else {
                    // (`wrapping_add`: with fewer than 17 columns the masked load reads nothing there.)
                    (
                        _mm512_maskz_loadu_ps(low_mask, row),
                        _mm512_maskz_loadu_ps(high_mask, row.wrapping_add(16)),
                    )
                };
                for r in 0..R {
                    let w = _mm512_set1_ps(*row_weights.add(r));
                    low[r] = _mm512_fmadd_ps(w, values_low, low[r]);
                    high[r] = _mm512_fmadd_ps(w, values_high, high[r]);
                }
                row = row.add(source.stride);
                row_weights = row_weights.add(source.weight_stride);
            }
        }
    }
    for r in 0..R {
        let add = _mm512_set1_ps(bias.map_or(0.0, |b| b[r]));
        let (low_sum, high_sum) = (_mm512_add_ps(low[r], add), _mm512_add_ps(high[r], add));
        // SAFETY: row `r` of the caller's tile.
        unsafe {
            let row = tile.add(r * tile_stride);
            if FULL {
                _mm512_storeu_ps(row, low_sum);
                _mm512_storeu_ps(row.add(16), high_sum);
            } else {
                _mm512_mask_storeu_ps(row, low_mask, low_sum);
                _mm512_mask_storeu_ps(row.wrapping_add(16), high_mask, high_sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{PackedWeights, PaddedPlanes, Scatter};
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5)
            .collect()
    }

    fn microkernels() -> Vec<Microkernel> {
        let mut all = vec![Microkernel::Portable];
        all.extend(Microkernel::fastest());
        all
    }

    /// A convolution (one product over every tap, stride 2, padding 1) and the four output phases of
    /// a transposed one (stride 2: each phase a stride-1 product over its four of the nine taps),
    /// through this route and through the padded-panel route: the same values, written and added.
    #[test]
    fn matches_the_padded_panel_route() {
        for kernel in microkernels() {
            // Whole tiles of samples, and a last tile of 16 (48) or 4 (100) of its 32 columns.
            for (batch, channels, rows, side) in [
                (32, 3, 5, 6),
                (64, 8, 13, 7),
                (32, 16, 24, 4),
                (48, 5, 14, 6),
                (100, 3, 12, 4),
            ] {
                // The convolution: 4x4 kernel, stride 2, padding 1, onto side/2.
                let taps: Vec<(isize, isize)> = (0..4).flat_map(|i| (0..4).map(move |j| (i - 1, j - 1))).collect();
                let out_side = side / 2;
                let gather = Gather {
                    stride: 2,
                    taps: &taps,
                    grid: (out_side, out_side),
                };
                let w = values(rows * channels * 16, 7);
                let offsets: Vec<usize> = (0..16).collect();
                let weights = PackedWeights::gather(&w, rows, channels * 16, &offsets, (channels, 16));
                let all: Vec<usize> = (0..16).collect();
                let products = [Product {
                    weights: &weights,
                    taps: &all,
                    scatter: Scatter {
                        planes: (out_side, out_side),
                        stride: 1,
                        offset: (0, 0),
                    },
                }];
                // The transposed convolution's phases: 3x3 taps of stride 1 onto twice the side.
                let phase_taps: Vec<(isize, isize)> = (-1..=1).flat_map(|i| (-1..=1).map(move |j| (i, j))).collect();
                let phase_gather = Gather {
                    stride: 1,
                    taps: &phase_taps,
                    grid: (side, side),
                };
                let phase_weights: Vec<PackedWeights> = (0..4)
                    .map(|p| {
                        PackedWeights::gather(
                            &values(rows * channels * 4, 11 + p),
                            rows,
                            channels * 4,
                            &[0, 1, 2, 3],
                            (channels, 4),
                        )
                    })
                    .collect();
                let phase_tap_sets: [Vec<usize>; 4] =
                    [vec![0, 1, 3, 4], vec![1, 2, 4, 5], vec![3, 4, 6, 7], vec![4, 5, 7, 8]];
                let phases: Vec<Product<'_>> = (0..4)
                    .map(|p| Product {
                        weights: &phase_weights[p],
                        taps: &phase_tap_sets[p],
                        scatter: Scatter {
                            planes: (2 * side, 2 * side),
                            stride: 2,
                            offset: (p / 2, p % 2),
                        },
                    })
                    .collect();
                let x = values(batch * channels * side * side, 3);
                let bias = values(rows, 5);
                for (gather, products, out_side, bias) in [
                    (&gather, &products[..], out_side, Some(&bias[..])),
                    (&gather, &products[..], out_side, None),
                    (&phase_gather, &phases[..], 2 * side, None),
                ] {
                    assert!(fits(batch, channels, gather, products));
                    let (before, after) = gather.padding((side, side));
                    let planes = PaddedPlanes::new(&x, (batch, channels), (side, side), before, after);
                    for accumulate in [false, true] {
                        let start = values(batch * rows * out_side * out_side, 9);
                        let mut want = start.clone();
                        super::super::convolve(&planes, gather, products, bias, &mut want, accumulate, kernel);
                        let mut got = start.clone();
                        convolve(
                            &x,
                            (batch, channels),
                            (side, side),
                            gather,
                            products,
                            bias,
                            &mut got,
                            accumulate,
                            kernel,
                        );
                        assert_eq!(
                            got, want,
                            "{kernel:?}, batch {batch}, {channels} -> {rows}, side {side}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fits_only_tiles_of_samples_three_quarters_full_and_products_that_cover_the_planes_once() {
        let taps = [(0isize, 0isize)];
        let gather = Gather {
            stride: 1,
            taps: &taps,
            grid: (2, 2),
        };
        let weights = PackedWeights::gather(&[1.0; 3], 3, 1, &[0], (1, 1));
        let product = |planes, stride, offset| Product {
            weights: &weights,
            taps: &[0],
            scatter: Scatter { planes, stride, offset },
        };
        assert!(fits(32, 1, &gather, &[product((2, 2), 1, (0, 0))]));
        // Tiles of samples at least three quarters full.
        for (batch, fills) in [
            (16, false),
            (23, false),
            (24, true),
            (40, false),
            (48, true),
            (100, true),
            (1, false),
        ] {
            assert_eq!(
                fits(batch, 1, &gather, &[product((2, 2), 1, (0, 0))]),
                fills,
                "batch {batch}"
            );
        }
        assert!(!fits(32, 0, &gather, &[product((2, 2), 1, (0, 0))]));
        assert!(!fits(32, 1, &gather, &[]));
        // Pixels left out, or written twice.
        assert!(!fits(32, 1, &gather, &[product((3, 3), 1, (0, 0))]));
        assert!(!fits(
            32,
            1,
            &gather,
            &[product((2, 2), 1, (0, 0)), product((2, 2), 1, (0, 0))]
        ));
        // Four phases of stride 2 cover a 4x4 plane once.
        let phases: Vec<Product<'_>> = (0..4).map(|p| product((4, 4), 2, (p / 2, p % 2))).collect();
        assert!(fits(64, 1, &gather, &phases));
        assert!(!fits(64, 1, &gather, &phases[..3]));
    }
}
