//! CPU reference op throughput on SmolLM2-135M shapes: decode (1-64 rows) and the demo's
//! training micro-batch (4 sequences of 256 tokens = 1024 rows). Run: cargo bench --bench cpu_ops
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use recforge::backend::cpu::{quantize_rows, Cpu};
use recforge::backend::{Backend, Dropout, Linear, LinearWeight, Lora, SeqSpan, Tensor};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

/// Training micro-batch rows: the demo's 4 sequences × 256 tokens.
const TRAIN_ROWS: usize = 1024;

fn tensor(be: &Cpu, rng: &mut Rng, shape: &[usize]) -> Tensor<Cpu> {
    let n = shape.iter().product();
    be.upload(&HostTensor::f32(shape.to_vec(), rand(rng, n)).unwrap())
        .unwrap()
}

fn int8_linear(be: &Cpu, rng: &mut Rng, n: usize, k: usize) -> Linear<Cpu> {
    let (q, s) = quantize_rows(&rand(rng, n * k), n, k);
    Linear {
        weight: LinearWeight::Int8 {
            w: be
                .upload(&HostTensor::new(vec![n, k], HostData::I8(q)).unwrap())
                .unwrap(),
            scale: be.upload(&HostTensor::f32(vec![n], s).unwrap()).unwrap(),
        },
        out_features: n,
        in_features: k,
        outlier_threshold: 6.0,
    }
}

fn bench_linear(c: &mut Criterion) {
    let be = Cpu::new();
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("cpu_linear_int8");
    // SmolLM2 gate/up projection: 576 → 1536.
    let (n, k) = (1536, 576);
    let lin = int8_linear(&be, &mut rng, n, k);
    for t in [1usize, 16, 64, TRAIN_ROWS] {
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

/// One dX = dY · W case of `linear_backward_input` in group `g`: `t` rows through `lin`.
fn bench_dx(
    g: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    be: &Cpu,
    rng: &mut Rng,
    lin: &Linear<Cpu>,
    t: usize,
) {
    let (n, k) = (lin.out_features, lin.in_features);
    let dy = tensor(be, rng, &[t, n]);
    let mut dx = be.zeros(&[t, k], DType::F32).unwrap();
    g.throughput(Throughput::Elements((2 * t * n * k) as u64));
    g.bench_with_input(
        BenchmarkId::from_parameter(format!("{t}x{n}to{k}")),
        &t,
        |b, _| b.iter(|| be.linear_backward_input(&dy, lin, &mut dx, false).unwrap()),
    );
}

/// dX = dY · dequant(W) of the backward, for up (1536 → 576 into dX) and down (576 → 1536).
fn bench_linear_backward_input(c: &mut Criterion) {
    let be = Cpu::new();
    let mut rng = Rng::new(3);
    let mut g = c.benchmark_group("cpu_linear_backward_input_int8");
    for (n, k) in [(1536usize, 576usize), (576, 1536)] {
        let lin = int8_linear(&be, &mut rng, n, k);
        bench_dx(&mut g, &be, &mut rng, &lin, TRAIN_ROWS);
    }
    g.finish();
}

/// dX = dY · E through SmolLM2's tied head (the embedding table, kept in f32: 49152 → 576) over
/// one 128-row chunk of the loss (`train::step::HEAD_CHUNK`), twice per demo micro-batch.
fn bench_head_backward_input(c: &mut Criterion) {
    let be = Cpu::new();
    let mut rng = Rng::new(4);
    let mut g = c.benchmark_group("cpu_linear_backward_input_f32");
    let (n, k) = (49152usize, 576usize);
    let lin = Linear {
        weight: LinearWeight::Dense(tensor(&be, &mut rng, &[n, k])),
        out_features: n,
        in_features: k,
        outlier_threshold: 6.0,
    };
    bench_dx(&mut g, &be, &mut rng, &lin, 128);
    g.finish();
}

/// LoRA r = 8 on a 576 → 576 projection (q), dropout 0.05: forward and backward.
fn bench_lora(c: &mut Criterion) {
    let be = Cpu::new();
    let mut rng = Rng::new(4);
    let (m, k, r, n) = (TRAIN_ROWS, 576, 8, 576);
    let lora = Lora {
        a: tensor(&be, &mut rng, &[r, k]),
        b: tensor(&be, &mut rng, &[n, r]),
        scale: 2.0,
    };
    let x = tensor(&be, &mut rng, &[m, k]);
    let dy = tensor(&be, &mut rng, &[m, n]);
    let gate = be
        .upload(&HostTensor::f32(vec![m, r], vec![1.0; m * r]).unwrap())
        .unwrap();
    let dropout = Dropout { p: 0.05, seed: 7 };
    let mut h = be.zeros(&[m, r], DType::F32).unwrap();
    let mut u = be.zeros(&[m, r], DType::F32).unwrap();
    let mut y = be.zeros(&[m, n], DType::F32).unwrap();
    let (mut da, mut db) = (
        be.zeros(&[r, k], DType::F32).unwrap(),
        be.zeros(&[n, r], DType::F32).unwrap(),
    );
    let mut dg = be.zeros(&[m, r], DType::F32).unwrap();
    let mut dx = be.zeros(&[m, k], DType::F32).unwrap();
    let mut g = c.benchmark_group("cpu_lora");
    // FLOP of the two low-rank products (forward) and the four of the backward.
    g.throughput(Throughput::Elements((2 * m * r * (k + n)) as u64));
    g.bench_function("forward", |b| {
        b.iter(|| {
            be.lora_forward(&x, &lora, &gate, dropout, &mut h, &mut u, &mut y)
                .unwrap()
        })
    });
    g.throughput(Throughput::Elements((4 * m * r * (k + n)) as u64));
    g.bench_function("backward", |b| {
        b.iter(|| {
            be.lora_backward(
                &x, &lora, &gate, dropout, &h, &u, &dy, &mut da, &mut db, &mut dg, &mut dx,
            )
            .unwrap()
        })
    });
    g.finish();
}

/// Causal attention over the micro-batch: 4 sequences × 256, 9 query heads over 3 KV heads × 64.
fn bench_attention(c: &mut Criterion) {
    let be = Cpu::new();
    let mut rng = Rng::new(5);
    let (seqs, len, h, kvh, hd) = (4usize, 256usize, 9usize, 3usize, 64usize);
    let t = seqs * len;
    let q = tensor(&be, &mut rng, &[t, h, hd]);
    let k = tensor(&be, &mut rng, &[t, kvh, hd]);
    let v = tensor(&be, &mut rng, &[t, kvh, hd]);
    let dy = tensor(&be, &mut rng, &[t, h, hd]);
    let pos: Vec<u32> = (0..t).map(|i| (i % len) as u32).collect();
    let positions = be
        .upload(&HostTensor::new(vec![t], HostData::U32(pos)).unwrap())
        .unwrap();
    let spans: Vec<SeqSpan> = (0..seqs)
        .map(|s| SeqSpan {
            q_start: s * len,
            q_len: len,
            kv_start: s * len,
            kv_len: len,
        })
        .collect();
    let mut out = be.zeros(&[t, h, hd], DType::F32).unwrap();
    let mut dq = be.zeros(&[t, h, hd], DType::F32).unwrap();
    let mut dk = be.zeros(&[t, kvh, hd], DType::F32).unwrap();
    let mut dv = be.zeros(&[t, kvh, hd], DType::F32).unwrap();
    // Causal pairs × heads × head_dim × 2 FLOP per product: QKᵀ and PV forward.
    let pairs = seqs * len * (len + 1) / 2;
    let mut g = c.benchmark_group("cpu_attention");
    g.throughput(Throughput::Elements((4 * pairs * h * hd) as u64));
    g.bench_function("forward", |b| {
        b.iter(|| {
            be.attention(&q, &k, &v, &positions, &spans, &mut out)
                .unwrap()
        })
    });
    g.throughput(Throughput::Elements((10 * pairs * h * hd) as u64));
    g.bench_function("backward", |b| {
        b.iter(|| {
            be.attention_backward(
                &q, &k, &v, &positions, &spans, &dy, &mut dq, &mut dk, &mut dv,
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_linear,
    bench_linear_backward_input,
    bench_head_backward_input,
    bench_lora,
    bench_attention,
    bench_rmsnorm
);
criterion_main!(benches);
