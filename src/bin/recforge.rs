//! The recforge command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::backend::Gpu;
use recforge::backend::gpu::{probe_cuda, Device, DeviceChoice};
use recforge::backend::Backend;
use recforge::infer::generate::{greedy, GenerateOptions, StopReason};
use recforge::kernels;
use recforge::memory;
use recforge::model::{self, Llama, LoadOptions};

/// The model `generate` and `info` use when --model is not given (fetched by
/// scripts/fetch-assets.sh).
const DEFAULT_MODEL: &str = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

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
    /// Generate text from a prompt (greedy decoding).
    Generate {
        /// A .gguf file or a Hugging Face folder (config.json + safetensors + tokenizer.json).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
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
    },
    /// Show the devices, whether CUDA kernels were built, and a model's configuration.
    Info {
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Write a model (e.g. a GGUF file) as a Hugging Face folder.
    Convert {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// List the compiled CUDA kernels with ptxas' registers, shared memory and spills.
    Kernels,
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
        #[arg(long, default_value_t = 16)]
        lora_r: usize,
        /// LoRA target modules, comma-separated (q,k,v,o,gate,up,down).
        #[arg(long, default_value = "q,k,v,o")]
        targets: String,
        /// Keep every layer's activations instead of recomputing one layer at a time.
        #[arg(long)]
        no_checkpointing: bool,
        /// Rows of logits materialized at a time.
        #[arg(long, default_value_t = 1024)]
        logits_chunk: usize,
        /// Also report the largest batch and the largest sequence length that fit.
        #[arg(long)]
        solve: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
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
            max_new_tokens,
            device,
            raw,
            f32,
            outlier_threshold,
        } => {
            let opts = LoadOptions {
                int8: !f32,
                outlier_threshold,
            };
            generate(&model, &prompt, max_new_tokens, device, raw, opts)
        }
        Cmd::Info { model } => info(model.as_deref()),
        Cmd::Convert { model, out } => convert(&model, &out),
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
            no_checkpointing,
            logits_chunk,
            solve,
        } => {
            let budget = memory::parse_bytes(&budget).with_context(|| {
                format!("--budget '{budget}': expected a size such as 24GiB or 512MiB")
            })?;
            let cfg = match memory::named_shape(&model) {
                Some(c) => c,
                None => open_model(Path::new(&model))?.config().clone(),
            };
            let setup = memory::TrainSetup {
                model: cfg,
                batch,
                seq,
                lora_rank: lora_r,
                targets: targets
                    .split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect(),
                checkpointing: !no_checkpointing,
                logits_chunk,
                budget,
            };
            plan(&model, &setup, solve)
        }
    }
}

fn open_model(path: &Path) -> Result<Box<dyn model::ModelSource>> {
    if !path.exists() && path == Path::new(DEFAULT_MODEL) {
        bail!(
            "{} does not exist: run scripts/fetch-assets.sh first, or pass --model",
            path.display()
        );
    }
    model::open(path).with_context(|| format!("cannot load model {}", path.display()))
}

/// The backend `--device` asks for. `auto` takes CUDA when a GPU is usable and the library has
/// kernels, else the CPU.
enum Chosen {
    Cpu(Cpu),
    Gpu(Gpu),
}

fn backend_for(device: DeviceChoice) -> Result<Chosen> {
    match device {
        DeviceChoice::Cpu => Ok(Chosen::Cpu(Cpu::new())),
        DeviceChoice::Sim => Ok(Chosen::Gpu(Gpu::new(Device::sim()))),
        DeviceChoice::Cuda => Ok(Chosen::Gpu(Gpu::new(
            Device::cuda(0).context("--device cuda")?,
        ))),
        DeviceChoice::Auto => {
            let probe = probe_cuda();
            if !probe.usable() {
                return Ok(Chosen::Cpu(Cpu::new()));
            }
            match Device::cuda(0) {
                Ok(d) => Ok(Chosen::Gpu(Gpu::new(d))),
                Err(e) => {
                    eprintln!(
                        "note: {} found but not usable ({e}); using the CPU",
                        probe.describe()
                    );
                    Ok(Chosen::Cpu(Cpu::new()))
                }
            }
        }
    }
}

fn generate(
    path: &Path,
    prompt: &str,
    max_new: usize,
    device: DeviceChoice,
    raw: bool,
    opts: LoadOptions,
) -> Result<()> {
    match backend_for(device)? {
        Chosen::Cpu(be) => generate_on(&be, path, prompt, max_new, raw, opts),
        Chosen::Gpu(be) => generate_on(&be, path, prompt, max_new, raw, opts),
    }
}

fn generate_on<B: Backend>(
    be: &B,
    path: &Path,
    prompt: &str,
    max_new: usize,
    raw: bool,
    opts: LoadOptions,
) -> Result<()> {
    let src = open_model(path)?;
    let tok = src
        .tokenizer()
        .with_context(|| format!("cannot load the tokenizer of {}", path.display()))?;
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
    let text = match (raw, tok.chat_prompt(prompt)) {
        (false, Some(chat)) => chat,
        _ => prompt.to_string(),
    };
    let ids = tok.encode(&text, true)?;
    let mut stop_ids = tok.eos_ids.clone();
    for s in ["<|im_end|>", "<|endoftext|>"] {
        if let Some(id) = tok.token_id(s) {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
    }
    let gen_opts = GenerateOptions {
        max_new_tokens: max_new,
        stop_ids,
    };
    let mut out_ids: Vec<u32> = vec![];
    let mut printed = 0usize;
    let stdout = std::io::stdout();
    let g = greedy(be, &model, &ids, &gen_opts, |id| {
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
        println!(
            "kernels: {n} built by nvcc ({}) for compute_80",
            kernels::NVCC_VERSION
        );
    } else {
        println!("kernels: {}", kernels::NOT_BUILT);
    }
    let path = match path {
        Some(p) => p.to_path_buf(),
        None if Path::new(DEFAULT_MODEL).exists() => PathBuf::from(DEFAULT_MODEL),
        None => return Ok(()),
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
    println!(
        "  vocab {}  rope theta {}  rms eps {:e}  context {}",
        c.vocab_size, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings
    );
    println!(
        "  tied embeddings {}  bos {:?}  eos {:?}",
        c.tie_word_embeddings, c.bos_token_id, c.eos_token_ids
    );
    Ok(())
}

fn convert(path: &Path, out: &Path) -> Result<()> {
    let src = open_model(path)?;
    model::convert::to_hf_folder(src.as_ref(), out, |i, n| {
        if i == n || i % 32 == 0 {
            eprint!("\rconverting: {i}/{n} tensors");
        }
    })
    .with_context(|| format!("cannot convert {} to {}", path.display(), out.display()))?;
    eprintln!("\nwrote {}", out.display());
    Ok(())
}

fn plan(model: &str, s: &memory::TrainSetup, solve: bool) -> Result<()> {
    let p = memory::plan_training(s).map_err(anyhow::Error::msg)?;
    println!(
        "memory plan: {model}, batch {} × seq {}, LoRA r={} on {}, checkpointing {}\n",
        s.batch,
        s.seq,
        s.lora_rank,
        s.targets.join(","),
        if s.checkpointing { "on" } else { "off" }
    );
    print!("{}", p.table());
    let (b, q) = if solve || !p.fits() {
        memory::solve(s).map_err(anyhow::Error::msg)?
    } else {
        (0, 0)
    };
    if solve {
        println!(
            "largest batch at seq {}: {b}; largest seq at batch {}: {q}",
            s.seq, s.batch
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
        if !s.checkpointing {
            fixes.push("turn checkpointing back on".into());
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
