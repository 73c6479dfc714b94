//! The CPU reference's inner loops (dot products, blocked GEMMs), written so the compiler vectorizes
//! them, and compiled twice on x86-64: once for the baseline target and once with AVX2 + FMA,
//! picked at run time. Lane-wise partial sums make the f32 reductions vectorizable; the result
//! depends only on the machine's feature set, so runs on one machine stay deterministic.

const LANES: usize = 16;

#[inline(always)]
fn dot_i8_body(a: &[i8], b: &[i8]) -> i32 {
    let mut acc = [0i32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] as i16 as i32 * y[i] as i16 as i32;
        }
    }
    let tail: i32 = ra.iter().zip(rb).map(|(x, y)| *x as i32 * *y as i32).sum();
    acc.iter().sum::<i32>() + tail
}

#[inline(always)]
fn dot_f32_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident, $avx:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx($($arg: $ty),*) -> $ret {
            $body($($arg),*)
        }

        $(#[$doc])*
        #[inline]
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU was just checked for AVX2 and FMA.
                return unsafe { $avx($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

/// Σ a·b over two int8 vectors (exact in i32 for k < 2^17).
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU was just checked for AVX2.
        return unsafe { dot_i8_avx2(a, b) };
    }
    dot_i8_body(a, b)
}

/// 16 int8 pairs per step: sign-extend to i16 and multiply-add adjacent pairs into i32
/// (`vpmaddwd`, exact: |a·b + c·d| ≤ 2·127²), which the compiler does not find on its own.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_si256();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 ≤ n, so both 16-byte loads are in bounds (unaligned loads).
        let (va, vb) = unsafe {
            (
                _mm_loadu_si128(a.as_ptr().add(i) as *const __m128i),
                _mm_loadu_si128(b.as_ptr().add(i) as *const __m128i),
            )
        };
        let p = _mm256_madd_epi16(_mm256_cvtepi8_epi16(va), _mm256_cvtepi8_epi16(vb));
        acc = _mm256_add_epi32(acc, p);
        i += 16;
    }
    let mut lanes = [0i32; 8];
    // SAFETY: lanes is 32 bytes, an unaligned store.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc) };
    let tail: i32 = a[i..n]
        .iter()
        .zip(&b[i..n])
        .map(|(x, y)| *x as i32 * *y as i32)
        .sum();
    lanes.iter().sum::<i32>() + tail
}
dispatch!(
    /// Σ a·b in f32 with 16 partial sums.
    dot_f32, dot_f32_avx2, dot_f32_body, (a: &[f32], b: &[f32]) -> f32
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn kernels_match_plain_loops_at_odd_lengths() {
        let mut rng = Rng::new(4);
        for n in [0usize, 1, 15, 16, 17, 100, 577] {
            let a: Vec<i8> = (0..n)
                .map(|_| (rng.below(255) as i32 - 127) as i8)
                .collect();
            let b: Vec<i8> = (0..n)
                .map(|_| (rng.below(255) as i32 - 127) as i8)
                .collect();
            let want: i64 = a.iter().zip(&b).map(|(x, y)| *x as i64 * *y as i64).sum();
            assert_eq!(dot_i8(&a, &b) as i64, want, "dot_i8 n={n}");
            let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let y: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let want: f64 = x.iter().zip(&y).map(|(p, q)| *p as f64 * *q as f64).sum();
            let mag: f64 = x
                .iter()
                .zip(&y)
                .map(|(p, q)| (*p as f64 * *q as f64).abs())
                .sum();
            assert!(
                (dot_f32(&x, &y) as f64 - want).abs() <= 1e-6 * mag + 1e-12,
                "dot_f32 n={n}"
            );
        }
    }
}

/// `C[t, n] = A[t, k] · B[n, k]ᵀ` over int8 with exact i32 sums: columns in chunks of 32 spread
/// over the cores (the chunk of B stays in L1), 4 rows × 2 columns of accumulators at a time.
pub fn gemm_i8(a: &[i8], b: &[i8], t: usize, n: usize, k: usize) -> Vec<i32> {
    use rayon::prelude::*;
    const NC: usize = 32;
    assert!(
        a.len() >= t * k && b.len() >= n * k,
        "gemm_i8: operands too short"
    );
    let chunks: Vec<Vec<i32>> = (0..n.div_ceil(NC))
        .into_par_iter()
        .map(|c| {
            let (n0, n1) = (c * NC, ((c + 1) * NC).min(n));
            let mut buf = vec![0i32; t * (n1 - n0)];
            gemm_i8_block(a, &b[n0 * k..n1 * k], t, n1 - n0, k, &mut buf);
            buf
        })
        .collect();
    let mut out = vec![0i32; t * n];
    out.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            for (c, buf) in chunks.iter().enumerate() {
                let (n0, w) = (c * NC, (n - c * NC).min(NC));
                row[n0..n0 + w].copy_from_slice(&buf[r * w..(r + 1) * w]);
            }
        });
    out
}

/// One column chunk: `buf[t, w] = A · Bᵀ` for the chunk's `w` rows of B.
fn gemm_i8_block(a: &[i8], b: &[i8], t: usize, w: usize, k: usize, buf: &mut [i32]) {
    let mut r0 = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        while r0 + 4 <= t {
            let mut j = 0;
            while j + 2 <= w {
                // SAFETY: AVX2 was just checked; rows r0..r0+4 of A and j..j+2 of B exist.
                let c = unsafe { kernel_4x2(a, b, r0, j, k) };
                for rr in 0..4 {
                    buf[(r0 + rr) * w + j] = c[rr][0];
                    buf[(r0 + rr) * w + j + 1] = c[rr][1];
                }
                j += 2;
            }
            for jj in j..w {
                for rr in 0..4 {
                    let r = r0 + rr;
                    buf[r * w + jj] = dot_i8(&a[r * k..(r + 1) * k], &b[jj * k..(jj + 1) * k]);
                }
            }
            r0 += 4;
        }
    }
    for r in r0..t {
        for j in 0..w {
            buf[r * w + j] = dot_i8(&a[r * k..(r + 1) * k], &b[j * k..(j + 1) * k]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn kernel_4x2(a: &[i8], b: &[i8], r0: usize, j: usize, k: usize) -> [[i32; 2]; 4] {
    use std::arch::x86_64::*;
    let ld = |p: &[i8], off: usize| {
        // SAFETY: callers keep off + 16 ≤ p.len() (checked by the loop bound below).
        unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(p.as_ptr().add(off) as *const __m128i)) }
    };
    let mut acc = [[_mm256_setzero_si256(); 2]; 4];
    let mut i = 0;
    while i + 16 <= k {
        let w0 = ld(b, j * k + i);
        let w1 = ld(b, (j + 1) * k + i);
        for (rr, row) in acc.iter_mut().enumerate() {
            let x = ld(a, (r0 + rr) * k + i);
            row[0] = _mm256_add_epi32(row[0], _mm256_madd_epi16(x, w0));
            row[1] = _mm256_add_epi32(row[1], _mm256_madd_epi16(x, w1));
        }
        i += 16;
    }
    let mut out = [[0i32; 2]; 4];
    for rr in 0..4 {
        for c in 0..2 {
            let mut lanes = [0i32; 8];
            // SAFETY: lanes is 32 bytes, an unaligned store.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc[rr][c]) };
            let xr = &a[(r0 + rr) * k + i..(r0 + rr + 1) * k];
            let wr = &b[(j + c) * k + i..(j + c + 1) * k];
            let tail: i32 = xr.iter().zip(wr).map(|(x, y)| *x as i32 * *y as i32).sum();
            out[rr][c] = lanes.iter().sum::<i32>() + tail;
        }
    }
    out
}

#[cfg(test)]
mod gemm_tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn gemm_i8_equals_the_triple_loop() {
        let mut rng = Rng::new(9);
        for (t, n, k) in [
            (1, 1, 1),
            (5, 3, 17),
            (9, 70, 33),
            (4, 2, 16),
            (13, 65, 160),
        ] {
            let a: Vec<i8> = (0..t * k)
                .map(|_| (rng.below(255) as i32 - 127) as i8)
                .collect();
            let b: Vec<i8> = (0..n * k)
                .map(|_| (rng.below(255) as i32 - 127) as i8)
                .collect();
            let c = gemm_i8(&a, &b, t, n, k);
            for r in 0..t {
                for j in 0..n {
                    let want: i32 = (0..k)
                        .map(|i| a[r * k + i] as i32 * b[j * k + i] as i32)
                        .sum();
                    assert_eq!(c[r * n + j], want, "{t}×{n}×{k} [{r}, {j}]");
                }
            }
        }
    }
}

/// `C[t, n] = A[t, k] · B[n, k]ᵀ` in f32, blocked like `gemm_i8` (4 rows × 2 columns of 8-lane
/// FMA accumulators on AVX2; 16-lane partial sums elsewhere).
pub fn gemm_f32(a: &[f32], b: &[f32], t: usize, n: usize, k: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const NC: usize = 32;
    assert!(
        a.len() >= t * k && b.len() >= n * k,
        "gemm_f32: operands too short"
    );
    let chunks: Vec<Vec<f32>> = (0..n.div_ceil(NC))
        .into_par_iter()
        .map(|c| {
            let (n0, n1) = (c * NC, ((c + 1) * NC).min(n));
            let w = n1 - n0;
            let bc = &b[n0 * k..n1 * k];
            let mut buf = vec![0f32; t * w];
            let mut r0 = 0;
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                while r0 + 4 <= t {
                    let mut j = 0;
                    while j + 2 <= w {
                        // SAFETY: AVX2 + FMA were just checked; rows r0..r0+4 of A and
                        // j..j+2 of the chunk exist.
                        let c = unsafe { kernel_f32_4x2(a, bc, r0, j, k) };
                        for rr in 0..4 {
                            buf[(r0 + rr) * w + j] = c[rr][0];
                            buf[(r0 + rr) * w + j + 1] = c[rr][1];
                        }
                        j += 2;
                    }
                    for jj in j..w {
                        for rr in 0..4 {
                            let r = r0 + rr;
                            buf[r * w + jj] =
                                dot_f32(&a[r * k..(r + 1) * k], &bc[jj * k..(jj + 1) * k]);
                        }
                    }
                    r0 += 4;
                }
            }
            for r in r0..t {
                for j in 0..w {
                    buf[r * w + j] = dot_f32(&a[r * k..(r + 1) * k], &bc[j * k..(j + 1) * k]);
                }
            }
            buf
        })
        .collect();
    let mut out = vec![0f32; t * n];
    out.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            for (c, buf) in chunks.iter().enumerate() {
                let (n0, w) = (c * NC, (n - c * NC).min(NC));
                row[n0..n0 + w].copy_from_slice(&buf[r * w..(r + 1) * w]);
            }
        });
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_f32_4x2(a: &[f32], b: &[f32], r0: usize, j: usize, k: usize) -> [[f32; 2]; 4] {
    use std::arch::x86_64::*;
    // SAFETY (every load): the loop bound keeps off + 8 ≤ the row's end.
    let ld = |p: &[f32], off: usize| unsafe { _mm256_loadu_ps(p.as_ptr().add(off)) };
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let mut i = 0;
    while i + 8 <= k {
        let w0 = ld(b, j * k + i);
        let w1 = ld(b, (j + 1) * k + i);
        for (rr, row) in acc.iter_mut().enumerate() {
            let x = ld(a, (r0 + rr) * k + i);
            row[0] = _mm256_fmadd_ps(x, w0, row[0]);
            row[1] = _mm256_fmadd_ps(x, w1, row[1]);
        }
        i += 8;
    }
    let mut out = [[0f32; 2]; 4];
    for rr in 0..4 {
        for c in 0..2 {
            let mut lanes = [0f32; 8];
            // SAFETY: lanes is 32 bytes, an unaligned store.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[rr][c]) };
            let xr = &a[(r0 + rr) * k + i..(r0 + rr + 1) * k];
            let wr = &b[(j + c) * k + i..(j + c + 1) * k];
            let tail: f32 = xr.iter().zip(wr).map(|(x, y)| x * y).sum();
            out[rr][c] = lanes.iter().sum::<f32>() + tail;
        }
    }
    out
}

#[cfg(test)]
mod gemm_f32_tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn gemm_f32_matches_the_f64_triple_loop() {
        let mut rng = Rng::new(10);
        for (t, n, k) in [(1, 1, 1), (5, 3, 17), (9, 70, 33), (4, 2, 8), (13, 65, 160)] {
            let a: Vec<f32> = (0..t * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let c = gemm_f32(&a, &b, t, n, k);
            for r in 0..t {
                for j in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for i in 0..k {
                        let p = a[r * k + i] as f64 * b[j * k + i] as f64;
                        want += p;
                        mag += p.abs();
                    }
                    let got = c[r * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * mag + 1e-9,
                        "{t}×{n}×{k} [{r}, {j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
