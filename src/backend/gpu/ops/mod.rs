//! Kernel launch wrappers, one per kernel family, written once over `Device` (CUDA or the
//! simulator): check shapes, build the launch explicitly, name the kernel `<op>_<dtype>`.

pub mod attention;
pub mod dense;
pub mod elementwise;
pub mod embedding;
pub mod lora;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod paged;
pub mod rope;
pub mod sampling;
pub mod swiglu;
pub mod w8a16;
pub mod w8a8;

pub use norm::*;

use std::sync::OnceLock;

use super::device::{Device, Launch};
use crate::error::{Error, Result};

/// The block tile of a GEMM kernel: 64 × 64 (fewer operations per byte, but 4× more blocks,
/// which fills more of a GPU on small shapes), 128 × 128 (training shapes), or, for the W8A8
/// forward and the int8 dX on Hopper only, 128 × 256 on the warpgroup tensor cores (`Wg`, wgmma;
/// sm_90 and the simulator). The W8A8 tiles give bit-identical outputs; the dX tiles round one
/// factor of each term to bf16 on different sides (dy·sw for 64, wq·sw for 128 and wg), within
/// the same bound. `Wg` is never picked by default until a GPU run has measured it:
/// `RECFORGE_W8A8_TILE=wg` / `RECFORGE_DX_TILE=wg` ask for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    T64,
    T128,
    Wg,
}

impl Tile {
    /// The block tile's (rows, columns) of outputs.
    pub fn dims(self) -> (usize, usize) {
        match self {
            Tile::T64 => (64, 64),
            Tile::T128 => (128, 128),
            Tile::Wg => (128, 256),
        }
    }

    /// Refuses the wgmma tile on a device without wgmma, naming the kernel family `what` and the
    /// environment variable `var` that asks for it.
    pub fn check_device(self, dev: &Device, what: &str, var: &str) -> Result<()> {
        if self == Tile::Wg && !dev.has_wgmma() {
            return Err(Error::Device(format!(
                "the wgmma {what} tile ({var}=wg) needs an sm_90 (Hopper) GPU; {} has none",
                dev.name()
            )));
        }
        Ok(())
    }

    /// The launch of a kernel with this tile over `rows × cols` outputs: blocks along the
    /// columns in x and the rows in y, 4 warps for the 64 tile and 8 for the others. A grid too
    /// large for a u32 saturates, and `Device::launch` refuses it by name.
    pub fn launch(self, rows: usize, cols: usize, shared_bytes: u32) -> Launch {
        let (tr, tc) = self.dims();
        let blocks = |v: usize, t: usize| u32::try_from(v.div_ceil(t)).unwrap_or(u32::MAX);
        Launch {
            grid: (blocks(cols, tc), blocks(rows, tr), 1),
            block: match self {
                Tile::T64 => (128, 1, 1),
                Tile::T128 | Tile::Wg => (256, 1, 1),
            },
            shared_bytes,
        }
    }

    /// The 128 tile when its grid over `rows × cols` outputs has at least 128 blocks (every
    /// LLaMA-7B linear at 4 × 1024 tokens has ≥ 1024), else the 64 tile. The environment
    /// variable `var` = `64`, `128` (or `wg` where `wg_ok`) forces one, for A/B runs; it is read
    /// once per process (`forced` caches it).
    pub fn pick(
        rows: usize,
        cols: usize,
        var: &str,
        wg_ok: bool,
        forced: &'static OnceLock<Option<Tile>>,
    ) -> Tile {
        const MIN_BLOCKS_128: usize = 128;
        let forced = *forced.get_or_init(|| match std::env::var(var).as_deref() {
            Ok("64") => Some(Tile::T64),
            Ok("128") => Some(Tile::T128),
            Ok("wg") if wg_ok => Some(Tile::Wg),
            Ok("") | Err(_) => None,
            Ok(other) => {
                eprintln!(
                    "warning: {var}={other} is not 64, 128{}; using the per-shape pick",
                    if wg_ok { " or wg" } else { "" }
                );
                None
            }
        });
        forced.unwrap_or(
            if rows.div_ceil(128) * cols.div_ceil(128) >= MIN_BLOCKS_128 {
                Tile::T128
            } else {
                Tile::T64
            },
        )
    }
}
