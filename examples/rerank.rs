//! Re-rank candidate items for one user, with recforge as a library.
//!
//! Each candidate becomes a TALLRec prompt ("given the movies this user liked and disliked,
//! will they like this one? Yes. or No.") and is scored by P(Yes) from one prefill, without
//! generating. The prompts differ only in their last line, so the part every candidate shares
//! (the template, the instruction and the user's history) runs through the model once and each
//! candidate adds only its own tokens (`rec::eval::score` with prefix sharing).
//!
//! ```sh
//! cargo run --release --example rerank                     # SmolLM2-135M, the built-in user
//! cargo run --release --example rerank -- --adapter runs/demo/adapter
//! cargo run --release --example rerank -- --model path/to/llama --device cuda
//! ```
//!
//! The base model has not learnt the task (the demo measures its AUC near 0.5); an adapter
//! trained as in `scripts/demo.sh` or `examples/finetune.rs` is what makes the order mean
//! something.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use recforge::backend::gpu::{Chosen, DeviceChoice};
use recforge::backend::Backend;
use recforge::model::tokenizer::TextTokenizer;
use recforge::model::{self, Llama, LoadOptions};
use recforge::rec::tallrec::{input_text, INSTRUCTION};
use recforge::rec::{self, Sample};
use recforge::train::DevAdapter;

/// A user as TALLRec describes one: titles written as MovieLens writes them, in the order they
/// were rated.
pub struct User<'a> {
    pub liked: &'a [&'a str],
    pub disliked: &'a [&'a str],
}

/// One prompt per candidate, in the candidates' order. The output field is TALLRec's answer
/// slot; scoring does not read it.
pub fn candidate_samples(user: &User, candidates: &[&str]) -> Vec<Sample> {
    candidates
        .iter()
        .map(|c| Sample {
            instruction: INSTRUCTION.to_string(),
            input: input_text(user.liked, user.disliked, c),
            output: String::new(),
        })
        .collect()
}

/// The candidates with their P(Yes), highest first (ties keep the candidates' order).
pub fn rank<B: Backend>(
    be: &B,
    model: &Llama<B>,
    tok: &TextTokenizer,
    adapter: &DevAdapter<B>,
    user: &User,
    candidates: &[&str],
) -> Result<Vec<(String, f64)>> {
    if candidates.is_empty() {
        bail!("no candidates to rank");
    }
    let samples = candidate_samples(user, candidates);
    // All candidates in one packed forward pass; the shared prefix once, before it.
    let batch = candidates.len();
    let max_tokens = model.config.max_position_embeddings;
    let p = rec::eval::score(
        be,
        model,
        adapter,
        tok,
        &samples,
        batch,
        max_tokens,
        true,
        |_, _| {},
    )?;
    let mut ranked: Vec<(String, f64)> = candidates.iter().map(|c| c.to_string()).zip(p).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(ranked)
}

/// A made-up user's last ten ratings, split at TALLRec's threshold (> 3 is liked); the titles
/// are MovieLens-100K's, written as its samples write them.
pub const LIKED: &[&str] = &[
    "Star Wars (1977)",
    "Return of the Jedi (1983)",
    "Fargo (1996)",
    "Godfather, The (1972)",
    "Raiders of the Lost Ark (1981)",
    "Silence of the Lambs, The (1991)",
];
pub const DISLIKED: &[&str] = &[
    "Batman Forever (1995)",
    "Ace Ventura: Pet Detective (1994)",
    "Free Willy (1993)",
    "Jury Duty (1995)",
];
/// Movies the user has not rated, to order.
pub const CANDIDATES: &[&str] = &[
    "Empire Strikes Back, The (1980)",
    "Pulp Fiction (1994)",
    "Casablanca (1942)",
    "Batman & Robin (1997)",
    "Schindler's List (1993)",
    "Mighty Morphin Power Rangers: The Movie (1995)",
    "Terminator 2: Judgment Day (1991)",
    "Home Alone 3 (1997)",
];

struct Args {
    model: PathBuf,
    adapter: Option<PathBuf>,
    device: DeviceChoice,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        model: PathBuf::from("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        adapter: None,
        device: DeviceChoice::Auto,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = value()?.into(),
            "--adapter" => a.adapter = Some(value()?.into()),
            "--device" => a.device = value()?.parse()?,
            other => bail!("unknown argument {other:?} (--model PATH, --adapter DIR, --device cpu|cuda|sim|auto)"),
        }
    }
    Ok(a)
}

fn run<B: Backend>(be: &B, model_path: &Path, adapter_dir: Option<&Path>) -> Result<()> {
    let src = model::open(model_path).with_context(|| {
        format!(
            "cannot open {} (scripts/fetch-assets.sh fetches the default)",
            model_path.display()
        )
    })?;
    let tok = src.tokenizer()?;
    let m = Llama::load(src.as_ref(), be, LoadOptions::default())?;
    let adapter = match adapter_dir {
        Some(dir) => {
            let host = model::adapter::load(dir)
                .with_context(|| format!("cannot load adapter {}", dir.display()))?;
            host.check_against(&m.config)?;
            DevAdapter::upload_frozen(be, &host)?
        }
        None => DevAdapter::none(),
    };
    let user = User {
        liked: LIKED,
        disliked: DISLIKED,
    };
    let t0 = std::time::Instant::now();
    let ranked = rank(be, &m, &tok, &adapter, &user, CANDIDATES)?;
    println!("liked:    {}", LIKED.join(" · "));
    println!("disliked: {}", DISLIKED.join(" · "));
    println!(
        "candidates by P(Yes), on {} in {:.1}s:",
        be.name(),
        t0.elapsed().as_secs_f64()
    );
    for (i, (title, p)) in ranked.iter().enumerate() {
        println!("{:>3}. {p:.4}  {title}", i + 1);
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
            Chosen::Cpu(be) => run(&be, &a.model, a.adapter.as_deref()),
            Chosen::Gpu(be) => run(&be, &a.model, a.adapter.as_deref()),
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
