//! A CUDA device through cudarc: one context and stream, the embedded PTX modules loaded on
//! demand, and the launch wrappers (one per kernel: shape checks, explicit launch geometry).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};

use crate::error::{Error, Result};
use crate::kernels;

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    name: String,
    /// Compute capability (major, minor).
    capability: (i32, i32),
}

fn dev_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e:?}"))
}

impl CudaDevice {
    /// Open device `ordinal`. Fails with a clear message when there is no driver, no device, or
    /// the library was built without kernels.
    pub fn new(ordinal: usize) -> Result<Self> {
        let probe = super::probe_cuda();
        if !probe.usable() {
            return Err(Error::Device(format!(
                "no usable CUDA device: {}",
                probe.describe()
            )));
        }
        if !kernels::BUILT {
            return Err(Error::Device(kernels::NOT_BUILT.into()));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev_err("creating the CUDA context"))?;
        let name = ctx.name().map_err(dev_err("reading the device name"))?;
        let capability = ctx
            .compute_capability()
            .map_err(dev_err("reading the compute capability"))?;
        // One stream, so cudarc's per-buffer event tracking only costs time.
        // SAFETY: called before any buffer or stream of this context exists.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        if ctx.has_async_alloc() {
            // cudarc allocates with cuMemAllocAsync from the device's default pool. With the
            // default release threshold (0) the pool hands freed memory back to the driver at
            // every synchronization, so each training step would allocate anew; keeping it
            // (PyTorch's caching allocator does the same) makes every step after the first
            // reuse the memory of the one before.
            // Only a speed setting: a driver that refuses it still runs everything, so it
            // gets a note, not an error.
            // SAFETY: `cu_device` is this context's device; the attribute takes a u64.
            let kept = unsafe {
                use cudarc::driver::{result, sys};
                result::device::get_default_mem_pool(ctx.cu_device()).and_then(|pool| {
                    let mut keep = u64::MAX;
                    result::mem_pool::set_attribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        (&mut keep as *mut u64).cast(),
                    )
                })
            };
            if let Err(e) = kept {
                eprintln!(
                    "note: the memory pool's release threshold could not be set ({e:?}): freed \
                     memory goes back to the driver at each synchronization (slower, not wrong)"
                );
            }
        }
        Ok(CudaDevice {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            name,
            capability,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Can this device load a module built for `target` ("" = any supported GPU; "sm_90a" =
    /// compute capability 9.0 exactly: arch-specific PTX does not run on later architectures)?
    pub fn supports(&self, target: &str) -> bool {
        match target {
            "" => true,
            "sm_90a" => self.capability == (9, 0),
            _ => false,
        }
    }

    /// A module's code for this device: on compute capability 9.0 its sm_90 cubin, built with
    /// the library (a fresh machine's driver would otherwise spend ~20–30 s compiling the PTX
    /// of every module once); elsewhere, or with `RECFORGE_CUBIN=off`, or should the cubin not
    /// load, the PTX, which the driver compiles.
    fn load(&self, m: &kernels::Module) -> Result<Arc<CudaModule>> {
        let cubin_wanted = std::env::var("RECFORGE_CUBIN").as_deref() != Ok("off");
        if self.capability == (9, 0) && !m.cubin_sm90.is_empty() && cubin_wanted {
            match self
                .ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(m.cubin_sm90.to_vec()))
            {
                Ok(x) => return Ok(x),
                Err(e) => eprintln!(
                    "note: module '{}': its sm_90 cubin did not load ({e:?}); the driver \
                     compiles its PTX instead",
                    m.name
                ),
            }
        }
        self.ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(m.ptx))
            .map_err(|e| Error::Device(format!("loading PTX module '{}': {e:?}", m.name)))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Look a kernel up by name, loading its module's PTX the first time.
    pub fn function(&self, kernel: &str) -> Result<CudaFunction> {
        // cudarc binds the context for loading a module but not for cuModuleGetFunction or
        // cuFuncSetAttribute, which fail on a thread where it is not current.
        self.bind()?;
        let m = kernels::module_of(kernel)
            .ok_or_else(|| Error::Device(format!("no kernel named '{kernel}' was compiled")))?;
        let mut mods = self
            .modules
            .lock()
            .map_err(|_| Error::Device("module cache poisoned".into()))?;
        if !self.supports(m.target) {
            return Err(Error::Device(format!(
                "kernel '{kernel}' is built for {} (Hopper) only; this device ({}) is sm_{}{}",
                m.target, self.name, self.capability.0, self.capability.1
            )));
        }
        let module = match mods.get(m.name) {
            Some(x) => x.clone(),
            None => {
                let x = self.load(m)?;
                mods.insert(m.name, x.clone());
                x
            }
        };
        module
            .load_function(kernel)
            .map_err(|e| Error::Device(format!("kernel '{kernel}' in module '{}': {e:?}", m.name)))
    }

    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(dev_err("host → device copy"))
    }

    pub fn download<T: cudarc::driver::DeviceRepr + Clone + Default>(
        &self,
        buf: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(buf)
            .map_err(dev_err("device → host copy"))
    }

    /// Make this device's context current on the calling thread (raw driver calls need it;
    /// cudarc's own calls do it themselves).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(dev_err("bind context"))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev_err("synchronize"))
    }

    /// Bytes in use on the device (total − free, every process), from the driver.
    pub fn memory_in_use(&self) -> Result<u64> {
        // Made current without cudarc's `bind_to_thread`: that also takes the error a failed
        // asynchronous free left behind, and bench-train's memory sampler, which ignores its
        // own failures, would then swallow the only report of it.
        // SAFETY: the context is alive (self holds it); the call only sets this thread's
        // current context.
        unsafe { cudarc::driver::result::ctx::set_current(self.ctx.cu_ctx()) }
            .map_err(dev_err("cuCtxSetCurrent"))?;
        let (free, total) =
            cudarc::driver::result::mem_get_info().map_err(dev_err("cuMemGetInfo"))?;
        Ok((total - free) as u64)
    }
}

impl Drop for CudaDevice {
    /// Let queued work finish before the modules it runs are unloaded (the fields drop next)
    /// — a device dropped on an error path may still have kernels in flight.
    fn drop(&mut self) {
        let _ = self.synchronize();
    }
}
