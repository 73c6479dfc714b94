//! One device API over a real GPU (`Cuda`, through cudarc) and the SIMT simulator (`Sim`,
//! host memory and the simulator's launcher, synchronous). Kernel launch wrappers are written
//! once against `Device` and run unchanged on both.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::cuda::CudaDevice;
use super::sim::{SimBuf, SimDevice};
use crate::error::{Error, Result};

/// Element types a device buffer can hold.
pub trait DevElem:
    Copy
    + Default
    + bytemuck::Pod
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + Send
    + Sync
    + 'static
{
}
impl DevElem for f32 {}
impl DevElem for i8 {}
impl DevElem for u8 {}
impl DevElem for i32 {}
impl DevElem for u32 {}
impl DevElem for u64 {}
impl DevElem for half::bf16 {}
impl DevElem for half::f16 {}

/// A kernel argument, passed by value: device addresses as `Ptr`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
}

/// Launch geometry, checked against each device's limits by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl Launch {
    pub fn linear(grid: u32, block: u32) -> Self {
        Launch {
            grid: (grid, 1, 1),
            block: (block, 1, 1),
            shared_bytes: 0,
        }
    }
}

pub enum Device {
    Cuda(Arc<CudaDevice>),
    Sim(SimDevice),
}

enum Repr<T: DevElem> {
    Cuda(CudaSlice<T>),
    Sim(SimBuf<T>),
}

/// A typed buffer in device memory (or, for the simulator, 256-byte aligned host memory).
pub struct DevBuf<T: DevElem> {
    repr: Repr<T>,
    len: usize,
}

impl<T: DevElem> DevBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Device {
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Device::Cuda(Arc::new(CudaDevice::new(ordinal)?)))
    }

    pub fn sim() -> Self {
        Device::Sim(SimDevice::new())
    }

    pub fn name(&self) -> String {
        match self {
            Device::Cuda(d) => format!("cuda ({})", d.name()),
            Device::Sim(_) => "sim (SIMT simulator on the CPU)".into(),
        }
    }

    pub fn is_sim(&self) -> bool {
        matches!(self, Device::Sim(_))
    }

    /// Every kernel this device can launch.
    pub fn kernel_names(&self) -> Vec<&'static str> {
        match self {
            Device::Cuda(_) => crate::kernels::MODULES
                .iter()
                .flat_map(|m| m.kernels.iter().copied())
                .collect(),
            Device::Sim(_) => crate::kernels::SIM_KERNELS.to_vec(),
        }
    }

    /// Check that `kernel` exists on this device (loading its module on CUDA).
    pub fn check_kernel(&self, kernel: &str) -> Result<()> {
        match self {
            Device::Cuda(d) => d.function(kernel).map(|_| ()),
            Device::Sim(s) => s.find(kernel).map(|_| ()),
        }
    }

    pub fn alloc_zeros<T: DevElem>(&self, len: usize) -> Result<DevBuf<T>> {
        let repr = match self {
            Device::Cuda(d) => Repr::Cuda(
                d.stream()
                    .alloc_zeros::<T>(len)
                    .map_err(|e| Error::Device(format!("allocating {len} elements: {e:?}")))?,
            ),
            Device::Sim(_) => Repr::Sim(SimBuf::zeros(len)?),
        };
        Ok(DevBuf { repr, len })
    }

    pub fn upload<T: DevElem>(&self, data: &[T]) -> Result<DevBuf<T>> {
        let repr = match self {
            Device::Cuda(d) => Repr::Cuda(d.upload(data)?),
            Device::Sim(_) => {
                let mut b = SimBuf::zeros(data.len())?;
                b.as_mut_slice().copy_from_slice(data);
                Repr::Sim(b)
            }
        };
        Ok(DevBuf {
            repr,
            len: data.len(),
        })
    }

    pub fn download<T: DevElem>(&self, buf: &DevBuf<T>) -> Result<Vec<T>> {
        match (self, &buf.repr) {
            (Device::Cuda(d), Repr::Cuda(s)) => d.download(s),
            (Device::Sim(_), Repr::Sim(b)) => Ok(b.as_slice().to_vec()),
            _ => Err(Error::Device("buffer belongs to another device".into())),
        }
    }

    /// Overwrite a whole buffer from the host.
    pub fn write<T: DevElem>(&self, buf: &mut DevBuf<T>, data: &[T]) -> Result<()> {
        if data.len() != buf.len {
            return Err(Error::Shape(format!(
                "write: {} elements into a buffer of {}",
                data.len(),
                buf.len
            )));
        }
        match (self, &mut buf.repr) {
            (Device::Cuda(d), Repr::Cuda(s)) => d
                .stream()
                .memcpy_htod(data, s)
                .map_err(|e| Error::Device(format!("host → device copy: {e:?}"))),
            (Device::Sim(_), Repr::Sim(b)) => {
                b.as_mut_slice().copy_from_slice(data);
                Ok(())
            }
            _ => Err(Error::Device("buffer belongs to another device".into())),
        }
    }

    /// The buffer's address as a kernel argument (read-only use).
    pub fn ptr<T: DevElem>(&self, buf: &DevBuf<T>) -> Result<Arg> {
        match (self, &buf.repr) {
            (Device::Cuda(d), Repr::Cuda(s)) => Ok(Arg::Ptr(s.device_ptr(d.stream()).0)),
            (Device::Sim(_), Repr::Sim(b)) => Ok(Arg::Ptr(b.addr())),
            _ => Err(Error::Device("buffer belongs to another device".into())),
        }
    }

    /// The buffer's address as a kernel argument the kernel writes through.
    pub fn ptr_mut<T: DevElem>(&self, buf: &mut DevBuf<T>) -> Result<Arg> {
        match (self, &mut buf.repr) {
            (Device::Cuda(d), Repr::Cuda(s)) => Ok(Arg::Ptr(s.device_ptr_mut(d.stream()).0)),
            (Device::Sim(_), Repr::Sim(b)) => Ok(Arg::Ptr(b.addr())),
            _ => Err(Error::Device("buffer belongs to another device".into())),
        }
    }

    /// Copy `n` elements from `src[src_off..]` to `dst[dst_off..]` on the device.
    pub fn copy<T: DevElem>(
        &self,
        src: &DevBuf<T>,
        src_off: usize,
        dst: &mut DevBuf<T>,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        if src_off + n > src.len || dst_off + n > dst.len {
            return Err(Error::Shape(format!(
                "copy: {n} elements from offset {src_off} of {} into offset {dst_off} of {}",
                src.len, dst.len
            )));
        }
        match (self, &src.repr, &mut dst.repr) {
            (Device::Cuda(d), Repr::Cuda(s), Repr::Cuda(t)) => {
                let from = s.slice(src_off..src_off + n);
                let mut to = t.slice_mut(dst_off..dst_off + n);
                d.stream()
                    .memcpy_dtod(&from, &mut to)
                    .map_err(|e| Error::Device(format!("device copy: {e:?}")))
            }
            (Device::Sim(_), Repr::Sim(s), Repr::Sim(t)) => {
                t.as_mut_slice()[dst_off..dst_off + n]
                    .copy_from_slice(&s.as_slice()[src_off..src_off + n]);
                Ok(())
            }
            _ => Err(Error::Device("buffer belongs to another device".into())),
        }
    }

    /// Copy `n` elements of `buf` from `src_off` to `dst_off` (non-overlapping ranges), e.g. a
    /// paged-KV block duplicated for copy-on-write.
    pub fn copy_within<T: DevElem>(
        &self,
        buf: &mut DevBuf<T>,
        src_off: usize,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        let len = buf.len;
        if src_off + n > len
            || dst_off + n > len
            || (src_off < dst_off + n && dst_off < src_off + n && n > 0)
        {
            return Err(Error::Shape(format!("copy_within: {n} elements from {src_off} to {dst_off} in a buffer of {len} (ranges must not overlap)")));
        }
        match (self, &mut buf.repr) {
            (Device::Cuda(d), Repr::Cuda(s)) => {
                let size = std::mem::size_of::<T>();
                let (base, _guard) = s.device_ptr_mut(d.stream());
                // SAFETY: both ranges lie inside this live allocation (checked above) and do not
                // overlap; the copy is ordered on the buffer's stream.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        base + (dst_off * size) as u64,
                        base + (src_off * size) as u64,
                        n * size,
                        d.stream().cu_stream(),
                    )
                }
                .map_err(|e| Error::Device(format!("device copy within a buffer: {e:?}")))
            }
            (Device::Sim(_), Repr::Sim(b)) => {
                b.as_mut_slice().copy_within(src_off..src_off + n, dst_off);
                Ok(())
            }
            _ => Err(Error::Device("buffer belongs to another device".into())),
        }
    }

    /// The address of element `offset` of `buf` (a row range passed to a kernel).
    pub fn ptr_at<T: DevElem>(&self, buf: &DevBuf<T>, offset: usize) -> Result<Arg> {
        offset_arg(self.ptr(buf)?, buf.len, offset, std::mem::size_of::<T>())
    }

    /// As `ptr_at`, for a range the kernel writes through.
    pub fn ptr_mut_at<T: DevElem>(&self, buf: &mut DevBuf<T>, offset: usize) -> Result<Arg> {
        let len = buf.len;
        offset_arg(self.ptr_mut(buf)?, len, offset, std::mem::size_of::<T>())
    }

    /// Launch `kernel` with `args` (in the kernel's parameter order). Errors name the kernel
    /// and the launch configuration.
    pub fn launch(&self, kernel: &str, cfg: Launch, args: &[Arg]) -> Result<()> {
        let (b, g) = (cfg.block, cfg.grid);
        let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
        if threads == 0 || threads > 1024 || g.0 == 0 || g.1 == 0 || g.2 == 0 {
            return Err(Error::Device(format!(
                "{kernel}: invalid launch {cfg:?} (1..=1024 threads per block, non-empty grid)"
            )));
        }
        match self {
            Device::Cuda(d) => {
                let f = d.function(kernel)?;
                if cfg.shared_bytes > 48 * 1024 {
                    // Dynamic shared memory above 48 KiB must be opted into per kernel.
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        cfg.shared_bytes as i32,
                    )
                    .map_err(|e| {
                        Error::Device(format!(
                            "{kernel}: {} bytes of shared memory refused: {e:?}",
                            cfg.shared_bytes
                        ))
                    })?;
                }
                let lc = LaunchConfig {
                    grid_dim: g,
                    block_dim: b,
                    shared_mem_bytes: cfg.shared_bytes,
                };
                let mut lb = d.stream().launch_builder(&f);
                for a in args {
                    match a {
                        Arg::Ptr(p) | Arg::U64(p) => lb.arg(p),
                        Arg::I32(v) => lb.arg(v),
                        Arg::U32(v) => lb.arg(v),
                        Arg::F32(v) => lb.arg(v),
                    };
                }
                // SAFETY: the wrappers that build `args` check them against the kernel's
                // signature and its buffers' lengths against the launch; pointers come from
                // live DevBufs of this device.
                unsafe { lb.launch(lc) }
                    .map_err(|e| Error::Device(format!("{kernel} launch {cfg:?}: {e:?}")))?;
                Ok(())
            }
            Device::Sim(s) => s.launch(kernel, cfg, args),
        }
    }

    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cuda(d) => d.synchronize(),
            Device::Sim(_) => Ok(()),
        }
    }

    /// Bytes in use on a real device; None in the simulator.
    pub fn memory_in_use(&self) -> Option<u64> {
        match self {
            Device::Cuda(d) => d.memory_in_use().ok(),
            Device::Sim(_) => None,
        }
    }
}

fn offset_arg(base: Arg, len: usize, offset: usize, elem: usize) -> Result<Arg> {
    match base {
        Arg::Ptr(p) if offset <= len => Ok(Arg::Ptr(p + (offset * elem) as u64)),
        _ => Err(Error::Shape(format!(
            "offset {offset} is outside a buffer of {len} elements"
        ))),
    }
}
