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
/// over the cores (the chunk of B stays in L1), 4 rows × 4 columns (AVX-512 VNNI) or 4 rows ×
/// 2 columns (AVX2) of accumulators at a time.
pub fn gemm_i8(a: &[i8], b: &[i8], t: usize, n: usize, k: usize) -> Vec<i32> {
    gemm_i8_with(a, b, t, n, k, has_vnni())
}

/// `gemm_i8` with the VNNI kernel on or off (tests run both where the CPU has it).
fn gemm_i8_with(a: &[i8], b: &[i8], t: usize, n: usize, k: usize, vnni: bool) -> Vec<i32> {
    use rayon::prelude::*;
    const NC: usize = 32;
    assert!(
        a.len() >= t * k && b.len() >= n * k,
        "gemm_i8: operands too short"
    );
    let mut out = vec![0i32; t * n];
    if t == 0 || n == 0 {
        return out;
    }
    // VNNI multiplies unsigned by signed bytes: A is offset by 128 once here, and each output
    // subtracts 128 · Σ B's row (exact: the i32 arithmetic wraps, and the true sum fits).
    let vnni = vnni && t >= 4 && has_vnni();
    let au: Option<Vec<u8>> = vnni.then(|| {
        let mut au = vec![0u8; t * k];
        au.par_chunks_mut(k.max(1))
            .zip(a.par_chunks(k.max(1)))
            .for_each(|(u, x)| {
                u.iter_mut()
                    .zip(x)
                    .for_each(|(u, x)| *u = (*x as u8) ^ 0x80)
            });
        au
    });
    let bsum: Vec<i32> = if vnni {
        b[..n * k]
            .par_chunks(k.max(1))
            .map(|row| row.iter().map(|v| *v as i32).sum())
            .collect()
    } else {
        Vec::new()
    };
    let ops = I8Operands {
        a,
        au: au.as_deref(),
        b,
        bsum: &bsum,
        k,
    };
    let threads = rayon::current_num_threads().max(1);
    if t >= 8 * threads {
        // Many rows: each task owns whole output rows (about four tasks per thread) and walks
        // the columns in chunks of NC, so a chunk of B stays in L1 across the task's rows.
        let rows = t.div_ceil(4 * threads).div_ceil(4) * 4;
        out.par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(ci, oc)| {
                let r0 = ci * rows;
                let nrows = oc.len() / n;
                for n0 in (0..n).step_by(NC) {
                    let w = NC.min(n - n0);
                    ops.tile(r0, nrows, n0, w, oc, n, 0);
                }
            });
    } else {
        // Few rows (decode): split the columns, each chunk into its own buffer.
        let chunks: Vec<Vec<i32>> = (0..n.div_ceil(NC))
            .into_par_iter()
            .map(|c| {
                let (n0, w) = (c * NC, NC.min(n - c * NC));
                let mut buf = vec![0i32; t * w];
                ops.tile(0, t, n0, w, &mut buf, w, n0);
                buf
            })
            .collect();
        out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            for (c, buf) in chunks.iter().enumerate() {
                let (n0, w) = (c * NC, (n - c * NC).min(NC));
                row[n0..n0 + w].copy_from_slice(&buf[r * w..(r + 1) * w]);
            }
        });
    }
    out
}

/// The operands of one `gemm_i8`: A (and A + 128 as bytes with Σ of each B row, when the VNNI
/// kernel runs), B, and the shared length k.
struct I8Operands<'a> {
    a: &'a [i8],
    au: Option<&'a [u8]>,
    b: &'a [i8],
    bsum: &'a [i32],
    k: usize,
}

impl I8Operands<'_> {
    /// Rows `r0..r0 + rows` of A times rows `n0..n0 + w` of B into `out`, where (row r, column
    /// j) lives at `out[(r - r0) * ld + j - col0]`.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        r0: usize,
        rows: usize,
        n0: usize,
        w: usize,
        out: &mut [i32],
        ld: usize,
        col0: usize,
    ) {
        let (a, b, k) = (self.a, self.b, self.k);
        let at = |r: usize, j: usize| (r - r0) * ld + j - col0;
        let dot = |r: usize, j: usize| dot_i8(&a[r * k..(r + 1) * k], &b[j * k..(j + 1) * k]);
        #[cfg(target_arch = "x86_64")]
        let blocked = self.au.is_some() || std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let blocked = false;
        let mut r = r0;
        while blocked && r + 4 <= r0 + rows {
            let mut j = n0;
            #[cfg(target_arch = "x86_64")]
            if let Some(au) = self.au {
                while j + 4 <= n0 + w {
                    // SAFETY: `au` exists only when has_vnni() held; rows r..r+4 of A (k bytes
                    // each) and rows j..j+4 of B exist (the callers' bounds).
                    let c = unsafe {
                        kernel_vnni_4x4(au.as_ptr().add(r * k), b.as_ptr().add(j * k), k)
                    };
                    for (rr, c) in c.iter().enumerate() {
                        for (cc, c) in c.iter().enumerate() {
                            out[at(r + rr, j + cc)] =
                                c.wrapping_sub(self.bsum[j + cc].wrapping_mul(128));
                        }
                    }
                    j += 4;
                }
            } else {
                while j + 2 <= n0 + w {
                    // SAFETY: `blocked` without `au` means AVX2 was detected; rows r..r+4 of A
                    // and j..j+2 of B exist.
                    let c = unsafe { kernel_4x2(a, b, r, j, k) };
                    for (rr, c) in c.iter().enumerate() {
                        out[at(r + rr, j)] = c[0];
                        out[at(r + rr, j + 1)] = c[1];
                    }
                    j += 2;
                }
            }
            for jj in j..n0 + w {
                for rr in r..r + 4 {
                    out[at(rr, jj)] = dot(rr, jj);
                }
            }
            r += 4;
        }
        for rr in r..r0 + rows {
            for j in n0..n0 + w {
                out[at(rr, j)] = dot(rr, j);
            }
        }
    }
}

/// Whether the CPU has the AVX-512 subsets the VNNI kernel uses.
fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// 4 rows of `au` (A + 128, unsigned) × 4 rows of B (signed), 64 bytes per step with
/// `vpdpbusd` (four u8 × s8 products summed into each i32 lane, wrapping), the tail by a masked
/// load (masked bytes read as 0, so they add nothing); each accumulator is then reduced to one
/// sum. Returns Σ au·b, which is Σ a·b + 128 · Σ b modulo 2^32.
///
/// # Safety
/// AVX-512 F, BW and VNNI must be available; `au` must be readable for 4 rows of `k` bytes at
/// stride `k`, `b` likewise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn kernel_vnni_4x4(au: *const u8, b: *const i8, k: usize) -> [[i32; 4]; 4] {
    use std::arch::x86_64::*;
    // One step of 64 bytes: `mask` selects the bytes inside the rows (all of them but at the
    // tail).
    #[inline(always)]
    unsafe fn step(
        acc: &mut [[__m512i; 4]; 4],
        au: *const u8,
        b: *const i8,
        k: usize,
        i: usize,
        mask: __mmask64,
    ) {
        // SAFETY (every load): the caller keeps the selected bytes inside the rows; a masked
        // load does not touch the others.
        let ld = |p: *const i8| unsafe { _mm512_maskz_loadu_epi8(mask, p) };
        let bv = unsafe {
            [
                ld(b.add(i)),
                ld(b.add(k + i)),
                ld(b.add(2 * k + i)),
                ld(b.add(3 * k + i)),
            ]
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = ld(unsafe { au.add(r * k + i) } as *const i8);
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_dpbusd_epi32(*acc, x, bv[c]);
            }
        }
    }
    let mut acc = [[_mm512_setzero_si512(); 4]; 4];
    let mut i = 0;
    while i + 64 <= k {
        // SAFETY: bytes i..i + 64 of every row exist.
        unsafe { step(&mut acc, au, b, k, i, !0) };
        i += 64;
    }
    if i < k {
        // SAFETY: the mask selects bytes i..k, inside every row.
        unsafe { step(&mut acc, au, b, k, i, (1u64 << (k - i)) - 1) };
    }
    let mut out = [[0i32; 4]; 4];
    for (r, acc) in acc.iter().enumerate() {
        // 16 lanes → 8, then three horizontal adds leave the four sums in each 128-bit half.
        let half = |v: __m512i| {
            _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
        };
        let h01 = _mm256_hadd_epi32(half(acc[0]), half(acc[1]));
        let h23 = _mm256_hadd_epi32(half(acc[2]), half(acc[3]));
        let h = _mm256_hadd_epi32(h01, h23);
        let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        // SAFETY: out[r] is 16 bytes, an unaligned store.
        unsafe { _mm_storeu_si128(out[r].as_mut_ptr() as *mut __m128i, s) };
    }
    out
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
        let paths: &[bool] = if has_vnni() {
            &[false, true]
        } else {
            eprintln!("gemm_i8: this CPU has no AVX-512 VNNI; testing the AVX2 / plain path only");
            &[false]
        };
        let random = |rng: &mut Rng, len: usize| -> Vec<i8> {
            (0..len)
                .map(|_| (rng.below(256) as i32 - 128) as i8)
                .collect()
        };
        type Case = (usize, usize, usize, Vec<i8>, Vec<i8>);
        let mut cases: Vec<Case> = Vec::new();
        for (t, n, k) in [
            (1, 1, 1),
            (5, 3, 17),
            (9, 70, 33),
            (4, 2, 16),
            (4, 4, 64),
            (13, 65, 160),
            (6, 9, 1000),
            // enough rows for the row-split path, with a row tail and a column tail
            (70, 70, 100),
        ] {
            cases.push((t, n, k, random(&mut rng, t * k), random(&mut rng, n * k)));
        }
        // The extremes: |Σ| near its largest, where the VNNI path's offset sums pass 2^31.
        let k = 4100;
        for (x, y) in [(-128i8, -128i8), (127, -128), (-128, 127), (127, 127)] {
            cases.push((5, 6, k, vec![x; 5 * k], vec![y; 6 * k]));
        }
        for (t, n, k, a, b) in &cases {
            let (t, n, k) = (*t, *n, *k);
            for &vnni in paths {
                let c = gemm_i8_with(a, b, t, n, k, vnni);
                for r in 0..t {
                    for j in 0..n {
                        let want: i64 = (0..k)
                            .map(|i| a[r * k + i] as i64 * b[j * k + i] as i64)
                            .sum();
                        assert_eq!(
                            c[r * n + j] as i64,
                            want,
                            "{t}×{n}×{k} vnni={vnni} [{r}, {j}]"
                        );
                    }
                }
            }
        }
    }
}

/// `C[t, n] = A[t, k] · B[n, k]ᵀ` in f32, blocked like `gemm_i8` (up to 4 rows × 2 columns of
/// 8-lane FMA accumulators on AVX2; 16-lane partial sums elsewhere). Every output is summed the
/// same way whichever block it falls in, so a row's result does not depend on the other rows of
/// its batch (prefix sharing and re-packing stay bit-identical).
pub fn gemm_f32(a: &[f32], b: &[f32], t: usize, n: usize, k: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const NC: usize = 32;
    assert!(
        a.len() >= t * k && b.len() >= n * k,
        "gemm_f32: operands too short"
    );
    #[cfg(target_arch = "x86_64")]
    let fast =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    let chunks: Vec<Vec<f32>> = (0..n.div_ceil(NC))
        .into_par_iter()
        .map(|c| {
            let (n0, n1) = (c * NC, ((c + 1) * NC).min(n));
            let w = n1 - n0;
            let bc = &b[n0 * k..n1 * k];
            let mut buf = vec![0f32; t * w];
            #[cfg(target_arch = "x86_64")]
            if fast {
                let mut r0 = 0;
                while r0 < t {
                    let rows = (t - r0).min(4);
                    let mut j = 0;
                    while j < w {
                        let cols = (w - j).min(2);
                        // SAFETY: AVX2 + FMA were checked above; rows r0..r0 + rows of A and
                        // j..j + cols of the chunk exist.
                        unsafe {
                            match (rows, cols) {
                                (4, 2) => tile_f32::<4, 2>(a, bc, r0, j, k, &mut buf, w),
                                (4, _) => tile_f32::<4, 1>(a, bc, r0, j, k, &mut buf, w),
                                (3, 2) => tile_f32::<3, 2>(a, bc, r0, j, k, &mut buf, w),
                                (3, _) => tile_f32::<3, 1>(a, bc, r0, j, k, &mut buf, w),
                                (2, 2) => tile_f32::<2, 2>(a, bc, r0, j, k, &mut buf, w),
                                (2, _) => tile_f32::<2, 1>(a, bc, r0, j, k, &mut buf, w),
                                (_, 2) => tile_f32::<1, 2>(a, bc, r0, j, k, &mut buf, w),
                                _ => tile_f32::<1, 1>(a, bc, r0, j, k, &mut buf, w),
                            }
                        }
                        j += cols;
                    }
                    r0 += rows;
                }
                return buf;
            }
            for r in 0..t {
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

/// One `R × C` tile of `kernel_f32` stored into `buf` (`w` columns wide).
///
/// # Safety
/// As `kernel_f32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_f32<const R: usize, const C: usize>(
    a: &[f32],
    b: &[f32],
    r0: usize,
    j: usize,
    k: usize,
    buf: &mut [f32],
    w: usize,
) {
    // SAFETY: the caller's guarantee, passed on.
    let c = unsafe { kernel_f32::<R, C>(a, b, r0, j, k) };
    for (rr, row) in c.iter().enumerate() {
        buf[(r0 + rr) * w + j..][..C].copy_from_slice(row);
    }
}

/// `R` rows of A × `C` rows of B: per output one 8-lane FMA chain over k, its lanes summed in
/// order, then the tail — the same arithmetic for every (R, C).
///
/// # Safety
/// AVX2 and FMA must be available; rows `r0..r0 + R` of `a` and `j..j + C` of `b` (each `k`
/// long) must exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_f32<const R: usize, const C: usize>(
    a: &[f32],
    b: &[f32],
    r0: usize,
    j: usize,
    k: usize,
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= (r0 + R) * k && b.len() >= (j + C) * k);
    // SAFETY (every load): the loop bound keeps off + 8 ≤ the row's end.
    let ld = |p: &[f32], off: usize| unsafe { _mm256_loadu_ps(p.as_ptr().add(off)) };
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut i = 0;
    while i + 8 <= k {
        let mut w = [_mm256_setzero_ps(); C];
        for (c, w) in w.iter_mut().enumerate() {
            *w = ld(b, (j + c) * k + i);
        }
        for (rr, row) in acc.iter_mut().enumerate() {
            let x = ld(a, (r0 + rr) * k + i);
            for (acc, w) in row.iter_mut().zip(&w) {
                *acc = _mm256_fmadd_ps(x, *w, *acc);
            }
        }
        i += 8;
    }
    let mut out = [[0f32; C]; R];
    for rr in 0..R {
        for c in 0..C {
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

    /// A row's result does not depend on the rows around it: each row of a 30-row product
    /// equals, bit for bit, the product of that row alone (both GEMM layouts), and in the NN
    /// layout a column's does not depend on the columns beside it. Prefix sharing and
    /// re-packing rely on it.
    #[test]
    fn a_row_is_computed_the_same_alone_and_in_a_batch() {
        let mut rng = Rng::new(12);
        let (t, n, k) = (30, 37, 300);
        let a: Vec<f32> = (0..t * k).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let all = gemm_f32(&a, &b, t, n, k);
        let mut all_nn = vec![0f32; t * n];
        gemm_f32_nn(&a, &b, t, k, n, &mut all_nn, false);
        // A column's bits do not depend on the matrix's width (where the 16-column panels
        // end): the first 21 columns of B alone give the first 21 columns of the whole.
        let narrow: Vec<f32> = (0..k).flat_map(|j| b[j * n..j * n + 21].to_vec()).collect();
        let mut part = vec![0f32; t * 21];
        gemm_f32_nn(&a, &narrow, t, k, 21, &mut part, false);
        for r in 0..t {
            assert_eq!(
                part[r * 21..(r + 1) * 21],
                all_nn[r * n..r * n + 21],
                "gemm_f32_nn row {r}, 21 columns"
            );
        }
        for r in 0..t {
            let row = &a[r * k..(r + 1) * k];
            let alone = gemm_f32(row, &b, 1, n, k);
            assert_eq!(alone[..], all[r * n..(r + 1) * n], "gemm_f32 row {r}");
            let mut alone_nn = vec![0f32; n];
            gemm_f32_nn(row, &b, 1, k, n, &mut alone_nn, false);
            assert_eq!(
                alone_nn[..],
                all_nn[r * n..(r + 1) * n],
                "gemm_f32_nn row {r}"
            );
        }
    }

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

/// Output columns per NN micro-kernel call (two 8-lane vectors).
const NN_NR: usize = 16;
/// Output rows per NN micro-kernel call: 6 × 2 accumulators + 2 B vectors + 1 broadcast fit
/// AVX2's 16 registers.
const NN_MR: usize = 6;
/// Output columns per cache block, and steps along kk per pass: a block of B (`256 × 64` f32,
/// 64 KiB) stays in L2 and a row block of A (`6 × 256`, 6 KiB) in L1 while the kernels run.
const NN_CB: usize = 64;
const NN_KC: usize = 256;
/// Elements of an f32 B (4 MiB) from which the row-split path runs one task per thread.
const NN_BIG_B: usize = 1 << 20;

/// `C[t, n] = A[t, kk] · B[kk, n]` (or `C += A · B`, the product summed first, with
/// `accumulate`) in f32 with both operands
/// row-major: the layout of `dY · W` (W `[out, in]`) and of the LoRA products, where B's rows run
/// along the output columns so no transposed copy is needed. Every output is one sequential sum
/// over kk (fused multiply-adds on AVX2), so the result does not depend on the thread count.
pub fn gemm_f32_nn(
    a: &[f32],
    b: &[f32],
    t: usize,
    kk: usize,
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    gemm_nn(a, NnB::F32(b), t, kk, n, out, accumulate)
}

/// `gemm_f32_nn` with B an int8 matrix `q[kk, n]` times a scale per row, `B[j, c] = q[j, c] as
/// f32 · scale[j]`: the product `dY · W` of an int8 weight `[out, in]` with its per-output
/// scales. B is dequantized one cache block at a time (`NN_KC × NN_CB` f32, in L2) and never
/// whole, with the same rounding as a dequantized copy would have, so the result is
/// bit-identical to `gemm_f32_nn` on `dequant(q)`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32_nn_i8(
    a: &[f32],
    q: &[i8],
    scale: &[f32],
    t: usize,
    kk: usize,
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    assert!(scale.len() >= kk, "gemm_f32_nn_i8: a scale per row of B");
    gemm_nn(a, NnB::I8 { q, scale }, t, kk, n, out, accumulate)
}

/// The B operand of an NN product.
#[derive(Clone, Copy)]
enum NnB<'a> {
    F32(&'a [f32]),
    /// `B[j, c] = q[j · n + c] as f32 · scale[j]`.
    I8 {
        q: &'a [i8],
        scale: &'a [f32],
    },
}

impl NnB<'_> {
    fn len(&self) -> usize {
        match self {
            NnB::F32(b) => b.len(),
            NnB::I8 { q, .. } => q.len(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_nn(a: &[f32], b: NnB, t: usize, kk: usize, n: usize, out: &mut [f32], accumulate: bool) {
    use rayon::prelude::*;
    assert!(
        a.len() >= t * kk && b.len() >= kk * n && out.len() >= t * n,
        "gemm_f32_nn: operands too short"
    );
    if t == 0 || n == 0 {
        return;
    }
    if kk == 0 {
        if !accumulate {
            out[..t * n].fill(0.0);
        }
        return;
    }
    if accumulate {
        // The finished product is added, as the GPU's epilogue adds it (not a chain that
        // starts from the old value).
        let mut prod = vec![0f32; t * n];
        gemm_nn(a, b, t, kk, n, &mut prod, false);
        out[..t * n]
            .par_iter_mut()
            .zip(prod.par_iter())
            .for_each(|(o, p)| *o += p);
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    if t >= 2 * NN_MR * threads {
        // Many rows: each task owns whole output rows (about four tasks per thread). Each
        // task reads all of B (and dequantizes all of an int8 B for itself), so when B is
        // larger than a core's L2 (the tied head: 49152 × 576 f32, 113 MB, streamed from
        // DRAM by every task) or int8, one task per thread.
        let tasks = match b {
            NnB::F32(_) if kk * n < NN_BIG_B => 4 * threads,
            _ => threads,
        };
        let rows = t.div_ceil(tasks).div_ceil(NN_MR) * NN_MR;
        out[..t * n]
            .par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(ci, oc)| {
                let (r0, nrows) = (ci * rows, oc.len() / n);
                let view = NnOut {
                    data: oc,
                    ld: n,
                    col0: 0,
                };
                nn_block(&a[r0 * kk..], b, nrows, kk, n, 0, n, view);
            });
    } else {
        // Few rows (the LoRA rank): split the columns, each block into its own buffer.
        let blocks: Vec<Vec<f32>> = (0..n.div_ceil(NN_CB))
            .into_par_iter()
            .map(|bi| {
                let (c0, w) = (bi * NN_CB, NN_CB.min(n - bi * NN_CB));
                let mut buf = vec![0f32; t * w];
                let view = NnOut {
                    data: &mut buf,
                    ld: w,
                    col0: c0,
                };
                nn_block(a, b, t, kk, n, c0, w, view);
                buf
            })
            .collect();
        for (bi, buf) in blocks.iter().enumerate() {
            let (c0, w) = (bi * NN_CB, NN_CB.min(n - bi * NN_CB));
            for r in 0..t {
                out[r * n + c0..r * n + c0 + w].copy_from_slice(&buf[r * w..(r + 1) * w]);
            }
        }
    }
}

/// A window of the output: element (row i, column c) lives at `data[i * ld + c - col0]`.
struct NnOut<'a> {
    data: &'a mut [f32],
    ld: usize,
    col0: usize,
}

/// Rows `0..rows` of A (row-major, `kk` wide) times columns `c0..c0 + w` of B (`n` wide) into
/// `out`, in column blocks of `NN_CB` and row blocks of `NN_MR`.
#[allow(clippy::too_many_arguments)]
fn nn_block(a: &[f32], b: NnB, rows: usize, kk: usize, n: usize, c0: usize, w: usize, out: NnOut) {
    #[cfg(target_arch = "x86_64")]
    let fast =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let fast = false;
    let NnOut { data, ld, col0 } = out;
    // An int8 B's block of rows k0..k0 + kc and the micro-kernels' columns, dequantized.
    let mut panel = match b {
        NnB::F32(_) => Vec::new(),
        NnB::I8 { .. } => vec![0f32; NN_KC * NN_CB],
    };
    let mut cb = c0;
    while cb < c0 + w {
        let cbe = (cb + NN_CB).min(c0 + w);
        // The micro-kernels' columns, in steps of NN_KC along kk: each step continues the sums
        // the previous one stored, so every output is still one sequential chain over kk.
        let vec_end = if fast {
            cb + (cbe - cb) / NN_NR * NN_NR
        } else {
            cb
        };
        #[cfg(target_arch = "x86_64")]
        if vec_end > cb {
            let mut k0 = 0;
            while k0 < kk {
                let kc = NN_KC.min(kk - k0);
                let load = k0 > 0;
                // Where the micro-kernels read B: in place, or the dequantized panel.
                let (bbase, ldb) = match b {
                    NnB::F32(bf) => (bf[k0 * n + cb..].as_ptr(), n),
                    NnB::I8 { q, scale } => {
                        let wv = vec_end - cb;
                        for jj in 0..kc {
                            let (j, dst) = (k0 + jj, &mut panel[jj * wv..(jj + 1) * wv]);
                            let (src, s) = (&q[j * n + cb..j * n + vec_end], scale[j]);
                            dst.iter_mut()
                                .zip(src)
                                .for_each(|(d, &x)| *d = x as f32 * s);
                        }
                        (panel.as_ptr(), wv)
                    }
                };
                let mut i0 = 0;
                while i0 < rows {
                    let mr = NN_MR.min(rows - i0);
                    let mut c = cb;
                    while c < vec_end {
                        let o = i0 * ld + c - col0;
                        // SAFETY: AVX2 + FMA were checked above; rows i0..i0 + mr of A at
                        // columns k0..k0 + kc, B's rows k0..k0 + kc at columns c..c + 16 (in
                        // place: `bbase` is row k0, column cb of B, stride n; or the panel's
                        // kc rows of stride vec_end - cb), and the output window's rows
                        // i0..i0 + mr at columns c..c + 16 are inside their slices (the
                        // caller's length checks and the loop bounds).
                        unsafe {
                            let ap = a.as_ptr().add(i0 * kk + k0);
                            let bp = bbase.add(c - cb);
                            let op = data.as_mut_ptr().add(o);
                            match mr {
                                6 => nn_kernel::<6>(ap, kk, bp, ldb, kc, op, ld, load),
                                5 => nn_kernel::<5>(ap, kk, bp, ldb, kc, op, ld, load),
                                4 => nn_kernel::<4>(ap, kk, bp, ldb, kc, op, ld, load),
                                3 => nn_kernel::<3>(ap, kk, bp, ldb, kc, op, ld, load),
                                2 => nn_kernel::<2>(ap, kk, bp, ldb, kc, op, ld, load),
                                _ => nn_kernel::<1>(ap, kk, bp, ldb, kc, op, ld, load),
                            }
                        }
                        c += NN_NR;
                    }
                    i0 += mr;
                }
                k0 += kc;
            }
        }
        // The columns no micro-kernel covered: the same sequential chain of fused
        // multiply-adds, so a column's bits do not depend on where the panels end.
        for i in 0..rows {
            let ar = &a[i * kk..(i + 1) * kk];
            for cc in vec_end..cbe {
                data[i * ld + cc - col0] = match b {
                    NnB::F32(bf) => fma_chain(ar, |j| bf[j * n + cc], fast),
                    NnB::I8 { q, scale } => {
                        fma_chain(ar, |j| q[j * n + cc] as f32 * scale[j], fast)
                    }
                };
            }
        }
        cb = cbe;
    }
}

/// `Σ_j a[j] · b(j)` as one chain of fused multiply-adds in j order: the arithmetic of each
/// lane of `nn_kernel` (`b(j)` is B's element in row j of the column, dequantized as the panel
/// is for an int8 B).
fn fma_chain(a: &[f32], b: impl Fn(usize) -> f32, fast: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` means AVX2 + FMA were detected.
        return unsafe { fma_chain_fma(a, b) };
    }
    let _ = fast;
    a.iter()
        .enumerate()
        .fold(0f32, |s, (j, x)| x.mul_add(b(j), s))
}

/// `fma_chain` compiled with FMA, so `mul_add` is one instruction.
///
/// # Safety
/// FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chain_fma(a: &[f32], b: impl Fn(usize) -> f32) -> f32 {
    a.iter()
        .enumerate()
        .fold(0f32, |s, (j, x)| x.mul_add(b(j), s))
}

/// `M` rows × 16 columns: for each of the kk steps, two vectors of B's row and one broadcast of
/// each A row's element, `2·M` fused multiply-adds; the sums start from the output's values
/// with `load`, else from zero.
///
/// # Safety
/// AVX2 and FMA must be available; `a` must be readable for `M` rows of stride `lda` and `kk`
/// elements, `b` for `kk` rows of stride `ldb` and 16 elements, `c` writable for `M` rows of
/// stride `ldc` and 16 elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn nn_kernel<const M: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    kk: usize,
    c: *mut f32,
    ldc: usize,
    load: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    if load {
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row i < M of the output window, 16 columns.
            unsafe {
                let o = c.add(i * ldc);
                *acc = [_mm256_loadu_ps(o), _mm256_loadu_ps(o.add(8))];
            }
        }
    }
    for j in 0..kk {
        // SAFETY: j < kk, inside the rows the caller vouched for.
        let (b0, b1) = unsafe {
            let row = b.add(j * ldb);
            (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
        };
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i < M rows of A, j < kk.
            let x = unsafe { _mm256_set1_ps(*a.add(i * lda + j)) };
            acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: row i < M of the output window, 16 columns.
        unsafe {
            let o = c.add(i * ldc);
            _mm256_storeu_ps(o, acc[0]);
            _mm256_storeu_ps(o.add(8), acc[1]);
        }
    }
}

#[cfg(test)]
mod gemm_nn_tests {
    use super::*;
    use crate::rng::Rng;

    /// The int8 B, dequantized a block at a time, gives the bits of the f32 product on a
    /// dequantized copy, on both paths (many rows: one task per thread; few rows: column
    /// blocks), with column tails, several kk blocks, overwriting and accumulating.
    #[test]
    fn gemm_f32_nn_i8_equals_the_product_on_a_dequantized_copy() {
        let mut rng = Rng::new(12);
        for (t, kk, n) in [
            (1, 1, 1),
            (2, 7, 17),
            (5, 300, 70),
            (13, 9, 129),
            (30, 600, 35),
            (61, 17, 200),
            (100, 513, 64),
        ] {
            let a: Vec<f32> = (0..t * kk).map(|_| rng.normal()).collect();
            let q: Vec<i8> = (0..kk * n)
                .map(|_| (rng.uniform() * 255.0 - 127.5).round() as i8)
                .collect();
            let scale: Vec<f32> = (0..kk).map(|_| 0.01 + rng.uniform() * 0.05).collect();
            let deq: Vec<f32> = (0..kk * n).map(|i| q[i] as f32 * scale[i / n]).collect();
            let init: Vec<f32> = (0..t * n).map(|_| rng.normal()).collect();
            for accumulate in [false, true] {
                let (mut want, mut got) = (init.clone(), init.clone());
                gemm_f32_nn(&a, &deq, t, kk, n, &mut want, accumulate);
                gemm_f32_nn_i8(&a, &q, &scale, t, kk, n, &mut got, accumulate);
                let same = want
                    .iter()
                    .zip(&got)
                    .all(|(w, g)| w.to_bits() == g.to_bits());
                assert!(same, "{t}×{kk}×{n} acc={accumulate}");
            }
        }
    }

    /// Against an f64 triple loop at sizes that leave row and column tails, for both the
    /// row-split (many rows) and column-split (few rows) paths, with kk in one or several
    /// blocks, overwriting and accumulating (the output starts random, so an unwritten element
    /// fails).
    #[test]
    fn gemm_f32_nn_matches_the_f64_triple_loop() {
        let mut rng = Rng::new(11);
        for (t, kk, n) in [
            (3, 0, 20),
            (1, 1, 1),
            (1, 5, 17),
            (7, 33, 16),
            (8, 100, 70),
            (13, 9, 129),
            (61, 17, 40),
            (100, 64, 33),
            // kk over one NN_KC step (the sums continue across steps), both paths
            (9, 300, 40),
            (30, 600, 35),
        ] {
            let a: Vec<f32> = (0..t * kk).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..kk * n).map(|_| rng.normal()).collect();
            let init: Vec<f32> = (0..t * n).map(|_| rng.normal()).collect();
            for accumulate in [false, true] {
                let mut c = init.clone();
                gemm_f32_nn(&a, &b, t, kk, n, &mut c, accumulate);
                for r in 0..t {
                    for j in 0..n {
                        let (mut want, mut mag) = (0f64, 0f64);
                        if accumulate {
                            want = init[r * n + j] as f64;
                            mag = want.abs();
                        }
                        for i in 0..kk {
                            let p = a[r * kk + i] as f64 * b[i * n + j] as f64;
                            want += p;
                            mag += p.abs();
                        }
                        let got = c[r * n + j] as f64;
                        // kk + 1 roundings of at most 2^-24 relative each, on partial sums bounded
                        // by the sum of magnitudes.
                        let tol = (kk as f64 + 1.0) * 6e-8 * mag + 1e-30;
                        assert!(
                            (got - want).abs() <= tol,
                            "{t}×{kk}×{n} acc={accumulate} [{r}, {j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
