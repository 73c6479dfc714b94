//! The `Backend` trait: typed buffers and the ops the LLaMA forward, backward, trainer and
//! server are written against, once. `cpu` is the plain reference every kernel is checked
//! against; `gpu` drives the CUDA kernels on a real device (or, later, the simulator).
//!
//! Conventions shared by every op:
//! - tensors are row-major; `[T, D]` means T rows (tokens) of D contiguous elements;
//! - outputs are passed as `&mut Tensor` that the caller allocated with the right shape, so a
//!   planned arena can own every byte (DESIGN.md §4) and the hot loop allocates nothing;
//! - shapes and dtypes are checked by every op and reported as `Error::Shape`.

pub mod cpu;
pub mod gpu;
pub mod sampling;

use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};
pub use sampling::SamplingParams;

/// A tensor living on some backend.
pub struct Tensor<B: Backend> {
    pub storage: B::Storage,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl<B: Backend> Tensor<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// First dimension × everything else (rows as `copy_rows` counts them).
    pub fn outer_rows(&self) -> (usize, usize) {
        let rows = *self.shape.first().unwrap_or(&1);
        let cols = self.numel().checked_div(rows).unwrap_or(0);
        (rows, cols)
    }
    /// Rows × last dimension view of the shape.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = *self.shape.last().unwrap_or(&1);
        let rows = self.numel().checked_div(cols).unwrap_or(0);
        (rows, cols)
    }
}

/// Weights of a frozen linear layer `y = x · Wᵀ`, W is `[out, in]`.
pub enum LinearWeight<B: Backend> {
    /// LLM.int8 vector-wise: int8 `[out, in]` and one f32 absmax scale per output row.
    Int8 { w: Tensor<B>, scale: Tensor<B> },
    /// Kept precision (f32 / bf16 / f16), e.g. the output head.
    Dense(Tensor<B>),
}

pub struct Linear<B: Backend> {
    pub weight: LinearWeight<B>,
    pub out_features: usize,
    pub in_features: usize,
    /// LLM.int8 mixed-precision decomposition: input columns with |x| above this in any row go
    /// through the float path. 0 disables it.
    pub outlier_threshold: f32,
}

/// Dropout on the LoRA input, with a counter-based mask (`dropout_keep`) so every backend keeps
/// exactly the same elements for the same seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element; 0 disables dropout.
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub const NONE: Dropout = Dropout { p: 0.0, seed: 0 };
}

/// Whether element `idx` (row-major index into the LoRA input) survives dropout: a SplitMix64
/// hash of (seed, idx) gives 24 uniform bits; the element is kept when u ≥ p. The same integer
/// arithmetic runs in kernels/lora.cu.
pub fn dropout_keep(seed: u64, idx: u64, p: f32) -> bool {
    if p <= 0.0 {
        return true;
    }
    let mut z = seed ^ idx.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
    u >= p
}

/// A LoRA adapter (or several concatenated along the rank): A `[R, K]`, B `[N, R]`, f32;
/// `scale` = alpha / r (PEFT).
pub struct Lora<B: Backend> {
    pub a: Tensor<B>,
    pub b: Tensor<B>,
    pub scale: f32,
}

/// A gated LoRA applied by [`Backend::linear_lora`]; the arguments of [`Backend::lora_forward`]
/// (h and u are written, for the backward pass).
pub struct LoraPass<'a, B: Backend> {
    pub lora: &'a Lora<B>,
    pub gate: &'a Tensor<B>,
    pub dropout: Dropout,
    pub h: &'a mut Tensor<B>,
    pub u: &'a mut Tensor<B>,
}

/// One projection of a [`Backend::linear_lora`] call: `out = x · Wᵀ (+ LoRA(x)) (+ residual)`.
pub struct Projection<'a, B: Backend> {
    pub w: &'a Linear<B>,
    pub lora: Option<LoraPass<'a, B>>,
    /// `[T, out]`, added last (the residual stream around o and down).
    pub residual: Option<&'a Tensor<B>>,
    pub out: &'a mut Tensor<B>,
}

/// [`Backend::linear_lora`] as separate passes: `linear`, `lora_forward` into its output, then
/// `add_assign` of the residual. What the trait's default does, and what a backend that fuses
/// them falls back to where it cannot.
pub fn linear_lora_unfused<B: Backend>(
    be: &B,
    x: &Tensor<B>,
    projs: &mut [Projection<'_, B>],
) -> Result<()> {
    for p in projs.iter_mut() {
        be.linear(x, p.w, p.out)?;
        if let Some(l) = p.lora.as_mut() {
            be.lora_forward(x, l.lora, l.gate, l.dropout, l.h, l.u, p.out)?;
        }
        if let Some(r) = p.residual {
            be.add_assign(p.out, r)?;
        }
    }
    Ok(())
}

/// Label of a token that is not trained on (prompt tokens, padding).
pub const IGNORE_LABEL: u32 = u32::MAX;

/// AdamW hyper-parameters (PyTorch semantics: decoupled weight decay, bias correction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One sequence of an attention batch. Query rows `q_start .. q_start+q_len` attend to key/value
/// rows `kv_start .. kv_start+kv_len`; the causal mask lets a query at position p see the keys
/// whose index within the sequence is ≤ p (so a KV-cached decode step, whose queries sit at
/// positions past the cached keys, and a packed training batch use the same op).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    pub q_start: usize,
    pub q_len: usize,
    pub kv_start: usize,
    pub kv_len: usize,
}

/// One attention step over a paged KV cache (`infer::paged` hands out the blocks): `queries`
/// new tokens for each of the batch's sequences, whose K/V — the new ones included, already
/// written by [`Backend::kv_write`] — sit in the slots their block tables name (slot = block ·
/// block_size + offset, a row of the cache). Query i of a sequence of `len` tokens is at
/// position len − queries + i and sees the keys at positions ≤ its own.
pub struct PagedBatch<'a, B: Backend> {
    pub block_size: usize,
    /// `[sequences, max_blocks]` i32 on the backend: each sequence's blocks, padded with 0.
    pub block_tables: &'a Tensor<B>,
    /// `[sequences]` i32 on the backend: tokens in the cache per sequence.
    pub context_lens: &'a Tensor<B>,
    /// The same tables and lengths on the host (they size the launch and are checked there).
    pub host_block_tables: &'a [i32],
    pub host_context_lens: &'a [i32],
    pub max_blocks: usize,
    pub queries: usize,
}

impl<B: Backend> PagedBatch<'_, B> {
    /// The host half: the tables and lengths the launch is sized and checked by.
    pub fn host(&self) -> BlockTables<'_> {
        BlockTables {
            block_size: self.block_size,
            tables: self.host_block_tables,
            max_blocks: self.max_blocks,
            context_lens: self.host_context_lens,
        }
    }

    /// The cache slots of sequence `b`'s tokens, in order (its K/V rows, gathered); call after
    /// [`PagedBatch::check`].
    pub fn sequence_slots(&self, b: usize) -> Vec<u32> {
        self.host().sequence_slots(b)
    }

    /// Checks the host tables against each other and a cache of `slots` rows: every length at
    /// least `queries` and within its table, every block it uses inside the cache.
    pub fn check(&self, op: &str, slots: usize) -> Result<()> {
        if self.queries == 0 {
            return Err(Error::Shape(format!("{op}: 0 queries per sequence")));
        }
        self.host().check(op, |_| self.queries, slots)
    }
}

/// Block tables on the host: which cache blocks hold each sequence's tokens (slot = block ·
/// block_size + offset).
#[derive(Clone, Copy, Debug)]
pub struct BlockTables<'a> {
    pub block_size: usize,
    /// `[sequences, max_blocks]` block numbers, padded with 0.
    pub tables: &'a [i32],
    pub max_blocks: usize,
    /// Tokens in the cache per sequence.
    pub context_lens: &'a [i32],
}

impl BlockTables<'_> {
    /// The cache slots of sequence `b`'s tokens, in order; call after [`BlockTables::check`].
    pub fn sequence_slots(&self, b: usize) -> Vec<u32> {
        let (bs, mb) = (self.block_size, self.max_blocks);
        let table = &self.tables[b * mb..][..mb];
        (0..self.context_lens[b] as usize)
            .map(|j| (table[j / bs] as usize * bs + j % bs) as u32)
            .collect()
    }

    /// Checks the tables against each other and a cache of `slots` rows: sequence b's length at
    /// least `min_len(b)` and within its table, every block it uses inside the cache.
    pub fn check(&self, op: &str, min_len: impl Fn(usize) -> usize, slots: usize) -> Result<()> {
        let (n, mb, bs) = (self.context_lens.len(), self.max_blocks, self.block_size);
        if bs == 0 || self.tables.len() != n * mb {
            return Err(Error::Shape(format!(
                "{op}: {} block-table entries for {n} sequences × {mb} blocks (block size {bs})",
                self.tables.len(),
            )));
        }
        for (b, &len) in self.context_lens.iter().enumerate() {
            let least = min_len(b);
            if len < 0 || (len as usize) < least || len as usize > mb * bs {
                return Err(Error::Invalid(format!(
                    "{op}: sequence {b} has {len} tokens: at least its {least} queries and at most {mb} blocks of {bs}"
                )));
            }
            let used = (len as usize).div_ceil(bs);
            let table = &self.tables[b * mb..][..used];
            if let Some(bad) = table
                .iter()
                .find(|&&x| x < 0 || (x as usize + 1) * bs > slots)
            {
                return Err(Error::Invalid(format!(
                    "{op}: sequence {b} names block {bad}, outside the cache of {slots} slots"
                )));
            }
        }
        Ok(())
    }
}

pub trait Backend: Sized + Send + Sync {
    type Storage: Send + Sync;

    /// Human-readable device name, e.g. "cpu (2 threads)".
    fn name(&self) -> String;
    /// The element type of activations on this backend (f32 on the CPU reference).
    fn activation_dtype(&self) -> DType;

    /// Wait until every queued operation has finished (timing on an asynchronous device).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Device memory in use, in bytes, where the device can tell (None on the CPU reference).
    fn memory_in_use(&self) -> Option<u64> {
        None
    }
    /// This backend's own accounting of the device buffers it holds (exact, on CUDA and in the
    /// simulator); None on the CPU reference, which uses host memory.
    fn memory_stats(&self) -> Option<crate::backend::gpu::MemStats> {
        None
    }
    /// Reserve one arena of `bytes` (the memory plan's total) and serve every later buffer
    /// from it, so nothing reaches the device allocator afterwards. Ok(false) where the
    /// backend has no device memory to plan (the CPU reference).
    fn reserve_arena(&self, _bytes: u64) -> Result<bool> {
        Ok(false)
    }
    /// Start a new peak measurement (`memory_stats().peak`) from what is held now.
    fn reset_memory_peak(&self) {}
    /// Time every device operation (kernels by name, memsets, copies) from now on, until
    /// `profile_stop`. Ok(false) where the backend has no device operations to time (the CPU
    /// reference).
    fn profile_start(&self) -> Result<bool> {
        Ok(false)
    }
    /// Stop profiling and return what ran since `profile_start` (None where it returned false).
    fn profile_stop(&self) -> Result<Option<crate::backend::gpu::Profile>> {
        Ok(None)
    }

    // ---- memory -------------------------------------------------------------------------------
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>;
    /// Set every element of `t` to zero in place (no allocation: the hot loop reuses buffers).
    fn fill_zero(&self, t: &mut Tensor<Self>) -> Result<()>;
    /// Copy a host tensor to the backend in its own dtype (the CPU reference widens f16 / bf16
    /// to f32 exactly; it computes in f32). Convert with `HostTensor::to_dtype` first to store
    /// another type.
    fn upload(&self, t: &HostTensor) -> Result<Tensor<Self>>;
    fn download(&self, t: &Tensor<Self>) -> Result<HostTensor>;
    /// Copy `n` rows (along the first dimension) of `src` starting at `src_row` into `dst`
    /// starting at `dst_row` (same dtype and row size).
    fn copy_rows(
        &self,
        src: &Tensor<Self>,
        src_row: usize,
        dst: &mut Tensor<Self>,
        dst_row: usize,
        n: usize,
    ) -> Result<()>;

    // ---- forward ------------------------------------------------------------------------------
    /// `out[t] = table[ids[t]]`; table `[V, D]`, ids u32 `[T]`, out `[T, D]`.
    fn embedding(
        &self,
        table: &Tensor<Self>,
        ids: &Tensor<Self>,
        out: &mut Tensor<Self>,
    ) -> Result<()>;
    /// `out = x / sqrt(mean(x²) + eps) · weight`, per row; x, out `[T, D]`, weight `[D]`.
    fn rmsnorm(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
        out: &mut Tensor<Self>,
    ) -> Result<()>;
    /// `out = x · Wᵀ`; x `[T, in]`, out `[T, out]`.
    fn linear(&self, x: &Tensor<Self>, w: &Linear<Self>, out: &mut Tensor<Self>) -> Result<()>;
    /// `outs[i] = x · ws[i]ᵀ` for several layers that read the same input (q, k, v; gate, up):
    /// the same results as one `linear` each, which is what this default does. A backend may
    /// share work between them (the GPU quantizes the activations once for int8 weights).
    fn linear_many(
        &self,
        x: &Tensor<Self>,
        ws: &[&Linear<Self>],
        outs: &mut [&mut Tensor<Self>],
    ) -> Result<()> {
        if ws.len() != outs.len() {
            return Err(crate::error::Error::Shape(format!(
                "linear_many: {} layers but {} outputs",
                ws.len(),
                outs.len()
            )));
        }
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            self.linear(x, w, out)?;
        }
        Ok(())
    }
    /// Projections of one input with their adapters and residuals (q, k, v; o + the residual
    /// stream; gate, up; down + the residual stream): for each, `out = x · Wᵀ`, then the gated
    /// LoRA of `x` added as by `lora_forward` (h and u saved), then the residual added. The
    /// default runs those passes ([`linear_lora_unfused`]); a backend may fuse them (the GPU
    /// quantizes x once and adds the residual, and optionally the LoRA up-projection, in the
    /// int8 GEMM's epilogue), so the results agree to the rounding of the activation dtype.
    fn linear_lora(&self, x: &Tensor<Self>, projs: &mut [Projection<'_, Self>]) -> Result<()> {
        linear_lora_unfused(self, x, projs)
    }
    /// Rotary embedding in place, HF rotate-half convention; x `[T, heads, head_dim]`,
    /// positions u32 `[T]`. `inverse` rotates by the negative angle, which is the backward pass.
    fn rope(
        &self,
        x: &mut Tensor<Self>,
        positions: &Tensor<Self>,
        theta: f32,
        inverse: bool,
    ) -> Result<()>;
    /// Causal GQA attention, softmax scale 1/sqrt(head_dim). q `[Tq, H, hd]`, k and v
    /// `[Tk, KVH, hd]`, out `[Tq, H, hd]`; positions u32 `[Tq]` are the query positions within
    /// their sequence.
    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        positions: &Tensor<Self>,
        spans: &[SeqSpan],
        out: &mut Tensor<Self>,
    ) -> Result<()>;
    /// `out = silu(gate) ⊙ up`; all `[T, F]`.
    fn swiglu(&self, gate: &Tensor<Self>, up: &Tensor<Self>, out: &mut Tensor<Self>) -> Result<()>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Tensor<Self>, y: &Tensor<Self>) -> Result<()>;
    /// `out = x` converted to out's dtype (f32 ↔ the activation dtype); same element count.
    fn convert(&self, x: &Tensor<Self>, out: &mut Tensor<Self>) -> Result<()>;

    // ---- backward -----------------------------------------------------------------------------
    /// `dtable[ids[t]] += dy[t]` into an f32 table `[V, D]` (for a trainable embedding).
    fn embedding_backward(
        &self,
        dy: &Tensor<Self>,
        ids: &Tensor<Self>,
        dtable: &mut Tensor<Self>,
    ) -> Result<()>;
    /// dx of `rmsnorm` (the norm weight is frozen), or `dx +=` it when `accumulate` (the
    /// residual stream's gradient gathers it without a separate pass).
    fn rmsnorm_backward(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
        dy: &Tensor<Self>,
        dx: &mut Tensor<Self>,
        accumulate: bool,
    ) -> Result<()>;
    /// `dx = dy · dequant(W)`, or `dx += dy · dequant(W)` when `accumulate` (the input
    /// gradient of several projections of one input summed in the GEMM's epilogue, without a
    /// separate pass); dy `[T, out]`, dx `[T, in]`.
    fn linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Linear<Self>,
        dx: &mut Tensor<Self>,
        accumulate: bool,
    ) -> Result<()>;
    /// Gradients of `swiglu` with respect to gate and up.
    fn swiglu_backward(
        &self,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
        dy: &Tensor<Self>,
        dgate: &mut Tensor<Self>,
        dup: &mut Tensor<Self>,
    ) -> Result<()>;
    /// Gated LoRA forward: `h = dropout(x) · Aᵀ` `[M, R]` (saved for the backward pass),
    /// `u = h ⊙ gate` `[M, R]`, and `y += scale · u · Bᵀ`. `gate` `[M, R]` f32 is all ones for
    /// plain LoRA, one-hot over rank blocks for several adapters in one batch, a soft mixture
    /// for per-user meta-LoRAs.
    #[allow(clippy::too_many_arguments)]
    fn lora_forward(
        &self,
        x: &Tensor<Self>,
        lora: &Lora<Self>,
        gate: &Tensor<Self>,
        dropout: Dropout,
        h: &mut Tensor<Self>,
        u: &mut Tensor<Self>,
        y: &mut Tensor<Self>,
    ) -> Result<()>;
    /// Gated LoRA backward. Accumulates `da += dhᵀ · dropout(x)` and `db += scale · dyᵀ · u`
    /// (f32, across micro-batches), writes `dgate = scale · (dy · B) ⊙ h`, and adds the input
    /// gradient `dx += dropout'(dh · A)` where `dh = scale · (dy · B) ⊙ gate`.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        x: &Tensor<Self>,
        lora: &Lora<Self>,
        gate: &Tensor<Self>,
        dropout: Dropout,
        h: &Tensor<Self>,
        u: &Tensor<Self>,
        dy: &Tensor<Self>,
        da: &mut Tensor<Self>,
        db: &mut Tensor<Self>,
        dgate: &mut Tensor<Self>,
        dx: &mut Tensor<Self>,
    ) -> Result<()>;

    /// Squared L2 norm of each sample's LoRA weight gradient, `‖dA_s‖² + ‖dB_s‖²`, where dA_s
    /// and dB_s are what `lora_backward` without dropout would accumulate from the sample's
    /// rows alone; `samples` are `(first row, rows)` ranges of x's rows. For gradient-based
    /// data pruning (`train::step::sample_scores`); `h` is the forward's, as `lora_backward`
    /// takes it.
    #[allow(clippy::too_many_arguments)]
    fn lora_sample_grad_sq_norms(
        &self,
        x: &Tensor<Self>,
        lora: &Lora<Self>,
        gate: &Tensor<Self>,
        h: &Tensor<Self>,
        u: &Tensor<Self>,
        dy: &Tensor<Self>,
        samples: &[(usize, usize)],
    ) -> Result<Vec<f32>>;

    /// Fused softmax cross-entropy, forward and backward, over a chunk of rows: `logits`
    /// `[T, V]` is overwritten with its gradient `(softmax(logits) − onehot(label)) · grad_scale`
    /// (zero rows where the label is `IGNORE_LABEL`), and `loss` `[T]` f32 receives
    /// `logsumexp(logits) − logits[label]` per row (0 for ignored rows). Callers run it over
    /// chunks of token rows so full `[tokens × vocab]` logits are never kept.
    fn cross_entropy(
        &self,
        logits: &mut Tensor<Self>,
        labels: &Tensor<Self>,
        grad_scale: f32,
        loss: &mut Tensor<Self>,
    ) -> Result<()>;
    /// One AdamW step (`step` counts from 1) on f32 `param` with f32 moments `m`, `v`; the
    /// gradient is multiplied by `grad_scale` first (gradient clipping, averaging).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        hp: AdamW,
        step: u32,
        grad_scale: f32,
    ) -> Result<()>;
    /// `out[0] = Σ x²` over an f32 tensor (for the global gradient norm), deterministic.
    fn sum_squares(&self, x: &Tensor<Self>, out: &mut Tensor<Self>) -> Result<()>;

    /// Gradients of `attention`; dk and dv are summed over the query heads sharing a KV head
    /// and are overwritten (not accumulated).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        positions: &Tensor<Self>,
        spans: &[SeqSpan],
        dy: &Tensor<Self>,
        dq: &mut Tensor<Self>,
        dk: &mut Tensor<Self>,
        dv: &mut Tensor<Self>,
    ) -> Result<()>;

    /// `attention` that also leaves, in `saved` (f32 `[Tq, H]`), what this backend's
    /// `attention_backward_saved` can reuse instead of recomputing the forward (the GPU's
    /// tiled kernels: each row's log-sum-exp in their own base). Its contents mean nothing to
    /// other code. The default computes `attention` and leaves `saved` as it is.
    #[allow(clippy::too_many_arguments)]
    fn attention_saving(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        positions: &Tensor<Self>,
        spans: &[SeqSpan],
        out: &mut Tensor<Self>,
        saved: &mut Tensor<Self>,
    ) -> Result<()> {
        let _ = saved;
        self.attention(q, k, v, positions, spans, out)
    }

    /// `attention_backward` given the forward's output `o` and `saved`, both exactly as
    /// `attention_saving` left them for the same q, k, v, positions and spans; the result is the
    /// same as `attention_backward`'s. The default ignores them and recomputes.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_saved(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        positions: &Tensor<Self>,
        spans: &[SeqSpan],
        o: &Tensor<Self>,
        saved: &Tensor<Self>,
        dy: &Tensor<Self>,
        dq: &mut Tensor<Self>,
        dk: &mut Tensor<Self>,
        dv: &mut Tensor<Self>,
    ) -> Result<()> {
        let _ = (o, saved);
        self.attention_backward(q, k, v, positions, spans, dy, dq, dk, dv)
    }

    /// The paged KV cache's slot writes: row `host_slots[t]` of `k_cache` / `v_cache` (`[slots,
    /// kv_heads, head_dim]`) becomes row t of `k` / `v` (`[T, kv_heads, head_dim]`); `slots` is
    /// the same list on the backend (u32).
    fn kv_write(
        &self,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        slots: &Tensor<Self>,
        host_slots: &[u32],
        k_cache: &mut Tensor<Self>,
        v_cache: &mut Tensor<Self>,
    ) -> Result<()>;
    /// The reverse of [`Backend::kv_write`]: row t of `k` / `v` becomes row `host_slots[t]` of
    /// the caches (a sequence's K/V made contiguous for the flash attention of a long prefill).
    fn kv_gather(
        &self,
        k_cache: &Tensor<Self>,
        v_cache: &Tensor<Self>,
        slots: &Tensor<Self>,
        host_slots: &[u32],
        k: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
    ) -> Result<()>;
    /// Copy `n` rows of `t` from `src_row` to `dst_row` (ranges must not overlap): a paged-KV
    /// block duplicated for copy-on-write.
    fn copy_rows_within(
        &self,
        t: &mut Tensor<Self>,
        src_row: usize,
        dst_row: usize,
        n: usize,
    ) -> Result<()>;
    /// Causal GQA attention of `batch.queries` new tokens per sequence over the paged cache
    /// (softmax scale 1/sqrt(head_dim)): q, out `[sequences · queries, heads, head_dim]`, caches
    /// `[slots, kv_heads, head_dim]`. The same numbers as [`Backend::attention`] over the
    /// sequence's K/V stored contiguously (to the backend's rounding).
    fn paged_attention(
        &self,
        q: &Tensor<Self>,
        k_cache: &Tensor<Self>,
        v_cache: &Tensor<Self>,
        batch: &PagedBatch<'_, Self>,
        out: &mut Tensor<Self>,
    ) -> Result<()>;

    /// One token per row of f32 `logits` `[B, V]`, drawn with the caller's `uniforms[b]` in
    /// [0, 1) under `params[b]`, exactly as `sampling::sample_row` defines it (so every backend
    /// picks the same token). A row with a NaN or +inf, or no finite logit, is an error naming it.
    fn sample(
        &self,
        logits: &Tensor<Self>,
        params: &[SamplingParams],
        uniforms: &[f32],
    ) -> Result<Vec<u32>>;

    /// `log softmax(logits[b])[ids[b·n + j]]` for f32 `logits` `[B, V]` and `n = ids.len() / B`
    /// ids per row (Yes/No scoring); an id outside the vocabulary is an error.
    fn token_logprobs(&self, logits: &Tensor<Self>, ids: &[u32]) -> Result<Vec<f32>>;
}

/// Shape checks shared by every backend's `token_logprobs`; returns (rows, vocab, ids per row).
pub fn check_logprob_ids<B: Backend>(
    logits: &Tensor<B>,
    ids: &[u32],
) -> Result<(usize, usize, usize)> {
    let op = "token_logprobs";
    expect_dtype(op, "logits", logits, DType::F32)?;
    let (rows, vocab) = logits.rows_cols();
    if rows == 0 || !ids.len().is_multiple_of(rows) {
        return Err(Error::Shape(format!(
            "{op}: {} ids do not split evenly over {rows} rows",
            ids.len()
        )));
    }
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::Invalid(format!(
            "{op}: token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok((rows, vocab, ids.len() / rows))
}

/// Shape check helper for op wrappers.
pub fn expect_shape<B: Backend>(
    op: &str,
    what: &str,
    t: &Tensor<B>,
    shape: &[usize],
) -> Result<()> {
    if t.shape != shape {
        return Err(Error::Shape(format!(
            "{op}: {what} has shape {:?}, expected {shape:?}",
            t.shape
        )));
    }
    Ok(())
}

pub fn expect_dtype<B: Backend>(op: &str, what: &str, t: &Tensor<B>, dtype: DType) -> Result<()> {
    if t.dtype != dtype {
        return Err(Error::Shape(format!(
            "{op}: {what} has dtype {}, expected {dtype}",
            t.dtype
        )));
    }
    Ok(())
}

/// Shape checks shared by every backend's `kv_write` and `kv_gather` (`op`); returns (tokens,
/// row, cache slots).
pub fn check_kv_rows<B: Backend>(
    op: &str,
    k: &Tensor<B>,
    v: &Tensor<B>,
    slots: &Tensor<B>,
    host_slots: &[u32],
    k_cache: &Tensor<B>,
    v_cache: &Tensor<B>,
) -> Result<(usize, usize, usize)> {
    let (t, row) = k.outer_rows();
    let (cache_slots, cache_row) = k_cache.outer_rows();
    if v.shape != k.shape
        || v_cache.shape != k_cache.shape
        || k.dtype != k_cache.dtype
        || v.dtype != k.dtype
        || v_cache.dtype != k.dtype
        || row != cache_row
        || host_slots.len() != t
        || slots.numel() != t
    {
        return Err(Error::Shape(format!(
            "{op}: k {:?} / v {:?} {} with {} slots ({} on the host) into caches {:?} / {:?} {}",
            k.shape,
            v.shape,
            k.dtype,
            slots.numel(),
            host_slots.len(),
            k_cache.shape,
            v_cache.shape,
            k_cache.dtype
        )));
    }
    if let Some(bad) = host_slots.iter().find(|&&s| s as usize >= cache_slots) {
        return Err(Error::Invalid(format!(
            "{op}: slot {bad} is outside the cache of {cache_slots} slots"
        )));
    }
    Ok((t, row, cache_slots))
}

/// Shape checks shared by every backend's `paged_attention`; returns (heads, kv_heads,
/// head_dim, cache slots).
pub fn check_paged_attention<B: Backend>(
    q: &Tensor<B>,
    k_cache: &Tensor<B>,
    v_cache: &Tensor<B>,
    batch: &PagedBatch<'_, B>,
    out: &Tensor<B>,
) -> Result<(usize, usize, usize, usize)> {
    let op = "paged_attention";
    if q.shape.len() != 3 || k_cache.shape.len() != 3 {
        return Err(Error::Shape(format!(
            "{op}: q {:?} and the K cache {:?} must be [rows, heads, head_dim]",
            q.shape, k_cache.shape
        )));
    }
    let (rows, heads, hd) = (q.shape[0], q.shape[1], q.shape[2]);
    let (slots, kvh, khd) = (k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]);
    let nseq = batch.host_context_lens.len();
    if v_cache.shape != k_cache.shape
        || out.shape != q.shape
        || khd != hd
        || kvh == 0
        || heads % kvh != 0
        || rows != nseq * batch.queries
        || batch.context_lens.numel() != nseq
        || batch.block_tables.numel() != batch.host_block_tables.len()
    {
        return Err(Error::Shape(format!(
            "{op}: q {:?}, out {:?}, caches {:?} / {:?} for {nseq} sequences × {} queries",
            q.shape, out.shape, k_cache.shape, v_cache.shape, batch.queries
        )));
    }
    batch.check(op, slots)?;
    Ok((heads, kvh, hd, slots))
}

/// Checks spans against the q / kv row counts.
pub fn check_spans(op: &str, spans: &[SeqSpan], tq: usize, tk: usize) -> Result<()> {
    for s in spans {
        if s.q_start + s.q_len > tq || s.kv_start + s.kv_len > tk {
            return Err(Error::Shape(format!(
                "{op}: span {s:?} exceeds q rows {tq} / kv rows {tk}"
            )));
        }
    }
    Ok(())
}
