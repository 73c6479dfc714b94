#![allow(clippy::needless_range_loop)] // index loops mirror the fragment tables they check
//! The SIMT simulator proven against the documented semantics of every primitive (CUDA
//! Programming Guide for shuffles / votes / atomics; PTX ISA fragment tables for ldmatrix and
//! mma.sync), against plain matmuls for tiled tensor-core GEMMs built from them, and against the
//! hardware: when a GPU is usable, each kernel also runs there on the same inputs and the two
//! devices must agree. Planted bugs show what the simulator reports.

use half::{bf16, f16};
use recforge::backend::gpu::{probe_cuda, Arg, DevBuf, Device, Launch};
use recforge::rng::Rng;

fn sim_and_gpu() -> (Device, Option<Device>) {
    let probe = probe_cuda();
    let gpu = if probe.usable() {
        Some(Device::cuda(0).expect("a usable GPU must open"))
    } else {
        eprintln!(
            "skipped simulator-vs-GPU comparison: no usable CUDA device ({})",
            probe.describe()
        );
        None
    };
    (Device::sim(), gpu)
}

/// Upload, poison-fill the output, launch, download the output.
fn run_u32(
    dev: &Device,
    kernel: &str,
    launch: Launch,
    inputs: &[&[u32]],
    scalars_first: &[Arg],
    out_len: usize,
) -> Vec<u32> {
    let bufs: Vec<DevBuf<u32>> = inputs.iter().map(|x| dev.upload(x).unwrap()).collect();
    let mut out = dev.upload(&vec![0xDEAD_BEEFu32; out_len]).unwrap();
    let mut args: Vec<Arg> = scalars_first.to_vec();
    for b in &bufs {
        args.push(dev.ptr(b).unwrap());
    }
    args.push(dev.ptr_mut(&mut out).unwrap());
    dev.launch(kernel, launch, &args)
        .unwrap_or_else(|e| panic!("{}: {e}", dev.name()));
    dev.download(&out).unwrap()
}

fn shfl_reference(op: i32, w: usize, arg: &[i32], input: &[i32]) -> Vec<i32> {
    (0..input.len())
        .map(|i| {
            let (warp0, lane) = (i / 32 * 32, i % 32);
            let base = lane & !(w - 1);
            // PTX shfl.sync reads the lane operand as b[4:0] (the intrinsics pass delta / laneMask
            // / srcLane there), so offsets of 32 and more wrap modulo 32.
            let a = arg[i] & 31;
            let src = match op {
                0 => Some(base + (a as usize & (w - 1))),
                1 => Some(lane ^ a as usize),
                2 => Some(lane + a as usize).filter(|&j| j < base + w),
                _ => lane.checked_sub(a as usize).filter(|&j| j >= base),
            };
            input[warp0 + src.unwrap_or(lane)]
        })
        .collect()
}

#[test]
fn shuffles_follow_the_programming_guide() {
    let (sim, gpu) = sim_and_gpu();
    let mut rng = Rng::new(1);
    let n = 128;
    for op in 0..4 {
        for w in [32usize, 16, 8, 4, 1] {
            let input: Vec<i32> = (0..n).map(|_| rng.next_u64() as i32).collect();
            let arg: Vec<i32> = (0..n)
                .map(|_| match op {
                    0 => rng.below(64) as i32,
                    1 => rng.below(w as u64) as i32,
                    _ => rng.below(40) as i32,
                })
                .collect();
            let want = shfl_reference(op, w, &arg, &input);
            let cast = |v: &[i32]| v.iter().map(|x| *x as u32).collect::<Vec<u32>>();
            let run = |d: &Device| {
                run_u32(
                    d,
                    "selftest_shfl_i32",
                    Launch::linear(2, 64),
                    &[&cast(&arg), &cast(&input)],
                    &[Arg::I32(op), Arg::I32(w as i32)],
                    n,
                )
            };
            let got = run(&sim);
            assert_eq!(got, cast(&want), "op {op} width {w}");
            if let Some(g) = &gpu {
                assert_eq!(run(g), got, "GPU vs simulator: op {op} width {w}");
            }
        }
    }
}

#[test]
fn votes_follow_the_programming_guide() {
    let (sim, gpu) = sim_and_gpu();
    let mut rng = Rng::new(2);
    let n = 64;
    for mask in [u32::MAX, 0x5555_5555, 0x8000_0001, 0x0000_ffff] {
        for density in [0u64, 1, 2, 4] {
            // density 0: all false; 4: all true; else random.
            let pred: Vec<u32> = (0..n)
                .map(|_| {
                    if density == 4 {
                        1
                    } else if density == 0 {
                        0
                    } else {
                        (rng.below(density) == 0) as u32
                    }
                })
                .collect();
            let run = |d: &Device| {
                run_u32(
                    d,
                    "selftest_vote",
                    Launch::linear(1, 64),
                    &[&pred],
                    &[Arg::U32(mask)],
                    3 * n,
                )
            };
            let got = run(&sim);
            for i in 0..n {
                let (w0, lane) = (i / 32 * 32, i % 32);
                if mask >> lane & 1 == 0 {
                    assert_eq!(
                        &got[3 * i..3 * i + 3],
                        &[0xDEAD_BEEF; 3],
                        "non-participating lane {i} wrote"
                    );
                    continue;
                }
                let ballot = (0..32)
                    .filter(|&j| mask >> j & 1 == 1 && pred[w0 + j] != 0)
                    .fold(0u32, |b, j| b | 1 << j);
                assert_eq!(got[3 * i], ballot, "ballot mask {mask:#x} lane {i}");
                assert_eq!(got[3 * i + 1], (ballot != 0) as u32, "any");
                assert_eq!(got[3 * i + 2], (ballot == mask) as u32, "all");
            }
            if let Some(g) = &gpu {
                assert_eq!(run(g), got, "GPU vs simulator: mask {mask:#x}");
            }
        }
    }
}

#[test]
fn atomics_from_many_blocks_are_exact() {
    let (sim, gpu) = sim_and_gpu();
    let mut rng = Rng::new(3);
    let n = 5000;
    let vals: Vec<i32> = (0..n).map(|_| rng.below(1000) as i32).collect();
    for dev in std::iter::once(&sim).chain(gpu.as_ref()) {
        let v = dev.upload(&vals).unwrap();
        let mut sum = dev.upload(&[0i32]).unwrap();
        let mut umax = dev.upload(&[0u32]).unwrap();
        let mut fsum = dev.upload(&[0f32]).unwrap();
        let mut cas = dev.upload(&[0i32]).unwrap();
        let args = [
            dev.ptr(&v).unwrap(),
            Arg::I32(n),
            dev.ptr_mut(&mut sum).unwrap(),
            dev.ptr_mut(&mut umax).unwrap(),
            dev.ptr_mut(&mut fsum).unwrap(),
            dev.ptr_mut(&mut cas).unwrap(),
        ];
        dev.launch("selftest_atomics", Launch::linear(13, 96), &args)
            .unwrap();
        assert_eq!(
            dev.download(&sum).unwrap()[0],
            vals.iter().sum::<i32>(),
            "{}",
            dev.name()
        );
        assert_eq!(
            dev.download(&umax).unwrap()[0],
            *vals.iter().max().unwrap() as u32
        );
        // Multiples of 0.25 below 2^22 are exact in f32 whatever the order of the additions.
        assert_eq!(
            dev.download(&fsum).unwrap()[0],
            vals.iter().sum::<i32>() as f32 * 0.25
        );
        assert_eq!(dev.download(&cas).unwrap()[0], n);
    }
}

fn pack16(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

#[test]
fn ldmatrix_follows_the_ptx_fragment_table() {
    // PTX ISA, ldmatrix: the 8 row addresses of matrix i come from lanes 8i..8i+7; register i
    // of lane l holds row l/4, elements 2(l%4) and 2(l%4)+1 of matrix i (.trans: of its
    // transpose, i.e. elements [2(l%4)][l/4] and [2(l%4)+1][l/4]).
    let (sim, gpu) = sim_and_gpu();
    let mut rng = Rng::new(4);
    let m: Vec<u16> = (0..256).map(|_| rng.next_u64() as u16).collect();
    let words: Vec<u32> = m.chunks(2).map(|p| pack16(p[0], p[1])).collect();
    let mut launch = Launch::linear(1, 32);
    launch.shared_bytes = 512;
    let run = |d: &Device| run_u32(d, "selftest_ldmatrix", launch, &[&words], &[], 6 * 32 * 4);
    let got = run(&sim);
    let perm = |l: usize| (5 * l + 3) % 32;
    let elem = |mat: usize, r: usize, c: usize| m[perm(8 * mat + r) * 8 + c];
    for (v, (nmat, trans)) in [
        (1, false),
        (2, false),
        (4, false),
        (1, true),
        (2, true),
        (4, true),
    ]
    .into_iter()
    .enumerate()
    {
        for l in 0..32 {
            for reg in 0..4 {
                let g = got[(v * 32 + l) * 4 + reg];
                if reg >= nmat {
                    assert_eq!(g, 0xDEAD_BEEF, "variant {v} lane {l} reg {reg} written");
                    continue;
                }
                let (r, c) = (l / 4, 2 * (l % 4));
                let want = if trans {
                    pack16(elem(reg, c, r), elem(reg, c + 1, r))
                } else {
                    pack16(elem(reg, r, c), elem(reg, r, c + 1))
                };
                assert_eq!(g, want, "x{nmat} trans={trans} lane {l} reg {reg}");
            }
        }
    }
    if let Some(g) = &gpu {
        assert_eq!(run(g), got, "GPU vs simulator");
    }
}

// Fragments per the PTX ISA tables (groupID g = lane/4, thread-in-group t = lane%4).
// m16n8k16 (bf16/f16): a reg i: row g + 8(i%2), cols 2t + 8(i/2) + {0,1}; b reg i:
// k = 2t + 8i + {0,1}, n = g; c/d element e: row g + 8(e/2), col 2t + e%2.
// m16n8k32 (s8): a reg i: row g + 8(i%2), cols 4t + 16(i/2) + {0..3}; b reg i:
// k = 4t + 16i + {0..3}, n = g.
#[test]
fn mma_follows_the_ptx_fragment_tables() {
    let (sim, gpu) = sim_and_gpu();
    let mut rng = Rng::new(5);
    for kind in 0..3 {
        for _ in 0..5 {
            let k = if kind == 2 { 32 } else { 16 };
            let (a_val, b_val): (Vec<f64>, Vec<f64>);
            let (mut a, mut b) = (vec![0u32; 128], vec![0u32; 64]);
            if kind == 2 {
                let a8: Vec<i8> = (0..16 * 32).map(|_| rng.next_u64() as i8).collect();
                let b8: Vec<i8> = (0..32 * 8).map(|_| rng.next_u64() as i8).collect();
                for l in 0..32 {
                    let (g, t) = (l / 4, l % 4);
                    for i in 0..4 {
                        let bytes: Vec<u8> = (0..4)
                            .map(|j| a8[(g + 8 * (i % 2)) * 32 + 4 * t + 16 * (i / 2) + j] as u8)
                            .collect();
                        a[4 * l + i] = u32::from_le_bytes(bytes.try_into().unwrap());
                    }
                    for i in 0..2 {
                        let bytes: Vec<u8> = (0..4)
                            .map(|j| b8[(4 * t + 16 * i + j) * 8 + g] as u8)
                            .collect();
                        b[2 * l + i] = u32::from_le_bytes(bytes.try_into().unwrap());
                    }
                }
                a_val = a8.iter().map(|x| *x as f64).collect();
                b_val = b8.iter().map(|x| *x as f64).collect();
            } else {
                let enc = |x: f32| {
                    if kind == 0 {
                        bf16::from_f32(x).to_bits()
                    } else {
                        f16::from_f32(x).to_bits()
                    }
                };
                let dec = |x: u16| {
                    if kind == 0 {
                        bf16::from_bits(x).to_f64()
                    } else {
                        f16::from_bits(x).to_f64()
                    }
                };
                let a16: Vec<u16> = (0..16 * 16).map(|_| enc(rng.normal())).collect();
                let b16: Vec<u16> = (0..16 * 8).map(|_| enc(rng.normal())).collect();
                for l in 0..32 {
                    let (g, t) = (l / 4, l % 4);
                    for i in 0..4 {
                        let (r, c) = (g + 8 * (i % 2), 2 * t + 8 * (i / 2));
                        a[4 * l + i] = pack16(a16[r * 16 + c], a16[r * 16 + c + 1]);
                    }
                    for i in 0..2 {
                        let kk = 2 * t + 8 * i;
                        b[2 * l + i] = pack16(b16[kk * 8 + g], b16[(kk + 1) * 8 + g]);
                    }
                }
                a_val = a16.iter().map(|x| dec(*x)).collect();
                b_val = b16.iter().map(|x| dec(*x)).collect();
            }
            let c_val: Vec<f64> = (0..128)
                .map(|_| {
                    if kind == 2 {
                        (rng.next_u64() % 2001) as f64 - 1000.0
                    } else {
                        rng.normal() as f64
                    }
                })
                .collect();
            let mut c = vec![0u32; 128];
            let mut want = vec![0f64; 128];
            let mut scale = vec![0f64; 128];
            for l in 0..32 {
                let (g, t) = (l / 4, l % 4);
                for e in 0..4 {
                    let (r, col) = (g + 8 * (e / 2), 2 * t + e % 2);
                    let cv = c_val[r * 8 + col];
                    c[4 * l + e] = if kind == 2 {
                        cv as i32 as u32
                    } else {
                        (cv as f32).to_bits()
                    };
                    let cv = if kind == 2 { cv } else { cv as f32 as f64 };
                    want[4 * l + e] = cv
                        + (0..k)
                            .map(|kk| a_val[r * k + kk] * b_val[kk * 8 + col])
                            .sum::<f64>();
                    scale[4 * l + e] = cv.abs()
                        + (0..k)
                            .map(|kk| (a_val[r * k + kk] * b_val[kk * 8 + col]).abs())
                            .sum::<f64>();
                }
            }
            let run = |d: &Device| {
                run_u32(
                    d,
                    "selftest_mma",
                    Launch::linear(1, 32),
                    &[&a, &b, &c],
                    &[Arg::I32(kind)],
                    128,
                )
            };
            let got = run(&sim);
            for i in 0..128 {
                if kind == 2 {
                    assert_eq!(
                        got[i] as i32 as f64,
                        want[i],
                        "s8 lane {} elem {}",
                        i / 4,
                        i % 4
                    );
                } else {
                    // Products of 8-bit or 11-bit mantissas are exact in f32; only the f32 sum of
                    // 17 terms rounds: 17 · 2^-24 of the magnitudes involved.
                    let g = f32::from_bits(got[i]) as f64;
                    assert!(
                        (g - want[i]).abs() <= 17.0 * 6e-8 * scale[i] + 1e-30,
                        "kind {kind} lane {} elem {}: {g} vs {}",
                        i / 4,
                        i % 4,
                        want[i]
                    );
                }
            }
            if let Some(gdev) = &gpu {
                let hw = run(gdev);
                for i in 0..128 {
                    if kind == 2 {
                        assert_eq!(hw[i], got[i], "GPU vs simulator s8");
                    } else {
                        let (h, s) = (f32::from_bits(hw[i]) as f64, f32::from_bits(got[i]) as f64);
                        assert!(
                            (h - s).abs() <= 2.0 * 17.0 * 6e-8 * scale[i],
                            "GPU vs simulator kind {kind}: {h} vs {s}"
                        );
                    }
                }
            }
        }
    }
}

const GEMM_SMEM: u32 = 3 * 2 * 64 * 80;
const GEMM_SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 16),
    (17, 33, 48),
    (64, 64, 64),
    (100, 70, 144),
    (130, 129, 80),
    (3, 200, 272),
];

fn gemm_launch(m: usize, n: usize) -> Launch {
    Launch {
        grid: (n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1),
        block: (128, 1, 1),
        shared_bytes: GEMM_SMEM,
    }
}

#[test]
fn tiled_s8_gemm_is_exact() {
    let (sim, gpu) = sim_and_gpu();
    let mut rng = Rng::new(6);
    for (m, n, k) in GEMM_SHAPES {
        let a: Vec<i8> = (0..m * k).map(|_| rng.next_u64() as i8).collect();
        let b: Vec<i8> = (0..n * k).map(|_| rng.next_u64() as i8).collect();
        let want: Vec<i32> = (0..m * n)
            .map(|i| {
                (0..k)
                    .map(|kk| a[i / n * k + kk] as i32 * b[i % n * k + kk] as i32)
                    .sum()
            })
            .collect();
        let mut outs = vec![];
        for dev in std::iter::once(&sim).chain(gpu.as_ref()) {
            let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
            let mut c = dev.upload(&vec![i32::MIN; m * n]).unwrap();
            let args = [
                dev.ptr(&da).unwrap(),
                dev.ptr(&db).unwrap(),
                dev.ptr_mut(&mut c).unwrap(),
                Arg::I32(m as i32),
                Arg::I32(n as i32),
                Arg::I32(k as i32),
            ];
            dev.launch("selftest_gemm_s8", gemm_launch(m, n), &args)
                .unwrap();
            let got = dev.download(&c).unwrap();
            assert_eq!(got, want, "{}: {m}×{n}×{k}", dev.name());
            outs.push(got);
        }
    }
}

#[test]
fn tiled_bf16_gemm_matches_f32_matmul() {
    let (sim, gpu) = sim_and_gpu();
    let mut rng = Rng::new(7);
    for (m, n, k) in GEMM_SHAPES {
        let a: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.normal())).collect();
        let b: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rng.normal())).collect();
        let dot = |i: usize, f: &dyn Fn(f64) -> f64| {
            (0..k)
                .map(|kk| f(a[i / n * k + kk].to_f64() * b[i % n * k + kk].to_f64()))
                .sum::<f64>()
        };
        for dev in std::iter::once(&sim).chain(gpu.as_ref()) {
            let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
            let mut c = dev.upload(&vec![f32::NAN; m * n]).unwrap();
            let args = [
                dev.ptr(&da).unwrap(),
                dev.ptr(&db).unwrap(),
                dev.ptr_mut(&mut c).unwrap(),
                Arg::I32(m as i32),
                Arg::I32(n as i32),
                Arg::I32(k as i32),
            ];
            dev.launch("selftest_gemm_bf16", gemm_launch(m, n), &args)
                .unwrap();
            let got = dev.download(&c).unwrap();
            for i in 0..m * n {
                // bf16 products are exact in f32; f32 accumulation over k terms rounds at most
                // k times by 2^-24 of the running magnitude.
                let (want, mag) = (dot(i, &|x| x), dot(i, &f64::abs));
                assert!(
                    (got[i] as f64 - want).abs() <= k as f64 * 6e-8 * mag + 1e-30,
                    "{}: {m}×{n}×{k} element {i}: {} vs {want}",
                    dev.name(),
                    got[i]
                );
            }
        }
    }
}

#[test]
fn planted_bug_missing_syncthreads_gives_a_deterministic_wrong_answer() {
    // Thread t writes slot t and reads slot t ± 32 with no barrier between. Fibers run until
    // they block, so a reader sees the other thread's write only if that thread ran first; the
    // simulator queues threads in a pseudo-random order drawn from the kernel, the block and the
    // barrier count (RF_SIM_SCHEDULE, kernels/sim/rf_sim.cpp), so which reads miss is the same on
    // every run of this launch, and some do. Dynamic shared memory starts filled with 0xFF bytes,
    // so a missed write reads -1. (On a GPU this is a race; it is not run there.)
    let sim = Device::sim();
    let mut first: Option<Vec<i32>> = None;
    for _ in 0..3 {
        let mut out = sim.upload(&[i32::MIN; 64]).unwrap();
        let mut l = Launch::linear(1, 64);
        l.shared_bytes = 256;
        sim.launch(
            "selftest_bug_missing_sync",
            l,
            &[sim.ptr_mut(&mut out).unwrap()],
        )
        .unwrap();
        let got = sim.download(&out).unwrap();
        for (t, &v) in got.iter().enumerate() {
            let want = ((t + 32) % 64) as i32;
            assert!(
                v == want || v == -1,
                "thread {t} read {v}: neither {want} nor the poison"
            );
        }
        let missed = got.iter().filter(|&&v| v == -1).count();
        assert!(missed > 0, "the missing barrier must show: {got:?}");
        match &first {
            None => first = Some(got),
            Some(f) => assert_eq!(f, &got, "the same launch must give the same wrong answer"),
        }
    }
}

/// Set in the child process of the two tests below, which runs the faulting kernel.
const FAULT_CHILD: &str = "RECFORGE_TEST_FAULT_CHILD";

/// Child side: copy `n` floats in bounds with `kernel` (offset 0: the overrun kernel), then
/// launch `kernel` over `len` elements, which must fault before the launch returns. With
/// `arena`, the buffers are carved from a reserved arena, as in a planned training run.
fn copy_then_fault(kernel: &str, n: usize, len: usize, arena: bool) {
    let sim = Device::sim();
    if arena {
        sim.reserve_arena(1 << 20).unwrap();
    }
    let x = sim.upload(&vec![1f32; n]).unwrap();
    let mut out = sim.upload(&vec![0f32; n + 1]).unwrap();
    if arena {
        // One reservation, and both buffers carved from it.
        let st = sim.memory_stats();
        assert_eq!((st.device_allocations, st.buffers), (1, 2), "{st:?}");
    }
    let copy = |k: &str, len: usize, out: &mut DevBuf<f32>| {
        sim.launch(
            k,
            Launch::linear(len.div_ceil(128) as u32, 128),
            &[
                sim.ptr(&x).unwrap(),
                sim.ptr_mut(out).unwrap(),
                Arg::I32(len as i32),
            ],
        )
    };
    copy("selftest_bug_global_overrun", n, &mut out).unwrap();
    assert!(sim.download(&out).unwrap()[..n].iter().all(|&v| v == 1.0));
    eprintln!("in bounds: ok");
    let r = copy(kernel, len, &mut out);
    eprintln!("out of bounds: returned {:?}", r.err());
}

/// Parent side: run `test` alone in a child (this test binary again) with the simulator's
/// guard pages on `guard`'s side, and check that it died by SIGSEGV naming `names`.
fn assert_child_faults(test: &str, guard: &str, names: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(FAULT_CHILD, "1")
        .env("RECFORGE_SIM_GUARD", guard)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "the access must fault: {:?}\n{err}",
        out.status
    );
    assert!(err.contains("in bounds: ok"), "{err}");
    assert!(!err.contains("out of bounds: returned"), "{err}");
    assert!(
        err.contains("rf_sim: SIGSEGV") && err.contains(names),
        "the fault must name {names}: {err}"
    );
}

#[test]
fn planted_bug_global_overrun_faults_and_names_the_kernel() {
    // Every simulator buffer ends at a guard page, so reading ONE element past the end of a
    // 1000-float buffer (4000 bytes, no slack) faults, and the simulator's fault handler names
    // the kernel before the process dies. A fault ends the process, so the launch runs in a
    // child.
    if std::env::var_os(FAULT_CHILD).is_some() {
        return copy_then_fault("selftest_bug_global_overrun", 1000, 1001, false);
    }
    assert_child_faults(
        "planted_bug_global_overrun_faults_and_names_the_kernel",
        "end",
        "kernel 'selftest_bug_global_overrun', block (7,0,0), thread (104,0,0)",
    );
}

#[test]
fn planted_bug_global_overrun_faults_in_an_arena_block_too() {
    // A planned run carves every buffer from one arena in 256-byte blocks: the one-element
    // overread lands in the 96 bytes of padding of x's 4096-byte block, and on a GPU it would
    // pass silently. The simulator gives each block its own guarded mapping, so it faults.
    if std::env::var_os(FAULT_CHILD).is_some() {
        return copy_then_fault("selftest_bug_global_overrun", 1000, 1001, true);
    }
    assert_child_faults(
        "planted_bug_global_overrun_faults_in_an_arena_block_too",
        "end",
        "kernel 'selftest_bug_global_overrun', block (7,0,0), thread (104,0,0)",
    );
}

#[test]
fn planted_bug_global_underrun_faults_with_the_guard_before_buffers() {
    // With RECFORGE_SIM_GUARD=start the guard page lies just before each buffer, so reading
    // x[-1] (thread 0 of block 0) faults.
    if std::env::var_os(FAULT_CHILD).is_some() {
        return copy_then_fault("selftest_bug_global_underrun", 1000, 1000, false);
    }
    assert_child_faults(
        "planted_bug_global_underrun_faults_with_the_guard_before_buffers",
        "start",
        "kernel 'selftest_bug_global_underrun', block (0,0,0), thread (0,0,0)",
    );
}

#[test]
fn planted_bug_overrun_into_a_buffers_slack_is_poisoned_and_reported() {
    // 1001 floats end 12 bytes short of the 16-byte boundary where the guard page (or, with
    // the guard before, the rest of the page) begins: one element past the end lies in that
    // slack, where nothing faults.
    let sim = Device::sim();
    let copy = |x: &DevBuf<f32>, out: &mut DevBuf<f32>, n: usize| {
        sim.launch(
            "selftest_bug_global_overrun",
            Launch::linear(n.div_ceil(128) as u32, 128),
            &[
                sim.ptr(x).unwrap(),
                sim.ptr_mut(out).unwrap(),
                Arg::I32(n as i32),
            ],
        )
    };
    // A read there gives the poison, NaN, not a plausible value.
    let x = sim.upload(&vec![1f32; 1001]).unwrap();
    let mut wide = sim.upload(&vec![0f32; 1002]).unwrap();
    copy(&x, &mut wide, 1002).unwrap();
    let got = sim.download(&wide).unwrap();
    assert!(got[..1001].iter().all(|&v| v == 1.0));
    assert!(got[1001].is_nan(), "the slack read as {}", got[1001]);
    // A write there is an error naming the kernel and the argument.
    let big = sim.upload(&vec![2f32; 1002]).unwrap();
    let mut narrow = sim.upload(&vec![0f32; 1001]).unwrap();
    let e = copy(&big, &mut narrow, 1002).unwrap_err().to_string();
    assert!(
        e.contains(
            "kernel 'selftest_bug_global_overrun' wrote past the end of the buffer of \
             argument 1 (4004 bytes): byte 0 past its last element changed"
        ),
        "{e}"
    );
    // In bounds, nothing is reported.
    copy(&big, &mut wide, 1002).unwrap();
}

#[test]
fn planted_bug_shared_memory_overrun_is_reported() {
    let sim = Device::sim();
    let mut out = sim.upload(&[0f32; 64]).unwrap();
    let mut l = Launch::linear(1, 64);
    l.shared_bytes = 256;
    let e = sim
        .launch(
            "selftest_bug_smem_oob",
            l,
            &[sim.ptr_mut(&mut out).unwrap(), Arg::I32(1)],
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("selftest_bug_smem_oob") && e.contains("out of range"),
        "{e}"
    );
    // The same kernel within bounds runs.
    sim.launch(
        "selftest_bug_smem_oob",
        l,
        &[sim.ptr_mut(&mut out).unwrap(), Arg::I32(0)],
    )
    .unwrap();
    assert_eq!(sim.download(&out).unwrap()[63], 63.0);
}

#[test]
fn misuse_is_reported_with_the_kernel_name() {
    let sim = Device::sim();
    let mut out = sim.upload(&[0f32; 64]).unwrap();
    let p = sim.ptr_mut(&mut out).unwrap();
    // A block of 2048 threads.
    let e = sim
        .launch(
            "selftest_bug_smem_oob",
            Launch::linear(1, 2048),
            &[p, Arg::I32(0)],
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("selftest_bug_smem_oob") && e.contains("invalid launch"),
        "{e}"
    );
    // A grid taller than CUDA's 65535 blocks in y (a GEMM over more than 8.4M rows).
    let mut l = Launch::linear(1, 64);
    l.grid.1 = 65536;
    let e = sim
        .launch("selftest_bug_smem_oob", l, &[p, Arg::I32(0)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid launch") && e.contains("65535"), "{e}");
    // More dynamic shared memory than any GPU gives a block.
    let mut l = Launch::linear(1, 64);
    l.shared_bytes = 300 * 1024;
    let e = sim
        .launch("selftest_bug_smem_oob", l, &[p, Arg::I32(0)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("selftest_bug_smem_oob"), "{e}");
    // Less dynamic shared memory than the kernel uses: the overrun is caught.
    l.shared_bytes = 128;
    let e = sim
        .launch("selftest_bug_smem_oob", l, &[p, Arg::I32(0)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
}

/// Runs a one-instruction wgmma self-test kernel (kernels/selftest_sm90.cu) with the operand
/// strides `(lbo_a, sbo_a, lbo_b, sbo_b)`, once or `twice`; returns its 64 × 256 outputs' bits.
fn run_wgmma_selftest(
    dev: &Device,
    kernel: &str,
    (lbo_a, sbo_a, lbo_b, sbo_b): (u32, u32, u32, u32),
    twice: i32,
    a: &[u32],
    b: &[u32],
) -> Vec<u32> {
    // B's last byte: its 32nd group of 8 rows (s8) or columns (bf16) at 31·sbo_b, the second
    // group along K at lbo_b, the last 16-byte row of that core matrix.
    let smem = 8192 + 31 * sbo_b + 7 * 16 + lbo_b + 16;
    run_u32(
        dev,
        kernel,
        Launch {
            grid: (1, 1, 1),
            block: (128, 1, 1),
            shared_bytes: smem,
        },
        &[a, b],
        &[
            Arg::U32(lbo_a),
            Arg::U32(sbo_a),
            Arg::U32(lbo_b),
            Arg::U32(sbo_b),
            Arg::I32(twice),
        ],
        64 * 256,
    )
}

/// The simulator, and an sm_90 GPU when there is one (else it says why it skipped).
fn sim_and_hopper() -> Vec<Device> {
    let (sim, gpu) = sim_and_gpu();
    let gpu = gpu.filter(|g| {
        let ok = g.has_wgmma();
        if !ok {
            eprintln!("skipped wgmma on {}: not an sm_90 GPU", g.name());
        }
        ok
    });
    std::iter::once(sim).chain(gpu).collect()
}

/// What a wrong wgmma result looks like, for a layout bug seen only on hardware: for the first
/// wrong outputs, the expected position whose value the output holds (a swapped row or column of
/// the fragment, or a misread descriptor stride, shows as a pattern in these), and the whole
/// output written to `<dump>/<name>.txt` (one hex word a line, row-major 64 × 256) so it can be
/// studied off the machine (the callers pass `$RECFORGE_TEST_DUMP`, which gpu-check sets).
fn explain_wrong(
    name: &str,
    got: &[u32],
    bad: &[usize],
    same: impl Fn(u32, usize) -> bool,
    dump: Option<&std::path::Path>,
) -> String {
    let at = |i: usize| format!("({}, {})", i / 256, i % 256);
    let mut s = String::new();
    for &i in bad.iter().take(8) {
        let hits: Vec<usize> = (0..got.len()).filter(|&j| same(got[i], j)).collect();
        s += &match hits.first() {
            Some(&j) => format!(
                "\n  {} holds the expected value of {} ({} such)",
                at(i),
                at(j),
                hits.len()
            ),
            None => format!("\n  {} holds {:#x}, no expected value", at(i), got[i]),
        };
    }
    if let Some(dir) = dump {
        let path = dir.join(format!("{name}.txt"));
        let text: String = got.iter().map(|w| format!("{w:08x}\n")).collect();
        match std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, text)) {
            Ok(()) => s += &format!("\n  all outputs written to {}", path.display()),
            Err(e) => s += &format!("\n  could not write {}: {e}", path.display()),
        }
    }
    s
}

fn test_dump_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("RECFORGE_TEST_DUMP")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
}

/// The diagnosis a hardware wgmma failure would print: two swapped rows and a garbage value are
/// named as such, and the outputs land in the dump folder.
#[test]
fn a_wrong_wgmma_result_is_explained() {
    let want: Vec<u32> = (0..64 * 256u32)
        .map(|i| i.wrapping_mul(2654435761))
        .collect();
    let mut got = want.clone();
    for c in 0..256 {
        got.swap(3 * 256 + c, 11 * 256 + c);
    }
    got[40 * 256 + 7] = 0xdead_beef;
    let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
    let dir = std::env::temp_dir().join(format!("recforge-wgmma-dump-{}", std::process::id()));
    let m = explain_wrong("t", &got, &bad, |v, j| v == want[j], Some(&dir));
    assert!(
        m.contains("(3, 0) holds the expected value of (11, 0) (1 such)"),
        "{m}"
    );
    assert!(
        m.contains("(3, 7) holds the expected value of (11, 7)"),
        "{m}"
    );
    let written = std::fs::read_to_string(dir.join("t.txt")).unwrap();
    let words: Vec<u32> = written
        .lines()
        .map(|l| u32::from_str_radix(l, 16).unwrap())
        .collect();
    assert_eq!(words, got);
    std::fs::remove_dir_all(&dir).unwrap();
    // The garbage value is past the first 8 wrong outputs (row 3's); alone, it is named.
    let m = explain_wrong("t", &got, &[40 * 256 + 7], |v, j| v == want[j], None);
    assert!(
        m.contains("(40, 7) holds 0xdeadbeef, no expected value"),
        "{m}"
    );
}

/// wgmma.m64n256k32.s32.s8.s8 from shared-memory descriptors (kernels/selftest_sm90.cu): the
/// simulator against a plain int32 matmul for two placements of the core matrices (K chunks
/// adjacent; row groups adjacent), scale-d 0 and 1; an sm_90 GPU against the same values.
#[test]
fn wgmma_s8_follows_the_ptx_descriptor_and_fragment_layouts() {
    let devs = sim_and_hopper();
    let mut rng = Rng::new(90);
    let a: Vec<i8> = (0..64 * 32)
        .map(|_| (rng.below(256) as i32 - 128) as i8)
        .collect();
    let b: Vec<i8> = (0..256 * 32)
        .map(|_| (rng.below(256) as i32 - 128) as i8)
        .collect();
    let pack = |v: &[i8]| -> Vec<u32> {
        v.chunks(4)
            .map(|c| u32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8]))
            .collect()
    };
    let (pa, pb) = (pack(&a), pack(&b));
    let prod: Vec<i32> = (0..64 * 256)
        .map(|i| {
            let (r, c) = (i / 256, i % 256);
            (0..32)
                .map(|k| a[r * 32 + k] as i32 * b[c * 32 + k] as i32)
                .sum()
        })
        .collect();
    // (lbo_a, sbo_a, lbo_b, sbo_b): the GEMM's packing (a row group's 2 chunks adjacent), and
    // row groups adjacent with the second chunk of every row after all of them.
    for (lbo_a, sbo_a, lbo_b, sbo_b) in [(128u32, 256u32, 128u32, 256u32), (1024, 128, 4096, 128)] {
        for twice in [0, 1] {
            let want: Vec<u32> = prod.iter().map(|&p| (p * (1 + twice)) as u32).collect();
            for dev in &devs {
                let strides = (lbo_a, sbo_a, lbo_b, sbo_b);
                let got = run_wgmma_selftest(dev, "selftest_wgmma_s8", strides, twice, &pa, &pb);
                let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
                if bad.is_empty() {
                    continue;
                }
                let name = format!("wgmma_s8_{lbo_a}_{sbo_a}_{lbo_b}_{sbo_b}_x{}", 1 + twice);
                panic!(
                    "{}: wgmma lbo/sbo A {lbo_a}/{sbo_a} B {lbo_b}/{sbo_b} twice {twice}: {} of {} \
                     wrong, first at row {} col {}: {:#x} vs {:#x}{}",
                    dev.name(),
                    bad.len(),
                    want.len(),
                    bad[0] / 256,
                    bad[0] % 256,
                    got[bad[0]],
                    want[bad[0]],
                    explain_wrong(&name, &got, &bad, |v, j| v == want[j], test_dump_dir().as_deref())
                );
            }
        }
    }
}

/// wgmma.m64n256k16.f32.bf16.bf16 with B MN-major (imm-trans-b = 1), from shared-memory
/// descriptors (kernels/selftest_sm90.cu): the simulator against an f64 matmul for two
/// placements of the core matrices, scale-d 0 and 1; an sm_90 GPU against the same values.
#[test]
fn wgmma_bf16_follows_the_ptx_descriptor_and_fragment_layouts() {
    let devs = sim_and_hopper();
    let mut rng = Rng::new(91);
    let a: Vec<bf16> = (0..64 * 16).map(|_| bf16::from_f32(rng.normal())).collect();
    let b: Vec<bf16> = (0..16 * 256)
        .map(|_| bf16::from_f32(rng.normal()))
        .collect();
    let pack = |v: &[bf16]| -> Vec<u32> {
        v.chunks(2)
            .map(|c| c[0].to_bits() as u32 | (c[1].to_bits() as u32) << 16)
            .collect()
    };
    let (pa, pb) = (pack(&a), pack(&b));
    let (prod, mag): (Vec<f64>, Vec<f64>) = (0..64 * 256)
        .map(|i| {
            let (r, c) = (i / 256, i % 256);
            let terms = (0..16).map(|k| a[r * 16 + k].to_f64() * b[k * 256 + c].to_f64());
            (terms.clone().sum::<f64>(), terms.map(f64::abs).sum::<f64>())
        })
        .unzip();
    // (lbo_a, sbo_a, lbo_b, sbo_b): the dX kernel's packing (A: a row group's 2 chunks adjacent;
    // B: 8-column groups adjacent, the second 8 rows 4096 bytes on), and the other way round.
    for (lbo_a, sbo_a, lbo_b, sbo_b) in [(128u32, 256u32, 4096u32, 128u32), (1024, 128, 128, 256)] {
        for twice in [0, 1] {
            for dev in &devs {
                let strides = (lbo_a, sbo_a, lbo_b, sbo_b);
                let got = run_wgmma_selftest(dev, "selftest_wgmma_bf16", strides, twice, &pa, &pb);
                // Products of bf16 are exact in f32. The tensor cores' f32 additions need not
                // round to nearest (earlier GPUs truncate when adding), so each of the 17 per
                // batch (16 products, then the accumulator) may be off by a whole ulp of the
                // running sum: at most 17 · 2^-23 of the magnitudes a batch, and twice adds a
                // second batch.
                let scale = (1 + twice) as f64;
                let bound = |m: f64| 17.0 * scale * 2f64.powi(-23) * scale * m + 1e-30;
                let bad: Vec<usize> = (0..prod.len())
                    .filter(|&i| {
                        let err = (f32::from_bits(got[i]) as f64 - scale * prod[i]).abs();
                        err.is_nan() || err > bound(mag[i])
                    })
                    .collect();
                if bad.is_empty() {
                    continue;
                }
                let name = format!("wgmma_bf16_{lbo_a}_{sbo_a}_{lbo_b}_{sbo_b}_x{}", 1 + twice);
                let near = |v: u32, j: usize| {
                    (f32::from_bits(v) as f64 - scale * prod[j]).abs() <= bound(mag[j])
                };
                panic!(
                    "{}: wgmma bf16 lbo/sbo A {lbo_a}/{sbo_a} B {lbo_b}/{sbo_b} twice {twice}: {} of \
                     {} wrong, first at row {} col {}: {} vs {}{}",
                    dev.name(),
                    bad.len(),
                    prod.len(),
                    bad[0] / 256,
                    bad[0] % 256,
                    f32::from_bits(got[bad[0]]),
                    scale * prod[bad[0]],
                    explain_wrong(&name, &got, &bad, near, test_dump_dir().as_deref())
                );
            }
        }
    }
}
