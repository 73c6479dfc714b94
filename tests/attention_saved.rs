//! The trainer's attention path: `attention_saving` then `attention_backward_saved` (the tiled
//! backward reuses the forward's O and log-sum-exp instead of recomputing them) against
//! `attention_backward`, which recomputes them with the same forward kernel.
//!
//! The simulator runs single-threaded here (RF_SIM_THREADS=1, set before any launch) so the
//! backward's f32 atomics add in a fixed order and the two paths must agree bit for bit. On a
//! GPU the atomics' order changes from run to run, so there the bound is the bf16 rounding of
//! reassociated f32 sums: a relative L2 difference of at most 2^-7 (every element two bf16
//! ulps apart).

mod common;

use common::devices;
use half::bf16;
use recforge::backend::{Backend, SeqSpan};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};
/// head_dim 64 and 128 take the tiled kernels; head_dim 32 the per-row ones, which ignore what
/// was saved. Gradients are poisoned (NaN) before each call.
#[test]
fn backward_from_the_saved_forward_equals_the_recomputing_backward() {
    use recforge::backend::gpu::backend::Gpu;
    std::env::set_var("RF_SIM_THREADS", "1");
    let mut rng = Rng::new(77);
    // (heads, kv_heads, head_dim, sequence lengths packed into one batch)
    let cases: [(usize, usize, usize, &[usize]); 4] = [
        (9, 3, 64, &[70, 1, 33]),
        (4, 2, 128, &[65, 40]),
        (2, 2, 64, &[129]),
        (4, 2, 32, &[17, 9]),
    ];
    for dev in devices() {
        let be = Gpu::new(dev);
        for &(heads, kvh, hd, lens) in &cases {
            let t: usize = lens.iter().sum();
            let mut spans = vec![];
            let mut pos = vec![];
            let mut at = 0;
            for &n in lens {
                spans.push(SeqSpan {
                    q_start: at,
                    q_len: n,
                    kv_start: at,
                    kv_len: n,
                });
                pos.extend(0..n as u32);
                at += n;
            }
            let mut rand_bf16 = |shape: Vec<usize>| {
                let n: usize = shape.iter().product();
                let v: Vec<bf16> = (0..n)
                    .map(|_| bf16::from_f32(rng.uniform() * 2.0 - 1.0))
                    .collect();
                be.upload(&HostTensor::new(shape, HostData::BF16(v)).unwrap())
                    .unwrap()
            };
            let q = rand_bf16(vec![t, heads, hd]);
            let k = rand_bf16(vec![t, kvh, hd]);
            let v = rand_bf16(vec![t, kvh, hd]);
            let dy = rand_bf16(vec![t, heads, hd]);
            let p = be
                .upload(&HostTensor::new(vec![t], HostData::U32(pos.clone())).unwrap())
                .unwrap();
            let mut o = be.zeros(&[t, heads, hd], DType::BF16).unwrap();
            let mut saved = be.zeros(&[t, heads], DType::F32).unwrap();
            be.attention_saving(&q, &k, &v, &p, &spans, &mut o, &mut saved)
                .unwrap();
            let poisoned = |shape: &[usize]| {
                let n: usize = shape.iter().product();
                be.upload(
                    &HostTensor::new(shape.to_vec(), HostData::BF16(vec![bf16::NAN; n])).unwrap(),
                )
                .unwrap()
            };
            let grads = |reuse: bool| {
                let (mut dq, mut dk, mut dv) = (
                    poisoned(&[t, heads, hd]),
                    poisoned(&[t, kvh, hd]),
                    poisoned(&[t, kvh, hd]),
                );
                if reuse {
                    be.attention_backward_saved(
                        &q, &k, &v, &p, &spans, &o, &saved, &dy, &mut dq, &mut dk, &mut dv,
                    )
                } else {
                    be.attention_backward(&q, &k, &v, &p, &spans, &dy, &mut dq, &mut dk, &mut dv)
                }
                .unwrap();
                [dq, dk, dv].map(|g| be.download(&g).unwrap().to_f32().unwrap())
            };
            let want = grads(false);
            let got = grads(true);
            for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                assert!(
                    w.iter().chain(g).all(|x| x.is_finite()),
                    "{name} has unwritten rows"
                );
                let what = format!(
                    "{}: {name}, heads {heads}/{kvh}, hd {hd}, {lens:?}",
                    be.name()
                );
                if be.dev.is_sim() {
                    let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{what}: not bit-identical");
                } else {
                    let num: f64 = g.iter().zip(w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                    let den: f64 = w.iter().map(|&b| (b as f64).powi(2)).sum();
                    let rel = (num / den.max(1e-30)).sqrt();
                    assert!(rel <= 1.0 / 128.0, "{what}: relative L2 {rel}");
                }
            }
        }
    }
}
