//! The recommendation commands end to end on the tiny fixture model: `rec train` writes a PEFT
//! adapter, `rec eval` scores with and without it, `merge` folds it into the base, and bad
//! input is a clear error. (TALLRec data from the real MovieLens files: tests/rec_data.rs.)

mod common;

use std::path::Path;
use std::process::Command;

use common::fixture;
use recforge::model::fixture::FixtureSpec;

fn cli(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(common::recforge_bin())
        .args(args)
        .output()
        .expect("run recforge");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Short Yes/No samples whose answer is written in the input, so a tiny model can learn them.
fn write_samples(path: &Path, n: usize) {
    let v: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let yes = i % 2 == 0;
            serde_json::json!({
                "instruction": "Say it.",
                "input": if yes { "yes" } else { "no" },
                "output": if yes { "Yes." } else { "No." },
            })
        })
        .collect();
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// (log-loss, accuracy) from an eval JSON.
fn metrics_of(json: &Path) -> (f64, f64) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (
        v["log_loss"].as_f64().expect("log_loss in the eval JSON"),
        v["accuracy"].as_f64().expect("accuracy in the eval JSON"),
    )
}

#[test]
fn train_eval_merge_on_the_fixture() {
    let (d, f) = fixture(&FixtureSpec::default());
    let dir = d.path();
    let model = f.hf_dir.to_str().unwrap();
    let data = dir.join("data.json");
    write_samples(&data, 8);
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();

    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        model,
        "--data",
        &p("data.json"),
        "--device",
        "cpu",
        "--json",
        &p("before.json"),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&[
        "rec",
        "train",
        "--model",
        model,
        "--data",
        &p("data.json"),
        "--out",
        &p("adapter"),
        "--device",
        "cpu",
        "--steps",
        "12",
        "--batch",
        "4",
        "--accum",
        "1",
        "--lr",
        "1e-2",
        "--warmup",
        "1",
        "--cutoff",
        "256",
        "--targets",
        "q,k,v,o,gate,up,down",
        "--checkpoint-dir",
        &p("ckpt"),
        "--checkpoint-every",
        "6",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("update 12/12"), "no progress lines: {err}");
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "ckpt/trainer_state.json",
        "ckpt/optimizer.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let (ok, out, err) = cli(&[
        "rec",
        "eval",
        "--model",
        model,
        "--data",
        &p("data.json"),
        "--adapter",
        &p("adapter"),
        "--device",
        "cpu",
        "--json",
        &p("after.json"),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("AUC"), "{out}");
    // Two distinct prompts: a random model ranks them one way or the other (AUC says little),
    // but its probabilities are far from the labels; training must make them right.
    let before = metrics_of(&dir.join("before.json"));
    let after = metrics_of(&dir.join("after.json"));
    // Each file says what it scored.
    let what = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    let (b, a) = (what("before.json"), what("after.json"));
    assert_eq!(b["model"], model);
    assert!(b["adapter"].is_null(), "{b}");
    assert_eq!(a["adapter"], p("adapter"));
    assert_eq!(
        (&a["linears"], &a["prefix_sharing"]),
        (&"int8".into(), &true.into())
    );
    assert!(a["batch"].as_u64().is_some() && a["limit"].is_null(), "{a}");
    eprintln!("fixture (log-loss, accuracy) before {before:?}, after {after:?}");
    assert!(
        after.0 < 0.5 * before.0 && after.1 == 1.0,
        "training did not learn the labels: {before:?} → {after:?}"
    );
    // The same adapter over f32 linears (the reference for int8's effect): learnt as well.
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        model,
        "--data",
        &p("data.json"),
        "--adapter",
        &p("adapter"),
        "--device",
        "cpu",
        "--f32",
        "--json",
        &p("after_f32.json"),
    ]);
    assert!(ok && err.contains("f32 linears"), "{err}");
    let after_f32 = metrics_of(&dir.join("after_f32.json"));
    assert!(
        after_f32.0 < 0.5 * before.0 && after_f32.1 == 1.0,
        "f32: {after_f32:?} (int8 {after:?})"
    );
    assert_ne!(after_f32.0, after.0, "--f32 changed nothing");
    // One sample is one class: no AUC, but the scores and the other metrics are reported.
    let (ok, out, err) = cli(&[
        "rec",
        "eval",
        "--model",
        model,
        "--data",
        &p("data.json"),
        "--limit",
        "1",
        "--device",
        "cpu",
        "--json",
        &p("one.json"),
    ]);
    assert!(ok && out.contains("AUC n/a (every label is "), "{out}{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("one.json")).unwrap()).unwrap();
    assert!(
        v["auc"].is_null() && v["p_yes"].as_array().map(Vec::len) == Some(1),
        "{v}"
    );

    // generate --adapter: the trained adapter applied unmerged changes what the model says;
    // an adapter for another model shape is refused.
    let gen = |adapter: Option<&str>| {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "the movie was",
            "--raw",
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        cli(&args)
    };
    let (ok, base_text, err) = gen(None);
    assert!(ok, "{err}");
    let adapter_dir = p("adapter");
    let (ok, tuned_text, err) = gen(Some(&adapter_dir));
    assert!(
        ok && err.contains(&format!("adapter {adapter_dir}: r ")),
        "{err}"
    );
    assert_ne!(base_text, tuned_text, "the adapter changed nothing");

    // Resume from the checkpoint (taken at update 12) with more updates.
    let (ok, _, err) = cli(&[
        "rec",
        "train",
        "--model",
        model,
        "--data",
        &p("data.json"),
        "--out",
        &p("adapter2"),
        "--device",
        "cpu",
        "--resume",
        &p("ckpt"),
        "--steps",
        "14",
        "--cutoff",
        "256",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("resumed from") && err.contains("update 14/14"),
        "{err}"
    );

    // Merge: the merged folder loads and scores like base + adapter (up to int8 requantization).
    let (ok, _, err) = cli(&[
        "merge",
        "--model",
        model,
        "--adapter",
        &p("adapter"),
        "--out",
        &p("merged"),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        &p("merged"),
        "--data",
        &p("data.json"),
        "--device",
        "cpu",
        "--json",
        &p("merged.json"),
    ]);
    assert!(ok, "{err}");
    let merged = metrics_of(&dir.join("merged.json"));
    assert!(
        merged.1 == 1.0 && merged.0 < 0.5 * before.0,
        "the merged model lost what the adapter learned: {merged:?}"
    );
    let (ok, _, err) = cli(&[
        "merge",
        "--model",
        model,
        "--adapter",
        &p("adapter"),
        "--out",
        &p("merged"),
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");
}

#[test]
fn rec_commands_report_bad_input() {
    let (d, f) = fixture(&FixtureSpec::default());
    let dir = d.path();
    let model = f.hf_dir.to_str().unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    // A missing data file is named.
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        model,
        "--data",
        &p("nope.json"),
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("nope.json"), "{err}");
    // Not a list of samples.
    std::fs::write(dir.join("bad.json"), "{\"a\": 1}").unwrap();
    let (ok, _, err) = cli(&[
        "rec",
        "train",
        "--model",
        model,
        "--data",
        &p("bad.json"),
        "--out",
        &p("a"),
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("bad.json"), "{err}");
    // Unknown preset, unknown target, bad split.
    write_samples(&dir.join("data.json"), 4);
    let (ok, _, err) = cli(&[
        "rec",
        "train",
        "--model",
        model,
        "--data",
        &p("data.json"),
        "--out",
        &p("a"),
        "--preset",
        "fast",
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("unknown preset"), "{err}");
    for (targets, want) in [
        ("q,zz", "unknown LoRA target"),
        ("q,v,q", "'q' is listed twice"),
    ] {
        let (ok, _, err) = cli(&[
            "rec",
            "train",
            "--model",
            model,
            "--data",
            &p("data.json"),
            "--out",
            &p("a"),
            "--targets",
            targets,
            "--device",
            "cpu",
        ]);
        assert!(!ok && err.contains(want), "{err}");
    }
    // A label that is neither answer is named with its sample, before the model loads (the
    // model path does not exist).
    std::fs::write(
        dir.join("maybe.json"),
        r#"[{"instruction": "i", "input": "a", "output": "Yes."},
            {"instruction": "i", "input": "b", "output": "Maybe."}]"#,
    )
    .unwrap();
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        &p("no-model"),
        "--data",
        &p("maybe.json"),
        "--device",
        "cpu",
    ]);
    assert!(
        !ok && err.contains("maybe.json")
            && err.contains("sample 1: the output is \"Maybe.\"")
            && !err.contains("no-model"),
        "{err}"
    );
    // Bad numbers (NaN included) are refused before the model or the data is read: the data
    // file does not exist, and the error is still the option's.
    for (flag, value, says) in [
        ("--weight-decay", "NaN", "weight decay must be"),
        ("--max-grad-norm", "NaN", "max-grad-norm"),
        ("--r", "0", "rank r must be at least 1"),
        ("--lr", "0", "learning rate must be a positive number"),
        ("--alpha", "0", "LoRA alpha must be a positive number"),
        ("--alpha=-16", "", "LoRA alpha must be a positive number"),
        (
            "--checkpoint-every",
            "0",
            "--checkpoint-every must be at least 1",
        ),
        ("--budget", "lots", "--budget 'lots'"),
    ] {
        let missing = p("missing.json");
        let out = p("a");
        let mut args = vec![
            "rec", "train", "--model", model, "--data", &missing, "--out", &out, "--device", "cpu",
            flag,
        ];
        // A negative number is given as --flag=-N (alone, clap reads it as an option).
        if !value.is_empty() {
            args.push(value);
        }
        let (ok, _, err) = cli(&args);
        assert!(
            !ok && err.contains(says) && !err.contains("missing.json"),
            "{flag}: {err}"
        );
    }
    // A checkpoint replaces its folder: a folder of other files is refused up front, and
    // kept.
    let keep = dir.join("notes");
    std::fs::create_dir_all(&keep).unwrap();
    std::fs::write(keep.join("todo.txt"), "mine").unwrap();
    let (ok, _, err) = cli(&[
        "rec",
        "train",
        "--model",
        model,
        "--data",
        &p("missing.json"),
        "--out",
        &p("a"),
        "--checkpoint-dir",
        &keep.display().to_string(),
        "--device",
        "cpu",
    ]);
    assert!(
        !ok && err.contains("not a recforge checkpoint") && !err.contains("missing.json"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(keep.join("todo.txt")).unwrap(),
        "mine"
    );
    // Outputs written at the end of a run are checked before it: an adapter path that is a
    // file (here the notes), or lies below one, and an eval --json that names a folder are
    // refused before the data or the model is read.
    let file = keep.join("todo.txt");
    for (out, says) in [
        (file.clone(), "exists and is not a folder"),
        (
            file.join("adapter"),
            "is not a folder, so nothing can be written below it",
        ),
    ] {
        let (ok, _, err) = cli(&[
            "rec",
            "train",
            "--model",
            model,
            "--data",
            &p("missing.json"),
            "--out",
            &out.display().to_string(),
            "--device",
            "cpu",
        ]);
        assert!(
            !ok && err.contains("--out") && err.contains(says) && !err.contains("missing.json"),
            "{err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    // So is a checkpoint folder below a file: the first save would fail mid-run.
    let (ok, _, err) = cli(&[
        "rec",
        "train",
        "--model",
        model,
        "--data",
        &p("missing.json"),
        "--out",
        &p("a"),
        "--checkpoint-dir",
        &file.join("ckpt").display().to_string(),
        "--device",
        "cpu",
    ]);
    assert!(
        !ok && err.contains("--checkpoint-dir")
            && err.contains("nothing can be written below it")
            && !err.contains("missing.json"),
        "{err}"
    );
    write_samples(&dir.join("few.json"), 2);
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        &p("no-model"),
        "--data",
        &p("few.json"),
        "--json",
        &keep.display().to_string(),
        "--device",
        "cpu",
    ]);
    assert!(
        !ok && err.contains("--json") && err.contains("is a folder") && !err.contains("no-model"),
        "{err}"
    );
    // --json naming the data file, spelt another way, would replace the samples by metrics.
    let before = std::fs::read(dir.join("few.json")).unwrap();
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        model,
        "--data",
        &p("few.json"),
        "--json",
        &dir.join("notes/../few.json").display().to_string(),
        "--device",
        "cpu",
    ]);
    assert!(
        !ok && err.contains("would overwrite the --data file"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("few.json")).unwrap(), before);
    // On the CPU a run the host cannot hold (4096 × 16384 tokens a step: ~100 GB of
    // activations) is refused by the plan before the adapter is allocated, not ended by the OOM
    // killer. (A rank of 10^8 is now refused before the model loads, as past any plan.)
    write_samples(&dir.join("ok.json"), 2);
    let (ok, _, err) = cli(&[
        "rec",
        "train",
        "--model",
        model,
        "--data",
        &p("ok.json"),
        "--out",
        &p("a"),
        "--batch",
        "4096",
        "--cutoff",
        "16384",
        "--device",
        "cpu",
    ]);
    assert!(
        !ok && err.contains("of host memory by the memory plan") && err.contains("--r"),
        "{err}"
    );
    let (ok, _, err) = cli(&[
        "rec",
        "data",
        "tallrec",
        "--split",
        "training",
        "--out",
        &p("x.json"),
    ]);
    assert!(!ok && err.contains("training"), "{err}");
    // An adapter for another model shape is refused before scoring.
    let (d2, f2) = fixture(&FixtureSpec {
        hidden: 128,
        ..FixtureSpec::default()
    });
    let (ok, _, err) = cli(&[
        "rec",
        "train",
        "--model",
        f2.hf_dir.to_str().unwrap(),
        "--data",
        &p("data.json"),
        "--out",
        &p("other"),
        "--steps",
        "1",
        "--cutoff",
        "256",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        model,
        "--data",
        &p("data.json"),
        "--adapter",
        &p("other"),
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("does not fit"), "{err}");
    // A truncated adapter file is named.
    let st = dir.join("other/adapter_model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        f2.hf_dir.to_str().unwrap(),
        "--data",
        &p("data.json"),
        "--adapter",
        &p("other"),
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("adapter_model.safetensors"), "{err}");
    drop(d2);

    // A wrong adapter or checkpoint path fails before the model loads (no "loaded" line).
    let gone = p("no-such-adapter");
    std::fs::write(
        dir.join("per-sample.json"),
        r#"[{"instruction": "i", "input": "x", "output": "Yes.", "adapter": "no-such-adapter"}]"#,
    )
    .unwrap();
    let data = p("data.json");
    let per_sample = p("per-sample.json");
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"hi\", \"adapter\": \"no-such-adapter\"}\n",
    )
    .unwrap();
    let prompts = prompts.to_str().unwrap().to_string();
    let (kept, out) = (p("kept.json"), p("fresh-out"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["rec", "eval", "--data", &data, "--adapter", &gone],
            "cannot load adapter",
        ),
        (
            vec![
                "rec",
                "eval",
                "--data",
                &per_sample,
                "--per-sample-adapters",
            ],
            "cannot load adapter",
        ),
        (
            vec![
                "rec",
                "prune",
                "--data",
                &data,
                "--adapter",
                &gone,
                "--keep",
                "1",
                "--out",
                &kept,
            ],
            "cannot load adapter",
        ),
        (
            vec![
                "rec", "train", "--data", &data, "--resume", &gone, "--out", &out,
            ],
            "cannot resume from",
        ),
        (
            vec!["generate", "--prompt", "hi", "--adapter", &gone],
            "cannot load adapter",
        ),
        (
            vec!["generate", "--prompts", &prompts],
            "cannot load adapter",
        ),
    ];
    for (mut args, want) in cases {
        args.extend(["--model", model, "--device", "cpu"]);
        let (ok, _, err) = cli(&args);
        assert!(
            !ok && err.contains(want) && err.contains("no-such-adapter"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("loaded "),
            "{args:?} loaded the model first: {err}"
        );
    }
    // --limit 0 is the option's error, before the data is read.
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        model,
        "--data",
        &p("missing.json"),
        "--limit",
        "0",
        "--device",
        "cpu",
    ]);
    assert!(
        !ok && err.contains("--limit must be at least 1") && !err.contains("missing.json"),
        "{err}"
    );
}

#[test]
fn rec_train_on_a_device_runs_inside_the_planned_arena() {
    // On the simulator (and so on CUDA) the step's buffers come from one arena of what the
    // memory plan leaves after the model and adapter; the run finishes inside it. head_dim 32:
    // the smallest the attention kernels take.
    let (d, f) = fixture(&FixtureSpec {
        layers: 1,
        hidden: 128,
        ..FixtureSpec::default()
    });
    let dir = d.path();
    let data = dir.join("data.json");
    write_samples(&data, 4);
    let out = dir.join("adapter");
    let args = [
        "rec",
        "train",
        "--model",
        f.hf_dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "sim",
        "--steps",
        "2",
        "--batch",
        "2",
        "--accum",
        "2",
        "--warmup",
        "1",
        "--cutoff",
        "256",
    ];
    let (ok, _, err) = cli(&args);
    assert!(ok, "{err}");
    assert!(err.contains("reserved as one arena"), "{err}");
    // auto: this small run fits the 24 GiB budget without recomputing anything.
    assert!(err.contains("checkpointing auto: off"), "{err}");
    // The plan counted the loaded model and adapter to the byte.
    assert!(!err.contains("the plan counts"), "{err}");
    assert!(out.join("adapter_model.safetensors").exists());

    // Scoring with that adapter: the same, with the scoring plan (rec::eval on the device).
    let (ok, stdout, err) = cli(&[
        "rec",
        "eval",
        "--model",
        f.hf_dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--device",
        "sim",
        "--batch",
        "3",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("scoring's") && err.contains("reserved as one arena"),
        "{err}"
    );
    assert!(!err.contains("the plan counts"), "{err}");
    assert!(stdout.contains("AUC"), "{stdout}");
    // A budget that is not a size is named before anything loads.
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        f.hf_dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--device",
        "sim",
        "--budget",
        "lots",
    ]);
    assert!(!ok && err.contains("--budget 'lots'"), "{err}");
    // generate with the trained adapter: the model and the adapter held as the plan counts
    // them, the prefill and decode buffers from the plan's arena.
    let (ok, _, err) = cli(&[
        "generate",
        "--model",
        f.hf_dir.to_str().unwrap(),
        "--prompt",
        "the movie",
        "--raw",
        "--max-new-tokens",
        "3",
        "--adapter",
        out.to_str().unwrap(),
        "--device",
        "sim",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("generation's") && err.contains("reserved as one arena"),
        "{err}"
    );
    assert!(!err.contains("the plan counts"), "{err}");
}

/// `rec train` of 100,000 updates on 8 samples written into `dir` (adapter → `dir/adapter`,
/// a checkpoint every 1000 updates → `dir/ckpt`): a run that ends only when stopped.
#[cfg(unix)]
fn endless_training(dir: &Path, model: &str) -> Command {
    write_samples(&dir.join("data.json"), 8);
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let mut cmd = Command::new(common::recforge_bin());
    cmd.args([
        "rec",
        "train",
        "--model",
        model,
        "--data",
        &p("data.json"),
        "--out",
        &p("adapter"),
        "--steps",
        "100000",
        "--batch",
        "2",
        "--accum",
        "1",
        "--checkpoint-dir",
        &p("ckpt"),
        "--checkpoint-every",
        "1000",
        "--device",
        "cpu",
    ]);
    cmd
}

/// Ctrl-C during `rec train` stops after the update in flight: the checkpoint and the adapter
/// are saved, the exit status is 130, and `--resume` continues from that update.
#[cfg(unix)]
#[test]
fn an_interrupted_training_saves_and_resumes() {
    let (d, f) = fixture(&FixtureSpec::default());
    let dir = d.path();
    let model = f.hf_dir.to_str().unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let run = common::interrupt_after(endless_training(dir, model), "update 2/");
    let (status, log) = (run.status, run.stderr);
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(
        log.contains("interrupt: stopping after this update"),
        "{log}"
    );
    let at: usize = log
        .lines()
        .find_map(|l| l.strip_prefix("interrupted at update "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'interrupted at update N' line: {log}"));
    assert!((2..100000).contains(&at), "{log}");
    assert!(dir.join("adapter/adapter_model.safetensors").is_file());
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("ckpt/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"].as_u64(), Some(at as u64), "{state}");
    let (ok, _, err) = cli(&[
        "rec",
        "train",
        "--model",
        model,
        "--data",
        &p("data.json"),
        "--out",
        &p("adapter2"),
        "--device",
        "cpu",
        "--resume",
        &p("ckpt"),
        "--steps",
        &(at + 1).to_string(),
    ]);
    assert!(
        ok && err.contains(&format!("resumed from {} at update {at}", p("ckpt"))),
        "{err}"
    );
    assert!(
        err.contains(&format!("update {}/{}", at + 1, at + 1)),
        "{err}"
    );
}

#[test]
fn rec_train_notes_samples_past_the_models_context() {
    // The fixture has 256 positions; one sample of ~400 tokens within a cutoff of 1024 trains
    // (RoPE runs past the table) with a note saying so, the others without.
    let (d, f) = fixture(&FixtureSpec::default());
    let long = "a b c d ".repeat(100);
    let v = serde_json::json!([
        {"instruction": "Say it.", "input": long, "output": "Yes."},
        {"instruction": "Say it.", "input": "no", "output": "No."},
    ]);
    let data = d.path().join("long.json");
    std::fs::write(&data, v.to_string()).unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let args = |cutoff: &'static str| {
        vec![
            "rec".to_string(),
            "train".into(),
            "--model".into(),
            f.hf_dir.to_str().unwrap().into(),
            "--data".into(),
            p("long.json"),
            "--out".into(),
            p(&format!("a{cutoff}")),
            "--steps".into(),
            "1".into(),
            "--batch".into(),
            "2".into(),
            "--cutoff".into(),
            cutoff.into(),
            "--device".into(),
            "cpu".into(),
        ]
    };
    let run = |cutoff| {
        let a = args(cutoff);
        cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (ok, _, err) = run("1024");
    assert!(ok, "{err}");
    assert!(
        err.contains("1 samples are longer than the model's 256 positions"),
        "{err}"
    );
    let (ok, _, err) = run("256");
    assert!(ok, "{err}");
    assert!(!err.contains("positions (RoPE runs"), "{err}");
}

/// `rec eval --per-sample-adapters`: every sample scored with the adapter its "adapter" field
/// names (or the base model), the adapters stacked so that a pass mixes them — the same P(Yes)
/// as scoring each sample's group with `--adapter` (or none) on its own.
#[test]
fn rec_eval_scores_each_sample_with_the_adapter_it_names() {
    // head_dim 32: the smallest the device's attention kernels take (the simulator run below).
    let (d, f) = fixture(&FixtureSpec {
        layers: 1,
        hidden: 128,
        ..FixtureSpec::default()
    });
    let dir = d.path();
    let model = f.hf_dir.to_str().unwrap();
    // Two adapters with random B (scales 2 and 1: powers of two, so the stacked arithmetic is
    // exact, see tests/stacked_adapters.rs), saved as PEFT folders next to the data.
    for (name, r, alpha, targets, seed) in [("u1", 4, 8.0, "q,v", 1), ("u2", 2, 2.0, "v,down", 2)] {
        let a = common::adapter_with_b(&f.config, r, alpha, targets, seed, 0.5);
        recforge::model::adapter::save(&a, &dir.join(name)).unwrap();
    }
    let which = [Some("u1"), Some("u2"), None, Some("u1"), None, Some("u2")];
    let sample = |i: usize| {
        let yes = i.is_multiple_of(2);
        serde_json::json!({
            "instruction": "Say it.",
            "input": format!("{} {i}", if yes { "yes" } else { "no" }),
            "output": if yes { "Yes." } else { "No." },
        })
    };
    let mut all = vec![];
    for (i, w) in which.iter().enumerate() {
        let mut s = sample(i);
        if let Some(w) = w {
            s["adapter"] = serde_json::json!(w);
        }
        all.push(s);
    }
    let data = dir.join("per_user.json");
    std::fs::write(&data, serde_json::to_string(&all).unwrap()).unwrap();
    let p_yes = |json: &Path| -> Vec<f64> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        v["p_yes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    // f32 linears: the CPU computes every row on its own (int8's LLM.int8 outlier columns are
    // chosen over the whole pass, so a row's score would depend on its neighbours).
    let eval = |data: &Path, extra: &[&str], json: &Path| {
        let mut args = vec!["rec", "eval", "--model", model, "--f32", "--device", "cpu"];
        args.extend([
            "--data",
            data.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ]);
        args.extend(extra);
        let (ok, stdout, err) = cli(&args);
        assert!(ok, "{args:?}: {err}");
        (stdout, err)
    };
    let stacked_json = dir.join("stacked.json");
    let (stdout, err) = eval(
        &data,
        &["--per-sample-adapters", "--batch", "4"],
        &stacked_json,
    );
    assert!(stdout.contains("2 adapters by sample"), "{stdout}");
    assert!(
        err.contains("2 adapters stacked (rank 6 in all) for 4 of 6 samples"),
        "{err}"
    );
    let stacked = p_yes(&stacked_json);
    // Each group alone: its samples in a file of their own, scored with --adapter (or none).
    for group in [Some("u1"), Some("u2"), None] {
        let idx: Vec<usize> = (0..which.len()).filter(|&i| which[i] == group).collect();
        let part: Vec<_> = idx.iter().map(|&i| sample(i)).collect();
        let part_file = dir.join(format!("part_{}.json", group.unwrap_or("base")));
        std::fs::write(&part_file, serde_json::to_string(&part).unwrap()).unwrap();
        let json = dir.join("part_out.json");
        let adapter_dir = group.map(|g| dir.join(g).to_str().unwrap().to_string());
        let mut extra = vec!["--no-prefix-sharing", "--batch", "1"];
        if let Some(a) = &adapter_dir {
            extra.extend(["--adapter", a.as_str()]);
        }
        eval(&part_file, &extra, &json);
        let alone = p_yes(&json);
        for (k, &i) in idx.iter().enumerate() {
            assert_eq!(stacked[i], alone[k], "sample {i} ({group:?})");
        }
    }
    assert!(
        stacked.iter().any(|&p| (p - stacked[0]).abs() > 1e-3),
        "P(Yes) barely varies: {stacked:?}"
    );

    // On the simulator: the stacked adapter is counted by the scoring plan to the byte.
    let (ok, stdout, err) = cli(&[
        "rec",
        "eval",
        "--model",
        model,
        "--data",
        data.to_str().unwrap(),
        "--device",
        "sim",
        "--per-sample-adapters",
        "--batch",
        "3",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("scoring's") && err.contains("reserved as one arena"),
        "{err}"
    );
    assert!(!err.contains("the plan counts"), "{err}");
    assert!(stdout.contains("2 adapters by sample"), "{stdout}");

    // Bad input, named: a field that is not a path, a file naming no adapter, a missing folder,
    // and --adapter beside --per-sample-adapters.
    let bad = dir.join("bad.json");
    let run = |json: serde_json::Value, extra: &[&str]| {
        std::fs::write(&bad, serde_json::to_string(&json).unwrap()).unwrap();
        let mut args = vec!["rec", "eval", "--model", model, "--device", "cpu"];
        args.extend(["--data", bad.to_str().unwrap(), "--per-sample-adapters"]);
        args.extend(extra);
        let (ok, _, err) = cli(&args);
        assert!(!ok, "{args:?} succeeded");
        err
    };
    let mut s = sample(0);
    s["adapter"] = serde_json::json!(5);
    let err = run(serde_json::json!([sample(1), s]), &[]);
    assert!(err.contains("sample 1: field \"adapter\""), "{err}");
    let err = run(serde_json::json!([sample(0), sample(1)]), &[]);
    assert!(
        err.contains("no sample or prompt has an \"adapter\" field"),
        "{err}"
    );
    let mut s = sample(0);
    s["adapter"] = serde_json::json!("nowhere");
    let err = run(serde_json::json!([s]), &[]);
    assert!(
        err.contains("cannot load adapter") && err.contains("nowhere"),
        "{err}"
    );
    let err = run(serde_json::json!([sample(0)]), &["--adapter", "u1"]);
    assert!(err.contains("cannot be used with"), "{err}");
}

/// A learning rate that blows the activations up stops the run with an error and saves
/// nothing: overflowed activations used to be quantized to zeros, and the run went on with a
/// zero gradient at the uniform-distribution loss and saved a useless adapter with exit 0.
#[test]
fn a_diverged_training_stops_and_saves_nothing() {
    let (d, f) = fixture(&FixtureSpec::default());
    let dir = d.path();
    let data = dir.join("data.json");
    write_samples(&data, 4);
    let out = dir.join("adapter");
    let (ok, _, err) = cli(&[
        "rec",
        "train",
        "--model",
        f.hf_dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--steps",
        "4",
        "--batch",
        "1",
        "--accum",
        "1",
        "--lr",
        "1e30",
        "--warmup",
        "0",
        "--max-grad-norm",
        "0",
    ]);
    assert!(!ok, "a diverged run succeeded: {err}");
    assert!(err.contains("update 1/4"), "the first update runs: {err}");
    assert!(err.contains("diverged"), "{err}");
    assert!(!out.exists(), "an adapter was saved");
}

/// `--resume` takes the checkpoint's settings: the data are cut at the checkpoint's cutoff
/// without --cutoff given again, a flag repeated with the checkpoint's value is fine, another
/// value is refused (it used to be ignored), and --steps may not end before the checkpoint.
/// A checkpoint folder holding anything else, or an --out overlapping it, is refused before
/// the run (the next save used to delete such files).
#[test]
fn a_resumed_run_keeps_its_checkpoints_settings() {
    let (d, f) = fixture(&FixtureSpec::default());
    let dir = d.path();
    let model = f.hf_dir.to_str().unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    write_samples(&dir.join("data.json"), 4);
    // A cutoff one token past the prompt truncates every sample (prompt + "Yes."/"No." + end).
    let tok = recforge::model::open(&f.hf_dir)
        .unwrap()
        .tokenizer()
        .unwrap();
    let sample = recforge::rec::Sample {
        instruction: "Say it.".into(),
        input: "yes".into(),
        output: "Yes.".into(),
    };
    let (prompt, _) = recforge::rec::prompt_and_response(&sample);
    let cutoff = (tok.encode(&prompt, true).unwrap().len() + 1).to_string();
    let data = p("data.json");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "rec", "train", "--model", model, "--data", &data, "--device", "cpu", "--batch", "2",
            "--accum", "1", "--warmup", "0",
        ];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (ok, _, err) = train(&[
        "--out",
        &p("a1"),
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--cutoff",
        &cutoff,
        "--checkpoint-dir",
        &p("ck"),
        "--checkpoint-every",
        "1",
    ]);
    assert!(ok, "{err}");
    // No --cutoff: the checkpoint's (the default, 512, would give other examples).
    let (ok, _, err) = train(&["--out", &p("a2"), "--resume", &p("ck"), "--steps", "3"]);
    assert!(ok && err.contains("update 3/3"), "{err}");
    // The same flags again are fine.
    let (ok, _, err) = train(&[
        "--out",
        &p("a3"),
        "--resume",
        &p("ck"),
        "--steps",
        "3",
        "--lr",
        "1e-3",
        "--cutoff",
        &cutoff,
    ]);
    assert!(ok && err.contains("update 3/3"), "{err}");
    for (flag, value) in [("--lr", "0.5"), ("--r", "4"), ("--targets", "q,k")] {
        let (ok, _, err) = train(&["--out", &p("a4"), "--resume", &p("ck"), flag, value]);
        assert!(
            !ok && err.contains(&format!(
                "{flag} {value}, but the checkpoint was trained with"
            )),
            "{flag}: {err}"
        );
        assert!(
            !err.contains("loaded"),
            "refused after loading the model: {err}"
        );
    }
    let (ok, _, err) = train(&["--out", &p("a4"), "--resume", &p("ck"), "--steps", "1"]);
    assert!(!ok && err.contains("has done 2 updates"), "{err}");
    assert!(!dir.join("a4").exists());

    // Something else in a checkpoint folder is refused and kept.
    std::fs::write(dir.join("ck/notes.txt"), "mine").unwrap();
    let (ok, _, err) = train(&[
        "--out",
        &p("a5"),
        "--steps",
        "1",
        "--checkpoint-dir",
        &p("ck"),
    ]);
    assert!(!ok && err.contains("notes.txt"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("ck/notes.txt")).unwrap(),
        "mine"
    );
    // The adapter inside the checkpoint folder, or the checkpoint inside the adapter's.
    for (out, ck) in [("ck2/adapter", "ck2"), ("a6", "a6/ck"), ("a7", "./a7")] {
        let (ok, _, err) = train(&["--out", &p(out), "--steps", "1", "--checkpoint-dir", &p(ck)]);
        assert!(!ok && err.contains("overlap"), "{out} / {ck}: {err}");
        assert!(!dir.join(out).exists() && !dir.join(ck).exists());
    }
}

/// A sample whose prompt does not fit is named by its index in the data file.
#[test]
fn rec_eval_names_the_sample_past_the_limit() {
    let (d, f) = fixture(&FixtureSpec::default());
    let data = d.path().join("long.json");
    let samples = serde_json::json!([
        {"instruction": "Say it.", "input": "yes", "output": "Yes."},
        {"instruction": "Say it.", "input": "the cat sat ".repeat(4000), "output": "No."},
    ]);
    std::fs::write(&data, samples.to_string()).unwrap();
    let (ok, _, err) = cli(&[
        "rec",
        "eval",
        "--model",
        f.hf_dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(!ok && err.contains("sample 1: its prompt has"), "{err}");
}

/// SIGTERM (how a batch scheduler or `kill` stops a job) is a Ctrl-C: the update in flight
/// finishes, the checkpoint and the adapter are saved, and the exit status is 128 + 15.
#[cfg(unix)]
#[test]
fn sigterm_during_training_saves_like_ctrl_c() {
    let (d, f) = fixture(&FixtureSpec::default());
    let dir = d.path();
    let cmd = endless_training(dir, f.hf_dir.to_str().unwrap());
    let run = common::signal_after(cmd, "update 2/", libc::SIGTERM);
    assert_eq!(run.status.code(), Some(143), "{}", run.stderr);
    assert!(
        run.stderr.contains("interrupted at update"),
        "{}",
        run.stderr
    );
    assert!(dir.join("adapter/adapter_model.safetensors").is_file());
    assert!(dir.join("ckpt/trainer_state.json").is_file());
}
