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
    let rows = Rows {
        name: "kv_write_bf16",
        slots,
        host_slots,
        shape,
        tokens_are_source: true,
    };
    rows.copy(dev, (k, v), (k_cache, v_cache))
}

/// Read rows `host_slots` of the caches into `k`, `v` `[slots.len(), kv_heads, head_dim]` (a
/// sequence's K/V made contiguous for the flash attention of a long prefill).
#[allow(clippy::too_many_arguments)]
pub fn kv_gather(
    dev: &Device,
    k_cache: &DevBuf<bf16>,
    v_cache: &DevBuf<bf16>,
    slots: &DevBuf<u32>,
    host_slots: &[u32],
    shape: PagedShape,
    k: &mut DevBuf<bf16>,
    v: &mut DevBuf<bf16>,
) -> Result<()> {
    let rows = Rows {
        name: "kv_gather_bf16",
        slots,
        host_slots,
        shape,
        tokens_are_source: false,
    };
    rows.copy(dev, (k_cache, v_cache), (k, v))
}

/// A row copy between token-ordered K/V and cache slots (`kv_write_bf16`, `kv_gather_bf16`:
/// the same arguments, source first).
struct Rows<'a> {
    name: &'static str,
    slots: &'a DevBuf<u32>,
    host_slots: &'a [u32],
    shape: PagedShape,
    tokens_are_source: bool,
}

impl Rows<'_> {
    fn copy(
        &self,
        dev: &Device,
        src: (&DevBuf<bf16>, &DevBuf<bf16>),
        dst: (&mut DevBuf<bf16>, &mut DevBuf<bf16>),
    ) -> Result<()> {
        let (name, shape) = (self.name, self.shape);
        let (t, row) = (self.slots.len(), shape.row());
        let (tokens, caches) = if self.tokens_are_source {
            ((src.0.len(), src.1.len()), (dst.0.len(), dst.1.len()))
        } else {
            ((dst.0.len(), dst.1.len()), (src.0.len(), src.1.len()))
        };
        if tokens.0 != t * row
            || tokens.1 != t * row
            || caches.0 != shape.slots() * row
            || caches.1 != caches.0
            || self.host_slots.len() != t
        {
            return Err(Error::Shape(format!(
                "{name}: k {}, v {} for {t} tokens of {row}; caches {} / {} for {shape:?}",
                tokens.0, tokens.1, caches.0, caches.1
            )));
        }
        // The slots come from the host allocator; check them there rather than in the kernel.
        if let Some(bad) = self
            .host_slots
            .iter()
            .find(|&&s| s as usize >= shape.slots())
        {
            return Err(Error::Invalid(format!(
                "{name}: slot {bad} is outside the cache of {} slots",
                shape.slots()
            )));
        }
        if t == 0 {
            return Ok(());
        }
        let args = [
            dev.ptr(src.0)?,
            dev.ptr(src.1)?,
            dev.ptr(self.slots)?,
            dev.ptr_mut(dst.0)?,
            dev.ptr_mut(dst.1)?,
            Arg::I32(row as i32),
        ];
        dev.launch(name, Launch::linear(t as u32, 128), &args)
    }
}

/// Keys per partition of `paged_decode` (the kernel's `RF_PD_PART`): a sequence of `len` tokens
/// is processed as `max(1, ceil(len / 512))` partitions in parallel. One partition (len ≤ 512):
/// the first kernel writes the output itself; more: each partition writes a partial (m, l,
/// acc\[hd\]) to f32 scratch and `paged_decode_reduce_bf16` merges them.
pub const PAGED_DECODE_PARTITION: usize = 512;

/// Query rows (query token × query head of one KV head) one block of `paged_decode_bf16` serves
/// (the kernel's `RF_PD_ROWS`).
const ROWS_PER_BLOCK: usize = 8;

/// The batch of one `paged_decode` launch: which blocks hold each sequence's K/V and how long
/// each sequence is.
#[derive(Clone, Copy)]
pub struct DecodeBatch<'a> {
    /// `[batch, max_blocks]` i32: sequence b's block numbers (`PagedKv::block_table`), padded.
    pub block_tables: &'a DevBuf<i32>,
    pub max_blocks: usize,
    /// `[batch]` i32: tokens in the cache per sequence, the `queries` new ones included.
    pub context_lens: &'a DevBuf<i32>,
    /// The same lengths on the host: they size the launch (partitions) and are checked here
    /// (0 ≤ len ≤ max_blocks · block_size). They must equal `context_lens`.
    pub host_context_lens: &'a [i32],
    /// Query tokens per sequence: 1 for plain decode, a few for speculative / chunked decode.
    /// Query i of a sequence of `len` tokens sees keys 0 ..= len − queries + i.
    pub queries: usize,
}

fn partitions(len: usize) -> usize {
    len.div_ceil(PAGED_DECODE_PARTITION).max(1)
}

/// f32 elements of scratch `paged_decode` needs for `batch` sequences of `queries` query tokens
/// × `heads` heads of `head_dim`, the longest context being `max_context` tokens: `batch ·
/// queries · heads · P · (head_dim + 2)` with P = ceil(max_context / 512), and 0 when every
/// context fits one partition. Size it once for the longest context a run allows (the memory
/// plan) and pass it to every call.
pub fn paged_decode_scratch_len(
    batch: usize,
    queries: usize,
    heads: usize,
    head_dim: usize,
    max_context: usize,
) -> usize {
    let p = partitions(max_context);
    if p == 1 {
        0
    } else {
        batch * queries * heads * p * (head_dim + 2)
    }
}

/// Decode attention over the paged cache (kernels/paged_kv.cu, `paged_decode_bf16` then, when
/// some context needs more than one partition, `paged_decode_reduce_bf16`): q and out `[batch,
/// queries, heads, head_dim]` bf16; the batch's block tables and lengths in `batch`. `scratch`
/// is caller-owned (the hot loop allocates nothing): at least [`paged_decode_scratch_len`] f32
/// for this batch's longest context; it may be `None` when that is 0. Its contents on entry do
/// not matter. Block-table entries are not checked here: they come from the host allocator.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode(
    dev: &Device,
    q: &DevBuf<bf16>,
    k_cache: &DevBuf<bf16>,
    v_cache: &DevBuf<bf16>,
    shape: PagedShape,
    heads: usize,
    batch: &DecodeBatch<'_>,
    scratch: Option<&mut DevBuf<f32>>,
    out: &mut DevBuf<bf16>,
) -> Result<()> {
    let name = "paged_decode_bf16";
    let (nseq, nq, max_blocks) = (batch.context_lens.len(), batch.queries, batch.max_blocks);
    let (hd, kvh, bs) = (shape.head_dim, shape.kv_heads, shape.block_size);
    if hd == 0
        || !hd.is_multiple_of(32)
        || hd > 128
        || kvh == 0
        || heads == 0
        || !heads.is_multiple_of(kvh)
    {
        return Err(Error::Shape(format!("{name}: head_dim {hd} must be 32..128 in steps of 32 and heads {heads} a non-zero multiple of kv_heads {kvh}")));
    }
    if bs == 0 || nq == 0 {
        return Err(Error::Shape(format!(
            "{name}: block size {bs} and queries per sequence {nq} must be at least 1"
        )));
    }
    if q.len() != nseq * nq * heads * hd
        || out.len() != q.len()
        || batch.block_tables.len() != nseq * max_blocks
        || batch.host_context_lens.len() != nseq
        || k_cache.len() != shape.slots() * shape.row()
        || v_cache.len() != k_cache.len()
    {
        return Err(Error::Shape(format!(
            "{name}: q {}, out {} for {nseq} sequences × {nq} queries × {heads} heads × {hd}; block tables {} ({nseq}×{max_blocks}), host lengths {}, caches {} / {} for {shape:?}",
            q.len(),
            out.len(),
            batch.block_tables.len(),
            batch.host_context_lens.len(),
            k_cache.len(),
            v_cache.len()
        )));
    }
    let capacity = max_blocks * bs;
    if let Some((b, &len)) = batch
        .host_context_lens
        .iter()
        .enumerate()
        .find(|(_, &l)| l < 0 || l as usize > capacity)
    {
        return Err(Error::Invalid(format!(
            "{name}: sequence {b} has context length {len}, outside 0..={capacity} ({max_blocks} blocks of {bs})"
        )));
    }
    // Launch limits: grid y = kv_heads · row chunks, grid z = sequences (and the reduce's grid
    // (heads, queries, sequences)) are at most 65535; kernel indices are i32.
    let chunks = (heads / kvh * nq).div_ceil(ROWS_PER_BLOCK);
    let fits_i32 = |x: usize| x <= i32::MAX as usize;
    if kvh * chunks > 65535
        || nseq > 65535
        || heads > 65535
        || nq > 65535
        || !fits_i32(capacity)
        || !fits_i32(shape.num_blocks)
        || !fits_i32(nseq * nq * heads)
    {
        return Err(Error::Invalid(format!(
            "{name}: {nseq} sequences × {nq} queries × {heads} heads ({kvh} KV heads), {max_blocks} blocks of {bs} per table exceed the launch limits"
        )));
    }
    if nseq == 0 {
        return Ok(());
    }
    let max_len = batch
        .host_context_lens
        .iter()
        .map(|&l| l as usize)
        .max()
        .unwrap_or(0);
    let parts = partitions(max_len);
    let need = paged_decode_scratch_len(nseq, nq, heads, hd, max_len);
    let scratch_arg = match scratch {
        _ if need == 0 => Arg::Ptr(0), // every sequence is finished by the first kernel
        Some(s) if s.len() >= need => dev.ptr_mut(s)?,
        s => {
            return Err(Error::Shape(format!(
                "{name}: scratch of {} f32 for {nseq} sequences × {nq} queries × {heads} heads × {parts} partitions of {PAGED_DECODE_PARTITION} keys needs {need}",
                s.map_or(0, |s| s.len())
            )))
        }
    };
    let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
    let launch = Launch {
        grid: (parts as u32, (kvh * chunks) as u32, nseq as u32),
        block: (128, 1, 1),
        shared_bytes: 0,
    };
    let dims = [
        Arg::I32(nseq as i32),
        Arg::I32(nq as i32),
        Arg::I32(heads as i32),
    ];
    let mut args = vec![
        dev.ptr(q)?,
        dev.ptr(k_cache)?,
        dev.ptr(v_cache)?,
        dev.ptr(batch.block_tables)?,
        dev.ptr(batch.context_lens)?,
        dev.ptr_mut(out)?,
        scratch_arg,
    ];
    args.extend(dims);
    args.extend([
        Arg::I32(kvh as i32),
        Arg::I32(hd as i32),
        Arg::I32(bs as i32),
        Arg::I32(max_blocks as i32),
        Arg::I32(parts as i32),
        Arg::F32(scale_log2),
    ]);
    dev.launch(name, launch, &args)?;
    if parts == 1 {
        return Ok(());
    }
    // Sequences longer than one partition: merge their partials (the others are skipped).
    let launch = Launch {
        grid: (heads as u32, nq as u32, nseq as u32),
        block: (hd as u32, 1, 1),
        shared_bytes: 0,
    };
    let mut args = vec![scratch_arg, dev.ptr(batch.context_lens)?, dev.ptr_mut(out)?];
    args.extend(dims);
    args.extend([Arg::I32(hd as i32), Arg::I32(parts as i32)]);
    dev.launch("paged_decode_reduce_bf16", launch, &args)
}
