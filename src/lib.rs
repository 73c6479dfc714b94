//! recforge: fine-tune and serve LLaMA-family models in 8-bit with LoRA adapters, for LLM-based
//! recommendation. See DESIGN.md (shared with the project) for the architecture.
//!
//! Dependencies point one way: rec → train / infer → model → backend → kernels.

pub mod backend;
pub mod error;
pub mod hash;
pub mod infer;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod rec;
pub mod rng;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};

/// Keep freed host memory in the process for reuse instead of returning it to the kernel at
/// once: the CPU backend allocates and frees its activations (tens of MB: SmolLM2's logits are
/// 25 MB a 128-row chunk) every step, and with glibc's defaults each such buffer comes from a
/// fresh mmap or a regrown heap, so every page faults and is zeroed again (9% of a CPU training
/// step's time went to `clear_page`). Large blocks come from the heap and the heap is never
/// trimmed; the price is that the process keeps its peak of host memory until it exits. glibc
/// only, and skipped when GLIBC_TUNABLES sets malloc options (the user's choice wins). Returns
/// whether the settings took. The binaries call this first thing; an embedding runtime may too.
pub fn keep_freed_host_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            return false;
        }
        // SAFETY: mallopt only changes the allocator's thresholds, under its own arena lock.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Run `f` on a thread of rayon's global pool (the CPU backend's threads), built first with the
/// main thread's 8 MiB stacks if nothing built it yet. From a thread outside the pool every
/// parallel op hands its whole job to the pool and sleeps until it is done, a wake-up and a
/// sleep per op: decoding a token runs hundreds of small ops, and a quarter of `recforge
/// generate`'s CPU time went to the scheduler. On a pool thread an op runs its first part in
/// place and only the part another thread steals crosses threads. The binaries run their whole
/// command this way; an embedding runtime may wrap its calls into the CPU backend likewise.
pub fn on_cpu_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // An error means the global pool exists already (built by the embedder): use it as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    rayon::scope(|_| f())
}

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

/// Set by the first Ctrl-C (SIGINT) or SIGTERM (how a batch scheduler or `kill` asks a job to
/// stop) after [`stop_on_interrupt`]: long work checks it between units (a training update) and
/// stops cleanly, saving what it has.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The signal that set [`INTERRUPTED`].
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// What the first Ctrl-C prints (set by [`stop_on_interrupt_saying`]; a static string).
static INTERRUPT_MSG: std::sync::atomic::AtomicPtr<u8> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
static INTERRUPT_MSG_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Make the first Ctrl-C (or SIGTERM) a request to stop after the current unit of work (see
/// [`interrupted`]), and a second one end the process as usual. Training's wording.
pub fn stop_on_interrupt() {
    stop_on_interrupt_saying(
        "\ninterrupt: stopping after this update and saving (Ctrl-C again to abort)\n",
    );
}

/// [`stop_on_interrupt`], printing `message` on the first Ctrl-C or SIGTERM.
pub fn stop_on_interrupt_saying(message: &'static str) {
    use std::sync::atomic::Ordering::SeqCst;
    INTERRUPT_MSG_LEN.store(message.len(), SeqCst);
    INTERRUPT_MSG.store(message.as_ptr().cast_mut(), SeqCst);
    #[cfg(unix)]
    {
        extern "C" fn on_stop(sig: libc::c_int) {
            STOP_SIGNAL.store(sig, SeqCst);
            INTERRUPTED.store(true, SeqCst);
            let (msg, len) = (INTERRUPT_MSG.load(SeqCst), INTERRUPT_MSG_LEN.load(SeqCst));
            // SAFETY: write(2) and signal(2) are async-signal-safe; msg points to a static
            // string of len bytes (stored before the handler was installed).
            unsafe {
                if !msg.is_null() {
                    libc::write(2, msg.cast(), len);
                }
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
            }
        }
        // SAFETY: the handler only uses atomics and async-signal-safe functions.
        unsafe {
            for sig in [libc::SIGINT, libc::SIGTERM] {
                libc::signal(
                    sig,
                    on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t,
                );
            }
        }
    }
}

/// Whether a Ctrl-C or SIGTERM asked the work to stop (after [`stop_on_interrupt`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// The exit status of a process that stopped on [`interrupted`]: 128 + the signal, as a shell
/// reports a process the signal killed (130 for Ctrl-C, 143 for SIGTERM).
pub fn interrupt_exit_code() -> i32 {
    match STOP_SIGNAL.load(std::sync::atomic::Ordering::SeqCst) {
        0 => 130,
        sig => 128 + sig,
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod host_memory_tests {
    /// glibc takes both thresholds (it refuses values it cannot use by returning 0), unless the
    /// user's GLIBC_TUNABLES set malloc options.
    #[test]
    fn glibc_takes_the_allocator_settings() {
        let user = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."));
        assert_eq!(super::keep_freed_host_memory(), !user);
    }
}
