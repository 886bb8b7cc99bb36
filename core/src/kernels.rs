//! Host compute kernels that the layers' custom tape ops share: the matrix product, and a
//! vectorized sum of squares.
//!
//! [`matmul`] calls gemm 0.19, which picks the widest instruction set the CPU has at run time
//! (AVX-512 through its `x86-v4` feature, AVX2/FMA, or portable code), reads transposed operands
//! through strides instead of copying them, and can accumulate into its destination, so a
//! backward pass adds its products straight into gradient buffers. dfdx 0.13's own matmul uses
//! gemm 0.15 (no AVX-512 on stable: ~82 against ~219 GFLOP/s per core measured here, DESIGN.md).
//! It runs on the rayon pool that `training.threads` sizes.

use dfdx::prelude::*;

use crate::tensor::Device;

/// The values of a contiguous tensor in logical order: a plain copy, unlike the strided iterator
/// of `as_vec` (dfdx lends no borrowed slice of a tensor's data).
pub fn host<S: Shape, T>(t: &Tensor<S, f32, Device, T>) -> Vec<f32> {
    let mut out = vec![0.0; t.shape().num_elements()];
    t.copy_into(&mut out);
    out
}

/// `Σ x²` in f64 over eight independent accumulators, so that the sum vectorizes (one f64
/// accumulator would serialize every addition on its latency).
pub fn sum_of_squares(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += (x as f64) * (x as f64);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Products smaller than this many multiply-adds run on the calling thread: below it, waking the
/// pool costs more than the product.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `c = op(a)·op(b)`, or `c += op(a)·op(b)` with `accumulate`, for row-major `f32` matrices:
/// `op(a)` is `[m, k]` (stored `[k, m]` when `transpose_a`), `op(b)` is `[k, n]` (stored `[n, k]`
/// when `transpose_b`) and `c` is `[m, n]`.
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
    // gemm's strides: element (i, j) of an operand lives at `i * rs + j * cs`.
    let (a_rs, a_cs) = if transpose_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if transpose_b { (1, k) } else { (n, 1) };
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * k * n >= PARALLEL_MIN_WORK {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert above keeps every index `i * rs + j * cs` of each operand in bounds
    // (row-major `[m, k]` / `[k, m]` for `a`, `[k, n]` / `[n, k]` for `b`, `[m, n]` for `c`), and
    // `c` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_sum_of_squares_matches_a_sequential_f64_sum() {
        for n in [0, 1, 7, 8, 9, 1000, 1003] {
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
    fn matches_the_triple_loop_for_every_transpose_and_accumulates() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 2), (17, 33, 9), (64, 70, 130)] {
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
    fn an_empty_inner_dimension_gives_zeros_or_leaves_the_sum() {
        let mut c = vec![3.0; 4];
        matmul((2, 0, 2), &[], false, &[], false, &mut c, true);
        assert_eq!(c, [3.0; 4]);
        matmul((2, 0, 2), &[], false, &[], false, &mut c, false);
        assert_eq!(c, [0.0; 4]);
    }
}
