//! Gated LoRA (kernels/lora.cu): the down-projection pass, the up-projection pass, and the
//! backward kernels. The up-projection can also run inside the W8A8 GEMM's epilogue
//! (`w8a8::LoraUp`); `Backend::linear_lora` on the GPU picks the place (`LoraUpPlace`).

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

/// A borrowed view of a LoRA adapter on the device (A `[rank, k]`, B `[n, rank]`, f32), so the
/// wrappers serve both owned `DevLora`s and tensors of the `Backend` trait.
#[derive(Clone, Copy)]
pub struct LoraRef<'a> {
    pub a: &'a DevBuf<f32>,
    pub b: &'a DevBuf<f32>,
    pub rank: usize,
    pub k: usize,
    pub n: usize,
    pub scale: f32,
}

impl DevLora {
    pub fn view(&self) -> LoraRef<'_> {
        LoraRef {
            a: &self.a,
            b: &self.b,
            rank: self.rank,
            k: self.k,
            n: self.n,
            scale: self.scale,
        }
    }
}

fn check(name: &str, l: &LoraRef<'_>) -> Result<(i32, i32, i32)> {
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
    lora: &LoraRef<'_>,
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
        dev.ptr(lora.a)?,
        dev.ptr(gate)?,
        dev.ptr_mut(h)?,
        dev.ptr_mut(u)?,
        Arg::I32(mi),
        Arg::I32(ki),
        Arg::I32(ri),
        Arg::F32(dropout.p),
        Arg::U64(dropout.seed),
    ];
    dev.launch(name, Launch::linear(m.div_ceil(8) as u32, 256), &args)
}

/// Device addresses of one backward call's operands (row ranges already applied).
struct GradPtrs {
    dy: Arg,
    gate: Arg,
    h: Arg,
    u: Arg,
    x: Arg,
    dh: Arg,
    dgate: Arg,
    da: Arg,
    db: Arg,
}

/// The three gradient passes over `rows` rows: dp (→ dh, dgate), dB, dA.
fn grad_passes(
    dev: &Device,
    lora: &LoraRef<'_>,
    rows: i32,
    p: GradPtrs,
    dropout: Dropout,
) -> Result<()> {
    let (ri, ki, ni) = check("lora_backward", lora)?;
    let args = [
        p.dy,
        dev.ptr(lora.b)?,
        p.gate,
        p.h,
        p.dh,
        p.dgate,
        Arg::I32(rows),
        Arg::I32(ni),
        Arg::I32(ri),
        Arg::F32(lora.scale),
    ];
    dev.launch(
        "lora_dp_bf16",
        Launch::linear((rows as u32).div_ceil(8), 256),
        &args,
    )?;
    let args = [
        p.dy,
        p.u,
        p.db,
        Arg::I32(rows),
        Arg::I32(ni),
        Arg::I32(ri),
        Arg::F32(lora.scale),
    ];
    dev.launch(
        "lora_db_bf16",
        Launch::linear(lora.n.div_ceil(32) as u32, 256),
        &args,
    )?;
    let args = [
        p.x,
        p.dh,
        p.da,
        Arg::I32(rows),
        Arg::I32(ki),
        Arg::I32(ri),
        Arg::F32(dropout.p),
        Arg::U64(dropout.seed),
    ];
    dev.launch(
        "lora_da_bf16",
        Launch::linear(lora.k.div_ceil(32) as u32, 256),
        &args,
    )
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
    lora: &LoraRef<'_>,
    gate: &DevBuf<f32>,
    dropout: Dropout,
    h: &DevBuf<f32>,
    u: &DevBuf<f32>,
    dy: &DevBuf<bf16>,
    g: LoraGrads<'_>,
    m: usize,
) -> Result<()> {
    let name = "lora_backward";
    let (ri, ki, _) = check(name, lora)?;
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
    let ptrs = GradPtrs {
        dy: dev.ptr(dy)?,
        gate: dev.ptr(gate)?,
        h: dev.ptr(h)?,
        u: dev.ptr(u)?,
        x: dev.ptr(x)?,
        dh: dev.ptr_mut(g.dh)?,
        dgate: dev.ptr_mut(g.dgate)?,
        da: dev.ptr_mut(g.da)?,
        db: dev.ptr_mut(g.db)?,
    };
    grad_passes(dev, lora, mi, ptrs, dropout)?;
    let cfg = Launch {
        grid: (m.div_ceil(8) as u32, lora.k.div_ceil(256) as u32, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    let args = [
        dev.ptr(g.dh)?,
        dev.ptr(lora.a)?,
        dev.ptr_mut(g.dx)?,
        Arg::I32(mi),
        Arg::I32(ki),
        Arg::I32(ri),
        Arg::F32(dropout.p),
        Arg::U64(dropout.seed),
    ];
    dev.launch("lora_dx_bf16", cfg, &args)
}

/// Device scratch for `sample_grad_sq_norms`, sized for the longest sample and the number of
/// samples (`out` holds each sample's ‖dA‖² and ‖dB‖², read back once).
pub struct SampleNormScratch {
    pub dh: DevBuf<f32>,
    pub dgate: DevBuf<f32>,
    pub da: DevBuf<f32>,
    pub db: DevBuf<f32>,
    pub workspace: DevBuf<f32>,
    pub out: DevBuf<f32>,
    max_rows: usize,
}

impl SampleNormScratch {
    pub fn new(dev: &Device, lora: &LoraRef<'_>, max_rows: usize, samples: usize) -> Result<Self> {
        Ok(SampleNormScratch {
            dh: dev.alloc_zeros(max_rows * lora.rank)?,
            dgate: dev.alloc_zeros(max_rows * lora.rank)?,
            da: dev.alloc_zeros(lora.rank * lora.k)?,
            db: dev.alloc_zeros(lora.n * lora.rank)?,
            workspace: dev.alloc_zeros(super::optim::SUM_SQUARES_BLOCKS)?,
            out: dev.alloc_zeros(2 * samples.max(1))?,
            max_rows,
        })
    }
}

/// Squared L2 norm of each sample's LoRA gradient (‖dA_s‖² + ‖dB_s‖²), for gradient-based data
/// pruning: `samples` are (first row, rows) ranges of the batch. Gradients are taken without
/// dropout (scoring runs in eval mode), from the forward's saved `h` and `u`. Each sample's dA
/// and dB are materialized in the scratch (R·(K + N) floats) rather than through Gram matrices,
/// which would cost rows²·(N + K) per sample. The sums stay on the device until every sample
/// is done: one read-back (one synchronization) per call, not two per sample.
#[allow(clippy::too_many_arguments)]
pub fn sample_grad_sq_norms(
    dev: &Device,
    x: &DevBuf<bf16>,
    lora: &LoraRef<'_>,
    gate: &DevBuf<f32>,
    h: &DevBuf<f32>,
    u: &DevBuf<f32>,
    dy: &DevBuf<bf16>,
    samples: &[(usize, usize)],
    s: &mut SampleNormScratch,
) -> Result<Vec<f32>> {
    let name = "lora_sample_grad_sq_norms";
    check(name, lora)?;
    let rows = x.len() / lora.k.max(1);
    if x.len() != rows * lora.k
        || dy.len() != rows * lora.n
        || [gate.len(), h.len(), u.len()]
            .iter()
            .any(|&l| l != rows * lora.rank)
    {
        return Err(Error::Shape(format!(
            "{name}: x {}, dy {}, gate {}, h {}, u {} do not describe the same rows",
            x.len(),
            dy.len(),
            gate.len(),
            h.len(),
            u.len()
        )));
    }
    let r = lora.rank;
    if s.out.len() < 2 * samples.len() {
        return Err(Error::Shape(format!(
            "{name}: the scratch holds sums for {} samples, not {}",
            s.out.len() / 2,
            samples.len()
        )));
    }
    for (i, &(start, len)) in samples.iter().enumerate() {
        if start + len > rows || len > s.max_rows {
            return Err(Error::Shape(format!(
                "{name}: sample rows {start}..{} exceed the batch ({rows}) or the scratch ({})",
                start + len,
                s.max_rows
            )));
        }
        for buf in [&mut s.da, &mut s.db] {
            let n = buf.len();
            dev.launch(
                "zero_u32",
                Launch::linear(n.div_ceil(256) as u32, 256),
                &[dev.ptr_mut(buf)?, Arg::I32(n as i32)],
            )?;
        }
        if len > 0 {
            let ptrs = GradPtrs {
                dy: dev.ptr_at(dy, start * lora.n)?,
                gate: dev.ptr_at(gate, start * r)?,
                h: dev.ptr_at(h, start * r)?,
                u: dev.ptr_at(u, start * r)?,
                x: dev.ptr_at(x, start * lora.k)?,
                dh: dev.ptr_mut(&mut s.dh)?,
                dgate: dev.ptr_mut(&mut s.dgate)?,
                da: dev.ptr_mut(&mut s.da)?,
                db: dev.ptr_mut(&mut s.db)?,
            };
            grad_passes(dev, lora, len as i32, ptrs, Dropout::NONE)?;
        }
        // An empty sample's zeroed dA and dB sum to 0 like any other.
        super::optim::sum_squares_at(dev, &s.da, &mut s.workspace, &mut s.out, 2 * i)?;
        super::optim::sum_squares_at(dev, &s.db, &mut s.workspace, &mut s.out, 2 * i + 1)?;
    }
    if samples.is_empty() {
        return Ok(vec![]);
    }
    let sums = dev.download(&s.out)?;
    // As the host summed before: (0 + ‖dA‖²) + ‖dB‖² in f32.
    Ok(sums
        .chunks_exact(2)
        .take(samples.len())
        .map(|ab| ab[0] + ab[1])
        .collect())
}

/// `y[m, n] += scale · u[m, r] · B[n, r]ᵀ` as its own pass (the W8A8 GEMM fuses this into its
/// epilogue; this serves the `Backend` trait's lora_forward, which adds to an existing y).
pub fn lora_up(
    dev: &Device,
    u: &DevBuf<f32>,
    lora: &LoraRef<'_>,
    y: &mut DevBuf<bf16>,
    m: usize,
) -> Result<()> {
    let name = "lora_up_bf16";
    let (ri, _, ni) = check(name, lora)?;
    if u.len() != m * lora.rank || y.len() != m * lora.n {
        return Err(Error::Shape(format!(
            "{name}: u {} ({m}×{}), y {} ({m}×{})",
            u.len(),
            lora.rank,
            y.len(),
            lora.n
        )));
    }
    if m == 0 || lora.n == 0 {
        return Ok(());
    }
    let mi = i32::try_from(m).map_err(|_| Error::Shape(format!("{name}: M = {m} is too large")))?;
    let cfg = Launch {
        grid: (m.div_ceil(8) as u32, lora.n.div_ceil(256) as u32, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    let args = [
        dev.ptr(u)?,
        dev.ptr(lora.b)?,
        dev.ptr_mut(y)?,
        Arg::I32(mi),
        Arg::I32(ni),
        Arg::I32(ri),
        Arg::F32(lora.scale),
    ];
    dev.launch(name, cfg, &args)
}
