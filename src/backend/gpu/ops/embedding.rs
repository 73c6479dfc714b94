//! Embedding gather (kernels/embedding.cu): `out[t] = table[ids[t]]`.

use super::super::device::{Arg, DevBuf, DevElem, Device, Launch};
use super::elementwise::row_block;
use crate::error::{Error, Result};

/// Element types with an embedding kernel.
pub trait EmbeddingElem: DevElem {
    const EMBEDDING: &'static str;
}
impl EmbeddingElem for f32 {
    const EMBEDDING: &'static str = "embedding_f32";
}
impl EmbeddingElem for half::bf16 {
    const EMBEDDING: &'static str = "embedding_bf16";
}

/// Embedding gather: `table [vocab, d]` of T, `ids [tokens]` u32, `out [tokens, d]` of T.
///
/// `bad` is a one-element workspace owned by the caller (so the hot loop allocates nothing): it
/// is set to `i32::MAX`, the kernel records the first token whose id is `>= vocab` in it (that
/// row of `out` is zeroed and the table is never read out of bounds), and it is read back —
/// which waits for the kernel. A bad id is an `Error::Invalid` naming the id and its position,
/// as `Cpu::embedding` reports it.
pub fn embedding<T: EmbeddingElem>(
    dev: &Device,
    table: &DevBuf<T>,
    ids: &DevBuf<u32>,
    out: &mut DevBuf<T>,
    bad: &mut DevBuf<i32>,
    vocab: usize,
    d: usize,
) -> Result<()> {
    let k = T::EMBEDDING;
    let tokens = ids.len();
    if vocab.checked_mul(d) != Some(table.len()) || tokens.checked_mul(d) != Some(out.len()) {
        return Err(Error::Shape(format!(
            "{k}: table has {} elements, out {}; expected {vocab}×{d} and {tokens}×{d} ({tokens} ids)",
            table.len(),
            out.len()
        )));
    }
    if bad.len() != 1 {
        return Err(Error::Shape(format!(
            "{k}: the bad-id workspace has {} elements, expected 1",
            bad.len()
        )));
    }
    if tokens == 0 || d == 0 {
        return Ok(());
    }
    let too_big = |what: &str| Error::Shape(format!("{k}: {what} exceeds the kernel's int range"));
    let vocab_u = u32::try_from(vocab).map_err(|_| too_big("vocab"))?;
    let d_i = i32::try_from(d).map_err(|_| too_big("d"))?;
    let tokens_i = i32::try_from(tokens).map_err(|_| too_big("tokens"))?;
    let per_vec = 16 / std::mem::size_of::<T>();
    let items = if d.is_multiple_of(per_vec) {
        d / per_vec
    } else {
        d
    };
    let (bx, by) = row_block(items, tokens);
    let cfg = Launch {
        grid: (tokens.div_ceil(by as usize) as u32, 1, 1),
        block: (bx, by, 1),
        shared_bytes: 0,
    };
    dev.write(bad, &[i32::MAX])?;
    let args = [
        dev.ptr(table)?,
        dev.ptr(ids)?,
        dev.ptr_mut(out)?,
        dev.ptr_mut(bad)?,
        Arg::U32(vocab_u),
        Arg::I32(d_i),
        Arg::I32(tokens_i),
    ];
    dev.launch(k, cfg, &args)?;
    let first_bad = dev.download(bad)?[0];
    if first_bad == i32::MAX {
        return Ok(());
    }
    let pos = first_bad as usize;
    let id = dev.download(ids)?.get(pos).copied().ok_or_else(|| {
        Error::Device(format!(
            "{k}: reported a bad id at position {pos} of {tokens}"
        ))
    })?;
    Err(Error::Invalid(format!(
        "{k}: token id {id} at position {pos} is outside the vocabulary of {vocab}"
    )))
}

/// Embedding backward (kernels/embedding.cu): `dtable[ids[t]] += dy[t]`; dy `[tokens, d]` bf16,
/// dtable `[vocab, d]` f32.
pub fn embedding_backward(
    dev: &Device,
    dy: &DevBuf<half::bf16>,
    ids: &DevBuf<u32>,
    dtable: &mut DevBuf<f32>,
    vocab: usize,
    d: usize,
) -> Result<()> {
    let name = "embedding_backward_bf16";
    let tokens = ids.len();
    if dy.len() != tokens * d || dtable.len() != vocab * d {
        return Err(Error::Shape(format!(
            "{name}: dy {} ({tokens}×{d}), dtable {} ({vocab}×{d})",
            dy.len(),
            dtable.len()
        )));
    }
    if tokens == 0 || d == 0 {
        return Ok(());
    }
    let c = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{name}: {what} = {v} is too large")))
    };
    let vocab_u32 = u32::try_from(vocab)
        .map_err(|_| Error::Shape(format!("{name}: vocabulary of {vocab} is too large")))?;
    let blocks = (tokens * d).div_ceil(256).min(4096) as u32;
    let args = [
        dev.ptr(dy)?,
        dev.ptr(ids)?,
        dev.ptr_mut(dtable)?,
        Arg::U32(vocab_u32),
        Arg::I32(c(d, "d")?),
        Arg::I32(c(tokens, "tokens")?),
    ];
    dev.launch(name, Launch::linear(blocks, 256), &args)
}
