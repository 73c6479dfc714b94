#![allow(dead_code)]

use recforge::backend::cpu::Cpu;
use recforge::model::fixture::{self, Fixture, FixtureSpec};
use recforge::model::{self, Llama, LoadOptions, Logits};

/// A fetched asset (`rel` below the repository, e.g. "assets/smollm2/…"), or None with the
/// reason printed when it is missing. With RECFORGE_REQUIRE_ASSETS=1 (scripts/test.sh) or in
/// CI a missing asset fails the test instead: there the check must not skip silently.
pub fn asset(rel: &str) -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("RECFORGE_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok()
    {
        panic!("{} is missing: run scripts/fetch-assets.sh", p.display());
    }
    eprintln!(
        "skipped: {} is missing (run scripts/fetch-assets.sh)",
        p.display()
    );
    None
}

pub fn fixture(spec: &FixtureSpec) -> (tempfile::TempDir, Fixture) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = fixture::write(dir.path(), spec).expect("write fixture");
    (dir, f)
}

/// Logits `[T, V]` of a full forward over `tokens`.
pub fn logits(path: &std::path::Path, tokens: &[u32], opts: LoadOptions) -> Vec<f32> {
    let be = Cpu::new();
    let src = model::open(path).expect("open model");
    let m = Llama::load(src.as_ref(), &be, opts).expect("load");
    let mut cache = m.new_cache(&be, tokens.len()).expect("cache");
    m.forward(&be, tokens, &mut cache, Logits::All)
        .expect("forward")
        .to_f32()
        .expect("f32")
}

/// A LoRA adapter of rank `r` (alpha `alpha`, no dropout) on `targets` ("q,v"): PEFT's A from
/// `seed` and B uniform in ±`b` (PEFT's zero B would make every adapter the base model and hide
/// a row that took the wrong one).
pub fn adapter_with_b(
    cfg: &recforge::model::LlamaConfig,
    r: usize,
    alpha: f32,
    targets: &str,
    seed: u64,
    b: f32,
) -> recforge::model::lora::HostAdapter {
    use recforge::model::lora::{parse_targets, HostAdapter, LoraConfig};
    let lora = LoraConfig {
        r,
        alpha,
        dropout: 0.0,
        targets: parse_targets(targets).expect("targets"),
    };
    let mut a = HostAdapter::init(cfg, &lora, seed, "fixture").expect("init");
    let mut rng = recforge::rng::Rng::new(seed + 1);
    for w in a.layers.values_mut() {
        w.b.iter_mut().for_each(|x| *x = rng.range(-b, b));
    }
    a
}

/// Two adapters on different targets with scales 2 and 1 — powers of two, so stacking them
/// (`model::lora::stack`) changes no bit of what each computes (tests/stacked_adapters.rs).
pub fn two_adapters(cfg: &recforge::model::LlamaConfig) -> [recforge::model::lora::HostAdapter; 2] {
    [
        adapter_with_b(cfg, 4, 8.0, "q,v,o,down", 3, 0.3),
        adapter_with_b(cfg, 2, 2.0, "v,up", 5, 0.3),
    ]
}

pub const TEXT: &str = "the cat sat on the mat, and then the rest is history";

/// The simulator, plus CUDA when a GPU is usable (otherwise says why the CUDA half skipped).
/// RECFORGE_TEST_DEVICES=cuda runs the CUDA half only (the GPU check sets it: the simulator
/// halves run in CI on every change, and the device time is short); it then says so, and fails
/// when no GPU is usable rather than checking nothing.
pub fn devices() -> Vec<recforge::backend::gpu::Device> {
    use recforge::backend::gpu::{probe_cuda, Device};
    let probe = probe_cuda();
    if std::env::var("RECFORGE_TEST_DEVICES").as_deref() == Ok("cuda") {
        assert!(
            probe.usable(),
            "RECFORGE_TEST_DEVICES=cuda but no CUDA device is usable ({})",
            probe.describe()
        );
        eprintln!("skipped on the simulator: RECFORGE_TEST_DEVICES=cuda (CI runs that half)");
        return vec![Device::cuda(0).expect("a usable GPU must open")];
    }
    let mut v = vec![Device::sim()];
    if probe.usable() {
        v.push(Device::cuda(0).expect("a usable GPU must open"));
    } else {
        eprintln!(
            "skipped on CUDA: no usable device ({}); ran on the simulator only",
            probe.describe()
        );
    }
    v
}

/// The `recforge` binary: cargo's path, or — for test executables staged onto a GPU machine by
/// scripts/gpu-check.sh (`.gpu/tests/<name>`) — the staged `.gpu/bin/recforge`.
pub fn recforge_bin() -> std::path::PathBuf {
    built_or_staged(env!("CARGO_BIN_EXE_recforge"), "recforge")
}

/// The `bench-train` binary, as [`recforge_bin`].
pub fn bench_train_bin() -> std::path::PathBuf {
    built_or_staged(env!("CARGO_BIN_EXE_bench-train"), "bench-train")
}

fn built_or_staged(built: &str, name: &str) -> std::path::PathBuf {
    let built = std::path::PathBuf::from(built);
    if built.exists() {
        return built;
    }
    let staged = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|g| g.join("bin").join(name)));
    match staged {
        Some(s) if s.exists() => s,
        _ => built,
    }
}

/// What [`interrupt_after`] saw: the exit status, all of stderr, all of stdout.
#[cfg(unix)]
pub struct Interrupted {
    pub status: std::process::ExitStatus,
    pub stderr: String,
    pub stdout: String,
}

/// Runs `cmd` until a line of its stderr starts with `marker`, then sends it SIGINT (Ctrl-C)
/// and waits for it. A child that ignores the interrupt is killed after 120 s, so the test
/// fails on its exit status instead of hanging.
#[cfg(unix)]
pub fn interrupt_after(cmd: std::process::Command, marker: &str) -> Interrupted {
    signal_after(cmd, marker, libc::SIGINT)
}

/// [`interrupt_after`] with another signal (SIGTERM: how a scheduler stops a job).
#[cfg(unix)]
pub fn signal_after(
    mut cmd: std::process::Command,
    marker: &str,
    signal: libc::c_int,
) -> Interrupted {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let pid = child.id() as libc::pid_t;
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch
            .recv_timeout(std::time::Duration::from_secs(120))
            .is_err()
        {
            // SAFETY: kill(2) on the child, not yet reaped (the caller's wait comes first).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    // stdout is drained beside stderr, so a child that prints a lot cannot block on it.
    let mut out = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let mut stderr = String::new();
    let mut sent = false;
    for line in lines.by_ref() {
        let line = line.expect("stderr is text");
        stderr.push_str(&line);
        stderr.push('\n');
        if line.starts_with(marker) {
            // SAFETY: kill(2) on our own child's pid.
            assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
            sent = true;
            break;
        }
    }
    for line in lines {
        stderr.push_str(&line.expect("stderr is text"));
        stderr.push('\n');
    }
    let status = child.wait().expect("wait for the command");
    let _ = done.send(());
    watchdog.join().expect("watchdog");
    assert!(sent, "no line starting with {marker:?}: {stderr}");
    Interrupted {
        status,
        stderr,
        stdout: reader.join().expect("stdout reader"),
    }
}
