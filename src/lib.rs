//! recforge: fine-tune and serve LLaMA-family models in 8-bit with LoRA adapters, for LLM-based
//! recommendation. See DESIGN.md (shared with the project) for the architecture.
//!
//! Dependencies point one way: rec → train / infer → model → backend → kernels.

pub mod backend;
pub mod error;
pub mod infer;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod rec;
pub mod rng;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
