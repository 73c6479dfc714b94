//! Softmax cross-entropy (kernels/cross_entropy.cu).

use super::super::device::{Arg, DevBuf, DevElem, Device, Launch};
use crate::error::{Error, Result};

/// Element types with a cross-entropy kernel.
pub trait LogitElem: DevElem {
    const CROSS_ENTROPY: &'static str;
}
impl LogitElem for f32 {
    const CROSS_ENTROPY: &'static str = "cross_entropy_f32";
}
impl LogitElem for half::bf16 {
    const CROSS_ENTROPY: &'static str = "cross_entropy_bf16";
}

/// Fused forward + backward over `rows` rows of `vocab` logits, in place: logits become their
/// gradient scaled by `grad_scale`; `loss[r]` the row's loss (0 ignored, NaN for a label ≥ vocab).
pub fn cross_entropy<E: LogitElem>(
    dev: &Device,
    logits: &mut DevBuf<E>,
    labels: &DevBuf<u32>,
    grad_scale: f32,
    loss: &mut DevBuf<f32>,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    let k = E::CROSS_ENTROPY;
    if logits.len() != rows * vocab || labels.len() != rows || loss.len() != rows {
        return Err(Error::Shape(format!(
            "{k}: logits has {} elements, labels {}, loss {}; expected {rows}×{vocab}, {rows}, {rows}",
            logits.len(),
            labels.len(),
            loss.len()
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&r| r <= i32::MAX as u32)
        .ok_or_else(|| Error::Shape(format!("{k}: {rows} rows exceed the grid")))?;
    let v = i32::try_from(vocab)
        .map_err(|_| Error::Shape(format!("{k}: vocabulary of {vocab} is too large")))?;
    let args = [
        dev.ptr_mut(logits)?,
        dev.ptr(labels)?,
        Arg::F32(grad_scale),
        dev.ptr_mut(loss)?,
        Arg::I32(v),
    ];
    dev.launch(k, Launch::linear(grid, 256), &args)
}
