//! The memory plan against what a training run really holds, and the arena it is allocated as
//! (DESIGN.md §4).
//!
//! The device layer counts every buffer it hands out in 256-byte blocks, the same on CUDA and
//! in the simulator, so the peak of a real training step is measured exactly here without a
//! GPU: it must EQUAL the plan's total when every row is labelled (the plan's head chunk is
//! then full), for setups that exercise each term — tied and untied heads, GQA, head_dim 32
//! (per-row attention), 64 and 128 (tiled attention, with its larger backward scratch), LoRA
//! on any targets and ranks, checkpointing on, off and partial, and micro-batches of ≤ 16 tokens
//! (the weight-only GEMV path, no int8 scratch). Each run is carved from an arena of exactly
//! the plan's size, and nothing reaches the device allocator after it.

mod common;

use recforge::backend::gpu::backend::Gpu;
use recforge::backend::gpu::Device;
use recforge::backend::Backend;
use recforge::memory::{self, human, Checkpointing, TrainSetup};
use recforge::model::lora::parse_targets;
use recforge::model::random::{random_llama, shape};
use recforge::model::LlamaConfig;
use recforge::rng::Rng;
use recforge::train::step::HEAD_CHUNK;
use recforge::train::{Example, TrainConfig, Trainer};

struct Case {
    name: &'static str,
    model: LlamaConfig,
    batch: usize,
    seq: usize,
    r: usize,
    targets: &'static str,
    checkpointing: Checkpointing,
}

fn smol(layers: usize, vocab: usize) -> LlamaConfig {
    let mut c = memory::named_shape("smollm2-135m").unwrap();
    c.num_hidden_layers = layers;
    c.vocab_size = vocab;
    c.bos_token_id = None;
    c.eos_token_ids = vec![];
    c
}

/// head_dim 128 (the other tiled attention size), kv_dim < q_dim, an untied head.
fn hd128() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 256,
        intermediate_size: 320,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 128,
        vocab_size: 300,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn cases() -> Vec<Case> {
    let tiny = shape("tiny").unwrap();
    vec![
        Case {
            name: "tiny, q,v r 8, checkpointing",
            model: tiny.clone(),
            batch: 2,
            seq: 32,
            r: 8,
            targets: "q,v",
            checkpointing: Checkpointing::All,
        },
        Case {
            name: "tiny, all targets r 3, no checkpointing, 63 tokens",
            model: tiny.clone(),
            batch: 3,
            seq: 21,
            r: 3,
            targets: "q,k,v,o,gate,up,down",
            checkpointing: Checkpointing::Off,
        },
        Case {
            name: "tiny, 9 tokens (weight-only GEMV path)",
            model: tiny.clone(),
            batch: 1,
            seq: 9,
            r: 4,
            targets: "q,k",
            checkpointing: Checkpointing::All,
        },
        Case {
            name: "tiny, 3 layers, the first 2 recompute, 160 tokens (two head chunks)",
            model: LlamaConfig {
                num_hidden_layers: 3,
                ..tiny
            },
            batch: 2,
            seq: 80,
            r: 2,
            targets: "o,down",
            checkpointing: Checkpointing::Layers(2),
        },
        Case {
            name: "smollm2 shape, 2 layers (GQA 9/3, head_dim 64 tiled, tied head)",
            model: smol(2, 700),
            batch: 2,
            seq: 40,
            r: 8,
            targets: "q,k,v,o",
            checkpointing: Checkpointing::All,
        },
        Case {
            name: "head_dim 128, untied head, no checkpointing",
            model: hd128(),
            batch: 2,
            seq: 24,
            r: 5,
            targets: "q,v,up",
            checkpointing: Checkpointing::Off,
        },
    ]
}

fn setup(c: &Case) -> TrainSetup {
    TrainSetup {
        model: c.model.clone(),
        batch: c.batch,
        seq: c.seq,
        lora_rank: c.r,
        targets: c.targets.split(',').map(String::from).collect(),
        checkpointing: c.checkpointing,
        logits_chunk: HEAD_CHUNK,
        budget: 24 * memory::GIB,
    }
}

fn train_config(c: &Case) -> TrainConfig {
    let mut cfg = TrainConfig::preset("tallrec").unwrap();
    cfg.lora.r = c.r;
    cfg.lora.targets = parse_targets(c.targets).unwrap();
    cfg.batch_size = c.batch;
    cfg.grad_accum = 2;
    cfg.cutoff = c.seq;
    cfg.steps = 2;
    cfg.warmup_steps = 1;
    cfg.checkpointing = c.checkpointing;
    cfg
}

/// `batch × accum` sequences of exactly `seq` tokens with a label on EVERY row, so each head
/// chunk is as large as the plan allows.
fn data(c: &Case, n: usize, seed: u64) -> Vec<Example> {
    let v = c.model.vocab_size as u64;
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| Example {
            ids: (0..c.seq).map(|_| rng.below(v) as u32).collect(),
            labels: (0..c.seq).map(|_| rng.below(v) as u32).collect(),
        })
        .collect()
}

/// The measured peak must be the plan's total to the byte; the message says which way it is off.
fn assert_peak_is_plan(what: &str, peak: u64, plan: &memory::Plan) {
    assert_eq!(
        peak,
        plan.total(),
        "{what}: the measured peak ({}) is not the plan ({}): {} B {}\n{}",
        human(peak),
        human(plan.total()),
        peak.abs_diff(plan.total()),
        if peak > plan.total() {
            "unplanned"
        } else {
            "planned but never held"
        },
        plan.table()
    );
}

#[test]
fn the_plan_is_the_measured_peak_and_the_run_fits_an_arena_of_its_size() {
    for dev in common::devices() {
        let kind = dev.name();
        drop(dev);
        for c in cases() {
            let s = setup(&c);
            let plan = memory::plan_training(&s).unwrap();
            let dev = if kind.starts_with("sim") {
                Device::sim()
            } else {
                Device::cuda(0).unwrap()
            };
            let be = Gpu::new(dev);
            assert!(be.reserve_arena(plan.total()).unwrap());
            let model = random_llama(&be, &c.model, 7).unwrap();
            let cfg = train_config(&c);
            let n = cfg.batch_size * cfg.grad_accum;
            let mut tr = Trainer::new(&be, &model, cfg, data(&c, n, 11), "plan").unwrap();
            let before = be.memory_stats().unwrap();
            for _ in 0..2 {
                let r = tr
                    .step()
                    .unwrap_or_else(|e| panic!("{kind}, {}: {e}\nplan:\n{}", c.name, plan.table()));
                assert!(r.loss.is_finite());
            }
            let st = be.memory_stats().unwrap();
            eprintln!(
                "{kind}, {}: plan {} B, measured peak {} B, arena high-water {} B",
                c.name,
                plan.total(),
                st.peak,
                st.arena_high_water
            );
            assert_peak_is_plan(&format!("{kind}, {}", c.name), st.peak, &plan);
            // One allocation from the device (the arena), none during the steps.
            assert_eq!(st.device_allocations, 1, "{kind}, {}", c.name);
            assert_eq!(st.device_allocations, before.device_allocations);
            assert_eq!(st.arena, Some(plan.total()));
            assert!(st.arena_high_water <= plan.total());
            assert!(st.buffers > before.buffers, "the steps made buffers");
        }
    }
}

#[test]
fn an_arena_smaller_than_the_plan_stops_the_run_with_a_clear_error() {
    let c = &cases()[0];
    let plan = memory::plan_training(&setup(c)).unwrap();
    let be = Gpu::new(Device::sim());
    // Room for the model and the adapter but not for the step: 95% of the plan.
    be.reserve_arena(plan.total() / 20 * 19).unwrap();
    let model = random_llama(&be, &c.model, 7).unwrap();
    let cfg = train_config(c);
    let n = cfg.batch_size * cfg.grad_accum;
    let mut tr = Trainer::new(&be, &model, cfg, data(c, n, 11), "plan").unwrap();
    let e = tr.step().unwrap_err().to_string();
    assert!(
        e.contains("arena exhausted") && e.contains("memory plan") && e.contains("RECFORGE_ARENA"),
        "{e}"
    );
    // Nothing leaked: once the step's buffers are gone, only the model and adapter remain.
    drop(tr);
    drop(model);
    assert_eq!(be.memory_stats().unwrap().in_use, 0);
}

#[test]
fn the_pruning_plan_is_the_measured_peak_of_rec_prune_scoring() {
    // `rec prune`: a training step's memory plus, in every adapted projection's backward, each
    // sample's gradient measured in a scratch of its own. In the first case the training
    // step's own peak dominates; in the second (rank 64 on down, 9 tokens: the weight-only GEMV
    // path has no int8 scratch) the per-sample scratch is the peak, so its every term counts.
    let tiny = shape("tiny").unwrap();
    let cases = [
        (
            "tiny, 3 × 20 tokens, q,v r 8, checkpointing",
            3,
            20,
            8,
            "q,v",
            Checkpointing::All,
            false,
        ),
        (
            "tiny, 1 × 9 tokens, down r 64",
            1,
            9,
            64,
            "down",
            Checkpointing::Off,
            true,
        ),
    ];
    for dev in common::devices() {
        let kind = dev.name();
        drop(dev);
        for (name, batch, seq, r, targets, checkpointing, norms_peak) in cases {
            let c = Case {
                name,
                model: tiny.clone(),
                batch,
                seq,
                r,
                targets,
                checkpointing,
            };
            let plan = memory::plan_sample_scoring(&setup(&c)).unwrap();
            let peak_row = plan
                .entries
                .iter()
                .find(|e| e.category == "peak scratch")
                .unwrap();
            assert_eq!(
                peak_row.what.starts_with("per-sample gradient"),
                norms_peak,
                "{name}: {}",
                plan.table()
            );
            let dev = if kind.starts_with("sim") {
                Device::sim()
            } else {
                Device::cuda(0).unwrap()
            };
            let be = Gpu::new(dev);
            assert!(be.reserve_arena(plan.total()).unwrap());
            let model = random_llama(&be, &c.model, 7).unwrap();
            let host = common::adapter_with_b(&c.model, r, 16.0, targets, 3, 0.3);
            let mut adapter =
                recforge::train::DevAdapter::upload_for_gradients(&be, &host).unwrap();
            // Two passes of `batch` full-length samples, every row labelled.
            let examples = data(&c, 2 * batch, 13);
            let recomputed = checkpointing.recomputed(c.model.num_hidden_layers);
            let scores = recforge::rec::prune::score(
                &be,
                &model,
                &mut adapter,
                &examples,
                batch,
                recomputed,
                |_, _| {},
            )
            .unwrap_or_else(|e| panic!("{kind}, {name}: {e}\nplan:\n{}", plan.table()));
            assert!(scores.iter().all(|s| s.grad_norm > 0.0 && s.tokens == seq));
            let st = be.memory_stats().unwrap();
            eprintln!(
                "{kind}, {name}: plan {} B, measured peak {} B",
                plan.total(),
                st.peak
            );
            assert_peak_is_plan(&format!("{kind}, {name}"), st.peak, &plan);
            assert_eq!(st.device_allocations, 1, "{kind}, {name}: the arena only");
        }
    }
}

/// TALLRec-style samples with the same instruction and varied inputs, so the prompts share a
/// prefix and differ in length.
fn scoring_samples(n: usize) -> Vec<recforge::rec::Sample> {
    let titles = [
        "Heat (1995)",
        "Toy Story (1995)",
        "Fargo (1996)",
        "Babe (1995)",
    ];
    (0..n)
        .map(|i| recforge::rec::Sample {
            instruction: recforge::rec::tallrec::INSTRUCTION.into(),
            input: format!(
                "User Preference: {}\nUser Unpreference: {}\nWhether the user will like the \
                 target movie \"{}\"?",
                titles[..1 + i % 4].join(", "),
                titles[i % 3],
                titles[(i + 1) % 4]
            ),
            output: if i % 2 == 0 { "Yes." } else { "No." }.into(),
        })
        .collect()
}

#[test]
fn the_scoring_plan_is_the_measured_peak_of_rec_eval() {
    use recforge::model::fixture::FixtureSpec;
    use recforge::model::lora::{HostAdapter, LoraConfig};
    use recforge::model::{self, Llama, LoadOptions};
    use recforge::rec::eval::{layout, prompt_ids, score};
    use recforge::train::DevAdapter;
    /// (what, spec, prompts per batch, prefix sharing, adapter targets or none, samples)
    type ScoreCase = (
        &'static str,
        FixtureSpec,
        usize,
        bool,
        Option<&'static str>,
        usize,
    );
    let cases: [ScoreCase; 4] = [
        (
            "shared prefix, adapter on q,v, batches of 3, 3, 1",
            FixtureSpec {
                layers: 2,
                hidden: 128,
                heads: 4,
                kv_heads: 2,
                ..Default::default()
            },
            3,
            true,
            Some("q,v"),
            7,
        ),
        (
            "every prompt in full, no adapter, 3 layers",
            FixtureSpec {
                layers: 3,
                hidden: 128,
                heads: 4,
                kv_heads: 2,
                ..Default::default()
            },
            2,
            false,
            None,
            5,
        ),
        (
            "shared prefix larger than any batch, one prompt a batch, all targets",
            FixtureSpec {
                layers: 1,
                hidden: 128,
                heads: 4,
                kv_heads: 2,
                ..Default::default()
            },
            1,
            true,
            Some("q,k,v,o,gate,up,down"),
            3,
        ),
        (
            "head_dim 64 (tiled attention), untied head, shared prefix",
            FixtureSpec {
                layers: 2,
                hidden: 256,
                heads: 4,
                kv_heads: 1,
                tied: false,
                ..Default::default()
            },
            4,
            true,
            Some("v,down"),
            6,
        ),
    ];
    let kinds: Vec<String> = common::devices().iter().map(|d| d.name()).collect();
    for ((what, spec, batch, share, targets, n), kind) in cases
        .into_iter()
        .flat_map(|c| kinds.iter().map(move |k| (c.clone(), k)))
    {
        let (_d, f) = common::fixture(&spec);
        let src = model::open(&f.hf_dir).unwrap();
        let tok = src.tokenizer().unwrap();
        let samples = scoring_samples(n);
        let prompts = prompt_ids(&tok, &samples, 4096).unwrap();
        let (prefix, batches) = layout(&prompts, batch, share);
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: parse_targets(targets.unwrap_or("q,v")).unwrap(),
        };
        let setup = memory::ScoreSetup {
            model: f.config.clone(),
            prefix,
            batches: batches.clone(),
            // No adapter: rank 0 and no targets, as `DevAdapter::none` (the CLI's).
            lora_rank: if targets.is_some() { lora.r } else { 0 },
            targets: targets
                .map(|t| t.split(',').map(String::from).collect())
                .unwrap_or_default(),
            adapter: targets.is_some(),
            budget: 24 * memory::GIB,
        };
        let plan = memory::plan_scoring(&setup).unwrap();
        let be = Gpu::new(if kind.starts_with("sim") {
            Device::sim()
        } else {
            Device::cuda(0).unwrap()
        });
        assert!(be.reserve_arena(plan.total()).unwrap());
        let m = Llama::load(src.as_ref(), &be, LoadOptions::default()).unwrap();
        let ad = match targets {
            Some(_) => {
                let host = HostAdapter::init(&f.config, &lora, 5, "plan").unwrap();
                DevAdapter::upload_frozen(&be, &host).unwrap()
            }
            None => DevAdapter::none(),
        };
        let probs = score(&be, &m, &ad, &tok, &samples, batch, 4096, share, |_, _| {})
            .unwrap_or_else(|e| panic!("{kind}, {what}: {e}\nplan:\n{}", plan.table()));
        assert_eq!(probs.len(), n);
        let st = be.memory_stats().unwrap();
        eprintln!(
            "{kind}, {what}: prefix {prefix}, batches {batches:?}: plan {} B, measured peak {} B",
            plan.total(),
            st.peak
        );
        assert_peak_is_plan(&format!("{kind}, {what}"), st.peak, &plan);
        assert_eq!(st.device_allocations, 1, "{kind}, {what}: only the arena");
    }
}

/// An adapter's rank and target names as the plans take them (`"q,v"` → ["q", "v"]).
fn plan_adapter(ad: &Option<(usize, String)>) -> Option<(usize, Vec<String>)> {
    ad.as_ref().map(|(r, t)| {
        let targets = parse_targets(t).unwrap();
        (
            *r,
            targets.iter().map(|t| t.short_name().to_string()).collect(),
        )
    })
}

/// A device of `kind` holding an arena of the plan's size, a random model of `cfg` and, with
/// `ad`, a frozen adapter of that rank and those targets.
fn planned_model(
    kind: &str,
    cfg: &LlamaConfig,
    plan: &memory::Plan,
    ad: &Option<(usize, String)>,
) -> (
    Gpu,
    recforge::model::Llama<Gpu>,
    Option<recforge::train::DevAdapter<Gpu>>,
) {
    use recforge::model::lora::{HostAdapter, LoraConfig};
    let be = Gpu::new(if kind.starts_with("sim") {
        Device::sim()
    } else {
        Device::cuda(0).unwrap()
    });
    assert!(be.reserve_arena(plan.total()).unwrap());
    let m = random_llama(&be, cfg, 3).unwrap();
    let dev = ad.as_ref().map(|(r, t)| {
        let lora = LoraConfig {
            r: *r,
            alpha: 16.0,
            dropout: 0.0,
            targets: parse_targets(t).unwrap(),
        };
        let host = HostAdapter::init(cfg, &lora, 5, "plan").unwrap();
        recforge::train::DevAdapter::upload_frozen(&be, &host).unwrap()
    });
    (be, m, dev)
}

#[test]
fn the_generation_plan_is_the_measured_peak_of_generate() {
    use recforge::backend::SamplingParams;
    use recforge::infer::generate::{generate_with, GenerateOptions};
    use recforge::train::DevAdapter;
    // (what, model, prompt tokens, new tokens, adapter rank and targets)
    let tiny = shape("tiny").unwrap();
    let adapter = |r: usize, targets: &str| Some((r, targets.to_string()));
    let cases = [
        (
            "tiny, a 40-token prompt (W8A8 prefill)",
            tiny.clone(),
            40,
            6,
            None,
        ),
        (
            "tiny, a 9-token prompt (GEMV prefill)",
            tiny.clone(),
            9,
            5,
            None,
        ),
        (
            "3 layers, 100-token prompt",
            LlamaConfig {
                num_hidden_layers: 3,
                ..tiny.clone()
            },
            100,
            3,
            None,
        ),
        (
            "smollm2 shape, 2 layers, tiled head_dim 64",
            smol(2, 700),
            70,
            4,
            None,
        ),
        ("head_dim 128, untied head", hd128(), 33, 2, None),
        (
            "tiny with an adapter on every target, W8A8 prefill",
            tiny.clone(),
            40,
            4,
            adapter(8, "q,k,v,o,gate,up,down"),
        ),
        (
            "smollm2 shape with an adapter on q, v, GEMV prefill",
            smol(2, 700),
            9,
            3,
            adapter(16, "q,v"),
        ),
    ];
    let kinds: Vec<String> = common::devices().iter().map(|d| d.name()).collect();
    for ((what, cfg, prompt, new, ad), kind) in cases
        .into_iter()
        .flat_map(|c| kinds.iter().map(move |k| (c.clone(), k)))
    {
        let plan = memory::plan_generation(&memory::GenerateSetup {
            model: cfg.clone(),
            prompt,
            max_new: new,
            budget: 24 * memory::GIB,
            adapter: plan_adapter(&ad),
        })
        .unwrap();
        let (be, m, dev) = planned_model(kind, &cfg, &plan, &ad);
        let view = dev.as_ref().map(DevAdapter::view);
        let mut rng = Rng::new(prompt as u64);
        let ids: Vec<u32> = (0..prompt)
            .map(|_| rng.below(cfg.vocab_size as u64) as u32)
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: new,
            stop_ids: vec![],
            sampling: SamplingParams::ITREK,
            seed: 1,
        };
        let g = generate_with(&be, &m, view.as_ref(), &ids, &opts, |_| Ok(()))
            .unwrap_or_else(|e| panic!("{kind}, {what}: {e}\nplan:\n{}", plan.table()));
        assert_eq!(g.tokens.len(), new);
        let st = be.memory_stats().unwrap();
        eprintln!(
            "{kind}, {what}: plan {} B, measured peak {} B",
            plan.total(),
            st.peak
        );
        assert_peak_is_plan(&format!("{kind}, {what}"), st.peak, &plan);
        assert_eq!(st.device_allocations, 1, "{kind}, {what}: only the arena");
    }
}

#[test]
fn the_batch_generation_plan_is_the_measured_peak_of_generate_batch() {
    use recforge::backend::SamplingParams;
    use recforge::infer::batch::{cache_layout, generate_batch, BatchOptions, Request};
    use recforge::infer::generate::GenerateOptions;
    use recforge::train::DevAdapter;
    let tiny = shape("tiny").unwrap();
    let adapter = |r: usize, targets: &str| Some((r, targets.to_string()));
    // (what, model, shared prefix, own lengths, new tokens, max batch, block size, blocks,
    // adapter, prefill tokens): steps where the decode step, the W8A8 prefill (own > 16 rows),
    // the shared prefix's prefill or the sampler is the peak. The plan takes the largest
    // prefill a run may form (a run of consecutive prompts within the token cap, or a chunk of
    // a longer prompt); the caps and orders here make that one the run forms.
    let cases = [
        (
            "tiny, 6 prompts sharing 20 tokens, batch 4",
            tiny.clone(),
            20,
            vec![3, 9, 1, 5, 12, 7],
            5,
            4,
            16,
            None,
            None,
            12,
        ),
        (
            "tiny, unshared prompts with a 40-token one (W8A8 prefill)",
            tiny.clone(),
            0,
            vec![40, 6, 11],
            4,
            8,
            16,
            None,
            None,
            40,
        ),
        (
            "smollm2 shape, 2 layers, head_dim 64, batch 6 of 9",
            smol(2, 700),
            35,
            vec![2, 4, 6, 8, 3, 5, 7, 9, 1],
            3,
            6,
            8,
            None,
            None,
            9,
        ),
        (
            "tiny with an adapter on q, v, o, down",
            tiny.clone(),
            17,
            vec![20, 3, 4],
            4,
            3,
            16,
            None,
            adapter(8, "q,v,o,down"),
            20,
        ),
        (
            "tiny, 45 own tokens after a 20-token prefix (K/V gathered, W8A8)",
            tiny.clone(),
            20,
            vec![45, 3, 8],
            3,
            3,
            16,
            None,
            None,
            45,
        ),
        (
            "head_dim 128, untied head, blocks of 4",
            hd128(),
            9,
            vec![5, 2, 7],
            3,
            2,
            4,
            None,
            None,
            7,
        ),
        (
            "tiny, 6 prompts sharing 20 tokens prefilled 4 at a time (K/V gathered)",
            tiny.clone(),
            20,
            vec![12, 9, 7, 5, 3, 1],
            4,
            4,
            16,
            None,
            None,
            64,
        ),
        (
            "tiny, unshared prompts prefilled 3 at a time",
            tiny.clone(),
            0,
            vec![40, 30, 6, 11],
            3,
            3,
            16,
            None,
            None,
            100,
        ),
        (
            "smollm2 shape, 2 layers, 5 own tokens each, prefilled together (paged kernel)",
            smol(2, 700),
            35,
            vec![5, 5, 5, 5, 5],
            3,
            4,
            8,
            None,
            adapter(4, "q,v"),
            2048,
        ),
        (
            "tiny, a 45-token own part after a 20-token prefix in chunks of 33 (gathered) and 12",
            tiny.clone(),
            20,
            vec![45, 3, 8],
            3,
            3,
            16,
            None,
            None,
            33,
        ),
        (
            "tiny, unshared, a 40-token prompt in chunks of 16 (fresh, then through the paged kernel)",
            tiny.clone(),
            0,
            vec![40, 6, 11],
            4,
            3,
            16,
            None,
            None,
            16,
        ),
        // A cache too small for the batch: sequences are preempted and prefilled again with
        // what they had generated, in groups the plan can only bound (the peak is at most it).
        (
            "tiny, 17 blocks for 4 sequences: preemption",
            tiny.clone(),
            20,
            vec![12, 9, 7, 5, 3, 1],
            6,
            4,
            4,
            Some(17),
            None,
            64,
        ),
    ];
    let kinds: Vec<String> = common::devices().iter().map(|d| d.name()).collect();
    for ((what, cfg, shared, own, new, max_batch, bs, blocks, ad, max_prefill_tokens), kind) in
        cases
            .into_iter()
            .flat_map(|c| kinds.iter().map(move |k| (c.clone(), k)))
    {
        let mut rng = Rng::new(own.len() as u64);
        let mut draw = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| 3 + rng.below(cfg.vocab_size as u64 - 3) as u32)
                .collect()
        };
        let prefix = draw(shared);
        let requests: Vec<Request> = own
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                // Prompts differ right after the prefix.
                let mut p = prefix.clone();
                p.push(i as u32);
                p.extend(draw(n - 1));
                Request {
                    prompt: p,
                    options: GenerateOptions {
                        max_new_tokens: new,
                        stop_ids: vec![],
                        sampling: SamplingParams::ITREK,
                        seed: i as u64,
                    },
                    adapter: None,
                }
            })
            .collect();
        let opts = BatchOptions {
            max_batch,
            block_size: bs,
            num_blocks: blocks,
            share_prefix: true,
            max_prefill_tokens,
        };
        let layout = cache_layout(&requests, &opts);
        assert_eq!(layout.shared_prefix, shared, "{what}");
        let plan = memory::plan_batch_generation(&memory::BatchGenerateSetup {
            model: cfg.clone(),
            prompts: requests.iter().map(|r| r.prompt.len()).collect(),
            shared_prefix: layout.shared_prefix,
            max_new: new,
            max_running: layout.max_running,
            block_size: bs,
            num_blocks: layout.num_blocks,
            max_prefill_tokens,
            holds_every_running: layout.holds_every_running,
            budget: 24 * memory::GIB,
            adapter: plan_adapter(&ad),
        })
        .unwrap();
        let (be, m, dev) = planned_model(kind, &cfg, &plan, &ad);
        let view = dev.as_ref().map(DevAdapter::view);
        let g = generate_batch(&be, &m, view.as_ref(), &requests, &opts, |_, _| Ok(()))
            .unwrap_or_else(|e| panic!("{kind}, {what}: {e}\nplan:\n{}", plan.table()));
        assert_eq!(g.stats.generated_tokens, new * requests.len(), "{what}");
        let st = be.memory_stats().unwrap();
        eprintln!(
            "{kind}, {what}: plan {} B, measured peak {} B",
            plan.total(),
            st.peak
        );
        if blocks.is_some() {
            assert!(g.stats.preemptions > 0, "{what}: {:?}", g.stats);
            assert!(
                st.peak <= plan.total(),
                "{kind}, {what}: peak {} B over the plan {} B",
                st.peak,
                plan.total()
            );
        } else {
            assert_peak_is_plan(&format!("{kind}, {what}"), st.peak, &plan);
        }
        assert_eq!(st.device_allocations, 1, "{kind}, {what}: only the arena");
    }
}
