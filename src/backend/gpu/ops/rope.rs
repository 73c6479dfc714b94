//! Rotary position embedding, forward and backward (kernels/rope.cu), in place.

use super::super::device::{Arg, DevBuf, DevElem, Device, Launch};
use super::elementwise::row_block;
use crate::error::{Error, Result};

/// Element types with a RoPE kernel.
pub trait RopeElem: DevElem {
    const ROPE: &'static str;
}
impl RopeElem for f32 {
    const ROPE: &'static str = "rope_f32";
}
impl RopeElem for half::bf16 {
    const ROPE: &'static str = "rope_bf16";
}

/// The most dynamic shared memory a launch may ask for without opting in (48 KiB).
const SMEM_LIMIT: usize = 48 * 1024;

/// RoPE in place on `x [tokens, heads, head_dim]` of T, Hugging Face's rotate-half convention,
/// one position per token (`positions [tokens]` u32, so packed / paged batches work), base
/// `theta`. `inverse` rotates by the negative angle: the backward of the forward (its
/// transpose). Matches `Cpu::rope` up to the f32 angle (see tests/kernels_elementwise.rs).
#[allow(clippy::too_many_arguments)]
pub fn rope<T: RopeElem>(
    dev: &Device,
    x: &mut DevBuf<T>,
    positions: &DevBuf<u32>,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    theta: f32,
    inverse: bool,
) -> Result<()> {
    let k = T::ROPE;
    if !head_dim.is_multiple_of(2) {
        return Err(Error::Shape(format!(
            "{k}: head_dim {head_dim} must be even"
        )));
    }
    let row = heads.checked_mul(head_dim);
    let n = row.and_then(|r| r.checked_mul(tokens));
    if n != Some(x.len()) || positions.len() != tokens {
        return Err(Error::Shape(format!(
            "{k}: x has {} elements, positions {}; expected {tokens}×{heads}×{head_dim} and {tokens}",
            x.len(),
            positions.len()
        )));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::Invalid(format!(
            "{k}: theta must be a positive finite number, got {theta}"
        )));
    }
    if tokens == 0 || heads == 0 || head_dim == 0 {
        return Ok(());
    }
    let too_big = |what: &str| Error::Shape(format!("{k}: {what} exceeds the kernel's int range"));
    let tokens_i = i32::try_from(tokens).map_err(|_| too_big("tokens"))?;
    let heads_i = i32::try_from(heads).map_err(|_| too_big("heads"))?;
    let hd_i = i32::try_from(head_dim).map_err(|_| too_big("head_dim"))?;
    i32::try_from(heads * head_dim).map_err(|_| too_big("heads × head_dim"))?;
    let half = head_dim / 2;
    let per_vec = 16 / std::mem::size_of::<T>();
    let items = if half.is_multiple_of(per_vec) {
        heads * half / per_vec
    } else {
        heads * half
    };
    let (bx, by) = row_block(items, tokens);
    // The cos/sin table: head_dim f32 per token of the block.
    let table_bytes = head_dim * 4;
    let by = by.min((SMEM_LIMIT / table_bytes) as u32);
    if by == 0 {
        return Err(Error::Shape(format!(
            "{k}: head_dim {head_dim} needs a {table_bytes}-byte table, over the {SMEM_LIMIT}-byte shared memory limit"
        )));
    }
    let grid = tokens.div_ceil(by as usize) as u32;
    let cfg = Launch {
        grid: (grid, 1, 1),
        block: (bx, by, 1),
        shared_bytes: by * table_bytes as u32,
    };
    let args = [
        dev.ptr_mut(x)?,
        dev.ptr(positions)?,
        Arg::I32(tokens_i),
        Arg::I32(heads_i),
        Arg::I32(hd_i),
        Arg::F32(theta),
        Arg::I32(inverse as i32),
    ];
    dev.launch(k, cfg, &args)
}
