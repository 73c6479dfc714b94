//! Yes/No scoring with the prompts' common prefix computed once (`train::step::prefix_kv` +
//! `forward_logits_at` with a prefix) against every prompt run in full: the same P(Yes), with a
//! LoRA adapter whose B is random (non-zero), on the CPU reference and on the simulator.

mod common;

use common::fixture;
use recforge::backend::cpu::Cpu;
use recforge::backend::{Backend, IGNORE_LABEL};
use recforge::model::fixture::FixtureSpec;
use recforge::model::lora::{parse_targets, HostAdapter, LoraConfig};
use recforge::model::{self, Llama, LlamaConfig, LoadOptions};
use recforge::rec::eval::{p_yes, score, shared_prefix_len};
use recforge::rec::Sample;
use recforge::rng::Rng;
use recforge::train::step::{forward_logits_at, prefix_kv, Batch, PrefixKv, Workspace};
use recforge::train::DevAdapter;

/// 2 layers (so the second layer's prefix K/V depends on the first layer's attention), head_dim
/// 32 (the smallest the GPU attention kernels take).
fn spec() -> FixtureSpec {
    FixtureSpec {
        layers: 2,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    }
}

fn load<B: Backend>(be: &B, path: &std::path::Path, opts: LoadOptions) -> Llama<B> {
    let src = model::open(path).expect("open");
    Llama::load(src.as_ref(), be, opts).expect("load")
}

/// LoRA on every projection with random B (PEFT initialises B to zero, which would make the
/// adapter a no-op and hide a prefix computed without it).
fn random_adapter(cfg: &LlamaConfig, seed: u64) -> HostAdapter {
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: parse_targets("q,k,v,o,gate,up,down").unwrap(),
    };
    let mut a = HostAdapter::init(cfg, &lora, seed, "fixture").expect("init");
    let mut rng = Rng::new(seed + 1);
    for w in a.layers.values_mut() {
        for x in &mut w.b {
            *x = rng.range(-0.3, 0.3);
        }
    }
    a
}

/// Two tokens compared at the last row, standing in for "Yes" / "No".
const YES: u32 = 40;
const NO: u32 = 77;

/// (P(Yes), log P(Yes), log P(No)) of one sequence.
type Score = (f64, f32, f32);

/// The [`Score`] at the last row of every sequence from a batch's f32 logits.
fn yes_no<B: Backend>(be: &B, logits: &recforge::backend::Tensor<B>) -> Vec<Score> {
    let rows = logits.shape[0];
    let ids: Vec<u32> = (0..rows).flat_map(|_| [YES, NO]).collect();
    let lp = be.token_logprobs(logits, &ids).expect("token_logprobs");
    lp.chunks(2)
        .map(|x| (p_yes(x[0], x[1]), x[0], x[1]))
        .collect()
}

fn pack(seqs: &[&[u32]]) -> (Batch, Vec<usize>) {
    let ignore: Vec<Vec<u32>> = seqs.iter().map(|s| vec![IGNORE_LABEL; s.len()]).collect();
    let b = Batch::pack(seqs.iter().zip(&ignore).map(|(s, l)| (*s, &l[..]))).expect("pack");
    let rows = b.spans.iter().map(|s| s.q_start + s.q_len - 1).collect();
    (b, rows)
}

/// Scores of `seqs` at their last tokens: all in full in one packed batch, and with the first
/// `p` tokens (shared) taken from `prefix`.
fn full_and_prefixed<B: Backend>(
    be: &B,
    m: &Llama<B>,
    ad: &DevAdapter<B>,
    seqs: &[Vec<u32>],
    prefix: &PrefixKv<B>,
) -> (Vec<Score>, Vec<Score>) {
    let (cfg, p) = (&ad.config, prefix.len());
    let full: Vec<&[u32]> = seqs.iter().map(|s| &s[..]).collect();
    let (b, rows) = pack(&full);
    let mut ws = Workspace::forward_only(be, m, &cfg.targets, cfg.r, b.len()).unwrap();
    let lf = forward_logits_at(be, m, ad, &mut ws, None, &b, &rows).expect("full forward");
    let own: Vec<&[u32]> = seqs.iter().map(|s| &s[p..]).collect();
    let (b, rows) = pack(&own);
    let mut ws = Workspace::forward_only(be, m, &cfg.targets, cfg.r, b.len()).unwrap();
    let lp = forward_logits_at(be, m, ad, &mut ws, Some(prefix), &b, &rows).expect("prefixed");
    (yes_no(be, &lf), yes_no(be, &lp))
}

/// Max |ΔP(Yes)| and max |Δ log P| over the rows.
fn diff(a: &[Score], b: &[Score]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let mut dp = 0f64;
    let mut dl = 0f64;
    for (x, y) in a.iter().zip(b) {
        dp = dp.max((x.0 - y.0).abs());
        dl = dl
            .max((x.1 - y.1).abs() as f64)
            .max((x.2 - y.2).abs() as f64);
    }
    (dp, dl)
}

/// The three layouts the prefix must handle, as (name, sequences, expected shared length).
fn cases(vocab: usize) -> Vec<(&'static str, Vec<Vec<u32>>, usize)> {
    let mut rng = Rng::new(17);
    let mut r = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| 3 + rng.below(vocab as u64 - 3) as u32)
            .collect()
    };
    const BOS: u32 = 1;
    let cat = |a: &[u32], b: &[u32]| [a, b].concat();
    // One prompt is the common prefix plus one token: it keeps exactly that token.
    let base = cat(&[BOS], &r(24));
    let whole = vec![base.clone(), cat(&base, &r(9)), cat(&base, &r(3))];
    // Nothing shared beyond BOS: the second tokens differ.
    let mut bos_only = vec![cat(&[BOS, 3], &r(17)), cat(&[BOS, 4], &r(5))];
    bos_only.push(cat(&[BOS, 5], &r(30)));
    // A 21-token prefix and own parts of 1, 45, 4 and 17 tokens (each starting differently).
    let pre = cat(&[BOS], &r(20));
    let ragged = [1usize, 45, 4, 17]
        .iter()
        .enumerate()
        .map(|(i, &n)| cat(&pre, &cat(&[3 + i as u32], &r(n - 1))))
        .collect();
    vec![
        ("one prompt = prefix + 1 token", whole, 24),
        ("only BOS shared", bos_only, 1),
        ("own parts of 1..45 tokens", ragged, 21),
    ]
}

/// What the three layouts measured on one backend: the largest |ΔP(Yes)| and |Δ log P| between
/// the prefixed and the full path, the same for the full path packed vs. each sequence alone
/// (how much batch composition alone moves a score), and the smallest |Δ log P| when the
/// prefix is computed WITHOUT the adapter (what a broken prefix looks like).
#[derive(Debug)]
struct Agreement {
    dp: f64,
    dl: f64,
    packing_dp: f64,
    packing_dl: f64,
    stale_dl: f64,
}

/// `packing`: also score every sequence alone (the packing spread; 0 when not measured).
fn prefix_vs_full<B: Backend>(
    be: &B,
    m: &Llama<B>,
    host: &HostAdapter,
    packing: bool,
) -> Agreement {
    let ad = DevAdapter::upload(be, host).unwrap();
    let base = DevAdapter::<B>::empty(host.config.clone());
    let mut a = Agreement {
        dp: 0.0,
        dl: 0.0,
        packing_dp: 0.0,
        packing_dl: 0.0,
        stale_dl: f64::INFINITY,
    };
    for (name, seqs, want_p) in cases(m.config.vocab_size) {
        let p = shared_prefix_len(&seqs);
        assert_eq!(p, want_p, "{name}: shared prefix length");
        let prefix = prefix_kv(be, m, &ad, &seqs[0][..p]).unwrap();
        assert_eq!(prefix.len(), p);
        let (full, pre) = full_and_prefixed(be, m, &ad, &seqs, &prefix);
        let (dp, dl) = diff(&full, &pre);
        let mut alone = if packing { vec![] } else { full.clone() };
        for sq in seqs.iter().filter(|_| packing) {
            let (b, rows) = pack(&[&sq[..]]);
            let (targets, r) = (&ad.config.targets, ad.config.r);
            let mut ws = Workspace::forward_only(be, m, targets, r, b.len()).unwrap();
            let l = forward_logits_at(be, m, &ad, &mut ws, None, &b, &rows).unwrap();
            alone.push(yes_no(be, &l)[0]);
        }
        let (ap, al) = diff(&full, &alone);
        let stale = prefix_kv(be, m, &base, &seqs[0][..p]).unwrap();
        let (_, bad) = full_and_prefixed(be, m, &ad, &seqs, &stale);
        let (_, sl) = diff(&full, &bad);
        eprintln!(
            "  {name} (prefix {p}): prefixed vs full |ΔP(Yes)| {dp:.2e} |Δ log P| {dl:.2e}; \
             packed vs alone {ap:.2e} / {al:.2e}; prefix without the adapter |Δ log P| {sl:.2e}; \
             P(Yes) {:?}",
            full.iter().map(|x| x.0 as f32).collect::<Vec<_>>()
        );
        a.dp = a.dp.max(dp);
        a.dl = a.dl.max(dl);
        a.packing_dp = a.packing_dp.max(ap);
        a.packing_dl = a.packing_dl.max(al);
        a.stale_dl = a.stale_dl.min(sl);
    }
    // The comparison can fail: a prefix computed without the adapter moves log P by whole nats.
    assert!(
        a.stale_dl > 0.5,
        "a prefix computed without the adapter went unnoticed: {a:?}"
    );
    a
}

fn f32_weights() -> LoadOptions {
    LoadOptions {
        int8: false,
        ..LoadOptions::default()
    }
}

/// int8 without the LLM.int8 outlier decomposition: every linear is then row by row.
fn int8_no_outliers() -> LoadOptions {
    LoadOptions {
        int8: true,
        outlier_threshold: 0.0,
    }
}

/// The LLM.int8 outlier columns (|x| > 6 in ANY row of the batch) go through the float path,
/// and the rest of each row is quantized against its own absmax without them: a row's result
/// depends on which rows share its batch — in the full path too (packed vs. alone). Sharing a
/// prefix changes the batches (prefix rows alone, then suffix rows alone), so it may move a
/// score as much as re-packing does, not more: 3× the packing spread leaves room for the
/// prefix's own batch while staying far below a broken prefix (on the CPU: 0.9× in log P and
/// 0.24× in P(Yes); a prefix without the adapter is 13× in log P; on the simulator, measured
/// once, 1.4× in log P: the device also switches linears of ≤ 16 rows to bf16 activations).
fn assert_within_packing_noise(what: &str, a: &Agreement) {
    assert!(
        a.dl <= 3.0 * a.packing_dl && a.dp <= 3.0 * a.packing_dp.max(1e-6),
        "{what}: prefix sharing moves scores more than packing does: {a:?}"
    );
}

#[test]
fn prefixed_scoring_matches_full_prompts_on_the_cpu() {
    let (_d, f) = fixture(&spec());
    let be = Cpu::new();
    let host = random_adapter(&f.config, 5);

    // Row-by-row arithmetic everywhere (int8 GEMM sums exactly in i32; attention sees the same
    // keys in the same order at the same positions): bit-identical scores.
    eprintln!("cpu, int8 weights, no outlier decomposition:");
    let a = prefix_vs_full(&be, &load(&be, &f.hf_dir, int8_no_outliers()), &host, true);
    assert!(a.dl == 0.0 && a.dp == 0.0, "not bit-identical: {a:?}");

    // f32 weights: the CPU's f32 GEMMs sum every output the same way whichever block of rows
    // it falls in, so a row's bits do not depend on its batch either: bit-identical.
    eprintln!("cpu, f32 weights:");
    let a = prefix_vs_full(&be, &load(&be, &f.hf_dir, f32_weights()), &host, true);
    assert!(
        a.dl == 0.0 && a.dp == 0.0,
        "f32 weights, not bit-identical: {a:?}"
    );

    eprintln!("cpu, int8 weights, outlier threshold 6 (the default):");
    let a = prefix_vs_full(
        &be,
        &load(&be, &f.hf_dir, LoadOptions::default()),
        &host,
        true,
    );
    assert_within_packing_noise("cpu int8, outliers", &a);
}

fn sample(input: &str, yes: bool) -> Sample {
    Sample {
        instruction: recforge::rec::tallrec::INSTRUCTION.into(),
        input: input.into(),
        output: if yes { "Yes." } else { "No." }.into(),
    }
}

#[test]
fn score_with_and_without_prefix_sharing_agree() {
    let (_d, f) = fixture(&spec());
    let be = Cpu::new();
    let m = load(&be, &f.hf_dir, int8_no_outliers());
    let tok = model::open(&f.hf_dir).unwrap().tokenizer().unwrap();
    let ad = DevAdapter::upload(&be, &random_adapter(&f.config, 9)).unwrap();
    let titles = [
        "Heat (1995)",
        "Toy Story (1995)",
        "Fargo (1996)",
        "Babe (1995)",
    ];
    let mut samples = vec![];
    for i in 0..7usize {
        let liked = titles[..1 + i % 4].join(", ");
        let input = format!(
            "User Preference: {liked}\nUser Unpreference: {}\nWhether the user will like the \
             target movie \"{}\"?",
            titles[i % 3],
            titles[(i + 1) % 4]
        );
        samples.push(sample(&input, i % 2 == 0));
    }
    // One sample differs already in its first input word: the prefix ends before "User".
    samples.push(sample("Nothing known.", true));
    let ids = recforge::rec::eval::prompt_ids(&tok, &samples, 4096).unwrap();
    let p = shared_prefix_len(&ids);
    let shortest = ids.iter().map(Vec::len).min().unwrap();
    eprintln!(
        "prompts of {shortest}..{} tokens share {p}",
        ids.iter().map(Vec::len).max().unwrap()
    );
    assert!(p > 40 && p < shortest, "shared prefix {p} of {shortest}");
    // 8 samples, 3 per pass: the last pass holds 2.
    let full = score(&be, &m, &ad, &tok, &samples, 3, 4096, false, |_, _| {}).unwrap();
    let shared = score(&be, &m, &ad, &tok, &samples, 3, 4096, true, |_, _| {}).unwrap();
    assert_eq!(full.len(), samples.len());
    let spread =
        full.iter().cloned().fold(0f64, f64::max) - full.iter().cloned().fold(1f64, f64::min);
    eprintln!("P(Yes) {full:?}");
    // Row-by-row arithmetic (int8 without outliers, as above): identical.
    assert_eq!(full, shared, "P(Yes) with and without prefix sharing");
    assert!(spread > 1e-3, "P(Yes) barely varies: {full:?}");
}

#[test]
fn prefixed_scoring_matches_full_prompts_on_the_simulator() {
    use recforge::backend::gpu::backend::Gpu;
    // head_dim 32 runs the warp-per-row attention kernel, head_dim 64 (SmolLM2's) the tiled
    // tensor-core one.
    let hd64 = FixtureSpec {
        heads: 2,
        kv_heads: 1,
        ..spec()
    };
    for s in [spec(), hd64] {
        let (_d, f) = fixture(&s);
        let host = random_adapter(&f.config, 5);
        for dev in common::devices() {
            let gpu = Gpu::new(dev);
            let t0 = std::time::Instant::now();
            // Dense weights (bf16 on the device): the dense GEMM, RMSNorm, RoPE and LoRA
            // kernels work row by row with a reduction order that does not depend on the row
            // count, so a prefix row's bf16 K/V is the same value in both paths, and attention
            // reads the same keys in the same order relative to the span (key tiles start at
            // kv_start; a tile past a query's position is fully masked and adds exactly 0):
            // bit-identical (measured), where one bf16 rounding step anywhere would show.
            let hd = f.config.head_dim;
            eprintln!("{}, bf16 weights, head_dim {hd}:", gpu.name());
            let a = prefix_vs_full(&gpu, &load(&gpu, &f.hf_dir, f32_weights()), &host, false);
            assert!(
                a.dl == 0.0 && a.dp == 0.0,
                "head_dim {hd}: not bit-identical: {a:?}"
            );
            eprintln!("{} in {:.1}s", gpu.name(), t0.elapsed().as_secs_f64());
        }
    }
}

/// The real model and data: with the outlier decomposition off, prefix sharing is bit-identical
/// on SmolLM2-135M's 30 layers too, and the two paths' times are printed. Skips (saying so) when
/// the assets are missing, except in CI.
#[test]
fn smollm2_prefix_sharing_is_exact_without_outliers() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let gguf = root.join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let data = root.join("assets/ml-100k");
    if !gguf.exists() || !data.join("ml-100k.inter").exists() {
        // CI installs the assets (scripts/fetch-assets.sh): there a missing asset is a failure.
        if std::env::var("CI").is_ok()
            || std::env::var("RECFORGE_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
        {
            panic!("the SmolLM2 / MovieLens assets are missing: run scripts/fetch-assets.sh");
        }
        eprintln!("skipped: the SmolLM2 / MovieLens assets are missing (scripts/fetch-assets.sh)");
        return;
    }
    // 8 samples = one packed batch per path (about 25 s on a 2-core CPU).
    let samples: Vec<Sample> =
        recforge::rec::build(&data, recforge::rec::Split::Valid).unwrap()[..8].to_vec();
    let be = Cpu::new();
    let m = load(&be, &gguf, int8_no_outliers());
    let tok = model::open(&gguf).unwrap().tokenizer().unwrap();
    let ad = DevAdapter::upload(&be, &random_adapter(&m.config, 3)).unwrap();
    let ids = recforge::rec::eval::prompt_ids(&tok, &samples, 8192).unwrap();
    let total: usize = ids.iter().map(Vec::len).sum();
    eprintln!(
        "{} prompts, {total} tokens ({:.0} per prompt), common prefix {} tokens",
        ids.len(),
        total as f64 / ids.len() as f64,
        shared_prefix_len(&ids)
    );
    let run = |share: bool| {
        let t0 = std::time::Instant::now();
        let p = score(&be, &m, &ad, &tok, &samples, 8, 8192, share, |_, _| {}).unwrap();
        eprintln!("prefix sharing {share}: {:.1}s", t0.elapsed().as_secs_f64());
        p
    };
    let (full, shared) = (run(false), run(true));
    eprintln!("P(Yes) {full:?}");
    assert_eq!(full, shared);
}

#[test]
fn the_scoring_forward_is_the_inference_forward_for_odd_and_even_depths() {
    // The forward-only workspace alternates the residual stream between two buffers, so the
    // final layer's output sits in the second buffer for an odd number of layers and in the
    // first for an even one. With an adapter whose B is zero (PEFT's initialisation) the scoring
    // path must give the logits of `Llama::forward` (the generation path, which keeps no
    // workspace) at every row, whatever the depth; a stale or swapped buffer is off by O(1).
    for layers in [1, 2, 3] {
        let (_d, f) = fixture(&FixtureSpec { layers, ..spec() });
        let be = Cpu::new();
        let m = load(&be, &f.hf_dir, f32_weights());
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: parse_targets("q,v").unwrap(),
        };
        let host = HostAdapter::init(&f.config, &lora, 3, "fixture").unwrap();
        let ad = DevAdapter::upload(&be, &host).unwrap();
        let mut rng = Rng::new(layers as u64);
        let ids: Vec<u32> = (0..19).map(|_| 3 + rng.below(200) as u32).collect();
        let (b, _) = pack(&[&ids]);
        let rows: Vec<usize> = (0..ids.len()).collect();
        let mut ws = Workspace::forward_only(&be, &m, &lora.targets, lora.r, b.len()).unwrap();
        let got = forward_logits_at(&be, &m, &ad, &mut ws, None, &b, &rows).unwrap();
        let got = be.download(&got).unwrap().to_f32().unwrap();
        let mut cache = m.new_cache(&be, ids.len()).unwrap();
        let want = m
            .forward(&be, &ids, &mut cache, recforge::model::Logits::All)
            .unwrap()
            .to_f32()
            .unwrap();
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        // Both paths run the same f32 ops on the same values (LoRA adds exactly zero): any
        // difference is summation order, ~1e-6 of the logits' scale.
        assert!(
            worst <= 1e-5 * scale,
            "{layers} layers: scoring vs inference logits differ by {worst} (scale {scale})"
        );
    }
}
