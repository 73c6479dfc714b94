//! Inference: generation (greedy or sampled) over the model's contiguous KV cache, batched
//! generation over the paged KV cache, and the paged cache's host side (block allocator, prefix
//! sharing, copy-on-write, slot mapping).

pub mod batch;
pub mod generate;
pub mod paged;
