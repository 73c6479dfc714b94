//! Inference: greedy generation over the model's contiguous KV cache, and the paged KV cache's
//! host side (block allocator, prefix sharing, copy-on-write, slot mapping); the paged
//! attention kernels and sampling come with the attention / sampling issue.

pub mod generate;
pub mod paged;
