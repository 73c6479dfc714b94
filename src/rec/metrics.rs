//! Binary-classification metrics for the Yes/No recommendation task: ROC AUC (TALLRec's metric),
//! accuracy and log loss.

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Probabilities are clamped to `[EPS, 1 - EPS]` in [`log_loss`].
pub const LOG_LOSS_EPS: f64 = 1e-7;

fn check_lengths(what: &str, n: usize, labels: &[bool]) -> Result<()> {
    if n != labels.len() {
        return Err(Error::Invalid(format!(
            "{what}: {n} scores but {} labels",
            labels.len()
        )));
    }
    if n == 0 {
        return Err(Error::Invalid(format!("{what}: no examples")));
    }
    Ok(())
}

fn check_probs(what: &str, probs: &[f64]) -> Result<()> {
    if let Some((i, p)) = probs
        .iter()
        .enumerate()
        .find(|(_, p)| !(0.0..=1.0).contains(*p))
    {
        return Err(Error::Invalid(format!(
            "{what}: probability {i} is {p}, not in [0, 1]"
        )));
    }
    Ok(())
}

/// ROC AUC: the probability that a random positive scores above a random negative, ties counting
/// one half — computed as the Mann–Whitney U statistic with average ranks for tied scores, in
/// O(n log n). All scores equal gives 0.5. Errors on a length mismatch, a NaN score, or labels
/// that are all positive or all negative.
pub fn auc(scores: &[f64], labels: &[bool]) -> Result<f64> {
    check_lengths("auc", scores.len(), labels)?;
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(Error::Invalid(format!("auc: score {i} is NaN")));
    }
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return Err(Error::Invalid(format!(
            "auc: undefined with {pos} positive and {neg} negative examples (needs both)"
        )));
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum = 0.0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        // -0.0 and 0.0 are distinct under total_cmp but equal scores: group with ==.
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + 1 + j) as f64 / 2.0; // mean of ranks i+1 ..= j
        let pos_in_group = order[i..j].iter().filter(|&&k| labels[k]).count();
        rank_sum += avg_rank * pos_in_group as f64;
        i = j;
    }
    let (p, n) = (pos as f64, neg as f64);
    let u = rank_sum - p * (p + 1.0) / 2.0;
    Ok(u / (p * n))
}

/// Fraction of examples where (p ≥ 0.5) equals the label.
pub fn accuracy(probs: &[f64], labels: &[bool]) -> Result<f64> {
    check_lengths("accuracy", probs.len(), labels)?;
    check_probs("accuracy", probs)?;
    let right = probs
        .iter()
        .zip(labels)
        .filter(|(&p, &l)| (p >= 0.5) == l)
        .count();
    Ok(right as f64 / probs.len() as f64)
}

/// Mean binary cross-entropy, natural log, with p clamped to `[1e-7, 1 - 1e-7]`.
pub fn log_loss(probs: &[f64], labels: &[bool]) -> Result<f64> {
    check_lengths("log_loss", probs.len(), labels)?;
    check_probs("log_loss", probs)?;
    let total: f64 = probs
        .iter()
        .zip(labels)
        .map(|(&p, &l)| {
            let p = p.clamp(LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS);
            if l {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum();
    Ok(total / probs.len() as f64)
}

/// The evaluation summary of one run: probabilities of "Yes." against the true labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    pub n: usize,
    pub positives: usize,
    /// None when every label is the same: AUC ranks positives against negatives and needs
    /// both. The other metrics are still defined.
    pub auc: Option<f64>,
    pub accuracy: f64,
    pub log_loss: f64,
}

impl Metrics {
    pub fn compute(probs: &[f64], labels: &[bool]) -> Result<Metrics> {
        let positives = labels.iter().filter(|&&l| l).count();
        let both = positives > 0 && positives < labels.len();
        Ok(Metrics {
            n: probs.len(),
            positives,
            accuracy: accuracy(probs, labels)?,
            log_loss: log_loss(probs, labels)?,
            auc: if both {
                Some(auc(probs, labels)?)
            } else {
                None
            },
        })
    }

    /// The AUC to four places, or why there is none.
    pub fn auc_text(&self) -> String {
        match self.auc {
            Some(a) => format!("{a:.4}"),
            None => format!(
                "n/a (every label is {})",
                if self.positives > 0 { "Yes" } else { "No" }
            ),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "n": self.n,
            "positives": self.positives,
            "auc": self.auc,
            "accuracy": self.accuracy,
            "log_loss": self.log_loss,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked() {
        let l = [false, false, true, true];
        assert_eq!(auc(&[0.1, 0.2, 0.3, 0.4], &l).unwrap(), 1.0);
        assert_eq!(auc(&[0.4, 0.3, 0.2, 0.1], &l).unwrap(), 0.0);
        assert_eq!(auc(&[0.5; 4], &l).unwrap(), 0.5);
        // Pairs (pos, neg): (0.3 vs 0.1) 1, (0.3 vs 0.3) 1/2, (0.4 vs 0.1) 1, (0.4 vs 0.3) 1
        // → 3.5 / 4.
        assert_eq!(auc(&[0.1, 0.3, 0.3, 0.4], &l).unwrap(), 0.875);
        // -0.0 and 0.0 are one tie.
        assert_eq!(auc(&[-0.0, 0.0], &[true, false]).unwrap(), 0.5);
    }

    #[test]
    fn accuracy_threshold_and_log_loss() {
        assert_eq!(
            accuracy(&[0.5, 0.49, 0.9, 0.1], &[true, true, false, false]).unwrap(),
            0.5
        );
        let ll = log_loss(&[0.5, 0.0], &[true, false]).unwrap();
        // (ln 2 + (-ln(1 - 1e-7))) / 2
        let want = (std::f64::consts::LN_2 - (1.0f64 - 1e-7).ln()) / 2.0;
        assert!((ll - want).abs() < 1e-15, "{ll} vs {want}");
        let ll = log_loss(&[0.0], &[true]).unwrap();
        assert!((ll - (1e7f64).ln()).abs() < 1e-9);
        assert!(log_loss(&[1.5], &[true]).is_err());
        assert!(accuracy(&[f64::NAN], &[true]).is_err());
    }
}
