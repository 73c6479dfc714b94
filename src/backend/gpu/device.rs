//! One device API over a real GPU (`Cuda`, through cudarc) and the SIMT simulator (`Sim`,
//! host memory and the simulator's launcher, synchronous). Kernel launch wrappers are written
//! once against `Device` and run unchanged on both.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::arena::{block_bytes, Backing, MemStats, Memory, Source};
use super::cuda::CudaDevice;
use super::profile::{Profile, Profiler};
use super::sim::{SimBuf, SimDevice};
use crate::error::{Error, Result};
use crate::memory::human;

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

/// A CUDA device or the simulator, with the accounting of every buffer it hands out and,
/// once reserved, the arena they are carved from (`arena.rs`).
pub struct Device {
    kind: Kind,
    mem: Arc<Memory>,
    prof: Profiler,
}

enum Kind {
    Cuda(Arc<CudaDevice>),
    Sim(SimDevice),
}

enum Repr<T: DevElem> {
    Cuda(CudaSlice<T>),
    Sim(SimBuf<T>),
    /// A block of the CUDA device's arena, at this device address. The arena's memory stays
    /// alive through `DevBuf::mem`. (A simulator arena block is a `Sim` buffer of its own.)
    Arena {
        addr: u64,
    },
}

/// A typed buffer in device memory (or, for the simulator, 256-byte aligned host memory).
pub struct DevBuf<T: DevElem> {
    repr: Repr<T>,
    len: usize,
    /// The accounting of the device it came from (bytes are given back on drop).
    mem: Arc<Memory>,
    /// Bytes it counts for: `len` elements rounded up to a 256-byte block.
    bytes: u64,
    /// Its block's offset in the device's arena, when it was carved from one.
    arena_offset: Option<u64>,
}

impl<T: DevElem> DevBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Its block's offset in the device's arena, when it was carved from one (on CUDA its
    /// address is the arena's base plus this offset).
    pub fn arena_offset(&self) -> Option<u64> {
        self.arena_offset
    }
}

impl<T: DevElem> Drop for DevBuf<T> {
    fn drop(&mut self) {
        self.mem.release(self.arena_offset, self.bytes);
    }
}

fn other_device() -> Error {
    Error::Device("buffer belongs to another device".into())
}

fn byte_len<T: DevElem>(len: usize) -> Result<u64> {
    len.checked_mul(std::mem::size_of::<T>())
        .map(|b| b as u64)
        .ok_or_else(|| Error::Device(format!("{len} elements overflow a buffer size")))
}

/// What a new buffer holds before its first use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Init {
    /// Zeros (a memset on a GPU).
    Zero,
    /// Unspecified; the caller's kernels write it in full before reading it. The simulator
    /// fills it with 0xFF bytes (NaN, -1), so a read of what nobody wrote fails the tests
    /// instead of finding a lucky zero.
    Poison,
    /// Unspecified, and written from the host at once (`upload`): nothing to do anywhere.
    Written,
}

impl Device {
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Device {
            kind: Kind::Cuda(Arc::new(CudaDevice::new(ordinal)?)),
            mem: Arc::default(),
            prof: Profiler::default(),
        })
    }

    pub fn sim() -> Self {
        Device {
            kind: Kind::Sim(SimDevice::new()),
            mem: Arc::default(),
            prof: Profiler::default(),
        }
    }

    pub fn name(&self) -> String {
        match &self.kind {
            Kind::Cuda(d) => format!("cuda ({})", d.name()),
            Kind::Sim(_) => "sim (SIMT simulator on the CPU)".into(),
        }
    }

    pub fn is_sim(&self) -> bool {
        matches!(self.kind, Kind::Sim(_))
    }

    /// Does this device run the Hopper-only (wgmma) kernels? The simulator does (it stands in
    /// for every target); a CUDA device does when its compute capability is 9.0.
    pub fn has_wgmma(&self) -> bool {
        match &self.kind {
            Kind::Cuda(d) => d.supports("sm_90a"),
            Kind::Sim(_) => true,
        }
    }

    /// Time every kernel launch, memset and copy from now on, by name, until `profile_stop`
    /// (see `profile.rs`). A second start forgets what the first recorded.
    pub fn profile_start(&self) -> Result<()> {
        self.prof.start()
    }

    /// Wait for the device, stop profiling and return what ran since `profile_start`.
    pub fn profile_stop(&self) -> Result<Profile> {
        self.synchronize()?;
        self.prof.stop()
    }

    /// Run one device operation, timed under `name` while profiling is on.
    fn timed<R>(&self, name: &str, op: impl FnOnce() -> Result<R>) -> Result<R> {
        let cuda = match &self.kind {
            Kind::Cuda(d) => Some(&**d),
            Kind::Sim(_) => None,
        };
        self.prof.time(name, cuda, op)
    }

    /// Every kernel this device can launch (on CUDA, the Hopper-only modules only on sm_90).
    pub fn kernel_names(&self) -> Vec<&'static str> {
        match &self.kind {
            Kind::Cuda(d) => crate::kernels::MODULES
                .iter()
                .filter(|m| d.supports(m.target))
                .flat_map(|m| m.kernels.iter().copied())
                .collect(),
            Kind::Sim(_) => crate::kernels::SIM_KERNELS.to_vec(),
        }
    }

    /// Check that `kernel` exists on this device (loading its module on CUDA).
    pub fn check_kernel(&self, kernel: &str) -> Result<()> {
        match &self.kind {
            Kind::Cuda(d) => d.function(kernel).map(|_| ()),
            Kind::Sim(s) => s.find(kernel).map(|_| ()),
        }
    }

    // ---- memory ---------------------------------------------------------------------------

    /// Make one allocation of `bytes` and carve every later buffer out of it (see `arena.rs`).
    /// Buffers that exist already keep their own memory. Refused when an arena exists.
    pub fn reserve_arena(&self, bytes: u64) -> Result<()> {
        if let Some(cap) = self.mem.stats().arena {
            return Err(Error::Device(format!(
                "a {} arena is already reserved on this device",
                human(cap)
            )));
        }
        let capacity = block_bytes(bytes);
        let backing = self.backing(capacity).map_err(|e| {
            Error::Device(format!(
                "reserving the {} arena of the memory plan: {e}",
                human(capacity)
            ))
        })?;
        let base = match (&backing, &self.kind) {
            (Backing::Cuda(s), Kind::Cuda(d)) => s.device_ptr(d.stream()).0,
            (Backing::Cuda(_), Kind::Sim(_)) => return Err(other_device()),
            (Backing::SimAccounting, _) => 0,
        };
        self.mem.install_arena(base, capacity, backing)
    }

    fn backing(&self, bytes: u64) -> Result<Backing> {
        let n = usize::try_from(bytes).map_err(|_| Error::Device("arena too large".into()))?;
        Ok(match &self.kind {
            Kind::Cuda(d) => Backing::Cuda(
                // SAFETY: u8 has no invalid bit patterns; every block handed out is zeroed or
                // written before use (alloc_zeros / upload).
                unsafe { d.stream().alloc::<u8>(n) }
                    .map_err(|e| Error::Device(format!("allocating {n} bytes: {e:?}")))?,
            ),
            Kind::Sim(_) => Backing::SimAccounting,
        })
    }

    /// The accounting of every buffer this device handed out (exact on both devices).
    pub fn memory_stats(&self) -> MemStats {
        self.mem.stats()
    }

    /// Start a new peak measurement from the bytes held now.
    pub fn reset_peak(&self) {
        self.mem.reset_peak()
    }

    /// A new buffer of `len` elements, its contents as `init` says.
    fn alloc<T: DevElem>(&self, len: usize, init: Init) -> Result<DevBuf<T>> {
        let zero = init == Init::Zero;
        let size = byte_len::<T>(len)?;
        let bytes = block_bytes(size);
        let what = format!(
            "a buffer of {len} × {}-byte elements",
            std::mem::size_of::<T>()
        );
        let source = self.mem.acquire(bytes, &what)?;
        let arena_offset = match source {
            Source::Arena { offset, .. } => Some(offset),
            Source::Device => None,
        };
        let r = match (&self.kind, source) {
            (Kind::Cuda(d), Source::Arena { addr, .. }) => {
                if zero {
                    // No `?` in here: a failure must reach the release of the block below.
                    d.bind()
                        .and_then(|()| {
                            // SAFETY: [addr, addr + size) lies inside the live arena block
                            // just handed out; the memset is ordered on the device's one
                            // stream.
                            unsafe {
                                cudarc::driver::result::memset_d8_async(
                                    addr,
                                    0,
                                    size as usize,
                                    d.stream().cu_stream(),
                                )
                            }
                            .map_err(|e| Error::Device(format!("zeroing {what}: {e:?}")))
                        })
                        .map(|()| Repr::Arena { addr })
                } else {
                    Ok(Repr::Arena { addr })
                }
            }
            // The driver refuses a 0-byte allocation (CUDA_ERROR_INVALID_VALUE) where the
            // simulator and the arena hand out an empty block, so an empty buffer (no outlier
            // columns, an empty batch) gets one element it never exposes.
            (Kind::Cuda(d), Source::Device) => if zero {
                d.stream().alloc_zeros::<T>(len.max(1))
            } else {
                // SAFETY: the caller writes every element before reading it (`Init`).
                unsafe { d.stream().alloc::<T>(len.max(1)) }
            }
            .map(Repr::Cuda)
            .map_err(|e| Error::Device(format!("allocating {what}: {e:?}"))),
            // In the simulator an arena block, like any buffer, is its own guarded mapping;
            // the arena only did the accounting.
            (Kind::Sim(_), _) => SimBuf::zeros(len).map(|mut b| {
                if init == Init::Poison {
                    bytemuck::cast_slice_mut::<T, u8>(b.as_mut_slice()).fill(0xFF);
                }
                Repr::Sim(b)
            }),
        };
        let repr = match r {
            Ok(r) => r,
            Err(e) => {
                self.mem.release(arena_offset, bytes);
                return Err(e);
            }
        };
        Ok(DevBuf {
            repr,
            len,
            mem: self.mem.clone(),
            bytes,
            arena_offset,
        })
    }

    /// Zero every element of `buf` in place (a memset on the device's stream).
    pub fn fill_zero<T: DevElem>(&self, buf: &mut DevBuf<T>) -> Result<()> {
        self.owns(buf)?;
        let size = byte_len::<T>(buf.len)? as usize;
        self.timed("memset", || match &self.kind {
            Kind::Cuda(d) => {
                let addr = Self::cuda_addr(d, buf)?;
                d.bind()?;
                // SAFETY: [addr, addr + size) is the live buffer `buf`, held exclusively here;
                // all-zero bytes are a valid T (DevElem: ValidAsZeroBits). Ordered on the stream.
                unsafe {
                    cudarc::driver::result::memset_d8_async(addr, 0, size, d.stream().cu_stream())
                }
                .map_err(|e| Error::Device(format!("zeroing a buffer: {e:?}")))
            }
            Kind::Sim(_) => {
                Self::sim_slice_mut(buf)?.fill(T::default());
                Ok(())
            }
        })
    }

    pub fn alloc_zeros<T: DevElem>(&self, len: usize) -> Result<DevBuf<T>> {
        self.alloc(len, Init::Zero)
    }

    /// A buffer whose contents are unspecified (no memset on a GPU; 0xFF bytes in the
    /// simulator): for scratch that a kernel writes in full before anything reads it.
    pub fn alloc_uninit<T: DevElem>(&self, len: usize) -> Result<DevBuf<T>> {
        self.alloc(len, Init::Poison)
    }

    pub fn upload<T: DevElem>(&self, data: &[T]) -> Result<DevBuf<T>> {
        let mut b = self.alloc(data.len(), Init::Written)?;
        self.write(&mut b, data)?;
        Ok(b)
    }

    fn owns<T: DevElem>(&self, buf: &DevBuf<T>) -> Result<()> {
        if Arc::ptr_eq(&self.mem, &buf.mem) {
            Ok(())
        } else {
            Err(other_device())
        }
    }

    /// The buffer's device address on CUDA.
    fn cuda_addr<T: DevElem>(d: &CudaDevice, buf: &DevBuf<T>) -> Result<u64> {
        match &buf.repr {
            Repr::Cuda(s) => Ok(s.device_ptr(d.stream()).0),
            Repr::Arena { addr } => Ok(*addr),
            Repr::Sim(_) => Err(other_device()),
        }
    }

    /// The buffer's elements, in the simulator (host memory).
    fn sim_slice<T: DevElem>(buf: &DevBuf<T>) -> Result<&[T]> {
        match &buf.repr {
            Repr::Sim(b) => Ok(b.as_slice()),
            Repr::Cuda(_) | Repr::Arena { .. } => Err(other_device()),
        }
    }

    fn sim_slice_mut<T: DevElem>(buf: &mut DevBuf<T>) -> Result<&mut [T]> {
        match &mut buf.repr {
            Repr::Sim(b) => Ok(b.as_mut_slice()),
            Repr::Cuda(_) | Repr::Arena { .. } => Err(other_device()),
        }
    }

    pub fn download<T: DevElem>(&self, buf: &DevBuf<T>) -> Result<Vec<T>> {
        self.owns(buf)?;
        self.timed("copy device→host", || match (&self.kind, &buf.repr) {
            (Kind::Cuda(d), Repr::Cuda(s)) => {
                let mut v = d.download(s)?;
                // An empty buffer holds one hidden element (see `alloc`).
                v.truncate(buf.len);
                Ok(v)
            }
            (Kind::Cuda(d), _) => {
                let src = Self::cuda_addr(d, buf)?;
                let mut out = vec![T::default(); buf.len];
                d.bind()?;
                // SAFETY: `src` is a live block of buf.len elements of T; `out` has as many.
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(
                        &mut out[..],
                        src,
                        d.stream().cu_stream(),
                    )
                }
                .map_err(|e| Error::Device(format!("device → host copy: {e:?}")))?;
                // The copy into pageable memory must be complete before `out` is read.
                d.synchronize()?;
                Ok(out)
            }
            (Kind::Sim(_), _) => Ok(Self::sim_slice(buf)?.to_vec()),
        })
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
        self.owns(buf)?;
        self.timed("copy host→device", || match (&self.kind, &mut buf.repr) {
            (Kind::Cuda(d), Repr::Cuda(s)) => d
                .stream()
                .memcpy_htod(data, s)
                .map_err(|e| Error::Device(format!("host → device copy: {e:?}"))),
            (Kind::Cuda(d), _) => {
                let dst = Self::cuda_addr(d, buf)?;
                d.bind()?;
                // SAFETY: `dst` is a live block of data.len() elements of T. From pageable
                // memory the driver stages `data` before this call returns.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(dst, data, d.stream().cu_stream())
                }
                .map_err(|e| Error::Device(format!("host → device copy: {e:?}")))
            }
            (Kind::Sim(_), _) => {
                Self::sim_slice_mut(buf)?.copy_from_slice(data);
                Ok(())
            }
        })
    }

    /// The buffer's address as a kernel argument (read-only use).
    pub fn ptr<T: DevElem>(&self, buf: &DevBuf<T>) -> Result<Arg> {
        self.owns(buf)?;
        match (&self.kind, &buf.repr) {
            (Kind::Cuda(d), _) => Ok(Arg::Ptr(Self::cuda_addr(d, buf)?)),
            (Kind::Sim(_), Repr::Sim(b)) => Ok(Arg::Ptr(b.addr())),
            (Kind::Sim(_), Repr::Cuda(_) | Repr::Arena { .. }) => Err(other_device()),
        }
    }

    /// The buffer's address as a kernel argument the kernel writes through.
    pub fn ptr_mut<T: DevElem>(&self, buf: &mut DevBuf<T>) -> Result<Arg> {
        self.owns(buf)?;
        match (&self.kind, &mut buf.repr) {
            (Kind::Cuda(d), Repr::Cuda(s)) => Ok(Arg::Ptr(s.device_ptr_mut(d.stream()).0)),
            _ => self.ptr(buf),
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
        self.owns(src)?;
        self.owns(dst)?;
        self.timed("copy device→device", || match &self.kind {
            Kind::Cuda(d) => {
                let size = std::mem::size_of::<T>();
                let from = Self::cuda_addr(d, src)? + (src_off * size) as u64;
                let to = Self::cuda_addr(d, dst)? + (dst_off * size) as u64;
                d.bind()?;
                // SAFETY: both ranges lie inside live buffers of this device (checked above);
                // two distinct buffers never overlap. Ordered on the device's one stream.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        to,
                        from,
                        n * size,
                        d.stream().cu_stream(),
                    )
                }
                .map_err(|e| Error::Device(format!("device copy: {e:?}")))
            }
            Kind::Sim(_) => {
                let from = &Self::sim_slice(src)?[src_off..src_off + n];
                // Two distinct buffers: `src` is borrowed shared and `dst` exclusively.
                let from: Vec<T> = from.to_vec();
                Self::sim_slice_mut(dst)?[dst_off..dst_off + n].copy_from_slice(&from);
                Ok(())
            }
        })
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
        self.owns(buf)?;
        self.timed("copy device→device", || match &self.kind {
            Kind::Cuda(d) => {
                let size = std::mem::size_of::<T>();
                let base = Self::cuda_addr(d, buf)?;
                d.bind()?;
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
            Kind::Sim(_) => {
                Self::sim_slice_mut(buf)?.copy_within(src_off..src_off + n, dst_off);
                Ok(())
            }
        })
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
        if threads == 0
            || threads > 1024
            || g.0 == 0
            || g.1 == 0
            || g.2 == 0
            || g.0 > i32::MAX as u32
            || g.1 > 65535
            || g.2 > 65535
        {
            return Err(Error::Device(format!(
                "{kernel}: invalid launch {cfg:?} (1..=1024 threads per block, a non-empty grid \
                 of at most 2^31-1 × 65535 × 65535 blocks)"
            )));
        }
        if let Some(max) = crate::kernels::max_threads_of(kernel) {
            if threads > max as u64 {
                return Err(Error::Device(format!(
                    "{kernel}: a block of {threads} threads, but its __launch_bounds__ allow \
                     {max} (launch {cfg:?})"
                )));
            }
        }
        check_args(kernel, args)?;
        if self.is_sim() {
            // The driver checks a real launch against its own device; the simulator stands in
            // for every target, so it checks against each one ptxas compiled for.
            check_resources(kernel, cfg, threads)?;
        }
        self.timed(kernel, || match &self.kind {
            Kind::Cuda(d) => {
                let f = d.function(kernel)?;
                // Without an opt-in a kernel's dynamic shared memory may take only what its
                // static shared memory (from the build's ptxas reports; unknown counts as all
                // of it) leaves of 48 KiB; the driver refuses a launch past that.
                if cfg.shared_bytes > 0
                    && crate::kernels::static_shared_bytes(kernel).unwrap_or(48 * 1024)
                        + cfg.shared_bytes
                        > 48 * 1024
                {
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
            Kind::Sim(s) => s.launch(kernel, cfg, args),
        })
    }

    pub fn synchronize(&self) -> Result<()> {
        match &self.kind {
            Kind::Cuda(d) => d.synchronize(),
            Kind::Sim(_) => Ok(()),
        }
    }

    /// Bytes in use on a real device, from the driver (every process; the memory pool's
    /// cached memory included); None in the simulator. `memory_stats` counts this device's
    /// own buffers instead.
    pub fn memory_in_use(&self) -> Option<u64> {
        match &self.kind {
            Kind::Cuda(d) => d.memory_in_use().ok(),
            Kind::Sim(_) => None,
        }
    }
}

/// The arguments against the kernel's PTX signature, on both devices: the simulator would
/// accept a 4-byte value for a 64-bit parameter (it passes 64-bit slots) where the driver would
/// read 4 bytes past it. Without PTX (built without kernels) there is nothing to check against.
fn check_args(kernel: &str, args: &[Arg]) -> Result<()> {
    use crate::kernels::Param;
    let Some(params) = crate::kernels::params_of(kernel) else {
        return Ok(());
    };
    if params.len() != args.len() {
        return Err(Error::Device(format!(
            "{kernel}: launched with {} arguments, but its PTX declares {} parameters",
            args.len(),
            params.len()
        )));
    }
    for (i, (p, a)) in params.iter().zip(args).enumerate() {
        let fits = matches!(
            (p, a),
            (Param::B64, Arg::Ptr(_) | Arg::U64(_))
                | (Param::B32, Arg::I32(_) | Arg::U32(_))
                | (Param::F32, Arg::F32(_))
        );
        if !fits {
            return Err(Error::Device(format!(
                "{kernel}: argument {i} is {a:?}, but its PTX parameter {i} is {p:?}"
            )));
        }
    }
    Ok(())
}

/// The most shared memory (static + dynamic) one block may have, by architecture: 99 KiB on
/// sm_86 (the 24 GiB Ampere cards the memory plan is for), 227 KiB on sm_90.
fn max_block_shared(arch: &str) -> Option<u64> {
    match arch {
        "sm_86" => Some(99 * 1024),
        "sm_90" | "sm_90a" => Some(227 * 1024),
        _ => None,
    }
}

/// Would this launch fit each architecture ptxas compiled the kernel for? Registers are given
/// out per warp in units of 256 and a block may hold 64 Ki of them (a launch that asks for more
/// fails with "too many resources requested" on the GPU, never in the simulator otherwise).
fn check_resources(kernel: &str, cfg: Launch, threads: u64) -> Result<()> {
    let Some(module) = crate::kernels::module_of(kernel) else {
        return Ok(());
    };
    let warps = threads.div_ceil(32);
    for r in module.reports.iter().filter(|r| r.kernel == kernel) {
        let per_warp = (r.registers as u64 * 32).div_ceil(256) * 256;
        if warps * per_warp > 65536 {
            return Err(Error::Device(format!(
                "{kernel}: a block of {threads} threads needs {} registers on {} ({} per thread), \
                 more than the 65536 a block can have",
                warps * per_warp,
                r.arch,
                r.registers
            )));
        }
        if let Some(max) = max_block_shared(r.arch) {
            let shared = r.shared_bytes as u64 + cfg.shared_bytes as u64;
            if shared > max {
                return Err(Error::Device(format!(
                    "{kernel}: {shared} bytes of shared memory per block ({} static + {} dynamic), \
                     more than the {max} an {} block can have",
                    r.shared_bytes, cfg.shared_bytes, r.arch
                )));
            }
        }
    }
    Ok(())
}

fn offset_arg(base: Arg, len: usize, offset: usize, elem: usize) -> Result<Arg> {
    match base {
        Arg::Ptr(p) if offset <= len => Ok(Arg::Ptr(p + (offset * elem) as u64)),
        _ => Err(Error::Shape(format!(
            "offset {offset} is outside a buffer of {len} elements"
        ))),
    }
}
