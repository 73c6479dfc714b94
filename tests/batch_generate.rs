//! Batched generation over the paged KV cache (`infer::batch`, `Llama::forward_paged`,
//! `Backend::{kv_write, paged_attention, copy_rows_within}`).
//!
//! On the CPU reference a paged forward gives the bits of the contiguous one (its
//! `paged_attention` gathers each sequence's K/V and runs the contiguous attention), so there a
//! batched run must give each request exactly the tokens `generate` gives it alone — whatever
//! the batch size, the shared prefix, the cache size (preemption) or the other requests. On the
//! GPU backend (simulator, and CUDA when present) the paged decode kernel and the flash
//! attention round differently, so there the paged forward is held to a bound against the
//! contiguous forward on the same backend.
//!
//! The models use outlier threshold 0: LLM.int8 picks outlier columns per batch of rows, which
//! would make a row's result depend on the other rows of its batch.

mod common;

use common::fixture;
use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::backend::Gpu;
use recforge::backend::{Backend, SamplingParams, SeqSpan};
use recforge::infer::batch::{generate_batch, BatchOptions, Request};
use recforge::infer::generate::{generate, GenerateOptions};
use recforge::infer::paged::PagedKv;
use recforge::model::fixture::FixtureSpec;
use recforge::model::{
    self, CachedAttention, Llama, LoadOptions, Logits, PagedAttention, PagedStep,
};

const OPTS: LoadOptions = LoadOptions {
    int8: true,
    outlier_threshold: 0.0,
};

fn load<B: Backend>(be: &B, path: &std::path::Path) -> Llama<B> {
    let src = model::open(path).unwrap();
    Llama::load(src.as_ref(), be, OPTS).unwrap()
}

/// Prompts sharing a 13-token prefix, of different lengths — one of them the prefix plus a
/// single token, one with 40 tokens of its own (past `GATHER_ABOVE_QUERIES`: its prefill
/// gathers K/V for the flash attention); ids below the fixture's vocabulary.
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    let prefix: Vec<u32> = (0..13).map(|i| (i * 37 + 5) % vocab).collect();
    let long: Vec<u32> = (0..40).map(|i| i * 13 + 3).collect();
    assert!(long.len() > recforge::model::llama::GATHER_ABOVE_QUERIES);
    let tails: [&[u32]; 5] = [&[7, 8, 9], &[11], &long, &[200, 201], &[42; 5]];
    tails
        .iter()
        .map(|t| prefix.iter().chain(t.iter()).map(|&x| x % vocab).collect())
        .collect()
}

/// Greedy and sampled requests with different lengths and stop tokens.
fn requests(vocab: u32) -> Vec<Request> {
    prompts(vocab)
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| Request {
            prompt,
            options: GenerateOptions {
                max_new_tokens: [6, 9, 4, 12, 7][i],
                // A stop token some sampled runs meet early.
                stop_ids: if i == 3 { vec![65, 66, 67, 68] } else { vec![] },
                sampling: if i % 2 == 0 {
                    SamplingParams::GREEDY
                } else {
                    SamplingParams {
                        temperature: 1.3,
                        top_k: 0,
                        top_p: 1.0,
                    }
                },
                seed: 100 + i as u64,
            },
            adapter: None,
        })
        .collect()
}

#[test]
fn batched_generation_gives_each_request_its_own_tokens_on_the_cpu() {
    let (_d, f) = fixture(&FixtureSpec::default());
    let be = Cpu::new();
    let m = load(&be, &f.gguf);
    let reqs = requests(f.config.vocab_size as u32);
    let want: Vec<_> = reqs
        .iter()
        .map(|r| generate(&be, &m, &r.prompt, &r.options, |_| Ok(())).unwrap())
        .collect();
    assert!(
        want.iter().any(|g| g.tokens.len() > 3),
        "the requests should generate more than a few tokens"
    );
    let all = usize::MAX;
    let cases = [
        // Everything at once, the shared prefix in a partial block (13 = 3 × 4 + 1), the five
        // own parts (3, 1, 40, 2, 5 tokens) prefilled in one forward.
        (
            "batch 8",
            BatchOptions {
                max_batch: 8,
                block_size: 4,
                num_blocks: None,
                share_prefix: true,
                max_prefill_tokens: all,
            },
        ),
        // Prefills of at most 20 own tokens: 3 + 1, then the 40 in two chunks, then 2 + 5.
        (
            "prefills of 20",
            BatchOptions {
                max_batch: 8,
                block_size: 4,
                num_blocks: None,
                share_prefix: true,
                max_prefill_tokens: 20,
            },
        ),
        // Prefills of at most 8 tokens: 3 + 1; the 40 in five chunks of 8, each after the
        // ones before it in the cache; then 2 + 5.
        (
            "chunks of 8",
            BatchOptions {
                max_batch: 8,
                block_size: 4,
                num_blocks: None,
                share_prefix: true,
                max_prefill_tokens: 8,
            },
        ),
        // One token a prefill: every own token its own step (51 = 3 + 1 + 40 + 2 + 5).
        (
            "chunks of 1",
            BatchOptions {
                max_batch: 8,
                block_size: 4,
                num_blocks: None,
                share_prefix: true,
                max_prefill_tokens: 1,
            },
        ),
        // Continuous admission: two at a time.
        (
            "batch 2",
            BatchOptions {
                max_batch: 2,
                block_size: 4,
                num_blocks: None,
                share_prefix: true,
                max_prefill_tokens: all,
            },
        ),
        // No prefix sharing, blocks of 16: whole prompts prefilled together.
        (
            "unshared",
            BatchOptions {
                max_batch: 5,
                block_size: 16,
                num_blocks: None,
                share_prefix: false,
                max_prefill_tokens: all,
            },
        ),
        // No sharing, at most 16 tokens a prefill: prompts of 16, 14, 53 (chunks of 16, 16,
        // 16, 5: the first with nothing cached), 15 and 18 (16, 2).
        (
            "unshared chunks of 16",
            BatchOptions {
                max_batch: 5,
                block_size: 16,
                num_blocks: None,
                share_prefix: false,
                max_prefill_tokens: 16,
            },
        ),
        // A cache too small for every running sequence: preemption and recomputation.
        (
            "preempting",
            BatchOptions {
                max_batch: 5,
                block_size: 2,
                num_blocks: Some(40),
                share_prefix: true,
                max_prefill_tokens: all,
            },
        ),
    ];
    for (name, opts) in cases {
        let mut streamed = vec![vec![]; reqs.len()];
        let got = generate_batch(&be, &m, None, &reqs, &opts, |r, t| {
            streamed[r].push(t);
            Ok(())
        })
        .unwrap();
        eprintln!("{name}: {:?}", got.stats);
        for (i, (g, w)) in got.generations.iter().zip(&want).enumerate() {
            assert_eq!(g.tokens, w.tokens, "{name}: request {i}");
            assert_eq!(g.stop, w.stop, "{name}: request {i}");
            assert_eq!(g.prompt_tokens, w.prompt_tokens);
            assert_eq!(streamed[i], g.tokens, "{name}: request {i} streamed");
        }
        let s = &got.stats;
        assert_eq!(
            s.generated_tokens,
            want.iter().map(|g| g.tokens.len()).sum::<usize>()
        );
        match name {
            "batch 8" => {
                assert_eq!(s.shared_prefix, 13);
                assert_eq!(s.max_running, 5);
                assert_eq!(s.preemptions, 0);
                assert_eq!(s.prefill_steps, 1, "one forward for every own part");
            }
            "prefills of 20" => assert_eq!(s.prefill_steps, 4),
            "chunks of 8" => assert_eq!(s.prefill_steps, 7),
            "chunks of 1" => assert_eq!(s.prefill_steps, 51),
            "unshared chunks of 16" => assert_eq!(s.prefill_steps, 9),
            "batch 2" => assert!(s.max_running <= 2 && s.preemptions == 0),
            "unshared" => {
                assert_eq!(s.shared_prefix, 0);
                assert_eq!(s.prefill_steps, 1);
            }
            "preempting" => assert!(s.preemptions > 0, "no preemption: {s:?}"),
            _ => unreachable!(),
        }
    }
}

#[test]
fn batched_generation_with_an_adapter_matches_generate_on_the_cpu() {
    use recforge::model::lora::{parse_targets, HostAdapter, LoraConfig};
    use recforge::rng::Rng;
    use recforge::train::DevAdapter;
    let (_d, f) = fixture(&FixtureSpec::default());
    let be = Cpu::new();
    let m = load(&be, &f.gguf);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: parse_targets("q,v,o,down").unwrap(),
    };
    // B = 0 at initialisation: give it values so the adapter changes the outputs.
    let mut host = HostAdapter::init(&m.config, &cfg, 3, "fixture").unwrap();
    let mut rng = Rng::new(4);
    for w in host.layers.values_mut() {
        for x in &mut w.b {
            *x = rng.range(-0.3, 0.3);
        }
    }
    let ad = DevAdapter::upload_frozen(&be, &host).unwrap();
    let view = ad.view();
    let reqs = requests(f.config.vocab_size as u32);
    let opts = BatchOptions {
        max_batch: 3,
        block_size: 4,
        ..Default::default()
    };
    let got = generate_batch(&be, &m, Some(&view), &reqs, &opts, |_, _| Ok(())).unwrap();
    let mut differs = false;
    for (i, r) in reqs.iter().enumerate() {
        let w = recforge::infer::generate::generate_with(
            &be,
            &m,
            Some(&view),
            &r.prompt,
            &r.options,
            |_| Ok(()),
        )
        .unwrap();
        let base = generate(&be, &m, &r.prompt, &r.options, |_| Ok(())).unwrap();
        differs |= base.tokens != w.tokens;
        assert_eq!(got.generations[i].tokens, w.tokens, "request {i}");
    }
    assert!(differs, "the adapter should change some completion");
}

#[test]
fn batched_generation_with_stacked_adapters_gives_each_request_its_adapters_tokens() {
    use recforge::infer::generate::generate_with;
    use recforge::model::lora::stack;
    use recforge::train::DevAdapter;
    let (_d, f) = fixture(&FixtureSpec::default());
    let be = Cpu::new();
    let m = load(&be, &f.gguf);
    let hosts = common::two_adapters(&m.config);
    let st = stack(&[&hosts[0], &hosts[1]], &m.config).unwrap();
    let dev = DevAdapter::upload_frozen(&be, &st.adapter).unwrap();
    let view = dev.stacked_view(&st).unwrap();
    let alone: Vec<DevAdapter<Cpu>> = hosts
        .iter()
        .map(|h| DevAdapter::upload_frozen(&be, h).unwrap())
        .collect();
    let opts = BatchOptions {
        max_batch: 3,
        block_size: 4,
        ..Default::default()
    };
    // Mixed adapters (and the base model) in one batch; then every request on adapter 1, so
    // the shared prefix is computed once through the stack's gate.
    for which in [[Some(0), Some(1), None, Some(1), Some(0)], [Some(1); 5]] {
        let mut reqs = requests(f.config.vocab_size as u32);
        for (r, w) in reqs.iter_mut().zip(which) {
            r.adapter = w;
        }
        let got = generate_batch(&be, &m, Some(&view), &reqs, &opts, |_, _| Ok(())).unwrap();
        let mixed = which.iter().any(|w| *w != which[0]);
        assert_eq!(
            got.stats.shared_prefix == 0,
            mixed,
            "{which:?}: {:?}",
            got.stats
        );
        let mut differs = false;
        for (i, r) in reqs.iter().enumerate() {
            let own = r.adapter.map(|a| alone[a].view());
            let want =
                generate_with(&be, &m, own.as_ref(), &r.prompt, &r.options, |_| Ok(())).unwrap();
            let other = alone[r.adapter.map_or(0, |a| 1 - a)].view();
            let wrong =
                generate_with(&be, &m, Some(&other), &r.prompt, &r.options, |_| Ok(())).unwrap();
            differs |= wrong.tokens != want.tokens;
            assert_eq!(
                got.generations[i].tokens, want.tokens,
                "{which:?}: request {i}"
            );
        }
        assert!(
            differs,
            "the adapters should give some request other tokens"
        );
    }
    // A request naming an adapter needs a stacked view that holds it.
    let mut reqs = requests(f.config.vocab_size as u32);
    reqs[2].adapter = Some(2);
    let err = generate_batch(&be, &m, Some(&view), &reqs, &opts, |_, _| Ok(())).unwrap_err();
    assert!(
        err.to_string()
            .contains("request 2 asks for adapter 2, but the stack holds 2"),
        "{err}"
    );
    reqs[2].adapter = Some(0);
    let plain = alone[0].view();
    let err = generate_batch(&be, &m, Some(&plain), &reqs, &opts, |_, _| Ok(())).unwrap_err();
    assert!(
        err.to_string().contains("no stacked adapter is given"),
        "{err}"
    );
}

/// The gate through the paged forward on the GPU backend: one step of two sequences, each
/// gated to its own adapter of a stack, gives each sequence's rows the logits of the same step
/// with that adapter alone (the same rows, so the same kernels and tiles; scales of powers of
/// two and zero blocks are exact, so bit for bit).
#[test]
fn a_stacked_step_on_the_gpu_backend_gives_each_sequence_its_adapters_logits() {
    use recforge::model::lora::stack;
    use recforge::train::DevAdapter;
    // head_dim 32: the smallest the device's attention kernels take.
    let (_d, f) = fixture(&FixtureSpec {
        layers: 2,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    });
    let v = f.config.vocab_size;
    for dev in common::devices() {
        let be = Gpu::new(dev);
        let m = load(&be, &f.gguf);
        let hosts = common::two_adapters(&m.config);
        let st = stack(&[&hosts[0], &hosts[1]], &m.config).unwrap();
        let dev_st = DevAdapter::upload_frozen(&be, &st.adapter).unwrap();
        let alone: Vec<DevAdapter<Gpu>> = hosts
            .iter()
            .map(|h| DevAdapter::upload_frozen(&be, h).unwrap())
            .collect();
        let seqs = two_sequences(v as u32, [20, 17]);
        let (a, b) = (seqs[0].len(), seqs[1].len());
        let tokens: Vec<u32> = seqs.concat();
        let positions: Vec<u32> = (0..a as u32).chain(0..b as u32).collect();
        let slots: Vec<u32> = (0..(a + b) as u32).collect();
        let spans = [
            SeqSpan {
                q_start: 0,
                q_len: a,
                kv_start: 0,
                kv_len: a,
            },
            SeqSpan {
                q_start: a,
                q_len: b,
                kv_start: a,
                kv_len: b,
            },
        ];
        let rows: Vec<usize> = (0..a + b).collect();
        let which: Vec<Option<usize>> = std::iter::repeat_n(Some(0), a)
            .chain(std::iter::repeat_n(Some(1), b))
            .collect();
        let gate = st.gate(&which).unwrap();
        let run = |view: &recforge::model::llama::AdapterView<'_, Gpu>, gate: Option<&[f32]>| {
            let mut cache = m.new_paged_cache(&be, (a + b).div_ceil(16), 16).unwrap();
            let step = PagedStep {
                tokens: &tokens,
                positions: &positions,
                slots: &slots,
                attention: PagedAttention::Fresh(&spans),
                logit_rows: &rows,
                lora_gate: gate,
            };
            let l = m
                .forward_paged(&be, &step, &mut cache, Some(view))
                .unwrap()
                .unwrap();
            be.download(&l).unwrap().to_f32().unwrap()
        };
        let stacked = run(&dev_st.stacked_view(&st).unwrap(), Some(&gate));
        let first = run(&alone[0].view(), None);
        let second = run(&alone[1].view(), None);
        assert_eq!(
            stacked[..a * v],
            first[..a * v],
            "{}: sequence 0",
            be.name()
        );
        assert_eq!(
            stacked[a * v..],
            second[a * v..],
            "{}: sequence 1",
            be.name()
        );
        // The comparison can fail: the two adapters give the first sequence other logits.
        assert_ne!(
            first[..a * v],
            second[..a * v],
            "{}: adapters alike",
            be.name()
        );
        eprintln!(
            "{}: stacked step = each adapter alone, bit for bit",
            be.name()
        );
    }
}

#[test]
fn bad_batches_are_refused_with_a_reason() {
    let (_d, f) = fixture(&FixtureSpec::default());
    let be = Cpu::new();
    let m = load(&be, &f.gguf);
    let reqs = requests(f.config.vocab_size as u32);
    let err = |reqs: &[Request], opts: &BatchOptions| {
        generate_batch(&be, &m, None, reqs, opts, |_, _| Ok(()))
            .expect_err("must fail")
            .to_string()
    };
    // A cache that cannot hold one request.
    let tiny = BatchOptions {
        max_batch: 2,
        block_size: 4,
        num_blocks: Some(2),
        share_prefix: false,
        max_prefill_tokens: 64,
    };
    let e = err(&reqs, &tiny);
    assert!(e.contains("KV blocks") && e.contains("more blocks"), "{e}");
    // The shared prefix alone does not fit.
    let e = err(
        &reqs,
        &BatchOptions {
            share_prefix: true,
            ..tiny.clone()
        },
    );
    assert!(e.contains("shared prefix"), "{e}");
    // An empty prompt, and one past the model's context.
    let mut bad = reqs.clone();
    bad[2].prompt.clear();
    assert!(err(&bad, &BatchOptions::default()).contains("prompt 2 has no tokens"));
    let mut long = reqs.clone();
    long[1].options.max_new_tokens = f.config.max_position_embeddings;
    let e = err(&long, &BatchOptions::default());
    assert!(e.contains("prompt 1") && e.contains("context"), "{e}");
    let e = err(
        &reqs,
        &BatchOptions {
            max_batch: 0,
            ..Default::default()
        },
    );
    assert!(e.contains("max batch"), "{e}");
    let e = err(
        &reqs,
        &BatchOptions {
            max_prefill_tokens: 0,
            ..Default::default()
        },
    );
    assert!(e.contains("prefill tokens 0"), "{e}");
    // No requests: nothing to do.
    let none = generate_batch(&be, &m, None, &[], &BatchOptions::default(), |_, _| Ok(())).unwrap();
    assert!(none.generations.is_empty());
}

/// Logits of `forward_paged` steps — a fresh prefill of a prefix, two sequences forked from it
/// prefilling their own tokens through the block tables (copy-on-write of the prefix's partial
/// block), one after the other (each in steps of at most `chunk` tokens, the later ones
/// reading the earlier ones' K/V from the cache) or `together` in one step, then decode steps
/// of both in one
/// batch — against each sequence's contiguous forward on the same backend in the same chunks.
/// The sequences may have different lengths; each has `decode` tokens to decode after its
/// prompt. Returns (paged, contiguous) logits, row by row.
fn paged_and_contiguous<B: Backend>(
    be: &B,
    m: &Llama<B>,
    seqs: &[Vec<u32>; 2],
    shared: usize,
    decode: usize,
    together: bool,
    chunk: usize,
) -> (Vec<f32>, Vec<f32>) {
    let bs = 4;
    let mut kv = PagedKv::new(48, bs).unwrap();
    let mut cache = m.new_paged_cache(be, 48, bs).unwrap();
    let slots32 = |s: Vec<u64>| s.into_iter().map(|x| x as u32).collect::<Vec<u32>>();
    kv.add_sequence(99).unwrap();
    let (slots, _) = kv.append(99, shared).unwrap();
    let positions: Vec<u32> = (0..shared as u32).collect();
    let spans = [SeqSpan {
        q_start: 0,
        q_len: shared,
        kv_start: 0,
        kv_len: shared,
    }];
    let rows: Vec<usize> = (0..shared).collect();
    let prefix_logits = m
        .forward_paged(
            be,
            &PagedStep {
                tokens: &seqs[0][..shared],
                positions: &positions,
                slots: &slots32(slots),
                attention: PagedAttention::Fresh(&spans),
                logit_rows: &rows,
                lora_gate: None,
            },
            &mut cache,
            None,
        )
        .unwrap()
        .unwrap();
    let prefix_logits = be.download(&prefix_logits).unwrap().to_f32().unwrap();
    let v = m.config.vocab_size;
    let mut paged: Vec<Vec<f32>> = vec![prefix_logits.clone(), prefix_logits];
    let prompt = [seqs[0].len() - decode, seqs[1].len() - decode];
    let own = [prompt[0] - shared, prompt[1] - shared];
    // The own prefills: sequence 0 then 1, or both in one step.
    let groups: Vec<Vec<usize>> = if together {
        vec![vec![0, 1]]
    } else {
        vec![vec![0], vec![1]]
    };
    for i in 0..2u64 {
        kv.fork(99, i).unwrap();
    }
    for group in groups {
        // Every own token gets its slot first (as the scheduler does), then the steps run: the
        // group's own tokens in one, or one sequence's in chunks of `chunk`.
        let mut own_slots: Vec<Vec<u32>> = vec![vec![]; 2];
        for &i in &group {
            let (s, copies) = kv.append(i as u64, own[i]).unwrap();
            for c in copies {
                for t in cache.k.iter_mut().chain(cache.v.iter_mut()) {
                    be.copy_rows_within(t, c.src as usize * bs, c.dst as usize * bs, bs)
                        .unwrap();
                }
            }
            own_slots[i] = slots32(s);
        }
        let ids: Vec<u64> = group.iter().map(|&i| i as u64).collect();
        let (tables, mb) = kv.block_tables(&ids).unwrap();
        // (sequence, own tokens from, to) of each step.
        let steps: Vec<Vec<(usize, usize, usize)>> = match group[..] {
            [i] => (0..own[i])
                .step_by(chunk)
                .map(|a| vec![(i, a, (a + chunk).min(own[i]))])
                .collect(),
            _ => vec![group.iter().map(|&i| (i, 0, own[i])).collect()],
        };
        for pieces in steps {
            let (mut tokens, mut positions, mut slots) = (vec![], vec![], vec![]);
            for &(i, a, b) in &pieces {
                slots.extend_from_slice(&own_slots[i][a..b]);
                tokens.extend_from_slice(&seqs[i][shared + a..shared + b]);
                positions.extend((shared + a) as u32..(shared + b) as u32);
            }
            let lens: Vec<i32> = pieces
                .iter()
                .map(|&(_, _, b)| (shared + b) as i32)
                .collect();
            let queries: Vec<usize> = pieces.iter().map(|&(_, a, b)| b - a).collect();
            let rows: Vec<usize> = (0..tokens.len()).collect();
            let l = m
                .forward_paged(
                    be,
                    &PagedStep {
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
                    },
                    &mut cache,
                    None,
                )
                .unwrap()
                .unwrap();
            let l = be.download(&l).unwrap().to_f32().unwrap();
            let mut at = 0;
            for &(i, a, b) in &pieces {
                paged[i].extend_from_slice(&l[at * v..(at + b - a) * v]);
                at += b - a;
            }
        }
    }
    for step in 0..decode {
        let mut slots = vec![];
        for i in 0..2u64 {
            slots.push(kv.append(i, 1).unwrap().0[0] as u32);
        }
        let (tables, mb) = kv.block_tables(&[0, 1]).unwrap();
        let lens = [(prompt[0] + step + 1) as i32, (prompt[1] + step + 1) as i32];
        let tokens = [seqs[0][prompt[0] + step], seqs[1][prompt[1] + step]];
        let positions = [lens[0] as u32 - 1, lens[1] as u32 - 1];
        let l = m
            .forward_paged(
                be,
                &PagedStep {
                    tokens: &tokens,
                    positions: &positions,
                    slots: &slots,
                    attention: PagedAttention::Cached(CachedAttention {
                        block_tables: &tables,
                        max_blocks: mb,
                        context_lens: &lens,
                        queries: &[1, 1],
                    }),
                    logit_rows: &[0, 1],
                    lora_gate: None,
                },
                &mut cache,
                None,
            )
            .unwrap()
            .unwrap();
        let l = be.download(&l).unwrap().to_f32().unwrap();
        paged[0].extend_from_slice(&l[..v]);
        paged[1].extend_from_slice(&l[v..]);
    }
    for i in 0..2u64 {
        kv.free_sequence(i).unwrap();
    }
    kv.free_sequence(99).unwrap();
    assert_eq!(kv.free_blocks(), 48);
    kv.check_invariants().unwrap();
    // The contiguous forward in the same chunks (prefix, own tokens, one token at a time), so
    // each linear sees the same rows: on the GPU backend up to 16 rows take the weight-only
    // GEMV and more the W8A8 GEMM, whose per-token activation quantization rounds differently.
    let mut want = vec![];
    for (s, prompt) in seqs.iter().zip(prompt) {
        let mut c = m.new_cache(be, s.len()).unwrap();
        let mut cuts = vec![0];
        cuts.extend((shared..prompt).step_by(chunk));
        cuts.push(prompt);
        cuts.extend(prompt + 1..=s.len());
        for w in cuts.windows(2) {
            let l = m.forward(be, &s[w[0]..w[1]], &mut c, Logits::All).unwrap();
            want.extend(l.to_f32().unwrap());
        }
    }
    (paged.concat(), want)
}

/// Two sequences sharing the prompts' 13-token prefix, with `own[i]` tokens of their own and
/// then 4 to decode.
fn two_sequences(vocab: u32, own: [usize; 2]) -> [Vec<u32>; 2] {
    let p = prompts(vocab);
    let mk = |salt: u32, own: usize| -> Vec<u32> {
        p[0][..13]
            .iter()
            .copied()
            .chain((0..own as u32 + 4).map(|i| (i * 7 + salt) % vocab))
            .collect()
    };
    [mk(1, own[0]), mk(5, own[1])]
}

#[test]
fn paged_forward_gives_the_contiguous_bits_on_the_cpu() {
    let (_d, f) = fixture(&FixtureSpec::default());
    let be = Cpu::new();
    let m = load(&be, &f.gguf);
    // 3 own tokens each: attention through the block tables; 40: K/V gathered for the flash
    // kernel. Together: 3 and 40 (and 40 and 3) in one step gather both sequences' K/V; 5 and 5
    // take the paged kernel with 5 queries each. In chunks (a prefill longer than the cap): 16
    // + 16 + 8 through the paged kernel; 33 gathered, then 7.
    let all = usize::MAX;
    let cases = [
        ([3, 3], false, all),
        ([40, 40], false, all),
        ([3, 40], true, all),
        ([40, 3], true, all),
        ([5, 5], true, all),
        ([40, 40], false, 16),
        ([40, 40], false, 33),
    ];
    for (own, together, chunk) in cases {
        let seqs = two_sequences(f.config.vocab_size as u32, own);
        let (paged, want) = paged_and_contiguous(&be, &m, &seqs, 13, 4, together, chunk);
        assert_eq!(paged.len(), want.len());
        assert!(
            paged == want,
            "{own:?} own tokens (together: {together}, chunks of {chunk}): the CPU's paged forward must equal its contiguous forward"
        );
    }
}

#[test]
fn paged_forward_matches_the_contiguous_forward_on_the_gpu_backend() {
    // head_dim 32 (the contiguous side takes the warp-per-row attention kernel) and 64 (the
    // tiled tensor-core one, as LLaMA-family models do).
    for hidden in [128, 256] {
        let (_d, f) = fixture(&FixtureSpec {
            layers: 2,
            hidden,
            heads: 4,
            kv_heads: 2,
            ..Default::default()
        });
        let v = f.config.vocab_size;
        let backends: Vec<Gpu> = common::devices().into_iter().map(Gpu::new).collect();
        // As on the CPU; prefilled together, both own parts exceed 16 tokens so that each
        // contiguous chunk takes the W8A8 GEMM as the joint step does.
        // In chunks of 33 then 7: the first gathered for the tiled kernel, the second through the
        // paged kernel reading the first's K/V from the cache; each chunk's contiguous twin has
        // its rows. (Chunks of 20 go through the paged kernel, which rounds P·V differently from
        // the contiguous side's tiled kernel on 80 of the 114 rows, and their 20 rows take the
        // W8A8 GEMM, whose per-token quantization amplifies that: 2.7e-2 here, 1.1e-2 with f32
        // linears. The paged kernel itself is held to the f32 reference at 20 queries in
        // tests/kernels_paged.rs.)
        let all = usize::MAX;
        let cases = [
            ([3, 3], false, all),
            ([40, 40], false, all),
            ([20, 40], true, all),
            ([5, 5], true, all),
            ([40, 40], false, 33),
        ];
        for (be, (own, together, chunk)) in backends
            .iter()
            .flat_map(|b| cases.iter().map(move |&c| (b, c)))
        {
            let seqs = two_sequences(f.config.vocab_size as u32, own);
            let m = load(be, &f.gguf);
            let (paged, want) = paged_and_contiguous(be, &m, &seqs, 13, 4, together, chunk);
            assert_eq!(paged.len(), want.len());
            let err: f32 = paged.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
            let norm: f32 = want.iter().map(|x| x * x).sum();
            let rel = (err / norm).sqrt();
            let rows = want.len() / v;
            let agree = paged
                .chunks(v)
                .zip(want.chunks(v))
                .filter(|(a, b)| {
                    recforge::infer::generate::argmax(a) == recforge::infer::generate::argmax(b)
                })
                .count();
            eprintln!(
                "{} head_dim {}, {own:?} own tokens (together: {together}, chunks of {chunk}): paged vs contiguous relative RMS logit error {rel:.3e}, argmax agreement {agree}/{rows}",
                be.name(),
                f.config.head_dim
            );
            // Only attention differs between the two paths, each rounding its output to
            // bf16 once; the tiled kernel (head_dim 64) also rounds P to bf16 for its
            // tensor-core P·V. A few bf16 roundings (2^-8 relative) at each layer's attention
            // output, carried through two layers: ≤ 1% of the logits' RMS — a fifth of what
            // the whole bf16 backend is allowed against the f32 CPU.
            assert!(rel < 0.01, "{}: relative RMS error {rel}", be.name());
            assert!(
                agree * 10 >= rows * 9,
                "{}: argmax {agree}/{rows}",
                be.name()
            );
        }
    }
}

fn recforge(args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::recforge_bin())
        .args(args)
        .output()
        .unwrap()
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn cli_completes_a_prompts_file_like_one_prompt_at_a_time() {
    let (d, f) = fixture(&FixtureSpec::default());
    let model = f.gguf.to_str().unwrap();
    let prompts = [
        "the cat sat on the mat",
        "the cat sat on a hat, and",
        "the cat",
    ];
    let file = d.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n\n{}\n{}\n",
            serde_json::json!({"prompt": prompts[0], "id": 7}),
            serde_json::json!(prompts[1]),
            prompts[2]
        ),
    )
    .unwrap();
    let common = [
        "--model",
        model,
        "--raw",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--outlier-threshold",
        "0",
    ];
    let mut args = vec![
        "generate",
        "--prompts",
        file.to_str().unwrap(),
        "--batch",
        "2",
    ];
    args.extend(common);
    let o = recforge(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("3 prompts") && err.contains("tok/s"), "{err}");
    let lines = json_lines(&o.stdout);
    assert_eq!(lines.len(), 3);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(lines[i]["index"], i);
        let mut one = vec!["generate", "--prompt", p];
        one.extend(common);
        let single = recforge(&one);
        assert!(single.status.success());
        let text = String::from_utf8(single.stdout).unwrap();
        assert_eq!(
            format!("{}\n", lines[i]["completion"].as_str().unwrap()),
            text,
            "prompt {i}"
        );
    }
    // --out: the same lines in a file, written through a temporary name.
    let out = d.path().join("completions.jsonl");
    args.extend(["--out", out.to_str().unwrap()]);
    let o = recforge(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty());
    assert_eq!(json_lines(&std::fs::read(&out).unwrap()), lines);
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains("tmp")),
        "temporary file left: {names:?}"
    );
}

/// `generate --prompts` whose lines name adapters: each completion is the one the same
/// command gives that prompt in a file of its adapter's prompts run with `--adapter` (or with
/// none). Both sides are batched runs, so their text is decoded alike (a lone `generate
/// --prompt` prints only whole characters as they come, which a random adapter's byte tokens
/// make differ); the run is greedy, so a prompt's place in its file does not matter.
#[test]
fn cli_runs_each_prompt_with_the_adapter_its_line_names() {
    let (d, f) = fixture(&FixtureSpec::default());
    let model = f.gguf.to_str().unwrap();
    for (name, host) in ["u1", "u2"].iter().zip(common::two_adapters(&f.config)) {
        recforge::model::adapter::save(&host, &d.path().join(name)).unwrap();
    }
    let prompts = [
        ("the cat sat on the mat", Some("u1")),
        ("the cat sat on a hat, and", Some("u2")),
        ("the cat", None),
        ("a mat", Some("u1")),
    ];
    let write = |name: &str, which: &[(&str, Option<&str>)]| {
        let file = d.path().join(name);
        let lines: Vec<String> = which
            .iter()
            .map(|(p, a)| match a {
                Some(a) => serde_json::json!({"prompt": p, "adapter": a}).to_string(),
                None => serde_json::json!({"prompt": p}).to_string(),
            })
            .collect();
        std::fs::write(&file, lines.join("\n")).unwrap();
        file.to_str().unwrap().to_string()
    };
    let common = [
        "--model",
        model,
        "--raw",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--outlier-threshold",
        "0",
        "--batch",
        "3",
    ];
    let run = |file: &str, extra: &[&str]| {
        let mut args = vec!["generate", "--prompts", file];
        args.extend(common);
        args.extend(extra);
        let o = recforge(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{args:?}: {err}");
        (json_lines(&o.stdout), err)
    };
    let mixed = write("mixed.jsonl", &prompts);
    let (out, err) = run(&mixed, &[]);
    assert!(
        err.contains("2 adapters stacked (rank 6 in all) for 3 of 4 prompts"),
        "{err}"
    );
    let mut differs = false;
    for group in [Some("u1"), Some("u2"), None] {
        let idx: Vec<usize> = (0..prompts.len())
            .filter(|&i| prompts[i].1 == group)
            .collect();
        let plain: Vec<(&str, Option<&str>)> = idx.iter().map(|&i| (prompts[i].0, None)).collect();
        let file = write("group.jsonl", &plain);
        let dir = group.map(|g| d.path().join(g).to_str().unwrap().to_string());
        let extra: Vec<&str> = match &dir {
            Some(dir) => vec!["--adapter", dir.as_str()],
            None => vec![],
        };
        let (alone, _) = run(&file, &extra);
        let (base, _) = run(&file, &[]);
        for (k, &i) in idx.iter().enumerate() {
            for key in ["completion", "new_tokens", "stop"] {
                assert_eq!(out[i][key], alone[k][key], "prompt {i} ({group:?}): {key}");
            }
            differs |= group.is_some() && base[k]["completion"] != alone[k]["completion"];
        }
    }
    assert!(differs, "the adapters should change some completion");
    // One folder spelt two ways is one adapter, stacked once.
    let spelt = write(
        "spelt.jsonl",
        &[
            ("the cat", Some("u1")),
            ("a mat", Some("./u1/")),
            ("a", Some("u2")),
        ],
    );
    let (_, err) = run(&spelt, &[]);
    assert!(err.contains("2 adapters stacked (rank 6 in all)"), "{err}");
    // --adapter beside prompts that name their own is refused.
    let u1 = d.path().join("u1");
    let mut args = vec!["generate", "--prompts", mixed.as_str()];
    args.extend(common);
    args.extend(["--adapter", u1.to_str().unwrap()]);
    let o = recforge(&args);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("names adapters of its own"), "{err}");
    // A field that is not a folder's path, and a folder that is not there, are named.
    for (line, want) in [
        (
            r#"{"prompt": "a", "adapter": 3}"#,
            "line 1: \"adapter\" is not an adapter folder's path",
        ),
        (
            r#"{"prompt": "a", "adapter": "nowhere"}"#,
            "cannot load adapter",
        ),
    ] {
        let bad = d.path().join("bad.jsonl");
        std::fs::write(&bad, line).unwrap();
        let mut args = vec!["generate", "--prompts", bad.to_str().unwrap()];
        args.extend(common);
        let o = recforge(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{line}: {err}");
    }
}

#[test]
fn cli_refuses_bad_prompts_files() {
    let (d, f) = fixture(&FixtureSpec::default());
    let model = f.gguf.to_str().unwrap();
    let run = |file: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompts",
            file.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend(extra);
        let o = recforge(&args);
        assert!(!o.status.success());
        assert!(o.stdout.is_empty());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let missing = d.path().join("missing.jsonl");
    assert!(run(&missing, &[]).contains("cannot read the prompts file"));
    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, "\"fine\"\n{\"prompt\": \"cut\n").unwrap();
    let e = run(&bad, &[]);
    assert!(e.contains("bad.jsonl line 2: not valid JSON"), "{e}");
    std::fs::write(&bad, "{\"text\": \"no prompt field\"}\n").unwrap();
    assert!(run(&bad, &[]).contains("no \"prompt\" string"));
    std::fs::write(&bad, "\"\"\n").unwrap();
    assert!(run(&bad, &[]).contains("line 1: the prompt is empty"));
    std::fs::write(&bad, "\n  \n").unwrap();
    assert!(run(&bad, &[]).contains("holds no prompt"));
    std::fs::write(&bad, "a prompt\n").unwrap();
    let e = run(&bad, &["--out", bad.to_str().unwrap()]);
    assert!(e.contains("would overwrite the --prompts file"), "{e}");
    // The same file spelt another way.
    std::fs::create_dir_all(d.path().join("sub")).unwrap();
    let other = d.path().join("sub/../bad.jsonl");
    let e = run(&bad, &["--out", other.to_str().unwrap()]);
    assert!(e.contains("would overwrite the --prompts file"), "{e}");
    assert_eq!(std::fs::read_to_string(&bad).unwrap(), "a prompt\n");
    let e = run(&bad, &["--batch", "0"]);
    assert!(e.contains("max batch 0"), "{e}");
    let e = run(&bad, &["--prefill-tokens", "0"]);
    assert!(e.contains("prefill tokens 0"), "{e}");
    let e = run(&bad, &["--kv-blocks", "1", "--max-new-tokens", "40"]);
    assert!(e.contains("give the cache more blocks"), "{e}");
    let e = run(&bad, &["--prompt", "and one more"]);
    assert!(e.contains("cannot be used with"), "{e}");
}

#[test]
fn cli_completes_a_prompts_file_on_the_gpu_backend() {
    // head_dim 32: the smallest the paged decode kernel takes.
    let (d, f) = fixture(&FixtureSpec {
        layers: 2,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    });
    let file = d.path().join("prompts.txt");
    std::fs::write(
        &file,
        "the cat sat on the mat\nthe cat sat on a hat\nthe dog\n",
    )
    .unwrap();
    for dev in common::devices() {
        let (device, shown) = if dev.name().starts_with("sim") {
            ("sim", "on sim (SIMT simulator")
        } else {
            ("cuda", "on cuda")
        };
        drop(dev);
        let o = recforge(&[
            "generate",
            "--model",
            f.gguf.to_str().unwrap(),
            "--prompts",
            file.to_str().unwrap(),
            "--raw",
            "--max-new-tokens",
            "5",
            "--block-size",
            "4",
            "--device",
            device,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains(shown), "{err}");
        let lines = json_lines(&o.stdout);
        assert_eq!(lines.len(), 3);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["index"], i);
            assert!(l["new_tokens"].as_u64().unwrap() <= 5);
        }
        // "the cat sat on " is shared by the first two only: nothing is shared by all three.
        assert!(err.contains("(0 of them a prefix shared by all)"), "{err}");
        // The paged cache and the steps' buffers came from the plan's arena, and the plan
        // counted the loaded model to the byte.
        assert!(
            err.contains("the batched generation's") && err.contains("reserved as one arena"),
            "{err}"
        );
        assert!(!err.contains("the plan counts"), "{err}");

        // Prompts naming two adapters: the stack is held as the plan counts it, and the run
        // stays inside the plan's arena.
        for (name, host) in ["u1", "u2"].iter().zip(common::two_adapters(&f.config)) {
            recforge::model::adapter::save(&host, &d.path().join(name)).unwrap();
        }
        let per = d.path().join("per_adapter.jsonl");
        std::fs::write(
            &per,
            "{\"prompt\": \"the cat sat\", \"adapter\": \"u1\"}\n{\"prompt\": \"the dog\", \"adapter\": \"u2\"}\nthe mat\n",
        )
        .unwrap();
        let o = recforge(&[
            "generate",
            "--model",
            f.gguf.to_str().unwrap(),
            "--prompts",
            per.to_str().unwrap(),
            "--raw",
            "--max-new-tokens",
            "4",
            "--device",
            device,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("2 adapters stacked"), "{err}");
        assert!(err.contains("reserved as one arena"), "{err}");
        assert!(!err.contains("the plan counts"), "{err}");
        assert_eq!(json_lines(&o.stdout).len(), 3);
    }
}

/// Ctrl-C during `generate --prompts`: the decode step in flight finishes, the completions
/// already in order stay on stdout as whole lines, --out gets no file (it is written only
/// whole), and the exit status is 130.
#[cfg(unix)]
#[test]
fn cli_prompts_run_stops_cleanly_on_ctrl_c() {
    let (d, f) = fixture(&FixtureSpec {
        layers: 2,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    });
    let file = d.path().join("prompts.txt");
    // Enough simulator work to outlast the first progress line (2 s) many times over.
    let prompts: String = (0..40)
        .map(|i| format!("the cat number {i} sat\n"))
        .collect();
    std::fs::write(&file, prompts).unwrap();
    for out in [None, Some(d.path().join("completions.jsonl"))] {
        let mut cmd = std::process::Command::new(common::recforge_bin());
        cmd.args([
            "generate",
            "--model",
            f.gguf.to_str().unwrap(),
            "--prompts",
            file.to_str().unwrap(),
            "--raw",
            "--max-new-tokens",
            "60",
            "--batch",
            "2",
            "--device",
            "sim",
        ]);
        if let Some(o) = &out {
            cmd.args(["--out", o.to_str().unwrap()]);
        }
        // The progress lines start with two spaces.
        let r = common::interrupt_after(cmd, "  ");
        assert_eq!(r.status.code(), Some(130), "{}", r.stderr);
        assert!(
            r.stderr
                .contains("interrupt: stopping after this decode step"),
            "{}",
            r.stderr
        );
        assert!(r.stderr.contains("interrupted: "), "{}", r.stderr);
        let lines = json_lines(r.stdout.as_bytes());
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["index"], i, "completions in prompt order");
        }
        assert!(lines.len() < 40, "the run was not interrupted");
        if let Some(o) = &out {
            assert!(lines.is_empty());
            assert!(!o.exists(), "--out must not hold a partial file");
            let left: Vec<_> = std::fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.contains("tmp"))
                .collect();
            assert!(left.is_empty(), "temporary files left: {left:?}");
        }
    }
}
