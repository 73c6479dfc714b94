//! Compiles every `kernels/*.cu` to PTX for the compute_80 virtual architecture (JIT-compiled
//! by the driver on sm_86 / sm_89 / sm_90), embeds the PTX in the library, and records each
//! kernel's registers, shared memory and spills from ptxas for sm_86 and sm_90.
//!
//! nvcc is looked for in: $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, then the folder that
//! scripts/install-cuda-toolchain.sh installs into (.toolchain/cuda/bin). Without nvcc the
//! build continues with a warning (the CUDA device then reports it has no kernels), unless
//! RECFORGE_REQUIRE_KERNELS=1, which CI sets, makes a missing nvcc an error.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCH_PTX: &str = "compute_80";
const ARCHS_REPORT: [&str; 2] = ["sm_86", "sm_90"];

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let p = root.join(".toolchain/cuda/bin/nvcc");
    p.exists().then_some(p)
}

#[derive(Default, Debug)]
struct Report {
    kernel: String,
    arch: String,
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

fn num_before(s: &str, unit: &str) -> Option<u32> {
    let i = s.find(unit)?;
    s[..i].split_whitespace().last()?.parse().ok()
}

/// Parse `ptxas -v` output (it goes to stderr).
fn parse_ptxas(text: &str, arch: &str) -> Vec<Report> {
    let mut out: Vec<Report> = vec![];
    for line in text.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Report {
                kernel: name,
                arch: arch.into(),
                ..Default::default()
            });
        } else if let Some(r) = out.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack = num_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains("registers") {
                r.registers = num_before(line, "registers").unwrap_or(0);
                r.smem = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("out dir"));
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "RECFORGE_REQUIRE_KERNELS"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let require = std::env::var("RECFORGE_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("kernels"))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();

    let mut gen = String::new();
    let nvcc = find_nvcc(&root);
    let Some(nvcc) = nvcc else {
        // Installing the toolchain later must trigger a rebuild.
        println!(
            "cargo:rerun-if-changed={}",
            root.join(".toolchain/cuda/.installed").display()
        );
        if require {
            panic!("RECFORGE_REQUIRE_KERNELS=1 but nvcc was not found ($NVCC, $CUDA_HOME, $CUDA_PATH, PATH, .toolchain/cuda/bin); run scripts/install-cuda-toolchain.sh");
        }
        println!("cargo:warning=nvcc not found: building without CUDA kernels (run scripts/install-cuda-toolchain.sh)");
        gen.push_str("pub const BUILT: bool = false;\npub const NVCC_VERSION: &str = \"\";\npub static MODULES: &[Module] = &[];\n");
        std::fs::write(out_dir.join("kernels.rs"), gen).expect("write kernels.rs");
        return;
    };
    println!("cargo:rerun-if-changed={}", nvcc.display());
    let ptxas = nvcc.with_file_name("ptxas");
    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.contains("release"))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    let host_cxx = std::env::var("NVCC_CCBIN").ok().or_else(|| {
        Path::new("/usr/bin/g++")
            .exists()
            .then(|| "/usr/bin/g++".to_string())
    });

    let _ = writeln!(gen, "pub const BUILT: bool = true;\npub const NVCC_VERSION: &str = {version:?};\npub static MODULES: &[Module] = &[");
    for src in &sources {
        let stem = src
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .into_owned();
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.args([
            "-ptx",
            &format!("-arch={ARCH_PTX}"),
            "-O3",
            "-std=c++17",
            "-lineinfo",
        ])
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-o")
        .arg(&ptx)
        .arg(src);
        if let Some(cxx) = &host_cxx {
            cmd.arg("-ccbin").arg(cxx);
        }
        let o = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        if !o.status.success() {
            panic!(
                "nvcc failed on {}:\n{}{}",
                src.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let ptx_text = std::fs::read_to_string(&ptx).expect("read ptx");
        let kernels: Vec<String> = ptx_text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap_or("").trim().to_string())
            .collect();
        let mut reports = vec![];
        for arch in ARCHS_REPORT {
            let o = Command::new(&ptxas)
                .args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"])
                .arg(&ptx)
                .output();
            match o {
                Ok(o) if o.status.success() => {
                    reports.extend(parse_ptxas(&String::from_utf8_lossy(&o.stderr), arch))
                }
                Ok(o) => panic!(
                    "ptxas -arch={arch} failed on {}:\n{}",
                    ptx.display(),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => {
                    println!("cargo:warning=cannot run ptxas ({e}); no register report for {stem}")
                }
            }
        }
        let _ = writeln!(gen, "    Module {{ name: {stem:?}, ptx: include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx\")), kernels: &{kernels:?}, reports: &[");
        for r in reports {
            let _ = writeln!(
                gen,
                "        PtxasReport {{ kernel: {:?}, arch: {:?}, registers: {}, stack_bytes: {}, spill_store_bytes: {}, spill_load_bytes: {}, shared_bytes: {} }},",
                r.kernel, r.arch, r.registers, r.stack, r.spill_stores, r.spill_loads, r.smem
            );
        }
        gen.push_str("    ] },\n");
    }
    gen.push_str("];\n");
    std::fs::write(out_dir.join("kernels.rs"), gen).expect("write kernels.rs");
}
