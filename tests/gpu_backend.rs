//! The whole LLaMA forward on the GPU backend (`backend::gpu::backend::Gpu`) — bf16 activations,
//! the W8A8 / W8A16 / dense / attention / norm / rope / swiglu kernels composed by the same
//! model code as the CPU — run on the simulator (and on CUDA when a GPU is usable), against the
//! CPU reference.

mod common;

use common::{fixture, TEXT};
use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::backend::Gpu;
use recforge::backend::Backend;
use recforge::infer::generate::argmax;
use recforge::model::fixture::FixtureSpec;
use recforge::model::{self, Llama, LoadOptions, Logits};

fn backends() -> Vec<Gpu> {
    common::devices().into_iter().map(Gpu::new).collect()
}

fn run<B: Backend>(
    be: &B,
    path: &std::path::Path,
    ids: &[u32],
    opts: LoadOptions,
    decode_from: usize,
) -> Vec<f32> {
    let src = model::open(path).unwrap();
    let m = Llama::load(src.as_ref(), be, opts).unwrap();
    let mut cache = m.new_cache(be, ids.len()).unwrap();
    let mut out = m
        .forward(be, &ids[..decode_from], &mut cache, Logits::All)
        .unwrap()
        .to_f32()
        .unwrap();
    for &t in &ids[decode_from..] {
        out.extend(
            m.forward(be, &[t], &mut cache, Logits::Last)
                .unwrap()
                .to_f32()
                .unwrap(),
        );
    }
    out
}

#[test]
fn gpu_forward_matches_the_cpu_reference() {
    // head_dim 32: the smallest the attention kernel takes.
    let (_d, f) = fixture(&FixtureSpec {
        layers: 1,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    });
    let ids = model::open(&f.gguf)
        .unwrap()
        .tokenizer()
        .unwrap()
        .encode(TEXT, true)
        .unwrap();
    let v = f.config.vocab_size;
    let opts = LoadOptions::default();
    let want = run(&Cpu::new(), &f.gguf, &ids, opts, ids.len());
    for be in backends() {
        // A prefill of everything, and a prefill of 5 then KV-cached decode steps (which take
        // the weight-only W8A16 path on the GPU).
        for decode_from in [ids.len(), 5] {
            let got = run(&be, &f.gguf, &ids, opts, decode_from);
            assert_eq!(got.len(), want.len());
            // bf16 activations and weights (2^-8 relative per rounding, a few dozen roundings on
            // each path through one layer) against f32 ones: a few percent of the logits' RMS,
            // the same scale as the int8-vs-f32 bound for one layer. Argmaxes mostly agree.
            let err: f32 = got.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
            let norm: f32 = want.iter().map(|x| x * x).sum();
            let rel = (err / norm).sqrt();
            let agree = got
                .chunks(v)
                .zip(want.chunks(v))
                .filter(|(a, b)| argmax(a) == argmax(b))
                .count();
            eprintln!("{} (decode from {decode_from}): relative RMS logit error {rel:.4}, argmax agreement {agree}/{}", be.name(), ids.len());
            assert!(rel < 0.05, "{}: relative RMS error {rel}", be.name());
            assert!(
                agree * 10 >= ids.len() * 8,
                "{}: argmax agreement {agree}/{}",
                be.name(),
                ids.len()
            );
        }
    }
}

#[test]
fn cli_generates_on_the_simulator() {
    let (_d, f) = fixture(&FixtureSpec {
        layers: 2,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    });
    let o = std::process::Command::new(common::recforge_bin())
        .args([
            "generate",
            "--model",
            f.gguf.to_str().unwrap(),
            "--prompt",
            "the cat",
            "--raw",
            "--max-new-tokens",
            "4",
            "--device",
            "sim",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("on sim (SIMT simulator"), "{err}");
    assert!(err.contains("decode") && err.contains("tok/s"), "{err}");
    // The KV cache and the steps' buffers came from the generation plan's arena, and the plan
    // counted the loaded model to the byte.
    assert!(
        err.contains("the generation's") && err.contains("reserved as one arena"),
        "{err}"
    );
    assert!(!err.contains("the plan counts"), "{err}");
}

#[test]
fn lora_through_the_backend_trait_matches_the_cpu() {
    use half::bf16;
    use recforge::backend::{Dropout, Lora};
    use recforge::rng::Rng;
    use recforge::tensor::{DType, HostData, HostTensor};
    let mut rng = Rng::new(61);
    // (M, K, N, R): one block of rows and columns; and rows over several blocks of 8 (one
    // partial), columns over two blocks of 256 threads, ranks over two register blocks of 16.
    for (m, k, n, r) in [(5usize, 48usize, 40usize, 8usize), (19, 70, 300, 20)] {
        let bfv = |len: usize, rng: &mut Rng| {
            (0..len)
                .map(|_| bf16::from_f32(rng.normal()))
                .collect::<Vec<bf16>>()
        };
        let (x, y0, dy) = (
            bfv(m * k, &mut rng),
            bfv(m * n, &mut rng),
            bfv(m * n, &mut rng),
        );
        let a: Vec<f32> = (0..r * k).map(|_| 0.2 * rng.normal()).collect();
        let b: Vec<f32> = (0..n * r).map(|_| 0.2 * rng.normal()).collect();
        let gate: Vec<f32> = (0..m * r).map(|_| rng.uniform()).collect();
        let drop = Dropout { p: 0.25, seed: 77 };
        let host_bf = |v: &[bf16], s: &[usize]| {
            HostTensor::new(s.to_vec(), HostData::BF16(v.to_vec())).unwrap()
        };
        let host_f = |v: &[f32], s: &[usize]| HostTensor::f32(s.to_vec(), v.to_vec()).unwrap();
        // Run forward + backward on a backend; return (h, u, y, dA, dB, dgate, dx) as f32.
        fn run<B: Backend>(
            be: &B,
            act: DType,
            t: &[HostTensor; 6],
            drop: Dropout,
            dims: (usize, usize, usize, usize),
        ) -> Vec<Vec<f32>> {
            let (m, k, n, r) = dims;
            let up = |h: &HostTensor, dt: DType| be.upload(&h.to_dtype(dt).unwrap()).unwrap();
            let lora = Lora {
                a: up(&t[1], DType::F32),
                b: up(&t[2], DType::F32),
                scale: 2.0,
            };
            let (x, gate) = (up(&t[0], act), up(&t[3], DType::F32));
            let mut h = be.zeros(&[m, r], DType::F32).unwrap();
            let mut u = be.zeros(&[m, r], DType::F32).unwrap();
            let mut y = up(&t[4], act);
            be.lora_forward(&x, &lora, &gate, drop, &mut h, &mut u, &mut y)
                .unwrap();
            let mut da = be.zeros(&[r, k], DType::F32).unwrap();
            let mut db = be.zeros(&[n, r], DType::F32).unwrap();
            let mut dg = be.zeros(&[m, r], DType::F32).unwrap();
            let mut dx = be.zeros(&[m, k], act).unwrap();
            be.lora_backward(
                &x,
                &lora,
                &gate,
                drop,
                &h,
                &u,
                &up(&t[5], act),
                &mut da,
                &mut db,
                &mut dg,
                &mut dx,
            )
            .unwrap();
            [&h, &u, &y, &da, &db, &dg, &dx]
                .iter()
                .map(|t| be.download(t).unwrap().to_f32().unwrap())
                .collect()
        }
        let inputs = [
            host_bf(&x, &[m, k]),
            host_f(&a, &[r, k]),
            host_f(&b, &[n, r]),
            host_f(&gate, &[m, r]),
            host_bf(&y0, &[m, n]),
            host_bf(&dy, &[m, n]),
        ];
        let want = run(&Cpu::new(), DType::F32, &inputs, drop, (m, k, n, r));
        for be in backends() {
            let got = run(&be, DType::BF16, &inputs, drop, (m, k, n, r));
            for (name, (g, w)) in ["h", "u", "y", "dA", "dB", "dgate", "dx"]
                .iter()
                .zip(got.iter().zip(&want))
            {
                for i in 0..g.len() {
                    // f32 reassociation (≤ 300 terms) on the f32 outputs; y and dx are bf16 on the
                    // GPU, so half an ulp (2^-8 relative) more there.
                    let tol = 1e-4 * (1.0 + w[i].abs())
                        + if matches!(*name, "y" | "dx") {
                            w[i].abs() / 256.0
                        } else {
                            0.0
                        };
                    assert!(
                        (g[i] - w[i]).abs() <= tol,
                        "{}: {name}[{i}] {} vs {}",
                        be.name(),
                        g[i],
                        w[i]
                    );
                }
            }
        }
    }
}

/// q, k, v (and gate, up) go through `Backend::linear_many`, which on the GPU quantizes their
/// shared input once: the outputs must be the bits of one `linear` each, outlier columns
/// included; past the decode sizes (the shared path) and at them (one GEMV each).
#[test]
fn linear_many_gives_the_bits_of_one_linear_each() {
    use half::bf16;
    use recforge::backend::cpu::quantize_rows;
    use recforge::backend::{Linear, LinearWeight};
    use recforge::rng::Rng;
    use recforge::tensor::{DType, HostData, HostTensor};
    let mut rng = Rng::new(7);
    let k = 96;
    for be in backends() {
        let mut layer = |n: usize| {
            let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
            let (wq, ws) = quantize_rows(&w, n, k);
            Linear {
                weight: LinearWeight::Int8 {
                    w: be
                        .upload(&HostTensor::new(vec![n, k], HostData::I8(wq)).unwrap())
                        .unwrap(),
                    scale: be.upload(&HostTensor::f32(vec![n], ws).unwrap()).unwrap(),
                },
                out_features: n,
                in_features: k,
                outlier_threshold: 6.0,
            }
        };
        let ws = [layer(64), layer(24), layer(40)];
        for rows in [40usize, 3] {
            // Column 5 well above the outlier threshold, so the shared outlier list matters.
            let x: Vec<bf16> = (0..rows * k)
                .map(|i| bf16::from_f32(if i % k == 5 { 25.0 } else { 1.0 } * rng.normal()))
                .collect();
            let xt = be
                .upload(&HostTensor::new(vec![rows, k], HostData::BF16(x)).unwrap())
                .unwrap();
            let zeros = |n: usize| be.zeros(&[rows, n], DType::BF16).unwrap();
            let (mut a, mut b, mut c) = (zeros(64), zeros(24), zeros(40));
            be.linear_many(
                &xt,
                &[&ws[0], &ws[1], &ws[2]],
                &mut [&mut a, &mut b, &mut c],
            )
            .unwrap();
            for (w, many) in ws.iter().zip([&a, &b, &c]) {
                let mut one = zeros(w.out_features);
                be.linear(&xt, w, &mut one).unwrap();
                let bits = |t| -> Vec<u32> {
                    be.download(t)
                        .unwrap()
                        .to_f32()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                assert_eq!(
                    bits(many),
                    bits(&one),
                    "{}: rows {rows}, n {}",
                    be.name(),
                    w.out_features
                );
            }
        }
        let xt = be.zeros(&[20, k], DType::BF16).unwrap();
        let e = be
            .linear_many(&xt, &[&ws[0], &ws[1]], &mut [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 layers but 0 outputs"), "{e}");
    }
}

/// `Backend::linear_lora` — the projections of one input with their adapters and residuals, as
/// the training step runs them — against the CPU's separate f32 passes, with the GPU's LoRA
/// up-projection in either place (a pass after the GEMM, or the GEMM's epilogue). Past the
/// decode sizes the GPU quantizes x once and adds the residual in the epilogue; at them it runs
/// the separate passes, whose bits it must then give.
#[test]
fn linear_lora_matches_the_cpu_with_the_up_projection_in_either_place() {
    use half::bf16;
    use recforge::backend::cpu::quantize_rows;
    use recforge::backend::gpu::backend::LoraUpPlace;
    use recforge::backend::{Dropout, Linear, LinearWeight, Lora, LoraPass, Projection, Tensor};
    use recforge::rng::Rng;
    use recforge::tensor::{DType, HostData, HostTensor};
    let mut rng = Rng::new(23);
    let k = 96;
    // (out features, LoRA rank (0: none), residual): a rank of one register block, one over
    // two (20), and a plain projection with a residual.
    let specs = [(64usize, 8usize, false), (24, 0, true), (300, 20, true)];
    // Per projection: int8 W, its row scales, and the LoRA's A and B if it has one.
    type HostLayer = (HostTensor, HostTensor, Option<(HostTensor, HostTensor)>);
    let hosts: Vec<HostLayer> = specs
        .iter()
        .map(|&(n, r, _)| {
            let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
            let (wq, ws) = quantize_rows(&w, n, k);
            let lora = (r > 0).then(|| {
                let a: Vec<f32> = (0..r * k).map(|_| 0.1 * rng.normal()).collect();
                let b: Vec<f32> = (0..n * r).map(|_| 0.3 * rng.normal()).collect();
                (
                    HostTensor::f32(vec![r, k], a).unwrap(),
                    HostTensor::f32(vec![n, r], b).unwrap(),
                )
            });
            (
                HostTensor::new(vec![n, k], HostData::I8(wq)).unwrap(),
                HostTensor::f32(vec![n], ws).unwrap(),
                lora,
            )
        })
        .collect();
    let drop = |i: usize| Dropout {
        p: 0.25,
        seed: 40 + i as u64,
    };
    // Per projection: (out, h, u) as f32, and with `parts` the base product and the LoRA term
    // alone (for the error bound).
    #[allow(clippy::too_many_arguments)]
    fn run<B: Backend>(
        be: &B,
        act: DType,
        hosts: &[HostLayer],
        specs: &[(usize, usize, bool)],
        x: &HostTensor,
        res: &[HostTensor],
        drop: &dyn Fn(usize) -> Dropout,
        unfused: bool,
    ) -> Vec<[Vec<f32>; 3]> {
        let rows = x.shape[0];
        let k = x.shape[1];
        let up = |h: &HostTensor, dt: DType| be.upload(&h.to_dtype(dt).unwrap()).unwrap();
        let ws: Vec<Linear<B>> = hosts
            .iter()
            .map(|(w, s, _)| Linear {
                weight: LinearWeight::Int8 {
                    w: be.upload(w).unwrap(),
                    scale: be.upload(s).unwrap(),
                },
                out_features: w.shape[0],
                in_features: k,
                outlier_threshold: 6.0,
            })
            .collect();
        let loras: Vec<Option<Lora<B>>> = hosts
            .iter()
            .map(|(_, _, l)| {
                l.as_ref().map(|(a, b)| Lora {
                    a: up(a, DType::F32),
                    b: up(b, DType::F32),
                    scale: 2.0,
                })
            })
            .collect();
        let xt = up(x, act);
        let resid: Vec<Tensor<B>> = res.iter().map(|r| up(r, act)).collect();
        let gates: Vec<Tensor<B>> = specs
            .iter()
            .map(|&(_, r, _)| {
                up(
                    &HostTensor::f32(vec![rows, r], vec![1.0; rows * r]).unwrap(),
                    DType::F32,
                )
            })
            .collect();
        let mut hs: Vec<Tensor<B>> = specs
            .iter()
            .map(|&(_, r, _)| be.zeros(&[rows, r], DType::F32).unwrap())
            .collect();
        let mut us: Vec<Tensor<B>> = specs
            .iter()
            .map(|&(_, r, _)| be.zeros(&[rows, r], DType::F32).unwrap())
            .collect();
        let mut outs: Vec<Tensor<B>> = specs
            .iter()
            .map(|&(n, _, _)| be.zeros(&[rows, n], act).unwrap())
            .collect();
        let mut projs: Vec<Projection<'_, B>> = Vec::new();
        for (i, (((((w, l), g), h), u), out)) in ws
            .iter()
            .zip(&loras)
            .zip(&gates)
            .zip(hs.iter_mut())
            .zip(us.iter_mut())
            .zip(outs.iter_mut())
            .enumerate()
        {
            projs.push(Projection {
                w,
                lora: l.as_ref().map(|lora| LoraPass {
                    lora,
                    gate: g,
                    dropout: drop(i),
                    h,
                    u,
                }),
                residual: specs[i].2.then(|| &resid[i]),
                out,
            });
        }
        if unfused {
            recforge::backend::linear_lora_unfused(be, &xt, &mut projs).unwrap();
        } else {
            be.linear_lora(&xt, &mut projs).unwrap();
        }
        std::mem::drop(projs);
        let f = |t: &Tensor<B>| be.download(t).unwrap().to_f32().unwrap();
        (0..specs.len())
            .map(|i| [f(&outs[i]), f(&hs[i]), f(&us[i])])
            .collect()
    }
    for rows in [37usize, 3] {
        // Column 5 well above the outlier threshold: the outlier side path is in the epilogue.
        let x: Vec<bf16> = (0..rows * k)
            .map(|i| bf16::from_f32(if i % k == 5 { 25.0 } else { 1.0 } * rng.normal()))
            .collect();
        let x = HostTensor::new(vec![rows, k], HostData::BF16(x)).unwrap();
        let res: Vec<HostTensor> = specs
            .iter()
            .map(|&(n, _, _)| {
                let v = (0..rows * n)
                    .map(|_| bf16::from_f32(rng.normal()))
                    .collect();
                HostTensor::new(vec![rows, n], HostData::BF16(v)).unwrap()
            })
            .collect();
        let cpu = Cpu::new();
        let want = run(&cpu, DType::F32, &hosts, &specs, &x, &res, &drop, false);
        // The parts of the CPU result, for the bound: the base product, and the LoRA term.
        let no_res: Vec<(usize, usize, bool)> =
            specs.iter().map(|&(n, r, _)| (n, r, false)).collect();
        let no_lora: Vec<_> = hosts
            .iter()
            .map(|(w, s, _)| (w.clone(), s.clone(), None))
            .collect();
        let base = run(&cpu, DType::F32, &no_lora, &no_res, &x, &res, &drop, false);
        for mut be in backends() {
            for place in [LoraUpPlace::Pass, LoraUpPlace::Epilogue] {
                be.lora_up = Some(place);
                let got = run(&be, DType::BF16, &hosts, &specs, &x, &res, &drop, false);
                let what = format!("{}, {place:?}, rows {rows}", be.name());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let resv = res[i].to_f32().unwrap();
                    let mut lora_vs_tol = 0f32;
                    for (j, (&gv, &wv)) in g[0].iter().zip(&w[0]).enumerate() {
                        let b = base[i][0][j];
                        let lt = wv - b - if specs[i].2 { resv[j] } else { 0.0 };
                        let mag = b.abs() + lt.abs() + resv[j].abs();
                        // At most three bf16 roundings of partial sums bounded by `mag`, each
                        // off by at most half an ulp, 2^-8 of the value (8 significant bits),
                        // plus f32 reassociation of the ≤ 96-term sums.
                        let tol = 3.0 * mag / 256.0 + 1e-4 * (1.0 + mag);
                        lora_vs_tol = lora_vs_tol.max(lt.abs() / tol);
                        if rows > 16 {
                            assert!(
                                (gv - wv).abs() <= tol,
                                "{what}: projection {i} out[{j}] {gv} vs {wv} (tol {tol})"
                            );
                        }
                    }
                    if specs[i].1 > 0 {
                        // The LoRA term is large against the bound: leaving it out would fail.
                        assert!(lora_vs_tol > 10.0, "{what}: projection {i}: {lora_vs_tol}");
                    }
                    for (name, gi) in [("h", 1), ("u", 2)] {
                        for (j, (&gv, &wv)) in g[gi].iter().zip(&w[gi]).enumerate() {
                            assert!(
                                (gv - wv).abs() <= 1e-4 * (1.0 + wv.abs()),
                                "{what}: projection {i} {name}[{j}] {gv} vs {wv}"
                            );
                        }
                    }
                }
                if rows <= 16 {
                    // The decode sizes take the separate passes: their bits exactly.
                    let sep = run(&be, DType::BF16, &hosts, &specs, &x, &res, &drop, true);
                    for (i, (g, s)) in got.iter().zip(&sep).enumerate() {
                        assert!(
                            g[0] == s[0],
                            "{what}: projection {i} differs from the passes"
                        );
                    }
                }
            }
        }
    }
}
