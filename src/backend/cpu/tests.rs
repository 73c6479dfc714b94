#![allow(clippy::needless_range_loop)] // index loops mirror the formulas they check
//! The CPU reference ops against independent formulations: exact integer arithmetic for the
//! int8 path, finite differences for every backward op, algebraic identities for RoPE.

use super::*;
use crate::backend::{AdamW, Backend, Linear, LinearWeight, SeqSpan};
use crate::rng::Rng;
use crate::tensor::{HostData, HostTensor};

fn rand_vec(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| std * rng.normal()).collect()
}

fn t32(be: &Cpu, shape: &[usize], v: Vec<f32>) -> Tensor<Cpu> {
    be.upload(&HostTensor::f32(shape.to_vec(), v).unwrap())
        .unwrap()
}

fn tu32(be: &Cpu, v: Vec<u32>) -> Tensor<Cpu> {
    be.upload(&HostTensor::new(vec![v.len()], HostData::U32(v)).unwrap())
        .unwrap()
}

fn vals(t: &Tensor<Cpu>) -> Vec<f32> {
    t.storage.to_f32().unwrap()
}

fn int8_linear(be: &Cpu, w: &[f32], n: usize, k: usize, thr: f32) -> Linear<Cpu> {
    let (q, s) = quantize_rows(w, n, k);
    Linear {
        weight: LinearWeight::Int8 {
            w: be
                .upload(&HostTensor::new(vec![n, k], HostData::I8(q)).unwrap())
                .unwrap(),
            scale: t32(be, &[n], s),
        },
        out_features: n,
        in_features: k,
        outlier_threshold: thr,
    }
}

fn dense_linear(be: &Cpu, w: &[f32], n: usize, k: usize) -> Linear<Cpu> {
    Linear {
        weight: LinearWeight::Dense(t32(be, &[n, k], w.to_vec())),
        out_features: n,
        in_features: k,
        outlier_threshold: 0.0,
    }
}

#[test]
fn int8_linear_is_exact_integer_arithmetic() {
    // Recompute every output from the quantized operands with i64 sums, independently of the
    // op's code path, at odd sizes.
    let be = Cpu::new();
    let mut rng = Rng::new(1);
    let (t, k, n) = (5, 37, 19);
    let x = rand_vec(&mut rng, t * k, 1.0);
    let w = rand_vec(&mut rng, n * k, 0.2);
    let lin = int8_linear(&be, &w, n, k, 0.0);
    let mut out = t32(&be, &[t, n], vec![f32::NAN; t * n]);
    be.linear(&t32(&be, &[t, k], x.clone()), &lin, &mut out)
        .unwrap();
    let (wq, ws) = quantize_rows(&w, n, k);
    let got = vals(&out);
    for r in 0..t {
        let row = &x[r * k..(r + 1) * k];
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let sx = amax / 127.0;
        let xq: Vec<i64> = row.iter().map(|v| (v / sx).round() as i64).collect();
        assert!(xq.iter().all(|q| q.abs() <= 127));
        for j in 0..n {
            let acc: i64 = (0..k).map(|c| xq[c] * wq[j * k + c] as i64).sum();
            let want = acc as f32 * sx * ws[j];
            assert_eq!(got[r * n + j], want, "row {r} col {j}");
        }
    }
}

#[test]
fn int8_linear_error_is_what_quantization_predicts() {
    // Gaussian x and w: per-operand rounding error is uniform with RMS step/sqrt(12), step =
    // absmax/127·... The relative RMS error of the product should be around 1%; assert < 2%.
    let be = Cpu::new();
    let mut rng = Rng::new(2);
    let (t, k, n) = (7, 96, 33);
    let x = rand_vec(&mut rng, t * k, 1.0);
    let w = rand_vec(&mut rng, n * k, 0.1);
    let xt = t32(&be, &[t, k], x);
    let mut a = t32(&be, &[t, n], vec![0.0; t * n]);
    let mut b = t32(&be, &[t, n], vec![0.0; t * n]);
    be.linear(&xt, &dense_linear(&be, &w, n, k), &mut a)
        .unwrap();
    be.linear(&xt, &int8_linear(&be, &w, n, k, 0.0), &mut b)
        .unwrap();
    let (a, b) = (vals(&a), vals(&b));
    let rel = (a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f32>()
        / a.iter().map(|x| x * x).sum::<f32>())
    .sqrt();
    assert!(rel < 0.02 && rel > 0.0, "relative RMS error {rel}");
}

#[test]
fn outlier_columns_take_the_float_path() {
    // One input column far above the threshold: with the decomposition, that column's
    // contribution is exact (x · dequant(w)) and the rest is quantized with a scale that no
    // longer sees the outlier, so the error is far below the plain int8 result's.
    let be = Cpu::new();
    let mut rng = Rng::new(3);
    let (t, k, n) = (4, 64, 16);
    let mut x = rand_vec(&mut rng, t * k, 1.0);
    for r in 0..t {
        x[r * k + 5] = 60.0 * if r % 2 == 0 { 1.0 } else { -1.0 };
    }
    let w = rand_vec(&mut rng, n * k, 0.1);
    let (wq, ws) = quantize_rows(&w, n, k);
    let w_deq: Vec<f32> = (0..n * k).map(|i| wq[i] as f32 * ws[i / k]).collect();
    let xt = t32(&be, &[t, k], x);
    let mut exact = t32(&be, &[t, n], vec![0.0; t * n]);
    be.linear(&xt, &dense_linear(&be, &w_deq, n, k), &mut exact)
        .unwrap();
    let err = |thr: f32| {
        let mut o = t32(&be, &[t, n], vec![0.0; t * n]);
        be.linear(&xt, &int8_linear(&be, &w, n, k, thr), &mut o)
            .unwrap();
        vals(&o)
            .iter()
            .zip(vals(&exact))
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    let (with, without) = (err(6.0), err(0.0));
    assert!(
        with * 5.0 < without,
        "decomposed error {with}, plain int8 error {without}"
    );
}

/// Central finite difference of a scalar loss L = Σ out·probe.
fn check_grad(name: &str, analytic: &[f32], f: &dyn Fn(&[f32]) -> f32, x: &[f32]) {
    let h = 1e-2f32;
    let mut worst = 0f32;
    for i in 0..x.len() {
        let mut xp = x.to_vec();
        let mut xm = x.to_vec();
        xp[i] += h;
        xm[i] -= h;
        let num = (f(&xp) - f(&xm)) / (2.0 * h);
        let err = (num - analytic[i]).abs() / (1.0 + num.abs());
        worst = worst.max(err);
    }
    // f32 central differences with h = 1e-2 on O(1) smooth functions: truncation O(h²) ≈ 1e-4
    // relative, rounding ≈ 1e-7/h per term summed over a few hundred terms ≈ 1e-3.
    assert!(
        worst < 5e-3,
        "{name}: worst relative gradient error {worst}"
    );
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let be = Cpu::new();
    let mut rng = Rng::new(4);
    let (t, d) = (3, 13);
    let x = rand_vec(&mut rng, t * d, 1.0);
    let w = rand_vec(&mut rng, d, 1.0);
    let probe = rand_vec(&mut rng, t * d, 1.0);
    let wt = t32(&be, &[d], w.clone());
    let loss = |xv: &[f32]| {
        let mut o = t32(&be, &[t, d], vec![0.0; t * d]);
        be.rmsnorm(&t32(&be, &[t, d], xv.to_vec()), &wt, 1e-5, &mut o)
            .unwrap();
        vals(&o).iter().zip(&probe).map(|(a, b)| a * b).sum::<f32>()
    };
    let mut dx = t32(&be, &[t, d], vec![f32::NAN; t * d]);
    be.rmsnorm_backward(
        &t32(&be, &[t, d], x.clone()),
        &wt,
        1e-5,
        &t32(&be, &[t, d], probe.clone()),
        &mut dx,
        false,
    )
    .unwrap();
    check_grad("rmsnorm", &vals(&dx), &loss, &x);
    // accumulate adds the same gradient to what dx held.
    let prior = rand_vec(&mut rng, t * d, 1.0);
    let mut acc = t32(&be, &[t, d], prior.clone());
    be.rmsnorm_backward(
        &t32(&be, &[t, d], x.clone()),
        &wt,
        1e-5,
        &t32(&be, &[t, d], probe.clone()),
        &mut acc,
        true,
    )
    .unwrap();
    let want: Vec<f32> = prior.iter().zip(vals(&dx)).map(|(p, d)| p + d).collect();
    assert_eq!(vals(&acc), want);
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let be = Cpu::new();
    let mut rng = Rng::new(5);
    let n = 23;
    let g = rand_vec(&mut rng, n, 2.0);
    let u = rand_vec(&mut rng, n, 1.0);
    let probe = rand_vec(&mut rng, n, 1.0);
    let run = |g: &[f32], u: &[f32]| {
        let mut o = t32(&be, &[1, n], vec![0.0; n]);
        be.swiglu(
            &t32(&be, &[1, n], g.to_vec()),
            &t32(&be, &[1, n], u.to_vec()),
            &mut o,
        )
        .unwrap();
        vals(&o).iter().zip(&probe).map(|(a, b)| a * b).sum::<f32>()
    };
    let mut dg = t32(&be, &[1, n], vec![0.0; n]);
    let mut du = t32(&be, &[1, n], vec![0.0; n]);
    let (gt, ut) = (t32(&be, &[1, n], g.clone()), t32(&be, &[1, n], u.clone()));
    be.swiglu_backward(
        &gt,
        &ut,
        &t32(&be, &[1, n], probe.clone()),
        &mut dg,
        &mut du,
    )
    .unwrap();
    check_grad("swiglu/gate", &vals(&dg), &|x| run(x, &u), &g);
    check_grad("swiglu/up", &vals(&du), &|x| run(&g, x), &u);
}

#[test]
fn linear_backward_input_matches_finite_differences() {
    let be = Cpu::new();
    let mut rng = Rng::new(6);
    let (t, k, n) = (3, 17, 11);
    let x = rand_vec(&mut rng, t * k, 1.0);
    let w = rand_vec(&mut rng, n * k, 0.3);
    let probe = rand_vec(&mut rng, t * n, 1.0);
    // The backward of an int8 layer is dY · dequant(W): compare with the dense layer built
    // from the dequantized weights (the int8 forward itself is not differentiable).
    let (wq, ws) = quantize_rows(&w, n, k);
    let w_deq: Vec<f32> = (0..n * k).map(|i| wq[i] as f32 * ws[i / k]).collect();
    let dense = dense_linear(&be, &w_deq, n, k);
    let loss = |xv: &[f32]| {
        let mut o = t32(&be, &[t, n], vec![0.0; t * n]);
        be.linear(&t32(&be, &[t, k], xv.to_vec()), &dense, &mut o)
            .unwrap();
        vals(&o).iter().zip(&probe).map(|(a, b)| a * b).sum::<f32>()
    };
    for lin in [
        int8_linear(&be, &w, n, k, 6.0),
        dense_linear(&be, &w_deq, n, k),
    ] {
        let mut dx = t32(&be, &[t, k], vec![f32::NAN; t * k]);
        be.linear_backward_input(&t32(&be, &[t, n], probe.clone()), &lin, &mut dx, false)
            .unwrap();
        check_grad("linear", &vals(&dx), &loss, &x);
        // accumulate adds the same product to what dx held.
        let prior = rand_vec(&mut rng, t * k, 1.0);
        let mut acc = t32(&be, &[t, k], prior.clone());
        be.linear_backward_input(&t32(&be, &[t, n], probe.clone()), &lin, &mut acc, true)
            .unwrap();
        let want: Vec<f32> = prior.iter().zip(vals(&dx)).map(|(p, d)| p + d).collect();
        assert_eq!(vals(&acc), want);
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let be = Cpu::new();
    let mut rng = Rng::new(7);
    // Two packed sequences (lengths 3 and 4), 4 query heads sharing 2 KV heads, head_dim 6.
    let (h, kvh, hd) = (4, 2, 6);
    let t = 7;
    let spans = [
        SeqSpan {
            q_start: 0,
            q_len: 3,
            kv_start: 0,
            kv_len: 3,
        },
        SeqSpan {
            q_start: 3,
            q_len: 4,
            kv_start: 3,
            kv_len: 4,
        },
    ];
    let pos = vec![0, 1, 2, 0, 1, 2, 3];
    let q = rand_vec(&mut rng, t * h * hd, 1.0);
    let k = rand_vec(&mut rng, t * kvh * hd, 1.0);
    let v = rand_vec(&mut rng, t * kvh * hd, 1.0);
    let probe = rand_vec(&mut rng, t * h * hd, 1.0);
    let post = tu32(&be, pos.clone());
    let run = |q: &[f32], k: &[f32], v: &[f32]| {
        let mut o = t32(&be, &[t, h, hd], vec![0.0; t * h * hd]);
        be.attention(
            &t32(&be, &[t, h, hd], q.to_vec()),
            &t32(&be, &[t, kvh, hd], k.to_vec()),
            &t32(&be, &[t, kvh, hd], v.to_vec()),
            &post,
            &spans,
            &mut o,
        )
        .unwrap();
        vals(&o).iter().zip(&probe).map(|(a, b)| a * b).sum::<f32>()
    };
    let mut dq = t32(&be, &[t, h, hd], vec![0.0; t * h * hd]);
    let mut dk = t32(&be, &[t, kvh, hd], vec![0.0; t * kvh * hd]);
    let mut dv = t32(&be, &[t, kvh, hd], vec![0.0; t * kvh * hd]);
    be.attention_backward(
        &t32(&be, &[t, h, hd], q.clone()),
        &t32(&be, &[t, kvh, hd], k.clone()),
        &t32(&be, &[t, kvh, hd], v.clone()),
        &post,
        &spans,
        &t32(&be, &[t, h, hd], probe.clone()),
        &mut dq,
        &mut dk,
        &mut dv,
    )
    .unwrap();
    check_grad("attention/q", &vals(&dq), &|x| run(x, &k, &v), &q);
    check_grad("attention/k", &vals(&dk), &|x| run(&q, x, &v), &k);
    check_grad("attention/v", &vals(&dv), &|x| run(&q, &k, x), &v);
}

#[test]
fn attention_is_causal_and_sequences_are_separate() {
    // Changing a later key/value (or another sequence's) must not change earlier outputs.
    let be = Cpu::new();
    let mut rng = Rng::new(8);
    let (h, kvh, hd, t) = (2, 1, 4, 6);
    let spans = [
        SeqSpan {
            q_start: 0,
            q_len: 3,
            kv_start: 0,
            kv_len: 3,
        },
        SeqSpan {
            q_start: 3,
            q_len: 3,
            kv_start: 3,
            kv_len: 3,
        },
    ];
    let post = tu32(&be, vec![0, 1, 2, 0, 1, 2]);
    let q = rand_vec(&mut rng, t * h * hd, 1.0);
    let k = rand_vec(&mut rng, t * kvh * hd, 1.0);
    let mut v = rand_vec(&mut rng, t * kvh * hd, 1.0);
    let run = |v: &[f32]| {
        let mut o = t32(&be, &[t, h, hd], vec![f32::NAN; t * h * hd]);
        be.attention(
            &t32(&be, &[t, h, hd], q.clone()),
            &t32(&be, &[t, kvh, hd], k.clone()),
            &t32(&be, &[t, kvh, hd], v.to_vec()),
            &post,
            &spans,
            &mut o,
        )
        .unwrap();
        vals(&o)
    };
    let a = run(&v);
    // Position 0 of each sequence sees only its own first value row.
    for s in [0usize, 3] {
        for head in 0..h {
            assert_eq!(&a[(s * h + head) * hd..][..hd], &v[s * hd..(s + 1) * hd]);
        }
    }
    v[2 * hd] += 10.0; // the last value row of sequence 0
    let b = run(&v);
    assert_eq!(&a[..2 * h * hd], &b[..2 * h * hd], "rows 0-1 unchanged");
    assert_ne!(
        &a[2 * h * hd..3 * h * hd],
        &b[2 * h * hd..3 * h * hd],
        "row 2 changed"
    );
    assert_eq!(&a[3 * h * hd..], &b[3 * h * hd..], "sequence 1 unchanged");
}

#[test]
fn rope_matches_the_complex_rotation_and_inverts() {
    let be = Cpu::new();
    let mut rng = Rng::new(9);
    let (t, h, hd, theta) = (3, 2, 8, 500.0f32);
    let x = rand_vec(&mut rng, t * h * hd, 1.0);
    let pos = vec![0u32, 7, 1000];
    let mut xt = t32(&be, &[t, h, hd], x.clone());
    be.rope(&mut xt, &tu32(&be, pos.clone()), theta, false)
        .unwrap();
    let y = vals(&xt);
    // Pair (i, i + hd/2) is the complex number a + ib rotated by pos·theta^(-2i/hd).
    for r in 0..t {
        for head in 0..h {
            let base = (r * h + head) * hd;
            for i in 0..hd / 2 {
                let ang = pos[r] as f64 * (theta as f64).powf(-((2 * i) as f64) / hd as f64);
                let (a, b) = (x[base + i] as f64, x[base + i + hd / 2] as f64);
                let (re, im) = (a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos());
                assert!(
                    (y[base + i] as f64 - re).abs() < 1e-5
                        && (y[base + i + hd / 2] as f64 - im).abs() < 1e-5
                );
            }
        }
    }
    be.rope(&mut xt, &tu32(&be, pos), theta, true).unwrap();
    for (a, b) in vals(&xt).iter().zip(&x) {
        assert!((a - b).abs() < 1e-5);
    }
}

#[test]
fn ops_reject_wrong_shapes() {
    let be = Cpu::new();
    let x = t32(&be, &[2, 4], vec![0.0; 8]);
    let mut out = t32(&be, &[2, 5], vec![0.0; 10]);
    let w = t32(&be, &[4], vec![1.0; 4]);
    let e = be.rmsnorm(&x, &w, 1e-5, &mut out).unwrap_err().to_string();
    assert!(e.contains("rmsnorm") && e.contains("out"), "{e}");
    let lin = dense_linear(&be, &[0.0; 12], 3, 4);
    let e = be.linear(&x, &lin, &mut out).unwrap_err().to_string();
    assert!(e.contains("linear"), "{e}");
    let table = t32(&be, &[3, 4], vec![0.0; 12]);
    let mut o = t32(&be, &[1, 4], vec![0.0; 4]);
    let e = be
        .embedding(&table, &tu32(&be, vec![3]), &mut o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}

#[test]
fn cross_entropy_matches_its_definition_and_finite_differences() {
    let be = Cpu::new();
    let mut rng = Rng::new(10);
    let (t, v) = (4, 37);
    let x = rand_vec(&mut rng, t * v, 2.0);
    let labels = vec![3u32, crate::backend::IGNORE_LABEL, 36, 0];
    let lt = tu32(&be, labels.clone());
    let run = |xv: &[f32], scale: f32| {
        let mut lg = t32(&be, &[t, v], xv.to_vec());
        let mut loss = t32(&be, &[t], vec![f32::NAN; t]);
        be.cross_entropy(&mut lg, &lt, scale, &mut loss).unwrap();
        (vals(&lg), vals(&loss))
    };
    let (grad, loss) = run(&x, 0.5);
    for r in 0..t {
        let row = &x[r * v..(r + 1) * v];
        if labels[r] == crate::backend::IGNORE_LABEL {
            assert_eq!(loss[r], 0.0);
            assert!(grad[r * v..(r + 1) * v].iter().all(|g| *g == 0.0));
            continue;
        }
        // -ln(e^{x_l} / Σ e^{x_j}), straight from the definition (logits are small here).
        let z: f64 = row.iter().map(|x| (*x as f64).exp()).sum();
        let want = -((row[labels[r] as usize] as f64).exp() / z).ln();
        assert!(
            (loss[r] as f64 - want).abs() < 1e-5,
            "row {r}: {} vs {want}",
            loss[r]
        );
    }
    // d(0.5 · Σ loss)/dx by central differences.
    check_grad(
        "cross_entropy",
        &grad,
        &|xv| run(xv, 1.0).1.iter().sum::<f32>() * 0.5,
        &x,
    );
    let mut lg = t32(&be, &[1, v], vec![0.0; v]);
    let mut loss = t32(&be, &[1], vec![0.0]);
    let e = be
        .cross_entropy(&mut lg, &tu32(&be, vec![37]), 1.0, &mut loss)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}

#[test]
fn adamw_first_step_and_weight_decay_follow_the_paper() {
    // Adam's first bias-corrected step is lr · g / (|g| + eps) ≈ lr · sign(g); decoupled weight
    // decay shrinks the parameter by lr · wd · p whatever the gradient.
    let be = Cpu::new();
    let hp = AdamW {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let p0 = vec![1.0f32, -2.0, 0.5, 3.0];
    let g = vec![0.3f32, -4.0, 0.0, 1e-3];
    let mut p = t32(&be, &[4], p0.clone());
    let mut m = t32(&be, &[4], vec![0.0; 4]);
    let mut v = t32(&be, &[4], vec![0.0; 4]);
    be.adamw(
        &mut p,
        &t32(&be, &[4], g.clone()),
        &mut m,
        &mut v,
        hp,
        1,
        1.0,
    )
    .unwrap();
    let got = vals(&p);
    for i in 0..4 {
        let decayed = p0[i] * (1.0 - hp.lr * hp.weight_decay);
        let step = if g[i] == 0.0 {
            0.0
        } else {
            hp.lr * g[i].signum()
        };
        assert!(
            (got[i] - (decayed - step)).abs() < 1e-5,
            "element {i}: {} vs {}",
            got[i],
            decayed - step
        );
    }
    // grad_scale multiplies the gradient before the moments: m = (1 − β1) · g · scale.
    let mut m2 = t32(&be, &[4], vec![0.0; 4]);
    let mut v2 = t32(&be, &[4], vec![0.0; 4]);
    let mut p2 = t32(&be, &[4], p0.clone());
    be.adamw(
        &mut p2,
        &t32(&be, &[4], g.clone()),
        &mut m2,
        &mut v2,
        hp,
        1,
        0.5,
    )
    .unwrap();
    for i in 0..4 {
        assert!((vals(&m2)[i] - 0.1 * g[i] * 0.5).abs() < 1e-7);
    }
    assert!(be
        .adamw(&mut p2, &t32(&be, &[4], g), &mut m2, &mut v2, hp, 0, 1.0)
        .is_err());
}

#[test]
fn sum_squares_is_exact_on_integers() {
    let be = Cpu::new();
    let x: Vec<f32> = (0..1001).map(|i| (i % 17) as f32 - 8.0).collect();
    let want: f32 = x.iter().map(|v| v * v).sum();
    let mut out = t32(&be, &[1], vec![f32::NAN]);
    be.sum_squares(&t32(&be, &[1001], x), &mut out).unwrap();
    assert_eq!(vals(&out)[0], want);
}

#[test]
fn lora_backward_matches_finite_differences() {
    use crate::backend::{Dropout, Lora};
    let be = Cpu::new();
    let mut rng = Rng::new(11);
    let (m, k, r, n) = (3, 9, 4, 5);
    let x = rand_vec(&mut rng, m * k, 1.0);
    let a = rand_vec(&mut rng, r * k, 0.5);
    let b = rand_vec(&mut rng, n * r, 0.5);
    let gate = rand_vec(&mut rng, m * r, 1.0);
    let probe = rand_vec(&mut rng, m * n, 1.0);
    let drop = Dropout { p: 0.3, seed: 42 };
    let scale = 2.0;
    let loss = |x: &[f32], a: &[f32], b: &[f32], gate: &[f32]| {
        let lora = Lora {
            a: t32(&be, &[r, k], a.to_vec()),
            b: t32(&be, &[n, r], b.to_vec()),
            scale,
        };
        let mut h = t32(&be, &[m, r], vec![0.0; m * r]);
        let mut u = t32(&be, &[m, r], vec![0.0; m * r]);
        let mut y = t32(&be, &[m, n], vec![0.0; m * n]);
        be.lora_forward(
            &t32(&be, &[m, k], x.to_vec()),
            &lora,
            &t32(&be, &[m, r], gate.to_vec()),
            drop,
            &mut h,
            &mut u,
            &mut y,
        )
        .unwrap();
        vals(&y).iter().zip(&probe).map(|(p, q)| p * q).sum::<f32>()
    };
    let lora = Lora {
        a: t32(&be, &[r, k], a.clone()),
        b: t32(&be, &[n, r], b.clone()),
        scale,
    };
    let xt = t32(&be, &[m, k], x.clone());
    let gt = t32(&be, &[m, r], gate.clone());
    let mut h = t32(&be, &[m, r], vec![0.0; m * r]);
    let mut u = t32(&be, &[m, r], vec![0.0; m * r]);
    let mut y = t32(&be, &[m, n], vec![0.0; m * n]);
    be.lora_forward(&xt, &lora, &gt, drop, &mut h, &mut u, &mut y)
        .unwrap();
    let mut da = t32(&be, &[r, k], vec![0.0; r * k]);
    let mut db = t32(&be, &[n, r], vec![0.0; n * r]);
    let mut dg = t32(&be, &[m, r], vec![f32::NAN; m * r]);
    let mut dx = t32(&be, &[m, k], vec![0.0; m * k]);
    be.lora_backward(
        &xt,
        &lora,
        &gt,
        drop,
        &h,
        &u,
        &t32(&be, &[m, n], probe.clone()),
        &mut da,
        &mut db,
        &mut dg,
        &mut dx,
    )
    .unwrap();
    check_grad("lora/A", &vals(&da), &|v| loss(&x, v, &b, &gate), &a);
    check_grad("lora/B", &vals(&db), &|v| loss(&x, &a, v, &gate), &b);
    check_grad("lora/gate", &vals(&dg), &|v| loss(&x, &a, &b, v), &gate);
    check_grad("lora/x", &vals(&dx), &|v| loss(v, &a, &b, &gate), &x);
    // Dropout really drops (about p of the inputs) and is a pure function of (seed, index).
    let kept = (0..10_000u64)
        .filter(|&i| crate::backend::dropout_keep(42, i, 0.3))
        .count();
    assert!(
        (6700..7300).contains(&kept),
        "kept {kept} of 10000 at p = 0.3"
    );
    assert!((0..100u64).all(
        |i| crate::backend::dropout_keep(7, i, 0.3) == crate::backend::dropout_keep(7, i, 0.3)
    ));
}

/// The attention forward and the blocked backward (64 query rows per block, GEMMs over the
/// keys a block can see) against the per-row definition in f64: one sequence of 150 tokens (three blocks, the later
/// ones seeing more keys) and one whose 100 queries follow a 70-token prefix already in the
/// cache (positions 70..169 over 170 keys), 6 query heads over 2 KV heads, head_dim 20 (not a
/// multiple of the 16-column kernel). Outputs start as NaN, so an unwritten row fails.
#[test]
fn blocked_attention_matches_the_per_row_definition() {
    let be = Cpu::new();
    let mut rng = Rng::new(17);
    let (h, kvh, hd) = (6, 2, 20);
    let spans = [
        SeqSpan {
            q_start: 0,
            q_len: 150,
            kv_start: 0,
            kv_len: 150,
        },
        SeqSpan {
            q_start: 150,
            q_len: 100,
            kv_start: 150,
            kv_len: 170,
        },
    ];
    let (tq, tk) = (250, 320);
    let pos: Vec<u32> = (0..150).chain(70..170).collect();
    let q = rand_vec(&mut rng, tq * h * hd, 1.0);
    let k = rand_vec(&mut rng, tk * kvh * hd, 1.0);
    let v = rand_vec(&mut rng, tk * kvh * hd, 1.0);
    let dy = rand_vec(&mut rng, tq * h * hd, 1.0);

    // The definition, row by row in f64.
    let scale = 1.0 / (hd as f64).sqrt();
    let mut o_ref = vec![0f64; q.len()];
    let (mut dq_ref, mut dk_ref, mut dv_ref) = (
        vec![0f64; q.len()],
        vec![0f64; k.len()],
        vec![0f64; v.len()],
    );
    for s in &spans {
        for i in 0..s.q_len {
            let t = s.q_start + i;
            let vis = (pos[t] as usize + 1).min(s.kv_len);
            for head in 0..h {
                let kh = head / (h / kvh);
                let qv = |c: usize| q[(t * h + head) * hd + c] as f64;
                let krow = |j: usize| ((s.kv_start + j) * kvh + kh) * hd;
                let sc: Vec<f64> = (0..vis)
                    .map(|j| (0..hd).map(|c| qv(c) * k[krow(j) + c] as f64).sum::<f64>() * scale)
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - m).exp() / z).collect();
                let dyv = |c: usize| dy[(t * h + head) * hd + c] as f64;
                let dp: Vec<f64> = (0..vis)
                    .map(|j| (0..hd).map(|c| dyv(c) * v[krow(j) + c] as f64).sum())
                    .collect();
                let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..vis {
                    let ds = p[j] * (dp[j] - pdp) * scale;
                    for c in 0..hd {
                        o_ref[(t * h + head) * hd + c] += p[j] * v[krow(j) + c] as f64;
                        dq_ref[(t * h + head) * hd + c] += ds * k[krow(j) + c] as f64;
                        dk_ref[krow(j) + c] += ds * qv(c);
                        dv_ref[krow(j) + c] += p[j] * dyv(c);
                    }
                }
            }
        }
    }

    let post = tu32(&be, pos.clone());
    let (qt, kt, vt) = (
        t32(&be, &[tq, h, hd], q.clone()),
        t32(&be, &[tk, kvh, hd], k.clone()),
        t32(&be, &[tk, kvh, hd], v.clone()),
    );
    let nan = |shape: &[usize]| t32(&be, shape, vec![f32::NAN; shape.iter().product()]);
    let mut o = nan(&[tq, h, hd]);
    be.attention(&qt, &kt, &vt, &post, &spans, &mut o).unwrap();
    let (mut dq, mut dk, mut dv) = (nan(&[tq, h, hd]), nan(&[tk, kvh, hd]), nan(&[tk, kvh, hd]));
    be.attention_backward(
        &qt,
        &kt,
        &vt,
        &post,
        &spans,
        &t32(&be, &[tq, h, hd], dy.clone()),
        &mut dq,
        &mut dk,
        &mut dv,
    )
    .unwrap();
    // Relative L2 error: f32 sums of ≤ 170 terms of unit size, ~1e-6 expected; a block that
    // saw the wrong keys, or a row left out, is O(1).
    let rel = |got: &Tensor<Cpu>, want: &[f64]| {
        let g = vals(got);
        let num: f64 = g
            .iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - b).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        (num / den).sqrt()
    };
    for (name, got, want) in [
        ("o", &o, &o_ref),
        ("dq", &dq, &dq_ref),
        ("dk", &dk, &dk_ref),
        ("dv", &dv, &dv_ref),
    ] {
        let e = rel(got, want);
        assert!(e < 1e-5, "{name}: relative L2 error {e:e}");
    }
}

#[test]
fn tiled_transpose_is_the_transpose() {
    let mut rng = Rng::new(3);
    for (rows, cols) in [
        (1, 1),
        (1, 37),
        (37, 1),
        (16, 16),
        (17, 15),
        (64, 33),
        (100, 7),
    ] {
        let x = rand_vec(&mut rng, rows * cols, 1.0);
        let t = transpose(&x, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(
                    t[c * rows + r],
                    x[r * cols + c],
                    "{rows}×{cols} at ({r}, {c})"
                );
            }
        }
    }
}
