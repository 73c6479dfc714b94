//! One decode step of batched generation (`Llama::forward_paged` over the paged KV cache, then
//! `Backend::sample` over the batch's logits — what `infer::batch::generate_batch` runs per
//! token), for B sequences each with `CONTEXT` tokens already cached. Throughput is B tokens a
//! step, so criterion's elem/s is generated tokens per second; the ratio between batch sizes is
//! what batching buys (the linears read their weights once per step for the whole batch).
//!
//! Models have random int8 weights (`model::random`): `cpu_decode_step` the SmolLM2-135M shape
//! (30 layers) at batch 1 / 8 / 32; `cuda_decode_step` the same at batch 1 / 16 / 64 and a
//! 4-layer slice of the LLaMA-7B shape (a full 7B step costs about 8 times the slice's layers
//! plus its head), which says why it skipped without a GPU.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::backend::Gpu;
use recforge::backend::gpu::cuda_or_say_why;
use recforge::backend::{Backend, SamplingParams};
use recforge::infer::paged::PagedKv;
use recforge::model::random::{random_llama, shape};
use recforge::model::{CachedAttention, Llama, LlamaConfig, PagedAttention, PagedStep};

const CONTEXT: usize = 512;
const BLOCK: usize = 16;

/// A model of `cfg` with B sequences of CONTEXT − 1 cached tokens and a slot reserved for the
/// next one, and a closure running the step (the same slots every time: the step is idempotent).
fn decode_case<B: Backend>(
    c: &mut Criterion,
    group: &str,
    be: &B,
    name: &str,
    cfg: &LlamaConfig,
    batches: &[usize],
) {
    let m: Llama<B> = random_llama(be, cfg, 1).expect("random model");
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for &b in batches {
        let blocks = b * CONTEXT.div_ceil(BLOCK);
        let mut kv = PagedKv::new(blocks, BLOCK).expect("allocator");
        let mut cache = m.new_paged_cache(be, blocks, BLOCK).expect("cache");
        let mut slots = vec![];
        for s in 0..b as u64 {
            kv.add_sequence(s).unwrap();
            let (sl, _) = kv.append(s, CONTEXT).unwrap();
            slots.push(*sl.last().unwrap() as u32);
        }
        let ids: Vec<u64> = (0..b as u64).collect();
        let (tables, mb) = kv.block_tables(&ids).unwrap();
        let lens = vec![CONTEXT as i32; b];
        let tokens: Vec<u32> = (0..b as u32).map(|i| 3 + i).collect();
        let positions = vec![CONTEXT as u32 - 1; b];
        let rows: Vec<usize> = (0..b).collect();
        let params = vec![SamplingParams::ITREK; b];
        let us = vec![0.5f32; b];
        g.throughput(Throughput::Elements(b as u64));
        g.bench_with_input(BenchmarkId::new(name, b), &b, |bench, _| {
            bench.iter(|| {
                let step = PagedStep {
                    tokens: &tokens,
                    positions: &positions,
                    slots: &slots,
                    attention: PagedAttention::Cached(CachedAttention {
                        block_tables: &tables,
                        max_blocks: mb,
                        context_lens: &lens,
                        queries: 1,
                    }),
                    logit_rows: &rows,
                };
                let logits = m
                    .forward_paged(be, &step, &mut cache, None)
                    .unwrap()
                    .unwrap();
                be.sample(&logits, &params, &us).unwrap()
            })
        });
    }
    g.finish();
}

fn bench_cpu(c: &mut Criterion) {
    let smol = shape("smollm2-135m").unwrap();
    decode_case(
        c,
        "cpu_decode_step",
        &Cpu::new(),
        "smollm2-135m",
        &smol,
        &[1, 8, 32],
    );
}

fn bench_cuda(c: &mut Criterion) {
    let Some(dev) = cuda_or_say_why("cuda_decode_step") else {
        return;
    };
    let be = Gpu::new(dev);
    let smol = shape("smollm2-135m").unwrap();
    decode_case(
        c,
        "cuda_decode_step",
        &be,
        "smollm2-135m",
        &smol,
        &[1, 16, 64],
    );
    let mut l7 = shape("llama-7b").unwrap();
    l7.num_hidden_layers = 4;
    decode_case(
        c,
        "cuda_decode_step",
        &be,
        "llama-7b-4layers",
        &l7,
        &[1, 16, 64],
    );
}

criterion_group!(benches, bench_cpu, bench_cuda);
criterion_main!(benches);
