//! Token sampling and token log-probabilities (kernels/sampling.cu). Semantics:
//! `backend::sampling`.

use super::super::device::{Arg, DevBuf, Device, Launch};
use crate::backend::sampling::{check_batch, SamplingParams};
use crate::error::{Error, Result};

/// Threads per row; must equal RF_SAMPLE_THREADS in kernels/sampling.cu.
const SAMPLE_THREADS: u32 = 512;

/// The per-row parameter block the kernel reads: (temperature bits, top_k, top_p bits, uniform
/// bits). Validates the batch first.
pub fn pack_params(rows: usize, params: &[SamplingParams], uniforms: &[f32]) -> Result<Vec<u32>> {
    check_batch(rows, params, uniforms)?;
    Ok(params
        .iter()
        .zip(uniforms)
        .flat_map(|(p, u)| {
            [
                p.temperature.to_bits(),
                p.top_k,
                p.top_p.to_bits(),
                u.to_bits(),
            ]
        })
        .collect())
}

fn grid_and_vocab(k: &str, rows: usize, vocab: usize) -> Result<(u32, i32)> {
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&r| r <= i32::MAX as u32)
        .ok_or_else(|| Error::Shape(format!("{k}: {rows} rows exceed the grid")))?;
    let v = i32::try_from(vocab)
        .ok()
        .filter(|&v| v > 0 && v <= 1 << 22)
        .ok_or_else(|| {
            Error::Shape(format!(
                "{k}: a vocabulary of {vocab} is outside 1 ..= 2^22 (fixed-point weights sum in u64)"
            ))
        })?;
    Ok((grid, v))
}

/// `tokens[b]` ← the token of row `b` of `logits` `[rows, vocab]` under `packed` (from
/// [`pack_params`], uploaded); `u32::MAX` for a row without a distribution.
pub fn sample(
    dev: &Device,
    logits: &DevBuf<f32>,
    packed: &DevBuf<u32>,
    tokens: &mut DevBuf<u32>,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    let k = "sample_f32";
    if logits.len() != rows * vocab || packed.len() != 4 * rows || tokens.len() != rows {
        return Err(Error::Shape(format!(
            "{k}: logits has {} elements, params {}, tokens {}; expected {rows}×{vocab}, {}, {rows}",
            logits.len(),
            packed.len(),
            tokens.len(),
            4 * rows
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let (grid, v) = grid_and_vocab(k, rows, vocab)?;
    let args = [
        dev.ptr(logits)?,
        dev.ptr(packed)?,
        dev.ptr_mut(tokens)?,
        Arg::I32(v),
    ];
    dev.launch(k, Launch::linear(grid, SAMPLE_THREADS), &args)
}

/// `out[b·n + j]` ← `log softmax(logits[b])[ids[b·n + j]]` (NaN for an id ≥ vocab).
pub fn token_logprobs(
    dev: &Device,
    logits: &DevBuf<f32>,
    ids: &DevBuf<u32>,
    out: &mut DevBuf<f32>,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    let k = "token_logprobs_f32";
    if logits.len() != rows * vocab
        || ids.len() != out.len()
        || (rows > 0 && !ids.len().is_multiple_of(rows))
    {
        return Err(Error::Shape(format!(
            "{k}: logits has {} elements, ids {}, out {}; expected {rows}×{vocab} and rows × n ids",
            logits.len(),
            ids.len(),
            out.len()
        )));
    }
    if rows == 0 || ids.is_empty() {
        return Ok(());
    }
    let (grid, v) = grid_and_vocab(k, rows, vocab)?;
    let n = i32::try_from(ids.len() / rows)
        .map_err(|_| Error::Shape(format!("{k}: too many ids per row")))?;
    let args = [
        dev.ptr(logits)?,
        dev.ptr(ids)?,
        dev.ptr_mut(out)?,
        Arg::I32(v),
        Arg::I32(n),
    ];
    dev.launch(k, Launch::linear(grid, 256), &args)
}
