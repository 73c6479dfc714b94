//! Yes/No scoring of TALLRec samples: one prefill per sample (no generation), the probability of
//! "Yes" against "No" at the first response position, and the metrics over a split.

use crate::backend::{Backend, IGNORE_LABEL};
use crate::error::{Error, Result};
use crate::model::tokenizer::TextTokenizer;
use crate::model::Llama;
use crate::train::step::{logits_at, Batch, Workspace};
use crate::train::DevAdapter;

use super::metrics::Metrics;
use super::prompt::prompt;
use super::tallrec::{Sample, NO, YES};

/// The token ids compared at the first response position: the first token of "Yes." and of
/// "No." as the tokenizer encodes a response (so training and scoring agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct YesNo {
    pub yes: u32,
    pub no: u32,
}

impl YesNo {
    pub fn from_tokenizer(tok: &TextTokenizer) -> Result<YesNo> {
        let first = |s: &str| -> Result<u32> {
            tok.encode(s, false)?.first().copied().ok_or_else(|| {
                Error::Tokenizer(format!("the tokenizer encodes {s:?} as no tokens"))
            })
        };
        let (yes, no) = (first(YES)?, first(NO)?);
        if yes == no {
            return Err(Error::Tokenizer(format!(
                "\"{YES}\" and \"{NO}\" start with the same token {yes}: cannot score Yes/No"
            )));
        }
        Ok(YesNo { yes, no })
    }
}

/// P(Yes) from the two logits: softmax over just those two, in f64.
pub fn p_yes(logit_yes: f32, logit_no: f32) -> f64 {
    let d = logit_no as f64 - logit_yes as f64;
    1.0 / (1.0 + d.exp())
}

/// P(Yes) for every sample, `batch` prompts packed per forward pass. `progress(done, total)`.
#[allow(clippy::too_many_arguments)]
pub fn score<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &DevAdapter<B>,
    tok: &TextTokenizer,
    samples: &[Sample],
    batch: usize,
    max_tokens: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<f64>> {
    let yn = YesNo::from_tokenizer(tok)?;
    let prompts = samples
        .iter()
        .map(|s| {
            let ids = tok.encode(&prompt(&s.instruction, &s.input), true)?;
            if ids.len() > max_tokens {
                return Err(Error::Invalid(format!(
                    "a prompt has {} tokens, more than the limit of {max_tokens}",
                    ids.len()
                )));
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let targets = adapter.config.targets.clone();
    let mut out = Vec::with_capacity(samples.len());
    for chunk in prompts.chunks(batch.max(1)) {
        let ignore: Vec<Vec<u32>> = chunk.iter().map(|p| vec![IGNORE_LABEL; p.len()]).collect();
        let b = Batch::pack(chunk.iter().zip(&ignore).map(|(p, l)| (&p[..], &l[..])))?;
        let rows: Vec<usize> = b.spans.iter().map(|s| s.q_start + s.q_len - 1).collect();
        let mut ws = Workspace::new(be, model, &targets, adapter.config.r, b.len(), true)?;
        let logits = logits_at(be, model, adapter, &mut ws, &b, &rows)?.to_f32()?;
        let v = model.config.vocab_size;
        for i in 0..rows.len() {
            let row = &logits[i * v..(i + 1) * v];
            out.push(p_yes(row[yn.yes as usize], row[yn.no as usize]));
        }
        progress(out.len(), samples.len());
    }
    Ok(out)
}

/// Score and compute AUC, accuracy and log-loss against the samples' labels.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &DevAdapter<B>,
    tok: &TextTokenizer,
    samples: &[Sample],
    batch: usize,
    max_tokens: usize,
    progress: impl FnMut(usize, usize),
) -> Result<(Metrics, Vec<f64>)> {
    let labels = samples
        .iter()
        .map(|s| {
            s.label().ok_or_else(|| {
                Error::Invalid(format!(
                    "a sample's output is {:?}, expected \"{YES}\" or \"{NO}\"",
                    s.output
                ))
            })
        })
        .collect::<Result<Vec<bool>>>()?;
    let probs = score(
        be, model, adapter, tok, samples, batch, max_tokens, progress,
    )?;
    Ok((Metrics::compute(&probs, &labels)?, probs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_yes_is_the_two_way_softmax() {
        assert_eq!(p_yes(1.0, 1.0), 0.5);
        let (a, b) = (2.5f32, -0.75f32);
        let want = (a as f64).exp() / ((a as f64).exp() + (b as f64).exp());
        assert!((p_yes(a, b) - want).abs() < 1e-12);
        assert!(p_yes(1000.0, -1000.0) > 0.999_999 && p_yes(-1000.0, 1000.0) < 1e-6);
    }
}
