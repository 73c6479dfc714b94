//! SwiGLU forward and backward (kernels/swiglu.cu): `out = silu(gate) ⊙ up` and its gradients.

use super::super::device::{Arg, DevBuf, DevElem, Device};
use super::elementwise::flat_launch;
use crate::error::{Error, Result};

/// Element types with SwiGLU kernels.
pub trait SwigluElem: DevElem {
    const SWIGLU: &'static str;
    const SWIGLU_BACKWARD: &'static str;
}
impl SwigluElem for f32 {
    const SWIGLU: &'static str = "swiglu_f32";
    const SWIGLU_BACKWARD: &'static str = "swiglu_backward_f32";
}
impl SwigluElem for half::bf16 {
    const SWIGLU: &'static str = "swiglu_bf16";
    const SWIGLU_BACKWARD: &'static str = "swiglu_backward_bf16";
}

fn same_len(k: &str, names: &[&str], lens: &[usize]) -> Result<()> {
    if lens.iter().all(|&l| l == lens[0]) {
        return Ok(());
    }
    let got: Vec<String> = names
        .iter()
        .zip(lens)
        .map(|(n, l)| format!("{n} {l}"))
        .collect();
    Err(Error::Shape(format!(
        "{k}: element counts {}; expected the same number in each",
        got.join(", ")
    )))
}

/// SwiGLU forward: `out = silu(gate) · up`, elementwise over `n` elements of T (any shape,
/// flattened; e.g. `[tokens, intermediate]`). Matches `Cpu::swiglu`.
pub fn swiglu<T: SwigluElem>(
    dev: &Device,
    gate: &DevBuf<T>,
    up: &DevBuf<T>,
    out: &mut DevBuf<T>,
) -> Result<()> {
    let k = T::SWIGLU;
    same_len(
        k,
        &["gate", "up", "out"],
        &[gate.len(), up.len(), out.len()],
    )?;
    let n = gate.len();
    if n == 0 {
        return Ok(());
    }
    let args = [
        dev.ptr(gate)?,
        dev.ptr(up)?,
        dev.ptr_mut(out)?,
        Arg::U64(n as u64),
    ];
    dev.launch(k, flat_launch::<T>(n), &args)
}

/// SwiGLU backward: with `s = sigmoid(gate)`, `dgate = dy·up·s·(1 + gate·(1 − s))` and
/// `dup = dy·gate·s`, elementwise over `n` elements of T. Matches `Cpu::swiglu_backward`.
pub fn swiglu_backward<T: SwigluElem>(
    dev: &Device,
    gate: &DevBuf<T>,
    up: &DevBuf<T>,
    dy: &DevBuf<T>,
    dgate: &mut DevBuf<T>,
    dup: &mut DevBuf<T>,
) -> Result<()> {
    let k = T::SWIGLU_BACKWARD;
    same_len(
        k,
        &["gate", "up", "dy", "dgate", "dup"],
        &[gate.len(), up.len(), dy.len(), dgate.len(), dup.len()],
    )?;
    let n = gate.len();
    if n == 0 {
        return Ok(());
    }
    let args = [
        dev.ptr(gate)?,
        dev.ptr(up)?,
        dev.ptr(dy)?,
        dev.ptr_mut(dgate)?,
        dev.ptr_mut(dup)?,
        Arg::U64(n as u64),
    ];
    dev.launch(k, flat_launch::<T>(n), &args)
}
