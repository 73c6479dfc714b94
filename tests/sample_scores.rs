//! Per-sample scores for gradient-based data pruning (`train::step::sample_scores`): each
//! sequence's mean response loss and the norm of its LoRA gradient, measured inside one packed
//! forward + backward, against the same sequence run alone through `forward_backward` with
//! the adapter's gradient norm taken afterwards — on the CPU reference and on the simulator.

mod common;

use common::fixture;
use recforge::backend::cpu::Cpu;
use recforge::backend::{Backend, IGNORE_LABEL};
use recforge::model::fixture::FixtureSpec;
use recforge::model::lora::HostAdapter;
use recforge::model::{self, Llama, LoadOptions};
use recforge::rng::Rng;
use recforge::train::step::{forward_backward, sample_scores, Batch, LoraRun, Workspace};
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

/// Sequences of odd lengths whose last `labelled` rows carry a label.
fn sequences(vocab: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut rng = Rng::new(5);
    [(13usize, 2usize), (7, 1), (21, 5), (10, 3)]
        .iter()
        .map(|&(len, labelled)| {
            let ids: Vec<u32> = (0..len).map(|_| rng.below(vocab as u64) as u32).collect();
            let labels = (0..len)
                .map(|t| {
                    if t + 1 < len && t + 1 + labelled >= len {
                        ids[t + 1]
                    } else {
                        IGNORE_LABEL
                    }
                })
                .collect();
            (ids, labels)
        })
        .collect()
}

fn pack(seqs: &[(Vec<u32>, Vec<u32>)]) -> Batch {
    Batch::pack(seqs.iter().map(|(i, l)| (&i[..], &l[..]))).unwrap()
}

/// (loss, gradient norm) per sample.
type Scores = Vec<(f64, f64)>;

/// (batched, alone): (loss, gradient norm) of every sequence scored in one packed batch, and
/// of each run alone through `forward_backward` (no dropout), the norm summed over the
/// adapter's gradient tensors and divided by the sequence's labelled rows. That division comes
/// after the backward pass in both: with `grad_scale` = 1 / rows instead, the head's gradient
/// would be rounded to bf16 at another scale on a device, and over 2 layers the norms of the
/// 3- and 5-row sequences moved by 0.1–0.2% on the simulator (1- and 2-row ones, powers of two,
/// stayed bit-identical).
fn batched_and_alone<B: Backend>(
    be: &B,
    m: &Llama<B>,
    host: &HostAdapter,
    seqs: &[(Vec<u32>, Vec<u32>)],
    recomputed: usize,
) -> (Scores, Scores) {
    let (targets, r) = (&host.config.targets, host.config.r);
    let mut dev = DevAdapter::upload(be, host).unwrap();
    let all = pack(seqs);
    let mut ws = Workspace::new(be, m, targets, r, all.len(), recomputed).unwrap();
    let scores = sample_scores(be, m, &mut dev, &mut ws, &all).unwrap();
    let batched = scores.iter().map(|s| (s.loss, s.grad_norm)).collect();
    for (s, (_, labels)) in scores.iter().zip(seqs) {
        assert_eq!(
            s.tokens,
            labels.iter().filter(|&&l| l != IGNORE_LABEL).count()
        );
    }
    let alone = seqs
        .iter()
        .map(|seq| {
            let b = pack(std::slice::from_ref(seq));
            let tokens = b.label_count();
            let mut ws = Workspace::new(be, m, targets, r, b.len(), recomputed).unwrap();
            dev.zero_grads(be).unwrap();
            let out =
                forward_backward(be, m, &mut dev, &mut ws, &b, LoraRun::INFERENCE, 1.0).unwrap();
            (
                out.loss_sum / tokens as f64,
                dev.grad_sq_norm(be).unwrap().sqrt() / tokens as f64,
            )
        })
        .collect();
    (batched, alone)
}

fn check(what: &str, (batched, alone): (Scores, Scores)) {
    eprintln!("{what}: (loss, |g|) batched {batched:?}, alone {alone:?}");
    for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
        // The forward rows are the same arithmetic either way (every linear works row by row:
        // no outlier columns shared across the batch). The norms differ in summation only (f64
        // per sample on the CPU, f32 GEMMs and f32 sums of squares over ≤ 2·10⁴ terms alone):
        // measured ≤ 1e-7 relative.
        assert!(
            (b.0 - a.0).abs() <= 1e-5 * a.0.abs() + 1e-6,
            "{what}: sample {i} loss {} vs {} alone",
            b.0,
            a.0
        );
        assert!(
            (b.1 - a.1).abs() <= 1e-5 * a.1.abs(),
            "{what}: sample {i} gradient norm {} vs {} alone",
            b.1,
            a.1
        );
    }
    // The comparison can fail: the samples' norms differ from one another by far more than the
    // tolerance, so scores given to the wrong sample (or the batch's total) would not pass.
    let mut norms: Vec<f64> = alone.iter().map(|a| a.1).collect();
    norms.sort_by(f64::total_cmp);
    assert!(norms[0] > 0.0, "{what}: a zero gradient");
    for w in norms.windows(2) {
        assert!(w[1] > 1.01 * w[0], "{what}: norms too close {norms:?}");
    }
}

#[test]
fn each_sample_scores_as_it_does_alone() {
    let (_d, f) = fixture(&spec());
    let host = common::adapter_with_b(&f.config, 4, 8.0, "q,v,o,down", 7, 0.3);
    let seqs = sequences(f.config.vocab_size);
    let be = Cpu::new();
    for (what, opts, recomputed) in [
        (
            "cpu, int8 weights, no outlier columns, layer 0 recomputed",
            LoadOptions {
                int8: true,
                outlier_threshold: 0.0,
            },
            1,
        ),
        (
            "cpu, f32 weights, no recomputation",
            LoadOptions {
                int8: false,
                ..LoadOptions::default()
            },
            0,
        ),
    ] {
        let src = model::open(&f.hf_dir).unwrap();
        let m = Llama::load(src.as_ref(), &be, opts).unwrap();
        check(what, batched_and_alone(&be, &m, &host, &seqs, recomputed));
    }
    for dev in common::devices() {
        use recforge::backend::gpu::backend::Gpu;
        let gpu = Gpu::new(dev);
        // Dense bf16 weights: the device's GEMMs and LoRA kernels work row by row.
        let src = model::open(&f.hf_dir).unwrap();
        let opts = LoadOptions {
            int8: false,
            ..LoadOptions::default()
        };
        let m = Llama::load(src.as_ref(), &gpu, opts).unwrap();
        check(&gpu.name(), batched_and_alone(&gpu, &m, &host, &seqs, 1));
    }
}

#[test]
fn a_sequence_without_a_label_is_refused() {
    let (_d, f) = fixture(&spec());
    let host = common::adapter_with_b(&f.config, 2, 4.0, "q", 3, 0.3);
    let be = Cpu::new();
    let src = model::open(&f.hf_dir).unwrap();
    let m = Llama::load(src.as_ref(), &be, LoadOptions::default()).unwrap();
    let mut seqs = sequences(f.config.vocab_size);
    seqs[2].1.iter_mut().for_each(|l| *l = IGNORE_LABEL);
    let b = pack(&seqs);
    let mut dev = DevAdapter::upload(&be, &host).unwrap();
    let mut ws = Workspace::new(&be, &m, &host.config.targets, 2, b.len(), 0).unwrap();
    let e = sample_scores(&be, &m, &mut dev, &mut ws, &b)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sequence 2") && e.contains("no labelled token"),
        "{e}"
    );
}
