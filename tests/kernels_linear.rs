//! The W8A8 linear (activation quantization with outlier columns + int8 tensor-core GEMM with
//! the fused epilogue) against the CPU reference `Cpu::linear`, on the simulator always and on
//! CUDA when a GPU is usable. The int32 accumulators must be exact, the quantization and the
//! f32 epilogue bit-identical, so the bf16 outputs are compared bit for bit.

mod common;

use common::devices;
use half::bf16;
use recforge::backend::cpu::{quantize_activations, quantize_rows, Cpu};
use recforge::backend::gpu::ops::w8a8::{self, Int8Scratch};
use recforge::backend::gpu::ops::Tile;
use recforge::backend::gpu::Device;
use recforge::backend::{Backend, Linear, LinearWeight};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

// (M, N, K): odd M and N, K multiples of 16 that are and are not multiples of the 64-byte stage;
// the last spans two 128-row and three 128-column tiles, the last of each partial.
const SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 16),
    (5, 19, 48),
    (64, 64, 64),
    (33, 130, 576),
    (70, 67, 1040),
    (129, 8, 208),
    (150, 260, 336),
];

/// The tiles every W8A8 and int8 dX test runs: both mma.sync tiles everywhere, and the wgmma
/// tile where the device has it (the simulator always; a CUDA GPU when it is an sm_90).
fn tiles(dev: &Device) -> Vec<Tile> {
    if dev.has_wgmma() {
        vec![Tile::T64, Tile::T128, Tile::Wg]
    } else {
        eprintln!(
            "{}: the wgmma W8A8 tile skipped: not an sm_90 GPU",
            dev.name()
        );
        vec![Tile::T64, Tile::T128]
    }
}

/// Activations as bf16 with a few columns well above the outlier threshold.
fn activations(rng: &mut Rng, m: usize, k: usize, outliers: &[usize]) -> Vec<bf16> {
    (0..m * k)
        .map(|i| {
            let v = if outliers.contains(&(i % k)) {
                20.0 * rng.normal() + 10.0
            } else {
                1.5 * rng.normal()
            };
            bf16::from_f32(v)
        })
        .collect()
}

#[test]
fn int8_gemm_accumulators_are_exact() {
    let mut rng = Rng::new(31);
    for dev in devices() {
        for (m, n, k) in SHAPES {
            let a: Vec<i8> = (0..m * k)
                .map(|_| (rng.below(255) as i32 - 127) as i8)
                .collect();
            let b: Vec<i8> = (0..n * k)
                .map(|_| (rng.below(255) as i32 - 127) as i8)
                .collect();
            let want: Vec<i32> = (0..m * n)
                .map(|i| {
                    (0..k)
                        .map(|kk| a[i / n * k + kk] as i32 * b[i % n * k + kk] as i32)
                        .sum()
                })
                .collect();
            let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
            for tile in tiles(&dev) {
                let mut out = dev.upload(&vec![i32::MIN; m * n]).unwrap();
                w8a8::gemm_w8a8_i32(&dev, &da, &db, &mut out, m, n, k, Some(tile)).unwrap();
                assert_eq!(
                    dev.download(&out).unwrap(),
                    want,
                    "{}: {tile:?} {m}×{n}×{k}",
                    dev.name()
                );
            }
        }
    }
}

#[test]
fn activation_quantization_is_bit_identical_to_the_cpu() {
    let mut rng = Rng::new(32);
    for dev in devices() {
        for (m, _, k) in SHAPES {
            let outl: Vec<usize> = if k > 40 {
                vec![3, k / 2, k - 1]
            } else {
                vec![]
            };
            let x = activations(&mut rng, m, k, &outl);
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            for thr in [0.0f32, 6.0] {
                let (want_q, want_s, want_o) = quantize_activations(&xf, m, k, thr);
                let mut s = Int8Scratch::new(&dev, m + 3, k + 16).unwrap();
                dev.write(&mut s.sx, &vec![f32::NAN; m + 3]).unwrap();
                let dx = dev.upload(&x).unwrap();
                w8a8::quantize_activations(&dev, &dx, m, k, thr, &mut s).unwrap();
                let q = dev.download(&s.xq).unwrap();
                let sx = dev.download(&s.sx).unwrap();
                assert_eq!(
                    &q[..m * k],
                    &want_q[..],
                    "{}: xq {m}×{k} thr {thr}",
                    dev.name()
                );
                for r in 0..m {
                    assert_eq!(
                        sx[r].to_bits(),
                        want_s[r].to_bits(),
                        "{}: sx row {r}",
                        dev.name()
                    );
                }
                let count = dev.download(&s.count).unwrap()[0] as usize;
                let cols: Vec<u32> = dev.download(&s.ocols).unwrap()[..count].to_vec();
                let want_cols: Vec<u32> = (0..k).filter(|&c| want_o[c]).map(|c| c as u32).collect();
                assert_eq!(cols, want_cols, "{}: outlier columns thr {thr}", dev.name());
                if thr > 0.0 && !outl.is_empty() {
                    assert!(count >= outl.len(), "the planted outlier columns are found");
                }
            }
        }
    }
}

/// The CPU reference's int8 linear of the weight `(wq, ws, n, k)` with LLM.int8's outlier
/// threshold `thr`.
fn int8_linear(cpu: &Cpu, (wq, ws, n, k): (&[i8], &[f32], usize, usize), thr: f32) -> Linear<Cpu> {
    Linear {
        weight: LinearWeight::Int8 {
            w: cpu
                .upload(&HostTensor::new(vec![n, k], HostData::I8(wq.to_vec())).unwrap())
                .unwrap(),
            scale: cpu
                .upload(&HostTensor::f32(vec![n], ws.to_vec()).unwrap())
                .unwrap(),
        },
        out_features: n,
        in_features: k,
        outlier_threshold: thr,
    }
}

/// `Cpu::linear` of `x` `[m, k]` (f32) through [`int8_linear`]: the f32 `[m, n]` every
/// device's W8A8 GEMM is checked against.
fn cpu_int8_linear(
    cpu: &Cpu,
    x: &[f32],
    m: usize,
    (wq, ws, n, k): (&[i8], &[f32], usize, usize),
    thr: f32,
) -> Vec<f32> {
    let lin = int8_linear(cpu, (wq, ws, n, k), thr);
    let mut y = cpu.zeros(&[m, n], DType::F32).unwrap();
    let xt = cpu
        .upload(&HostTensor::f32(vec![m, k], x.to_vec()).unwrap())
        .unwrap();
    cpu.linear(&xt, &lin, &mut y).unwrap();
    cpu.download(&y).unwrap().to_f32().unwrap()
}

/// A NaN or an infinity among the activations must reach the outputs of its row, on the CPU
/// and on every device: rounded to int8 as if it were 0 (what a max that skips NaN and a cast
/// that saturates give) it would leave a damaged model or a diverged adapter answering
/// normally. The other rows stay exactly the CPU's.
#[test]
fn non_finite_activations_reach_their_rows_outputs() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(34);
    let (m, n, k) = (6, 24, 80);
    let mut x = activations(&mut rng, m, k, &[]);
    x[k + 10] = bf16::NAN; // row 1, an ordinary column
    x[3 * k + 20] = bf16::INFINITY; // row 3: an outlier column at threshold 6
    x[4 * k + 30] = bf16::NEG_INFINITY; // row 4
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
    let (wq, ws) = quantize_rows(&w, n, k);
    let bad_rows = [1, 3, 4];
    for thr in [0.0f32, 6.0] {
        let (q, sx, _) = quantize_activations(&xf, m, k, thr);
        assert!(sx[1].is_nan(), "thr {thr}: a NaN makes its row's scale NaN");
        assert!(q[k..2 * k].iter().all(|&v| v == 0), "thr {thr}");
        let y = cpu_int8_linear(&cpu, &xf, m, (&wq, &ws, n, k), thr);
        for r in 0..m {
            let row = &y[r * n..(r + 1) * n];
            if bad_rows.contains(&r) {
                assert!(
                    row.iter().all(|v| !v.is_finite()),
                    "cpu thr {thr}: row {r} {row:?}"
                );
            } else {
                assert!(row.iter().all(|v| v.is_finite()), "cpu thr {thr}: row {r}");
            }
        }
        for dev in devices() {
            // Every device quantizes like the CPU: the same int8 values (a NaN ratio is 0, not
            // a clamped -127) and a NaN scale where the CPU's is NaN.
            let mut sc = Int8Scratch::new(&dev, m, k).unwrap();
            dev.write(&mut sc.sx, &vec![-1.0f32; m]).unwrap();
            let dx = dev.upload(&x).unwrap();
            w8a8::quantize_activations(&dev, &dx, m, k, thr, &mut sc).unwrap();
            assert_eq!(
                dev.download(&sc.xq).unwrap()[..m * k],
                q[..],
                "{}",
                dev.name()
            );
            let got_s = dev.download(&sc.sx).unwrap();
            for r in 0..m {
                let same =
                    got_s[r].to_bits() == sx[r].to_bits() || (got_s[r].is_nan() && sx[r].is_nan());
                assert!(
                    same,
                    "{} thr {thr}: sx row {r} {} vs cpu {}",
                    dev.name(),
                    got_s[r],
                    sx[r]
                );
            }
            let (dwq, dws) = (dev.upload(&wq).unwrap(), dev.upload(&ws).unwrap());
            let mut out = dev.upload(&vec![bf16::from_f32(-7777.0); m * n]).unwrap();
            w8a8::linear_w8a8(
                &dev, &dx, m, k, &dwq, &dws, n, thr, &mut sc, None, None, &mut out, None,
            )
            .unwrap();
            let got = dev.download(&out).unwrap();
            for i in 0..m * n {
                let (g, c) = (got[i], bf16::from_f32(y[i]));
                let ok = if y[i].is_finite() {
                    g.to_bits() == c.to_bits()
                } else {
                    !g.to_f32().is_finite()
                };
                assert!(ok, "{} thr {thr}: y[{i}] {g} vs cpu {}", dev.name(), y[i]);
            }
        }
    }
}

#[test]
fn w8a8_linear_matches_the_cpu_reference_bit_for_bit() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(33);
    for dev in devices() {
        for (m, n, k) in SHAPES {
            let outl: Vec<usize> = if k > 40 { vec![1, k / 3] } else { vec![] };
            let x = activations(&mut rng, m, k, &outl);
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
            let (wq, ws) = quantize_rows(&w, n, k);
            let res: Vec<bf16> = (0..m * n).map(|_| bf16::from_f32(rng.normal())).collect();
            for (thr, with_res, tile) in tiles(&dev)
                .into_iter()
                .flat_map(|t| [(6.0f32, false, t), (0.0, true, t), (6.0, true, t)])
            {
                // CPU: f32 y from Cpu::linear, plus the residual in f32, rounded to bf16 once.
                let y = cpu_int8_linear(&cpu, &xf, m, (&wq, &ws, n, k), thr);
                let want: Vec<u16> = y
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        bf16::from_f32(if with_res { v + res[i].to_f32() } else { *v }).to_bits()
                    })
                    .collect();

                let mut s = Int8Scratch::new(&dev, m, k).unwrap();
                let (dx, dwq, dws) = (
                    dev.upload(&x).unwrap(),
                    dev.upload(&wq).unwrap(),
                    dev.upload(&ws).unwrap(),
                );
                let dres = dev.upload(&res).unwrap();
                let mut out = dev.upload(&vec![bf16::NAN; m * n]).unwrap();
                w8a8::linear_w8a8(
                    &dev,
                    &dx,
                    m,
                    k,
                    &dwq,
                    &dws,
                    n,
                    thr,
                    &mut s,
                    None,
                    with_res.then_some(&dres),
                    &mut out,
                    Some(tile),
                )
                .unwrap();
                let got: Vec<u16> = dev
                    .download(&out)
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                for i in 0..m * n {
                    assert_eq!(
                        got[i],
                        want[i],
                        "{}: {tile:?} {m}×{n}×{k} thr {thr} residual {with_res} element {i}: {} vs {}",
                        dev.name(),
                        bf16::from_bits(got[i]),
                        bf16::from_bits(want[i])
                    );
                }
            }
        }
    }
}

#[test]
fn w8a8_wrappers_check_shapes() {
    let dev = Device::sim();
    let mut s = Int8Scratch::new(&dev, 4, 64).unwrap();
    let x = dev.upload(&vec![bf16::ZERO; 4 * 40]).unwrap();
    let e = w8a8::quantize_activations(&dev, &x, 4, 40, 6.0, &mut s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 16"), "{e}");
    let x = dev.upload(&vec![bf16::ZERO; 8 * 64]).unwrap();
    let e = w8a8::quantize_activations(&dev, &x, 8, 64, 6.0, &mut s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scratch"), "{e}");
}

#[test]
fn w8a16_backward_matches_the_cpu_reference() {
    use recforge::backend::gpu::ops::w8a16;
    let cpu = Cpu::new();
    let mut rng = Rng::new(34);
    // (M, N = out features, K = in features): N multiples of 8, K of 16, odd M; (150, 200,
    // 272) and (129, 280, 144) span two 128-row tiles and 3 of 128 columns (partial), with 7 and 9
    // steps of 32 over N (the last partial) so the 128 tile's 3-stage dY ring and W double buffer
    // wrap around; the wgmma tile (steps of 64) wraps them with 5 and 9 steps (the last).
    for (m, n, k) in [
        (1, 8, 16),
        (7, 40, 48),
        (64, 64, 64),
        (33, 200, 80),
        (100, 24, 144),
        (150, 200, 272),
        (129, 280, 144),
        (70, 520, 48),
    ] {
        let dy: Vec<bf16> = (0..m * n).map(|_| bf16::from_f32(rng.normal())).collect();
        let dyf: Vec<f32> = dy.iter().map(|v| v.to_f32()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
        let (wq, ws) = quantize_rows(&w, n, k);
        let lin = int8_linear(&cpu, (&wq, &ws, n, k), 6.0);
        let mut want = cpu.zeros(&[m, k], DType::F32).unwrap();
        cpu.linear_backward_input(
            &cpu.upload(&HostTensor::f32(vec![m, n], dyf.clone()).unwrap())
                .unwrap(),
            &lin,
            &mut want,
            false,
        )
        .unwrap();
        let want = cpu.download(&want).unwrap().to_f32().unwrap();
        // Σ|dy·sw·wq| per output: the scale of the rounding errors.
        let mag: Vec<f32> = (0..m * k)
            .map(|i| {
                (0..n)
                    .map(|j| (dyf[i / k * n + j] * ws[j] * wq[j * k + i % k] as f32).abs())
                    .sum()
            })
            .collect();
        let prior: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.normal())).collect();
        for dev in devices() {
            let dx_tiles = tiles(&dev); // the W8A8 set: 64, 128, and wg where the device has it
            for (accumulate, tile) in [false, true]
                .into_iter()
                .flat_map(|a| dx_tiles.iter().map(move |&t| (a, t)))
            {
                let (ddy, dwq, dws) = (
                    dev.upload(&dy).unwrap(),
                    dev.upload(&wq).unwrap(),
                    dev.upload(&ws).unwrap(),
                );
                let mut dx = dev
                    .upload(&if accumulate {
                        prior.clone()
                    } else {
                        vec![bf16::NAN; m * k]
                    })
                    .unwrap();
                w8a16::linear_backward_input(
                    &dev,
                    &ddy,
                    &dwq,
                    &dws,
                    &mut dx,
                    m,
                    n,
                    k,
                    accumulate,
                    Some(tile),
                )
                .unwrap();
                let got = dev.download(&dx).unwrap();
                for i in 0..m * k {
                    let base = if accumulate { prior[i].to_f32() } else { 0.0 };
                    let want_i = want[i] + base;
                    // Each term's factor dy·sw (64 tile) or wq·sw (128, wg) is rounded to
                    // bf16 once (at most half an ulp, 2^-8 relative, so at most 2^-8·Σ|term|
                    // in all), f32 accumulation adds ~n·2^-24 of it, and the output is rounded
                    // to bf16 (2^-8 of |dx|).
                    let tol = mag[i] / 256.0 + want_i.abs() / 256.0 + 1e-6;
                    let g = got[i].to_f32();
                    assert!(
                        (g - want_i).abs() <= tol,
                        "{}: {tile:?} {m}×{n}×{k} acc={accumulate} element {i}: {g} vs {want_i}",
                        dev.name()
                    );
                }
            }
        }
    }
    let dev = Device::sim();
    let z = |n: usize| dev.upload(&vec![bf16::ZERO; n]).unwrap();
    let e = w8a16::linear_backward_input(
        &dev,
        &z(12),
        &dev.upload(&[0i8; 48]).unwrap(),
        &dev.upload(&[0f32; 3]).unwrap(),
        &mut z(64),
        4,
        3,
        16,
        false,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("multiple of 8"), "{e}");
}

#[test]
fn dense_backward_input_matches_the_cpu_reference() {
    use recforge::backend::gpu::ops::w8a16;
    let cpu = Cpu::new();
    let mut rng = Rng::new(35);
    // (M, N = vocabulary, K = hidden): odd vocabularies (rows not 16-byte aligned: the 64 tile
    // only) included; the last spans two 128-row tiles, 2 of 128 columns and 9 steps over N.
    for (m, n, k) in [
        (1, 8, 16),
        (5, 279, 64),
        (70, 33, 48),
        (64, 128, 128),
        (3, 1001, 32),
        (131, 272, 160),
    ] {
        let dy: Vec<bf16> = (0..m * n).map(|_| bf16::from_f32(rng.normal())).collect();
        let w: Vec<bf16> = (0..n * k)
            .map(|_| bf16::from_f32(0.05 * rng.normal()))
            .collect();
        let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let (dyf, wf) = (f(&dy), f(&w));
        let lin = Linear {
            weight: LinearWeight::Dense(
                cpu.upload(&HostTensor::f32(vec![n, k], wf.clone()).unwrap())
                    .unwrap(),
            ),
            out_features: n,
            in_features: k,
            outlier_threshold: 0.0,
        };
        // With accumulate, dx starts from a prior gradient (the CPU reference adds to it too);
        // without, from NaN poison that every element must overwrite.
        let prior: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.normal())).collect();
        for accumulate in [false, true] {
            let mut want = cpu
                .upload(&HostTensor::f32(vec![m, k], f(&prior)).unwrap())
                .unwrap();
            cpu.linear_backward_input(
                &cpu.upload(&HostTensor::f32(vec![m, n], dyf.clone()).unwrap())
                    .unwrap(),
                &lin,
                &mut want,
                accumulate,
            )
            .unwrap();
            let want = cpu.download(&want).unwrap().to_f32().unwrap();
            let devs = devices();
            for (dev, tile) in devs.iter().flat_map(|d| [(d, Tile::T64), (d, Tile::T128)]) {
                let start = if accumulate {
                    prior.clone()
                } else {
                    vec![bf16::NAN; m * k]
                };
                let mut dx = dev.upload(&start).unwrap();
                let run = w8a16::dense_backward_input(
                    dev,
                    &dev.upload(&dy).unwrap(),
                    &dev.upload(&w).unwrap(),
                    &mut dx,
                    m,
                    n,
                    k,
                    accumulate,
                    Some(tile),
                );
                if tile == Tile::T128 && n % 8 != 0 {
                    let e = run.unwrap_err().to_string();
                    assert!(e.contains("multiple of 8"), "{e}");
                    continue;
                }
                run.unwrap();
                let got = dev.download(&dx).unwrap();
                for i in 0..m * k {
                    // Exact bf16 products, f32 sums (~n·2^-24 of Σ|term|), the prior added in
                    // f32 (exact: it is bf16), one bf16 rounding out.
                    let mag: f32 = (0..n)
                        .map(|j| (dyf[i / k * n + j] * wf[j * k + i % k]).abs())
                        .sum();
                    let tol = mag * 1e-5 + want[i].abs() / 256.0 + 1e-6;
                    let g = got[i].to_f32();
                    assert!(
                        (g - want[i]).abs() <= tol,
                        "{}: {tile:?} {m}×{n}×{k} acc={accumulate} element {i}: {g} vs {}",
                        dev.name(),
                        want[i]
                    );
                }
            }
        }
    }
}

/// Relative agreement with a scale: |a − b| ≤ rel · mag + abs.
fn close(a: f32, b: f32, mag: f32, rel: f32) -> bool {
    (a - b).abs() <= rel * mag + 1e-6
}

#[test]
fn gated_lora_forward_and_backward_match_the_cpu_reference() {
    use recforge::backend::gpu::ops::lora::{self, DevLora, LoraGrads};
    use recforge::backend::{Dropout, Lora};
    let cpu = Cpu::new();
    let mut rng = Rng::new(35);
    // (M, K, N, R): two adapters of rank 8 concatenated (R = 16) gated one-hot per row, a
    // single odd rank with a soft gate, and three adapters (R = 24: two blocks of ranks in the
    // weight-gradient kernels) over rows and columns that fill no warp or block evenly, and
    // rows longer than a block of 256 threads (K, N > 256: every warp holds a share of the
    // down-projection's and dp's sums, and some threads two columns).
    for (m, k, n, r, one_hot) in [
        (5, 48, 40, 16, true),
        (70, 100, 70, 24, true),
        (9, 300, 260, 8, false),
        (33, 80, 24, 5, false),
        (1, 16, 8, 1, false),
    ] {
        let x: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.normal())).collect();
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let a: Vec<f32> = (0..r * k).map(|_| 0.2 * rng.normal()).collect();
        let b: Vec<f32> = (0..n * r).map(|_| 0.2 * rng.normal()).collect();
        let gate: Vec<f32> = (0..m * r)
            .map(|i| {
                if one_hot {
                    ((i % r) / 8 == (i / r) % 2) as u8 as f32
                } else {
                    rng.uniform()
                }
            })
            .collect();
        let dy: Vec<bf16> = (0..m * n).map(|_| bf16::from_f32(rng.normal())).collect();
        let dyf: Vec<f32> = dy.iter().map(|v| v.to_f32()).collect();
        let drop = Dropout {
            p: 0.25,
            seed: 0xC0FFEE,
        };
        let scale = 2.0;
        // CPU reference.
        let up = |v: &[f32], s: &[usize]| {
            cpu.upload(&HostTensor::f32(s.to_vec(), v.to_vec()).unwrap())
                .unwrap()
        };
        let cl = Lora {
            a: up(&a, &[r, k]),
            b: up(&b, &[n, r]),
            scale,
        };
        let (xt, gt) = (up(&xf, &[m, k]), up(&gate, &[m, r]));
        let mut ch = cpu.zeros(&[m, r], DType::F32).unwrap();
        let mut cu = cpu.zeros(&[m, r], DType::F32).unwrap();
        let mut cy = cpu.zeros(&[m, n], DType::F32).unwrap();
        cpu.lora_forward(&xt, &cl, &gt, drop, &mut ch, &mut cu, &mut cy)
            .unwrap();
        let mut cda = cpu.zeros(&[r, k], DType::F32).unwrap();
        let mut cdb = cpu.zeros(&[n, r], DType::F32).unwrap();
        let mut cdg = cpu.zeros(&[m, r], DType::F32).unwrap();
        let mut cdx = cpu.zeros(&[m, k], DType::F32).unwrap();
        cpu.lora_backward(
            &xt,
            &cl,
            &gt,
            drop,
            &ch,
            &cu,
            &up(&dyf, &[m, n]),
            &mut cda,
            &mut cdb,
            &mut cdg,
            &mut cdx,
        )
        .unwrap();
        let f = |t: &recforge::backend::Tensor<Cpu>| cpu.download(t).unwrap().to_f32().unwrap();
        let (wh, wu, wy, wda, wdb, wdg, wdx) =
            (f(&ch), f(&cu), f(&cy), f(&cda), f(&cdb), f(&cdg), f(&cdx));
        // Magnitudes for the tolerances: sums of |terms| in f32 on both sides, reassociated.
        let hmag: Vec<f32> = (0..m * r)
            .map(|i| {
                (0..k)
                    .map(|c| (xf[i / r * k + c] * a[i % r * k + c]).abs())
                    .sum::<f32>()
                    * 4.0
                    / 3.0
            })
            .collect();
        for dev in devices() {
            let dl = DevLora {
                a: dev.upload(&a).unwrap(),
                b: dev.upload(&b).unwrap(),
                rank: r,
                k,
                n,
                scale,
            };
            let (dx_, dg_) = (dev.upload(&x).unwrap(), dev.upload(&gate).unwrap());
            let mut h = dev.upload(&vec![f32::NAN; m * r]).unwrap();
            let mut u = dev.upload(&vec![f32::NAN; m * r]).unwrap();
            lora::lora_down(&dev, &dx_, &dl.view(), &dg_, drop, &mut h, &mut u, m).unwrap();
            let (gh, gu) = (dev.download(&h).unwrap(), dev.download(&u).unwrap());
            for i in 0..m * r {
                // Different summation order over k terms: k·2^-24 of Σ|terms|.
                assert!(
                    close(gh[i], wh[i], hmag[i], k as f32 * 6e-8 * 2.0),
                    "{}: h[{i}] {} vs {}",
                    dev.name(),
                    gh[i],
                    wh[i]
                );
                assert!(
                    close(gu[i], wu[i], hmag[i], k as f32 * 6e-8 * 2.0),
                    "{}: u[{i}]",
                    dev.name()
                );
            }
            // The up-projection through the W8A8 epilogue: compare against the CPU linear + LoRA.
            if k % 16 == 0 {
                let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
                let (wq, ws) = quantize_rows(&w, n, k);
                let lin = int8_linear(&cpu, (&wq, &ws, n, k), 6.0);
                let mut base = cpu.zeros(&[m, n], DType::F32).unwrap();
                cpu.linear(&xt, &lin, &mut base).unwrap();
                let base = f(&base);
                let mut s = Int8Scratch::new(&dev, m, k).unwrap();
                for tile in tiles(&dev) {
                    let mut out = dev.upload(&vec![bf16::NAN; m * n]).unwrap();
                    let lup = w8a8::LoraUp {
                        u: &u,
                        b: &dl.b,
                        rank: r,
                        scale,
                    };
                    w8a8::linear_w8a8(
                        &dev,
                        &dx_,
                        m,
                        k,
                        &dev.upload(&wq).unwrap(),
                        &dev.upload(&ws).unwrap(),
                        n,
                        6.0,
                        &mut s,
                        Some(lup),
                        None,
                        &mut out,
                        Some(tile),
                    )
                    .unwrap();
                    let got = dev.download(&out).unwrap();
                    for i in 0..m * n {
                        let want = base[i] + wy[i];
                        // bf16 output rounding (half an ulp: 2^-8 relative) plus the reassociated u (above) times |B|·scale.
                        let umag: f32 = (0..r)
                            .map(|j| (wu[i / n * r + j] * b[i % n * r + j]).abs())
                            .sum::<f32>()
                            * scale;
                        assert!(
                            close(got[i].to_f32(), want, want.abs() / 256.0 + umag * 1e-4, 1.0),
                            "{}: {tile:?} y[{i}] {} vs {want}",
                            dev.name(),
                            got[i]
                        );
                    }
                }
            }
            // Backward, accumulating into non-zero dA / dB / dx.
            let da0: Vec<f32> = (0..r * k).map(|_| rng.normal()).collect();
            let db0: Vec<f32> = (0..n * r).map(|_| rng.normal()).collect();
            let dx0: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.normal())).collect();
            let mut da = dev.upload(&da0).unwrap();
            let mut db = dev.upload(&db0).unwrap();
            let mut dgate = dev.upload(&vec![f32::NAN; m * r]).unwrap();
            let mut dh = dev.upload(&vec![f32::NAN; m * r]).unwrap();
            let mut dxb = dev.upload(&dx0).unwrap();
            let grads = LoraGrads {
                da: &mut da,
                db: &mut db,
                dgate: &mut dgate,
                dh: &mut dh,
                dx: &mut dxb,
            };
            lora::lora_backward(
                &dev,
                &dx_,
                &dl.view(),
                &dg_,
                drop,
                &h,
                &u,
                &dev.upload(&dy).unwrap(),
                grads,
                m,
            )
            .unwrap();
            let (gda, gdb, gdg, gdx) = (
                dev.download(&da).unwrap(),
                dev.download(&db).unwrap(),
                dev.download(&dgate).unwrap(),
                dev.download(&dxb).unwrap(),
            );
            // Each gradient is a sum of products of O(1) values over M, N or R terms, computed in
            // a different order than the CPU: 1e-4 of the accumulated magnitude bounds it for these
            // sizes (≤ 80 terms, 2^-24 each, with margin for the reassociated h and u).
            let bound = |n_terms: usize| n_terms as f32 * 2e-6 + 1e-4;
            for i in 0..r * k {
                assert!(
                    close(gda[i], da0[i] + wda[i], 1.0 + wda[i].abs(), bound(m)),
                    "{}: dA[{i}] {} vs {}",
                    dev.name(),
                    gda[i],
                    da0[i] + wda[i]
                );
            }
            for i in 0..n * r {
                assert!(
                    close(gdb[i], db0[i] + wdb[i], 1.0 + wdb[i].abs(), bound(m)),
                    "{}: dB[{i}]",
                    dev.name()
                );
            }
            for i in 0..m * r {
                assert!(
                    close(gdg[i], wdg[i], 1.0 + wdg[i].abs(), bound(n)),
                    "{}: dgate[{i}] {} vs {}",
                    dev.name(),
                    gdg[i],
                    wdg[i]
                );
            }
            for i in 0..m * k {
                // dx is accumulated in bf16: one rounding of the sum (half an ulp: 2^-8 relative).
                let want = dx0[i].to_f32() + wdx[i];
                assert!(
                    close(gdx[i].to_f32(), want, want.abs() / 256.0 + bound(r), 1.0),
                    "{}: dx[{i}] {} vs {want}",
                    dev.name(),
                    gdx[i]
                );
            }
        }
    }
}

#[test]
fn decode_gemv_matches_the_dense_dequantized_reference() {
    use recforge::backend::gpu::ops::w8a16;
    let cpu = Cpu::new();
    let mut rng = Rng::new(36);
    for (m, n, k) in [
        (1, 1, 16),
        (1, 37, 576),
        (4, 100, 48),
        (9, 13, 1040),
        (16, 64, 512),
    ] {
        let x: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.normal())).collect();
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
        let (wq, ws) = quantize_rows(&w, n, k);
        let deq: Vec<f32> = (0..n * k).map(|i| wq[i] as f32 * ws[i / k]).collect();
        let dense = Linear {
            weight: LinearWeight::Dense(
                cpu.upload(&HostTensor::f32(vec![n, k], deq).unwrap())
                    .unwrap(),
            ),
            out_features: n,
            in_features: k,
            outlier_threshold: 0.0,
        };
        let mut want = cpu.zeros(&[m, n], DType::F32).unwrap();
        cpu.linear(
            &cpu.upload(&HostTensor::f32(vec![m, k], xf.clone()).unwrap())
                .unwrap(),
            &dense,
            &mut want,
        )
        .unwrap();
        let want = cpu.download(&want).unwrap().to_f32().unwrap();
        let res: Vec<bf16> = (0..m * n).map(|_| bf16::from_f32(rng.normal())).collect();
        for dev in devices() {
            for with_res in [false, true] {
                let mut y = dev.upload(&vec![bf16::NAN; m * n]).unwrap();
                let dres = dev.upload(&res).unwrap();
                w8a16::gemv(
                    &dev,
                    &dev.upload(&x).unwrap(),
                    &dev.upload(&wq).unwrap(),
                    &dev.upload(&ws).unwrap(),
                    with_res.then_some(&dres),
                    &mut y,
                    m,
                    n,
                    k,
                )
                .unwrap();
                let got = dev.download(&y).unwrap();
                for i in 0..m * n {
                    let wv = want[i] + if with_res { res[i].to_f32() } else { 0.0 };
                    // Σ|x·w| bounds the reassociation error (k·2^-24 of it); the output is bf16.
                    let mag: f32 = (0..k)
                        .map(|c| (xf[i / n * k + c] * wq[i % n * k + c] as f32 * ws[i % n]).abs())
                        .sum();
                    assert!(
                        (got[i].to_f32() - wv).abs()
                            <= wv.abs() / 256.0 + k as f32 * 1.2e-7 * mag + 1e-6,
                        "{}: {m}×{n}×{k} y[{i}] {} vs {wv}",
                        dev.name(),
                        got[i]
                    );
                }
            }
        }
    }
}

#[test]
fn per_sample_lora_gradient_norms_match_the_cpu() {
    use recforge::backend::gpu::ops::lora::{self, DevLora, SampleNormScratch};
    use recforge::backend::{Dropout, Lora};
    let cpu = Cpu::new();
    let mut rng = Rng::new(37);
    let (k, n, r) = (48, 40, 8);
    let samples = [(0usize, 5usize), (5, 1), (6, 0), (6, 11)];
    let m = 17;
    let x: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.normal())).collect();
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let a: Vec<f32> = (0..r * k).map(|_| 0.2 * rng.normal()).collect();
    let b: Vec<f32> = (0..n * r).map(|_| 0.2 * rng.normal()).collect();
    let gate: Vec<f32> = (0..m * r).map(|_| rng.uniform()).collect();
    let dy: Vec<bf16> = (0..m * n).map(|_| bf16::from_f32(rng.normal())).collect();
    let dyf: Vec<f32> = dy.iter().map(|v| v.to_f32()).collect();
    let up = |v: &[f32], s: &[usize]| {
        cpu.upload(&HostTensor::f32(s.to_vec(), v.to_vec()).unwrap())
            .unwrap()
    };
    let f = |t: &recforge::backend::Tensor<Cpu>| cpu.download(t).unwrap().to_f32().unwrap();
    // CPU: each sample's rows alone through lora_forward + lora_backward into zeroed dA, dB.
    let want: Vec<f32> = samples
        .iter()
        .map(|&(s0, len)| {
            if len == 0 {
                return 0.0;
            }
            let cl = Lora {
                a: up(&a, &[r, k]),
                b: up(&b, &[n, r]),
                scale: 2.0,
            };
            let xs = up(&xf[s0 * k..(s0 + len) * k], &[len, k]);
            let gs = up(&gate[s0 * r..(s0 + len) * r], &[len, r]);
            let mut h = cpu.zeros(&[len, r], DType::F32).unwrap();
            let mut u = cpu.zeros(&[len, r], DType::F32).unwrap();
            let mut y = cpu.zeros(&[len, n], DType::F32).unwrap();
            cpu.lora_forward(&xs, &cl, &gs, Dropout::NONE, &mut h, &mut u, &mut y)
                .unwrap();
            let mut da = cpu.zeros(&[r, k], DType::F32).unwrap();
            let mut db = cpu.zeros(&[n, r], DType::F32).unwrap();
            let mut dg = cpu.zeros(&[len, r], DType::F32).unwrap();
            let mut dx = cpu.zeros(&[len, k], DType::F32).unwrap();
            cpu.lora_backward(
                &xs,
                &cl,
                &gs,
                Dropout::NONE,
                &h,
                &u,
                &up(&dyf[s0 * n..(s0 + len) * n], &[len, n]),
                &mut da,
                &mut db,
                &mut dg,
                &mut dx,
            )
            .unwrap();
            f(&da).iter().chain(f(&db).iter()).map(|v| v * v).sum()
        })
        .collect();
    assert!(want[0] > 0.0 && want[2] == 0.0);
    // The CPU backend's own op (the definition in f64, every sample of the batch at once).
    {
        let cl = Lora {
            a: up(&a, &[r, k]),
            b: up(&b, &[n, r]),
            scale: 2.0,
        };
        let (xs, gs) = (up(&xf, &[m, k]), up(&gate, &[m, r]));
        let mut h = cpu.zeros(&[m, r], DType::F32).unwrap();
        let mut u = cpu.zeros(&[m, r], DType::F32).unwrap();
        let mut y = cpu.zeros(&[m, n], DType::F32).unwrap();
        cpu.lora_forward(&xs, &cl, &gs, Dropout::NONE, &mut h, &mut u, &mut y)
            .unwrap();
        let dys = up(&dyf, &[m, n]);
        let got = cpu
            .lora_sample_grad_sq_norms(&xs, &cl, &gs, &h, &u, &dys, &samples)
            .unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // f64 sums against f32 GEMMs of ≤ 11 rows: ~1e-6 relative apart.
            assert!(
                (g - w).abs() <= 1e-5 * w.abs(),
                "cpu op: sample {i}: {g} vs {w}"
            );
        }
        let e = cpu
            .lora_sample_grad_sq_norms(&xs, &cl, &gs, &h, &u, &dys, &[(10, 9)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceed"), "{e}");
    }
    for dev in devices() {
        let dl = DevLora {
            a: dev.upload(&a).unwrap(),
            b: dev.upload(&b).unwrap(),
            rank: r,
            k,
            n,
            scale: 2.0,
        };
        let (dx_, dg_) = (dev.upload(&x).unwrap(), dev.upload(&gate).unwrap());
        let mut h = dev.alloc_zeros::<f32>(m * r).unwrap();
        let mut u = dev.alloc_zeros::<f32>(m * r).unwrap();
        lora::lora_down(
            &dev,
            &dx_,
            &dl.view(),
            &dg_,
            Dropout::NONE,
            &mut h,
            &mut u,
            m,
        )
        .unwrap();
        let dyd = dev.upload(&dy).unwrap();
        let norms = |of: &[(usize, usize)], s: &mut SampleNormScratch| {
            lora::sample_grad_sq_norms(&dev, &dx_, &dl.view(), &dg_, &h, &u, &dyd, of, s)
        };
        let mut s = SampleNormScratch::new(&dev, &dl.view(), 11, samples.len()).unwrap();
        // Poisoned: every sample's two sums, the empty sample's included, must be written.
        s.out = dev.upload(&vec![f32::NAN; 2 * samples.len()]).unwrap();
        let got = norms(&samples, &mut s).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Sums of squares of gradients that each carry ~1e-5 relative reassociation error.
            assert!(
                (g - w).abs() <= 1e-4 * w.abs() + 1e-6,
                "{}: sample {i}: {g} vs {w}",
                dev.name()
            );
        }
        let e = norms(&[(10, 9)], &mut s).unwrap_err().to_string();
        assert!(e.contains("exceed"), "{e}");
        let more: Vec<(usize, usize)> = (0..samples.len() + 1).map(|i| (i, 1)).collect();
        let e = norms(&more, &mut s).unwrap_err().to_string();
        assert!(e.contains("holds sums for"), "{e}");
    }
}

#[test]
fn dense_bf16_gemm_matches_the_cpu_reference() {
    use recforge::backend::gpu::ops::dense;
    let cpu = Cpu::new();
    let mut rng = Rng::new(38);
    for (m, n, k) in [(1, 279, 64), (7, 49, 576), (65, 130, 72)] {
        let a: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.normal())).collect();
        let b: Vec<bf16> = (0..n * k)
            .map(|_| bf16::from_f32(0.1 * rng.normal()))
            .collect();
        let (af, bfl): (Vec<f32>, Vec<f32>) = (
            a.iter().map(|v| v.to_f32()).collect(),
            b.iter().map(|v| v.to_f32()).collect(),
        );
        let lin = Linear {
            weight: LinearWeight::Dense(
                cpu.upload(&HostTensor::f32(vec![n, k], bfl.clone()).unwrap())
                    .unwrap(),
            ),
            out_features: n,
            in_features: k,
            outlier_threshold: 0.0,
        };
        let mut want = cpu.zeros(&[m, n], DType::F32).unwrap();
        cpu.linear(
            &cpu.upload(&HostTensor::f32(vec![m, k], af.clone()).unwrap())
                .unwrap(),
            &lin,
            &mut want,
        )
        .unwrap();
        let want = cpu.download(&want).unwrap().to_f32().unwrap();
        for dev in devices() {
            let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
            let mut c32 = dev.upload(&vec![f32::NAN; m * n]).unwrap();
            dense::gemm(&dev, &da, &db, &mut c32, m, n, k).unwrap();
            let mut c16 = dev.upload(&vec![bf16::NAN; m * n]).unwrap();
            dense::gemm(&dev, &da, &db, &mut c16, m, n, k).unwrap();
            let (g32, g16) = (dev.download(&c32).unwrap(), dev.download(&c16).unwrap());
            for i in 0..m * n {
                // Exact bf16 products, f32 sums in another order: k·2^-24 of Σ|a·b|.
                let mag: f32 = (0..k)
                    .map(|j| (af[i / n * k + j] * bfl[i % n * k + j]).abs())
                    .sum();
                let tol = k as f32 * 6e-8 * mag + 1e-7;
                assert!(
                    (g32[i] - want[i]).abs() <= tol,
                    "{}: {m}×{n}×{k} [{i}] {} vs {}",
                    dev.name(),
                    g32[i],
                    want[i]
                );
                assert!(
                    (g16[i].to_f32() - want[i]).abs() <= tol + want[i].abs() / 256.0,
                    "{}: bf16 out [{i}]",
                    dev.name()
                );
            }
        }
    }
}
