//! Sampling: one fused, sort-free kernel per decode step over `[batch × vocab]` f32 logits
//! (kernels/sampling.cu) at batch 1–64 and the LLaMA (32000) / SmolLM2 (49152) vocabularies,
//! with the ITREK preset (T 0.1, top-k 10, top-p 0.1) and a wide one (T 1, top-k 50, top-p 0.9).
//! `cpu_sample` times the CPU reference (a sort per row); `cuda_sample` the kernel alone
//! (parameters already on the device), `cuda_sample_step` the backend call a decode step makes
//! (upload the parameters, run, download the tokens). The sort-based GPU comparison is
//! scripts/peer_sampling.py (PyTorch on the same device, run by scripts/gpu-check.sh).
//! Throughput is logits read once (bytes); the kernel reads each row up to 10 times from L2.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::backend::Gpu;
use recforge::backend::gpu::cuda_or_say_why;
use recforge::backend::gpu::ops::sampling as ops;
use recforge::backend::{Backend, SamplingParams};
use recforge::rng::Rng;
use recforge::tensor::HostTensor;

const PRESETS: [(&str, SamplingParams); 2] = [
    ("itrek", SamplingParams::ITREK),
    (
        "wide",
        SamplingParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
        },
    ),
];

fn logits(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| 3.0 * rng.normal()).collect()
}

fn bench_sample(c: &mut Criterion) {
    let mut rng = Rng::new(9);
    let cpu = Cpu::new();
    let mut g = c.benchmark_group("cpu_sample");
    for v in [32000usize, 49152] {
        for batch in [1usize, 16] {
            let t = cpu
                .upload(&HostTensor::f32(vec![batch, v], logits(&mut rng, batch * v)).unwrap())
                .unwrap();
            let u: Vec<f32> = (0..batch).map(|_| rng.uniform()).collect();
            for (name, p) in PRESETS {
                let params = vec![p; batch];
                g.throughput(Throughput::Bytes((batch * v * 4) as u64));
                g.bench_function(BenchmarkId::new(format!("{name}/v{v}"), batch), |b| {
                    b.iter(|| cpu.sample(&t, &params, &u).unwrap())
                });
            }
        }
    }
    g.finish();
    let Some(dev) = cuda_or_say_why("cuda_* groups") else {
        return;
    };
    let mut g = c.benchmark_group("cuda_sample");
    for v in [32000usize, 49152] {
        for batch in [1usize, 4, 16, 64] {
            let x = dev.upload(&logits(&mut rng, batch * v)).unwrap();
            let u: Vec<f32> = (0..batch).map(|_| rng.uniform()).collect();
            for (name, p) in PRESETS {
                let packed = ops::pack_params(batch, &vec![p; batch], &u).unwrap();
                let packed = dev.upload(&packed).unwrap();
                let mut tokens = dev.alloc_zeros::<u32>(batch).unwrap();
                g.throughput(Throughput::Bytes((batch * v * 4) as u64));
                g.bench_function(BenchmarkId::new(format!("{name}/v{v}"), batch), |b| {
                    b.iter(|| {
                        ops::sample(&dev, &x, &packed, &mut tokens, batch, v).unwrap();
                        dev.synchronize().unwrap();
                    })
                });
            }
        }
    }
    g.finish();
    let be = Gpu::new(dev);
    let mut g = c.benchmark_group("cuda_sample_step");
    let v = 32000usize;
    for batch in [1usize, 64] {
        let t = be
            .upload(&HostTensor::f32(vec![batch, v], logits(&mut rng, batch * v)).unwrap())
            .unwrap();
        let u: Vec<f32> = (0..batch).map(|_| rng.uniform()).collect();
        let params = vec![SamplingParams::ITREK; batch];
        g.throughput(Throughput::Bytes((batch * v * 4) as u64));
        g.bench_function(BenchmarkId::new(format!("itrek/v{v}"), batch), |b| {
            b.iter(|| be.sample(&t, &params, &u).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench_sample);
criterion_main!(benches);
