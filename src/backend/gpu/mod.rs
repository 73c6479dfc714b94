//! The GPU side: finding a usable CUDA device without ever panicking, and the device layer the
//! kernel launch wrappers run on.

pub mod arena;
pub mod backend;
pub mod cuda;
pub mod device;
pub mod ops;
pub mod profile;
pub mod sim;

pub use arena::MemStats;
pub use device::{Arg, DevBuf, Device, Launch};
pub use profile::{KernelTime, Profile};

use crate::error::{Error, Result};

/// What the machine offers for CUDA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaProbe {
    /// libcuda could not be loaded (no NVIDIA driver).
    NoDriver,
    /// The driver loaded but reported an error (message kept).
    DriverError(String),
    /// The driver works and sees these devices (possibly none).
    Devices(Vec<String>),
    /// The driver is older than the CUDA that compiled the kernels, so it cannot load their
    /// PTX or cubins (versions as `cuDriverGetVersion` gives them: 13000 = CUDA 13.0).
    DriverTooOld { driver: i32, needs: i32 },
}

impl CudaProbe {
    pub fn usable(&self) -> bool {
        matches!(self, CudaProbe::Devices(d) if !d.is_empty())
    }
    pub fn describe(&self) -> String {
        match self {
            CudaProbe::NoDriver => "no CUDA driver (libcuda not found)".into(),
            CudaProbe::DriverError(e) => format!("CUDA driver error: {e}"),
            CudaProbe::DriverTooOld { driver, needs } => format!(
                "the NVIDIA driver supports CUDA {}, but the kernels were compiled by nvcc {} \
                 and need a driver for CUDA {} or newer (update the driver, or build with an \
                 older toolchain)",
                cuda_version(*driver),
                cuda_version(*needs),
                cuda_version(*needs)
            ),
            CudaProbe::Devices(d) if d.is_empty() => "CUDA driver found, but no devices".into(),
            CudaProbe::Devices(d) => d
                .iter()
                .enumerate()
                .map(|(i, n)| format!("cuda:{i} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Look for CUDA devices. cudarc panics on the first driver call when libcuda is absent, so the
/// library's presence is checked first, and every call is kept behind `catch_unwind`.
pub fn probe_cuda() -> CudaProbe {
    let res = std::panic::catch_unwind(|| {
        // SAFETY: only tries to dlopen libcuda and reports whether that worked.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return CudaProbe::NoDriver;
        }
        // A driver older than the compiler would fail every module load (or, with cudarc's
        // CUDA 13 bindings, panic on a missing entry point): say so once, here.
        let mut driver = 0;
        // SAFETY: libcuda is loaded (above); the call writes one int.
        let got = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
        if got == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            if let Some(needs) = needed_driver(crate::kernels::NVCC_VERSION, driver) {
                return CudaProbe::DriverTooOld { driver, needs };
            }
        }
        let n = match cudarc::driver::CudaContext::device_count() {
            Ok(n) => n,
            Err(e) => return CudaProbe::DriverError(format!("{e:?}")),
        };
        let mut names = vec![];
        for i in 0..n.max(0) as usize {
            match cudarc::driver::result::device::get(i as i32)
                .and_then(cudarc::driver::result::device::get_name)
            {
                Ok(name) => names.push(name),
                Err(e) => return CudaProbe::DriverError(format!("device {i}: {e:?}")),
            }
        }
        CudaProbe::Devices(names)
    });
    res.unwrap_or_else(|_| {
        CudaProbe::DriverError("the CUDA driver library panicked while loading".into())
    })
}

/// "13.0" for 13000, as `cuDriverGetVersion` encodes CUDA versions (1000 · major + 10 · minor).
fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// The driver version the kernels need when `driver` is older than it, from nvcc's banner
/// ("Cuda compilation tools, release 13.0, V13.0.88"): a driver loads PTX and cubins of its own
/// CUDA version and older. None when the banner names no release (built without kernels).
fn needed_driver(nvcc: &str, driver: i32) -> Option<i32> {
    let release = nvcc.split("release ").nth(1)?.split(',').next()?.trim();
    let (major, minor) = release.split_once('.')?;
    let needs = major.parse::<i32>().ok()? * 1000 + minor.parse::<i32>().ok()? * 10;
    (driver < needs).then_some(needs)
}

/// The first CUDA device when one is usable and the kernels were built; otherwise `None`, after
/// printing on stderr why `what` (e.g. a benchmark group) is skipped.
pub fn cuda_or_say_why(what: &str) -> Option<Device> {
    let probe = probe_cuda();
    if !probe.usable() {
        eprintln!(
            "{what}: skipped: no usable CUDA device ({})",
            probe.describe()
        );
        return None;
    }
    if !crate::kernels::BUILT {
        eprintln!("{what}: skipped: {}", crate::kernels::NOT_BUILT);
        return None;
    }
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("{what}: skipped: cannot open cuda:0: {e}");
            None
        }
    }
}

/// The backend a [`DeviceChoice`] resolves to.
pub enum Chosen {
    Cpu(crate::backend::cpu::Cpu),
    Gpu(backend::Gpu),
}

/// `--device` on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    Sim,
    Auto,
}

impl DeviceChoice {
    /// Open the backend this choice names. `auto` takes CUDA when a GPU is usable and the
    /// library has kernels (saying so on stderr when a GPU is found but cannot be opened), else
    /// the CPU.
    pub fn open(self) -> Result<Chosen> {
        use crate::backend::cpu::Cpu;
        match self {
            DeviceChoice::Cpu => Ok(Chosen::Cpu(Cpu::new())),
            DeviceChoice::Sim => Ok(Chosen::Gpu(backend::Gpu::new(Device::sim()))),
            DeviceChoice::Cuda => Device::cuda(0)
                .map(|d| Chosen::Gpu(backend::Gpu::new(d)))
                .map_err(|e| Error::Device(format!("--device cuda: {e}"))),
            DeviceChoice::Auto => {
                let probe = probe_cuda();
                if !probe.usable() {
                    return Ok(Chosen::Cpu(Cpu::new()));
                }
                match Device::cuda(0) {
                    Ok(d) => Ok(Chosen::Gpu(backend::Gpu::new(d))),
                    Err(e) => {
                        eprintln!(
                            "note: {} found but not usable ({e}); using the CPU",
                            probe.describe()
                        );
                        Ok(Chosen::Cpu(Cpu::new()))
                    }
                }
            }
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            "sim" => Ok(DeviceChoice::Sim),
            "auto" => Ok(DeviceChoice::Auto),
            other => Err(Error::Invalid(format!(
                "unknown device '{other}' (expected cpu, cuda, sim or auto)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{cuda_version, needed_driver, CudaProbe};

    #[test]
    fn a_driver_older_than_the_compiler_is_named_before_any_module_load() {
        let nvcc =
            "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88";
        // CUDA 12.4's driver cannot load PTX ISA 9.0; 13.0 and later can.
        assert_eq!(needed_driver(nvcc, 12040), Some(13000));
        assert_eq!(needed_driver(nvcc, 12090), Some(13000));
        assert_eq!(needed_driver(nvcc, 13000), None);
        assert_eq!(needed_driver(nvcc, 13010), None);
        let nvcc_12_8 = "Cuda compilation tools, release 12.8, V12.8.93";
        assert_eq!(needed_driver(nvcc_12_8, 12060), Some(12080));
        assert_eq!(needed_driver(nvcc_12_8, 12080), None);
        // Built without kernels: nothing to compare against.
        assert_eq!(needed_driver("", 1000), None);
        assert_eq!(cuda_version(12040), "12.4");
        let why = CudaProbe::DriverTooOld {
            driver: 12040,
            needs: 13000,
        };
        assert!(!why.usable());
        let text = why.describe();
        assert!(
            text.contains("CUDA 12.4") && text.contains("13.0"),
            "{text}"
        );
    }
}
