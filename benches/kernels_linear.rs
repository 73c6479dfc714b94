//! The 8-bit linear algebra: W8A8 GEMM (LLaMA-7B training shapes and SmolLM2), W8A16 decode
//! GEMV, the W8A16 backward GEMM (both tiles of each GEMM), and the fused LoRA overhead. `cuda_*` groups run
//! on a real GPU and say why they skipped otherwise; throughput is in operations (2·M·N·K) or weight bytes.
//! The cuBLASLt int8 peer is timed by scripts/peer_int8_mm.py in the GPU check.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;

use recforge::backend::cpu::{quantize_rows, Cpu};
use recforge::backend::gpu::cuda_or_say_why;
use recforge::backend::gpu::ops::lora::{self, DevLora};
use recforge::backend::gpu::ops::w8a8;
use recforge::backend::gpu::ops::{w8a16, Tile};
use recforge::backend::{Backend, Dropout, Linear, LinearWeight};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

/// (name, M, N, K) — LLaMA-7B q/o (4096×4096), gate/up (11008×4096), down (4096×11008) at
/// 4096 tokens, and SmolLM2's gate/up and down at 1024 tokens.
const GEMM_SHAPES: [(&str, usize, usize, usize); 5] = [
    ("7b_qkvo", 4096, 4096, 4096),
    ("7b_gate_up", 4096, 11008, 4096),
    ("7b_down", 4096, 4096, 11008),
    ("smol_gate_up", 1024, 1536, 576),
    ("smol_down", 1024, 576, 1536),
];

fn bench_cpu(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("cpu_w8a8");
    let (m, n, k) = (64, 1536, 576);
    let (q, s) = quantize_rows(&(0..n * k).map(|_| rng.normal()).collect::<Vec<_>>(), n, k);
    let lin = Linear {
        weight: LinearWeight::Int8 {
            w: cpu
                .upload(&HostTensor::new(vec![n, k], HostData::I8(q)).unwrap())
                .unwrap(),
            scale: cpu.upload(&HostTensor::f32(vec![n], s).unwrap()).unwrap(),
        },
        out_features: n,
        in_features: k,
        outlier_threshold: 6.0,
    };
    let x = cpu
        .upload(&HostTensor::f32(vec![m, k], (0..m * k).map(|_| rng.normal()).collect()).unwrap())
        .unwrap();
    let mut out = cpu.zeros(&[m, n], DType::F32).unwrap();
    g.throughput(Throughput::Elements((2 * m * n * k) as u64));
    g.bench_function("smol_gate_up_64", |b| {
        b.iter(|| cpu.linear(&x, &lin, &mut out).unwrap())
    });
    g.finish();
}

fn rand_i8(rng: &mut Rng, n: usize) -> Vec<i8> {
    (0..n)
        .map(|_| (rng.below(255) as i32 - 127) as i8)
        .collect()
}

fn bench_gpu(c: &mut Criterion) {
    let Some(dev) = cuda_or_say_why("cuda_* groups") else {
        return;
    };
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("cuda_gemm_w8a8");
    for (name, m, n, k) in GEMM_SHAPES {
        let x: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.normal())).collect();
        let (dx, dw) = (
            dev.upload(&x).unwrap(),
            dev.upload(&rand_i8(&mut rng, n * k)).unwrap(),
        );
        let sw = dev.upload(&vec![0.01f32; n]).unwrap();
        let mut s = w8a8::Int8Scratch::new(&dev, m, k).unwrap();
        let mut out = dev.alloc_zeros::<bf16>(m * n).unwrap();
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let mut raw = dev.alloc_zeros::<i32>(m * n).unwrap();
        // Every tile on every shape (`w8a8::gemm_tile` picks t128 for the 7B shapes, t64 for
        // SmolLM2's; the wgmma tile `wg` on an sm_90 only): the whole linear (quantization,
        // GEMM, epilogue) and the GEMM alone.
        let mut tiles = vec![("t64", Tile::T64), ("t128", Tile::T128)];
        if dev.has_wgmma() {
            tiles.push(("wg", Tile::Wg));
        }
        for (label, tile) in tiles {
            g.bench_function(BenchmarkId::new(format!("linear_{label}"), name), |b| {
                b.iter(|| {
                    w8a8::linear_w8a8(
                        &dev,
                        &dx,
                        m,
                        k,
                        &dw,
                        &sw,
                        n,
                        6.0,
                        &mut s,
                        None,
                        None,
                        &mut out,
                        Some(tile),
                    )
                    .unwrap();
                    dev.synchronize().unwrap();
                })
            });
            g.bench_function(BenchmarkId::new(format!("i32_only_{label}"), name), |b| {
                b.iter(|| {
                    w8a8::gemm_w8a8_i32(&dev, &s.xq, &dw, &mut raw, m, n, k, Some(tile)).unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("cuda_gemv_w8a16");
    for (n, k) in [(4096usize, 4096usize), (11008, 4096), (4096, 11008)] {
        let dw = dev.upload(&rand_i8(&mut rng, n * k)).unwrap();
        let sw = dev.upload(&vec![0.01f32; n]).unwrap();
        for m in [1usize, 4, 16] {
            let dx = dev
                .upload(
                    &(0..m * k)
                        .map(|_| bf16::from_f32(rng.normal()))
                        .collect::<Vec<_>>(),
                )
                .unwrap();
            let mut y = dev.alloc_zeros::<bf16>(m * n).unwrap();
            g.throughput(Throughput::Bytes((n * k) as u64)); // weight bytes: the bandwidth that matters
            g.bench_function(BenchmarkId::new(format!("{n}x{k}"), m), |b| {
                b.iter(|| {
                    w8a16::gemv(&dev, &dx, &dw, &sw, None, &mut y, m, n, k).unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("cuda_w8a16_dx");
    for (name, m, n, k) in GEMM_SHAPES {
        let dy = dev
            .upload(
                &(0..m * n)
                    .map(|_| bf16::from_f32(rng.normal()))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let dw = dev.upload(&rand_i8(&mut rng, n * k)).unwrap();
        let sw = dev.upload(&vec![0.01f32; n]).unwrap();
        let mut dx = dev.alloc_zeros::<bf16>(m * k).unwrap();
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        // Every kernel on every shape: the 64 × 64 single-stage tile, the 128 × 128 pipelined
        // one (which `w8a16::dx_tile` picks for training shapes), and on an sm_90 the wgmma one.
        let mut tiles = vec![("t64", Tile::T64), ("t128", Tile::T128)];
        if dev.has_wgmma() {
            tiles.push(("wg", Tile::Wg));
        }
        for (label, tile) in tiles {
            g.bench_function(BenchmarkId::new(name, label), |b| {
                b.iter(|| {
                    w8a16::linear_backward_input(
                        &dev,
                        &dy,
                        &dw,
                        &sw,
                        &mut dx,
                        m,
                        n,
                        k,
                        false,
                        Some(tile),
                    )
                    .unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
    }
    g.finish();

    // LoRA overhead on the 7B q projection: base alone, + one r=16 adapter, + 8 adapters of
    // r=16 concatenated (R = 128) with a one-hot gate; decode (M = 4) and training (M = 4096).
    let mut g = c.benchmark_group("cuda_lora_overhead");
    let (n, k) = (4096usize, 4096usize);
    let dw = dev.upload(&rand_i8(&mut rng, n * k)).unwrap();
    let sw = dev.upload(&vec![0.01f32; n]).unwrap();
    for m in [4usize, 4096] {
        let dx = dev
            .upload(
                &(0..m * k)
                    .map(|_| bf16::from_f32(rng.normal()))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let mut s = w8a8::Int8Scratch::new(&dev, m, k).unwrap();
        let mut out = dev.alloc_zeros::<bf16>(m * n).unwrap();
        g.bench_function(BenchmarkId::new("base", m), |b| {
            b.iter(|| {
                w8a8::linear_w8a8(
                    &dev, &dx, m, k, &dw, &sw, n, 6.0, &mut s, None, None, &mut out, None,
                )
                .unwrap();
                dev.synchronize().unwrap();
            })
        });
        for (label, rank, adapters) in [("lora_r16", 16usize, 1usize), ("lora_8x_r16", 128, 8)] {
            let dl = DevLora {
                a: dev
                    .upload(
                        &(0..rank * k)
                            .map(|_| 0.01 * rng.normal())
                            .collect::<Vec<_>>(),
                    )
                    .unwrap(),
                b: dev
                    .upload(
                        &(0..n * rank)
                            .map(|_| 0.01 * rng.normal())
                            .collect::<Vec<_>>(),
                    )
                    .unwrap(),
                rank,
                k,
                n,
                scale: 1.0,
            };
            let gate: Vec<f32> = (0..m * rank)
                .map(|i| ((i % rank) / 16 == (i / rank) % adapters) as u8 as f32)
                .collect();
            let dg = dev.upload(&gate).unwrap();
            let mut h = dev.alloc_zeros::<f32>(m * rank).unwrap();
            let mut u = dev.alloc_zeros::<f32>(m * rank).unwrap();
            g.bench_function(BenchmarkId::new(label, m), |b| {
                b.iter(|| {
                    lora::lora_down(&dev, &dx, &dl.view(), &dg, Dropout::NONE, &mut h, &mut u, m)
                        .unwrap();
                    let up = w8a8::LoraUp {
                        u: &u,
                        b: &dl.b,
                        rank,
                        scale: 1.0,
                    };
                    w8a8::linear_w8a8(
                        &dev,
                        &dx,
                        m,
                        k,
                        &dw,
                        &sw,
                        n,
                        6.0,
                        &mut s,
                        Some(up),
                        None,
                        &mut out,
                        None,
                    )
                    .unwrap();
                    dev.synchronize().unwrap();
                })
            });
            // The same sum as its own pass after the GEMM (`lora_up_bf16`, the training step's
            // default place, `LoraUpPlace::Pass`): this against the fused case above decides
            // the default.
            g.bench_function(BenchmarkId::new(format!("{label}_pass"), m), |b| {
                b.iter(|| {
                    lora::lora_down(&dev, &dx, &dl.view(), &dg, Dropout::NONE, &mut h, &mut u, m)
                        .unwrap();
                    w8a8::linear_w8a8(
                        &dev, &dx, m, k, &dw, &sw, n, 6.0, &mut s, None, None, &mut out, None,
                    )
                    .unwrap();
                    lora::lora_up(&dev, &u, &dl.view(), &mut out, m).unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
    }
    g.finish();

    // The LoRA backward of one 7B projection at the training shape (M = 4096, K = N = 4096,
    // r = 16, dropout 0.05): dp, dB, dA and the dx contribution. Throughput: the bf16 bytes its
    // passes move at least (dy read by dp and by dB, x by dA, dx read and written).
    let mut g = c.benchmark_group("cuda_lora_backward");
    let (m, k, n, rank) = (4096usize, 4096usize, 4096usize, 16usize);
    let normal = |rng: &mut Rng, len: usize, s: f32| -> Vec<f32> {
        (0..len).map(|_| s * rng.normal()).collect()
    };
    let bf = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
    let dl = DevLora {
        a: dev.upload(&normal(&mut rng, rank * k, 0.01)).unwrap(),
        b: dev.upload(&normal(&mut rng, n * rank, 0.01)).unwrap(),
        rank,
        k,
        n,
        scale: 1.0,
    };
    let x = dev.upload(&bf(normal(&mut rng, m * k, 1.0))).unwrap();
    let dy = dev.upload(&bf(normal(&mut rng, m * n, 1.0))).unwrap();
    let gate = dev.upload(&vec![1.0f32; m * rank]).unwrap();
    let h = dev.upload(&normal(&mut rng, m * rank, 1.0)).unwrap();
    let u = dev.upload(&normal(&mut rng, m * rank, 1.0)).unwrap();
    let mut da = dev.alloc_zeros::<f32>(rank * k).unwrap();
    let mut db = dev.alloc_zeros::<f32>(n * rank).unwrap();
    let mut dgate = dev.alloc_zeros::<f32>(m * rank).unwrap();
    let mut dh = dev.alloc_zeros::<f32>(m * rank).unwrap();
    let mut dx = dev.alloc_zeros::<bf16>(m * k).unwrap();
    let drop = Dropout { p: 0.05, seed: 7 };
    g.throughput(Throughput::Bytes((4 * m * n + 6 * m * k) as u64));
    g.bench_function(BenchmarkId::new("r16", m), |b| {
        b.iter(|| {
            let grads = lora::LoraGrads {
                da: &mut da,
                db: &mut db,
                dgate: &mut dgate,
                dh: &mut dh,
                dx: &mut dx,
            };
            lora::lora_backward(&dev, &x, &dl.view(), &gate, drop, &h, &u, &dy, grads, m).unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench_cpu, bench_gpu);
criterion_main!(benches);
