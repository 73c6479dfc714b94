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
