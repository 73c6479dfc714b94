//! W8A16 GEMM for the backward pass to the input (kernels/gemm_w8a16.cu).

use half::bf16;

use super::super::device::{Arg, DevBuf, Device, Launch};
use crate::error::{Error, Result};

/// `dx[M, K] (+)= dy[M, N] · dequant(wq, sw)[N, K]`; `accumulate` adds to dx instead of
/// overwriting it. N must be a multiple of 8 and K of 16.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_input(
    dev: &Device,
    dy: &DevBuf<bf16>,
    wq: &DevBuf<i8>,
    sw: &DevBuf<f32>,
    dx: &mut DevBuf<bf16>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> Result<()> {
    let name = "gemm_w8a16_dx_bf16";
    if !n.is_multiple_of(8) || !k.is_multiple_of(16) {
        return Err(Error::Shape(format!(
            "{name}: N = {n} must be a multiple of 8 and K = {k} of 16"
        )));
    }
    if dy.len() != m * n || wq.len() != n * k || sw.len() != n || dx.len() != m * k {
        return Err(Error::Shape(format!(
            "{name}: dy {} ({m}×{n}), wq {} ({n}×{k}), sw {} ({n}), dx {} ({m}×{k})",
            dy.len(),
            wq.len(),
            sw.len(),
            dx.len()
        )));
    }
    if m == 0 || k == 0 {
        return Ok(());
    }
    let c = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{name}: {what} = {v} is too large")))
    };
    let launch = Launch {
        grid: (k.div_ceil(64) as u32, m.div_ceil(64) as u32, 1),
        block: (128, 1, 1),
        shared_bytes: 64 * 64 + 32 * 128,
    };
    let args = [
        dev.ptr(dy)?,
        dev.ptr(wq)?,
        dev.ptr(sw)?,
        dev.ptr_mut(dx)?,
        Arg::I32(c(m, "M")?),
        Arg::I32(c(n, "N")?),
        Arg::I32(c(k, "K")?),
        Arg::I32(accumulate as i32),
    ];
    dev.launch(name, launch, &args)
}

/// Decode GEMV (kernels/gemv_w8a16.cu): `y[m, n] = bf16(x[m, k] · dequant(wq, sw)ᵀ (+ residual))`
/// for a few rows; K must be a multiple of 16.
#[allow(clippy::too_many_arguments)]
pub fn gemv(
    dev: &Device,
    x: &DevBuf<bf16>,
    wq: &DevBuf<i8>,
    sw: &DevBuf<f32>,
    residual: Option<&DevBuf<bf16>>,
    y: &mut DevBuf<bf16>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let name = "gemv_w8a16_bf16";
    if !k.is_multiple_of(16) {
        return Err(Error::Shape(format!(
            "{name}: K = {k} must be a multiple of 16"
        )));
    }
    if x.len() != m * k
        || wq.len() != n * k
        || sw.len() != n
        || y.len() != m * n
        || residual.is_some_and(|r| r.len() != m * n)
    {
        return Err(Error::Shape(format!(
            "{name}: x {} ({m}×{k}), wq {} ({n}×{k}), sw {} ({n}), y {} ({m}×{n}), residual {:?}",
            x.len(),
            wq.len(),
            sw.len(),
            y.len(),
            residual.map(|r| r.len())
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let c = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{name}: {what} = {v} is too large")))
    };
    let res = match residual {
        Some(r) => dev.ptr(r)?,
        None => Arg::Ptr(0),
    };
    let launch = Launch {
        grid: (n.div_ceil(8) as u32, m.div_ceil(8) as u32, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    let args = [
        dev.ptr(x)?,
        dev.ptr(wq)?,
        dev.ptr(sw)?,
        res,
        dev.ptr_mut(y)?,
        Arg::I32(c(m, "M")?),
        Arg::I32(c(n, "N")?),
        Arg::I32(c(k, "K")?),
    ];
    dev.launch(name, launch, &args)
}

/// `dx[M, K] (+)= dy[M, N] · w[N, K]` for a dense bf16 weight (the output head's backward, and
/// any linear kept dense); any N, K a multiple of 16 (kernels/gemm_w8a16.cu,
/// `gemm_bf16_dx_bf16`).
#[allow(clippy::too_many_arguments)]
pub fn dense_backward_input(
    dev: &Device,
    dy: &DevBuf<bf16>,
    w: &DevBuf<bf16>,
    dx: &mut DevBuf<bf16>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> Result<()> {
    let name = "gemm_bf16_dx_bf16";
    if !k.is_multiple_of(16) {
        return Err(Error::Shape(format!(
            "{name}: K = {k} must be a multiple of 16"
        )));
    }
    if dy.len() != m * n || w.len() != n * k || dx.len() != m * k {
        return Err(Error::Shape(format!(
            "{name}: dy {} ({m}×{n}), w {} ({n}×{k}), dx {} ({m}×{k})",
            dy.len(),
            w.len(),
            dx.len()
        )));
    }
    if m == 0 || k == 0 {
        return Ok(());
    }
    let c = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{name}: {what} = {v} is too large")))
    };
    let launch = Launch {
        grid: (k.div_ceil(64) as u32, m.div_ceil(64) as u32, 1),
        block: (128, 1, 1),
        shared_bytes: 64 * 64 + 32 * 128,
    };
    let args = [
        dev.ptr(dy)?,
        dev.ptr(w)?,
        dev.ptr_mut(dx)?,
        Arg::I32(c(m, "M")?),
        Arg::I32(c(n, "N")?),
        Arg::I32(c(k, "K")?),
        Arg::I32(accumulate as i32),
    ];
    dev.launch(name, launch, &args)
}
