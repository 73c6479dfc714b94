//! Elementwise kernels (kernels/elementwise.cu): the residual add `x += y`.

use super::super::device::{Arg, DevBuf, DevElem, Device, Launch};
use crate::error::{Error, Result};

/// Element types with an `add_<dtype>` kernel.
pub trait AddElem: DevElem {
    const ADD: &'static str;
}
impl AddElem for f32 {
    const ADD: &'static str = "add_f32";
}
impl AddElem for half::bf16 {
    const ADD: &'static str = "add_bf16";
}

/// Threads per block of the flat elementwise kernels (elementwise.cu, swiglu.cu).
pub(crate) const FLAT_BLOCK: u32 = 256;
/// Most blocks a flat elementwise launch uses; grid-stride loops cover the rest.
pub(crate) const FLAT_MAX_GRID: usize = 65536;

/// The launch of a flat, grid-stride elementwise kernel over `n` elements of `T`: one thread
/// per 16-byte vector (4 f32 / 8 bf16), 256 threads per block, at most 65536 blocks. `n > 0`.
pub(crate) fn flat_launch<T: DevElem>(n: usize) -> Launch {
    let per_vec = (16 / std::mem::size_of::<T>()).max(1);
    let vecs = n.div_ceil(per_vec);
    let grid = vecs.div_ceil(FLAT_BLOCK as usize).clamp(1, FLAT_MAX_GRID);
    Launch::linear(grid as u32, FLAT_BLOCK)
}

/// Residual add in place (kernels/elementwise.cu): `x += y`, both `n` elements of T (any shape,
/// flattened). Matches `Cpu::add_assign`.
pub fn add<T: AddElem>(dev: &Device, x: &mut DevBuf<T>, y: &DevBuf<T>) -> Result<()> {
    let k = T::ADD;
    if x.len() != y.len() {
        return Err(Error::Shape(format!(
            "{k}: x has {} elements, y {}; expected the same number",
            x.len(),
            y.len()
        )));
    }
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let args = [dev.ptr_mut(x)?, dev.ptr(y)?, Arg::U64(n as u64)];
    dev.launch(k, flat_launch::<T>(n), &args)
}

/// The block of a row-wise kernel (embedding.cu, rope.cu) with `items` units of work per row
/// and `rows` rows: `(bx, by)` = (threads per row: `items` rounded up to a warp, 32..=256;
/// rows per block: as many as fill 256 threads, at most `rows`). `rows > 0`.
pub(crate) fn row_block(items: usize, rows: usize) -> (u32, u32) {
    let bx = items.div_ceil(32).clamp(1, 8) * 32;
    let by = (256 / bx).clamp(1, rows.max(1));
    (bx as u32, by as u32)
}

/// `y = x` converted between f32 and bf16 (kernels/elementwise.cu `convert_<from>_<to>`).
pub fn convert<S: DevElem, D: DevElem>(
    dev: &Device,
    kernel: &'static str,
    x: &DevBuf<S>,
    y: &mut DevBuf<D>,
) -> Result<()> {
    if x.len() != y.len() {
        return Err(Error::Shape(format!(
            "{kernel}: x has {} elements, y {}",
            x.len(),
            y.len()
        )));
    }
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let grid = n.div_ceil(FLAT_BLOCK as usize).clamp(1, FLAT_MAX_GRID);
    let args = [dev.ptr(x)?, dev.ptr_mut(y)?, Arg::U64(n as u64)];
    dev.launch(kernel, Launch::linear(grid as u32, FLAT_BLOCK), &args)
}
