//! 2-D convolution and transposed convolution on `[batch, c·h·w]` activations.
//!
//! dfdx's own convolutions need a nightly compiler, so nash provides them as two custom tape ops,
//! [`conv2d`] and [`conv_transpose2d`], whose forward and backward passes are host kernels in
//! [`kernels`]: implicit GEMM ([`crate::kernels::implicit_conv`]: patches gathered straight into
//! the panels of nash's own AVX-512 microkernel) where the CPU has AVX-512 and the product is
//! large enough, else im2col / col2im plus matrix products ([`crate::kernels::matmul`]).
//! Every hot loop lives in that module, so faster kernels can replace it without touching the
//! layers. The transposed convolution is the exact adjoint of the convolution with the same
//! geometry and weights, which is also how each layer's [`Layer::input_grad`] is expressed:
//! a conv's input gradient is a conv-transpose of the output gradient and vice versa, so a
//! gradient penalty differentiates exactly into the kernels.
//!
//! Kernels are square (`kernel_size`), as are strides and paddings. Weights use PyTorch's
//! layouts: `[out_channels, in_channels, k, k]` for a convolution and `[in_channels,
//! out_channels, k, k]` for a transposed convolution.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::init::Init;
use super::{ActivationFn, BuildContext, ForwardContext, Layer, LayerConfig};
use crate::error::{Error, Result};
use crate::tensor::{Activation, Device, FeatureShape, Matrix, Param, ParamRole, Parameterized, Tape, Vector};

/// The geometry of a convolution from `[c_in, h_in, w_in]` to `[c_out, h_out, w_out]`. A
/// transposed convolution is described by the geometry of the convolution it is the adjoint of
/// (its input lives in this geometry's output space and its output in the input space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h_in: usize,
    /// Input width.
    pub w_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Output height, `(h_in + 2·padding − kernel) / stride + 1`.
    pub h_out: usize,
    /// Output width.
    pub w_out: usize,
    /// Kernel side.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
}

impl ConvGeometry {
    /// The geometry of a convolution of `[c_in, h, w]` images (PyTorch's output-size formula).
    pub fn conv(
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        if kernel == 0 || stride == 0 || c_in == 0 || c_out == 0 || h == 0 || w == 0 {
            return Err(Error::config(
                "conv",
                format!(
                    "kernel_size, stride, channels and image sides must be at least 1 \
                     (kernel {kernel}, stride {stride}, input [{c_in}, {h}, {w}], {c_out} output channels)"
                ),
            ));
        }
        if h + 2 * padding < kernel || w + 2 * padding < kernel {
            return Err(Error::shape(
                "conv2d",
                format!("an image whose padded sides (+2·{padding}) are at least the kernel size {kernel}"),
                format!("[{c_in}, {h}, {w}]"),
            ));
        }
        Ok(ConvGeometry {
            c_in,
            h_in: h,
            w_in: w,
            c_out,
            h_out: (h + 2 * padding - kernel) / stride + 1,
            w_out: (w + 2 * padding - kernel) / stride + 1,
            kernel,
            stride,
            padding,
        })
    }

    /// The geometry whose adjoint is a transposed convolution of `[c_in, h, w]` images into
    /// `c_out` channels, with PyTorch's output size `(h − 1)·stride − 2·padding + kernel + output_padding`.
    #[allow(clippy::too_many_arguments)]
    pub fn transposed(
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        output_padding: usize,
    ) -> Result<Self> {
        if stride == 0 || output_padding >= stride {
            return Err(Error::config(
                "output_padding",
                format!("must be smaller than stride, got output_padding {output_padding} with stride {stride}"),
            ));
        }
        let side = |n: usize| -> Result<usize> {
            let full = (n.max(1) - 1) * stride + kernel + output_padding;
            if n == 0 || full <= 2 * padding {
                return Err(Error::shape(
                    "conv_transpose2d",
                    format!("an input whose output side (n−1)·{stride} − 2·{padding} + {kernel} + {output_padding} is positive"),
                    format!("[{c_in}, {h}, {w}]"),
                ));
            }
            Ok(full - 2 * padding)
        };
        let (ho, wo) = (side(h)?, side(w)?);
        let g = ConvGeometry::conv(c_out, ho, wo, c_in, kernel, stride, padding)?;
        debug_assert_eq!((g.h_out, g.w_out), (h, w));
        Ok(g)
    }

    /// Rows of the im2col matrix: `c_in · k · k`.
    pub fn patch_len(&self) -> usize {
        self.c_in * self.kernel * self.kernel
    }
    /// Values per sample in the input space.
    pub fn in_len(&self) -> usize {
        self.c_in * self.h_in * self.w_in
    }
    /// Values per sample in the output space.
    pub fn out_len(&self) -> usize {
        self.c_out * self.h_out * self.w_out
    }
    /// Pixels per output channel.
    pub fn out_pixels(&self) -> usize {
        self.h_out * self.w_out
    }
    /// Number of kernel values: `c_out · c_in · k · k`.
    pub fn weight_len(&self) -> usize {
        self.c_out * self.patch_len()
    }
}

/// The host kernels behind [`conv2d`] and [`conv_transpose2d`]: all the hot code of convolution.
/// Inputs and outputs are row-major, samples first and channels major within a sample.
pub mod kernels {
    use rayon::prelude::*;

    use super::ConvGeometry;
    use crate::kernels::implicit_conv::{self, Gather, Microkernel, PackedWeights, PaddedPlanes, Product, Scatter};
    use crate::kernels::{matmul_strided, matmul_strided_uninit, StridedMatrix};

    /// The microkernel of the implicit-GEMM route ([`implicit_conv`]) for a product with `rows`
    /// output channels and a contraction `depth` deep, or `None` for the column-matrix route
    /// (im2col / col2im and gemm): the CPU has no AVX-512, or the product is too small to repay
    /// gathering each patch into a panel and writing each tile back (at one output channel, the
    /// transposed convolution into the DCGAN's image, the gather is as much work as the product).
    fn implicit_route(rows: usize, depth: usize) -> Option<Microkernel> {
        if route() == Route::ColumnMatrices {
            return None;
        }
        Microkernel::fastest().filter(|_| rows >= implicit_conv::MIN_ROWS && depth >= implicit_conv::MIN_DEPTH)
    }

    /// How the convolution kernels compute their products, process-wide ([`set_route`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Route {
        /// Implicit GEMM ([`implicit_conv`]) where the CPU has AVX-512 and the product is large
        /// enough to repay it, column matrices elsewhere: the default.
        Fastest,
        /// Column matrices (im2col / col2im) and gemm for every product, the route of CPUs without
        /// AVX-512: for comparisons (`nash bench conv`).
        ColumnMatrices,
    }

    /// Whether [`Route::ColumnMatrices`] is set.
    static COLUMN_MATRICES_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Sets the route of every convolution kernel called from now on, on every thread. The routes
    /// compute the same values up to rounding (their sums run in other orders).
    pub fn set_route(route: Route) {
        COLUMN_MATRICES_ONLY.store(route == Route::ColumnMatrices, std::sync::atomic::Ordering::Relaxed);
    }

    /// The route [`set_route`] set ([`Route::Fastest`] unless changed).
    pub fn route() -> Route {
        if COLUMN_MATRICES_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
            Route::ColumnMatrices
        } else {
            Route::Fastest
        }
    }

    /// About the contraction depth of one output phase of the transposed convolution `g`.
    fn phase_depth(g: &ConvGeometry) -> usize {
        g.c_out * (g.kernel / g.stride).max(1).pow(2)
    }

    /// `out (+)=` the convolution `g` of `x` (`[batch, c_in·h_in·w_in]` → `[batch, c_out·h_out·w_out]`)
    /// with `w` (`[c_out, c_in·k·k]`) and `bias`, as one implicit GEMM: the patches are gathered
    /// from zero-padded copies of the input planes, no column matrix.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn implicit_conv(
        g: &ConvGeometry,
        batch: usize,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        out: &mut [f32],
        accumulate: bool,
        kernel: Microkernel,
    ) {
        let taps = conv_taps(g);
        let gather = conv_gather(g, &taps);
        // Tap-major contraction: index `t·c_in + c` is `w[m, c, t]`.
        let k2 = g.kernel * g.kernel;
        let taps_in_kernel: Vec<usize> = (0..k2).collect();
        let weights = PackedWeights::gather(w, g.c_out, g.patch_len(), &taps_in_kernel, (g.c_in, k2));
        let all_taps: Vec<usize> = (0..taps.len()).collect();
        let product = Product {
            weights: &weights,
            taps: &all_taps,
            scatter: Scatter {
                planes: (g.h_out, g.w_out),
                stride: 1,
                offset: (0, 0),
            },
        };
        // Tiles of samples three quarters full or more: the batch-innermost route (no padded copy,
        // no panel).
        if implicit_conv::batch_inner::fits(batch, g.c_in, &gather, &[product]) {
            let (samples, planes) = ((batch, g.c_in), (g.h_in, g.w_in));
            let products = [product];
            implicit_conv::batch_inner::convolve(x, samples, planes, &gather, &products, bias, out, accumulate, kernel);
            return;
        }
        let planes = conv_planes(g, batch, x, &gather);
        implicit_conv::convolve(&planes, &gather, &[product], bias, out, accumulate, kernel);
    }

    /// The taps of the convolution `g`: input offsets `(ki − p, kj − p)`, row-major over the kernel.
    fn conv_taps(g: &ConvGeometry) -> Vec<(isize, isize)> {
        let p = g.padding as isize;
        (0..g.kernel as isize)
            .flat_map(|ki| (0..g.kernel as isize).map(move |kj| (ki - p, kj - p)))
            .collect()
    }

    /// Where the convolution `g` reads its patches.
    fn conv_gather<'t>(g: &ConvGeometry, taps: &'t [(isize, isize)]) -> Gather<'t> {
        Gather {
            stride: g.stride,
            taps,
            grid: (g.h_out, g.w_out),
        }
    }

    /// Zero-padded copies of the planes of `x` (`[batch, c_in·h_in·w_in]`) that hold the patches
    /// of `gather`.
    fn conv_planes(g: &ConvGeometry, batch: usize, x: &[f32], gather: &Gather<'_>) -> PaddedPlanes {
        let (before, after) = gather.padding((g.h_in, g.w_in));
        PaddedPlanes::new(x, (batch, g.c_in), (g.h_in, g.w_in), before, after)
    }

    /// `dw +=` the weight gradient of the convolution `g` of `x` (`[batch, c_in·h_in·w_in]`) from the
    /// gradient of its output `dy` (`[batch, c_out·h_out·w_out]`), as one implicit GEMM.
    pub(super) fn implicit_weight_gradient(
        g: &ConvGeometry,
        batch: usize,
        x: &[f32],
        dy: &[f32],
        dw: &mut [f32],
        kernel: Microkernel,
    ) {
        let taps = conv_taps(g);
        let gather = conv_gather(g, &taps);
        // Whole tiles of input channels: the batch-innermost route (no padded copy, no panel).
        if implicit_conv::batch_inner::fits_weight_gradient(batch, g.c_in, g.c_out) {
            let (samples, planes) = ((batch, g.c_in), (g.h_in, g.w_in));
            implicit_conv::batch_inner::weight_gradient(x, samples, planes, &gather, dy, g.c_out, dw, kernel);
            return;
        }
        let planes = conv_planes(g, batch, x, &gather);
        implicit_conv::weight_gradient(&planes, &gather, dy, g.c_out, dw, kernel);
    }

    /// The kernel offsets `ki` (or `kj`) that reach output phase `r` (pixels `q·s + r`) of the
    /// transposed convolution, each with the input offset `(r + p − ki) / s` it reads at.
    fn phase_taps(g: &ConvGeometry, r: usize) -> Vec<(usize, isize)> {
        let (s, p) = (g.stride, g.padding);
        ((r + p) % s..g.kernel)
            .step_by(s)
            .map(|ki| (ki, (r as isize + p as isize - ki as isize) / s as isize))
            .collect()
    }

    /// `out +=` the transposed convolution (the adjoint of `g`) of `x` (`[batch, c_out·h_out·w_out]`
    /// → `[batch, c_in·h_in·w_in]`) with `w` (`[c_out, c_in·k·k]`), as implicit GEMMs by output
    /// phase `(ry, rx)`: the pixels `(q·s + ry, q'·s + rx)` are a stride-1 convolution of `x` with
    /// the kernel taps that reach them, so every output value is one sum (no col2im scatter). The
    /// phases with the same grid (all of them when the stride divides the output size) are the
    /// products of one call, which gathers the union of their taps once.
    pub(super) fn implicit_conv_transpose(
        g: &ConvGeometry,
        batch: usize,
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        kernel: Microkernel,
    ) {
        let s = g.stride;
        // (Phases no tap reaches exist when the kernel is smaller than the stride.)
        let phases: Vec<OutputPhase> = (0..s.min(g.h_in))
            .flat_map(|ry| (0..s.min(g.w_in)).map(move |rx| OutputPhase::new(g, (ry, rx))))
            .filter(|phase| !phase.taps.is_empty())
            .collect();
        let mut grids: Vec<(usize, usize)> = phases.iter().map(|phase| phase.grid).collect();
        grids.sort_unstable();
        grids.dedup();
        // The phases of each grid, and the union of their taps.
        let groups: Vec<Vec<&OutputPhase>> = grids
            .iter()
            .map(|&grid| phases.iter().filter(|phase| phase.grid == grid).collect())
            .collect();
        let group_taps: Vec<Vec<(isize, isize)>> = groups
            .iter()
            .map(|members| {
                let mut taps: Vec<(isize, isize)> =
                    members.iter().flat_map(|phase| phase.taps.iter().copied()).collect();
                taps.sort_unstable();
                taps.dedup();
                taps
            })
            .collect();
        let gathers: Vec<Gather<'_>> = grids
            .iter()
            .zip(&group_taps)
            .map(|(&grid, taps)| Gather { stride: 1, taps, grid })
            .collect();
        // One padded copy of the input that covers every phase's taps, made if a group needs it.
        let (mut before, mut after) = ((0, 0), (0, 0));
        for gather in &gathers {
            let (b, a) = gather.padding((g.h_out, g.w_out));
            before = (before.0.max(b.0), before.1.max(b.1));
            after = (after.0.max(a.0), after.1.max(a.1));
        }
        let mut planes = None;
        let k2 = g.kernel * g.kernel;
        for (gather, members) in gathers.iter().zip(&groups) {
            // Each phase's taps as indices into the gather's, and its weights, `[c_in, taps·c_out]`
            // tap-major: index `i·c_out + co` is `w[co, m, ki, kj]` for the phase's `i`-th tap.
            let tap_indices: Vec<Vec<usize>> = members
                .iter()
                .map(|phase| {
                    phase
                        .taps
                        .iter()
                        .map(|tap| {
                            gather
                                .taps
                                .iter()
                                .position(|t| t == tap)
                                .expect("a phase's tap is its group's")
                        })
                        .collect()
                })
                .collect();
            let weights: Vec<PackedWeights> = members
                .iter()
                .map(|phase| {
                    let offsets: Vec<usize> = phase
                        .kernel_offsets
                        .iter()
                        .map(|&(ki, kj)| ki * g.kernel + kj)
                        .collect();
                    PackedWeights::gather(w, g.c_in, k2, &offsets, (g.c_out, g.patch_len()))
                })
                .collect();
            let products: Vec<Product<'_>> = members
                .iter()
                .zip(&weights)
                .zip(&tap_indices)
                .map(|((phase, weights), taps)| Product {
                    weights,
                    taps,
                    scatter: Scatter {
                        planes: (g.h_in, g.w_in),
                        stride: s,
                        offset: phase.offset,
                    },
                })
                .collect();
            // Tiles of samples three quarters full or more and phases that cover the output once: the
            // batch-innermost route.
            if implicit_conv::batch_inner::fits(batch, g.c_out, gather, &products) {
                let (samples, planes) = ((batch, g.c_out), (g.h_out, g.w_out));
                implicit_conv::batch_inner::convolve(x, samples, planes, gather, &products, None, out, true, kernel);
                continue;
            }
            let planes =
                planes.get_or_insert_with(|| PaddedPlanes::new(x, (batch, g.c_out), (g.h_out, g.w_out), before, after));
            implicit_conv::convolve(planes, gather, &products, None, out, true, kernel);
        }
    }

    /// The output pixels `(q·s + ry, q'·s + rx)` of a transposed convolution (phase `(ry, rx)`),
    /// computed as a stride-1 convolution of its input.
    struct OutputPhase {
        /// `(ry, rx)`.
        offset: (usize, usize),
        /// The input offsets of the kernel taps that reach the phase, row-major.
        taps: Vec<(isize, isize)>,
        /// The kernel's `(ki, kj)` of each tap.
        kernel_offsets: Vec<(usize, usize)>,
        /// The phase's pixels, `(rows, columns)`.
        grid: (usize, usize),
    }

    impl OutputPhase {
        /// Phase `(ry, rx)` of the adjoint of `g`.
        fn new(g: &ConvGeometry, (ry, rx): (usize, usize)) -> OutputPhase {
            let (rows, cols) = (phase_taps(g, ry), phase_taps(g, rx));
            OutputPhase {
                offset: (ry, rx),
                taps: rows
                    .iter()
                    .flat_map(|&(_, dy)| cols.iter().map(move |&(_, dx)| (dy, dx)))
                    .collect(),
                kernel_offsets: rows
                    .iter()
                    .flat_map(|&(ki, _)| cols.iter().map(move |&(kj, _)| (ki, kj)))
                    .collect(),
                grid: ((g.h_in - ry).div_ceil(g.stride), (g.w_in - rx).div_ceil(g.stride)),
            }
        }
    }

    /// The gather table of [`im2col`] and [`col2im_adding`]: entry `t·out_pixels + p`, for the
    /// kernel offset `t = ki·k + kj` and the output pixel `p = oh·w_out + ow`, is the input pixel
    /// `ih·w_in + iw` that `p` reads through `t`, or `h_in·w_in` (one past the plane) where it
    /// reads padding. The kernels gather from (and scatter into) a copy of one input plane followed
    /// by one zero, so that their loops carry no padding test and no stride arithmetic (at the
    /// DCGAN's stride-2 shapes, 8% faster than per-row valid ranges and strided copies; both are
    /// bound by writing the column matrix, which does not fit the L2 cache).
    fn taps(g: &ConvGeometry) -> Vec<usize> {
        let (k, s, p) = (g.kernel, g.stride, g.padding);
        let outside = g.h_in * g.w_in;
        let mut table = Vec::with_capacity(k * k * g.out_pixels());
        for ki in 0..k {
            for kj in 0..k {
                for oh in 0..g.h_out {
                    for ow in 0..g.w_out {
                        let (ih, iw) = ((oh * s + ki).wrapping_sub(p), (ow * s + kj).wrapping_sub(p));
                        table.push(if ih < g.h_in && iw < g.w_in {
                            ih * g.w_in + iw
                        } else {
                            outside
                        });
                    }
                }
            }
        }
        table
    }

    /// Patches of the input space as columns: `[c_in·k·k, batch·h_out·w_out]`. Input channels
    /// are filled in parallel on the pool's threads.
    pub fn im2col(g: &ConvGeometry, batch: usize, x: &[f32]) -> Vec<f32> {
        let mut cols = vec![0.0; g.patch_len() * batch * g.out_pixels()];
        im2col_into(g, batch, x, &mut cols);
        cols
    }

    /// [`im2col`] written into the first `c_in·k·k · batch·h_out·w_out` values of `cols`, every
    /// one of them (the buffer's old contents do not matter).
    pub fn im2col_into(g: &ConvGeometry, batch: usize, x: &[f32], cols: &mut [f32]) {
        im2col_with_taps(g, batch, x, cols, &taps(g));
    }

    /// [`im2col_into`] with the gather table ([`taps`]) given, for callers that build one column
    /// matrix per sample.
    fn im2col_with_taps(g: &ConvGeometry, batch: usize, x: &[f32], cols: &mut [f32], taps: &[usize]) {
        let (n, pixels, plane) = (batch * g.out_pixels(), g.out_pixels(), g.h_in * g.w_in);
        if n == 0 {
            return;
        }
        cols[..g.patch_len() * n]
            .par_chunks_mut(g.kernel * g.kernel * n)
            .with_min_len(crate::kernels::min_items_per_task(1))
            .enumerate()
            .for_each_init(
                || vec![0.0; plane + 1],
                |padded, (ci, rows)| {
                    for b in 0..batch {
                        padded[..plane].copy_from_slice(&x[b * g.in_len() + ci * plane..][..plane]);
                        for (tap, row) in taps.chunks_exact(pixels).zip(rows.chunks_exact_mut(n)) {
                            for (out, &i) in row[b * pixels..][..pixels].iter_mut().zip(tap) {
                                *out = padded[i];
                            }
                        }
                    }
                },
            );
    }

    /// The adjoint of [`im2col`]: sums columns back into the input space, `[batch, c_in·h_in·w_in]`.
    /// Input planes are summed in parallel on the pool's threads.
    pub fn col2im(g: &ConvGeometry, batch: usize, cols: &[f32]) -> Vec<f32> {
        let mut x = vec![0.0; batch * g.in_len()];
        col2im_adding(g, batch, cols, &mut x);
        x
    }

    /// Input planes per task when the pool splits [`col2im_adding`].
    const MIN_PLANES_PER_TASK: usize = 4;

    /// [`col2im`] added into `x` (`[batch, c_in·h_in·w_in]`) instead of a new buffer. Each input
    /// value receives its terms in the order of the column matrix's rows, on any number of threads.
    pub fn col2im_adding(g: &ConvGeometry, batch: usize, cols: &[f32], x: &mut [f32]) {
        col2im_adding_with_taps(g, batch, cols, x, &taps(g));
    }

    /// [`col2im_adding`] with the gather table ([`taps`]) given, for callers that sum one column
    /// matrix per sample.
    fn col2im_adding_with_taps(g: &ConvGeometry, batch: usize, cols: &[f32], x: &mut [f32], taps: &[usize]) {
        let (n, pixels, plane) = (batch * g.out_pixels(), g.out_pixels(), g.h_in * g.w_in);
        let taps_per_channel = g.kernel * g.kernel;
        if n == 0 {
            return;
        }
        x[..batch * g.in_len()]
            .par_chunks_mut(plane)
            .with_min_len(crate::kernels::min_items_per_task(MIN_PLANES_PER_TASK))
            .enumerate()
            .for_each_init(
                || vec![0.0; plane + 1],
                |padded, (sample_channel, xs)| {
                    let (b, ci) = (sample_channel / g.c_in, sample_channel % g.c_in);
                    padded[..plane].copy_from_slice(xs);
                    let rows = &cols[ci * taps_per_channel * n..][..taps_per_channel * n];
                    for (tap, row) in taps.chunks_exact(pixels).zip(rows.chunks_exact(n)) {
                        for (&i, v) in tap.iter().zip(&row[b * pixels..][..pixels]) {
                            padded[i] += v;
                        }
                    }
                    xs.copy_from_slice(&padded[..plane]);
                },
            );
    }

    /// Per-channel sums of `[batch, c, pixels]` (the bias gradient), added into `out` (length `c`).
    pub fn add_channel_sums(v: &[f32], batch: usize, c: usize, pixels: usize, out: &mut [f32]) {
        for b in 0..batch {
            for (ch, o) in out.iter_mut().enumerate() {
                *o += v[(b * c + ch) * pixels..][..pixels].iter().sum::<f32>();
            }
        }
    }

    /// Values of the column matrix ([`im2col`]) of one chunk of samples: the kernels below go
    /// through the batch this many columns' worth of samples at a time, so that the column
    /// matrix stays in cache instead of spanning the whole batch. 2 MB: on the DCGAN (10 samples
    /// of its 64->128 convolution per chunk), side by side, 2^19 values ran as fast as 2^20, which
    /// was 3-7% faster than 2^22 (the whole batch, and 16 MB more memory); 2^19 was 11% faster than
    /// 2^18 at 2 threads, whose products had too few columns to split well, and 2^16 10% slower.
    const CHUNK_VALUES: usize = 1 << 19;

    /// Samples per chunk (see [`CHUNK_VALUES`]; at least one).
    fn chunk_samples(g: &ConvGeometry) -> usize {
        (CHUNK_VALUES / (g.patch_len() * g.out_pixels()).max(1)).max(1)
    }

    /// Calls `f(first, count, cols)` for consecutive chunks of the `batch` samples, each with at
    /// most [`CHUNK_VALUES`] column values (at least one sample), with one column-matrix buffer
    /// cut to the chunk, `[c_in·k·k, count·h_out·w_out]`, whose old contents are left for `f` to
    /// write over. The buffer is allocated once per call for the largest chunk (no allocation or
    /// zero-fill per chunk); keeping it on the thread from one call to the next as well was
    /// measured twice (2026-11-28, 2026-11-29) and gained nothing measurable at 1 or 2 threads,
    /// for 2-10 MB more peak memory.
    fn for_each_chunk(g: &ConvGeometry, batch: usize, mut f: impl FnMut(usize, usize, &mut [f32])) {
        let size = chunk_samples(g);
        let mut cols = vec![0.0; g.patch_len() * size.min(batch) * g.out_pixels()];
        let mut first = 0;
        while first < batch {
            let count = size.min(batch - first);
            f(first, count, &mut cols[..g.patch_len() * count * g.out_pixels()]);
            first += count;
        }
    }

    /// Sample `b`'s planes in a `[batch, channels, pixels]` tensor (`v`) as a `[channels, pixels]`
    /// matrix operand.
    fn sample_planes(v: &[f32], (channels, pixels): (usize, usize), b: usize) -> StridedMatrix<'_> {
        StridedMatrix {
            values: &v[b * channels * pixels..][..channels * pixels],
            strides: (pixels, 1),
        }
    }

    /// Samples per task of the column route's per-sample products.
    const SAMPLES_PER_TASK: usize = 4;

    /// Calls `f(cols_b, out_b)` for every sample `b` of `batch`, in parallel over samples: `cols_b`
    /// the sample's column matrix of `inputs` (`[batch, c_in·h_in·w_in]`; im2col, `[c_in·k·k,
    /// pixels]`) in a buffer of the task's that stays in cache, `out_b` the sample's `out_len`
    /// values of `out` (`[batch, c_out·h_out·w_out]`).
    ///
    /// # Panics
    /// When `inputs` or `out` is shorter than `batch` samples, or the geometry's samples hold no
    /// input values but some output values (`ConvGeometry::conv` makes none): `f` must see every
    /// sample of `out`, which the forward convolution counts as written.
    fn for_each_sample_columns<T: Send>(
        g: &ConvGeometry,
        batch: usize,
        inputs: &[f32],
        out: &mut [T],
        f: impl Fn(StridedMatrix<'_>, &mut [T]) + Sync,
    ) {
        let (in_len, out_len, taps) = (g.in_len(), g.out_len(), taps(g));
        assert!(
            in_len > 0 || out_len == 0,
            "conv column route: a geometry without input values"
        );
        let columns_len = g.patch_len() * g.out_pixels();
        out[..batch * out_len]
            .par_chunks_mut(out_len.max(1))
            .zip(inputs[..batch * in_len].par_chunks(in_len.max(1)))
            .with_min_len(crate::kernels::min_items_per_task(SAMPLES_PER_TASK))
            .for_each_init(
                || vec![0.0; columns_len],
                |cols, (out_b, inputs_b)| {
                    im2col_with_taps(g, 1, inputs_b, cols, &taps);
                    let columns = StridedMatrix {
                        values: cols,
                        strides: (g.out_pixels(), 1),
                    };
                    f(columns, out_b);
                },
            );
    }

    /// Convolution: `x` `[batch, in_len]`, `w` `[c_out, c_in·k·k]` → `[batch, out_len]`.
    pub fn conv_forward(g: &ConvGeometry, batch: usize, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        if let Some(kernel) = implicit_route(g.c_out, g.patch_len()) {
            let mut y = vec![0.0; batch * g.out_len()];
            implicit_conv(g, batch, x, w, bias, &mut y, false, kernel);
            return y;
        }
        // Sample by sample, in parallel: the sample's column matrix (`[c_in·k·k, pixels]`, in a
        // buffer of the task's that stays in cache), and its output planes `[c_out, pixels]` as
        // one product `W·cols_b` written where they lie in `y` (no zero-fill first, no copy from a
        // `[c_out, batch·pixels]` layout).
        let (k, pixels, out_len) = (g.patch_len(), g.out_pixels(), g.out_len());
        let mut y: Vec<f32> = Vec::with_capacity(batch * out_len);
        let weights = StridedMatrix {
            values: w,
            strides: (k, 1),
        };
        for_each_sample_columns(
            g,
            batch,
            x,
            &mut y.spare_capacity_mut()[..batch * out_len],
            |columns, planes| {
                matmul_strided_uninit((g.c_out, k, pixels), weights, columns, planes, pixels);
            },
        );
        // SAFETY: every sample's `c_out` rows of `pixels` values, its whole `out_len`, were
        // written above (`matmul_strided_uninit` writes each value of its block).
        unsafe { y.set_len(batch * out_len) };
        if let Some(bias) = bias {
            for (plane, b) in y.chunks_exact_mut(pixels.max(1)).zip(bias.iter().cycle()) {
                plane.iter_mut().for_each(|v| *v += b);
            }
        }
        y
    }

    /// Which gradients a backward pass computes: the input's is left out for data (nobody reads
    /// it), the weight's and the bias's for frozen parameters.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Wanted {
        /// The input's gradient.
        pub input: bool,
        /// The weight's gradient.
        pub weight: bool,
        /// The bias's gradient.
        pub bias: bool,
    }

    impl Wanted {
        /// Every gradient.
        pub const ALL: Wanted = Wanted {
            input: true,
            weight: true,
            bias: true,
        };
    }

    /// The gradients a backward pass computed, each `None` where it was not [`Wanted`].
    #[derive(Debug, Default)]
    pub struct Gradients {
        /// Of the input, `[batch, input values]`.
        pub input: Option<Vec<f32>>,
        /// Of the weight, `[c_out, c_in·k·k]`.
        pub weight: Option<Vec<f32>>,
        /// Of the bias (the per-channel sums of the output's gradient).
        pub bias: Option<Vec<f32>>,
    }

    /// The gradient buffers a backward pass adds into, each `None` where it is not wanted: the
    /// training step's own buffers, so that no gradient is computed into a buffer of its own and
    /// then copied.
    #[derive(Debug, Default)]
    pub struct GradientsMut<'a> {
        /// Of the input, `[batch, input values]`.
        pub input: Option<&'a mut [f32]>,
        /// Of the weight, `[c_out, c_in·k·k]`.
        pub weight: Option<&'a mut [f32]>,
        /// Of the bias.
        pub bias: Option<&'a mut [f32]>,
    }

    impl Gradients {
        /// Zero-filled buffers for the `wanted` gradients of a layer whose input, weight and bias
        /// take `input`, `weight` and `bias` values.
        pub fn zeros(wanted: Wanted, (input, weight, bias): (usize, usize, usize)) -> Gradients {
            Gradients {
                input: wanted.input.then(|| vec![0.0; input]),
                weight: wanted.weight.then(|| vec![0.0; weight]),
                bias: wanted.bias.then(|| vec![0.0; bias]),
            }
        }

        /// The buffers, for a backward pass to add into.
        pub fn buffers_mut(&mut self) -> GradientsMut<'_> {
            GradientsMut {
                input: self.input.as_deref_mut(),
                weight: self.weight.as_deref_mut(),
                bias: self.bias.as_deref_mut(),
            }
        }
    }

    /// Gradients of [`conv_forward`] from `dy` `[batch, out_len]`: `dx` `[batch, in_len]`, `dw`
    /// and `db` (length `c_out`), each as `wanted`, in buffers of their own.
    pub fn conv_backward(
        g: &ConvGeometry,
        batch: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        wanted: Wanted,
    ) -> Gradients {
        let mut grads = Gradients::zeros(wanted, (batch * g.in_len(), g.weight_len(), g.c_out));
        conv_backward_adding(g, batch, x, w, dy, grads.buffers_mut());
        grads
    }

    /// [`conv_backward`] added into the given buffers.
    pub fn conv_backward_adding(
        g: &ConvGeometry,
        batch: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut out: GradientsMut<'_>,
    ) {
        if let Some(kernel) = implicit_route(g.c_in, phase_depth(g)) {
            if let Some(dx) = out.input.take() {
                implicit_conv_transpose(g, batch, dy, w, dx, kernel);
            }
        }
        if let Some(kernel) = implicit_route(g.c_out, g.patch_len()) {
            if let Some(dw) = out.weight.take() {
                // The input padded again here, not the forward pass's padded copy kept: kept, the
                // copy is cold by now, and the panel's loads from it cost more than the copy
                // (2026-11-29: +1.7% of the DCGAN's step); the copy streams its input and leaves
                // the planes in cache. (The same held for one padded `dy` shared by the two
                // products of `conv_transpose_backward_adding`.)
                implicit_weight_gradient(g, batch, x, dy, dw, kernel);
            }
        }
        if let Some(dw) = out.weight {
            add_weight_gradient_through_columns(g, batch, x, dy, dw);
        }
        if let Some(dx) = out.input {
            // The column matrix's gradient, summed back into the input space: the transposed
            // convolution of `dy`.
            conv_transpose_through_columns(g, batch, dy, w, dx);
        }
        if let Some(db) = out.bias {
            add_channel_sums(dy, batch, g.c_out, g.out_pixels(), db);
        }
    }

    /// Transposed convolution (the adjoint of `g`): `x` `[batch, out_len]`, `w` `[c_out, c_in·k·k]`
    /// → `[batch, in_len]`, adding `bias` (length `c_in`).
    pub fn conv_transpose_forward(
        g: &ConvGeometry,
        batch: usize,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut y = vec![0.0; batch * g.in_len()];
        if let Some(kernel) = implicit_route(g.c_in, phase_depth(g)) {
            implicit_conv_transpose(g, batch, x, w, &mut y, kernel);
        } else {
            conv_transpose_through_columns(g, batch, x, w, &mut y);
        }
        if let Some(bias) = bias {
            let planes = y.chunks_exact_mut(g.h_in * g.w_in);
            for (plane, b) in planes.zip(bias.iter().cycle()) {
                plane.iter_mut().for_each(|v| *v += b);
            }
        }
        y
    }

    /// `dW += Σ_b planes_b·cols_bᵀ` (`dW` `[c_out, c_in·k·k]`): for each sample in order, its
    /// planes (`planes`: `[batch, c_out, pixels]`, read where they lie) times the transpose of
    /// its columns of the column matrix of `patches` (`[batch, c_in·h_in·w_in]`), built a chunk
    /// of samples at a time. The weight gradient of the convolution `g` (`planes` its output's
    /// gradient, `patches` its input) and of its adjoint (the roles swapped).
    fn add_weight_gradient_through_columns(
        g: &ConvGeometry,
        batch: usize,
        patches: &[f32],
        planes: &[f32],
        dw: &mut [f32],
    ) {
        let (k, pixels) = (g.patch_len(), g.out_pixels());
        for_each_chunk(g, batch, |first, count, cols| {
            let n = count * pixels;
            im2col_into(g, count, &patches[first * g.in_len()..][..count * g.in_len()], cols);
            let chunk = &planes[first * g.out_len()..][..count * g.out_len()];
            for b in 0..count {
                let columns_t = StridedMatrix {
                    values: &cols[b * pixels..],
                    strides: (1, n),
                };
                let planes_b = sample_planes(chunk, (g.c_out, pixels), b);
                matmul_strided((g.c_out, pixels, k), planes_b, columns_t, dw, k, true);
            }
        });
    }

    /// `y +=` the transposed convolution of `x` through column matrices, sample by sample in
    /// parallel: the sample's column matrix `Wᵀ·x_b` (`[c_in·k·k, pixels]`,
    /// from `x_b`'s planes where they lie, into a buffer of the task's that stays in cache), summed
    /// into `y_b` by col2im.
    fn conv_transpose_through_columns(g: &ConvGeometry, batch: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
        let (k, pixels, taps) = (g.patch_len(), g.out_pixels(), taps(g));
        let weights_t = StridedMatrix {
            values: w,
            strides: (1, k),
        };
        y[..batch * g.in_len()]
            .par_chunks_mut(g.in_len().max(1))
            .zip(x[..batch * g.out_len()].par_chunks(g.out_len().max(1)))
            .with_min_len(crate::kernels::min_items_per_task(SAMPLES_PER_TASK))
            .for_each_init(
                || vec![0.0; k * pixels],
                |cols, (y_b, x_b)| {
                    let x_b = sample_planes(x_b, (g.c_out, pixels), 0);
                    matmul_strided((k, g.c_out, pixels), weights_t, x_b, cols, pixels, false);
                    col2im_adding_with_taps(g, 1, cols, y_b, &taps);
                },
            );
    }

    /// Gradients of [`conv_transpose_forward`] from `dy` `[batch, in_len]`: `dx` `[batch,
    /// out_len]`, `dw` and `db` (length `c_in`), each as `wanted`, in buffers of their own.
    pub fn conv_transpose_backward(
        g: &ConvGeometry,
        batch: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        wanted: Wanted,
    ) -> Gradients {
        let mut grads = Gradients::zeros(wanted, (batch * g.out_len(), g.weight_len(), g.c_in));
        conv_transpose_backward_adding(g, batch, x, w, dy, grads.buffers_mut());
        grads
    }

    /// [`conv_transpose_backward`] added into the given buffers.
    pub fn conv_transpose_backward_adding(
        g: &ConvGeometry,
        batch: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut out: GradientsMut<'_>,
    ) {
        if let Some(kernel) = implicit_route(g.c_out, g.patch_len()) {
            if let Some(dx) = out.input.take() {
                implicit_conv(g, batch, dy, w, None, dx, true, kernel);
            }
            if let Some(dw) = out.weight.take() {
                // The adjoint's weight gradient is the convolution's, with the roles of its
                // input (the patches, here of `dy`) and output gradient (here `x`) swapped.
                implicit_weight_gradient(g, batch, dy, x, dw, kernel);
            }
        }
        if let Some(dw) = out.weight {
            // The adjoint's weight gradient is the convolution's, with the roles of its input
            // (the patches, here of `dy`) and output gradient (here `x`) swapped.
            add_weight_gradient_through_columns(g, batch, dy, x, dw);
        }
        if let Some(dx) = out.input {
            // The convolution of `dy`, sample by sample: `dx_b += W·cols_b`, from the sample's
            // column matrix in a buffer of the task's, into `dx_b`'s planes where they lie.
            let (k, pixels) = (g.patch_len(), g.out_pixels());
            let weights = StridedMatrix {
                values: w,
                strides: (k, 1),
            };
            for_each_sample_columns(g, batch, dy, &mut dx[..batch * g.out_len()], |columns, dx_b| {
                matmul_strided((g.c_out, k, pixels), weights, columns, dx_b, pixels, true);
            });
        }
        if let Some(db) = out.bias {
            add_channel_sums(dy, batch, g.c_in, g.h_in * g.w_in, db);
        }
    }
}

/// Adds host values into the gradient of a tensor or ghost (`$t`) inside a backward op
/// (CUDA: a round trip through the host; the kernels themselves run on the host too).
#[cfg(feature = "cuda")]
macro_rules! accumulate {
    ($grads:expr, $t:expr, $src:expr) => {{
        let dst: &mut cudarc::driver::CudaSlice<f32> = $grads.get_or_alloc_mut($t)?;
        let dev = dst.device();
        let mut host = dev.dtoh_sync_copy(dst)?;
        for (d, s) in host.iter_mut().zip($src.iter()) {
            *d += *s;
        }
        dev.htod_sync_copy_into(&host, dst)?;
    }};
}

/// What one [`conv_op`] computes, besides its operands.
#[derive(Clone, Copy, Debug)]
struct ConvOp {
    /// The convolution's geometry.
    geometry: ConvGeometry,
    /// The adjoint (a transposed convolution) instead of the convolution.
    transpose: bool,
    /// The gradients the backward pass computes.
    wanted: kernels::Wanted,
    /// The activation applied to the output, fused into the op.
    activation: Option<ActivationFn>,
}

impl ConvOp {
    /// The plain convolution (or its adjoint) with every gradient and no activation.
    fn plain(geometry: ConvGeometry, transpose: bool) -> ConvOp {
        ConvOp {
            geometry,
            transpose,
            wanted: kernels::Wanted::ALL,
            activation: None,
        }
    }
}

/// One custom op: a convolution or its adjoint (`op.transpose`), on the tape of `x`, with the
/// `op.wanted` gradients into `x`, `w` (whose own tape, if any, is merged) and `bias`, followed by
/// `op.activation` when given (applied in place to the output, its slopes kept for the backward
/// pass: no separate pass, buffer or tape op). The kernel's values are `w_values` when given (a
/// parameter's shared host copy, which `w`'s own values may lag behind; not copied per pass) and
/// `w`'s otherwise.
fn conv_op<T>(
    x: Matrix<Tape>,
    w: Tensor<(usize,), f32, Device, T>,
    w_values: Option<std::sync::Arc<Vec<f32>>>,
    bias: Option<&Vector>,
    op: ConvOp,
) -> Result<Matrix<Tape>>
where
    T: dfdx::tensor::Tape<f32, Device>,
    Tape: Merge<T>,
{
    let ConvOp {
        geometry: g,
        transpose,
        wanted,
        activation,
    } = op;
    let what = if transpose { "conv_transpose2d" } else { "conv2d" };
    let (in_len, out_len, bias_len) = if transpose {
        (g.out_len(), g.in_len(), g.c_in)
    } else {
        (g.in_len(), g.out_len(), g.c_out)
    };
    let batch = x.shape().0;
    if x.shape().1 != in_len {
        return Err(Error::shape(what, format!("{in_len} input features"), x.shape().1));
    }
    if w.shape().0 != g.weight_len() {
        return Err(Error::shape(format!("{what} weight"), g.weight_len(), w.shape().0));
    }
    if let Some(b) = bias {
        if b.shape().0 != bias_len {
            return Err(Error::shape(format!("{what} bias"), bias_len, b.shape().0));
        }
    }
    // Gradients are written in logical order, so operate on contiguous values.
    let x = x.try_reshape_like(&(batch, in_len))?;
    let (x, xtape) = x.split_tape();
    let (w, wtape) = w.split_tape();
    let dev = x.device().clone();
    let xv = crate::kernels::host(&x);
    let wv = w_values.unwrap_or_else(|| std::sync::Arc::new(crate::kernels::host(&w)));
    let bv = bias.map(|b| b.as_vec());
    let mut y = if transpose {
        kernels::conv_transpose_forward(&g, batch, &xv, &wv, bv.as_deref())
    } else {
        kernels::conv_forward(&g, batch, &xv, &wv, bv.as_deref())
    };
    let slopes = activation.map(|f| f.apply_in_place(&mut y));
    let y = dev.tensor_from_vec(y, (batch, out_len));
    let (xg, wg, yg, bg) = (x.ghost(), w.ghost(), y.ghost(), bias.map(|b| b.ghost()));
    let mut tape = xtape.merge(wtape);
    dfdx::tensor::Tape::add_backward_op(&mut tape, move |grads| {
        let wanted = kernels::Wanted {
            bias: wanted.bias && bg.is_some(),
            ..wanted
        };
        let backward = if transpose {
            kernels::conv_transpose_backward_adding
        } else {
            kernels::conv_backward_adding
        };
        // The output's gradient and the wanted ones are moved out of the gradient store, added
        // into by the kernels and moved back, not copied (dfdx lends one `&mut` at a time).
        #[cfg(not(feature = "cuda"))]
        {
            let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&yg)?);
            let mut dx = match wanted.input {
                true => std::mem::take(&mut **grads.get_or_alloc_mut(&xg)?),
                false => Vec::new(),
            };
            let mut dw = match wanted.weight {
                true => std::mem::take(&mut **grads.get_or_alloc_mut(&wg)?),
                false => Vec::new(),
            };
            let mut db = match (&bg, wanted.bias) {
                (Some(bg), true) => std::mem::take(&mut **grads.get_or_alloc_mut(bg)?),
                _ => Vec::new(),
            };
            let out = kernels::GradientsMut {
                input: wanted.input.then_some(&mut dx[..]),
                weight: wanted.weight.then_some(&mut dw[..]),
                bias: wanted.bias.then_some(&mut db[..]),
            };
            backward(
                &g,
                batch,
                &xv,
                &wv,
                &crate::kernels::before_activation(&dy, slopes.as_deref()),
                out,
            );
            **grads.get_or_alloc_mut(&yg)? = dy;
            if wanted.input {
                **grads.get_or_alloc_mut(&xg)? = dx;
            }
            if wanted.weight {
                **grads.get_or_alloc_mut(&wg)? = dw;
            }
            if let (Some(bg), true) = (&bg, wanted.bias) {
                **grads.get_or_alloc_mut(bg)? = db;
            }
        }
        #[cfg(feature = "cuda")]
        {
            grads.try_alloc_for(&yg)?;
            let dy = crate::kernels::host(&grads.get(&yg));
            let mut computed = kernels::Gradients::zeros(wanted, (batch * in_len, g.weight_len(), bias_len));
            let dy = crate::kernels::before_activation(&dy, slopes.as_deref());
            backward(&g, batch, &xv, &wv, &dy, computed.buffers_mut());
            if let Some(dx) = computed.input {
                accumulate!(grads, &xg, dx);
            }
            if let Some(dw) = computed.weight {
                accumulate!(grads, &wg, dw);
            }
            if let (Some(bg), Some(db)) = (&bg, computed.bias) {
                accumulate!(grads, bg, db);
            }
        }
        Ok(())
    });
    Ok(y.put_tape(tape))
}

/// Convolution of `x` (`[batch, c_in·h_in·w_in]`) with `weight` (`[c_out, c_in, k, k]`, flat,
/// possibly carrying its own tape, e.g. a spectrally normalized kernel) plus `bias` (`[c_out]`).
pub fn conv2d<T>(
    x: Matrix<Tape>,
    weight: Tensor<(usize,), f32, Device, T>,
    bias: Option<&Vector>,
    g: &ConvGeometry,
) -> Result<Matrix<Tape>>
where
    T: dfdx::tensor::Tape<f32, Device>,
    Tape: Merge<T>,
{
    conv_op(x, weight, None, bias, ConvOp::plain(*g, false))
}

/// Transposed convolution, the adjoint of [`conv2d`] with geometry `g`: `x` is
/// `[batch, c_out·h_out·w_out]`, `weight` is `[c_out, c_in, k, k]` in `g`'s terms (PyTorch's
/// `ConvTranspose2d` layout `[in, out, k, k]`), `bias` is `[c_in]`; the result is `[batch, c_in·h_in·w_in]`.
pub fn conv_transpose2d<T>(
    x: Matrix<Tape>,
    weight: Tensor<(usize,), f32, Device, T>,
    bias: Option<&Vector>,
    g: &ConvGeometry,
) -> Result<Matrix<Tape>>
where
    T: dfdx::tensor::Tape<f32, Device>,
    Tape: Merge<T>,
{
    conv_op(x, weight, None, bias, ConvOp::plain(*g, true))
}

/// `{ type = "conv2d", out_channels = 64, kernel_size = 4, stride = 2, padding = 1 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Conv2dConfig {
    /// Output channels.
    pub out_channels: usize,
    /// Kernel side.
    pub kernel_size: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Whether to add a per-channel bias.
    pub bias: bool,
    /// Kernel initializer; PyTorch's default (U(±1/√fan_in)) when absent.
    pub init: Option<Init>,
    /// Bias initializer; PyTorch's default (U(±1/√fan_in)) when absent.
    pub bias_init: Option<Init>,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Conv2dConfig {
            out_channels: 1,
            kernel_size: 3,
            stride: 1,
            padding: 0,
            bias: true,
            init: None,
            bias_init: None,
        }
    }
}

impl Conv2dConfig {
    /// A convolution with stride 1, no padding, a bias and PyTorch's initialization.
    pub fn new(out_channels: usize, kernel_size: usize) -> Self {
        Conv2dConfig {
            out_channels,
            kernel_size,
            ..Default::default()
        }
    }
    /// Sets the stride.
    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }
    /// Sets the padding.
    pub fn with_padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }
    /// Sets whether there is a bias.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
    /// Sets the kernel initializer.
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = Some(init);
        self
    }
}

/// `{ type = "conv_transpose2d", out_channels = 64, kernel_size = 4, stride = 2, padding = 1 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvTranspose2dConfig {
    /// Output channels.
    pub out_channels: usize,
    /// Kernel side.
    pub kernel_size: usize,
    /// Stride.
    pub stride: usize,
    /// Implicit zero padding removed from each side of the output.
    pub padding: usize,
    /// Extra rows/columns added to one side of the output (smaller than `stride`).
    pub output_padding: usize,
    /// Whether to add a per-channel bias.
    pub bias: bool,
    /// Kernel initializer; PyTorch's default when absent.
    pub init: Option<Init>,
    /// Bias initializer; PyTorch's default when absent.
    pub bias_init: Option<Init>,
}

impl Default for ConvTranspose2dConfig {
    fn default() -> Self {
        ConvTranspose2dConfig {
            out_channels: 1,
            kernel_size: 3,
            stride: 1,
            padding: 0,
            output_padding: 0,
            bias: true,
            init: None,
            bias_init: None,
        }
    }
}

impl ConvTranspose2dConfig {
    /// A transposed convolution with stride 1, no padding, a bias and PyTorch's initialization.
    pub fn new(out_channels: usize, kernel_size: usize) -> Self {
        ConvTranspose2dConfig {
            out_channels,
            kernel_size,
            ..Default::default()
        }
    }
    /// Sets the stride.
    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }
    /// Sets the padding.
    pub fn with_padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }
    /// Sets the output padding.
    pub fn with_output_padding(mut self, output_padding: usize) -> Self {
        self.output_padding = output_padding;
        self
    }
    /// Sets whether there is a bias.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
    /// Sets the kernel initializer.
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = Some(init);
        self
    }
}

fn image_input(what: &str, input: FeatureShape) -> Result<(usize, usize, usize)> {
    input.as_image().ok_or_else(|| {
        Error::shape(
            what,
            "an image [channels, height, width] (add a `reshape` layer before it)",
            input,
        )
    })
}

/// Draws a kernel and bias. `fan_in`/`fan_out` follow PyTorch (dimension 1 of the weight is fan-in).
fn init_params(
    ctx: &mut BuildContext<'_>,
    shape: Vec<usize>,
    bias_len: Option<usize>,
    init: &Option<Init>,
    bias_init: &Option<Init>,
) -> Result<(Param, Option<Param>)> {
    let receptive = shape[2] * shape[3];
    let (fan_in, fan_out) = (shape[1] * receptive, shape[0] * receptive);
    let winit = init.clone().unwrap_or_else(Init::torch_default_weight);
    winit.validate("init")?;
    let n = shape.iter().product();
    let w = Param::from_vec(
        ctx.device,
        winit.sample(n, fan_in, fan_out, ctx.rng)?,
        shape,
        ParamRole::Weight,
    )?;
    let b = match bias_len {
        Some(len) => {
            let binit = bias_init.clone().unwrap_or_else(|| Init::torch_default_bias(fan_in));
            binit.validate("bias_init")?;
            let v = binit.sample(len, fan_in, fan_out, ctx.rng)?;
            Some(Param::from_vec(ctx.device, v, vec![len], ParamRole::Bias)?)
        }
        None => None,
    };
    Ok((w, b))
}

#[typetag::serde(name = "conv2d")]
impl LayerConfig for Conv2dConfig {
    fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        let (c, h, w) = image_input("conv2d", input)?;
        let g = ConvGeometry::conv(c, h, w, self.out_channels, self.kernel_size, self.stride, self.padding)?;
        let k = self.kernel_size;
        let (weight, bias) = init_params(
            ctx,
            vec![self.out_channels, c, k, k],
            self.bias.then_some(self.out_channels),
            &self.init,
            &self.bias_init,
        )?;
        Ok(Box::new(Conv2d { geom: g, weight, bias }))
    }
}

#[typetag::serde(name = "conv_transpose2d")]
impl LayerConfig for ConvTranspose2dConfig {
    fn build(&self, input: FeatureShape, ctx: &mut BuildContext<'_>) -> Result<Box<dyn Layer>> {
        let (c, h, w) = image_input("conv_transpose2d", input)?;
        let g = ConvGeometry::transposed(
            c,
            h,
            w,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.output_padding,
        )?;
        let k = self.kernel_size;
        let (weight, bias) = init_params(
            ctx,
            vec![c, self.out_channels, k, k],
            self.bias.then_some(self.out_channels),
            &self.init,
            &self.bias_init,
        )?;
        Ok(Box::new(ConvTranspose2d {
            geom: g,
            output_padding: self.output_padding,
            weight,
            bias,
        }))
    }
}

/// A 2-D convolution layer.
#[derive(Debug)]
pub struct Conv2d {
    geom: ConvGeometry,
    weight: Param,
    bias: Option<Param>,
}

/// A 2-D transposed convolution layer.
#[derive(Debug)]
pub struct ConvTranspose2d {
    geom: ConvGeometry,
    output_padding: usize,
    weight: Param,
    bias: Option<Param>,
}

macro_rules! conv_params {
    ($t:ty, $transpose:expr) => {
        impl Parameterized for $t {
            fn named_params(&self) -> Vec<(String, &Param)> {
                let mut v = vec![("weight".to_string(), &self.weight)];
                if let Some(b) = &self.bias {
                    v.push(("bias".to_string(), b));
                }
                v
            }
            fn named_params_mut(&mut self) -> Vec<(String, &mut Param)> {
                let mut v = vec![("weight".to_string(), &mut self.weight)];
                if let Some(b) = &mut self.bias {
                    v.push(("bias".to_string(), b));
                }
                v
            }
        }
        impl $t {
            /// The geometry (for a transposed convolution, of the convolution it is the adjoint of).
            pub fn geometry(&self) -> &ConvGeometry {
                &self.geom
            }
            /// The kernel.
            pub fn weight(&self) -> &Param {
                &self.weight
            }
            /// The bias, if any.
            pub fn bias(&self) -> Option<&Param> {
                self.bias.as_ref()
            }
            /// The layer's op on `input`, followed by `activation` when given (fused into the op).
            fn run(&self, input: Activation, activation: Option<ActivationFn>) -> Result<Activation> {
                let shape = self.output_shape(input.shape)?;
                let wanted = wanted_gradients(&input, &self.weight, self.bias.as_ref());
                let y = conv_op(
                    input.value,
                    self.weight.with_id(Vector::clone),
                    Some(self.weight.host_values()),
                    self.bias.as_ref().map(|b| b.value()),
                    ConvOp {
                        geometry: self.geom,
                        transpose: $transpose,
                        wanted,
                        activation,
                    },
                )?;
                Activation::new(y, shape)
            }
        }
    };
}
conv_params!(Conv2d, false);
conv_params!(ConvTranspose2d, true);

fn check_input(what: &str, expected: FeatureShape, input: FeatureShape) -> Result<FeatureShape> {
    if input != expected {
        return Err(Error::shape(what, expected, input));
    }
    Ok(input)
}

/// The gradients a convolution layer's backward pass computes: the input's unless it is data
/// ([`Activation::requires_grad`]), the weight's and bias's unless frozen
/// ([`Param::requires_grad`]).
fn wanted_gradients(input: &Activation, weight: &Param, bias: Option<&Param>) -> kernels::Wanted {
    kernels::Wanted {
        input: input.requires_grad,
        weight: weight.requires_grad(),
        bias: bias.is_some_and(Param::requires_grad),
    }
}

impl Layer for Conv2d {
    fn describe(&self) -> String {
        let g = &self.geom;
        format!(
            "conv2d [{}, {}, {}] -> [{}, {}, {}] (k {}, s {}, p {})",
            g.c_in, g.h_in, g.w_in, g.c_out, g.h_out, g.w_out, g.kernel, g.stride, g.padding
        )
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        let g = &self.geom;
        check_input("conv2d", FeatureShape::image(g.c_in, g.h_in, g.w_in), input)?;
        Ok(FeatureShape::image(g.c_out, g.h_out, g.w_out))
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        self.run(input, None)
    }
    #[cfg(not(feature = "cuda"))]
    fn fuses_activation(&self) -> bool {
        true
    }
    #[cfg(not(feature = "cuda"))]
    fn forward_activated(
        &mut self,
        input: Activation,
        f: ActivationFn,
        _ctx: &mut ForwardContext<'_>,
    ) -> Result<Activation> {
        self.run(input, Some(f))
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        self.output_shape(input.shape)?;
        let g = conv_transpose2d(grad_output.value, self.weight.value().clone(), None, &self.geom)?;
        Activation::new(g, input.shape)
    }
}

impl Layer for ConvTranspose2d {
    fn describe(&self) -> String {
        let g = &self.geom;
        format!(
            "conv_transpose2d [{}, {}, {}] -> [{}, {}, {}] (k {}, s {}, p {}, op {})",
            g.c_out, g.h_out, g.w_out, g.c_in, g.h_in, g.w_in, g.kernel, g.stride, g.padding, self.output_padding
        )
    }
    fn output_shape(&self, input: FeatureShape) -> Result<FeatureShape> {
        let g = &self.geom;
        check_input(
            "conv_transpose2d",
            FeatureShape::image(g.c_out, g.h_out, g.w_out),
            input,
        )?;
        Ok(FeatureShape::image(g.c_in, g.h_in, g.w_in))
    }
    fn forward(&mut self, input: Activation, _ctx: &mut ForwardContext<'_>) -> Result<Activation> {
        self.run(input, None)
    }
    #[cfg(not(feature = "cuda"))]
    fn fuses_activation(&self) -> bool {
        true
    }
    #[cfg(not(feature = "cuda"))]
    fn forward_activated(
        &mut self,
        input: Activation,
        f: ActivationFn,
        _ctx: &mut ForwardContext<'_>,
    ) -> Result<Activation> {
        self.run(input, Some(f))
    }
    fn input_grad(&self, input: &Activation, grad_output: Activation) -> Result<Activation> {
        self.output_shape(input.shape)?;
        let g = conv2d(grad_output.value, self.weight.value().clone(), None, &self.geom)?;
        Activation::new(g, input.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::implicit_conv;
    use crate::layers::testing::*;

    /// im2col with a bounds test per element (the definition), for [`kernels::im2col`] and its
    /// adjoint [`kernels::col2im`] to be checked against.
    fn im2col_reference(g: &ConvGeometry, batch: usize, x: &[f32]) -> Vec<f32> {
        let n = batch * g.out_pixels();
        let mut cols = vec![0.0; g.patch_len() * n];
        for ci in 0..g.c_in {
            for ki in 0..g.kernel {
                for kj in 0..g.kernel {
                    for b in 0..batch {
                        for oh in 0..g.h_out {
                            for ow in 0..g.w_out {
                                let ih = (oh * g.stride + ki) as isize - g.padding as isize;
                                let iw = (ow * g.stride + kj) as isize - g.padding as isize;
                                if (0..g.h_in as isize).contains(&ih) && (0..g.w_in as isize).contains(&iw) {
                                    let row = (ci * g.kernel + ki) * g.kernel + kj;
                                    cols[row * n + b * g.out_pixels() + oh * g.w_out + ow] =
                                        x[b * g.in_len() + (ci * g.h_in + ih as usize) * g.w_in + iw as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
        cols
    }

    #[test]
    fn im2col_and_col2im_match_the_definition_for_every_stride_and_padding() {
        let mut h = Harness::new(4);
        for (kernel, stride, padding, hw) in [
            (1, 1, 0, 3),
            (3, 1, 1, 5),
            (4, 2, 1, 7),
            (3, 3, 2, 8),
            (5, 2, 0, 9),
            (2, 1, 3, 2),
        ] {
            let g = ConvGeometry::conv(2, hw, hw + 1, 3, kernel, stride, padding).unwrap();
            let batch = 2;
            let x = h.values(batch * g.in_len());
            assert_eq!(kernels::im2col(&g, batch, &x), im2col_reference(&g, batch, &x), "{g:?}");
            // col2im is the adjoint: <im2col(x), c> = <x, col2im(c)>.
            let c = h.values(g.patch_len() * batch * g.out_pixels());
            let lhs: f64 = im2col_reference(&g, batch, &x)
                .iter()
                .zip(&c)
                .map(|(a, b)| (a * b) as f64)
                .sum();
            let rhs: f64 = x
                .iter()
                .zip(kernels::col2im(&g, batch, &c))
                .map(|(a, b)| (a * b) as f64)
                .sum();
            assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0), "{g:?}: {lhs} vs {rhs}");
        }
    }

    /// Direct definition: y[b,o,i,j] = bias[o] + Σ w[o,c,u,v]·x[b,c,i·s−p+u, j·s−p+v].
    fn naive_conv(x: &[f32], w: &[f32], bias: &[f32], g: &ConvGeometry, batch: usize) -> Vec<f32> {
        let k = g.kernel;
        let mut y = vec![0.0f64; batch * g.out_len()];
        for b in 0..batch {
            for o in 0..g.c_out {
                for i in 0..g.h_out {
                    for j in 0..g.w_out {
                        let mut acc = bias[o] as f64;
                        for c in 0..g.c_in {
                            for u in 0..k {
                                for v in 0..k {
                                    let (ih, iw) = (
                                        (i * g.stride + u) as isize - g.padding as isize,
                                        (j * g.stride + v) as isize - g.padding as isize,
                                    );
                                    if ih >= 0 && iw >= 0 && (ih as usize) < g.h_in && (iw as usize) < g.w_in {
                                        acc += w[((o * g.c_in + c) * k + u) * k + v] as f64
                                            * x[((b * g.c_in + c) * g.h_in + ih as usize) * g.w_in + iw as usize]
                                                as f64;
                                    }
                                }
                            }
                        }
                        y[((b * g.c_out + o) * g.h_out + i) * g.w_out + j] = acc;
                    }
                }
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    /// PyTorch's ConvTranspose2d definition: x[b,c,i,j]·w[c,o,u,v] lands on y[b,o,i·s−p+u, j·s−p+v].
    #[allow(clippy::too_many_arguments)]
    fn naive_conv_t(
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        (ci, h, wd): (usize, usize, usize),
        co: usize,
        (k, s, p, op): (usize, usize, usize, usize),
        batch: usize,
    ) -> (Vec<f32>, usize, usize) {
        let ho = (h - 1) * s + k + op - 2 * p;
        let wo = (wd - 1) * s + k + op - 2 * p;
        let mut y = vec![0.0f64; batch * co * ho * wo];
        for b in 0..batch {
            for o in 0..co {
                for v in y[(b * co + o) * ho * wo..][..ho * wo].iter_mut() {
                    *v = bias[o] as f64;
                }
            }
            for c in 0..ci {
                for i in 0..h {
                    for j in 0..wd {
                        let xv = x[((b * ci + c) * h + i) * wd + j] as f64;
                        for o in 0..co {
                            for u in 0..k {
                                for vv in 0..k {
                                    let (oi, oj) =
                                        ((i * s + u) as isize - p as isize, (j * s + vv) as isize - p as isize);
                                    if oi >= 0 && oj >= 0 && (oi as usize) < ho && (oj as usize) < wo {
                                        y[((b * co + o) * ho + oi as usize) * wo + oj as usize] +=
                                            xv * w[((c * co + o) * k + u) * k + vv] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (y.into_iter().map(|v| v as f32).collect(), ho, wo)
    }

    fn params(layer: &dyn Layer) -> (Vec<f32>, Vec<f32>) {
        let p = layer.named_params();
        (p[0].1.to_vec(), p[1].1.to_vec())
    }

    #[test]
    fn conv_matches_direct_loop_and_torch_shapes() {
        // (c_in, h, w, c_out, k, s, p)
        let cases = [
            (2, 5, 5, 3, 3, 1, 0),
            (2, 5, 5, 3, 3, 1, 1),
            (1, 7, 6, 2, 3, 2, 1),
            (3, 6, 6, 2, 4, 2, 1),
            (1, 4, 5, 1, 2, 3, 2),
            (2, 3, 3, 2, 1, 1, 0),
        ];
        let mut h = Harness::new(11);
        for &(c, hh, ww, co, k, s, p) in &cases {
            let cfg = Conv2dConfig::new(co, k).with_stride(s).with_padding(p);
            let mut layer = cfg.build(FeatureShape::image(c, hh, ww), &mut h.build_ctx()).unwrap();
            let out = layer.output_shape(FeatureShape::image(c, hh, ww)).unwrap();
            // torch: H_out = floor((H + 2p - k)/s) + 1
            let expect = FeatureShape::image(co, (hh + 2 * p - k) / s + 1, (ww + 2 * p - k) / s + 1);
            assert_eq!(out, expect);
            let batch = 2;
            let x = h.values(batch * c * hh * ww);
            let (w, b) = params(layer.as_ref());
            let g = ConvGeometry::conv(c, hh, ww, co, k, s, p).unwrap();
            let reference = naive_conv(&x, &w, &b, &g, batch);
            let y = layer
                .forward(
                    h.input(x, batch, FeatureShape::image(c, hh, ww)),
                    &mut h.fwd_ctx(Mode::Eval),
                )
                .unwrap();
            assert_close(
                "conv2d",
                &y.detach().as_vec(),
                &reference.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                1e-5,
                1e-5,
            );
        }
    }

    #[test]
    fn conv_transpose_matches_direct_loop_and_torch_shapes() {
        // (c_in, h, w, c_out, k, s, p, output_padding)
        let cases = [
            (2, 3, 3, 3, 3, 1, 0, 0),
            (2, 3, 4, 1, 4, 2, 1, 0),
            (1, 3, 3, 2, 3, 2, 1, 1),
            (3, 2, 2, 2, 5, 3, 2, 2),
            (1, 1, 1, 2, 4, 1, 0, 0),
        ];
        let mut h = Harness::new(12);
        for &(c, hh, ww, co, k, s, p, op) in &cases {
            let cfg = ConvTranspose2dConfig::new(co, k)
                .with_stride(s)
                .with_padding(p)
                .with_output_padding(op);
            let mut layer = cfg.build(FeatureShape::image(c, hh, ww), &mut h.build_ctx()).unwrap();
            let out = layer.output_shape(FeatureShape::image(c, hh, ww)).unwrap();
            let batch = 2;
            let x = h.values(batch * c * hh * ww);
            let (w, b) = params(layer.as_ref());
            let (reference, ho, wo) = naive_conv_t(&x, &w, &b, (c, hh, ww), co, (k, s, p, op), batch);
            // torch: H_out = (H - 1)·s - 2p + k + output_padding
            assert_eq!(out, FeatureShape::image(co, ho, wo));
            let y = layer
                .forward(
                    h.input(x, batch, FeatureShape::image(c, hh, ww)),
                    &mut h.fwd_ctx(Mode::Eval),
                )
                .unwrap();
            assert_close(
                "conv_transpose2d",
                &y.detach().as_vec(),
                &reference.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                1e-5,
                1e-5,
            );
        }
    }

    #[test]
    fn conv_gradients_match_finite_differences() {
        for (k, s, p) in [(3, 1, 1), (2, 2, 0), (3, 2, 1)] {
            let cfg = Conv2dConfig::new(2, k).with_stride(s).with_padding(p);
            check_layer(&cfg, FeatureShape::image(2, 4, 5), 2, Mode::Train, 5);
        }
        check_layer(
            &Conv2dConfig::new(2, 3).with_bias(false),
            FeatureShape::image(1, 3, 3),
            2,
            Mode::Train,
            6,
        );
    }

    #[test]
    fn conv_transpose_gradients_match_finite_differences() {
        for (k, s, p, op) in [(3, 1, 1, 0), (4, 2, 1, 0), (3, 2, 1, 1)] {
            let cfg = ConvTranspose2dConfig::new(2, k)
                .with_stride(s)
                .with_padding(p)
                .with_output_padding(op);
            check_layer(&cfg, FeatureShape::image(2, 2, 3), 2, Mode::Train, 7);
        }
    }

    #[test]
    fn data_inputs_get_no_gradient_and_the_same_parameter_gradients() {
        let mut h = Harness::new(3);
        let layers: [Box<dyn LayerConfig>; 2] = [
            Box::new(Conv2dConfig::new(3, 4).with_stride(2).with_padding(1)),
            Box::new(
                ConvTranspose2dConfig::new(3, 4)
                    .with_stride(2)
                    .with_padding(1)
                    .with_bias(true),
            ),
        ];
        for cfg in layers {
            let shape = FeatureShape::image(2, 4, 4);
            let mut layer = cfg.build(shape, &mut h.build_ctx()).unwrap();
            let x0 = h.values(2 * shape.numel());
            let mut pass = |h: &mut Harness, data: bool| {
                let leaf = h.dev.tensor_from_vec(x0.clone(), (2, shape.numel()));
                let x = if data {
                    Activation::data(&leaf, shape).unwrap()
                } else {
                    Activation::input(&leaf, shape).unwrap()
                };
                let y = layer.forward(x, &mut h.fwd_ctx(Mode::Train)).unwrap();
                let grads: crate::tensor::Grads = y.value.square().sum::<(), _>().backward();
                let params: Vec<Vec<f32>> = layer
                    .named_params()
                    .iter()
                    .map(|(_, p)| grad_or_zeros(&grads, p.value()))
                    .collect();
                (grad_or_zeros(&grads, &leaf), params)
            };
            let (dx_data, params_data) = pass(&mut h, true);
            let (dx, params) = pass(&mut h, false);
            assert!(dx_data.iter().all(|v| *v == 0.0) && dx.iter().any(|v| *v != 0.0));
            assert_eq!(params_data.len(), 2);
            assert_eq!(params_data, params);
        }
    }

    #[test]
    fn bad_geometry_is_an_error() {
        let mut h = Harness::new(0);
        let mut b = h.build_ctx();
        assert!(Conv2dConfig::new(2, 5)
            .build(FeatureShape::image(1, 3, 3), &mut b)
            .is_err());
        assert!(Conv2dConfig::new(2, 3).build(FeatureShape::Flat(9), &mut b).is_err());
        assert!(Conv2dConfig::new(2, 3)
            .with_stride(0)
            .build(FeatureShape::image(1, 3, 3), &mut b)
            .is_err());
        let t = ConvTranspose2dConfig::new(2, 3).with_stride(2).with_output_padding(2);
        assert!(t.build(FeatureShape::image(1, 3, 3), &mut b).is_err());
        let t = ConvTranspose2dConfig::new(2, 1).with_padding(1);
        assert!(t.build(FeatureShape::image(1, 1, 1), &mut b).is_err());
    }

    #[test]
    fn kernels_give_the_same_values_chunk_by_chunk_as_sample_by_sample() {
        let input_and_weight = |g: kernels::Gradients| (g.input.unwrap(), g.weight.unwrap());
        // 64 channels of 18x18 through a 4x4 kernel: 1024 x 225 column values per sample, so a
        // batch of 3 runs as two chunks (two samples, then one); each sample's results must equal
        // its own batch-of-one results, and the weight gradients their sum.
        let mut h = Harness::new(5);
        let g = ConvGeometry::conv(64, 18, 18, 2, 4, 1, 0).unwrap();
        let batch = 3;
        let (x, y, w) = (
            h.values(batch * g.in_len()),
            h.values(batch * g.out_len()),
            h.values(g.weight_len()),
        );
        let close = |what: &str, a: &[f32], b: &[f32]| {
            assert_eq!(a.len(), b.len(), "{what}");
            for (p, q) in a.iter().zip(b) {
                assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{what}: {p} vs {q}");
            }
        };
        let sample = |v: &[f32], len: usize, b: usize| v[b * len..][..len].to_vec();
        let fwd = kernels::conv_forward(&g, batch, &x, &w, None);
        let (dx, dw) = input_and_weight(kernels::conv_backward(&g, batch, &x, &w, &y, kernels::Wanted::ALL));
        let tfwd = kernels::conv_transpose_forward(&g, batch, &y, &w, None);
        let (tdx, tdw) = input_and_weight(kernels::conv_transpose_backward(
            &g,
            batch,
            &y,
            &w,
            &x,
            kernels::Wanted::ALL,
        ));
        let (mut dw_sum, mut tdw_sum) = (vec![0.0f32; w.len()], vec![0.0f32; w.len()]);
        for b in 0..batch {
            let (xb, yb) = (sample(&x, g.in_len(), b), sample(&y, g.out_len(), b));
            close(
                "conv",
                &sample(&fwd, g.out_len(), b),
                &kernels::conv_forward(&g, 1, &xb, &w, None),
            );
            let (dxb, dwb) = input_and_weight(kernels::conv_backward(&g, 1, &xb, &w, &yb, kernels::Wanted::ALL));
            close("conv dx", &sample(&dx, g.in_len(), b), &dxb);
            close(
                "conv_t",
                &sample(&tfwd, g.in_len(), b),
                &kernels::conv_transpose_forward(&g, 1, &yb, &w, None),
            );
            let (tdxb, tdwb) = input_and_weight(kernels::conv_transpose_backward(
                &g,
                1,
                &yb,
                &w,
                &xb,
                kernels::Wanted::ALL,
            ));
            close("conv_t dx", &sample(&tdx, g.out_len(), b), &tdxb);
            for (s, v) in dw_sum.iter_mut().zip(&dwb) {
                *s += v;
            }
            for (s, v) in tdw_sum.iter_mut().zip(&tdwb) {
                *s += v;
            }
        }
        close("conv dw", &dw, &dw_sum);
        close("conv_t dw", &tdw, &tdw_sum);
    }

    /// The microkernels a test can run here: the portable one, and AVX-512's where the CPU has it.
    fn microkernels() -> Vec<implicit_conv::Microkernel> {
        let mut all = vec![implicit_conv::Microkernel::Portable];
        all.extend(implicit_conv::Microkernel::fastest());
        all
    }

    #[test]
    fn implicit_gemm_convolutions_match_the_definitions() {
        let mut h = Harness::new(11);
        // (c_in, h, w, c_out, kernel, stride, padding): the DCGAN's shapes, tiles' edges (rows past
        // 12 and 24, grids past 32 points), kernels smaller than the stride (output phases no tap
        // reaches), paddings past the kernel, one input channel, wide strides. At 3 samples the
        // padded-panel route; at 48 (a whole tile of samples and a half one) the batch-innermost one
        // where its products cover the output; the weight gradient at 32 input channels takes the
        // batch-innermost route at either.
        let shapes = [
            (3, 7, 5, 13, 4, 2, 1),
            (2, 5, 5, 26, 3, 1, 1),
            (1, 9, 7, 5, 5, 2, 0),
            (4, 8, 8, 3, 3, 3, 2),
            (2, 3, 5, 2, 1, 2, 0),
            (3, 2, 2, 25, 2, 1, 3),
            (16, 14, 14, 12, 4, 2, 1),
            (32, 6, 6, 13, 4, 2, 1),
        ];
        for ((c_in, hh, ww, c_out, k, s, p), batch) in shapes.into_iter().flat_map(|g| [(g, 3), (g, 48)]) {
            let g = ConvGeometry::conv(c_in, hh, ww, c_out, k, s, p).unwrap();
            let x = h.values(batch * g.in_len());
            let w = h.values(g.weight_len());
            let bias = h.values(c_out);
            let dy = h.values(batch * g.out_len());
            let start_in = h.values(batch * g.in_len());
            let start_out = h.values(batch * g.out_len());
            let start_w = h.values(g.weight_len());
            let conv = naive_conv(&x, &w, &bias, &g, batch);
            let no_bias = vec![0.0; c_in.max(c_out)];
            // The adjoint of `g` applied to `dy` (weights [c_out, c_in, k, k] as its own); the
            // shapes above have one output padding for both sides, as `naive_conv_t` takes.
            let op = (hh + 2 * p - k) % s;
            let (transposed, ho, wo) =
                naive_conv_t(&dy, &w, &no_bias, (c_out, g.h_out, g.w_out), c_in, (k, s, p, op), batch);
            assert_eq!((ho, wo), (hh, ww));
            // dW[o, c·k·k + t] = Σ_b,pixel dy[b, o, pixel] · im2col(x)[c·k·k + t, b·pixels + pixel].
            let cols = im2col_reference(&g, batch, &x);
            let n = batch * g.out_pixels();
            let mut dw = start_w.clone();
            for o in 0..c_out {
                for (r, row) in cols.chunks_exact(n).enumerate() {
                    let mut sum = 0.0f64;
                    for b in 0..batch {
                        for q in 0..g.out_pixels() {
                            sum += (dy[(b * c_out + o) * g.out_pixels() + q] * row[b * g.out_pixels() + q]) as f64;
                        }
                    }
                    dw[o * g.patch_len() + r] += sum as f32;
                }
            }
            let close = |got: &[f32], want: &[f32], what: &str| {
                assert_eq!(got.len(), want.len());
                for (i, (a, b)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{what} {g:?} at {i}: {a} vs {b}"
                    );
                }
            };
            for kernel in microkernels() {
                let mut y = vec![f32::NAN; batch * g.out_len()];
                kernels::implicit_conv(&g, batch, &x, &w, Some(&bias), &mut y, false, kernel);
                close(&y, &conv, &format!("{kernel:?} convolution"));
                let mut added = start_out.clone();
                kernels::implicit_conv(&g, batch, &x, &w, Some(&bias), &mut added, true, kernel);
                let want: Vec<f32> = start_out.iter().zip(&conv).map(|(a, b)| a + b).collect();
                close(&added, &want, &format!("{kernel:?} convolution added"));
                let mut t = start_in.clone();
                kernels::implicit_conv_transpose(&g, batch, &dy, &w, &mut t, kernel);
                let want: Vec<f32> = start_in.iter().zip(&transposed).map(|(a, b)| a + b).collect();
                close(&t, &want, &format!("{kernel:?} transposed convolution added"));
                let mut grad = start_w.clone();
                kernels::implicit_weight_gradient(&g, batch, &x, &dy, &mut grad, kernel);
                close(&grad, &dw, &format!("{kernel:?} weight gradient added"));
            }
        }
    }

    #[test]
    fn implicit_gemm_convolutions_give_the_same_bits_on_one_thread_and_on_three() {
        // Deep enough for 8 blocks of the weight gradient's contraction rows (3 tasks on 3
        // threads), 2 of its reduction steps, several tiles of grid points and of rows; at 6
        // samples the padded-panel route, at 32 the batch-innermost one.
        for (batch, channels) in [(6, 16), (32, 32)] {
            same_bits_on_one_thread_and_on_three(batch, channels);
        }
    }

    fn same_bits_on_one_thread_and_on_three(batch: usize, channels: usize) {
        let mut h = Harness::new(5);
        let g = ConvGeometry::conv(channels, 14, 14, 40, 4, 2, 1).unwrap();
        let (x, w, dy) = (
            h.values(batch * g.in_len()),
            h.values(g.weight_len()),
            h.values(batch * g.out_len()),
        );
        let (start_in, start_w) = (h.values(batch * g.in_len()), h.values(g.weight_len()));
        for kernel in microkernels() {
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let mut y = vec![0.0; batch * g.out_len()];
                    kernels::implicit_conv(&g, batch, &x, &w, None, &mut y, false, kernel);
                    let mut t = start_in.clone();
                    kernels::implicit_conv_transpose(&g, batch, &dy, &w, &mut t, kernel);
                    let mut dw = start_w.clone();
                    kernels::implicit_weight_gradient(&g, batch, &x, &dy, &mut dw, kernel);
                    [y, t, dw].map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                })
            };
            assert!(run(3) == run(1), "{kernel:?}: the bits depend on the threads");
        }
    }

    #[test]
    fn conv_and_transpose_are_adjoint() {
        // <conv(x), y> == <x, conv_t(y)> for the same geometry and weights (no bias).
        let mut h = Harness::new(3);
        let g = ConvGeometry::conv(2, 5, 4, 3, 3, 2, 1).unwrap();
        let (x, y, w) = (
            h.values(2 * g.in_len()),
            h.values(2 * g.out_len()),
            h.values(g.weight_len()),
        );
        let cx = kernels::conv_forward(&g, 2, &x, &w, None);
        let ty = kernels::conv_transpose_forward(&g, 2, &y, &w, None);
        let a: f64 = cx.iter().zip(&y).map(|(&p, &q)| p as f64 * q as f64).sum();
        let b: f64 = x.iter().zip(&ty).map(|(&p, &q)| p as f64 * q as f64).sum();
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "{a} vs {b}");
    }
}
