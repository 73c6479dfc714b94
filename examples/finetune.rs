//! Fine-tune a LoRA adapter for TALLRec, with recforge as a library: MovieLens-100K → TALLRec
//! samples → tokenized examples (loss on the answer only) → optimizer updates → an adapter in
//! PEFT's format. `recforge rec train` does the same with a memory plan, checkpoints and a
//! progress bar around it; with the same settings the two write the same adapter.
//!
//! ```sh
//! cargo run --release --example finetune                             # 64 shots, 32 updates
//! cargo run --release --example finetune -- --shots 256 --steps 200 --out runs/finetune --eval 200
//! cargo run --release --example rerank -- --adapter runs/finetune    # then use it
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use recforge::backend::gpu::{Chosen, DeviceChoice};
use recforge::backend::Backend;
use recforge::memory::Checkpointing;
use recforge::model::lora::HostAdapter;
use recforge::model::tokenizer::TextTokenizer;
use recforge::model::{self, Llama, LoadOptions};
use recforge::rec::{self, Sample, Split};
use recforge::train::{DevAdapter, Example, StepRecord, TrainConfig, Trainer};

/// The run: TALLRec's preset (r 8, alpha 16, dropout 0.05 on q and v, cutoff 512) with the
/// demo's sizes, every field overridable.
pub fn config(steps: usize, lr: f32) -> Result<TrainConfig> {
    let mut c = TrainConfig::preset("tallrec")?;
    c.steps = steps;
    c.lr = lr;
    c.warmup_steps = 2;
    c.batch_size = 4;
    c.grad_accum = 1;
    // Keep every layer's activations: the fastest step, and SmolLM2 at these sizes is small.
    // Checkpointing changes memory and speed, never a number.
    c.checkpointing = Checkpointing::Off;
    c.validate()?;
    Ok(c)
}

/// Each sample as the trainer takes it: the Alpaca prompt and the answer tokenized, the loss on
/// the answer (and end-of-sequence) only. Samples whose prompt alone reaches the cutoff are
/// left out, as `rec train` does.
pub fn examples(tok: &TextTokenizer, samples: &[Sample], cutoff: usize) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(samples.len());
    for s in samples {
        let (prompt, response) = rec::prompt_and_response(s);
        if let Some(e) = Example::from_prompt_response(tok, &prompt, &response, cutoff)? {
            out.push(e);
        }
    }
    if out.is_empty() {
        bail!("no sample fits the cutoff of {cutoff} tokens");
    }
    Ok(out)
}

/// Train `config.steps` updates from PEFT's initialisation (A Kaiming-uniform from the seed,
/// B zero), calling `progress` after each, and return the adapter. `base_model` goes into
/// `adapter_config.json` as `base_model_name_or_path`.
pub fn train<B: Backend>(
    be: &B,
    model: &Llama<B>,
    base_model: &str,
    data: Vec<Example>,
    config: TrainConfig,
    mut progress: impl FnMut(&StepRecord),
) -> Result<HostAdapter> {
    let mut trainer = Trainer::new(be, model, config, data, base_model)?;
    while !trainer.done() {
        let r = trainer.step()?;
        progress(&r);
    }
    Ok(trainer.host_adapter()?)
}

struct Args {
    model: PathBuf,
    dataset: PathBuf,
    out: PathBuf,
    shots: usize,
    steps: usize,
    lr: f32,
    seed: u64,
    eval: usize,
    device: DeviceChoice,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        model: PathBuf::from("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        dataset: PathBuf::from("assets/ml-100k"),
        out: PathBuf::from("runs/finetune"),
        shots: 64,
        steps: 32,
        lr: 1e-3,
        seed: 0,
        eval: 0,
        device: DeviceChoice::Auto,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let bad = || format!("{flag} {value:?}");
        match flag.as_str() {
            "--model" => a.model = value.into(),
            "--dataset" => a.dataset = value.into(),
            "--out" => a.out = value.into(),
            "--shots" => a.shots = value.parse().with_context(bad)?,
            "--steps" => a.steps = value.parse().with_context(bad)?,
            "--lr" => a.lr = value.parse().with_context(bad)?,
            "--seed" => a.seed = value.parse().with_context(bad)?,
            "--eval" => a.eval = value.parse().with_context(bad)?,
            "--device" => a.device = value.parse()?,
            other => bail!(
                "unknown argument {other:?} (--model, --dataset, --out, --shots, --steps, --lr, \
                 --seed, --eval N validation samples to score after training, --device)"
            ),
        }
    }
    Ok(a)
}

fn run<B: Backend>(be: &B, a: &Args) -> Result<()> {
    let config = config(a.steps, a.lr)?;
    // The adapter is written at the end: refuse a path it cannot take before the work.
    model::convert::check_output(&a.out, model::convert::Output::Folder).context("--out")?;
    let train_split = rec::build(&a.dataset, Split::Train)
        .with_context(|| format!("cannot build TALLRec samples from {}", a.dataset.display()))?;
    let shots = rec::sample(&train_split, a.shots, a.seed)?;
    let src = model::open(&a.model).with_context(|| {
        format!(
            "cannot open {} (scripts/fetch-assets.sh fetches the default)",
            a.model.display()
        )
    })?;
    let tok = src.tokenizer()?;
    let m = Llama::load(src.as_ref(), be, LoadOptions::default())?;
    let data = examples(&tok, &shots, config.cutoff)?;
    eprintln!(
        "{} examples, {} updates of {} on {}",
        data.len(),
        config.steps,
        config.batch_size,
        be.name()
    );
    let t0 = std::time::Instant::now();
    let host = train(be, &m, &a.model.display().to_string(), data, config, |r| {
        eprintln!(
            "update {}  loss {:.4}  lr {:.2e}  {} tokens",
            r.step, r.loss, r.lr, r.tokens
        );
    })?;
    model::adapter::save(&host, &a.out)?;
    println!(
        "saved the adapter to {} in {:.1}s",
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    if a.eval > 0 {
        let mut valid = rec::build(&a.dataset, Split::Valid)?;
        valid.truncate(a.eval);
        let adapter = DevAdapter::upload_frozen(be, &host)?;
        let ctx = m.config.max_position_embeddings;
        let (metrics, _) =
            rec::eval::evaluate(be, &m, &adapter, &tok, &valid, 8, ctx, true, |_, _| {})?;
        println!(
            "first {} validation samples: AUC {}, accuracy {:.4}, log-loss {:.4}",
            metrics.n,
            metrics
                .auc
                .map_or("n/a (one class)".into(), |x| format!("{x:.4}")),
            metrics.accuracy,
            metrics.log_loss
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    // What the recforge binaries do first: keep freed host memory in the process (the CPU
    // backend allocates activations every step) and run the work on rayon's pool, so each
    // parallel op of the CPU backend starts in place instead of waking the pool and sleeping.
    recforge::keep_freed_host_memory();
    let result = recforge::on_cpu_pool(|| {
        let a = parse_args()?;
        match a.device.open()? {
            Chosen::Cpu(be) => run(&be, &a),
            Chosen::Gpu(be) => run(&be, &a),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
