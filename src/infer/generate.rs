//! Generation with a KV cache and stop tokens: greedy or sampled (temperature / top-k / top-p,
//! `backend::sampling`), the uniform numbers drawn from a generator the caller seeds, so every
//! backend produces the same tokens for the same seed.

use std::time::Instant;

use crate::backend::{Backend, SamplingParams};
use crate::error::{Error, Result};
use crate::model::llama::AdapterView;
use crate::model::{Llama, Logits};
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Generation ends when one of these is produced (it is not part of the output).
    pub stop_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Seeds the generator of the uniform numbers (one per new token).
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    StopToken(u32),
    MaxTokens,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub stop: StopReason,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    /// Decode speed: generated tokens after the first, per second of decoding.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1) as f64;
        if self.decode_secs > 0.0 {
            n / self.decode_secs
        } else {
            0.0
        }
    }
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        if self.prefill_secs > 0.0 {
            self.prompt_tokens as f64 / self.prefill_secs
        } else {
            0.0
        }
    }
}

/// Index of the largest logit; ties go to the lowest index, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Decode `prompt` with `opts.sampling`. `on_token` sees each new token as it is produced.
pub fn generate<B: Backend>(
    be: &B,
    model: &Llama<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    generate_with(be, model, None, prompt, opts, on_token)
}

/// [`generate`] with LoRA adapters applied to the model's projections.
pub fn generate_with<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: Option<&AdapterView<'_, B>>,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt has no tokens".into()));
    }
    opts.sampling.validate()?;
    let capacity = prompt.len().saturating_add(opts.max_new_tokens);
    if capacity > model.config.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "prompt ({}) + max new tokens ({}) exceed the model's context of {}",
            prompt.len(),
            opts.max_new_tokens,
            model.config.max_position_embeddings
        )));
    }
    let mut rng = Rng::new(opts.seed);
    let mut draw = |logits: &crate::backend::Tensor<B>| -> Result<u32> {
        let u = rng.uniform();
        Ok(be.sample(logits, &[opts.sampling], &[u])?[0])
    };
    let mut cache = model.new_cache(be, capacity)?;
    let t0 = Instant::now();
    let logits = model.forward_logits_with(be, prompt, &mut cache, Logits::Last, adapter)?;
    let mut next = draw(&logits)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let mut tokens = vec![];
    let t1 = Instant::now();
    let mut stop = StopReason::MaxTokens;
    while tokens.len() < opts.max_new_tokens {
        if opts.stop_ids.contains(&next) {
            stop = StopReason::StopToken(next);
            break;
        }
        tokens.push(next);
        on_token(next)?;
        if tokens.len() == opts.max_new_tokens {
            break;
        }
        let logits = model.forward_logits_with(be, &[next], &mut cache, Logits::Last, adapter)?;
        next = draw(&logits)?;
    }
    Ok(Generation {
        tokens,
        prompt_tokens: prompt.len(),
        stop,
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}
