//! The memory plan (DESIGN.md §4): every byte a training step needs, named before it runs, for a
//! model shape, batch, sequence length, LoRA configuration, checkpointing policy and budget.
//! `recforge plan` prints it; a run whose plan does not fit stops before it starts.
//!
//! Sizes follow the GPU backend's storage: int8 frozen linears with f32 row scales, bf16
//! activations / embeddings / head, f32 norm weights, LoRA parameters + gradients + AdamW
//! moments in f32, f32 logits for one chunk of rows at a time — each buffer in the 256-byte
//! blocks the device hands out. On a device the run is then allocated as one arena of this
//! size (`backend::gpu::arena`), and the simulator's measured peak equals it
//! (`tests/memory_plan.rs`).

use crate::backend::gpu::backend::GEMV_MAX_ROWS;
use crate::backend::gpu::ops::{
    attention::tiled_head_dim, optim::SUM_SQUARES_BLOCKS, paged::PAGED_DECODE_PARTITION,
};
use crate::model::llama::GATHER_ABOVE_QUERIES;
use crate::model::LlamaConfig;

pub const GIB: u64 = 1 << 30;

/// Whether runs on a device reserve the plan's arena: yes unless RECFORGE_ARENA is "off" (or
/// "0"), the escape hatch should a plan ever undercount a run.
pub fn arena_enabled() -> bool {
    !matches!(
        std::env::var("RECFORGE_ARENA").as_deref(),
        Ok("off") | Ok("0")
    )
}

/// What the host can give a new allocation without swapping: MemAvailable from /proc/meminfo
/// (None where there is no such file, e.g. not Linux).
pub fn host_available() -> Option<u64> {
    meminfo_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// MemAvailable (kB in the file) in bytes.
pub fn meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut f = line.split_whitespace().skip(1);
    let n: u64 = f.next()?.parse().ok()?;
    match f.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

/// A run on the CPU has no device budget, but its plan still says what it needs at least (the
/// CPU keeps activations in f32, the plan counts them in bf16): refuse one that cannot fit the
/// host's available memory before it allocates, rather than let the kernel's OOM killer end
/// it. `needed` is what is still to be allocated; `available` comes from [`host_available`].
pub fn check_host(needed: u64, available: u64, what: &str, fix: &str) -> Result<(), String> {
    if needed <= available {
        return Ok(());
    }
    Err(format!(
        "{what} needs at least {} of host memory by the memory plan, but {} is available \
         (MemAvailable); {fix}",
        human(needed),
        human(available)
    ))
}

/// The linear layers LoRA can target, in PEFT's names.
pub const TARGETS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// The categories allocated before the first step (the model, then the adapter).
pub const PERSISTENT: [&str; 3] = ["weights (int8)", "kept precision", "lora"];

/// Which layers recompute their activations in the backward pass instead of keeping them from
/// the forward pass (gradient checkpointing per layer). Recomputing changes no number: the
/// gradients are the same either way; it trades one extra forward pass of those layers for the
/// memory of their saved tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpointing {
    /// Every layer recomputes: only the layer inputs are kept (the least memory).
    All,
    /// No layer recomputes: every layer's activations are kept (the fastest step).
    Off,
    /// The first `n` layers recompute, the others keep their activations.
    Layers(usize),
}

impl Checkpointing {
    /// How many of `layers` layers recompute.
    pub fn recomputed(self, layers: usize) -> usize {
        match self {
            Checkpointing::All => layers,
            Checkpointing::Off => 0,
            Checkpointing::Layers(n) => n.min(layers),
        }
    }
    /// `Layers(n)` must name at most the model's layers.
    pub fn check(self, layers: usize) -> Result<(), String> {
        match self {
            Checkpointing::Layers(n) if n > layers => Err(format!(
                "checkpointing {n} layers, but the model has {layers}"
            )),
            _ => Ok(()),
        }
    }
    /// For tables and progress lines: "on (all 32 layers)", "off", "5 of 32 layers".
    pub fn describe(self, layers: usize) -> String {
        match self.recomputed(layers) {
            0 => "off".into(),
            n if n == layers => format!("on (all {layers} layers)"),
            n => format!("{n} of {layers} layers"),
        }
    }
    /// The JSON form in trainer states: "all", "off" or a layer count.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Checkpointing::All => "all".into(),
            Checkpointing::Off => "off".into(),
            Checkpointing::Layers(n) => n.into(),
        }
    }
    /// Reads `to_json`'s form, and the booleans of older trainer states (true = all).
    pub fn from_json(v: &serde_json::Value) -> Option<Checkpointing> {
        match v {
            serde_json::Value::Bool(true) => Some(Checkpointing::All),
            serde_json::Value::Bool(false) => Some(Checkpointing::Off),
            serde_json::Value::Number(n) => n.as_u64().map(|n| Checkpointing::Layers(n as usize)),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }
}

impl std::str::FromStr for Checkpointing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "on" | "all" => Ok(Checkpointing::All),
            "off" | "none" => Ok(Checkpointing::Off),
            n => n.parse().map(Checkpointing::Layers).map_err(|_| {
                format!("checkpointing '{s}': expected on, off, auto or a number of layers")
            }),
        }
    }
}

/// What the command line asks for: a fixed policy, or `auto` — the plan picks the fewest
/// recomputed layers that fit the budget (`auto_checkpointing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointChoice {
    Auto,
    Fixed(Checkpointing),
}

impl std::str::FromStr for CheckpointChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(CheckpointChoice::Auto),
            other => other.parse().map(CheckpointChoice::Fixed),
        }
    }
}

/// What `auto` leaves unplanned under the budget: the CUDA context, the loaded kernel modules
/// and the driver's own allocations live outside the plan (a few hundred MiB on current
/// drivers), so filling the budget to the byte would fail on a card of exactly that size.
pub const AUTO_HEADROOM: u64 = GIB;

#[derive(Clone, Debug)]
pub struct TrainSetup {
    pub model: LlamaConfig,
    pub batch: usize,
    pub seq: usize,
    pub lora_rank: usize,
    /// Any of TARGETS.
    pub targets: Vec<String>,
    /// Which layers recompute their activations during the backward pass.
    pub checkpointing: Checkpointing,
    /// Rows of logits computed (and turned into gradients) at a time.
    pub logits_chunk: usize,
    pub budget: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub category: &'static str,
    pub what: String,
    pub bytes: u64,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub entries: Vec<Entry>,
    pub budget: u64,
}

impl Plan {
    pub fn total(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }
    pub fn fits(&self) -> bool {
        self.total() <= self.budget
    }
    pub fn category_total(&self, category: &str) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.category == category)
            .map(|e| e.bytes)
            .sum()
    }
    /// Bytes that exist before a step starts and outlive it: the frozen model and the adapter
    /// with its gradients and optimizer moments.
    pub fn persistent(&self) -> u64 {
        PERSISTENT.iter().map(|c| self.category_total(c)).sum()
    }
    /// What the training step itself allocates: the total less `persistent`.
    pub fn step_bytes(&self) -> u64 {
        self.total() - self.persistent()
    }
    /// The plan as a table: one line per entry, then totals per category and the verdict.
    pub fn table(&self) -> String {
        let mut s = format!("{:<22} {:<58} {:>12}\n", "category", "tensors", "bytes");
        for e in &self.entries {
            s.push_str(&format!(
                "{:<22} {:<58} {:>12}\n",
                e.category,
                e.what,
                human(e.bytes)
            ));
        }
        s.push_str(&format!("{:<22} {:<58} {:>12}\n", "", "", "------------"));
        let mut cats: Vec<&str> = self.entries.iter().map(|e| e.category).collect();
        cats.dedup();
        for c in cats {
            s.push_str(&format!(
                "{:<22} {:<58} {:>12}\n",
                c,
                "(total)",
                human(self.category_total(c))
            ));
        }
        s.push_str(&format!(
            "{:<22} {:<58} {:>12}\nbudget {}: {}\n",
            "TOTAL",
            "",
            human(self.total()),
            human(self.budget),
            if self.fits() {
                format!("fits, {} to spare", human(self.budget - self.total()))
            } else {
                format!("does NOT fit, {} over", human(self.total() - self.budget))
            }
        ));
        s
    }
}

pub fn human(b: u64) -> String {
    if b >= GIB {
        format!("{:.2} GiB", b as f64 / GIB as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Parse "24GiB", "24 GiB", "512MiB", "24G", "64 KiB", "1TiB", or a byte count (the units
/// are binary whether written GiB or GB: what `human` prints reads back).
pub fn parse_bytes(s: &str) -> Option<u64> {
    const UNITS: [(&[&str], u32); 4] = [
        (&["kib", "kb", "k"], 10),
        (&["mib", "mb", "m"], 20),
        (&["gib", "gb", "g"], 30),
        (&["tib", "tb", "t"], 40),
    ];
    let t = s.trim().to_ascii_lowercase().replace(' ', "");
    let (num, shift) = UNITS
        .iter()
        .find_map(|(suffixes, shift)| {
            let n = suffixes.iter().find_map(|u| t.strip_suffix(u))?;
            Some((n, *shift))
        })
        .unwrap_or_else(|| (t.strip_suffix('b').unwrap_or(&t), 0));
    let mul = 1u64 << shift;
    let v: f64 = num.parse().ok()?;
    // At least a byte, and below 2^63 so the cast cannot saturate into a budget nobody meant.
    let bytes = v * mul as f64;
    (bytes >= 1.0 && bytes < 2f64.powi(63)).then_some(bytes as u64)
}

/// A named model shape (random int8 weights for benchmarks and planning).
pub fn named_shape(name: &str) -> Option<LlamaConfig> {
    let mk = |hidden, inter, layers, heads, kv, vocab, theta, tied, context| LlamaConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hidden / heads,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        max_position_embeddings: context,
        tie_word_embeddings: tied,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    };
    Some(match name {
        // LLaMA-2's context; SmolLM2's as its published config and GGUF give it.
        "llama-7b" => mk(4096, 11008, 32, 32, 32, 32000, 10000.0, false, 4096),
        "llama-13b" => mk(5120, 13824, 40, 40, 40, 32000, 10000.0, false, 4096),
        "smollm2-135m" => mk(576, 1536, 30, 9, 3, 49152, 100000.0, true, 8192),
        _ => return None,
    })
}

/// (out, in) of each target linear.
fn linear_dims(c: &LlamaConfig, target: &str) -> Option<(usize, usize)> {
    let (d, f, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    Some(match target {
        "q" => (q, d),
        "k" | "v" => (kv, d),
        "o" => (d, q),
        "gate" | "up" => (f, d),
        "down" => (d, f),
        _ => return None,
    })
}

/// Device bytes of one buffer of `n` elements of `size` bytes: buffers are handed out in
/// 256-byte blocks (`backend::gpu::arena`), so the plan counts what the device really holds.
fn blk(n: u64, size: u64) -> u64 {
    crate::backend::gpu::arena::block_bytes(n * size)
}

/// Device bytes of a bf16 buffer of `n` elements.
fn bf(n: u64) -> u64 {
    blk(n, 2)
}

/// Device bytes of an f32 (or i32 / u32) buffer of `n` elements.
fn f4(n: u64) -> u64 {
    blk(n, 4)
}

/// The W8A8 linear's scratch for `t` rows — the int8 input at the widest K, its column maxima
/// and outlier columns, the flag, the row scales; none on the GEMV path (≤ GEMV_MAX_ROWS).
fn int8_scratch(c: &LlamaConfig, t: u64) -> u64 {
    let kmax = (c.hidden_size.max(c.q_dim()).max(c.intermediate_size)) as u64;
    if t > GEMV_MAX_ROWS as u64 {
        2 * f4(kmax) + f4(1) + blk(t * kmax, 1) + f4(t)
    } else {
        0
    }
}

/// The tensors of `Llama::layer_stack` over `t` rows: token ids, x, the norm output, q, k, v,
/// the attention output, the projection, gate, up, silu(gate)·up, and with an adapter of rank
/// r the h and u of three projections and the all-ones gate, each `[t, r]` f32.
fn layer_stack(c: &LlamaConfig, t: u64, rank: Option<u64>) -> u64 {
    let (d, f, qd, kvd) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
    );
    f4(t)
        + 3 * bf(t * d)
        + 2 * bf(t * qd)
        + 2 * bf(t * kvd)
        + 3 * bf(t * f)
        + rank.map_or(0, |r| 7 * f4(t * r))
}

/// Appending a plan's rows.
trait AddEntry {
    fn add(&mut self, category: &'static str, what: String, bytes: u64);
}

impl AddEntry for Vec<Entry> {
    fn add(&mut self, category: &'static str, what: String, bytes: u64) {
        self.push(Entry {
            category,
            what,
            bytes,
        })
    }
}

/// The frozen model as the device holds it: int8 linears with their row scales, and the
/// tensors kept in precision (embedding, untied head, norms).
fn model_entries(c: &LlamaConfig) -> Vec<Entry> {
    let (l, d, v) = (
        c.num_hidden_layers as u64,
        c.hidden_size as u64,
        c.vocab_size as u64,
    );
    let mut e = vec![];
    // Frozen weights: each linear an int8 [out, in] matrix and an f32 scale per row.
    let dims: Vec<(u64, u64)> = TARGETS
        .iter()
        .filter_map(|t| linear_dims(c, t))
        .map(|(o, i)| (o as u64, i as u64))
        .collect();
    e.add(
        "weights (int8)",
        format!("{l} layers × q,k,v,o,gate,up,down int8"),
        l * dims.iter().map(|&(o, i)| blk(o * i, 1)).sum::<u64>(),
    );
    e.add(
        "weights (int8)",
        format!("{l} layers × per-row f32 scales"),
        l * dims.iter().map(|&(o, _)| f4(o)).sum::<u64>(),
    );
    e.add(
        "kept precision",
        format!("embedding [{v}, {d}] bf16"),
        bf(v * d),
    );
    if !c.tie_word_embeddings {
        e.add(
            "kept precision",
            format!("output head [{v}, {d}] bf16"),
            bf(v * d),
        );
    }
    e.add(
        "kept precision",
        format!("{} norm weights [{d}] f32", 2 * l + 1),
        (2 * l + 1) * f4(d),
    );
    e
}

/// Every name in `targets` is a linear of `c`, each at most once (a repeated target would be
/// counted twice here but trained once).
fn check_targets(c: &LlamaConfig, targets: &[String]) -> Result<(), String> {
    for (i, t) in targets.iter().enumerate() {
        if linear_dims(c, t).is_none() {
            return Err(format!(
                "unknown LoRA target '{t}' (expected some of {})",
                TARGETS.join(", ")
            ));
        }
        if targets[..i].contains(t) {
            return Err(format!("LoRA target '{t}' is listed twice"));
        }
    }
    Ok(())
}

/// An adapter the plan counts: a rank of at least 1 on at least one valid target (what
/// `LoraConfig::validate` asks of a run).
/// The largest counts a plan takes: sequences in a step, tokens of one sequence, tokens of
/// one step, LoRA rank, prompts of a batched run. Far past any device's memory, and small
/// enough — with the model dimensions `LlamaConfig::validate` takes — that no byte count of
/// a plan overflows 64 bits.
pub const MAX_SEQUENCES: usize = 1 << 16;
pub const MAX_SEQ_TOKENS: usize = 1 << 24;
pub const MAX_STEP_TOKENS: usize = 1 << 26;
pub const MAX_RANK: usize = 1 << 16;
pub const MAX_PROMPTS: usize = 1 << 24;

/// The model's config is one `LlamaConfig::validate` takes, and each `(what, value, most)`
/// is at most `most`.
fn check_sizes(c: &LlamaConfig, sizes: &[(&str, usize, usize)]) -> Result<(), String> {
    c.validate()?;
    check_limits(sizes)
}

/// Each `(what, value, most)` is at most `most`.
fn check_limits(sizes: &[(&str, usize, usize)]) -> Result<(), String> {
    for &(what, v, most) in sizes {
        if v > most {
            return Err(format!(
                "{what} {v} is more than a memory plan takes (at most {most})"
            ));
        }
    }
    Ok(())
}

fn check_lora(c: &LlamaConfig, rank: usize, targets: &[String]) -> Result<(), String> {
    check_targets(c, targets)?;
    if rank == 0 {
        return Err("LoRA rank r must be at least 1".into());
    }
    check_limits(&[("LoRA rank", rank, MAX_RANK)])?;
    if targets.is_empty() {
        return Err(format!(
            "LoRA needs at least one target module (some of {})",
            TARGETS.join(", ")
        ));
    }
    Ok(())
}

/// The plan of one training step (forward + backward + optimizer) for `s`: every buffer the
/// trainer and the GPU backend allocate (`train::step::Workspace`, the adapter, each op's
/// scratch), tensor by tensor in 256-byte blocks, with the transient scratch counted at its
/// largest moment. The simulator measures the same step's peak exactly, and the tests hold
/// the two together (`tests/memory_plan.rs`).
pub fn plan_training(s: &TrainSetup) -> Result<Plan, String> {
    plan_step(s, false)
}

/// A gradient-scoring run (`rec prune`, `train::step::sample_scores`): a training step's
/// memory without AdamW's moments (`DevAdapter::upload_for_gradients`: an empty tensor, one
/// block, for each of them) in which every adapted projection's backward also measures each
/// sample's gradient, one sample at a time, in a scratch of its own: dH and the gate gradient
/// `[seq, r]`, one projection's dA and dB, the sum-of-squares partials, and the `[batch, 2]`
/// sums read back. `s.seq` is the longest sample and `s.batch` the samples a pass measures.
pub fn plan_sample_scoring(s: &TrainSetup) -> Result<Plan, String> {
    plan_step(s, true)
}

/// [`plan_training`], or with `sample_norms` [`plan_sample_scoring`].
fn plan_step(s: &TrainSetup, sample_norms: bool) -> Result<Plan, String> {
    let c = &s.model;
    check_sizes(
        c,
        &[
            ("batch", s.batch, MAX_SEQUENCES),
            ("sequence length", s.seq, MAX_SEQ_TOKENS),
            (
                "tokens a step (batch × sequence)",
                s.batch.saturating_mul(s.seq),
                MAX_STEP_TOKENS,
            ),
            ("logits chunk", s.logits_chunk, MAX_STEP_TOKENS),
        ],
    )?;
    check_lora(c, s.lora_rank, &s.targets)?;
    s.checkpointing.check(c.num_hidden_layers)?;
    if s.batch == 0 || s.seq == 0 || s.logits_chunk == 0 {
        return Err("batch, sequence length and logits chunk must be positive".into());
    }
    let (l, d, f, v) = (
        c.num_hidden_layers as u64,
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let (qd, kvd, heads, hd) = (
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.num_attention_heads as u64,
        c.head_dim as u64,
    );
    let t = (s.batch * s.seq) as u64;
    let r = s.lora_rank as u64;
    let nt = s.targets.len() as u64;
    let mut e = model_entries(c);

    // LoRA: parameters, gradients, AdamW m and v — all f32, A [r, in] and B [out, r] each.
    let lora_one: u64 = s
        .targets
        .iter()
        .filter_map(|t| linear_dims(c, t))
        .map(|(o, i)| f4(r * i as u64) + f4(r * o as u64))
        .sum::<u64>()
        * l;
    let tl = s.targets.join(",");
    e.add(
        "lora",
        format!("A, B for {tl}, r={r}, {l} layers (f32)"),
        lora_one,
    );
    e.add("lora", "gradients (f32)".into(), lora_one);
    if sample_norms {
        let empty = 4 * blk(0, 4) * s.targets.len() as u64 * l;
        e.add("lora", "AdamW m, v: not kept (empty tensors)".into(), empty);
    } else {
        e.add("lora", "AdamW m, v (f32)".into(), 2 * lora_one);
    }

    // The step's workspace (train::step::Workspace), allocated once per micro-batch size.
    e.add(
        "activations",
        format!("{} layer inputs + last output [{t}, {d}] bf16", l + 1),
        (l + 1) * bf(t * d),
    );
    // What one layer's backward reads: h1, x2, h2 [t, d]; q, attn [t, q_dim]; k, v
    // [t, kv_dim]; gate, up, silu(gate)·up [t, ffn]; attention's log-sum-exp [t, heads] f32;
    // LoRA h, u [t, r] f32 per target. (o and down add the residual as they write, so no
    // projection output is kept.)
    let per_layer = 3 * bf(t * d)
        + 2 * bf(t * qd)
        + 2 * bf(t * kvd)
        + 3 * bf(t * f)
        + f4(t * heads)
        + 2 * nt * f4(t * r);
    // Layers that keep their activations hold their own set; all recomputing layers share one.
    let recomputed = s.checkpointing.recomputed(l as usize) as u64;
    if recomputed < l {
        e.add(
            "activations",
            format!("{} layers' saved tensors for {t} tokens", l - recomputed),
            (l - recomputed) * per_layer,
        );
    }
    if recomputed > 0 {
        e.add(
            "recompute working set",
            format!("one layer's saved tensors for {t} tokens"),
            per_layer,
        );
    }
    e.add(
        "backward working set",
        "norm out, dX, dH, dAttn, dQ, dK, dV, dFFN, dG, dU bf16".to_string(),
        3 * bf(t * d) + 2 * bf(t * qd) + 2 * bf(t * kvd) + 3 * bf(t * f),
    );
    e.add(
        "backward working set",
        format!("LoRA gate (ones) + its gradient [{t}, {}] f32", r.max(1)),
        2 * f4(t * r.max(1)),
    );
    e.add(
        "step inputs",
        format!("token ids, positions [{t}] u32"),
        2 * f4(t),
    );

    // Transient scratch: the largest moment of the step wins.
    let spans = f4(4 * s.batch as u64);
    let int8 = int8_scratch(c, t);
    let kmax = d.max(qd).max(f);
    // The forward writes its log-sum-exp into the saved set; the tiled backward reuses it and
    // the forward's output (its own O and lse buffers are empty), keeping D and dQ in f32.
    let attn_fwd = spans;
    let tiled = tiled_head_dim(hd as usize);
    let attn_bwd = spans
        + 2 * f4(t * kvd)
        + bf(0)
        + f4(0)
        + if tiled {
            f4(t * heads) + f4(t * qd)
        } else {
            2 * f4(0)
        };
    let lora_bwd = if nt > 0 { f4(t * r) } else { 0 };
    let rows = (s.logits_chunk as u64).min(t);
    let head_chunk = bf(rows * d) + f4(rows * v) + f4(rows) + bf(rows * v);
    let optim = 2 * f4(1) + f4(SUM_SQUARES_BLOCKS as u64);
    // Scoring for pruning: one sample's dH, dgate, one projection's dA and dB (the largest),
    // the sum-of-squares partials and every sample's two sums.
    let sample_norm = s
        .targets
        .iter()
        .filter_map(|t| linear_dims(c, t))
        .map(|(o, i)| f4(r * i as u64) + f4(o as u64 * r))
        .max()
        .filter(|_| sample_norms)
        .map(|grads| {
            2 * f4(s.seq as u64 * r)
                + grads
                + f4(SUM_SQUARES_BLOCKS as u64)
                + f4(2 * s.batch as u64)
        });
    // First, so that on a tie another phase names the peak.
    let phases = sample_norm
        .map(|b| {
            (
                b,
                format!(
                    "per-sample gradient: dH, dgate [{}, {r}], dA, dB f32",
                    s.seq
                ),
            )
        })
        .into_iter()
        .chain([
            (
                int8,
                format!("int8 linear: x [{t}, {kmax}] int8, scales, outlier cols"),
            ),
            (attn_fwd, "attention fwd: span table".to_string()),
            (
                attn_bwd,
                if tiled {
                    format!("attention bwd: dK, dV, dQ [{t}, ·] f32, D")
                } else {
                    format!("attention bwd: dK, dV [{t}, {kvd}] f32")
                },
            ),
            (lora_bwd, format!("LoRA bwd: dH [{t}, {r}] f32")),
            (
                head_chunk,
                format!("head: logits [{rows}, {v}] f32 + gradient bf16"),
            ),
            (optim, "gradient-norm partials".into()),
        ]);
    let (peak, what) = phases.max_by_key(|p| p.0).unwrap_or_default();
    e.add("peak scratch", what, peak);
    Ok(Plan {
        entries: e,
        budget: s.budget,
    })
}

/// A scoring run (`rec eval`): prompts share a `prefix` of tokens whose K/V is computed once,
/// then run in packed batches, each `(prompts, tokens of their own)`; the plan holds the
/// largest. `lora_rank` and `targets` are the adapter's; `adapter` says whether one is loaded
/// (without, the workspace still carries the targets' LoRA buffers).
#[derive(Clone, Debug)]
pub struct ScoreSetup {
    pub model: LlamaConfig,
    pub prefix: usize,
    pub batches: Vec<(usize, usize)>,
    pub lora_rank: usize,
    pub targets: Vec<String>,
    pub adapter: bool,
    pub budget: u64,
}

/// A frozen adapter (`train::DevAdapter::upload_frozen`): A and B of each target in every
/// layer; the gradient and moment tensors are empty (a block each).
fn add_frozen_adapter(e: &mut Vec<Entry>, c: &LlamaConfig, rank: usize, targets: &[String]) {
    let (l, r) = (c.num_hidden_layers as u64, rank as u64);
    let params: u64 = targets
        .iter()
        .filter_map(|t| linear_dims(c, t))
        .map(|(o, i)| f4(r * i as u64) + f4(r * o as u64) + 6 * blk(0, 4))
        .sum::<u64>()
        * l;
    e.add(
        "lora",
        format!(
            "A, B for {}, r={r}, {l} layers (f32; 6 empty tensors a block each)",
            targets.join(",")
        ),
        params,
    );
}

/// The plan of a scoring run (`rec::eval::score` on the GPU backend): the model, the frozen
/// adapter, the shared prefix's K/V, and the larger of the prefix's own forward and one batch's
/// (its forward-only workspace, the concatenated prefix + own K/V attention reads, the ops'
/// scratch, the Yes/No logits), buffer by buffer in 256-byte blocks, as [`plan_training`].
pub fn plan_scoring(s: &ScoreSetup) -> Result<Plan, String> {
    let c = &s.model;
    let (most_prompts, most_tokens) = s
        .batches
        .iter()
        .fold((0, 0), |(n, t), &(bn, bt)| (n.max(bn), t.max(bt)));
    check_sizes(
        c,
        &[
            ("shared prefix", s.prefix, MAX_SEQ_TOKENS),
            ("prompts a batch", most_prompts, MAX_SEQUENCES),
            ("tokens a batch", most_tokens, MAX_STEP_TOKENS),
        ],
    )?;
    if s.adapter {
        check_lora(c, s.lora_rank, &s.targets)?;
    } else {
        check_targets(c, &s.targets)?;
    }
    if s.batches.is_empty() {
        return Err("a scoring run needs at least one batch".into());
    }
    if let Some(&(n, t)) = s.batches.iter().find(|&&(n, t)| n == 0 || t < n) {
        return Err(format!(
            "a scoring batch needs at least one prompt and a token of its own per prompt \
             (got {n} prompts, {t} tokens)"
        ));
    }
    let (l, d, f, v) = (
        c.num_hidden_layers as u64,
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let (qd, kvd, heads) = (
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.num_attention_heads as u64,
    );
    let p = s.prefix as u64;
    let r = s.lora_rank as u64;
    let nt = s.targets.len() as u64;
    let mut e = model_entries(c);
    if s.adapter {
        add_frozen_adapter(&mut e, c, s.lora_rank, &s.targets);
    }
    if p > 0 {
        e.add(
            "prefix K/V",
            format!("{l} layers × K, V [{p}, {kvd}] bf16"),
            2 * l * bf(p * kvd),
        );
    }
    // `train::step::Workspace::forward_only` for `t` rows: two residual-stream buffers, one
    // layer's activations (reused by every layer) with the LoRA h, u per target, the LoRA gate
    // (ones), the final norm's output, and the empty gradient buffers (a block each).
    let workspace = |t: u64| {
        2 * bf(t * d)
            + 3 * bf(t * d)
            + 2 * bf(t * qd)
            + 2 * bf(t * kvd)
            + 3 * bf(t * f)
            + f4(t * heads)
            + 2 * nt * f4(t * r)
            + f4(t * r.max(1))
            + bf(t * d)
            + 10 * blk(0, 2)
    };
    // The ops' scratch inside a forward of `t` rows, at its largest: the W8A8 linear's int8
    // input, scales and outlier columns (the GEMV path for ≤ GEMV_MAX_ROWS rows has none), the
    // attention's span table, the embedding's bad-id flag.
    let op_scratch = |t: u64, spans: u64| int8_scratch(c, t).max(f4(4 * spans)).max(f4(1));
    // The prefix's own forward (once): its workspace, token ids and positions.
    let prefix_phase = if p > 0 {
        workspace(p) + 2 * f4(p) + op_scratch(p, 1)
    } else {
        0
    };
    // One batch of n prompts, t tokens: the workspace and token ids, then the largest of (a) the
    // forward, with the positions and (with a prefix) each prompt's prefix + own K/V; (b) the
    // head over one row a prompt; (c) the Yes/No log-probabilities' ids and results.
    let moments = |n: u64, t: u64| {
        let cat = if p > 0 { 2 * bf((n * p + t) * kvd) } else { 0 };
        let forward = f4(t) + cat + op_scratch(t, n);
        let head = bf(n * d) + f4(n * v);
        let logprobs = f4(n * v) + 2 * f4(2 * n);
        (workspace(t) + f4(t), forward, head, logprobs)
    };
    let peak_of = |m: (u64, u64, u64, u64)| m.0 + m.1.max(m.2).max(m.3);
    let (n, t) = s
        .batches
        .iter()
        .map(|&(n, t)| (n as u64, t as u64))
        .max_by_key(|&(n, t)| peak_of(moments(n, t)))
        .unwrap_or((1, 1));
    let (batch_base, forward, head, logprobs) = moments(n, t);
    let batch_peak = peak_of((batch_base, forward, head, logprobs));
    if prefix_phase > batch_peak {
        e.add(
            "scoring working set",
            format!("the prefix's forward: {p} tokens (workspace, ids, positions, scratch)"),
            prefix_phase,
        );
    } else {
        e.add(
            "scoring working set",
            format!("forward-only workspace + token ids for {t} tokens"),
            batch_base,
        );
        let what = if forward >= head.max(logprobs) {
            format!(
                "fwd: K/V [{}, {kvd}] ×2 + positions + op scratch",
                n * p + t
            )
        } else if head >= logprobs {
            format!("head: last rows [{n}, {d}] bf16, logits [{n}, {v}] f32")
        } else {
            format!("logits [{n}, {v}] f32 + Yes/No ids, log-probabilities")
        };
        e.add("peak scratch", what, forward.max(head).max(logprobs));
    }
    Ok(Plan {
        entries: e,
        budget: s.budget,
    })
}

/// A generation run (`recforge generate`): one sequence, a `prompt` of tokens prefilled at once,
/// then up to `max_new` tokens decoded one at a time into a KV cache of `prompt + max_new`.
#[derive(Clone, Debug)]
pub struct GenerateSetup {
    pub model: LlamaConfig,
    pub prompt: usize,
    pub max_new: usize,
    pub budget: u64,
    /// A frozen adapter applied unmerged (`generate --adapter`): its rank and targets.
    pub adapter: Option<(usize, Vec<String>)>,
}

/// The plan of a generation run (`infer::generate` on the GPU backend): the model, the KV
/// cache, and the prefill's working set (`Llama::forward_logits`: token ids, positions, the
/// residual stream, one layer's activations, the ops' scratch at its largest, the last row's
/// logits) — the prefill holds at least what any single-token decode step does — then the
/// sampler's parameters and result.
pub fn plan_generation(s: &GenerateSetup) -> Result<Plan, String> {
    let c = &s.model;
    check_sizes(
        c,
        &[
            ("prompt tokens", s.prompt, MAX_SEQ_TOKENS),
            ("new tokens", s.max_new, MAX_SEQ_TOKENS),
        ],
    )?;
    if s.prompt == 0 {
        return Err("the prompt has no tokens".into());
    }
    let (l, d, f, v) = (
        c.num_hidden_layers as u64,
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let (qd, kvd, heads) = (
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.num_attention_heads as u64,
    );
    let (t, cap) = (s.prompt as u64, (s.prompt + s.max_new) as u64);
    let mut e = model_entries(c);
    if let Some((rank, targets)) = &s.adapter {
        check_lora(c, *rank, targets)?;
        add_frozen_adapter(&mut e, c, *rank, targets);
    }
    e.add(
        "KV cache",
        format!("{l} layers × K, V [{cap}, {kvd}] bf16"),
        2 * l * bf(cap * kvd),
    );
    // Llama::forward_logits over the prompt: ids, positions, x, the norm output, q, k, v, the
    // attention output, the projection, gate, up, silu(gate)·up.
    // With an adapter, `Llama::forward_logits_with`'s h and u for three projections and the
    // all-ones gate, each [t, r] f32.
    let rank = s.adapter.as_ref().map(|(r, _)| *r as u64);
    let working = f4(t) + layer_stack(c, t, rank);
    // Inside it, the largest of: the W8A8 linear's scratch (none on the GEMV path), the
    // attention's log-sum-exp and span table, the embedding's bad-id flag, the head's last row
    // and logits.
    let int8 = int8_scratch(c, t);
    let kmax = d.max(qd).max(f);
    let attention = f4(t * heads) + f4(4);
    let head = bf(d) + f4(v);
    let inside = int8.max(attention).max(f4(1)).max(head);
    // After it, only the logits remain, with the sampler's parameters and token.
    let sampling = f4(v) + f4(4) + f4(1);
    if sampling > working + inside {
        e.add(
            "peak scratch",
            format!("logits [1, {v}] f32, sampling parameters, token"),
            sampling,
        );
    } else {
        e.add(
            "prefill working set",
            format!("ids, positions, x, one layer's tensors: {t} tokens"),
            working,
        );
        let what = if inside == int8 {
            format!("int8 linear: x [{t}, {kmax}] int8, scales, outlier cols")
        } else if inside == head {
            format!("head: last row [1, {d}] bf16, logits [1, {v}] f32")
        } else {
            format!("attention: log-sum-exp [{t}, {heads}] f32, span table")
        };
        e.add("peak scratch", what, inside);
    }
    Ok(Plan {
        entries: e,
        budget: s.budget,
    })
}

/// A batched generation run (`infer::batch::generate_batch`, `recforge generate --prompts`): the
/// prompts' lengths and how `infer::batch::cache_layout` lays out their KV cache.
#[derive(Clone, Debug)]
pub struct BatchGenerateSetup {
    pub model: LlamaConfig,
    /// Tokens of each prompt.
    pub prompts: Vec<usize>,
    /// Tokens of the prefix every prompt shares, computed once (0: none).
    pub shared_prefix: usize,
    pub max_new: usize,
    /// Most sequences decoded together.
    pub max_running: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    /// Own tokens one prefill step computes at most (a longer prompt is prefilled in chunks of
    /// this many); `infer::batch::BatchOptions::max_prefill_tokens`.
    pub max_prefill_tokens: usize,
    /// False when the cache may preempt sequences: one is then prefilled again with the tokens
    /// it had generated, so a prefill can be up to `max_new − 1` tokens longer than its prompt.
    pub holds_every_running: bool,
    pub budget: u64,
    /// A frozen adapter applied unmerged: its rank and targets.
    pub adapter: Option<(usize, Vec<String>)>,
}

/// How one step of a batched generation run reads K/V (its attention's buffers).
#[derive(Clone, Copy)]
enum StepAttention {
    /// `spans` sequences attending to the step's own K/V (nothing cached before them).
    Fresh { spans: u64 },
    /// The paged decode kernel: `n` sequences of `q` queries each, tables `max_blocks` wide,
    /// the longest context `len`.
    Paged {
        n: u64,
        max_blocks: u64,
        q: u64,
        len: u64,
    },
    /// `n` sequences' K/V, `rows` in all, gathered for the flash attention.
    Gathered { n: u64, rows: u64 },
}

/// The prefill steps a batched run may take, as (own tokens, attention, logit rows): groups of
/// requests admitted together (`infer::batch`) — at most `max_running`, their own tokens within
/// `max_prefill_tokens` — and the chunks of a request with more own tokens than that,
/// prefilled alone. Without preemption a group is a run of consecutive prompts, so every run is
/// a candidate; for each start only the longest run and its longest uniform head (the same own
/// length for each: the paged decode kernel when ≤ `GATHER_ABOVE_QUERIES`) can be the largest,
/// and of a long request's chunks only the first, the last full one (the most context) and the
/// last (with logits). With preemption a readmitted request (its prompt and up to `max_new − 1`
/// generated tokens) may join any group, so the bound is `max_running` requests within the
/// token cap, or one chunk with the longest context.
fn prefill_groups(s: &BatchGenerateSetup, again: u64) -> Vec<(u64, StepAttention, u64)> {
    let shared = s.shared_prefix as u64;
    let bs = s.block_size as u64;
    let k = s.max_running.max(1);
    let cap = s.max_prefill_tokens.max(1) as u64;
    let own: Vec<u64> = s
        .prompts
        .iter()
        .map(|&p| p as u64 + again - shared)
        .collect();
    // q new tokens for each of n sequences, the longest context `len`, tables `width` blocks
    // wide, nothing cached before them (`fresh`).
    // gathering `rows` in all otherwise.
    let attention = |q: Option<u64>, n: u64, rows: u64, len: u64, width: u64, fresh: bool| match q {
        _ if fresh => StepAttention::Fresh { spans: n },
        Some(q) if q <= GATHER_ABOVE_QUERIES as u64 => StepAttention::Paged {
            n,
            max_blocks: width,
            q,
            len,
        },
        _ => StepAttention::Gathered { n, rows },
    };
    // A group of n requests with t own tokens in all; `same`: each has this many.
    let group = |t: u64, n: u64, same: Option<u64>| -> (u64, StepAttention, u64) {
        let len = same.unwrap_or(0) + shared;
        let a = attention(same, n, t + n * shared, len, len.div_ceil(bs), shared == 0);
        (t, a, n)
    };
    // The chunks of one request of `o` own tokens, o > cap: chunk j (1-based) ends at
    // min(j · cap, o) and sees shared + that many tokens.
    let chunks = |o: u64, out: &mut Vec<(u64, StepAttention, u64)>| {
        let width = (shared + o).div_ceil(bs);
        let last = o.div_ceil(cap);
        for j in [1, last - 1, last] {
            let end = (j * cap).min(o);
            let t = end - (j - 1) * cap;
            let rows = u64::from(j == last);
            let len = shared + end;
            let a = attention(Some(t), 1, len, len, width, j == 1 && shared == 0);
            out.push((t, a, rows));
        }
    };
    let mut out = vec![];
    if s.holds_every_running {
        // Where each run of equal own lengths ends.
        let mut same_until = vec![own.len(); own.len()];
        for i in (0..own.len().saturating_sub(1)).rev() {
            same_until[i] = if own[i + 1] == own[i] {
                same_until[i + 1]
            } else {
                i + 1
            };
        }
        // The longest run from each start (its end never moves back: two pointers).
        let (mut j, mut t) = (0, 0);
        for i in 0..own.len() {
            if j <= i {
                (j, t) = (i + 1, own[i]);
            }
            while j < own.len() && j - i < k && t + own[j] <= cap {
                t += own[j];
                j += 1;
            }
            if own[i] > cap {
                chunks(own[i], &mut out);
            } else {
                let u = same_until[i].min(j);
                let n = (j - i) as u64;
                out.push(group(t, n, (u == j).then_some(own[i])));
                if u < j {
                    let m = (u - i) as u64;
                    out.push(group(own[i] * m, m, Some(own[i])));
                }
            }
            t -= own[i];
        }
    } else {
        let mut sorted = own.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let n = k.min(sorted.len()) as u64;
        let top: u64 = sorted.iter().take(k).sum();
        let t = top.min(cap);
        let longest = sorted[0] + shared;
        if shared == 0 {
            out.push((t, StepAttention::Fresh { spans: n }, n));
        }
        let rows = (t + n * shared).max(longest);
        out.push((t, StepAttention::Gathered { n, rows }, n));
        let q = t.div_ceil(n).min(GATHER_ABOVE_QUERIES as u64);
        out.push((
            t,
            StepAttention::Paged {
                n,
                max_blocks: longest.div_ceil(bs),
                q,
                len: longest,
            },
            n,
        ));
    }
    out
}

/// The plan of a batched generation run: the model (and adapter), the paged KV cache, and the
/// largest step — a prefill (`Llama::forward_paged` over the own tokens of the requests
/// admitted together, or over the shared prefix) or a decode step of every running sequence —
/// with the ops' scratch at its largest inside it, or the sampler's logits, parameters and
/// tokens after it.
pub fn plan_batch_generation(s: &BatchGenerateSetup) -> Result<Plan, String> {
    let c = &s.model;
    check_sizes(
        c,
        &[
            ("prompts", s.prompts.len(), MAX_PROMPTS),
            (
                "prompt tokens",
                s.prompts.iter().max().copied().unwrap_or(0),
                MAX_SEQ_TOKENS,
            ),
            ("new tokens", s.max_new, MAX_SEQ_TOKENS),
            ("sequences decoded together", s.max_running, MAX_SEQUENCES),
            ("prefill tokens", s.max_prefill_tokens, MAX_STEP_TOKENS),
        ],
    )?;
    crate::model::llama::check_cache_size(s.num_blocks, s.block_size).map_err(|e| e.to_string())?;
    if s.prompts.is_empty() || s.prompts.contains(&0) {
        return Err("every prompt needs a token".into());
    }
    if s.block_size == 0 || s.num_blocks == 0 || s.max_running == 0 {
        return Err(format!(
            "{} KV blocks of {} tokens and {} sequences at a time is not a batch",
            s.num_blocks, s.block_size, s.max_running
        ));
    }
    let (l, d, f, v) = (
        c.num_hidden_layers as u64,
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let (qd, kvd, heads, hd) = (
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.num_attention_heads as u64,
        c.head_dim as u64,
    );
    let bs = s.block_size as u64;
    let shared = s.shared_prefix as u64;
    let longest = s.prompts.iter().max().copied().unwrap_or(0) as u64;
    let context = longest + s.max_new as u64;
    let mut e = model_entries(c);
    let rank = s.adapter.as_ref().map(|(r, _)| *r as u64);
    if let Some((r, targets)) = &s.adapter {
        check_lora(c, *r, targets)?;
        add_frozen_adapter(&mut e, c, *r, targets);
    }
    let slots = s.num_blocks as u64 * bs;
    e.add(
        "KV cache",
        format!(
            "{l} layers × K, V [{} blocks × {bs}, {kvd}] bf16 (paged)",
            s.num_blocks
        ),
        2 * l * bf(slots * kvd),
    );
    // One step of t rows: positions and slots, the block tables and lengths of the paged
    // kernel or the gathered K/V (slots, K, V), then the layer stack's tensors as in
    // `plan_generation`; inside, the largest of the ops' scratch and the head's rows; after,
    // the logits with the sampler's parameters and tokens.
    // (working set, peak scratch, what the peak is), the last formatted only for the largest
    // step: a run of many prompts weighs many candidate prefill groups.
    let step = |t: u64, attention: StepAttention, rows: u64| -> (u64, u64, StepPeak) {
        let held = match attention {
            StepAttention::Fresh { .. } => 0,
            StepAttention::Paged { n, max_blocks, .. } => f4(n * max_blocks) + f4(n),
            StepAttention::Gathered { rows, .. } => f4(rows) + 2 * bf(rows * kvd),
        };
        let working = 2 * f4(t) + held + layer_stack(c, t, rank);
        let int8 = int8_scratch(c, t);
        let kmax = d.max(qd).max(f);
        let attention_scratch = match attention {
            StepAttention::Fresh { spans: n } | StepAttention::Gathered { n, .. } => {
                f4(t * heads) + f4(4 * n)
            }
            StepAttention::Paged { n, q, len, .. } => {
                let parts = len.div_ceil(PAGED_DECODE_PARTITION as u64).max(1);
                if parts > 1 {
                    f4(n * q * heads * parts * (hd + 2))
                } else {
                    0
                }
            }
        };
        let head = match rows {
            0 => 0,
            r if r == t => f4(r * v),
            r => bf(r * d) + f4(r * v),
        };
        // (The embedding's one-block id flag comes and goes before the layers' buffers exist,
        // so it never tops the working set: a chunk through the paged kernel without logits
        // holds no scratch at all.)
        let inside = int8.max(attention_scratch).max(head);
        let sampling = if rows > 0 {
            f4(rows * v) + f4(4 * rows) + f4(rows)
        } else {
            0
        };
        let what = if sampling > working + inside {
            StepPeak::Sampling { rows }
        } else if inside == int8 {
            StepPeak::Int8 { t, kmax }
        } else if inside == head {
            StepPeak::Head { t, rows }
        } else if matches!(attention, StepAttention::Paged { .. }) {
            StepPeak::Paged { t }
        } else {
            StepPeak::Attention { t }
        };
        (working, (working + inside).max(sampling) - working, what)
    };
    // The steps: the shared prefix's prefill, the prefills of requests admitted together
    // (through the block tables after a shared prefix; with preemption, up to max_new − 1
    // generated tokens more each), and a decode step of the most sequences.
    let again = if s.holds_every_running {
        0
    } else {
        s.max_new.saturating_sub(1) as u64
    };
    let mut steps = vec![];
    if shared > 0 {
        steps.push((
            "shared prefix prefill",
            step(shared, StepAttention::Fresh { spans: 1 }, 0),
        ));
    }
    let table = |len: u64| len.div_ceil(bs);
    for (t, attention, rows) in prefill_groups(s, again) {
        steps.push(("prefill", step(t, attention, rows)));
    }
    let b = s.max_running as u64;
    steps.push((
        "decode step",
        step(
            b,
            StepAttention::Paged {
                n: b,
                max_blocks: table(context),
                q: 1,
                len: context,
            },
            b,
        ),
    ));
    let (name, (working, inside, what)) = steps
        .into_iter()
        .max_by_key(|(_, (w, i, _))| w + i)
        .expect("a prefill step");
    e.add(
        "working set",
        format!("largest step ({name}): ids, positions, slots, one layer's activations"),
        working,
    );
    let what = match what {
        StepPeak::Sampling { rows } => {
            format!("logits [{rows}, {v}] f32, sampling parameters, tokens")
        }
        StepPeak::Int8 { t, kmax } => {
            format!("{t} rows; int8 linear: x [{t}, {kmax}] int8, scales, outlier cols")
        }
        StepPeak::Head { t, rows } => format!("{t} rows; head: logits [{rows}, {v}] f32"),
        StepPeak::Paged { t } => format!("{t} rows; paged attention partials"),
        StepPeak::Attention { t } => {
            format!("{t} rows; attention: log-sum-exp [{t}, {heads}] f32, span table")
        }
    };
    e.add("peak scratch", what, inside);
    Ok(Plan {
        entries: e,
        budget: s.budget,
    })
}

/// What a batched-generation step's peak scratch is (see `plan_batch_generation`).
enum StepPeak {
    Sampling { rows: u64 },
    Int8 { t: u64, kmax: u64 },
    Head { t: u64, rows: u64 },
    Paged { t: u64 },
    Attention { t: u64 },
}

/// `auto` checkpointing: no recomputation if that plan fits the budget less `AUTO_HEADROOM`,
/// else the fewest recomputing layers that do (each kept layer costs its saved tensors, so the
/// step skips the recomputation of every layer the budget has room for); all layers when even
/// that does not fit — the caller's budget check then reports the table and the fix.
pub fn auto_checkpointing(s: &TrainSetup) -> Result<Checkpointing, String> {
    auto_checkpointing_for(s, plan_training)
}

/// A plan of a step over a [`TrainSetup`]: [`plan_training`] (`rec train`, bench-train) or
/// [`plan_sample_scoring`] (`rec prune`).
pub type StepPlan = fn(&TrainSetup) -> Result<Plan, String>;

/// [`auto_checkpointing`] for the step `plan` plans.
pub fn auto_checkpointing_for(s: &TrainSetup, plan: StepPlan) -> Result<Checkpointing, String> {
    let room = s.budget.saturating_sub(AUTO_HEADROOM);
    let layers = s.model.num_hidden_layers;
    for n in 0..layers {
        let cp = if n == 0 {
            Checkpointing::Off
        } else {
            Checkpointing::Layers(n)
        };
        let p = plan(&TrainSetup {
            checkpointing: cp,
            ..s.clone()
        })?;
        if p.total() <= room {
            return Ok(cp);
        }
    }
    Ok(Checkpointing::All)
}

/// Resolve the command line's choice for this setup (its `checkpointing` field is ignored).
pub fn choose_checkpointing(
    choice: CheckpointChoice,
    s: &TrainSetup,
) -> Result<Checkpointing, String> {
    choose_checkpointing_for(choice, s, plan_training)
}

/// [`choose_checkpointing`] for the step `plan` plans.
pub fn choose_checkpointing_for(
    choice: CheckpointChoice,
    s: &TrainSetup,
    plan: StepPlan,
) -> Result<Checkpointing, String> {
    match choice {
        CheckpointChoice::Fixed(cp) => {
            cp.check(s.model.num_hidden_layers)?;
            Ok(cp)
        }
        CheckpointChoice::Auto => auto_checkpointing_for(s, plan),
    }
}

/// The largest batch (at the setup's sequence length) and the largest sequence length (at its
/// batch) that fit the budget; 0 when none does.
pub fn solve(s: &TrainSetup) -> Result<(usize, usize), String> {
    solve_for(s, plan_training)
}

/// [`solve`] for the step `plan` plans.
pub fn solve_for(s: &TrainSetup, plan: StepPlan) -> Result<(usize, usize), String> {
    let fits = |b: usize, q: usize| -> Result<bool, String> {
        Ok(plan(&TrainSetup {
            batch: b,
            seq: q,
            ..s.clone()
        })?
        .fits())
    };
    let per_step = |n: usize| MAX_STEP_TOKENS / n.max(1);
    Ok((
        largest(MAX_SEQUENCES.min(per_step(s.seq)), &|b| fits(b, s.seq))?,
        largest(MAX_SEQ_TOKENS.min(per_step(s.batch)), &|q| fits(s.batch, q))?,
    ))
}

/// The largest n in 1..=most with `fits(n)`, for a `fits` that holds up to some n and not
/// after; 0 when even 1 does not fit. `most` is what a plan takes (the `MAX_*` limits).
fn largest(most: usize, fits: &dyn Fn(usize) -> Result<bool, String>) -> Result<usize, String> {
    if most == 0 || !fits(1)? {
        return Ok(0);
    }
    let mut lo = 1;
    let mut hi = 2;
    while hi <= most && fits(hi)? {
        lo = hi;
        hi *= 2;
    }
    if hi > most {
        if fits(most)? {
            return Ok(most);
        }
        hi = most;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// The most prompts of `seq` tokens (the first `s.prefix` shared) one scoring pass can hold
/// within the budget.
pub fn solve_scoring(s: &ScoreSetup, seq: usize) -> Result<usize, String> {
    let own = seq.saturating_sub(s.prefix).max(1);
    largest(MAX_SEQUENCES.min(MAX_STEP_TOKENS / own), &|n| {
        Ok(plan_scoring(&ScoreSetup {
            batches: vec![(n, n * own)],
            ..s.clone()
        })?
        .fits())
    })
}

/// The most new tokens a generation from a `s.prompt`-token prompt can hold within the budget.
pub fn solve_generation(s: &GenerateSetup) -> Result<usize, String> {
    largest(MAX_SEQ_TOKENS, &|n| {
        Ok(plan_generation(&GenerateSetup {
            max_new: n,
            ..s.clone()
        })?
        .fits())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_stays_within_what_a_plan_takes() {
        let upto = |k: usize| move |n: usize| -> Result<bool, String> { Ok(n <= k) };
        assert_eq!(largest(1000, &upto(100)), Ok(100));
        assert_eq!(largest(1000, &upto(1)), Ok(1));
        // Everything fits: the limit, never a probe past it (the plan would refuse it).
        let capped = |n: usize| -> Result<bool, String> {
            if n > 10 {
                Err(format!("{n} is past the limit"))
            } else {
                Ok(true)
            }
        };
        assert_eq!(largest(10, &capped), Ok(10));
        assert_eq!(largest(16, &upto(16)), Ok(16));
        assert_eq!(largest(5, &upto(0)), Ok(0));
    }

    #[test]
    fn host_memory() {
        let m = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_available(m), Some(20_000_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 5 kB\n"), None);
        assert_eq!(meminfo_available("MemAvailable: lots kB\n"), None);
        assert_eq!(meminfo_available("MemAvailable: 5 MB\n"), None);
        assert!(check_host(GIB, GIB, "x", "y").is_ok());
        let e = check_host(3 * GIB, GIB, "training", "a smaller --r needs less").unwrap_err();
        assert!(
            e.contains("training needs at least 3.00 GiB")
                && e.contains("1.00 GiB is available")
                && e.ends_with("a smaller --r needs less"),
            "{e}"
        );
    }

    fn llama7b(batch: usize, seq: usize) -> TrainSetup {
        TrainSetup {
            model: named_shape("llama-7b").unwrap(),
            batch,
            seq,
            lora_rank: 16,
            targets: ["q", "k", "v", "o"].iter().map(|s| s.to_string()).collect(),
            checkpointing: Checkpointing::All,
            logits_chunk: 1024,
            budget: 24 * GIB,
        }
    }

    fn score7b(batches: Vec<(usize, usize)>) -> ScoreSetup {
        ScoreSetup {
            model: named_shape("llama-7b").unwrap(),
            prefix: 71,
            batches,
            lora_rank: 8,
            targets: vec!["q".into(), "v".into()],
            adapter: true,
            budget: 24 * GIB,
        }
    }

    #[test]
    fn the_scoring_plan_holds_the_model_and_the_largest_batch() {
        let p = plan_scoring(&score7b(vec![(8, 1992)])).unwrap();
        let t = plan_training(&llama7b(4, 1024)).unwrap();
        // The same frozen model as training, the adapter without gradients or moments.
        for c in ["weights (int8)", "kept precision"] {
            assert_eq!(p.category_total(c), t.category_total(c), "{c}");
        }
        // r 8 on q, v: 32 · 2 · 8 · (4096 + 4096) f32, plus six empty blocks per adapted
        // projection.
        assert_eq!(p.category_total("lora"), 32 * 2 * (8 * 8192 * 4 + 6 * 256));
        // 32 layers × K and V of 71 tokens × 4096 bf16.
        assert_eq!(p.category_total("prefix K/V"), 32 * 2 * 71 * 4096 * 2);
        assert!(p.fits(), "{}", p.table());
        // A larger batch among smaller ones sets the plan; its order does not matter.
        let big = plan_scoring(&score7b(vec![(8, 1992), (8, 4000), (3, 700)])).unwrap();
        let rev = plan_scoring(&score7b(vec![(3, 700), (8, 4000), (8, 1992)])).unwrap();
        assert!(big.total() > p.total());
        assert_eq!(big.total(), rev.total());
        // Errors name the problem.
        let e = plan_scoring(&score7b(vec![])).unwrap_err();
        assert!(e.contains("at least one batch"), "{e}");
        let e = plan_scoring(&score7b(vec![(4, 3)])).unwrap_err();
        assert!(e.contains("4 prompts, 3 tokens"), "{e}");
        let mut s = score7b(vec![(1, 9)]);
        s.targets = vec!["qq".into()];
        assert!(plan_scoring(&s).unwrap_err().contains("'qq'"));
        // A loaded adapter needs a rank and a target; without one, neither matters.
        let mut s = score7b(vec![(1, 9)]);
        s.lora_rank = 0;
        assert!(plan_scoring(&s).unwrap_err().contains("rank r"));
        s.adapter = false;
        assert!(plan_scoring(&s).is_ok());
        s.targets.clear();
        assert!(plan_scoring(&s).is_ok());
        s.adapter = true;
        s.lora_rank = 8;
        assert!(plan_scoring(&s)
            .unwrap_err()
            .contains("at least one target"));
    }

    #[test]
    fn the_generation_plan_holds_the_model_the_kv_cache_and_the_prefill() {
        let g = |prompt, max_new| {
            plan_generation(&GenerateSetup {
                model: named_shape("llama-7b").unwrap(),
                prompt,
                max_new,
                budget: 24 * GIB,
                adapter: None,
            })
        };
        let p = g(512, 300).unwrap();
        // 32 layers × K and V × 812 positions × 4096 bf16.
        assert_eq!(p.category_total("KV cache"), 32 * 2 * 812 * 4096 * 2);
        let t = plan_training(&llama7b(4, 1024)).unwrap();
        assert_eq!(
            p.category_total("weights (int8)"),
            t.category_total("weights (int8)")
        );
        // A longer prompt needs more; new tokens only add cache.
        let longer = g(2048, 300).unwrap();
        assert!(
            longer.category_total("prefill working set") > p.category_total("prefill working set")
        );
        let more = g(512, 1300).unwrap();
        assert_eq!(
            more.total() - p.total(),
            32 * 2 * 1000 * 4096 * 2,
            "1000 more new tokens are 1000 more cache rows"
        );
        assert!(g(0, 10).unwrap_err().contains("no tokens"));
    }

    #[test]
    fn the_serving_solvers_find_the_edge_of_the_budget() {
        let s = ScoreSetup {
            budget: 8 * GIB,
            ..score7b(vec![(1, 1)])
        };
        let n = solve_scoring(&s, 320).unwrap();
        let at = |n: usize| {
            plan_scoring(&ScoreSetup {
                batches: vec![(n, n * 249)],
                ..s.clone()
            })
            .unwrap()
            .fits()
        };
        assert!(n > 1 && at(n) && !at(n + 1), "{n}");
        let g = GenerateSetup {
            model: named_shape("llama-7b").unwrap(),
            prompt: 512,
            max_new: 1,
            budget: 7 * GIB,
            adapter: None,
        };
        let n = solve_generation(&g).unwrap();
        let at = |max_new| {
            plan_generation(&GenerateSetup {
                max_new,
                ..g.clone()
            })
            .unwrap()
            .fits()
        };
        assert!(n > 1 && at(n) && !at(n + 1), "{n}");
        // Nothing fits a budget smaller than the weights.
        let tiny_budget = GenerateSetup { budget: GIB, ..g };
        assert_eq!(solve_generation(&tiny_budget).unwrap(), 0);
    }

    #[test]
    fn llama_7b_lora_fits_24_gib_with_room() {
        let p = plan_training(&llama7b(4, 1024)).unwrap();
        // Independent arithmetic: 32 layers × (4·4096² + 3·4096·11008) int8 bytes.
        assert_eq!(
            p.entries[0].bytes,
            32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
        );
        // LoRA r=16 on q,k,v,o: 32 · 4 · 16 · (4096 + 4096) = 16.8 M parameters, 16 bytes each.
        assert_eq!(p.category_total("lora"), 32 * 4 * 16 * 8192 * 16);
        assert!(p.fits(), "{}", p.table());
        assert!(
            p.total() < 20 * GIB,
            "room left under 24 GiB: {}",
            human(p.total())
        );
        assert_eq!(p.total(), p.entries.iter().map(|e| e.bytes).sum::<u64>());
    }

    #[test]
    fn checkpointing_trades_saved_layers_for_one_recomputed_layer() {
        let with = plan_training(&llama7b(4, 1024)).unwrap();
        let without = plan_training(&TrainSetup {
            checkpointing: Checkpointing::Off,
            ..llama7b(4, 1024)
        })
        .unwrap();
        // Per layer of LLaMA-7B at 4096 tokens: h1, x2, h2, q, attn, k, v (4096 wide) and
        // gate, up, silu(gate)·up (11008 wide) in bf16, the attention log-sum-exp [4096, 32]
        // f32, plus LoRA h, u [4096, 16] f32 for each of 4 targets. Both keep the 33 layer
        // boundaries; checkpointing keeps one layer's set instead of 32.
        let per_layer: u64 =
            4096 * (7 * 4096 + 3 * 11008) * 2 + 4096 * 32 * 4 + 4 * 2 * 4096 * 16 * 4;
        assert_eq!(without.total() - with.total(), 31 * per_layer);
        assert!(without.total() > with.total());
        // Recomputing n layers keeps 32 − n sets plus the one they share.
        for n in [1, 5, 31] {
            let part = plan_training(&TrainSetup {
                checkpointing: Checkpointing::Layers(n),
                ..llama7b(4, 1024)
            })
            .unwrap();
            assert_eq!(part.total(), without.total() - (n as u64 - 1) * per_layer);
        }
        let all = plan_training(&TrainSetup {
            checkpointing: Checkpointing::Layers(32),
            ..llama7b(4, 1024)
        })
        .unwrap();
        assert_eq!(all.total(), with.total());
        let e = plan_training(&TrainSetup {
            checkpointing: Checkpointing::Layers(33),
            ..llama7b(4, 1024)
        })
        .unwrap_err();
        assert!(e.contains("33 layers, but the model has 32"), "{e}");
    }

    #[test]
    fn auto_checkpointing_of_a_pruning_pass_counts_its_own_plan() {
        // rec prune keeps no AdamW moments (128 MiB at 7B, r 16 on q,k,v,o): at a budget where
        // its pass fits with 2 layers recomputing, a training step needs a third.
        let s = llama7b(4, 1024);
        let at = |plan: StepPlan, cp| {
            plan(&TrainSetup {
                checkpointing: cp,
                ..s.clone()
            })
            .unwrap()
            .total()
        };
        let budget = at(plan_sample_scoring, Checkpointing::Layers(2)) + AUTO_HEADROOM;
        let s = TrainSetup {
            budget,
            ..s.clone()
        };
        assert_eq!(
            auto_checkpointing_for(&s, plan_sample_scoring).unwrap(),
            Checkpointing::Layers(2)
        );
        assert!(at(plan_sample_scoring, Checkpointing::Layers(1)) + AUTO_HEADROOM > budget);
        assert_eq!(auto_checkpointing(&s).unwrap(), Checkpointing::Layers(3));
        assert!(at(plan_training, Checkpointing::Layers(2)) + AUTO_HEADROOM > budget);
        // The solver asks the same plan: a pruning pass fits at least what a training step does.
        let (b, q) = solve(&s).unwrap();
        let (bp, qp) = solve_for(&s, plan_sample_scoring).unwrap();
        assert!(
            bp >= b && qp >= q && (bp, qp) != (b, q),
            "{b} {q} / {bp} {qp}"
        );
    }

    #[test]
    fn auto_checkpointing_recomputes_the_fewest_layers_that_fit() {
        let s = llama7b(4, 1024);
        let room = s.budget - AUTO_HEADROOM;
        let total = |cp| {
            plan_training(&TrainSetup {
                checkpointing: cp,
                ..s.clone()
            })
            .unwrap()
            .total()
        };
        // At 24 GiB the 7B step without recomputation does not fit (24.6 GiB), so auto picks a
        // count n: it fits, and one layer fewer would not.
        assert!(total(Checkpointing::Off) > room);
        let Checkpointing::Layers(n) = auto_checkpointing(&s).unwrap() else {
            panic!("expected a partial policy at 24 GiB");
        };
        assert!(n > 1 && n < 32, "{n}");
        assert!(total(Checkpointing::Layers(n)) <= room);
        assert!(total(Checkpointing::Layers(n - 1)) > room);
        // With room for everything nothing recomputes; with room for nothing, everything does.
        let big = TrainSetup {
            budget: 80 * GIB,
            ..s.clone()
        };
        assert_eq!(auto_checkpointing(&big).unwrap(), Checkpointing::Off);
        let small = TrainSetup {
            budget: 8 * GIB,
            ..s.clone()
        };
        assert_eq!(auto_checkpointing(&small).unwrap(), Checkpointing::All);
        // A fixed choice is checked against the model, not replaced.
        let fixed = CheckpointChoice::Fixed(Checkpointing::Layers(3));
        assert_eq!(
            choose_checkpointing(fixed, &s).unwrap(),
            Checkpointing::Layers(3)
        );
        assert!(
            choose_checkpointing(CheckpointChoice::Fixed(Checkpointing::Layers(40)), &s).is_err()
        );
    }

    #[test]
    fn checkpointing_parses_and_round_trips() {
        for (text, want) in [
            ("on", Checkpointing::All),
            ("all", Checkpointing::All),
            ("off", Checkpointing::Off),
            ("7", Checkpointing::Layers(7)),
        ] {
            let cp: Checkpointing = text.parse().unwrap();
            assert_eq!(cp, want, "{text}");
            assert_eq!(Checkpointing::from_json(&cp.to_json()), Some(cp));
        }
        assert_eq!("auto".parse(), Ok(CheckpointChoice::Auto));
        let e = "sometimes".parse::<CheckpointChoice>().unwrap_err();
        assert!(
            e.contains("expected on, off, auto or a number of layers"),
            "{e}"
        );
        // Older trainer states wrote a boolean.
        assert_eq!(
            Checkpointing::from_json(&serde_json::json!(true)),
            Some(Checkpointing::All)
        );
        assert_eq!(
            Checkpointing::from_json(&serde_json::json!(false)),
            Some(Checkpointing::Off)
        );
        assert_eq!(Checkpointing::Layers(5).describe(32), "5 of 32 layers");
        assert_eq!(Checkpointing::All.describe(32), "on (all 32 layers)");
        assert_eq!(Checkpointing::Layers(0).describe(32), "off");
    }

    #[test]
    fn solve_returns_the_largest_fitting_sizes() {
        let s = llama7b(4, 1024);
        let (b, q) = solve(&s).unwrap();
        assert!(b >= 4 && q >= 1024, "{b} × {q}");
        assert!(plan_training(&TrainSetup {
            batch: b,
            ..s.clone()
        })
        .unwrap()
        .fits());
        assert!(!plan_training(&TrainSetup {
            batch: b + 1,
            ..s.clone()
        })
        .unwrap()
        .fits());
        assert!(plan_training(&TrainSetup {
            seq: q,
            ..s.clone()
        })
        .unwrap()
        .fits());
        assert!(!plan_training(&TrainSetup {
            seq: q + 1,
            ..s.clone()
        })
        .unwrap()
        .fits());
        // A budget below the frozen weights fits nothing.
        assert_eq!(solve(&TrainSetup { budget: GIB, ..s }).unwrap(), (0, 0));
    }

    #[test]
    fn bad_setups_and_sizes() {
        let e = plan_training(&TrainSetup {
            targets: vec!["qq".into()],
            ..llama7b(1, 8)
        })
        .unwrap_err();
        assert!(e.contains("unknown LoRA target 'qq'"), "{e}");
        // An adapter of rank 0, without targets, or with a target twice is not a run's.
        let bad = |lora_rank, targets: &[&str]| {
            plan_training(&TrainSetup {
                lora_rank,
                targets: targets.iter().map(|t| t.to_string()).collect(),
                ..llama7b(1, 8)
            })
            .unwrap_err()
        };
        assert!(bad(0, &["q", "v"]).contains("rank r must be at least 1"));
        assert!(bad(8, &[]).contains("at least one target"));
        assert!(bad(8, &["q", "v", "q"]).contains("'q' is listed twice"));
        assert_eq!(parse_bytes("24GiB"), Some(24 * GIB));
        assert_eq!(parse_bytes("512 MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("64 KiB"), Some(64 << 10));
        assert_eq!(parse_bytes("1.5TiB"), Some(3 * (GIB << 9)));
        assert_eq!(parse_bytes("100 B"), Some(100));
        // What `human` prints reads back.
        for b in [3 * GIB / 2, 5 << 20, 12 << 10, 700] {
            let back = parse_bytes(&human(b)).unwrap();
            assert!(back.abs_diff(b) * 100 <= b, "{} -> {back}", human(b));
        }
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("-1G"), None);
        // Below a byte, and past what a u64 holds, are not sizes (they used to read as 0 and
        // as 16 EiB).
        assert_eq!(parse_bytes("0.5"), None);
        assert_eq!(parse_bytes("99999999TiB"), None);
        assert_eq!(parse_bytes("inf"), None);
        assert_eq!(parse_bytes("NaN GiB"), None);
        assert_eq!(parse_bytes("8388607TiB"), Some(8388607 << 40));
    }
}
