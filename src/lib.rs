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

/// Let a closed stdout end the process quietly, as it does for other command-line tools
/// (`recforge kernels | head`): Rust ignores SIGPIPE, so a print to a closed pipe would panic.
/// The binaries call this first thing.
pub fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: signal() with SIG_DFL only changes this process's disposition of SIGPIPE; it is
    // called at the start of main, before any thread is spawned.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
