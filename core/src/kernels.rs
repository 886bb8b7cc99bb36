//! Host compute kernels that the layers' custom tape ops share: the matrix product, and
//! vectorized sums and elementwise loops on the widest vectors the CPU has.
//!
//! [`matmul`] calls gemm 0.19, which picks the widest instruction set the CPU has at run time
//! (AVX-512 through its `x86-v4` feature, AVX2/FMA, or portable code), reads transposed operands
//! through strides instead of copying them (except the batch-sized operand of `a·bᵀ`, see
//! [`matmul`]), and can accumulate into its destination, so a backward pass adds its products
//! straight into gradient buffers. dfdx 0.13's own matmul uses
//! gemm 0.15 (no AVX-512 on stable: ~82 against ~219 GFLOP/s per core measured here, DESIGN.md).
//! It runs on the rayon pool that `training.threads` sizes. [`implicit_conv`] holds the
//! convolutions' implicit-GEMM route with nash's own AVX-512 microkernel.

use dfdx::prelude::*;

use crate::tensor::Device;

pub mod implicit_conv;
mod transpose;

pub use transpose::{transpose_into, transpose_strided, transpose_strided_uninit, Strided, StridedMut};

/// The values of a contiguous tensor in logical order: a plain copy, unlike the strided iterator
/// of `as_vec` (dfdx lends no borrowed slice of a tensor's data).
pub fn host<S: Shape, T>(t: &Tensor<S, f32, Device, T>) -> Vec<f32> {
    let mut out = vec![0.0; t.shape().num_elements()];
    t.copy_into(&mut out);
    out
}

/// `Σ x²` in f64 over independent accumulators ([`sum_in_lanes`]), so that the sum vectorizes
/// and its additions do not wait on one another (one f64 accumulator would serialize every
/// addition on its latency). Each `x²` is exact in f64.
pub fn sum_of_squares(values: &[f32]) -> f64 {
    on_widest_vectors(
        #[inline(always)]
        || sum_in_lanes(values, |x| (x as f64) * (x as f64)),
    )
}

/// `Σ f(x)` in f64 over independent accumulators (sets of eight lanes, [`sum_blocks_in_lanes`]),
/// so that the sum vectorizes; for the loops of other kernels that run inside one
/// [`on_widest_vectors`] call (inlined there, so it takes that call's vector width).
#[inline(always)]
pub fn sum_in_lanes(values: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    sum_blocks_in_lanes(std::iter::once(values), f)
}

/// [`sum_in_lanes`] over several blocks, the accumulators carried from one block to the next
/// (each block's tail of fewer than eight values summed apart): one reduction at the end instead
/// of one per block, for batch norm's blocks (a channel of one sample: 49 values at the DCGAN's
/// 7x7 layers).
///
/// The accumulators are [`LANE_SETS`] sets of eight: a block's runs of 32 values add into all
/// four (four independent vectors of additions at AVX-512, where one set would wait on each
/// addition's latency), its remaining runs of 8 into one set each.
#[inline(always)]
pub fn sum_blocks_in_lanes<'a>(blocks: impl Iterator<Item = &'a [f32]>, f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [[0.0f64; 8]; LANE_SETS];
    let mut tails = 0.0f64;
    for values in blocks {
        let tail = add_runs_to_lanes(&mut lanes, values, &f);
        tails += tail.iter().map(|&x| f(x)).sum::<f64>();
    }
    lanes.iter().flatten().sum::<f64>() + tails
}

/// Adds `f(x)` of `values` into `lanes` as [`sum_blocks_in_lanes`] does for one block (runs of 32
/// into all four sets, the remaining runs of 8 into one set each) and returns the tail of fewer
/// than eight values it left out.
#[inline(always)]
fn add_runs_to_lanes<'v>(lanes: &mut [[f64; 8]; LANE_SETS], values: &'v [f32], f: impl Fn(f32) -> f64) -> &'v [f32] {
    let mut wide = values.chunks_exact(8 * LANE_SETS);
    for chunk in &mut wide {
        for (set, eight) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            for j in 0..8 {
                set[j] += f(eight[j]);
            }
        }
    }
    let mut narrow = wide.remainder().chunks_exact(8);
    for (set, eight) in lanes.iter_mut().zip(&mut narrow) {
        for j in 0..8 {
            set[j] += f(eight[j]);
        }
    }
    narrow.remainder()
}

/// Sets of eight f64 accumulators [`sum_blocks_in_lanes`] and [`sum_of_squares`] keep.
const LANE_SETS: usize = 4;

/// `(Σ a, Σ a·b)` (the products in f32) in f64 over eight independent accumulators each, as
/// [`sum_in_lanes`]; `a` and `b` have one length.
#[inline(always)]
pub fn sum_and_dot_in_lanes(a: &[f32], b: &[f32]) -> (f64, f64) {
    sum_and_dot_blocks_in_lanes(std::iter::once((a, b)))
}

/// [`sum_and_dot_in_lanes`] over several pairs of blocks, the accumulators carried from one pair
/// to the next, as [`sum_blocks_in_lanes`].
#[inline(always)]
pub fn sum_and_dot_blocks_in_lanes<'a>(blocks: impl Iterator<Item = (&'a [f32], &'a [f32])>) -> (f64, f64) {
    let (mut sums, mut dots) = ([[0.0f64; 8]; LANE_SETS], [[0.0f64; 8]; LANE_SETS]);
    let (mut sum_tails, mut dot_tails) = (0.0f64, 0.0f64);
    for (a, b) in blocks {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        // Two passes over the block (in L1 by the second), each the shape of
        // `sum_blocks_in_lanes`: LLVM pairs the `sums` and `dots` of one loop over both into
        // 2-lane vectors built value by value, and keeps that loop scalar.
        let whole = n - add_runs_to_lanes(&mut sums, a, |x| x as f64).len();
        let mut wide = a[..whole]
            .chunks_exact(8 * LANE_SETS)
            .zip(b[..whole].chunks_exact(8 * LANE_SETS));
        for (ca, cb) in &mut wide {
            for (set, (ea, eb)) in dots.iter_mut().zip(ca.chunks_exact(8).zip(cb.chunks_exact(8))) {
                for j in 0..8 {
                    set[j] += (ea[j] * eb[j]) as f64;
                }
            }
        }
        let done = whole / (8 * LANE_SETS) * (8 * LANE_SETS);
        let narrow = a[done..whole].chunks_exact(8).zip(b[done..whole].chunks_exact(8));
        for (set, (ea, eb)) in dots.iter_mut().zip(narrow) {
            for j in 0..8 {
                set[j] += (ea[j] * eb[j]) as f64;
            }
        }
        for (x, y) in a[whole..].iter().zip(&b[whole..]) {
            sum_tails += *x as f64;
            dot_tails += (x * y) as f64;
        }
    }
    (
        sums.iter().flatten().sum::<f64>() + sum_tails,
        dots.iter().flatten().sum::<f64>() + dot_tails,
    )
}

/// `a ⊙ b`, elementwise, into a new vector (of the shorter length, written once: no zero-fill
/// first), split across the pool's threads in tasks of [`ELEMENTWISE_VALUES_PER_TASK`] values when
/// longer than one task.
pub fn elementwise_product(a: &[f32], b: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let n = a.len().min(b.len());
    let mut out = Vec::with_capacity(n);
    let serial = |out: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]| {
        on_widest_vectors(
            #[inline(always)]
            || {
                let n = out.len();
                let (a, b) = (&a[..n], &b[..n]);
                for i in 0..n {
                    out[i].write(a[i] * b[i]);
                }
            },
        )
    };
    let spare = &mut out.spare_capacity_mut()[..n];
    if n <= ELEMENTWISE_VALUES_PER_TASK {
        serial(spare, a, b);
    } else {
        spare
            .par_chunks_mut(ELEMENTWISE_VALUES_PER_TASK)
            .zip(a[..n].par_chunks(ELEMENTWISE_VALUES_PER_TASK))
            .zip(b[..n].par_chunks(ELEMENTWISE_VALUES_PER_TASK))
            .with_min_len(min_items_per_task(1))
            .for_each(|((out, a), b)| serial(out, a, b));
    }
    // SAFETY: every one of the `n` values was written above (the chunks cover `spare`).
    unsafe { out.set_len(n) };
    out
}

/// The gradient before a fused activation: `dy ⊙ f'` from the `slopes` `f'` that the forward pass
/// kept, or `dy` itself when no activation was fused (the linear, convolution and batch-norm ops).
pub fn before_activation<'a>(dy: &'a [f32], slopes: Option<&[f32]>) -> std::borrow::Cow<'a, [f32]> {
    match slopes {
        Some(slopes) => std::borrow::Cow::Owned(elementwise_product(dy, slopes)),
        None => std::borrow::Cow::Borrowed(dy),
    }
}

/// [`before_activation`], and the rows of its result (each as long as `bias_gradient`) added into
/// `bias_gradient`, row by row: a linear layer's bias gradient. Where the product stays on one
/// thread (at most [`ELEMENTWISE_VALUES_PER_TASK`] values) each row is added while it is written,
/// one pass instead of two; the sums are the same either way (each `bias_gradient[j]` adds the
/// rows' values in row order).
pub fn before_activation_adding_rows<'a>(
    dy: &'a [f32],
    slopes: Option<&[f32]>,
    bias_gradient: &mut [f32],
) -> std::borrow::Cow<'a, [f32]> {
    let width = bias_gradient.len();
    assert!(
        width > 0 && dy.len().is_multiple_of(width),
        "whole rows as long as the bias gradient"
    );
    match slopes {
        Some(slopes) if dy.len() <= ELEMENTWISE_VALUES_PER_TASK => {
            assert_eq!(dy.len(), slopes.len(), "one slope per value");
            let mut out = Vec::with_capacity(dy.len());
            let spare = &mut out.spare_capacity_mut()[..dy.len()];
            on_widest_vectors(
                #[inline(always)]
                || {
                    let rows = dy.chunks_exact(width).zip(slopes.chunks_exact(width));
                    for ((dy, slopes), out) in rows.zip(spare.chunks_exact_mut(width)) {
                        let (dy, slopes, sum) = (&dy[..width], &slopes[..width], &mut bias_gradient[..width]);
                        for j in 0..width {
                            let dz = dy[j] * slopes[j];
                            out[j].write(dz);
                            sum[j] += dz;
                        }
                    }
                },
            );
            // SAFETY: the rows above cover `dy.len()` values, each written once.
            unsafe { out.set_len(dy.len()) };
            std::borrow::Cow::Owned(out)
        }
        slopes => {
            let dz = before_activation(dy, slopes);
            add_rows(&dz, bias_gradient);
            dz
        }
    }
}

/// Adds the rows of `values` (each as long as `sums`) into `sums`, in row order.
pub fn add_rows(values: &[f32], sums: &mut [f32]) {
    let width = sums.len();
    on_widest_vectors(
        #[inline(always)]
        || {
            for row in values.chunks_exact(width) {
                let (row, sums) = (&row[..width], &mut sums[..width]);
                for j in 0..width {
                    sums[j] += row[j];
                }
            }
        },
    )
}

/// Values per task when an elementwise pass splits across the pool's threads: a pass over fewer
/// (the dense models' activations, 50,176 values at batch 64) stays on its thread, where handing
/// half of it to another thread would cost about what it saves; the DCGAN's 400,000-800,000-value
/// activations split. Each value is computed alone, so the bits never depend on the split.
pub const ELEMENTWISE_VALUES_PER_TASK: usize = 1 << 16;

/// Runs `body` compiled for the widest vector instructions this CPU has: AVX-512 (16 f32 lanes)
/// or AVX2 (8), picked at run time, else the portable build (SSE2 on x86-64: 4). An elementwise
/// loop written over slices of one length vectorizes to that width when `body` is an
/// `#[inline(always)]` function or a closure LLVM inlines. The results are bit for bit those of
/// the portable build: Rust never contracts `a * b + c` into a fused multiply-add on its own, and
/// `+`, `*`, `/` and `sqrt` round the same at every width.
#[inline(always)]
pub fn on_widest_vectors<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        /// `body`, compiled with AVX-512.
        #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
        unsafe fn avx512<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        /// `body`, compiled with AVX2.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        if wide_vectors::avx512() {
            // SAFETY: the CPU has every feature `avx512` is compiled with (checked at run time).
            return unsafe { avx512(body) };
        }
        if wide_vectors::avx2() {
            // SAFETY: as above, for `avx2`.
            return unsafe { avx2(body) };
        }
    }
    body()
}

/// What [`on_widest_vectors`] may use, detected once per process.
#[cfg(target_arch = "x86_64")]
mod wide_vectors {
    use std::sync::OnceLock;

    /// AVX-512 F, VL, DQ and BW, with AVX2 and FMA.
    pub fn avx512() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512bw")
                && avx2()
        })
    }

    /// AVX2 with FMA.
    pub fn avx2() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
    }
}

thread_local! {
    /// Whether kernels called on this thread may split their work across the pool
    /// ([`with_splitting`]).
    static SPLITTING: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// The threads a kernel called on this thread may split its work across: those of the rayon pool
/// it runs on, or 1 while [`with_splitting`] suspends splitting here.
pub fn split_threads() -> usize {
    if SPLITTING.with(std::cell::Cell::get) {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// The least number of items per task to give a rayon parallel iterator of a kernel: `min` while
/// this thread may split its work, else all of them (one task, run on this thread).
pub fn min_items_per_task(min: usize) -> usize {
    if split_threads() > 1 {
        min
    } else {
        usize::MAX
    }
}

/// Runs `body` with the kernels it calls on this thread splitting their work across the pool
/// (`allowed`) or keeping it on this thread, and restores the previous setting afterwards, also
/// when `body` panics. Work a kernel splits runs on other threads only when this thread splits it,
/// so suspending here keeps a whole training step on one core (the trainer's `SplitGovernor`
/// does, while the second thread does not pay).
pub fn with_splitting<R>(allowed: bool, body: impl FnOnce() -> R) -> R {
    /// Puts the previous setting back when dropped.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SPLITTING.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SPLITTING.with(|s| s.replace(allowed)));
    body()
}

/// Products smaller than this many multiply-adds run on the calling thread: below it, handing
/// half of the product to another thread costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// Output blocks of a split product span a multiple of this many rows or columns (one AVX-512
/// register of f32), so that no block ends in a partial vector where another begins.
const SPLIT_ALIGN: usize = 16;

/// `c = op(a)·op(b)`, or `c += op(a)·op(b)` with `accumulate`, for row-major `f32` matrices:
/// `op(a)` is `[m, k]` (stored `[k, m]` when `transpose_a`), `op(b)` is `[k, n]` (stored `[n, k]`
/// when `transpose_b`) and `c` is `[m, n]`.
///
/// Called from a worker of a rayon pool of several threads, a product of at least
/// [`PARALLEL_MIN_WORK`] multiply-adds is cut along the longer side of `c` into one block per
/// thread, each computed single-threaded by gemm (`rayon::join`). At the batch-64 shapes of the
/// reference workloads this beat gemm's own rayon split by up to 1.8x (its split leaves one
/// thread idle when `m` is 64 and `k` is large); see docs/performance.md. `a·bᵀ` with a
/// batch-sized `a` runs as `(b·aᵀ)ᵀ` (`matmul_through_transposes`).
///
/// # Panics
/// When a slice is shorter than its matrix (a bug in the calling kernel, never user input).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    transpose_a: bool,
    b: &[f32],
    transpose_b: bool,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "matmul ({m}x{k})·({k}x{n}): operands of {}, {} and {} values",
        a.len(),
        b.len(),
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    if transpose_b && !transpose_a && transposing_beats_gathering((m, k, n)) {
        return matmul_through_transposes((m, k, n), a, b, c, accumulate);
    }
    let a = StridedMatrix {
        values: a,
        strides: if transpose_a { (1, m) } else { (k, 1) },
    };
    let b = StridedMatrix {
        values: b,
        strides: if transpose_b { (1, k) } else { (n, 1) },
    };
    // SAFETY: the assert above keeps every index `i * rs + j * cs` of each operand in bounds
    // (row-major `[m, k]` / `[k, m]` for `a`, `[k, n]` / `[n, k]` for `b`, `[m, n]` for `c`), and
    // `c` is borrowed mutably, so it aliases neither input.
    unsafe { strided_product((m, k, n), a, b, c.as_mut_ptr(), n, accumulate) }
}

/// A matrix operand inside a slice: element `(i, j)` at `i·strides.0 + j·strides.1`, e.g. a plane
/// block of an NCHW tensor (`[channels, pixels]` of one sample) or a block of columns of a column
/// matrix.
#[derive(Clone, Copy, Debug)]
pub struct StridedMatrix<'a> {
    /// The slice the matrix lies in, from its element `(0, 0)` on.
    pub values: &'a [f32],
    /// `(row stride, column stride)`, in values.
    pub strides: (usize, usize),
}

impl StridedMatrix<'_> {
    /// Asserts that the `[rows, columns]` matrix lies inside the slice.
    fn check(&self, (rows, columns): (usize, usize), what: &str) {
        assert!(
            strided_extent((rows, columns), self.strides) <= self.values.len(),
            "strided matmul: {what} of {rows}x{columns} at strides {:?} does not fit {} values",
            self.strides,
            self.values.len()
        );
    }
}

/// Values a `[rows, columns]` matrix at `strides` spans, from its first element to its last.
fn strided_extent((rows, columns): (usize, usize), strides: (usize, usize)) -> usize {
    if rows == 0 || columns == 0 {
        0
    } else {
        (rows - 1) * strides.0 + (columns - 1) * strides.1 + 1
    }
}

/// `c = a·b`, or `c += a·b` with `accumulate`, for operands at any strides ([`StridedMatrix`]);
/// `c` is `[m, n]` with rows `c_row_stride` values apart (at least `n`) and contiguous columns.
/// For products on blocks of larger tensors: the column route's per-sample products, whose
/// operands and results are the NCHW planes of one sample, read and written where they lie
/// instead of copied to and from a `[channels, batch·pixels]` layout. Split across the pool as
/// [`matmul`] when large.
///
/// # Panics
/// When an operand does not fit its slice or `c_row_stride < n` (a bug in the calling kernel).
pub fn matmul_strided(
    (m, k, n): (usize, usize, usize),
    a: StridedMatrix<'_>,
    b: StridedMatrix<'_>,
    c: &mut [f32],
    c_row_stride: usize,
    accumulate: bool,
) {
    check_strided((m, k, n), &a, &b, c.len(), c_row_stride);
    // SAFETY: the operands fit their slices (checked), `c`'s rows do not overlap, and `c` is
    // borrowed mutably, so it aliases neither input.
    unsafe { strided_product((m, k, n), a, b, c.as_mut_ptr(), c_row_stride, accumulate) }
}

/// [`matmul_strided`] without accumulating into a `c` whose values may be uninitialized: every
/// element `(i, j)` of the `[m, n]` block (at `i·c_row_stride + j`) is written, none is read (gemm
/// with `read_dst` false stores its first pass over `k` without loading `c`), so that a caller
/// may count them as initialized; the values between the rows are left as they are.
///
/// # Panics
/// As [`matmul_strided`].
pub fn matmul_strided_uninit(
    (m, k, n): (usize, usize, usize),
    a: StridedMatrix<'_>,
    b: StridedMatrix<'_>,
    c: &mut [std::mem::MaybeUninit<f32>],
    c_row_stride: usize,
) {
    check_strided((m, k, n), &a, &b, c.len(), c_row_stride);
    // SAFETY: as `matmul_strided`; without accumulating nothing reads `c` (`MaybeUninit<f32>` has
    // `f32`'s layout).
    unsafe { strided_product((m, k, n), a, b, c.as_mut_ptr().cast(), c_row_stride, false) }
}

/// The checks of [`matmul_strided`]: the operands fit their slices and `c`'s rows do not overlap.
fn check_strided(
    (m, k, n): (usize, usize, usize),
    a: &StridedMatrix<'_>,
    b: &StridedMatrix<'_>,
    c_len: usize,
    c_row_stride: usize,
) {
    a.check((m, k), "a");
    b.check((k, n), "b");
    assert!(
        (m <= 1 || c_row_stride >= n) && strided_extent((m, n), (c_row_stride, 1)) <= c_len,
        "strided matmul: c of {m}x{n} at row stride {c_row_stride} does not fit {c_len} values"
    );
}

/// The product of [`matmul`] (past its transposes' route) and [`matmul_strided`] into `c`.
///
/// # Safety
/// The operands must hold their matrices at their strides, `c` must hold `m` rows of `n` values
/// `c_row_stride` apart (initialized when `accumulate`), and nothing else may access them meanwhile.
unsafe fn strided_product(
    (m, k, n): (usize, usize, usize),
    a: StridedMatrix<'_>,
    b: StridedMatrix<'_>,
    c: *mut f32,
    c_row_stride: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(c.add(i * c_row_stride), 0, n);
            }
        }
        return;
    }
    configure_gemm();
    let product = Product {
        a: a.values.as_ptr(),
        a_strides: (a.strides.0 as isize, a.strides.1 as isize),
        b: b.values.as_ptr(),
        b_strides: (b.strides.0 as isize, b.strides.1 as isize),
        c,
        c_row_stride: c_row_stride as isize,
        accumulate,
    };
    product.run((m, k, n))
}

/// Whether `c = a·bᵀ` (`b` stored `[n, k]`) is faster as `(b·aᵀ)ᵀ`: true when `a` has at most 64
/// rows (a batch of the dense layers' input gradient `dy·Wᵀ`) and the product is not tiny, or at
/// most 256 rows when `b`'s rows lie a multiple of 256 values (1 KB) apart.
///
/// gemm's microkernel runs its vectors along the output's rows; for `a·bᵀ` neither operand is
/// contiguous along them (both run along `k`), so gemm packs `b` element by element into panels
/// and reuses each panel for only `m / 6` microkernel calls; when `b`'s rows are a multiple of
/// 1 KB apart, the gather's loads also fall into a few cache sets. Transposing `a` (`m·k` values)
/// and the result (`m·n`) in 8x8 register tiles instead leaves gemm two operands it reads in place.
/// Measured single-threaded (gemm's gather / through transposes, 2026-11-29): at `m = 64` 1.10-3.3x
/// faster for every `(k, n)` of the reference workloads' layers (`(512, 256)`: 402 → 157 µs); at
/// `m = 128` and `256`, 1.11-2.1x where `k` is a multiple of 256 and `n` at least 128 (0.99x at
/// `(256, 128)`, `m = 256`), 0.91-1.09x otherwise; at `m = 512` 0.77-1.19x; under 64 inner or
/// output columns the transposes outweigh the product.
fn transposing_beats_gathering((m, k, n): (usize, usize, usize)) -> bool {
    (m <= 64 && k.min(n) >= 64) || (m <= 256 && k % 256 == 0 && n >= 128)
}

thread_local! {
    /// [`matmul_through_transposes`]'s buffers for `aᵀ` and `(a·bᵀ)ᵀ`, kept on the thread so that
    /// a training step does not allocate (and fault in) them for every product.
    static TRANSPOSED: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// `c (+)= a·bᵀ` computed as `cᵀ = b·aᵀ`, whose operands gemm reads along its vectors without
/// packing `b` (see [`transposing_beats_gathering`]): `a` is transposed into a buffer, the
/// product runs through [`matmul`] (split across the pool as any product of its shape), and its
/// transpose is written or added into `c`.
fn matmul_through_transposes((m, k, n): (usize, usize, usize), a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    // The buffers are taken out of the thread-local for the call: a rayon worker waiting on a split
    // may run another product on this thread meanwhile, which then allocates its own.
    let (mut a_t, mut c_t) = TRANSPOSED.take();
    for (buffer, len) in [(&mut a_t, k * m), (&mut c_t, n * m)] {
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
    }
    transpose_into(a, (m, k), &mut a_t, false);
    matmul((n, k, m), b, false, &a_t, false, &mut c_t, false);
    transpose_into(&c_t, (n, m), c, accumulate);
    TRANSPOSED.set((a_t, c_t));
}

/// Sets gemm's process-wide tuning for nash's shapes, once per process.
///
/// gemm copies its left operand (after its own transposition, the one along whose rows the
/// microkernel's vectors run: the weight in a forward product at batch 64) into packed panels
/// whenever the product spans more than 8 microkernel widths (48 columns) single-threaded, even
/// when that operand is contiguous along the vectors already. At 16 widths (96 columns) the
/// batch-64 forward products read their weight in place: 7-9% faster each in isolation (e.g.
/// 256 → 512 outputs, 159 → 146 µs), and gemm's packing fell from 8% to 1% of the MLP GAN's
/// samples (the wider products, the convolutions', still pack). nash calls gemm 0.19 only
/// single-threaded (`Parallelism::None`), so the multi-thread threshold stays as it is.
fn configure_gemm() {
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| gemm::set_lhs_packing_threshold_single_thread(16));
}

/// Raw operands of one `c (+)= op(a)·op(b)` product, or of a block of it, in gemm's
/// `(row stride, column stride)` form.
#[derive(Clone, Copy)]
struct Product {
    a: *const f32,
    a_strides: (isize, isize),
    b: *const f32,
    b_strides: (isize, isize),
    c: *mut f32,
    c_row_stride: isize,
    accumulate: bool,
}

// SAFETY: a `Product` is only shared between the two halves of a split, which read the same
// inputs and write disjoint blocks of `c` (rows `..m1` and `m1..`, or columns `..n1` and `n1..`).
unsafe impl Send for Product {}
unsafe impl Sync for Product {}

impl Product {
    /// Computes the whole `[m, n]` product: cut into one block per thread of the pool when it has
    /// at least [`PARALLEL_MIN_WORK`] multiply-adds, the blocks run in parallel when this thread
    /// may split its work now ([`split_threads`]). The blocks depend on the pool's size only, not
    /// on whether this thread may split now: the element sums of gemm's microkernels depend on the
    /// block shapes, and a training step must give the same bits whatever the split governor
    /// decided. Unsplit, the blocks run one after the other on this thread.
    ///
    /// # Safety
    /// As [`Product::split`].
    unsafe fn run(self, (m, k, n): (usize, usize, usize)) {
        let threads = rayon::current_num_threads();
        let parts = if threads > 1 && m * k * n >= PARALLEL_MIN_WORK {
            threads.min(m.max(n) / SPLIT_ALIGN).max(1)
        } else {
            1
        };
        self.split((m, k, n), parts, split_threads() > 1)
    }

    /// Computes the `[m, n]` block in `parts` blocks along its longer side, in parallel when
    /// `parallel`, else one after the other.
    ///
    /// # Safety
    /// The operands must hold the `[m, k]`, `[k, n]` and `[m, n]` matrices at their strides, and
    /// nothing else may access `c`'s block meanwhile.
    unsafe fn split(self, (m, k, n): (usize, usize, usize), parts: usize, parallel: bool) {
        if parts <= 1 || m.max(n) < 2 {
            return self.gemm((m, k, n));
        }
        let left_parts = parts / 2;
        let (first, second) = if m >= n {
            let m1 = block_boundary(m, left_parts, parts);
            let rest = Product {
                a: self.a.offset(m1 as isize * self.a_strides.0),
                c: self.c.offset(m1 as isize * self.c_row_stride),
                ..self
            };
            (((m1, k, n), self), ((m - m1, k, n), rest))
        } else {
            let n1 = block_boundary(n, left_parts, parts);
            let rest = Product {
                b: self.b.offset(n1 as isize * self.b_strides.1),
                c: self.c.add(n1),
                ..self
            };
            (((m, k, n1), self), ((m, k, n - n1), rest))
        };
        // SAFETY: the blocks partition `c`'s block; each keeps its operands' strides.
        let first = || unsafe { first.1.split(first.0, left_parts, parallel) };
        let second = || unsafe { second.1.split(second.0, parts - left_parts, parallel) };
        if parallel {
            rayon::join(first, second);
        } else {
            first();
            second();
        }
    }

    /// One single-threaded gemm call.
    ///
    /// # Safety
    /// As [`Product::split`].
    unsafe fn gemm(self, (m, k, n): (usize, usize, usize)) {
        gemm::gemm(
            m,
            n,
            k,
            self.c,
            1,
            self.c_row_stride,
            self.accumulate,
            self.a,
            self.a_strides.1,
            self.a_strides.0,
            self.b,
            self.b_strides.1,
            self.b_strides.0,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Where the first `left` of `parts` blocks of a side of `len` ends: the proportional share,
/// rounded to a multiple of [`SPLIT_ALIGN`] and kept inside the side.
fn block_boundary(len: usize, left: usize, parts: usize) -> usize {
    let share = len * left / parts;
    (share.div_ceil(SPLIT_ALIGN) * SPLIT_ALIGN).clamp(1, len - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_is_suspended_on_the_calling_thread_only_and_restored_after_a_panic() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            assert_eq!((split_threads(), min_items_per_task(8)), (2, 8));
            with_splitting(false, || {
                assert_eq!((split_threads(), min_items_per_task(8)), (1, usize::MAX));
                // Another worker is not affected: this one blocks, so the other runs the job.
                let (tx, rx) = std::sync::mpsc::channel();
                rayon::spawn(move || tx.send(split_threads()).unwrap());
                assert_eq!(rx.recv().unwrap(), 2);
                with_splitting(true, || assert_eq!(split_threads(), 2));
                assert_eq!(split_threads(), 1);
            });
            let failed = std::panic::catch_unwind(|| with_splitting(false, || panic!("the step failed")));
            assert!(failed.is_err());
            assert_eq!(split_threads(), 2);
        });
    }

    /// The textbook triple loop in f64.
    fn reference(m: usize, k: usize, n: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let x = if ta { a[p * m + i] } else { a[i * k + p] };
                    let y = if tb { b[j * k + p] } else { b[p * n + j] };
                    c[i * n + j] += x as f64 * y as f64;
                }
            }
        }
        c
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// `c[i·c_rs + j] (+)= Σ_p a(i, p)·b(p, j)` in f64, the definition of [`matmul_strided`].
    fn strided_reference(
        (m, k, n): (usize, usize, usize),
        (a, a_s): (&[f32], (usize, usize)),
        (b, b_s): (&[f32], (usize, usize)),
        c: &mut [f32],
        c_rs: usize,
        accumulate: bool,
    ) {
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k)
                    .map(|p| a[i * a_s.0 + p * a_s.1] as f64 * b[p * b_s.0 + j * b_s.1] as f64)
                    .sum();
                let dst = &mut c[i * c_rs + j];
                *dst = if accumulate {
                    (*dst as f64 + sum) as f32
                } else {
                    sum as f32
                };
            }
        }
    }

    #[test]
    fn strided_products_match_the_definition_and_leave_the_values_between_rows() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        // (m, k, n): small, with edges of gemm's microkernels, no depth, and one large enough
        // to split across the pool.
        for (m, k, n) in [(3, 5, 7), (64, 16, 196), (17, 0, 9), (1, 9, 1), (96, 80, 200)] {
            // `a` a block of a wider matrix (row stride k + 3); `b` stored transposed ([n, k]),
            // read at strides (1, k); `c` with 2 values between its rows.
            let a = values(m * (k + 3), 1);
            let b = values(n * k, 2);
            let a_op = StridedMatrix {
                values: &a,
                strides: (k + 3, 1),
            };
            let b_op = StridedMatrix {
                values: &b,
                strides: (1, k),
            };
            let c_rs = n + 2;
            let start = values(m * c_rs, 3);
            let close = |got: &[f32], want: &[f32], what: &str| {
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{what} {m}x{k}x{n} at {i}: {g} vs {w}"
                    );
                }
            };
            let reference = |accumulate: bool| {
                let mut want = start.clone();
                let (a, b) = ((&a[..], a_op.strides), (&b[..], b_op.strides));
                strided_reference((m, k, n), a, b, &mut want, c_rs, accumulate);
                want
            };
            for accumulate in [false, true] {
                let mut got = start.clone();
                pool.install(|| matmul_strided((m, k, n), a_op, b_op, &mut got, c_rs, accumulate));
                close(
                    &got,
                    &reference(accumulate),
                    if accumulate { "accumulated" } else { "written" },
                );
            }
            // Written into uninitialized values: the same results, the values between the rows
            // untouched.
            let mut uninit: Vec<std::mem::MaybeUninit<f32>> =
                start.iter().map(|&v| std::mem::MaybeUninit::new(v)).collect();
            pool.install(|| matmul_strided_uninit((m, k, n), a_op, b_op, &mut uninit, c_rs));
            // SAFETY: every value was initialized before the call.
            let got: Vec<f32> = uninit.iter().map(|v| unsafe { v.assume_init() }).collect();
            let want = reference(false);
            close(&got, &want, "uninit");
        }
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn a_strided_operand_past_its_slice_is_refused() {
        let (a, b) = (vec![1.0; 6], vec![1.0; 6]);
        let mut c = vec![0.0; 4];
        // `a` as 2x3 at row stride 4 spans 7 values.
        matmul_strided(
            (2, 3, 2),
            StridedMatrix {
                values: &a,
                strides: (4, 1),
            },
            StridedMatrix {
                values: &b,
                strides: (2, 1),
            },
            &mut c,
            2,
            false,
        );
    }

    #[test]
    fn the_bias_gradient_pass_matches_the_product_and_the_row_sums_in_row_order() {
        // 64 x 784 stays on one thread (the fused loop); 100 x 784 is longer than a task (the
        // product split across the pool, then the rows added); 5 x 3 without slopes.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (rows, width, with_slopes) in [(64, 784, true), (100, 784, true), (5, 3, false), (64, 784, false)] {
            let dy = values(rows * width, 6);
            let slopes = values(rows * width, 7);
            let slopes = with_slopes.then_some(&slopes[..]);
            let start = values(width, 8);
            let mut sums = start.clone();
            let dz = pool.install(|| before_activation_adding_rows(&dy, slopes, &mut sums));
            // The definition: `dy ⊙ f'` value by value, then each column summed down the rows,
            // starting from the gradient already there.
            let mut expected = start.clone();
            for i in 0..rows {
                for (j, sum) in expected.iter_mut().enumerate() {
                    let k = i * width + j;
                    let z = slopes.map_or(dy[k], |s| dy[k] * s[k]);
                    assert_eq!(dz[k].to_bits(), z.to_bits(), "{rows}x{width} value {k}");
                    *sum += z;
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&sums), bits(&expected), "{rows}x{width} sums");
        }
    }

    #[test]
    fn the_sum_of_squares_matches_a_sequential_f64_sum() {
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 47, 1000, 1003] {
            let v = values(n, 3);
            let sequential: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
            let got = sum_of_squares(&v);
            assert!(
                (got - sequential).abs() <= 1e-12 * sequential.max(1.0),
                "n {n}: {got} vs {sequential}"
            );
        }
    }

    #[test]
    fn the_sum_and_the_dot_product_match_sequential_f64_sums() {
        for n in [0, 1, 7, 8, 9, 33, 49, 1003] {
            let (a, b) = (values(n, 4), values(n, 5));
            let sum: f64 = a.iter().map(|&x| x as f64).sum();
            let dot: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
            let (got_sum, got_dot) = sum_and_dot_in_lanes(&a, &b);
            let scale = a.iter().map(|x| x.abs() as f64).sum::<f64>().max(1.0);
            assert!((got_sum - sum).abs() <= 1e-12 * scale, "n {n}: {got_sum} vs {sum}");
            assert!((got_dot - dot).abs() <= 1e-12 * scale, "n {n}: {got_dot} vs {dot}");
            let got = sum_in_lanes(&a, |x| x as f64);
            assert!((got - sum).abs() <= 1e-12 * scale, "n {n}: {got} vs {sum}");
            // The same values in blocks of 7 (tails of every block) and of 49.
            for block in [7, 49] {
                let got = sum_blocks_in_lanes(a.chunks(block), |x| x as f64);
                assert!(
                    (got - sum).abs() <= 1e-12 * scale,
                    "n {n}, blocks {block}: {got} vs {sum}"
                );
                let (got_sum, got_dot) = sum_and_dot_blocks_in_lanes(a.chunks(block).zip(b.chunks(block)));
                assert!(
                    (got_sum - sum).abs() <= 1e-12 * scale,
                    "n {n}, blocks {block}: {got_sum} vs {sum}"
                );
                assert!(
                    (got_dot - dot).abs() <= 1e-12 * scale,
                    "n {n}, blocks {block}: {got_dot} vs {dot}"
                );
            }
        }
    }

    #[test]
    fn matches_the_triple_loop_for_every_transpose_and_accumulates() {
        // `a·bᵀ` at the last three shapes goes through transposes (`transposing_beats_gathering`).
        for shape in [(9, 64, 71), (64, 70, 130), (200, 256, 130)] {
            assert!(transposing_beats_gathering(shape), "{shape:?}");
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 2),
            (17, 33, 9),
            (9, 64, 71),
            (64, 70, 130),
            (200, 256, 130),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a, b) = (values(m * k, 1), values(k * n, 7));
                let want = reference(m, k, n, &a, ta, &b, tb);
                let mut c = vec![f32::NAN; m * n];
                matmul((m, k, n), &a, ta, &b, tb, &mut c, false);
                for (x, y) in c.iter().zip(&want) {
                    assert!(
                        (*x as f64 - y).abs() < 1e-4 * (1.0 + y.abs()),
                        "{m}x{k}x{n} {ta} {tb}: {x} vs {y}"
                    );
                }
                matmul((m, k, n), &a, ta, &b, tb, &mut c, true);
                for (x, y) in c.iter().zip(&want) {
                    assert!(
                        (*x as f64 - 2.0 * y).abs() < 2e-4 * (1.0 + y.abs()),
                        "accumulated: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_product_split_across_threads_matches_the_triple_loop() {
        // Each shape has at least PARALLEL_MIN_WORK multiply-adds: split along n (m < n), along m,
        // and one too narrow to split (both sides under two blocks of SPLIT_ALIGN). `a·bᵀ` at the
        // first shape goes through transposes (`transposing_beats_gathering`).
        let shapes = [(40, 100, 70), (130, 90, 33), (20, 1000, 20)];
        assert!(transposing_beats_gathering(shapes[0]));
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for &(m, k, n) in &shapes {
                assert!(m * k * n >= PARALLEL_MIN_WORK);
                for (ta, tb) in [(false, false), (true, true), (false, true)] {
                    let (a, b) = (values(m * k, 2), values(k * n, 5));
                    let want = reference(m, k, n, &a, ta, &b, tb);
                    let mut c = vec![1.0; m * n];
                    pool.install(|| matmul((m, k, n), &a, ta, &b, tb, &mut c, true));
                    for (i, (x, y)) in c.iter().zip(&want).enumerate() {
                        assert!(
                            (*x as f64 - 1.0 - y).abs() < 1e-3 * (1.0 + y.abs()),
                            "{threads} threads, {m}x{k}x{n} {ta} {tb}, element {i}: {x} vs 1 + {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_split_product_gives_the_same_bits_as_an_unsplit_one() {
        // The split governor decides from timings whether a step splits, so a run's results must
        // not depend on it: unsplit, the product is cut into the same blocks, computed one after
        // the other (gemm's sums depend on the block shapes). The reference workloads' shapes
        // (autoencoder, MLP GAN, DCGAN products, and the MLP GAN's at batch 128), plain and transposed
        // operands.
        let shapes = [
            (64, 784, 128),
            (784, 64, 128),
            (64, 128, 784),
            (64, 512, 784),
            (256, 64, 784),
            (128, 1024, 196),
            (128, 512, 256),
        ];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(m, k, n) in &shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true)] {
                let (a, b) = (values(m * k, 3), values(k * n, 7));
                let product = |split: bool| {
                    let mut c = values(m * n, 11);
                    pool.install(|| with_splitting(split, || matmul((m, k, n), &a, ta, &b, tb, &mut c, true)));
                    c
                };
                let (split, unsplit) = (product(true), product(false));
                let same = split.iter().zip(&unsplit).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{m}x{k}x{n} {ta} {tb}: the split product differs from the unsplit one"
                );
            }
        }
    }

    #[test]
    fn block_boundaries_are_aligned_and_inside_the_side() {
        assert_eq!(block_boundary(70, 1, 2), 48);
        assert_eq!(block_boundary(128, 1, 2), 64);
        assert_eq!(block_boundary(784, 1, 3), 272);
        assert_eq!(block_boundary(20, 1, 2), 16);
        assert_eq!(block_boundary(17, 1, 2), 16);
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros_or_leaves_the_sum() {
        let mut c = vec![3.0; 4];
        matmul((2, 0, 2), &[], false, &[], false, &mut c, true);
        assert_eq!(c, [3.0; 4]);
        matmul((2, 0, 2), &[], false, &[], false, &mut c, false);
        assert_eq!(c, [0.0; 4]);
    }
}
