//! The paged KV cache on the device (kernels/paged_kv.cu): slot writes and decode attention
//! through block tables. The host-side allocator is `infer::paged::PagedKv`.

use half::bf16;

use super::super::device::{Arg, DevBuf, Device, Launch};
use crate::error::{Error, Result};

/// Geometry of a paged cache: `num_blocks` blocks of `block_size` slots, each slot
/// `kv_heads × head_dim` bf16 in each of the K and V caches.
#[derive(Clone, Copy, Debug)]
pub struct PagedShape {
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl PagedShape {
    pub fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    pub fn slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

/// Write `k`, `v` `[slots.len(), kv_heads, head_dim]` into their slots of the caches.
#[allow(clippy::too_many_arguments)]
pub fn kv_write(
    dev: &Device,
    k: &DevBuf<bf16>,
    v: &DevBuf<bf16>,
    slots: &DevBuf<u32>,
    host_slots: &[u32],
    shape: PagedShape,
    k_cache: &mut DevBuf<bf16>,
    v_cache: &mut DevBuf<bf16>,
) -> Result<()> {
    let name = "kv_write_bf16";
    let (t, row) = (slots.len(), shape.row());
    if k.len() != t * row
        || v.len() != t * row
        || k_cache.len() != shape.slots() * row
        || v_cache.len() != k_cache.len()
        || host_slots.len() != t
    {
        return Err(Error::Shape(format!(
            "{name}: k {}, v {} for {t} tokens of {row}; caches {} / {} for {shape:?}",
            k.len(),
            v.len(),
            k_cache.len(),
            v_cache.len()
        )));
    }
    // The slots come from the host allocator; check them there rather than in the kernel.
    if let Some(bad) = host_slots.iter().find(|&&s| s as usize >= shape.slots()) {
        return Err(Error::Invalid(format!(
            "{name}: slot {bad} is outside the cache of {} slots",
            shape.slots()
        )));
    }
    if t == 0 {
        return Ok(());
    }
    let args = [
        dev.ptr(k)?,
        dev.ptr(v)?,
        dev.ptr(slots)?,
        dev.ptr_mut(k_cache)?,
        dev.ptr_mut(v_cache)?,
        Arg::I32(row as i32),
    ];
    dev.launch(name, Launch::linear(t as u32, 128), &args)
}

/// Decode attention for `batch` sequences of one query token each: q/out `[batch, heads,
/// head_dim]`; `block_tables` `[batch, max_blocks]` i32; `context_lens` `[batch]` i32.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode(
    dev: &Device,
    q: &DevBuf<bf16>,
    k_cache: &DevBuf<bf16>,
    v_cache: &DevBuf<bf16>,
    block_tables: &DevBuf<i32>,
    context_lens: &DevBuf<i32>,
    shape: PagedShape,
    heads: usize,
    max_blocks: usize,
    out: &mut DevBuf<bf16>,
) -> Result<()> {
    let name = "paged_decode_bf16";
    let batch = context_lens.len();
    let hd = shape.head_dim;
    if hd == 0
        || !hd.is_multiple_of(32)
        || hd > 128
        || shape.kv_heads == 0
        || !heads.is_multiple_of(shape.kv_heads)
    {
        return Err(Error::Shape(format!("{name}: head_dim {hd} must be 32..128 in steps of 32 and heads {heads} a multiple of {}", shape.kv_heads)));
    }
    if q.len() != batch * heads * hd
        || out.len() != q.len()
        || block_tables.len() != batch * max_blocks
        || k_cache.len() != shape.slots() * shape.row()
        || v_cache.len() != k_cache.len()
    {
        return Err(Error::Shape(format!(
            "{name}: q {}, out {}, block tables {} ({batch}×{max_blocks}), caches {} / {} for {shape:?}",
            q.len(),
            out.len(),
            block_tables.len(),
            k_cache.len(),
            v_cache.len()
        )));
    }
    if batch == 0 {
        return Ok(());
    }
    let launch = Launch {
        grid: (heads.div_ceil(4) as u32, batch as u32, 1),
        block: (128, 1, 1),
        shared_bytes: 0,
    };
    let args = [
        dev.ptr(q)?,
        dev.ptr(k_cache)?,
        dev.ptr(v_cache)?,
        dev.ptr(block_tables)?,
        dev.ptr(context_lens)?,
        dev.ptr_mut(out)?,
        Arg::I32(heads as i32),
        Arg::I32(shape.kv_heads as i32),
        Arg::I32(hd as i32),
        Arg::I32(shape.block_size as i32),
        Arg::I32(max_blocks as i32),
        Arg::F32(1.0 / (hd as f32).sqrt()),
    ];
    dev.launch(name, launch, &args)
}
