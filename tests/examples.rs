//! The library examples (examples/*.rs) are compiled by `cargo test` like any target; here
//! their functions run on the real SmolLM2-135M / MovieLens-100K assets and are held to what
//! their documentation says: `rerank` orders candidates by the P(Yes) each gets from a prefill
//! of its own prompt, and `finetune` writes the adapter `recforge rec train` writes with the same
//! settings. With RECFORGE_REQUIRE_ASSETS=1 (scripts/test.sh, CI) a missing asset fails;
//! otherwise the tests say why they skipped.

mod common;

#[allow(dead_code)]
#[path = "../examples/rerank.rs"]
mod rerank;

#[allow(dead_code)]
#[path = "../examples/finetune.rs"]
mod finetune;

use std::process::Command;

use recforge::backend::cpu::Cpu;
use recforge::model::{self, Llama, LoadOptions, Logits};
use recforge::rec::eval::{p_yes, YesNo};
use recforge::rec::tallrec::{input_text, INSTRUCTION};
use recforge::rec::{self, Split};
use recforge::train::DevAdapter;

const GGUF: &str = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[test]
fn rerank_orders_the_candidates_by_the_probability_each_gets_alone() {
    let Some(gguf) = common::asset(GGUF) else {
        return;
    };
    let be = Cpu::new();
    let src = model::open(&gguf).unwrap();
    let tok = src.tokenizer().unwrap();
    // Without the LLM.int8 outlier columns every linear works row by row (int8 sums are exact),
    // so a prompt's logits do not depend on which prompts share its forward pass or whether its
    // prefix ran separately; with them, the columns taken out depend on the whole batch.
    let opts = LoadOptions {
        int8: true,
        outlier_threshold: 0.0,
    };
    let m = Llama::load(src.as_ref(), &be, opts).unwrap();
    let user = rerank::User {
        liked: rerank::LIKED,
        disliked: rerank::DISLIKED,
    };
    let ranked = rerank::rank(
        &be,
        &m,
        &tok,
        &DevAdapter::none(),
        &user,
        rerank::CANDIDATES,
    )
    .unwrap();

    let mut titles: Vec<&str> = ranked.iter().map(|(t, _)| t.as_str()).collect();
    titles.sort_unstable();
    let mut want: Vec<&str> = rerank::CANDIDATES.to_vec();
    want.sort_unstable();
    assert_eq!(titles, want, "every candidate ranked once");
    assert!(
        ranked.windows(2).all(|w| w[0].1 >= w[1].1),
        "not ordered by P(Yes): {ranked:?}"
    );

    // Each candidate alone, through the generation path (`Llama::forward` over a KV cache, the
    // whole prompt at once), with the prompt built here from the template and the answer
    // tokens found by the tokenizer.
    let yn = YesNo::from_tokenizer(&tok).unwrap();
    for (title, p) in &ranked {
        let text = rec::prompt(
            INSTRUCTION,
            &input_text(rerank::LIKED, rerank::DISLIKED, title),
        );
        let ids = tok.encode(&text, true).unwrap();
        let mut cache = m.new_cache(&be, ids.len()).unwrap();
        let logits = m
            .forward(&be, &ids, &mut cache, Logits::Last)
            .unwrap()
            .to_f32()
            .unwrap();
        let alone = p_yes(logits[yn.yes as usize], logits[yn.no as usize]);
        eprintln!("{p:.6} ranked, {alone:.6} alone: {title}");
        // Scoring compares log-probabilities (logit − logsumexp, in f32) where this compares
        // logits: the difference of two such logits (|x| ≲ 30, an f32 ulp ≲ 4e-6) may round
        // differently by a few ulps, and dP = P(1 − P)·d ≤ d/4.
        assert!(
            (p - alone).abs() <= 1e-5,
            "{title}: P(Yes) {p} ranked, {alone} alone"
        );
    }
    let spread = ranked[0].1 - ranked[ranked.len() - 1].1;
    assert!(spread > 1e-3, "the candidates barely differ: {ranked:?}");
}

#[test]
fn finetune_writes_the_adapter_rec_train_writes() {
    let (Some(gguf), Some(dataset)) = (common::asset(GGUF), common::asset("assets/ml-100k")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Two updates (the warm-up's first runs at learning rate 0) of 4 sequences from 8 shots.
    let (shots, steps, lr) = (8, 2, 1e-3);
    let samples = rec::sample(&rec::build(&dataset, Split::Train).unwrap(), shots, 0).unwrap();
    let data_file = dir.path().join("train.json");
    rec::write_json(&data_file, &samples).unwrap();
    let base_name = gguf.display().to_string();

    let be = Cpu::new();
    let src = model::open(&gguf).unwrap();
    let tok = src.tokenizer().unwrap();
    let m = Llama::load(src.as_ref(), &be, LoadOptions::default()).unwrap();
    let config = finetune::config(steps, lr).unwrap();
    let data = finetune::examples(&tok, &samples, config.cutoff).unwrap();
    let mut losses = vec![];
    let host = finetune::train(&be, &m, &base_name, data, config, |r| losses.push(r.loss)).unwrap();
    assert_eq!(losses.len(), steps);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    // B starts at zero (PEFT's initialisation): the second update must have moved it, or the
    // comparison below would hold for two adapters that never trained.
    assert!(
        host.layers.values().any(|l| l.b.iter().any(|&x| x != 0.0)),
        "no LoRA B moved in {steps} updates"
    );
    let ours = dir.path().join("example");
    model::adapter::save(&host, &ours).unwrap();

    let cli = dir.path().join("cli");
    let out = Command::new(common::recforge_bin())
        .args(["rec", "train", "--device", "cpu", "--no-checkpointing"])
        .args(["--batch", "4", "--accum", "1", "--warmup", "2"])
        .args(["--steps", &steps.to_string(), "--lr", &lr.to_string()])
        .arg("--model")
        .arg(&gguf)
        .arg("--data")
        .arg(&data_file)
        .arg("--out")
        .arg(&cli)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rec train failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        let (a, b) = (
            std::fs::read(ours.join(file)).unwrap(),
            std::fs::read(cli.join(file)).unwrap(),
        );
        assert!(a == b, "{file} differs between the example and rec train");
    }
}
