//! Gradient-based data pruning for LoRA fine-tuning: score every training sample by the norm
//! of its LoRA gradient, then keep a subset to train on.
//!
//! The score is the L2 norm of the gradient of the sample's mean response loss with respect to
//! every LoRA A and B, without dropout (`train::step::sample_scores`) — the "effort" score of
//! DEALRec (Lin et al., SIGIR 2024) and GraNd (Paul et al., NeurIPS 2021): how far one step on
//! the sample would move the adapter. Taken with a freshly initialised adapter (B = 0) only the
//! B half is non-zero; with an adapter trained briefly on the data (the surrogate of DEALRec)
//! both are.
//!
//! Which samples to keep ([`Selection`]):
//! - `stratified` (the default): coverage-centric selection (Zheng et al., ICLR 2023, as
//!   DEALRec uses it) — the score range is cut into equal-width strata and the budget is spread
//!   over them as evenly as their sizes allow (smallest stratum first, each taking at most its
//!   share of what is left; strata of one size in a seeded random order, so a budget smaller
//!   than the number of strata lands anywhere in the range), at random within a stratum. It
//!   keeps easy, typical and hard samples alike, which matters at high pruning rates where the
//!   hardest alone train worse.
//! - `highest`: the largest gradients (GraNd's choice at low pruning rates).
//! - `lowest`: the smallest (the easiest samples; a baseline).

use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::rec::Sample;
use crate::rng::Rng;
use crate::train::step::{sample_scores, Batch, SampleScore, Workspace};
use crate::train::{DevAdapter, Example};

/// How [`select`] chooses the samples to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Coverage-centric: equal-width strata over the score range, the budget spread evenly.
    Stratified { strata: usize },
    /// The largest scores.
    Highest,
    /// The smallest scores.
    Lowest,
}

/// Strata of `stratified` when not given.
pub const DEFAULT_STRATA: usize = 10;

impl FromStr for Selection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stratified" => Ok(Selection::Stratified {
                strata: DEFAULT_STRATA,
            }),
            "highest" => Ok(Selection::Highest),
            "lowest" => Ok(Selection::Lowest),
            other => Err(Error::Invalid(format!(
                "unknown selection '{other}': expected stratified, highest or lowest"
            ))),
        }
    }
}

impl Selection {
    pub fn name(&self) -> &'static str {
        match self {
            Selection::Stratified { .. } => "stratified",
            Selection::Highest => "highest",
            Selection::Lowest => "lowest",
        }
    }
}

fn check_keep(keep: usize, n: usize) -> Result<()> {
    if keep == 0 || keep > n {
        return Err(Error::Invalid(format!(
            "cannot keep {keep} of {n} samples: keep at least 1 and at most all of them"
        )));
    }
    Ok(())
}

/// The indices (ascending) of the `keep` samples to train on, chosen from their `scores` as
/// `how` says; `seed` draws within strata. Every score must be finite, and `keep` between 1
/// and the number of scores.
pub fn select(scores: &[f64], keep: usize, how: Selection, seed: u64) -> Result<Vec<usize>> {
    let n = scores.len();
    check_keep(keep, n)?;
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::Invalid(format!(
            "sample {i} has a non-finite score ({}): the model or adapter diverged on it",
            scores[i]
        )));
    }
    // Ties go to the earlier sample, so the choice depends on the scores alone.
    let by_score = |descending: bool| {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| {
            let o = scores[a].total_cmp(&scores[b]);
            if descending { o.reverse() } else { o }.then(a.cmp(&b))
        });
        idx
    };
    let mut kept = match how {
        Selection::Highest => by_score(true)[..keep].to_vec(),
        Selection::Lowest => by_score(false)[..keep].to_vec(),
        Selection::Stratified { strata } => stratified(scores, keep, strata, seed)?,
    };
    kept.sort_unstable();
    Ok(kept)
}

/// [`select`] within groups (e.g. the answers Yes and No): each group keeps its share of
/// `keep` (proportional, the remainder to the largest fractions, ties to the lower group) and
/// chooses that many of its own samples by `how`, with its own draw. `group[i]` is sample i's
/// group. Indices ascending.
pub fn select_within_groups(
    scores: &[f64],
    group: &[usize],
    keep: usize,
    how: Selection,
    seed: u64,
) -> Result<Vec<usize>> {
    let n = scores.len();
    if group.len() != n {
        return Err(Error::Invalid(format!(
            "{n} scores but {} group labels",
            group.len()
        )));
    }
    check_keep(keep, n)?;
    let groups = group.iter().max().map_or(0, |g| g + 1);
    let members: Vec<Vec<usize>> = (0..groups)
        .map(|g| (0..n).filter(|&i| group[i] == g).collect())
        .collect();
    // Largest remainder: floor(keep · size / n) each, then one more to the largest fractions.
    let mut quota: Vec<usize> = members.iter().map(|m| keep * m.len() / n).collect();
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_by_key(|&g| std::cmp::Reverse(keep * members[g].len() % n));
    let short = keep - quota.iter().sum::<usize>();
    for &g in order.iter().take(short) {
        quota[g] += 1;
    }
    let mut kept = vec![];
    for (g, m) in members.iter().enumerate() {
        if quota[g] == 0 {
            continue;
        }
        let sub: Vec<f64> = m.iter().map(|&i| scores[i]).collect();
        let seed_g = seed ^ (g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        kept.extend(
            select(&sub, quota[g], how, seed_g)?
                .into_iter()
                .map(|j| m[j]),
        );
    }
    kept.sort_unstable();
    Ok(kept)
}

/// Which of `strata` equal-width strata of `[lo, hi]` each score falls in (all in the first when
/// the scores are all equal).
pub fn stratum_of(scores: &[f64], strata: usize) -> Vec<usize> {
    let lo = scores.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    scores
        .iter()
        .map(|&s| {
            if hi > lo {
                (((s - lo) / (hi - lo) * strata as f64) as usize).min(strata - 1)
            } else {
                0
            }
        })
        .collect()
}

fn stratified(scores: &[f64], keep: usize, strata: usize, seed: u64) -> Result<Vec<usize>> {
    if strata == 0 {
        return Err(Error::Invalid("--strata must be at least 1".into()));
    }
    let mut groups: Vec<Vec<usize>> = vec![vec![]; strata];
    for (i, s) in stratum_of(scores, strata).into_iter().enumerate() {
        groups[s].push(i);
    }
    groups.retain(|g| !g.is_empty());
    let mut rng = Rng::new(seed);
    // Smallest first; each takes at most an even share of the budget still left, so what a
    // small stratum cannot use goes to the larger. Among strata of one size the later ones
    // get the rounding's extra items, so they come in a seeded random order (the sort is
    // stable): with a budget smaller than their number it falls anywhere in the range, not
    // always on its top strata.
    for j in (1..groups.len()).rev() {
        let pick = rng.below(j as u64 + 1) as usize;
        groups.swap(j, pick);
    }
    groups.sort_by_key(|g| g.len());
    let mut budget = keep;
    let mut kept = Vec::with_capacity(keep);
    let count = groups.len();
    for (i, mut g) in groups.into_iter().enumerate() {
        let take = g.len().min(budget / (count - i));
        // A partial Fisher–Yates shuffle: the first `take` are a uniform draw.
        for j in 0..take {
            let pick = j + rng.below((g.len() - j) as u64) as usize;
            g.swap(j, pick);
        }
        kept.extend_from_slice(&g[..take]);
        budget -= take;
    }
    if budget != 0 {
        // Cannot happen: the shares never fall behind what the strata hold.
        return Err(Error::Invalid(format!(
            "stratified selection left {budget} of {keep} unassigned"
        )));
    }
    Ok(kept)
}

/// Every example's [`SampleScore`] under `adapter` (uploaded with its gradient tensors, which
/// the backward pass uses: `DevAdapter::upload_for_gradients`), `batch` examples packed per
/// forward + backward pass, `recomputed` layers recomputing their activations (as in training:
/// the scores do not depend on it). `progress(done, total)` after each pass.
pub fn score<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: &mut DevAdapter<B>,
    examples: &[Example],
    batch: usize,
    recomputed: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<SampleScore>> {
    if batch == 0 {
        return Err(Error::Invalid(
            "at least one sample per pass is needed".into(),
        ));
    }
    let (targets, r) = (adapter.config.targets.clone(), adapter.config.r);
    let mut ws: Option<Workspace<B>> = None;
    let mut out = Vec::with_capacity(examples.len());
    for group in examples.chunks(batch) {
        let b = Batch::pack(group.iter().map(|e| (&e.ids[..], &e.labels[..])))?;
        if ws.as_ref().map(Workspace::tokens) != Some(b.len()) {
            drop(ws.take()); // free the old one first
            ws = Some(Workspace::new(be, model, &targets, r, b.len(), recomputed)?);
        }
        let w = ws.as_mut().expect("workspace was just made");
        out.extend(sample_scores(be, model, adapter, w, &b)?);
        progress(out.len(), examples.len());
    }
    Ok(out)
}

/// One scored sample, as a scores file holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoredSample {
    /// Its position in the data file.
    pub index: usize,
    /// Labelled (response) tokens.
    pub tokens: usize,
    /// Mean loss per labelled token (nats).
    pub loss: f64,
    /// The gradient norm it is selected by.
    pub grad_norm: f64,
    /// Whether the selection that wrote the file kept it.
    #[serde(default)]
    pub kept: bool,
}

/// What `rec prune --scores` writes and `rec prune --from-scores` selects from: every scored
/// sample of one data file, with what they were scored by and the selection made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScoresFile {
    /// The data file's path when scored (informational).
    pub data: String,
    /// [`fingerprint`] of the scored data's samples; a file whose samples differ is refused.
    pub data_fingerprint: String,
    /// Samples in the data file (scored or not).
    pub data_samples: usize,
    pub model: String,
    pub adapter: Option<String>,
    /// Tokens per sample at most when scored.
    pub cutoff: usize,
    /// The LLM.int8 outlier threshold the model was loaded with (files written before it was
    /// recorded: the default, 6).
    #[serde(default = "default_outlier_threshold")]
    pub outlier_threshold: f32,
    pub selection: String,
    pub strata: Option<usize>,
    pub seed: u64,
    pub balance_labels: bool,
    /// How many were kept.
    pub kept: usize,
    pub samples: Vec<ScoredSample>,
}

fn default_outlier_threshold() -> f32 {
    crate::model::LoadOptions::default().outlier_threshold
}

/// A 64-bit FNV-1a hash of the samples' fields, as 16 hex digits: what ties a scores file to
/// its data (the same samples in the same order), whatever the JSON's layout.
pub fn fingerprint(samples: &[Sample]) -> String {
    let mut h = crate::hash::Fnv1a::default();
    for s in samples {
        // Lengths first, so moving text from one field to the next changes the hash.
        for f in [&s.instruction, &s.input, &s.output] {
            h.bytes(&(f.len() as u64).to_le_bytes());
            h.bytes(f.as_bytes());
        }
    }
    h.hex()
}

impl ScoresFile {
    /// Read a scores file written for `samples` (the data file's, in its order). Refused, naming
    /// the file: JSON that is not a scores file, scores of other data, an index past the data
    /// or repeated, a gradient norm that is negative or not finite, no samples.
    pub fn read(path: &Path, samples: &[Sample]) -> Result<ScoresFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let f: ScoresFile = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                path,
                format!("not a scores file of `rec prune --scores`: {e}"),
            )
        })?;
        let here = fingerprint(samples);
        if f.data_samples != samples.len() || f.data_fingerprint != here {
            return Err(Error::format(
                path,
                format!(
                    "scored {} samples of {} (fingerprint {}), but the data given has {} \
                     (fingerprint {here}): score this data again",
                    f.data_samples,
                    f.data,
                    f.data_fingerprint,
                    samples.len()
                ),
            ));
        }
        if f.samples.is_empty() {
            return Err(Error::format(path, "no scored samples"));
        }
        let mut seen = vec![false; samples.len()];
        for (j, s) in f.samples.iter().enumerate() {
            if s.index >= samples.len() || std::mem::replace(&mut seen[s.index], true) {
                return Err(Error::format(
                    path,
                    format!(
                        "row {j}: sample index {} is {}",
                        s.index,
                        if s.index >= samples.len() {
                            "past the data"
                        } else {
                            "repeated"
                        }
                    ),
                ));
            }
            if !(s.grad_norm.is_finite() && s.grad_norm >= 0.0) {
                return Err(Error::format(
                    path,
                    format!("row {j}: gradient norm {} is not a norm", s.grad_norm),
                ));
            }
        }
        Ok(f)
    }

    /// Write it as pretty JSON, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Invalid(format!("{}: cannot encode JSON: {e}", path.display())))?;
        bytes.push(b'\n');
        crate::model::convert::write_atomic(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A skewed score distribution: most samples easy (near 0), a long tail of hard ones.
    fn skewed(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| {
                let u = rng.uniform() as f64;
                u.powi(4) * 10.0
            })
            .collect()
    }

    #[test]
    fn the_fingerprint_tells_the_samples_their_order_and_their_fields_apart() {
        let s = |a: &str, b: &str, c: &str| Sample {
            instruction: a.into(),
            input: b.into(),
            output: c.into(),
        };
        let one = vec![
            s("Will they like it?", "Heat (1995)", "Yes."),
            s("i", "x", "No."),
        ];
        let base = fingerprint(&one);
        assert_eq!(base.len(), 16);
        assert_eq!(fingerprint(&one.clone()), base, "a function of the samples");
        let mut swapped = one.clone();
        swapped.swap(0, 1);
        let mut moved = one.clone();
        moved[1] = s("ix", "", "No.");
        let mut edited = one.clone();
        edited[0].output = "No.".into();
        for (what, other) in [
            ("order", swapped),
            ("text moved between fields", moved),
            ("an answer", edited),
            ("a sample fewer", one[..1].to_vec()),
        ] {
            assert_ne!(fingerprint(&other), base, "{what}");
        }
    }

    #[test]
    fn highest_and_lowest_keep_the_extremes_in_file_order() {
        let s = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0];
        assert_eq!(select(&s, 3, Selection::Highest, 0).unwrap(), vec![4, 5, 7]);
        // The tie between samples 1 and 3 goes to the earlier.
        assert_eq!(select(&s, 1, Selection::Lowest, 0).unwrap(), vec![1]);
        assert_eq!(select(&s, 3, Selection::Lowest, 0).unwrap(), vec![1, 3, 6]);
        assert_eq!(
            select(&s, 8, Selection::Highest, 0).unwrap(),
            (0..8).collect::<Vec<_>>()
        );
    }

    #[test]
    fn stratified_spreads_the_budget_evenly_over_the_strata() {
        for seed in 0..40u64 {
            let n = 50 + (seed as usize * 37) % 400;
            let scores = skewed(n, seed);
            let strata = 1 + (seed as usize) % 12;
            let keep = 1 + (seed as usize * 101) % n;
            let kept = select(&scores, keep, Selection::Stratified { strata }, seed).unwrap();
            assert_eq!(kept.len(), keep, "seed {seed}");
            assert!(kept.windows(2).all(|w| w[0] < w[1]), "ascending, distinct");
            let of = stratum_of(&scores, strata);
            let mut size = vec![0usize; strata];
            let mut taken = vec![0usize; strata];
            for (i, &s) in of.iter().enumerate() {
                size[s] += 1;
                if kept.binary_search(&i).is_ok() {
                    taken[s] += 1;
                }
            }
            // A water level: strata not taken whole all get about the same number, and no
            // stratum taken whole is larger than that number.
            let partial: Vec<usize> = (0..strata)
                .filter(|&s| size[s] > 0 && taken[s] < size[s])
                .map(|s| taken[s])
                .collect();
            if let (Some(&lo), Some(&hi)) = (partial.iter().min(), partial.iter().max()) {
                assert!(hi - lo <= 1, "seed {seed}: partial strata take {partial:?}");
                for s in 0..strata {
                    if size[s] > 0 && taken[s] == size[s] {
                        assert!(size[s] <= hi, "seed {seed}: stratum {s} {size:?} {taken:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_budget_below_the_strata_count_falls_anywhere_in_the_range() {
        // 24 distinct scores, one stratum each: keeping 5 used to take the 5 highest strata
        // whatever the seed (equal sizes were visited in score order).
        let scores: Vec<f64> = (0..24).map(|i| i as f64).collect();
        let mut lower_half = 0;
        let mut sets = std::collections::BTreeSet::new();
        for seed in 0..20 {
            let kept = select(&scores, 5, Selection::Stratified { strata: 1000 }, seed).unwrap();
            assert_eq!(kept.len(), 5);
            lower_half += kept.iter().filter(|&&i| i < 12).count();
            sets.insert(kept);
        }
        // 100 picks, about half from the lower half (a uniform draw: 50 ± 5).
        assert!(
            (30..=70).contains(&lower_half),
            "{lower_half} of 100 below the median"
        );
        assert!(
            sets.len() > 10,
            "the seed decides: {} distinct sets",
            sets.len()
        );
    }

    #[test]
    fn stratified_covers_the_tail_that_random_sampling_misses() {
        // 90% of the samples in the lowest tenth of the range: a uniform 10% draw keeps ~10
        // samples above it, stratified keeps every stratum's share.
        let scores = skewed(1000, 9);
        let kept = select(&scores, 100, Selection::Stratified { strata: 10 }, 1).unwrap();
        let of = stratum_of(&scores, 10);
        let low = of.iter().filter(|&&s| s == 0).count();
        let low_kept = kept.iter().filter(|&&i| of[i] == 0).count();
        assert!(
            low > 500,
            "the fixture is skewed ({low} in the first stratum)"
        );
        assert!(low_kept <= 20, "{low_kept} of 100 from the first stratum");
        // The same seed draws the same subset; another seed another.
        assert_eq!(
            kept,
            select(&scores, 100, Selection::Stratified { strata: 10 }, 1).unwrap()
        );
        assert_ne!(
            kept,
            select(&scores, 100, Selection::Stratified { strata: 10 }, 2).unwrap()
        );
    }

    #[test]
    fn groups_keep_their_shares_and_choose_among_their_own() {
        // 10 "Yes" with large scores, 20 "No" with small: highest overall keeps only Yes.
        let mut scores = vec![];
        let mut group = vec![];
        for i in 0..30 {
            let yes = i % 3 == 0;
            scores.push(if yes { 100.0 + i as f64 } else { i as f64 });
            group.push(usize::from(!yes));
        }
        let all_yes = select(&scores, 9, Selection::Highest, 0).unwrap();
        assert!(all_yes.iter().all(|&i| group[i] == 0));
        for keep in [1, 2, 9, 10, 29, 30] {
            let k = select_within_groups(&scores, &group, keep, Selection::Highest, 0).unwrap();
            assert_eq!(k.len(), keep);
            let yes = k.iter().filter(|&&i| group[i] == 0).count();
            // A third of them Yes, rounded as the largest remainder rounds.
            assert!(
                (yes as f64 - keep as f64 / 3.0).abs() < 1.0,
                "keep {keep}: {yes} Yes"
            );
            // Within each group, its highest scores.
            for g in 0..2 {
                let mine: Vec<usize> = k.iter().copied().filter(|&i| group[i] == g).collect();
                let others = (0..30).filter(|&i| group[i] == g && !mine.contains(&i));
                let low = mine
                    .iter()
                    .map(|&i| scores[i])
                    .fold(f64::INFINITY, f64::min);
                assert!(others.into_iter().all(|i| scores[i] < low), "keep {keep}");
            }
        }
        let e = select_within_groups(&scores, &group[..3], 2, Selection::Highest, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("30 scores but 3 group labels"), "{e}");
    }

    #[test]
    fn bad_requests_are_refused() {
        let s = [1.0, 2.0];
        for (keep, want) in [(0, "cannot keep 0 of 2"), (3, "cannot keep 3 of 2")] {
            let e = select(&s, keep, Selection::Highest, 0)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        let e = select(&[1.0, f64::NAN], 1, Selection::Highest, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sample 1 has a non-finite score"), "{e}");
        let e = select(&s, 1, Selection::Stratified { strata: 0 }, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--strata"), "{e}");
        let e = "random".parse::<Selection>().unwrap_err().to_string();
        assert!(e.contains("stratified, highest or lowest"), "{e}");
        // All-equal scores: one stratum, a uniform draw.
        let flat = vec![2.5; 30];
        let k = select(&flat, 7, Selection::Stratified { strata: 4 }, 3).unwrap();
        assert_eq!(k.len(), 7);
    }
}
