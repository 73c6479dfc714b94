//! AdamW and the gradient-norm reduction (kernels/adamw.cu).

use super::super::device::{Arg, DevBuf, Device, Launch};
use crate::backend::AdamW;
use crate::error::{Error, Result};

/// One AdamW step (`step` counts from 1) on f32 parameters with f32 moments.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    dev: &Device,
    param: &mut DevBuf<f32>,
    grad: &DevBuf<f32>,
    m: &mut DevBuf<f32>,
    v: &mut DevBuf<f32>,
    hp: AdamW,
    step: u32,
    grad_scale: f32,
) -> Result<()> {
    let k = "adamw_f32";
    let n = param.len();
    if grad.len() != n || m.len() != n || v.len() != n {
        return Err(Error::Shape(format!(
            "{k}: param has {n} elements, grad {}, m {}, v {}",
            grad.len(),
            m.len(),
            v.len()
        )));
    }
    if step == 0 {
        return Err(Error::Invalid(format!("{k}: steps count from 1")));
    }
    if n == 0 {
        return Ok(());
    }
    let n_i32 = i32::try_from(n)
        .map_err(|_| Error::Shape(format!("{k}: {n} parameters exceed one launch")))?;
    // Bias corrections in f64 on the host, as the CPU reference computes them.
    let bc1 = (1.0 - (hp.beta1 as f64).powi(step as i32)) as f32;
    let bc2 = (1.0 - (hp.beta2 as f64).powi(step as i32)) as f32;
    let grid = n.div_ceil(256).min(4096) as u32;
    let args = [
        dev.ptr_mut(param)?,
        dev.ptr(grad)?,
        dev.ptr_mut(m)?,
        dev.ptr_mut(v)?,
        Arg::I32(n_i32),
        Arg::F32(hp.lr),
        Arg::F32(hp.beta1),
        Arg::F32(hp.beta2),
        Arg::F32(hp.eps),
        Arg::F32(hp.weight_decay),
        Arg::F32(bc1),
        Arg::F32(bc2),
        Arg::F32(grad_scale),
    ];
    dev.launch(k, Launch::linear(grid, 256), &args)
}

/// Blocks of the first reduction pass; `sum_squares` needs a workspace of at least this many f32.
pub const SUM_SQUARES_BLOCKS: usize = 1024;

/// `out[0] = Σ x²`, deterministic (two passes in a fixed order). `workspace` holds the
/// per-block partial sums: at least `min(SUM_SQUARES_BLOCKS, ceil(n/256))` elements.
pub fn sum_squares(
    dev: &Device,
    x: &DevBuf<f32>,
    workspace: &mut DevBuf<f32>,
    out: &mut DevBuf<f32>,
) -> Result<()> {
    if out.len() != 1 {
        return Err(Error::Shape(format!(
            "sum_squares_final_f32: out has {} elements (expected 1)",
            out.len()
        )));
    }
    sum_squares_at(dev, x, workspace, out, 0)
}

/// As `sum_squares`, into `out[at]`: several sums land in one buffer that is read back once.
pub fn sum_squares_at(
    dev: &Device,
    x: &DevBuf<f32>,
    workspace: &mut DevBuf<f32>,
    out: &mut DevBuf<f32>,
    at: usize,
) -> Result<()> {
    let n = x.len();
    let blocks = n.div_ceil(256).clamp(1, SUM_SQUARES_BLOCKS);
    if at >= out.len() || workspace.len() < blocks {
        return Err(Error::Shape(format!(
            "sum_squares_partial_f32: out has {} elements (writing element {at}), workspace {} (needs {blocks})",
            out.len(),
            workspace.len()
        )));
    }
    let n_i32 = i32::try_from(n).map_err(|_| {
        Error::Shape(format!(
            "sum_squares_partial_f32: {n} elements exceed one launch"
        ))
    })?;
    let args = [dev.ptr(x)?, Arg::I32(n_i32), dev.ptr_mut(workspace)?];
    dev.launch(
        "sum_squares_partial_f32",
        Launch::linear(blocks as u32, 256),
        &args,
    )?;
    let args = [
        dev.ptr(workspace)?,
        Arg::I32(blocks as i32),
        dev.ptr_mut_at(out, at)?,
    ];
    dev.launch("sum_squares_final_f32", Launch::linear(1, 1024), &args)
}
