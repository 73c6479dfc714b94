//! The whole LLaMA forward on the GPU backend (`backend::gpu::backend::Gpu`) — bf16 activations,
//! the W8A8 / W8A16 / dense / attention / norm / rope / swiglu kernels composed by the same
//! model code as the CPU — run on the simulator (and on CUDA when a GPU is usable), against the
//! CPU reference.

mod common;

use common::{fixture, TEXT};
use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::backend::Gpu;
use recforge::backend::gpu::{probe_cuda, Device};
use recforge::backend::Backend;
use recforge::infer::generate::argmax;
use recforge::model::fixture::FixtureSpec;
use recforge::model::{self, Llama, LoadOptions, Logits};

fn backends() -> Vec<Gpu> {
    let mut v = vec![Gpu::new(Device::sim())];
    let probe = probe_cuda();
    if probe.usable() {
        v.push(Gpu::new(Device::cuda(0).expect("a usable GPU must open")));
    } else {
        eprintln!(
            "skipped on CUDA: no usable device ({}); ran on the simulator only",
            probe.describe()
        );
    }
    v
}

fn run<B: Backend>(
    be: &B,
    path: &std::path::Path,
    ids: &[u32],
    opts: LoadOptions,
    decode_from: usize,
) -> Vec<f32> {
    let src = model::open(path).unwrap();
    let m = Llama::load(src.as_ref(), be, opts).unwrap();
    let mut cache = m.new_cache(be, ids.len()).unwrap();
    let mut out = m
        .forward(be, &ids[..decode_from], &mut cache, Logits::All)
        .unwrap()
        .to_f32()
        .unwrap();
    for &t in &ids[decode_from..] {
        out.extend(
            m.forward(be, &[t], &mut cache, Logits::Last)
                .unwrap()
                .to_f32()
                .unwrap(),
        );
    }
    out
}

#[test]
fn gpu_forward_matches_the_cpu_reference() {
    // head_dim 32: the smallest the attention kernel takes.
    let (_d, f) = fixture(&FixtureSpec {
        layers: 1,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    });
    let ids = model::open(&f.gguf)
        .unwrap()
        .tokenizer()
        .unwrap()
        .encode(TEXT, true)
        .unwrap();
    let v = f.config.vocab_size;
    let opts = LoadOptions::default();
    let want = run(&Cpu::new(), &f.gguf, &ids, opts, ids.len());
    for be in backends() {
        // A prefill of everything, and a prefill of 5 then KV-cached decode steps (which take
        // the weight-only W8A16 path on the GPU).
        for decode_from in [ids.len(), 5] {
            let got = run(&be, &f.gguf, &ids, opts, decode_from);
            assert_eq!(got.len(), want.len());
            // bf16 activations and weights (2^-8 relative per rounding, a few dozen roundings on
            // each path through one layer) against f32 ones: a few percent of the logits' RMS,
            // the same scale as the int8-vs-f32 bound for one layer. Argmaxes mostly agree.
            let err: f32 = got.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
            let norm: f32 = want.iter().map(|x| x * x).sum();
            let rel = (err / norm).sqrt();
            let agree = got
                .chunks(v)
                .zip(want.chunks(v))
                .filter(|(a, b)| argmax(a) == argmax(b))
                .count();
            eprintln!("{} (decode from {decode_from}): relative RMS logit error {rel:.4}, argmax agreement {agree}/{}", be.name(), ids.len());
            assert!(rel < 0.05, "{}: relative RMS error {rel}", be.name());
            assert!(
                agree * 10 >= ids.len() * 8,
                "{}: argmax agreement {agree}/{}",
                be.name(),
                ids.len()
            );
        }
    }
}

#[test]
fn cli_generates_on_the_simulator() {
    let (_d, f) = fixture(&FixtureSpec {
        layers: 2,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        ..Default::default()
    });
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_recforge"))
        .args([
            "generate",
            "--model",
            f.gguf.to_str().unwrap(),
            "--prompt",
            "the cat",
            "--raw",
            "--max-new-tokens",
            "4",
            "--device",
            "sim",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("on sim (SIMT simulator"), "{err}");
    assert!(err.contains("decode") && err.contains("tok/s"), "{err}");
}
