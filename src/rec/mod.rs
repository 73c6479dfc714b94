//! Recommendation data and metrics: TALLRec samples from MovieLens, prompts, AUC.
//!
//! - [`movielens`]: RecBole atomic files (`.inter`, `.item`) read by column name;
//! - [`tallrec`]: TALLRec's preprocessing into instruction samples, splits, few-shot sampling,
//!   JSON files;
//! - [`prompt`](mod@prompt): the Alpaca template TALLRec trains with;
//! - [`metrics`]: ROC AUC (tie-aware), accuracy, log loss;
//! - [`eval`]: P(Yes) from one prefill per sample, and the metrics over a split;
//! - [`prune`]: gradient-norm scores per training sample and the subset to keep.

pub mod eval;
pub mod metrics;
pub mod movielens;
pub mod prompt;
pub mod prune;
pub mod tallrec;

pub use metrics::{accuracy, auc, log_loss, Metrics};
pub use movielens::{Dataset, Interaction};
pub use prompt::{prompt, prompt_and_response};
pub use tallrec::{build, read_json, sample, write_json, Sample, Split};
