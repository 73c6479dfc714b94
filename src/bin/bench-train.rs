//! `bench-train`: LoRA training throughput on a frozen int8 LLaMA (DESIGN.md §6).
//!
//! Builds a model — a named shape with random int8 weights (`model::random`), or a checkpoint
//! from disk — and synthetic data: `batch × accum` sequences of exactly `seq` random token ids
//! with a language-model label on every position, so every micro-batch has the same shape. It
//! runs `--warmup` optimizer steps unmeasured, then `--steps` measured ones, and reports:
//!
//! - tokens/s: the tokens of a step (the same in every step) ÷ the median wall time of
//!   `Trainer::step`, so it agrees with ms/step and the FLOP rates (min and max: the fastest
//!   and slowest single steps);
//! - ms/step: medians of the wall time and of its split into forward (with the head and loss),
//!   backward (with the recomputation under checkpointing), optimizer, and other (packing the
//!   micro-batches, uploads, workspace set-up: wall − the three);
//! - FLOPs per step, MFU and HFU (see `Flops` for the formula, printed with the results);
//! - memory: on cuda and sim the run is carved from ONE arena of the memory plan's total
//!   (`memory::plan_training`), reserved before the model is built (`--no-arena` or
//!   RECFORGE_ARENA=off: one device allocation per buffer instead); reported are the peak of
//!   the device layer's own count of live buffers (exact, in 256-byte blocks) against the plan,
//!   the arena's high-water mark, and the device allocations made during the steps (0 with the
//!   arena). On CUDA also the driver's view: the largest memory in use (sampled every 2 ms
//!   while the steps run, and at each step's end) minus what was in use before the model was
//!   built. On CUDA a setup whose plan does not fit `--budget` (24 GiB) stops before anything
//!   is built, with the plan table and the fix.
//!
//! Progress goes to stderr, the table to stdout, and `--json` writes everything (through a
//! temporary file renamed into place). `--time-limit` ends the measurement early (after at least
//! one measured step) so that an outer `timeout` still gets a result.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use recforge::backend::gpu::{Chosen, DeviceChoice, Profile};
use recforge::backend::Backend;
use recforge::memory::{self, human, TrainSetup};
use recforge::model::lora::parse_targets;
use recforge::model::random::{self, SHAPE_NAMES};
use recforge::model::{self as rmodel, Llama, LlamaConfig, LoadOptions, ModelSource};
use recforge::rng::Rng;
use recforge::tensor::HostTensor;
use recforge::train::step::HEAD_CHUNK;
use recforge::train::{Example, StepRecord, TrainConfig, Trainer};

#[derive(Parser, Debug)]
#[command(
    name = "bench-train",
    version,
    about = "Measure LoRA training throughput (tokens/s, ms/step, MFU, memory) on a frozen int8 LLaMA",
    after_help = "Named shapes (random int8 weights): llama-7b, llama-13b, smollm2-135m, tiny.\n\
                  Example: bench-train --model llama-7b --device cuda --batch 4 --seq 1024 --json out.json"
)]
struct Args {
    /// A named shape (llama-7b, llama-13b, smollm2-135m, tiny) built with random int8 weights,
    /// or a model path (.gguf file or Hugging Face folder).
    #[arg(long, default_value = "llama-7b")]
    model: String,
    /// cpu, cuda, sim or auto (CUDA when a GPU is usable, else CPU).
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Training preset the settings start from (itrek or tallrec).
    #[arg(long, default_value = "itrek")]
    preset: String,
    /// Sequences per micro-batch (default: the preset's).
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence (default: the preset's cutoff).
    #[arg(long)]
    seq: Option<usize>,
    /// Micro-batches per optimizer step (default: the preset's).
    #[arg(long)]
    accum: Option<usize>,
    /// LoRA rank (default: the preset's; alpha stays the preset's).
    #[arg(long)]
    r: Option<usize>,
    /// LoRA targets, comma-separated: q,k,v,o,gate,up,down (default: the preset's).
    #[arg(long)]
    targets: Option<String>,
    /// Measured optimizer steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Unmeasured optimizer steps run first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Override the number of layers (for small CPU / simulator runs of a big shape).
    #[arg(long)]
    layers: Option<usize>,
    /// Override the vocabulary size of a named shape (for small runs).
    #[arg(long)]
    vocab: Option<usize>,
    /// Which layers recompute their activations in the backward pass: auto (the fewest that fit
    /// the --budget by the memory plan, leaving 1 GiB for the CUDA context), on (all — what the
    /// PEFT peer does), off (none), or a number of layers.
    #[arg(long, default_value = "auto")]
    checkpointing: memory::CheckpointChoice,
    /// The same as --checkpointing off.
    #[arg(long, conflicts_with = "checkpointing")]
    no_checkpointing: bool,
    /// LLM.int8 outlier threshold of the frozen linears (0 disables the decomposition).
    #[arg(long, default_value_t = 6.0)]
    outlier_threshold: f32,
    /// Device memory budget the plan must fit on CUDA, e.g. 24GiB or 80GiB.
    #[arg(long, default_value = "24GiB")]
    budget: String,
    /// Seed of the random weights, the data and the adapter.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Do not reserve the memory plan's arena on cuda / sim: buffers come from the device's
    /// allocator one by one (as with RECFORGE_ARENA=off).
    #[arg(long)]
    no_arena: bool,
    /// Write the results as JSON here (written to a temporary name, then renamed).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Stop measuring once this many seconds have passed since the first step (after at least
    /// one measured step) and report the steps done, e.g. under an outer `timeout`.
    #[arg(long)]
    time_limit: Option<f64>,
    /// After the measured steps, run one more with every device operation timed (CUDA events
    /// on a GPU; in the simulator exact counts and the simulator's own time) and report where
    /// its time went, kernel by kernel. Not in the medians above: the events cost a little.
    #[arg(long)]
    profile: bool,
}

fn main() -> ExitCode {
    recforge::restore_default_sigpipe();
    recforge::keep_freed_host_memory();
    let args = Args::parse();
    match recforge::on_cpu_pool(|| run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---- the model ---------------------------------------------------------------------------------

/// Where the model comes from.
enum ModelSpec {
    /// A named shape, built with random int8 weights.
    Random { name: String, config: LlamaConfig },
    /// A checkpoint on disk (possibly with fewer layers than it has).
    File {
        path: PathBuf,
        src: Box<dyn ModelSource>,
        config: LlamaConfig,
    },
}

impl ModelSpec {
    fn config(&self) -> &LlamaConfig {
        match self {
            ModelSpec::Random { config, .. } | ModelSpec::File { config, .. } => config,
        }
    }
    fn label(&self) -> String {
        match self {
            ModelSpec::Random { name, .. } => name.clone(),
            ModelSpec::File { path, .. } => path.display().to_string(),
        }
    }
    fn source(&self) -> String {
        match self {
            ModelSpec::Random { .. } => "random int8 weights".into(),
            ModelSpec::File { src, .. } => src.format(),
        }
    }
}

/// A model source with fewer layers than the checkpoint (`--layers` on a real model): the
/// first `layers` layers, the embedding, final norm and head.
struct FirstLayers {
    inner: Box<dyn ModelSource>,
    config: LlamaConfig,
}

impl ModelSource for FirstLayers {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn tensor(&self, name: &str) -> recforge::Result<HostTensor> {
        self.inner.tensor(name)
    }
    fn tokenizer(&self) -> recforge::Result<recforge::model::tokenizer::TextTokenizer> {
        self.inner.tokenizer()
    }
    fn format(&self) -> String {
        self.inner.format()
    }
}

fn resolve_model(args: &Args) -> Result<ModelSpec> {
    if let Some(base) = random::shape(&args.model) {
        let config = random::shrink(&base, args.layers, args.vocab)?;
        return Ok(ModelSpec::Random {
            name: args.model.clone(),
            config,
        });
    }
    let path = PathBuf::from(&args.model);
    if !path.exists() {
        bail!(
            "--model '{}': not a named shape ({}) and no file or folder by that name",
            args.model,
            SHAPE_NAMES.join(", ")
        );
    }
    if args.vocab.is_some() {
        bail!(
            "--vocab applies to named shapes only, not to a checkpoint ({})",
            path.display()
        );
    }
    let src =
        rmodel::open(&path).with_context(|| format!("cannot load model {}", path.display()))?;
    let full = src.config().clone();
    let src: Box<dyn ModelSource> = match args.layers {
        Some(0) => bail!("--layers must be at least 1"),
        Some(l) if l > full.num_hidden_layers => bail!(
            "--layers {l}: {} has only {} layers",
            path.display(),
            full.num_hidden_layers
        ),
        Some(l) => Box::new(FirstLayers {
            config: LlamaConfig {
                num_hidden_layers: l,
                ..full
            },
            inner: src,
        }),
        None => src,
    };
    Ok(ModelSpec::File {
        path,
        config: src.config().clone(),
        src,
    })
}

fn build_model<B: Backend>(be: &B, spec: &ModelSpec, args: &Args) -> Result<Llama<B>> {
    match spec {
        ModelSpec::Random { config, .. } => {
            random::random_llama_with(be, config, args.seed, args.outlier_threshold)
                .context("cannot build the random model")
        }
        ModelSpec::File { path, src, .. } => Llama::load(
            src.as_ref(),
            be,
            LoadOptions {
                int8: true,
                outlier_threshold: args.outlier_threshold,
            },
        )
        .with_context(|| format!("cannot load model {}", path.display())),
    }
}

// ---- the backend -------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Cpu,
    Sim,
    Cuda,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cpu => "cpu",
            Kind::Sim => "sim",
            Kind::Cuda => "cuda",
        }
    }
}

// ---- FLOPs and peaks ---------------------------------------------------------------------------

/// The FLOP count of one optimizer step (a multiply-add is 2 FLOPs; elementwise work — norms,
/// RoPE, SwiGLU, softmax, the optimizer — is not counted).
///
/// With T tokens in the step, L layers, N the frozen base's linear weights (q, k, v, o, gate,
/// up, down of every layer), N_lora the LoRA weights (A and B of every adapted projection), d
/// the hidden size, V the vocabulary, T_lab the rows that carry a label, d_q = heads × head_dim:
///
/// - linears, forward: 2·N·T + 2·N_lora·T;
/// - linears, backward: 2·N·T (the gradient to the input only: the frozen base has no weight
///   gradient, so the usual 6·N·T does not apply) + 4·N_lora·T (LoRA's input gradient and its
///   dA, dB);
/// - output head on the labelled rows: 2·d·V·T_lab forward + 2·d·V·T_lab backward to the input
///   (the head is frozen too);
/// - attention: A = 4·L·d_q·P forward (QKᵀ and PV), where P = Σ over sequences of s(s+1)/2 is
///   the number of causal (query, key) pairs — the causal mask halves the full 4·L·d_q·T·s, and
///   the half is what is counted — and 2·A backward (dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q: four GEMMs);
/// - model FLOPs = forward + backward (the standard MFU numerator: recomputation is not
///   useful work);
/// - hardware FLOPs = model FLOPs + the recomputed forward of the n of L layers that
///   checkpoint, (2·N·T + 2·N_lora·T + A)·n/L (the head is not recomputed).
///
/// MFU = model FLOPs ÷ step time ÷ peak, HFU = hardware FLOPs ÷ step time ÷ peak, where the
/// peak is the device's dense bf16 tensor-core rate (`peak_for`).
#[derive(Clone, Debug)]
struct Flops {
    base_params: u64,
    lora_params: u64,
    head_params: u64,
    tokens: u64,
    label_rows: u64,
    causal_pairs: u64,
    attention_forward: u64,
    forward: u64,
    backward: u64,
    recompute: u64,
}

const FLOP_FORMULA: &str = "model = fwd 2·N·T + 2·N_lora·T + 2·d·V·T_lab + A  +  bwd 2·N·T + 4·N_lora·T + 2·d·V·T_lab + 2·A;  \
hardware = model + recompute ((2·N·T + 2·N_lora·T + A)·n/L for n of L layers checkpointed);  \
A = 4·L·d_q·P, P = Σ_seq s(s+1)/2 causal pairs (causal half of the full 4·L·d_q·T·s);  \
N = frozen linear weights, N_lora = LoRA A+B weights, T = tokens/step, T_lab = labelled rows";

impl Flops {
    fn new(
        c: &LlamaConfig,
        targets: &[String],
        r: usize,
        seqs: &[usize],
        label_rows: u64,
        recomputed_layers: usize,
    ) -> Flops {
        let (d, f, qd, kvd) = (
            c.hidden_size as u64,
            c.intermediate_size as u64,
            c.q_dim() as u64,
            c.kv_dim() as u64,
        );
        let l = c.num_hidden_layers as u64;
        let base_params = l * (d * qd + 2 * d * kvd + qd * d + 3 * d * f);
        let dims = |t: &str| -> (u64, u64) {
            match t {
                "q" => (d, qd),
                "k" | "v" => (d, kvd),
                "o" => (qd, d),
                "gate" | "up" => (d, f),
                _ => (f, d),
            }
        };
        let lora_params = l * targets
            .iter()
            .map(|t| {
                let (i, o) = dims(t);
                r as u64 * (i + o)
            })
            .sum::<u64>();
        let head_params = c.vocab_size as u64 * d;
        let tokens: u64 = seqs.iter().map(|&s| s as u64).sum();
        let causal_pairs: u64 = seqs.iter().map(|&s| (s as u64) * (s as u64 + 1) / 2).sum();
        let a = 4 * l * qd * causal_pairs;
        let forward =
            2 * base_params * tokens + 2 * lora_params * tokens + 2 * head_params * label_rows + a;
        let backward = 2 * base_params * tokens
            + 4 * lora_params * tokens
            + 2 * head_params * label_rows
            + 2 * a;
        // Every layer has the same weights and attention work, so n of L layers recompute n/L.
        let recompute = (2 * base_params * tokens + 2 * lora_params * tokens + a)
            * recomputed_layers as u64
            / l;
        Flops {
            base_params,
            lora_params,
            head_params,
            tokens,
            label_rows,
            causal_pairs,
            attention_forward: a,
            forward,
            backward,
            recompute,
        }
    }
    fn model(&self) -> u64 {
        self.forward + self.backward
    }
    fn hardware(&self) -> u64 {
        self.model() + self.recompute
    }
}

/// A device's dense (non-sparse) tensor-core peaks, from NVIDIA's datasheets / whitepapers.
#[derive(Clone, Copy, Debug)]
struct Peak {
    device: &'static str,
    /// bf16 inputs, f32 accumulation, dense, TFLOP/s.
    bf16_tflops: f64,
    /// int8 inputs, int32 accumulation, dense, TOPS.
    int8_tops: f64,
}

/// The peak of a CUDA device, by the name the driver reports; None when it is not in the table.
fn peak_for(device_name: &str) -> Option<Peak> {
    let n = device_name.to_ascii_lowercase();
    let p = |device, bf16_tflops, int8_tops| {
        Some(Peak {
            device,
            bf16_tflops,
            int8_tops,
        })
    };
    // Order matters: the more specific names first.
    if n.contains("h100") {
        if n.contains("pcie") {
            return p("H100 PCIe", 756.0, 1513.0);
        }
        if n.contains("nvl") {
            return p("H100 NVL", 835.0, 1671.0);
        }
        return p("H100 SXM", 989.0, 1979.0);
    }
    if n.contains("h200") {
        if n.contains("nvl") {
            return p("H200 NVL", 835.0, 1671.0);
        }
        return p("H200 SXM", 989.0, 1979.0);
    }
    if n.contains("a100") {
        return p("A100", 312.0, 624.0);
    }
    if n.contains("4090") {
        return p("RTX 4090", 165.2, 660.6);
    }
    if n.contains("3090 ti") {
        return p("RTX 3090 Ti", 80.0, 320.0);
    }
    if n.contains("3090") {
        return p("RTX 3090", 71.0, 284.0);
    }
    if n.contains("l40s") {
        return p("L40S", 362.0, 733.0);
    }
    None
}

// ---- statistics --------------------------------------------------------------------------------

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// One optimizer step as measured here.
struct Timed {
    rec: StepRecord,
    wall: f64,
}

impl Timed {
    fn other(&self) -> f64 {
        (self.wall - self.rec.secs()).max(0.0)
    }
    fn tokens_per_sec(&self) -> f64 {
        self.rec.tokens as f64 / self.wall
    }
    fn to_json(&self) -> Value {
        let r = &self.rec;
        json!({
            "step": r.step,
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens": r.tokens,
            "label_tokens": r.label_tokens,
            "wall_ms": self.wall * 1e3,
            "forward_ms": r.forward_secs * 1e3,
            "backward_ms": r.backward_secs * 1e3,
            "optimizer_ms": r.optimizer_secs * 1e3,
            "other_ms": self.other() * 1e3,
            "tokens_per_sec": self.tokens_per_sec(),
            "memory_in_use_bytes": r.memory_in_use,
        })
    }
}

// ---- the run -----------------------------------------------------------------------------------

fn run(args: Args) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1 (it counts the measured optimizer steps)");
    }
    if let Some(t) = args.time_limit {
        if !(t.is_finite() && t > 0.0) {
            bail!("--time-limit must be a positive number of seconds");
        }
    }
    rmodel::llama::check_outlier_threshold(args.outlier_threshold)
        .context("--outlier-threshold")?;
    if let Some(path) = &args.json {
        rmodel::convert::check_output(path, rmodel::convert::Output::File).context("--json")?;
    }
    let budget = memory::parse_bytes(&args.budget).with_context(|| {
        format!(
            "--budget '{}': expected a size such as 24GiB or 512MiB",
            args.budget
        )
    })?;
    let mut cfg = TrainConfig::preset(&args.preset)?;
    if let Some(b) = args.batch {
        if b == 0 {
            bail!("--batch must be at least 1");
        }
        cfg.batch_size = b;
    }
    if let Some(s) = args.seq {
        if s < 2 {
            bail!("--seq must be at least 2 (a sequence predicts its next tokens)");
        }
        cfg.cutoff = s;
    }
    if let Some(a) = args.accum {
        if a == 0 {
            bail!("--accum must be at least 1");
        }
        cfg.grad_accum = a;
    }
    if let Some(r) = args.r {
        if r == 0 {
            bail!("--r must be at least 1");
        }
        cfg.lora.r = r;
    }
    if let Some(t) = &args.targets {
        cfg.lora.targets = parse_targets(t).with_context(|| format!("--targets '{t}'"))?;
    }
    cfg.seed = args.seed;
    // The cosine schedule spans the whole run; the learning rate does not change the work done.
    cfg.steps = args.warmup.checked_add(args.steps).with_context(|| {
        format!(
            "--warmup {} + --steps {}: too many",
            args.warmup, args.steps
        )
    })?;
    cfg.validate()?;

    let spec = resolve_model(&args)?;
    let mc = spec.config().clone();
    if cfg.cutoff > mc.max_position_embeddings {
        eprintln!(
            "note: --seq {} is longer than the model's {} positions (RoPE runs anyway)",
            cfg.cutoff, mc.max_position_embeddings
        );
    }
    let setup = cfg.memory_setup(&mc, budget);
    let choice = if args.no_checkpointing {
        memory::CheckpointChoice::Fixed(memory::Checkpointing::Off)
    } else {
        args.checkpointing
    };
    cfg.checkpointing = memory::choose_checkpointing(choice, &setup)
        .map_err(anyhow::Error::msg)
        .context("--checkpointing")?;
    let setup = TrainSetup {
        checkpointing: cfg.checkpointing,
        ..setup
    };
    let plan = memory::plan_training(&setup).map_err(anyhow::Error::msg)?;

    let chosen = open_backend(args.device)?;
    match chosen {
        Chosen::Cpu(be) => {
            // No device budget on the CPU, but a run the host cannot hold is refused before
            // the model is built, not ended by the OOM killer.
            if let Some(avail) = memory::host_available() {
                memory::check_host(
                    plan.total(),
                    avail,
                    "this benchmark",
                    "a smaller --r, --batch, --seq or --layers needs less",
                )
                .map_err(anyhow::Error::msg)?;
            }
            bench(&be, Kind::Cpu, &args, &spec, cfg, &setup, &plan)
        }
        Chosen::Gpu(be) => {
            let kind = if be.dev.is_sim() {
                Kind::Sim
            } else {
                Kind::Cuda
            };
            bench(&be, kind, &args, &spec, cfg, &setup, &plan)
        }
    }
}

/// Stop before a CUDA run whose plan does not fit the budget: the table and the fix.
fn check_budget(spec: &ModelSpec, s: &TrainSetup, plan: &memory::Plan) -> Result<()> {
    if plan.fits() {
        return Ok(());
    }
    eprintln!(
        "memory plan: {}, batch {} × seq {}, LoRA r={} on {}, checkpointing {}\n",
        spec.label(),
        s.batch,
        s.seq,
        s.lora_rank,
        s.targets.join(","),
        s.checkpointing.describe(s.model.num_hidden_layers)
    );
    eprint!("{}", plan.table());
    let (b, q) = memory::solve(s).map_err(anyhow::Error::msg)?;
    let mut fixes = vec![];
    if b > 0 {
        fixes.push(format!("--batch {b}"));
    }
    if q > 0 {
        fixes.push(format!("--seq {q}"));
    }
    if s.checkpointing.recomputed(s.model.num_hidden_layers) < s.model.num_hidden_layers {
        fixes.push("--checkpointing on".into());
    }
    fixes.push("a larger --budget if the device has the memory".into());
    bail!(
        "the memory plan needs {} but the budget is {}; it would fit with {}",
        human(plan.total()),
        human(s.budget),
        fixes.join(", or ")
    );
}

fn synthetic_data(cfg: &TrainConfig, vocab: usize, seed: u64) -> Result<Vec<Example>> {
    let n = cfg.batch_size * cfg.grad_accum;
    let mut rng = Rng::new(seed ^ 0xDA7A_5EED_0000_0001);
    (0..n)
        .map(|_| {
            let ids = (0..cfg.cutoff)
                .map(|_| rng.below(vocab as u64) as u32)
                .collect();
            Example::language_model(ids).map_err(anyhow::Error::from)
        })
        .collect()
}

fn gib(b: u64) -> f64 {
    b as f64 / memory::GIB as f64
}

/// The warm-up steps, then the measured ones, with a progress line each.
fn run_steps<B: Backend>(
    trainer: &mut Trainer<'_, B>,
    args: &Args,
) -> Result<(Vec<Timed>, Vec<Timed>)> {
    let total = args.warmup + args.steps;
    let start = Instant::now();
    let mut warm = vec![];
    let mut measured = vec![];
    // Ctrl-C ends the measurement after the step in flight, as --time-limit does: the steps
    // measured so far are reported.
    recforge::stop_on_interrupt();
    for i in 0..total {
        if recforge::interrupted() {
            if measured.is_empty() {
                bail!("interrupted before the first measured step: nothing to report");
            }
            eprintln!(
                "bench-train: interrupted after {} of {} measured steps",
                measured.len(),
                args.steps
            );
            break;
        }
        if let (Some(limit), false) = (args.time_limit, measured.is_empty()) {
            if start.elapsed().as_secs_f64() > limit {
                eprintln!(
                    "bench-train: --time-limit {limit} s reached after {} of {} measured steps",
                    measured.len(),
                    args.steps
                );
                break;
            }
        }
        let t = Instant::now();
        let rec = trainer
            .step()
            .with_context(|| format!("optimizer step {} of {total}", i + 1))?;
        let wall = t.elapsed().as_secs_f64();
        let timed = Timed { rec, wall };
        let r = &timed.rec;
        let what = if i < args.warmup {
            format!("warm-up {}/{}", i + 1, args.warmup)
        } else {
            format!("step {}/{}", i + 1 - args.warmup, args.steps)
        };
        eprintln!(
            "{what}: loss {:.4}, {:.0} tokens/s, {:.1} ms (forward {:.1}, backward {:.1}, optimizer {:.1}){}",
            r.loss,
            timed.tokens_per_sec(),
            wall * 1e3,
            r.forward_secs * 1e3,
            r.backward_secs * 1e3,
            r.optimizer_secs * 1e3,
            r.memory_in_use
                .map(|m| format!(", {:.2} GiB in use", gib(m)))
                .unwrap_or_default()
        );
        if !r.loss.is_finite() {
            bail!("{what}: the loss is not finite ({})", r.loss);
        }
        if i < args.warmup {
            warm.push(timed);
        } else {
            measured.push(timed);
        }
    }
    Ok((warm, measured))
}

#[allow(clippy::too_many_arguments)]
fn bench<B: Backend>(
    be: &B,
    kind: Kind,
    args: &Args,
    spec: &ModelSpec,
    cfg: TrainConfig,
    setup: &TrainSetup,
    plan: &memory::Plan,
) -> Result<()> {
    let device = be.name();
    if kind == Kind::Cuda {
        check_budget(spec, setup, plan)?;
    } else if !plan.fits() {
        eprintln!(
            "note: the memory plan needs {}, over the {} budget: on CUDA this run would stop here",
            human(plan.total()),
            human(plan.budget)
        );
    }
    let mc = spec.config().clone();
    let baseline = be.memory_in_use();
    // The plan's bytes as one allocation before anything is built (DESIGN.md §4): the model,
    // the adapter and every step's buffers are carved out of it; a request the arena cannot
    // serve stops the run naming it (the plan undercounts).
    let arena = if args.no_arena || !memory::arena_enabled() {
        false
    } else {
        be.reserve_arena(plan.total())
            .context("reserving the memory plan's arena")?
    };
    let label = spec.label();
    eprintln!(
        "bench-train: building {label} ({}; {} layers, hidden {}, vocab {}) on {device}",
        spec.source(),
        mc.num_hidden_layers,
        mc.hidden_size,
        mc.vocab_size
    );
    let t0 = Instant::now();
    let model = build_model(be, spec, args)?;
    be.synchronize()?;
    let build_secs = t0.elapsed().as_secs_f64();
    let after_model = be.memory_in_use();
    eprintln!("bench-train: model ready in {build_secs:.1} s");

    let data = synthetic_data(&cfg, mc.vocab_size, args.seed)?;
    let tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.cutoff;
    let mut trainer = Trainer::new(be, &model, cfg.clone(), data, &label)?;
    let stats_before_steps = be.memory_stats();
    // On CUDA a second thread samples the device's memory in use every 2 ms while the steps
    // run: the end-of-step value misses the transient buffers freed within the step.
    let stop = AtomicBool::new(false);
    let sampled = AtomicU64::new(0);
    let (warm, measured) = std::thread::scope(|s| {
        if kind == Kind::Cuda {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(m) = be.memory_in_use() {
                        sampled.fetch_max(m, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            });
        }
        let res = run_steps(&mut trainer, args);
        stop.store(true, Ordering::Relaxed);
        res
    })?;
    let sampled_peak = Some(sampled.load(Ordering::Relaxed)).filter(|&m| m > 0);
    let stats = be.memory_stats();
    let step_device_allocations = match (stats_before_steps, stats) {
        (Some(a), Some(b)) => Some(b.device_allocations - a.device_allocations),
        _ => None,
    };
    let profile = if args.profile && !recforge::interrupted() {
        profile_step(be, &mut trainer)?
    } else {
        None
    };

    // ---- results --------------------------------------------------------------------------
    let med = |f: &dyn Fn(&Timed) -> f64| median(&measured.iter().map(f).collect::<Vec<_>>());
    let wall = med(&|t| t.wall);
    // Every step runs the same tokens, so this is the median of the per-step rates for an odd
    // step count, and consistent with `wall` for an even one.
    let tps = measured[0].rec.tokens as f64 / wall;
    let tps_min = measured
        .iter()
        .map(Timed::tokens_per_sec)
        .fold(f64::INFINITY, f64::min);
    let tps_max = measured
        .iter()
        .map(Timed::tokens_per_sec)
        .fold(0.0, f64::max);
    let fwd = med(&|t| t.rec.forward_secs);
    let bwd = med(&|t| t.rec.backward_secs);
    let opt = med(&|t| t.rec.optimizer_secs);
    let other = med(&|t| t.other());
    let label_rows = measured[0].rec.label_tokens as u64;
    let seqs = vec![cfg.cutoff; cfg.batch_size * cfg.grad_accum];
    let targets = setup.targets.clone();
    let flops = Flops::new(
        &mc,
        &targets,
        cfg.lora.r,
        &seqs,
        label_rows,
        cfg.checkpointing.recomputed(mc.num_hidden_layers),
    );
    let model_fps = flops.model() as f64 / wall;
    let hw_fps = flops.hardware() as f64 / wall;
    let peak = if kind == Kind::Cuda {
        peak_for(&device)
    } else {
        None
    };
    let mfu_note = match (kind, peak) {
        (Kind::Cuda, Some(p)) => format!(
            "divided by the {} dense bf16 tensor-core peak, {} TFLOP/s (its int8 peak, {} TOPS, would halve these; the forward GEMMs run int8, the backward ones bf16)",
            p.device, p.bf16_tflops, p.int8_tops
        ),
        (Kind::Cuda, None) => format!(
            "omitted: no peak is known for '{device}' (add it to bench-train's peak table)"
        ),
        (k, _) => format!("omitted: MFU needs a real GPU (device {})", k.name()),
    };
    let mfu = peak.map(|p| model_fps / (p.bf16_tflops * 1e12));
    let hfu = peak.map(|p| hw_fps / (p.bf16_tflops * 1e12));
    let end_of_step = warm
        .iter()
        .chain(&measured)
        .filter_map(|t| t.rec.memory_in_use)
        .max();
    let peak_mem = sampled_peak.max(end_of_step);
    let (mem_used, mem_ratio, mem_note) = match (kind, peak_mem) {
        (Kind::Cuda, Some(m)) => {
            let base = baseline.unwrap_or(0);
            let used = m.saturating_sub(base);
            (
                Some(used),
                Some(used as f64 / plan.total() as f64),
                format!(
                    "device memory in use (driver: total − free, every process), the largest value sampled every 2 ms during the steps and at each step's end, minus the {} in use before the model was built (the CUDA context)",
                    human(base)
                ),
            )
        }
        (Kind::Cuda, None) => (
            None,
            None,
            "n/a: the device did not report memory in use".to_string(),
        ),
        (k, _) => (
            None,
            None,
            format!("n/a on {}: only a real GPU reports memory in use", k.name()),
        ),
    };
    let first_loss = warm
        .first()
        .or(measured.first())
        .map(|t| t.rec.loss)
        .unwrap_or(f64::NAN);
    let last_loss = measured.last().map(|t| t.rec.loss).unwrap_or(f64::NAN);

    // ---- the table ------------------------------------------------------------------------
    let targets_s = targets.join(",");
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<13}{v}\n"));
    line(
        "bench-train",
        format!("{label} ({}) on {device}", spec.source()),
    );
    line(
        "shape",
        format!(
            "{} layers, hidden {}, intermediate {}, heads {} (kv {}) × {}, vocab {}{}",
            mc.num_hidden_layers,
            mc.hidden_size,
            mc.intermediate_size,
            mc.num_attention_heads,
            mc.num_key_value_heads,
            mc.head_dim,
            mc.vocab_size,
            if mc.tie_word_embeddings {
                ", tied head"
            } else {
                ""
            }
        ),
    );
    line(
        "params",
        format!(
            "N = {} frozen int8 linear, head {} ({}), N_lora = {} trainable",
            count(flops.base_params),
            count(flops.head_params),
            be.activation_dtype(),
            count(flops.lora_params)
        ),
    );
    line(
        "setup",
        format!(
            "preset {}: batch {} × seq {} × accum {} = {} tokens/step; LoRA r {} (alpha {}, dropout {}) on {}; checkpointing {}; outlier threshold {}",
            args.preset,
            cfg.batch_size,
            cfg.cutoff,
            cfg.grad_accum,
            tokens_per_step,
            cfg.lora.r,
            cfg.lora.alpha,
            cfg.lora.dropout,
            targets_s,
            cfg.checkpointing.describe(mc.num_hidden_layers),
            args.outlier_threshold
        ),
    );
    line(
        "steps",
        format!(
            "{} warm-up (not measured) + {} measured{}; model built in {:.1} s",
            args.warmup,
            measured.len(),
            if measured.len() < args.steps {
                format!(" (of {}: --time-limit reached)", args.steps)
            } else {
                String::new()
            },
            build_secs
        ),
    );
    line(
        "loss",
        format!("{first_loss:.4} (first step) → {last_loss:.4} (last)"),
    );
    line(
        "throughput",
        format!(
            "{} tokens/s (at the median step time of {}; slowest {}, fastest {})",
            thousands(tps),
            measured.len(),
            thousands(tps_min),
            thousands(tps_max)
        ),
    );
    line(
        "ms/step",
        format!(
            "{:>10} {:>10} {:>10} {:>10} {:>10}",
            "total", "forward", "backward", "optimizer", "other"
        ),
    );
    line(
        "  (each its own median)",
        format!(
            "{:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            wall * 1e3,
            fwd * 1e3,
            bwd * 1e3,
            opt * 1e3,
            other * 1e3
        ),
    );
    line(
        "FLOPs/step",
        format!(
            "model {:.4e} (forward {:.3e} + backward {:.3e}), hardware {:.4e} (+ recompute {:.3e}); attention causal",
            flops.model() as f64,
            flops.forward as f64,
            flops.backward as f64,
            flops.hardware() as f64,
            flops.recompute as f64
        ),
    );
    line(
        "achieved",
        format!(
            "{} model, {} hardware",
            flop_rate(model_fps),
            flop_rate(hw_fps)
        ),
    );
    line(
        "MFU",
        match (mfu, hfu) {
            (Some(m), Some(h)) => format!("{:.1}% (HFU {:.1}%), {mfu_note}", m * 100.0, h * 100.0),
            _ => mfu_note.clone(),
        },
    );
    line(
        "memory",
        match stats {
            Some(st) => format!(
                "buffers {} at most vs plan {}: ratio {:.3}; {}",
                human(st.peak),
                human(plan.total()),
                st.peak as f64 / plan.total() as f64,
                match st.arena {
                    Some(cap) => format!(
                        "one {} arena from the plan (high-water {}), {} device allocations during the steps",
                        human(cap),
                        human(st.arena_high_water),
                        step_device_allocations.unwrap_or(0)
                    ),
                    None => format!(
                        "no arena, {} device allocations during the steps",
                        step_device_allocations.unwrap_or(0)
                    ),
                }
            ),
            None => format!("measured n/a, plan {} ({mem_note})", human(plan.total())),
        },
    );
    if let (Some(u), Some(r), Some(raw)) = (mem_used, mem_ratio, peak_mem) {
        line(
            "  (driver)",
            format!(
                "{} in use at most, {} before the model: {} ({:.3} of the plan)",
                human(raw),
                human(baseline.unwrap_or(0)),
                human(u),
                r
            ),
        );
    }
    line("formula", FLOP_FORMULA.to_string());
    if let Some((pwall, p)) = &profile {
        line(
            "profile",
            format!(
                "one more step, every device operation timed ({}): {} operations, {:.1} ms of the step's {:.1} ms wall ({:.1}%; the rest is host work and gaps)",
                p.timer,
                p.launches(),
                p.total_ms(),
                pwall * 1e3,
                100.0 * p.total_ms() / (pwall * 1e3)
            ),
        );
        out.push_str(&profile_table(p, 20));
    }
    print!("{out}");

    // ---- JSON -----------------------------------------------------------------------------
    if let Some(path) = &args.json {
        let v = json!({
            "tool": "bench-train",
            "version": env!("CARGO_PKG_VERSION"),
            "device": device,
            "device_kind": kind.name(),
            "model": {
                "name": label,
                "source": spec.source(),
                "layers": mc.num_hidden_layers,
                "hidden": mc.hidden_size,
                "intermediate": mc.intermediate_size,
                "heads": mc.num_attention_heads,
                "kv_heads": mc.num_key_value_heads,
                "head_dim": mc.head_dim,
                "vocab": mc.vocab_size,
                "tied_head": mc.tie_word_embeddings,
                "outlier_threshold": args.outlier_threshold,
                "build_secs": build_secs,
            },
            "config": {
                "preset": args.preset,
                "batch": cfg.batch_size,
                "seq": cfg.cutoff,
                "accum": cfg.grad_accum,
                "tokens_per_step": tokens_per_step,
                "r": cfg.lora.r,
                "alpha": cfg.lora.alpha,
                "dropout": cfg.lora.dropout,
                "targets": targets,
                "checkpointing": cfg.checkpointing.to_json(),
                "recomputed_layers": cfg.checkpointing.recomputed(mc.num_hidden_layers),
                "warmup_steps": args.warmup,
                "measured_steps": measured.len(),
                "requested_steps": args.steps,
                "stopped_by_time_limit": measured.len() < args.steps && !recforge::interrupted(),
                "stopped_by_interrupt": measured.len() < args.steps && recforge::interrupted(),
                "seed": args.seed,
                // GEMM tile overrides (ops::Tile): "auto" = the per-shape pick.
                "w8a8_tile": std::env::var("RECFORGE_W8A8_TILE").unwrap_or_else(|_| "auto".into()),
                "dx_tile": std::env::var("RECFORGE_DX_TILE").unwrap_or_else(|_| "auto".into()),
                "lora_up": std::env::var("RECFORGE_LORA_UP").unwrap_or_else(|_| "pass".into()),
            },
            "tokens_per_sec": tps,
            "tokens_per_sec_min": tps_min,
            "tokens_per_sec_max": tps_max,
            "step_ms": {
                "statistic": "median over the measured steps (each column separately)",
                "total": wall * 1e3,
                "forward": fwd * 1e3,
                "backward": bwd * 1e3,
                "optimizer": opt * 1e3,
                "other": other * 1e3,
            },
            "loss": { "first": first_loss, "last": last_loss },
            "flops": {
                "formula": FLOP_FORMULA,
                "attention": "causal: only the s(s+1)/2 (query, key) pairs a causal mask keeps are counted",
                "N_base_linear_params": flops.base_params,
                "N_lora_params": flops.lora_params,
                "head_params": flops.head_params,
                "tokens_per_step": flops.tokens,
                "label_rows_per_step": flops.label_rows,
                "causal_pairs_per_step": flops.causal_pairs,
                "attention_forward_per_step": flops.attention_forward,
                "forward_per_step": flops.forward,
                "backward_per_step": flops.backward,
                "recompute_per_step": flops.recompute,
                "model_per_step": flops.model(),
                "hardware_per_step": flops.hardware(),
                "achieved_model_flops_per_sec": model_fps,
                "achieved_hardware_flops_per_sec": hw_fps,
            },
            "mfu": mfu,
            "hfu": hfu,
            "peak": peak.map(|p| json!({
                "device": p.device,
                "bf16_dense_tflops": p.bf16_tflops,
                "int8_dense_tops": p.int8_tops,
                "divided_by": "bf16_dense_tflops",
            })),
            "mfu_note": mfu_note,
            "memory": {
                "plan_total_bytes": plan.total(),
                "plan_budget_bytes": plan.budget,
                "plan_fits_budget": plan.fits(),
                "plan_logits_chunk_rows": HEAD_CHUNK,
                "plan_categories": plan_categories(plan),
                "in_use_before_model_bytes": baseline,
                "in_use_after_model_bytes": after_model,
                "in_use_max_bytes": peak_mem,
                "in_use_max_at_step_end_bytes": end_of_step,
                "in_use_max_sampled_bytes": sampled_peak,
                "measured_bytes": mem_used,
                "measured_over_plan": mem_ratio,
                "note": mem_note,
                "buffers": stats.map(|st| json!({
                    "what": "this process's device buffers, counted by the device layer in 256-byte blocks (exact on cuda and sim)",
                    "peak_bytes": st.peak,
                    "peak_over_plan": st.peak as f64 / plan.total() as f64,
                    "buffers_handed_out": st.buffers,
                    "device_allocations_total": st.device_allocations,
                    "device_allocations_during_steps": step_device_allocations,
                    "arena_bytes": st.arena,
                    "arena_high_water_bytes": st.arena.map(|_| st.arena_high_water),
                })),
                "arena_reserved": arena,
            },
            "profile": profile.as_ref().map(|(pwall, p)| json!({
                "what": "one step after the measured ones, every device operation (kernel launch, memset, copy) timed and summed by name",
                "timer": p.timer,
                "step_wall_ms": pwall * 1e3,
                "timed_ms": p.total_ms(),
                "operations": p.launches(),
                "kernels": p.kernels.iter().map(|k| json!({
                    "name": k.name,
                    "launches": k.launches,
                    "ms": k.ms,
                    "share_of_timed": k.ms / p.total_ms().max(f64::MIN_POSITIVE),
                })).collect::<Vec<_>>(),
            })),
            "warmup": warm.iter().map(Timed::to_json).collect::<Vec<_>>(),
            "steps": measured.iter().map(Timed::to_json).collect::<Vec<_>>(),
        });
        write_json(path, &v)?;
        eprintln!("bench-train: wrote {}", path.display());
    }
    Ok(())
}

/// One more optimizer step with the backend's profiler on: its wall time and where the
/// device's time went. None (with a note) on a backend that has no device operations.
fn profile_step<B: Backend>(
    be: &B,
    trainer: &mut Trainer<'_, B>,
) -> Result<Option<(f64, Profile)>> {
    if !be.profile_start()? {
        eprintln!(
            "bench-train: --profile: {} has no device operations to time; no profile",
            be.name()
        );
        return Ok(None);
    }
    let t = Instant::now();
    let stepped = trainer.step().context("the profiled step");
    let wall = t.elapsed().as_secs_f64();
    // Stop (and free the events) even when the step failed.
    let p = be.profile_stop()?;
    stepped?;
    Ok(p.map(|p| (wall, p)))
}

/// The `top` names that took the most time, then one line for the rest.
fn profile_table(p: &Profile, top: usize) -> String {
    let total = p.total_ms().max(f64::MIN_POSITIVE);
    let mut s = format!(
        "  {:>10} {:>7} {:>9}  {}\n",
        "ms", "share", "launches", "operation"
    );
    for k in p.kernels.iter().take(top) {
        s += &format!(
            "  {:>10.3} {:>6.1}% {:>9}  {}\n",
            k.ms,
            100.0 * k.ms / total,
            k.launches,
            k.name
        );
    }
    if p.kernels.len() > top {
        let rest = &p.kernels[top..];
        let ms: f64 = rest.iter().map(|k| k.ms).sum();
        let n: u64 = rest.iter().map(|k| k.launches).sum();
        s += &format!(
            "  {:>10.3} {:>6.1}% {:>9}  ({} more operations)\n",
            ms,
            100.0 * ms / total,
            n,
            rest.len()
        );
    }
    s
}

/// The plan's total per category, in the plan's order.
fn plan_categories(plan: &memory::Plan) -> Value {
    let mut cats: Vec<&str> = plan.entries.iter().map(|e| e.category).collect();
    cats.dedup();
    Value::Object(
        cats.into_iter()
            .map(|c| (c.to_string(), json!(plan.category_total(c))))
            .collect(),
    )
}

/// Write `v` to `path` through a temporary file in the same folder, renamed into place.
fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)? + "\n";
    // The error names the path.
    rmodel::convert::write_atomic(path, text.as_bytes()).context("--json")
}

fn count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2} B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} K", x / 1e3)
    } else {
        format!("{n}")
    }
}

fn flop_rate(x: f64) -> String {
    if x >= 1e12 {
        format!("{:.2} TFLOP/s", x / 1e12)
    } else {
        format!("{:.2} GFLOP/s", x / 1e9)
    }
}

fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    if x < 100.0 {
        return format!("{x:.1}");
    }
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The backend `--device` asks for (`DeviceChoice::open`).
fn open_backend(device: DeviceChoice) -> Result<Chosen> {
    Ok(device.open()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_of_llama_7b_at_batch_4_by_1024() {
        let c = memory::named_shape("llama-7b").unwrap();
        let t: Vec<String> = ["q", "k", "v", "o"].iter().map(|s| s.to_string()).collect();
        let seqs = vec![1024; 4];
        let f = Flops::new(&c, &t, 16, &seqs, 4 * 1023, 32);
        // 32 · (4·4096² + 3·4096·11008) frozen weights; 32 · 4 · 16 · 8192 LoRA weights.
        assert_eq!(f.base_params, 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008));
        assert_eq!(f.lora_params, 32 * 4 * 16 * 8192);
        assert_eq!(f.causal_pairs, 4 * 1024 * 1025 / 2);
        let n = f.base_params as f64;
        let tok = 4096.0;
        // Dominated by 4·N·T (model) and 6·N·T (hardware, with the recompute).
        let model = f.model() as f64;
        assert!(model > 4.0 * n * tok && model < 4.3 * n * tok, "{model:e}");
        let hw = f.hardware() as f64;
        assert!(hw > 6.0 * n * tok && hw < 6.4 * n * tok, "{hw:e}");
        let no_ckpt = Flops::new(&c, &t, 16, &seqs, 4 * 1023, 0);
        assert_eq!(no_ckpt.hardware(), no_ckpt.model());
        assert_eq!(no_ckpt.model(), f.model());
        // 8 of 32 layers recompute a quarter of what all 32 do.
        let part = Flops::new(&c, &t, 16, &seqs, 4 * 1023, 8);
        assert_eq!(part.model(), f.model());
        assert_eq!(part.recompute, f.recompute / 4);
    }

    #[test]
    fn peaks_by_device_name() {
        assert_eq!(
            peak_for("NVIDIA H100 80GB HBM3").unwrap().device,
            "H100 SXM"
        );
        assert_eq!(peak_for("NVIDIA H100 PCIe").unwrap().device, "H100 PCIe");
        assert_eq!(peak_for("cuda (NVIDIA H200)").unwrap().bf16_tflops, 989.0);
        assert_eq!(
            peak_for("NVIDIA GeForce RTX 4090").unwrap().bf16_tflops,
            165.2
        );
        assert_eq!(
            peak_for("NVIDIA GeForce RTX 3090").unwrap().bf16_tflops,
            71.0
        );
        assert_eq!(
            peak_for("NVIDIA A100-SXM4-80GB").unwrap().bf16_tflops,
            312.0
        );
        assert!(peak_for("NVIDIA GeForce GTX 1080").is_none());
    }

    #[test]
    fn an_over_budget_plan_stops_with_the_fix() {
        let c = memory::named_shape("llama-7b").unwrap();
        let spec = ModelSpec::Random {
            name: "llama-7b".into(),
            config: c.clone(),
        };
        let setup = |batch, seq| TrainSetup {
            model: c.clone(),
            batch,
            seq,
            lora_rank: 16,
            targets: ["q", "k", "v", "o"].iter().map(|s| s.to_string()).collect(),
            checkpointing: memory::Checkpointing::All,
            logits_chunk: HEAD_CHUNK,
            budget: 24 * memory::GIB,
        };
        let ok = setup(4, 1024);
        assert!(check_budget(&spec, &ok, &memory::plan_training(&ok).unwrap()).is_ok());
        let big = setup(64, 4096);
        let e = check_budget(&spec, &big, &memory::plan_training(&big).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("the budget is 24.00 GiB"), "{e}");
        assert!(e.contains("--batch") && e.contains("--seq"), "{e}");
    }

    #[test]
    fn medians_and_number_formatting() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(12.34), "12.3");
    }
}
