//! Training examples: a prompt and a response tokenized, with the loss only on the response
//! (TALLRec's `train_on_inputs = False`), and the deterministic order they are visited in.

use crate::backend::IGNORE_LABEL;
use crate::error::{Error, Result};
use crate::model::tokenizer::TextTokenizer;
use crate::rng::Rng;

/// One tokenized sequence; `labels[t]` is the token to predict at row t or `IGNORE_LABEL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<u32>,
}

impl Example {
    /// `prompt` then `response` (then end-of-sequence when the tokenizer has one), truncated on
    /// the right to `cutoff` tokens as TALLRec does; only response tokens (and the end token)
    /// are predicted. The response is tokenized as it continues the prompt
    /// ([`TextTokenizer::encode_after`]), as in TALLRec. None when truncation leaves no
    /// response token.
    pub fn from_prompt_response(
        tok: &TextTokenizer,
        prompt: &str,
        response: &str,
        cutoff: usize,
    ) -> Result<Option<Example>> {
        let mut ids = tok.encode(prompt, true)?;
        let prompt_len = ids.len();
        let tail = tok.encode_after(prompt, &ids, response)?;
        ids.extend(tail);
        if let Some(&eos) = tok.eos_ids.first() {
            ids.push(eos);
        }
        ids.truncate(cutoff);
        if ids.len() <= prompt_len {
            return Ok(None);
        }
        let labels = (0..ids.len())
            .map(|t| {
                if t + 1 < ids.len() && t + 1 >= prompt_len {
                    ids[t + 1]
                } else {
                    IGNORE_LABEL
                }
            })
            .collect();
        Ok(Some(Example { ids, labels }))
    }

    /// Train on every next token (plain language-model loss).
    pub fn language_model(ids: Vec<u32>) -> Result<Example> {
        if ids.len() < 2 {
            return Err(Error::Invalid(
                "a training sequence needs at least two tokens".into(),
            ));
        }
        let labels = (0..ids.len())
            .map(|t| ids.get(t + 1).copied().unwrap_or(IGNORE_LABEL))
            .collect();
        Ok(Example { ids, labels })
    }
}

/// The order examples are visited in: an endless stream of epochs, each a permutation drawn
/// from (seed, epoch). Item `i` of the stream depends only on `i`, so a resumed run continues
/// with exactly the examples the uninterrupted run would have seen.
#[derive(Clone, Debug)]
pub struct DataOrder {
    n: usize,
    seed: u64,
    epoch: usize,
    perm: Vec<usize>,
}

impl DataOrder {
    pub fn new(n: usize, seed: u64) -> Result<Self> {
        if n == 0 {
            return Err(Error::Invalid("no training examples".into()));
        }
        let mut o = DataOrder {
            n,
            seed,
            epoch: usize::MAX,
            perm: vec![],
        };
        o.set_epoch(0);
        Ok(o)
    }

    fn set_epoch(&mut self, e: usize) {
        if self.epoch == e {
            return;
        }
        let mut rng = Rng::new(self.seed ^ (e as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let mut p: Vec<usize> = (0..self.n).collect();
        for i in (1..p.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        self.perm = p;
        self.epoch = e;
    }

    /// Index of the example at stream position `i`.
    pub fn at(&mut self, i: usize) -> usize {
        self.set_epoch(i / self.n);
        self.perm[i % self.n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_is_a_permutation_and_epochs_differ() {
        let mut o = DataOrder::new(7, 3).unwrap();
        let e0: Vec<usize> = (0..7).map(|i| o.at(i)).collect();
        let e1: Vec<usize> = (7..14).map(|i| o.at(i)).collect();
        let mut s0 = e0.clone();
        s0.sort();
        assert_eq!(s0, (0..7).collect::<Vec<_>>());
        let mut s1 = e1.clone();
        s1.sort();
        assert_eq!(s1, (0..7).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        // Random access equals sequential access.
        let mut fresh = DataOrder::new(7, 3).unwrap();
        assert_eq!(fresh.at(9), e1[2]);
        assert_eq!(fresh.at(1), e0[1]);
    }

    #[test]
    fn language_model_labels_are_the_next_tokens() {
        let e = Example::language_model(vec![5, 6, 7]).unwrap();
        assert_eq!(e.labels, vec![6, 7, IGNORE_LABEL]);
        assert!(Example::language_model(vec![1]).is_err());
    }
}
