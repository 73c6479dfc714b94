//! Causal GQA attention over packed sequences (kernels/attention.cu).

use half::bf16;

use super::super::device::{Arg, DevBuf, Device, Launch};
use crate::backend::SeqSpan;
use crate::error::{Error, Result};

/// Geometry of an attention call: `tq` query rows of `heads × head_dim`, `tk` key/value rows of
/// `kv_heads × head_dim`.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub tq: usize,
    pub tk: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Write the spans as 4 i32 each (q_start, q_len, kv_start, kv_len) for the kernels.
fn upload_spans(
    dev: &Device,
    name: &str,
    spans: &[SeqSpan],
    span_buf: &mut DevBuf<i32>,
) -> Result<()> {
    if span_buf.len() != 4 * spans.len() {
        return Err(Error::Shape(format!(
            "{name}: span buffer has {} i32, {} spans need {}",
            span_buf.len(),
            spans.len(),
            4 * spans.len()
        )));
    }
    let mut flat = Vec::with_capacity(4 * spans.len());
    for s in spans {
        for x in [s.q_start, s.q_len, s.kv_start, s.kv_len] {
            flat.push(
                i32::try_from(x)
                    .map_err(|_| Error::Shape(format!("{name}: span {s:?} is too large")))?,
            );
        }
    }
    dev.write(span_buf, &flat)
}

impl AttnShape {
    /// The kernels' geometry limits: head_dim 32, 64, 96 or 128 (a warp holds a head), and
    /// whole groups of query heads per KV head.
    fn check_heads(&self, name: &str) -> Result<()> {
        let (hd, h, kv) = (self.head_dim, self.heads, self.kv_heads);
        if hd == 0 || !hd.is_multiple_of(32) || hd > 128 || kv == 0 || !h.is_multiple_of(kv) {
            return Err(Error::Shape(format!("{name}: head_dim {hd} must be 32, 64, 96 or 128 and heads {h} a multiple of kv_heads {kv}")));
        }
        Ok(())
    }

    /// Grid of both kernels: (query rows in fours, heads, sequences).
    fn grid(&self, spans: &[SeqSpan]) -> Launch {
        let max_q = spans.iter().map(|s| s.q_len).max().unwrap_or(0);
        Launch {
            grid: (
                max_q.div_ceil(4) as u32,
                self.heads as u32,
                spans.len() as u32,
            ),
            block: (128, 1, 1),
            shared_bytes: 0,
        }
    }
}

/// Which forward kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// The tiled tensor-core kernel for head_dim 64 and 128, else the warp-per-row one.
    Auto,
    /// The warp-per-row kernel (`attention_fwd_bf16`), any supported head_dim.
    PerRow,
}

/// What every attention call reads: q `[tq, heads, head_dim]`, k and v `[tk, kv_heads,
/// head_dim]` (bf16), the position of each query row `[tq]`, and the sequences as spans.
#[derive(Clone, Copy)]
pub struct AttnInputs<'a> {
    pub q: &'a DevBuf<bf16>,
    pub k: &'a DevBuf<bf16>,
    pub v: &'a DevBuf<bf16>,
    pub positions: &'a DevBuf<u32>,
    pub spans: &'a [SeqSpan],
    pub shape: AttnShape,
}

impl AttnInputs<'_> {
    /// The kernels' head limits, the buffers' lengths against `shape`, and the spans.
    fn check(&self, name: &str) -> Result<()> {
        let AttnShape {
            tq,
            tk,
            heads,
            kv_heads,
            head_dim,
        } = self.shape;
        self.shape.check_heads(name)?;
        let (q, k, v, positions) = (self.q, self.k, self.v, self.positions);
        if q.len() != tq * heads * head_dim
            || k.len() != tk * kv_heads * head_dim
            || v.len() != k.len()
            || positions.len() != tq
        {
            return Err(Error::Shape(format!(
                "{name}: q {}, k {}, v {}, positions {} do not match {:?}",
                q.len(),
                k.len(),
                v.len(),
                positions.len(),
                self.shape
            )));
        }
        crate::backend::check_spans(name, self.spans, tq, tk)
    }
}

/// Forward: `out = softmax(scale · q·kᵀ, causal by position) · v` per span, and `lse` `[tq,
/// heads]`. `spans` is uploaded into `span_buf` (4 i32 per span) — the caller keeps that buffer.
pub fn attention_forward(
    dev: &Device,
    x: &AttnInputs,
    span_buf: &mut DevBuf<i32>,
    out: &mut DevBuf<bf16>,
    lse: &mut DevBuf<f32>,
) -> Result<()> {
    attention_forward_with(dev, AttnKernel::Auto, x, span_buf, out, lse)
}

/// [`attention_forward`] with the kernel chosen by the caller (tests and benchmarks compare them).
pub fn attention_forward_with(
    dev: &Device,
    kernel: AttnKernel,
    x: &AttnInputs,
    span_buf: &mut DevBuf<i32>,
    out: &mut DevBuf<bf16>,
    lse: &mut DevBuf<f32>,
) -> Result<()> {
    let name = "attention_fwd_bf16";
    let AttnInputs {
        q,
        k,
        v,
        positions,
        spans,
        shape,
    } = *x;
    let AttnShape {
        tq,
        heads,
        kv_heads,
        head_dim,
        ..
    } = shape;
    x.check(name)?;
    if out.len() != q.len() || lse.len() != tq * heads {
        return Err(Error::Shape(format!(
            "{name}: out {} and lse {} do not match {shape:?}",
            out.len(),
            lse.len()
        )));
    }
    if spans.is_empty() {
        return Ok(());
    }
    upload_spans(dev, name, spans, span_buf)?;
    let tiled = match (kernel, head_dim) {
        (AttnKernel::Auto, 64) => Some("attention_fwd_hd64_bf16"),
        (AttnKernel::Auto, 128) => Some("attention_fwd_hd128_bf16"),
        _ => None,
    };
    let (name, launch) = match tiled {
        Some(k) => {
            // 64 query rows per block; K and V tiles of 64 rows of (2·hd + 16) bytes.
            let max_q = spans.iter().map(|s| s.q_len).max().unwrap_or(0);
            let launch = Launch {
                grid: (max_q.div_ceil(64) as u32, heads as u32, spans.len() as u32),
                block: (128, 1, 1),
                shared_bytes: (2 * 64 * (2 * head_dim + 16)) as u32,
            };
            (k, launch)
        }
        None => (name, shape.grid(spans)),
    };
    if launch.grid.0 == 0 {
        return Ok(());
    }
    let scale = 1.0 / (head_dim as f32).sqrt();
    let args = [
        dev.ptr(q)?,
        dev.ptr(k)?,
        dev.ptr(v)?,
        dev.ptr(positions)?,
        dev.ptr(span_buf)?,
        dev.ptr_mut(out)?,
        dev.ptr_mut(lse)?,
        Arg::I32(heads as i32),
        Arg::I32(kv_heads as i32),
        Arg::I32(head_dim as i32),
        Arg::F32(scale),
    ];
    dev.launch(name, launch, &args)
}

/// Scratch of `attention_backward`: f32 accumulators `dk32`, `dv32` `[tk, kv_heads, head_dim]`;
/// for the tiled kernels (head_dim 64 / 128) also the recomputed forward output `o` and `lse`,
/// `delta` = rowsum(dy ⊙ o) `[tq, heads]` and the f32 accumulator `dq32` `[tq, heads, head_dim]`
/// (empty otherwise).
pub struct AttnGradScratch {
    pub dk32: DevBuf<f32>,
    pub dv32: DevBuf<f32>,
    pub o: DevBuf<bf16>,
    pub lse: DevBuf<f32>,
    pub delta: DevBuf<f32>,
    pub dq32: DevBuf<f32>,
}

impl AttnGradScratch {
    /// Scratch for [`attention_backward`], which recomputes the forward's O and lse.
    pub fn new(dev: &Device, shape: AttnShape) -> Result<Self> {
        Self::make(dev, shape, true)
    }

    /// Scratch for [`attention_backward_saved`], which reads O and lse from the forward pass
    /// (no `o` / `lse` of its own).
    pub fn reusing_forward(dev: &Device, shape: AttnShape) -> Result<Self> {
        Self::make(dev, shape, false)
    }

    fn make(dev: &Device, shape: AttnShape, recompute: bool) -> Result<Self> {
        let n = shape.tk * shape.kv_heads * shape.head_dim;
        let (rows, nq) = if tiled_head_dim(shape.head_dim) {
            let rows = shape.tq * shape.heads;
            (rows, rows * shape.head_dim)
        } else {
            (0, 0)
        };
        let (o_len, lse_len) = if recompute { (nq, rows) } else { (0, 0) };
        Ok(AttnGradScratch {
            dk32: dev.alloc_zeros(n)?,
            dv32: dev.alloc_zeros(n)?,
            o: dev.alloc_zeros(o_len)?,
            lse: dev.alloc_zeros(lse_len)?,
            delta: dev.alloc_zeros(rows)?,
            dq32: dev.alloc_zeros(nq)?,
        })
    }
}

/// Head sizes with tiled tensor-core kernels.
pub fn tiled_head_dim(hd: usize) -> bool {
    hd == 64 || hd == 128
}

/// The output gradient of a backward call and the input gradients it writes: dq `[tq, heads,
/// head_dim]` (overwritten), dk and dv `[tk, kv_heads, head_dim]` (overwritten; summed over the
/// query heads of a group).
pub struct AttnGrads<'a> {
    pub dy: &'a DevBuf<bf16>,
    pub dq: &'a mut DevBuf<bf16>,
    pub dk: &'a mut DevBuf<bf16>,
    pub dv: &'a mut DevBuf<bf16>,
}

/// Backward: the gradients of [`attention_forward`]'s output, recomputing its O and lse.
pub fn attention_backward(
    dev: &Device,
    x: &AttnInputs,
    span_buf: &mut DevBuf<i32>,
    g: AttnGrads,
    scratch: &mut AttnGradScratch,
) -> Result<()> {
    backward_impl(dev, AttnKernel::Auto, x, span_buf, None, g, scratch)
}

/// [`attention_backward`] with the kernel chosen by the caller (tests and benchmarks).
pub fn attention_backward_with(
    dev: &Device,
    kernel: AttnKernel,
    x: &AttnInputs,
    span_buf: &mut DevBuf<i32>,
    g: AttnGrads,
    scratch: &mut AttnGradScratch,
) -> Result<()> {
    backward_impl(dev, kernel, x, span_buf, None, g, scratch)
}

/// [`attention_backward`] reusing the forward pass's output `o` `[tq, heads, head_dim]` and
/// `lse` `[tq, heads]` (as [`attention_forward`] left them, for the same inputs) instead of
/// recomputing them: the tiled backward then skips one attention forward. The per-row kernels
/// (other head sizes) recompute inside the kernel and ignore them. `scratch` from
/// [`AttnGradScratch::reusing_forward`] (or `new`).
pub fn attention_backward_saved(
    dev: &Device,
    x: &AttnInputs,
    span_buf: &mut DevBuf<i32>,
    o: &DevBuf<bf16>,
    lse: &DevBuf<f32>,
    g: AttnGrads,
    scratch: &mut AttnGradScratch,
) -> Result<()> {
    let shape = x.shape;
    let rows = shape.tq * shape.heads;
    if o.len() != rows * shape.head_dim || lse.len() != rows {
        return Err(Error::Shape(format!(
            "attention_backward_saved: o {} and lse {} do not match {shape:?}",
            o.len(),
            lse.len()
        )));
    }
    backward_impl(
        dev,
        AttnKernel::Auto,
        x,
        span_buf,
        Some((o, lse)),
        g,
        scratch,
    )
}

fn backward_impl(
    dev: &Device,
    kernel: AttnKernel,
    x: &AttnInputs,
    span_buf: &mut DevBuf<i32>,
    saved: Option<(&DevBuf<bf16>, &DevBuf<f32>)>,
    g: AttnGrads<'_>,
    scratch: &mut AttnGradScratch,
) -> Result<()> {
    let name = "attention_bwd_bf16";
    let AttnInputs {
        q,
        k,
        v,
        positions,
        spans,
        shape,
    } = *x;
    let AttnShape {
        tq,
        tk,
        heads,
        kv_heads,
        head_dim,
    } = shape;
    x.check(name)?;
    let nk = tk * kv_heads * head_dim;
    {
        let AttnGrads { dy, dq, dk, dv } = &g;
        if dy.len() != tq * heads * head_dim
            || dq.len() != dy.len()
            || dk.len() != nk
            || dv.len() != nk
            || scratch.dk32.len() != nk
            || scratch.dv32.len() != nk
        {
            return Err(Error::Shape(format!(
                "{name}: dy {}, dq {}, dk {}, dv {}, scratch {} do not match {shape:?}",
                dy.len(),
                dq.len(),
                dk.len(),
                dv.len(),
                scratch.dk32.len()
            )));
        }
    }
    let zero = Launch::linear(nk.div_ceil(256).max(1) as u32, 256);
    for b in [&mut scratch.dk32, &mut scratch.dv32] {
        dev.launch("zero_u32", zero, &[dev.ptr_mut(b)?, Arg::I32(nk as i32)])?;
    }
    if kernel == AttnKernel::Auto && tiled_head_dim(head_dim) {
        return tiled_backward(dev, x, span_buf, saved, g, scratch);
    }
    let AttnGrads { dy, dq, dk, dv } = g;
    upload_spans(dev, name, spans, span_buf)?;
    let launch = shape.grid(spans);
    if launch.grid.0 > 0 {
        let scale = 1.0 / (head_dim as f32).sqrt();
        let args = [
            dev.ptr(q)?,
            dev.ptr(k)?,
            dev.ptr(v)?,
            dev.ptr(positions)?,
            dev.ptr(span_buf)?,
            dev.ptr(dy)?,
            dev.ptr_mut(dq)?,
            dev.ptr_mut(&mut scratch.dk32)?,
            dev.ptr_mut(&mut scratch.dv32)?,
            Arg::I32(heads as i32),
            Arg::I32(kv_heads as i32),
            Arg::I32(head_dim as i32),
            Arg::F32(scale),
        ];
        dev.launch(name, launch, &args)?;
    }
    let args = [
        dev.ptr(&scratch.dk32)?,
        dev.ptr(&scratch.dv32)?,
        dev.ptr_mut(dk)?,
        dev.ptr_mut(dv)?,
        Arg::I32(nk as i32),
    ];
    dev.launch(
        "attention_bwd_finish_bf16",
        Launch::linear(nk.div_ceil(256).clamp(1, 4096) as u32, 256),
        &args,
    )
}

/// The tiled backward (kernels/attention.cu, `attention_bwd_hd{64,128}_bf16`): O and lse from
/// the forward pass (`saved`) or recomputed with the tiled forward, D = rowsum(dy ⊙ O), then
/// one block per (64 keys, query head, span) accumulating dq32 / dk32 / dv32 in f32, converted
/// to bf16 at the end.
fn tiled_backward(
    dev: &Device,
    x: &AttnInputs,
    span_buf: &mut DevBuf<i32>,
    saved: Option<(&DevBuf<bf16>, &DevBuf<f32>)>,
    g: AttnGrads,
    scratch: &mut AttnGradScratch,
) -> Result<()> {
    let AttnInputs {
        q,
        k,
        v,
        positions,
        spans,
        shape,
    } = *x;
    let AttnGrads { dy, dq, dk, dv } = g;
    let AttnShape {
        tq,
        tk,
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let name = if head_dim == 64 {
        "attention_bwd_hd64_bf16"
    } else {
        "attention_bwd_hd128_bf16"
    };
    let (rows, nq, nk) = (tq * heads, tq * heads * head_dim, tk * kv_heads * head_dim);
    let own = if saved.is_some() { (0, 0) } else { (nq, rows) };
    if scratch.dq32.len() != nq
        || scratch.delta.len() != rows
        || scratch.o.len() < own.0
        || scratch.lse.len() < own.1
    {
        return Err(Error::Shape(format!(
            "{name}: scratch was made for another shape than {shape:?}{}",
            if saved.is_none() && scratch.o.is_empty() {
                " (scratch for a backward that reuses the forward's O and lse)"
            } else {
                ""
            }
        )));
    }
    let AttnGradScratch {
        dk32,
        dv32,
        o: o_own,
        lse: lse_own,
        delta,
        dq32,
    } = scratch;
    dev.launch(
        "zero_u32",
        Launch::linear(nq.div_ceil(256).max(1) as u32, 256),
        &[dev.ptr_mut(dq32)?, Arg::I32(nq as i32)],
    )?;
    // O and lse (every row the spans cover; rows outside any span get dq = 0): the forward
    // pass's, or recomputed here.
    let (o, lse): (&DevBuf<bf16>, &DevBuf<f32>) = match saved {
        Some((o, lse)) => {
            upload_spans(dev, name, spans, span_buf)?;
            (o, lse)
        }
        None => {
            attention_forward(dev, x, span_buf, o_own, lse_own)?;
            (o_own, lse_own)
        }
    };
    if rows > 0 {
        dev.launch(
            "attention_bwd_delta_bf16",
            Launch::linear(rows.div_ceil(4) as u32, 128),
            &[
                dev.ptr(dy)?,
                dev.ptr(o)?,
                dev.ptr_mut(delta)?,
                Arg::I32(rows as i32),
                Arg::I32(head_dim as i32),
            ],
        )?;
    }
    let max_kv = spans.iter().map(|s| s.kv_len).max().unwrap_or(0);
    if max_kv > 0 {
        let row_bytes = 2 * head_dim + 16;
        // Query rows per tile (rf_flash::bwd_rows in the kernel).
        let bq = if head_dim == 128 { 32 } else { 64 };
        let launch = Launch {
            grid: (max_kv.div_ceil(64) as u32, heads as u32, spans.len() as u32),
            block: (128, 1, 1),
            // K and V tiles of 64 rows, Q and dO tiles of bq rows, the 64 × bq bf16 dS tile.
            shared_bytes: ((2 * 64 + 2 * bq) * row_bytes + 64 * (2 * bq + 16)) as u32,
        };
        let args = [
            dev.ptr(q)?,
            dev.ptr(k)?,
            dev.ptr(v)?,
            dev.ptr(positions)?,
            dev.ptr(span_buf)?,
            dev.ptr(dy)?,
            dev.ptr(lse)?,
            dev.ptr(delta)?,
            dev.ptr_mut(dq32)?,
            dev.ptr_mut(dk32)?,
            dev.ptr_mut(dv32)?,
            Arg::I32(heads as i32),
            Arg::I32(kv_heads as i32),
            Arg::I32(head_dim as i32),
            Arg::F32(1.0 / (head_dim as f32).sqrt()),
        ];
        dev.launch(name, launch, &args)?;
    }
    let fin = Launch::linear(nk.div_ceil(256).clamp(1, 4096) as u32, 256);
    dev.launch(
        "attention_bwd_finish_bf16",
        fin,
        &[
            dev.ptr(dk32)?,
            dev.ptr(dv32)?,
            dev.ptr_mut(dk)?,
            dev.ptr_mut(dv)?,
            Arg::I32(nk as i32),
        ],
    )?;
    super::elementwise::convert(dev, "convert_f32_bf16", dq32, dq)
}
