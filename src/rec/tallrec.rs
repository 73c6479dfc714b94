//! TALLRec's MovieLens task: "given the user's liked and disliked movies among the last ten, will
//! they like this one?", answered "Yes." or "No.".
//!
//! The preprocessing, exactly:
//! - users in ascending numeric id order; each user's interactions sorted by timestamp,
//!   ascending, with a STABLE sort: interactions with the same timestamp keep their order in the
//!   `.inter` file (ml-100k has many such ties — about three quarters of its rows share their
//!   timestamp with another row of the same user — so the file order matters);
//! - a rating > 3 is "liked";
//! - for every position i ≥ 10 (0-based) of a user's sorted list, one sample: the history is the
//!   10 items at positions i-10..i-1, split into the liked ones ("User Preference") and the others
//!   ("User Unpreference"), each in history order, titles in double quotes, joined by ", "; the
//!   target is item i, and the output is "Yes." if its rating is > 3, else "No.";
//! - all samples in that order (user by user, position by position), of which the LAST
//!   [`MAX_SAMPLES`] are kept (all if fewer), split in order into train (first 80%), valid (next
//!   10%) and test (the rest): 8000 / 1000 / 1000 for 10,000 samples.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value};

use super::movielens::{Dataset, Interaction};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Items of history per sample.
pub const HISTORY_LEN: usize = 10;
/// Samples kept (the last ones) before the split.
pub const MAX_SAMPLES: usize = 10_000;
/// A rating above this is "liked".
pub const LIKE_THRESHOLD: f64 = 3.0;
pub const YES: &str = "Yes.";
pub const NO: &str = "No.";
pub const INSTRUCTION: &str = "Given the user's preference and unpreference, identify whether the user will like the target movie by answering \"Yes.\" or \"No.\".";

/// One instruction-tuning example, as TALLRec's JSON files hold them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

impl Sample {
    /// `Some(true)` for "Yes.", `Some(false)` for "No.", `None` for anything else.
    pub fn label(&self) -> Option<bool> {
        match self.output.as_str() {
            YES => Some(true),
            NO => Some(false),
            _ => None,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }

    /// The index range of this split among `n` kept samples: train `[0, 8n/10)`, valid
    /// `[8n/10, 9n/10)`, test `[9n/10, n)` (integer division).
    pub fn range(self, n: usize) -> std::ops::Range<usize> {
        let (a, b) = (n * 8 / 10, n * 9 / 10);
        match self {
            Split::Train => 0..a,
            Split::Valid => a..b,
            Split::Test => b..n,
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Split> {
        match s {
            "train" => Ok(Split::Train),
            "valid" => Ok(Split::Valid),
            "test" => Ok(Split::Test),
            _ => Err(Error::Invalid(format!(
                "unknown split {s:?}: expected train, valid or test"
            ))),
        }
    }
}

/// Each user's interactions, users in ascending id order, each list stably sorted by timestamp.
pub fn user_sequences(interactions: &[Interaction]) -> Vec<(u64, Vec<&Interaction>)> {
    let mut by_user: std::collections::BTreeMap<u64, Vec<&Interaction>> = Default::default();
    for it in interactions {
        by_user.entry(it.user).or_default().push(it);
    }
    by_user
        .into_iter()
        .map(|(u, mut v)| {
            // `sort_by` is stable; timestamps are finite (checked when read).
            v.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
            (u, v)
        })
        .collect()
}

fn quoted_list(titles: &[&str]) -> String {
    titles
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The input text of one sample.
pub fn input_text(liked: &[&str], disliked: &[&str], target: &str) -> String {
    format!(
        "User Preference: {}\nUser Unpreference: {}\nWhether the user will like the target movie \"{target}\"?",
        quoted_list(liked),
        quoted_list(disliked)
    )
}

/// Every sample of the dataset, in order (before keeping the last [`MAX_SAMPLES`]).
pub fn all_samples(ds: &Dataset) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (_, seq) in user_sequences(&ds.interactions) {
        if seq.len() <= HISTORY_LEN {
            continue;
        }
        let titles = seq
            .iter()
            .map(|it| ds.title(&it.item))
            .collect::<Result<Vec<&str>>>()?;
        for i in HISTORY_LEN..seq.len() {
            let (mut liked, mut disliked) = (Vec::new(), Vec::new());
            for j in i - HISTORY_LEN..i {
                if seq[j].rating > LIKE_THRESHOLD {
                    liked.push(titles[j]);
                } else {
                    disliked.push(titles[j]);
                }
            }
            out.push(Sample {
                instruction: INSTRUCTION.to_string(),
                input: input_text(&liked, &disliked, titles[i]),
                output: if seq[i].rating > LIKE_THRESHOLD {
                    YES
                } else {
                    NO
                }
                .to_string(),
            });
        }
    }
    Ok(out)
}

/// The last [`MAX_SAMPLES`] samples (all if fewer).
pub fn keep_last(mut samples: Vec<Sample>) -> Vec<Sample> {
    let drop = samples.len().saturating_sub(MAX_SAMPLES);
    samples.drain(..drop);
    samples
}

/// The part of the kept samples that is `split` (see [`Split::range`]).
pub fn split_of(kept: &[Sample], split: Split) -> &[Sample] {
    &kept[split.range(kept.len())]
}

/// The kept samples of the dataset in `dataset_dir` (all three splits, in order).
pub fn build_kept(dataset_dir: &Path) -> Result<Vec<Sample>> {
    let ds = Dataset::load(dataset_dir)?;
    let kept = keep_last(all_samples(&ds)?);
    if kept.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no user has more than {HISTORY_LEN} interactions, so there are no samples",
            ds.inter_path.display()
        )));
    }
    Ok(kept)
}

/// One split of the TALLRec samples of the dataset in `dataset_dir`.
pub fn build(dataset_dir: &Path, split: Split) -> Result<Vec<Sample>> {
    Ok(split_of(&build_kept(dataset_dir)?, split).to_vec())
}

/// `n` distinct samples drawn without replacement, in draw order, by a partial Fisher–Yates
/// shuffle driven by `Rng::new(seed)`: the same seed gives the same samples on every machine.
pub fn sample(samples: &[Sample], n: usize, seed: u64) -> Result<Vec<Sample>> {
    if n == 0 {
        return Err(Error::Invalid(
            "few-shot sample size must be at least 1".into(),
        ));
    }
    if n > samples.len() {
        return Err(Error::Invalid(format!(
            "cannot draw {n} samples without replacement from {}",
            samples.len()
        )));
    }
    let mut idx: Vec<usize> = (0..samples.len()).collect();
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let j = i + rng.below((samples.len() - i) as u64) as usize;
        idx.swap(i, j);
    }
    Ok(idx[..n].iter().map(|&i| samples[i].clone()).collect())
}

/// Write samples as a JSON list of `{"instruction", "input", "output"}` (TALLRec's format),
/// atomically.
pub fn write_json(path: &Path, samples: &[Sample]) -> Result<()> {
    let v = Value::Array(samples.iter().map(Sample::to_json).collect());
    let mut bytes = serde_json::to_vec_pretty(&v)
        .map_err(|e| Error::Invalid(format!("{}: cannot encode JSON: {e}", path.display())))?;
    bytes.push(b'\n');
    crate::model::convert::write_atomic(path, &bytes)
}

/// Read a JSON list of `{"instruction", "input", "output"}` objects (string fields; other fields
/// are ignored).
pub fn read_json(path: &Path) -> Result<Vec<Sample>> {
    let items = read_list(path)?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |name: &str| -> Result<String> {
                match item.get(name) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(_) => Err(Error::format(
                        path,
                        format!("sample {i}: field {name:?} is not a string"),
                    )),
                    None if item.is_object() => Err(Error::format(
                        path,
                        format!("sample {i}: missing field {name:?}"),
                    )),
                    None => Err(Error::format(path, format!("sample {i}: not an object"))),
                }
            };
            Ok(Sample {
                instruction: field("instruction")?,
                input: field("input")?,
                output: field("output")?,
            })
        })
        .collect()
}

/// The JSON list of a samples file.
fn read_list(path: &Path) -> Result<Vec<Value>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let Value::Array(items) = v else {
        return Err(Error::format(path, "expected a JSON list of samples"));
    };
    Ok(items)
}

/// Each sample's `"adapter"` field in a samples file (extra to TALLRec's three): the folder of
/// the PEFT adapter that scores it ([`adapter_folder`]). `rec eval --per-sample-adapters`.
pub fn read_adapter_field(path: &Path) -> Result<Vec<Option<std::path::PathBuf>>> {
    let base = path.parent().unwrap_or(Path::new(""));
    read_list(path)?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            adapter_folder(item.get("adapter"), base)
                .map_err(|e| Error::format(path, format!("sample {i}: field {e}")))
        })
        .collect()
}

/// The `"adapter"` field of a sample or prompt object (`field`: the object's value for it): the
/// adapter folder it names, resolved against `base` (the file's own folder) when relative; None
/// where the field is absent or null. The error says what is wrong with the field.
pub fn adapter_folder(
    field: Option<&Value>,
    base: &Path,
) -> std::result::Result<Option<std::path::PathBuf>, &'static str> {
    match field {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(base.join(s))),
        Some(_) => Err("\"adapter\" is not an adapter folder's path"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(k: usize) -> Sample {
        Sample {
            instruction: String::new(),
            input: k.to_string(),
            output: YES.into(),
        }
    }

    #[test]
    fn split_ranges() {
        assert_eq!(Split::Train.range(10_000), 0..8000);
        assert_eq!(Split::Valid.range(10_000), 8000..9000);
        assert_eq!(Split::Test.range(10_000), 9000..10_000);
        // Uneven n: the three ranges still tile [0, n).
        for n in 0..40 {
            let r: Vec<_> = Split::ALL.iter().map(|s| s.range(n)).collect();
            assert_eq!(r[0].start, 0);
            assert_eq!(r[0].end, r[1].start);
            assert_eq!(r[1].end, r[2].start);
            assert_eq!(r[2].end, n);
        }
        assert_eq!("valid".parse::<Split>().unwrap(), Split::Valid);
        let e = "validation".parse::<Split>().err().unwrap().to_string();
        assert!(e.contains("validation") && e.contains("train"), "{e}");
    }

    #[test]
    fn keep_last_keeps_the_tail() {
        let v: Vec<Sample> = (0..MAX_SAMPLES + 5).map(s).collect();
        let k = keep_last(v);
        assert_eq!(k.len(), MAX_SAMPLES);
        assert_eq!(k[0].input, "5");
        let k = keep_last((0..3).map(s).collect());
        assert_eq!(k.len(), 3);
    }

    #[test]
    fn sampling_is_without_replacement() {
        let v: Vec<Sample> = (0..50).map(s).collect();
        let d = sample(&v, 50, 7).unwrap();
        let mut got: Vec<usize> = d.iter().map(|x| x.input.parse().unwrap()).collect();
        got.sort();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        assert!(sample(&v, 51, 7).is_err());
        assert!(sample(&v, 0, 7).is_err());
    }

    #[test]
    fn input_text_with_empty_list() {
        assert_eq!(
            input_text(&[], &["B (1990)"], "C (1991)"),
            "User Preference: \nUser Unpreference: \"B (1990)\"\nWhether the user will like the target movie \"C (1991)\"?"
        );
    }
}
