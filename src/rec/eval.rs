//! Yes/No scoring of TALLRec samples: one prefill per sample (no generation), the probability of
//! "Yes" against "No" at the first response position, and the metrics over a split.
//!
//! Every TALLRec prompt opens with the same long text (the Alpaca template and the instruction),
//! so by default the prompts' common token prefix runs through the model once: its per-layer K/V
//! (adapter applied) is kept, and each packed batch runs only the samples' own tokens, attending
//! to the prefix's K/V and then their own (`train::step::prefix_kv` / `forward_logits_at`).

use crate::backend::{Backend, IGNORE_LABEL};
use crate::error::{Error, Result};
use crate::model::lora::StackedAdapter;
use crate::model::tokenizer::TextTokenizer;
use crate::model::Llama;
use crate::train::step::{forward_logits_at, prefix_kv, Batch, Workspace};
use crate::train::DevAdapter;

use super::metrics::Metrics;
use super::prompt::prompt;
use super::tallrec::{Sample, NO, YES};

/// The token ids compared at the first response position: the first token of "Yes." and of
/// "No." as the tokenizer encodes a response after the prompt template, as training does
/// (`Example::from_prompt_response`), so training and scoring agree. For a SentencePiece
/// vocabulary that is "Yes", not the "▁Yes" of the word on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct YesNo {
    pub yes: u32,
    pub no: u32,
}

impl YesNo {
    pub fn from_tokenizer(tok: &TextTokenizer) -> Result<YesNo> {
        // Every TALLRec prompt ends with the template's "### Response:\n"; what precedes it
        // does not reach across that newline.
        let context = prompt("", "");
        let context_ids = tok.encode(&context, true)?;
        let first = |s: &str| -> Result<u32> {
            tok.encode_after(&context, &context_ids, s)?
                .first()
                .copied()
                .ok_or_else(|| {
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

/// P(Yes) from the two logits (or log-probabilities: their difference is the same): softmax
/// over just those two, in f64.
pub fn p_yes(logit_yes: f32, logit_no: f32) -> f64 {
    let d = logit_no as f64 - logit_yes as f64;
    1.0 / (1.0 + d.exp())
}

/// The samples' prompts as token ids (with the tokenizer's special tokens, e.g. BOS), each at
/// most `max_tokens` long.
pub fn prompt_ids(
    tok: &TextTokenizer,
    samples: &[Sample],
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ids = tok.encode(&prompt(&s.instruction, &s.input), true)?;
            if ids.len() > max_tokens {
                return Err(Error::Invalid(format!(
                    "sample {i}: its prompt has {} tokens, more than the limit of {max_tokens}",
                    ids.len()
                )));
            }
            Ok(ids)
        })
        .collect()
}

/// Length of the token prefix that every prompt shares, short enough to leave each prompt at
/// least one token of its own (the row that is scored). 0 for no prompts.
pub fn shared_prefix_len(prompts: &[Vec<u32>]) -> usize {
    let Some(first) = prompts.first() else {
        return 0;
    };
    let mut n = first.len();
    for p in &prompts[1..] {
        n = n.min(first.iter().zip(p).take_while(|(a, b)| a == b).count());
    }
    let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
    n.min(shortest.saturating_sub(1))
}

/// How [`score`] runs `prompts`: the shared prefix's length (0 without `share_prefix`) and each
/// packed batch as (prompts, tokens of their own) — what the memory plan of a scoring run needs
/// (`memory::ScoreSetup`).
pub fn layout(
    prompts: &[Vec<u32>],
    batch: usize,
    share_prefix: bool,
) -> (usize, Vec<(usize, usize)>) {
    let p = if share_prefix {
        shared_prefix_len(prompts)
    } else {
        0
    };
    let batches = prompts
        .chunks(batch.max(1))
        .map(|c| (c.len(), c.iter().map(|x| x.len() - p).sum()))
        .collect();
    (p, batches)
}

/// P(Yes) for every sample, `batch` prompts packed per forward pass. With `share_prefix`, the
/// prompts' common token prefix ([`shared_prefix_len`]) is computed once and each pass runs only
/// the samples' own tokens; without, every prompt runs in full. `progress(done, total)`.
#[allow(clippy::too_many_arguments)]
pub fn score<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &DevAdapter<B>,
    tok: &TextTokenizer,
    samples: &[Sample],
    batch: usize,
    max_tokens: usize,
    share_prefix: bool,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<f64>> {
    let prompts = prompt_ids(tok, samples, max_tokens)?;
    let (p, _) = layout(&prompts, batch, share_prefix);
    score_prompts(be, model, adapter, tok, &prompts, p, None, batch, progress)
}

/// P(Yes) for every sample with its own adapter of a stack: `which[i]` is sample i's adapter
/// (an index into `stack.blocks`) or `None` for the base model alone, and `adapter` is
/// `stack.adapter` on the backend (`DevAdapter::upload_frozen`). The `batch` prompts of one
/// forward pass may use different adapters (a per-row LoRA gate, `StackedAdapter::gate`).
/// Every prompt runs in full: the K/V of a shared prefix depends on the adapter applied to it.
#[allow(clippy::too_many_arguments)]
pub fn score_stacked<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &DevAdapter<B>,
    stack: &StackedAdapter,
    tok: &TextTokenizer,
    samples: &[Sample],
    which: &[Option<usize>],
    batch: usize,
    max_tokens: usize,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<f64>> {
    if which.len() != samples.len() {
        return Err(Error::Invalid(format!(
            "{} samples but {} adapter choices",
            samples.len(),
            which.len()
        )));
    }
    adapter.check_holds(stack)?;
    if let Some(i) = which.iter().flatten().find(|&&i| i >= stack.blocks.len()) {
        return Err(Error::Invalid(format!(
            "adapter {i} asked for, but the stack holds {}",
            stack.blocks.len()
        )));
    }
    let prompts = prompt_ids(tok, samples, max_tokens)?;
    let gate = Some((stack, which));
    score_prompts(be, model, adapter, tok, &prompts, 0, gate, batch, progress)
}

/// The scoring loop: the first `p` tokens of every prompt as a shared prefix (0: none), then
/// `batch` prompts' own tokens a pass, with all-ones LoRA gates or, with `gate`, each sample's
/// adapter of the stack on its rows.
#[allow(clippy::too_many_arguments)]
fn score_prompts<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &DevAdapter<B>,
    tok: &TextTokenizer,
    prompts: &[Vec<u32>],
    p: usize,
    gate: Option<(&StackedAdapter, &[Option<usize>])>,
    batch: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<f64>> {
    let yn = YesNo::from_tokenizer(tok)?;
    let prefix = match p {
        0 => None,
        _ => Some(prefix_kv(be, model, adapter, &prompts[0][..p])?),
    };
    let (targets, r) = (&adapter.config.targets, adapter.config.r);
    let batch = batch.max(1);
    let mut out = Vec::with_capacity(prompts.len());
    for (ci, chunk) in prompts.chunks(batch).enumerate() {
        let own: Vec<&[u32]> = chunk.iter().map(|x| &x[p..]).collect();
        let ignore: Vec<Vec<u32>> = own.iter().map(|x| vec![IGNORE_LABEL; x.len()]).collect();
        let b = Batch::pack(own.iter().zip(&ignore).map(|(x, l)| (*x, &l[..])))?;
        let rows: Vec<usize> = b.spans.iter().map(|s| s.q_start + s.q_len - 1).collect();
        let mut ws = match gate {
            None => Workspace::forward_only(be, model, targets, r, b.len())?,
            Some((stack, which)) => {
                // Every row of a prompt takes the prompt's adapter.
                let mut per_row = Vec::with_capacity(b.len());
                for (span, &w) in b.spans.iter().zip(&which[ci * batch..]) {
                    per_row.extend(std::iter::repeat_n(w, span.q_len));
                }
                let g = stack.gate(&per_row)?;
                Workspace::forward_only_gated(be, model, targets, r, b.len(), &g)?
            }
        };
        let logits = forward_logits_at(be, model, adapter, &mut ws, prefix.as_ref(), &b, &rows)?;
        // log P(Yes), log P(No) per row on the backend: only 2 floats a row come back.
        let ids: Vec<u32> = rows.iter().flat_map(|_| [yn.yes, yn.no]).collect();
        let lp = be.token_logprobs(&logits, &ids)?;
        for x in lp.chunks(2) {
            let p = p_yes(x[0], x[1]);
            if p.is_nan() {
                return Err(Error::Invalid(format!(
                    "sample {}: log P(Yes) {} and log P(No) {} give no probability: the \
                     model's outputs are not finite (damaged weights, or an adapter that \
                     diverged)",
                    out.len(),
                    x[0],
                    x[1]
                )));
            }
            out.push(p);
        }
        progress(out.len(), prompts.len());
    }
    Ok(out)
}

/// Each sample's label (true for "Yes."); an error names the first sample whose output is
/// neither answer.
pub fn labels(samples: &[Sample]) -> Result<Vec<bool>> {
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.label().ok_or_else(|| {
                Error::Invalid(format!(
                    "sample {i}: the output is {:?}, expected \"{YES}\" or \"{NO}\"",
                    s.output
                ))
            })
        })
        .collect()
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
    share_prefix: bool,
    progress: impl FnMut(usize, usize),
) -> Result<(Metrics, Vec<f64>)> {
    let labels = labels(samples)?;
    let probs = score(
        be,
        model,
        adapter,
        tok,
        samples,
        batch,
        max_tokens,
        share_prefix,
        progress,
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

    #[test]
    fn the_shared_prefix_leaves_every_prompt_a_token() {
        let v = |x: &[u32]| x.to_vec();
        assert_eq!(shared_prefix_len(&[]), 0);
        assert_eq!(shared_prefix_len(&[v(&[1, 2, 3])]), 2);
        assert_eq!(shared_prefix_len(&[v(&[1, 2, 3, 4]), v(&[1, 2, 5])]), 2);
        // One prompt is the other's prefix: the shorter keeps its last token.
        assert_eq!(shared_prefix_len(&[v(&[1, 2, 3, 4]), v(&[1, 2, 3])]), 2);
        assert_eq!(
            shared_prefix_len(&[v(&[1, 2]), v(&[1, 2, 3]), v(&[1, 9])]),
            1
        );
        assert_eq!(shared_prefix_len(&[v(&[7, 2]), v(&[1, 2])]), 0);
        assert_eq!(shared_prefix_len(&[v(&[1]), v(&[1, 2])]), 0);
    }
}
