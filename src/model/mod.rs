//! Models: configuration, file formats (GGUF, HF safetensors), tokenizers, the LLaMA network,
//! conversion between formats, and the test fixture generator.

pub mod adapter;
pub mod config;
pub mod convert;
pub mod fixture;
pub mod gguf;
pub mod llama;
pub mod lora;
pub mod random;
pub mod source;
pub mod tokenizer;

pub use config::LlamaConfig;
pub use llama::{
    CachedAttention, KvCache, Llama, LoadOptions, Logits, PagedAttention, PagedCache, PagedStep,
};
pub use source::{open, ModelSource};
