//! Every CUDA kernel against its CPU reference, on the SIMT simulator (always — CI has no GPU)
//! and on a real GPU when one is usable (otherwise the GPU half says why it skipped). Outputs
//! are poisoned before each launch so an unwritten element fails.

mod common;

use common::devices;
use half::bf16;
use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::ops;
use recforge::backend::Backend;
use recforge::kernels;
use recforge::rng::Rng;
use recforge::tensor::{DType, HostTensor};

#[test]
fn ptx_and_simulator_define_the_same_kernels() {
    if std::env::var("RECFORGE_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
        let built = kernels::BUILT;
        assert!(
            built,
            "RECFORGE_REQUIRE_KERNELS=1 but the library has no PTX"
        );
    }
    let mut sim: Vec<&str> = kernels::SIM_KERNELS.to_vec();
    sim.sort();
    assert!(
        sim.contains(&"rmsnorm_f32") && sim.contains(&"rmsnorm_bf16"),
        "{sim:?}"
    );
    if kernels::BUILT {
        let mut ptx: Vec<&str> = kernels::MODULES
            .iter()
            .flat_map(|m| m.kernels.iter().copied())
            .collect();
        ptx.sort();
        assert_eq!(
            ptx, sim,
            "the PTX entries and the simulator registry differ"
        );
    } else {
        eprintln!("skipped PTX half: {}", kernels::NOT_BUILT);
    }
}

#[test]
fn static_shared_memory_is_declared_with_rf_shared() {
    // The simulator poisons RF_SHARED variables at each block's start; a bare `__shared__`
    // would keep the previous block's values (or zero) and hide reads of unwritten slots.
    // (Relative to the package root: where cargo runs tests, and where gpu-check runs them.)
    let mut bare = vec![];
    let mut files = 0;
    for e in std::fs::read_dir("kernels").expect("kernels/ (run from the repository root)") {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "cu") {
            files += 1;
            let src = std::fs::read_to_string(&path).unwrap();
            for (i, line) in src.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                if code.contains("__shared__") {
                    bare.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(files > 10, "only {files} kernel files found");
    assert!(
        bare.is_empty(),
        "declare static shared memory with RF_SHARED(type, name, [n]):\n{}",
        bare.join("\n")
    );
}

#[test]
fn ptxas_reports_no_spills() {
    if !kernels::BUILT {
        eprintln!("skipped: {}", kernels::NOT_BUILT);
        return;
    }
    for m in kernels::MODULES {
        assert!(
            m.ptx.contains(".version 9.0") || m.ptx.contains(".version 8."),
            "{}: PTX ISA must load on a CUDA 13.0 driver",
            m.name
        );
        // Hopper-only modules (wgmma) are compiled and reported for sm_90a alone.
        let archs: &[&str] = if m.target == "sm_90a" {
            assert!(
                m.ptx.contains(".target sm_90a"),
                "{}: a Hopper-only module must be compute_90a PTX",
                m.name
            );
            &["sm_90a"]
        } else {
            assert!(
                m.target.is_empty() && m.ptx.contains(".target sm_80"),
                "{}: unknown target {:?}",
                m.name,
                m.target
            );
            &["sm_86", "sm_90"]
        };
        for k in m.kernels {
            for &arch in archs {
                let r = m
                    .reports
                    .iter()
                    .find(|r| r.kernel == *k && r.arch == arch)
                    .unwrap_or_else(|| panic!("no ptxas report for {k} on {arch}"));
                assert!(r.registers > 0);
                assert_eq!(
                    (r.spill_store_bytes, r.spill_load_bytes),
                    (0, 0),
                    "{k} spills on {arch}"
                );
            }
        }
    }
}

#[test]
fn every_kernel_loads_and_misspelt_names_fail() {
    for dev in devices() {
        for k in dev.kernel_names() {
            dev.check_kernel(k)
                .unwrap_or_else(|e| panic!("{}: {k}: {e}", dev.name()));
        }
        let e = dev.check_kernel("rmsnorm_f23").unwrap_err().to_string();
        assert!(e.contains("rmsnorm_f23"), "{e}");
    }
}

#[test]
fn launches_are_checked_against_the_ptx_signature() {
    use recforge::backend::gpu::{Arg, Launch};
    if !kernels::BUILT {
        eprintln!("skipped: {}", kernels::NOT_BUILT);
        return;
    }
    // Every entry's parameters are ones a launch can pass.
    for m in kernels::MODULES {
        for k in m.kernels {
            let p = kernels::params_of(k).unwrap_or_else(|| panic!("no PTX signature for {k}"));
            assert!(
                !p.contains(&kernels::Param::Other),
                "{k}: a parameter no Arg passes: {p:?}"
            );
        }
    }
    // sum_squares_final_f32(const float* partial, int n, float* out): .u64, .u32, .u64.
    assert_eq!(
        kernels::params_of("sum_squares_final_f32"),
        Some(
            &[
                kernels::Param::B64,
                kernels::Param::B32,
                kernels::Param::B64
            ][..]
        )
    );
    for dev in devices() {
        let part = dev.upload(&[1.0f32, 2.0, 3.0]).unwrap();
        let mut out = dev.upload(&[f32::NAN]).unwrap();
        let (pp, po) = (dev.ptr(&part).unwrap(), dev.ptr_mut(&mut out).unwrap());
        let one = Launch::linear(1, 1024);
        // A 64-bit count where the kernel takes an int: the simulator would read its low half.
        let e = dev
            .launch("sum_squares_final_f32", one, &[pp, Arg::U64(3), po])
            .unwrap_err()
            .to_string();
        assert!(e.contains("argument 1 is U64") && e.contains("B32"), "{e}");
        let e = dev
            .launch("sum_squares_final_f32", one, &[pp, Arg::I32(3)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 arguments") && e.contains("3 parameters"),
            "{e}"
        );
        // The right arguments run: the partial sums add up over the NaN poison.
        dev.launch("sum_squares_final_f32", one, &[pp, Arg::I32(3), po])
            .unwrap();
        assert_eq!(dev.download(&out).unwrap(), [6.0], "{}", dev.name());
    }
}

#[test]
fn the_simulator_refuses_launches_a_gpu_could_not_run() {
    use recforge::backend::gpu::{Arg, Device, Launch};
    use recforge::kernels::Param;
    if !kernels::BUILT {
        eprintln!("skipped: {}", kernels::NOT_BUILT);
        return;
    }
    let dev = Device::sim();
    // Arguments of the right types that are never dereferenced: the launch is refused first.
    let dummy = |k: &str| -> Vec<Arg> {
        kernels::params_of(k)
            .unwrap()
            .iter()
            .map(|p| match p {
                Param::B64 => Arg::Ptr(0),
                Param::F32 => Arg::F32(0.0),
                _ => Arg::I32(0),
            })
            .collect()
    };
    // The dense bf16 GEMM (no launch bounds) uses 72 registers per thread on sm_86 (ptxas
    // report): 1024 threads would need 72 Ki registers of a block's 64 Ki.
    let k = "gemm_bf16_bf16";
    let e = dev
        .launch(k, Launch::linear(1, 1024), &dummy(k))
        .unwrap_err()
        .to_string();
    assert!(e.contains("registers") && e.contains("65536"), "{e}");
    // 100 KiB of dynamic shared memory fits an H100 block (227 KiB) but not an sm_86 one.
    let k = "sum_squares_final_f32";
    let cfg = Launch {
        shared_bytes: 100 * 1024,
        ..Launch::linear(1, 32)
    };
    let e = dev.launch(k, cfg, &dummy(k)).unwrap_err().to_string();
    assert!(e.contains("sm_86") && e.contains("shared memory"), "{e}");
    // lora_down_bf16 is declared __launch_bounds__(256) and its registers would allow 512
    // threads: the driver refuses the block anyway, so the simulator must too.
    let k = "lora_down_bf16";
    let e = dev
        .launch(k, Launch::linear(1, 512), &dummy(k))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(k) && e.contains("__launch_bounds__") && e.contains("256"),
        "{e}"
    );
}

/// Every `__launch_bounds__(N…)` with a literal N in kernels/*.cu, as (kernel, N): read from
/// the source, independently of the PTX the launch check reads.
fn launch_bounds_in_sources() -> Vec<(String, u32)> {
    let mut out = vec![];
    for f in std::fs::read_dir("kernels").unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        for after in src.split("__launch_bounds__(").skip(1) {
            let Some(close) = after.find(')') else {
                continue;
            };
            let Ok(n) = after[..close]
                .split(',')
                .next()
                .unwrap()
                .trim()
                .parse::<u32>()
            else {
                continue; // a macro: not checked here
            };
            let name: String = after[close + 1..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push((name, n));
        }
    }
    out
}

#[test]
fn the_launch_check_knows_every_kernels_launch_bounds() {
    if !kernels::BUILT {
        eprintln!("skipped: {}", kernels::NOT_BUILT);
        return;
    }
    let bounds = launch_bounds_in_sources();
    // The sources hold about twenty (attention, the GEMMs, LoRA, paged decode, sampling…).
    assert!(bounds.len() >= 15, "{bounds:?}");
    for (k, n) in &bounds {
        assert_eq!(kernels::max_threads_of(k), Some(*n), "{k}");
    }
    // A kernel without launch bounds has no limit of its own.
    assert_eq!(kernels::max_threads_of("sum_squares_final_f32"), None);
}

fn cpu_rmsnorm(x: &[f32], w: &[f32], rows: usize, d: usize) -> Vec<f32> {
    let cpu = Cpu::new();
    let xt = cpu
        .upload(&HostTensor::f32(vec![rows, d], x.to_vec()).unwrap())
        .unwrap();
    let wt = cpu
        .upload(&HostTensor::f32(vec![d], w.to_vec()).unwrap())
        .unwrap();
    let mut out = cpu.zeros(&[rows, d], DType::F32).unwrap();
    cpu.rmsnorm(&xt, &wt, 1e-5, &mut out).unwrap();
    cpu.download(&out).unwrap().to_f32().unwrap()
}

const SHAPES: [(usize, usize); 7] = [
    (1, 1),
    (3, 17),
    (5, 576),
    (7, 1000),
    (2, 4097),
    (64, 256),
    (1, 31),
];

#[test]
fn rmsnorm_f32_matches_the_cpu_reference() {
    let mut rng = Rng::new(11);
    for dev in devices() {
        for (rows, d) in SHAPES {
            let x: Vec<f32> = (0..rows * d).map(|_| 3.0 * rng.normal()).collect();
            let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.2 * rng.normal()).collect();
            let want = cpu_rmsnorm(&x, &w, rows, d);
            let (gx, gw) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap());
            let mut go = dev.upload(&vec![f32::NAN; rows * d]).unwrap();
            ops::rmsnorm(&dev, &gx, &gw, &mut go, rows, d, 1e-5).unwrap();
            let got = dev.download(&go).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // A tree sum instead of a sequential one over d squares: the mean differs by a
                // few ulps, so outputs agree to ~1e-6 relative; 1e-5 leaves room for rsqrtf's
                // 2-ulp error.
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{}: rows {rows} d {d} element {i}: got {g} want {w}",
                    dev.name()
                );
            }
        }
    }
}

#[test]
fn rmsnorm_bf16_matches_the_cpu_reference() {
    let mut rng = Rng::new(12);
    for dev in devices() {
        for (rows, d) in SHAPES {
            let x: Vec<bf16> = (0..rows * d)
                .map(|_| bf16::from_f32(3.0 * rng.normal()))
                .collect();
            let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.2 * rng.normal()).collect();
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let want = cpu_rmsnorm(&xf, &w, rows, d);
            let (gx, gw) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap());
            let mut go = dev.upload(&vec![bf16::NAN; rows * d]).unwrap();
            ops::rmsnorm(&dev, &gx, &gw, &mut go, rows, d, 1e-5).unwrap();
            let got = dev.download(&go).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // The output is rounded to bf16 (8 significant bits): half an ulp is at most
                // 2^-8 relative, plus the f32 differences above.
                let g = g.to_f32();
                assert!(
                    (g - w).abs() <= (1.0 / 256.0) * w.abs() + 1e-5,
                    "{}: rows {rows} d {d} element {i}: got {g} want {w}",
                    dev.name()
                );
            }
        }
    }
}

#[test]
fn wrappers_reject_wrong_lengths() {
    for dev in devices() {
        let a = dev.upload(&[0f32; 6]).unwrap();
        let w = dev.upload(&[1f32; 2]).unwrap();
        let mut o = dev.upload(&[0f32; 6]).unwrap();
        let e = ops::rmsnorm(&dev, &a, &w, &mut o, 2, 3, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rmsnorm_f32") && e.contains("expected"), "{e}");
    }
}

/// scripts/gpu-check.sh leaves the test executables listed in CPU_ONLY_TESTS out of the GPU
/// payload; a test file that gains a device half must leave that list, or its CUDA half would
/// never run on a GPU.
#[test]
fn gpu_check_stages_every_test_with_a_device_half() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = std::fs::read_to_string(root.join("scripts/gpu-check.sh")).unwrap();
    let list = script
        .lines()
        .find_map(|l| l.strip_prefix("CPU_ONLY_TESTS=\""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("gpu-check.sh defines CPU_ONLY_TESTS=\"...\"");
    for name in list.split_whitespace() {
        let path = root.join("tests").join(format!("{name}.rs"));
        let src = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("CPU_ONLY_TESTS names {name}: {e}"));
        // (`--device sim` is the simulator on any machine; `auto` would pick a GPU.)
        for device_use in ["devices()", "backend::gpu", "Gpu::", "\"cuda\"", "\"auto\""] {
            assert!(
                !src.contains(device_use),
                "{name} is in gpu-check.sh's CPU_ONLY_TESTS but uses {device_use}"
            );
        }
    }
}
