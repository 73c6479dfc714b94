//! `bench-train` end to end: a short run on the CPU reference and on the simulator (and on CUDA
//! when a GPU is usable), checked through its JSON; bad input gives a clear error, never a panic.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn bin() -> PathBuf {
    common::bench_train_bin()
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Out {
    let o = Command::new(bin())
        .args(args)
        .output()
        .expect("run bench-train");
    Out {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn f(v: &Value, path: &str) -> f64 {
    let mut x = v;
    for k in path.split('.') {
        x = &x[k];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v:#}"))
}

/// Run a short benchmark and check what every device must report; return the JSON.
fn bench(device: &str, extra: &[&str], batch: usize, seq: usize, accum: usize) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sub").join("out.json");
    let (b, s, a) = (batch.to_string(), seq.to_string(), accum.to_string());
    let mut args = vec![
        "--device", device, "--batch", &b, "--seq", &s, "--accum", &a, "--steps", "2", "--warmup",
        "1", "--json",
    ];
    let js = json.to_str().unwrap().to_string();
    args.push(&js);
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(
        o.ok,
        "bench-train {args:?} failed:\n{}\n{}",
        o.stdout, o.stderr
    );
    // Progress on stderr, the table on stdout.
    assert!(
        o.stderr.contains("warm-up 1/1") && o.stderr.contains("step 2/2"),
        "{}",
        o.stderr
    );
    for key in [
        "throughput",
        "tokens/s",
        "ms/step",
        "FLOPs/step",
        "MFU",
        "memory",
        "formula",
    ] {
        assert!(
            o.stdout.contains(key),
            "no '{key}' in the table:\n{}",
            o.stdout
        );
    }
    // Nothing but the result is left in the folder (the temporary file was renamed).
    let names: Vec<_> = std::fs::read_dir(json.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["out.json".to_string()]);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    assert_eq!(v["device_kind"], device);
    let tokens = (batch * seq * accum) as f64;
    assert_eq!(f(&v, "config.tokens_per_step"), tokens);
    assert!(f(&v, "tokens_per_sec") > 0.0, "{v:#}");
    assert!(f(&v, "tokens_per_sec_min") <= f(&v, "tokens_per_sec"));
    // The split adds up to the total (each is a median; with two steps, a mean, so exactly up
    // to rounding).
    let total = f(&v, "step_ms.total");
    let parts: f64 = ["forward", "backward", "optimizer", "other"]
        .iter()
        .map(|k| f(&v, &format!("step_ms.{k}")))
        .sum();
    assert!(total > 0.0);
    assert!(
        (parts - total).abs() <= 0.02 * total + 0.5,
        "split {parts} ms vs total {total} ms"
    );
    // tokens/s is the step's tokens at the median step time (with two steps the per-step
    // rates' median would differ from it).
    let tps_from_time = tokens / (total / 1e3);
    assert!(
        (tps_from_time / f(&v, "tokens_per_sec") - 1.0).abs() < 1e-9,
        "{tps_from_time} vs {}",
        f(&v, "tokens_per_sec")
    );
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(v["warmup"].as_array().unwrap().len(), 1);
    for s in steps {
        assert_eq!(f(s, "tokens"), tokens);
        // Language-model labels on every position but each sequence's last.
        assert_eq!(f(s, "label_tokens"), ((seq - 1) * batch * accum) as f64);
        assert!(f(s, "loss").is_finite() && f(s, "loss") > 0.0, "{s}");
    }
    assert!(f(&v, "loss.first").is_finite() && f(&v, "loss.last").is_finite());
    // The FLOP count: the formula and its parts.
    let fl = &v["flops"];
    assert!(fl["formula"].as_str().unwrap().contains("2·N·T"));
    assert!(fl["attention"].as_str().unwrap().contains("causal"));
    for k in [
        "N_base_linear_params",
        "N_lora_params",
        "head_params",
        "forward_per_step",
        "backward_per_step",
        "model_per_step",
        "hardware_per_step",
        "achieved_model_flops_per_sec",
    ] {
        assert!(f(fl, k) > 0.0, "flops.{k} in {fl:#}");
    }
    assert_eq!(
        f(fl, "model_per_step"),
        f(fl, "forward_per_step") + f(fl, "backward_per_step")
    );
    assert_eq!(
        f(fl, "hardware_per_step"),
        f(fl, "model_per_step") + f(fl, "recompute_per_step")
    );
    // The recomputed forward: the layers' share of the forward (all but the head) for the n of
    // L layers that recompute.
    let (n, layers) = (f(&v, "config.recomputed_layers"), f(&v, "model.layers"));
    let label_rows = v["steps"][0]["label_tokens"].as_f64().unwrap();
    let layer_fwd = f(fl, "forward_per_step") - 2.0 * f(fl, "head_params") * label_rows;
    let want = (layer_fwd * n / layers).floor();
    assert!(
        (f(fl, "recompute_per_step") - want).abs() <= 1.0,
        "recompute {} vs {want} for {n} of {layers} layers",
        f(fl, "recompute_per_step")
    );
    assert!(f(&v, "memory.plan_total_bytes") > 0.0);
    v
}

#[test]
fn cpu_run_reports_throughput_flops_and_loss() {
    let v = bench(
        "cpu",
        &["--model", "smollm2-135m", "--layers", "1"],
        2,
        32,
        1,
    );
    assert_eq!(v["model"]["layers"], 1);
    assert_eq!(v["model"]["vocab"], 49152);
    // auto: a one-layer model at 64 tokens fits the default 24 GiB budget many times over, so
    // no layer recomputes.
    assert_eq!(v["config"]["checkpointing"], "off");
    assert_eq!(v["config"]["recomputed_layers"], 0);
    assert!(v["device"].as_str().unwrap().starts_with("cpu"));
    // No MFU or measured memory on the CPU, and it says why.
    assert!(v["mfu"].is_null());
    assert!(v["memory"]["measured_bytes"].is_null());
    assert!(v["mfu_note"].as_str().unwrap().contains("omitted"));
    assert!(v["memory"]["note"].as_str().unwrap().starts_with("n/a"));
    // Random weights: the first loss is about ln(vocab).
    let l = f(&v, "loss.first");
    assert!((l - (49152f64).ln()).abs() < 1.0, "loss {l}");
}

/// `--profile` times one more step operation by operation. The counts follow from the model's
/// structure (tiny: 2 layers; accumulation 2; checkpointing off, so nothing recomputes): an
/// RMSNorm before attention and MLP of each layer and a final one, forward and backward, and
/// 7 int8 linears a layer (whatever the tile the GEMM picks). The operations run one after the
/// other within the step, so their times cannot add up to more than its wall time.
#[test]
fn profile_counts_the_steps_operations_by_kernel() {
    let v = bench(
        "sim",
        &["--model", "tiny", "--checkpointing", "off", "--profile"],
        2,
        16,
        2,
    );
    let p = &v["profile"];
    let kernels = p["kernels"].as_array().expect("profile.kernels");
    let launches = |pred: &dyn Fn(&str) -> bool| -> u64 {
        kernels
            .iter()
            .filter(|k| pred(k["name"].as_str().unwrap()))
            .map(|k| k["launches"].as_u64().unwrap())
            .sum()
    };
    let (layers, accum) = (2, 2);
    assert_eq!(
        launches(&|n| n == "rmsnorm_bf16"),
        (2 * layers + 1) * accum,
        "{p:#}"
    );
    assert_eq!(
        launches(&|n| n == "rmsnorm_backward_bf16"),
        (2 * layers + 1) * accum,
        "{p:#}"
    );
    assert_eq!(
        launches(&|n| n.starts_with("gemm_w8a8") && n.ends_with("_bf16")),
        7 * layers * accum,
        "{p:#}"
    );
    assert_eq!(launches(&|_| true), p["operations"].as_u64().unwrap());
    let timed = f(&v, "profile.timed_ms");
    let summed: f64 = kernels.iter().map(|k| k["ms"].as_f64().unwrap()).sum();
    assert!(
        (timed - summed).abs() <= 1e-9 * timed.max(1.0),
        "{timed} vs {summed}"
    );
    assert!(
        timed > 0.0 && timed <= f(&v, "profile.step_wall_ms"),
        "{p:#}"
    );
    assert_eq!(p["timer"], "simulator wall clock");
    // Most time first.
    let ms: Vec<f64> = kernels.iter().map(|k| k["ms"].as_f64().unwrap()).collect();
    assert!(ms.windows(2).all(|w| w[0] >= w[1]), "{ms:?}");
    // Without --profile there is none; on the CPU reference there is nothing to time.
    let v = bench("sim", &["--model", "tiny"], 1, 8, 1);
    assert!(v["profile"].is_null());
    let v = bench("cpu", &["--model", "tiny", "--profile"], 1, 8, 1);
    assert!(v["profile"].is_null());
}

#[test]
fn simulator_run_reports_throughput_flops_and_loss() {
    let v = bench(
        "sim",
        &[
            "--model",
            "tiny",
            "--r",
            "8",
            "--targets",
            "q,v",
            "--checkpointing",
            "1",
        ],
        2,
        32,
        1,
    );
    assert!(v["device"].as_str().unwrap().starts_with("sim"));
    assert_eq!(v["config"]["recomputed_layers"], 1);
    assert!(f(&v, "flops.recompute_per_step") > 0.0);
    assert_eq!(v["config"]["r"], 8);
    assert_eq!(v["config"]["targets"], serde_json::json!(["q", "v"]));
    assert!(v["mfu"].is_null());
    // r 8 on q (128 → 128) and v (128 → 64) of 2 layers.
    assert_eq!(
        f(&v, "flops.N_lora_params"),
        (2 * 8 * ((128 + 128) + (128 + 64))) as f64
    );
    // Memory: the run was carved from one arena of the plan's size, nothing reached the device
    // allocator during the steps, and the measured peak is the plan's total but for the rows
    // a language-model batch leaves unlabelled (the last of each sequence: the head's chunk is
    // 62 rows, not the planned 64; tests/memory_plan.rs checks equality with every row labelled).
    let plan = f(&v, "memory.plan_total_bytes");
    assert_eq!(v["memory"]["arena_reserved"], true);
    assert_eq!(f(&v, "memory.buffers.arena_bytes"), plan);
    assert_eq!(f(&v, "memory.buffers.device_allocations_during_steps"), 0.0);
    let peak = f(&v, "memory.buffers.peak_bytes");
    let (d, vocab, rows) = (128.0, 512.0, 2.0);
    // sel [rows, d] bf16 + logits [rows, V] f32 + loss [rows] f32 + dlogits [rows, V] bf16,
    // for the 2 rows fewer, in whole 256-byte blocks as allocated.
    let blocks = |b: f64| (b / 256.0).ceil() * 256.0;
    let head = |n: f64| {
        blocks(n * d * 2.0) + blocks(n * vocab * 4.0) + blocks(n * 4.0) + blocks(n * vocab * 2.0)
    };
    assert_eq!(
        plan - peak,
        head(64.0) - head(64.0 - rows),
        "{:#}",
        v["memory"]
    );

    // Without the arena every buffer is a device allocation.
    let v = bench(
        "sim",
        &[
            "--model",
            "tiny",
            "--r",
            "8",
            "--targets",
            "q,v",
            "--no-arena",
        ],
        2,
        32,
        1,
    );
    assert_eq!(v["memory"]["arena_reserved"], false);
    assert!(v["memory"]["buffers"]["arena_bytes"].is_null());
    assert!(f(&v, "memory.buffers.device_allocations_during_steps") > 0.0);
    assert_eq!(f(&v, "memory.buffers.peak_bytes"), peak);
}

#[test]
fn cuda_run_reports_mfu_and_memory_when_a_gpu_is_usable() {
    let probe = recforge::backend::gpu::probe_cuda();
    if !probe.usable() {
        eprintln!(
            "skipped: no usable CUDA device ({}); bench-train ran on cpu and sim only",
            probe.describe()
        );
        return;
    }
    let v = bench("cuda", &["--model", "llama-7b", "--layers", "2"], 2, 256, 1);
    assert!(f(&v, "memory.measured_bytes") > 0.0, "{:#}", v["memory"]);
    assert!(f(&v, "memory.measured_over_plan") > 0.0);
    if !v["peak"].is_null() {
        let m = f(&v, "mfu");
        assert!(m > 0.0 && m < 1.0, "MFU {m}");
        assert!(f(&v, "hfu") >= m);
    }
    // Over the 24 GiB budget: stops before running, with the plan table and the fix.
    let o = run(&[
        "--device", "cuda", "--model", "llama-7b", "--batch", "64", "--seq", "4096", "--steps", "1",
    ]);
    assert!(!o.ok);
    assert!(
        o.stderr.contains("TOTAL") && o.stderr.contains("does NOT fit"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("it would fit with --batch"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}

#[test]
fn time_limit_stops_measuring_after_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("t.json");
    let o = run(&[
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--batch",
        "1",
        "--seq",
        "16",
        "--accum",
        "1",
        "--warmup",
        "0",
        "--steps",
        "50",
        "--time-limit",
        "0.000001",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.ok, "{}", o.stderr);
    assert!(o.stderr.contains("--time-limit"), "{}", o.stderr);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["config"]["measured_steps"], 1);
    assert_eq!(v["config"]["requested_steps"], 50);
    assert_eq!(v["config"]["stopped_by_time_limit"], true);
    assert_eq!(v["config"]["stopped_by_interrupt"], false);
    assert_eq!(v["steps"].as_array().unwrap().len(), 1);
    assert!(f(&v, "tokens_per_sec") > 0.0);
}

/// Ctrl-C ends the measurement after the step in flight, as --time-limit does: the table and
/// the JSON report the steps measured so far, and the JSON says why it stopped.
#[cfg(unix)]
#[test]
fn an_interrupt_stops_measuring_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("i.json");
    let mut cmd = Command::new(bin());
    cmd.args([
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--batch",
        "1",
        "--seq",
        "16",
        "--accum",
        "1",
        "--warmup",
        "0",
        "--steps",
        "100000",
        "--json",
        json.to_str().unwrap(),
    ]);
    let out = common::interrupt_after(cmd, "step 2/");
    let log = &out.stderr;
    assert!(out.status.success(), "{log}");
    assert!(log.contains("bench-train: interrupted after "), "{log}");
    assert!(out.stdout.contains("throughput"), "{}", out.stdout);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let n = v["config"]["measured_steps"].as_u64().unwrap();
    assert!((2..100000).contains(&n), "{n}");
    assert_eq!(v["steps"].as_array().unwrap().len() as u64, n);
    assert_eq!(v["config"]["stopped_by_interrupt"], true);
    assert_eq!(v["config"]["stopped_by_time_limit"], false);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let junk_s = junk.to_str().unwrap().to_string();
    let json = dir.path().join("never.json");
    let json_s = json.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", "llama-70b"],
            "--model 'llama-70b': not a named shape",
        ),
        (
            vec!["--model", "tiny", "--steps", "0"],
            "--steps must be at least 1",
        ),
        (vec!["--model", &junk_s], "junk.gguf"),
        (
            vec!["--model", "tiny", "--layers", "0"],
            "--layers must be at least 1",
        ),
        (
            vec!["--model", "tiny", "--seq", "1"],
            "--seq must be at least 2",
        ),
        (
            vec!["--model", "tiny", "--targets", "q,zz"],
            "unknown LoRA target",
        ),
        (
            vec!["--model", "tiny", "--preset", "nope"],
            "unknown preset",
        ),
        (
            vec!["--model", "tiny", "--budget", "lots"],
            "--budget 'lots'",
        ),
        (
            vec!["--model", &junk_s, "--vocab", "10"],
            "--vocab applies to named shapes only",
        ),
        (
            // NaN would turn LLM.int8's outlier path off without a word.
            vec!["--model", "tiny", "--outlier-threshold", "NaN"],
            "--outlier-threshold",
        ),
    ];
    for (args, want) in cases {
        let mut a = vec!["--device", "cpu", "--json", &json_s];
        a.extend(args.iter().copied());
        let o = run(&a);
        assert!(!o.ok, "{a:?} succeeded");
        assert!(o.stderr.contains("error: "), "{a:?}: {}", o.stderr);
        assert!(
            o.stderr.contains(want),
            "{a:?}: wanted '{want}' in: {}",
            o.stderr
        );
        assert!(!o.stderr.contains("panicked"), "{a:?}: {}", o.stderr);
        assert!(!json.exists(), "{a:?} wrote the JSON");
    }
    // The JSON is written after the run: a folder given for it is refused before the run.
    let o = run(&[
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--json",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!o.ok);
    assert!(
        o.stderr.contains("--json") && o.stderr.contains("is a folder"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("step 1/"), "it ran first: {}", o.stderr);
    // No usable GPU: --device cuda is an error that says so (not a panic).
    if !recforge::backend::gpu::probe_cuda().usable() {
        let o = run(&["--device", "cuda", "--model", "tiny"]);
        assert!(!o.ok);
        assert!(o.stderr.contains("--device cuda"), "{}", o.stderr);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    }
}
