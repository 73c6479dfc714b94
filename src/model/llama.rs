//! The LLaMA model on a backend: weights loaded from any `ModelSource` (frozen linears
//! quantized to int8 per output row, DESIGN.md §3), and the forward pass with a KV cache.

use std::collections::BTreeMap;

use super::config::LlamaConfig;
use super::lora::Target;
use super::source::ModelSource;
use crate::backend::cpu::quantize_rows;
use crate::backend::{
    Backend, Dropout, Linear, LinearWeight, Lora, LoraPass, Projection, SeqSpan, Tensor,
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
        let cfg = src.config().clone();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let t = |s: &str| src.tensor(&format!("model.layers.{i}.{s}"));
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
            Some(dense(be, &src.tensor("lm_head.weight")?)?)
        };
        Ok(Llama {
            embed: dense(be, &src.tensor("model.embed_tokens.weight")?)?,
            norm: be.upload(&src.tensor("model.norm.weight")?.to_dtype(DType::F32)?)?,
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
        let c = &self.config;
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
        let positions: Vec<u32> = (start..start + t).map(|p| p as u32).collect();
        let pos = be.upload(&HostTensor::new(vec![t], HostData::U32(positions))?)?;
        let spans = [SeqSpan {
            q_start: 0,
            q_len: t,
            kv_start: 0,
            kv_len: start + t,
        }];

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
        // the all-ones gate of plain LoRA.
        let (mut scratch, ones) = match adapter {
            Some(ad) => {
                let r = ad.rank;
                let mut sc = Vec::with_capacity(3);
                for _ in 0..3 {
                    sc.push((
                        be.zeros(&[t, r], DType::F32)?,
                        be.zeros(&[t, r], DType::F32)?,
                    ));
                }
                let ones = be.upload(&HostTensor::f32(vec![t, r], vec![1.0; t * r])?)?;
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
            be.rope(&mut q, &pos, theta, false)?;
            be.rope(&mut k, &pos, theta, false)?;
            be.copy_rows(&k, 0, &mut cache.k[li], start, t)?;
            be.copy_rows(&v, 0, &mut cache.v[li], start, t)?;
            be.attention(&q, &cache.k[li], &cache.v[li], &pos, &spans, &mut attn)?;
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
        cache.len = start + t;
        be.rmsnorm(&x, &self.norm, eps, &mut hbuf)?;
        let (rows, first) = match which {
            Logits::All => (t, 0),
            Logits::Last => (1, t - 1),
        };
        let mut sel = be.zeros(&[rows, d], dt)?;
        be.copy_rows(&hbuf, first, &mut sel, 0, rows)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        // Logits in f32 on every backend: scoring compares log-probabilities of close tokens.
        let mut logits = be.zeros(&[rows, c.vocab_size], DType::F32)?;
        be.linear(&sel, head, &mut logits)?;
        Ok(logits)
    }
}
