//! Implicit-GEMM convolution: a convolution computed as the product of a weight matrix and the
//! input's patches, with the patches gathered straight from the (zero-padded) input planes into
//! the microkernel's panels instead of a materialized column matrix (im2col), and every tile of
//! the result written straight to its place in the output tensor.
//!
//! One call computes, for every sample `b`, grid point `(oy, ox)`, and output row `m` of each of
//! its products ([`Product`]: weights `a` over some taps `P` of the gather's, scattered at output
//! stride `so` from offset `(ry, rx)`):
//!
//! ```text
//! out[b, m, oy·so + ry, ox·so + rx] (+)= bias[m] + Σ_{t ∈ P} Σ_c a[m, i_t·C + c] · in[b, c, oy·si + dy_t, ox·si + dx_t]
//! ```
//!
//! with the input zero outside its planes, taps `(dy_t, dx_t)` and input stride `si` ([`Gather`]),
//! `i_t` the place of tap `t` in `P`, and the scatter of [`Scatter`]. A convolution is one product
//! over every tap (`si` = its stride, taps `(ki − p, kj − p)`, `so` = 1); a transposed convolution
//! (the adjoint of a convolution of stride `s`) is `s²` products, one per phase `(ry, rx)` of its
//! output, each a stride-1 convolution of its input with the taps of the kernel that reach that
//! phase (`so` = `s`): every output value is then written once, by one sum, instead of scattered
//! into by `k²` columns (col2im), and the phases gather their patches once, together.
//!
//! The product runs in tiles of up to [`TILE_ROWS`] output rows by [`TILE_COLUMNS`] grid points:
//! a task packs the patches of 32 grid points (every tap's `C` contraction rows, tap-major) into a
//! panel, then, for each product, runs the microkernel once per block of rows against the packed
//! weights ([`PackedWeights`]) over the product's taps' rows of the panel, with the tile's 24
//! accumulators in AVX-512 registers, and writes (or adds) the tile into the output. Each output
//! value is one sum in contraction order, so the bits do not depend on the number of threads.
//! Tasks (blocks of grid points) split across the pool.
//!
//! [`batch_inner`] computes the same products without the padded copy and the panels where the
//! batch is whole tiles of 32 samples (and the weight gradient where the input channels are
//! whole tiles of 32), reading its rows in place from a pixel-major layout of the input.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

pub mod batch_inner;

/// Grid points per tile: two AVX-512 registers of `f32`.
pub const TILE_COLUMNS: usize = 32;

/// Output rows per tile at most: 24 accumulator registers of the 32 AVX-512 has, leaving room
/// for the two panel vectors and the broadcast weight.
pub const TILE_ROWS: usize = 12;

/// Output rows below which a convolution is faster through a column matrix and gemm: the panel
/// of patches is gathered once per tile and used by every row.
pub const MIN_ROWS: usize = 16;

/// Contraction depth below which a convolution is faster through a column matrix and gemm: a
/// tile's gather and write-back are repaid by its multiply-adds (the DCGAN's first convolution,
/// depth 16, ran 1.3-1.5x slower implicitly).
pub const MIN_DEPTH: usize = 64;

/// Tiles' worth of grid points per task when the pool splits a call (the smallest task).
const MIN_BLOCKS_PER_TASK: usize = 2;

/// The microkernel that multiplies a weight block by a panel of patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Microkernel {
    /// AVX-512 fused multiply-adds, the panel's 32 columns in two registers.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// Plain Rust (multiply, then add): runs the route's packing and write-back logic on any CPU
    /// in the tests, beside the AVX-512 kernel where the CPU has it. Not chosen by [`Self::fastest`].
    Portable,
}

impl Microkernel {
    /// The AVX-512 microkernel where the CPU has AVX-512, else `None`: elsewhere im2col and gemm
    /// (which has AVX2 and portable microkernels of its own) are the faster route.
    pub fn fastest() -> Option<Microkernel> {
        #[cfg(target_arch = "x86_64")]
        if super::wide_vectors::avx512() {
            return Some(Microkernel::Avx512);
        }
        None
    }
}

/// Input planes `[batch, channels, h, w]` with zero borders: the input pixel `(y, x)` of a plane
/// lives at `(y + origin.0, x + origin.1)` of the padded plane.
#[derive(Debug)]
pub struct PaddedPlanes {
    data: Vec<f32>,
    batch: usize,
    channels: usize,
    /// Padded `(height, width)`.
    size: (usize, usize),
    /// Where the input's pixel `(0, 0)` lies in a padded plane.
    origin: (usize, usize),
}

impl PaddedPlanes {
    /// Copies `x` (`[batch, channels, h, w]`) into planes with `before` zero rows and columns above
    /// and left of each plane and `after` below and right of it. Planes are copied in parallel on
    /// the pool's threads.
    ///
    /// # Panics
    /// When `x` holds fewer than `batch·channels·h·w` values (a bug in the calling kernel).
    pub fn new(
        x: &[f32],
        (batch, channels): (usize, usize),
        (h, w): (usize, usize),
        before: (usize, usize),
        after: (usize, usize),
    ) -> PaddedPlanes {
        let plane = h * w;
        assert!(x.len() >= batch * channels * plane, "padded planes: input too short");
        let size = (before.0 + h + after.0, before.1 + w + after.1);
        let padded_plane = size.0 * size.1;
        let total = batch * channels * padded_plane;
        if plane == 0 {
            let data = vec![0.0; total];
            return PaddedPlanes {
                data,
                batch,
                channels,
                size,
                origin: before,
            };
        }
        // Each plane zero-filled and its rows copied over it while it is in cache, not the whole
        // buffer zero-filled first.
        let mut data: Vec<f32> = Vec::with_capacity(total);
        data.spare_capacity_mut()[..total]
            .par_chunks_mut(padded_plane)
            .zip(x[..batch * channels * plane].par_chunks(plane))
            .with_min_len(super::min_items_per_task(16))
            .for_each(|(padded, plane)| {
                super::on_widest_vectors(
                    #[inline(always)]
                    || pad_plane(padded, plane, (h, w), size.1, before),
                )
            });
        // SAFETY: the loop above wrote every one of the `total` values (`pad_plane` fills each
        // padded plane whole before copying the input's rows into it).
        unsafe { data.set_len(total) };
        PaddedPlanes {
            data,
            batch,
            channels,
            size,
            origin: before,
        }
    }

    /// Values per padded sample.
    fn sample_len(&self) -> usize {
        self.channels * self.size.0 * self.size.1
    }

    /// Whether every index into the planes fits the AVX-512 gathers' 32-bit offsets.
    fn fits_32_bit_indices(&self) -> bool {
        self.data.len() <= i32::MAX as usize
    }

    /// The index of the patch origin (the value a tap `(0, 0)` of channel 0 would read, relative to
    /// the input's pixel `(0, 0)`) of grid point `(oy, ox)` of sample `b`, at input stride `stride`.
    fn patch_origin(&self, stride: usize, (b, oy, ox): (usize, usize, usize)) -> usize {
        b * self.sample_len() + (oy * self.size.1 + ox) * stride
    }
}

/// Writes one padded plane (`padded`, rows of `padded_width` values) of an input `plane` of `(h, w)`
/// whose pixel `(0, 0)` goes to `before`, everything else zero. (An AVX-512 form, one masked load
/// and one masked store per row, ran 1.6x slower in the DCGAN's steps on the Zen 5 machine.)
///
/// # Panics
/// When `padded` holds fewer than `before.0 + h` rows, its rows are narrower than `before.1 + w`
/// or `plane` holds fewer than `h·w` values (a bug in the calling kernel).
#[inline(always)]
fn pad_plane(
    padded: &mut [MaybeUninit<f32>],
    plane: &[f32],
    (h, w): (usize, usize),
    padded_width: usize,
    before: (usize, usize),
) {
    assert!(
        padded.len() >= (before.0 + h) * padded_width && before.1 + w <= padded_width && plane.len() >= h * w,
        "padded plane: the plane does not fit"
    );
    // One fill of the whole plane, then the rows copied over it: filling each row's borders apart
    // took two `memset` calls per row (of one value each at the DCGAN's shapes).
    padded.fill(MaybeUninit::new(0.0f32));
    let rows = padded[before.0 * padded_width..].chunks_exact_mut(padded_width);
    for (row, source) in rows.zip(plane.chunks_exact(w)).take(h) {
        // The rows are short (7 to 28 values at the DCGAN's shapes): an inline loop rather than
        // a `memcpy` call per row.
        for (value, &x) in row[before.1..before.1 + w].iter_mut().zip(source) {
            value.write(x);
        }
    }
}

/// Where the patches come from: input pixel `(oy·stride + dy, ox·stride + dx)` for grid point
/// `(oy, ox)` and tap `(dy, dx)`.
#[derive(Clone, Copy, Debug)]
pub struct Gather<'t> {
    /// Input pixels between neighbouring grid points.
    pub stride: usize,
    /// The taps' offsets, `(dy, dx)`, in contraction order within each input channel.
    pub taps: &'t [(isize, isize)],
    /// The grid's `(rows, columns)`.
    pub grid: (usize, usize),
}

impl Gather<'_> {
    /// Sample and grid point `(b, oy, ox)` of column `column` (the columns run over the samples,
    /// each over its grid row-major).
    fn point(&self, column: usize) -> (usize, usize, usize) {
        let pixels = self.grid.0 * self.grid.1;
        let (b, p) = (column / pixels, column % pixels);
        (b, p / self.grid.1, p % self.grid.1)
    }

    /// The pixel (`y·w + x`) of an unpadded `(h, w)` input that tap `t` reads for grid point
    /// `(oy, ox)`, or `None` where it falls outside the input.
    fn input_pixel(&self, (oy, ox): (usize, usize), t: usize, (h, w): (usize, usize)) -> Option<usize> {
        let (dy, dx) = self.taps[t];
        let y = (oy * self.stride) as isize + dy;
        let x = (ox * self.stride) as isize + dx;
        ((0..h as isize).contains(&y) && (0..w as isize).contains(&x)).then(|| y as usize * w + x as usize)
    }

    /// The zero rows and columns `(before, after)` an input of `size` needs on each side so that
    /// every tap of every grid point lands inside its padded plane.
    pub fn padding(&self, size: (usize, usize)) -> ((usize, usize), (usize, usize)) {
        let side = |n: usize, grid: usize, offset: fn(&(isize, isize)) -> isize| {
            let lowest = self.taps.iter().map(offset).min().unwrap_or(0);
            let highest = self.taps.iter().map(offset).max().unwrap_or(0);
            let last = (grid.max(1) - 1) as isize * self.stride as isize + highest;
            ((-lowest).max(0) as usize, (last - (n as isize - 1)).max(0) as usize)
        };
        let (top, bottom) = side(size.0, self.grid.0, |t| t.0);
        let (left, right) = side(size.1, self.grid.1, |t| t.1);
        ((top, left), (bottom, right))
    }
}

/// Where the results go: grid point `(oy, ox)` of output row `m` and sample `b` is the output
/// tensor's (`[batch, rows, height, width]`) pixel `(oy·stride + offset.0, ox·stride + offset.1)`
/// of plane `(b, m)`.
#[derive(Clone, Copy, Debug)]
pub struct Scatter {
    /// The output planes' `(height, width)`.
    pub planes: (usize, usize),
    /// Output pixels between neighbouring grid points.
    pub stride: usize,
    /// The output pixel of grid point `(0, 0)`.
    pub offset: (usize, usize),
}

/// A `[rows, depth]` weight matrix in the microkernel's order: blocks of [`TILE_ROWS`] rows (the
/// last one shorter), each stored depth-major (`[depth, block rows]`), so that a tile reads one
/// contiguous run of weights.
#[derive(Debug)]
pub struct PackedWeights {
    data: Vec<f32>,
    rows: usize,
    depth: usize,
}

impl PackedWeights {
    /// Packs the `[rows, offsets.len()·group_len]` matrix whose element `(m, i·group_len + g)` is
    /// `values[offsets[i] + g·group_stride + m·row_stride]`: a weight tensor's values read in
    /// another order. A convolution's kernel `[c_out, c_in, k, k]` is tap-major this way (groups:
    /// the taps, each over the input channels), and so are the phases of its adjoint (groups: the
    /// phase's taps, each over the output channels). A block's values of one group member `g`
    /// come from one run of `values` per row, which stay in the L1 cache while every group is
    /// written from them, each packed column in order.
    ///
    /// # Panics
    /// When an index falls outside `values` (a bug in the calling kernel).
    pub fn gather(
        values: &[f32],
        rows: usize,
        row_stride: usize,
        offsets: &[usize],
        (group_len, group_stride): (usize, usize),
    ) -> PackedWeights {
        let depth = offsets.len() * group_len;
        let len = rows * depth;
        let mut data = Vec::with_capacity(len);
        for (block, packed) in data.spare_capacity_mut()[..len]
            .chunks_mut(TILE_ROWS * depth)
            .enumerate()
        {
            let first = block * TILE_ROWS;
            let block_rows = TILE_ROWS.min(rows - first);
            for g in 0..group_len {
                let base = &values[g * group_stride + first * row_stride..];
                for (i, &offset) in offsets.iter().enumerate() {
                    let out = &mut packed[(i * group_len + g) * block_rows..][..block_rows];
                    for (r, value) in out.iter_mut().enumerate() {
                        value.write(base[offset + r * row_stride]);
                    }
                }
            }
        }
        // SAFETY: each block of `block_rows` rows wrote its `depth·block_rows` values (every
        // `(i, g, r)` above, `i·group_len + g` running over the depth), and the blocks tile `len`.
        unsafe { data.set_len(len) };
        PackedWeights { data, rows, depth }
    }

    /// The packed block of rows `first..first + TILE_ROWS.min(rows − first)`.
    fn block(&self, first: usize) -> &[f32] {
        let rows = TILE_ROWS.min(self.rows - first);
        &self.data[first * self.depth..][..rows * self.depth]
    }
}

/// The raw output pointer shared by the tasks of one call, each of which writes values no other
/// task touches (its grid points' in [`convolve`], its kernel values' in [`weight_gradient`]).
#[derive(Clone, Copy)]
struct SharedOutput(*mut f32);
// SAFETY: see the type's documentation; the pointer outlives the parallel loop that uses it.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// The pointer to value `index` (the closures of the tasks capture the whole `SharedOutput`
    /// through this method, not the bare pointer, which is neither `Send` nor `Sync`).
    ///
    /// # Safety
    /// `index` must lie inside the output.
    unsafe fn at(self, index: usize) -> *mut f32 {
        self.0.add(index)
    }
}

/// One product of a [`convolve`] call: a weight matrix over some of the gather's taps, whose results
/// go to pixels of their own. A convolution is one product over every tap; the output phases of a
/// transposed convolution that share a grid are one product each, over the taps that reach the
/// phase, all computed from one panel of patches (the four phases of a 4x4 kernel at stride 2 read
/// 9 taps, where four panels of their own would gather 16).
#[derive(Clone, Copy, Debug)]
pub struct Product<'a> {
    /// `[rows, taps.len()·channels]`, tap-major: contraction index `i·channels + c` is input
    /// channel `c` read through tap `taps[i]`.
    pub weights: &'a PackedWeights,
    /// The product's taps, as indices into the gather's.
    pub taps: &'a [usize],
    /// Where the product's results go.
    pub scatter: Scatter,
}

/// Computes `out (+)= bias + a·patches(input)` (see the module documentation) for `batch` samples
/// and every product (all of them `rows` rows, into the same output planes). `out` is `[batch,
/// rows, planes.0, planes.1]`; `bias` (one value per row) is added when given; with `accumulate`
/// the results are added to `out`, else they replace the values at the products' pixels (and no
/// others).
///
/// # Panics
/// When the operands do not have these shapes, the padding does not cover every tap, or a grid
/// does not fit in the output planes (bugs in the calling kernel, never user input).
pub fn convolve(
    input: &PaddedPlanes,
    gather: &Gather<'_>,
    products: &[Product<'_>],
    bias: Option<&[f32]>,
    out: &mut [f32],
    accumulate: bool,
    kernel: Microkernel,
) {
    if products.is_empty() {
        return;
    }
    let (batch, channels) = (input.batch, input.channels);
    let (rows, planes) = check_products(products, channels, gather);
    let (grid_pixels, out_plane) = (gather.grid.0 * gather.grid.1, planes.0 * planes.1);
    assert!(out.len() >= batch * rows * out_plane, "implicit conv: output too short");
    assert!(bias.is_none_or(|b| b.len() >= rows), "implicit conv: bias too short");
    let columns = batch * grid_pixels;
    for product in products {
        let (stride, offset) = (product.scatter.stride, product.scatter.offset);
        let last = |g: usize, offset: usize| (g.max(1) - 1) * stride + offset;
        assert!(
            columns == 0 || (last(gather.grid.0, offset.0) < planes.0 && last(gather.grid.1, offset.1) < planes.1),
            "implicit conv: the grid does not fit the output planes"
        );
    }
    if columns == 0 || rows == 0 {
        return;
    }
    let row_offsets = row_offsets(input, gather, Contraction::TapMajor);
    let segments: Vec<Vec<Range<usize>>> = products.iter().map(|p| panel_segments(p.taps, channels)).collect();
    let groups = interleaved_pairs(products);
    let small_indices = input.fits_32_bit_indices();
    let output = SharedOutput(out.as_mut_ptr());
    let blocks = columns.div_ceil(TILE_COLUMNS);
    (0..blocks)
        .into_par_iter()
        .with_min_len(super::min_items_per_task(MIN_BLOCKS_PER_TASK))
        .for_each_init(
            || {
                (
                    vec![0.0f32; row_offsets.len() * TILE_COLUMNS],
                    [[0.0f32; TILE_ROWS * TILE_COLUMNS]; 2],
                )
            },
            |(panel, tiles), block| {
                let first = block * TILE_COLUMNS;
                let valid = TILE_COLUMNS.min(columns - first);
                let points: [(usize, usize, usize); TILE_COLUMNS] = std::array::from_fn(|j| gather.point(first + j));
                // Each grid point's patch origin in the padded input; the points past the last
                // repeat the first (their results are dropped).
                let patch_origins: [usize; TILE_COLUMNS] =
                    std::array::from_fn(|j| input.patch_origin(gather.stride, points[if j < valid { j } else { 0 }]));
                pack_patches(kernel, &input.data, &row_offsets, &patch_origins, panel, small_indices);
                for &(product, partner) in &groups {
                    // Each grid point's output pixel in the plane of sample `b` and row 0 (the
                    // partner's pixel is the next one).
                    let scatter = &products[product].scatter;
                    let out_pixels: [usize; TILE_COLUMNS] = std::array::from_fn(|j| {
                        let (b, oy, ox) = points[j];
                        let (y, x) = (
                            oy * scatter.stride + scatter.offset.0,
                            ox * scatter.stride + scatter.offset.1,
                        );
                        b * rows * out_plane + y * planes.1 + x
                    });
                    #[cfg(target_arch = "x86_64")]
                    let output_runs = (kernel == Microkernel::Avx512 && scatter.stride <= MAX_RUN_STRIDE)
                        .then(|| StridedRuns::of(&out_pixels, valid, scatter.stride));
                    for first_row in (0..rows).step_by(TILE_ROWS) {
                        let block_rows = TILE_ROWS.min(rows - first_row);
                        let [tile, partner_tile] = &mut *tiles;
                        for (index, tile) in std::iter::once((product, &mut *tile))
                            .chain(partner.map(|index| (index, &mut *partner_tile)))
                        {
                            tile.fill(0.0);
                            let weights = products[index].weights.block(first_row);
                            multiply_tile(kernel, block_rows, &segments[index], weights, panel, tile);
                        }
                        #[cfg(target_arch = "x86_64")]
                        if let Some(runs) = &output_runs {
                            for r in 0..block_rows {
                                let m = first_row + r;
                                let add = bias.map_or(0.0, |b| b[m]);
                                let row = &tile[r * TILE_COLUMNS..][..TILE_COLUMNS];
                                // SAFETY: the CPU has AVX-512; each run's lanes write the output
                                // values of their grid points in row `m` (and with a partner, the
                                // values right of them), inside `out` (asserted above), which no
                                // other task writes.
                                unsafe {
                                    let at = output.at(m * out_plane);
                                    match partner {
                                        Some(_) => avx512::write_interleaved_runs(
                                            [row, &partner_tile[r * TILE_COLUMNS..][..TILE_COLUMNS]],
                                            add,
                                            runs,
                                            at,
                                            accumulate,
                                        ),
                                        None => avx512::write_strided_runs(row, add, runs, at, accumulate),
                                    }
                                };
                            }
                            continue;
                        }
                        let written = std::iter::once((&*tile, 0)).chain(partner.map(|_| (&*partner_tile, 1)));
                        for (tile, next) in written {
                            for r in 0..block_rows {
                                let m = first_row + r;
                                let add = bias.map_or(0.0, |b| b[m]);
                                for (j, &pixel) in out_pixels[..valid].iter().enumerate() {
                                    let value = tile[r * TILE_COLUMNS + j] + add;
                                    // SAFETY: `pixel + next + m·out_plane` is the output value of
                                    // grid point `first + j` and row `m` of the product (or of its
                                    // partner), inside `out` (asserted above), and no other task
                                    // writes it.
                                    unsafe {
                                        let dst = output.at(pixel + next + m * out_plane);
                                        *dst = if accumulate { *dst + value } else { value };
                                    }
                                }
                            }
                        }
                    }
                }
            },
        );
}

/// The rows and output planes the products of one call share, after checking that they share them,
/// that each one's weights are `channels` deep per tap, and that its taps are the gather's.
///
/// # Panics
/// When they are not (a bug in the calling kernel).
fn check_products(products: &[Product<'_>], channels: usize, gather: &Gather<'_>) -> (usize, (usize, usize)) {
    let (rows, planes) = (products[0].weights.rows, products[0].scatter.planes);
    for product in products {
        assert!(
            product.weights.rows == rows && product.scatter.planes == planes,
            "implicit conv: the products of one call differ in rows or output planes"
        );
        assert_eq!(
            product.weights.depth,
            product.taps.len() * channels,
            "implicit conv: weight depth"
        );
        assert!(
            product.taps.iter().all(|&t| t < gather.taps.len()),
            "implicit conv: a product's tap is not the gather's"
        );
    }
    (rows, planes)
}

/// The products of a [`convolve`] call in the groups it computes together: each product alone, or
/// with a partner whose pixels lie one right of its own (output stride 2: the phases `(ry, 0)`
/// and `(ry, 1)` of a transposed convolution), so that the two tiles are written interleaved, as
/// contiguous runs.
fn interleaved_pairs(products: &[Product<'_>]) -> Vec<(usize, Option<usize>)> {
    let mut paired = vec![false; products.len()];
    let mut groups = Vec::with_capacity(products.len());
    for (i, product) in products.iter().enumerate() {
        if paired[i] {
            continue;
        }
        let (offset, stride) = (product.scatter.offset, product.scatter.stride);
        let partner = (i + 1..products.len()).find(|&j| {
            let other = &products[j].scatter;
            stride == 2 && !paired[j] && other.stride == 2 && other.offset == (offset.0, offset.1 + 1)
        });
        if let Some(j) = partner {
            paired[j] = true;
        }
        groups.push((i, partner));
    }
    groups
}

/// The panel rows a product over `taps` reads, in its contraction order: per tap `t`, the
/// `channels` rows from `t·channels` on (a tap-major panel), neighbouring taps' rows merged.
fn panel_segments(taps: &[usize], channels: usize) -> Vec<Range<usize>> {
    let mut segments: Vec<Range<usize>> = Vec::with_capacity(taps.len());
    for &t in taps {
        let rows = t * channels..(t + 1) * channels;
        match segments.last_mut() {
            Some(last) if last.end == rows.start => last.end = rows.end,
            _ => segments.push(rows),
        }
    }
    segments
}

/// Grid points per step of [`weight_gradient`]'s reduction: a panel of their patches (32
/// contraction rows each: 32 KB, about the L1 cache) is reused by every block of rows.
const REDUCTION_STEP: usize = 256;

/// `dw += grad · patches(input)ᵀ`: the gradient of [`convolve`]'s weights (`[rows, channels·taps]`,
/// row-major) from `grad`, the gradient of its output on the grid (`[batch, rows, grid pixels]`, the
/// output of a convolution with [`Scatter`] stride 1 and offset 0). The contraction runs over every
/// sample's grid points, [`REDUCTION_STEP`] at a time, in one order whatever the threads; one task
/// per thread of the pool, each over a range of blocks of 32 contraction rows (of `dw`'s columns).
///
/// # Panics
/// As [`convolve`], when the operands do not have these shapes or the padding does not cover the taps.
pub fn weight_gradient(
    input: &PaddedPlanes,
    gather: &Gather<'_>,
    grad: &[f32],
    rows: usize,
    dw: &mut [f32],
    kernel: Microkernel,
) {
    let (batch, grid_pixels) = (input.batch, gather.grid.0 * gather.grid.1);
    let (depth, columns) = (input.channels * gather.taps.len(), batch * grid_pixels);
    assert!(grad.len() >= rows * columns, "implicit conv: output gradient too short");
    assert!(dw.len() >= rows * depth, "implicit conv: weight gradient too short");
    if columns == 0 || rows == 0 || depth == 0 {
        return;
    }
    let row_offsets = row_offsets(input, gather, Contraction::ChannelMajor);
    // The output gradient packed as the microkernel's weights: blocks of TILE_ROWS rows, each
    // `[columns, block rows]`: per sample, the transpose of the block's `[block rows, grid pixels]`
    // (in 8x8 register tiles where the CPU has AVX; element by element, this was 1.4% of the
    // DCGAN's step).
    let mut packed_grad = vec![0.0f32; rows * columns];
    packed_grad
        .par_chunks_mut(TILE_ROWS * columns)
        .with_min_len(super::min_items_per_task(4))
        .enumerate()
        .for_each(|(block, packed)| {
            let first = block * TILE_ROWS;
            let block_rows = TILE_ROWS.min(rows - first);
            for (b, out) in packed.chunks_exact_mut(block_rows * grid_pixels).enumerate() {
                let source = &grad[(b * rows + first) * grid_pixels..][..block_rows * grid_pixels];
                super::transpose_into(source, (block_rows, grid_pixels), out, false);
            }
        });
    let small_indices = input.fits_32_bit_indices();
    // Every column's patch origin, computed once for all the tasks.
    let patch_origins: Vec<usize> = (0..columns)
        .map(|column| input.patch_origin(gather.stride, gather.point(column)))
        .collect();
    let output = SharedOutput(dw.as_mut_ptr());
    // One task per thread, each over a range of blocks of 32 contraction rows (of `dw`'s
    // columns), the reduction step outermost: a step's slice of the packed output gradient
    // (`rows · 256` values) is read from memory once and then from L2 by each of the task's
    // blocks. With the blocks outermost, each block streamed the whole packed gradient (1.6 MB at
    // the DCGAN's batch 64, 12.8 MB at 512) once more.
    let blocks = depth.div_ceil(TILE_COLUMNS);
    let tasks = super::split_threads().clamp(1, blocks);
    let blocks_per_task = blocks.div_ceil(tasks);
    (0..blocks.div_ceil(blocks_per_task))
        .into_par_iter()
        .with_min_len(super::min_items_per_task(1))
        .for_each_init(
            || {
                (
                    vec![0.0f32; REDUCTION_STEP * TILE_COLUMNS],
                    [0.0f32; TILE_ROWS * TILE_COLUMNS],
                )
            },
            |(panel, tile), task| {
                // The task's blocks: first column of `dw`, columns in the block, and the offsets of
                // its contraction rows (those past the last repeat the first; their sums are dropped).
                let task_blocks: Vec<(usize, usize, [usize; TILE_COLUMNS])> = (task * blocks_per_task
                    ..blocks.min((task + 1) * blocks_per_task))
                    .map(|block| {
                        let first_column = block * TILE_COLUMNS;
                        let valid = TILE_COLUMNS.min(depth - first_column);
                        let offsets =
                            std::array::from_fn(|i| row_offsets[first_column + if i < valid { i } else { 0 }]);
                        (first_column, valid, offsets)
                    })
                    .collect();
                for start in (0..columns).step_by(REDUCTION_STEP) {
                    let step = REDUCTION_STEP.min(columns - start);
                    for &(first_column, valid, ref offsets) in &task_blocks {
                        pack_transposed_patches(
                            kernel,
                            &input.data,
                            patch_origins[start..start + step].iter().copied(),
                            offsets,
                            panel,
                            small_indices,
                        );
                        for first_row in (0..rows).step_by(TILE_ROWS) {
                            let block_rows = TILE_ROWS.min(rows - first_row);
                            let weights = &packed_grad[first_row * columns + start * block_rows..][..step * block_rows];
                            let whole_panel = [Range { start: 0, end: step }];
                            if valid == TILE_COLUMNS {
                                // The block's rows of `dw`, added into in place (a copy into the
                                // tile and back was 1.6% of the DCGAN's step, a `memcpy` call per
                                // row).
                                // SAFETY: rows `first_row..first_row + block_rows` of `dw` (`rows`
                                // rows of `depth` values, asserted above) from column
                                // `first_column` on hold 32 values of this task's block, which no
                                // other task touches.
                                unsafe {
                                    multiply_tile_in_place(
                                        kernel,
                                        block_rows,
                                        &whole_panel,
                                        weights,
                                        panel,
                                        output.at(first_row * depth + first_column),
                                        depth,
                                    )
                                };
                                continue;
                            }
                            for r in 0..block_rows {
                                // SAFETY: `dw` holds `rows·depth` values (asserted above); this
                                // task alone touches columns `first_column..first_column + valid`.
                                let row = unsafe {
                                    std::slice::from_raw_parts(output.at((first_row + r) * depth + first_column), valid)
                                };
                                tile[r * TILE_COLUMNS..][..valid].copy_from_slice(row);
                            }
                            multiply_tile(kernel, block_rows, &whole_panel, weights, panel, tile);
                            for r in 0..block_rows {
                                // SAFETY: as above.
                                let row = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        output.at((first_row + r) * depth + first_column),
                                        valid,
                                    )
                                };
                                row.copy_from_slice(&tile[r * TILE_COLUMNS..][..valid]);
                            }
                        }
                    }
                }
            },
        );
}

/// The order of a contraction over `C` input channels and `T` taps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contraction {
    /// Row `t·C + c`: each tap's channels together ([`convolve`]'s panels, whose products read
    /// some of the taps).
    TapMajor,
    /// Row `c·T + t`: the order of a convolution's weights `[rows, channels, k, k]`
    /// ([`weight_gradient`]'s result).
    ChannelMajor,
}

/// Offset of each contraction row (in `order`) from its grid point's patch origin in a padded
/// sample, after checking that every tap of every grid point lands inside the padded planes.
fn row_offsets(input: &PaddedPlanes, gather: &Gather<'_>, order: Contraction) -> Vec<usize> {
    let (height, width) = input.size;
    for &(dy, dx) in gather.taps {
        let fits = |origin: usize, offset: isize, grid: usize, size: usize| {
            let first = origin as isize + offset;
            first >= 0 && first + (((grid.max(1) - 1) * gather.stride) as isize) < (size as isize)
        };
        assert!(
            fits(input.origin.0, dy, gather.grid.0, height) && fits(input.origin.1, dx, gather.grid.1, width),
            "implicit conv: tap ({dy}, {dx}) reaches past the padded planes"
        );
    }
    let tap_offsets: Vec<usize> = gather
        .taps
        .iter()
        .map(|&(dy, dx)| {
            let y = (input.origin.0 as isize + dy) as usize;
            let x = (input.origin.1 as isize + dx) as usize;
            y * width + x
        })
        .collect();
    let plane = height * width;
    match order {
        Contraction::TapMajor => tap_offsets
            .iter()
            .flat_map(|&tap| (0..input.channels).map(move |c| c * plane + tap))
            .collect(),
        Contraction::ChannelMajor => (0..input.channels)
            .flat_map(|c| tap_offsets.iter().map(move |&tap| c * plane + tap))
            .collect(),
    }
}

/// Gathers, for each grid point whose patch origin `patch_origins` yields, the 32 contraction rows
/// at `row_offsets` into one row of `panel` (`[grid points, 32]`).
fn pack_transposed_patches(
    kernel: Microkernel,
    input: &[f32],
    patch_origins: impl Iterator<Item = usize>,
    row_offsets: &[usize; TILE_COLUMNS],
    panel: &mut [f32],
    small_indices: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Microkernel::Avx512 && small_indices {
        // SAFETY: the CPU has AVX-512 (the microkernel was chosen for it); every index
        // `origin + row_offsets[i]` lies inside `input` (checked by `row_offsets`) and fits 32
        // bits; `panel` holds 32 values per grid point.
        unsafe { avx512::pack_transposed_patches(input, patch_origins, row_offsets, panel) };
        return;
    }
    let _ = (kernel, small_indices);
    for (row, origin) in panel.chunks_exact_mut(TILE_COLUMNS).zip(patch_origins) {
        let source = &input[origin..];
        for (value, &offset) in row.iter_mut().zip(row_offsets) {
            *value = source[offset];
        }
    }
}

/// The largest output stride whose runs [`StridedRuns`] writes with vectors (two grid points per
/// 16-lane store at least).
#[cfg(target_arch = "x86_64")]
const MAX_RUN_STRIDE: usize = 8;

/// A run of [`StridedRuns`]: `length` grid points from tile lane `first` on, whose output
/// positions start at `position`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Default)]
struct StridedRun {
    first: usize,
    length: usize,
    position: usize,
}

/// The 32 lanes of a tile (two halves of 16) as runs of grid points whose output positions lie
/// `stride` apart (neighbours in a grid row), each short enough that its values, spread `stride`
/// lanes apart, fit one 16-lane vector. Lanes past the valid ones belong to no run.
#[cfg(target_arch = "x86_64")]
struct StridedRuns {
    /// Per half: the runs, and their number.
    halves: [([StridedRun; 16], usize); 2],
    /// The positions' stride.
    stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl StridedRuns {
    /// The runs of `positions`' first `valid` lanes (`stride` at most [`MAX_RUN_STRIDE`]).
    fn of(positions: &[usize; TILE_COLUMNS], valid: usize, stride: usize) -> StridedRuns {
        let longest = 16 / stride;
        let mut halves = [([StridedRun::default(); 16], 0usize); 2];
        for (half, (runs, count)) in halves.iter_mut().enumerate() {
            for lane in 0..16.min(valid.saturating_sub(half * 16)) {
                let position = positions[half * 16 + lane];
                let extends = *count > 0 && {
                    let run = runs[*count - 1];
                    run.first + run.length == lane
                        && run.length < longest
                        && position == run.position + run.length * stride
                };
                if extends {
                    runs[*count - 1].length += 1;
                } else {
                    runs[*count] = StridedRun {
                        first: lane,
                        length: 1,
                        position,
                    };
                    *count += 1;
                }
            }
        }
        StridedRuns { halves, stride }
    }
}

/// Gathers the patches of the 32 grid points whose patch origins are `patch_origins` into `panel`
/// (`[depth, 32]`): `panel[j·32 + i] = input[patch_origins[i] + row_offsets[j]]`.
fn pack_patches(
    kernel: Microkernel,
    input: &[f32],
    row_offsets: &[usize],
    patch_origins: &[usize; TILE_COLUMNS],
    panel: &mut [f32],
    small_indices: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Microkernel::Avx512 && small_indices {
        // SAFETY: the CPU has AVX-512 (the microkernel was chosen for it); every index
        // `patch_origins[i] + row_offsets[j]` lies inside `input` (checked by `convolve`) and fits
        // 32 bits; `panel` holds `depth·32` values.
        unsafe { avx512::pack_patches(input, row_offsets, patch_origins, panel) };
        return;
    }
    let _ = (kernel, small_indices);
    for (row, &offset) in panel.chunks_exact_mut(TILE_COLUMNS).zip(row_offsets) {
        let source = &input[offset..];
        for (value, &origin) in row.iter_mut().zip(patch_origins) {
            *value = source[origin];
        }
    }
}

/// `tile[r·32 + i] += Σ_j weights[j·rows + r] · panel[p_j·32 + i]` for `rows` (1 to [`TILE_ROWS`])
/// rows, where `p_j` runs over the panel rows of `segments` in order, the sum in order of `j` after
/// the tile's value.
fn multiply_tile(
    kernel: Microkernel,
    rows: usize,
    segments: &[Range<usize>],
    weights: &[f32],
    panel: &[f32],
    tile: &mut [f32; TILE_ROWS * TILE_COLUMNS],
) {
    // SAFETY: the tile's `rows <= TILE_ROWS` rows (asserted by `multiply_tile_in_place`) of 32
    // values lie in the array, borrowed mutably here.
    unsafe { multiply_tile_in_place(kernel, rows, segments, weights, panel, tile.as_mut_ptr(), TILE_COLUMNS) }
}

/// [`multiply_tile`] on a tile whose row `r` is the 32 values from `tile + r·stride` on: the rows
/// of a result matrix, added into where they lie (no copy into a tile and back).
///
/// # Safety
/// For every `r < rows`, the 32 values from `tile + r·stride` on must be valid for reads and
/// writes, and no other thread may touch them during the call.
unsafe fn multiply_tile_in_place(
    kernel: Microkernel,
    rows: usize,
    segments: &[Range<usize>],
    weights: &[f32],
    panel: &[f32],
    tile: *mut f32,
    stride: usize,
) {
    let depth: usize = segments.iter().map(|s| s.len()).sum();
    let panel_rows = segments.iter().map(|s| s.end).max().unwrap_or(0);
    assert!(weights.len() >= rows * depth && panel.len() >= panel_rows * TILE_COLUMNS && rows <= TILE_ROWS);
    macro_rules! dispatch {
        ($run:ident) => {
            match rows {
                1 => $run::<1>(segments, weights, panel, tile, stride),
                2 => $run::<2>(segments, weights, panel, tile, stride),
                3 => $run::<3>(segments, weights, panel, tile, stride),
                4 => $run::<4>(segments, weights, panel, tile, stride),
                5 => $run::<5>(segments, weights, panel, tile, stride),
                6 => $run::<6>(segments, weights, panel, tile, stride),
                7 => $run::<7>(segments, weights, panel, tile, stride),
                8 => $run::<8>(segments, weights, panel, tile, stride),
                9 => $run::<9>(segments, weights, panel, tile, stride),
                10 => $run::<10>(segments, weights, panel, tile, stride),
                11 => $run::<11>(segments, weights, panel, tile, stride),
                _ => $run::<12>(segments, weights, panel, tile, stride),
            }
        };
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Microkernel::Avx512 => {
            /// The AVX-512 tile of `R` rows.
            ///
            /// # Safety
            /// As [`multiply_tile_in_place`]'s.
            unsafe fn run<const R: usize>(
                segments: &[Range<usize>],
                weights: &[f32],
                panel: &[f32],
                tile: *mut f32,
                stride: usize,
            ) {
                // SAFETY: the CPU has AVX-512 (the microkernel was chosen for it); the operands'
                // lengths were asserted by `multiply_tile_in_place`, the tile's rows are the
                // caller's.
                unsafe { avx512::multiply_tile::<R>(segments, weights.as_ptr(), panel.as_ptr(), tile, stride) }
            }
            // SAFETY: as this function's.
            unsafe { dispatch!(run) }
        }
        // SAFETY: as this function's.
        Microkernel::Portable => unsafe { dispatch!(portable_tile) },
    }
}

/// The portable tile of `R` rows (multiply, then add: no fused multiply-add).
///
/// # Safety
/// As [`multiply_tile_in_place`]'s, for `R` rows.
unsafe fn portable_tile<const R: usize>(
    segments: &[Range<usize>],
    weights: &[f32],
    panel: &[f32],
    tile: *mut f32,
    stride: usize,
) {
    // SAFETY: the caller lends these `R` rows of 32 values, to this call alone.
    let tile_row = |r: usize| unsafe { std::slice::from_raw_parts_mut(tile.add(r * stride), TILE_COLUMNS) };
    let mut sums = [[0.0f32; TILE_COLUMNS]; R];
    for (r, sum) in sums.iter_mut().enumerate() {
        sum.copy_from_slice(tile_row(r));
    }
    let panel_rows = segments
        .iter()
        .flat_map(|rows| panel[rows.start * TILE_COLUMNS..rows.end * TILE_COLUMNS].chunks_exact(TILE_COLUMNS));
    for (row_weights, values) in weights.chunks_exact(R).zip(panel_rows) {
        for (sum, &w) in sums.iter_mut().zip(row_weights) {
            for (s, &v) in sum.iter_mut().zip(values) {
                *s += w * v;
            }
        }
    }
    for (r, sum) in sums.iter().enumerate() {
        tile_row(r).copy_from_slice(sum);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::TILE_COLUMNS;

    /// Runs per half tile above which the packers gather.
    const MAX_LANE_RUNS: usize = 4;

    /// A run of [`LaneRuns`]: tile lanes `start..start + length` (the mask `lanes`) read the
    /// values `offset, offset + stride, …` from a row's base.
    #[derive(Clone, Copy)]
    struct LaneRun {
        lanes: u16,
        /// The values a stride-2 run loads: `2·length − 1` from `offset` on.
        loaded: u16,
        start: usize,
        offset: usize,
        /// For stride 2: lane `l` of the run takes loaded value `2·(l − start)`.
        picks: __m512i,
    }

    /// The 32 patch origins of a panel row ([`pack_patches`]) as at most [`MAX_LANE_RUNS`] runs per
    /// half of origins 1 apart (or, where those are too many, 2 apart): a row of the panel is then,
    /// per run, one masked load (and at stride 2 one permutation), merged into one vector per half,
    /// instead of two gathers. Runs exist for the DCGAN's products: the transposed convolutions'
    /// phases (stride-1 gathers, grid rows of 7 points) and the stride-2 convolutions (rows of 7
    /// points 2 apart). On the Zen 5 machine of 2026-11-29 (`nash bench conv`) the phase products
    /// ran 7% faster than with gathers and the stride-2 products 4-7% (on the Zen 4 one of the
    /// same morning, an earlier form of the stride-1 loads was slower).
    struct LaneRuns {
        halves: [([LaneRun; MAX_LANE_RUNS], usize); 2],
        stride: usize,
    }

    impl LaneRuns {
        /// The runs of `offsets` 1 apart, else 2 apart, or `None` where a half needs more than
        /// [`MAX_LANE_RUNS`] either way.
        ///
        /// # Safety
        /// The CPU must have AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn of(offsets: &[usize; TILE_COLUMNS]) -> Option<LaneRuns> {
            Self::with_stride(offsets, 1).or_else(|| Self::with_stride(offsets, 2))
        }

        /// The runs of `offsets` `stride` apart (1 or 2), as [`Self::of`].
        ///
        /// # Safety
        /// The CPU must have AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn with_stride(offsets: &[usize; TILE_COLUMNS], stride: usize) -> Option<LaneRuns> {
            let ramp = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let empty = LaneRun {
                lanes: 0,
                loaded: 0,
                start: 0,
                offset: 0,
                picks: ramp,
            };
            let longest = 16usize.div_ceil(stride);
            let mut halves = [([empty; MAX_LANE_RUNS], 0usize); 2];
            for (half, (runs, count)) in halves.iter_mut().enumerate() {
                let offsets = &offsets[half * 16..][..16];
                let mut lane = 0;
                while lane < 16 {
                    let start = lane;
                    lane += 1;
                    while lane < 16
                        && lane - start < longest
                        && offsets[lane] == offsets[start] + (lane - start) * stride
                    {
                        lane += 1;
                    }
                    if *count == MAX_LANE_RUNS {
                        return None;
                    }
                    let length = lane - start;
                    runs[*count] = LaneRun {
                        lanes: ((1u32 << lane) - (1u32 << start)) as u16,
                        loaded: ((1u32 << ((length - 1) * stride + 1)) - 1) as u16,
                        start,
                        offset: offsets[start],
                        picks: _mm512_slli_epi32::<1>(_mm512_sub_epi32(ramp, _mm512_set1_epi32(start as i32))),
                    };
                    *count += 1;
                }
            }
            Some(LaneRuns { halves, stride })
        }

        /// Writes `base[offsets[i]]` to `out[i]` for the 32 lanes.
        ///
        /// # Safety
        /// The CPU must have AVX-512F; `base.add(offsets[i])` must be readable for every lane;
        /// `out` must hold 32 values.
        #[target_feature(enable = "avx512f")]
        unsafe fn pack_row(&self, base: *const f32, out: *mut f32) {
            for (half, (runs, count)) in self.halves.iter().enumerate() {
                let mut values = _mm512_setzero_ps();
                for run in &runs[..*count] {
                    values = if self.stride == 1 {
                        // Only the run's lanes are read, lane `l` at `base + offset + l − start`.
                        let first = base.add(run.offset).wrapping_sub(run.start);
                        _mm512_mask_loadu_ps(values, run.lanes, first)
                    } else {
                        // Only the run's values are read: `base + offset + 2·(l − start)`.
                        let loaded = _mm512_maskz_loadu_ps(run.loaded, base.add(run.offset));
                        _mm512_mask_permutexvar_ps(values, run.lanes, run.picks, loaded)
                    };
                }
                _mm512_storeu_ps(out.add(half * 16), values);
            }
        }
    }

    /// [`super::pack_patches`]: masked loads of runs where the patch origins are [`LaneRuns`],
    /// else two 16-lane gathers per contraction row.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every `patch_origins[i] + row_offsets[j]` must index `input` and
    /// fit in an `i32`; `panel` must hold `row_offsets.len()·32` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_patches(
        input: &[f32],
        row_offsets: &[usize],
        patch_origins: &[usize; TILE_COLUMNS],
        panel: &mut [f32],
    ) {
        let (source, out) = (input.as_ptr(), panel.as_mut_ptr());
        if let Some(runs) = LaneRuns::of(patch_origins) {
            for (j, &offset) in row_offsets.iter().enumerate() {
                runs.pack_row(source.add(offset), out.add(j * TILE_COLUMNS));
            }
            return;
        }
        let origins: [i32; TILE_COLUMNS] = std::array::from_fn(|i| patch_origins[i] as i32);
        let low = _mm512_loadu_si512(origins.as_ptr().cast());
        let high = _mm512_loadu_si512(origins[16..].as_ptr().cast());
        for (j, &offset) in row_offsets.iter().enumerate() {
            let row = source.add(offset);
            _mm512_storeu_ps(out.add(j * TILE_COLUMNS), _mm512_i32gather_ps::<4>(low, row.cast()));
            _mm512_storeu_ps(
                out.add(j * TILE_COLUMNS + 16),
                _mm512_i32gather_ps::<4>(high, row.cast()),
            );
        }
    }

    /// Writes (or adds) one row of a tile plus `bias` to the output through its strided runs: per
    /// run, the values spread `stride` lanes apart by one permutation, then one masked store (and
    /// load, when adding).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every run's positions must address values of the output from
    /// `row` that nothing else accesses meanwhile; `tile_row` must hold 32 values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn write_strided_runs(
        tile_row: &[f32],
        bias: f32,
        runs: &super::StridedRuns,
        row: *mut f32,
        accumulate: bool,
    ) {
        let stride = runs.stride;
        // Lane `l` of a spread run takes value `first + l / stride`; the lanes at multiples of
        // `stride` are the run's.
        let ramp: [i32; 16] = std::array::from_fn(|lane| (lane / stride) as i32);
        let ramp = _mm512_loadu_si512(ramp.as_ptr().cast());
        let every_stride = (0..16).step_by(stride).fold(0u16, |mask, lane| mask | 1 << lane);
        for (half, (half_runs, count)) in runs.halves.iter().enumerate() {
            let values = _mm512_add_ps(_mm512_loadu_ps(tile_row.as_ptr().add(half * 16)), _mm512_set1_ps(bias));
            for &super::StridedRun {
                first,
                length,
                position,
            } in &half_runs[..*count]
            {
                let spread = _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_set1_epi32(first as i32), ramp), values);
                let mask = every_stride & (u16::MAX >> (15 - (length - 1) * stride));
                store_or_add(row.add(position), mask, spread, accumulate);
            }
        }
    }

    /// Stores the lanes `mask` of `values` to `at` onwards, or with `accumulate` adds them to the
    /// values there.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; the masked lanes' values from `at` on must be writable.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_or_add(at: *mut f32, mask: u16, values: __m512, accumulate: bool) {
        let values = if accumulate {
            _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), values)
        } else {
            values
        };
        _mm512_mask_storeu_ps(at, mask, values);
    }

    /// Writes (or adds) one row of two tiles plus `bias` to the output through the strided runs
    /// (stride 2) of the first: per run, the two tiles' values interleaved by one permutation (the
    /// second tile's value of a grid point right of the first's), then one masked store (and load,
    /// when adding) of the run's contiguous pixels.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every run's positions and the positions right of them must
    /// address values of the output from `row` that nothing else accesses meanwhile; the runs'
    /// stride must be 2; each tile row must hold 32 values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn write_interleaved_runs(
        tile_rows: [&[f32]; 2],
        bias: f32,
        runs: &super::StridedRuns,
        row: *mut f32,
        accumulate: bool,
    ) {
        debug_assert_eq!(runs.stride, 2);
        // Lane `l` of an interleaved run takes value `first + l / 2` of the first tile (even `l`)
        // or of the second (odd `l`: index bit 4 picks the second operand).
        let ramp: [i32; 16] = std::array::from_fn(|lane| ((lane / 2) | (lane % 2) << 4) as i32);
        let ramp = _mm512_loadu_si512(ramp.as_ptr().cast());
        let bias = _mm512_set1_ps(bias);
        for (half, (half_runs, count)) in runs.halves.iter().enumerate() {
            let first_values = _mm512_add_ps(_mm512_loadu_ps(tile_rows[0].as_ptr().add(half * 16)), bias);
            let second_values = _mm512_add_ps(_mm512_loadu_ps(tile_rows[1].as_ptr().add(half * 16)), bias);
            for &super::StridedRun {
                first,
                length,
                position,
            } in &half_runs[..*count]
            {
                let index = _mm512_add_epi32(_mm512_set1_epi32(first as i32), ramp);
                let values = _mm512_permutex2var_ps(first_values, index, second_values);
                let mask = ((1u32 << (2 * length)) - 1) as u16;
                store_or_add(row.add(position), mask, values, accumulate);
            }
        }
    }

    /// [`super::pack_transposed_patches`]: where the 32 contraction rows are eight runs of four
    /// neighbouring values (a 4x4 kernel's rows: the DCGAN's), eight 128-bit loads per grid point
    /// put together in registers; else two 16-lane gathers. On the Zen 5 machine the loads took
    /// the DCGAN's weight gradients from 5.0-5.5 to 4.2-4.5 ms (`nash bench conv`, 1 thread) and
    /// 4.6% off the samples of its step; masked loads of the same runs ([`LaneRuns`]) had been no
    /// faster than the gathers.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every `origin + row_offsets[i]` must index `input` and fit in an
    /// `i32`; `panel` must hold 32 values per grid point.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_transposed_patches(
        input: &[f32],
        patch_origins: impl Iterator<Item = usize>,
        row_offsets: &[usize; TILE_COLUMNS],
        panel: &mut [f32],
    ) {
        let (source, out) = (input.as_ptr(), panel.as_mut_ptr());
        // Eight runs of four neighbouring values (two channels of a 4x4 kernel: a patch row per
        // run): four 128-bit loads and three inserts per half instead of a gather.
        let quads = (0..TILE_COLUMNS)
            .all(|i| row_offsets[i] == row_offsets[i / 4 * 4] + i % 4)
            .then(|| -> [usize; 8] { std::array::from_fn(|j| row_offsets[4 * j]) });
        if let Some(quads) = quads {
            for (i, origin) in patch_origins.enumerate() {
                let patch = source.add(origin);
                let load = |j: usize| _mm_loadu_ps(patch.add(quads[j]));
                for half in 0..2 {
                    let values = _mm512_castps128_ps512(load(4 * half));
                    let values = _mm512_insertf32x4::<1>(values, load(4 * half + 1));
                    let values = _mm512_insertf32x4::<2>(values, load(4 * half + 2));
                    let values = _mm512_insertf32x4::<3>(values, load(4 * half + 3));
                    _mm512_storeu_ps(out.add(i * TILE_COLUMNS + 16 * half), values);
                }
            }
            return;
        }
        let offsets: [i32; TILE_COLUMNS] = std::array::from_fn(|i| row_offsets[i] as i32);
        let low = _mm512_loadu_si512(offsets.as_ptr().cast());
        let high = _mm512_loadu_si512(offsets[16..].as_ptr().cast());
        for (i, origin) in patch_origins.enumerate() {
            let patch = source.add(origin);
            _mm512_storeu_ps(out.add(i * TILE_COLUMNS), _mm512_i32gather_ps::<4>(low, patch.cast()));
            _mm512_storeu_ps(
                out.add(i * TILE_COLUMNS + 16),
                _mm512_i32gather_ps::<4>(high, patch.cast()),
            );
        }
    }

    /// [`super::multiply_tile_in_place`] for `R` rows: 2·`R` accumulator registers (loaded from the
    /// tile's rows and stored back), one fused multiply-add per register and contraction row.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `weights` must hold `R` values per row of the segments, `panel`
    /// 32 values per row up to the segments' last, and the 32 values from `tile + r·stride` on must
    /// be the caller's to read and write for every `r < R`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn multiply_tile<const R: usize>(
        segments: &[Range<usize>],
        weights: *const f32,
        panel: *const f32,
        tile: *mut f32,
        stride: usize,
    ) {
        let mut low: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(tile.add(r * stride)));
        let mut high: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(tile.add(r * stride + 16)));
        let mut row_weights = weights;
        for rows in segments {
            for j in rows.clone() {
                let values_low = _mm512_loadu_ps(panel.add(j * TILE_COLUMNS));
                let values_high = _mm512_loadu_ps(panel.add(j * TILE_COLUMNS + 16));
                for r in 0..R {
                    let w = _mm512_set1_ps(*row_weights.add(r));
                    low[r] = _mm512_fmadd_ps(w, values_low, low[r]);
                    high[r] = _mm512_fmadd_ps(w, values_high, high[r]);
                }
                row_weights = row_weights.add(R);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(tile.add(r * stride), low[r]);
            _mm512_storeu_ps(tile.add(r * stride + 16), high[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    /// The plane writer against the definition, at several widths and borders on either side.
    #[test]
    fn padded_planes_hold_the_input_inside_zero_borders() {
        for (h, w) in [(1, 1), (3, 7), (7, 7), (14, 14), (5, 15), (4, 16), (3, 17), (2, 33)] {
            for before in [(0, 0), (1, 1), (2, 3), (0, 5)] {
                for after in [(0, 0), (1, 2), (3, 0)] {
                    let size = (before.0 + h + after.0, before.1 + w + after.1);
                    let plane: Vec<f32> = (0..h * w).map(|i| i as f32 + 1.0).collect();
                    let expected: Vec<f32> = (0..size.0 * size.1)
                        .map(|i| {
                            let (y, x) = (i / size.1, i % size.1);
                            let inside = (before.0..before.0 + h).contains(&y) && (before.1..before.1 + w).contains(&x);
                            if inside {
                                plane[(y - before.0) * w + x - before.1]
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let mut padded = vec![MaybeUninit::new(f32::NAN); size.0 * size.1];
                    super::pad_plane(&mut padded, &plane, (h, w), size.1, before);
                    // SAFETY: every value was initialised (to NaN, then by the writer).
                    let padded: Vec<f32> = padded.iter().map(|v| unsafe { v.assume_init() }).collect();
                    assert_eq!(padded, expected, "{h}x{w} plane, before {before:?}, after {after:?}");
                }
            }
        }
    }
}
