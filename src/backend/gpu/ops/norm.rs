//! RMSNorm (kernels/rmsnorm.cu).

use super::super::device::{Arg, DevBuf, DevElem, Device, Launch};
use crate::error::{Error, Result};

/// Element types with an RMSNorm kernel.
pub trait NormElem: DevElem {
    const RMSNORM: &'static str;
    const RMSNORM_BACKWARD: &'static str;
}
impl NormElem for f32 {
    const RMSNORM: &'static str = "rmsnorm_f32";
    const RMSNORM_BACKWARD: &'static str = "rmsnorm_backward_f32";
}
impl NormElem for half::bf16 {
    const RMSNORM: &'static str = "rmsnorm_bf16";
    const RMSNORM_BACKWARD: &'static str = "rmsnorm_backward_bf16";
}

/// RMSNorm forward (kernels/rmsnorm.cu): x, out `[rows, d]` of T, w `[d]` f32.
pub fn rmsnorm<T: NormElem>(
    dev: &Device,
    x: &DevBuf<T>,
    w: &DevBuf<f32>,
    out: &mut DevBuf<T>,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    let k = T::RMSNORM;
    if x.len() != rows * d || out.len() != rows * d || w.len() != d {
        return Err(Error::Shape(format!(
            "{k}: x has {} elements, out {}, w {}; expected {rows}×{d}, {rows}×{d}, {d}",
            x.len(),
            out.len(),
            w.len()
        )));
    }
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&r| r <= i32::MAX as u32)
        .ok_or_else(|| Error::Shape(format!("{k}: {rows} rows exceed the grid")))?;
    let d_i32 = i32::try_from(d)
        .map_err(|_| Error::Shape(format!("{k}: a row of {d} elements is too long")))?;
    let args = [
        dev.ptr(x)?,
        dev.ptr(w)?,
        dev.ptr_mut(out)?,
        Arg::I32(d_i32),
        Arg::F32(eps),
    ];
    dev.launch(k, Launch::linear(grid, 256), &args)
}

/// RMSNorm backward, dx only (kernels/rmsnorm.cu; the norm weight is frozen): x, dy, dx
/// `[rows, d]` of T, w `[d]` f32, the same `eps` as the forward; `accumulate` adds to dx.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<T: NormElem>(
    dev: &Device,
    x: &DevBuf<T>,
    w: &DevBuf<f32>,
    dy: &DevBuf<T>,
    dx: &mut DevBuf<T>,
    rows: usize,
    d: usize,
    eps: f32,
    accumulate: bool,
) -> Result<()> {
    let k = T::RMSNORM_BACKWARD;
    let n = rows.checked_mul(d);
    if n.is_none_or(|n| x.len() != n || dy.len() != n || dx.len() != n) || w.len() != d {
        return Err(Error::Shape(format!(
            "{k}: x has {} elements, dy {}, dx {}, w {}; expected {rows}×{d} each and {d}",
            x.len(),
            dy.len(),
            dx.len(),
            w.len()
        )));
    }
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&r| r <= i32::MAX as u32)
        .ok_or_else(|| Error::Shape(format!("{k}: {rows} rows exceed the grid")))?;
    let d_i32 = i32::try_from(d)
        .map_err(|_| Error::Shape(format!("{k}: a row of {d} elements is too long")))?;
    let args = [
        dev.ptr(x)?,
        dev.ptr(w)?,
        dev.ptr(dy)?,
        dev.ptr_mut(dx)?,
        Arg::I32(d_i32),
        Arg::F32(eps),
        Arg::I32(accumulate as i32),
    ];
    dev.launch(k, Launch::linear(grid, 256), &args)
}
