//! One micro-batch through the LLaMA with LoRA adapters: the forward pass, the loss on the
//! labelled tokens, and the backward pass into the LoRA gradients — written once against the
//! `Backend` trait, so the CPU reference, the simulator and CUDA run the same code.
//!
//! Gradient checkpointing per layer: a recomputing layer keeps only its input `[T, D]` during the
//! forward pass and recomputes its activations just before its backward pass (all recomputing
//! layers share one set of buffers); the other layers keep their activations from the forward
//! pass. The first `recomputed` layers recompute — which ones does not change the memory, and
//! the memory plan chooses how many (`memory::auto_checkpointing`). The output head only ever sees the rows that carry a label
//! (for TALLRec a handful per sample), in chunks, so `[T × vocab]` logits never exist at once.

use std::collections::BTreeMap;

use crate::backend::{
    Backend, Dropout, Linear, LinearWeight, LoraPass, Projection, SeqSpan, Tensor, IGNORE_LABEL,
};
use crate::error::{Error, Result};
use crate::model::lora::Target;
use crate::model::Llama;
use crate::tensor::{DType, HostData, HostTensor};

use super::params::{DevAdapter, DevLoraParams};

/// A packed micro-batch: sequences laid end to end, each its own attention span.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// `labels[t]` is the token predicted at row t (the next token), or `IGNORE_LABEL`.
    pub labels: Vec<u32>,
    pub spans: Vec<SeqSpan>,
}

impl Batch {
    /// Pack `(tokens, labels)` sequences (labels aligned to tokens: the target of row t).
    pub fn pack<'a>(seqs: impl IntoIterator<Item = (&'a [u32], &'a [u32])>) -> Result<Batch> {
        let mut b = Batch::default();
        for (ids, labels) in seqs {
            if ids.is_empty() || ids.len() != labels.len() {
                return Err(Error::Invalid(format!(
                    "a training sequence has {} tokens and {} labels",
                    ids.len(),
                    labels.len()
                )));
            }
            let start = b.tokens.len();
            b.spans.push(SeqSpan {
                q_start: start,
                q_len: ids.len(),
                kv_start: start,
                kv_len: ids.len(),
            });
            b.tokens.extend_from_slice(ids);
            b.labels.extend_from_slice(labels);
            b.positions.extend((0..ids.len()).map(|p| p as u32));
        }
        if b.tokens.is_empty() {
            return Err(Error::Invalid("an empty micro-batch".into()));
        }
        Ok(b)
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Rows that carry a label.
    pub fn label_count(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_LABEL).count()
    }
}

/// Dropout seed of one adapted projection in one micro-batch: the forward pass and the
/// recomputation before the backward pass must draw the same mask.
pub fn dropout_seed(micro_seed: u64, layer: usize, t: Target) -> u64 {
    let mut z = micro_seed ^ ((layer as u64) << 8 | t as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z ^ (z >> 32)
}

/// Activations of one layer (saved, or recomputed under checkpointing).
struct LayerActs<B: Backend> {
    h1: Tensor<B>,
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    attn: Tensor<B>,
    /// What the attention backward reuses of the forward (`Backend::attention_saving`), f32
    /// `[T, heads]`.
    attn_saved: Tensor<B>,
    x2: Tensor<B>,
    h2: Tensor<B>,
    g: Tensor<B>,
    u: Tensor<B>,
    a: Tensor<B>,
    /// LoRA down-projection h and gated u `[T, r]` per adapted projection.
    lora: BTreeMap<Target, (Tensor<B>, Tensor<B>)>,
}

/// Every buffer a micro-batch of `t` tokens needs, allocated once and reused while the
/// micro-batch size stays the same.
pub struct Workspace<B: Backend> {
    t: usize,
    /// Layers `0..recomputed` recompute into `acts[0]`; layer `l ≥ recomputed` keeps its own
    /// set (`Workspace::slot`).
    recomputed: usize,
    xs: Vec<Tensor<B>>,
    acts: Vec<LayerActs<B>>,
    /// The gate `[t, r]` every adapted projection multiplies its rank activations by: all ones
    /// (plain LoRA) unless [`Workspace::forward_only_gated`] was given other values.
    lora_gate: Tensor<B>,
    dgate: Tensor<B>,
    xf: Tensor<B>,
    dx: Tensor<B>,
    dh: Tensor<B>,
    dattn: Tensor<B>,
    dq: Tensor<B>,
    dk: Tensor<B>,
    dv: Tensor<B>,
    dff: Tensor<B>,
    dg: Tensor<B>,
    du: Tensor<B>,
}

/// Rows of the output head computed at once (a `[chunk, vocab]` logits buffer).
pub const HEAD_CHUNK: usize = 128;

impl<B: Backend> Workspace<B> {
    pub fn new(
        be: &B,
        model: &Llama<B>,
        targets: &[Target],
        r: usize,
        t: usize,
        recomputed: usize,
    ) -> Result<Self> {
        Self::build(be, model, targets, r, t, recomputed, false, None)
    }

    /// A workspace for forward passes only (scoring): one activation set reused by every
    /// layer, the residual stream alternating between two buffers, and no gradient buffers
    /// (they are empty, so a backward pass over this workspace fails its shape checks).
    pub fn forward_only(
        be: &B,
        model: &Llama<B>,
        targets: &[Target],
        r: usize,
        t: usize,
    ) -> Result<Self> {
        let l = model.config.num_hidden_layers;
        Self::build(be, model, targets, r, t, l, true, None)
    }

    /// [`Workspace::forward_only`] with the LoRA gate `[t, r]` (f32, row-major) given instead
    /// of all ones: row i multiplies rank j of every adapted projection by `gate[i·r + j]`.
    /// With the rank blocks of a [`StackedAdapter`](crate::model::lora::StackedAdapter) and its
    /// `gate`, each row applies its own adapter of the stack, at that adapter's scale.
    pub fn forward_only_gated(
        be: &B,
        model: &Llama<B>,
        targets: &[Target],
        r: usize,
        t: usize,
        gate: &[f32],
    ) -> Result<Self> {
        let l = model.config.num_hidden_layers;
        Self::build(be, model, targets, r, t, l, true, Some(gate))
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        be: &B,
        model: &Llama<B>,
        targets: &[Target],
        r: usize,
        t: usize,
        recomputed: usize,
        forward_only: bool,
        gate: Option<&[f32]>,
    ) -> Result<Self> {
        let c = &model.config;
        if let Some(g) = gate {
            if g.len() != t * r.max(1) {
                return Err(Error::Shape(format!(
                    "a LoRA gate of {} values for {t} rows of rank {r}",
                    g.len()
                )));
            }
        }
        if recomputed > c.num_hidden_layers {
            return Err(Error::Invalid(format!(
                "{recomputed} layers to recompute, but the model has {}",
                c.num_hidden_layers
            )));
        }
        let dt = be.activation_dtype();
        let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (qd, kvd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let z = |shape: &[usize]| be.zeros(shape, dt);
        let n_acts = c.num_hidden_layers - recomputed + usize::from(recomputed > 0);
        let mut acts = Vec::with_capacity(n_acts);
        for _ in 0..n_acts {
            let mut lora = BTreeMap::new();
            for &tg in targets {
                lora.insert(
                    tg,
                    (
                        be.zeros(&[t, r], DType::F32)?,
                        be.zeros(&[t, r], DType::F32)?,
                    ),
                );
            }
            acts.push(LayerActs {
                h1: z(&[t, d])?,
                q: z(&[t, qd])?,
                k: z(&[t, kvd])?,
                v: z(&[t, kvd])?,
                attn: z(&[t, qd])?,
                attn_saved: be.zeros(&[t, c.num_attention_heads], DType::F32)?,
                x2: z(&[t, d])?,
                h2: z(&[t, d])?,
                g: z(&[t, f])?,
                u: z(&[t, f])?,
                a: z(&[t, f])?,
                lora,
            });
        }
        let lora_gate = be.upload(&HostTensor::f32(
            vec![t, r.max(1)],
            gate.map_or_else(|| vec![1.0; t * r.max(1)], <[f32]>::to_vec),
        )?)?;
        // The backward reads every layer's input; a forward alone needs the current two.
        let n_xs = if forward_only {
            2
        } else {
            c.num_hidden_layers + 1
        };
        let tg = if forward_only { 0 } else { t };
        Ok(Workspace {
            t,
            recomputed,
            xs: (0..n_xs).map(|_| z(&[t, d])).collect::<Result<_>>()?,
            acts,
            lora_gate,
            dgate: be.zeros(&[tg, r.max(1)], DType::F32)?,
            xf: z(&[t, d])?,
            dx: z(&[tg, d])?,
            dh: z(&[tg, d])?,
            dattn: z(&[tg, qd])?,
            dq: z(&[tg, qd])?,
            dk: z(&[tg, kvd])?,
            dv: z(&[tg, kvd])?,
            dff: z(&[tg, f])?,
            dg: z(&[tg, f])?,
            du: z(&[tg, f])?,
        })
    }
    pub fn tokens(&self) -> usize {
        self.t
    }
    /// How many layers (the first ones) recompute their activations.
    pub fn recomputed(&self) -> usize {
        self.recomputed
    }
    /// Whether layer `l` recomputes its activations in the backward pass.
    fn recomputes(&self, l: usize) -> bool {
        l < self.recomputed
    }
    /// The activation set layer `l` runs in.
    fn slot(&self, l: usize) -> usize {
        if self.recomputes(l) {
            0
        } else {
            l - self.recomputed + usize::from(self.recomputed > 0)
        }
    }
}

fn reshape<B: Backend>(t: &mut Tensor<B>, shape: &[usize]) {
    debug_assert_eq!(t.numel(), shape.iter().product::<usize>());
    t.shape = shape.to_vec();
}

/// Projections of `x` in one `Backend::linear_lora` call: each `(target, weight, residual,
/// out)` carries its LoRA pass when the layer adapts that target (and has saved h, u for it).
#[allow(clippy::too_many_arguments)]
fn project<'a, 'p: 'a, B: Backend + 'p>(
    be: &B,
    x: &Tensor<B>,
    saved: &'a mut BTreeMap<Target, (Tensor<B>, Tensor<B>)>,
    params: impl Fn(Target) -> Option<&'p DevLoraParams<B>>,
    lora_gate: &'a Tensor<B>,
    dropout: impl Fn(Target) -> Dropout,
    items: impl IntoIterator<
        Item = (
            Target,
            &'a Linear<B>,
            Option<&'a Tensor<B>>,
            &'a mut Tensor<B>,
        ),
    >,
) -> Result<()> {
    let mut saved: Vec<_> = saved.iter_mut().collect();
    let mut projs = Vec::new();
    for (tg, w, residual, out) in items {
        let at = saved.iter().position(|(t, _)| **t == tg);
        let lora = match (params(tg), at) {
            (Some(p), Some(i)) => {
                let (_, (h, u)) = saved.swap_remove(i);
                Some(LoraPass {
                    lora: &p.lora,
                    gate: lora_gate,
                    dropout: dropout(tg),
                    h,
                    u,
                })
            }
            _ => None,
        };
        projs.push(Projection {
            w,
            lora,
            residual,
            out,
        });
    }
    be.linear_lora(x, &mut projs)
}

/// Per-sample squared LoRA gradient norms summed over the adapted projections of every layer
/// (`sample_scores`): `rows` are each sequence's `(first row, rows)`.
struct SampleNorms {
    rows: Vec<(usize, usize)>,
    sq: Vec<f64>,
}

/// `dx = dy · W (+ the LoRA input gradient)`, or `dx +=` that when `accumulate` (a second
/// projection of the same input), accumulating the LoRA weight gradients; with `norms`, each
/// sample's part of those gradients is measured too.
#[allow(clippy::too_many_arguments)]
fn linear_lora_backward<B: Backend>(
    be: &B,
    x: &Tensor<B>,
    w: &Linear<B>,
    lora: Option<&mut DevLoraParams<B>>,
    saved: Option<&(Tensor<B>, Tensor<B>)>,
    lora_gate: &Tensor<B>,
    dgate: &mut Tensor<B>,
    dropout: Dropout,
    dy: &Tensor<B>,
    dx: &mut Tensor<B>,
    accumulate: bool,
    norms: Option<&mut SampleNorms>,
) -> Result<()> {
    be.linear_backward_input(dy, w, dx, accumulate)?;
    if let (Some(p), Some((h, u))) = (lora, saved) {
        if let Some(sn) = norms {
            let sq = be.lora_sample_grad_sq_norms(x, &p.lora, lora_gate, h, u, dy, &sn.rows)?;
            for (acc, v) in sn.sq.iter_mut().zip(sq) {
                *acc += v as f64;
            }
        }
        be.lora_backward(
            x,
            &p.lora,
            lora_gate,
            dropout,
            h,
            u,
            dy,
            &mut p.grad_a,
            &mut p.grad_b,
            dgate,
            dx,
        )?;
    }
    Ok(())
}

/// What the forward pass needs to know about the adapter in one micro-batch.
#[derive(Clone, Copy)]
pub struct LoraRun {
    pub dropout: f32,
    pub micro_seed: u64,
}

impl LoraRun {
    /// No dropout (scoring).
    pub const INFERENCE: LoraRun = LoraRun {
        dropout: 0.0,
        micro_seed: 0,
    };

    fn dropout(&self, layer: usize, t: Target) -> Dropout {
        if self.dropout <= 0.0 {
            Dropout::NONE
        } else {
            Dropout {
                p: self.dropout,
                seed: dropout_seed(self.micro_seed, layer, t),
            }
        }
    }
}

struct Ctx<'a, B: Backend> {
    be: &'a B,
    model: &'a Llama<B>,
    pos: Tensor<B>,
    spans: &'a [SeqSpan],
    run: LoraRun,
}

/// Each layer's post-RoPE K and V `[P, kv_heads, head_dim]` of a token prefix that every
/// sequence of a scoring run shares (the prompt template), computed once by [`prefix_kv`] with
/// the adapter applied, then read by every batch of suffixes ([`forward_logits_at`]).
pub struct PrefixKv<B: Backend> {
    tokens: Vec<u32>,
    k: Vec<Tensor<B>>,
    v: Vec<Tensor<B>>,
}

impl<B: Backend> PrefixKv<B> {
    /// Tokens in the prefix.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// Bytes the K/V tensors hold on the backend.
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|t| t.numel() * t.dtype.size())
            .sum()
    }
}

/// The K/V rows attention reads in a prefixed forward, rebuilt in every layer: for each
/// sequence, the prefix's rows then the sequence's own rows, at the span's `kv_start`.
struct KvCat<'a, B: Backend> {
    prefix: &'a PrefixKv<B>,
    k: Tensor<B>,
    v: Tensor<B>,
}

impl<B: Backend> KvCat<'_, B> {
    fn fill(
        &mut self,
        be: &B,
        l: usize,
        k: &Tensor<B>,
        v: &Tensor<B>,
        spans: &[SeqSpan],
    ) -> Result<()> {
        let p = self.prefix.len();
        for s in spans {
            be.copy_rows(&self.prefix.k[l], 0, &mut self.k, s.kv_start, p)?;
            be.copy_rows(k, s.q_start, &mut self.k, s.kv_start + p, s.q_len)?;
            be.copy_rows(&self.prefix.v[l], 0, &mut self.v, s.kv_start, p)?;
            be.copy_rows(v, s.q_start, &mut self.v, s.kv_start + p, s.q_len)?;
        }
        Ok(())
    }
}

impl<B: Backend> Ctx<'_, B> {
    /// One layer forward: `xs[l]` → `xs[l + 1]`, activations into `acts`. With `cat`, attention
    /// reads each sequence's keys and values from there (a shared prefix's, then its own) and
    /// `self.spans` index the rows of `cat` as kv rows.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: usize,
        adapter: &DevAdapter<B>,
        xin: &Tensor<B>,
        a: &mut LayerActs<B>,
        lora_gate: &Tensor<B>,
        xout: &mut Tensor<B>,
        cat: Option<&mut KvCat<'_, B>>,
    ) -> Result<()> {
        let (be, c) = (self.be, &self.model.config);
        let lay = &self.model.layers[l];
        let t = xin.shape[0];
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;
        let theta = c.rope_theta as f32;
        let lp = |tg| adapter.get(l, tg);
        reshape(&mut a.q, &[t, h * hd]);
        reshape(&mut a.k, &[t, kvh * hd]);
        reshape(&mut a.v, &[t, kvh * hd]);
        be.rmsnorm(xin, &lay.attn_norm, eps, &mut a.h1)?;
        // q, k, v read one input: one call, so the GPU quantizes it once.
        let drop = |tg| self.run.dropout(l, tg);
        project(
            be,
            &a.h1,
            &mut a.lora,
            lp,
            lora_gate,
            drop,
            [
                (Target::Q, &lay.q, None, &mut a.q),
                (Target::K, &lay.k, None, &mut a.k),
                (Target::V, &lay.v, None, &mut a.v),
            ],
        )?;
        reshape(&mut a.q, &[t, h, hd]);
        reshape(&mut a.k, &[t, kvh, hd]);
        reshape(&mut a.v, &[t, kvh, hd]);
        reshape(&mut a.attn, &[t, h, hd]);
        be.rope(&mut a.q, &self.pos, theta, false)?;
        be.rope(&mut a.k, &self.pos, theta, false)?;
        match cat {
            None => be.attention_saving(
                &a.q,
                &a.k,
                &a.v,
                &self.pos,
                self.spans,
                &mut a.attn,
                &mut a.attn_saved,
            )?,
            Some(c) => {
                c.fill(be, l, &a.k, &a.v, self.spans)?;
                be.attention(&a.q, &c.k, &c.v, &self.pos, self.spans, &mut a.attn)?;
            }
        }
        reshape(&mut a.attn, &[t, h * hd]);
        // x2 = xin + o(attn): the residual added in the projection's epilogue on the GPU.
        let o = [(Target::O, &lay.o, Some(xin), &mut a.x2)];
        project(be, &a.attn, &mut a.lora, lp, lora_gate, drop, o)?;
        be.rmsnorm(&a.x2, &lay.ffn_norm, eps, &mut a.h2)?;
        let gate_up = [
            (Target::Gate, &lay.gate, None, &mut a.g),
            (Target::Up, &lay.up, None, &mut a.u),
        ];
        project(be, &a.h2, &mut a.lora, lp, lora_gate, drop, gate_up)?;
        be.swiglu(&a.g, &a.u, &mut a.a)?;
        let down = [(Target::Down, &lay.down, Some(&a.x2), xout)];
        project(be, &a.a, &mut a.lora, lp, lora_gate, drop, down)
    }

    /// One layer backward: `ws.dx` holds dL/d(layer output) on entry and dL/d(layer input) on
    /// exit; LoRA gradients accumulate into the adapter.
    fn layer_backward(
        &self,
        l: usize,
        adapter: &mut DevAdapter<B>,
        ws: &mut Workspace<B>,
        ai: usize,
        mut norms: Option<&mut SampleNorms>,
    ) -> Result<()> {
        let (be, c) = (self.be, &self.model.config);
        let lay = &self.model.layers[l];
        let t = ws.t;
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;
        let theta = c.rope_theta as f32;
        let Workspace {
            xs,
            acts,
            lora_gate,
            dgate,
            dx,
            dh,
            dattn,
            dq,
            dk,
            dv,
            dff,
            dg,
            du,
            ..
        } = ws;
        let a = &mut acts[ai];
        let run = self.run;
        // MLP: x3 = x2 + down(swiglu(gate(h2), up(h2))).
        linear_lora_backward(
            be,
            &a.a,
            &lay.down,
            adapter.layers.get_mut(&(l, Target::Down)),
            a.lora.get(&Target::Down),
            lora_gate,
            dgate,
            run.dropout(l, Target::Down),
            dx,
            dff,
            false,
            norms.as_deref_mut(),
        )?;
        be.swiglu_backward(&a.g, &a.u, dff, dg, du)?;
        linear_lora_backward(
            be,
            &a.h2,
            &lay.gate,
            adapter.layers.get_mut(&(l, Target::Gate)),
            a.lora.get(&Target::Gate),
            lora_gate,
            dgate,
            run.dropout(l, Target::Gate),
            dg,
            dh,
            false,
            norms.as_deref_mut(),
        )?;
        linear_lora_backward(
            be,
            &a.h2,
            &lay.up,
            adapter.layers.get_mut(&(l, Target::Up)),
            a.lora.get(&Target::Up),
            lora_gate,
            dgate,
            run.dropout(l, Target::Up),
            du,
            dh,
            true,
            norms.as_deref_mut(),
        )?;
        be.rmsnorm_backward(&a.x2, &lay.ffn_norm, eps, dh, dx, true)?;
        // Attention: x2 = x + o(attn(rope(q(h1)), rope(k(h1)), v(h1))).
        reshape(dattn, &[t, h * hd]);
        linear_lora_backward(
            be,
            &a.attn,
            &lay.o,
            adapter.layers.get_mut(&(l, Target::O)),
            a.lora.get(&Target::O),
            lora_gate,
            dgate,
            run.dropout(l, Target::O),
            dx,
            dattn,
            false,
            norms.as_deref_mut(),
        )?;
        reshape(dattn, &[t, h, hd]);
        reshape(dq, &[t, h, hd]);
        reshape(dk, &[t, kvh, hd]);
        reshape(dv, &[t, kvh, hd]);
        // The forward's output and log-sum-exp: the tiled backward need not recompute them.
        reshape(&mut a.attn, &[t, h, hd]);
        be.attention_backward_saved(
            &a.q,
            &a.k,
            &a.v,
            &self.pos,
            self.spans,
            &a.attn,
            &a.attn_saved,
            dattn,
            dq,
            dk,
            dv,
        )?;
        reshape(&mut a.attn, &[t, h * hd]);
        be.rope(dq, &self.pos, theta, true)?;
        be.rope(dk, &self.pos, theta, true)?;
        reshape(dq, &[t, h * hd]);
        reshape(dk, &[t, kvh * hd]);
        reshape(dv, &[t, kvh * hd]);
        linear_lora_backward(
            be,
            &a.h1,
            &lay.q,
            adapter.layers.get_mut(&(l, Target::Q)),
            a.lora.get(&Target::Q),
            lora_gate,
            dgate,
            run.dropout(l, Target::Q),
            dq,
            dh,
            false,
            norms.as_deref_mut(),
        )?;
        for (tg, w, dy) in [(Target::K, &lay.k, &*dk), (Target::V, &lay.v, &*dv)] {
            linear_lora_backward(
                be,
                &a.h1,
                w,
                adapter.layers.get_mut(&(l, tg)),
                a.lora.get(&tg),
                lora_gate,
                dgate,
                run.dropout(l, tg),
                dy,
                dh,
                true,
                norms.as_deref_mut(),
            )?;
        }
        be.rmsnorm_backward(&xs[l], &lay.attn_norm, eps, dh, dx, true)
    }
}

/// Contiguous runs `(start, len)` of the rows whose label is not ignored.
fn label_runs(labels: &[u32]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = vec![];
    for (i, &l) in labels.iter().enumerate() {
        if l == IGNORE_LABEL {
            continue;
        }
        match runs.last_mut() {
            Some((s, n)) if *s + *n == i => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// Split runs into chunks of at most `chunk` rows: each chunk is a list of runs.
fn chunk_runs(runs: &[(usize, usize)], chunk: usize) -> Vec<Vec<(usize, usize)>> {
    let mut out = vec![];
    let mut cur: Vec<(usize, usize)> = vec![];
    let mut filled = 0;
    for &(mut s, mut n) in runs {
        while n > 0 {
            let take = n.min(chunk - filled);
            cur.push((s, take));
            filled += take;
            s += take;
            n -= take;
            if filled == chunk {
                out.push(std::mem::take(&mut cur));
                filled = 0;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn head<B: Backend>(model: &Llama<B>) -> &Linear<B> {
    model.lm_head.as_ref().unwrap_or(&model.embed)
}

/// Result of one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLoss {
    /// Σ of the per-token losses (nats) over the labelled rows.
    pub loss_sum: f64,
    /// Number of labelled rows.
    pub tokens: usize,
    /// Wall time of the forward pass with the loss, and of the backward pass (the device is
    /// synchronized at the boundary).
    pub forward_secs: f64,
    pub backward_secs: f64,
}

fn forward_all<B: Backend>(
    cx: &Ctx<'_, B>,
    adapter: &DevAdapter<B>,
    ws: &mut Workspace<B>,
    ids: &Tensor<B>,
) -> Result<()> {
    forward_with(cx, adapter, ws, ids, None, None)
}

/// The forward pass into `ws.xf`; with `cat`, attention also reads a shared prefix's K/V (see
/// `Ctx::layer_forward`); with `keep`, each layer's post-RoPE K and V are copied there.
fn forward_with<B: Backend>(
    cx: &Ctx<'_, B>,
    adapter: &DevAdapter<B>,
    ws: &mut Workspace<B>,
    ids: &Tensor<B>,
    mut cat: Option<&mut KvCat<'_, B>>,
    mut keep: Option<&mut PrefixKv<B>>,
) -> Result<()> {
    let (be, model) = (cx.be, cx.model);
    let LinearWeight::Dense(table) = &model.embed.weight else {
        return Err(Error::Invalid("the embedding table must be dense".into()));
    };
    be.embedding(table, ids, &mut ws.xs[0])?;
    for l in 0..model.layers.len() {
        let ai = ws.slot(l);
        let (xin, xout) = layer_io(&mut ws.xs, l);
        let c = cat.as_deref_mut();
        cx.layer_forward(l, adapter, xin, &mut ws.acts[ai], &ws.lora_gate, xout, c)?;
        if let Some(kp) = keep.as_deref_mut() {
            let a = &ws.acts[ai];
            be.copy_rows(&a.k, 0, &mut kp.k[l], 0, ws.t)?;
            be.copy_rows(&a.v, 0, &mut kp.v[l], 0, ws.t)?;
        }
    }
    let last = &ws.xs[model.layers.len() % ws.xs.len()];
    be.rmsnorm(
        last,
        &model.norm,
        model.config.rms_norm_eps as f32,
        &mut ws.xf,
    )
}

/// Layer `l`'s residual-stream input and output: `xs[l]` → `xs[l + 1]` when `xs` holds every
/// layer's input (training), else alternating between the two buffers of a forward-only
/// workspace. (With one layer both read the same.)
fn layer_io<B: Backend>(xs: &mut [Tensor<B>], l: usize) -> (&Tensor<B>, &mut Tensor<B>) {
    if xs.len() == 2 {
        let (a, b) = xs.split_at_mut(1);
        if l.is_multiple_of(2) {
            (&a[0], &mut b[0])
        } else {
            (&b[0], &mut a[0])
        }
    } else {
        let (lo, hi) = xs.split_at_mut(l + 1);
        (&lo[l], &mut hi[0])
    }
}

fn check_batch<B: Backend>(model: &Llama<B>, ws: &Workspace<B>, batch: &Batch) -> Result<()> {
    if batch.len() != ws.t {
        return Err(Error::Shape(format!(
            "the micro-batch has {} tokens, the workspace {}",
            batch.len(),
            ws.t
        )));
    }
    let v = model.config.vocab_size as u32;
    if let Some(bad) = batch.tokens.iter().find(|&&x| x >= v) {
        return Err(Error::Invalid(format!(
            "token id {bad} is outside the vocabulary of {v}"
        )));
    }
    if let Some(bad) = batch.labels.iter().find(|&&x| x != IGNORE_LABEL && x >= v) {
        return Err(Error::Invalid(format!(
            "label {bad} is outside the vocabulary of {v}"
        )));
    }
    Ok(())
}

fn upload_u32<B: Backend>(be: &B, v: &[u32]) -> Result<Tensor<B>> {
    be.upload(&HostTensor::new(vec![v.len()], HostData::U32(v.to_vec()))?)
}

/// Forward + backward of one micro-batch. LoRA gradients accumulate (scaled by `grad_scale`,
/// e.g. 1 / labelled tokens of the whole optimizer step) into `adapter`'s gradient tensors.
pub fn forward_backward<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &mut DevAdapter<B>,
    ws: &mut Workspace<B>,
    batch: &Batch,
    run: LoraRun,
    grad_scale: f32,
) -> Result<StepLoss> {
    forward_backward_with(be, model, adapter, ws, batch, run, grad_scale, None)
}

/// What [`sample_scores`] measures of one sequence of a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleScore {
    /// Labelled rows (response tokens) of the sequence.
    pub tokens: usize,
    /// Its mean loss per labelled token (nats).
    pub loss: f64,
    /// The L2 norm of the gradient of that mean loss with respect to every LoRA A and B.
    pub grad_norm: f64,
}

/// Each sequence of `batch` scored for gradient-based data pruning, from one forward and one
/// backward pass of the whole batch without dropout: its mean response-token loss and the
/// norm of that loss's LoRA gradient — what `forward_backward` of the sequence alone gives
/// with `grad_scale` 1, the adapter's gradient norm divided by its labelled tokens (sequences
/// are independent in a packed batch, up to LLM.int8's outlier columns, which the whole batch
/// chooses; the division comes after the backward pass because on a device the head's
/// gradient is rounded to bf16, and a 1/tokens scale would round differently). `adapter`'s
/// gradient tensors are left holding the batch's summed gradient. A sequence with no labelled
/// row is an error.
pub fn sample_scores<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &mut DevAdapter<B>,
    ws: &mut Workspace<B>,
    batch: &Batch,
) -> Result<Vec<SampleScore>> {
    let rows: Vec<(usize, usize)> = batch.spans.iter().map(|s| (s.q_start, s.q_len)).collect();
    let tokens: Vec<usize> = rows
        .iter()
        .map(|&(s, n)| {
            batch.labels[s..s + n]
                .iter()
                .filter(|&&l| l != IGNORE_LABEL)
                .count()
        })
        .collect();
    if let Some(i) = tokens.iter().position(|&n| n == 0) {
        return Err(Error::Invalid(format!(
            "sequence {i} of the batch has no labelled token to score"
        )));
    }
    let mut sc = Scoring {
        norms: SampleNorms {
            sq: vec![0.0; rows.len()],
            rows,
        },
        row_loss: vec![0.0; batch.len()],
    };
    adapter.zero_grads(be)?;
    forward_backward_with(
        be,
        model,
        adapter,
        ws,
        batch,
        LoraRun::INFERENCE,
        1.0,
        Some(&mut sc),
    )?;
    Ok(sc
        .norms
        .rows
        .iter()
        .zip(&sc.norms.sq)
        .zip(&tokens)
        .map(|((&(s, n), &sq), &t)| SampleScore {
            tokens: t,
            loss: sc.row_loss[s..s + n].iter().sum::<f64>() / t as f64,
            // With grad_scale 1 the sample's gradient is of its summed loss.
            grad_norm: sq.sqrt() / t as f64,
        })
        .collect())
}

/// What `forward_backward_with` records for `sample_scores`.
struct Scoring {
    norms: SampleNorms,
    /// Each row's loss (0 where unlabelled).
    row_loss: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn forward_backward_with<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &mut DevAdapter<B>,
    ws: &mut Workspace<B>,
    batch: &Batch,
    run: LoraRun,
    grad_scale: f32,
    mut scoring: Option<&mut Scoring>,
) -> Result<StepLoss> {
    check_batch(model, ws, batch)?;
    let t0 = std::time::Instant::now();
    let ids = upload_u32(be, &batch.tokens)?;
    let cx = Ctx {
        be,
        model,
        pos: upload_u32(be, &batch.positions)?,
        spans: &batch.spans,
        run,
    };
    forward_all(&cx, adapter, ws, &ids)?;

    // Head and loss over the labelled rows, chunk by chunk; the gradient lands in ws.dh.
    let (d, vocab) = (model.config.hidden_size, model.config.vocab_size);
    let dt = be.activation_dtype();
    be.fill_zero(&mut ws.dh)?;
    let mut loss_sum = 0f64;
    let runs = label_runs(&batch.labels);
    let tokens: usize = runs.iter().map(|r| r.1).sum();
    for chunk in chunk_runs(&runs, HEAD_CHUNK) {
        let rows: usize = chunk.iter().map(|r| r.1).sum();
        let mut sel = be.zeros(&[rows, d], dt)?;
        let mut labels = Vec::with_capacity(rows);
        let mut at = 0;
        for &(s, n) in &chunk {
            be.copy_rows(&ws.xf, s, &mut sel, at, n)?;
            labels.extend_from_slice(&batch.labels[s..s + n]);
            at += n;
        }
        // Logits and the softmax in f32 on every backend (bf16 logits of magnitude ~30 are
        // 0.1 apart, enough to move probabilities by several percent); the gradient goes back
        // through the head in the activation dtype.
        let mut logits = be.zeros(&[rows, vocab], DType::F32)?;
        be.linear(&sel, head(model), &mut logits)?;
        let mut loss = be.zeros(&[rows], DType::F32)?;
        be.cross_entropy(
            &mut logits,
            &upload_u32(be, &labels)?,
            grad_scale,
            &mut loss,
        )?;
        let mut dlogits = be.zeros(&[rows, vocab], dt)?;
        be.convert(&logits, &mut dlogits)?;
        drop(logits);
        let l = be.download(&loss)?.to_f32()?;
        if let Some(bad) = l.iter().find(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "the loss is not finite ({bad}): the model or the learning rate diverged"
            )));
        }
        loss_sum += l.iter().map(|&x| x as f64).sum::<f64>();
        if let Some(sc) = scoring.as_deref_mut() {
            let mut at = 0;
            for &(s, n) in &chunk {
                for (dst, &v) in sc.row_loss[s..s + n].iter_mut().zip(&l[at..at + n]) {
                    *dst = v as f64;
                }
                at += n;
            }
        }
        be.linear_backward_input(&dlogits, head(model), &mut sel, false)?;
        let mut at = 0;
        for &(s, n) in &chunk {
            be.copy_rows(&sel, at, &mut ws.dh, s, n)?;
            at += n;
        }
    }
    be.synchronize()?;
    let forward_secs = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let nl = model.layers.len();
    {
        let Workspace { xs, dh, dx, .. } = ws;
        be.rmsnorm_backward(
            &xs[nl],
            &model.norm,
            model.config.rms_norm_eps as f32,
            dh,
            dx,
            false,
        )?;
    }
    for l in (0..nl).rev() {
        let ai = ws.slot(l);
        if ws.recomputes(l) {
            let (lo, hi) = ws.xs.split_at_mut(l + 1);
            cx.layer_forward(
                l,
                adapter,
                &lo[l],
                &mut ws.acts[ai],
                &ws.lora_gate,
                &mut hi[0],
                None,
            )?;
        }
        let norms = scoring.as_deref_mut().map(|sc| &mut sc.norms);
        cx.layer_backward(l, adapter, ws, ai, norms)?;
    }
    be.synchronize()?;
    Ok(StepLoss {
        loss_sum,
        tokens,
        forward_secs,
        backward_secs: t1.elapsed().as_secs_f64(),
    })
}

/// Forward only, returning f32 logits `[rows.len(), vocab]` at the given rows (scoring).
pub fn logits_at<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &DevAdapter<B>,
    ws: &mut Workspace<B>,
    batch: &Batch,
    rows: &[usize],
) -> Result<HostTensor> {
    let logits = forward_logits_at(be, model, adapter, ws, None, batch, rows)?;
    let out = be.download(&logits)?;
    HostTensor::f32(out.shape.clone(), out.to_f32()?)
}

/// Run `tokens` once through the model with the adapter (no dropout) and keep every layer's
/// post-RoPE K and V: the shared prefix of a scoring run. Sequences that continue it are then
/// scored by [`forward_logits_at`] with only their own tokens in the batch.
pub fn prefix_kv<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &DevAdapter<B>,
    tokens: &[u32],
) -> Result<PrefixKv<B>> {
    let ignore = vec![IGNORE_LABEL; tokens.len()];
    let b = Batch::pack([(tokens, &ignore[..])])?;
    let c = &model.config;
    let cfg = &adapter.config;
    let (p, kvh, hd) = (b.len(), c.num_key_value_heads, c.head_dim);
    let dt = be.activation_dtype();
    let kv = || -> Result<Vec<Tensor<B>>> {
        (0..model.layers.len())
            .map(|_| be.zeros(&[p, kvh, hd], dt))
            .collect()
    };
    // What outlives this call first, then the workspace: freeing the workspace then leaves
    // one free range at the arena's end, not a hole below the prefix (an arena sized exactly
    // to the memory plan has no room for holes).
    let mut keep = PrefixKv {
        tokens: tokens.to_vec(),
        k: kv()?,
        v: kv()?,
    };
    let mut ws = Workspace::forward_only(be, model, &cfg.targets, cfg.r, b.len())?;
    check_batch(model, &ws, &b)?;
    let cx = Ctx {
        be,
        model,
        pos: upload_u32(be, &b.positions)?,
        spans: &b.spans,
        run: LoraRun::INFERENCE,
    };
    forward_with(
        &cx,
        adapter,
        &mut ws,
        &upload_u32(be, &b.tokens)?,
        None,
        Some(&mut keep),
    )?;
    Ok(keep)
}

/// Forward only, returning f32 logits `[rows.len(), vocab]` at the given batch rows, left on the
/// backend. With `prefix`, every sequence of `batch` continues the prefix: the batch holds only
/// the sequences' own tokens (positions counting from 0, as `Batch::pack` writes them), which
/// run at positions `prefix.len()..` and attend to the prefix's keys and values and then their
/// own — the same computation as a batch of the whole sequences, without recomputing the prefix.
/// `prefix` must come from [`prefix_kv`] with the same model and adapter.
pub fn forward_logits_at<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &DevAdapter<B>,
    ws: &mut Workspace<B>,
    prefix: Option<&PrefixKv<B>>,
    batch: &Batch,
    rows: &[usize],
) -> Result<Tensor<B>> {
    check_batch(model, ws, batch)?;
    if let Some(&r) = rows.iter().find(|&&r| r >= ws.t) {
        return Err(Error::Shape(format!(
            "row {r} is outside the micro-batch of {} tokens",
            ws.t
        )));
    }
    let ids = upload_u32(be, &batch.tokens)?;
    let c = &model.config;
    match prefix {
        None => {
            let cx = Ctx {
                be,
                model,
                pos: upload_u32(be, &batch.positions)?,
                spans: &batch.spans,
                run: LoraRun::INFERENCE,
            };
            forward_all(&cx, adapter, ws, &ids)?;
        }
        Some(pk) => {
            let p = pk.len();
            if pk.k.len() != model.layers.len() {
                return Err(Error::Shape(format!(
                    "the prefix K/V has {} layers, the model {}",
                    pk.k.len(),
                    model.layers.len()
                )));
            }
            // Each sequence's kv block in the concatenated buffer: [prefix | own rows].
            let mut spans = Vec::with_capacity(batch.spans.len());
            let mut kv_rows = 0;
            for s in &batch.spans {
                spans.push(SeqSpan {
                    q_start: s.q_start,
                    q_len: s.q_len,
                    kv_start: kv_rows,
                    kv_len: p + s.q_len,
                });
                kv_rows += p + s.q_len;
            }
            let pos: Vec<u32> = batch.positions.iter().map(|&x| x + p as u32).collect();
            let (kvh, hd) = (c.num_key_value_heads, c.head_dim);
            let dt = be.activation_dtype();
            let mut cat = KvCat {
                prefix: pk,
                k: be.zeros(&[kv_rows, kvh, hd], dt)?,
                v: be.zeros(&[kv_rows, kvh, hd], dt)?,
            };
            let cx = Ctx {
                be,
                model,
                pos: upload_u32(be, &pos)?,
                spans: &spans,
                run: LoraRun::INFERENCE,
            };
            forward_with(&cx, adapter, ws, &ids, Some(&mut cat), None)?;
        }
    }
    let (d, vocab) = (c.hidden_size, c.vocab_size);
    let dt = be.activation_dtype();
    let mut sel = be.zeros(&[rows.len(), d], dt)?;
    for (i, &r) in rows.iter().enumerate() {
        be.copy_rows(&ws.xf, r, &mut sel, i, 1)?;
    }
    let mut logits = be.zeros(&[rows.len(), vocab], DType::F32)?;
    be.linear(&sel, head(model), &mut logits)?;
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_chunks_cover_each_labelled_row_once() {
        let i = IGNORE_LABEL;
        let labels = [i, 5, 6, i, i, 7, i, 8, 9, 10];
        let runs = label_runs(&labels);
        assert_eq!(runs, vec![(1, 2), (5, 1), (7, 3)]);
        let chunks = chunk_runs(&runs, 2);
        assert_eq!(
            chunks,
            vec![vec![(1, 2)], vec![(5, 1), (7, 1)], vec![(8, 2)]]
        );
    }

    #[test]
    fn pack_lays_sequences_end_to_end() {
        let b = Batch::pack([
            (&[1u32, 2, 3][..], &[2u32, 3, IGNORE_LABEL][..]),
            (&[4u32][..], &[IGNORE_LABEL][..]),
        ])
        .unwrap();
        assert_eq!(b.tokens, vec![1, 2, 3, 4]);
        assert_eq!(b.positions, vec![0, 1, 2, 0]);
        assert_eq!(b.spans[1].q_start, 3);
        assert_eq!(b.label_count(), 2);
        assert!(Batch::pack([(&[1u32][..], &[][..])]).is_err());
    }
}
