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
    let len = rows * cols;
    assert!(
        src.len() >= len && dst.len() >= len,
        "transpose of [{rows}, {cols}]: {} source and {} destination values",
        src.len(),
        dst.len()
    );
    let (src, dst) = (&src[..len], &mut dst[..len]);
    #[cfg(target_arch = "x86_64")]
    if super::wide_vectors::avx2() {
        // SAFETY: the CPU has AVX (checked at run time); both slices hold `rows·cols` values.
        unsafe { avx::full_tiles(src, (rows, cols), dst, add) };
        edges(src, (rows, cols), dst, add);
        return;
    }
    portable_full_tiles(src, (rows, cols), dst, add);
    edges(src, (rows, cols), dst, add);
}

/// Element `(r, c)` of `src` into `dst`.
#[inline(always)]
fn move_one(src: &[f32], (rows, cols): (usize, usize), dst: &mut [f32], add: bool, (r, c): (usize, usize)) {
    let value = src[r * cols + c];
    let out = &mut dst[c * rows + r];
    if add {
        *out += value;
    } else {
        *out = value;
    }
}

/// The columns past the last full tile, then the rows past it.
fn edges(src: &[f32], shape: (usize, usize), dst: &mut [f32], add: bool) {
    let (rows, cols) = shape;
    let (full_rows, full_cols) = (rows / TILE * TILE, cols / TILE * TILE);
    for r in 0..rows {
        for c in full_cols..cols {
            move_one(src, shape, dst, add, (r, c));
        }
    }
    for r in full_rows..rows {
        for c in 0..full_cols {
            move_one(src, shape, dst, add, (r, c));
        }
    }
}

/// The full tiles, element by element.
fn portable_full_tiles(src: &[f32], shape: (usize, usize), dst: &mut [f32], add: bool) {
    let (rows, cols) = shape;
    for r0 in (0..rows / TILE * TILE).step_by(TILE) {
        for c0 in (0..cols / TILE * TILE).step_by(TILE) {
            for r in r0..r0 + TILE {
                for c in c0..c0 + TILE {
                    move_one(src, shape, dst, add, (r, c));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::TILE;

    /// The full tiles: eight rows loaded, transposed in registers (unpack, shuffle, permute),
    /// stored as eight columns.
    ///
    /// # Safety
    /// The CPU must have AVX, and both slices must hold `rows·cols` values.
    #[target_feature(enable = "avx")]
    pub unsafe fn full_tiles(src: &[f32], (rows, cols): (usize, usize), dst: &mut [f32], add: bool) {
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for r0 in (0..rows / TILE * TILE).step_by(TILE) {
            for c0 in (0..cols / TILE * TILE).step_by(TILE) {
                // SAFETY (every access below): rows r0..r0+8 and columns c0..c0+8 lie inside the
                // `[rows, cols]` source, and their transposes inside the `[cols, rows]` destination.
                let row = |i: usize| _mm256_loadu_ps(s.add((r0 + i) * cols + c0));
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
                    let out = d.add((c0 + i) * rows + r0);
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
    fn transposes_and_adds_every_shape_around_the_tiles() {
        for (rows, cols) in [(1, 1), (3, 5), (8, 8), (9, 17), (16, 7), (64, 100), (23, 64)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
            let want = |r: usize, c: usize| src[r * cols + c];
            let mut dst = vec![f32::NAN; rows * cols];
            transpose_into(&src, (rows, cols), &mut dst, false);
            let mut portable = vec![f32::NAN; rows * cols];
            portable_full_tiles(&src, (rows, cols), &mut portable, false);
            edges(&src, (rows, cols), &mut portable, false);
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
