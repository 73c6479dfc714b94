//! Several adapters in one batch (`model::lora::stack`, `rec::eval::score_stacked`): each
//! sample scored with its own adapter of a stack, the rows of one forward pass using different
//! adapters through a per-row LoRA gate, against each sample scored alone with its adapter
//! uploaded on its own — on the CPU reference and on the simulator.

mod common;

use common::fixture;
use recforge::backend::cpu::Cpu;
use recforge::backend::Backend;
use recforge::model::fixture::FixtureSpec;
use recforge::model::lora::{stack, HostAdapter};
use recforge::model::{self, Llama, LlamaConfig, LoadOptions};
use recforge::rec::eval::{score, score_stacked};
use recforge::rec::Sample;
use recforge::train::DevAdapter;

/// 2 layers, head_dim 32 (the smallest the GPU attention kernels take).
fn spec() -> FixtureSpec {
    FixtureSpec {
        layers: 2,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    }
}

/// An adapter with B uniform in ±0.3 (`common::adapter_with_b`).
fn adapter(cfg: &LlamaConfig, r: usize, alpha: f32, targets: &str, seed: u64) -> HostAdapter {
    common::adapter_with_b(cfg, r, alpha, targets, seed, 0.3)
}

/// Short prompts: the fixture's byte-level tokenizer makes about a token of every 1–2 bytes,
/// and the simulator's forward time grows with the tokens.
fn samples() -> Vec<Sample> {
    let titles = ["Heat", "Toy Story", "Fargo", "Babe"];
    (0..WHICH.len())
        .map(|i| Sample {
            instruction: "Like it?".into(),
            input: format!("{} / {}", titles[i % 4], titles[(i + 2) % 3]),
            output: if i % 2 == 0 { "Yes." } else { "No." }.into(),
        })
        .collect()
}

/// Which adapter each sample takes: the base model and all three adapters in the first pass of
/// 3, two adapters in the second.
const WHICH: [Option<usize>; 5] = [Some(0), Some(1), None, Some(2), Some(1)];

/// (stacked, alone, with the next adapter): P(Yes) of each sample with its adapter of the stack
/// in passes of 3 prompts; scored alone with that adapter uploaded on its own (the base model
/// for `None`); and, with `wrong`, alone with the NEXT adapter, the size of a row taking the
/// wrong one (empty without).
fn stacked_and_alone<B: Backend>(
    be: &B,
    m: &Llama<B>,
    tok: &model::tokenizer::TextTokenizer,
    adapters: &[HostAdapter],
    wrong: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let refs: Vec<&HostAdapter> = adapters.iter().collect();
    let st = stack(&refs, &m.config).unwrap();
    let dev = DevAdapter::upload_frozen(be, &st.adapter).unwrap();
    let samples = samples();
    let stacked =
        score_stacked(be, m, &dev, &st, tok, &samples, &WHICH, 3, 4096, |_, _| {}).unwrap();
    let alone_with = |which: Option<usize>, s: &Sample| -> f64 {
        let ad = match which {
            Some(i) => DevAdapter::upload_frozen(be, &adapters[i]).unwrap(),
            None => DevAdapter::none(),
        };
        score(
            be,
            m,
            &ad,
            tok,
            std::slice::from_ref(s),
            1,
            4096,
            false,
            |_, _| {},
        )
        .unwrap()[0]
    };
    let alone = samples
        .iter()
        .zip(WHICH)
        .map(|(s, w)| alone_with(w, s))
        .collect();
    let wrong = samples
        .iter()
        .zip(WHICH)
        .filter(|_| wrong)
        .map(|(s, w)| alone_with(Some(w.map_or(0, |i| (i + 1) % adapters.len())), s))
        .collect();
    (stacked, alone, wrong)
}

fn worst(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn each_row_of_a_stacked_batch_scores_as_its_adapter_alone() {
    let (_d, f) = fixture(&spec());
    let tok = model::open(&f.hf_dir).unwrap().tokenizer().unwrap();
    // Ranks 4, 8 and 3 (blocks at 0, 4, 12 of 15), different targets (the stack holds zero
    // blocks where an adapter lacks a projection) and scales 2, 1 and 4. The stacked path
    // multiplies h by its adapter's scale (the gate) where the single one scales u·Bᵀ: with
    // powers of two both are exact, and the zero blocks add exactly 0, so every P(Yes) must be
    // bit-identical. (A scale of 16/3 differed by 4.4e-6 on the CPU, one rounding apart;
    // `model::lora`'s unit test checks such scales against the definition.)
    let adapters = [
        adapter(&f.config, 4, 8.0, "q,v", 11),
        adapter(&f.config, 8, 8.0, "q,k,v,o,gate,up,down", 12),
        adapter(&f.config, 3, 12.0, "v,down", 13),
    ];
    let check = |what: &str, (stacked, alone, wrong): (Vec<f64>, Vec<f64>, Vec<f64>)| {
        eprintln!("{what}: P(Yes) stacked {stacked:?}, alone {alone:?}");
        assert_eq!(stacked, alone, "{what}: stacked vs each adapter alone");
        // The comparison can fail: a row that took the next adapter moves by whole tenths.
        if !wrong.is_empty() {
            let moved = worst(&alone, &wrong);
            assert!(moved > 0.1, "{what}: the adapters barely differ ({moved})");
        }
    };
    let be = Cpu::new();
    // int8 without the outlier columns (every linear row by row), and f32 linears.
    for (what, opts) in [
        (
            "cpu, int8 weights, no outlier columns",
            LoadOptions {
                int8: true,
                outlier_threshold: 0.0,
            },
        ),
        (
            "cpu, f32 weights",
            LoadOptions {
                int8: false,
                ..LoadOptions::default()
            },
        ),
    ] {
        let src = model::open(&f.hf_dir).unwrap();
        let m = Llama::load(src.as_ref(), &be, opts).unwrap();
        check(what, stacked_and_alone(&be, &m, &tok, &adapters, true));
    }
    for dev in common::devices() {
        use recforge::backend::gpu::backend::Gpu;
        let gpu = Gpu::new(dev);
        // Dense bf16 weights: the device's GEMMs and LoRA kernels work row by row. (The CPU
        // showed that the adapters differ; the simulator's forwards are slow.)
        let src = model::open(&f.hf_dir).unwrap();
        let opts = LoadOptions {
            int8: false,
            ..LoadOptions::default()
        };
        let m = Llama::load(src.as_ref(), &gpu, opts).unwrap();
        check(
            &gpu.name(),
            stacked_and_alone(&gpu, &m, &tok, &adapters, false),
        );
    }
}

#[test]
fn stacked_scoring_refuses_mismatched_input() {
    let (_d, f) = fixture(&spec());
    let tok = model::open(&f.hf_dir).unwrap().tokenizer().unwrap();
    let be = Cpu::new();
    let src = model::open(&f.hf_dir).unwrap();
    let m = Llama::load(src.as_ref(), &be, LoadOptions::default()).unwrap();
    let a = adapter(&f.config, 4, 8.0, "q,v", 1);
    let b = adapter(&f.config, 2, 8.0, "v", 2);
    let st = stack(&[&a, &b], &m.config).unwrap();
    let dev = DevAdapter::upload_frozen(&be, &st.adapter).unwrap();
    let s = samples();
    let run = |dev: &DevAdapter<Cpu>, which: &[Option<usize>]| {
        score_stacked(&be, &m, dev, &st, &tok, &s, which, 3, 4096, |_, _| {})
            .unwrap_err()
            .to_string()
    };
    let err = run(&dev, &[Some(0); 3]);
    assert!(err.contains("5 samples but 3 adapter choices"), "{err}");
    let err = run(&dev, &[Some(2); 5]);
    assert!(
        err.contains("adapter 2 asked for, but the stack holds 2"),
        "{err}"
    );
    let single = DevAdapter::upload_frozen(&be, &a).unwrap();
    let err = run(&single, &[Some(0); 5]);
    assert!(err.contains("is not the stack's"), "{err}");
    // An adapter that does not fit the model is named by its place in the stack.
    let mut other = spec();
    other.hidden = 64;
    let (_d2, f2) = fixture(&other);
    let small = adapter(&f2.config, 2, 4.0, "q", 3);
    let err = stack(&[&a, &small], &m.config).unwrap_err().to_string();
    assert!(err.contains("adapter 1 of the stack"), "{err}");
    assert!(stack(&[], &m.config).is_err());
}
