//! Dense bf16 GEMM for kept-precision layers (kernels/gemm_bf16.cu).

use half::bf16;

use super::super::device::{Arg, DevBuf, DevElem, Device, Launch};
use crate::error::{Error, Result};

/// Output types of the dense GEMM.
pub trait DenseOut: DevElem {
    const GEMM: &'static str;
}
impl DenseOut for f32 {
    const GEMM: &'static str = "gemm_bf16_f32";
}
impl DenseOut for bf16 {
    const GEMM: &'static str = "gemm_bf16_bf16";
}

/// `c[m, n] = a[m, k] · b[n, k]ᵀ`; K must be a multiple of 8.
pub fn gemm<O: DenseOut>(
    dev: &Device,
    a: &DevBuf<bf16>,
    b: &DevBuf<bf16>,
    c: &mut DevBuf<O>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let name = O::GEMM;
    if !k.is_multiple_of(8) {
        return Err(Error::Shape(format!(
            "{name}: K = {k} must be a multiple of 8 (16-byte rows)"
        )));
    }
    if a.len() != m * k || b.len() != n * k || c.len() != m * n {
        return Err(Error::Shape(format!(
            "{name}: a {} ({m}×{k}), b {} ({n}×{k}), c {} ({m}×{n})",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let cv = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{name}: {what} = {v} is too large")))
    };
    let launch = Launch {
        grid: (n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1),
        block: (128, 1, 1),
        shared_bytes: 3 * 2 * 64 * 80,
    };
    let args = [
        dev.ptr(a)?,
        dev.ptr(b)?,
        dev.ptr_mut(c)?,
        Arg::I32(cv(m, "M")?),
        Arg::I32(cv(n, "N")?),
        Arg::I32(cv(k, "K")?),
    ];
    dev.launch(name, launch, &args)
}
