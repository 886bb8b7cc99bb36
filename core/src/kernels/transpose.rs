//! Transposition of row-major `f32` matrices, in tiles of 8x8 (AVX registers where the CPU has
//! them): [`super::matmul`] transposes the small operand and the result of a product whose large
//! operand gemm would otherwise have to gather column by column.

/// Side of the square tiles the matrix is transposed in.
const TILE: usize = 8;

/// Writes the transpose of the row-major `[rows, cols]` matrix `src` into `dst` (row-major
/// `[cols, rows]`: `dst[c·rows + r] = src[r·cols + c]`), or adds it to `dst` when `add`.
///
/// # Panics
/// When `src` or `dst` holds fewer than `rows·cols` values (a bug in the calling kernel).
pub fn transpose_into(src: &[f32], (rows, cols): (usize, usize), dst: &mut [f32], add: bool) {
    transpose_strided(Strided(src, cols), (rows, cols), StridedMut(dst, rows), add);
}

/// A matrix inside a slice whose rows start `.1` values apart.
#[derive(Clone, Copy)]
pub struct Strided<'a>(pub &'a [f32], pub usize);

/// A mutable matrix inside a slice whose rows start `.1` values apart.
pub struct StridedMut<'a>(pub &'a mut [f32], pub usize);

/// [`transpose_into`] between matrices at row strides of their own: `dst[c·dst_stride + r] =
/// src[r·src_stride + c]` (or `+=` when `add`) for the `[rows, cols]` source; the values between
/// the rows are not touched.
///
/// # Panics
/// When a row is wider than its stride or runs past its slice (a bug in the calling kernel).
pub fn transpose_strided(src: Strided<'_>, (rows, cols): (usize, usize), dst: StridedMut<'_>, add: bool) {
    let StridedMut(dst, dst_stride) = dst;
    let shape = Shape::checked(src, (rows, cols), (dst.len(), dst_stride));
    // SAFETY: `checked` asserted that the destination matrix lies inside `dst`, borrowed mutably.
    unsafe { transpose_raw(src.0, shape, dst.as_mut_ptr(), add) }
}

/// [`transpose_strided`] into memory not yet initialized: every value of the destination matrix is
/// written, none read.
///
/// # Panics
/// As [`transpose_strided`].
pub fn transpose_strided_uninit(
    src: Strided<'_>,
    (rows, cols): (usize, usize),
    dst: &mut [std::mem::MaybeUninit<f32>],
    dst_stride: usize,
) {
    let shape = Shape::checked(src, (rows, cols), (dst.len(), dst_stride));
    // SAFETY: as in `transpose_strided`; without `add` nothing is read from the destination.
    unsafe { transpose_raw(src.0, shape, dst.as_mut_ptr().cast(), false) }
}

/// The transposition of `shape` into `dst`.
///
/// # Safety
/// `dst` must be valid for writes (and reads, with `add`) of the destination matrix, and no one
/// else may touch it during the call; `src` must hold the source matrix.
unsafe fn transpose_raw(src: &[f32], shape: Shape, dst: *mut f32, add: bool) {
    #[cfg(target_arch = "x86_64")]
    if super::wide_vectors::avx2() {
        // SAFETY: the CPU has AVX (checked at run time); the matrices are the caller's.
        unsafe {
            avx::full_tiles(src, shape, dst, add);
            edges(src, shape, dst, add);
        }
        return;
    }
    // SAFETY: as this function's.
    unsafe {
        portable_full_tiles(src, shape, dst, add);
        edges(src, shape, dst, add);
    }
}

/// A transposition's sizes and row strides.
#[derive(Clone, Copy)]
struct Shape {
    rows: usize,
    cols: usize,
    src_stride: usize,
    dst_stride: usize,
}

impl Shape {
    /// The shape of a transposition of `src`'s `[rows, cols]` into `dst_len` values at
    /// `dst_stride`, checked to lie inside both.
    ///
    /// # Panics
    /// When a row is wider than its stride or runs past its slice.
    fn checked(src: Strided<'_>, (rows, cols): (usize, usize), (dst_len, dst_stride): (usize, usize)) -> Shape {
        let Strided(src, src_stride) = src;
        // `n` rows of `width` values, `stride` apart, inside `len` values (rows may overlap only
        // when there is one of them).
        let fits = |n: usize, stride: usize, width: usize, len: usize| {
            n == 0 || width == 0 || ((width <= stride || n == 1) && (n - 1) * stride + width <= len)
        };
        assert!(
            fits(rows, src_stride, cols, src.len()) && fits(cols, dst_stride, rows, dst_len),
            "transpose of [{rows}, {cols}] at strides {src_stride} -> {dst_stride}: {} source and {dst_len} \
             destination values",
            src.len(),
        );
        Shape {
            rows,
            cols,
            src_stride,
            dst_stride,
        }
    }
}

/// Element `(r, c)` of `src` into `dst`.
///
/// # Safety
/// As [`transpose_raw`]'s, for this element.
#[inline(always)]
unsafe fn move_one(src: &[f32], shape: Shape, dst: *mut f32, add: bool, (r, c): (usize, usize)) {
    let value = src[r * shape.src_stride + c];
    // SAFETY: element `(c, r)` of the destination matrix (the caller's).
    unsafe {
        let out = dst.add(c * shape.dst_stride + r);
        *out = if add { *out + value } else { value };
    }
}

/// The columns past the last full tile, then the rows past it.
///
/// # Safety
/// As [`transpose_raw`]'s.
unsafe fn edges(src: &[f32], shape: Shape, dst: *mut f32, add: bool) {
    let Shape { rows, cols, .. } = shape;
    let (full_rows, full_cols) = (rows / TILE * TILE, cols / TILE * TILE);
    for r in 0..rows {
        for c in full_cols..cols {
            // SAFETY: as this function's.
            unsafe { move_one(src, shape, dst, add, (r, c)) };
        }
    }
    for r in full_rows..rows {
        for c in 0..full_cols {
            // SAFETY: as this function's.
            unsafe { move_one(src, shape, dst, add, (r, c)) };
        }
    }
}

/// The full tiles, element by element.
///
/// # Safety
/// As [`transpose_raw`]'s.
unsafe fn portable_full_tiles(src: &[f32], shape: Shape, dst: *mut f32, add: bool) {
    let Shape { rows, cols, .. } = shape;
    for r0 in (0..rows / TILE * TILE).step_by(TILE) {
        for c0 in (0..cols / TILE * TILE).step_by(TILE) {
            for r in r0..r0 + TILE {
                for c in c0..c0 + TILE {
                    // SAFETY: as this function's.
                    unsafe { move_one(src, shape, dst, add, (r, c)) };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{Shape, TILE};

    /// The full tiles: eight rows loaded, transposed in registers (unpack, shuffle, permute),
    /// stored as eight columns.
    ///
    /// # Safety
    /// The CPU must have AVX; `src` must hold its matrix and `dst` be the caller's to write (and
    /// read, with `add`) the destination matrix (`shape`).
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn full_tiles(src: &[f32], shape: Shape, dst: *mut f32, add: bool) {
        let Shape {
            rows,
            cols,
            src_stride,
            dst_stride,
        } = shape;
        let (s, d) = (src.as_ptr(), dst);
        for r0 in (0..rows / TILE * TILE).step_by(TILE) {
            for c0 in (0..cols / TILE * TILE).step_by(TILE) {
                // SAFETY (every access below): rows r0..r0+8 and columns c0..c0+8 lie inside the
                // `[rows, cols]` source, and their transposes inside the `[cols, rows]` destination.
                let row = |i: usize| _mm256_loadu_ps(s.add((r0 + i) * src_stride + c0));
                let (a0, a1, a2, a3) = (row(0), row(1), row(2), row(3));
                let (a4, a5, a6, a7) = (row(4), row(5), row(6), row(7));
                // Pairs of rows interleaved, then quadruples, then the 128-bit halves swapped.
                let (t0, t1) = (_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
                let (t2, t3) = (_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
                let (t4, t5) = (_mm256_unpacklo_ps(a4, a5), _mm256_unpackhi_ps(a4, a5));
                let (t6, t7) = (_mm256_unpacklo_ps(a6, a7), _mm256_unpackhi_ps(a6, a7));
                let (u0, u1) = (_mm256_shuffle_ps::<0x44>(t0, t2), _mm256_shuffle_ps::<0xEE>(t0, t2));
                let (u2, u3) = (_mm256_shuffle_ps::<0x44>(t1, t3), _mm256_shuffle_ps::<0xEE>(t1, t3));
                let (u4, u5) = (_mm256_shuffle_ps::<0x44>(t4, t6), _mm256_shuffle_ps::<0xEE>(t4, t6));
                let (u6, u7) = (_mm256_shuffle_ps::<0x44>(t5, t7), _mm256_shuffle_ps::<0xEE>(t5, t7));
                let columns = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (i, column) in columns.into_iter().enumerate() {
                    let out = d.add((c0 + i) * dst_stride + r0);
                    let column = if add {
                        _mm256_add_ps(_mm256_loadu_ps(out), column)
                    } else {
                        column
                    };
                    _mm256_storeu_ps(out, column);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_between_strided_matrices_and_leaves_the_gaps() {
        for (rows, cols, src_stride, dst_stride) in [(1, 1, 1, 1), (9, 17, 20, 11), (16, 8, 8, 16), (23, 64, 70, 30)] {
            let src: Vec<f32> = (0..rows * src_stride).map(|i| i as f32 * 0.25 - 7.0).collect();
            let len = (cols - 1) * dst_stride + rows + 3;
            for add in [false, true] {
                let mut dst = vec![1.5f32; len];
                transpose_strided(
                    Strided(&src, src_stride),
                    (rows, cols),
                    StridedMut(&mut dst, dst_stride),
                    add,
                );
                let mut uninit = vec![std::mem::MaybeUninit::new(1.5f32); len];
                if !add {
                    transpose_strided_uninit(Strided(&src, src_stride), (rows, cols), &mut uninit, dst_stride);
                }
                for (i, &got) in dst.iter().enumerate() {
                    let (c, r) = (i / dst_stride, i % dst_stride);
                    let want = if c < cols && r < rows {
                        src[r * src_stride + c] + if add { 1.5 } else { 0.0 }
                    } else {
                        1.5
                    };
                    assert_eq!(
                        got, want,
                        "[{rows}, {cols}] {src_stride} -> {dst_stride} at {i}, add {add}"
                    );
                    if !add {
                        // SAFETY: every value was initialised (to 1.5, then by the transposition).
                        assert_eq!(unsafe { uninit[i].assume_init() }, want);
                    }
                }
            }
        }
    }

    #[test]
    fn transposes_and_adds_every_shape_around_the_tiles() {
        for (rows, cols) in [(1, 1), (3, 5), (8, 8), (9, 17), (16, 7), (64, 100), (23, 64)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
            let want = |r: usize, c: usize| src[r * cols + c];
            let mut dst = vec![f32::NAN; rows * cols];
            transpose_into(&src, (rows, cols), &mut dst, false);
            let mut portable = vec![f32::NAN; rows * cols];
            let shape = Shape {
                rows,
                cols,
                src_stride: cols,
                dst_stride: rows,
            };
            // SAFETY: `portable` holds the `[cols, rows]` destination.
            unsafe {
                portable_full_tiles(&src, shape, portable.as_mut_ptr(), false);
                edges(&src, shape, portable.as_mut_ptr(), false);
            }
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r], want(r, c), "[{rows}, {cols}] at ({r}, {c})");
                    assert_eq!(
                        portable[c * rows + r],
                        want(r, c),
                        "portable [{rows}, {cols}] at ({r}, {c})"
                    );
                }
            }
            transpose_into(&src, (rows, cols), &mut dst, true);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        2.0 * want(r, c),
                        "added [{rows}, {cols}] at ({r}, {c})"
                    );
                }
            }
        }
    }
}
