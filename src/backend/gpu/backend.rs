//! The `Backend` trait on a `Device` (CUDA or the simulator): activations in bf16, weights as
//! the kernels want them. The model, trainer and server code run on it unchanged.
//!
//! Tensors are stored in the dtype they are uploaded in (f32, bf16, i8, i32, u32); the model
//! converts kept-precision matrices to bf16 (`activation_dtype`) and keeps norm weights and
//! scales in f32, as the kernels take them. f16 is not used on this backend.

use half::bf16;

use super::device::{DevBuf, Device};
use super::ops::{self, attention::AttnShape, w8a8::Int8Scratch};
use crate::backend::{
    check_kv_rows, check_paged_attention, linear_lora_unfused, AdamW, Backend, Dropout, Linear,
    LinearWeight, Lora, PagedBatch, Projection, SeqSpan, Tensor,
};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor};

pub struct Gpu {
    pub dev: Device,
    /// Where `linear_lora` adds the LoRA up-projection on the int8 GEMM path; `None` reads
    /// `RECFORGE_LORA_UP` (see [`LoraUpPlace::from_env`]). Tests set it to run both.
    pub lora_up: Option<LoraUpPlace>,
}

/// Where the GPU's `linear_lora` adds `scale · u · Bᵀ` to an int8 projection's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraUpPlace {
    /// `lora_up_bf16` after the GEMM: reads B once per 8 rows and the output once more (one
    /// more bf16 rounding).
    Pass,
    /// The W8A8 GEMM's epilogue (`w8a8::LoraUp`): no second pass over the output, but each
    /// output element reads its R values of u and of B (from L1) beside the GEMM.
    Epilogue,
}

impl LoraUpPlace {
    /// `RECFORGE_LORA_UP` = `pass` (the default) or `epilogue`. The default is the pass because
    /// by the arithmetic in results/NOTES.md (2026-12-06, "LoRA up-projection") the epilogue's
    /// 2R loads per output cost more than the pass at r 16; the first GPU run measures both
    /// (`cuda_lora_overhead`, `bench-train`).
    pub fn from_env() -> Result<Self> {
        match std::env::var("RECFORGE_LORA_UP").as_deref() {
            Err(_) | Ok("") | Ok("pass") => Ok(LoraUpPlace::Pass),
            Ok("epilogue") => Ok(LoraUpPlace::Epilogue),
            Ok(other) => Err(Error::Invalid(format!(
                "RECFORGE_LORA_UP={other}: expected `pass` or `epilogue`"
            ))),
        }
    }
}

/// Rows of an int8 linear at or below which it takes the weight-only GEMV (decode) path,
/// which needs no activation-quantization scratch (the memory plan counts on this).
pub const GEMV_MAX_ROWS: usize = 16;

impl Gpu {
    pub fn new(dev: Device) -> Self {
        Gpu { dev, lora_up: None }
    }
}

pub enum GpuStorage {
    F32(DevBuf<f32>),
    BF16(DevBuf<bf16>),
    I8(DevBuf<i8>),
    I32(DevBuf<i32>),
    U32(DevBuf<u32>),
}

type T = Tensor<Gpu>;

macro_rules! getter {
    ($name:ident, $name_mut:ident, $variant:ident, $ty:ty) => {
        fn $name<'a>(op: &str, what: &str, t: &'a T) -> Result<&'a DevBuf<$ty>> {
            match &t.storage {
                GpuStorage::$variant(b) => Ok(b),
                _ => Err(Error::Shape(format!(
                    "{op}: {what} has dtype {}, expected {}",
                    t.dtype,
                    stringify!($variant).to_lowercase()
                ))),
            }
        }
        #[allow(dead_code)]
        fn $name_mut<'a>(op: &str, what: &str, t: &'a mut T) -> Result<&'a mut DevBuf<$ty>> {
            let dt = t.dtype;
            match &mut t.storage {
                GpuStorage::$variant(b) => Ok(b),
                _ => Err(Error::Shape(format!(
                    "{op}: {what} has dtype {dt}, expected {}",
                    stringify!($variant).to_lowercase()
                ))),
            }
        }
    };
}
getter!(f32b, f32b_mut, F32, f32);
getter!(bf, bf_mut, BF16, bf16);
getter!(i8b, i8b_mut, I8, i8);
getter!(u32b, u32b_mut, U32, u32);
getter!(i32b, i32b_mut, I32, i32);

/// The trait's LoRA tensors as a kernel-wrapper view (A `[R, K]`, B `[N, R]`, both f32).
fn lora_view<'a>(op: &str, lora: &'a Lora<Gpu>, k: usize) -> Result<ops::lora::LoraRef<'a>> {
    if lora.a.shape.len() != 2
        || lora.b.shape.len() != 2
        || lora.a.shape[1] != k
        || lora.b.shape[1] != lora.a.shape[0]
    {
        return Err(Error::Shape(format!(
            "{op}: x has {k} features, A {:?}, B {:?} do not chain as x·Aᵀ·Bᵀ",
            lora.a.shape, lora.b.shape
        )));
    }
    Ok(ops::lora::LoraRef {
        a: f32b(op, "A", &lora.a)?,
        b: f32b(op, "B", &lora.b)?,
        rank: lora.a.shape[0],
        k,
        n: lora.b.shape[0],
        scale: lora.scale,
    })
}

/// The attention geometry of q `[Tq, H, hd]` and k `[Tk, KVH, hd]`.
fn attn_shape(op: &str, q: &T, k: &T) -> Result<AttnShape> {
    if q.shape.len() != 3 || k.shape.len() != 3 {
        return Err(Error::Shape(format!(
            "{op}: q {:?} and k {:?} must be [T, heads, head_dim]",
            q.shape, k.shape
        )));
    }
    Ok(AttnShape {
        tq: q.shape[0],
        tk: k.shape[0],
        heads: q.shape[1],
        kv_heads: k.shape[1],
        head_dim: q.shape[2],
    })
}

/// A cache `[slots, kv_heads, head_dim…]` as the slot kernels see it: slots are rows, so a
/// "block" of one slot each is the whole cache.
fn slot_shape(cache: &T, slots: usize) -> ops::paged::PagedShape {
    ops::paged::PagedShape {
        num_blocks: slots,
        block_size: 1,
        kv_heads: cache.shape.get(1).copied().unwrap_or(1),
        head_dim: cache.shape.get(2..).map_or(1, |d| d.iter().product()),
    }
}

/// The trait's attention tensors as the kernel wrappers' inputs.
fn attn_inputs<'a>(
    op: &str,
    q: &'a T,
    k: &'a T,
    v: &'a T,
    positions: &'a T,
    spans: &'a [SeqSpan],
) -> Result<ops::attention::AttnInputs<'a>> {
    Ok(ops::attention::AttnInputs {
        q: bf(op, "q", q)?,
        k: bf(op, "k", k)?,
        v: bf(op, "v", v)?,
        positions: u32b(op, "positions", positions)?,
        spans,
        shape: attn_shape(op, q, k)?,
    })
}

/// The trait's attention gradients as the kernel wrappers' view.
fn attn_grads<'a>(
    op: &str,
    dy: &'a T,
    dq: &'a mut T,
    dk: &'a mut T,
    dv: &'a mut T,
) -> Result<ops::attention::AttnGrads<'a>> {
    Ok(ops::attention::AttnGrads {
        dy: bf(op, "dy", dy)?,
        dq: bf_mut(op, "dq", dq)?,
        dk: bf_mut(op, "dk", dk)?,
        dv: bf_mut(op, "dv", dv)?,
    })
}

impl Gpu {
    /// Attention forward writing the log-sum-exp into `lse` (`[Tq, H]` f32).
    #[allow(clippy::too_many_arguments)]
    fn attention_into(
        &self,
        op: &str,
        q: &T,
        k: &T,
        v: &T,
        positions: &T,
        spans: &[SeqSpan],
        out: &mut T,
        lse: &mut DevBuf<f32>,
    ) -> Result<()> {
        let x = attn_inputs(op, q, k, v, positions, spans)?;
        let mut span_buf = self.dev.alloc_zeros::<i32>(4 * spans.len())?;
        ops::attention::attention_forward(
            &self.dev,
            &x,
            &mut span_buf,
            bf_mut(op, "out", out)?,
            lse,
        )
    }

    fn linear_impl(&self, x: &T, w: &Linear<Gpu>, out: &mut T) -> Result<()> {
        let op = "linear";
        let (rows, k) = x.rows_cols();
        if k != w.in_features || out.numel() != rows * w.out_features {
            return Err(Error::Shape(format!(
                "{op}: x {:?} and out {:?} for a {}→{} layer",
                x.shape, out.shape, w.in_features, w.out_features
            )));
        }
        let xb = bf(op, "x", x)?;
        match &w.weight {
            LinearWeight::Int8 { w: q, scale } => {
                let ob = bf_mut(op, "out", out)?;
                let (qb, sb) = (i8b(op, "weight", q)?, f32b(op, "scale", scale)?);
                if rows <= GEMV_MAX_ROWS {
                    // Decode (DESIGN.md §3): the weight-only path, bandwidth-bound by design; the
                    // activations stay bf16, so no outlier decomposition is needed.
                    return ops::w8a16::gemv(
                        &self.dev,
                        xb,
                        qb,
                        sb,
                        None,
                        ob,
                        rows,
                        w.out_features,
                        k,
                    );
                }
                let mut scratch = Int8Scratch::new(&self.dev, rows, k)?;
                ops::w8a8::linear_w8a8(
                    &self.dev,
                    xb,
                    rows,
                    k,
                    qb,
                    sb,
                    w.out_features,
                    w.outlier_threshold,
                    &mut scratch,
                    None,
                    None,
                    ob,
                    None,
                )
            }
            LinearWeight::Dense(d) => {
                let db = bf(op, "weight", d)?;
                match &mut out.storage {
                    GpuStorage::F32(o) => {
                        ops::dense::gemm(&self.dev, xb, db, o, rows, w.out_features, k)
                    }
                    GpuStorage::BF16(o) => {
                        ops::dense::gemm(&self.dev, xb, db, o, rows, w.out_features, k)
                    }
                    _ => Err(Error::Shape(format!("{op}: out has dtype {}", out.dtype))),
                }
            }
        }
    }
}

impl Backend for Gpu {
    type Storage = GpuStorage;

    fn name(&self) -> String {
        self.dev.name()
    }

    fn activation_dtype(&self) -> DType {
        DType::BF16
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn memory_in_use(&self) -> Option<u64> {
        self.dev.memory_in_use()
    }

    fn memory_stats(&self) -> Option<super::MemStats> {
        Some(self.dev.memory_stats())
    }

    fn reserve_arena(&self, bytes: u64) -> Result<bool> {
        self.dev.reserve_arena(bytes).map(|()| true)
    }

    fn reset_memory_peak(&self) {
        self.dev.reset_peak()
    }

    fn profile_start(&self) -> Result<bool> {
        self.dev.profile_start().map(|()| true)
    }

    fn profile_stop(&self) -> Result<Option<super::Profile>> {
        self.dev.profile_stop().map(Some)
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<T> {
        let n: usize = shape.iter().product();
        let storage = match dtype {
            DType::F32 => GpuStorage::F32(self.dev.alloc_zeros(n)?),
            DType::BF16 => GpuStorage::BF16(self.dev.alloc_zeros(n)?),
            DType::I8 => GpuStorage::I8(self.dev.alloc_zeros(n)?),
            DType::I32 => GpuStorage::I32(self.dev.alloc_zeros(n)?),
            DType::U32 => GpuStorage::U32(self.dev.alloc_zeros(n)?),
            DType::F16 => {
                return Err(Error::Device(
                    "f16 tensors are not used on the GPU backend (bf16 is)".into(),
                ))
            }
        };
        Ok(Tensor {
            storage,
            shape: shape.to_vec(),
            dtype,
        })
    }

    fn fill_zero(&self, t: &mut T) -> Result<()> {
        let d = &self.dev;
        match &mut t.storage {
            GpuStorage::F32(b) => d.fill_zero(b),
            GpuStorage::BF16(b) => d.fill_zero(b),
            GpuStorage::I8(b) => d.fill_zero(b),
            GpuStorage::I32(b) => d.fill_zero(b),
            GpuStorage::U32(b) => d.fill_zero(b),
        }
    }

    fn upload(&self, t: &HostTensor) -> Result<T> {
        let storage = match &t.data {
            HostData::F32(v) => GpuStorage::F32(self.dev.upload(v)?),
            HostData::BF16(v) => GpuStorage::BF16(self.dev.upload(v)?),
            HostData::I8(v) => GpuStorage::I8(self.dev.upload(v)?),
            HostData::I32(v) => GpuStorage::I32(self.dev.upload(v)?),
            HostData::U32(v) => GpuStorage::U32(self.dev.upload(v)?),
            HostData::F16(_) => return Err(Error::Device("f16 tensors are not used on the GPU backend: convert to bf16 or f32 (HostTensor::to_dtype)".into())),
        };
        Ok(Tensor {
            storage,
            shape: t.shape.clone(),
            dtype: t.dtype(),
        })
    }

    fn download(&self, t: &T) -> Result<HostTensor> {
        let data = match &t.storage {
            GpuStorage::F32(b) => HostData::F32(self.dev.download(b)?),
            GpuStorage::BF16(b) => HostData::BF16(self.dev.download(b)?),
            GpuStorage::I8(b) => HostData::I8(self.dev.download(b)?),
            GpuStorage::I32(b) => HostData::I32(self.dev.download(b)?),
            GpuStorage::U32(b) => HostData::U32(self.dev.download(b)?),
        };
        HostTensor::new(t.shape.clone(), data)
    }

    fn copy_rows(
        &self,
        src: &T,
        src_row: usize,
        dst: &mut T,
        dst_row: usize,
        n: usize,
    ) -> Result<()> {
        let (_, sc) = src.outer_rows();
        let (_, dc) = dst.outer_rows();
        if sc != dc {
            return Err(Error::Shape(format!(
                "copy_rows: rows of {:?} and {:?} differ",
                src.shape, dst.shape
            )));
        }
        let d = &self.dev;
        match (&src.storage, &mut dst.storage) {
            (GpuStorage::F32(a), GpuStorage::F32(b)) => {
                d.copy(a, src_row * sc, b, dst_row * dc, n * sc)
            }
            (GpuStorage::BF16(a), GpuStorage::BF16(b)) => {
                d.copy(a, src_row * sc, b, dst_row * dc, n * sc)
            }
            (GpuStorage::I8(a), GpuStorage::I8(b)) => {
                d.copy(a, src_row * sc, b, dst_row * dc, n * sc)
            }
            (GpuStorage::I32(a), GpuStorage::I32(b)) => {
                d.copy(a, src_row * sc, b, dst_row * dc, n * sc)
            }
            (GpuStorage::U32(a), GpuStorage::U32(b)) => {
                d.copy(a, src_row * sc, b, dst_row * dc, n * sc)
            }
            _ => Err(Error::Shape(format!(
                "copy_rows: dtypes {} and {} differ",
                src.dtype, dst.dtype
            ))),
        }
    }

    fn embedding(&self, table: &T, ids: &T, out: &mut T) -> Result<()> {
        let op = "embedding";
        let (v, d) = table.rows_cols();
        let mut bad = self.dev.alloc_zeros::<i32>(1)?;
        ops::embedding::embedding(
            &self.dev,
            bf(op, "table", table)?,
            u32b(op, "ids", ids)?,
            bf_mut(op, "out", out)?,
            &mut bad,
            v,
            d,
        )
    }

    fn rmsnorm(&self, x: &T, weight: &T, eps: f32, out: &mut T) -> Result<()> {
        let op = "rmsnorm";
        let (rows, d) = x.rows_cols();
        ops::rmsnorm(
            &self.dev,
            bf(op, "x", x)?,
            f32b(op, "weight", weight)?,
            bf_mut(op, "out", out)?,
            rows,
            d,
            eps,
        )
    }

    fn linear(&self, x: &T, w: &Linear<Gpu>, out: &mut T) -> Result<()> {
        self.linear_impl(x, w, out)
    }

    /// One `linear_lora` without adapters or residuals: the activations of int8 layers are
    /// quantized once — the same bits as `linear` each.
    fn linear_many(&self, x: &T, ws: &[&Linear<Gpu>], outs: &mut [&mut T]) -> Result<()> {
        if ws.len() != outs.len() {
            return Err(Error::Shape(format!(
                "linear_many: {} layers but {} outputs",
                ws.len(),
                outs.len()
            )));
        }
        let mut projs: Vec<Projection<'_, Gpu>> = ws
            .iter()
            .zip(outs.iter_mut())
            .map(|(w, out)| Projection {
                w,
                lora: None,
                residual: None,
                out: &mut **out,
            })
            .collect();
        self.linear_lora(x, &mut projs)
    }

    /// Int8 layers with one outlier threshold, past the decode sizes: the activations are
    /// quantized (and their outlier columns found) once, then per projection the LoRA
    /// down-projection, one GEMM with the residual (and, with `LoraUpPlace::Epilogue`, the LoRA
    /// up-projection) in its epilogue, and otherwise `lora_up_bf16` after it. Anything else (the
    /// GEMV sizes, bf16 weights) runs the separate passes.
    fn linear_lora(&self, x: &T, projs: &mut [Projection<'_, Gpu>]) -> Result<()> {
        let op = "linear_lora";
        let (rows, k) = x.rows_cols();
        let shared = rows > GEMV_MAX_ROWS
            && projs.iter().all(|p| {
                matches!(p.w.weight, LinearWeight::Int8 { .. })
                    && p.w.in_features == k
                    && p.w.outlier_threshold == projs[0].w.outlier_threshold
            });
        if projs.is_empty() || !shared {
            return linear_lora_unfused(self, x, projs);
        }
        let in_epilogue = match self.lora_up {
            Some(p) => p,
            None => LoraUpPlace::from_env()?,
        } == LoraUpPlace::Epilogue;
        let xb = bf(op, "x", x)?;
        let mut scratch = Int8Scratch::new(&self.dev, rows, k)?;
        ops::w8a8::quantize_activations(
            &self.dev,
            xb,
            rows,
            k,
            projs[0].w.outlier_threshold,
            &mut scratch,
        )?;
        for p in projs.iter_mut() {
            let w = p.w;
            let LinearWeight::Int8 { w: q, scale } = &w.weight else {
                return Err(Error::Shape(format!("{op}: a layer is not int8")));
            };
            if p.out.numel() != rows * w.out_features {
                return Err(Error::Shape(format!(
                    "{op}: x {:?} and out {:?} for a {}→{} layer",
                    x.shape, p.out.shape, w.in_features, w.out_features
                )));
            }
            // The down-projection first (h, u), checked against the layer before it writes.
            let lora = match p.lora.as_mut() {
                Some(l) => {
                    let v = lora_view(op, l.lora, k)?;
                    if v.n != w.out_features {
                        return Err(Error::Shape(format!(
                            "{op}: LoRA B {:?} for a {}→{} layer",
                            l.lora.b.shape, w.in_features, w.out_features
                        )));
                    }
                    ops::lora::lora_down(
                        &self.dev,
                        xb,
                        &v,
                        f32b(op, "gate", l.gate)?,
                        l.dropout,
                        f32b_mut(op, "h", l.h)?,
                        f32b_mut(op, "u", l.u)?,
                        rows,
                    )?;
                    Some((v, f32b(op, "u", l.u)?))
                }
                None => None,
            };
            let residual = match p.residual {
                Some(r) => Some(bf(op, "residual", r)?),
                None => None,
            };
            let fused = match &lora {
                Some((v, u)) if in_epilogue => Some(ops::w8a8::LoraUp {
                    u,
                    b: v.b,
                    rank: v.rank,
                    scale: v.scale,
                }),
                _ => None,
            };
            let out = bf_mut(op, "out", p.out)?;
            ops::w8a8::linear_w8a8_quantized(
                &self.dev,
                xb,
                rows,
                k,
                i8b(op, "weight", q)?,
                f32b(op, "scale", scale)?,
                w.out_features,
                &scratch,
                fused,
                residual,
                out,
                None,
            )?;
            if let (Some((v, u)), false) = (&lora, in_epilogue) {
                ops::lora::lora_up(&self.dev, u, v, out, rows)?;
            }
        }
        Ok(())
    }

    fn rope(&self, x: &mut T, positions: &T, theta: f32, inverse: bool) -> Result<()> {
        let op = "rope";
        if x.shape.len() != 3 {
            return Err(Error::Shape(format!(
                "{op}: x must be [T, heads, head_dim], got {:?}",
                x.shape
            )));
        }
        let (t, h, hd) = (x.shape[0], x.shape[1], x.shape[2]);
        let pos = u32b(op, "positions", positions)?;
        ops::rope::rope(
            &self.dev,
            bf_mut(op, "x", x)?,
            pos,
            t,
            h,
            hd,
            theta,
            inverse,
        )
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
        let (_, _, cache_slots) = check_kv_rows(op, k, v, slots, host_slots, k_cache, v_cache)?;
        let shape = slot_shape(k_cache, cache_slots);
        ops::paged::kv_write(
            &self.dev,
            bf(op, "k", k)?,
            bf(op, "v", v)?,
            u32b(op, "slots", slots)?,
            host_slots,
            shape,
            bf_mut(op, "k_cache", k_cache)?,
            bf_mut(op, "v_cache", v_cache)?,
        )
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
        let (_, _, cache_slots) = check_kv_rows(op, k, v, slots, host_slots, k_cache, v_cache)?;
        let shape = slot_shape(k_cache, cache_slots);
        ops::paged::kv_gather(
            &self.dev,
            bf(op, "k_cache", k_cache)?,
            bf(op, "v_cache", v_cache)?,
            u32b(op, "slots", slots)?,
            host_slots,
            shape,
            bf_mut(op, "k", k)?,
            bf_mut(op, "v", v)?,
        )
    }

    fn copy_rows_within(&self, t: &mut T, src_row: usize, dst_row: usize, n: usize) -> Result<()> {
        let (_, rc) = t.outer_rows();
        let (a, b, len) = (src_row * rc, dst_row * rc, n * rc);
        let d = &self.dev;
        match &mut t.storage {
            GpuStorage::F32(x) => d.copy_within(x, a, b, len),
            GpuStorage::BF16(x) => d.copy_within(x, a, b, len),
            GpuStorage::I8(x) => d.copy_within(x, a, b, len),
            GpuStorage::I32(x) => d.copy_within(x, a, b, len),
            GpuStorage::U32(x) => d.copy_within(x, a, b, len),
        }
    }

    fn paged_attention(
        &self,
        q: &T,
        k_cache: &T,
        v_cache: &T,
        batch: &PagedBatch<'_, Gpu>,
        out: &mut T,
    ) -> Result<()> {
        let op = "paged_attention";
        let (heads, kv_heads, head_dim, slots) =
            check_paged_attention(q, k_cache, v_cache, batch, out)?;
        if !slots.is_multiple_of(batch.block_size) {
            return Err(Error::Shape(format!(
                "{op}: a cache of {slots} slots is not whole blocks of {}",
                batch.block_size
            )));
        }
        let shape = ops::paged::PagedShape {
            num_blocks: slots / batch.block_size,
            block_size: batch.block_size,
            kv_heads,
            head_dim,
        };
        let db = ops::paged::DecodeBatch {
            block_tables: i32b(op, "block_tables", batch.block_tables)?,
            max_blocks: batch.max_blocks,
            context_lens: i32b(op, "context_lens", batch.context_lens)?,
            host_context_lens: batch.host_context_lens,
            queries: batch.queries,
        };
        let longest = batch.host_context_lens.iter().max().copied().unwrap_or(0) as usize;
        let need = ops::paged::paged_decode_scratch_len(
            batch.host_context_lens.len(),
            batch.queries,
            heads,
            head_dim,
            longest,
        );
        let mut scratch = if need > 0 {
            Some(self.dev.alloc_uninit::<f32>(need)?)
        } else {
            None
        };
        ops::paged::paged_decode(
            &self.dev,
            bf(op, "q", q)?,
            bf(op, "k_cache", k_cache)?,
            bf(op, "v_cache", v_cache)?,
            shape,
            heads,
            &db,
            scratch.as_mut(),
            bf_mut(op, "out", out)?,
        )
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
        let shape = attn_shape("attention", q, k)?;
        let mut lse = self.dev.alloc_zeros::<f32>(shape.tq * shape.heads)?;
        self.attention_into("attention", q, k, v, positions, spans, out, &mut lse)
    }

    fn attention_saving(
        &self,
        q: &T,
        k: &T,
        v: &T,
        positions: &T,
        spans: &[SeqSpan],
        out: &mut T,
        saved: &mut T,
    ) -> Result<()> {
        let op = "attention_saving";
        let lse = f32b_mut(op, "saved", saved)?;
        self.attention_into(op, q, k, v, positions, spans, out, lse)
    }

    fn swiglu(&self, gate: &T, up: &T, out: &mut T) -> Result<()> {
        let op = "swiglu";
        ops::swiglu::swiglu(
            &self.dev,
            bf(op, "gate", gate)?,
            bf(op, "up", up)?,
            bf_mut(op, "out", out)?,
        )
    }

    fn add_assign(&self, x: &mut T, y: &T) -> Result<()> {
        let op = "add_assign";
        if x.dtype == DType::F32 {
            let yf = f32b(op, "y", y)?;
            return ops::elementwise::add(&self.dev, f32b_mut(op, "x", x)?, yf);
        }
        let yb = bf(op, "y", y)?;
        ops::elementwise::add(&self.dev, bf_mut(op, "x", x)?, yb)
    }

    fn lora_forward(
        &self,
        x: &T,
        lora: &Lora<Gpu>,
        gate: &T,
        dropout: Dropout,
        h: &mut T,
        u: &mut T,
        y: &mut T,
    ) -> Result<()> {
        let op = "lora_forward";
        let (m, k) = x.rows_cols();
        let view = lora_view(op, lora, k)?;
        ops::lora::lora_down(
            &self.dev,
            bf(op, "x", x)?,
            &view,
            f32b(op, "gate", gate)?,
            dropout,
            f32b_mut(op, "h", h)?,
            f32b_mut(op, "u", u)?,
            m,
        )?;
        ops::lora::lora_up(&self.dev, f32b(op, "u", u)?, &view, bf_mut(op, "y", y)?, m)
    }

    fn lora_backward(
        &self,
        x: &T,
        lora: &Lora<Gpu>,
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
        let (m, k) = x.rows_cols();
        let view = lora_view(op, lora, k)?;
        let mut dh = self.dev.alloc_zeros::<f32>(m * view.rank)?;
        let grads = ops::lora::LoraGrads {
            da: f32b_mut(op, "da", da)?,
            db: f32b_mut(op, "db", db)?,
            dgate: f32b_mut(op, "dgate", dgate)?,
            dh: &mut dh,
            dx: bf_mut(op, "dx", dx)?,
        };
        ops::lora::lora_backward(
            &self.dev,
            bf(op, "x", x)?,
            &view,
            f32b(op, "gate", gate)?,
            dropout,
            f32b(op, "h", h)?,
            f32b(op, "u", u)?,
            bf(op, "dy", dy)?,
            grads,
            m,
        )
    }

    fn lora_sample_grad_sq_norms(
        &self,
        x: &T,
        lora: &Lora<Gpu>,
        gate: &T,
        h: &T,
        u: &T,
        dy: &T,
        samples: &[(usize, usize)],
    ) -> Result<Vec<f32>> {
        let op = "lora_sample_grad_sq_norms";
        let (_, k) = x.rows_cols();
        let view = lora_view(op, lora, k)?;
        // The scratch holds one sample's dA and dB at a time (ops::lora).
        let longest = samples.iter().map(|s| s.1).max().unwrap_or(0);
        let mut scratch =
            ops::lora::SampleNormScratch::new(&self.dev, &view, longest, samples.len())?;
        ops::lora::sample_grad_sq_norms(
            &self.dev,
            bf(op, "x", x)?,
            &view,
            f32b(op, "gate", gate)?,
            f32b(op, "h", h)?,
            f32b(op, "u", u)?,
            bf(op, "dy", dy)?,
            samples,
            &mut scratch,
        )
    }

    fn cross_entropy(
        &self,
        logits: &mut T,
        labels: &T,
        grad_scale: f32,
        loss: &mut T,
    ) -> Result<()> {
        let op = "cross_entropy";
        let (rows, vocab) = logits.rows_cols();
        let lb = u32b(op, "labels", labels)?;
        let lo = f32b_mut(op, "loss", loss)?;
        match &mut logits.storage {
            GpuStorage::F32(x) => {
                ops::loss::cross_entropy(&self.dev, x, lb, grad_scale, lo, rows, vocab)
            }
            GpuStorage::BF16(x) => {
                ops::loss::cross_entropy(&self.dev, x, lb, grad_scale, lo, rows, vocab)
            }
            _ => Err(Error::Shape(format!(
                "{op}: logits have dtype {}",
                logits.dtype
            ))),
        }
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
        let g = f32b(op, "grad", grad)?;
        let (mb, vb) = (f32b_mut(op, "m", m)?, f32b_mut(op, "v", v)?);
        ops::optim::adamw(
            &self.dev,
            f32b_mut(op, "param", param)?,
            g,
            mb,
            vb,
            hp,
            step,
            grad_scale,
        )
    }

    fn sample(
        &self,
        logits: &T,
        params: &[crate::backend::SamplingParams],
        uniforms: &[f32],
    ) -> Result<Vec<u32>> {
        let op = "sample";
        let (rows, vocab) = logits.rows_cols();
        let x = f32b(op, "logits", logits)?;
        let packed = ops::sampling::pack_params(rows, params, uniforms)?;
        let packed = self.dev.upload(&packed)?;
        let mut tokens = self.dev.alloc_zeros::<u32>(rows)?;
        ops::sampling::sample(&self.dev, x, &packed, &mut tokens, rows, vocab)?;
        let tokens = self.dev.download(&tokens)?;
        match tokens
            .iter()
            .position(|&t| t == crate::backend::sampling::BAD_ROW)
        {
            Some(b) => Err(crate::backend::sampling::bad_row_error(b)),
            None => Ok(tokens),
        }
    }

    fn token_logprobs(&self, logits: &T, ids: &[u32]) -> Result<Vec<f32>> {
        let (rows, vocab, _) = crate::backend::check_logprob_ids(logits, ids)?;
        let x = f32b("token_logprobs", "logits", logits)?;
        let dev_ids = self.dev.upload(ids)?;
        let mut out = self.dev.alloc_zeros::<f32>(ids.len())?;
        ops::sampling::token_logprobs(&self.dev, x, &dev_ids, &mut out, rows, vocab)?;
        self.dev.download(&out)
    }

    fn sum_squares(&self, x: &T, out: &mut T) -> Result<()> {
        let op = "sum_squares";
        let mut ws = self
            .dev
            .alloc_zeros::<f32>(ops::optim::SUM_SQUARES_BLOCKS)?;
        ops::optim::sum_squares(
            &self.dev,
            f32b(op, "x", x)?,
            &mut ws,
            f32b_mut(op, "out", out)?,
        )
    }

    fn convert(&self, x: &T, out: &mut T) -> Result<()> {
        use ops::elementwise::convert;
        if x.numel() != out.numel() {
            return Err(Error::Shape(format!(
                "convert: x {:?} and out {:?} differ in size",
                x.shape, out.shape
            )));
        }
        match (&x.storage, &mut out.storage) {
            (GpuStorage::F32(a), GpuStorage::BF16(b)) => {
                convert(&self.dev, "convert_f32_bf16", a, b)
            }
            (GpuStorage::BF16(a), GpuStorage::F32(b)) => {
                convert(&self.dev, "convert_bf16_f32", a, b)
            }
            (GpuStorage::F32(a), GpuStorage::F32(b)) => self.dev.copy(a, 0, b, 0, a.len()),
            (GpuStorage::BF16(a), GpuStorage::BF16(b)) => self.dev.copy(a, 0, b, 0, a.len()),
            _ => Err(Error::Shape(format!(
                "convert: {} → {} is not supported",
                x.dtype, out.dtype
            ))),
        }
    }

    fn embedding_backward(&self, dy: &T, ids: &T, dtable: &mut T) -> Result<()> {
        let op = "embedding_backward";
        let (v, d) = dtable.rows_cols();
        ops::embedding::embedding_backward(
            &self.dev,
            bf(op, "dy", dy)?,
            u32b(op, "ids", ids)?,
            f32b_mut(op, "dtable", dtable)?,
            v,
            d,
        )
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
        let (rows, d) = x.rows_cols();
        ops::rmsnorm_backward(
            &self.dev,
            bf(op, "x", x)?,
            f32b(op, "weight", weight)?,
            bf(op, "dy", dy)?,
            bf_mut(op, "dx", dx)?,
            rows,
            d,
            eps,
            accumulate,
        )
    }

    fn linear_backward_input(
        &self,
        dy: &T,
        w: &Linear<Gpu>,
        dx: &mut T,
        accumulate: bool,
    ) -> Result<()> {
        let op = "linear_backward_input";
        let (rows, n) = dy.rows_cols();
        match &w.weight {
            LinearWeight::Int8 { w: q, scale } => ops::w8a16::linear_backward_input(
                &self.dev,
                bf(op, "dy", dy)?,
                i8b(op, "weight", q)?,
                f32b(op, "scale", scale)?,
                bf_mut(op, "dx", dx)?,
                rows,
                n,
                w.in_features,
                accumulate,
                None,
            ),
            LinearWeight::Dense(d) => ops::w8a16::dense_backward_input(
                &self.dev,
                bf(op, "dy", dy)?,
                bf(op, "weight", d)?,
                bf_mut(op, "dx", dx)?,
                rows,
                n,
                w.in_features,
                accumulate,
                None,
            ),
        }
    }

    fn swiglu_backward(&self, gate: &T, up: &T, dy: &T, dgate: &mut T, dup: &mut T) -> Result<()> {
        let op = "swiglu_backward";
        let dgb = bf_mut(op, "dgate", dgate)?;
        ops::swiglu::swiglu_backward(
            &self.dev,
            bf(op, "gate", gate)?,
            bf(op, "up", up)?,
            bf(op, "dy", dy)?,
            dgb,
            bf_mut(op, "dup", dup)?,
        )
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
        let x = attn_inputs(op, q, k, v, positions, spans)?;
        let mut span_buf = self.dev.alloc_zeros::<i32>(4 * spans.len())?;
        let mut scratch = ops::attention::AttnGradScratch::new(&self.dev, x.shape)?;
        let g = attn_grads(op, dy, dq, dk, dv)?;
        ops::attention::attention_backward(&self.dev, &x, &mut span_buf, g, &mut scratch)
    }

    fn attention_backward_saved(
        &self,
        q: &T,
        k: &T,
        v: &T,
        positions: &T,
        spans: &[SeqSpan],
        o: &T,
        saved: &T,
        dy: &T,
        dq: &mut T,
        dk: &mut T,
        dv: &mut T,
    ) -> Result<()> {
        let op = "attention_backward_saved";
        let x = attn_inputs(op, q, k, v, positions, spans)?;
        if !ops::attention::tiled_head_dim(x.shape.head_dim) {
            // The per-row kernels recompute inside the backward kernel itself.
            return self.attention_backward(q, k, v, positions, spans, dy, dq, dk, dv);
        }
        let mut span_buf = self.dev.alloc_zeros::<i32>(4 * spans.len())?;
        let mut scratch = ops::attention::AttnGradScratch::reusing_forward(&self.dev, x.shape)?;
        let (o, lse) = (bf(op, "o", o)?, f32b(op, "saved", saved)?);
        let g = attn_grads(op, dy, dq, dk, dv)?;
        ops::attention::attention_backward_saved(
            &self.dev,
            &x,
            &mut span_buf,
            o,
            lse,
            g,
            &mut scratch,
        )
    }
}
