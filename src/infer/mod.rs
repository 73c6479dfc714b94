//! Inference: generation (greedy for now; paged KV, batching and sampling come with the
//! kernel issues).

pub mod generate;
