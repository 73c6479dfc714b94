//! The elementwise / row-wise training and serving kernels (RMSNorm backward, RoPE, SwiGLU,
//! embedding, residual add) against their CPU references, in f32 and bf16, on the SIMT simulator
//! (always) and on a real GPU when one is usable (otherwise it says why it skipped). Outputs are
//! poisoned (NaN) before each launch, sizes include ones that are not multiples of the block or
//! of the 16-byte vector, and every tolerance is derived from the arithmetic in a comment.
//!
//! Notation: u = 2^-24 is f32's unit roundoff (round-to-nearest error ≤ u·|value|); bf16 has 8
//! significant bits, so rounding an f32 result to bf16 adds ≤ 2^-8·|value|. bf16 inputs are
//! exactly representable in f32, so the CPU reference sees exactly the kernel's inputs.

mod common;

use common::devices;
use half::bf16;
use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::device::DevElem;
use recforge::backend::gpu::ops::elementwise::{add, AddElem};
use recforge::backend::gpu::ops::embedding::{embedding, EmbeddingElem};
use recforge::backend::gpu::ops::rope::{rope, RopeElem};
use recforge::backend::gpu::ops::swiglu::{swiglu, swiglu_backward, SwigluElem};
use recforge::backend::gpu::ops::{rmsnorm_backward, NormElem};
use recforge::backend::gpu::{Arg, DevBuf, Device, Launch};
use recforge::backend::{Backend, Tensor};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

/// f32's unit roundoff.
const U: f64 = 1.0 / (1u64 << 24) as f64;

/// The element types every kernel here comes in.
trait Elem:
    DevElem + NormElem + RopeElem + SwigluElem + EmbeddingElem + AddElem + PartialEq + std::fmt::Debug
{
    const NAME: &'static str;
    /// Relative error of rounding an f32 result to this type (0 for f32: the f32 bounds below
    /// already count the last rounding).
    const OUT_ROUND: f64;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    fn nan() -> Self;
}
impl Elem for f32 {
    const NAME: &'static str = "f32";
    const OUT_ROUND: f64 = 0.0;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn nan() -> Self {
        f32::NAN
    }
}
impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    const OUT_ROUND: f64 = 1.0 / 256.0;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn nan() -> Self {
        bf16::NAN
    }
}

/// Values of T (rounded from f32) and the same values widened back to f32.
fn gen<T: Elem>(n: usize, mut f: impl FnMut() -> f32) -> (Vec<T>, Vec<f32>) {
    let t: Vec<T> = (0..n).map(|_| T::from_f32(f())).collect();
    let w = t.iter().map(|v| v.to_f32()).collect();
    (t, w)
}

fn cpu_f32(cpu: &Cpu, shape: &[usize], v: &[f32]) -> Tensor<Cpu> {
    cpu.upload(&HostTensor::f32(shape.to_vec(), v.to_vec()).unwrap())
        .unwrap()
}

fn cpu_u32(cpu: &Cpu, v: &[u32]) -> Tensor<Cpu> {
    cpu.upload(&HostTensor::new(vec![v.len()], HostData::U32(v.to_vec())).unwrap())
        .unwrap()
}

fn cpu_out(cpu: &Cpu, t: &Tensor<Cpu>) -> Vec<f32> {
    cpu.download(t).unwrap().to_f32().unwrap()
}

fn poisoned<T: Elem>(dev: &Device, n: usize) -> DevBuf<T> {
    dev.upload(&vec![T::nan(); n]).unwrap()
}

/// Every element within `tol(i)` of the f32 reference, plus the rounding to T.
fn check<T: Elem>(dev: &Device, what: &str, got: &[T], want: &[f32], tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f32() as f64, *w as f64);
        let t = tol(i);
        let t = t + T::OUT_ROUND * (w.abs() + t);
        assert!(
            (g - w).abs() <= t,
            "{} {what} ({}): element {i}: got {g} want {w} (tolerance {t:e})",
            dev.name(),
            T::NAME
        );
    }
}

// ---------------------------------------------------------------------------- RMSNorm backward

const NORM_SHAPES: [(usize, usize); 8] = [
    (1, 1),
    (3, 17),
    (5, 576),
    (7, 1000),
    (2, 4097),
    (64, 256),
    (1, 31),
    (3, 4096),
];

fn rmsnorm_backward_case<T: Elem>(seed: u64) {
    let cpu = Cpu::new();
    let eps = 1e-5f32;
    let mut rng = Rng::new(seed);
    for dev in devices() {
        for (rows, d) in NORM_SHAPES {
            let (x, xf) = gen::<T>(rows * d, || 3.0 * rng.normal());
            let (dy, dyf) = gen::<T>(rows * d, || rng.normal());
            let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.2 * rng.normal()).collect();
            let mut dx_c = cpu.zeros(&[rows, d], DType::F32).unwrap();
            cpu.rmsnorm_backward(
                &cpu_f32(&cpu, &[rows, d], &xf),
                &cpu_f32(&cpu, &[d], &w),
                eps,
                &cpu_f32(&cpu, &[rows, d], &dyf),
                &mut dx_c,
                false,
            )
            .unwrap();
            let want = cpu_out(&cpu, &dx_c);

            let (gx, gw, gdy) = (
                dev.upload(&x).unwrap(),
                dev.upload(&w).unwrap(),
                dev.upload(&dy).unwrap(),
            );
            let mut gdx = poisoned::<T>(&dev, rows * d);
            rmsnorm_backward(&dev, &gx, &gw, &gdy, &mut gdx, rows, d, eps, false).unwrap();
            let got = dev.download(&gdx).unwrap();

            // Per row, in f64 from the inputs: r = (mean x² + eps)^-1/2, g = dy·w, A = Σ|g·x|.
            // dx = r·g − x·r²·S/d with S = Σ g·x. The CPU sums sequentially (error ≤ (d−1)u of
            // the sum of |terms|), the kernel per thread then as a 256-way tree (≤ (d/256 + 8)u),
            // so with k = (d + d/256 + 16)u (the 16 covers the products, /d, +eps, rsqrt's 2 ulp):
            // r is off by ≤ k relative (half of Σx²'s error plus a few roundings), S by ≤ k·A.
            // Then |Δ(r·g)| ≤ (k + 3u)·r|g| and |Δ(x·r²·S/d)| ≤ |x|·r²/d·(2k·|S| + k·A + 6u·|S|)
            // ≤ 3.5k·|x|·r²·A/d; hence tol = k·(2·r·|g| + 4·|x|·r²·A/d).
            let k = (d as f64 + d as f64 / 256.0 + 16.0) * U;
            let mut stats = vec![];
            for r in 0..rows {
                let xs = &xf[r * d..(r + 1) * d];
                let gs: Vec<f64> = dyf[r * d..(r + 1) * d]
                    .iter()
                    .zip(&w)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .collect();
                let ms = xs.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
                let rr = 1.0 / (ms + eps as f64).sqrt();
                let a: f64 = xs.iter().zip(&gs).map(|(x, g)| (*x as f64 * g).abs()).sum();
                stats.push((rr, a, gs));
            }
            check(
                &dev,
                &format!("rmsnorm_backward {rows}×{d}"),
                &got,
                &want,
                |i| {
                    let (rr, a, gs) = &stats[i / d];
                    k * (2.0 * rr * gs[i % d].abs()
                        + 4.0 * (xf[i] as f64).abs() * rr * rr * a / d as f64)
                },
            );

            // accumulate: dx starts from a prior gradient, on the CPU too. Both add it to their
            // own dx in f32 (one rounding each of the sum: 2u of it more).
            let (prior, priorf) = gen::<T>(rows * d, || rng.normal());
            let mut acc_c = cpu_f32(&cpu, &[rows, d], &priorf);
            cpu.rmsnorm_backward(
                &cpu_f32(&cpu, &[rows, d], &xf),
                &cpu_f32(&cpu, &[d], &w),
                eps,
                &cpu_f32(&cpu, &[rows, d], &dyf),
                &mut acc_c,
                true,
            )
            .unwrap();
            let want_acc = cpu_out(&cpu, &acc_c);
            let mut gacc = dev.upload(&prior).unwrap();
            rmsnorm_backward(&dev, &gx, &gw, &gdy, &mut gacc, rows, d, eps, true).unwrap();
            let got = dev.download(&gacc).unwrap();
            check(
                &dev,
                &format!("rmsnorm_backward accumulate {rows}×{d}"),
                &got,
                &want_acc,
                |i| {
                    let (rr, a, gs) = &stats[i / d];
                    k * (2.0 * rr * gs[i % d].abs()
                        + 4.0 * (xf[i] as f64).abs() * rr * rr * a / d as f64)
                        + 2.0 * U * (want_acc[i] as f64).abs()
                },
            );
        }
    }
}

#[test]
fn rmsnorm_backward_f32_matches_the_cpu_reference() {
    rmsnorm_backward_case::<f32>(21);
}

#[test]
fn rmsnorm_backward_bf16_matches_the_cpu_reference() {
    rmsnorm_backward_case::<bf16>(22);
}

// ---------------------------------------------------------------------------------------- RoPE

/// (tokens, heads, head_dim): LLaMA-7B and SmolLM2 heads (vector path), half = 3 and 1 (scalar
/// for both types), half = 12 (vector for f32, scalar for bf16), many tokens per block.
const ROPE_SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 2),
    (3, 2, 6),
    (5, 9, 64),
    (7, 32, 128),
    (4, 3, 16),
    (2, 1, 24),
    (300, 1, 4),
    (65, 4, 128),
];

fn rope_case<T: Elem>(seed: u64) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(seed);
    for dev in devices() {
        for (tokens, heads, hd) in ROPE_SHAPES {
            for (theta, inverse) in [(10000.0f32, false), (100000.0, true), (500000.0, false)] {
                let n = tokens * heads * hd;
                let (x, xf) = gen::<T>(n, || 2.0 * rng.normal());
                // Positions up to 8191 (the longest the angle bound below is meant for), with
                // both ends present.
                let pos: Vec<u32> = (0..tokens)
                    .map(|t| match t {
                        0 => 8191,
                        1 => 0,
                        _ => rng.below(8192) as u32,
                    })
                    .collect();
                let mut xc = cpu_f32(&cpu, &[tokens, heads, hd], &xf);
                cpu.rope(&mut xc, &cpu_u32(&cpu, &pos), theta, inverse)
                    .unwrap();
                let want = cpu_out(&cpu, &xc);

                let mut gx = dev.upload(&x).unwrap();
                let gp = dev.upload(&pos).unwrap();
                rope(&dev, &mut gx, &gp, tokens, heads, hd, theta, inverse).unwrap();
                let got = dev.download(&gx).unwrap();

                // In place, so poisoning cannot show an unwritten element: an element the kernel
                // skipped keeps its input, which differs from the rotated reference except where
                // the angle is 0 (position 0), and the bound below is far smaller than that.
                // The CPU angle is f64 (exact for our purpose); the kernel's a = p·inv_freq in
                // f32, e = 2i/hd rounded (≤ u·e, i.e. ≤ ln θ·e·u relative on θ^e), powf ≤ 4 ulp
                // (8u), the division and the product ≤ u each ⇒ |Δa| ≤ a·(e·ln θ + 10)·u; for
                // i = 0 it is exact (powf(θ, 0) = 1, p < 2^24). sincosf is within 2 ulp (≤ 2u
                // absolute, values ≤ 1), the CPU rounds sin/cos to f32 (≤ u); each side rounds
                // a·c − b·s twice (≤ 2u·(|a| + |b|)). So for the pair (a, b):
                // |Δ| ≤ (|a| + |b|)·u·(angle·(e·ln θ + 10) + 8). At position 8191 and i = 1 of
                // head_dim 128 that is ~4e-3 relative: the f32 angle HF uses, not a kernel error.
                let half = hd / 2;
                let ln_theta = (theta as f64).ln();
                let what = format!("rope {tokens}×{heads}×{hd} θ {theta} inverse {inverse}");
                check(&dev, &what, &got, &want, |idx| {
                    let t = idx / (heads * hd);
                    let j = idx % hd;
                    let i = j % half;
                    let base = idx - j;
                    let (a, b) = (xf[base + i] as f64, xf[base + i + half] as f64);
                    let inv_freq = (theta as f64).powf(-2.0 * i as f64 / hd as f64);
                    let e = 2.0 * i as f64 / hd as f64;
                    let angle_err = if i == 0 {
                        0.0
                    } else {
                        pos[t] as f64 * inv_freq * (e * ln_theta + 10.0)
                    };
                    (a.abs() + b.abs()) * U * (angle_err + 8.0)
                });
            }
        }
    }
}

#[test]
fn rope_f32_matches_the_cpu_reference() {
    rope_case::<f32>(31);
}

#[test]
fn rope_bf16_matches_the_cpu_reference() {
    rope_case::<bf16>(32);
}

// -------------------------------------------------------------------------------------- SwiGLU

/// Element counts: below one vector, around vector multiples, SmolLM2 / LLaMA-7B rows with an
/// odd tail, and more than one 256-thread block of vectors.
const FLAT_SIZES: [usize; 10] = [
    1,
    3,
    7,
    8,
    9,
    17,
    576 * 5 + 3,
    1536 * 3,
    11008 + 5,
    4096 * 2 + 1,
];

/// Gate values: 4·N(0,1) plus the saturated ends and the zero of 1 + g·(1 − s) (g ≈ −1.278).
fn gate_values(rng: &mut Rng, n: usize) -> impl FnMut() -> f32 + '_ {
    let special = [-100.0f32, 100.0, 0.0, -1.278_464_6, 20.0, -20.0];
    let mut i = 0usize;
    move || {
        i += 1;
        if n > 16 && i % 97 == 5 {
            special[(i / 97) % special.len()]
        } else {
            4.0 * rng.normal()
        }
    }
}

fn swiglu_case<T: Elem>(seed: u64) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(seed);
    for dev in devices() {
        for n in FLAT_SIZES {
            let (g, gf) = gen::<T>(n, gate_values(&mut Rng::new(seed + n as u64), n));
            let (u, uf) = gen::<T>(n, || rng.normal());
            let (dy, dyf) = gen::<T>(n, || rng.normal());
            let (gc, uc, dc) = (
                cpu_f32(&cpu, &[n], &gf),
                cpu_f32(&cpu, &[n], &uf),
                cpu_f32(&cpu, &[n], &dyf),
            );
            let mut oc = cpu.zeros(&[n], DType::F32).unwrap();
            cpu.swiglu(&gc, &uc, &mut oc).unwrap();
            let want = cpu_out(&cpu, &oc);
            let mut dgc = cpu.zeros(&[n], DType::F32).unwrap();
            let mut duc = cpu.zeros(&[n], DType::F32).unwrap();
            cpu.swiglu_backward(&gc, &uc, &dc, &mut dgc, &mut duc)
                .unwrap();
            let (want_dg, want_du) = (cpu_out(&cpu, &dgc), cpu_out(&cpu, &duc));

            let (gg, gu, gd) = (
                dev.upload(&g).unwrap(),
                dev.upload(&u).unwrap(),
                dev.upload(&dy).unwrap(),
            );
            let mut go = poisoned::<T>(&dev, n);
            swiglu(&dev, &gg, &gu, &mut go).unwrap();
            let got = dev.download(&go).unwrap();
            let (mut gdg, mut gdu) = (poisoned::<T>(&dev, n), poisoned::<T>(&dev, n));
            swiglu_backward(&dev, &gg, &gu, &gd, &mut gdg, &mut gdu).unwrap();
            let (got_dg, got_du) = (dev.download(&gdg).unwrap(), dev.download(&gdu).unwrap());

            // s = 1/(1 + exp(−g)): expf within 2 ulp (4u relative), the add and the division
            // one rounding each ⇒ s within 6u relative on each side. out = g·s·up adds two
            // roundings ⇒ 8u per side, 16u between the two (saturated s = 0 or 1 is exact on
            // both). The f32::MIN_POSITIVE floor is for results that underflow to subnormals.
            check(&dev, &format!("swiglu n {n}"), &got, &want, |i| {
                16.0 * U * (want[i] as f64).abs() + f32::MIN_POSITIVE as f64
            });
            // dup = dy·(g·s): s's 6u and two roundings ⇒ 16u between the two sides.
            check(
                &dev,
                &format!("swiglu_backward dup n {n}"),
                &got_du,
                &want_du,
                |i| 16.0 * U * (want_du[i] as f64).abs() + f32::MIN_POSITIVE as f64,
            );
            // dgate = (dy·up·s)·B, B = 1 + g·(1 − s): the first factor carries s's 6u and three
            // roundings (9u); B is a sum that cancels (B = 0 near g ≈ −1.278), so its error is
            // absolute: |Δs| ≤ 6u·s, (1 − s) and g·(…) and 1 + (…) one rounding each ⇒
            // |ΔB| ≤ 7u·(1 + |g|) + u·|B|. Per side |Δ| ≤ 10u·|dgate| + 7u·|dy·up·s|·(1 + |g|);
            // twice that between the two sides, rounded up to 24u and 16u.
            check(
                &dev,
                &format!("swiglu_backward dgate n {n}"),
                &got_dg,
                &want_dg,
                |i| {
                    let gi = gf[i] as f64;
                    let s = 1.0 / (1.0 + (-gi).exp());
                    24.0 * U * (want_dg[i] as f64).abs()
                        + 16.0 * U * (dyf[i] as f64 * uf[i] as f64 * s).abs() * (1.0 + gi.abs())
                        + f32::MIN_POSITIVE as f64
                },
            );
        }
    }
}

#[test]
fn swiglu_f32_matches_the_cpu_reference() {
    swiglu_case::<f32>(41);
}

#[test]
fn swiglu_bf16_matches_the_cpu_reference() {
    swiglu_case::<bf16>(42);
}

// ----------------------------------------------------------------------------------- embedding

/// (vocab, d, tokens): d = 1 and 3 (scalar), 576 and 4096 (vector), 100 (vector for f32, scalar
/// for bf16), 8 with 40 tokens (several tokens per block, a partial last block).
const EMB_SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    (10, 3, 7),
    (50, 576, 9),
    (37, 100, 33),
    (5, 4096, 3),
    (300, 8, 40),
    (49152, 16, 5),
];

fn embedding_case<T: Elem>(seed: u64) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(seed);
    for dev in devices() {
        let mut bad = dev.upload(&[0i32]).unwrap();
        for (vocab, d, tokens) in EMB_SHAPES {
            let (tab, tabf) = gen::<T>(vocab * d, || rng.normal());
            let ids: Vec<u32> = (0..tokens)
                .map(|t| match t {
                    0 => vocab as u32 - 1,
                    1 => 0,
                    _ => rng.below(vocab as u64) as u32,
                })
                .collect();
            let mut oc = cpu.zeros(&[tokens, d], DType::F32).unwrap();
            cpu.embedding(
                &cpu_f32(&cpu, &[vocab, d], &tabf),
                &cpu_u32(&cpu, &ids),
                &mut oc,
            )
            .unwrap();
            let want: Vec<T> = cpu_out(&cpu, &oc).into_iter().map(T::from_f32).collect();

            let (gt, gi) = (dev.upload(&tab).unwrap(), dev.upload(&ids).unwrap());
            let mut go = poisoned::<T>(&dev, tokens * d);
            embedding(&dev, &gt, &gi, &mut go, &mut bad, vocab, d).unwrap();
            // A copy: bit-exact (the reference's values came from T, so T → f32 → T is exact).
            let got = dev.download(&go).unwrap();
            assert!(
                got == want,
                "{} embedding ({}) {vocab}×{d}, {tokens} ids: differs from the table rows",
                dev.name(),
                T::NAME
            );
        }
    }
}

#[test]
fn embedding_f32_matches_the_cpu_reference() {
    embedding_case::<f32>(51);
}

#[test]
fn embedding_bf16_matches_the_cpu_reference() {
    embedding_case::<bf16>(52);
}

fn embedding_bad_id_case<T: Elem>() {
    // d = 24: the vector path for both types; d = 7: the scalar path.
    for dev in devices() {
        for d in [24usize, 7] {
            let (vocab, tokens) = (11usize, 9usize);
            let tab: Vec<T> = (0..vocab * d)
                .map(|i| T::from_f32(1.0 + i as f32))
                .collect();
            // Bad ids at positions 5 and 3 (u32::MAX: a signed index would go negative); the
            // first one by position (3) is the one reported.
            let mut ids: Vec<u32> = (0..tokens as u32).map(|t| t % vocab as u32).collect();
            ids[5] = vocab as u32;
            ids[3] = u32::MAX;
            let (gt, gi) = (dev.upload(&tab).unwrap(), dev.upload(&ids).unwrap());
            let mut bad = dev.upload(&[0i32]).unwrap();
            let mut go = poisoned::<T>(&dev, tokens * d);
            let e = embedding(&dev, &gt, &gi, &mut go, &mut bad, vocab, d)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("embedding_{}", T::NAME))
                    && e.contains(&u32::MAX.to_string())
                    && e.contains("position 3")
                    && e.contains("vocabulary of 11"),
                "{}: {e}",
                dev.name()
            );
            // The bad rows are zeros, the good ones their table rows.
            let got = dev.download(&go).unwrap();
            for (t, &id) in ids.iter().enumerate() {
                let row = &got[t * d..(t + 1) * d];
                if (id as usize) < vocab {
                    assert_eq!(
                        row,
                        &tab[id as usize * d..(id as usize + 1) * d],
                        "{}: row {t}",
                        dev.name()
                    );
                } else {
                    assert!(
                        row.iter().all(|v| v.to_f32() == 0.0),
                        "{}: row {t}: {row:?}",
                        dev.name()
                    );
                }
            }
            // The workspace is reset on every call: a good batch afterwards succeeds.
            let good: Vec<u32> = (0..tokens as u32).map(|t| t % vocab as u32).collect();
            let gg = dev.upload(&good).unwrap();
            embedding(&dev, &gt, &gg, &mut go, &mut bad, vocab, d).unwrap();
            // Wrong shapes and workspace sizes are errors naming the kernel, not panics.
            let mut bad2 = dev.upload(&[0i32; 2]).unwrap();
            let e = embedding(&dev, &gt, &gg, &mut go, &mut bad2, vocab, d)
                .unwrap_err()
                .to_string();
            assert!(e.contains("workspace"), "{e}");
            let e = embedding(&dev, &gt, &gg, &mut go, &mut bad, vocab + 1, d)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("embedding_{}", T::NAME)) && e.contains("expected"),
                "{e}"
            );
        }
    }
}

#[test]
fn embedding_f32_reports_the_first_bad_id_without_reading_out_of_bounds() {
    embedding_bad_id_case::<f32>();
}

#[test]
fn embedding_bf16_reports_the_first_bad_id_without_reading_out_of_bounds() {
    embedding_bad_id_case::<bf16>();
}

// -------------------------------------------------------------------------------- residual add

fn add_case<T: Elem>(seed: u64) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(seed);
    for dev in devices() {
        for n in FLAT_SIZES {
            let (x, xf) = gen::<T>(n, || 3.0 * rng.normal());
            let (y, yf) = gen::<T>(n, || rng.normal());
            let mut xc = cpu_f32(&cpu, &[n], &xf);
            cpu.add_assign(&mut xc, &cpu_f32(&cpu, &[n], &yf)).unwrap();
            // One correctly rounded f32 add on both sides, then (bf16) one round-to-nearest-even
            // to T on both sides: bit-exact.
            let want: Vec<T> = cpu_out(&cpu, &xc).into_iter().map(T::from_f32).collect();
            let mut gx = dev.upload(&x).unwrap();
            add(&dev, &mut gx, &dev.upload(&y).unwrap()).unwrap();
            let got = dev.download(&gx).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_f32().to_bits() == w.to_f32().to_bits(),
                    "{} add ({}) n {n}: element {i}: got {g:?} want {w:?}",
                    dev.name(),
                    T::NAME
                );
            }
        }
    }
}

#[test]
fn add_f32_matches_the_cpu_reference() {
    add_case::<f32>(61);
}

#[test]
fn add_bf16_matches_the_cpu_reference() {
    add_case::<bf16>(62);
}

// --------------------------------------------------------------- misaligned views, bad lengths

/// A pointer one element past the start of a buffer: not 16-byte aligned, so the kernels must
/// take their scalar path (the simulator fails a misaligned rf_ld16 / rf_st16 with its name).
fn ptr_plus_one<T: Elem>(dev: &Device, b: &DevBuf<T>) -> Arg {
    match dev.ptr(b).unwrap() {
        Arg::Ptr(p) => Arg::Ptr(p + std::mem::size_of::<T>() as u64),
        other => panic!("not a pointer: {other:?}"),
    }
}

fn misaligned_case<T: Elem>(seed: u64) {
    let mut rng = Rng::new(seed);
    let n = 1000usize;
    for dev in devices() {
        let (g, _) = gen::<T>(n + 1, || 4.0 * rng.normal());
        let (u, _) = gen::<T>(n + 1, || rng.normal());
        let (gg, gu) = (dev.upload(&g).unwrap(), dev.upload(&u).unwrap());
        // Aligned reference through the wrapper, on the elements 1..=n.
        let (ga, ua) = (dev.upload(&g[1..]).unwrap(), dev.upload(&u[1..]).unwrap());
        let mut want = poisoned::<T>(&dev, n);
        swiglu(&dev, &ga, &ua, &mut want).unwrap();
        let want = dev.download(&want).unwrap();
        let out = poisoned::<T>(&dev, n + 1);
        let args = [
            ptr_plus_one(&dev, &gg),
            ptr_plus_one(&dev, &gu),
            ptr_plus_one(&dev, &out),
            Arg::U64(n as u64),
        ];
        dev.launch(T::SWIGLU, Launch::linear(2, 256), &args)
            .unwrap();
        let got = dev.download(&out).unwrap();
        assert!(
            got[0].to_f32().is_nan(),
            "{}: wrote before the view",
            dev.name()
        );
        assert!(
            got[1..] == want[..],
            "{}: misaligned swiglu ({})",
            dev.name(),
            T::NAME
        );

        // add: x[1..] += y[1..] through misaligned pointers, against the aligned wrapper.
        let mut xa = dev.upload(&g[1..]).unwrap();
        add(&dev, &mut xa, &ua).unwrap();
        let want = dev.download(&xa).unwrap();
        let args = [
            ptr_plus_one(&dev, &gg),
            ptr_plus_one(&dev, &gu),
            Arg::U64(n as u64),
        ];
        dev.launch(T::ADD, Launch::linear(1, 256), &args).unwrap();
        let got = dev.download(&gg).unwrap();
        assert!(
            got[0] == g[0] && got[1..] == want[..],
            "{}: misaligned add ({})",
            dev.name(),
            T::NAME
        );

        // rope on [tokens 3, heads 2, head_dim 32] starting one element in.
        let (tokens, heads, hd) = (3usize, 2usize, 32usize);
        let m = tokens * heads * hd;
        let (x, _) = gen::<T>(m + 1, || rng.normal());
        let pos: Vec<u32> = vec![5, 8191, 77];
        let gp = dev.upload(&pos).unwrap();
        let mut xa = dev.upload(&x[1..]).unwrap();
        rope(&dev, &mut xa, &gp, tokens, heads, hd, 10000.0, false).unwrap();
        let want = dev.download(&xa).unwrap();
        let gx = dev.upload(&x).unwrap();
        let args = [
            ptr_plus_one(&dev, &gx),
            dev.ptr(&gp).unwrap(),
            Arg::I32(tokens as i32),
            Arg::I32(heads as i32),
            Arg::I32(hd as i32),
            Arg::F32(10000.0),
            Arg::I32(0),
        ];
        let cfg = Launch {
            grid: (1, 1, 1),
            block: (64, 3, 1),
            shared_bytes: (3 * hd * 4) as u32,
        };
        dev.launch(T::ROPE, cfg, &args).unwrap();
        let got = dev.download(&gx).unwrap();
        assert!(got[0] == x[0], "{}: rope wrote before the view", dev.name());
        // The same f32 operations on the same inputs and table; only the compiler's choice to
        // contract a·c − b·s into an FMA may differ between the two paths: ≤ 2 roundings of
        // ≤ u·(|a| + |b|) ≤ 2u·max|x| each (the simulator is bit-identical).
        let max_x = x
            .iter()
            .map(|v| v.to_f32().abs() as f64)
            .fold(0.0, f64::max);
        let want: Vec<f32> = want.iter().map(|v| v.to_f32()).collect();
        check(&dev, "misaligned rope", &got[1..], &want, |_| {
            4.0 * U * max_x
        });
    }
}

#[test]
fn misaligned_views_take_the_scalar_path_f32() {
    misaligned_case::<f32>(71);
}

#[test]
fn misaligned_views_take_the_scalar_path_bf16() {
    misaligned_case::<bf16>(72);
}

#[test]
fn wrappers_reject_wrong_shapes_with_the_kernel_name() {
    for dev in devices() {
        let a = dev.upload(&[0f32; 6]).unwrap();
        let b = dev.upload(&[0f32; 5]).unwrap();
        let w = dev.upload(&[1f32; 3]).unwrap();
        let mut o = dev.upload(&[0f32; 6]).unwrap();
        let mut o2 = dev.upload(&[0f32; 6]).unwrap();
        let e = rmsnorm_backward(&dev, &a, &w, &b, &mut o, 2, 3, 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rmsnorm_backward_f32") && e.contains("expected"),
            "{e}"
        );
        let e = swiglu(&dev, &a, &b, &mut o).unwrap_err().to_string();
        assert!(e.contains("swiglu_f32") && e.contains("up 5"), "{e}");
        let e = swiglu_backward(&dev, &a, &a, &b, &mut o, &mut o2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("swiglu_backward_f32") && e.contains("dy 5"),
            "{e}"
        );
        let e = add(&dev, &mut o, &b).unwrap_err().to_string();
        assert!(e.contains("add_f32") && e.contains("expected"), "{e}");
        let p = dev.upload(&[0u32; 2]).unwrap();
        let e = rope(&dev, &mut o, &p, 2, 1, 3, 10000.0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_f32") && e.contains("even"), "{e}");
        let e = rope(&dev, &mut o, &p, 3, 1, 2, 10000.0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_f32") && e.contains("expected"), "{e}");
        let e = rope(&dev, &mut o, &p, 2, 3, 1, 10000.0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_f32") && e.contains("even"), "{e}");
        let e = rope(&dev, &mut o, &p, 2, 1, 4, 10000.0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_f32") && e.contains("expected"), "{e}");
        let mut o8 = dev.upload(&[0f32; 8]).unwrap();
        let e = rope(&dev, &mut o8, &p, 2, 1, 4, -1.0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_f32") && e.contains("theta"), "{e}");
        let mut o16 = dev.upload(&[bf16::ZERO; 16]).unwrap();
        let e = rope(&dev, &mut o16, &p, 2, 1, 4, 10000.0, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_bf16") && e.contains("expected"), "{e}");
    }
}

fn rope_round_trip_case<T: Elem>(seed: u64) {
    let mut rng = Rng::new(seed);
    let (tokens, heads, hd) = (37usize, 9usize, 64usize);
    for dev in devices() {
        let (x, xf) = gen::<T>(tokens * heads * hd, || rng.normal());
        let pos: Vec<u32> = (0..tokens).map(|_| rng.below(8192) as u32).collect();
        let gp = dev.upload(&pos).unwrap();
        let mut gx = dev.upload(&x).unwrap();
        rope(&dev, &mut gx, &gp, tokens, heads, hd, 10000.0, false).unwrap();
        rope(&dev, &mut gx, &gp, tokens, heads, hd, 10000.0, true).unwrap();
        let got = dev.download(&gx).unwrap();
        // The inverse uses the same f32 cos/sin with sin negated, so the round trip is
        // [[c, s], [−s, c]]·[[c, −s], [s, c]] = (c² + s²)·I: sincosf's 2 ulp make c² + s² = 1
        // within 8u, and the four roundings of the two rotations add ≤ 4u·(|a| + |b|); bf16
        // rounds the intermediate too (≤ 2^-8·(|a| + |b|) after the rotation back).
        let half = hd / 2;
        let mid = if T::OUT_ROUND > 0.0 { 1.0 / 256.0 } else { 0.0 };
        check(&dev, "rope then inverse rope", &got, &xf, |idx| {
            let j = idx % hd;
            let base = idx - j;
            let i = j % half;
            let (a, b) = (xf[base + i] as f64, xf[base + i + half] as f64);
            (a.abs() + b.abs()) * (12.0 * U + mid)
        });
    }
}

#[test]
fn rope_inverse_undoes_rope_f32() {
    rope_round_trip_case::<f32>(81);
}

#[test]
fn rope_inverse_undoes_rope_bf16() {
    rope_round_trip_case::<bf16>(82);
}

#[test]
fn convert_rounds_f32_to_bf16_and_widens_back_exactly() {
    use recforge::backend::gpu::ops::elementwise::convert;
    let mut rng = Rng::new(77);
    for n in [1usize, 7, 1000, 4099] {
        // Magnitudes over many binades, plus values exactly halfway between two bf16 numbers.
        let mut x: Vec<f32> = (0..n)
            .map(|_| rng.normal() * 10f32.powi(rng.below(9) as i32 - 4))
            .collect();
        x[0] = f32::from_bits(0x3F80_8000); // 1 + 2^-8: a tie, rounds to even (1.0)
        for dev in devices() {
            let mut y = poisoned::<bf16>(&dev, n);
            convert(&dev, "convert_f32_bf16", &dev.upload(&x).unwrap(), &mut y).unwrap();
            let got = dev.download(&y).unwrap();
            for i in 0..n {
                // half's from_f32 rounds to nearest even, independently of the kernel.
                assert_eq!(
                    got[i].to_bits(),
                    bf16::from_f32(x[i]).to_bits(),
                    "{}: f32→bf16 [{i}] of {n}",
                    dev.name()
                );
            }
            let mut back = dev.upload(&vec![f32::NAN; n]).unwrap();
            convert(&dev, "convert_bf16_f32", &y, &mut back).unwrap();
            let back = dev.download(&back).unwrap();
            for i in 0..n {
                assert_eq!(
                    back[i],
                    got[i].to_f32(),
                    "{}: bf16→f32 [{i}] of {n}",
                    dev.name()
                );
            }
        }
    }
    assert_eq!(bf16::from_f32(f32::from_bits(0x3F80_8000)).to_f32(), 1.0);
}
