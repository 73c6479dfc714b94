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
//!
//! `cpu_prefill` / `cuda_prefill`: the own tokens of G prompts after a cached shared prefix
//! (`PREFIX` tokens; own parts of 104–176 tokens, TALLRec-like), prefilled `together` in one
//! forward (what `generate_batch` does with the prompts it admits at once) or `one_at_a_time`
//! (G forwards, `--prefill-tokens 1`), each ending in the sampler over the prompts' last rows.
//! Throughput is prompt tokens per second.
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
        let queries = vec![1; b];
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
                        queries: &queries,
                    }),
                    logit_rows: &rows,
                    lora_gate: None,
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

const PREFIX: usize = 71;

/// Own tokens of prompt i of a prefill group: 104 to 176, different for neighbours.
fn own_len(i: usize) -> usize {
    104 + 24 * (i % 4)
}

/// G prompts forked from a cached prefix, their own tokens prefilled together or one at a
/// time (the same slots every iteration: the steps are idempotent).
fn prefill_case<B: Backend>(
    c: &mut Criterion,
    group: &str,
    be: &B,
    name: &str,
    cfg: &LlamaConfig,
    prompts: usize,
) {
    const ROOT: u64 = u64::MAX;
    let m: Llama<B> = random_llama(be, cfg, 2).expect("random model");
    let own: Vec<usize> = (0..prompts).map(own_len).collect();
    let total: usize = own.iter().sum();
    let blocks = PREFIX.div_ceil(BLOCK) + own.iter().map(|o| o.div_ceil(BLOCK) + 1).sum::<usize>();
    let mut kv = PagedKv::new(blocks, BLOCK).expect("allocator");
    let mut cache = m.new_paged_cache(be, blocks, BLOCK).expect("cache");
    kv.add_sequence(ROOT).unwrap();
    kv.append(ROOT, PREFIX).unwrap();
    let mut slots = vec![];
    for (s, &o) in own.iter().enumerate() {
        kv.fork(ROOT, s as u64).unwrap();
        let (sl, _) = kv.append(s as u64, o).unwrap();
        slots.push(sl.iter().map(|&x| x as u32).collect::<Vec<u32>>());
    }
    let tokens: Vec<Vec<u32>> = own
        .iter()
        .enumerate()
        .map(|(s, &o)| {
            (0..o as u32)
                .map(|j| 3 + (j * 31 + s as u32 * 7) % 1000)
                .collect()
        })
        .collect();
    let positions: Vec<Vec<u32>> = own
        .iter()
        .map(|&o| (PREFIX as u32..(PREFIX + o) as u32).collect())
        .collect();
    // One step over the prompts `ids`, rows sequence after sequence.
    let step = |ids: &[usize], cache: &mut recforge::model::PagedCache<B>| {
        let seq_ids: Vec<u64> = ids.iter().map(|&i| i as u64).collect();
        let (tables, mb) = kv.block_tables(&seq_ids).unwrap();
        let lens: Vec<i32> = ids.iter().map(|&i| (PREFIX + own[i]) as i32).collect();
        let queries: Vec<usize> = ids.iter().map(|&i| own[i]).collect();
        let cat = |v: &[Vec<u32>]| ids.iter().flat_map(|&i| v[i].clone()).collect::<Vec<u32>>();
        let (t, p, sl) = (cat(&tokens), cat(&positions), cat(&slots));
        let rows: Vec<usize> = queries
            .iter()
            .scan(0, |at, &q| {
                *at += q;
                Some(*at - 1)
            })
            .collect();
        let logits = m
            .forward_paged(
                be,
                &PagedStep {
                    tokens: &t,
                    positions: &p,
                    slots: &sl,
                    attention: PagedAttention::Cached(CachedAttention {
                        block_tables: &tables,
                        max_blocks: mb,
                        context_lens: &lens,
                        queries: &queries,
                    }),
                    logit_rows: &rows,
                    lora_gate: None,
                },
                cache,
                None,
            )
            .unwrap()
            .unwrap();
        let params = vec![SamplingParams::GREEDY; ids.len()];
        be.sample(&logits, &params, &vec![0.5; ids.len()]).unwrap()
    };
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(total as u64));
    let all: Vec<usize> = (0..prompts).collect();
    g.bench_with_input(
        BenchmarkId::new(format!("{name}/together"), prompts),
        &prompts,
        |bench, _| bench.iter(|| step(&all, &mut cache)),
    );
    g.bench_with_input(
        BenchmarkId::new(format!("{name}/one_at_a_time"), prompts),
        &prompts,
        |bench, _| {
            bench.iter(|| {
                for i in 0..prompts {
                    step(&[i], &mut cache);
                }
            })
        },
    );
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
    prefill_case(c, "cpu_prefill", &Cpu::new(), "smollm2-135m", &smol, 4);
}

fn bench_cuda(c: &mut Criterion) {
    let Some(dev) = cuda_or_say_why("cuda_decode_step and cuda_prefill") else {
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
    prefill_case(c, "cuda_prefill", &be, "smollm2-135m", &smol, 8);
    prefill_case(c, "cuda_prefill", &be, "llama-7b-4layers", &l7, 8);
}

criterion_group!(benches, bench_cpu, bench_cuda);
criterion_main!(benches);
