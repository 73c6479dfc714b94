//! Decode attention over the paged KV cache (kernels/paged_kv.cu: `paged_decode_bf16` plus its
//! partition merge) at the LLaMA-7B shape — 32 heads, 32 KV heads, head_dim 128, blocks of 16
//! tokens — for contexts 512 / 2048 / 8192 and batches 1 / 16 / 64, one query token per
//! sequence. Throughput is the K/V bytes the step must read (batch · context · KV heads ·
//! head_dim · 2 bytes · K and V), so criterion's bytes/s is the achieved KV bandwidth.
//! `paged` scatters every sequence's blocks over the whole cache (a random permutation);
//! `contiguous` maps sequence b to consecutive blocks — the same kernel, so the gap is the cost
//! of the indirection. `cuda_*` runs on a real GPU and says why it skipped otherwise;
//! `cpu_decode_attention` times the CPU reference (`Cpu::attention`) on one small case.
//!
//! `cuda_attention_fwd` is the prefill / training forward (kernels/attention.cu) on packed causal
//! sequences: the tiled tensor-core kernel (`tiled`) against the warp-per-row one (`per_row`) at
//! LLaMA-7B heads (32/32, head_dim 128, 4 × 1024 tokens) and SmolLM2 heads (9/3, head_dim 64,
//! 8 × 512). Throughput is the causal forward's FLOPs, 2 · 2 · Σ_seq (L·(L+1)/2) · heads · hd,
//! counted as elements (criterion prints them as elem/s). `cuda_attention_bwd` times the
//! backward (FLOPs counted as 2.5× the forward's: five matmuls against two, its recomputed
//! forward not counted) — tiled at both shapes; the warp-per-row kernel, whose per-key atomics
//! make it far slower, only at a small SmolLM2 shape (2 × 256) next to the tiled one.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;

use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::cuda_or_say_why;
use recforge::backend::gpu::ops::attention::{
    attention_backward_with, attention_forward_with, AttnGradScratch, AttnGrads, AttnInputs,
    AttnKernel, AttnShape,
};
use recforge::backend::gpu::ops::paged::{
    paged_decode, paged_decode_scratch_len, DecodeBatch, PagedShape,
};
use recforge::backend::{Backend, SeqSpan};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

const HEADS: usize = 32;
const KV_HEADS: usize = 32;
const HEAD_DIM: usize = 128;
const BLOCK: usize = 16;
const CONTEXTS: [usize; 3] = [512, 2048, 8192];
const BATCHES: [usize; 3] = [1, 16, 64];

/// K + V bytes one decode step reads for `batch` sequences of `ctx` tokens.
fn kv_bytes(batch: usize, ctx: usize) -> u64 {
    (batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2) as u64
}

fn bench_cpu(c: &mut Criterion) {
    let cpu = Cpu::new();
    let mut rng = Rng::new(1);
    let ctx = 512;
    let t = |shape: &[usize], rng: &mut Rng| {
        let n = shape.iter().product();
        cpu.upload(
            &HostTensor::f32(shape.to_vec(), (0..n).map(|_| rng.normal()).collect()).unwrap(),
        )
        .unwrap()
    };
    let q = t(&[1, HEADS, HEAD_DIM], &mut rng);
    let k = t(&[ctx, KV_HEADS, HEAD_DIM], &mut rng);
    let v = t(&[ctx, KV_HEADS, HEAD_DIM], &mut rng);
    let pos = cpu
        .upload(&HostTensor::new(vec![1], HostData::U32(vec![ctx as u32 - 1])).unwrap())
        .unwrap();
    let spans = [SeqSpan {
        q_start: 0,
        q_len: 1,
        kv_start: 0,
        kv_len: ctx,
    }];
    let mut out = cpu.zeros(&[1, HEADS, HEAD_DIM], DType::F32).unwrap();
    let mut g = c.benchmark_group("cpu_decode_attention");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes(kv_bytes(1, ctx) * 2)); // f32 K and V
    g.bench_function(BenchmarkId::from_parameter(format!("ctx{ctx}_b1")), |b| {
        b.iter(|| cpu.attention(&q, &k, &v, &pos, &spans, &mut out).unwrap())
    });
    g.finish();
}

fn bench_cuda(c: &mut Criterion) {
    let Some(dev) = cuda_or_say_why("cuda_* groups") else {
        return;
    };
    let mut rng = Rng::new(2);
    let max_batch = *BATCHES.iter().max().unwrap();
    let max_ctx = *CONTEXTS.iter().max().unwrap();
    // One cache for the largest case (64 × 8192 tokens: 2 × 4 GiB), filled with random bf16 by
    // copying one random 16 MiB chunk over it.
    let shape = PagedShape {
        num_blocks: max_batch * max_ctx / BLOCK,
        block_size: BLOCK,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    };
    let total = shape.slots() * shape.row();
    let chunk_len = 8 << 20;
    let chunk = dev
        .upload(
            &(0..chunk_len)
                .map(|_| bf16::from_f32(rng.normal()))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let mut kc = dev.alloc_zeros::<bf16>(total).unwrap();
    let mut vc = dev.alloc_zeros::<bf16>(total).unwrap();
    for off in (0..total).step_by(chunk_len) {
        let n = chunk_len.min(total - off);
        dev.copy(&chunk, 0, &mut kc, off, n).unwrap();
        dev.copy(&chunk, 0, &mut vc, off, n).unwrap();
    }
    // Paged: a random permutation of all blocks; contiguous: the identity.
    let mut perm: Vec<i32> = (0..shape.num_blocks as i32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let ident: Vec<i32> = (0..shape.num_blocks as i32).collect();
    let mut scratch = dev
        .alloc_zeros::<f32>(paged_decode_scratch_len(
            max_batch, 1, HEADS, HEAD_DIM, max_ctx,
        ))
        .unwrap();

    let mut g = c.benchmark_group("cuda_paged_decode_bf16");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for ctx in CONTEXTS {
        for batch in BATCHES {
            let max_blocks = ctx / BLOCK;
            let lens = vec![ctx as i32; batch];
            let lens_d = dev.upload(&lens).unwrap();
            let q: Vec<bf16> = (0..batch * HEADS * HEAD_DIM)
                .map(|_| bf16::from_f32(rng.normal()))
                .collect();
            let q = dev.upload(&q).unwrap();
            let mut out = dev.alloc_zeros::<bf16>(batch * HEADS * HEAD_DIM).unwrap();
            g.throughput(Throughput::Bytes(kv_bytes(batch, ctx)));
            for (layout, blocks) in [("paged", &perm), ("contiguous", &ident)] {
                let tables = dev.upload(&blocks[..batch * max_blocks]).unwrap();
                let b = DecodeBatch {
                    block_tables: &tables,
                    max_blocks,
                    context_lens: &lens_d,
                    host_context_lens: &lens,
                    queries: 1,
                };
                let id = BenchmarkId::new(layout, format!("ctx{ctx}_b{batch}"));
                g.bench_function(id, |bch| {
                    bch.iter(|| {
                        paged_decode(
                            &dev,
                            &q,
                            &kc,
                            &vc,
                            shape,
                            HEADS,
                            &b,
                            Some(&mut scratch),
                            &mut out,
                        )
                        .unwrap();
                        dev.synchronize().unwrap();
                    })
                });
            }
        }
    }
    g.finish();
}

fn bench_cuda_prefill(c: &mut Criterion) {
    let Some(dev) = cuda_or_say_why("cuda_* groups") else {
        return;
    };
    let mut rng = Rng::new(3);
    for (name, heads, kv_heads, hd, seqs, len) in [
        (
            "llama7b_4x1024",
            32usize,
            32usize,
            128usize,
            4usize,
            1024usize,
        ),
        ("smollm2_8x512", 9, 3, 64, 8, 512),
        ("smollm2_2x256", 9, 3, 64, 2, 256),
    ] {
        let t = seqs * len;
        let spans: Vec<SeqSpan> = (0..seqs)
            .map(|i| SeqSpan {
                q_start: i * len,
                q_len: len,
                kv_start: i * len,
                kv_len: len,
            })
            .collect();
        let positions: Vec<u32> = (0..t).map(|i| (i % len) as u32).collect();
        let rand = |n: usize, rng: &mut Rng| -> Vec<bf16> {
            (0..n).map(|_| bf16::from_f32(rng.normal())).collect()
        };
        let q = dev.upload(&rand(t * heads * hd, &mut rng)).unwrap();
        let k = dev.upload(&rand(t * kv_heads * hd, &mut rng)).unwrap();
        let v = dev.upload(&rand(t * kv_heads * hd, &mut rng)).unwrap();
        let pos = dev.upload(&positions).unwrap();
        let mut sb = dev.alloc_zeros::<i32>(4 * seqs).unwrap();
        let mut out = dev.alloc_zeros::<bf16>(t * heads * hd).unwrap();
        let mut lse = dev.alloc_zeros::<f32>(t * heads).unwrap();
        let shape = AttnShape {
            tq: t,
            tk: t,
            heads,
            kv_heads,
            head_dim: hd,
        };
        let flops = 4 * seqs * len * (len + 1) / 2 * heads * hd;
        let x = AttnInputs {
            q: &q,
            k: &k,
            v: &v,
            positions: &pos,
            spans: &spans,
            shape,
        };
        let mut g = c.benchmark_group("cuda_attention_fwd");
        g.measurement_time(Duration::from_secs(3));
        g.throughput(Throughput::Elements(flops as u64));
        for (kname, kernel) in [("tiled", AttnKernel::Auto), ("per_row", AttnKernel::PerRow)] {
            g.bench_function(BenchmarkId::new(kname, name), |b| {
                b.iter(|| {
                    attention_forward_with(&dev, kernel, &x, &mut sb, &mut out, &mut lse).unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
        g.finish();
        let mut g = c.benchmark_group("cuda_attention_bwd");
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(3));
        g.throughput(Throughput::Elements((flops * 5 / 2) as u64));
        let dy = dev.upload(&rand(t * heads * hd, &mut rng)).unwrap();
        let mut dq = dev.alloc_zeros::<bf16>(t * heads * hd).unwrap();
        let mut dk = dev.alloc_zeros::<bf16>(t * kv_heads * hd).unwrap();
        let mut dv = dev.alloc_zeros::<bf16>(t * kv_heads * hd).unwrap();
        let mut scratch = AttnGradScratch::new(&dev, shape).unwrap();
        let kernels: &[(&str, AttnKernel)] = if name == "smollm2_2x256" {
            &[("tiled", AttnKernel::Auto), ("per_row", AttnKernel::PerRow)]
        } else {
            &[("tiled", AttnKernel::Auto)]
        };
        for &(kname, kernel) in kernels {
            g.bench_function(BenchmarkId::new(kname, name), |b| {
                b.iter(|| {
                    let g = AttnGrads {
                        dy: &dy,
                        dq: &mut dq,
                        dk: &mut dk,
                        dv: &mut dv,
                    };
                    attention_backward_with(&dev, kernel, &x, &mut sb, g, &mut scratch).unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench_cpu, bench_cuda, bench_cuda_prefill);
criterion_main!(benches);
