//! `recforge rec prune` end to end on the fixture model: the gradient norms it reports are each
//! sample's own (checked against `forward_backward` of the sample alone), the file it writes
//! holds exactly the samples its selection names, a device run stays inside the planned arena,
//! and bad input is refused by name before anything is written.

mod common;

use std::path::Path;
use std::process::Command;

use common::fixture;
use recforge::backend::cpu::Cpu;
use recforge::model::fixture::FixtureSpec;
use recforge::model::{self, Llama, LoadOptions};
use recforge::rec::{self, Sample};
use recforge::train::step::{forward_backward, Batch, LoraRun, Workspace};
use recforge::train::{DevAdapter, Example};
use serde_json::Value;

fn cli(args: &[&str]) -> (bool, String) {
    let o = Command::new(common::recforge_bin())
        .args(args)
        .output()
        .expect("run recforge");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Eight samples of different lengths; sample 3's input is so long that its prompt alone
/// passes the cutoff of 512 tokens.
fn samples() -> Vec<Sample> {
    let inputs = [
        "yes".to_string(),
        "no, not this one".to_string(),
        "User Preference: \"Heat (1995)\", \"Fargo (1996)\"".to_string(),
        "x".repeat(1500),
        "maybe".to_string(),
        "User Unpreference: \"Babe (1995)\"".to_string(),
        "ok".to_string(),
        "Target movie: \"Toy Story (1995)\"".to_string(),
    ];
    inputs
        .iter()
        .enumerate()
        .map(|(i, input)| Sample {
            instruction: "Will the user like it?".into(),
            input: input.clone(),
            output: if i % 3 == 0 { "Yes." } else { "No." }.into(),
        })
        .collect()
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn rec_prune_keeps_what_its_scores_select() {
    let (d, f) = fixture(&FixtureSpec::default());
    let dir = d.path();
    let data = dir.join("data.json");
    let all = samples();
    rec::write_json(&data, &all).unwrap();
    // An adapter with random B, so both halves of every gradient count.
    let host = common::adapter_with_b(&f.config, 4, 8.0, "q,v,down", 5, 0.3);
    let ad = dir.join("adapter");
    model::adapter::save(&host, &ad).unwrap();
    let (kept, scores) = (dir.join("kept.json"), dir.join("scores.json"));
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let base = [
        "rec",
        "prune",
        "--model",
        f.hf_dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args)
    };
    // One sample per pass: each is alone in its forward pass, as below.
    let (ok, err) = run(&[
        "--adapter",
        &p(&ad),
        "--keep",
        "3",
        "--select",
        "highest",
        "--batch",
        "1",
        "--out",
        &p(&kept),
        "--scores",
        &p(&scores),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("note: 1 samples are longer than the cutoff of 512"),
        "{err}"
    );
    assert!(err.contains("kept 3 of 7 samples (highest norms)"), "{err}");
    assert!(!err.contains("fresh adapter"), "{err}");
    let s = read(&scores);
    assert_eq!(s["selection"], "highest");
    assert_eq!(s["outlier_threshold"], 6.0, "the default is recorded");
    let rows = s["samples"].as_array().unwrap();
    let index: Vec<usize> = rows
        .iter()
        .map(|r| r["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        index,
        vec![0, 1, 2, 4, 5, 6, 7],
        "sample 3 is past the cutoff"
    );
    let norm = |r: &Value| r["grad_norm"].as_f64().unwrap();

    // Each reported score against the sample run alone through the training step (int8 as the
    // CLI loads it, no dropout), its gradient norm taken from the adapter's gradient tensors.
    let be = Cpu::new();
    let src = model::open(&f.hf_dir).unwrap();
    let tok = src.tokenizer().unwrap();
    let m = Llama::load(src.as_ref(), &be, LoadOptions::default()).unwrap();
    let mut dev = DevAdapter::upload(&be, &host).unwrap();
    for (r, &i) in rows.iter().zip(&index) {
        let (prompt, response) = rec::prompt_and_response(&all[i]);
        let e = Example::from_prompt_response(&tok, &prompt, &response, 512)
            .unwrap()
            .unwrap();
        let b = Batch::pack([(&e.ids[..], &e.labels[..])]).unwrap();
        let tokens = b.label_count();
        let mut ws = Workspace::new(&be, &m, &host.config.targets, 4, b.len(), 0).unwrap();
        dev.zero_grads(&be).unwrap();
        let out =
            forward_backward(&be, &m, &mut dev, &mut ws, &b, LoraRun::INFERENCE, 1.0).unwrap();
        let want_norm = dev.grad_sq_norm(&be).unwrap().sqrt() / tokens as f64;
        let want_loss = out.loss_sum / tokens as f64;
        assert_eq!(r["tokens"].as_u64().unwrap() as usize, tokens, "sample {i}");
        // f64 per-sample sums against f32 GEMMs (tests/sample_scores.rs: ≤ 1e-7 measured).
        assert!(
            (norm(r) - want_norm).abs() <= 1e-5 * want_norm,
            "sample {i}: gradient norm {} vs {want_norm} alone",
            norm(r)
        );
        assert!(
            (r["loss"].as_f64().unwrap() - want_loss).abs() <= 1e-5 * want_loss,
            "sample {i}: loss {} vs {want_loss}",
            r["loss"]
        );
    }
    // The file holds the three largest norms' samples, in the input's order, and the scores
    // file marks exactly those.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| norm(&rows[b]).total_cmp(&norm(&rows[a])));
    let mut top: Vec<usize> = order[..3].iter().map(|&j| index[j]).collect();
    top.sort();
    assert!(
        norm(&rows[order[2]]) > norm(&rows[order[3]]),
        "no tie at the cut"
    );
    let marked: Vec<usize> = rows
        .iter()
        .filter(|r| r["kept"] == true)
        .map(|r| r["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(marked, top);
    let want: Vec<Sample> = top.iter().map(|&i| all[i].clone()).collect();
    assert_eq!(rec::read_json(&kept).unwrap(), want);

    // --from-scores selects from that file without a model: the same choice again, and the
    // lowest norms from the same scores, the rewritten scores file marking them.
    let again = dir.join("again.json");
    let rescored = dir.join("rescored.json");
    let from = |extra: &[&str]| {
        let mut args = vec!["rec", "prune", "--data", data.to_str().unwrap()];
        args.extend(extra.iter().copied());
        cli(&args)
    };
    let (ok, err) = from(&[
        "--from-scores",
        &p(&scores),
        "--keep",
        "3",
        "--select",
        "highest",
        "--out",
        &p(&again),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("selecting from the 7 scores in"), "{err}");
    assert!(!err.contains("scoring"), "{err}");
    assert_eq!(rec::read_json(&again).unwrap(), want);
    let (ok, err) = from(&[
        "--from-scores",
        &p(&scores),
        "--keep",
        "2",
        "--select",
        "lowest",
        "--out",
        &p(&again),
        "--scores",
        &p(&rescored),
    ]);
    assert!(ok, "{err}");
    // The two kept: their median is the mean of the two (not the larger one).
    let kept_median = order[order.len() - 2..]
        .iter()
        .map(|&j| norm(&rows[j]))
        .sum::<f64>()
        / 2.0;
    assert!(
        err.contains(&format!("gradient norm median {kept_median:.4} kept")),
        "{kept_median}: {err}"
    );
    let mut low: Vec<usize> = order[order.len() - 2..].iter().map(|&j| index[j]).collect();
    low.sort();
    let want_low: Vec<Sample> = low.iter().map(|&i| all[i].clone()).collect();
    assert_eq!(rec::read_json(&again).unwrap(), want_low);
    let r = read(&rescored);
    assert_eq!(r["selection"], "lowest");
    assert_eq!(
        r["adapter"], s["adapter"],
        "what the scores were measured with"
    );
    let rows2 = r["samples"].as_array().unwrap();
    assert_eq!(rows2.len(), rows.len());
    for (a, b) in rows.iter().zip(rows2) {
        for k in ["index", "tokens", "loss", "grad_norm"] {
            assert_eq!(a[k], b[k], "{k}");
        }
        let i = a["index"].as_u64().unwrap() as usize;
        assert_eq!(b["kept"] == true, low.contains(&i), "sample {i}");
    }

    // --balance-labels: 2 of the 7 answer Yes (samples 0 and 6), so 3 kept are 1 Yes (the
    // largest remainder, 6/7 against No's 1/7) and 2 No, each answer's highest norms.
    let (ok, err) = run(&[
        "--adapter",
        &p(&ad),
        "--keep",
        "3",
        "--select",
        "highest",
        "--balance-labels",
        "--batch",
        "1",
        "--out",
        &p(&kept),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("1 Yes / 2 No kept, 2 / 5 of all"), "{err}");
    let best = |yes: bool, n: usize| -> Vec<usize> {
        let mut v: Vec<usize> = (0..rows.len())
            .filter(|&j| (all[index[j]].output == "Yes.") == yes)
            .collect();
        v.sort_by(|&a, &b| norm(&rows[b]).total_cmp(&norm(&rows[a])));
        v[..n].iter().map(|&j| index[j]).collect()
    };
    let mut balanced = [best(true, 1), best(false, 2)].concat();
    balanced.sort();
    let want: Vec<Sample> = balanced.iter().map(|&i| all[i].clone()).collect();
    assert_eq!(rec::read_json(&kept).unwrap(), want);

    // Stratified, half of the 7 (rounded), 3 per pass, a fresh adapter: the count and the
    // marks agree, and the same seed draws the same subset.
    let fresh = |seed: &str, out: &Path| {
        let (ok, err) = run(&[
            "--keep",
            "50%",
            "--batch",
            "3",
            "--seed",
            seed,
            "--out",
            &p(out),
            "--scores",
            &p(&scores),
        ]);
        assert!(ok, "{err}");
        assert!(
            err.contains("kept 4 of 7 samples (stratified, 10 strata)"),
            "{err}"
        );
        assert!(
            err.contains("a fresh adapter, r 8 on q_proj,v_proj"),
            "{err}"
        );
        assert!(err.contains("note: a fresh adapter's gradient"), "{err}");
        rec::read_json(out).unwrap()
    };
    let (a, b) = (dir.join("a.json"), dir.join("b.json"));
    let first = fresh("4", &a);
    let marked: Vec<Sample> = read(&scores)["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kept"] == true)
        .map(|r| all[r["index"].as_u64().unwrap() as usize].clone())
        .collect();
    assert_eq!(first, marked);
    assert_eq!(fresh("4", &b), first);

    // --outlier-threshold 0: recorded in the scores file, and each sample's score is the same
    // whatever it is batched with; --from-scores takes the file's (the flag conflicts).
    let rows_at = |batch: &str| {
        let (ok, err) = run(&[
            "--adapter",
            &p(&ad),
            "--keep",
            "3",
            "--outlier-threshold",
            "0",
            "--batch",
            batch,
            "--out",
            &p(&kept),
            "--scores",
            &p(&scores),
        ]);
        assert!(ok, "{err}");
        let s = read(&scores);
        assert_eq!(s["outlier_threshold"], 0.0);
        s["samples"].clone()
    };
    assert_eq!(rows_at("1"), rows_at("4"));
    let (ok, err) = cli(&[
        "rec",
        "prune",
        "--data",
        data.to_str().unwrap(),
        "--from-scores",
        &p(&scores),
        "--keep",
        "2",
        "--outlier-threshold",
        "0",
        "--out",
        &p(&kept),
    ]);
    assert!(!ok && err.contains("--outlier-threshold"), "{err}");
}

#[test]
fn rec_prune_on_a_device_runs_inside_the_planned_arena() {
    let (d, f) = fixture(&FixtureSpec {
        layers: 1,
        hidden: 128,
        ..FixtureSpec::default()
    });
    let dir = d.path();
    let data = dir.join("data.json");
    let all: Vec<Sample> = samples()
        .into_iter()
        .filter(|s| s.input.len() < 100)
        .collect();
    rec::write_json(&data, &all).unwrap();
    let out = dir.join("kept.json");
    let (ok, err) = cli(&[
        "rec",
        "prune",
        "--model",
        f.hf_dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--keep",
        "2",
        "--batch",
        "3",
        "--device",
        "sim",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("scoring's") && err.contains("reserved as one arena"),
        "{err}"
    );
    // The plan counted the loaded model and the trainable adapter to the byte.
    assert!(!err.contains("the plan counts"), "{err}");
    assert_eq!(rec::read_json(&out).unwrap().len(), 2);
}

#[test]
fn rec_prune_refuses_bad_input_by_name() {
    let (d, f) = fixture(&FixtureSpec::default());
    let dir = d.path();
    let data = dir.join("data.json");
    rec::write_json(&data, &samples()[..3]).unwrap();
    let empty = dir.join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    let out = dir.join("kept.json");
    let other = common::adapter_with_b(
        &recforge::model::random::shape("tiny").unwrap(),
        2,
        4.0,
        "q",
        1,
        0.1,
    );
    let wrong = dir.join("wrong-adapter");
    model::adapter::save(&other, &wrong).unwrap();
    let (m, dt, o) = (
        f.hf_dir.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--keep", "0"], "--keep must keep at least one sample"),
        (
            vec!["--keep", "4"],
            "--keep 4: only 3 samples can be scored",
        ),
        (vec!["--keep", "150%"], "at most 100%"),
        (vec!["--keep", "0%"], "above 0%"),
        (vec!["--keep", "lots"], "--keep 'lots': expected a count"),
        (
            vec!["--keep", "1", "--select", "random"],
            "stratified, highest or lowest",
        ),
        (
            vec!["--keep", "1", "--strata", "0"],
            "--strata must be at least 1",
        ),
        (
            vec!["--keep", "1", "--batch", "0"],
            "--batch must be at least 1",
        ),
        (
            vec!["--keep", "1", "--cutoff", "1"],
            "--cutoff must be at least 2",
        ),
        (vec!["--keep", "1", "--preset", "big"], "big"),
        (vec!["--keep", "1", "--budget", "lots"], "--budget 'lots'"),
        (
            vec!["--keep", "1", "--adapter", wrong.to_str().unwrap()],
            "does not fit the model",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["rec", "prune", "--model", m, "--data", dt, "--out", o];
        args.extend(extra.iter().copied());
        let (ok, err) = cli(&args);
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} left {}", out.display());
    }
    // The output may not replace the data, nor the scores the output.
    for (args, want) in [
        (vec!["--out", dt], "--out"),
        (
            vec!["--out", o, "--scores", o],
            "--scores and --out name the same file",
        ),
        (vec!["--out", o, "--scores", dt], "--scores"),
    ] {
        let mut all = vec!["rec", "prune", "--model", m, "--data", dt, "--keep", "1"];
        all.extend(args.iter().copied());
        let (ok, err) = cli(&all);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
        if want != "--out" {
            assert!(!out.exists());
        }
    }
    let (ok, err) = cli(&[
        "rec",
        "prune",
        "--model",
        m,
        "--data",
        empty.to_str().unwrap(),
        "--out",
        o,
        "--keep",
        "1",
    ]);
    assert!(!ok && err.contains("no samples to prune"), "{err}");
    assert_eq!(
        rec::read_json(&data).unwrap(),
        samples()[..3].to_vec(),
        "the data file is untouched"
    );
}

#[test]
fn rec_prune_from_scores_refuses_scores_of_other_data_by_name() {
    use recforge::rec::prune::{fingerprint, ScoredSample, ScoresFile};
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let all = samples()[..3].to_vec();
    let data = dir.join("data.json");
    rec::write_json(&data, &all).unwrap();
    let row = |index: usize, grad_norm: f64| ScoredSample {
        index,
        tokens: 2,
        loss: 0.5,
        grad_norm,
        kept: false,
    };
    let file = |rows: Vec<ScoredSample>| ScoresFile {
        data: "data.json".into(),
        data_fingerprint: fingerprint(&all),
        data_samples: all.len(),
        model: "m".into(),
        adapter: None,
        cutoff: 512,
        outlier_threshold: 6.0,
        selection: "highest".into(),
        strata: None,
        seed: 0,
        balance_labels: false,
        kept: 1,
        samples: rows,
    };
    let scores = dir.join("scores.json");
    let out = dir.join("kept.json");
    let (dt, sc, o) = (
        data.to_str().unwrap(),
        scores.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let run = |extra: &[&str]| {
        let mut args = vec!["rec", "prune", "--data", dt, "--from-scores", sc];
        args.extend(extra.iter().copied());
        cli(&args)
    };
    // Sample 1 was not scored (past a cutoff, say); the highest of the others is sample 2.
    file(vec![row(0, 0.25), row(2, 0.75)])
        .write(&scores)
        .unwrap();
    let (ok, err) = run(&["--keep", "1", "--select", "highest", "--out", o]);
    assert!(ok, "{err}");
    assert_eq!(rec::read_json(&out).unwrap(), vec![all[2].clone()]);
    std::fs::remove_file(&out).unwrap();
    // A file written before the threshold was recorded reads as the default's, and a rewrite
    // (--scores) records it.
    let mut old: Value = read(&scores);
    old.as_object_mut().unwrap().remove("outlier_threshold");
    std::fs::write(&scores, old.to_string()).unwrap();
    let (ok, err) = run(&["--keep", "1", "--out", o, "--scores", sc]);
    assert!(ok, "{err}");
    assert_eq!(read(&scores)["outlier_threshold"], 6.0);
    std::fs::remove_file(&out).unwrap();

    let bad: Vec<(ScoresFile, &str)> = vec![
        (
            ScoresFile {
                data_fingerprint: fingerprint(
                    &samples()[..3].iter().rev().cloned().collect::<Vec<_>>(),
                ),
                ..file(vec![row(0, 1.0)])
            },
            "score this data again",
        ),
        (
            ScoresFile {
                data_samples: 4,
                ..file(vec![row(0, 1.0)])
            },
            "scored 4 samples of data.json",
        ),
        (
            file(vec![row(0, 1.0), row(3, 1.0)]),
            "row 1: sample index 3 is past the data",
        ),
        (
            file(vec![row(1, 1.0), row(1, 2.0)]),
            "row 1: sample index 1 is repeated",
        ),
        (
            file(vec![row(0, -1.0)]),
            "row 0: gradient norm -1 is not a norm",
        ),
        (file(vec![]), "no scored samples"),
    ];
    for (f, want) in bad {
        f.write(&scores).unwrap();
        let (ok, err) = run(&["--keep", "1", "--out", o]);
        assert!(
            !ok && err.contains(want) && err.contains(sc),
            "{want}: {err}"
        );
        assert!(!out.exists(), "{want}");
    }
    file(vec![row(0, 0.25), row(2, 0.75)])
        .write(&scores)
        .unwrap();
    let text = std::fs::read_to_string(&scores).unwrap();
    std::fs::write(&scores, text.replace("0.75", "null")).unwrap();
    let (ok, err) = run(&["--keep", "1", "--out", o]);
    assert!(
        !ok && err.contains("not a scores file") && err.contains(sc),
        "{err}"
    );
    file(vec![row(0, 0.25), row(2, 0.75)])
        .write(&scores)
        .unwrap();
    for (extra, want) in [
        (
            vec!["--keep", "3", "--out", o],
            "--keep 3: only 2 samples were scored in",
        ),
        (
            vec!["--keep", "1", "--out", sc],
            "would overwrite the --from-scores file",
        ),
        (
            vec!["--keep", "1", "--out", o, "--adapter", dt],
            "cannot be used with",
        ),
        (
            vec!["--keep", "1", "--out", o, "--cutoff", "64"],
            "cannot be used with",
        ),
    ] {
        let (ok, err) = run(&extra);
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?}");
    }
    let missing = dir.join("missing.json");
    let (ok, err) = cli(&[
        "rec",
        "prune",
        "--data",
        dt,
        "--from-scores",
        missing.to_str().unwrap(),
        "--keep",
        "1",
        "--out",
        o,
    ]);
    assert!(!ok && err.contains("missing.json"), "{err}");
    assert_eq!(
        rec::read_json(&data).unwrap(),
        all,
        "the data file is untouched"
    );
}
