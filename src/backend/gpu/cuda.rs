//! A CUDA device through cudarc: one context and stream, the embedded PTX modules loaded on
//! demand, and the launch wrappers (one per kernel: shape checks, explicit launch geometry).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use crate::error::{Error, Result};
use crate::kernels;

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    name: String,
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
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Look a kernel up by name, loading its module's PTX the first time.
    pub fn function(&self, kernel: &str) -> Result<CudaFunction> {
        let m = kernels::module_of(kernel)
            .ok_or_else(|| Error::Device(format!("no kernel named '{kernel}' was compiled")))?;
        let mut mods = self
            .modules
            .lock()
            .map_err(|_| Error::Device("module cache poisoned".into()))?;
        let module = match mods.get(m.name) {
            Some(x) => x.clone(),
            None => {
                let x = self
                    .ctx
                    .load_module(cudarc::nvrtc::Ptx::from_src(m.ptx))
                    .map_err(|e| {
                        Error::Device(format!("loading PTX module '{}': {e:?}", m.name))
                    })?;
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

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev_err("synchronize"))
    }

    /// `rmsnorm_f32`: see kernels/rmsnorm.cu. x, out `[rows, d]`, w `[d]`.
    pub fn rmsnorm_f32(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        let k = "rmsnorm_f32";
        if x.len() != rows * d || out.len() != rows * d || w.len() != d {
            return Err(Error::Shape(format!(
                "{k}: x has {} elements, out {}, w {}; expected {rows}×{d}, {rows}×{d}, {d}",
                x.len(),
                out.len(),
                w.len()
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let rows_u32 = u32::try_from(rows)
            .map_err(|_| Error::Shape(format!("{k}: {rows} rows exceed the grid")))?;
        let d_i32 = i32::try_from(d)
            .map_err(|_| Error::Shape(format!("{k}: row of {d} elements is too long")))?;
        let f = self.function(k)?;
        let cfg = LaunchConfig {
            grid_dim: (rows_u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(w).arg(out).arg(&d_i32).arg(&eps);
        // SAFETY: argument types and order match `rmsnorm_f32(const float*, const float*, float*,
        // int, float)`; the buffer lengths were checked against rows × d above, and the kernel
        // touches only rows < gridDim.x and columns < d.
        unsafe { b.launch(cfg) }
            .map_err(|e| Error::Device(format!("{k} launch {cfg:?}: {e:?}")))?;
        Ok(())
    }
}
