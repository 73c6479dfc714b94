//! The CUDA kernels compiled by build.rs: PTX embedded in the library, the kernel names found
//! in it, and ptxas' resource report per kernel and architecture.

#[derive(Debug)]
pub struct PtxasReport {
    pub kernel: &'static str,
    pub arch: &'static str,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub shared_bytes: u32,
}

#[derive(Debug)]
pub struct Module {
    /// The `.cu` file's stem, e.g. "rmsnorm".
    pub name: &'static str,
    /// "" for PTX that loads on every supported GPU (compute_80); "sm_90a" for a module of
    /// Hopper-only instructions (wgmma), which loads on compute capability 9.0 only.
    pub target: &'static str,
    pub ptx: &'static str,
    /// The same PTX compiled by ptxas for sm_90 (sm_90a for a Hopper-only module): what a
    /// compute capability 9.0 device loads, skipping the driver's JIT. Empty where ptxas could
    /// not run at build time.
    pub cubin_sm90: &'static [u8],
    /// Every `extern "C" __global__` entry in the PTX.
    pub kernels: &'static [&'static str],
    pub reports: &'static [PtxasReport],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module that defines `kernel`, if any.
pub fn module_of(kernel: &str) -> Option<&'static Module> {
    MODULES.iter().find(|m| m.kernels.contains(&kernel))
}

/// The static shared memory of `kernel` in bytes (the most of ptxas' reports for it); None
/// when no report names it.
pub fn static_shared_bytes(kernel: &str) -> Option<u32> {
    module_of(kernel)?
        .reports
        .iter()
        .filter(|r| r.kernel == kernel)
        .map(|r| r.shared_bytes)
        .max()
}

// `SIM_KERNELS` (every kernel the simulator was built with, from the sources' extern "C"
// __global__ entries), `BUILT`, `NVCC_VERSION` and `MODULES` come from build.rs.

pub const NOT_BUILT: &str =
    "built without kernels — run scripts/install-cuda-toolchain.sh and rebuild";

/// A kernel parameter as its PTX `.entry` declares it: what the driver copies from each
/// argument pointer. The simulator passes every argument in a 64-bit slot, so only this table
/// can show that a launch hands a 4-byte value to a 64-bit parameter (garbage in the upper
/// half on a real GPU) or the wrong number of arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// `.u64` / `.s64` / `.b64`: a pointer or a 64-bit integer.
    B64,
    /// `.u32` / `.s32` / `.b32`: an `int` or `unsigned`.
    B32,
    /// `.f32`.
    F32,
    /// Anything else (a struct, a 16-bit value): no `Arg` passes it.
    Other,
}

/// What the embedded PTX declares of one kernel.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    params: Vec<Param>,
    /// `.maxntid x, y, z` (from `__launch_bounds__`) as x · y · z: the most threads a block of
    /// this kernel may have. The driver refuses a larger block; the simulator, which compiles
    /// the source with `__launch_bounds__` defined away, would run it.
    max_threads: Option<u32>,
}

fn entries() -> &'static std::collections::HashMap<&'static str, Entry> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<&'static str, Entry>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| MODULES.iter().flat_map(|m| parse_entries(m.ptx)).collect())
}

/// The parameters of `kernel`, in order, from the embedded PTX; None when no module defines it
/// (built without kernels).
pub fn params_of(kernel: &str) -> Option<&'static [Param]> {
    entries().get(kernel).map(|e| e.params.as_slice())
}

/// The most threads a block of `kernel` may have, from its `__launch_bounds__` (the PTX's
/// `.maxntid`); None for a kernel without one, or when no module defines it.
pub fn max_threads_of(kernel: &str) -> Option<u32> {
    entries().get(kernel)?.max_threads
}

/// Every `.entry NAME( .param .TYPE NAME_param_i, ... ) [.maxntid x, y, z] {` of a PTX text.
fn parse_entries(ptx: &'static str) -> Vec<(&'static str, Entry)> {
    let mut out = Vec::new();
    let mut rest = ptx;
    while let Some(at) = rest.find(".entry ") {
        rest = &rest[at + ".entry ".len()..];
        let Some(open) = rest.find('(') else { break };
        let name = rest[..open].trim();
        let Some(close) = rest[open..].find(')') else {
            break;
        };
        let params = rest[open + 1..open + close]
            .split(',')
            .filter_map(|p| {
                let mut words = p.split_whitespace();
                (words.next() == Some(".param")).then(|| match words.next() {
                    Some(".u64" | ".s64" | ".b64") => Param::B64,
                    Some(".u32" | ".s32" | ".b32") => Param::B32,
                    Some(".f32") => Param::F32,
                    _ => Param::Other,
                })
            })
            .collect();
        rest = &rest[open + close..];
        // The performance directives sit between the parameter list and the body.
        let head = &rest[..rest.find('{').unwrap_or(rest.len())];
        let max_threads = head.split_once(".maxntid").and_then(|(_, dims)| {
            dims.lines()
                .next()?
                .split(',')
                .map(|d| d.trim().parse::<u32>().ok())
                .product::<Option<u32>>()
        });
        out.push((
            name,
            Entry {
                params,
                max_threads,
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{parse_entries, Entry, Param, BUILT, MODULES};

    #[test]
    fn every_module_carries_an_sm_90_cubin_of_its_kernels() {
        if !BUILT {
            eprintln!("skipped: {}", super::NOT_BUILT);
            return;
        }
        for m in MODULES {
            let c = m.cubin_sm90;
            assert!(c.len() > 64, "{}: no sm_90 cubin", m.name);
            // ELF64, little-endian, e_machine 190 (EM_CUDA); with ptxas 13.0's ELF ABI
            // version 8, bits 8–15 of e_flags hold the SM number (0x50 / 0x56 / 0x5a for
            // sm_80 / sm_86 / sm_90 compiles of the same PTX, checked by hand).
            assert_eq!(&c[..4], b"\x7fELF", "{}", m.name);
            assert_eq!((c[4], c[5]), (2, 1), "{}: ELF64 little-endian", m.name);
            assert_eq!(u16::from_le_bytes([c[18], c[19]]), 190, "{}", m.name);
            let flags = u32::from_le_bytes([c[48], c[49], c[50], c[51]]);
            assert_eq!((flags >> 8) & 0xff, 90, "{}: e_flags {flags:#x}", m.name);
            // Every kernel of the PTX is a symbol of the cubin.
            for k in m.kernels {
                assert!(
                    c.windows(k.len()).any(|w| w == k.as_bytes()),
                    "{}: kernel {k} not in the cubin",
                    m.name
                );
            }
        }
    }

    #[test]
    fn entries_and_their_parameters_are_read_from_ptx() {
        let ptx = ".visible .entry k_a(\n\t.param .u64 k_a_param_0,\n\t.param .u32 k_a_param_1,\n\
                   \t.param .f32 k_a_param_2\n)\n.maxntid 128, 2, 1\n.minnctapersm 2\n{\n\
                   \tld.param.u64 %rd1, [k_a_param_0];\n}\n\
                   .visible .entry k_b(\n\t.param .align 8 .b8 k_b_param_0[16]\n)\n{\n}\n\
                   .visible .entry k_c()\n.maxntid 512, 1, 1\n{\n}\n";
        let got = parse_entries(ptx);
        let entry = |params: Vec<Param>, max_threads| Entry {
            params,
            max_threads,
        };
        assert_eq!(
            got,
            vec![
                (
                    "k_a",
                    entry(vec![Param::B64, Param::B32, Param::F32], Some(256))
                ),
                // A kernel without launch bounds does not take the next kernel's.
                ("k_b", entry(vec![Param::Other], None)),
                ("k_c", entry(vec![], Some(512))),
            ]
        );
    }
}
