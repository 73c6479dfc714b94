//! The recforge command line.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use recforge::backend::gpu::{probe_cuda, Chosen, DeviceChoice};
use recforge::backend::Backend;
use recforge::backend::SamplingParams;
use recforge::infer::batch::{
    cache_layout, cache_layout_of, generate_batch_with, BatchOptions, Request,
};
use recforge::infer::generate::{generate_with as generate_tokens, GenerateOptions, StopReason};
use recforge::kernels;
use recforge::memory;
use recforge::model::lora::parse_targets;
use recforge::model::{self, Llama, LoadOptions};
use recforge::rec;
use recforge::train::{DevAdapter, Example, TrainConfig, Trainer};

/// The model `generate` and `info` use when --model is not given (fetched by
/// scripts/fetch-assets.sh).
const DEFAULT_MODEL: &str = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// MovieLens-100K for `rec data` (fetched by scripts/fetch-assets.sh).
const DEFAULT_DATASET: &str = "assets/ml-100k";

#[derive(Parser)]
#[command(
    name = "recforge",
    version,
    about = "8-bit LoRA fine-tuning and serving of LLaMA-family models for recommendation"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt (greedy, or sampled with --sampling / --temperature / --top-k /
    /// --top-p).
    Generate {
        /// A .gguf file or a Hugging Face folder (config.json + safetensors + tokenizer.json).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// The prompt (or give --prompts).
        #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
        prompt: Option<String>,
        /// A file of prompts, completed together in batches over the paged KV cache: JSON Lines,
        /// each line a JSON string or an object with a "prompt" field (any other line is the
        /// prompt's text itself). Writes one JSON line per prompt, in file order, to stdout or
        /// --out. Prompt i samples with seed --seed + i. An object's "adapter" field names the
        /// PEFT adapter folder that prompt runs with (relative to the file's folder; the
        /// adapters named are stacked, so a batch mixes them; not with --adapter).
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// With --prompts: sequences decoded together at most.
        #[arg(long, conflicts_with = "prompt", default_value_t = 16)]
        batch: usize,
        /// With --prompts: tokens per KV-cache block.
        #[arg(long, conflicts_with = "prompt", default_value_t = 16)]
        block_size: usize,
        /// With --prompts: KV-cache blocks (default: enough for --batch sequences of the longest
        /// prompt + --max-new-tokens; fewer make sequences wait or be preempted and recomputed).
        #[arg(long, conflicts_with = "prompt")]
        kv_blocks: Option<usize>,
        /// With --prompts: do not compute the prefix common to every prompt once.
        #[arg(long, conflicts_with = "prompt")]
        no_prefix_sharing: bool,
        /// With --prompts: prompt tokens one prefill forward computes at most; the prompts
        /// admitted together are prefilled together within it, and a longer prompt alone in
        /// chunks of this many (each attending to the cached ones before it).
        #[arg(long, conflicts_with = "prompt", default_value_t = recforge::infer::batch::DEFAULT_PREFILL_TOKENS)]
        prefill_tokens: usize,
        /// With --prompts: write the JSON lines here (through a temporary file) instead of stdout.
        #[arg(long, conflicts_with = "prompt")]
        out: Option<PathBuf>,
        /// A PEFT LoRA adapter folder (e.g. from `rec train`) applied to the projections it
        /// targets, unmerged: the int8 base plus the f32 low-rank path, as in training.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Default 64; 300 with `--sampling itrek`.
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Sampling preset: greedy, or itrek (temperature 0.1, top-k 10, top-p 0.1: the ITREK /
        /// RecRanker setting for ranking prompts). The flags below override single values.
        #[arg(long, default_value = "greedy")]
        sampling: String,
        /// 0 = greedy.
        #[arg(long, allow_negative_numbers = true)]
        temperature: Option<f32>,
        /// 0 = no limit.
        #[arg(long)]
        top_k: Option<u32>,
        /// 1 = no limit.
        #[arg(long, allow_negative_numbers = true)]
        top_p: Option<f32>,
        /// Seed of the uniform numbers sampling draws: the same seed gives the same text on the
        /// same device (backends pick the same token from the same logits; their logits differ
        /// by bf16 rounding).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu, cuda, sim or auto (CUDA when a GPU is usable, else CPU).
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        /// Use the prompt as it is, without the model's chat template.
        #[arg(long)]
        raw: bool,
        /// Keep the linear weights in f32 instead of int8 (the reference path).
        #[arg(long)]
        f32: bool,
        /// LLM.int8 outlier threshold for activations; 0 disables the decomposition.
        #[arg(long, default_value_t = 6.0)]
        outlier_threshold: f32,
        /// Device memory budget the generation plan (model, KV cache, prefill) must fit
        /// (checked on CUDA).
        #[arg(long, default_value = "24GiB")]
        budget: String,
    },
    /// Show the devices, whether CUDA kernels were built, and a model's configuration.
    Info {
        /// A .gguf file or a Hugging Face folder to describe [default: the bundled SmolLM2,
        /// when fetched]
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Write a model (e.g. a GGUF file) as a Hugging Face folder.
    Convert {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The output's precision: keep (the source's; quantized GGUF types become f32), f32,
        /// bf16 or f16.
        #[arg(long, default_value = "keep")]
        dtype: String,
    },
    /// List the compiled CUDA kernels with ptxas' registers, shared memory and spills.
    Kernels,
    /// Recommendation: build TALLRec data, LoRA-train on it, evaluate Yes/No AUC.
    Rec {
        #[command(subcommand)]
        cmd: RecCmd,
    },
    /// Fold a LoRA adapter (PEFT format) into a base model and write the merged HF folder.
    Merge {
        #[arg(long)]
        model: PathBuf,
        /// Folder with adapter_config.json + adapter_model.safetensors.
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The output's precision: keep (each weight's own; quantized GGUF types become f32),
        /// f32, bf16 or f16 (merged in f32, rounded once).
        #[arg(long, default_value = "keep")]
        dtype: String,
    },
    /// Print the memory plan of a LoRA training step and whether it fits the budget.
    Plan {
        /// A model path, or a named shape: llama-7b, llama-13b, smollm2-135m.
        #[arg(long, default_value = "llama-7b")]
        model: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 1024)]
        seq: usize,
        /// Device memory budget, e.g. 24GiB.
        #[arg(long, default_value = "24GiB")]
        budget: String,
        /// LoRA rank (`--r` as in `rec train` and bench-train).
        #[arg(long, alias = "r", default_value_t = 16)]
        lora_r: usize,
        /// LoRA target modules, comma-separated (q,k,v,o,gate,up,down).
        #[arg(long, default_value = "q,k,v,o")]
        targets: String,
        /// Which layers recompute their activations in the backward pass: auto (the fewest that
        /// fit the budget, leaving 1 GiB for the CUDA context), on (all), off (none), or a count.
        #[arg(long, default_value = "auto")]
        checkpointing: memory::CheckpointChoice,
        /// The same as --checkpointing off.
        #[arg(long, conflicts_with = "checkpointing")]
        no_checkpointing: bool,
        /// Rows of logits materialized at a time (the trainer's chunk by default).
        #[arg(long, default_value_t = recforge::train::step::HEAD_CHUNK)]
        logits_chunk: usize,
        /// Also report what else fits: the largest batch and sequence length of a training
        /// step; with --score the most prompts a pass; with --generate the most new tokens.
        #[arg(long)]
        solve: bool,
        /// Plan a scoring run (`rec eval`) instead of a training step: --batch prompts of --seq
        /// tokens per pass, the first --prefix of them shared by every prompt, with the adapter
        /// (--lora-r, --targets) applied.
        #[arg(long)]
        score: bool,
        /// With --score or --prompts: tokens every prompt shares (computed once).
        #[arg(long, default_value_t = 0)]
        prefix: usize,
        /// Plan a generation (`recforge generate`) instead: a --seq-token prompt, then this
        /// many new tokens in its KV cache.
        #[arg(long, conflicts_with = "score")]
        generate: Option<usize>,
        /// With --generate: an adapter (--lora-r, --targets) applied unmerged, as
        /// `generate --adapter` does.
        #[arg(long, requires = "generate")]
        adapter: bool,
        /// With --generate: plan `generate --prompts` instead — this many prompts of --seq
        /// tokens (the first --prefix shared by all), --batch of them decoded together over a
        /// paged KV cache in blocks of 16 tokens; with --solve, the largest --batch that fits.
        #[arg(long, requires = "generate")]
        prompts: Option<usize>,
        /// With --generate --prompts: prompt tokens one prefill forward computes at most, as
        /// `generate --prefill-tokens`.
        #[arg(long, requires = "prompts", default_value_t = recforge::infer::batch::DEFAULT_PREFILL_TOKENS)]
        prefill_tokens: usize,
        /// Plan a `rec prune` scoring pass instead: --batch samples (its --batch) of up to --seq
        /// tokens (its longest sample) through a training step without AdamW's moments, plus
        /// the per-sample gradient scratch; the layers recomputed chosen as `rec prune` does.
        #[arg(long, conflicts_with_all = ["score", "generate", "checkpointing", "no_checkpointing"])]
        prune: bool,
    },
}

#[derive(Subcommand)]
enum RecCmd {
    /// Build a dataset file.
    Data {
        #[command(subcommand)]
        kind: DataKind,
    },
    /// LoRA-train a model on a TALLRec JSON file and save the adapter (PEFT format).
    Train(Box<TrainArgs>),
    /// Data pruning: score each training sample by the norm of its LoRA gradient and keep a
    /// subset to train on (stratified over the scores, or the highest / lowest).
    Prune(Box<PruneArgs>),
    /// Score a TALLRec JSON file: P(Yes) per sample, AUC, accuracy, log-loss.
    Eval {
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// A PEFT adapter folder to apply (none: the base model).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Score each sample with the adapter its "adapter" field names (a folder, relative
        /// to the data file's folder; absent or null: the base model), every adapter named
        /// stacked into one so a forward pass mixes them (per-user LoRA). Prompts run in full.
        #[arg(long, conflicts_with = "adapter")]
        per_sample_adapters: bool,
        /// Score only the first N samples of the file.
        #[arg(long)]
        limit: Option<usize>,
        /// Prompts packed per forward pass.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        /// Also write the metrics and every P(Yes) here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run every prompt in full instead of computing the prompts' common prefix once.
        #[arg(long)]
        no_prefix_sharing: bool,
        /// Device memory budget the scoring plan must fit (checked on CUDA).
        #[arg(long, default_value = "24GiB")]
        budget: String,
        /// Keep the linear weights in f32 instead of int8 (the reference for int8's effect
        /// on the scores).
        #[arg(long)]
        f32: bool,
        /// LLM.int8 outlier threshold for activations; 0 disables the decomposition. Outlier
        /// columns are found over a whole pass, so above 0 a sample's P(Yes) depends a little
        /// on the samples batched with it (--batch, prefix sharing); at 0 it does not.
        #[arg(long, default_value_t = 6.0)]
        outlier_threshold: f32,
    },
}

#[derive(Subcommand)]
enum DataKind {
    /// TALLRec samples from MovieLens-100K (RecBole atomic files).
    Tallrec {
        #[arg(long, default_value = DEFAULT_DATASET)]
        dataset: PathBuf,
        /// train, valid or test (80/10/10 of the last 10,000 samples).
        #[arg(long)]
        split: String,
        #[arg(long)]
        out: PathBuf,
        /// Draw this many samples (few-shot training sets: 16 … 1024).
        #[arg(long)]
        samples: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// TALLRec JSON file (a list of {instruction, input, output}).
    #[arg(long)]
    data: PathBuf,
    /// Where the adapter is written (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// tallrec or itrek; every value below overrides it.
    #[arg(long, default_value = "tallrec")]
    preset: String,
    /// Optimizer updates.
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate (AdamW), reached after the warm-up; cosine decay to 0 after it.
    #[arg(long)]
    lr: Option<f32>,
    /// Updates of linear warm-up from 0 to --lr.
    #[arg(long)]
    warmup: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch: Option<usize>,
    /// Micro-batches per update.
    #[arg(long)]
    accum: Option<usize>,
    /// Tokens per sample at most (prompt + response), cut on the right as TALLRec does; a
    /// sample left without a response token is skipped.
    #[arg(long)]
    cutoff: Option<usize>,
    /// LoRA rank.
    #[arg(long)]
    r: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long)]
    alpha: Option<f32>,
    /// LoRA dropout on the adapter's input, in [0, 1).
    #[arg(long)]
    dropout: Option<f32>,
    /// LoRA targets, comma-separated: q,k,v,o,gate,up,down.
    #[arg(long)]
    targets: Option<String>,
    /// Seed of the adapter's initialisation, the dropout masks and the data order.
    #[arg(long)]
    seed: Option<u64>,
    /// AdamW's decoupled weight decay.
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long)]
    max_grad_norm: Option<f32>,
    /// Which layers recompute their activations in the backward pass: auto (the fewest that fit
    /// the --budget by the memory plan, leaving 1 GiB for the CUDA context), on (all), off
    /// (none: fastest, most memory), or a number of layers. Gradients are the same either way.
    #[arg(long, default_value = "auto")]
    checkpointing: memory::CheckpointChoice,
    /// The same as --checkpointing off.
    #[arg(long, conflicts_with = "checkpointing")]
    no_checkpointing: bool,
    /// Write a resumable checkpoint here every --checkpoint-every updates and at the end.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Continue from a checkpoint folder (same data file). Its settings are kept: only --steps
    /// (the whole run's length) may change; a flag with another value than the checkpoint's is
    /// refused.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Device memory budget the plan must fit (checked on CUDA).
    #[arg(long, default_value = "24GiB")]
    budget: String,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

#[derive(clap::Args)]
struct PruneArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// TALLRec JSON file to prune (a list of {instruction, input, output}).
    #[arg(long)]
    data: PathBuf,
    /// Where the kept samples are written: a TALLRec JSON file, in the input's order.
    #[arg(long)]
    out: PathBuf,
    /// How many samples to keep: a count (256) or a share of the samples that can be scored
    /// (25%).
    #[arg(long)]
    keep: String,
    /// stratified (equal-width strata over the scores, the budget spread evenly: easy, typical
    /// and hard samples alike), highest or lowest gradient norms.
    #[arg(long, default_value = "stratified")]
    select: String,
    /// Strata of the score range, with --select stratified.
    #[arg(long, default_value_t = rec::prune::DEFAULT_STRATA)]
    strata: usize,
    /// Select among the "Yes." samples and among the "No." samples separately, each answer
    /// keeping its share of the input (a gradient-norm selection can otherwise take mostly one
    /// answer).
    #[arg(long)]
    balance_labels: bool,
    /// The adapter whose gradients are measured, e.g. one trained briefly on this data (on
    /// TALLRec, sets scored this way trained better than random ones; see the README); without
    /// it, a fresh adapter of the preset (PEFT's initialisation: B = 0, so only B's gradient
    /// counts, through a random A).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// tallrec or itrek: the fresh adapter's rank, alpha and targets, and the cutoff.
    #[arg(long, default_value = "tallrec")]
    preset: String,
    /// Tokens per sample at most, as `rec train --cutoff` (a sample left without a response
    /// token is neither scored nor kept).
    #[arg(long)]
    cutoff: Option<usize>,
    /// Samples per forward + backward pass.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Seed of the fresh adapter and of the draws within strata.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write every sample's score (labelled tokens, loss, gradient norm, kept) as JSON.
    #[arg(long)]
    scores: Option<PathBuf>,
    /// Select from the scores a previous run wrote with --scores instead of scoring again (no
    /// model is loaded; the file must have been written for this --data).
    #[arg(
        long,
        value_name = "SCORES",
        conflicts_with_all = ["model", "adapter", "preset", "cutoff", "batch", "budget", "device",
            "outlier_threshold"]
    )]
    from_scores: Option<PathBuf>,
    /// LLM.int8 outlier threshold for activations; 0 disables the decomposition. Outlier
    /// columns are found over a whole pass, so above 0 a sample's score moves a little with
    /// the samples batched with it (--batch); at 0 it does not.
    #[arg(long, default_value_t = 6.0)]
    outlier_threshold: f32,
    /// Device memory budget the plan must fit (checked on CUDA).
    #[arg(long, default_value = "24GiB")]
    budget: String,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

fn main() -> ExitCode {
    recforge::restore_default_sigpipe();
    recforge::keep_freed_host_memory();
    let cli = Cli::parse();
    match recforge::on_cpu_pool(|| run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate {
            model,
            prompt,
            prompts,
            batch,
            block_size,
            kv_blocks,
            no_prefix_sharing,
            prefill_tokens,
            out,
            adapter,
            max_new_tokens,
            sampling,
            temperature,
            top_k,
            top_p,
            seed,
            device,
            raw,
            f32,
            outlier_threshold,
            budget,
        } => {
            let budget = memory::parse_bytes(&budget)
                .with_context(|| format!("--budget '{budget}': expected a size such as 24GiB"))?;
            model::llama::check_outlier_threshold(outlier_threshold)
                .context("--outlier-threshold")?;
            let opts = LoadOptions {
                int8: !f32,
                outlier_threshold,
            };
            let mut params = SamplingParams::preset(&sampling)?;
            let max_new = max_new_tokens.unwrap_or(if sampling == "itrek" {
                recforge::backend::sampling::ITREK_MAX_NEW_TOKENS
            } else {
                64
            });
            if let Some(t) = temperature {
                params.temperature = t;
            }
            if let Some(k) = top_k {
                params.top_k = k;
            }
            if let Some(p) = top_p {
                params.top_p = p;
            }
            params.validate()?;
            let gen = GenOpts {
                max_new,
                params,
                seed,
                budget,
                adapter,
            };
            let what = match (prompt, prompts) {
                (Some(p), _) => Prompts::One(p),
                (None, Some(file)) => {
                    if out
                        .as_deref()
                        .is_some_and(|o| model::convert::same_file(o, &file))
                    {
                        bail!(
                            "--out {} would overwrite the --prompts file",
                            file.display()
                        );
                    }
                    // Refused before the model loads.
                    let opts = BatchOptions {
                        max_batch: batch,
                        block_size,
                        num_blocks: kv_blocks,
                        share_prefix: !no_prefix_sharing,
                        max_prefill_tokens: prefill_tokens,
                    };
                    opts.validate()?;
                    if let Some(o) = &out {
                        model::convert::check_output(o, model::convert::Output::File)
                            .context("--out")?;
                    }
                    let (texts, adapters) = read_prompts(&file)?;
                    Prompts::File {
                        texts,
                        adapters,
                        opts,
                        out,
                    }
                }
                (None, None) => bail!("give --prompt or --prompts"),
            };
            generate(&model, &what, gen, device, raw, opts)
        }
        Cmd::Info { model } => info(model.as_deref()),
        Cmd::Convert { model, out, dtype } => convert(&model, &out, output_dtype(&dtype)?),
        Cmd::Merge {
            model,
            adapter,
            out,
            dtype,
        } => merge(&model, &adapter, &out, output_dtype(&dtype)?),
        Cmd::Rec { cmd } => match cmd {
            RecCmd::Data {
                kind:
                    DataKind::Tallrec {
                        dataset,
                        split,
                        out,
                        samples,
                        seed,
                    },
            } => default_asset(&dataset, DEFAULT_DATASET, "--dataset")
                .and_then(|d| rec_data(&d, &split, &out, samples, seed)),
            RecCmd::Prune(a) => rec_prune(&a),
            RecCmd::Train(a) => match open_backend(a.device)? {
                Chosen::Cpu(be) => rec_train(&be, &a),
                Chosen::Gpu(be) => rec_train(&be, &a),
            },
            RecCmd::Eval {
                model,
                data,
                adapter,
                per_sample_adapters,
                limit,
                batch,
                device,
                json,
                no_prefix_sharing,
                budget,
                f32,
                outlier_threshold,
            } => {
                model::llama::check_outlier_threshold(outlier_threshold)
                    .context("--outlier-threshold")?;
                let a = EvalArgs {
                    model: &model,
                    data: &data,
                    adapter: adapter.as_deref(),
                    per_sample_adapters,
                    limit,
                    batch,
                    json: json.as_deref(),
                    share_prefix: !no_prefix_sharing,
                    budget: &budget,
                    int8: !f32,
                    outlier_threshold,
                };
                match open_backend(device)? {
                    Chosen::Cpu(be) => rec_eval(&be, &a),
                    Chosen::Gpu(be) => rec_eval(&be, &a),
                }
            }
        },
        Cmd::Kernels => {
            print_kernels();
            Ok(())
        }
        Cmd::Plan {
            model,
            batch,
            seq,
            budget,
            lora_r,
            targets,
            checkpointing,
            no_checkpointing,
            logits_chunk,
            solve,
            score,
            prefix,
            generate,
            adapter,
            prompts,
            prefill_tokens,
            prune,
        } => {
            if prefix > 0 && !score && prompts.is_none() {
                bail!("--prefix goes with --score or --prompts");
            }
            let budget = memory::parse_bytes(&budget).with_context(|| {
                format!("--budget '{budget}': expected a size such as 24GiB or 512MiB")
            })?;
            let cfg = match memory::named_shape(&model) {
                Some(c) => c,
                None if !Path::new(&model).exists() => bail!(
                    "--model '{model}': not a named shape (llama-7b, llama-13b, smollm2-135m) \
                     and no file or folder by that name"
                ),
                None => open_model(Path::new(&model))?.config().clone(),
            };
            let (tokens, ctx) = (seq + generate.unwrap_or(0), cfg.max_position_embeddings);
            if tokens > ctx {
                eprintln!(
                    "note: {tokens} tokens a sequence, more than the model's context of {ctx} \
                     positions: the plan counts their memory, but the model was not trained on \
                     such lengths (generate refuses them)"
                );
            }
            // The same names as `rec train` and bench-train take (q or q_proj ...); a
            // generation plan without --adapter does not read them.
            let target_list = || -> Result<Vec<String>> {
                let t =
                    parse_targets(&targets).with_context(|| format!("--targets '{targets}'"))?;
                Ok(t.iter().map(|t| t.short_name().to_string()).collect())
            };
            if let (Some(max_new), Some(n)) = (generate, prompts) {
                let adapter = if adapter {
                    Some((lora_r, target_list()?))
                } else {
                    None
                };
                return plan_batch(
                    &cfg,
                    &model,
                    BatchShape {
                        n,
                        seq,
                        prefix,
                        batch,
                        max_new,
                        prefill_tokens,
                    },
                    budget,
                    adapter,
                    solve,
                );
            }
            if let Some(max_new) = generate {
                let setup = memory::GenerateSetup {
                    model: cfg,
                    prompt: seq,
                    max_new,
                    budget,
                    adapter: if adapter {
                        Some((lora_r, target_list()?))
                    } else {
                        None
                    },
                };
                let p = memory::plan_generation(&setup).map_err(anyhow::Error::msg)?;
                println!("generation plan: {model}, a {seq}-token prompt + {max_new} new tokens\n");
                print!("{}", p.table());
                if solve {
                    let n = memory::solve_generation(&setup).map_err(anyhow::Error::msg)?;
                    let ctx = setup.model.max_position_embeddings;
                    let room = ctx.saturating_sub(seq);
                    if room < n {
                        println!(
                            "most new tokens after a {seq}-token prompt: {room} (the model's \
                             context of {ctx}; the budget would hold {n})"
                        );
                    } else {
                        println!("most new tokens after a {seq}-token prompt: {n}");
                    }
                }
                if !p.fits() {
                    bail!(
                        "the plan needs {} but the budget is {}: a shorter prompt or fewer new \
                         tokens need less",
                        memory::human(p.total()),
                        memory::human(budget)
                    );
                }
                return Ok(());
            }
            if score {
                if prefix >= seq {
                    bail!("--prefix {prefix} must leave every prompt a token of its own (--seq {seq})");
                }
                let setup = memory::ScoreSetup {
                    model: cfg,
                    prefix,
                    batches: vec![(batch, batch * (seq - prefix))],
                    lora_rank: lora_r,
                    targets: target_list()?,
                    adapter: true,
                    budget,
                };
                let p = memory::plan_scoring(&setup).map_err(anyhow::Error::msg)?;
                let most = if solve {
                    Some(memory::solve_scoring(&setup, seq).map_err(anyhow::Error::msg)?)
                } else {
                    None
                };
                println!(
                    "scoring plan: {model}, {batch} prompts × {seq} tokens a pass ({prefix} shared), \
                     LoRA r={lora_r} on {targets}\n"
                );
                print!("{}", p.table());
                if let Some(n) = most {
                    println!("most prompts of {seq} tokens a pass: {n}");
                }
                if !p.fits() {
                    bail!(
                        "the plan needs {} but the budget is {}: a {} needs less",
                        memory::human(p.total()),
                        memory::human(budget),
                        if batch > 1 {
                            "smaller --batch"
                        } else {
                            "shorter --seq (one prompt a pass does not fit)"
                        }
                    );
                }
                return Ok(());
            }
            if seq < 2 {
                // As `rec train --cutoff` and `bench-train --seq`: a 1-token sequence has no
                // next token to train on (scoring and generation plans take any length).
                bail!(
                    "--seq must be at least 2 for a training plan (a sequence predicts its \
                     next tokens; --score or --generate plan other runs)"
                );
            }
            let setup = memory::TrainSetup {
                model: cfg,
                batch,
                seq,
                lora_rank: lora_r,
                targets: target_list()?,
                checkpointing: memory::Checkpointing::All,
                logits_chunk,
                budget,
            };
            let choice = checkpoint_choice(checkpointing, no_checkpointing);
            let (step, title): (memory::StepPlan, _) = if prune {
                (
                    memory::plan_sample_scoring,
                    "pruning plan (rec prune's scoring pass)",
                )
            } else {
                (memory::plan_training, "memory plan")
            };
            let setup = memory::TrainSetup {
                checkpointing: memory::choose_checkpointing_for(choice, &setup, step)
                    .map_err(anyhow::Error::msg)?,
                ..setup
            };
            plan(&model, &setup, choice, solve, (step, title))
        }
    }
}

fn open_model(path: &Path) -> Result<Box<dyn model::ModelSource>> {
    let path = &default_asset(path, DEFAULT_MODEL, "--model")?;
    model::open(path).with_context(|| format!("cannot load model {}", path.display()))
}

/// A default asset path (`default`, relative) is looked up in the current folder and then in
/// the recforge checkout this binary was built from, so the commands work from any folder;
/// a path the user gave is taken as it is.
fn default_asset(path: &Path, default: &str, flag: &str) -> Result<PathBuf> {
    if path != Path::new(default) || path.exists() {
        return Ok(path.to_path_buf());
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    let there = checkout.join(default);
    if there.exists() {
        return Ok(there);
    }
    bail!(
        "{default} does not exist here nor in the recforge checkout {}: run \
         scripts/fetch-assets.sh there, or pass {flag}",
        checkout.display()
    )
}

/// What `recforge generate` decodes with, and the device memory it may use.
#[derive(Clone)]
struct GenOpts {
    max_new: usize,
    params: SamplingParams,
    seed: u64,
    budget: u64,
    adapter: Option<PathBuf>,
}

/// The run `recforge plan --generate N --prompts P` plans: P prompts of `seq` tokens, the
/// first `prefix` shared, `batch` decoded together, `max_new` new tokens each, prefills of at
/// most `prefill_tokens`.
struct BatchShape {
    n: usize,
    seq: usize,
    prefix: usize,
    batch: usize,
    max_new: usize,
    prefill_tokens: usize,
}

/// `recforge plan --generate N --prompts P`: the plan of `generate --prompts` for `shape`.
fn plan_batch(
    cfg: &model::LlamaConfig,
    name: &str,
    shape: BatchShape,
    budget: u64,
    adapter: Option<(usize, Vec<String>)>,
    solve: bool,
) -> Result<()> {
    let BatchShape {
        n,
        seq,
        prefix,
        batch,
        max_new,
        prefill_tokens,
    } = shape;
    if n == 0 || batch == 0 || prefill_tokens == 0 {
        bail!(
            "--prompts {n}, --batch {batch} and --prefill-tokens {prefill_tokens} must be at least 1"
        );
    }
    if prefix >= seq {
        bail!("--prefix {prefix} must leave every prompt a token of its own (--seq {seq})");
    }
    if n > memory::MAX_PROMPTS {
        bail!(
            "--prompts {n}: a plan takes at most {}",
            memory::MAX_PROMPTS
        );
    }
    let plan_for = |batch: usize| {
        let opts = BatchOptions {
            max_batch: batch,
            max_prefill_tokens: prefill_tokens,
            ..Default::default()
        };
        // Prompts that share exactly the prefix.
        let layout = cache_layout_of(n, prefix, seq.saturating_add(max_new), &opts);
        memory::plan_batch_generation(&memory::BatchGenerateSetup {
            model: cfg.clone(),
            prompts: vec![seq; n],
            shared_prefix: layout.shared_prefix,
            max_new,
            max_running: layout.max_running,
            block_size: opts.block_size,
            num_blocks: layout.num_blocks,
            max_prefill_tokens: prefill_tokens,
            holds_every_running: layout.holds_every_running,
            budget,
            adapter: adapter.clone(),
        })
        .map_err(anyhow::Error::msg)
    };
    let p = plan_for(batch)?;
    println!(
        "batched generation plan: {name}, {n} prompts of {seq} tokens ({prefix} shared) + {max_new} new tokens each, {} decoded together\n",
        batch.min(n)
    );
    print!("{}", p.table());
    if solve {
        // The plan grows with the batch (cache blocks, prefill groups, the decode step):
        // bisect for the largest that fits.
        let (mut most, mut over) = (0, n.min(memory::MAX_SEQUENCES) + 1);
        while over - most > 1 {
            let b = most + (over - most) / 2;
            if plan_for(b)?.fits() {
                most = b;
            } else {
                over = b;
            }
        }
        println!("most prompts decoded together: {most} of {n}");
    }
    if !p.fits() {
        bail!(
            "the plan needs {} but the budget is {}: a smaller --batch or --prefill-tokens, shorter prompts or fewer new tokens need less",
            memory::human(p.total()),
            memory::human(budget)
        );
    }
    Ok(())
}

/// What `recforge generate` completes: one prompt, streamed to stdout, or a file of them,
/// batched.
enum Prompts {
    One(String),
    File {
        texts: Vec<String>,
        /// Each prompt's "adapter" folder, if its line names one.
        adapters: Vec<Option<PathBuf>>,
        opts: BatchOptions,
        out: Option<PathBuf>,
    },
}

/// The prompts of a `--prompts` file (see the flag's help), and each one's adapter folder.
#[allow(clippy::type_complexity)]
fn read_prompts(path: &Path) -> Result<(Vec<String>, Vec<Option<PathBuf>>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the prompts file {}", path.display()))?;
    let (mut out, mut adapters) = (vec![], vec![]);
    let base = path.parent().unwrap_or(Path::new(""));
    for (i, line) in text.lines().enumerate() {
        let where_ = || format!("{} line {}", path.display(), i + 1);
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        let mut adapter = None;
        let prompt = if l.starts_with('{') || l.starts_with('"') {
            match serde_json::from_str::<serde_json::Value>(l)
                .with_context(|| format!("{}: not valid JSON", where_()))?
            {
                serde_json::Value::String(s) => s,
                serde_json::Value::Object(o) => {
                    adapter = rec::tallrec::adapter_folder(o.get("adapter"), base)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", where_()))?;
                    match o.get("prompt") {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        _ => bail!("{}: the object has no \"prompt\" string", where_()),
                    }
                }
                _ => unreachable!("starts with {{ or \""),
            }
        } else {
            line.to_string()
        };
        if prompt.is_empty() {
            bail!("{}: the prompt is empty", where_());
        }
        out.push(prompt);
        adapters.push(adapter);
    }
    if out.is_empty() {
        bail!("the prompts file {} holds no prompt", path.display());
    }
    Ok((out, adapters))
}

fn generate(
    path: &Path,
    prompt: &Prompts,
    gen: GenOpts,
    device: DeviceChoice,
    raw: bool,
    opts: LoadOptions,
) -> Result<()> {
    match open_backend(device)? {
        Chosen::Cpu(be) => generate_on(&be, path, prompt, gen, raw, opts),
        Chosen::Gpu(be) => generate_on(&be, path, prompt, gen, raw, opts),
    }
}

fn generate_on<B: Backend>(
    be: &B,
    path: &Path,
    prompt: &Prompts,
    gen: GenOpts,
    raw: bool,
    opts: LoadOptions,
) -> Result<()> {
    let src = open_model(path)?;
    let tok = src
        .tokenizer()
        .with_context(|| format!("cannot load the tokenizer of {}", path.display()))?;
    // The adapters are read before the model, checked against it after.
    let per_prompt = match prompt {
        Prompts::File { adapters, .. } if adapters.iter().any(Option::is_some) => {
            if gen.adapter.is_some() {
                bail!("--adapter applies one adapter to every prompt, but the prompts file names adapters of its own");
            }
            Some(read_sample_adapters(adapters)?)
        }
        _ => None,
    };
    let single = gen.adapter.as_deref().map(read_adapter).transpose()?;
    let t0 = std::time::Instant::now();
    let model = Llama::load(src.as_ref(), be, opts)
        .with_context(|| format!("cannot load model {}", path.display()))?;
    eprintln!(
        "loaded {} ({}, {} layers, hidden {}, {}) on {} in {:.1}s",
        path.display(),
        src.format(),
        model.config.num_hidden_layers,
        model.config.hidden_size,
        if opts.int8 {
            "int8 linears"
        } else {
            "f32 linears"
        },
        be.name(),
        t0.elapsed().as_secs_f64()
    );
    // Prompts that name adapters: the folders stacked into one, each prompt gated to its own.
    let stacked = match per_prompt {
        Some((hosts, which, dirs)) => {
            let st = stack_adapters(hosts, &dirs, &model.config)?;
            eprintln!(
                "{} adapters stacked (rank {} in all) for {} of {} prompts, the others on the base \
                 model; prompts with different adapters share no prefix",
                dirs.len(),
                st.adapter.config.r,
                which.iter().flatten().count(),
                which.len()
            );
            Some((st, which))
        }
        None => None,
    };
    let dev_adapter = match (&stacked, gen.adapter.as_ref().zip(single)) {
        (Some((st, _)), _) => Some(DevAdapter::upload_frozen(be, &st.adapter)?),
        (None, Some((dir, host))) => {
            let host = fit_adapter(dir, host, &model.config)?;
            eprintln!(
                "adapter {}: r {}, alpha {} on {}",
                dir.display(),
                host.config.r,
                host.config.alpha,
                host.config
                    .targets
                    .iter()
                    .map(|t| t.peft_name())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            Some(DevAdapter::upload_frozen(be, &host)?)
        }
        (None, None) => None,
    };
    let view = match (&dev_adapter, &stacked) {
        (Some(d), Some((st, _))) => Some(d.stacked_view(st)?),
        (Some(d), None) => Some(d.view()),
        (None, _) => None,
    };
    let encode = |prompt: &str| -> Result<Vec<u32>> {
        let text = match (raw, tok.chat_prompt(prompt)) {
            (false, Some(chat)) => chat,
            _ => prompt.to_string(),
        };
        Ok(tok.encode(&text, true)?)
    };
    let mut stop_ids = tok.eos_ids.clone();
    for s in ["<|im_end|>", "<|endoftext|>"] {
        if let Some(id) = tok.token_id(s) {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
    }
    let adapter_plan = dev_adapter.as_ref().map(|d| {
        let targets = d.config.targets.iter();
        (
            d.config.r,
            targets
                .map(|t| t.short_name().to_string())
                .collect::<Vec<_>>(),
        )
    });
    let prompt = match prompt {
        Prompts::One(p) => p,
        Prompts::File {
            texts,
            opts: batch_opts,
            out,
            ..
        } => {
            let ids = texts
                .iter()
                .enumerate()
                .map(|(i, t)| encode(t).with_context(|| format!("prompt {i}")))
                .collect::<Result<Vec<_>>>()?;
            let b = BatchRun {
                ids,
                opts: batch_opts.clone(),
                out: out.as_deref(),
                stop_ids,
                reserve: be.memory_stats().is_some() && opts.int8,
                adapter: adapter_plan.clone(),
                adapter_of: stacked.map(|(_, which)| which).unwrap_or_default(),
            };
            return generate_batch_on(be, &model, view.as_ref(), &tok, &b, &gen);
        }
    };
    let ids = encode(prompt)?;
    if be.memory_stats().is_some() && opts.int8 {
        // A device: the KV cache and every buffer of the prefill and decode steps come from
        // one arena of what the plan leaves after the model and the adapter. (The plan counts
        // int8 linears; with --f32 the buffers are allocated as they come.)
        let p = memory::plan_generation(&memory::GenerateSetup {
            model: model.config.clone(),
            prompt: ids.len(),
            max_new: gen.max_new,
            budget: gen.budget,
            adapter: adapter_plan,
        })
        .map_err(anyhow::Error::msg)?;
        reserve_planned_arena(
            be,
            &p,
            "generation",
            "fewer --max-new-tokens or a shorter prompt need less",
        )?;
    }
    let gen_opts = GenerateOptions {
        max_new_tokens: gen.max_new,
        stop_ids,
        sampling: gen.params,
        seed: gen.seed,
    };
    let mut out_ids: Vec<u32> = vec![];
    let mut printed = 0usize;
    let stdout = std::io::stdout();
    let g = generate_tokens(be, &model, view.as_ref(), &ids, &gen_opts, |id| {
        out_ids.push(id);
        let s = tok.decode(&out_ids, true)?;
        // Print only whole characters: a multi-byte character may span tokens.
        if !s.ends_with('\u{FFFD}') && s.len() > printed {
            let mut lock = stdout.lock();
            let _ = lock.write_all(&s.as_bytes()[printed..]);
            let _ = lock.flush();
            printed = s.len();
        }
        Ok(())
    })?;
    println!();
    let why = match g.stop {
        StopReason::StopToken(id) => {
            format!("stop token {}", tok.id_to_token(id).unwrap_or_default())
        }
        StopReason::MaxTokens => "max tokens".into(),
    };
    eprintln!(
        "prefill {} tokens: {:.1} tok/s | decode {} tokens: {:.1} tok/s | stopped at {why}",
        g.prompt_tokens,
        g.prefill_tokens_per_sec(),
        g.tokens.len(),
        g.decode_tokens_per_sec()
    );
    Ok(())
}

/// A `--prompts` run: the encoded prompts and how to batch them.
struct BatchRun<'a> {
    ids: Vec<Vec<u32>>,
    opts: BatchOptions,
    out: Option<&'a Path>,
    stop_ids: Vec<u32>,
    /// Plan the run and reserve its arena (a device, int8 linears).
    reserve: bool,
    /// The adapter's rank and targets, for the plan.
    adapter: Option<(usize, Vec<String>)>,
    /// Each prompt's adapter of a stacked one (empty: every prompt on `adapter`, or none).
    adapter_of: Vec<Option<usize>>,
}

fn generate_batch_on<B: Backend>(
    be: &B,
    model: &Llama<B>,
    view: Option<&recforge::model::llama::AdapterView<'_, B>>,
    tok: &recforge::model::tokenizer::TextTokenizer,
    b: &BatchRun<'_>,
    gen: &GenOpts,
) -> Result<()> {
    let requests: Vec<Request> = b
        .ids
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.clone(),
            options: GenerateOptions {
                max_new_tokens: gen.max_new,
                stop_ids: b.stop_ids.clone(),
                sampling: gen.params,
                seed: gen.seed.wrapping_add(i as u64),
            },
            adapter: b.adapter_of.get(i).copied().flatten(),
        })
        .collect();
    let n = requests.len();
    b.opts.validate()?;
    let on_cpu = be.memory_stats().is_none();
    if b.reserve || on_cpu {
        // A device: the paged KV cache and every step's buffers come from one arena of what the
        // plan leaves after the model and the adapter. The CPU: they must fit the host.
        let layout = cache_layout(&requests, &b.opts);
        let p = memory::plan_batch_generation(&memory::BatchGenerateSetup {
            model: model.config.clone(),
            prompts: b.ids.iter().map(Vec::len).collect(),
            shared_prefix: layout.shared_prefix,
            max_new: gen.max_new,
            max_running: layout.max_running,
            block_size: b.opts.block_size,
            num_blocks: layout.num_blocks,
            max_prefill_tokens: b.opts.max_prefill_tokens,
            holds_every_running: layout.holds_every_running,
            budget: gen.budget,
            adapter: b.adapter.clone(),
        })
        .map_err(anyhow::Error::msg)?;
        let fix = "a smaller --batch or --prefill-tokens, fewer --kv-blocks or --max-new-tokens, or shorter prompts need less";
        if b.reserve {
            reserve_planned_arena(be, &p, "batched generation", fix)?;
        } else if let Some(avail) = memory::host_available() {
            // The plan counts K/V and activations in bf16 and the CPU holds f32: a lower bound.
            memory::check_host(p.step_bytes(), avail, "this batched generation", fix)
                .map_err(anyhow::Error::msg)?;
        }
    }
    eprintln!(
        "{n} prompts ({} tokens), up to {} at a time, KV blocks of {} tokens",
        b.ids.iter().map(Vec::len).sum::<usize>(),
        b.opts.max_batch,
        b.opts.block_size
    );
    let t0 = std::time::Instant::now();
    let mut last = t0;
    // Completions go out in prompt order as soon as every earlier one is done: to stdout line
    // by line, or to --out through a temporary file renamed at the end (an error or Ctrl-C
    // leaves no file there; the lines on stdout stay whole).
    let mut file = match b.out {
        Some(p) => Some(
            // The error names the path.
            model::convert::AtomicFile::create(p).context("--out")?,
        ),
        None => None,
    };
    let mut pending = std::collections::BTreeMap::new();
    // Read by the progress line, advanced by the writer.
    let written = std::cell::Cell::new(0usize);
    let mut generated = 0usize;
    recforge::stop_on_interrupt_saying(
        "\ninterrupt: stopping after this decode step (Ctrl-C again to abort)\n",
    );
    let run = generate_batch_with(
        be,
        model,
        view,
        &requests,
        &b.opts,
        |_, _| {
            generated += 1;
            if last.elapsed().as_secs_f64() >= 2.0 {
                last = std::time::Instant::now();
                let secs = t0.elapsed().as_secs_f64();
                eprintln!(
                    "  {generated} tokens generated in {secs:.1}s ({:.1} tok/s), {} of {n} prompts written",
                    generated as f64 / secs,
                    written.get()
                );
            }
            if recforge::interrupted() {
                return Err(recforge::error::Error::Invalid(
                    "interrupted (Ctrl-C)".into(),
                ));
            }
            Ok(())
        },
        |i, g| {
            let stop = match g.stop {
                StopReason::StopToken(id) => tok.id_to_token(id).unwrap_or_default(),
                StopReason::MaxTokens => "max tokens".into(),
            };
            let line = serde_json::json!({
                "index": i,
                "completion": tok.decode(&g.tokens, true)?,
                "prompt_tokens": g.prompt_tokens,
                "new_tokens": g.tokens.len(),
                "stop": stop,
            });
            pending.insert(i, format!("{line}\n"));
            while let Some(l) = pending.remove(&written.get()) {
                match file.as_mut() {
                    Some(f) => f.write_all(l.as_bytes())?,
                    None => {
                        let mut o = std::io::stdout().lock();
                        o.write_all(l.as_bytes())
                            .and_then(|_| o.flush())
                            .map_err(|e| {
                                recforge::error::Error::Invalid(format!(
                                    "writing the completions to stdout: {e}"
                                ))
                            })?;
                    }
                }
                written.set(written.get() + 1);
            }
            Ok(())
        },
    );
    let g = match run {
        Ok(g) => g,
        Err(e) if recforge::interrupted() => {
            drop(file);
            eprintln!(
                "interrupted: {} of {n} completions written{}",
                written.get(),
                if b.out.is_some() {
                    " (none to --out, which is written only whole)"
                } else {
                    " to stdout"
                }
            );
            let _ = e;
            std::process::exit(recforge::interrupt_exit_code());
        }
        Err(e) => return Err(e.into()),
    };
    if let (Some(f), Some(p)) = (file, b.out) {
        f.commit()
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    let s = &g.stats;
    eprintln!(
        "{n} prompts: {} new tokens in {:.2}s ({:.1} tok/s) | prefill {} tokens ({} of them a prefix shared by all) in {} forwards, {:.2}s | {} decode steps, up to {} sequences, {} preemptions | {} KV blocks of {}",
        s.generated_tokens,
        s.prefill_secs + s.decode_secs,
        s.tokens_per_sec(),
        s.prefill_tokens,
        s.shared_prefix,
        s.prefill_steps + usize::from(s.shared_prefix > 0),
        s.prefill_secs,
        s.decode_steps,
        s.max_running,
        s.preemptions,
        s.num_blocks,
        s.block_size
    );
    Ok(())
}

fn info(path: Option<&Path>) -> Result<()> {
    println!("recforge {}", env!("CARGO_PKG_VERSION"));
    println!("cpu: {} threads", rayon::current_num_threads());
    println!("cuda: {}", probe_cuda().describe());
    println!(
        "sim: SIMT simulator with {} kernels (--device sim for kernel runs)",
        kernels::SIM_KERNELS.len()
    );
    if kernels::BUILT {
        let n: usize = kernels::MODULES.iter().map(|m| m.kernels.len()).sum();
        let cubins = kernels::MODULES.iter().all(|m| !m.cubin_sm90.is_empty());
        println!(
            "kernels: {n} built by nvcc ({}) for compute_80 (PTX, compiled by the driver){}",
            kernels::NVCC_VERSION,
            if cubins {
                " and sm_90 (cubins: H100 / H200 load them as built)"
            } else {
                ""
            }
        );
    } else {
        println!("kernels: {}", kernels::NOT_BUILT);
    }
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => match default_asset(Path::new(DEFAULT_MODEL), DEFAULT_MODEL, "--model") {
            Ok(p) => p,
            Err(e) => {
                println!("model: none ({e:#})");
                return Ok(());
            }
        },
    };
    let src = open_model(&path)?;
    let c = src.config();
    println!("model: {} ({})", path.display(), src.format());
    println!(
        "  layers {}  hidden {}  intermediate {}",
        c.num_hidden_layers, c.hidden_size, c.intermediate_size
    );
    println!(
        "  heads {}  kv heads {}  head dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    // GGUF stores eps as an f32: 1e-5 arrives as 9.99999974e-6, so four digits are shown.
    println!(
        "  vocab {}  rope theta {}  rms eps {:.3e}  context {}",
        c.vocab_size, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings
    );
    let ids = |v: &[u32]| match v {
        [] => "none".to_string(),
        _ => v.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
    };
    println!(
        "  tied embeddings {}  bos {}  eos {}",
        c.tie_word_embeddings,
        ids(c.bos_token_id.as_slice()),
        ids(&c.eos_token_ids)
    );
    Ok(())
}

/// `--dtype` of convert and merge: None keeps the source's precision.
fn output_dtype(s: &str) -> Result<Option<recforge::tensor::DType>> {
    use recforge::tensor::DType;
    Ok(match s {
        "keep" => None,
        "f32" => Some(DType::F32),
        "bf16" => Some(DType::BF16),
        "f16" => Some(DType::F16),
        other => bail!("--dtype '{other}': expected keep, f32, bf16 or f16"),
    })
}

fn convert(path: &Path, out: &Path, dtype: Option<recforge::tensor::DType>) -> Result<()> {
    let src = open_model(path)?;
    recforge::stop_on_interrupt_saying(INTERRUPT_WRITE);
    let r =
        model::convert::to_hf_folder_as(src.as_ref(), out, dtype, tensor_progress("converting"));
    finish_tensor_write(r, out)
        .with_context(|| format!("cannot convert {} to {}", path.display(), out.display()))
}

const INTERRUPT_WRITE: &str = "\ninterrupt: stopping; the partial output is removed\n";

/// Progress of a tensor-by-tensor write: one line redrawn on a terminal, a plain line every
/// 64 tensors and at the end when piped (no carriage returns in a log).
fn tensor_progress(verb: &'static str) -> impl FnMut(usize, usize) {
    let tty = std::io::stderr().is_terminal();
    move |i, n| {
        if tty && (i == n || i % 8 == 0) {
            eprint!("\r{verb} {i}/{n} tensors");
        } else if !tty && (i == n || i % 64 == 0) {
            eprintln!("{verb} {i}/{n} tensors");
        }
    }
}

/// The end of a tensor-by-tensor write: the progress line closed (so an error starts a line
/// of its own), "wrote", or after Ctrl-C a note and exit status 128 + the signal (the writer removed its
/// partial folder).
fn finish_tensor_write(r: recforge::error::Result<()>, out: &Path) -> Result<()> {
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    match r {
        Ok(()) => {
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Err(_) if recforge::interrupted() => {
            eprintln!("interrupted: nothing written to {}", out.display());
            std::process::exit(recforge::interrupt_exit_code());
        }
        Err(e) => Err(e.into()),
    }
}

/// `--no-checkpointing` is the older spelling of `--checkpointing off`.
fn checkpoint_choice(choice: memory::CheckpointChoice, off: bool) -> memory::CheckpointChoice {
    if off {
        memory::CheckpointChoice::Fixed(memory::Checkpointing::Off)
    } else {
        choice
    }
}

/// `plan` of a step over a training setup: `step` plans it (a training step, or `rec prune`'s
/// scoring pass), `title` heads the table.
fn plan(
    model: &str,
    s: &memory::TrainSetup,
    choice: memory::CheckpointChoice,
    solve: bool,
    (step, title): (memory::StepPlan, &str),
) -> Result<()> {
    let p = step(s).map_err(anyhow::Error::msg)?;
    let auto = if choice == memory::CheckpointChoice::Auto {
        "auto: "
    } else {
        ""
    };
    println!(
        "{title}: {model}, batch {} × seq {}, LoRA r={} on {}, checkpointing {auto}{}\n",
        s.batch,
        s.seq,
        s.lora_rank,
        s.targets.join(","),
        s.checkpointing.describe(s.model.num_hidden_layers)
    );
    print!("{}", p.table());
    // Under auto the largest sizes are those with every layer recomputing (auto would pick
    // that policy for them).
    let solve_setup = memory::TrainSetup {
        checkpointing: if auto.is_empty() {
            s.checkpointing
        } else {
            memory::Checkpointing::All
        },
        ..s.clone()
    };
    let (b, q) = if solve || !p.fits() {
        memory::solve_for(&solve_setup, step).map_err(anyhow::Error::msg)?
    } else {
        (0, 0)
    };
    if solve {
        println!(
            "largest batch at seq {}: {b}; largest seq at batch {}: {q} (checkpointing {})",
            s.seq,
            s.batch,
            solve_setup
                .checkpointing
                .describe(s.model.num_hidden_layers)
        );
    }
    if !p.fits() {
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
        if fixes.is_empty() {
            fixes.push("a larger --budget (the frozen weights alone do not fit)".into());
        }
        bail!(
            "the plan needs {} but the budget is {}; it would fit with {}",
            memory::human(p.total()),
            memory::human(s.budget),
            fixes.join(", or ")
        );
    }
    Ok(())
}

fn print_kernels() {
    if !kernels::BUILT {
        println!("{}", kernels::NOT_BUILT);
        return;
    }
    println!(
        "{:<28} {:<6} {:>5} {:>7} {:>7} {:>7}",
        "kernel", "arch", "regs", "smem", "stack", "spills"
    );
    for m in kernels::MODULES {
        for r in m.reports {
            println!(
                "{:<28} {:<6} {:>5} {:>7} {:>7} {:>7}",
                r.kernel,
                r.arch,
                r.registers,
                r.shared_bytes,
                r.stack_bytes,
                r.spill_store_bytes + r.spill_load_bytes
            );
        }
    }
}

fn merge(
    model_path: &Path,
    adapter_dir: &Path,
    out: &Path,
    dtype: Option<recforge::tensor::DType>,
) -> Result<()> {
    let src = open_model(model_path)?;
    let adapter = model::adapter::load(adapter_dir)
        .with_context(|| format!("cannot load adapter {}", adapter_dir.display()))?;
    recforge::stop_on_interrupt_saying(INTERRUPT_WRITE);
    let r = model::adapter::merge_as(
        src.as_ref(),
        &adapter,
        out,
        dtype,
        tensor_progress("merging"),
    );
    finish_tensor_write(r, out).with_context(|| format!("cannot merge into {}", out.display()))
}

fn rec_data(
    dataset: &Path,
    split: &str,
    out: &Path,
    samples: Option<usize>,
    seed: u64,
) -> Result<()> {
    let split: rec::Split = split.parse()?;
    let mut all = rec::build(dataset, split)
        .with_context(|| format!("cannot build TALLRec data from {}", dataset.display()))?;
    if let Some(n) = samples {
        all = rec::sample(&all, n, seed)?;
    }
    rec::write_json(out, &all)?;
    let pos = all.iter().filter(|s| s.label() == Some(true)).count();
    eprintln!(
        "wrote {} {} samples ({} Yes / {} No) to {}",
        all.len(),
        split,
        pos,
        all.len() - pos,
        out.display()
    );
    Ok(())
}

struct EvalArgs<'a> {
    model: &'a Path,
    data: &'a Path,
    adapter: Option<&'a Path>,
    per_sample_adapters: bool,
    limit: Option<usize>,
    batch: usize,
    json: Option<&'a Path>,
    share_prefix: bool,
    budget: &'a str,
    /// int8 linears (else f32, the reference).
    int8: bool,
    outlier_threshold: f32,
}

/// Load a model for training or scoring (int8 linears), with a line saying what and where.
fn load_model<B: Backend>(
    be: &B,
    path: &Path,
) -> Result<(Llama<B>, model::tokenizer::TextTokenizer)> {
    load_model_with(be, path, LoadOptions::default())
}

fn load_model_with<B: Backend>(
    be: &B,
    path: &Path,
    opts: LoadOptions,
) -> Result<(Llama<B>, model::tokenizer::TextTokenizer)> {
    // The path the model is read from (a default found in the checkout, not the bare default).
    let path = &default_asset(path, DEFAULT_MODEL, "--model")?;
    let src = open_model(path)?;
    let tok = src
        .tokenizer()
        .with_context(|| format!("cannot load the tokenizer of {}", path.display()))?;
    let t0 = std::time::Instant::now();
    let m = Llama::load(src.as_ref(), be, opts)
        .with_context(|| format!("cannot load model {}", path.display()))?;
    eprintln!(
        "loaded {} ({} layers, hidden {}, {} linears) on {} in {:.1}s",
        path.display(),
        m.config.num_hidden_layers,
        m.config.hidden_size,
        if opts.int8 { "int8" } else { "f32" },
        be.name(),
        t0.elapsed().as_secs_f64()
    );
    Ok((m, tok))
}

/// After the model and adapter are loaded on a device: refuse a plan over the budget on a real
/// GPU (with the table and `fix`), then reserve what the plan has left (`the {what}'s`
/// buffers) as one arena, saying so, and note where the loaded bytes differ from the plan's
/// count of them.
fn reserve_planned_arena<B: Backend>(
    be: &B,
    p: &memory::Plan,
    what: &str,
    fix: &str,
) -> Result<()> {
    if be.memory_in_use().is_some() && !p.fits() {
        bail!("the {what} does not fit the budget ({fix}):\n{}", p.table());
    }
    let held = be.memory_stats().map(|s| s.in_use).unwrap_or(0);
    let (loaded, hold) = if p.category_total("lora") > 0 {
        ("model and adapter", "hold")
    } else {
        ("model", "holds")
    };
    if held != p.persistent() {
        eprintln!(
            "note: the {loaded} {hold} {}, the plan counts {} for it",
            memory::human(held),
            memory::human(p.persistent())
        );
    }
    let arena = if memory::arena_enabled() {
        be.reserve_arena(p.step_bytes())
            .context("reserving the memory plan's arena")?;
        format!(
            "; the {what}'s {} reserved as one arena",
            memory::human(p.step_bytes())
        )
    } else {
        " (RECFORGE_ARENA=off: no arena)".into()
    };
    eprintln!(
        "memory plan: {} of {} budget; the {loaded} {hold} {}{arena}",
        memory::human(p.total()),
        memory::human(p.budget),
        memory::human(held),
    );
    Ok(())
}

fn rec_eval<B: Backend>(be: &B, a: &EvalArgs) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1 (prompts packed per forward pass)");
    }
    if a.limit == Some(0) {
        bail!("--limit must be at least 1 (samples evaluated, from the start of --data)");
    }
    let mut samples = rec::read_json(a.data)?;
    let mut adapter_of = if a.per_sample_adapters {
        rec::tallrec::read_adapter_field(a.data)?
    } else {
        vec![]
    };
    if let Some(n) = a.limit {
        samples.truncate(n);
        adapter_of.truncate(n);
    }
    if samples.is_empty() {
        bail!("{}: no samples to evaluate", a.data.display());
    }
    // Refused before the model loads.
    rec::eval::labels(&samples).with_context(|| a.data.display().to_string())?;
    if let Some(path) = a.json {
        if model::convert::same_file(path, a.data) {
            bail!("--json {} would overwrite the --data file", path.display());
        }
        model::convert::check_output(path, model::convert::Output::File).context("--json")?;
    }
    let budget = memory::parse_bytes(a.budget)
        .with_context(|| format!("--budget '{}': expected a size such as 24GiB", a.budget))?;
    let opts = LoadOptions {
        int8: a.int8,
        outlier_threshold: a.outlier_threshold,
    };
    // The adapters are read before the model, checked against it after.
    let per_sample = if a.per_sample_adapters {
        Some(read_sample_adapters(&adapter_of)?)
    } else {
        None
    };
    let single = a.adapter.map(read_adapter).transpose()?;
    let (m, tok) = load_model_with(be, a.model, opts)?;
    // --per-sample-adapters: the adapters the samples name, stacked in order of first mention.
    let stacked = match per_sample {
        Some((hosts, which, dirs)) => Some((stack_adapters(hosts, &dirs, &m.config)?, which, dirs)),
        None => None,
    };
    let adapter = match (&stacked, a.adapter.zip(single)) {
        (Some((st, _, _)), _) => DevAdapter::upload_frozen(be, &st.adapter)?,
        (None, Some((dir, host))) => {
            DevAdapter::upload_frozen(be, &fit_adapter(dir, host, &m.config)?)?
        }
        (None, None) => DevAdapter::none(),
    };
    let share_prefix = a.share_prefix && stacked.is_none();
    let max_tokens = m.config.max_position_embeddings.max(1);
    let ids = rec::eval::prompt_ids(&tok, &samples, max_tokens)?;
    let (prefix, batches) = rec::eval::layout(&ids, a.batch, share_prefix);
    if let Some((st, which, dirs)) = &stacked {
        eprintln!(
            "{} adapters stacked (rank {} in all) for {} of {} samples, the others on the base \
             model; prompts run in full (a shared prefix's K/V depends on the adapter)",
            dirs.len(),
            st.adapter.config.r,
            which.iter().flatten().count(),
            which.len()
        );
    } else if share_prefix {
        eprintln!(
            "prefix sharing: the prompts' common {prefix}-token prefix runs once \
             (--no-prefix-sharing: every prompt in full)"
        );
    }
    if be.memory_stats().is_some() && a.int8 {
        // A device (int8 linears, as the plan counts them): plan the run (on CUDA it must fit
        // the budget), then carve everything the scoring allocates from one arena of what the
        // plan has left after the model and adapter.
        let setup = memory::ScoreSetup {
            model: m.config.clone(),
            prefix,
            batches,
            lora_rank: adapter.config.r,
            targets: adapter
                .config
                .targets
                .iter()
                .map(|t| t.short_name().to_string())
                .collect(),
            adapter: a.adapter.is_some() || stacked.is_some(),
            budget,
        };
        let p = memory::plan_scoring(&setup).map_err(anyhow::Error::msg)?;
        reserve_planned_arena(be, &p, "scoring", "a smaller --batch needs less")?;
    }
    let t0 = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut progress = |i, n| {
        if tty {
            eprint!("\rscoring {i}/{n}");
        } else if i == n || i % a.batch.saturating_mul(8).max(1) < a.batch {
            eprintln!("scored {i}/{n}");
        }
    };
    let (metrics, probs) = match &stacked {
        None => rec::eval::evaluate(
            be,
            &m,
            &adapter,
            &tok,
            &samples,
            a.batch,
            max_tokens,
            share_prefix,
            &mut progress,
        )?,
        Some((st, which, _)) => {
            let labels = rec::eval::labels(&samples)?;
            let probs = rec::eval::score_stacked(
                be,
                &m,
                &adapter,
                st,
                &tok,
                &samples,
                which,
                a.batch,
                max_tokens,
                &mut progress,
            )?;
            (rec::Metrics::compute(&probs, &labels)?, probs)
        }
    };
    if tty {
        eprintln!();
    }
    println!(
        "{}: n {} ({} Yes), AUC {}, accuracy {:.4}, log-loss {:.4}  [{}{}, {:.1}s]",
        a.data.display(),
        metrics.n,
        metrics.positives,
        metrics.auc_text(),
        metrics.accuracy,
        metrics.log_loss,
        be.name(),
        match (&stacked, a.adapter) {
            (Some((_, _, dirs)), _) => format!(", {} adapters by sample", dirs.len()),
            (None, Some(p)) => format!(", adapter {}", p.display()),
            (None, None) => String::new(),
        },
        t0.elapsed().as_secs_f64()
    );
    if let Some(path) = a.json {
        let mut j = metrics.to_json();
        j["p_yes"] = serde_json::json!(probs);
        j["device"] = serde_json::json!(be.name());
        j["data"] = serde_json::json!(a.data.display().to_string());
        // What was scored, so a base run's file and an adapter run's can be told apart.
        j["model"] = serde_json::json!(a.model.display().to_string());
        j["adapter"] = serde_json::json!(a.adapter.map(|p| p.display().to_string()));
        j["linears"] = serde_json::json!(if a.int8 { "int8" } else { "f32" });
        j["outlier_threshold"] = serde_json::json!(a.outlier_threshold);
        j["limit"] = serde_json::json!(a.limit);
        j["batch"] = serde_json::json!(a.batch);
        j["prefix_sharing"] = serde_json::json!(a.share_prefix);
        if let Some((_, which, dirs)) = &stacked {
            let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            j["adapters"] = serde_json::json!(dirs);
            j["adapter_of_sample"] = serde_json::json!(which);
        }
        model::convert::write_atomic(path, serde_json::to_string_pretty(&j)?.as_bytes())?;
    }
    Ok(())
}

/// Read an adapter folder (PEFT's files) before the model loads, so a wrong path or a broken
/// file fails in a moment rather than after a 7B load; [`fit_adapter`] checks it against the
/// model once that is loaded.
fn read_adapter(dir: &Path) -> Result<model::lora::HostAdapter> {
    model::adapter::load(dir).with_context(|| format!("cannot load adapter {}", dir.display()))
}

/// A read adapter checked against the model it is to be applied to.
fn fit_adapter(
    dir: &Path,
    host: model::lora::HostAdapter,
    cfg: &model::LlamaConfig,
) -> Result<model::lora::HostAdapter> {
    host.check_against(cfg)
        .with_context(|| format!("adapter {} does not fit the model", dir.display()))?;
    Ok(host)
}

/// The adapter folders of `rec eval --per-sample-adapters` samples and `generate --prompts`
/// lines, read (before the model loads) in order of first mention. Returns them, each
/// sample's or prompt's index among them (None: the base model) and the folders.
#[allow(clippy::type_complexity)]
fn read_sample_adapters(
    adapter_of: &[Option<PathBuf>],
) -> Result<(
    Vec<model::lora::HostAdapter>,
    Vec<Option<usize>>,
    Vec<PathBuf>,
)> {
    let mut dirs: Vec<PathBuf> = vec![];
    // One adapter however its folder is spelt ("ad", "./ad/", a link to it): stacked once.
    let mut places: Vec<PathBuf> = vec![];
    let mut which = Vec::with_capacity(adapter_of.len());
    for p in adapter_of {
        which.push(p.as_ref().map(|p| {
            let place = model::convert::resolved(p);
            match places.iter().position(|d| *d == place) {
                Some(i) => i,
                None => {
                    places.push(place);
                    dirs.push(p.clone());
                    dirs.len() - 1
                }
            }
        }));
    }
    if dirs.is_empty() {
        bail!("no sample or prompt has an \"adapter\" field naming an adapter folder");
    }
    let hosts = dirs
        .iter()
        .map(|dir| read_adapter(dir))
        .collect::<Result<Vec<_>>>()?;
    Ok((hosts, which, dirs))
}

/// [`read_sample_adapters`]' adapters checked against the loaded model and stacked into one.
fn stack_adapters(
    hosts: Vec<model::lora::HostAdapter>,
    dirs: &[PathBuf],
    cfg: &model::LlamaConfig,
) -> Result<model::lora::StackedAdapter> {
    let hosts = hosts
        .into_iter()
        .zip(dirs)
        .map(|(h, dir)| fit_adapter(dir, h, cfg))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&model::lora::HostAdapter> = hosts.iter().collect();
    Ok(model::lora::stack(&refs, cfg)?)
}

/// A resumed run keeps its checkpoint's settings (only --steps may change): a flag given again
/// with the checkpoint's value is fine (the same command line plus --resume), another value is
/// refused rather than ignored.
fn check_resume_flags(a: &TrainArgs, saved: &TrainConfig) -> Result<()> {
    // The checkpoint's config with the flags given applied, compared setting by setting.
    let asked = apply_train_flags(a, saved.clone())?;
    let targets = |c: &TrainConfig| {
        let mut t = c.lora.targets.clone();
        t.sort();
        t.iter()
            .map(|t| t.short_name())
            .collect::<Vec<_>>()
            .join(",")
    };
    type Setting = (&'static str, fn(&TrainConfig) -> String);
    let settings: [Setting; 12] = [
        ("--lr", |c| c.lr.to_string()),
        ("--warmup", |c| c.warmup_steps.to_string()),
        ("--batch", |c| c.batch_size.to_string()),
        ("--accum", |c| c.grad_accum.to_string()),
        ("--cutoff", |c| c.cutoff.to_string()),
        ("--r", |c| c.lora.r.to_string()),
        ("--alpha", |c| c.lora.alpha.to_string()),
        ("--dropout", |c| c.lora.dropout.to_string()),
        ("--seed", |c| c.seed.to_string()),
        ("--weight-decay", |c| c.weight_decay.to_string()),
        ("--max-grad-norm", |c| c.max_grad_norm.to_string()),
        ("--targets", targets),
    ];
    for (flag, get) in settings {
        let (v, s) = (get(&asked), get(saved));
        if v != s {
            bail!(
                "{flag} {v}, but the checkpoint was trained with {s}: a resumed run keeps the \
                 checkpoint's settings (only --steps may change); leave {flag} out"
            );
        }
    }
    Ok(())
}

/// A note when the checkpoint's adapter names another base model than --model (a moved file
/// is fine; another model is not what the checkpoint learned on).
fn note_other_base_model(dir: &Path, model: &Path) {
    let base = std::fs::read_to_string(dir.join(model::adapter::CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["base_model_name_or_path"].as_str().map(str::to_string));
    if let Some(base) = base {
        if !model::convert::same_file(Path::new(&base), model) {
            eprintln!(
                "note: the checkpoint was trained on {base}; resuming on {}",
                model.display()
            );
        }
    }
}

fn train_config(a: &TrainArgs) -> Result<TrainConfig> {
    let c = apply_train_flags(a, TrainConfig::preset(&a.preset)?)?;
    c.validate()?;
    Ok(c)
}

/// `c` with every training flag given on the command line put in.
fn apply_train_flags(a: &TrainArgs, mut c: TrainConfig) -> Result<TrainConfig> {
    if let Some(v) = a.steps {
        c.steps = v;
    }
    if let Some(v) = a.lr {
        c.lr = v;
    }
    if let Some(v) = a.warmup {
        c.warmup_steps = v;
    }
    if let Some(v) = a.batch {
        c.batch_size = v;
    }
    if let Some(v) = a.accum {
        c.grad_accum = v;
    }
    if let Some(v) = a.cutoff {
        c.cutoff = v;
    }
    if let Some(v) = a.r {
        c.lora.r = v;
    }
    if let Some(v) = a.alpha {
        c.lora.alpha = v;
    }
    if let Some(v) = a.dropout {
        c.lora.dropout = v;
    }
    if let Some(t) = &a.targets {
        c.lora.targets = parse_targets(t).with_context(|| format!("--targets '{t}'"))?;
    }
    if let Some(v) = a.seed {
        c.seed = v;
    }
    if let Some(v) = a.weight_decay {
        c.weight_decay = v;
    }
    if let Some(v) = a.max_grad_norm {
        c.max_grad_norm = v;
    }
    Ok(c)
}

/// `[#####·······]`: `done` of `total` in `width` cells.
/// The progress line's memory column: the driver's view of the device on CUDA, else the
/// buffers the backend holds (the simulator's exact accounting), else this process's resident
/// set (the CPU reference keeps everything in host memory).
fn memory_in_use_label(driver: Option<u64>, buffers: Option<u64>) -> String {
    match (driver, buffers) {
        (Some(b), _) => format!(", mem {}", memory::human(b)),
        (None, Some(b)) => format!(", buffers {}", memory::human(b)),
        (None, None) => resident_bytes()
            .map(|b| format!(", rss {}", memory::human(b)))
            .unwrap_or_default(),
    }
}

/// This process's resident set size, from /proc (Linux); None where that cannot be read.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    vm_rss_bytes(&status)
}

/// The `VmRSS:  1234 kB` line of /proc/<pid>/status, in bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut it = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    (it.next()? == "kB").then_some(n * 1024)
}

fn progress_bar(done: usize, total: usize, width: usize) -> String {
    let full = (done.min(total) * width)
        .checked_div(total)
        .unwrap_or(width);
    format!("[{}{}]", "#".repeat(full), "·".repeat(width - full))
}

fn human_secs(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0}s")
    } else if s < 5400.0 {
        format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

/// Each sample as a training example (prompt, then response; the loss on the response only),
/// with its index in `samples`. A sample whose prompt alone reaches `cutoff` tokens is left
/// out, and a note says how many were and `fate` (what became of them).
fn examples_of(
    tok: &model::tokenizer::TextTokenizer,
    samples: &[rec::Sample],
    cutoff: usize,
    fate: &str,
) -> Result<(Vec<usize>, Vec<Example>)> {
    let mut index = vec![];
    let mut data = vec![];
    for (i, s) in samples.iter().enumerate() {
        let (p, r) = rec::prompt_and_response(s);
        if let Some(e) = Example::from_prompt_response(tok, &p, &r, cutoff)? {
            index.push(i);
            data.push(e);
        }
    }
    let dropped = samples.len() - data.len();
    if dropped > 0 {
        eprintln!(
            "note: {dropped} samples are longer than the cutoff of {cutoff} tokens even before \
             their response: {fate}"
        );
    }
    Ok((index, data))
}

/// On the CPU, where there is no device budget: refuse a run whose plan, less the model already
/// loaded, exceeds the host's available memory (`fix` says what needs less).
fn check_host_plan(p: &memory::Plan, what: &str, fix: &str) -> Result<()> {
    if let Some(avail) = memory::host_available() {
        let loaded = p.category_total("weights (int8)") + p.category_total("kept precision");
        memory::check_host(p.total() - loaded, avail, what, fix).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// `--keep`: a count, or a percentage of `of`.
fn parse_keep(keep: &str, of: usize, were: &str) -> Result<usize> {
    let bad = || format!("--keep '{keep}': expected a count such as 256 or a share such as 25%");
    let n = match keep.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p.trim().parse().ok().with_context(bad)?;
            if !(p > 0.0 && p <= 100.0) {
                bail!("--keep {keep}: a share must be above 0% and at most 100%");
            }
            ((p / 100.0 * of as f64).round() as usize).max(1)
        }
        None => keep.trim().parse().ok().with_context(bad)?,
    };
    if n == 0 {
        bail!("--keep must keep at least one sample");
    }
    if n > of {
        bail!("--keep {keep}: only {of} samples {were}");
    }
    Ok(n)
}

fn rec_prune(a: &PruneArgs) -> Result<()> {
    use model::convert::{check_output, same_file, Output};
    use rec::prune::{ScoredSample, ScoresFile, Selection};
    // Everything the command line alone can get wrong is refused before the model loads.
    let mut how: Selection = a.select.parse().context("--select")?;
    if let Selection::Stratified { strata } = &mut how {
        if a.strata == 0 {
            bail!("--strata must be at least 1");
        }
        *strata = a.strata;
    }
    // The count itself is checked once the samples are known.
    parse_keep(&a.keep, usize::MAX, "")?;
    model::llama::check_outlier_threshold(a.outlier_threshold).context("--outlier-threshold")?;
    let mut config = TrainConfig::preset(&a.preset)?;
    if let Some(c) = a.cutoff {
        if c < 2 {
            bail!("--cutoff must be at least 2 tokens (a prompt token and a response token)");
        }
        config.cutoff = c;
    }
    for (flag, path) in [("--out", Some(&a.out)), ("--scores", a.scores.as_ref())] {
        if let Some(p) = path {
            if same_file(p, &a.data) {
                bail!("{flag} {} would overwrite the --data file", p.display());
            }
            if a.from_scores
                .as_ref()
                .is_some_and(|f| flag == "--out" && same_file(p, f))
            {
                bail!(
                    "--out {} would overwrite the --from-scores file",
                    p.display()
                );
            }
            check_output(p, Output::File).context(flag)?;
        }
    }
    if a.scores.as_ref().is_some_and(|p| same_file(p, &a.out)) {
        bail!("--scores and --out name the same file");
    }
    let samples = rec::read_json(&a.data)?;
    if samples.is_empty() {
        bail!("{}: no samples to prune", a.data.display());
    }
    let t0 = std::time::Instant::now();
    // The scores: measured now, or those a previous run saved with --scores.
    let (rows, keep, model, adapter, cutoff, threshold) = match &a.from_scores {
        Some(path) => {
            let f = ScoresFile::read(path, &samples)?;
            eprintln!(
                "selecting from the {} scores in {} (model {}, {} adapter, cutoff {})",
                f.samples.len(),
                path.display(),
                f.model,
                f.adapter.as_deref().unwrap_or("a fresh"),
                f.cutoff
            );
            let keep = parse_keep(
                &a.keep,
                f.samples.len(),
                &format!("were scored in {}", path.display()),
            )?;
            (
                f.samples,
                keep,
                f.model,
                f.adapter,
                f.cutoff,
                f.outlier_threshold,
            )
        }
        None => {
            let (rows, keep) = match open_backend(a.device)? {
                Chosen::Cpu(be) => score_for_pruning(&be, a, &samples, &config)?,
                Chosen::Gpu(be) => score_for_pruning(&be, a, &samples, &config)?,
            };
            let adapter = a.adapter.as_ref().map(|p| p.display().to_string());
            (
                rows,
                keep,
                a.model.display().to_string(),
                adapter,
                config.cutoff,
                a.outlier_threshold,
            )
        }
    };
    let index: Vec<usize> = rows.iter().map(|r| r.index).collect();
    let norms: Vec<f64> = rows.iter().map(|s| s.grad_norm).collect();
    let chosen = if a.balance_labels {
        let answer: Vec<usize> = index
            .iter()
            .map(|&i| match samples[i].label() {
                Some(true) => 0,
                Some(false) => 1,
                None => 2,
            })
            .collect();
        rec::prune::select_within_groups(&norms, &answer, keep, how, a.seed)?
    } else {
        rec::prune::select(&norms, keep, how, a.seed)?
    };
    let kept: Vec<rec::Sample> = chosen.iter().map(|&j| samples[index[j]].clone()).collect();
    rec::write_json(&a.out, &kept)?;
    if let Some(path) = &a.scores {
        let mut marked: Vec<ScoredSample> = rows.clone();
        marked.iter_mut().for_each(|r| r.kept = false);
        chosen.iter().for_each(|&j| marked[j].kept = true);
        ScoresFile {
            data: a.data.display().to_string(),
            data_fingerprint: rec::prune::fingerprint(&samples),
            data_samples: samples.len(),
            model,
            adapter,
            cutoff,
            outlier_threshold: threshold,
            selection: how.name().into(),
            strata: match how {
                Selection::Stratified { strata } => Some(strata),
                _ => None,
            },
            seed: a.seed,
            balance_labels: a.balance_labels,
            kept: keep,
            samples: marked,
        }
        .write(path)?;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let m = v.len() / 2;
        // An even count: the mean of the middle two.
        if v.len().is_multiple_of(2) {
            (v[m - 1] + v[m]) / 2.0
        } else {
            v[m]
        }
    };
    let yes = |idx: &mut dyn Iterator<Item = usize>| {
        idx.filter(|&i| samples[i].label() == Some(true)).count()
    };
    let (yes_kept, yes_all) = (
        yes(&mut chosen.iter().map(|&j| index[j])),
        yes(&mut index.iter().copied()),
    );
    eprintln!(
        "kept {keep} of {} samples ({}{}) in {}: gradient norm median {:.4} kept, {:.4} of all; \
         {} Yes / {} No kept, {} / {} of all",
        rows.len(),
        match how {
            Selection::Stratified { strata } => format!("stratified, {strata} strata"),
            other => format!("{} norms", other.name()),
        },
        if a.balance_labels {
            ", within each answer"
        } else {
            ""
        },
        human_secs(t0.elapsed().as_secs_f64()),
        median(chosen.iter().map(|&j| norms[j]).collect()),
        median(norms.clone()),
        yes_kept,
        keep - yes_kept,
        yes_all,
        rows.len() - yes_all,
    );
    let share = |y: usize, n: usize| 100.0 * y as f64 / n as f64;
    if !a.balance_labels && (share(yes_kept, keep) - share(yes_all, rows.len())).abs() > 15.0 {
        eprintln!(
            "note: {:.0}% of the kept samples answer Yes against {:.0}% of all \
             (--balance-labels keeps each answer's share)",
            share(yes_kept, keep),
            share(yes_all, rows.len())
        );
    }
    eprintln!("wrote {}", a.out.display());
    if let Some(p) = &a.scores {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `rec prune`'s scoring: every sample of `samples` that fits `config.cutoff`, scored by its
/// LoRA gradient norm on `be` (the rows in the file's order), and `--keep` as a count of them.
fn score_for_pruning<B: Backend>(
    be: &B,
    a: &PruneArgs,
    samples: &[rec::Sample],
    config: &TrainConfig,
) -> Result<(Vec<rec::prune::ScoredSample>, usize)> {
    if a.batch == 0 {
        bail!("--batch must be at least 1 (samples per pass)");
    }
    let budget = memory::parse_bytes(&a.budget)
        .with_context(|| format!("--budget '{}': expected a size such as 24GiB", a.budget))?;
    // The adapter is read before the model, checked against it after.
    let given = a.adapter.as_deref().map(read_adapter).transpose()?;
    let opts = LoadOptions {
        int8: true,
        outlier_threshold: a.outlier_threshold,
    };
    let (m, tok) = load_model_with(be, &a.model, opts)?;
    // Each usable sample's index in the file and its tokens (response-only labels).
    let (index, data) = examples_of(
        &tok,
        samples,
        config.cutoff,
        "they are neither scored nor kept",
    )?;
    if data.is_empty() {
        bail!("{}: no sample can be scored", a.data.display());
    }
    // Refused before an epoch of work rather than after it.
    let keep = parse_keep(&a.keep, data.len(), "can be scored")?;
    let host = match a.adapter.as_deref().zip(given) {
        Some((dir, host)) => fit_adapter(dir, host, &m.config)?,
        None => model::lora::HostAdapter::init(
            &m.config,
            &config.lora,
            a.seed,
            &a.model.display().to_string(),
        )?,
    };
    let mut adapter = DevAdapter::upload_for_gradients(be, &host)?;
    // The plan of a training step over the longest sample, with the per-sample scratch.
    let planned = TrainConfig {
        batch_size: a.batch.min(data.len()),
        cutoff: data.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(2),
        lora: host.config.clone(),
        ..config.clone()
    };
    let mut setup = planned.memory_setup(&m.config, budget);
    setup.checkpointing = memory::choose_checkpointing_for(
        memory::CheckpointChoice::Auto,
        &setup,
        memory::plan_sample_scoring,
    )
    .map_err(anyhow::Error::msg)?;
    let p = memory::plan_sample_scoring(&setup).map_err(anyhow::Error::msg)?;
    if be.memory_stats().is_some() {
        reserve_planned_arena(
            be,
            &p,
            "scoring",
            "a smaller --batch or --cutoff needs less",
        )?;
    } else {
        check_host_plan(
            &p,
            "this pruning run",
            "a smaller --batch or --cutoff needs less",
        )?;
    }
    let targets: Vec<&str> = host.config.targets.iter().map(|t| t.peft_name()).collect();
    eprintln!(
        "scoring {} samples by their LoRA gradient norm ({} adapter, r {} on {}), {} per pass",
        data.len(),
        if a.adapter.is_some() {
            "the given"
        } else {
            "a fresh"
        },
        host.config.r,
        targets.join(","),
        planned.batch_size
    );
    if a.adapter.is_none() {
        eprintln!(
            "note: a fresh adapter's gradient is B's alone, through a random A; in the README's \
             TALLRec measurement sets scored this way trained worse than random ones, and sets \
             scored by a briefly trained adapter (--adapter) better"
        );
    }
    let tty = std::io::stderr().is_terminal();
    let t0 = std::time::Instant::now();
    let recomputed = setup.checkpointing.recomputed(m.config.num_hidden_layers);
    let scores = rec::prune::score(be, &m, &mut adapter, &data, a.batch, recomputed, |i, n| {
        let el = t0.elapsed().as_secs_f64();
        let line = format!(
            "scored {i}/{n}  ETA {}",
            human_secs(el / i as f64 * (n - i) as f64)
        );
        if tty {
            eprint!("\r{} {line}\x1b[K", progress_bar(i, n, 20));
        } else if i == n || i % a.batch.saturating_mul(8).max(1) < a.batch {
            eprintln!("{line}");
        }
    })?;
    if tty {
        eprintln!();
    }
    let rows = scores
        .iter()
        .zip(index)
        .map(|(s, index)| rec::prune::ScoredSample {
            index,
            tokens: s.tokens,
            loss: s.loss,
            grad_norm: s.grad_norm,
            kept: false,
        })
        .collect();
    Ok((rows, keep))
}

fn rec_train<B: Backend>(be: &B, a: &TrainArgs) -> Result<()> {
    // Everything the command line alone can get wrong is refused before the model loads.
    let mut config = train_config(a)?;
    let budget = memory::parse_bytes(&a.budget)
        .with_context(|| format!("--budget '{}': expected a size such as 24GiB", a.budget))?;
    if a.checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1 (updates between checkpoints)");
    }
    if let Some(dir) = &a.checkpoint_dir {
        recforge::train::check_checkpoint_dir(dir).context("--checkpoint-dir")?;
        // Each save replaces the checkpoint folder, and the adapter's save replaces --out.
        let (ck, out) = (
            model::convert::resolved(dir),
            model::convert::resolved(&a.out),
        );
        if ck.starts_with(&out) || out.starts_with(&ck) {
            bail!(
                "--out {} and --checkpoint-dir {} overlap: each save replaces its folder, so \
                 one would delete the other; give separate folders",
                a.out.display(),
                dir.display()
            );
        }
    }
    if let Some(dir) = &a.resume {
        // Before the model loads: a wrong path fails at once.
        let (saved, done) = recforge::train::check_resume_dir(dir)
            .with_context(|| format!("cannot resume from {}", dir.display()))?;
        check_resume_flags(a, &saved)
            .with_context(|| format!("cannot resume from {}", dir.display()))?;
        if let Some(s) = a.steps.filter(|&s| s < done) {
            bail!(
                "--steps {s}: the checkpoint in {} has done {done} updates already; give the \
                 length of the whole run",
                dir.display()
            );
        }
        note_other_base_model(dir, &a.model);
        // The data are cut and batched as the checkpoint's run did.
        config = TrainConfig {
            steps: a.steps.unwrap_or(saved.steps),
            ..saved
        };
    }
    // The adapter is written at the end: a path it cannot take is refused before the run.
    model::convert::check_output(&a.out, model::convert::Output::Folder).context("--out")?;
    if a.resume.is_none() && config.warmup_steps >= config.steps {
        eprintln!(
            "note: the warm-up ({} updates) is not shorter than the run ({} updates): the \
             learning rate never reaches --lr {:e}",
            config.warmup_steps, config.steps, config.lr
        );
    }
    let samples = rec::read_json(&a.data)?;
    let (m, tok) = load_model(be, &a.model)?;
    let (_, data) = examples_of(&tok, &samples, config.cutoff, "they were left out")?;
    if data.is_empty() {
        bail!("{}: no usable training samples", a.data.display());
    }
    let ctx = m.config.max_position_embeddings;
    let past = data.iter().filter(|e| e.ids.len() > ctx).count();
    if past > 0 {
        eprintln!(
            "note: {past} samples are longer than the model's {ctx} positions (RoPE runs anyway; \
             --cutoff {ctx} would shorten them)"
        );
    }
    // The plan names every byte of the run; it also decides, under auto, how many layers
    // recompute (a resumed run takes the command line's choice: it changes no number).
    let choice = checkpoint_choice(a.checkpointing, a.no_checkpointing);
    let planned = |config: &TrainConfig| -> Result<memory::TrainSetup> {
        let mut setup = config.memory_setup(&m.config, budget);
        setup.checkpointing = memory::choose_checkpointing(choice, &setup)
            .map_err(anyhow::Error::msg)
            .context("--checkpointing")?;
        Ok(setup)
    };
    if be.memory_stats().is_none() && a.resume.is_none() {
        // The CPU: no device budget, but a run the host cannot hold is refused before the
        // adapter and its optimizer state are allocated (the model is already loaded).
        let p = memory::plan_training(&planned(&config)?).map_err(anyhow::Error::msg)?;
        check_host_plan(
            &p,
            "this training run",
            "a smaller --r, --batch or --cutoff needs less (`recforge plan` shows where it goes)",
        )?;
    }
    let mut trainer = match &a.resume {
        Some(dir) => {
            let t = Trainer::resume(be, &m, dir, data, a.steps)
                .with_context(|| format!("cannot resume from {}", dir.display()))?;
            eprintln!("resumed from {} at update {}", dir.display(), t.step);
            t
        }
        None => Trainer::new(be, &m, config.clone(), data, &a.model.display().to_string())?,
    };
    let setup = planned(&trainer.config)?;
    trainer.set_checkpointing(setup.checkpointing)?;
    config = trainer.config.clone();
    if be.memory_stats().is_some() {
        // A device (CUDA or the simulator). On a real GPU the run must fit the budget before it
        // starts; then every buffer still to come (the step's workspace and the ops' scratch)
        // is carved from one arena of what the plan has left after the model and the adapter.
        let p = memory::plan_training(&setup).map_err(anyhow::Error::msg)?;
        if be.memory_in_use().is_some() && !p.fits() {
            plan(
                &a.model.display().to_string(),
                &setup,
                choice,
                false,
                (memory::plan_training, "memory plan"),
            )?;
        }
        reserve_planned_arena(be, &p, "step", "see `recforge plan --solve`")?;
    }
    eprintln!(
        "training {} LoRA parameters (r {}, alpha {}, dropout {}, on {}) for {} updates of {} × {} \
         sequences, lr {} (cosine, {} warm-up), checkpointing {}{}",
        trainer.adapter.num_params(),
        config.lora.r,
        config.lora.alpha,
        config.lora.dropout,
        config
            .lora
            .targets
            .iter()
            .map(|t| t.peft_name())
            .collect::<Vec<_>>()
            .join(","),
        config.steps,
        config.batch_size,
        config.grad_accum,
        config.lr,
        config.warmup_steps,
        if choice == memory::CheckpointChoice::Auto {
            "auto: "
        } else {
            ""
        },
        config.checkpointing.describe(m.config.num_hidden_layers)
    );
    let tty = std::io::stderr().is_terminal();
    let t0 = std::time::Instant::now();
    let first = trainer.step;
    let mut tokens = 0usize;
    // Ctrl-C or SIGTERM: finish the update in flight, save the checkpoint and the adapter, exit
    // 128 + the signal.
    recforge::stop_on_interrupt();
    while !trainer.done() {
        let r = trainer.step()?;
        tokens += r.tokens;
        let done = trainer.step - first;
        let el = t0.elapsed().as_secs_f64();
        let eta = el / done as f64 * (config.steps - trainer.step) as f64;
        let mem = memory_in_use_label(r.memory_in_use, be.memory_stats().map(|s| s.in_use));
        let line = format!(
            "update {}/{}  loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s{}  ETA {}",
            r.step,
            config.steps,
            r.loss,
            r.lr,
            r.grad_norm,
            tokens as f64 / el,
            mem,
            human_secs(eta)
        );
        if tty {
            eprint!(
                "\r{} {line}\x1b[K",
                progress_bar(trainer.step, config.steps, 20)
            );
        } else {
            eprintln!("{line}");
        }
        let stop = recforge::interrupted();
        if let Some(dir) = &a.checkpoint_dir {
            if trainer.step % a.checkpoint_every == 0 || trainer.done() || stop {
                trainer.save_checkpoint(dir)?;
            }
        }
        if stop {
            break;
        }
    }
    if tty {
        eprintln!();
    }
    let host = trainer.host_adapter()?;
    model::adapter::save(&host, &a.out)
        .with_context(|| format!("cannot save the adapter to {}", a.out.display()))?;
    eprintln!(
        "saved the adapter to {} ({} updates in {})",
        a.out.display(),
        trainer.step,
        human_secs(t0.elapsed().as_secs_f64())
    );
    if !trainer.done() {
        eprintln!(
            "interrupted at update {} of {}{}",
            trainer.step,
            config.steps,
            match &a.checkpoint_dir {
                Some(dir) => format!(
                    "; the checkpoint in {} continues it: --resume {}",
                    dir.display(),
                    dir.display()
                ),
                None => " (no --checkpoint-dir: the adapter is all that was kept)".into(),
            }
        );
        std::process::exit(recforge::interrupt_exit_code());
    }
    Ok(())
}

/// The backend `--device` asks for (`DeviceChoice::open`).
fn open_backend(device: DeviceChoice) -> Result<Chosen> {
    Ok(device.open()?)
}

#[cfg(test)]
mod tests {
    use super::{memory_in_use_label, progress_bar, vm_rss_bytes};

    #[test]
    fn memory_column_names_what_it_measures() {
        assert_eq!(
            memory_in_use_label(Some(3 << 30), Some(1 << 20)),
            ", mem 3.00 GiB"
        );
        assert_eq!(
            memory_in_use_label(None, Some(1 << 20)),
            ", buffers 1.0 MiB"
        );
        // The CPU reference: this test process has a resident set.
        let cpu = memory_in_use_label(None, None);
        assert!(cpu.starts_with(", rss "), "{cpu}");
        assert_eq!(
            vm_rss_bytes("Name:\tx\nVmRSS:\t  2048 kB\nThreads: 2\n"),
            Some(2 << 20)
        );
        assert_eq!(vm_rss_bytes("VmRSS: lots\n"), None);
        assert_eq!(vm_rss_bytes("Name: x\n"), None);
    }

    #[test]
    fn progress_bar_fills_in_proportion() {
        assert_eq!(progress_bar(0, 10, 4), "[····]");
        assert_eq!(progress_bar(5, 10, 4), "[##··]");
        assert_eq!(progress_bar(9, 10, 4), "[###·]");
        assert_eq!(progress_bar(10, 10, 4), "[####]");
        // Past the end (a resumed run with fewer --steps) and an empty run stay full.
        assert_eq!(progress_bar(12, 10, 4), "[####]");
        assert_eq!(progress_bar(0, 0, 4), "[####]");
    }
}
