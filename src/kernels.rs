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
    pub ptx: &'static str,
    /// Every `extern "C" __global__` entry in the PTX.
    pub kernels: &'static [&'static str],
    pub reports: &'static [PtxasReport],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module that defines `kernel`, if any.
pub fn module_of(kernel: &str) -> Option<&'static Module> {
    MODULES.iter().find(|m| m.kernels.contains(&kernel))
}

// `SIM_KERNELS` (every kernel the simulator was built with, from the sources' extern "C"
// __global__ entries), `BUILT`, `NVCC_VERSION` and `MODULES` come from build.rs.

pub const NOT_BUILT: &str =
    "built without kernels — run scripts/install-cuda-toolchain.sh and rebuild";
