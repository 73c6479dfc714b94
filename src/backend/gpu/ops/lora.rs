//! Gated LoRA (kernels/lora.cu): the down-projection pass and the backward kernels. The
//! up-projection runs inside the W8A8 GEMM's epilogue (`w8a8::LoraUp`).

use half::bf16;

use super::super::device::{Arg, DevBuf, Device, Launch};
use crate::backend::Dropout;
use crate::error::{Error, Result};

/// A LoRA adapter on the device: A `[rank, k]`, B `[n, rank]` f32, `scale` = alpha / r.
pub struct DevLora {
    pub a: DevBuf<f32>,
    pub b: DevBuf<f32>,
    pub rank: usize,
    pub k: usize,
    pub n: usize,
    pub scale: f32,
}

fn check(name: &str, l: &DevLora) -> Result<(i32, i32, i32)> {
    if l.a.len() != l.rank * l.k || l.b.len() != l.n * l.rank {
        return Err(Error::Shape(format!(
            "{name}: A has {} elements ({}×{}), B {} ({}×{})",
            l.a.len(),
            l.rank,
            l.k,
            l.b.len(),
            l.n,
            l.rank
        )));
    }
    let c = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{name}: {what} = {v} is too large")))
    };
    Ok((c(l.rank, "rank")?, c(l.k, "K")?, c(l.n, "N")?))
}

fn check_dropout(name: &str, d: Dropout) -> Result<()> {
    if !(0.0..1.0).contains(&d.p) {
        return Err(Error::Invalid(format!(
            "{name}: dropout probability {} must be in [0, 1)",
            d.p
        )));
    }
    Ok(())
}

/// `h = dropout(x) · Aᵀ`, `u = h ⊙ gate`; x `[m, k]` bf16, gate/h/u `[m, rank]` f32.
#[allow(clippy::too_many_arguments)]
pub fn lora_down(
    dev: &Device,
    x: &DevBuf<bf16>,
    lora: &DevLora,
    gate: &DevBuf<f32>,
    dropout: Dropout,
    h: &mut DevBuf<f32>,
    u: &mut DevBuf<f32>,
    m: usize,
) -> Result<()> {
    let name = "lora_down_bf16";
    let (ri, ki, _) = check(name, lora)?;
    check_dropout(name, dropout)?;
    let mr = m * lora.rank;
    if x.len() != m * lora.k || gate.len() != mr || h.len() != mr || u.len() != mr {
        return Err(Error::Shape(format!(
            "{name}: x {} ({m}×{}), gate {}, h {}, u {} ({m}×{})",
            x.len(),
            lora.k,
            gate.len(),
            h.len(),
            u.len(),
            lora.rank
        )));
    }
    if m == 0 {
        return Ok(());
    }
    let mi = i32::try_from(m).map_err(|_| Error::Shape(format!("{name}: M = {m} is too large")))?;
    let args = [
        dev.ptr(x)?,
        dev.ptr(&lora.a)?,
        dev.ptr(gate)?,
        dev.ptr_mut(h)?,
        dev.ptr_mut(u)?,
        Arg::I32(mi),
        Arg::I32(ki),
        Arg::I32(ri),
        Arg::F32(dropout.p),
        Arg::U64(dropout.seed),
    ];
    dev.launch(name, Launch::linear(m as u32, 256), &args)
}

/// Buffers the backward pass reads and writes; `da`, `db` and `dx` accumulate, `dgate` and the
/// `dh` scratch `[m, rank]` are overwritten.
pub struct LoraGrads<'a> {
    pub da: &'a mut DevBuf<f32>,
    pub db: &'a mut DevBuf<f32>,
    pub dgate: &'a mut DevBuf<f32>,
    pub dh: &'a mut DevBuf<f32>,
    pub dx: &'a mut DevBuf<bf16>,
}

/// The gated LoRA backward for `m` rows: see `Backend::lora_backward`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    dev: &Device,
    x: &DevBuf<bf16>,
    lora: &DevLora,
    gate: &DevBuf<f32>,
    dropout: Dropout,
    h: &DevBuf<f32>,
    u: &DevBuf<f32>,
    dy: &DevBuf<bf16>,
    g: LoraGrads<'_>,
    m: usize,
) -> Result<()> {
    let name = "lora_backward";
    let (ri, ki, ni) = check(name, lora)?;
    check_dropout(name, dropout)?;
    let mr = m * lora.rank;
    let ok = x.len() == m * lora.k
        && [gate.len(), h.len(), u.len(), g.dgate.len(), g.dh.len()]
            .iter()
            .all(|&l| l == mr)
        && dy.len() == m * lora.n
        && g.da.len() == lora.a.len()
        && g.db.len() == lora.b.len()
        && g.dx.len() == m * lora.k;
    if !ok {
        return Err(Error::Shape(format!(
            "{name}: for M = {m}, K = {}, N = {}, rank {}: x {}, gate {}, h {}, u {}, dy {}, dA {}, dB {}, dgate {}, dh {}, dx {}",
            lora.k,
            lora.n,
            lora.rank,
            x.len(),
            gate.len(),
            h.len(),
            u.len(),
            dy.len(),
            g.da.len(),
            g.db.len(),
            g.dgate.len(),
            g.dh.len(),
            g.dx.len()
        )));
    }
    if m == 0 {
        return Ok(());
    }
    let mi = i32::try_from(m).map_err(|_| Error::Shape(format!("{name}: M = {m} is too large")))?;
    let args = [
        dev.ptr(dy)?,
        dev.ptr(&lora.b)?,
        dev.ptr(gate)?,
        dev.ptr(h)?,
        dev.ptr_mut(g.dh)?,
        dev.ptr_mut(g.dgate)?,
        Arg::I32(mi),
        Arg::I32(ni),
        Arg::I32(ri),
        Arg::F32(lora.scale),
    ];
    dev.launch("lora_dp_bf16", Launch::linear(m as u32, 256), &args)?;
    let args = [
        dev.ptr(dy)?,
        dev.ptr(u)?,
        dev.ptr_mut(g.db)?,
        Arg::I32(mi),
        Arg::I32(ni),
        Arg::I32(ri),
        Arg::F32(lora.scale),
    ];
    dev.launch(
        "lora_db_bf16",
        Launch::linear(lora.n.div_ceil(128) as u32, 128),
        &args,
    )?;
    let args = [
        dev.ptr(x)?,
        dev.ptr(g.dh)?,
        dev.ptr_mut(g.da)?,
        Arg::I32(mi),
        Arg::I32(ki),
        Arg::I32(ri),
        Arg::F32(dropout.p),
        Arg::U64(dropout.seed),
    ];
    dev.launch(
        "lora_da_bf16",
        Launch::linear(lora.k.div_ceil(128) as u32, 128),
        &args,
    )?;
    let blocks = (m * lora.k).div_ceil(256).min(4096) as u32;
    let args = [
        dev.ptr(g.dh)?,
        dev.ptr(&lora.a)?,
        dev.ptr_mut(g.dx)?,
        Arg::I32(mi),
        Arg::I32(ki),
        Arg::I32(ri),
        Arg::F32(dropout.p),
        Arg::U64(dropout.seed),
    ];
    dev.launch("lora_dx_bf16", Launch::linear(blocks, 256), &args)
}
