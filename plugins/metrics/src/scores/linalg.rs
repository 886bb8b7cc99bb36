//! Dense symmetric linear algebra in f64 for the Fréchet distance: eigen-decomposition and the
//! principal square root of a positive semi-definite matrix.
//!
//! The eigen-decomposition is Householder tridiagonalization followed by the implicit QL algorithm
//! with Wilkinson-style shifts (EISPACK `tred2`/`tql2`, as ported in JAMA's
//! `EigenvalueDecomposition`), not cyclic Jacobi: it costs about 4/3 n³ for the reduction plus
//! O(n²) per eigenvalue (and ~3 n³ more to accumulate eigenvectors), so a 512 x 512 covariance
//! takes a fraction of a second, where Jacobi needs many O(n³) sweeps. Convergence is tested per
//! eigenvalue against `2^-52 · max_l(|d_l| + |e_l|)`, as in the reference. Matrices are row-major
//! `n x n` slices; the input is symmetrized as `(A + Aᵀ) / 2` first, so round-off asymmetry in a
//! computed product does not matter.

/// Eigen-decomposition of a symmetric `n x n` matrix `a` (row-major): returns the eigenvalues in
/// ascending order and the matching orthonormal eigenvectors as the *columns* of a row-major
/// `n x n` matrix `V`, so that `A = V diag(λ) Vᵀ`. Only the symmetric part `(A + Aᵀ) / 2` is used.
///
/// Householder tridiagonalization + implicit QL (see the module docs), not Jacobi.
///
/// # Panics
/// If `a.len() != n * n` (a programming error: every caller builds `a` from a known dimension).
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let (values, vectors) = decompose(a, n, true);
    (values, vectors.expect("eigenvectors were requested"))
}

/// Eigenvalues (ascending) of a symmetric `n x n` matrix, without the cost of accumulating
/// eigenvectors. Same algorithm and conventions as [`symmetric_eigen`].
///
/// # Panics
/// If `a.len() != n * n`.
pub fn symmetric_eigenvalues(a: &[f64], n: usize) -> Vec<f64> {
    decompose(a, n, false).0
}

/// Principal square root of a symmetric positive semi-definite `n x n` matrix: `V diag(√max(λ, 0)) Vᵀ`.
/// Negative eigenvalues (round-off on a singular matrix) are clamped to 0; the result is symmetric.
///
/// # Panics
/// If `a.len() != n * n`.
pub fn sqrtm_psd(a: &[f64], n: usize) -> Vec<f64> {
    let (values, vectors) = symmetric_eigen(a, n);
    let roots: Vec<f64> = values.iter().map(|&l| l.max(0.0).sqrt()).collect();
    // R = V diag(s) Vᵀ, computed as (V diag(s)) Vᵀ with rows of V contiguous.
    let mut scaled = vectors.clone();
    for row in scaled.chunks_exact_mut(n.max(1)) {
        for (x, s) in row.iter_mut().zip(&roots) {
            *x *= s;
        }
    }
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            let v = dot(&scaled[i * n..(i + 1) * n], &vectors[j * n..(j + 1) * n]);
            out[i * n + j] = v;
            out[j * n + i] = v;
        }
    }
    out
}

/// Product `A B` of row-major `n x n` matrices (i-k-j loop order, rows contiguous).
///
/// # Panics
/// If either slice is not `n * n` long.
pub fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(a.len(), n * n, "matmul: left operand is not {n} x {n}");
    assert_eq!(b.len(), n * n, "matmul: right operand is not {n} x {n}");
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        let row = &mut out[i * n..(i + 1) * n];
        for k in 0..n {
            let aik = a[i * n + k];
            if aik == 0.0 {
                continue;
            }
            for (o, &bkj) in row.iter_mut().zip(&b[k * n..(k + 1) * n]) {
                *o += aik * bkj;
            }
        }
    }
    out
}

/// Dot product with eight independent accumulators (vectorizes; the summation order depends only
/// on the length, so results are reproducible, and equal to those of [`fill_dots`]).
pub(crate) fn dot(x: &[f64], y: &[f64]) -> f64 {
    dot_body(x, y)
}

#[inline(always)]
fn reduce(acc: &[f64; 8], tail: f64) -> f64 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline(always)]
fn dot_body(x: &[f64], y: &[f64]) -> f64 {
    debug_assert_eq!(x.len(), y.len());
    let mut acc = [0.0f64; 8];
    let xs = x.chunks_exact(8);
    let ys = y.chunks_exact(8);
    let (xr, yr) = (xs.remainder(), ys.remainder());
    for (xc, yc) in xs.zip(ys) {
        for k in 0..8 {
            acc[k] += xc[k] * yc[k];
        }
    }
    let mut tail = 0.0;
    for (a, b) in xr.iter().zip(yr) {
        tail += a * b;
    }
    reduce(&acc, tail)
}

/// Four dot products of `x` with `y0..y3` at once (loads `x` once); each is computed with exactly
/// the arithmetic of [`dot_body`], so the results are bit-identical to four calls of it.
#[inline(always)]
fn dots4_body(x: &[f64], y: [&[f64]; 4]) -> [f64; 4] {
    let n = x.len();
    let full = n - n % 8;
    let mut acc = [[0.0f64; 8]; 4];
    let mut c = 0;
    while c < full {
        let xc = &x[c..c + 8];
        for (accr, yr) in acc.iter_mut().zip(&y) {
            let yc = &yr[c..c + 8];
            for k in 0..8 {
                accr[k] += xc[k] * yc[k];
            }
        }
        c += 8;
    }
    let mut out = [0.0; 4];
    for (o, (accr, yr)) in out.iter_mut().zip(acc.iter().zip(&y)) {
        let mut tail = 0.0;
        for (a, b) in x[full..].iter().zip(&yr[full..n]) {
            tail += a * b;
        }
        *o = reduce(accr, tail);
    }
    out
}

#[inline(always)]
fn fill_dots_body(x: &[f64], ys: &[f64], dim: usize, out: &mut [f64]) {
    let mut rows = ys.chunks_exact(4 * dim);
    let mut outs = out.chunks_exact_mut(4);
    for (block, o) in (&mut rows).zip(&mut outs) {
        let (y0, rest) = block.split_at(dim);
        let (y1, rest) = rest.split_at(dim);
        let (y2, y3) = rest.split_at(dim);
        o.copy_from_slice(&dots4_body(x, [y0, y1, y2, y3]));
    }
    for (y, o) in rows.remainder().chunks_exact(dim).zip(outs.into_remainder()) {
        *o = dot_body(x, y);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_dots_avx2(x: &[f64], ys: &[f64], dim: usize, out: &mut [f64]) {
    fill_dots_body(x, ys, dim, out)
}

/// `out[j] = x · ys_j` for the consecutive rows `ys_j` (each `dim = x.len()` long) of `ys`, with the
/// arithmetic of [`dot`] (bit-identical results). On x86-64 CPUs with AVX2 the same code is
/// compiled with 256-bit vectors, chosen at run time; the operations and their order are
/// unchanged (Rust never contracts `a * b + c` into a fused multiply-add), so neither are results.
pub(crate) fn fill_dots(x: &[f64], ys: &[f64], out: &mut [f64]) {
    let dim = x.len();
    debug_assert_eq!(ys.len(), dim * out.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { fill_dots_avx2(x, ys, dim, out) };
        return;
    }
    fill_dots_body(x, ys, dim, out)
}

/// `tred2` + `tql2`; eigenvectors (columns, row-major) only when `want_vectors`.
fn decompose(a: &[f64], n: usize, want_vectors: bool) -> (Vec<f64>, Option<Vec<f64>>) {
    assert_eq!(a.len(), n * n, "symmetric eigen-decomposition: matrix is not {n} x {n}");
    if n == 0 {
        return (Vec::new(), want_vectors.then(Vec::new));
    }
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            v[i * n + j] = 0.5 * (a[i * n + j] + a[j * n + i]);
        }
    }
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    tred2(&mut v, &mut d, &mut e, n, want_vectors);
    // tred2 left Vᵀ (eigenvectors as rows); tql2 rotates pairs of them, contiguous.
    let mut rows = if want_vectors { Some(v) } else { None };
    tql2(&mut d, &mut e, rows.as_deref_mut(), n);
    // Sort ascending, moving the eigenvectors along.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[i].total_cmp(&d[j]));
    let values: Vec<f64> = order.iter().map(|&i| d[i]).collect();
    let vectors = rows.map(|rows| {
        let mut out = vec![0.0; n * n];
        for (col, &src) in order.iter().enumerate() {
            for r in 0..n {
                out[r * n + col] = rows[src * n + r];
            }
        }
        out
    });
    (values, vectors)
}

/// Householder reduction of the symmetric matrix in `v` to tridiagonal form: diagonal in `d`,
/// sub-diagonal in `e[1..]`; `v` receives the transpose of the orthogonal transformation when
/// `accumulate`. (EISPACK `tred2`, after JAMA.)
#[allow(clippy::needless_range_loop)]
fn tred2(v: &mut [f64], d: &mut [f64], e: &mut [f64], n: usize, accumulate: bool) {
    // The working matrix is stored transposed (element (i, j) at j * n + i): the input is symmetric,
    // so this is the same array, and the reference's inner loops, which run down columns, become
    // contiguous. The accumulated transformation thus comes out as Vᵀ: eigenvectors as rows.
    let ix = |i: usize, j: usize| j * n + i;
    for j in 0..n {
        d[j] = v[ix(n - 1, j)];
    }
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|x| x.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[ix(i - 1, j)];
                v[ix(i, j)] = 0.0;
                v[ix(j, i)] = 0.0;
            }
        } else {
            for k in 0..i {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for j in 0..i {
                e[j] = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[ix(j, i)] = f;
                g = e[j] + v[ix(j, j)] * f;
                for k in j + 1..i {
                    g += v[ix(k, j)] * d[k];
                    e[k] += v[ix(k, j)] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[ix(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[ix(i - 1, j)];
                v[ix(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    if accumulate {
        for i in 0..n - 1 {
            v[ix(n - 1, i)] = v[ix(i, i)];
            v[ix(i, i)] = 1.0;
            let h = d[i + 1];
            if h != 0.0 {
                for k in 0..=i {
                    d[k] = v[ix(k, i + 1)] / h;
                }
                for j in 0..=i {
                    let mut g = 0.0;
                    for k in 0..=i {
                        g += v[ix(k, i + 1)] * v[ix(k, j)];
                    }
                    for k in 0..=i {
                        v[ix(k, j)] -= g * d[k];
                    }
                }
            }
            for k in 0..=i {
                v[ix(k, i + 1)] = 0.0;
            }
        }
        for j in 0..n {
            d[j] = v[ix(n - 1, j)];
            v[ix(n - 1, j)] = 0.0;
        }
        v[ix(n - 1, n - 1)] = 1.0;
    } else {
        // Without accumulation the diagonal still has to be read back: the reduction leaves it on
        // the diagonal of the working matrix.
        for i in 0..n {
            d[i] = v[ix(i, i)];
        }
    }
    e[0] = 0.0;
}

/// Implicit QL iterations on the tridiagonal matrix (`d`, `e`), rotating the rows of `z`
/// (eigenvectors stored as rows) when given. (EISPACK `tql2`, after JAMA.) Eigenvalues come out
/// unsorted in `d`.
fn tql2(d: &mut [f64], e: &mut [f64], mut z: Option<&mut [f64]>, n: usize) {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n {
            if e[m].abs() <= eps * tst1 {
                break;
            }
            m += 1;
        }
        // e[n - 1] == 0, so m < n always; guard anyway against NaN input.
        let m = m.min(n - 1);
        if m > l {
            // The reference converges in a handful of iterations; the cap only guards against
            // non-finite input looping forever.
            for _ in 0..64 * n.max(1) {
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().take(n).skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    if let Some(z) = z.as_deref_mut() {
                        let (head, tail) = z.split_at_mut((i + 1) * n);
                        let zi = &mut head[i * n..];
                        let zi1 = &mut tail[..n];
                        for (a, b) in zi.iter_mut().zip(zi1.iter_mut()) {
                            let hb = *b;
                            *b = s * *a + c * hb;
                            *a = c * *a - s * hb;
                        }
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 || !e[l].is_finite() {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nash_core::rand::{Rng as _, SeedableRng};

    fn random_spd(n: usize, rng: &mut nash_core::tensor::Rng) -> Vec<f64> {
        // B Bᵀ + 0.1 I: symmetric positive definite.
        let b: Vec<f64> = (0..n * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = dot(&b[i * n..(i + 1) * n], &b[j * n..(j + 1) * n]) + if i == j { 0.1 } else { 0.0 };
            }
        }
        a
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    fn transpose_of(m: &[f64], n: usize) -> Vec<f64> {
        let mut t = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                t[j * n + i] = m[i * n + j];
            }
        }
        t
    }

    #[test]
    fn eigen_reconstructs_random_symmetric_matrices_with_orthonormal_vectors() {
        let mut rng = nash_core::tensor::Rng::seed_from_u64(7);
        for n in [1, 2, 3, 7, 40, 65] {
            let m: Vec<f64> = (0..n * n).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let sym: Vec<f64> = (0..n * n).map(|k| 0.5 * (m[k] + m[(k % n) * n + k / n])).collect();
            let (values, v) = symmetric_eigen(&sym, n);
            assert!(values.windows(2).all(|w| w[0] <= w[1]), "not ascending: {values:?}");
            let vt = transpose_of(&v, n);
            let mut identity = vec![0.0; n * n];
            for i in 0..n {
                identity[i * n + i] = 1.0;
            }
            assert!(
                max_abs_diff(&matmul(&vt, &v, n), &identity,) < 1e-12,
                "n = {n}: VᵀV != I"
            );
            let mut scaled = v.clone();
            for row in scaled.chunks_exact_mut(n) {
                for (x, l) in row.iter_mut().zip(&values) {
                    *x *= l;
                }
            }
            let back = matmul(&scaled, &vt, n);
            assert!(max_abs_diff(&back, &sym) < 1e-11 * n as f64, "n = {n}: V Λ Vᵀ != A");
            // The eigenvalue-only path agrees.
            let only = symmetric_eigenvalues(&sym, n);
            assert!(max_abs_diff(&only, &values) < 1e-11 * n as f64, "n = {n}");
        }
    }

    #[test]
    fn known_eigenvalues_by_hand() {
        // [[2, 1], [1, 2]]: λ = 1 with (1, -1)/√2, λ = 3 with (1, 1)/√2.
        let (values, v) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        assert!(max_abs_diff(&values, &[1.0, 3.0]) < 1e-14, "{values:?}");
        let h = std::f64::consts::FRAC_1_SQRT_2;
        // Columns up to sign.
        assert!(
            (v[0].abs() - h).abs() < 1e-14 && (v[0] * v[2] + 0.5).abs() < 1e-14,
            "{v:?}"
        );
        assert!(
            (v[1].abs() - h).abs() < 1e-14 && (v[1] * v[3] - 0.5).abs() < 1e-14,
            "{v:?}"
        );
        // Tridiagonal Toeplitz [[2,-1,0],[-1,2,-1],[0,-1,2]]: 2 - 2cos(kπ/4) = 2 - √2, 2, 2 + √2.
        let t = [2.0, -1.0, 0.0, -1.0, 2.0, -1.0, 0.0, -1.0, 2.0];
        let s = std::f64::consts::SQRT_2;
        assert!(max_abs_diff(&symmetric_eigenvalues(&t, 3), &[2.0 - s, 2.0, 2.0 + s]) < 1e-14);
        // Repeated eigenvalues and already-diagonal input.
        let repeated = symmetric_eigenvalues(&[3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 3.0], 3);
        assert!(max_abs_diff(&repeated, &[1.0, 3.0, 3.0]) < 1e-14, "{repeated:?}");
        assert_eq!(
            symmetric_eigen(&[0.0; 4], 2),
            (vec![0.0, 0.0], vec![1.0, 0.0, 0.0, 1.0])
        );
        assert_eq!(symmetric_eigen(&[], 0), (vec![], vec![]));
    }

    #[test]
    fn sqrtm_squares_back_to_random_spd_matrices() {
        let mut rng = nash_core::tensor::Rng::seed_from_u64(3);
        for n in [1, 2, 7, 40] {
            let a = random_spd(n, &mut rng);
            let r = sqrtm_psd(&a, n);
            assert_eq!(r, transpose_of(&r, n), "n = {n}: root not symmetric");
            let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(
                max_abs_diff(&matmul(&r, &r, n), &a) < 1e-12 * scale * n as f64,
                "n = {n}"
            );
            // Principal root: positive definite (all eigenvalues > 0).
            assert!(symmetric_eigenvalues(&r, n)[0] > 0.0);
        }
    }

    #[test]
    fn sqrtm_of_singular_psd_matrices() {
        // Rank one: (u uᵀ)^½ = u uᵀ / ‖u‖. u = (3, 4): ‖u‖ = 5.
        let a = [9.0, 12.0, 12.0, 16.0];
        // The zero eigenvalue comes out as ±ε‖A‖ ≈ 1e-15, whose square root is ≈ 3e-8: the root of a
        // singular matrix is only accurate to about √ε (scipy's sqrtm behaves alike).
        let r = sqrtm_psd(&a, 2);
        assert!(
            max_abs_diff(&r, &[9.0 / 5.0, 12.0 / 5.0, 12.0 / 5.0, 16.0 / 5.0]) < 1e-7,
            "{r:?}"
        );
        assert_eq!(sqrtm_psd(&[0.0; 9], 3), vec![0.0; 9]);
        // diag(4, 0, 9)^½ = diag(2, 0, 3).
        let d = sqrtm_psd(&[4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0], 3);
        assert!(max_abs_diff(&d, &[2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]) < 1e-14);
    }
}
