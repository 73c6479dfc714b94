//! Sampling (kernels/sampling.cu) against the reference `backend::sampling::sample_row`: exact
//! token agreement for the same uniform numbers, on the simulator always and on CUDA when a GPU
//! is usable; a chi-square test that the draws follow the renormalised top-k ∩ top-p
//! distribution, computed independently here with a sort in f64; the edge cases; and token
//! log-probabilities against the f64 reference.

mod common;

use common::devices;
use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::backend::Gpu;
use recforge::backend::gpu::ops::sampling as ops;
use recforge::backend::gpu::Device;
use recforge::backend::sampling::{kept_weights, sample_row, token_logprobs_row, WEIGHT_BITS};
use recforge::backend::{Backend, SamplingParams};
use recforge::rng::Rng;
use recforge::tensor::HostTensor;

const POISON: u32 = 0xDEAD_BEEF;

fn sp(temperature: f32, top_k: u32, top_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
    }
}

/// Runs the kernel on `dev` with the output poisoned first.
fn device_sample(
    dev: &Device,
    logits: &[f32],
    v: usize,
    params: &[SamplingParams],
    u: &[f32],
) -> Vec<u32> {
    let rows = params.len();
    let packed = ops::pack_params(rows, params, u).unwrap();
    let mut tokens = dev.upload(&vec![POISON; rows]).unwrap();
    ops::sample(
        dev,
        &dev.upload(logits).unwrap(),
        &dev.upload(&packed).unwrap(),
        &mut tokens,
        rows,
        v,
    )
    .unwrap();
    dev.download(&tokens).unwrap()
}

/// A row of logits of one of several kinds: plain Gaussian, coarse (many ties), with −∞
/// entries, or one dominant token.
fn logits_row(rng: &mut Rng, v: usize, kind: usize) -> Vec<f32> {
    (0..v)
        .map(|i| {
            let x = 3.0 * rng.normal();
            match kind % 4 {
                0 => x,
                1 => (x * 2.0).round() / 2.0,
                2 if i % 3 == 1 => f32::NEG_INFINITY,
                2 => x,
                _ if i == v / 2 => 40.0,
                _ => x,
            }
        })
        .collect()
}

fn params_for(row: usize, v: usize) -> SamplingParams {
    match row % 11 {
        0 => SamplingParams::GREEDY,
        1 => SamplingParams::ITREK,
        2 => sp(1.0, 0, 1.0),
        3 => sp(0.7, 50, 0.9),
        4 => sp(1.3, v as u32 + 5, 0.5),
        5 => sp(1e-4, 1, 1.0),
        6 => sp(2.0, 3, 0.0),
        7 => sp(0.9, 0, 0.95),
        // Hot rows, where the top-k or top-p cut decides the token often.
        8 => sp(8.0, 5, 1.0),
        9 => sp(8.0, 0, 0.3),
        _ => sp(4.0, 20, 0.6),
    }
}

#[test]
fn sample_matches_the_reference_exactly() {
    let mut rng = Rng::new(77);
    // Odd vocabularies and the two real ones; rows cover every parameter kind and logit kind.
    let shapes = [
        (1, 1),
        (33, 17),
        (24, 1000),
        (11, 32000),
        (3, 49152),
        (9, 7),
        (88, 50),
    ];
    for dev in devices() {
        for (rows, v) in shapes {
            let mut logits = vec![];
            for r in 0..rows {
                logits.extend(logits_row(&mut rng, v, r / 2));
            }
            let params: Vec<SamplingParams> = (0..rows).map(|r| params_for(r, v)).collect();
            // u = 0 now and then: the draw must skip leading tokens that are not kept.
            let mut u: Vec<f32> = (0..rows)
                .map(|r| if r % 5 == 4 { 0.0 } else { rng.uniform() })
                .collect();
            u[0] = 0.0;
            if rows > 1 {
                u[rows - 1] = 1.0 - f32::EPSILON / 2.0; // the largest f32 below 1
            }
            let got = device_sample(&dev, &logits, v, &params, &u);
            for r in 0..rows {
                let row = &logits[r * v..(r + 1) * v];
                let want = sample_row(row, &params[r], u[r]).expect("a valid row");
                assert_eq!(
                    got[r],
                    want,
                    "{}: {rows}×{v} row {r} ({:?}, u {})",
                    dev.name(),
                    params[r],
                    u[r]
                );
            }
        }
    }
}

/// Hugging Face's warpers in f64 with a sort: softmax(l / T), top-k keeping ties at the k-th
/// value, then top-p keeping the leading tokens while the mass before them is < p (the first
/// always), ties kept together. Returns the renormalised probabilities.
fn sorted_reference(l: &[f32], p: &SamplingParams) -> Vec<f64> {
    let v = l.len();
    let mut idx: Vec<usize> = (0..v).collect();
    idx.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap());
    let kth = if p.top_k > 0 && (p.top_k as usize) < v {
        l[idx[p.top_k as usize - 1]]
    } else {
        f32::NEG_INFINITY
    };
    let m = l[idx[0]] as f64;
    let t = p.temperature as f64;
    let mut prob: Vec<f64> = l
        .iter()
        .map(|&x| {
            if x >= kth {
                ((x as f64 - m) / t).exp()
            } else {
                0.0
            }
        })
        .collect();
    let total: f64 = prob.iter().sum();
    prob.iter_mut().for_each(|x| *x /= total);
    if p.top_p < 1.0 {
        let (mut before, mut i) = (0.0, 0);
        let mut keep = vec![false; v];
        while i < v && (before < p.top_p as f64 || i == 0) {
            let x = l[idx[i]];
            while i < v && l[idx[i]] == x {
                keep[idx[i]] = true;
                before += prob[idx[i]];
                i += 1;
            }
        }
        for j in 0..v {
            if !keep[j] {
                prob[j] = 0.0;
            }
        }
        let total: f64 = prob.iter().sum();
        prob.iter_mut().for_each(|x| *x /= total);
    }
    prob
}

#[test]
fn the_kept_set_equals_the_sorted_f64_one() {
    let mut rng = Rng::new(5);
    for case in 0..300 {
        let v = 1 + (case * 37) % 400;
        let l = logits_row(&mut rng, v, case);
        let p = params_for(case, v);
        if p.temperature == 0.0 {
            continue;
        }
        let want = sorted_reference(&l, &p);
        let got = kept_weights(&l, &p).unwrap();
        let top = want.iter().cloned().fold(0.0, f64::max);
        for j in 0..v {
            // A kept token can weigh 0 only when it is below the fixed point's floor, 2^-40 of the
            // most likely token; otherwise kept ⇔ kept.
            let floor = top * 2f64.powi(-WEIGHT_BITS + 1);
            assert!(
                (got[j] > 0) == (want[j] > 0.0) || (want[j] > 0.0 && want[j] < floor),
                "case {case} (v {v}, {p:?}): token {j} kept {} vs {} (p {})",
                got[j] > 0,
                want[j] > 0.0,
                want[j]
            );
        }
    }
}

/// Upper 0.1% point of chi-square with `df` degrees of freedom (Wilson–Hilferty; within 1% of
/// the tables for df ≥ 3).
fn chi2_crit_001(df: usize) -> f64 {
    let (k, z) = (df as f64, 3.0902);
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

/// Pearson's statistic over bins with an expected count ≥ 5 (smaller ones pooled); returns
/// (statistic, degrees of freedom).
fn chi_square(counts: &[u64], probs: &[f64], n: u64) -> (f64, usize) {
    let (mut stat, mut bins) = (0.0, 0);
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (c, p) in counts.iter().zip(probs) {
        let e = p * n as f64;
        if e == 0.0 {
            assert_eq!(*c, 0, "a token outside top-k ∩ top-p was drawn");
            continue;
        }
        if e < 5.0 {
            pool_o += *c as f64;
            pool_e += e;
            continue;
        }
        stat += (*c as f64 - e).powi(2) / e;
        bins += 1;
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e;
        bins += 1;
    }
    (stat, bins - 1)
}

#[test]
fn draws_follow_the_renormalised_top_k_top_p_distribution() {
    let mut rng = Rng::new(2024);
    let v = 40;
    let l: Vec<f32> = (0..v).map(|_| 1.5 * rng.normal()).collect();
    let devs = devices();
    for p in [sp(0.8, 12, 0.9), sp(1.0, 0, 1.0), sp(1.7, 25, 0.7)] {
        let probs = sorted_reference(&l, &p);
        // The reference on many draws, the devices on fewer (their exact agreement with the
        // reference is tested above; this checks the kernel path end to end).
        let mut runs: Vec<(String, u64)> = vec![("cpu".into(), 20_000)];
        for dev in &devs {
            runs.push((dev.name().to_string(), 2_000));
        }
        for (name, n) in runs {
            let u: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
            let tokens: Vec<u32> = if name == "cpu" {
                u.iter().map(|&x| sample_row(&l, &p, x).unwrap()).collect()
            } else {
                let dev = devs.iter().find(|d| d.name() == name).unwrap();
                let params = vec![p; n as usize];
                let rows: Vec<f32> = (0..n).flat_map(|_| l.iter().cloned()).collect();
                device_sample(dev, &rows, v, &params, &u)
            };
            let mut counts = vec![0u64; v];
            for t in tokens {
                counts[t as usize] += 1;
            }
            let (stat, df) = chi_square(&counts, &probs, n);
            assert!(df >= 2, "{p:?}: too few bins ({df}) for a meaningful test");
            let crit = chi2_crit_001(df);
            assert!(
                stat < crit,
                "{name} {p:?}: chi-square {stat:.1} ≥ {crit:.1} (df {df})"
            );
        }
    }
}

#[test]
fn edge_cases() {
    let mut rng = Rng::new(3);
    let v = 300;
    let distinct: Vec<f32> = (0..v).map(|i| ((i * 7919) % v) as f32 * 0.01).collect();
    let argmax = distinct
        .iter()
        .enumerate()
        .fold(0, |b, (i, x)| if *x > distinct[b] { i } else { b }) as u32;
    let mut us: Vec<f32> = (0..64).map(|_| rng.uniform()).collect();
    us[0] = 0.0;
    us[1] = 1.0 - f32::EPSILON / 2.0;
    for dev in devices() {
        let check = |l: &[f32], p: SamplingParams, want: &dyn Fn(f32) -> u32, what: &str| {
            let rows: Vec<f32> = us.iter().flat_map(|_| l.iter().cloned()).collect();
            let got = device_sample(&dev, &rows, l.len(), &vec![p; us.len()], &us);
            for (i, &u) in us.iter().enumerate() {
                assert_eq!(got[i], want(u), "{}: {what}, u {u}", dev.name());
                assert_eq!(sample_row(l, &p, u), Some(got[i]), "reference: {what}");
            }
        };
        check(&distinct, sp(1.0, 1, 1.0), &|_| argmax, "k = 1");
        check(&distinct, sp(1.0, 0, 0.0), &|_| argmax, "p = 0");
        check(&distinct, sp(1.0, 0, 1e-9), &|_| argmax, "p → 0");
        check(&distinct, sp(1e-6, 0, 1.0), &|_| argmax, "temperature → 0");
        check(&distinct, sp(0.0, 5, 0.5), &|_| argmax, "temperature 0");
        // k ≥ vocabulary is no limit: the same token as k = 0 for the same u.
        let same = |u| sample_row(&distinct, &sp(1.0, 0, 1.0), u).unwrap();
        check(&distinct, sp(1.0, v as u32, 1.0), &same, "k = vocab");
        check(&distinct, sp(1.0, u32::MAX, 1.0), &same, "k > vocab");
        // All ties: uniform over the vocabulary, token ⌊u·V⌋.
        let flat = vec![0.5f32; v];
        check(
            &flat,
            sp(1.0, 0, 1.0),
            &|u| (u as f64 * v as f64) as u32,
            "all tied",
        );
        // Ties at the maximum with greedy: the lowest index; k = 1 keeps both tied tokens.
        let mut tied = distinct.clone();
        tied[3] = 100.0;
        tied[200] = 100.0;
        check(&tied, sp(0.0, 0, 1.0), &|_| 3, "greedy tie");
        check(
            &tied,
            sp(1.0, 1, 1.0),
            &|u| if u < 0.5 { 3 } else { 200 },
            "k = 1 with a tie",
        );
        // −∞ logits are never drawn, even with u near 1.
        let mut masked = distinct.clone();
        for (i, x) in masked.iter_mut().enumerate() {
            if i % 2 == 0 {
                *x = f32::NEG_INFINITY;
            }
        }
        let rows: Vec<f32> = us.iter().flat_map(|_| masked.iter().cloned()).collect();
        let got = device_sample(&dev, &rows, v, &vec![sp(5.0, 0, 1.0); us.len()], &us);
        assert!(got.iter().all(|t| t % 2 == 1), "{}: {got:?}", dev.name());
    }
}

#[test]
fn rows_without_a_distribution_are_errors_naming_the_row() {
    let v = 10;
    let mut logits = vec![0.25f32; 3 * v];
    logits[v + 4] = f32::NAN;
    let gpus: Vec<Gpu> = devices().into_iter().map(Gpu::new).collect();
    let params = vec![SamplingParams::ITREK; 3];
    let u = [0.1, 0.2, 0.3];
    let host = HostTensor::f32(vec![3, v], logits.clone()).unwrap();
    let cpu = Cpu::new();
    let e = cpu
        .sample(&cpu.upload(&host).unwrap(), &params, &u)
        .unwrap_err();
    assert!(e.to_string().contains("row 1"), "{e}");
    for g in &gpus {
        let e = g
            .sample(&g.upload(&host).unwrap(), &params, &u)
            .unwrap_err();
        assert!(e.to_string().contains("row 1"), "{}: {e}", g.name());
    }
    // All −∞ in row 2, +∞ in row 0.
    logits[v + 4] = 0.0;
    logits[3] = f32::INFINITY;
    let host = HostTensor::f32(vec![3, v], logits.clone()).unwrap();
    let e = cpu
        .sample(&cpu.upload(&host).unwrap(), &params, &u)
        .unwrap_err();
    assert!(e.to_string().contains("row 0"), "{e}");
    logits[3] = 0.0;
    logits[2 * v..].fill(f32::NEG_INFINITY);
    let host = HostTensor::f32(vec![3, v], logits).unwrap();
    for g in &gpus {
        let e = g
            .sample(&g.upload(&host).unwrap(), &params, &u)
            .unwrap_err();
        assert!(e.to_string().contains("row 2"), "{}: {e}", g.name());
    }
    // Bad parameters and uniforms are refused before anything runs.
    let bad = [
        sp(-0.5, 0, 1.0),
        sp(1.0, 0, 1.01),
        sp(f32::INFINITY, 0, 1.0),
    ];
    let ok = HostTensor::f32(vec![1, v], vec![0.0; v]).unwrap();
    for p in bad {
        assert!(cpu.sample(&cpu.upload(&ok).unwrap(), &[p], &[0.5]).is_err());
        for g in &gpus {
            assert!(g.sample(&g.upload(&ok).unwrap(), &[p], &[0.5]).is_err());
        }
    }
    for u in [1.0, -0.1, f32::NAN] {
        assert!(cpu
            .sample(&cpu.upload(&ok).unwrap(), &[SamplingParams::ITREK], &[u])
            .is_err());
    }
}

#[test]
fn token_logprobs_match_the_reference() {
    let mut rng = Rng::new(11);
    for dev in devices() {
        for (rows, v, n) in [(1, 1, 1), (3, 17, 2), (5, 32000, 3), (2, 49152, 2)] {
            let logits: Vec<f32> = (0..rows * v).map(|_| 4.0 * rng.normal()).collect();
            let ids: Vec<u32> = (0..rows * n).map(|_| rng.below(v as u64) as u32).collect();
            let mut out = dev.upload(&vec![f32::NAN; rows * n]).unwrap();
            ops::token_logprobs(
                &dev,
                &dev.upload(&logits).unwrap(),
                &dev.upload(&ids).unwrap(),
                &mut out,
                rows,
                v,
            )
            .unwrap();
            let got = dev.download(&out).unwrap();
            for r in 0..rows {
                let want =
                    token_logprobs_row(&logits[r * v..(r + 1) * v], &ids[r * n..(r + 1) * n]);
                for j in 0..n {
                    // f32 online softmax (expf/logf within 2 ulp, V roundings of the sum) vs f64:
                    // logsumexp agrees to ~V·2^-24 relative, as the cross-entropy test argues.
                    let tol = 1e-5 + v as f32 * 6e-8 * 4.0;
                    let g = got[r * n + j];
                    assert!(
                        (g - want[j]).abs() <= tol,
                        "{}: {rows}×{v} row {r} id {}: {g} vs {}",
                        dev.name(),
                        ids[r * n + j],
                        want[j]
                    );
                }
            }
        }
    }
    // Through the backends, an id outside the vocabulary is an error.
    let cpu = Cpu::new();
    let t = cpu
        .upload(&HostTensor::f32(vec![2, 4], vec![0.0; 8]).unwrap())
        .unwrap();
    assert!(cpu.token_logprobs(&t, &[0, 4]).is_err());
    assert!(cpu.token_logprobs(&t, &[0, 1, 2]).is_err());
    let lp = cpu.token_logprobs(&t, &[0, 3]).unwrap();
    assert!(lp.iter().all(|x| (x - (0.25f32).ln()).abs() < 1e-6));
}

#[test]
fn backends_sample_the_reference_token() {
    // Through `Backend::sample` (parameter packing, upload, launch, download) on every backend.
    let mut rng = Rng::new(8);
    let (rows, v) = (12, 333);
    let mut logits = vec![];
    for r in 0..rows {
        logits.extend(logits_row(&mut rng, v, r));
    }
    let params: Vec<SamplingParams> = (0..rows).map(|r| params_for(r, v)).collect();
    let u: Vec<f32> = (0..rows).map(|_| rng.uniform()).collect();
    let want: Vec<u32> = (0..rows)
        .map(|r| sample_row(&logits[r * v..(r + 1) * v], &params[r], u[r]).unwrap())
        .collect();
    let host = HostTensor::f32(vec![rows, v], logits).unwrap();
    let cpu = Cpu::new();
    assert_eq!(
        cpu.sample(&cpu.upload(&host).unwrap(), &params, &u)
            .unwrap(),
        want
    );
    for g in devices().into_iter().map(Gpu::new) {
        assert_eq!(
            g.sample(&g.upload(&host).unwrap(), &params, &u).unwrap(),
            want,
            "{}",
            g.name()
        );
    }
}
