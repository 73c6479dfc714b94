//! The real SmolLM2-135M-Instruct (a trained LLaMA-architecture model, Q4_1 GGUF) fetched by
//! scripts/fetch-assets.sh. With RECFORGE_REQUIRE_ASSETS=1 (scripts/test.sh, CI) a missing
//! asset fails the test; otherwise the test says why it skipped.

mod common;

use std::path::PathBuf;

use recforge::backend::cpu::Cpu;
use recforge::backend::SamplingParams;
use recforge::infer::generate::{argmax, generate, GenerateOptions};
use recforge::model::{self, Llama, LoadOptions, Logits};

fn asset() -> Option<PathBuf> {
    common::asset("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn loads_with_the_published_config() {
    let Some(p) = asset() else { return };
    let src = model::open(&p).unwrap();
    let c = src.config();
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (9, 3, 64)
    );
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.tie_word_embeddings);
}

#[test]
fn tokenizes_like_a_byte_level_bpe() {
    let Some(p) = asset() else { return };
    let tok = model::open(&p).unwrap().tokenizer().unwrap();
    let pieces = |s: &str| -> Vec<String> {
        tok.encode(s, true)
            .unwrap()
            .iter()
            .map(|i| tok.id_to_token(*i).unwrap())
            .collect()
    };
    assert_eq!(pieces("Hello world"), ["Hello", "Ġworld"]);
    // SmolLM's pre-tokenizer splits digits one by one.
    assert_eq!(pieces("2024"), ["2", "0", "2", "4"]);
    assert_eq!(tok.encode("<|im_start|>", true).unwrap().len(), 1);
    for text in [
        "Le café coûte 3,50 € — très cher!\n\tOK",
        "def f(x):\n    return x**2  # ✓",
        "日本語のテキスト",
    ] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

/// The question the chat tests ask. Its first answer token is decisive: "The" leads "A" by 1.47
/// logits in the f32 model and by 1.0–1.7 over int8 rounding realizations (measured 2026-12-04).
/// The plain "What is the capital of France?" is not: there "The" leads "L" by 0.08 logits in
/// f32, and int8 activation rounding makes the forward a chaotic function at the level of the
/// quantization noise: perturbing every attention output by a relative 1e-6 moved the top logit
/// by up to ±1.5 and made the answer "L'Étoile, …" in 1 of 8 trials, so its greedy text was a
/// coin flip for any change of summation order. `prompt_is_decisive` asserts the margin.
const QUESTION: &str = "What is the capital of France? Answer in one word.";

/// Top logit minus the runner-up.
fn margin(logits: &[f32]) -> f32 {
    let top = argmax(logits);
    let second = logits
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != top as usize)
        .map(|(_, v)| *v)
        .fold(f32::NEG_INFINITY, f32::max);
    logits[top as usize] - second
}

#[test]
fn prompt_is_decisive() {
    // The precondition of the next-token assertions below: the first answer token leads by more
    // than int8 rounding moves it (±0.3 of margin over realizations; see QUESTION).
    let Some(p) = asset() else { return };
    let be = Cpu::new();
    let src = model::open(&p).unwrap();
    let tok = src.tokenizer().unwrap();
    let ids = tok
        .encode(&tok.chat_prompt(QUESTION).unwrap(), true)
        .unwrap();
    for int8 in [false, true] {
        let m = Llama::load(
            src.as_ref(),
            &be,
            LoadOptions {
                int8,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let mut cache = m.new_cache(&be, ids.len()).unwrap();
        let l = m
            .forward(&be, &ids, &mut cache, Logits::Last)
            .unwrap()
            .to_f32()
            .unwrap();
        assert!(
            margin(&l) > 0.75,
            "int8 {int8}: the first answer token {:?} leads by only {} logits",
            tok.id_to_token(argmax(&l)),
            margin(&l)
        );
    }
}

#[test]
fn answers_a_famous_fact() {
    let Some(p) = asset() else { return };
    let be = Cpu::new();
    let src = model::open(&p).unwrap();
    let tok = src.tokenizer().unwrap();
    let m = Llama::load(src.as_ref(), &be, LoadOptions::default()).unwrap();
    let prompt = tok
        .chat_prompt(QUESTION)
        .expect("SmolLM2 has a ChatML template");
    let ids = tok.encode(&prompt, true).unwrap();
    let mut opts = GenerateOptions {
        max_new_tokens: 24,
        stop_ids: vec![tok.token_id("<|im_end|>").unwrap()],
        sampling: SamplingParams::GREEDY,
        seed: 0,
    };
    let g = generate(&be, &m, &ids, &opts, |_| Ok(())).unwrap();
    let text = tok.decode(&g.tokens, true).unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
    // The ITREK preset (T 0.1, top-k 10, top-p 0.1) is nearly greedy: every seed still answers.
    opts.sampling = SamplingParams::ITREK;
    for seed in 1..=3 {
        opts.seed = seed;
        let g = generate(&be, &m, &ids, &opts, |_| Ok(())).unwrap();
        let text = tok.decode(&g.tokens, true).unwrap();
        assert!(text.contains("Paris"), "itrek seed {seed}: {text:?}");
    }
}

#[test]
fn int8_agrees_with_f32_on_a_trained_model() {
    // Stated bound for the W8A8 forward (per-row weight scales, per-token activation scales,
    // outlier columns above 6.0 in float) against the same model with f32 linears, over the 45
    // positions of this prompt: relative RMS logit error below 12% and the same next token at
    // ≥ 85% of positions. Measured when this test was written (CPU): 9.3% and 41/45 with the
    // decomposition, 13.5% and 40/45 without it. About 4.2% of the error is the weights alone:
    // this checkpoint is Q4_1, and requantizing to one int8 scale per 576- or 1536-wide row
    // is coarse where a row has outlier blocks; the rest is the activation quantization, which
    // the outlier decomposition reduces — asserted below, since that is what it is for.
    let Some(p) = asset() else { return };
    let be = Cpu::new();
    let src = model::open(&p).unwrap();
    let tok = src.tokenizer().unwrap();
    let text = "The Eiffel Tower is in Paris. Movies I liked: \"Toy Story (1995)\", \"Heat (1995)\". Will I like \"Casino (1995)\"? Answer:";
    let ids = tok.encode(text, true).unwrap();
    let run = |opts: LoadOptions| {
        let m = Llama::load(src.as_ref(), &be, opts).unwrap();
        let mut cache = m.new_cache(&be, ids.len()).unwrap();
        m.forward(&be, &ids, &mut cache, Logits::All)
            .unwrap()
            .to_f32()
            .unwrap()
    };
    let a = run(LoadOptions {
        int8: false,
        outlier_threshold: 0.0,
    });
    let v = 49152;
    let mut errs = vec![];
    for thr in [6.0f32, 0.0] {
        let b = run(LoadOptions {
            int8: true,
            outlier_threshold: thr,
        });
        let err: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
        let norm: f32 = a.iter().map(|x| x * x).sum();
        let rel = (err / norm).sqrt();
        let agree = a
            .chunks(v)
            .zip(b.chunks(v))
            .filter(|(x, y)| argmax(x) == argmax(y))
            .count();
        eprintln!("SmolLM2 int8 (threshold {thr}) vs f32: relative RMS error {rel:.4}, argmax agreement {agree}/{}", ids.len());
        errs.push(rel);
        if thr > 0.0 {
            assert!(rel < 0.12, "relative RMS error {rel}");
            assert!(
                agree * 100 >= ids.len() * 85,
                "argmax agreement {agree}/{}",
                ids.len()
            );
        }
    }
    assert!(
        errs[0] < errs[1],
        "the outlier decomposition must reduce the error: {errs:?}"
    );
}

#[test]
fn converted_to_hf_gives_the_same_logits() {
    let Some(p) = asset() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-hf");
    let src = model::open(&p).unwrap();
    model::convert::to_hf_folder(src.as_ref(), &out, |_, _| {}).unwrap();
    let be = Cpu::new();
    let last = |path: &std::path::Path| {
        let s = model::open(path).unwrap();
        let ids = s
            .tokenizer()
            .unwrap()
            .encode("Recommendation systems", true)
            .unwrap();
        let m = Llama::load(s.as_ref(), &be, LoadOptions::default()).unwrap();
        let mut cache = m.new_cache(&be, ids.len()).unwrap();
        (
            ids.clone(),
            m.forward(&be, &ids, &mut cache, Logits::Last)
                .unwrap()
                .to_f32()
                .unwrap(),
        )
    };
    let (ia, a) = last(&p);
    let (ib, b) = last(&out);
    assert_eq!(ia, ib);
    assert_eq!(a, b);
}

#[test]
fn real_model_prefill_on_the_simulator_agrees_with_the_cpu() {
    // Every CUDA kernel of the forward (W8A8 with outliers, attention, RMSNorm, RoPE, SwiGLU,
    // embedding, the dense tied head), composed by the same model code, run in the simulator on
    // the real SmolLM2. The next token after the chat prompt must be the CPU's (the prompt is
    // decisive there: `prompt_is_decisive`). The logits are a bug detector, not a precision
    // claim: a wrong kernel gives errors of order 100%, while bf16 activations (including the
    // residual stream, rounded at every add over 30 layers) against the CPU's f32 ones are a
    // different realization of the int8 rounding noise. On the earlier, near-tied prompt
    // ("What is the capital of France?") this measured 8.8% to 20.2% as the kernels changed
    // (the tiled attention rounds the softmax weights to bf16 before P·V, as FlashAttention
    // does). On QUESTION, measured 2026-12-04: simulator vs CPU int8 3.6%, simulator vs f32
    // 4.8%, CPU int8 vs f32 4.2%. The bound stays 25%.
    use recforge::backend::gpu::backend::Gpu;
    use recforge::backend::gpu::Device;
    let Some(p) = asset() else { return };
    let src = model::open(&p).unwrap();
    let tok = src.tokenizer().unwrap();
    let ids = tok
        .encode(&tok.chat_prompt(QUESTION).unwrap(), true)
        .unwrap();
    fn last<B: recforge::backend::Backend>(
        be: &B,
        src: &dyn model::ModelSource,
        ids: &[u32],
        opts: LoadOptions,
    ) -> Vec<f32> {
        let m = Llama::load(src, be, opts).unwrap();
        let mut c = m.new_cache(be, ids.len()).unwrap();
        m.forward(be, ids, &mut c, Logits::Last)
            .unwrap()
            .to_f32()
            .unwrap()
    }
    let cpu = Cpu::new();
    let f32_ref = last(
        &cpu,
        src.as_ref(),
        &ids,
        LoadOptions {
            int8: false,
            outlier_threshold: 0.0,
        },
    );
    let cpu_int8 = last(&cpu, src.as_ref(), &ids, LoadOptions::default());
    let sim = last(
        &Gpu::new(Device::sim()),
        src.as_ref(),
        &ids,
        LoadOptions::default(),
    );
    assert_eq!(
        argmax(&sim),
        argmax(&cpu_int8),
        "next token: sim {:?} vs cpu {:?}",
        tok.id_to_token(argmax(&sim)),
        tok.id_to_token(argmax(&cpu_int8))
    );
    let rel = |a: &[f32], b: &[f32]| {
        let err: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        (err / b.iter().map(|x| x * x).sum::<f32>()).sqrt()
    };
    let (sim_f32, cpu_f32, sim_cpu) = (
        rel(&sim, &f32_ref),
        rel(&cpu_int8, &f32_ref),
        rel(&sim, &cpu_int8),
    );
    eprintln!("SmolLM2 prefill, last position: simulator vs f32 {sim_f32:.4}, CPU int8 vs f32 {cpu_f32:.4}, simulator vs CPU int8 {sim_cpu:.4}");
    assert!(
        sim_cpu < 0.25,
        "simulator vs CPU int8: relative RMS logit error {sim_cpu}"
    );
}

#[test]
fn a_response_tokenizes_the_same_alone_and_after_the_prompt() {
    // Byte-level BPE (unlike SentencePiece, tests/llama_cpp_vocab.rs) has no word-initial
    // marker: "Yes." after the Alpaca template's newline is the same tokens as on its own, so
    // tokenizing responses as continuations left SmolLM2's training data and Yes/No ids, and
    // the README's measured AUCs, as they were.
    let Some(p) = asset() else { return };
    let tok = model::open(&p).unwrap().tokenizer().unwrap();
    let prompt = recforge::rec::prompt::prompt("Will the user like it?", "\"Heat (1995)\"");
    let ids = tok.encode(&prompt, true).unwrap();
    for r in ["Yes.", "No."] {
        assert_eq!(
            tok.encode_after(&prompt, &ids, r).unwrap(),
            tok.encode(r, false).unwrap()
        );
    }
}

/// Ctrl-C during `convert` removes the partial output and exits 130, and a later convert to
/// the same path clears what a killed one left behind (`.NAME.tmp-PID` of a process no
/// longer running), so neither leaves hidden gigabytes beside the output.
#[cfg(unix)]
#[test]
fn an_interrupted_convert_leaves_nothing_behind() {
    let Some(p) = asset() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    // A pid above any pid_max: no such process runs.
    let stale = dir.path().join(".hf.tmp-4000000000");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"partial").unwrap();
    let mut cmd = std::process::Command::new(common::recforge_bin());
    cmd.args(["convert", "--model", p.to_str().unwrap(), "--out"])
        .arg(&out);
    let run = common::interrupt_after(cmd, "converting 64/");
    assert_eq!(run.status.code(), Some(130), "{}", run.stderr);
    assert!(
        run.stderr.contains("interrupted: nothing written"),
        "{}",
        run.stderr
    );
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The default model is found from any folder (the checkout the binary was built from), not
/// only from the repository root.
#[test]
fn the_default_model_is_found_from_another_folder() {
    let Some(_) = asset() else { return };
    let elsewhere = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(common::recforge_bin())
        .arg("info")
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("SmolLM2-135M-Instruct.Q4_1.gguf (gguf") && out.contains("layers 30"),
        "{out}"
    );
}

/// The named shape `smollm2-135m` (bench-train, plan) is the real model's configuration.
#[test]
fn the_named_shape_is_the_real_models_config() {
    let Some(p) = asset() else { return };
    let real = model::open(&p).unwrap().config().clone();
    let shape = recforge::memory::named_shape("smollm2-135m").unwrap();
    let dims = |c: &model::LlamaConfig| {
        (
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (
                c.vocab_size,
                c.max_position_embeddings,
                c.tie_word_embeddings,
            ),
            // The GGUF stores eps as an f32.
            (c.rope_theta, c.rms_norm_eps as f32),
        )
    };
    assert_eq!(dims(&shape), dims(&real));
}
