//! Training kernels: cross-entropy over LLaMA-7B / SmolLM2 vocabularies, AdamW and the gradient
//! norm over LoRA-sized parameter sets, and the per-sample LoRA gradient norms of data pruning.
//! `cpu_*` groups time the CPU reference; `cuda_*` groups run on a real GPU and say why they
//! skipped when there is none. Throughput is bytes moved (for the per-sample norms: the x and
//! dy rows, each read once at the least).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::cuda_or_say_why;
use recforge::backend::gpu::ops::lora::{self, DevLora, SampleNormScratch};
use recforge::backend::gpu::ops::{loss, optim};
use recforge::backend::{AdamW, Backend, Dropout, Lora};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

const ROWS: usize = 64;

fn bench_cross_entropy(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let cpu = Cpu::new();
    let mut g = c.benchmark_group("cpu_cross_entropy");
    for v in [32000usize, 49152] {
        let x: Vec<f32> = (0..ROWS * v).map(|_| rng.normal()).collect();
        let labels: Vec<u32> = (0..ROWS).map(|i| (i * 97 % v) as u32).collect();
        let lt = cpu
            .upload(&HostTensor::new(vec![ROWS], HostData::U32(labels)).unwrap())
            .unwrap();
        let mut lg = cpu
            .upload(&HostTensor::f32(vec![ROWS, v], x).unwrap())
            .unwrap();
        let mut l = cpu.zeros(&[ROWS], DType::F32).unwrap();
        g.throughput(Throughput::Bytes((3 * ROWS * v * 4) as u64)); // read twice, write once
        g.bench_with_input(BenchmarkId::from_parameter(v), &v, |b, _| {
            b.iter(|| cpu.cross_entropy(&mut lg, &lt, 1.0, &mut l).unwrap())
        });
    }
    g.finish();
    let Some(dev) = cuda_or_say_why("cuda_* groups") else {
        return;
    };
    let mut g = c.benchmark_group("cuda_cross_entropy_bf16");
    for v in [32000usize, 49152] {
        let x: Vec<half::bf16> = (0..ROWS * v)
            .map(|_| half::bf16::from_f32(rng.normal()))
            .collect();
        let labels: Vec<u32> = (0..ROWS).map(|i| (i * 97 % v) as u32).collect();
        let lb = dev.upload(&labels).unwrap();
        let mut lg = dev.upload(&x).unwrap();
        let mut l = dev.alloc_zeros::<f32>(ROWS).unwrap();
        g.throughput(Throughput::Bytes((3 * ROWS * v * 2) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(v), &v, |b, _| {
            b.iter(|| {
                loss::cross_entropy(&dev, &mut lg, &lb, 1.0, &mut l, ROWS, v).unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    g.finish();
}

fn bench_adamw(c: &mut Criterion) {
    let mut rng = Rng::new(2);
    let hp = AdamW::default();
    let cpu = Cpu::new();
    // LoRA r = 16 on q, k, v, o of LLaMA-7B: 32 layers × 4 × (16·4096 + 4096·16) = 16.8 M.
    let n_gpu = 32 * 4 * 2 * 16 * 4096;
    let n_cpu = n_gpu / 8;
    let mut g = c.benchmark_group("cpu_adamw");
    let mk = |n: usize, rng: &mut Rng| {
        cpu.upload(&HostTensor::f32(vec![n], (0..n).map(|_| rng.normal()).collect()).unwrap())
            .unwrap()
    };
    let (mut p, gr, mut m, mut v) = (
        mk(n_cpu, &mut rng),
        mk(n_cpu, &mut rng),
        cpu.zeros(&[n_cpu], DType::F32).unwrap(),
        cpu.zeros(&[n_cpu], DType::F32).unwrap(),
    );
    g.throughput(Throughput::Bytes((7 * n_cpu * 4) as u64)); // read p g m v, write p m v
    g.bench_function(BenchmarkId::from_parameter(n_cpu), |b| {
        b.iter(|| cpu.adamw(&mut p, &gr, &mut m, &mut v, hp, 1, 1.0).unwrap())
    });
    g.finish();
    let Some(dev) = cuda_or_say_why("cuda_* groups") else {
        return;
    };
    let mut g = c.benchmark_group("cuda_adamw");
    let host: Vec<f32> = (0..n_gpu).map(|_| rng.normal()).collect();
    let (mut p, gr) = (dev.upload(&host).unwrap(), dev.upload(&host).unwrap());
    let (mut m, mut v) = (
        dev.alloc_zeros::<f32>(n_gpu).unwrap(),
        dev.alloc_zeros::<f32>(n_gpu).unwrap(),
    );
    g.throughput(Throughput::Bytes((7 * n_gpu * 4) as u64));
    g.bench_function(BenchmarkId::from_parameter(n_gpu), |b| {
        b.iter(|| {
            optim::adamw(&dev, &mut p, &gr, &mut m, &mut v, hp, 1, 1.0).unwrap();
            dev.synchronize().unwrap();
        })
    });
    let mut ws = dev.alloc_zeros::<f32>(optim::SUM_SQUARES_BLOCKS).unwrap();
    let mut out = dev.alloc_zeros::<f32>(1).unwrap();
    g.finish();
    let mut g = c.benchmark_group("cuda_sum_squares");
    g.throughput(Throughput::Bytes((n_gpu * 4) as u64));
    g.bench_function(BenchmarkId::from_parameter(n_gpu), |b| {
        b.iter(|| {
            optim::sum_squares(&dev, &gr, &mut ws, &mut out).unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.finish();
}

/// 4 samples of 256 rows through one adapted projection: SmolLM2's q (576 → 576, r 8) on the
/// CPU, LLaMA-7B's (4096 → 4096, r 16) on CUDA.
fn bench_sample_norms(c: &mut Criterion) {
    let mut rng = Rng::new(3);
    let samples: Vec<(usize, usize)> = (0..4).map(|i| (i * 256, 256)).collect();
    let m = 4 * 256;
    let cpu = Cpu::new();
    let (k, n, r) = (576, 576, 8);
    let mut t = |shape: &[usize], scale: f32| {
        let v = (0..shape.iter().product())
            .map(|_| scale * rng.normal())
            .collect();
        cpu.upload(&HostTensor::f32(shape.to_vec(), v).unwrap())
            .unwrap()
    };
    let lora = Lora {
        a: t(&[r, k], 0.05),
        b: t(&[n, r], 0.05),
        scale: 2.0,
    };
    let (x, dy) = (t(&[m, k], 1.0), t(&[m, n], 1.0));
    let gate = cpu
        .upload(&HostTensor::f32(vec![m, r], vec![1.0; m * r]).unwrap())
        .unwrap();
    let mut h = cpu.zeros(&[m, r], DType::F32).unwrap();
    let mut u = cpu.zeros(&[m, r], DType::F32).unwrap();
    let mut y = cpu.zeros(&[m, n], DType::F32).unwrap();
    cpu.lora_forward(&x, &lora, &gate, Dropout::NONE, &mut h, &mut u, &mut y)
        .unwrap();
    let mut g = c.benchmark_group("cpu_lora_sample_norms");
    g.throughput(Throughput::Bytes((m * (k + n) * 4) as u64));
    g.bench_function("smollm2_q_r8_4x256", |b| {
        b.iter(|| {
            cpu.lora_sample_grad_sq_norms(&x, &lora, &gate, &h, &u, &dy, &samples)
                .unwrap()
        })
    });
    g.finish();
    let Some(dev) = cuda_or_say_why("cuda_* groups") else {
        return;
    };
    let (k, n, r) = (4096, 4096, 16);
    let bf = |len: usize, rng: &mut Rng| -> Vec<half::bf16> {
        (0..len)
            .map(|_| half::bf16::from_f32(rng.normal()))
            .collect()
    };
    let small =
        |len: usize, rng: &mut Rng| -> Vec<f32> { (0..len).map(|_| 0.02 * rng.normal()).collect() };
    let dl = DevLora {
        a: dev.upload(&small(r * k, &mut rng)).unwrap(),
        b: dev.upload(&small(n * r, &mut rng)).unwrap(),
        rank: r,
        k,
        n,
        scale: 2.0,
    };
    let x = dev.upload(&bf(m * k, &mut rng)).unwrap();
    let dy = dev.upload(&bf(m * n, &mut rng)).unwrap();
    let gate = dev.upload(&vec![1f32; m * r]).unwrap();
    let mut h = dev.alloc_zeros::<f32>(m * r).unwrap();
    let mut u = dev.alloc_zeros::<f32>(m * r).unwrap();
    lora::lora_down(
        &dev,
        &x,
        &dl.view(),
        &gate,
        Dropout::NONE,
        &mut h,
        &mut u,
        m,
    )
    .unwrap();
    let mut scratch = SampleNormScratch::new(&dev, &dl.view(), 256, samples.len()).unwrap();
    let mut g = c.benchmark_group("cuda_lora_sample_norms");
    g.throughput(Throughput::Bytes((m * (k + n) * 2) as u64));
    g.bench_function("llama7b_q_r16_4x256", |b| {
        b.iter(|| {
            lora::sample_grad_sq_norms(
                &dev,
                &x,
                &dl.view(),
                &gate,
                &h,
                &u,
                &dy,
                &samples,
                &mut scratch,
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_cross_entropy,
    bench_adamw,
    bench_sample_norms
);
criterion_main!(benches);
