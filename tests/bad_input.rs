//! Bad input gets a clear error naming the file and the problem — through the library and
//! through the CLI (non-zero exit, no panic).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture;
use recforge::backend::cpu::Cpu;
use recforge::model::fixture::FixtureSpec;
use recforge::model::gguf::{self, GgufFile, Value, WriteTensor};
use recforge::model::{self, Llama, LoadOptions};

/// Re-encode a GGUF file with its metadata and tensors edited.
fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<WriteTensor>),
) {
    let f = GgufFile::open(src).unwrap();
    let mut md: Vec<(String, Value)> = f
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut ts: Vec<WriteTensor> = f
        .tensors
        .iter()
        .map(|t| WriteTensor {
            name: t.name.clone(),
            shape: t.shape(),
            type_id: t.type_id,
            bytes: f.raw(t).unwrap().to_vec(),
        })
        .collect();
    edit(&mut md, &mut ts);
    std::fs::write(dst, gguf::encode(&md, &ts)).unwrap();
}

/// Open and fully load a model; return the error text.
fn load_err(path: &Path) -> String {
    let be = Cpu::new();
    let r = model::open(path).and_then(|src| {
        src.tokenizer()?;
        Llama::load(src.as_ref(), &be, LoadOptions::default()).map(|_| ())
    });
    match r {
        Ok(()) => panic!("{} loaded without error", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_names(err: &str, path: &Path, words: &[&str]) {
    assert!(
        err.contains(&path.display().to_string()),
        "error does not name {}: {err}",
        path.display()
    );
    for w in words {
        assert!(err.contains(w), "error lacks '{w}': {err}");
    }
}

#[test]
fn truncated_gguf() {
    let (d, f) = fixture(&FixtureSpec::default());
    let bytes = std::fs::read(&f.gguf).unwrap();
    for cut in [10, 200, bytes.len() / 2, bytes.len() - 1] {
        let p = d.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert_names(&load_err(&p), &p, &["truncated"]);
    }
}

#[test]
fn corrupted_gguf() {
    let (d, f) = fixture(&FixtureSpec::default());
    let bytes = std::fs::read(&f.gguf).unwrap();
    let p = d.path().join("magic.gguf");
    let mut b = bytes.clone();
    b[0] = b'X';
    std::fs::write(&p, &b).unwrap();
    assert_names(&load_err(&p), &p, &["not a GGUF file"]);
    // The first metadata key's length (bytes 24..32) made absurd.
    let p = d.path().join("len.gguf");
    let mut b = bytes.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert_names(&load_err(&p), &p, &["corrupted"]);
    // Not a GGUF at all: an empty file and a text file.
    for (name, content) in [
        ("empty.gguf", &b""[..]),
        ("text.gguf", &b"hello, this is not a model"[..]),
    ] {
        let p = d.path().join(name);
        std::fs::write(&p, content).unwrap();
        let e = load_err(&p);
        assert!(e.contains("truncated") || e.contains("not a GGUF"), "{e}");
    }
}

#[test]
fn impossible_tensor_dims() {
    let (d, f) = fixture(&FixtureSpec::default());
    let p = d.path().join("dims.gguf");
    rewrite_gguf(&f.gguf, &p, |_, ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_norm.weight")
            .unwrap();
        t.shape = vec![1 << 40, 1 << 40];
    });
    assert_names(&load_err(&p), &p, &["blk.0.attn_norm.weight"]);
}

/// A NaN or an infinity in the weights is refused at load, naming the tensor: quantized to
/// int8 a NaN weight becomes 0 and the damaged model answers as if it were whole.
#[test]
fn non_finite_weights() {
    let (d, f) = fixture(&FixtureSpec::default());
    for (gguf_name, hf_name, bad) in [
        (
            "blk.1.ffn_down.weight",
            "model.layers.1.mlp.down_proj.weight",
            f32::NAN,
        ),
        (
            "token_embd.weight",
            "model.embed_tokens.weight",
            f32::INFINITY,
        ),
        ("output_norm.weight", "model.norm.weight", f32::NEG_INFINITY),
    ] {
        let p = d.path().join(format!("{gguf_name}.gguf"));
        let mut first = 0;
        rewrite_gguf(&f.gguf, &p, |_, ts| {
            let t = ts.iter_mut().find(|t| t.name == gguf_name).unwrap();
            // Element 5 of a float tensor; a Q8_0 tensor's first block scale (elements 0–31).
            let (at, bytes) = match t.type_id {
                0 => (5, bad.to_le_bytes().to_vec()),
                1 => (5, half::f16::from_f32(bad).to_le_bytes().to_vec()),
                8 => (0, half::f16::from_f32(bad).to_le_bytes().to_vec()),
                other => panic!("{gguf_name}: fixture type {other}"),
            };
            first = at;
            let off = at * bytes.len();
            t.bytes[off..off + bytes.len()].copy_from_slice(&bytes);
        });
        let element = format!("element {first} ");
        assert_names(&load_err(&p), &p, &[hf_name, &element, "not finite"]);
    }
}

#[test]
fn unsupported_tensor_type() {
    let (d, f) = fixture(&FixtureSpec::default());
    let p = d.path().join("iq4xs.gguf");
    rewrite_gguf(&f.gguf, &p, |_, ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_q.weight")
            .unwrap();
        t.type_id = 23; // IQ4_XS (the Q*_0, Q*_1 and k-quant types load)
    });
    assert_names(
        &load_err(&p),
        &p,
        &["unsupported", "blk.0.attn_q.weight", "IQ4_XS"],
    );
}

#[test]
fn missing_tensor() {
    let (d, f) = fixture(&FixtureSpec::default());
    let p = d.path().join("missing.gguf");
    rewrite_gguf(&f.gguf, &p, |_, ts| {
        ts.retain(|t| t.name != "blk.1.ffn_up.weight")
    });
    assert_names(
        &load_err(&p),
        &p,
        &["missing tensor", "blk.1.ffn_up.weight"],
    );
    // HF: drop a tensor from the safetensors file.
    let hf = copy_dir(&f.hf_dir, &d.path().join("hf-missing"));
    let src = model::open(&f.hf_dir).unwrap();
    let names = f.config.tensor_names();
    let kept: Vec<(String, recforge::tensor::HostTensor)> = names
        .iter()
        .filter(|n| !n.contains("layers.0.mlp.down_proj"))
        .map(|n| (n.clone(), src.tensor(n).unwrap()))
        .collect();
    let refs: Vec<(String, &recforge::tensor::HostTensor)> =
        kept.iter().map(|(n, t)| (n.clone(), t)).collect();
    std::fs::write(
        hf.join("model.safetensors"),
        model::convert::safetensors_bytes(&refs),
    )
    .unwrap();
    assert_names(
        &load_err(&hf),
        &hf,
        &["missing tensor", "model.layers.0.mlp.down_proj.weight"],
    );
}

#[test]
fn shape_disagrees_with_config() {
    let (d, f) = fixture(&FixtureSpec::default());
    let hf = copy_dir(&f.hf_dir, &d.path().join("hf-shape"));
    edit_config(&hf, |c| c["intermediate_size"] = serde_json::json!(128));
    let e = load_err(&hf);
    assert!(
        e.contains("model.safetensors")
            && e.contains("mlp.gate_proj.weight")
            && e.contains("[96, 64]")
            && e.contains("[128, 64]"),
        "{e}"
    );
    // GGUF: metadata says 3 KV heads where the tensors have 2.
    let p = d.path().join("kvheads.gguf");
    rewrite_gguf(&f.gguf, &p, |md, _| {
        for (k, v) in md.iter_mut() {
            if k == "llama.attention.head_count_kv" {
                *v = Value::U32(1);
            }
        }
    });
    assert_names(&load_err(&p), &p, &["attn_k", "shape"]);
}

#[test]
fn unknown_architecture() {
    let (d, f) = fixture(&FixtureSpec::default());
    let hf = copy_dir(&f.hf_dir, &d.path().join("hf-neox"));
    edit_config(&hf, |c| {
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"])
    });
    assert_names(
        &load_err(&hf),
        &hf.join("config.json"),
        &["unsupported", "GPTNeoXForCausalLM"],
    );
    let p = d.path().join("gpt2.gguf");
    rewrite_gguf(&f.gguf, &p, |md, _| {
        for (k, v) in md.iter_mut() {
            if k == "general.architecture" {
                *v = Value::String("gpt2".into());
            }
        }
    });
    assert_names(&load_err(&p), &p, &["unsupported", "architecture 'gpt2'"]);
}

/// What LLaMA does not have — linear biases, an activation other than SiLU — is refused, not
/// loaded with the biases dropped or the activation replaced.
#[test]
fn biases_and_other_activations_are_refused() {
    let (d, f) = fixture(&FixtureSpec::default());
    for (name, field, value, says) in [
        (
            "attn-bias",
            "attention_bias",
            serde_json::json!(true),
            "attention_bias",
        ),
        ("mlp-bias", "mlp_bias", serde_json::json!(true), "mlp_bias"),
        (
            "gelu",
            "hidden_act",
            serde_json::json!("gelu"),
            "hidden_act 'gelu'",
        ),
    ] {
        let hf = copy_dir(&f.hf_dir, &d.path().join(name));
        edit_config(&hf, |c| c[field] = value);
        assert_names(
            &load_err(&hf),
            &hf.join("config.json"),
            &["unsupported", says],
        );
    }
    // Saying what LLaMA is, is fine.
    let hf = copy_dir(&f.hf_dir, &d.path().join("plain"));
    edit_config(&hf, |c| {
        c["attention_bias"] = serde_json::json!(false);
        c["mlp_bias"] = serde_json::json!(false);
        c["hidden_act"] = serde_json::json!("silu");
    });
    let be = Cpu::new();
    let src = model::open(&hf).unwrap();
    Llama::load(src.as_ref(), &be, LoadOptions::default()).unwrap();
    // A bias tensor in the file.
    let p = d.path().join("bias.gguf");
    rewrite_gguf(&f.gguf, &p, |_, ts| {
        ts.push(WriteTensor {
            name: "blk.0.attn_q.bias".into(),
            shape: vec![64],
            type_id: 0,
            bytes: vec![0; 64 * 4],
        })
    });
    assert_names(&load_err(&p), &p, &["unsupported", "blk.0.attn_q.bias"]);
}

#[test]
fn missing_tokenizer() {
    let (d, f) = fixture(&FixtureSpec::default());
    let hf = copy_dir(&f.hf_dir, &d.path().join("hf-notok"));
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    assert_names(
        &load_err(&hf),
        &hf.join("tokenizer.json"),
        &["No such file"],
    );
    let p = d.path().join("notok.gguf");
    rewrite_gguf(&f.gguf, &p, |md, _| {
        md.retain(|(k, _)| !k.starts_with("tokenizer.ggml"))
    });
    assert_names(&load_err(&p), &p, &["no tokenizer"]);
    // A tokenizer.json that is not JSON.
    let hf = copy_dir(&f.hf_dir, &d.path().join("hf-badtok"));
    std::fs::write(hf.join("tokenizer.json"), "{ not json").unwrap();
    assert_names(
        &load_err(&hf),
        &hf.join("tokenizer.json"),
        &["invalid tokenizer"],
    );
}

#[test]
fn truncated_safetensors_and_bad_config() {
    let (d, f) = fixture(&FixtureSpec::default());
    let hf = copy_dir(&f.hf_dir, &d.path().join("hf-cut"));
    let st = hf.join("model.safetensors");
    let b = std::fs::read(&st).unwrap();
    std::fs::write(&st, &b[..b.len() - 100]).unwrap();
    assert_names(&load_err(&hf), &st, &["safetensors"]);
    let hf = copy_dir(&f.hf_dir, &d.path().join("hf-cfg"));
    std::fs::write(
        hf.join("config.json"),
        "{\"architectures\": [\"LlamaForCausalLM\"]}",
    )
    .unwrap();
    assert_names(&load_err(&hf), &hf.join("config.json"), &["hidden_size"]);
}

fn copy_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(&p, c.to_string()).unwrap();
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(common::recforge_bin())
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn cli_reports_errors_without_panicking() {
    let (d, f) = fixture(&FixtureSpec::default());
    let bytes = std::fs::read(&f.gguf).unwrap();
    let cut = d.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let missing = d.path().join("nope.gguf");
    let out_exists = d.path().to_path_buf();
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            vec![
                "generate".into(),
                "--model".into(),
                cut.display().to_string(),
                "--prompt".into(),
                "hi".into(),
                "--device".into(),
                "cpu".into(),
            ],
            vec![cut.display().to_string(), "truncated".into()],
        ),
        (
            vec![
                "info".into(),
                "--model".into(),
                missing.display().to_string(),
            ],
            vec![missing.display().to_string(), "No such file".into()],
        ),
        (
            vec![
                "convert".into(),
                "--model".into(),
                f.gguf.display().to_string(),
                "--out".into(),
                out_exists.display().to_string(),
            ],
            vec!["already exists".into()],
        ),
        (
            // Below a file: refused before any tensor is converted.
            vec![
                "convert".into(),
                "--model".into(),
                f.gguf.display().to_string(),
                "--out".into(),
                f.gguf.join("hf").display().to_string(),
            ],
            vec!["nothing can be written below it".into()],
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                f.gguf.display().to_string(),
                "--prompt".into(),
                "hi".into(),
                "--device".into(),
                "tpu".into(),
            ],
            vec!["tpu".into()],
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                f.gguf.display().to_string(),
                "--prompt".into(),
                "hi".into(),
                "--temperature".into(),
                "-1".into(),
            ],
            vec!["temperature".into(), "-1".into()],
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                f.gguf.display().to_string(),
                "--prompt".into(),
                "hi".into(),
                "--sampling".into(),
                "nucleus".into(),
            ],
            vec!["nucleus".into(), "itrek".into()],
        ),
        (
            // Batched generation's counts and its --out are refused before the model or the
            // prompts are read (neither exists).
            vec![
                "generate".into(),
                "--model".into(),
                missing.display().to_string(),
                "--prompts".into(),
                missing.with_extension("txt").display().to_string(),
                "--batch".into(),
                "0".into(),
            ],
            vec!["max batch 0".into(), "at least 1".into()],
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                missing.display().to_string(),
                "--prompts".into(),
                missing.with_extension("txt").display().to_string(),
                "--out".into(),
                out_exists.display().to_string(),
            ],
            vec!["--out".into(), "is a folder".into()],
        ),
        (
            // --out (like every batching option) belongs to --prompts: with one --prompt it
            // would be ignored, the completion going to stdout instead of the file asked for.
            vec![
                "generate".into(),
                "--model".into(),
                f.gguf.display().to_string(),
                "--prompt".into(),
                "hi".into(),
                "--out".into(),
                d.path().join("c.jsonl").display().to_string(),
            ],
            vec![
                "--out".into(),
                "cannot be used with".into(),
                "--prompt".into(),
            ],
        ),
        (
            // A negative threshold would turn LLM.int8's outlier path off without a word.
            vec![
                "generate".into(),
                "--model".into(),
                f.gguf.display().to_string(),
                "--prompt".into(),
                "hi".into(),
                "--device".into(),
                "cpu".into(),
                "--outlier-threshold=-1".into(),
            ],
            vec!["outlier threshold".into(), "-1".into()],
        ),
        (
            vec![
                "rec".into(),
                "eval".into(),
                "--model".into(),
                f.gguf.display().to_string(),
                "--data".into(),
                missing.with_extension("json").display().to_string(),
                "--batch".into(),
                "0".into(),
            ],
            vec!["--batch".into(), "at least 1".into()],
        ),
        (
            vec![
                "rec".into(),
                "eval".into(),
                "--model".into(),
                f.gguf.display().to_string(),
                "--data".into(),
                missing.with_extension("json").display().to_string(),
                "--device".into(),
                "cpu".into(),
            ],
            vec!["nope.json".into(), "No such file".into()],
        ),
    ];
    for (args, words) in cases {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (ok, _, err) = cli(&a);
        assert!(!ok, "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        for w in words {
            assert!(err.contains(&w), "{args:?}: stderr lacks '{w}': {err}");
        }
        // Each cause is said once (an I/O error's text is not repeated by the chain).
        assert!(
            err.matches("No such file").count() <= 1,
            "{args:?}: repeated cause: {err}"
        );
        if args[0] == "convert" {
            assert!(
                !err.contains("converting:"),
                "{args:?}: converted first: {err}"
            );
        }
        if args.iter().any(|a| a == "--prompts") {
            assert!(!err.contains("nope"), "{args:?}: read a file first: {err}");
        }
    }
}

#[test]
fn cli_generates_and_converts_the_fixture() {
    let (d, f) = fixture(&FixtureSpec::default());
    let (ok, out, err) = cli(&[
        "generate",
        "--model",
        f.gguf.to_str().unwrap(),
        "--prompt",
        "the cat",
        "--raw",
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("decode") && err.contains("tok/s"), "{err}");
    let _ = out;
    // Sampling: the same seed gives the same text; over a few seeds the (random, diffuse)
    // fixture model gives more than one text at temperature 1.
    let sampled = |seed: &str| {
        let (ok, out, err) = cli(&[
            "generate",
            "--model",
            f.gguf.to_str().unwrap(),
            "--prompt",
            "the cat",
            "--raw",
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
            "--temperature",
            "1",
            "--seed",
            seed,
        ]);
        assert!(ok, "{err}");
        out
    };
    assert_eq!(sampled("7"), sampled("7"));
    let texts: std::collections::HashSet<String> =
        ["1", "2", "3", "4"].iter().map(|s| sampled(s)).collect();
    assert!(texts.len() > 1, "four seeds gave one text: {texts:?}");
    let conv = d.path().join("conv");
    let (ok, _, err) = cli(&[
        "convert",
        "--model",
        f.gguf.to_str().unwrap(),
        "--out",
        conv.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&["info", "--model", conv.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("layers 2") && out.contains("kv heads 2") && out.contains("hf safetensors"),
        "{out}"
    );
}

/// The TOTAL line of `recforge plan`'s table, in MiB.
fn total_of(out: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .unwrap_or_else(|| panic!("no TOTAL in {out}"));
    let mut it = line.split_whitespace().rev();
    let (unit, v) = (
        it.next().unwrap(),
        it.next().unwrap().parse::<f64>().unwrap(),
    );
    v * if unit == "GiB" { 1024.0 } else { 1.0 }
}

#[test]
fn cli_plan_reports_fit_and_refuses_what_does_not_fit() {
    let (ok, out, err) = cli(&[
        "plan", "--model", "llama-7b", "--batch", "4", "--seq", "1024", "--budget", "24GiB",
        "--solve",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("fits") && out.contains("largest batch at seq 1024"),
        "{out}"
    );
    assert!(!err.contains("context"), "{err}");
    // A sequence past the model's context (LLaMA-2's 4096) plans, with a note; so does a
    // generation whose prompt + new tokens pass it.
    for args in [
        &["--seq", "5000"][..],
        &["--seq", "4000", "--generate", "200"][..],
    ] {
        let (ok, _, err) =
            cli(&[&["plan", "--model", "llama-7b", "--batch", "1"][..], args].concat());
        assert!(
            ok && err.contains("more than the model's context of 4096"),
            "{args:?}: {err}"
        );
    }
    let (ok, _, err) = cli(&[
        "plan", "--model", "llama-7b", "--batch", "64", "--seq", "4096",
    ]);
    assert!(!ok);
    assert!(
        err.contains("would fit with --batch") && !err.contains("panicked"),
        "{err}"
    );
    // auto (the default) keeps every layer it can within the budget less 1 GiB; "on"
    // recomputes all 32 and needs less; "off" does not fit 24 GiB at this size and says so.
    let base = [
        "plan", "--model", "llama-7b", "--batch", "4", "--seq", "1024",
    ];
    let (ok, auto, err) = cli(&base);
    assert!(ok, "{err}");
    assert!(
        auto.contains("checkpointing auto: ") && auto.contains(" of 32 layers"),
        "{auto}"
    );
    let (ok, on, err) = cli(&[&base[..], &["--checkpointing", "on"]].concat());
    assert!(ok, "{err}");
    assert!(on.contains("checkpointing on (all 32 layers)"), "{on}");
    assert!(
        total_of(&on) < total_of(&auto),
        "{on}
{auto}"
    );
    assert!(total_of(&auto) <= 23.0 * 1024.0, "{auto}");
    // Without checkpointing, 4 × 1024 fits 24 GiB since the step stopped keeping the o/down
    // projection outputs (23.6 GiB); twice the batch does not.
    let (ok, _, err) = cli(&[
        "plan",
        "--model",
        "llama-7b",
        "--batch",
        "8",
        "--seq",
        "1024",
        "--checkpointing",
        "off",
    ]);
    assert!(!ok);
    assert!(err.contains("--checkpointing on"), "{err}");
    let (ok, _, err) = cli(&[&base[..], &["--checkpointing", "33"]].concat());
    assert!(
        !ok && err.contains("33 layers, but the model has 32"),
        "{err}"
    );
    let (ok, _, err) = cli(&[&base[..], &["--checkpointing", "maybe"]].concat());
    assert!(
        !ok && err.contains("expected on, off, auto or a number of layers"),
        "{err}"
    );
    // rec prune's pass: the training step's table without AdamW's moments, so never more.
    let (ok, prune, err) = cli(&[&base[..], &["--prune"]].concat());
    assert!(ok, "{err}");
    assert!(
        prune.starts_with("pruning plan (rec prune's scoring pass): llama-7b, batch 4 × seq 1024")
            && prune.contains("AdamW m, v: not kept (empty tensors)")
            && !auto.contains("not kept"),
        "{prune}"
    );
    assert!(total_of(&prune) < total_of(&auto), "{prune}\n{auto}");
    for other in ["--score", "--checkpointing"] {
        let mut args = [&base[..], &["--prune", other]].concat();
        if other == "--checkpointing" {
            args.push("on");
        }
        let (ok, _, err) = cli(&args);
        assert!(!ok && err.contains("cannot be used with"), "{other}: {err}");
    }
    // A generation plan counts an adapter only with --adapter (and then its rank and targets).
    let gen = [
        "plan",
        "--model",
        "llama-7b",
        "--seq",
        "512",
        "--generate",
        "300",
    ];
    let (ok, plain, err) = cli(&gen);
    assert!(ok && !plain.contains("lora"), "{plain}{err}");
    let (ok, with, err) =
        cli(&[&gen[..], &["--adapter", "--r", "16", "--targets", "q,v"]].concat());
    assert!(
        ok && with.contains("A, B for q,v, r=16, 32 layers (f32; 6 empty tensors a block each)"),
        "{with}{err}"
    );
    assert!(total_of(&with) > total_of(&plain), "{with}");
    let (ok, _, err) = cli(&["plan", "--adapter"]);
    assert!(!ok && err.contains("--generate"), "{err}");
    let (ok, _, err) = cli(&["plan", "--model", "llama-70b"]);
    assert!(
        !ok && err.contains("not a named shape (llama-7b, llama-13b, smollm2-135m)"),
        "{err}"
    );
    let (ok, _, err) = cli(&["plan", "--budget", "lots"]);
    assert!(!ok && err.contains("--budget 'lots'"), "{err}");
    let (ok, _, err) = cli(&["plan", "--targets", "q,zz"]);
    assert!(!ok && err.contains("unknown LoRA target 'zz'"), "{err}");
    let (ok, _, err) = cli(&["plan", "--model", "llama-7b", "--lora-r", "0"]);
    assert!(!ok && err.contains("rank r must be at least 1"), "{err}");
    let (ok, _, err) = cli(&["plan", "--model", "llama-7b", "--score", "--lora-r", "0"]);
    assert!(!ok && err.contains("rank r must be at least 1"), "{err}");
    let (ok, _, err) = cli(&["plan", "--model", "llama-7b", "--seq", "1"]);
    assert!(!ok && err.contains("--seq must be at least 2"), "{err}");
    let (ok, _, err) = cli(&["plan", "--model", "llama-7b", "--score", "--seq", "1"]);
    assert!(ok, "a 1-token prompt can be scored: {err}");
    // Over budget at one prompt a pass: the fix is a shorter prompt, not a smaller batch.
    for (batch, fix) in [("1", "a shorter --seq"), ("8", "a smaller --batch")] {
        let (ok, _, err) = cli(&[
            "plan", "--model", "llama-7b", "--score", "--seq", "200000", "--batch", batch,
        ]);
        assert!(!ok && err.contains(fix), "--batch {batch}: {err}");
    }
    let (ok, _, err) = cli(&["plan", "--model", "llama-7b", "--targets", ","]);
    assert!(!ok && err.contains("at least one target"), "{err}");
    // The plan takes PEFT's module names as `rec train` does, and refuses a module named
    // twice under either name.
    let (ok, peft, err) = cli(&["plan", "--model", "llama-7b", "--targets", "v_proj,q_proj"]);
    assert!(ok, "{err}");
    let (_, short, _) = cli(&["plan", "--model", "llama-7b", "--targets", "q,v"]);
    assert_eq!(peft, short);
    let (ok, _, err) = cli(&["plan", "--model", "llama-7b", "--targets", "q,q_proj"]);
    assert!(!ok && err.contains("'q' is listed twice"), "{err}");
}

#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    // `recforge kernels | head -1`: the reader goes away. The binaries restore the default
    // SIGPIPE, so the process ends as other tools do instead of panicking in a print ("failed
    // printing to stdout: Broken pipe"). The read end is closed before the spawn, so the first
    // write must fail: closing it after the spawn raced the child, which could print its whole
    // (small) output into the pipe buffer first and exit 0. CI saw exactly that once.
    use std::process::Stdio;
    for args in [&["kernels"][..], &["plan", "--model", "llama-7b"][..]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let child = Command::new(common::recforge_bin())
            .args(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                o.status.signal(),
                Some(13),
                "{args:?}: {:?} {err}",
                o.status
            );
        }
    }
}

/// A GGUF header whose counts are as large as the (sparse, 64 GiB) file could hold in bytes
/// but far more than memory could hold as parsed entries: refused with a clear error before
/// anything is reserved for them (a reservation that size aborts the process).
#[test]
fn counts_beyond_memory_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let size = 1u64 << 36;
    let header = |n_tensors: u64, kv: &[u8]| {
        let mut b = gguf::MAGIC.to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&u64::from(!kv.is_empty()).to_le_bytes());
        b.extend_from_slice(kv);
        b
    };
    let array = |item_type: u32, n: u64| {
        let mut kv = 1u64.to_le_bytes().to_vec();
        kv.push(b'k');
        kv.extend_from_slice(&9u32.to_le_bytes());
        kv.extend_from_slice(&item_type.to_le_bytes());
        kv.extend_from_slice(&n.to_le_bytes());
        kv
    };
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("tensors.gguf", header(size / 40, &[]), "has 0 dimensions"),
        ("u8s.gguf", header(0, &array(0, size / 2)), "reads at most"),
        (
            "strings.gguf",
            header(0, &array(8, size / 4)),
            "claims 17179869184 entries",
        ),
    ];
    for (name, bytes, says) in cases {
        let p = d.path().join(name);
        let f = std::fs::File::create(&p).unwrap();
        std::io::Write::write_all(&mut &f, &bytes).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let e = match GgufFile::open(&p) {
            Ok(_) => panic!("{name} opened"),
            Err(e) => e.to_string(),
        };
        assert_names(&e, &p, &[says]);
    }
}

#[test]
fn cli_plans_batched_generation() {
    let base = [
        "plan",
        "--model",
        "llama-7b",
        "--generate",
        "300",
        "--prompts",
        "64",
        "--seq",
        "320",
        "--prefix",
        "71",
    ];
    let (ok, b32, err) = cli(&[&base[..], &["--batch", "32", "--solve"]].concat());
    assert!(ok, "{err}");
    assert!(
        b32.contains("64 prompts of 320 tokens (71 shared)") && b32.contains("32 decoded together"),
        "{b32}"
    );
    assert!(
        b32.contains("(paged)") && b32.contains("largest step"),
        "{b32}"
    );
    let most: usize = b32
        .lines()
        .find_map(|l| l.strip_prefix("most prompts decoded together: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no --solve line: {b32}"));
    assert!((32..64).contains(&most), "{b32}");
    // More sequences at a time: a larger paged cache.
    let (ok, b8, err) = cli(&[&base[..], &["--batch", "8"]].concat());
    assert!(ok, "{err}");
    assert!(total_of(&b8) < total_of(&b32), "{b8}\n{b32}");
    // Smaller prefill groups: a smaller largest step.
    let (ok, small, err) =
        cli(&[&base[..], &["--batch", "32", "--prefill-tokens", "256"]].concat());
    assert!(ok, "{err}");
    assert!(total_of(&small) < total_of(&b32), "{small}\n{b32}");
    let (ok, _, err) = cli(&[&base[..], &["--prefill-tokens", "0"]].concat());
    assert!(!ok && err.contains("--prefill-tokens 0"), "{err}");
    // Past what --solve said fits: refused, with the fix.
    let over = (most + 1).to_string();
    let (ok, _, err) = cli(&[&base[..], &["--batch", &over]].concat());
    assert!(!ok && err.contains("a smaller --batch"), "{err}");
    let (ok, _, err) = cli(&["plan", "--prefix", "8"]);
    assert!(
        !ok && err.contains("--prefix goes with --score or --prompts"),
        "{err}"
    );
    let (ok, _, err) = cli(&[&base[..7], &["--seq", "71", "--prefix", "71"]].concat());
    assert!(
        !ok && err.contains("must leave every prompt a token"),
        "{err}"
    );
    let (ok, _, err) = cli(&["plan", "--generate", "10", "--prompts", "0"]);
    assert!(!ok && err.contains("--prompts 0"), "{err}");
    let (ok, _, err) = cli(&["plan", "--prompts", "3"]);
    assert!(!ok && err.contains("--generate"), "{err}");
}

/// Sizes no run could hold — from the command line or a config file — are refused by name
/// before anything is allocated: each would otherwise overflow a byte count or a slot id (a
/// plan saying "fits", a capacity-overflow panic, an allocation abort) or never finish.
#[test]
fn absurd_sizes_are_refused_by_name() {
    let (d, f) = fixture(&FixtureSpec::default());
    let gguf = f.gguf.to_str().unwrap();
    let huge = u64::MAX.to_string();
    let prompts = d.path().join("p.txt");
    std::fs::write(&prompts, "\"one\"\n\"two\"\n").unwrap();
    let p = prompts.to_str().unwrap();
    let plan = ["plan", "--model", "llama-7b"];
    let gen = ["generate", "--model", gguf, "--device", "cpu"];
    let train = ["rec", "train", "--data", "absent.json", "--out", "o"];
    let batch = [&gen[..], &["--prompts", p]].concat();
    let one = [&gen[..], &["--prompt", "x"]].concat();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            [&plan[..], &["--batch", &huge]].concat(),
            "batch 18446744073709551615",
        ),
        ([&plan[..], &["--seq", &huge]].concat(), "sequence length"),
        ([&plan[..], &["--lora-r", &huge]].concat(), "LoRA rank"),
        (
            [&plan[..], &["--generate", &huge, "--seq", "512"]].concat(),
            "new tokens",
        ),
        (
            [&plan[..], &["--score", "--batch", &huge]].concat(),
            "prompts a batch",
        ),
        (
            [
                &plan[..],
                &[
                    "--generate",
                    "300",
                    "--prompts",
                    "1000000000",
                    "--seq",
                    "512",
                ],
            ]
            .concat(),
            "--prompts 1000000000",
        ),
        (
            [&train[..], &["--accum", &huge]].concat(),
            "gradient accumulation",
        ),
        ([&train[..], &["--batch", &huge]].concat(), "batch size"),
        (
            [&batch[..], &["--kv-blocks", "1000000000"]].concat(),
            "at most 1073741824 tokens",
        ),
        (
            [&batch[..], &["--block-size", &huge]].concat(),
            "at most 1073741824 tokens",
        ),
        // 2^26 blocks of 16: the largest cache, far more than this host holds.
        (
            [&batch[..], &["--kv-blocks", "67108864"]].concat(),
            "of host memory",
        ),
        (
            [&one[..], &["--max-new-tokens", &huge]].concat(),
            "exceed the model's context",
        ),
        (
            [&one[..], &["--temperature", "1e-45"]].concat(),
            "too small",
        ),
    ];
    for (args, says) in cases {
        let (ok, _, err) = cli(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // A config with a corrupt layer count: refused by the loader, not planned for an hour.
    let hf = copy_dir(&f.hf_dir, &d.path().join("hf-layers"));
    edit_config(&hf, |c| {
        c["num_hidden_layers"] = serde_json::json!(1u64 << 50)
    });
    let (ok, _, err) = cli(&["plan", "--model", hf.to_str().unwrap()]);
    assert!(!ok && err.contains("num_hidden_layers"), "{err}");
    let o = Command::new(common::bench_train_bin())
        .args([
            "--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", &huge,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--warmup"), "{err}");
}

#[test]
fn solving_a_many_prompt_generation_plan_bisects() {
    // The largest batch that fits does not depend on how many more prompts wait: the same
    // answer for 64 prompts and a million (whose plan would take hours one batch at a time).
    let solve = |n: &str| {
        let (ok, out, err) = cli(&[
            "plan",
            "--model",
            "llama-7b",
            "--generate",
            "300",
            "--prompts",
            n,
            "--seq",
            "320",
            "--prefix",
            "71",
            "--solve",
        ]);
        assert!(ok, "{err}");
        out.lines()
            .find_map(|l| l.strip_prefix("most prompts decoded together: "))
            .and_then(|l| l.split(' ').next())
            .and_then(|x| x.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no --solve line: {out}"))
    };
    let few = solve("64");
    assert!((32..64).contains(&few), "{few}");
    assert_eq!(solve("1000000"), few);
}

#[test]
fn solving_stops_at_what_a_plan_takes() {
    // A budget that holds more than any plan takes: --solve answers the limit (it used to probe
    // past it and fail with the plan's refusal).
    let (ok, out, err) = cli(&[
        "plan",
        "--model",
        "smollm2-135m",
        "--budget",
        "1000GiB",
        "--seq",
        "16",
        "--solve",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("largest batch at seq 16: 65536;"), "{out}");
    let (ok, out, err) = cli(&[
        "plan",
        "--model",
        "smollm2-135m",
        "--budget",
        "1000GiB",
        "--score",
        "--seq",
        "16",
        "--solve",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("most prompts of 16 tokens a pass: 65536"),
        "{out}"
    );
}

/// The README's memory-plan figures (issue 6 asks for the 7B numbers there) are what
/// `recforge plan` prints today: each figure is read from the command's output and must appear
/// in the README's sentence about it (whitespace-normalized), so a change to the plan that
/// moves a number fails here until the README says the new one.
#[test]
fn readme_plan_figures_are_what_recforge_plan_prints() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let readme = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    let plan = |args: &[&str]| -> String {
        let mut all = vec!["plan"];
        if !args.contains(&"--model") {
            all.extend(["--model", "llama-7b"]);
        }
        all.extend(args);
        let (ok, out, err) = cli(&all);
        assert!(ok, "{args:?}: {err}");
        out
    };
    // "22.66 GiB" from the TOTAL row; "3 of 32 layers" from the header.
    let total = |out: &str| -> String {
        let line = out.lines().find(|l| l.starts_with("TOTAL")).unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        w[w.len() - 2..].join(" ")
    };
    let layers = |out: &str| -> String {
        let head = out.lines().next().unwrap();
        let at = head.find("auto: ").unwrap() + "auto: ".len();
        head[at..].trim().to_string()
    };
    let after = |out: &str, key: &str| -> String {
        let line = out.lines().find(|l| l.contains(key)).unwrap();
        line[line.find(key).unwrap() + key.len()..].to_string()
    };
    let mut want = vec![];
    let on = plan(&["--checkpointing", "on", "--solve"]);
    let solved = after(&on, "largest batch at seq 1024: ");
    let (b, rest) = solved.split_once(';').unwrap();
    let q = after(rest, "largest seq at batch 4: ");
    let q = q.split_whitespace().next().unwrap();
    want.push(format!("needs {} with every layer recomputing", total(&on)));
    want.push(format!(
        "the largest batch at 1024 tokens is then {b}, the longest sequence at batch 4 is {q}."
    ));
    let off = plan(&["--checkpointing", "off"]);
    want.push(format!(
        "(`--checkpointing off`) needs {} and fits",
        total(&off)
    ));
    let auto = plan(&[]);
    want.push(format!("24 GiB, {}, {},", layers(&auto), total(&auto)));
    let big = plan(&["--model", "llama-13b"]);
    want.push(format!(
        "LLaMA-13B at the same size: {}, {}.",
        layers(&big),
        total(&big)
    ));
    let score = plan(&[
        "--score",
        "--batch",
        "8",
        "--seq",
        "320",
        "--prefix",
        "71",
        "--lora-r",
        "8",
        "--targets",
        "q,v",
        "--solve",
    ]);
    want.push(format!("with r 8 on q,v: {},", total(&score)));
    want.push(format!(
        "{} prompts of 320 tokens a scoring pass",
        after(&score, "most prompts of 320 tokens a pass: ")
    ));
    let generate = plan(&["--generate", "300", "--seq", "512", "--solve"]);
    want.push(format!("300 new tokens: {},", total(&generate)));
    let most = after(&generate, "most new tokens after a 512-token prompt: ");
    let (n, rest) = most.split_once(' ').unwrap();
    let held = after(rest, "would hold ");
    want.push(format!(
        "({n} new tokens after 512; the 24 GiB would hold {}",
        held.trim_end_matches(')')
    ));
    let with = plan(&[
        "--generate",
        "300",
        "--seq",
        "512",
        "--adapter",
        "--r",
        "16",
        "--targets",
        "q,v",
    ]);
    want.push(format!("({} with an r 16 adapter on q, v)", total(&with)));
    let prune = plan(&["--prune"]);
    want.push(format!(
        "{} at 7B 4 × 1024 ({} recomputing)",
        total(&prune),
        layers(&prune)
    ));
    for w in want {
        assert!(readme.contains(&w), "README.md does not say: {w}");
    }
}
