//! Inference: generation (greedy or sampled) over the model's contiguous KV cache, and the
//! paged KV cache's host side (block allocator, prefix sharing, copy-on-write, slot mapping).

pub mod generate;
pub mod paged;
