//! Causal GQA attention forward against `Cpu::attention` (and the logsumexp against its
//! definition), on the simulator always and on CUDA when a GPU is usable. Outputs poisoned.

mod common;

use common::devices;
use half::bf16;
use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::ops::attention::{
    attention_forward, attention_forward_with, AttnInputs, AttnKernel, AttnShape,
};
use recforge::backend::gpu::Device;
use recforge::backend::{Backend, SeqSpan};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

struct Case {
    heads: usize,
    kv_heads: usize,
    hd: usize,
    /// (q_len, kv_len, first query position): a prefill chunk has q_len = kv_len and starts at 0;
    /// a decode step has q_len = 1 at position kv_len − 1.
    seqs: Vec<(usize, usize, usize)>,
}

#[test]
fn attention_forward_matches_the_cpu_reference() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(41);
    let cases = [
        // SmolLM2 geometry: 9 query heads on 3 KV heads, head_dim 64; three packed prompts.
        Case {
            heads: 9,
            kv_heads: 3,
            hd: 64,
            seqs: vec![(5, 5, 0), (1, 1, 0), (13, 13, 0)],
        },
        // LLaMA-7B-like heads (head_dim 128, no grouping), decode steps and a chunked prefill.
        Case {
            heads: 4,
            kv_heads: 4,
            hd: 128,
            seqs: vec![(1, 9, 8), (3, 20, 17), (1, 1, 0)],
        },
        // head_dim 32, one query head per KV pair group of 2.
        Case {
            heads: 2,
            kv_heads: 1,
            hd: 32,
            seqs: vec![(7, 7, 0)],
        },
        // Several 64-row query tiles and 64-key tiles, none of them full: a long prompt, a
        // chunked prefill (70 queries at positions 130.. over 200 keys), a decode step over 300
        // keys, and 65 = one full tile + 1.
        Case {
            heads: 6,
            kv_heads: 2,
            hd: 64,
            seqs: vec![(150, 150, 0), (70, 200, 130), (1, 300, 299), (65, 65, 0)],
        },
        Case {
            heads: 2,
            kv_heads: 2,
            hd: 128,
            seqs: vec![(129, 129, 0), (3, 77, 74)],
        },
    ];
    for c in cases {
        let (mut spans, mut positions) = (vec![], vec![]);
        let (mut tq, mut tk) = (0, 0);
        for &(ql, kl, p0) in &c.seqs {
            spans.push(SeqSpan {
                q_start: tq,
                q_len: ql,
                kv_start: tk,
                kv_len: kl,
            });
            positions.extend((0..ql).map(|i| (p0 + i) as u32));
            tq += ql;
            tk += kl;
        }
        let bf = |n: usize, rng: &mut Rng| {
            (0..n)
                .map(|_| bf16::from_f32(rng.normal()))
                .collect::<Vec<_>>()
        };
        let (q, k, v) = (
            bf(tq * c.heads * c.hd, &mut rng),
            bf(tk * c.kv_heads * c.hd, &mut rng),
            bf(tk * c.kv_heads * c.hd, &mut rng),
        );
        let f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let up = |x: Vec<f32>, s: &[usize]| {
            cpu.upload(&HostTensor::f32(s.to_vec(), x).unwrap())
                .unwrap()
        };
        let pos_t = cpu
            .upload(&HostTensor::new(vec![tq], HostData::U32(positions.clone())).unwrap())
            .unwrap();
        let mut want = cpu.zeros(&[tq, c.heads, c.hd], DType::F32).unwrap();
        cpu.attention(
            &up(f(&q), &[tq, c.heads, c.hd]),
            &up(f(&k), &[tk, c.kv_heads, c.hd]),
            &up(f(&v), &[tk, c.kv_heads, c.hd]),
            &pos_t,
            &spans,
            &mut want,
        )
        .unwrap();
        let want = cpu.download(&want).unwrap().to_f32().unwrap();
        // logsumexp from its definition, in f64.
        let (qf, kf) = (f(&q), f(&k));
        let mut want_lse = vec![0f64; tq * c.heads];
        for s in &spans {
            for i in 0..s.q_len {
                let t = s.q_start + i;
                let visible = (positions[t] as usize + 1).min(s.kv_len);
                for h in 0..c.heads {
                    let kh = h / (c.heads / c.kv_heads);
                    let z: f64 = (0..visible)
                        .map(|j| {
                            let dot: f64 = (0..c.hd)
                                .map(|d| {
                                    qf[(t * c.heads + h) * c.hd + d] as f64
                                        * kf[((s.kv_start + j) * c.kv_heads + kh) * c.hd + d] as f64
                                })
                                .sum();
                            (dot / (c.hd as f64).sqrt()).exp()
                        })
                        .sum();
                    want_lse[t * c.heads + h] = z.ln();
                }
            }
        }
        // Σ_j p_j·|v_j| per output element (f64): the tiled kernel rounds the weights p to bf16
        // (relative 2^-8 each: half an ulp of an 8-bit significand) before the P·V product, so
        // its output may differ from the exact one by up to 2^-8 of this.
        let vf = f(&v);
        let mut pv_abs = vec![0f64; tq * c.heads * c.hd];
        for s in &spans {
            for i in 0..s.q_len {
                let t = s.q_start + i;
                let visible = (positions[t] as usize + 1).min(s.kv_len);
                for h in 0..c.heads {
                    let kh = h / (c.heads / c.kv_heads);
                    let lse = want_lse[t * c.heads + h];
                    for j in 0..visible {
                        let kr = ((s.kv_start + j) * c.kv_heads + kh) * c.hd;
                        let dot: f64 = (0..c.hd)
                            .map(|d| qf[(t * c.heads + h) * c.hd + d] as f64 * kf[kr + d] as f64)
                            .sum();
                        let p = (dot / (c.hd as f64).sqrt() - lse).exp();
                        for d in 0..c.hd {
                            pv_abs[(t * c.heads + h) * c.hd + d] += p * (vf[kr + d] as f64).abs();
                        }
                    }
                }
            }
        }
        let shape = AttnShape {
            tq,
            tk,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.hd,
        };
        let devs = devices();
        for (dev, kernel) in devs
            .iter()
            .flat_map(|d| [AttnKernel::Auto, AttnKernel::PerRow].map(|k| (d, k)))
        {
            let tiled = kernel == AttnKernel::Auto && (c.hd == 64 || c.hd == 128);
            let mut out = dev.upload(&vec![bf16::NAN; tq * c.heads * c.hd]).unwrap();
            let mut lse = dev.upload(&vec![f32::NAN; tq * c.heads]).unwrap();
            let mut sb = dev.alloc_zeros::<i32>(4 * spans.len()).unwrap();
            let (qb, kb, vb) = (
                dev.upload(&q).unwrap(),
                dev.upload(&k).unwrap(),
                dev.upload(&v).unwrap(),
            );
            let pb = dev.upload(&positions).unwrap();
            let x = AttnInputs {
                q: &qb,
                k: &kb,
                v: &vb,
                positions: &pb,
                spans: &spans,
                shape,
            };
            attention_forward_with(dev, kernel, &x, &mut sb, &mut out, &mut lse).unwrap();
            let (got, gl) = (dev.download(&out).unwrap(), dev.download(&lse).unwrap());
            for i in 0..got.len() {
                // The output is a convex combination of O(1) values: bf16 rounding (2^-8 of it)
                // plus f32 softmax differences (expf / exp2f, online rescaling) of ~1e-6, plus for
                // the tiled kernel the bf16 weights (above).
                let g = got[i].to_f32();
                let pv = if tiled { pv_abs[i] / 256.0 } else { 0.0 };
                assert!(
                    (g - want[i]).abs() as f64 <= (want[i].abs() / 256.0 + 1e-4) as f64 + pv,
                    "{} {kernel:?}: out[{i}] {g} vs {}",
                    dev.name(),
                    want[i]
                );
            }
            for i in 0..gl.len() {
                assert!(
                    (gl[i] as f64 - want_lse[i]).abs() <= 1e-4 * (1.0 + want_lse[i].abs()),
                    "{} {kernel:?}: lse[{i}] {} vs {}",
                    dev.name(),
                    gl[i],
                    want_lse[i]
                );
            }
        }
    }
}

#[test]
fn attention_rejects_bad_geometry() {
    let dev = Device::sim();
    let z = |n: usize| dev.upload(&vec![bf16::ZERO; n]).unwrap();
    let mut out = z(2 * 48);
    let mut lse = dev.upload(&[0f32; 2]).unwrap();
    let mut sb = dev.alloc_zeros::<i32>(4).unwrap();
    let spans = [SeqSpan {
        q_start: 0,
        q_len: 1,
        kv_start: 0,
        kv_len: 1,
    }];
    let shape = AttnShape {
        tq: 1,
        tk: 1,
        heads: 2,
        kv_heads: 1,
        head_dim: 48,
    };
    let (q96, k48, pos0) = (z(96), z(48), dev.upload(&[0u32]).unwrap());
    let x = AttnInputs {
        q: &q96,
        k: &k48,
        v: &k48,
        positions: &pos0,
        spans: &spans,
        shape,
    };
    let e = attention_forward(&dev, &x, &mut sb, &mut out, &mut lse)
        .unwrap_err()
        .to_string();
    assert!(e.contains("head_dim 48"), "{e}");
    let shape = AttnShape {
        tq: 1,
        tk: 1,
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
    };
    let bad = [SeqSpan {
        q_start: 0,
        q_len: 1,
        kv_start: 0,
        kv_len: 5,
    }];
    let (q64, k32) = (z(64), z(32));
    let x = AttnInputs {
        q: &q64,
        k: &k32,
        v: &k32,
        positions: &pos0,
        spans: &bad,
        shape,
    };
    let e = attention_forward(
        &dev,
        &x,
        &mut sb,
        &mut z(64),
        &mut dev.upload(&[0f32; 2]).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("exceeds"), "{e}");
}

#[test]
fn attention_backward_matches_the_cpu_reference() {
    // Two packed prompts and a decode-style chunk; 6 query heads on 2 KV heads, head_dim 64.
    check_backward(6, 2, 64, &[(4, 4, 0), (9, 9, 0), (2, 7, 5)], 42);
    // Several 64-key and query tiles, none full: a 100-token prompt, a chunk of 70 queries at
    // positions 80.. over 150 keys, one query over 65 keys.
    check_backward(4, 2, 64, &[(100, 100, 0), (70, 150, 80), (1, 65, 64)], 43);
    // head_dim 128 (32-row query tiles in the backward), and the warp-per-row kernel at 32.
    check_backward(2, 2, 128, &[(80, 80, 0), (33, 40, 7)], 44);
    check_backward(2, 1, 32, &[(9, 9, 0), (3, 5, 2)], 45);
}

/// `seqs`: (q_len, kv_len, first query position) per packed sequence.
fn check_backward(
    heads: usize,
    kv_heads: usize,
    hd: usize,
    seqs: &[(usize, usize, usize)],
    seed: u64,
) {
    use recforge::backend::gpu::ops::attention::{
        attention_backward_with, AttnGradScratch, AttnGrads,
    };
    let cpu = Cpu::new();
    let mut rng = Rng::new(seed);
    let (mut spans, mut positions) = (vec![], vec![]);
    let (mut tq, mut tk) = (0, 0);
    for &(ql, kl, p0) in seqs {
        spans.push(SeqSpan {
            q_start: tq,
            q_len: ql,
            kv_start: tk,
            kv_len: kl,
        });
        positions.extend((0..ql).map(|i| (p0 + i) as u32));
        tq += ql;
        tk += kl;
    }
    let bf = |n: usize, rng: &mut Rng| {
        (0..n)
            .map(|_| bf16::from_f32(rng.normal()))
            .collect::<Vec<_>>()
    };
    let (q, k, v, dy) = (
        bf(tq * heads * hd, &mut rng),
        bf(tk * kv_heads * hd, &mut rng),
        bf(tk * kv_heads * hd, &mut rng),
        bf(tq * heads * hd, &mut rng),
    );
    let f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    let up = |x: Vec<f32>, s: &[usize]| {
        cpu.upload(&HostTensor::f32(s.to_vec(), x).unwrap())
            .unwrap()
    };
    let pos_t = cpu
        .upload(&HostTensor::new(vec![tq], HostData::U32(positions.clone())).unwrap())
        .unwrap();
    let mut cdq = cpu.zeros(&[tq, heads, hd], DType::F32).unwrap();
    let mut cdk = cpu.zeros(&[tk, kv_heads, hd], DType::F32).unwrap();
    let mut cdv = cpu.zeros(&[tk, kv_heads, hd], DType::F32).unwrap();
    cpu.attention_backward(
        &up(f(&q), &[tq, heads, hd]),
        &up(f(&k), &[tk, kv_heads, hd]),
        &up(f(&v), &[tk, kv_heads, hd]),
        &pos_t,
        &spans,
        &up(f(&dy), &[tq, heads, hd]),
        &mut cdq,
        &mut cdk,
        &mut cdv,
    )
    .unwrap();
    let dl = |t: &recforge::backend::Tensor<Cpu>| cpu.download(t).unwrap().to_f32().unwrap();
    let (wq, wk, wv) = (dl(&cdq), dl(&cdk), dl(&cdv));

    // What the tiled kernels' bf16 roundings may add (f64, first order): P and dS enter their
    // products as bf16 (relative 2^-8 each), and D = Σ dy·O uses the forward's bf16 O, itself
    // off by up to 2^-8 (|O| + Σ_j p_j|v_j|).
    let has_tiled = hd == 64 || hd == 128;
    let (qf, kf, vf, gf) = (f(&q), f(&k), f(&v), f(&dy));
    let scale = 1.0 / (hd as f64).sqrt();
    let u = 1.0 / 256.0;
    let (mut bq, mut bk, mut bv) = (
        vec![0f64; wq.len()],
        vec![0f64; wk.len()],
        vec![0f64; wv.len()],
    );
    for s in &spans {
        for i in 0..s.q_len {
            let t = s.q_start + i;
            let visible = (positions[t] as usize + 1).min(s.kv_len);
            for h in 0..heads {
                let kh = h / (heads / kv_heads);
                let qr = (t * heads + h) * hd;
                let kr = |j: usize| ((s.kv_start + j) * kv_heads + kh) * hd;
                let dot = |a: &[f32], ao: usize, b: &[f32], bo: usize| -> f64 {
                    (0..hd).map(|d| a[ao + d] as f64 * b[bo + d] as f64).sum()
                };
                let sc: Vec<f64> = (0..visible)
                    .map(|j| dot(&qf, qr, &kf, kr(j)) * scale)
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - m).exp() / z).collect();
                let dp: Vec<f64> = (0..visible).map(|j| dot(&gf, qr, &vf, kr(j))).collect();
                let dd: f64 = (0..visible).map(|j| p[j] * dp[j]).sum();
                let mut ed = 0.0;
                for d in 0..hd {
                    let o: f64 = (0..visible).map(|j| p[j] * vf[kr(j) + d] as f64).sum();
                    let pv: f64 = (0..visible)
                        .map(|j| p[j] * (vf[kr(j) + d] as f64).abs())
                        .sum();
                    ed += u * (gf[qr + d] as f64).abs() * (o.abs() + pv);
                }
                for j in 0..visible {
                    let ds = p[j] * (dp[j] - dd);
                    let e = u * ds.abs() + p[j] * ed;
                    for d in 0..hd {
                        bv[kr(j) + d] += u * p[j] * (gf[qr + d] as f64).abs();
                        bk[kr(j) + d] += scale * e * (qf[qr + d] as f64).abs();
                        bq[qr + d] += scale * e * (kf[kr(j) + d] as f64).abs();
                    }
                }
            }
        }
    }

    let shape = AttnShape {
        tq,
        tk,
        heads,
        kv_heads,
        head_dim: hd,
    };
    let devs = devices();
    let kernels: &[AttnKernel] = if has_tiled {
        &[AttnKernel::Auto, AttnKernel::PerRow]
    } else {
        &[AttnKernel::Auto]
    };
    for (dev, &kernel) in devs
        .iter()
        .flat_map(|d| kernels.iter().map(move |k| (d, k)))
    {
        let tiled = has_tiled && kernel == AttnKernel::Auto;
        let mut dq = dev.upload(&vec![bf16::NAN; tq * heads * hd]).unwrap();
        let mut dk = dev.upload(&vec![bf16::NAN; tk * kv_heads * hd]).unwrap();
        let mut dv = dev.upload(&vec![bf16::NAN; tk * kv_heads * hd]).unwrap();
        let mut sb = dev.alloc_zeros::<i32>(4 * spans.len()).unwrap();
        let mut scratch = AttnGradScratch::new(dev, shape).unwrap();
        let u = |x: &[bf16]| dev.upload(x).unwrap();
        let (qb, kb, vb, dyb) = (u(&q), u(&k), u(&v), u(&dy));
        let pb = dev.upload(&positions).unwrap();
        let x = AttnInputs {
            q: &qb,
            k: &kb,
            v: &vb,
            positions: &pb,
            spans: &spans,
            shape,
        };
        let g = AttnGrads {
            dy: &dyb,
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
        };
        attention_backward_with(dev, kernel, &x, &mut sb, g, &mut scratch).unwrap();
        for (what, got, want, extra) in [
            ("dq", dev.download(&dq).unwrap(), &wq, &bq),
            ("dk", dev.download(&dk).unwrap(), &wk, &bk),
            ("dv", dev.download(&dv).unwrap(), &wv, &bv),
        ] {
            for i in 0..got.len() {
                // bf16 output (half an ulp, 2^-8 relative) plus f32 differences: sums of O(1)
                // terms in another order, and the cancellation in dp − D, bounded by 1e-3; plus,
                // for the tiled kernels, the bound above.
                let g = got[i].to_f32();
                let tol =
                    (want[i].abs() / 256.0 + 1e-3) as f64 + if tiled { extra[i] } else { 0.0 };
                assert!(
                    ((g - want[i]).abs() as f64) <= tol,
                    "{} {kernel:?} hd {hd}: {what}[{i}] {g} vs {} (tolerance {tol:.2e})",
                    dev.name(),
                    want[i]
                );
            }
        }
    }
}
