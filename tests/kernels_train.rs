//! The training kernels (cross-entropy, AdamW, gradient-norm reduction) against their CPU
//! references, on the simulator always and on CUDA when a GPU is usable. Outputs poisoned.

mod common;

use common::devices;
use half::bf16;
use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::ops::{loss, optim};
use recforge::backend::{AdamW, Backend, IGNORE_LABEL};
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

fn cpu_ce(x: &[f32], labels: &[u32], v: usize, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let cpu = Cpu::new();
    let t = labels.len();
    let mut lg = cpu
        .upload(&HostTensor::f32(vec![t, v], x.to_vec()).unwrap())
        .unwrap();
    let lt = cpu
        .upload(&HostTensor::new(vec![t], HostData::U32(labels.to_vec())).unwrap())
        .unwrap();
    let mut loss = cpu.zeros(&[t], DType::F32).unwrap();
    cpu.cross_entropy(&mut lg, &lt, scale, &mut loss).unwrap();
    (
        cpu.download(&lg).unwrap().to_f32().unwrap(),
        cpu.download(&loss).unwrap().to_f32().unwrap(),
    )
}

fn labels_for(rng: &mut Rng, t: usize, v: usize) -> Vec<u32> {
    (0..t)
        .map(|i| {
            if i % 5 == 2 {
                IGNORE_LABEL
            } else {
                rng.below(v as u64) as u32
            }
        })
        .collect()
}

// Odd vocabularies, and the two real ones.
const CE_SHAPES: [(usize, usize); 5] = [(1, 1), (3, 17), (7, 1000), (5, 32000), (2, 49152)];

#[test]
fn cross_entropy_f32_matches_the_cpu_reference() {
    let mut rng = Rng::new(21);
    for dev in devices() {
        for (t, v) in CE_SHAPES {
            let x: Vec<f32> = (0..t * v).map(|_| 4.0 * rng.normal()).collect();
            let labels = labels_for(&mut rng, t, v);
            let (want_g, want_l) = cpu_ce(&x, &labels, v, 0.25);
            let mut lg = dev.upload(&x).unwrap();
            let lb = dev.upload(&labels).unwrap();
            let mut l = dev.upload(&vec![f32::NAN; t]).unwrap();
            loss::cross_entropy(&dev, &mut lg, &lb, 0.25, &mut l, t, v).unwrap();
            let (g, l) = (dev.download(&lg).unwrap(), dev.download(&l).unwrap());
            for r in 0..t {
                // expf/logf are within 2 ulp and the sum of V exponentials rounds V times in f32:
                // the loss (an O(1..10) number) agrees to V·2^-24 relative of lse, ≲ 1e-3 absolute
                // at V = 49152; probabilities to 1e-6 absolute.
                let tol = 1e-5 + v as f32 * 6e-8 * 4.0;
                assert!(
                    (l[r] - want_l[r]).abs() <= tol,
                    "{}: {t}×{v} row {r}: loss {} vs {}",
                    dev.name(),
                    l[r],
                    want_l[r]
                );
            }
            for (i, (a, b)) in g.iter().zip(&want_g).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 + 1e-4 * b.abs(),
                    "{}: {t}×{v} grad {i}: {a} vs {b}",
                    dev.name()
                );
            }
        }
    }
}

#[test]
fn cross_entropy_bf16_matches_the_cpu_reference() {
    let mut rng = Rng::new(22);
    for dev in devices() {
        for (t, v) in CE_SHAPES {
            let x: Vec<bf16> = (0..t * v)
                .map(|_| bf16::from_f32(4.0 * rng.normal()))
                .collect();
            let xf: Vec<f32> = x.iter().map(|b| b.to_f32()).collect();
            let labels = labels_for(&mut rng, t, v);
            let (want_g, want_l) = cpu_ce(&xf, &labels, v, 1.0);
            let mut lg = dev.upload(&x).unwrap();
            let lb = dev.upload(&labels).unwrap();
            let mut l = dev.upload(&vec![f32::NAN; t]).unwrap();
            loss::cross_entropy(&dev, &mut lg, &lb, 1.0, &mut l, t, v).unwrap();
            let (g, l) = (dev.download(&lg).unwrap(), dev.download(&l).unwrap());
            for r in 0..t {
                let tol = 1e-5 + v as f32 * 6e-8 * 4.0;
                assert!(
                    (l[r] - want_l[r]).abs() <= tol,
                    "{}: {t}×{v} row {r}: loss {} vs {}",
                    dev.name(),
                    l[r],
                    want_l[r]
                );
            }
            for (i, (a, b)) in g.iter().zip(&want_g).enumerate() {
                // The gradient is rounded to bf16 on the way out: half an ulp is 2^-8 relative.
                let a = a.to_f32();
                assert!(
                    (a - b).abs() <= 1e-6 + b.abs() / 256.0,
                    "{}: {t}×{v} grad {i}: {a} vs {b}",
                    dev.name()
                );
            }
        }
    }
}

#[test]
fn cross_entropy_flags_a_label_outside_the_vocabulary() {
    for dev in devices() {
        let mut lg = dev.upload(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let lb = dev.upload(&[1u32, 3]).unwrap();
        let mut l = dev.upload(&[0f32; 2]).unwrap();
        loss::cross_entropy(&dev, &mut lg, &lb, 1.0, &mut l, 2, 3).unwrap();
        let l = dev.download(&l).unwrap();
        assert!(l[0].is_finite() && l[1].is_nan(), "{}: {l:?}", dev.name());
        assert_eq!(&dev.download(&lg).unwrap()[3..], &[0.0; 3]);
        let e = loss::cross_entropy(
            &dev,
            &mut lg,
            &lb,
            1.0,
            &mut dev.upload(&[0f32; 3]).unwrap(),
            2,
            3,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cross_entropy_f32"), "{e}");
    }
}

#[test]
fn adamw_matches_the_cpu_reference_over_several_steps() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(23);
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    for dev in devices() {
        for n in [1usize, 255, 257, 100_003] {
            let p0: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let mut cp = cpu
                .upload(&HostTensor::f32(vec![n], p0.clone()).unwrap())
                .unwrap();
            let mut cm = cpu.zeros(&[n], DType::F32).unwrap();
            let mut cv = cpu.zeros(&[n], DType::F32).unwrap();
            let mut gp = dev.upload(&p0).unwrap();
            let mut gm = dev.alloc_zeros::<f32>(n).unwrap();
            let mut gv = dev.alloc_zeros::<f32>(n).unwrap();
            for step in 1..=4u32 {
                let g: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                cpu.adamw(
                    &mut cp,
                    &cpu.upload(&HostTensor::f32(vec![n], g.clone()).unwrap())
                        .unwrap(),
                    &mut cm,
                    &mut cv,
                    hp,
                    step,
                    0.5,
                )
                .unwrap();
                optim::adamw(
                    &dev,
                    &mut gp,
                    &dev.upload(&g).unwrap(),
                    &mut gm,
                    &mut gv,
                    hp,
                    step,
                    0.5,
                )
                .unwrap();
            }
            let want = cpu.download(&cp).unwrap().to_f32().unwrap();
            let got = dev.download(&gp).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                // Each step moves p by at most ~lr; the f32 kernel and the f64-corrected reference
                // differ by a few ulps of that update, so 1e-6·lr per step plus p's own ulp.
                assert!(
                    (a - b).abs() <= 4.0 * 1e-6 * hp.lr + 2.0 * f32::EPSILON * b.abs(),
                    "{}: n {n} element {i}: {a} vs {b}",
                    dev.name()
                );
            }
        }
    }
}

#[test]
fn sum_squares_matches_and_is_deterministic() {
    let mut rng = Rng::new(24);
    for dev in devices() {
        for n in [1usize, 300, 256 * 1024 + 3, 1_000_001] {
            let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let want: f64 = x.iter().map(|v| (*v as f64) * (*v as f64)).sum();
            let xb = dev.upload(&x).unwrap();
            let mut ws = dev
                .upload(&vec![f32::NAN; optim::SUM_SQUARES_BLOCKS])
                .unwrap();
            let mut out = dev.upload(&[f32::NAN]).unwrap();
            optim::sum_squares(&dev, &xb, &mut ws, &mut out).unwrap();
            let a = dev.download(&out).unwrap()[0];
            // Per-thread f32 sums of ≤ n/(1024·256)+1 terms, then two tree levels: relative error
            // ≲ (n/262144 + 20)·2^-24.
            let tol = (n as f64 / 262_144.0 + 20.0) * 6e-8 * want;
            assert!(
                (a as f64 - want).abs() <= tol,
                "{}: n {n}: {a} vs {want}",
                dev.name()
            );
            optim::sum_squares(&dev, &xb, &mut ws, &mut out).unwrap();
            assert_eq!(
                dev.download(&out).unwrap()[0].to_bits(),
                a.to_bits(),
                "same input, same bits"
            );
        }
        let mut small = dev.upload(&[0f32; 2]).unwrap();
        let e = optim::sum_squares(
            &dev,
            &dev.upload(&vec![1f32; 10_000]).unwrap(),
            &mut small,
            &mut dev.upload(&[0f32]).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("workspace"), "{e}");
    }
}

#[test]
fn embedding_backward_matches_the_cpu_reference() {
    use recforge::backend::gpu::ops::embedding;
    let cpu = Cpu::new();
    let mut rng = Rng::new(25);
    for (v, d, t) in [(5usize, 3usize, 40usize), (300, 576, 17), (7, 64, 1)] {
        // Few distinct ids, so the atomics collide.
        let ids: Vec<u32> = (0..t).map(|_| rng.below(v.min(4) as u64) as u32).collect();
        let dy: Vec<bf16> = (0..t * d).map(|_| bf16::from_f32(rng.normal())).collect();
        let dyf: Vec<f32> = dy.iter().map(|x| x.to_f32()).collect();
        let tab0: Vec<f32> = (0..v * d).map(|_| rng.normal()).collect();
        let mut ct = cpu
            .upload(&HostTensor::f32(vec![v, d], tab0.clone()).unwrap())
            .unwrap();
        let it = cpu
            .upload(&HostTensor::new(vec![t], HostData::U32(ids.clone())).unwrap())
            .unwrap();
        cpu.embedding_backward(
            &cpu.upload(&HostTensor::f32(vec![t, d], dyf.clone()).unwrap())
                .unwrap(),
            &it,
            &mut ct,
        )
        .unwrap();
        let want = cpu.download(&ct).unwrap().to_f32().unwrap();
        for dev in devices() {
            let mut tab = dev.upload(&tab0).unwrap();
            embedding::embedding_backward(
                &dev,
                &dev.upload(&dy).unwrap(),
                &dev.upload(&ids).unwrap(),
                &mut tab,
                v,
                d,
            )
            .unwrap();
            let got = dev.download(&tab).unwrap();
            for i in 0..v * d {
                // The same ≤ t additions in another order: t·2^-24 of Σ|terms| (≤ 4·t here).
                let mag = tab0[i].abs()
                    + (0..t)
                        .filter(|&s| ids[s] as usize == i / d)
                        .map(|s| dyf[s * d + i % d].abs())
                        .sum::<f32>();
                assert!(
                    (got[i] - want[i]).abs() <= t as f32 * 6e-8 * mag + 1e-7,
                    "{}: {v}×{d} t={t} [{i}]: {} vs {}",
                    dev.name(),
                    got[i],
                    want[i]
                );
            }
        }
    }
}
