//! W8A16 GEMM for the backward pass to the input (kernels/gemm_w8a16.cu).

use std::sync::OnceLock;

use half::bf16;

use super::super::device::{Arg, DevBuf, Device, Launch};
use crate::error::{Error, Result};

/// Which dX kernel runs: the 64 × 64 single-stage tile (`gemm_*_dx_bf16`) or the 128 × 128
/// pipelined one (`gemm_*_dx128_bf16`). Both compute the same sums with the same rounding bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DxTile {
    T64,
    T128,
}

impl DxTile {
    /// The 128 tile when its grid has at least `MIN_BLOCKS_128` blocks (training shapes: LLaMA-7B
    /// at 4 × 1024 tokens gives 1024), else the 64 tile, whose 4× more blocks fill more of the
    /// GPU on small shapes. `RECFORGE_DX_TILE=64|128` forces one (read once), for A/B runs;
    /// the 128 tile needs N to be a multiple of 8, so an odd vocabulary always takes the 64.
    pub fn for_shape(m: usize, n: usize, k: usize) -> DxTile {
        const MIN_BLOCKS_128: usize = 128;
        if !n.is_multiple_of(8) {
            return DxTile::T64;
        }
        static FORCED: OnceLock<Option<DxTile>> = OnceLock::new();
        let forced = *FORCED.get_or_init(|| match std::env::var("RECFORGE_DX_TILE").as_deref() {
            Ok("64") => Some(DxTile::T64),
            Ok("128") => Some(DxTile::T128),
            _ => None,
        });
        forced.unwrap_or(if m.div_ceil(128) * k.div_ceil(128) >= MIN_BLOCKS_128 {
            DxTile::T128
        } else {
            DxTile::T64
        })
    }

    fn launch(self) -> Launch {
        match self {
            DxTile::T64 => Launch {
                grid: (0, 0, 1),
                block: (128, 1, 1),
                shared_bytes: 64 * 64 + 32 * 128,
            },
            DxTile::T128 => Launch {
                grid: (0, 0, 1),
                block: (256, 1, 1),
                shared_bytes: 3 * 128 * 64 + 2 * 32 * 256,
            },
        }
    }

    fn grid(self, m: usize, k: usize) -> Result<(u32, u32, u32)> {
        let t = match self {
            DxTile::T64 => 64,
            DxTile::T128 => 128,
        };
        let c = |v: usize| {
            u32::try_from(v.div_ceil(t))
                .map_err(|_| Error::Shape(format!("dX GEMM: {v} rows or columns is too many")))
        };
        Ok((c(k)?, c(m)?, 1))
    }
}

/// `dx[M, K] (+)= dy[M, N] · dequant(wq, sw)[N, K]`; `accumulate` adds to dx instead of
/// overwriting it. N must be a multiple of 8 and K of 16.
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
) -> Result<()> {
    let tile = DxTile::for_shape(m, n, k);
    linear_backward_input_with(dev, dy, wq, sw, dx, m, n, k, accumulate, tile)
}

/// [`linear_backward_input`] with the kernel chosen by the caller (tests and benchmarks run both).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_input_with(
    dev: &Device,
    dy: &DevBuf<bf16>,
    wq: &DevBuf<i8>,
    sw: &DevBuf<f32>,
    dx: &mut DevBuf<bf16>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    tile: DxTile,
) -> Result<()> {
    let name = match tile {
        DxTile::T64 => "gemm_w8a16_dx_bf16",
        DxTile::T128 => "gemm_w8a16_dx128_bf16",
    };
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
    let launch = Launch {
        grid: tile.grid(m, k)?,
        ..tile.launch()
    };
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
/// `gemm_bf16_dx_bf16`).
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
) -> Result<()> {
    let tile = DxTile::for_shape(m, n, k);
    dense_backward_input_with(dev, dy, w, dx, m, n, k, accumulate, tile)
}

/// [`dense_backward_input`] with the kernel chosen by the caller; the 128 tile needs N to be a
/// multiple of 8 (its dY rows are copied 16 bytes at a time).
#[allow(clippy::too_many_arguments)]
pub fn dense_backward_input_with(
    dev: &Device,
    dy: &DevBuf<bf16>,
    w: &DevBuf<bf16>,
    dx: &mut DevBuf<bf16>,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    tile: DxTile,
) -> Result<()> {
    let name = match tile {
        DxTile::T64 => "gemm_bf16_dx_bf16",
        DxTile::T128 => "gemm_bf16_dx128_bf16",
    };
    if tile == DxTile::T128 && !n.is_multiple_of(8) {
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
    let launch = Launch {
        grid: tile.grid(m, k)?,
        ..tile.launch()
    };
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
