//! Elementwise / row-wise kernels against their CPU references, throughput in bytes/s (bytes
//! read + written once each, as the op needs them), on LLaMA-7B (hidden 4096, intermediate
//! 11008, 32 heads × 128, vocab 32000) and SmolLM2-135M (576, 1536, 9 × 64, vocab 49152) shapes.
//!
//! - `cpu_<op>`: the CPU reference (f32; 512 tokens, so a run stays short on a small machine).
//! - `cuda_<op>`: the kernels on a real GPU, bf16 and f32, 4096 tokens (batch 4 × sequence 1024,
//!   the training shape). Timed with `iter_custom`: N back-to-back launches, one synchronize,
//!   so launch latency overlaps as in a real step. Without a usable GPU each cuda group prints
//!   why it skipped and does nothing else.
//!
//! Run: cargo bench --bench kernels_elementwise [-- <group filter>]

use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use half::bf16;

use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::device::DevElem;
use recforge::backend::gpu::ops::elementwise::{add, AddElem};
use recforge::backend::gpu::ops::embedding::{embedding, EmbeddingElem};
use recforge::backend::gpu::ops::rope::{rope, RopeElem};
use recforge::backend::gpu::ops::swiglu::{swiglu, swiglu_backward, SwigluElem};
use recforge::backend::gpu::ops::{rmsnorm_backward, NormElem};
use recforge::backend::gpu::{cuda_or_say_why, Device};
use recforge::backend::{Backend, Tensor};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

struct Model {
    name: &'static str,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    head_dim: usize,
    vocab: usize,
    theta: f32,
}

const MODELS: [Model; 2] = [
    Model {
        name: "llama7b",
        hidden: 4096,
        intermediate: 11008,
        heads: 32,
        head_dim: 128,
        vocab: 32000,
        theta: 10000.0,
    },
    Model {
        name: "smollm2",
        hidden: 576,
        intermediate: 1536,
        heads: 9,
        head_dim: 64,
        vocab: 49152,
        theta: 100000.0,
    },
];

const CPU_TOKENS: usize = 512;
const CUDA_TOKENS: usize = 4096;

fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

fn short(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

// ------------------------------------------------------------------------------------------ CPU

fn cpu_t(cpu: &Cpu, shape: &[usize], v: Vec<f32>) -> Tensor<Cpu> {
    cpu.upload(&HostTensor::f32(shape.to_vec(), v).unwrap())
        .unwrap()
}

fn cpu_ids(cpu: &Cpu, v: Vec<u32>) -> Tensor<Cpu> {
    cpu.upload(&HostTensor::new(vec![v.len()], HostData::U32(v)).unwrap())
        .unwrap()
}

fn cpu_rmsnorm_backward(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("cpu_rmsnorm_backward");
    short(&mut g);
    for m in &MODELS {
        let (t, d) = (CPU_TOKENS, m.hidden);
        let x = cpu_t(&cpu, &[t, d], rand(&mut rng, t * d));
        let dy = cpu_t(&cpu, &[t, d], rand(&mut rng, t * d));
        let w = cpu_t(&cpu, &[d], rand(&mut rng, d));
        let mut dx = cpu.zeros(&[t, d], DType::F32).unwrap();
        g.throughput(Throughput::Bytes((3 * t * d * 4 + d * 4) as u64)); // x, dy, w in; dx out
        g.bench_function(BenchmarkId::new(m.name, format!("{t}x{d}")), |b| {
            b.iter(|| {
                cpu.rmsnorm_backward(&x, &w, 1e-5, &dy, &mut dx, false)
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn cpu_rope(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("cpu_rope");
    short(&mut g);
    for m in &MODELS {
        let (t, h, hd) = (CPU_TOKENS, m.heads, m.head_dim);
        let mut x = cpu_t(&cpu, &[t, h, hd], rand(&mut rng, t * h * hd));
        let pos = cpu_ids(&cpu, (0..t as u32).collect());
        g.throughput(Throughput::Bytes((2 * t * h * hd * 4 + t * 4) as u64)); // x in and out, positions
        g.bench_function(BenchmarkId::new(m.name, format!("{t}x{h}x{hd}")), |b| {
            b.iter(|| cpu.rope(&mut x, &pos, m.theta, false).unwrap())
        });
    }
    g.finish();
}

fn cpu_swiglu(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(3);
    let mut g = c.benchmark_group("cpu_swiglu");
    short(&mut g);
    for m in &MODELS {
        let (t, f) = (CPU_TOKENS, m.intermediate);
        let gate = cpu_t(&cpu, &[t, f], rand(&mut rng, t * f));
        let up = cpu_t(&cpu, &[t, f], rand(&mut rng, t * f));
        let mut out = cpu.zeros(&[t, f], DType::F32).unwrap();
        g.throughput(Throughput::Bytes((3 * t * f * 4) as u64)); // gate, up in; out
        g.bench_function(BenchmarkId::new(m.name, format!("{t}x{f}")), |b| {
            b.iter(|| cpu.swiglu(&gate, &up, &mut out).unwrap())
        });
    }
    g.finish();
}

fn cpu_swiglu_backward(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(4);
    let mut g = c.benchmark_group("cpu_swiglu_backward");
    short(&mut g);
    for m in &MODELS {
        let (t, f) = (CPU_TOKENS, m.intermediate);
        let gate = cpu_t(&cpu, &[t, f], rand(&mut rng, t * f));
        let up = cpu_t(&cpu, &[t, f], rand(&mut rng, t * f));
        let dy = cpu_t(&cpu, &[t, f], rand(&mut rng, t * f));
        let mut dg = cpu.zeros(&[t, f], DType::F32).unwrap();
        let mut du = cpu.zeros(&[t, f], DType::F32).unwrap();
        g.throughput(Throughput::Bytes((5 * t * f * 4) as u64)); // gate, up, dy in; dgate, dup
        g.bench_function(BenchmarkId::new(m.name, format!("{t}x{f}")), |b| {
            b.iter(|| {
                cpu.swiglu_backward(&gate, &up, &dy, &mut dg, &mut du)
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn cpu_embedding(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(5);
    let mut g = c.benchmark_group("cpu_embedding");
    short(&mut g);
    for m in &MODELS {
        let (t, v, d) = (CPU_TOKENS, m.vocab, m.hidden);
        let table = cpu_t(&cpu, &[v, d], rand(&mut rng, v * d));
        let ids = cpu_ids(&cpu, (0..t).map(|_| rng.below(v as u64) as u32).collect());
        let mut out = cpu.zeros(&[t, d], DType::F32).unwrap();
        g.throughput(Throughput::Bytes((2 * t * d * 4 + t * 4) as u64)); // rows in, out; ids
        g.bench_function(BenchmarkId::new(m.name, format!("{t}x{d}")), |b| {
            b.iter(|| cpu.embedding(&table, &ids, &mut out).unwrap())
        });
    }
    g.finish();
}

fn cpu_add(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(6);
    let mut g = c.benchmark_group("cpu_add");
    short(&mut g);
    for m in &MODELS {
        let (t, d) = (CPU_TOKENS, m.hidden);
        let mut x = cpu_t(&cpu, &[t, d], rand(&mut rng, t * d));
        let y = cpu_t(&cpu, &[t, d], rand(&mut rng, t * d));
        g.throughput(Throughput::Bytes((3 * t * d * 4) as u64)); // x, y in; x out
        g.bench_function(BenchmarkId::new(m.name, format!("{t}x{d}")), |b| {
            b.iter(|| cpu.add_assign(&mut x, &y).unwrap())
        });
    }
    g.finish();
}

// ----------------------------------------------------------------------------------------- CUDA

trait BenchElem: DevElem + NormElem + RopeElem + SwigluElem + EmbeddingElem + AddElem {
    const NAME: &'static str;
    fn from_f32(v: f32) -> Self;
}
impl BenchElem for f32 {
    const NAME: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl BenchElem for bf16 {
    const NAME: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// `iters` launches back to back, then one synchronize.
fn time_cuda(dev: &Device, iters: u64, mut launch: impl FnMut()) -> Duration {
    dev.synchronize().unwrap();
    let t0 = Instant::now();
    for _ in 0..iters {
        launch();
    }
    dev.synchronize().unwrap();
    t0.elapsed()
}

fn upload_rand<T: BenchElem>(
    dev: &Device,
    rng: &mut Rng,
    n: usize,
) -> recforge::backend::gpu::DevBuf<T> {
    let v: Vec<T> = (0..n).map(|_| T::from_f32(rng.normal())).collect();
    dev.upload(&v).unwrap()
}

fn cuda_rmsnorm_backward_one<T: BenchElem>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    dev: &Device,
    m: &Model,
) {
    let mut rng = Rng::new(11);
    let (t, d, s) = (CUDA_TOKENS, m.hidden, std::mem::size_of::<T>());
    let x = upload_rand::<T>(dev, &mut rng, t * d);
    let dy = upload_rand::<T>(dev, &mut rng, t * d);
    let w = upload_rand::<f32>(dev, &mut rng, d);
    let mut dx = dev.alloc_zeros::<T>(t * d).unwrap();
    g.throughput(Throughput::Bytes((3 * t * d * s + d * 4) as u64));
    g.bench_function(
        BenchmarkId::new(format!("{}-{}", m.name, T::NAME), format!("{t}x{d}")),
        |b| {
            b.iter_custom(|n| {
                time_cuda(dev, n, || {
                    rmsnorm_backward(dev, &x, &w, &dy, &mut dx, t, d, 1e-5, false).unwrap()
                })
            })
        },
    );
}

fn cuda_rope_one<T: BenchElem>(g: &mut BenchmarkGroup<'_, WallTime>, dev: &Device, m: &Model) {
    let mut rng = Rng::new(12);
    let (t, h, hd, s) = (CUDA_TOKENS, m.heads, m.head_dim, std::mem::size_of::<T>());
    let mut x = upload_rand::<T>(dev, &mut rng, t * h * hd);
    let pos = dev
        .upload(&(0..t as u32).map(|p| p % 1024).collect::<Vec<u32>>())
        .unwrap();
    g.throughput(Throughput::Bytes((2 * t * h * hd * s + t * 4) as u64));
    g.bench_function(
        BenchmarkId::new(format!("{}-{}", m.name, T::NAME), format!("{t}x{h}x{hd}")),
        |b| {
            b.iter_custom(|n| {
                time_cuda(dev, n, || {
                    rope(dev, &mut x, &pos, t, h, hd, m.theta, false).unwrap()
                })
            })
        },
    );
}

fn cuda_swiglu_one<T: BenchElem>(g: &mut BenchmarkGroup<'_, WallTime>, dev: &Device, m: &Model) {
    let mut rng = Rng::new(13);
    let (t, f, s) = (CUDA_TOKENS, m.intermediate, std::mem::size_of::<T>());
    let gate = upload_rand::<T>(dev, &mut rng, t * f);
    let up = upload_rand::<T>(dev, &mut rng, t * f);
    let mut out = dev.alloc_zeros::<T>(t * f).unwrap();
    g.throughput(Throughput::Bytes((3 * t * f * s) as u64));
    g.bench_function(
        BenchmarkId::new(format!("{}-{}", m.name, T::NAME), format!("{t}x{f}")),
        |b| b.iter_custom(|n| time_cuda(dev, n, || swiglu(dev, &gate, &up, &mut out).unwrap())),
    );
}

fn cuda_swiglu_backward_one<T: BenchElem>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    dev: &Device,
    m: &Model,
) {
    let mut rng = Rng::new(14);
    let (t, f, s) = (CUDA_TOKENS, m.intermediate, std::mem::size_of::<T>());
    let gate = upload_rand::<T>(dev, &mut rng, t * f);
    let up = upload_rand::<T>(dev, &mut rng, t * f);
    let dy = upload_rand::<T>(dev, &mut rng, t * f);
    let mut dg = dev.alloc_zeros::<T>(t * f).unwrap();
    let mut du = dev.alloc_zeros::<T>(t * f).unwrap();
    g.throughput(Throughput::Bytes((5 * t * f * s) as u64));
    g.bench_function(
        BenchmarkId::new(format!("{}-{}", m.name, T::NAME), format!("{t}x{f}")),
        |b| {
            b.iter_custom(|n| {
                time_cuda(dev, n, || {
                    swiglu_backward(dev, &gate, &up, &dy, &mut dg, &mut du).unwrap()
                })
            })
        },
    );
}

fn cuda_embedding_one<T: BenchElem>(g: &mut BenchmarkGroup<'_, WallTime>, dev: &Device, m: &Model) {
    let mut rng = Rng::new(15);
    let (t, v, d, s) = (CUDA_TOKENS, m.vocab, m.hidden, std::mem::size_of::<T>());
    let table = upload_rand::<T>(dev, &mut rng, v * d);
    let ids = dev
        .upload(
            &(0..t)
                .map(|_| rng.below(v as u64) as u32)
                .collect::<Vec<u32>>(),
        )
        .unwrap();
    let mut out = dev.alloc_zeros::<T>(t * d).unwrap();
    let mut bad = dev.alloc_zeros::<i32>(1).unwrap();
    g.throughput(Throughput::Bytes((2 * t * d * s + t * 4) as u64));
    // Each call also resets and reads back the 4-byte bad-id flag (a synchronize): that is
    // what a caller pays, so it is in the measurement.
    g.bench_function(
        BenchmarkId::new(format!("{}-{}", m.name, T::NAME), format!("{t}x{d}")),
        |b| {
            b.iter_custom(|n| {
                time_cuda(dev, n, || {
                    embedding(dev, &table, &ids, &mut out, &mut bad, v, d).unwrap()
                })
            })
        },
    );
}

fn cuda_add_one<T: BenchElem>(g: &mut BenchmarkGroup<'_, WallTime>, dev: &Device, m: &Model) {
    let mut rng = Rng::new(16);
    let (t, d, s) = (CUDA_TOKENS, m.hidden, std::mem::size_of::<T>());
    let mut x = upload_rand::<T>(dev, &mut rng, t * d);
    let y = upload_rand::<T>(dev, &mut rng, t * d);
    g.throughput(Throughput::Bytes((3 * t * d * s) as u64));
    g.bench_function(
        BenchmarkId::new(format!("{}-{}", m.name, T::NAME), format!("{t}x{d}")),
        |b| b.iter_custom(|n| time_cuda(dev, n, || add(dev, &mut x, &y).unwrap())),
    );
}

/// A `cuda_<op>` group: bf16 and f32 on every model, or a printed reason to skip.
macro_rules! cuda_group {
    ($fn_name:ident, $group:literal, $one:ident) => {
        fn $fn_name(c: &mut Criterion) {
            let Some(dev) = cuda_or_say_why($group) else {
                return;
            };
            let mut g = c.benchmark_group($group);
            short(&mut g);
            for m in &MODELS {
                $one::<bf16>(&mut g, &dev, m);
                $one::<f32>(&mut g, &dev, m);
            }
            g.finish();
        }
    };
}

cuda_group!(
    cuda_rmsnorm_backward,
    "cuda_rmsnorm_backward",
    cuda_rmsnorm_backward_one
);
cuda_group!(cuda_rope, "cuda_rope", cuda_rope_one);
cuda_group!(cuda_swiglu, "cuda_swiglu", cuda_swiglu_one);
cuda_group!(
    cuda_swiglu_backward,
    "cuda_swiglu_backward",
    cuda_swiglu_backward_one
);
cuda_group!(cuda_embedding, "cuda_embedding", cuda_embedding_one);
cuda_group!(cuda_add, "cuda_add", cuda_add_one);

criterion_group!(
    benches,
    cpu_rmsnorm_backward,
    cuda_rmsnorm_backward,
    cpu_rope,
    cuda_rope,
    cpu_swiglu,
    cuda_swiglu,
    cpu_swiglu_backward,
    cuda_swiglu_backward,
    cpu_embedding,
    cuda_embedding,
    cpu_add,
    cuda_add
);
criterion_main!(benches);
