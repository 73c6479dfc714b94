//! CPU reference op throughput on SmolLM2-135M shapes (the GPU groups join these as the
//! kernels land). Run: cargo bench --bench cpu_ops
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use recforge::backend::cpu::{quantize_rows, Cpu};
use recforge::backend::{Backend, Linear, LinearWeight};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

fn bench_linear(c: &mut Criterion) {
    let be = Cpu::new();
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("cpu_linear_int8");
    // SmolLM2 gate/up projection: 576 → 1536.
    let (n, k) = (1536, 576);
    let (q, s) = quantize_rows(&rand(&mut rng, n * k), n, k);
    let lin = Linear {
        weight: LinearWeight::Int8 {
            w: be
                .upload(&HostTensor::new(vec![n, k], HostData::I8(q)).unwrap())
                .unwrap(),
            scale: be.upload(&HostTensor::f32(vec![n], s).unwrap()).unwrap(),
        },
        out_features: n,
        in_features: k,
        outlier_threshold: 6.0,
    };
    for t in [1usize, 16, 64] {
        let x = be
            .upload(&HostTensor::f32(vec![t, k], rand(&mut rng, t * k)).unwrap())
            .unwrap();
        let mut out = be.zeros(&[t, n], DType::F32).unwrap();
        g.throughput(Throughput::Elements((2 * t * n * k) as u64)); // FLOP (multiply-add = 2)
        g.bench_with_input(BenchmarkId::from_parameter(t), &t, |b, _| {
            b.iter(|| be.linear(&x, &lin, &mut out).unwrap())
        });
    }
    g.finish();
}

fn bench_rmsnorm(c: &mut Criterion) {
    let be = Cpu::new();
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("cpu_rmsnorm");
    let d = 576;
    for t in [1usize, 64, 1024] {
        let x = be
            .upload(&HostTensor::f32(vec![t, d], rand(&mut rng, t * d)).unwrap())
            .unwrap();
        let w = be
            .upload(&HostTensor::f32(vec![d], rand(&mut rng, d)).unwrap())
            .unwrap();
        let mut out = be.zeros(&[t, d], DType::F32).unwrap();
        g.throughput(Throughput::Bytes((2 * t * d * 4) as u64)); // read x, write out
        g.bench_with_input(BenchmarkId::from_parameter(t), &t, |b, _| {
            b.iter(|| be.rmsnorm(&x, &w, 1e-5, &mut out).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench_linear, bench_rmsnorm);
criterion_main!(benches);
