//! Compiles every `kernels/*.cu` to PTX for the compute_80 virtual architecture (JIT-compiled
//! by the driver on sm_86 / sm_89), embeds the PTX in the library, and records each kernel's
//! registers, shared memory and spills from ptxas for sm_86 and sm_90. The sm_90 compile is
//! kept and embedded too: on compute capability 9.0 (H100, H200) the module loads as that cubin,
//! with no JIT on a fresh machine (`backend::gpu::cuda`). A file whose first line is
//! `// recforge-arch: sm_90a` (Hopper-only wgmma) is compiled for compute_90a instead and
//! reported and kept for sm_90a; its module records that target and loads on sm_90 only.
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

/// The `extern "C" __global__ void NAME(` entries of a kernel source, in order.
fn global_kernels(src: &str) -> Vec<String> {
    let mut out = vec![];
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\"") {
        rest = &rest[i + "extern \"C\"".len()..];
        let decl = rest.trim_start();
        let Some(after) = decl.strip_prefix("__global__") else {
            continue;
        };
        let after = after.trim_start();
        let after = after.strip_prefix("void").unwrap_or(after).trim_start();
        let after = after
            .strip_prefix("__launch_bounds__")
            .map(|a| &a[a.find(')').map(|j| j + 1).unwrap_or(0)..])
            .unwrap_or(after)
            .trim_start();
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// Compile the kernels as host C++ for the SIMT simulator, with a generated registry of every
/// kernel found in the sources. Returns the kernel names.
fn build_simulator(root: &Path, out_dir: &Path, sources: &[PathBuf]) -> Vec<String> {
    let sim_dir = root.join("kernels/sim");
    let gen_dir = out_dir.join("sim");
    std::fs::create_dir_all(&gen_dir).expect("create sim dir");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .define("RF_SIM", None)
        .include(root.join("kernels"))
        .opt_level(2)
        .warnings(false);
    // The runtime: every .cpp / .S directly in kernels/sim (tests live in a subfolder).
    let mut runtime: Vec<PathBuf> = std::fs::read_dir(&sim_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "cpp" || x == "S"))
                .collect()
        })
        .unwrap_or_default();
    runtime.sort();
    build.files(&runtime);
    let mut all = vec![];
    let mut registry = String::from("#include \"sim/rf_sim.h\"\n");
    let mut tables = vec![];
    for src in sources {
        let stem = src
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .replace(['-', '.'], "_");
        let text = std::fs::read_to_string(src).expect("read kernel source");
        let names = global_kernels(&text);
        if names.is_empty() {
            continue;
        }
        // The primitives header first (it pulls in the standard headers), then the kernel
        // source inside an anonymous namespace so helpers of different .cu files cannot clash
        // at link time (the extern "C" kernels keep their names for the table below).
        let mut tu = format!(
            "#include \"common/recforge.cuh\"\n#include \"sim/rf_sim.h\"\nnamespace {{\n#include \"{}\"\n}}  // namespace\nextern \"C\" const rf_sim_kernel rf_sim_kernels_{stem}[] = {{\n",
            src.display()
        );
        // Hopper files' kernels read wgmma operands through the async proxy: the simulator
        // tracks their shared-memory writes to check the proxy fences (kernels/sim/rf_sim.cpp).
        let entry = if hopper_only(&text) {
            "RF_SIM_KERNEL_ASYNC_PROXY"
        } else {
            "RF_SIM_KERNEL"
        };
        for n in &names {
            let _ = writeln!(tu, "    {entry}({n}),");
        }
        let _ = writeln!(
            tu,
            "}};\nextern \"C\" const int rf_sim_kernels_{stem}_len = {};",
            names.len()
        );
        let p = gen_dir.join(format!("sim_{stem}.cpp"));
        std::fs::write(&p, tu).expect("write sim tu");
        build.file(&p);
        let _ = writeln!(registry, "extern \"C\" const rf_sim_kernel rf_sim_kernels_{stem}[];\nextern \"C\" const int rf_sim_kernels_{stem}_len;");
        tables.push(stem);
        all.extend(names);
    }
    registry.push_str("struct rf_sim_table { const rf_sim_kernel* k; const int* n; };\nstatic const rf_sim_table rf_sim_tables[] = {\n");
    for t in &tables {
        let _ = writeln!(
            registry,
            "    {{rf_sim_kernels_{t}, &rf_sim_kernels_{t}_len}},"
        );
    }
    registry.push_str("    {nullptr, nullptr}\n};\n");
    registry.push_str(
        "extern \"C\" int rf_sim_registry_len() { int n = 0; for (const rf_sim_table* t = rf_sim_tables; t->k; ++t) n += *t->n; return n; }\n\
         extern \"C\" const rf_sim_kernel* rf_sim_registry_at(int i) {\n\
         for (const rf_sim_table* t = rf_sim_tables; t->k; ++t) { if (i < *t->n) return &t->k[i]; i -= *t->n; }\n\
         return nullptr; }\n",
    );
    let reg = gen_dir.join("sim_registry.cpp");
    std::fs::write(&reg, registry).expect("write registry");
    build.file(&reg);
    build.compile("rf_sim");
    all
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
    let sim_kernels = build_simulator(&root, &out_dir, &sources);
    let _ = writeln!(gen, "pub static SIM_KERNELS: &[&str] = &{sim_kernels:?};");
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
        // A file whose first line is `// recforge-arch: sm_90a` uses Hopper-only instructions
        // (wgmma): its PTX targets compute_90a and loads on sm_90 devices only.
        let hopper = std::fs::read_to_string(src)
            .map(|t| hopper_only(&t))
            .unwrap_or(false);
        let (ptx_arch, report_archs, target): (&str, &[&str], &str) = if hopper {
            ("compute_90a", &["sm_90a"], "sm_90a")
        } else {
            (ARCH_PTX, &ARCHS_REPORT, "")
        };
        let mut cmd = Command::new(&nvcc);
        cmd.args([
            "-ptx",
            &format!("-arch={ptx_arch}"),
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
        // The Hopper compile is the code that runs there: keep it (with line info, as nvcc's
        // -lineinfo gives the PTX, for compute-sanitizer and ncu).
        let cubin = out_dir.join(format!("{stem}.sm90.cubin"));
        let mut have_cubin = false;
        for &arch in report_archs {
            let hopper_arch = arch.starts_with("sm_90");
            let mut cmd = Command::new(&ptxas);
            cmd.args([&format!("-arch={arch}"), "-v", "-o"]);
            if hopper_arch {
                cmd.arg(&cubin).arg("-lineinfo");
            } else {
                cmd.arg("/dev/null");
            }
            let o = cmd.arg(&ptx).output();
            match o {
                Ok(o) if o.status.success() => {
                    have_cubin |= hopper_arch;
                    let text = String::from_utf8_lossy(&o.stderr);
                    // ptxas warnings are performance cliffs (e.g. C7515: wgmma serialized);
                    // pass them on instead of dropping them with the -v noise.
                    for l in text.lines().filter(|l| l.contains("warning")) {
                        println!("cargo:warning=ptxas -arch={arch} {stem}: {}", l.trim());
                    }
                    reports.extend(parse_ptxas(&text, arch))
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
        let cubin_expr = if have_cubin {
            format!("include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.sm90.cubin\"))")
        } else {
            "&[]".to_string()
        };
        let _ = writeln!(gen, "    Module {{ name: {stem:?}, target: {target:?}, ptx: include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx\")), cubin_sm90: {cubin_expr}, kernels: &{kernels:?}, reports: &[");
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

/// A kernel file whose first line is `// recforge-arch: sm_90a` uses Hopper-only instructions.
fn hopper_only(text: &str) -> bool {
    text.lines().next().unwrap_or("").trim() == "// recforge-arch: sm_90a"
}
