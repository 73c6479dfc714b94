//! The CPU reference backend: plain f32 math (f16 / bf16 tensors are widened exactly on
//! upload), exact int32 accumulation for int8 × int8, rows spread over the cores with rayon.
//! Every GPU kernel is tested against these functions, so they favour being obviously right.

mod simd;

use rayon::prelude::*;

use super::{
    check_kv_rows, check_paged_attention, check_spans, dropout_keep, expect_dtype, expect_shape,
    AdamW, Backend, Dropout, Linear, LinearWeight, Lora, PagedBatch, SeqSpan, Tensor, IGNORE_LABEL,
};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor};

#[derive(Clone, Debug, Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }
}

type T = Tensor<Cpu>;

fn f32s<'a>(op: &str, what: &str, t: &'a T) -> Result<&'a [f32]> {
    match &t.storage {
        HostData::F32(v) => Ok(v),
        other => Err(Error::Shape(format!(
            "{op}: {what} has dtype {}, expected f32",
            other.dtype()
        ))),
    }
}

fn f32s_mut<'a>(op: &str, what: &str, t: &'a mut T) -> Result<&'a mut [f32]> {
    match &mut t.storage {
        HostData::F32(v) => Ok(v),
        other => Err(Error::Shape(format!(
            "{op}: {what} has dtype {}, expected f32",
            other.dtype()
        ))),
    }
}

fn u32s<'a>(op: &str, what: &str, t: &'a T) -> Result<&'a [u32]> {
    match &t.storage {
        HostData::U32(v) => Ok(v),
        other => Err(Error::Shape(format!(
            "{op}: {what} has dtype {}, expected u32",
            other.dtype()
        ))),
    }
}

/// The weight as rows of f32 (dense) or as int8 rows with scales.
enum WView<'a> {
    Int8 { w: &'a [i8], scale: &'a [f32] },
    Dense(&'a [f32]),
}

fn weight_view<'a>(op: &str, w: &'a Linear<Cpu>) -> Result<WView<'a>> {
    let (n, k) = (w.out_features, w.in_features);
    match &w.weight {
        LinearWeight::Int8 { w: q, scale } => {
            expect_shape(op, "int8 weight", q, &[n, k])?;
            expect_shape(op, "weight scale", scale, &[n])?;
            let HostData::I8(qv) = &q.storage else {
                return Err(Error::Shape(format!(
                    "{op}: int8 weight has dtype {}",
                    q.dtype
                )));
            };
            Ok(WView::Int8 {
                w: qv,
                scale: f32s(op, "weight scale", scale)?,
            })
        }
        LinearWeight::Dense(d) => {
            expect_shape(op, "weight", d, &[n, k])?;
            Ok(WView::Dense(f32s(op, "weight", d)?))
        }
    }
}

/// Per-token int8 quantization of the activations, with the LLM.int8 outlier columns removed.
/// Returns (x_q `[T, K]`, per-row scale `[T]`, outlier column mask `[K]`). A NaN outside the
/// outlier columns makes its row's scale NaN (its values quantize to 0), so the row's outputs
/// are NaN rather than a finite answer computed as if the NaN were 0; an infinity is an
/// outlier (|inf| > threshold) and reaches the output through the float path.
pub fn quantize_activations(
    x: &[f32],
    t: usize,
    k: usize,
    threshold: f32,
) -> (Vec<i8>, Vec<f32>, Vec<bool>) {
    let mut outlier = vec![false; k];
    if threshold > 0.0 && k > 0 {
        outlier = x[..t * k]
            .par_chunks(k)
            .fold(
                || vec![false; k],
                |mut o, row| {
                    o.iter_mut()
                        .zip(row)
                        .for_each(|(o, v)| *o |= v.abs() > threshold);
                    o
                },
            )
            .reduce(
                || vec![false; k],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a |= b);
                    a
                },
            );
    }
    let mut q = vec![0i8; t * k];
    let mut scales = vec![0f32; t];
    q.par_chunks_mut(k.max(1))
        .zip(scales.par_iter_mut())
        .zip(x.par_chunks(k.max(1)))
        .for_each(|((qrow, sc), row)| {
            let amax = row
                .iter()
                .zip(&outlier)
                .filter(|(_, o)| !**o)
                .fold(0f32, |m, (v, _)| max_keeping_nan(m, v.abs()));
            let s = amax / 127.0;
            *sc = s;
            if s > 0.0 {
                for ((qv, v), o) in qrow.iter_mut().zip(row).zip(&outlier) {
                    *qv = if *o {
                        0
                    } else {
                        (v / s).round().clamp(-127.0, 127.0) as i8
                    };
                }
            }
        });
    (q, scales, outlier)
}

/// The larger of `a` and `b`, NaN if either is (`f32::max` returns the other one). The
/// activation quantizer on the GPU (kernels/quantize.cu, `rf_max_keeping_nan`) folds the same.
fn max_keeping_nan(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

/// Quantize a weight matrix `[rows, cols]` to int8 with one absmax scale per row.
pub fn quantize_rows(w: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; rows * cols];
    let mut scales = vec![0f32; rows];
    q.par_chunks_mut(cols.max(1))
        .zip(scales.par_iter_mut())
        .enumerate()
        .for_each(|(r, (qrow, s))| {
            let row = &w[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            *s = amax / 127.0;
            if *s > 0.0 {
                for (qv, v) in qrow.iter_mut().zip(row) {
                    *qv = (v / *s).round().clamp(-127.0, 127.0) as i8;
                }
            }
        });
    (q, scales)
}

impl Backend for Cpu {
    type Storage = HostData;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn activation_dtype(&self) -> DType {
        DType::F32
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<T> {
        let n = shape.iter().product();
        Ok(Tensor {
            storage: HostData::zeros(dtype, n),
            shape: shape.to_vec(),
            dtype,
        })
    }

    fn fill_zero(&self, t: &mut T) -> Result<()> {
        match &mut t.storage {
            HostData::F32(v) => v.fill(0.0),
            HostData::F16(v) => v.fill(half::f16::ZERO),
            HostData::BF16(v) => v.fill(half::bf16::ZERO),
            HostData::I8(v) => v.fill(0),
            HostData::I32(v) => v.fill(0),
            HostData::U32(v) => v.fill(0),
        }
        Ok(())
    }

    fn upload(&self, t: &HostTensor) -> Result<T> {
        let storage = match &t.data {
            HostData::F16(_) | HostData::BF16(_) => HostData::F32(t.data.to_f32()?),
            other => other.clone(),
        };
        let dtype = storage.dtype();
        Ok(Tensor {
            storage,
            shape: t.shape.clone(),
            dtype,
        })
    }

    fn download(&self, t: &T) -> Result<HostTensor> {
        HostTensor::new(t.shape.clone(), t.storage.clone())
    }

    fn copy_rows(
        &self,
        src: &T,
        src_row: usize,
        dst: &mut T,
        dst_row: usize,
        n: usize,
    ) -> Result<()> {
        let (sr, sc) = src.outer_rows();
        let (dr, dc) = dst.outer_rows();
        if sc != dc || src.dtype != dst.dtype || src_row + n > sr || dst_row + n > dr {
            return Err(Error::Shape(format!(
                "copy_rows: {n} rows from {:?} {} at {src_row} into {:?} {} at {dst_row}",
                src.shape, src.dtype, dst.shape, dst.dtype
            )));
        }
        macro_rules! cp {
            ($a:expr, $b:expr) => {
                $b[dst_row * dc..(dst_row + n) * dc]
                    .copy_from_slice(&$a[src_row * sc..(src_row + n) * sc])
            };
        }
        match (&src.storage, &mut dst.storage) {
            (HostData::F32(a), HostData::F32(b)) => cp!(a, b),
            (HostData::I8(a), HostData::I8(b)) => cp!(a, b),
            (HostData::I32(a), HostData::I32(b)) => cp!(a, b),
            (HostData::U32(a), HostData::U32(b)) => cp!(a, b),
            (HostData::F16(a), HostData::F16(b)) => cp!(a, b),
            (HostData::BF16(a), HostData::BF16(b)) => cp!(a, b),
            _ => unreachable!("dtypes checked equal"),
        }
        Ok(())
    }

    fn embedding(&self, table: &T, ids: &T, out: &mut T) -> Result<()> {
        let op = "embedding";
        let (v, d) = table.rows_cols();
        let ids = u32s(op, "ids", ids)?;
        expect_shape(op, "out", out, &[ids.len(), d])?;
        let tab = f32s(op, "table", table)?;
        let o = f32s_mut(op, "out", out)?;
        for (row, &id) in o.chunks_exact_mut(d).zip(ids) {
            if id as usize >= v {
                return Err(Error::Invalid(format!(
                    "{op}: token id {id} is outside the vocabulary of {v}"
                )));
            }
            row.copy_from_slice(&tab[id as usize * d..(id as usize + 1) * d]);
        }
        Ok(())
    }

    fn rmsnorm(&self, x: &T, weight: &T, eps: f32, out: &mut T) -> Result<()> {
        let op = "rmsnorm";
        let (_, d) = x.rows_cols();
        expect_shape(op, "weight", weight, &[d])?;
        expect_shape(op, "out", out, &x.shape)?;
        let (x, w) = (f32s(op, "x", x)?, f32s(op, "weight", weight)?);
        let o = f32s_mut(op, "out", out)?;
        o.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * w;
            }
        });
        Ok(())
    }

    fn linear(&self, x: &T, w: &Linear<Cpu>, out: &mut T) -> Result<()> {
        let op = "linear";
        let (t, k) = x.rows_cols();
        let n = w.out_features;
        if k != w.in_features {
            return Err(Error::Shape(format!(
                "{op}: input has {k} features, the weight expects {}",
                w.in_features
            )));
        }
        expect_shape(op, "out", out, &[t, n])?;
        let xs = f32s(op, "x", x)?;
        let wv = weight_view(op, w)?;
        let o = f32s_mut(op, "out", out)?;
        match wv {
            WView::Dense(wd) => o.copy_from_slice(&simd::gemm_f32(xs, wd, t, n, k)),
            WView::Int8 { w: wq, scale } => {
                let (xq, sx, outlier) = quantize_activations(xs, t, k, w.outlier_threshold);
                let out_cols: Vec<usize> = (0..k).filter(|&c| outlier[c]).collect();
                let no = out_cols.len();
                // The outlier columns of x gathered once, [T, no], for contiguous dot products.
                let xo: Vec<f32> = (0..t)
                    .flat_map(|r| out_cols.iter().map(move |&c| xs[r * k + c]))
                    .collect();
                let acc = simd::gemm_i8(&xq, wq, t, n, k);
                // The outlier columns of W, dequantized and transposed: [no, N].
                let mut wo_t = vec![0f32; no * n];
                for (i, &c) in out_cols.iter().enumerate() {
                    for j in 0..n {
                        wo_t[i * n + j] = wq[j * k + c] as f32 * scale[j];
                    }
                }
                o.par_chunks_mut(n.max(1)).enumerate().for_each(|(r, row)| {
                    let accr = &acc[r * n..(r + 1) * n];
                    for ((y, a), s) in row.iter_mut().zip(accr).zip(scale) {
                        *y = *a as f32 * sx[r] * s;
                    }
                    // Outliers added one by one, in column order, to every output at once: the
                    // kernel's epilogue adds them in the same order, so the two agree bit for
                    // bit (a vector over outputs, a sequential sum within each).
                    for (i, &x) in xo[r * no..(r + 1) * no].iter().enumerate() {
                        for (y, w) in row.iter_mut().zip(&wo_t[i * n..(i + 1) * n]) {
                            *y += x * w;
                        }
                    }
                });
            }
        }
        Ok(())
    }

    fn rope(&self, x: &mut T, positions: &T, theta: f32, inverse: bool) -> Result<()> {
        let op = "rope";
        if x.shape.len() != 3 || !x.shape[2].is_multiple_of(2) {
            return Err(Error::Shape(format!(
                "{op}: x must be [T, heads, even head_dim], got {:?}",
                x.shape
            )));
        }
        let (t, h, hd) = (x.shape[0], x.shape[1], x.shape[2]);
        let pos = u32s(op, "positions", positions)?;
        if pos.len() != t {
            return Err(Error::Shape(format!(
                "{op}: {} positions for {t} tokens",
                pos.len()
            )));
        }
        let xs = f32s_mut(op, "x", x)?;
        let half = hd / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        xs.par_chunks_mut(h * hd)
            .zip(pos.par_iter())
            .for_each(|(row, &p)| {
                for i in 0..half {
                    let inv_freq = (theta as f64).powf(-2.0 * i as f64 / hd as f64);
                    let ang = p as f64 * inv_freq;
                    let (s, c) = ((sign * ang.sin()) as f32, ang.cos() as f32);
                    for head in row.chunks_exact_mut(hd) {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * c - b * s;
                        head[i + half] = b * c + a * s;
                    }
                }
            });
        Ok(())
    }

    fn kv_write(
        &self,
        k: &T,
        v: &T,
        slots: &T,
        host_slots: &[u32],
        k_cache: &mut T,
        v_cache: &mut T,
    ) -> Result<()> {
        let op = "kv_write";
        let (_, row, _) = check_kv_rows(op, k, v, slots, host_slots, k_cache, v_cache)?;
        for (src, cache, what) in [(k, k_cache, "k_cache"), (v, v_cache, "v_cache")] {
            let from = f32s(op, "k / v", src)?;
            let to = f32s_mut(op, what, cache)?;
            for (t, &slot) in host_slots.iter().enumerate() {
                to[slot as usize * row..][..row].copy_from_slice(&from[t * row..][..row]);
            }
        }
        Ok(())
    }

    fn kv_gather(
        &self,
        k_cache: &T,
        v_cache: &T,
        slots: &T,
        host_slots: &[u32],
        k: &mut T,
        v: &mut T,
    ) -> Result<()> {
        let op = "kv_gather";
        let (_, row, _) = check_kv_rows(op, k, v, slots, host_slots, k_cache, v_cache)?;
        for (cache, dst, what) in [(k_cache, k, "k"), (v_cache, v, "v")] {
            gather_rows(
                f32s(op, "cache", cache)?,
                host_slots,
                row,
                f32s_mut(op, what, dst)?,
            );
        }
        Ok(())
    }

    fn copy_rows_within(&self, t: &mut T, src_row: usize, dst_row: usize, n: usize) -> Result<()> {
        let (rows, rc) = t.outer_rows();
        if src_row + n > rows
            || dst_row + n > rows
            || (n > 0 && src_row < dst_row + n && dst_row < src_row + n)
        {
            return Err(Error::Shape(format!(
                "copy_rows_within: {n} rows from {src_row} to {dst_row} of {:?} (ranges must not overlap)",
                t.shape
            )));
        }
        let (a, b, len) = (src_row * rc, dst_row * rc, n * rc);
        match &mut t.storage {
            HostData::F32(x) => x.copy_within(a..a + len, b),
            HostData::F16(x) => x.copy_within(a..a + len, b),
            HostData::BF16(x) => x.copy_within(a..a + len, b),
            HostData::I8(x) => x.copy_within(a..a + len, b),
            HostData::I32(x) => x.copy_within(a..a + len, b),
            HostData::U32(x) => x.copy_within(a..a + len, b),
        }
        Ok(())
    }

    /// Each sequence's K/V gathered from its blocks into contiguous rows, then `attention` on
    /// them: the reference is the contiguous op itself, so a paged and a contiguous cache give
    /// the same bits.
    fn paged_attention(
        &self,
        q: &T,
        k_cache: &T,
        v_cache: &T,
        batch: &PagedBatch<'_, Cpu>,
        out: &mut T,
    ) -> Result<()> {
        let op = "paged_attention";
        let (h, kvh, hd, _) = check_paged_attention(q, k_cache, v_cache, batch, out)?;
        let (qs, kc, vc) = (
            f32s(op, "q", q)?,
            f32s(op, "k_cache", k_cache)?,
            f32s(op, "v_cache", v_cache)?,
        );
        let (nq, row) = (batch.queries, kvh * hd);
        let qrow = nq * h * hd;
        let mut o = vec![0f32; q.numel()];
        for (b, &len) in batch.host_context_lens.iter().enumerate() {
            let len = len as usize;
            let slots = batch.sequence_slots(b);
            let (mut kb, mut vb) = (vec![0f32; len * row], vec![0f32; len * row]);
            gather_rows(kc, &slots, row, &mut kb);
            gather_rows(vc, &slots, row, &mut vb);
            let host = |data: HostData, shape: Vec<usize>| T {
                dtype: data.dtype(),
                storage: data,
                shape,
            };
            let qb = host(
                HostData::F32(qs[b * qrow..][..qrow].to_vec()),
                vec![nq, h, hd],
            );
            let kt = host(HostData::F32(kb), vec![len, kvh, hd]);
            let vt = host(HostData::F32(vb), vec![len, kvh, hd]);
            let pos = host(
                HostData::U32(((len - nq) as u32..len as u32).collect()),
                vec![nq],
            );
            let mut ob = host(HostData::F32(vec![0f32; qrow]), vec![nq, h, hd]);
            let spans = [SeqSpan {
                q_start: 0,
                q_len: nq,
                kv_start: 0,
                kv_len: len,
            }];
            self.attention(&qb, &kt, &vt, &pos, &spans, &mut ob)?;
            o[b * qrow..][..qrow].copy_from_slice(f32s(op, "out", &ob)?);
        }
        f32s_mut(op, "out", out)?.copy_from_slice(&o);
        Ok(())
    }

    fn attention(
        &self,
        q: &T,
        k: &T,
        v: &T,
        positions: &T,
        spans: &[SeqSpan],
        out: &mut T,
    ) -> Result<()> {
        let op = "attention";
        let g = attn_geometry(op, q, k, v, positions, spans)?;
        expect_shape(op, "out", out, &q.shape)?;
        let (qs, ks, vs) = (f32s(op, "q", q)?, f32s(op, "k", k)?, f32s(op, "v", v)?);
        let pos = u32s(op, "positions", positions)?;
        let (h, kvh, hd) = (g.heads, g.kv_heads, g.head_dim);
        let group = h / kvh;
        // One task per (sequence, KV head), as in the backward: a block of query rows against
        // the keys it can see is two GEMMs, S = Q·Kᵀ and O = P·V.
        let kv = KvTasks::new(ks, vs, spans, kvh, hd);
        let parts: Vec<Vec<f32>> = kv
            .tasks
            .par_iter()
            .map(|&(si, kh)| {
                let s = &spans[si];
                let (kc, vc) = kv.of(s, kh);
                let mut o_l = vec![0f32; group * s.q_len * hd];
                for i0 in (0..s.q_len).step_by(ATTN_QB) {
                    let blk = AttnBlock::new(s, pos, i0, hd);
                    let (rows, keys) = (blk.rows, blk.keys);
                    let kt_b = transpose(&kc[..keys * hd], keys, hd);
                    for gi in 0..group {
                        let qb = blk.gather(qs, h, kh * group + gi);
                        let p = blk.probabilities(&qb, &kt_b);
                        let ob = &mut o_l[(gi * s.q_len + i0) * hd..][..rows * hd];
                        simd::gemm_f32_nn(&p, &vc[..keys * hd], rows, keys, hd, ob, false);
                    }
                }
                o_l
            })
            .collect();
        let o = f32s_mut(op, "out", out)?;
        o.fill(0.0);
        for (&(si, kh), o_l) in kv.tasks.iter().zip(&parts) {
            scatter_query_heads(o, o_l, &spans[si], kh, group, h, hd);
        }
        Ok(())
    }

    fn swiglu(&self, gate: &T, up: &T, out: &mut T) -> Result<()> {
        let op = "swiglu";
        expect_shape(op, "up", up, &gate.shape)?;
        expect_shape(op, "out", out, &gate.shape)?;
        let (g, u) = (f32s(op, "gate", gate)?, f32s(op, "up", up)?);
        let o = f32s_mut(op, "out", out)?;
        o.par_iter_mut()
            .zip(g.par_iter().zip(u.par_iter()))
            .for_each(|(o, (g, u))| *o = silu(*g) * u);
        Ok(())
    }

    fn add_assign(&self, x: &mut T, y: &T) -> Result<()> {
        let op = "add_assign";
        expect_shape(op, "y", y, &x.shape)?;
        let ys = f32s(op, "y", y)?;
        let xs = f32s_mut(op, "x", x)?;
        xs.par_iter_mut()
            .zip(ys.par_iter())
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn convert(&self, x: &T, out: &mut T) -> Result<()> {
        // The CPU keeps every float tensor in f32, so a conversion is a copy.
        let op = "convert";
        if x.numel() != out.numel() {
            return Err(Error::Shape(format!(
                "{op}: x {:?} and out {:?} differ in size",
                x.shape, out.shape
            )));
        }
        let xs = f32s(op, "x", x)?.to_vec();
        f32s_mut(op, "out", out)?.copy_from_slice(&xs);
        Ok(())
    }

    fn embedding_backward(&self, dy: &T, ids: &T, dtable: &mut T) -> Result<()> {
        let op = "embedding_backward";
        let (v, d) = dtable.rows_cols();
        let ids = u32s(op, "ids", ids)?.to_vec();
        expect_shape(op, "dy", dy, &[ids.len(), d])?;
        let g = f32s(op, "dy", dy)?;
        let tab = f32s_mut(op, "dtable", dtable)?;
        for (t, &id) in ids.iter().enumerate() {
            if id as usize >= v {
                return Err(Error::Invalid(format!(
                    "{op}: token id {id} is outside the vocabulary of {v}"
                )));
            }
            for (a, b) in tab[id as usize * d..(id as usize + 1) * d]
                .iter_mut()
                .zip(&g[t * d..(t + 1) * d])
            {
                *a += b;
            }
        }
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        x: &T,
        weight: &T,
        eps: f32,
        dy: &T,
        dx: &mut T,
        accumulate: bool,
    ) -> Result<()> {
        let op = "rmsnorm_backward";
        let (_, d) = x.rows_cols();
        expect_shape(op, "weight", weight, &[d])?;
        expect_shape(op, "dy", dy, &x.shape)?;
        expect_shape(op, "dx", dx, &x.shape)?;
        let (xs, w, dys) = (
            f32s(op, "x", x)?,
            f32s(op, "weight", weight)?,
            f32s(op, "dy", dy)?,
        );
        let dxs = f32s_mut(op, "dx", dx)?;
        dxs.par_chunks_mut(d)
            .zip(xs.par_chunks(d).zip(dys.par_chunks(d)))
            .for_each(|(dx, (x, dy))| {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + eps).sqrt();
                // y = x·r·w  ⇒  dx = r·(g − x̂·mean(g·x̂)), g = dy·w, x̂ = x·r
                let dot: f32 = x
                    .iter()
                    .zip(dy)
                    .zip(w)
                    .map(|((x, dy), w)| dy * w * x * r)
                    .sum::<f32>()
                    / d as f32;
                for (((o, x), dy), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                    let v = r * (dy * w - x * r * dot);
                    *o = if accumulate { *o + v } else { v };
                }
            });
        Ok(())
    }

    fn linear_backward_input(
        &self,
        dy: &T,
        w: &Linear<Cpu>,
        dx: &mut T,
        accumulate: bool,
    ) -> Result<()> {
        let op = "linear_backward_input";
        let (t, n) = dy.rows_cols();
        let k = w.in_features;
        if n != w.out_features {
            return Err(Error::Shape(format!(
                "{op}: dy has {n} features, the weight has {} outputs",
                w.out_features
            )));
        }
        expect_shape(op, "dx", dx, &[t, k])?;
        let dys = f32s(op, "dy", dy)?;
        let wv = weight_view(op, w)?;
        let dxs = f32s_mut(op, "dx", dx)?;
        // dX = dY · W with W `[N, K]` row-major, the NN layout. An int8 W is dequantized in
        // cache-sized blocks inside the GEMM (the integer times its row's scale, rounded to
        // f32), never whole: as on the GPU, W is never materialized in a wider type.
        match wv {
            WView::Dense(wd) => simd::gemm_f32_nn(dys, wd, t, n, k, dxs, accumulate),
            WView::Int8 { w: wq, scale } => {
                simd::gemm_f32_nn_i8(dys, wq, scale, t, n, k, dxs, accumulate)
            }
        }
        Ok(())
    }

    fn swiglu_backward(&self, gate: &T, up: &T, dy: &T, dgate: &mut T, dup: &mut T) -> Result<()> {
        let op = "swiglu_backward";
        for (what, t) in [("up", up), ("dy", dy)] {
            expect_shape(op, what, t, &gate.shape)?;
        }
        expect_shape(op, "dgate", dgate, &gate.shape)?;
        expect_shape(op, "dup", dup, &gate.shape)?;
        let (g, u, d) = (
            f32s(op, "gate", gate)?,
            f32s(op, "up", up)?,
            f32s(op, "dy", dy)?,
        );
        let dg = f32s_mut(op, "dgate", dgate)?;
        for (i, o) in dg.iter_mut().enumerate() {
            let s = sigmoid(g[i]);
            *o = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
        let du = f32s_mut(op, "dup", dup)?;
        for (i, o) in du.iter_mut().enumerate() {
            *o = d[i] * silu(g[i]);
        }
        Ok(())
    }

    fn lora_forward(
        &self,
        x: &T,
        lora: &Lora<Cpu>,
        gate: &T,
        dropout: Dropout,
        h: &mut T,
        u: &mut T,
        y: &mut T,
    ) -> Result<()> {
        let op = "lora_forward";
        let g = lora_geometry(op, x, lora)?;
        let (m, k, r, n) = (g.m, g.k, g.r, g.n);
        expect_shape(op, "gate", gate, &[m, r])?;
        expect_shape(op, "h", h, &[m, r])?;
        expect_shape(op, "u", u, &[m, r])?;
        expect_shape(op, "y", y, &[m, n])?;
        let (xs, a, b, gs) = (
            f32s(op, "x", x)?,
            f32s(op, "a", &lora.a)?,
            f32s(op, "b", &lora.b)?,
            f32s(op, "gate", gate)?,
        );
        let xd = dropped_input(xs, m, k, dropout, dropout_mask(m, k, dropout).as_deref());
        // h = dropout(x) · Aᵀ,  u = h ⊙ g,  y += s · u · Bᵀ
        let hv = simd::gemm_f32(&xd, a, m, r, k);
        let uv: Vec<f32> = hv.iter().zip(gs).map(|(p, q)| p * q).collect();
        let mut ub = vec![0f32; m * n];
        simd::gemm_f32_nn(&uv, &transpose(b, n, r), m, r, n, &mut ub, false);
        let ys = f32s_mut(op, "y", y)?;
        ys.par_iter_mut()
            .zip(ub.par_iter())
            .for_each(|(y, p)| *y += lora.scale * p);
        f32s_mut(op, "h", h)?.copy_from_slice(&hv);
        f32s_mut(op, "u", u)?.copy_from_slice(&uv);
        Ok(())
    }

    fn lora_backward(
        &self,
        x: &T,
        lora: &Lora<Cpu>,
        gate: &T,
        dropout: Dropout,
        h: &T,
        u: &T,
        dy: &T,
        da: &mut T,
        db: &mut T,
        dgate: &mut T,
        dx: &mut T,
    ) -> Result<()> {
        let op = "lora_backward";
        let g = lora_geometry(op, x, lora)?;
        let (m, k, r, n) = (g.m, g.k, g.r, g.n);
        for (what, t) in [("gate", gate), ("h", h), ("u", u)] {
            expect_shape(op, what, t, &[m, r])?;
        }
        expect_shape(op, "dy", dy, &[m, n])?;
        expect_shape(op, "da", da, &[r, k])?;
        expect_shape(op, "db", db, &[n, r])?;
        expect_shape(op, "dgate", dgate, &[m, r])?;
        expect_shape(op, "dx", dx, &[m, k])?;
        let (xs, a, b) = (
            f32s(op, "x", x)?,
            f32s(op, "a", &lora.a)?,
            f32s(op, "b", &lora.b)?,
        );
        let (gs, hs, us, dys) = (
            f32s(op, "gate", gate)?,
            f32s(op, "h", h)?,
            f32s(op, "u", u)?,
            f32s(op, "dy", dy)?,
        );
        // dp = s · dy · B  [M, R]  (B `[N, R]`: a dot-product GEMM against Bᵀ `[R, N]`)
        let mut dp = simd::gemm_f32(dys, &transpose(b, n, r), m, r, n);
        dp.iter_mut().for_each(|v| *v *= lora.scale);
        let dh: Vec<f32> = dp.iter().zip(gs).map(|(p, q)| p * q).collect();
        let dg: Vec<f32> = dp.iter().zip(hs).map(|(p, q)| p * q).collect();
        // dB += s · dyᵀ · u, computed as its transpose uᵀ · dy `[R, N]` (dy stays row-major).
        let mut dbt = vec![0f32; r * n];
        simd::gemm_f32_nn(&transpose(us, m, r), dys, r, m, n, &mut dbt, false);
        let dbs = f32s_mut(op, "db", db)?;
        for c in 0..n {
            for j in 0..r {
                dbs[c * r + j] += lora.scale * dbt[j * n + c];
            }
        }
        // dA += dhᵀ · dropout(x)  [R, K]
        let keep = dropout_mask(m, k, dropout);
        let xd = dropped_input(xs, m, k, dropout, keep.as_deref());
        let das = f32s_mut(op, "da", da)?;
        simd::gemm_f32_nn(&transpose(&dh, m, r), &xd, r, m, k, das, true);
        // dx += dropout'(dh · A): the kept elements, times the keep scale.
        let mut dxl = vec![0f32; m * k];
        simd::gemm_f32_nn(&dh, a, m, r, k, &mut dxl, false);
        let keep_scale = 1.0 / (1.0 - dropout.p);
        let dxs = f32s_mut(op, "dx", dx)?;
        dxs.par_chunks_mut(k.max(1))
            .zip(dxl.par_chunks(k.max(1)))
            .enumerate()
            .for_each(|(row, (d, p))| {
                for (c, (d, p)) in d.iter_mut().zip(p).enumerate() {
                    if keep.as_ref().is_none_or(|kp| kp[row * k + c]) {
                        *d += keep_scale * p;
                    }
                }
            });
        f32s_mut(op, "dgate", dgate)?.copy_from_slice(&dg);
        Ok(())
    }

    fn lora_sample_grad_sq_norms(
        &self,
        x: &T,
        lora: &Lora<Cpu>,
        gate: &T,
        h: &T,
        u: &T,
        dy: &T,
        samples: &[(usize, usize)],
    ) -> Result<Vec<f32>> {
        let op = "lora_sample_grad_sq_norms";
        let g = lora_geometry(op, x, lora)?;
        let (m, k, r, n) = (g.m, g.k, g.r, g.n);
        for (what, t) in [("gate", gate), ("h", h), ("u", u)] {
            expect_shape(op, what, t, &[m, r])?;
        }
        expect_shape(op, "dy", dy, &[m, n])?;
        if let Some(&(s, len)) = samples.iter().find(|&&(s, len)| s + len > m) {
            return Err(Error::Shape(format!(
                "{op}: sample rows {s}..{} exceed the batch ({m} rows)",
                s + len
            )));
        }
        let (xs, b, gs, us, dys) = (
            f32s(op, "x", x)?,
            f32s(op, "b", &lora.b)?,
            f32s(op, "gate", gate)?,
            f32s(op, "u", u)?,
            f32s(op, "dy", dy)?,
        );
        let scale = lora.scale as f64;
        // The definitions, in f64, one sample at a time: dh = s·(dy·B) ⊙ gate,
        // dA = dhᵀ·x `[R, K]`, dB = s·dyᵀ·u `[N, R]`.
        Ok(samples
            .par_iter()
            .map(|&(s0, len)| {
                let rows = s0..s0 + len;
                let mut da = vec![0f64; r * k];
                let mut db = vec![0f64; n * r];
                for t in rows {
                    let dyt = &dys[t * n..(t + 1) * n];
                    for j in 0..r {
                        let dp: f64 = (0..n).map(|c| dyt[c] as f64 * b[c * r + j] as f64).sum();
                        let dh = scale * dp * gs[t * r + j] as f64;
                        for (d, &xv) in da[j * k..(j + 1) * k].iter_mut().zip(&xs[t * k..]) {
                            *d += dh * xv as f64;
                        }
                        let ut = us[t * r + j] as f64;
                        for c in 0..n {
                            db[c * r + j] += scale * dyt[c] as f64 * ut;
                        }
                    }
                }
                da.iter().chain(&db).map(|v| v * v).sum::<f64>() as f32
            })
            .collect())
    }

    fn sample(
        &self,
        logits: &T,
        params: &[super::SamplingParams],
        uniforms: &[f32],
    ) -> Result<Vec<u32>> {
        expect_dtype("sample", "logits", logits, DType::F32)?;
        let (rows, vocab) = logits.rows_cols();
        super::sampling::check_batch(rows, params, uniforms)?;
        let x = f32s("sample", "logits", logits)?;
        (0..rows)
            .into_par_iter()
            .map(|b| {
                let row = &x[b * vocab..(b + 1) * vocab];
                super::sampling::sample_row(row, &params[b], uniforms[b])
                    .ok_or_else(|| super::sampling::bad_row_error(b))
            })
            .collect()
    }

    fn token_logprobs(&self, logits: &T, ids: &[u32]) -> Result<Vec<f32>> {
        let (rows, vocab, n) = super::check_logprob_ids(logits, ids)?;
        let x = f32s("token_logprobs", "logits", logits)?;
        Ok((0..rows)
            .into_par_iter()
            .flat_map_iter(|b| {
                super::sampling::token_logprobs_row(
                    &x[b * vocab..(b + 1) * vocab],
                    &ids[b * n..(b + 1) * n],
                )
            })
            .collect())
    }

    fn cross_entropy(
        &self,
        logits: &mut T,
        labels: &T,
        grad_scale: f32,
        loss: &mut T,
    ) -> Result<()> {
        let op = "cross_entropy";
        let (t, v) = logits.rows_cols();
        expect_shape(op, "labels", labels, &[t])?;
        expect_shape(op, "loss", loss, &[t])?;
        let lab = u32s(op, "labels", labels)?.to_vec();
        if let Some(bad) = lab.iter().find(|&&l| l != IGNORE_LABEL && l as usize >= v) {
            return Err(Error::Invalid(format!(
                "{op}: label {bad} is outside the vocabulary of {v}"
            )));
        }
        let x = f32s_mut(op, "logits", logits)?;
        let mut losses = vec![0f32; t];
        x.par_chunks_mut(v.max(1))
            .zip(losses.par_iter_mut())
            .zip(lab.par_iter())
            .for_each(|((row, l), &label)| {
                if label == IGNORE_LABEL {
                    row.fill(0.0);
                    *l = 0.0;
                    return;
                }
                let m = row.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
                let sum: f64 = row.iter().map(|x| ((x - m) as f64).exp()).sum();
                let lse = m as f64 + sum.ln();
                *l = (lse - row[label as usize] as f64) as f32;
                for (j, x) in row.iter_mut().enumerate() {
                    let p = ((*x as f64) - lse).exp();
                    let onehot = if j == label as usize { 1.0 } else { 0.0 };
                    *x = ((p - onehot) * grad_scale as f64) as f32;
                }
            });
        f32s_mut(op, "loss", loss)?.copy_from_slice(&losses);
        Ok(())
    }

    fn adamw(
        &self,
        param: &mut T,
        grad: &T,
        m: &mut T,
        v: &mut T,
        hp: AdamW,
        step: u32,
        grad_scale: f32,
    ) -> Result<()> {
        let op = "adamw";
        for (what, t) in [("grad", grad), ("m", &*m), ("v", &*v)] {
            expect_shape(op, what, t, &param.shape)?;
        }
        if step == 0 {
            return Err(Error::Invalid(format!("{op}: steps count from 1")));
        }
        let g = f32s(op, "grad", grad)?;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(step as i32);
        let mut mv = f32s(op, "m", m)?.to_vec();
        let mut vv = f32s(op, "v", v)?.to_vec();
        let p = f32s_mut(op, "param", param)?;
        for i in 0..p.len() {
            let gi = g[i] * grad_scale;
            p[i] -= hp.lr * hp.weight_decay * p[i];
            mv[i] = hp.beta1 * mv[i] + (1.0 - hp.beta1) * gi;
            vv[i] = hp.beta2 * vv[i] + (1.0 - hp.beta2) * gi * gi;
            let mhat = mv[i] as f64 / bc1;
            let vhat = vv[i] as f64 / bc2;
            p[i] -= (hp.lr as f64 * mhat / (vhat.sqrt() + hp.eps as f64)) as f32;
        }
        f32s_mut(op, "m", m)?.copy_from_slice(&mv);
        f32s_mut(op, "v", v)?.copy_from_slice(&vv);
        Ok(())
    }

    fn sum_squares(&self, x: &T, out: &mut T) -> Result<()> {
        let op = "sum_squares";
        expect_shape(op, "out", out, &[1])?;
        let s: f64 = f32s(op, "x", x)?
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum();
        f32s_mut(op, "out", out)?[0] = s as f32;
        Ok(())
    }

    fn attention_backward(
        &self,
        q: &T,
        k: &T,
        v: &T,
        positions: &T,
        spans: &[SeqSpan],
        dy: &T,
        dq: &mut T,
        dk: &mut T,
        dv: &mut T,
    ) -> Result<()> {
        let op = "attention_backward";
        let g = attn_geometry(op, q, k, v, positions, spans)?;
        expect_shape(op, "dy", dy, &q.shape)?;
        expect_shape(op, "dq", dq, &q.shape)?;
        expect_shape(op, "dk", dk, &k.shape)?;
        expect_shape(op, "dv", dv, &v.shape)?;
        let (qs, ks, vs, dys) = (
            f32s(op, "q", q)?,
            f32s(op, "k", k)?,
            f32s(op, "v", v)?,
            f32s(op, "dy", dy)?,
        );
        let pos = u32s(op, "positions", positions)?;
        let (h, kvh, hd) = (g.heads, g.kv_heads, g.head_dim);
        let group = h / kvh;
        // One task per (sequence, KV head): its dk / dv rows and its query heads' dq rows are
        // written by no other task, so the tasks run in parallel and are scattered after.
        let kv = KvTasks::new(ks, vs, spans, kvh, hd);
        let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = kv
            .tasks
            .par_iter()
            .map(|&(si, kh)| {
                let s = &spans[si];
                let (kc, vc) = kv.of(s, kh);
                let mut dq_l = vec![0f32; group * s.q_len * hd];
                let mut dk_l = vec![0f32; s.kv_len * hd];
                let mut dv_l = vec![0f32; s.kv_len * hd];
                for i0 in (0..s.q_len).step_by(ATTN_QB) {
                    let blk = AttnBlock::new(s, pos, i0, hd);
                    let (rows, keys) = (blk.rows, blk.keys);
                    let kb = &kc[..keys * hd];
                    // The block's keys and values transposed once for its query heads.
                    let (kt_b, vt_b) = (
                        transpose(kb, keys, hd),
                        transpose(&vc[..keys * hd], keys, hd),
                    );
                    for gi in 0..group {
                        let head = kh * group + gi;
                        let qb = blk.gather(qs, h, head);
                        let dyb = blk.gather(dys, h, head);
                        let p = blk.probabilities(&qb, &kt_b);
                        // dp_ij = dy_i·v_j;  ds_ij = p_ij (dp_ij − Σ_j p dp) · scale
                        let mut dp = vec![0f32; rows * keys];
                        simd::gemm_f32_nn(&dyb, &vt_b, rows, hd, keys, &mut dp, false);
                        let mut ds = vec![0f32; rows * keys];
                        for i in 0..rows {
                            let vis = blk.visible(i);
                            let (pr, dpr) = (&p[i * keys..][..vis], &dp[i * keys..][..vis]);
                            let pdp: f32 = pr.iter().zip(dpr).map(|(a, b)| a * b).sum();
                            for (d, (p, dp)) in
                                ds[i * keys..][..vis].iter_mut().zip(pr.iter().zip(dpr))
                            {
                                *d = p * (dp - pdp) * blk.scale;
                            }
                        }
                        // dq = ds · K;  dk += dsᵀ · q;  dv += pᵀ · dy
                        let dqb = &mut dq_l[(gi * s.q_len + i0) * hd..][..rows * hd];
                        simd::gemm_f32_nn(&ds, kb, rows, keys, hd, dqb, false);
                        let dkb = &mut dk_l[..keys * hd];
                        simd::gemm_f32_nn(
                            &transpose(&ds, rows, keys),
                            &qb,
                            keys,
                            rows,
                            hd,
                            dkb,
                            true,
                        );
                        let dvb = &mut dv_l[..keys * hd];
                        simd::gemm_f32_nn(
                            &transpose(&p, rows, keys),
                            &dyb,
                            keys,
                            rows,
                            hd,
                            dvb,
                            true,
                        );
                    }
                }
                (dq_l, dk_l, dv_l)
            })
            .collect();
        let mut dqv = vec![0f32; qs.len()];
        let mut dkv = vec![0f32; ks.len()];
        let mut dvv = vec![0f32; vs.len()];
        for (&(si, kh), (dq_l, dk_l, dv_l)) in kv.tasks.iter().zip(&parts) {
            let s = &spans[si];
            // A query head's rows belong to one sequence and one KV head: one task writes them.
            scatter_query_heads(&mut dqv, dq_l, s, kh, group, h, hd);
            for j in 0..s.kv_len {
                let dst = ((s.kv_start + j) * kvh + kh) * hd;
                let (sk, sv) = (&dk_l[j * hd..][..hd], &dv_l[j * hd..][..hd]);
                dkv[dst..dst + hd]
                    .iter_mut()
                    .zip(sk)
                    .for_each(|(d, s)| *d += s);
                dvv[dst..dst + hd]
                    .iter_mut()
                    .zip(sv)
                    .for_each(|(d, s)| *d += s);
            }
        }
        f32s_mut(op, "dq", dq)?.copy_from_slice(&dqv);
        f32s_mut(op, "dk", dk)?.copy_from_slice(&dkv);
        f32s_mut(op, "dv", dv)?.copy_from_slice(&dvv);
        Ok(())
    }
}

struct LoraGeometry {
    m: usize,
    k: usize,
    r: usize,
    n: usize,
}

fn lora_geometry(op: &str, x: &T, lora: &Lora<Cpu>) -> Result<LoraGeometry> {
    let (m, k) = x.rows_cols();
    if lora.a.shape.len() != 2
        || lora.b.shape.len() != 2
        || lora.a.shape[1] != k
        || lora.b.shape[1] != lora.a.shape[0]
    {
        return Err(Error::Shape(format!(
            "{op}: x {:?}, A {:?}, B {:?} do not chain as x·Aᵀ·Bᵀ",
            x.shape, lora.a.shape, lora.b.shape
        )));
    }
    Ok(LoraGeometry {
        m,
        k,
        r: lora.a.shape[0],
        n: lora.b.shape[0],
    })
}

struct AttnGeometry {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn attn_geometry(
    op: &str,
    q: &T,
    k: &T,
    v: &T,
    positions: &T,
    spans: &[SeqSpan],
) -> Result<AttnGeometry> {
    if q.shape.len() != 3 || k.shape.len() != 3 {
        return Err(Error::Shape(format!(
            "{op}: q {:?} and k {:?} must be [T, heads, head_dim]",
            q.shape, k.shape
        )));
    }
    expect_shape(op, "v", v, &k.shape)?;
    let (tq, h, hd) = (q.shape[0], q.shape[1], q.shape[2]);
    let (tk, kvh) = (k.shape[0], k.shape[1]);
    if k.shape[2] != hd || kvh == 0 || h % kvh != 0 {
        return Err(Error::Shape(format!(
            "{op}: q {:?} and k {:?} are not a GQA pair",
            q.shape, k.shape
        )));
    }
    expect_dtype(op, "positions", positions, DType::U32)?;
    expect_shape(op, "positions", positions, &[tq])?;
    check_spans(op, spans, tq, tk)?;
    Ok(AttnGeometry {
        heads: h,
        kv_heads: kvh,
        head_dim: hd,
    })
}

/// Which elements of an `[m, k]` LoRA input survive dropout (`dropout_keep`, hashed once per
/// element); `None` without dropout.
fn dropout_mask(m: usize, k: usize, dropout: Dropout) -> Option<Vec<bool>> {
    if dropout.p <= 0.0 {
        return None;
    }
    let mut keep = vec![false; m * k];
    keep.par_iter_mut()
        .enumerate()
        .for_each(|(i, o)| *o = dropout_keep(dropout.seed, i as u64, dropout.p));
    Some(keep)
}

/// The LoRA input after dropout: kept elements (`keep`, from `dropout_mask`) scaled by
/// 1 / (1 − p), dropped ones 0 (the input itself, borrowed, without dropout).
fn dropped_input<'a>(
    x: &'a [f32],
    m: usize,
    k: usize,
    dropout: Dropout,
    keep: Option<&[bool]>,
) -> std::borrow::Cow<'a, [f32]> {
    let Some(keep) = keep else {
        return x[..m * k].into();
    };
    let keep_scale = 1.0 / (1.0 - dropout.p);
    let xd: Vec<f32> = x[..m * k]
        .par_iter()
        .zip(keep.par_iter())
        .map(|(x, kp)| if *kp { x * keep_scale } else { 0.0 })
        .collect();
    xd.into()
}

/// `[rows, cols]` → `[cols, rows]`.
/// `to`'s row t = `from`'s row `slots[t]` (rows of `row` values): the paged cache's reads.
fn gather_rows(from: &[f32], slots: &[u32], row: usize, to: &mut [f32]) {
    for (t, &slot) in slots.iter().enumerate() {
        to[t * row..][..row].copy_from_slice(&from[slot as usize * row..][..row]);
    }
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    // In 16 × 16 tiles: a row-by-row loop writes every element to another cache line (stride
    // `rows`), which made this 38% of a batched decode step at 512 keys.
    const TILE: usize = 16;
    let mut t = vec![0f32; rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..cols).step_by(TILE) {
            let c1 = (c0 + TILE).min(cols);
            for r in r0..r1 {
                let src = &x[r * cols + c0..r * cols + c1];
                for (c, &v) in (c0..c1).zip(src) {
                    t[c * rows + r] = v;
                }
            }
        }
    }
    t
}

/// Query rows per attention block: its scores `[rows, keys]` are one f32 matrix in memory.
const ATTN_QB: usize = 64;

/// `[T, heads, hd]` → `[heads, T, hd]`: each head's rows contiguous, as the GEMMs want them.
fn heads_major(x: &[f32], heads: usize, hd: usize) -> Vec<f32> {
    let t = x.len().checked_div(heads * hd).unwrap_or(0);
    let mut o = vec![0f32; x.len()];
    for head in 0..heads {
        for r in 0..t {
            o[(head * t + r) * hd..][..hd].copy_from_slice(&x[(r * heads + head) * hd..][..hd]);
        }
    }
    o
}

/// K and V heads-major, and the attention's tasks: one per (sequence, KV head).
struct KvTasks {
    kt: Vec<f32>,
    vt: Vec<f32>,
    /// Rows of K / V (all sequences).
    tk: usize,
    hd: usize,
    tasks: Vec<(usize, usize)>,
}

impl KvTasks {
    fn new(ks: &[f32], vs: &[f32], spans: &[SeqSpan], kvh: usize, hd: usize) -> Self {
        KvTasks {
            kt: heads_major(ks, kvh, hd),
            vt: heads_major(vs, kvh, hd),
            tk: ks.len().checked_div(kvh * hd).unwrap_or(0),
            hd,
            tasks: (0..spans.len())
                .flat_map(|si| (0..kvh).map(move |kh| (si, kh)))
                .collect(),
        }
    }

    /// The sequence's keys and values of KV head `kh`, each `[kv_len, hd]`.
    fn of(&self, s: &SeqSpan, kh: usize) -> (&[f32], &[f32]) {
        let at = (kh * self.tk + s.kv_start) * self.hd;
        let n = s.kv_len * self.hd;
        (&self.kt[at..][..n], &self.vt[at..][..n])
    }
}

/// Copy a task's query-head rows `[group, q_len, hd]` to their places in `dst`
/// `[T, heads, hd]`.
fn scatter_query_heads(
    dst: &mut [f32],
    part: &[f32],
    s: &SeqSpan,
    kh: usize,
    group: usize,
    heads: usize,
    hd: usize,
) {
    for gi in 0..group {
        let head = kh * group + gi;
        for i in 0..s.q_len {
            let at = ((s.q_start + i) * heads + head) * hd;
            dst[at..at + hd].copy_from_slice(&part[(gi * s.q_len + i) * hd..][..hd]);
        }
    }
}

/// A block of up to `ATTN_QB` query rows of one sequence and the keys they can see: key j is
/// visible to row i when j ≤ its position (and j < the sequence's keys).
struct AttnBlock<'a> {
    span: &'a SeqSpan,
    pos: &'a [u32],
    i0: usize,
    rows: usize,
    /// Keys any row of the block can see: the score matrix's width.
    keys: usize,
    hd: usize,
    scale: f32,
}

impl<'a> AttnBlock<'a> {
    fn new(span: &'a SeqSpan, pos: &'a [u32], i0: usize, hd: usize) -> Self {
        let rows = ATTN_QB.min(span.q_len - i0);
        let vis = |i: usize| (pos[span.q_start + i] as usize + 1).min(span.kv_len);
        let keys = (i0..i0 + rows).map(vis).max().unwrap_or(0);
        AttnBlock {
            span,
            pos,
            i0,
            rows,
            keys,
            hd,
            scale: 1.0 / (hd as f32).sqrt(),
        }
    }

    /// Keys visible to the block's row i.
    fn visible(&self, i: usize) -> usize {
        (self.pos[self.span.q_start + self.i0 + i] as usize + 1).min(self.span.kv_len)
    }

    /// The block's rows of one head of `x` `[T, heads, hd]`, contiguous `[rows, hd]`.
    fn gather(&self, x: &[f32], heads: usize, head: usize) -> Vec<f32> {
        let hd = self.hd;
        let mut o = vec![0f32; self.rows * hd];
        for (i, row) in o.chunks_exact_mut(hd.max(1)).enumerate() {
            let t = self.span.q_start + self.i0 + i;
            row.copy_from_slice(&x[(t * heads + head) * hd..][..hd]);
        }
        o
    }

    /// `softmax(q · Kᵀ · scale)` over each row's visible keys, `[rows, keys]`, 0 where a key
    /// is not visible; `kt` is the block's keys transposed, `[hd, keys]`.
    fn probabilities(&self, qb: &[f32], kt: &[f32]) -> Vec<f32> {
        let (keys, hd) = (self.keys, self.hd);
        let mut p = vec![0f32; self.rows * keys];
        simd::gemm_f32_nn(qb, kt, self.rows, hd, keys, &mut p, false);
        for i in 0..self.rows {
            let vis = self.visible(i);
            let row = &mut p[i * keys..(i + 1) * keys];
            row.iter_mut().for_each(|v| *v *= self.scale);
            softmax_in_place(&mut row[..vis]);
            row[vis..].fill(0.0);
        }
        p
    }
}

fn softmax_in_place(p: &mut [f32]) {
    let m = p.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    let mut sum = 0.0;
    for x in p.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    for x in p.iter_mut() {
        *x /= sum;
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

#[cfg(test)]
mod tests;
