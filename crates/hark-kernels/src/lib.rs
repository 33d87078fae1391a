//! hark's hand-written CPU kernels. They live in their own crate so that the dev
//! profile can optimise them (`[profile.dev.package.hark-kernels]`): at `opt-level = 0`
//! every SIMD intrinsic is a function call and the test suite's model runs ~30× slower.

use rayon::prelude::*;

/// Weight rows per parallel task: enough work per task that rayon's scheduling is
/// noise, and enough tasks (256 on a 262,144-row LM head) to balance the threads.
const ROWS_PER_TASK: usize = 1024;

/// `x [m, k] · w [n, k]ᵀ`, returned by weight row: `out[j * m + i] = x_i · w_j`.
///
/// Meant for a few rows of `x` (a decode step: one per sequence): each weight row is
/// streamed from memory once and multiplied with every input row while it sits in L1,
/// so `m` rows cost far less than `m` matrix–vector products. Every output is summed in
/// the same order whatever `m` and the thread count, so a row's result does not depend
/// on the rows beside it.
///
/// Panics when the slices are shorter than `m * k` and `n * k`.
pub fn matmul_t_by_row(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert!(x.len() >= m * k && w.len() >= n * k, "matmul_t_by_row: slices shorter than their shapes");
    let mut out = vec![0f32; n * m];
    if m == 0 || k == 0 {
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, out)| {
        let first = task * ROWS_PER_TASK;
        let rows = &w[first * k..(first + out.len() / m) * k];
        dot_rows(&x[..m * k], m, k, rows, out);
    });
    out
}

/// `out[j * m + i] = x_i · w_j` for every weight row `w_j` in `rows`.
fn dot_rows(x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            unsafe { avx2::dot_rows(x, m, k, rows, out) };
            return;
        }
    }
    for (w, out) in rows.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        for (xi, o) in x.chunks_exact(k).zip(out.iter_mut()) {
            *o = dot_portable(xi, w);
        }
    }
}

/// Every output's summation order, on every path: 8 lanes, each accumulating every
/// 8th product in order with fused multiply-adds; the lanes added pairwise; then the
/// products past the last whole 8 in order.
fn reduce_lanes(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (a, b) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] = a[l].mul_add(b[l], acc[l]);
        }
    }
    let mut total = reduce_lanes(acc);
    for (a, b) in ar.iter().zip(br) {
        total = a.mul_add(*b, total);
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::reduce_lanes;

    /// Tiles of up to 4 weight rows × 2 input rows: per 8 columns, 6 loads feed 8
    /// fused multiply-adds on 8 independent accumulators (enough to hide the FMA
    /// latency), and a tile's weight rows stay in L1 while every input pair passes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_rows(x: &[f32], m: usize, k: usize, rows: &[f32], out: &mut [f32]) {
        let n = rows.len() / k;
        assert!(x.len() >= m * k && out.len() >= n * m, "dot_rows: slices shorter than their shapes");
        let mut j = 0;
        // One input row: 8 weight rows per tile, for 8 independent accumulators.
        while m == 1 && j + 8 <= n {
            let mut sums = [[0f32; 1]; 8];
            tile::<8, 1, 1, 8>(&rows[j * k..(j + 8) * k], x, k, &mut sums);
            for (dr, v) in sums.iter().enumerate() {
                out[j + dr] = v[0];
            }
            j += 8;
        }
        while j < n {
            let r = (n - j).min(4);
            let mut i = 0;
            while i < m {
                let c = (m - i).min(2);
                let (w, xs) = (&rows[j * k..(j + r) * k], &x[i * k..(i + c) * k]);
                let mut sums = [[0f32; 2]; 4];
                match (r, c) {
                    (4, 2) => tile::<4, 2, 2, 4>(w, xs, k, &mut sums),
                    (4, _) => tile::<4, 1, 2, 4>(w, xs, k, &mut sums),
                    (3, 2) => tile::<3, 2, 2, 4>(w, xs, k, &mut sums),
                    (3, _) => tile::<3, 1, 2, 4>(w, xs, k, &mut sums),
                    (2, 2) => tile::<2, 2, 2, 4>(w, xs, k, &mut sums),
                    (2, _) => tile::<2, 1, 2, 4>(w, xs, k, &mut sums),
                    (_, 2) => tile::<1, 2, 2, 4>(w, xs, k, &mut sums),
                    _ => tile::<1, 1, 2, 4>(w, xs, k, &mut sums),
                }
                for (dr, row) in sums.iter().enumerate().take(r) {
                    for (dc, v) in row.iter().enumerate().take(c) {
                        out[(j + dr) * m + i + dc] = *v;
                    }
                }
                i += c;
            }
            j += r;
        }
    }

    /// `sums[r][c] = w_r · x_c` for `R` weight rows and `C` input rows of length `k`.
    #[inline(always)]
    fn tile<const R: usize, const C: usize, const SC: usize, const SR: usize>(w: &[f32], x: &[f32], k: usize, sums: &mut [[f32; SC]; SR]) {
        let whole = k / 8 * 8;
        // SAFETY: avx2 and fma are enabled in the caller, the only one; every load
        // reads 8 floats at `row * k + p` with `p + 8 <= whole <= k`, inside `w`
        // (R rows) or `x` (C rows), as the caller sliced them.
        unsafe {
            let (pw, px) = (w.as_ptr(), x.as_ptr());
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut p = 0;
            while p < whole {
                let mut wv = [_mm256_setzero_ps(); R];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(pw.add(r * k + p));
                }
                for c in 0..C {
                    let xv = _mm256_loadu_ps(px.add(c * k + p));
                    for r in 0..R {
                        acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
                    }
                }
                p += 8;
            }
            for r in 0..R {
                for c in 0..C {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][c]);
                    let mut total = reduce_lanes(lanes);
                    for q in whole..k {
                        total = w[r * k + q].mul_add(x[c * k + q], total);
                    }
                    sums[r][c] = total;
                }
            }
        }
    }
}

