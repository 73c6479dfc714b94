//! The LLaMA model on a backend: weights loaded from any `ModelSource` (frozen linears
//! quantized to int8 per output row, DESIGN.md §3), and the forward pass with a KV cache.

use std::collections::BTreeMap;

use super::config::LlamaConfig;
use super::lora::Target;
use super::source::ModelSource;
use crate::backend::cpu::quantize_rows;
use crate::backend::{
    Backend, BlockTables, Dropout, Linear, LinearWeight, Lora, LoraPass, PagedBatch, Projection,
    SeqSpan, Tensor,
};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor};

/// LoRA adapters the inference forward applies, by (layer, target): A `[r, in]`, B `[out, r]`
/// and the scale of each, lent by their owner (e.g. `train::DevAdapter`). Every adapted
/// projection adds `scale · (x · Aᵀ) · Bᵀ` to its output, without dropout — what the training
/// forward computes in evaluation.
pub struct AdapterView<'a, B: Backend> {
    pub rank: usize,
    pub layers: BTreeMap<(usize, Target), &'a Lora<B>>,
    /// For a stack of adapters (`model::lora::stack`): where each sits among the ranks, so
    /// batched generation can gate every row to its request's adapter. Empty: one adapter.
    pub blocks: Vec<crate::model::lora::RankBlock>,
}

/// One projection of [`project`]: the weight, its adapter if any, and the output.
type ProjectionItem<'a, B> = (&'a Linear<B>, Option<&'a Lora<B>>, &'a mut Tensor<B>);

/// `x`'s projections: without adapters one `Backend::linear_many` call (the path of a model
/// with none), else one `Backend::linear_lora` call, each projection with its adapter where it
/// has one (`scratch` lends the h and u buffers of the adapted ones, `ones` the gate).
fn project<B: Backend>(
    be: &B,
    x: &Tensor<B>,
    items: Vec<ProjectionItem<'_, B>>,
    scratch: &mut [(Tensor<B>, Tensor<B>)],
    ones: Option<&Tensor<B>>,
) -> Result<()> {
    if items.iter().all(|(_, lora, _)| lora.is_none()) {
        let ws: Vec<&Linear<B>> = items.iter().map(|(w, _, _)| *w).collect();
        let mut outs: Vec<&mut Tensor<B>> = items.into_iter().map(|(_, _, o)| o).collect();
        return be.linear_many(x, &ws, &mut outs);
    }
    let ones = ones.ok_or_else(|| Error::Invalid("forward: an adapter without its gate".into()))?;
    let mut sc = scratch.iter_mut();
    let mut projs = Vec::with_capacity(items.len());
    for (w, lora, out) in items {
        let lora = match lora {
            Some(lora) => {
                let (h, u) = sc.next().ok_or_else(|| {
                    Error::Invalid("forward: too few LoRA scratch buffers".into())
                })?;
                Some(LoraPass {
                    lora,
                    gate: ones,
                    dropout: Dropout::NONE,
                    h,
                    u,
                })
            }
            None => None,
        };
        projs.push(Projection {
            w,
            lora,
            residual: None,
            out,
        });
    }
    be.linear_lora(x, &mut projs)
}

#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Quantize the frozen linears (q, k, v, o, gate, up, down) to int8; false keeps them in f32
    /// (the reference the int8 error bound is measured against).
    pub int8: bool,
    /// LLM.int8 outlier threshold for the activations (0 disables the decomposition).
    pub outlier_threshold: f32,
}

/// The outlier threshold as the loaders accept it: a number ≥ 0. The kernels decompose only
/// when `threshold > 0`, so a negative or NaN value would silently turn LLM.int8's outlier path
/// off instead of meaning anything; it is refused by name instead.
pub fn check_outlier_threshold(threshold: f32) -> Result<()> {
    if threshold.is_nan() || threshold < 0.0 {
        return Err(Error::Invalid(format!(
            "the LLM.int8 outlier threshold must be a number ≥ 0 (0 turns the decomposition off), got {threshold}"
        )));
    }
    Ok(())
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            int8: true,
            outlier_threshold: 6.0,
        }
    }
}

pub struct Layer<B: Backend> {
    pub attn_norm: Tensor<B>,
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    pub ffn_norm: Tensor<B>,
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
}

pub struct Llama<B: Backend> {
    pub config: LlamaConfig,
    /// The token embedding `[V, D]`, kept in its own precision; also the output head when tied.
    pub embed: Linear<B>,
    pub layers: Vec<Layer<B>>,
    pub norm: Tensor<B>,
    pub lm_head: Option<Linear<B>>,
}

/// Per-layer K and V `[capacity, kv_heads, head_dim]` of one sequence.
pub struct KvCache<B: Backend> {
    pub k: Vec<Tensor<B>>,
    pub v: Vec<Tensor<B>>,
    pub len: usize,
    pub capacity: usize,
}

/// Queries of one sequence above which [`Llama::forward_paged`] gathers its K/V and runs the
/// flash attention instead of the paged decode kernel (which serves 8 query rows per block and
/// reads the sequence's K/V once per block).
pub const GATHER_ABOVE_QUERIES: usize = 32;

/// Most slots (token rows) a paged KV cache may have: slot ids and block numbers travel as
/// 32-bit integers, and a billion tokens of K/V is past any device.
pub const MAX_CACHE_SLOTS: usize = 1 << 30;

/// Checks a paged cache's size: at least one block of at least one token, at most
/// [`MAX_CACHE_SLOTS`] slots.
pub fn check_cache_size(num_blocks: usize, block_size: usize) -> Result<usize> {
    match num_blocks.checked_mul(block_size) {
        Some(slots) if slots > 0 && slots <= MAX_CACHE_SLOTS => Ok(slots),
        _ => Err(Error::Invalid(format!(
            "a paged KV cache of {num_blocks} blocks of {block_size} tokens: it needs at least one \
             block of one token and at most {MAX_CACHE_SLOTS} tokens in all"
        ))),
    }
}

/// The sequences' K/V gathered from the paged cache, one after another, for the flash attention
/// of a prefill through the block tables (one long one, or several of different lengths).
struct Gathered<B: Backend> {
    slots: Tensor<B>,
    host_slots: Vec<u32>,
    k: Tensor<B>,
    v: Tensor<B>,
    spans: Vec<SeqSpan>,
}

/// Per-layer K and V of a paged cache, `[num_blocks · block_size, kv_heads, head_dim]`; which
/// blocks hold which sequence is `infer::paged::PagedKv`'s business.
pub struct PagedCache<B: Backend> {
    pub k: Vec<Tensor<B>>,
    pub v: Vec<Tensor<B>>,
    pub num_blocks: usize,
    pub block_size: usize,
}

/// How a [`Llama::forward_paged`] step's attention reads K/V.
pub enum PagedAttention<'a> {
    /// Sequences with nothing cached before these tokens: each span's queries attend to the
    /// step's own K/V rows (the flash attention of a prefill).
    Fresh(&'a [SeqSpan]),
    /// `queries[i]` new tokens of sequence i (rows in sequence order), attending through the
    /// block tables to everything cached, these tokens included.
    Cached(CachedAttention<'a>),
}

pub struct CachedAttention<'a> {
    /// `[sequences, max_blocks]` block numbers, padded with 0.
    pub block_tables: &'a [i32],
    pub max_blocks: usize,
    /// Tokens in the cache per sequence, the new ones included.
    pub context_lens: &'a [i32],
    /// New tokens per sequence (the step's rows, sequence after sequence). The same number
    /// of at most [`GATHER_ABOVE_QUERIES`] for every sequence (a decode step) runs the paged
    /// decode kernel; otherwise (a prefill of one long or several different sequences) their
    /// K/V is gathered for the flash attention.
    pub queries: &'a [usize],
}

impl CachedAttention<'_> {
    /// True when the step runs the paged decode kernel rather than gathering K/V.
    pub fn reads_through_tables(&self) -> bool {
        self.queries
            .first()
            .is_some_and(|&q| q <= GATHER_ABOVE_QUERIES && self.queries.iter().all(|&x| x == q))
    }
}

/// `attend(layer, q, k, v, out)` of [`Llama::forward_logits_with`] and
/// [`Llama::forward_paged`]: stores the layer's K/V and computes its attention (q and k after
/// RoPE).
type Attend<'a, B> =
    dyn FnMut(usize, &Tensor<B>, &Tensor<B>, &Tensor<B>, &mut Tensor<B>) -> Result<()> + 'a;

/// One step of [`Llama::forward_paged`]: the new tokens of one or several sequences, their
/// positions and cache slots, how attention reads the cache, and which rows want logits.
pub struct PagedStep<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    pub slots: &'a [u32],
    pub attention: PagedAttention<'a>,
    pub logit_rows: &'a [usize],
    /// The adapter's LoRA gate for these rows, `[tokens, rank]` f32 row-major (None: all ones,
    /// plain LoRA): a stacked adapter's gate (`model::lora::StackedAdapter::gate`) lets each
    /// row apply its own adapter of the stack.
    pub lora_gate: Option<&'a [f32]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position of the chunk (scoring, tests).
    All,
}

fn dense<B: Backend>(be: &B, t: &HostTensor) -> Result<Linear<B>> {
    let (n, k) = (t.shape[0], t.shape[1]);
    Ok(Linear {
        weight: LinearWeight::Dense(be.upload(&t.to_dtype(be.activation_dtype())?)?),
        out_features: n,
        in_features: k,
        outlier_threshold: 0.0,
    })
}

/// A tensor of `src`, refused when it holds a NaN or an infinity: int8 quantization would
/// otherwise hide it (a NaN weight rounds to 0 and leaves its row's scale finite), and a
/// damaged file would answer as if it were whole.
fn finite_tensor(src: &dyn ModelSource, name: &str) -> Result<HostTensor> {
    use rayon::prelude::*;
    let t = src.tensor(name)?;
    let first_bad = match &t.data {
        HostData::F32(v) => v.par_iter().position_first(|x| !x.is_finite()),
        HostData::F16(v) => v.par_iter().position_first(|x| !x.is_finite()),
        HostData::BF16(v) => v.par_iter().position_first(|x| !x.is_finite()),
        HostData::I8(_) | HostData::I32(_) | HostData::U32(_) => None,
    };
    match first_bad {
        None => Ok(t),
        Some(i) => Err(Error::format(
            src.path(),
            format!(
                "tensor {name} {:?}: element {i} is not finite (NaN or infinite); the weights \
                 are damaged",
                t.shape
            ),
        )),
    }
}

fn frozen_linear<B: Backend>(be: &B, t: &HostTensor, opts: &LoadOptions) -> Result<Linear<B>> {
    let (n, k) = (t.shape[0], t.shape[1]);
    let w = t.to_f32()?;
    let weight = if opts.int8 {
        let (q, s) = quantize_rows(&w, n, k);
        LinearWeight::Int8 {
            w: be.upload(&HostTensor::new(vec![n, k], HostData::I8(q))?)?,
            scale: be.upload(&HostTensor::f32(vec![n], s)?)?,
        }
    } else {
        LinearWeight::Dense(
            be.upload(&HostTensor::f32(vec![n, k], w)?.to_dtype(be.activation_dtype())?)?,
        )
    };
    Ok(Linear {
        weight,
        out_features: n,
        in_features: k,
        outlier_threshold: opts.outlier_threshold,
    })
}

impl<B: Backend> Llama<B> {
    /// Load every tensor from `src` onto `be`, one tensor at a time (the f32 copy of a linear
    /// lives only while it is being quantized). Kept-precision matrices (embedding, head, f32
    /// linears) take the backend's activation dtype; norm weights stay f32.
    pub fn load(src: &dyn ModelSource, be: &B, opts: LoadOptions) -> Result<Self> {
        check_outlier_threshold(opts.outlier_threshold)?;
        let cfg = src.config().clone();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let t = |s: &str| finite_tensor(src, &format!("model.layers.{i}.{s}"));
                Ok(Layer {
                    attn_norm: be.upload(&t("input_layernorm.weight")?.to_dtype(DType::F32)?)?,
                    q: frozen_linear(be, &t("self_attn.q_proj.weight")?, &opts)?,
                    k: frozen_linear(be, &t("self_attn.k_proj.weight")?, &opts)?,
                    v: frozen_linear(be, &t("self_attn.v_proj.weight")?, &opts)?,
                    o: frozen_linear(be, &t("self_attn.o_proj.weight")?, &opts)?,
                    ffn_norm: be
                        .upload(&t("post_attention_layernorm.weight")?.to_dtype(DType::F32)?)?,
                    gate: frozen_linear(be, &t("mlp.gate_proj.weight")?, &opts)?,
                    up: frozen_linear(be, &t("mlp.up_proj.weight")?, &opts)?,
                    down: frozen_linear(be, &t("mlp.down_proj.weight")?, &opts)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(dense(be, &finite_tensor(src, "lm_head.weight")?)?)
        };
        Ok(Llama {
            embed: dense(be, &finite_tensor(src, "model.embed_tokens.weight")?)?,
            norm: be.upload(&finite_tensor(src, "model.norm.weight")?.to_dtype(DType::F32)?)?,
            layers,
            lm_head,
            config: cfg,
        })
    }

    pub fn new_cache(&self, be: &B, capacity: usize) -> Result<KvCache<B>> {
        let c = &self.config;
        let shape = [capacity, c.num_key_value_heads, c.head_dim];
        let dt = be.activation_dtype();
        let mut k = vec![];
        let mut v = vec![];
        for _ in 0..c.num_hidden_layers {
            k.push(be.zeros(&shape, dt)?);
            v.push(be.zeros(&shape, dt)?);
        }
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
        })
    }

    /// Run `tokens` (the next chunk of one sequence) through the model, appending their K/V to
    /// `cache`, and return logits `[rows, vocab]` as f32 on the host.
    pub fn forward(
        &self,
        be: &B,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        which: Logits,
    ) -> Result<HostTensor> {
        let logits = self.forward_logits(be, tokens, cache, which)?;
        let out = be.download(&logits)?;
        if out.dtype() == DType::F32 {
            Ok(out)
        } else {
            HostTensor::f32(out.shape.clone(), out.to_f32()?)
        }
    }

    /// As [`Llama::forward`], leaving the f32 logits `[rows, vocab]` on the backend (sampling
    /// reads them there and downloads only the token).
    pub fn forward_logits(
        &self,
        be: &B,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        which: Logits,
    ) -> Result<Tensor<B>> {
        self.forward_logits_with(be, tokens, cache, which, None)
    }

    /// [`Llama::forward_logits`] with LoRA adapters on the projections `adapter` names.
    pub fn forward_logits_with(
        &self,
        be: &B,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        which: Logits,
        adapter: Option<&AdapterView<'_, B>>,
    ) -> Result<Tensor<B>> {
        let t = tokens.len();
        if t == 0 {
            return Err(Error::Invalid("forward: no tokens".into()));
        }
        let start = cache.len;
        if start + t > cache.capacity {
            return Err(Error::Invalid(format!(
                "forward: {} tokens do not fit the KV cache ({} used of {})",
                t, start, cache.capacity
            )));
        }
        let positions: Vec<u32> = (start..start + t).map(|p| p as u32).collect();
        let pos = be.upload(&HostTensor::new(vec![t], HostData::U32(positions))?)?;
        let spans = [SeqSpan {
            q_start: 0,
            q_len: t,
            kv_start: 0,
            kv_len: start + t,
        }];
        let rows: Vec<usize> = match which {
            Logits::All => (0..t).collect(),
            Logits::Last => vec![t - 1],
        };
        let mut attend =
            |li: usize, q: &Tensor<B>, k: &Tensor<B>, v: &Tensor<B>, out: &mut Tensor<B>| {
                be.copy_rows(k, 0, &mut cache.k[li], start, t)?;
                be.copy_rows(v, 0, &mut cache.v[li], start, t)?;
                be.attention(q, &cache.k[li], &cache.v[li], &pos, &spans, out)
            };
        let logits = self.layer_stack(be, tokens, &pos, &rows, adapter, None, &mut attend)?;
        cache.len = start + t;
        logits.ok_or_else(|| Error::Invalid("forward: no logits rows".into()))
    }

    /// The forward of several sequences' new tokens over a paged KV cache (`infer::batch`):
    /// `step` says which tokens, where their K/V go and how attention reads the cache. Returns
    /// f32 logits `[step.logit_rows.len(), vocab]`, or None when no rows are asked for (a
    /// shared prefix whose K/V is all that is wanted).
    pub fn forward_paged(
        &self,
        be: &B,
        step: &PagedStep<'_>,
        cache: &mut PagedCache<B>,
        adapter: Option<&AdapterView<'_, B>>,
    ) -> Result<Option<Tensor<B>>> {
        let t = step.tokens.len();
        if t == 0 || step.positions.len() != t || step.slots.len() != t {
            return Err(Error::Invalid(format!(
                "forward_paged: {t} tokens with {} positions and {} slots",
                step.positions.len(),
                step.slots.len()
            )));
        }
        if let Some(&r) = step.logit_rows.iter().find(|&&r| r >= t) {
            return Err(Error::Invalid(format!(
                "forward_paged: logits of row {r} of {t}"
            )));
        }
        let pos = be.upload(&HostTensor::new(
            vec![t],
            HostData::U32(step.positions.to_vec()),
        )?)?;
        let slots = be.upload(&HostTensor::new(
            vec![t],
            HostData::U32(step.slots.to_vec()),
        )?)?;
        let block_size = cache.block_size;
        let cache_slots = cache.k.first().map_or(0, |k| k.shape[0]);
        if let PagedAttention::Cached(c) = &step.attention {
            let n = c.context_lens.len();
            if c.queries.len() != n
                || c.queries.contains(&0)
                || c.queries.iter().sum::<usize>() != t
            {
                return Err(Error::Invalid(format!(
                    "forward_paged: {t} tokens split as {:?} queries over {n} sequences",
                    c.queries
                )));
            }
        }
        // The paged decode kernel: device copies of the tables and lengths.
        let i32s =
            |v: &[i32]| be.upload(&HostTensor::new(vec![v.len()], HostData::I32(v.to_vec()))?);
        let (tables, lens) = match &step.attention {
            PagedAttention::Cached(c) if c.reads_through_tables() => {
                (Some(i32s(c.block_tables)?), Some(i32s(c.context_lens)?))
            }
            _ => (None, None),
        };
        let batch = match (&step.attention, &tables, &lens) {
            (PagedAttention::Cached(c), Some(t), Some(l)) => Some(PagedBatch {
                block_size,
                block_tables: t,
                context_lens: l,
                host_block_tables: c.block_tables,
                host_context_lens: c.context_lens,
                max_blocks: c.max_blocks,
                queries: c.queries[0],
            }),
            _ => None,
        };
        // A prefill through the block tables — one sequence with many queries, or several
        // with different numbers — gathers the sequences' K/V into contiguous rows once per
        // layer and runs the flash attention over them: the paged decode kernel would read
        // them once per 8 query rows, and takes the same number of queries per sequence.
        let mut gather = match &step.attention {
            PagedAttention::Cached(c) if !c.reads_through_tables() => {
                let host = BlockTables {
                    block_size,
                    tables: c.block_tables,
                    max_blocks: c.max_blocks,
                    context_lens: c.context_lens,
                };
                host.check("forward_paged", |b| c.queries[b], cache_slots)?;
                let mut host_slots = vec![];
                let mut spans = Vec::with_capacity(c.queries.len());
                let mut q_start = 0;
                for (b, &q) in c.queries.iter().enumerate() {
                    let kv_start = host_slots.len();
                    host_slots.extend(host.sequence_slots(b));
                    spans.push(SeqSpan {
                        q_start,
                        q_len: q,
                        kv_start,
                        kv_len: host_slots.len() - kv_start,
                    });
                    q_start += q;
                }
                let len = host_slots.len();
                let c = &self.config;
                let dt = be.activation_dtype();
                let rows = [len, c.num_key_value_heads, c.head_dim];
                Some(Gathered {
                    slots: be.upload(&HostTensor::new(
                        vec![len],
                        HostData::U32(host_slots.clone()),
                    )?)?,
                    host_slots,
                    k: be.zeros(&rows, dt)?,
                    v: be.zeros(&rows, dt)?,
                    spans,
                })
            }
            _ => None,
        };
        let mut attend =
            |li: usize, q: &Tensor<B>, k: &Tensor<B>, v: &Tensor<B>, out: &mut Tensor<B>| {
                be.kv_write(k, v, &slots, step.slots, &mut cache.k[li], &mut cache.v[li])?;
                let (kc, vc) = (&cache.k[li], &cache.v[li]);
                match (&step.attention, &batch, gather.as_mut()) {
                    (PagedAttention::Fresh(spans), _, _) => be.attention(q, k, v, &pos, spans, out),
                    (PagedAttention::Cached(_), _, Some(g)) => {
                        be.kv_gather(kc, vc, &g.slots, &g.host_slots, &mut g.k, &mut g.v)?;
                        be.attention(q, &g.k, &g.v, &pos, &g.spans, out)
                    }
                    (PagedAttention::Cached(_), Some(b), None) => {
                        be.paged_attention(q, kc, vc, b, out)
                    }
                    (PagedAttention::Cached(_), None, None) => {
                        unreachable!("cached attention has its tables")
                    }
                }
            };
        self.layer_stack(
            be,
            step.tokens,
            &pos,
            step.logit_rows,
            adapter,
            step.lora_gate,
            &mut attend,
        )
    }

    /// A paged KV cache for this model: per layer K and V `[num_blocks · block_size, kv_heads,
    /// head_dim]` in the activation dtype (`infer::paged::PagedKv` hands out the blocks).
    pub fn new_paged_cache(
        &self,
        be: &B,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<PagedCache<B>> {
        let c = &self.config;
        let slots = check_cache_size(num_blocks, block_size)?;
        let shape = [slots, c.num_key_value_heads, c.head_dim];
        let dt = be.activation_dtype();
        let (mut k, mut v) = (vec![], vec![]);
        for _ in 0..c.num_hidden_layers {
            k.push(be.zeros(&shape, dt)?);
            v.push(be.zeros(&shape, dt)?);
        }
        Ok(PagedCache {
            k,
            v,
            num_blocks,
            block_size,
        })
    }

    /// Embedding, the decoder layers and the final norm over `tokens` (at positions `pos`), with `attend(layer, q, k, v, out)` storing K/V and computing the
    /// attention (q and k after RoPE); then the head over `logit_rows` (None when empty).
    #[allow(clippy::too_many_arguments)]
    fn layer_stack(
        &self,
        be: &B,
        tokens: &[u32],
        pos: &Tensor<B>,
        logit_rows: &[usize],
        adapter: Option<&AdapterView<'_, B>>,
        lora_gate: Option<&[f32]>,
        attend: &mut Attend<'_, B>,
    ) -> Result<Option<Tensor<B>>> {
        let c = &self.config;
        let t = tokens.len();
        let dt = be.activation_dtype();
        let (d, hd, h, kvh) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
        );
        let eps = c.rms_norm_eps as f32;
        let theta = c.rope_theta as f32;
        let ids = be.upload(&HostTensor::new(vec![t], HostData::U32(tokens.to_vec()))?)?;
        let LinearWeight::Dense(table) = &self.embed.weight else {
            return Err(Error::Invalid("the embedding table must be dense".into()));
        };
        let mut x = be.zeros(&[t, d], dt)?;
        be.embedding(table, &ids, &mut x)?;
        let mut hbuf = be.zeros(&[t, d], dt)?;
        let mut q = be.zeros(&[t, h * hd], dt)?;
        let mut k = be.zeros(&[t, kvh * hd], dt)?;
        let mut v = be.zeros(&[t, kvh * hd], dt)?;
        let mut attn = be.zeros(&[t, h, hd], dt)?;
        let mut proj = be.zeros(&[t, d], dt)?;
        let f = c.intermediate_size;
        let mut g = be.zeros(&[t, f], dt)?;
        let mut u = be.zeros(&[t, f], dt)?;
        let mut a = be.zeros(&[t, f], dt)?;
        // An adapter's buffers: h and u `[t, r]` for up to three projections of one input, and
        // the gate: all ones (plain LoRA) unless the caller gave one.
        let (mut scratch, ones) = match adapter {
            Some(ad) => {
                let r = ad.rank;
                let gate = match lora_gate {
                    Some(g) if g.len() != t * r => {
                        return Err(Error::Shape(format!(
                            "forward: a LoRA gate of {} values for {t} rows of rank {r}",
                            g.len()
                        )))
                    }
                    Some(g) => g.to_vec(),
                    None => vec![1.0; t * r],
                };
                let mut sc = Vec::with_capacity(3);
                for _ in 0..3 {
                    sc.push((
                        be.zeros(&[t, r], DType::F32)?,
                        be.zeros(&[t, r], DType::F32)?,
                    ));
                }
                let ones = be.upload(&HostTensor::f32(vec![t, r], gate)?)?;
                (sc, Some(ones))
            }
            None => (Vec::new(), None),
        };
        for (li, l) in self.layers.iter().enumerate() {
            let lora = |tg: Target| adapter.and_then(|ad| ad.layers.get(&(li, tg)).copied());
            be.rmsnorm(&x, &l.attn_norm, eps, &mut hbuf)?;
            let qkv = vec![
                (&l.q, lora(Target::Q), &mut q),
                (&l.k, lora(Target::K), &mut k),
                (&l.v, lora(Target::V), &mut v),
            ];
            project(be, &hbuf, qkv, &mut scratch, ones.as_ref())?;
            q.shape = vec![t, h, hd];
            k.shape = vec![t, kvh, hd];
            v.shape = vec![t, kvh, hd];
            be.rope(&mut q, pos, theta, false)?;
            be.rope(&mut k, pos, theta, false)?;
            attend(li, &q, &k, &v, &mut attn)?;
            q.shape = vec![t, h * hd];
            k.shape = vec![t, kvh * hd];
            v.shape = vec![t, kvh * hd];
            attn.shape = vec![t, h * hd];
            let o = vec![(&l.o, lora(Target::O), &mut proj)];
            project(be, &attn, o, &mut scratch, ones.as_ref())?;
            attn.shape = vec![t, h, hd];
            be.add_assign(&mut x, &proj)?;
            be.rmsnorm(&x, &l.ffn_norm, eps, &mut hbuf)?;
            let gate_up = vec![
                (&l.gate, lora(Target::Gate), &mut g),
                (&l.up, lora(Target::Up), &mut u),
            ];
            project(be, &hbuf, gate_up, &mut scratch, ones.as_ref())?;
            be.swiglu(&g, &u, &mut a)?;
            let down = vec![(&l.down, lora(Target::Down), &mut proj)];
            project(be, &a, down, &mut scratch, ones.as_ref())?;
            be.add_assign(&mut x, &proj)?;
        }
        if logit_rows.is_empty() {
            return Ok(None);
        }
        be.rmsnorm(&x, &self.norm, eps, &mut hbuf)?;
        let rows = logit_rows.len();
        let every_row = rows == t && logit_rows.iter().enumerate().all(|(i, &r)| i == r);
        let sel = if every_row {
            hbuf
        } else {
            let mut sel = be.zeros(&[rows, d], dt)?;
            for (i, &r) in logit_rows.iter().enumerate() {
                be.copy_rows(&hbuf, r, &mut sel, i, 1)?;
            }
            sel
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        // Logits in f32 on every backend: scoring compares log-probabilities of close tokens.
        let mut logits = be.zeros(&[rows, c.vocab_size], DType::F32)?;
        be.linear(&sel, head, &mut logits)?;
        Ok(Some(logits))
    }
}
