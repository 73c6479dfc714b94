//! The W8A8 linear: activation quantization with LLM.int8 outlier columns (kernels/quantize.cu)
//! and the int8 tensor-core GEMM with its fused dequantizing epilogue (kernels/gemm_w8a8.cu).

use half::bf16;

use std::sync::OnceLock;

use super::super::device::{Arg, DevBuf, Device, Launch};
use super::Tile;
use crate::error::{Error, Result};

/// Device scratch for quantizing up to `max_rows × max_k` activations: the column maxima, the
/// outlier columns and their count, the int8 rows and their scales. The GPU backend takes one
/// per W8A8 call (or group of projections sharing an input) from the arena, where the memory
/// plan counts it as peak scratch.
pub struct Int8Scratch {
    pub colmax: DevBuf<u32>,
    pub ocols: DevBuf<u32>,
    pub count: DevBuf<i32>,
    pub xq: DevBuf<i8>,
    pub sx: DevBuf<f32>,
    max_rows: usize,
    max_k: usize,
}

impl Int8Scratch {
    /// Uninitialized: [`quantize_activations`] writes every part before the GEMM reads it
    /// (`zero_u32` clears the column maxima, `outlier_cols` writes the count and the columns it
    /// counts, `quantize_rows_bf16` every int8 row and scale), so zeroing them first would only
    /// cost a memset of rows × K bytes per call. In the simulator they start as 0xFF bytes, so
    /// a read of an unwritten part fails the tests.
    pub fn new(dev: &Device, max_rows: usize, max_k: usize) -> Result<Self> {
        Ok(Int8Scratch {
            colmax: dev.alloc_uninit(max_k)?,
            ocols: dev.alloc_uninit(max_k)?,
            count: dev.alloc_uninit(1)?,
            xq: dev.alloc_uninit(max_rows * max_k)?,
            sx: dev.alloc_uninit(max_rows)?,
            max_rows,
            max_k,
        })
    }

    /// Bytes of device memory this scratch holds.
    pub fn bytes(&self) -> usize {
        self.max_k * 8 + 4 + self.max_rows * self.max_k + self.max_rows * 4
    }
}

fn dims(k: &str, m: usize, n: usize, kk: usize) -> Result<(i32, i32, i32)> {
    let c = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{k}: {what} = {v} is too large")))
    };
    if !kk.is_multiple_of(16) {
        return Err(Error::Shape(format!(
            "{k}: K = {kk} must be a multiple of 16 (16-byte chunks)"
        )));
    }
    Ok((c(m, "M")?, c(n, "N")?, c(kk, "K")?))
}

/// The W8A8 GEMM's tile for `m × n` outputs (see [`Tile::pick`]); `RECFORGE_W8A8_TILE` = 64,
/// 128 or wg forces one.
pub fn gemm_tile(m: usize, n: usize) -> Tile {
    static FORCED: OnceLock<Option<Tile>> = OnceLock::new();
    Tile::pick(m, n, "RECFORGE_W8A8_TILE", true, &FORCED)
}

/// The W8A8 GEMM's launch: 3 stages of a 64-byte slice of K for both operand tiles (mma.sync),
/// or 4 stages of a 128-byte slice (wgmma, kernels/gemm_w8a8_sm90.cu).
fn grid(tile: Tile, m: usize, n: usize) -> Launch {
    let (tr, tc) = tile.dims();
    let smem = match tile {
        Tile::T64 | Tile::T128 => 3 * (tr + tc) * 64,
        Tile::Wg => 4 * (tr + tc) * 128,
    };
    tile.launch(m, n, smem as u32)
}

/// The kernel of `tile` (`i32`: raw accumulators, else the bf16 epilogue); the wgmma one only
/// where the device has it.
fn kernel(dev: &Device, tile: Tile, i32: bool) -> Result<&'static str> {
    tile.check_device(dev, "W8A8", "RECFORGE_W8A8_TILE")?;
    Ok(match (tile, i32) {
        (Tile::T64, true) => "gemm_w8a8_i32",
        (Tile::T128, true) => "gemm_w8a8_t128_i32",
        (Tile::Wg, true) => "gemm_w8a8_wg_i32",
        (Tile::T64, false) => "gemm_w8a8_bf16",
        (Tile::T128, false) => "gemm_w8a8_t128_bf16",
        (Tile::Wg, false) => "gemm_w8a8_wg_bf16",
    })
}

/// Raw int32 accumulators `out[M, N] = xq[M, K] · wq[N, K]ᵀ` (exactness tests). `tile`: the
/// block tile, or `None` for [`gemm_tile`]'s pick.
#[allow(clippy::too_many_arguments)]
pub fn gemm_w8a8_i32(
    dev: &Device,
    xq: &DevBuf<i8>,
    wq: &DevBuf<i8>,
    out: &mut DevBuf<i32>,
    m: usize,
    n: usize,
    k: usize,
    tile: Option<Tile>,
) -> Result<()> {
    let tile = tile.unwrap_or_else(|| gemm_tile(m, n));
    let name = kernel(dev, tile, true)?;
    let (mi, ni, ki) = dims(name, m, n, k)?;
    if xq.len() < m * k || wq.len() != n * k || out.len() != m * n {
        return Err(Error::Shape(format!(
            "{name}: xq {} (≥ {m}×{k}), wq {} ({n}×{k}), out {} ({m}×{n})",
            xq.len(),
            wq.len(),
            out.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let args = [
        dev.ptr(xq)?,
        dev.ptr(wq)?,
        dev.ptr_mut(out)?,
        Arg::I32(mi),
        Arg::I32(ni),
        Arg::I32(ki),
    ];
    dev.launch(name, grid(tile, m, n), &args)
}

/// Quantize `x [rows, k]` into `scratch` (xq, sx, and the outlier columns for `threshold`; 0
/// disables the decomposition).
pub fn quantize_activations(
    dev: &Device,
    x: &DevBuf<bf16>,
    rows: usize,
    k: usize,
    threshold: f32,
    s: &mut Int8Scratch,
) -> Result<()> {
    let name = "quantize_rows_bf16";
    if x.len() != rows * k || rows > s.max_rows || k > s.max_k {
        return Err(Error::Shape(format!(
            "{name}: x has {} elements for {rows}×{k}; the scratch holds {}×{}",
            x.len(),
            s.max_rows,
            s.max_k
        )));
    }
    if rows == 0 || k == 0 {
        return Ok(());
    }
    let (ri, _, ki) = dims(name, rows, 0, k)?;
    dev.launch(
        "zero_u32",
        Launch::linear(k.div_ceil(256) as u32, 256),
        &[dev.ptr_mut(&mut s.colmax)?, Arg::I32(ki)],
    )?;
    let cm = Launch {
        grid: (k.div_ceil(256) as u32, rows.div_ceil(64) as u32, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(
        "colmax_bf16",
        cm,
        &[
            dev.ptr(x)?,
            Arg::I32(ri),
            Arg::I32(ki),
            dev.ptr_mut(&mut s.colmax)?,
        ],
    )?;
    let args = [
        dev.ptr(&s.colmax)?,
        Arg::I32(ki),
        Arg::F32(threshold),
        dev.ptr_mut(&mut s.ocols)?,
        dev.ptr_mut(&mut s.count)?,
    ];
    dev.launch("outlier_cols", Launch::linear(1, 1024), &args)?;
    let args = [
        dev.ptr(x)?,
        Arg::I32(ki),
        dev.ptr(&s.colmax)?,
        Arg::F32(threshold),
        dev.ptr_mut(&mut s.xq)?,
        dev.ptr_mut(&mut s.sx)?,
    ];
    dev.launch(name, Launch::linear(rows as u32, 256), &args)
}

/// The LoRA up-projection fused into the W8A8 epilogue: `y += scale · u · Bᵀ` with u `[rows, R]`
/// from `lora::lora_down` and B `[n, R]`.
pub struct LoraUp<'a> {
    pub u: &'a DevBuf<f32>,
    pub b: &'a DevBuf<f32>,
    pub rank: usize,
    pub scale: f32,
}

/// `out[rows, n] = bf16(dequant(quant(x) · wqᵀ) + outlier side product (+ LoRA) (+ residual))`.
/// `tile`: the GEMM's block tile, or `None` for [`gemm_tile`]'s pick (tests and benchmarks run
/// both).
#[allow(clippy::too_many_arguments)]
pub fn linear_w8a8(
    dev: &Device,
    x: &DevBuf<bf16>,
    rows: usize,
    k: usize,
    wq: &DevBuf<i8>,
    sw: &DevBuf<f32>,
    n: usize,
    threshold: f32,
    scratch: &mut Int8Scratch,
    lora: Option<LoraUp<'_>>,
    residual: Option<&DevBuf<bf16>>,
    out: &mut DevBuf<bf16>,
    tile: Option<Tile>,
) -> Result<()> {
    // linear_w8a8_quantized checks the GEMM's shapes; quantize_activations checks x's.
    quantize_activations(dev, x, rows, k, threshold, scratch)?;
    linear_w8a8_quantized(
        dev, x, rows, k, wq, sw, n, scratch, lora, residual, out, tile,
    )
}

/// [`linear_w8a8`] after [`quantize_activations`] has filled `scratch` from the same `x` (rows ×
/// k): the GEMM and its epilogue only, so layers that read one input (q, k, v) quantize it once.
/// The outlier threshold is the one the scratch was quantized with.
#[allow(clippy::too_many_arguments)]
pub fn linear_w8a8_quantized(
    dev: &Device,
    x: &DevBuf<bf16>,
    rows: usize,
    k: usize,
    wq: &DevBuf<i8>,
    sw: &DevBuf<f32>,
    n: usize,
    scratch: &Int8Scratch,
    lora: Option<LoraUp<'_>>,
    residual: Option<&DevBuf<bf16>>,
    out: &mut DevBuf<bf16>,
    tile: Option<Tile>,
) -> Result<()> {
    let tile = tile.unwrap_or_else(|| gemm_tile(rows, n));
    let name = kernel(dev, tile, false)?;
    let (mi, ni, ki) = dims(name, rows, n, k)?;
    if x.len() != rows * k
        || rows > scratch.max_rows
        || k > scratch.max_k
        || wq.len() != n * k
        || sw.len() != n
        || out.len() != rows * n
        || residual.is_some_and(|r| r.len() != rows * n)
    {
        return Err(Error::Shape(format!(
            "{name}: x {} ({rows}×{k}), scratch {}×{}, wq {} ({n}×{k}), sw {} ({n}), out {} ({rows}×{n}), residual {:?}",
            x.len(),
            scratch.max_rows,
            scratch.max_k,
            wq.len(),
            sw.len(),
            out.len(),
            residual.map(|r| r.len())
        )));
    }
    if let Some(l) = &lora {
        if l.u.len() != rows * l.rank || l.b.len() != n * l.rank {
            return Err(Error::Shape(format!(
                "{name}: LoRA u {} ({rows}×{}), B {} ({n}×{})",
                l.u.len(),
                l.rank,
                l.b.len(),
                l.rank
            )));
        }
    }
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let res = match residual {
        Some(r) => dev.ptr(r)?,
        None => Arg::Ptr(0),
    };
    let (lu, lb, lr, ls) = match &lora {
        Some(l) => (dev.ptr(l.u)?, dev.ptr(l.b)?, l.rank, l.scale),
        None => (Arg::Ptr(0), Arg::Ptr(0), 0, 0.0),
    };
    let lr = i32::try_from(lr)
        .map_err(|_| Error::Shape(format!("{name}: LoRA rank {lr} is too large")))?;
    let args = [
        dev.ptr(&scratch.xq)?,
        dev.ptr(&scratch.sx)?,
        dev.ptr(wq)?,
        dev.ptr(sw)?,
        dev.ptr(x)?,
        dev.ptr(&scratch.ocols)?,
        dev.ptr(&scratch.count)?,
        lu,
        lb,
        Arg::I32(lr),
        Arg::F32(ls),
        res,
        dev.ptr_mut(out)?,
        Arg::I32(mi),
        Arg::I32(ni),
        Arg::I32(ki),
    ];
    dev.launch(name, grid(tile, rows, n), &args)
}
