//! W8A16 GEMM for the backward pass to the input (kernels/gemm_w8a16.cu).

use std::sync::OnceLock;

use half::bf16;

use super::super::device::{Arg, DevBuf, Device, Launch};
use super::Tile;
use crate::error::{Error, Result};

/// The dX kernel for a shape: the 128 × 128 pipelined tile (`gemm_*_dx128_bf16`) for
/// training-size grids, else the 64 × 64 single-stage one (`gemm_*_dx_bf16`);
/// `RECFORGE_DX_TILE` = 64, 128 or wg (the Hopper wgmma tile, int8 W only) forces one. The 128
/// and wg tiles need N to be a multiple of 8, so an odd vocabulary takes the 64.
pub fn dx_tile(m: usize, n: usize, k: usize) -> Tile {
    static FORCED: OnceLock<Option<Tile>> = OnceLock::new();
    if !n.is_multiple_of(8) {
        return Tile::T64;
    }
    Tile::pick(m, k, "RECFORGE_DX_TILE", true, &FORCED)
}

/// Dynamic shared memory of each dX kernel (see kernels/gemm_w8a16.cu).
fn dx_smem(tile: Tile) -> u32 {
    match tile {
        Tile::T64 => 64 * 64 + 32 * 128,
        Tile::T128 => 3 * 128 * 64 + 2 * 32 * 256,
        Tile::Wg => 3 * 128 * 64 * 2 + 2 * 64 * 256 * 2, // kernels/gemm_w8a16_sm90.cu
    }
}

/// The dX kernel of `tile` (`int8`: W8A16, else dense bf16 W); the wgmma one is int8 only and
/// needs a device that has wgmma.
fn dx_kernel(dev: &Device, tile: Tile, int8: bool) -> Result<&'static str> {
    tile.check_device(dev, "dX", "RECFORGE_DX_TILE")?;
    Ok(match (tile, int8) {
        (Tile::T64, true) => "gemm_w8a16_dx_bf16",
        (Tile::T128, true) => "gemm_w8a16_dx128_bf16",
        (Tile::Wg, true) => "gemm_w8a16_dx_wg_bf16",
        (Tile::T64, false) => "gemm_bf16_dx_bf16",
        (Tile::T128, false) => "gemm_bf16_dx128_bf16",
        (Tile::Wg, false) => {
            return Err(Error::Shape(
                "gemm_bf16_dx: a bf16 W has no wgmma (Wg) dX tile: use T64 or T128".into(),
            ))
        }
    })
}

/// `dx[M, K] (+)= dy[M, N] · dequant(wq, sw)[N, K]`; `accumulate` adds to dx instead of
/// overwriting it. N must be a multiple of 8 and K of 16. `tile`: the kernel, or `None` for
/// [`dx_tile`]'s pick (tests and benchmarks run both).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_input(
    dev: &Device,
    dy: &DevBuf<bf16>,
    wq: &DevBuf<i8>,
    sw: &DevBuf<f32>,
    dx: &mut DevBuf<bf16>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    tile: Option<Tile>,
) -> Result<()> {
    let tile = tile.unwrap_or_else(|| dx_tile(m, n, k));
    let name = dx_kernel(dev, tile, true)?;
    if !n.is_multiple_of(8) || !k.is_multiple_of(16) {
        return Err(Error::Shape(format!(
            "{name}: N = {n} must be a multiple of 8 and K = {k} of 16"
        )));
    }
    if dy.len() != m * n || wq.len() != n * k || sw.len() != n || dx.len() != m * k {
        return Err(Error::Shape(format!(
            "{name}: dy {} ({m}×{n}), wq {} ({n}×{k}), sw {} ({n}), dx {} ({m}×{k})",
            dy.len(),
            wq.len(),
            sw.len(),
            dx.len()
        )));
    }
    if m == 0 || k == 0 {
        return Ok(());
    }
    let c = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{name}: {what} = {v} is too large")))
    };
    let launch = tile.launch(m, k, dx_smem(tile));
    let args = [
        dev.ptr(dy)?,
        dev.ptr(wq)?,
        dev.ptr(sw)?,
        dev.ptr_mut(dx)?,
        Arg::I32(c(m, "M")?),
        Arg::I32(c(n, "N")?),
        Arg::I32(c(k, "K")?),
        Arg::I32(accumulate as i32),
    ];
    dev.launch(name, launch, &args)
}

/// Decode GEMV (kernels/gemv_w8a16.cu): `y[m, n] = bf16(x[m, k] · dequant(wq, sw)ᵀ (+ residual))`
/// for a few rows; K must be a multiple of 16.
#[allow(clippy::too_many_arguments)]
pub fn gemv(
    dev: &Device,
    x: &DevBuf<bf16>,
    wq: &DevBuf<i8>,
    sw: &DevBuf<f32>,
    residual: Option<&DevBuf<bf16>>,
    y: &mut DevBuf<bf16>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let name = "gemv_w8a16_bf16";
    if !k.is_multiple_of(16) {
        return Err(Error::Shape(format!(
            "{name}: K = {k} must be a multiple of 16"
        )));
    }
    if x.len() != m * k
        || wq.len() != n * k
        || sw.len() != n
        || y.len() != m * n
        || residual.is_some_and(|r| r.len() != m * n)
    {
        return Err(Error::Shape(format!(
            "{name}: x {} ({m}×{k}), wq {} ({n}×{k}), sw {} ({n}), y {} ({m}×{n}), residual {:?}",
            x.len(),
            wq.len(),
            sw.len(),
            y.len(),
            residual.map(|r| r.len())
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let c = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{name}: {what} = {v} is too large")))
    };
    let res = match residual {
        Some(r) => dev.ptr(r)?,
        None => Arg::Ptr(0),
    };
    let launch = Launch {
        grid: (n.div_ceil(8) as u32, m.div_ceil(8) as u32, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    let args = [
        dev.ptr(x)?,
        dev.ptr(wq)?,
        dev.ptr(sw)?,
        res,
        dev.ptr_mut(y)?,
        Arg::I32(c(m, "M")?),
        Arg::I32(c(n, "N")?),
        Arg::I32(c(k, "K")?),
    ];
    dev.launch(name, launch, &args)
}

/// `dx[M, K] (+)= dy[M, N] · w[N, K]` for a dense bf16 weight (the output head's backward, and
/// any linear kept dense); any N, K a multiple of 16 (kernels/gemm_w8a16.cu,
/// `gemm_bf16_dx{,128}_bf16`). `tile`: the kernel, or `None` for [`dx_tile`]'s pick; the 128
/// tile needs N to be a multiple of 8 (its dY rows are copied 16 bytes at a time).
#[allow(clippy::too_many_arguments)]
pub fn dense_backward_input(
    dev: &Device,
    dy: &DevBuf<bf16>,
    w: &DevBuf<bf16>,
    dx: &mut DevBuf<bf16>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    tile: Option<Tile>,
) -> Result<()> {
    // A forced wg tile (RECFORGE_DX_TILE=wg) is for the int8 kernel; a bf16 W keeps the 128.
    let tile = tile.unwrap_or_else(|| match dx_tile(m, n, k) {
        Tile::Wg => Tile::T128,
        t => t,
    });
    let name = dx_kernel(dev, tile, false)?;
    if tile == Tile::T128 && !n.is_multiple_of(8) {
        return Err(Error::Shape(format!(
            "{name}: N = {n} must be a multiple of 8 (use the 64 tile)"
        )));
    }
    if !k.is_multiple_of(16) {
        return Err(Error::Shape(format!(
            "{name}: K = {k} must be a multiple of 16"
        )));
    }
    if dy.len() != m * n || w.len() != n * k || dx.len() != m * k {
        return Err(Error::Shape(format!(
            "{name}: dy {} ({m}×{n}), w {} ({n}×{k}), dx {} ({m}×{k})",
            dy.len(),
            w.len(),
            dx.len()
        )));
    }
    if m == 0 || k == 0 {
        return Ok(());
    }
    let c = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{name}: {what} = {v} is too large")))
    };
    let launch = tile.launch(m, k, dx_smem(tile));
    let args = [
        dev.ptr(dy)?,
        dev.ptr(w)?,
        dev.ptr_mut(dx)?,
        Arg::I32(c(m, "M")?),
        Arg::I32(c(n, "N")?),
        Arg::I32(c(k, "K")?),
        Arg::I32(accumulate as i32),
    ];
    dev.launch(name, launch, &args)
}
