//! Device memory accounting and the planned arena (DESIGN.md §4).
//!
//! Every buffer a `Device` hands out is counted here (bytes in use, the peak, how many
//! buffers, how many calls reached the device's own allocator), on CUDA and in the simulator
//! alike, so the memory plan can be compared with what a run really holds even on a machine
//! without a GPU.
//!
//! With an arena reserved (`Device::reserve_arena`, sized from the memory plan), the device
//! makes ONE allocation and every later buffer is carved out of it: a host-side best-fit free
//! list over the arena's byte range, blocks rounded to 256 bytes (cudaMalloc's alignment),
//! neighbours coalesced on free. No call reaches the driver after the reservation, so a
//! training step allocates nothing from the device. The simulator keeps the same books (the
//! same offsets, free list, peak and high-water) but gives every block its own guarded
//! mapping (`SimBuf`) instead of a slice of one allocation, so that a kernel running past a
//! block's end faults there rather than landing in the block's padding or its neighbour, which
//! on a GPU would pass unnoticed. A request the arena cannot serve is an
//! error that names the request and the arena's state: with an arena sized from the plan, that
//! means the plan undercounts the run, which is a bug to fix, never a reason to fall back
//! silently.

use std::collections::BTreeMap;
use std::sync::Mutex;

use cudarc::driver::CudaSlice;

use crate::error::{Error, Result};
use crate::memory::human;

/// Every block starts on this boundary and is a multiple of it, like cudaMalloc's.
pub const ALIGN: u64 = 256;

/// `bytes` rounded up to the block size (a zero-length buffer still takes one block, so every
/// buffer has its own address).
pub fn block_bytes(bytes: u64) -> u64 {
    bytes.max(1).div_ceil(ALIGN) * ALIGN
}

/// What a device's buffers hold, counted in 256-byte blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Bytes in live buffers.
    pub in_use: u64,
    /// The largest `in_use` since the device was opened or `reset_peak` was called.
    pub peak: u64,
    /// Buffers handed out so far (from the arena or from the device's allocator).
    pub buffers: u64,
    /// Calls that reached the device's own allocator (cuMemAllocAsync on CUDA, the host
    /// allocator in the simulator). Reserving an arena is one; nothing after it is.
    pub device_allocations: u64,
    /// The arena's size, when one is reserved.
    pub arena: Option<u64>,
    /// The furthest arena byte ever handed out, since the reservation or `reset_peak`: what the
    /// run needed of the arena with its fragmentation, ≥ `peak` whenever every buffer
    /// came from the arena.
    pub arena_high_water: u64,
}

/// The memory an arena's blocks point into; kept alive by every buffer carved from it.
pub(crate) enum Backing {
    Cuda(#[allow(dead_code)] CudaSlice<u8>),
    /// The simulator's arena is the accounting alone (offsets, free list, high-water): each
    /// block it hands out is its own guarded `SimBuf`, so a kernel that runs past a block's
    /// end faults there instead of landing silently in the block's padding or its neighbour,
    /// as it would on a GPU.
    SimAccounting,
}

struct Arena {
    /// Device address of byte 0 (0 in the simulator, whose blocks have their own mappings).
    base: u64,
    capacity: u64,
    /// Free ranges: offset → length, non-overlapping, never adjacent (coalesced).
    free: BTreeMap<u64, u64>,
    _backing: Backing,
}

impl Arena {
    /// The smallest free range that holds `bytes` (the lowest offset among equals): best fit
    /// keeps the large ranges whole for the large tensors of the next step.
    fn take(&mut self, bytes: u64) -> Option<u64> {
        let (&off, &len) = self
            .free
            .iter()
            .filter(|(_, &len)| len >= bytes)
            .min_by_key(|(&off, &len)| (len, off))?;
        self.free.remove(&off);
        if len > bytes {
            self.free.insert(off + bytes, len - bytes);
        }
        Some(off)
    }

    fn give_back(&mut self, off: u64, bytes: u64) {
        let (mut start, mut len) = (off, bytes);
        if let Some((&p_off, &p_len)) = self.free.range(..off).next_back() {
            if p_off + p_len == off {
                self.free.remove(&p_off);
                start = p_off;
                len += p_len;
            }
        }
        if let Some(&n_len) = self.free.get(&(off + bytes)) {
            self.free.remove(&(off + bytes));
            len += n_len;
        }
        self.free.insert(start, len);
    }

    fn free_total(&self) -> u64 {
        self.free.values().sum()
    }

    fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }
}

#[derive(Default)]
struct State {
    stats: MemStats,
    /// Buffers alive now.
    live: u64,
    arena: Option<Arena>,
}

/// One device's accounting (shared by the device and every buffer it handed out).
#[derive(Default)]
pub(crate) struct Memory {
    state: Mutex<State>,
}

/// Where a new buffer's memory comes from.
pub(crate) enum Source {
    /// A block of the arena: its address (base + offset; only an offset in the simulator) and
    /// offset.
    Arena { addr: u64, offset: u64 },
    /// No arena: the caller allocates from the device and the bytes are already counted.
    Device,
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain counters and a free list, updated in single steps: a panic while
        // holding the lock cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Account for a new buffer of `bytes` (already a multiple of ALIGN), taking it from the
    /// arena when there is one.
    pub(crate) fn acquire(&self, bytes: u64, what: &str) -> Result<Source> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let source = match &mut st.arena {
            Some(a) => match a.take(bytes) {
                Some(offset) => Source::Arena {
                    addr: a.base + offset,
                    offset,
                },
                None => {
                    let (cap, free, largest) = (a.capacity, a.free_total(), a.largest_free());
                    return Err(Error::Device(format!(
                        "device memory arena exhausted: {what} needs {} but the {} arena \
                         reserved from the memory plan has {} free (largest free block {}); \
                         {} in use, in {} live buffers. The plan undercounts this run: \
                         please report it with the command line (RECFORGE_ARENA=off runs \
                         without the arena)",
                        human(bytes),
                        human(cap),
                        human(free),
                        human(largest),
                        human(st.stats.in_use),
                        st.live,
                    )));
                }
            },
            None => {
                st.stats.device_allocations += 1;
                Source::Device
            }
        };
        st.live += 1;
        let s = &mut st.stats;
        s.in_use += bytes;
        s.peak = s.peak.max(s.in_use);
        s.buffers += 1;
        if let Source::Arena { offset, .. } = source {
            s.arena_high_water = s.arena_high_water.max(offset + bytes);
        }
        Ok(source)
    }

    /// A buffer of `bytes` is gone; `arena_offset` when it was an arena block.
    pub(crate) fn release(&self, arena_offset: Option<u64>, bytes: u64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.stats.in_use = st.stats.in_use.saturating_sub(bytes);
        st.live = st.live.saturating_sub(1);
        if let (Some(off), Some(a)) = (arena_offset, &mut st.arena) {
            a.give_back(off, bytes);
        }
    }

    /// Install an arena of `capacity` bytes at `base`, allocated by the caller. Refused when an
    /// arena exists already.
    pub(crate) fn install_arena(&self, base: u64, capacity: u64, backing: Backing) -> Result<()> {
        let mut st = self.lock();
        if let Some(a) = &st.arena {
            return Err(Error::Device(format!(
                "a {} arena is already reserved on this device",
                human(a.capacity)
            )));
        }
        let mut free = BTreeMap::new();
        free.insert(0, capacity);
        st.arena = Some(Arena {
            base,
            capacity,
            free,
            _backing: backing,
        });
        st.stats.device_allocations += 1;
        st.stats.arena = Some(capacity);
        st.stats.arena_high_water = 0;
        Ok(())
    }

    pub(crate) fn stats(&self) -> MemStats {
        self.lock().stats
    }

    /// Start a new peak (and arena high-water) measurement from what is held now.
    pub(crate) fn reset_peak(&self) {
        let mut st = self.lock();
        st.stats.peak = st.stats.in_use;
        let hw = st.arena.as_ref().map(|a| {
            // The end of the last allocated byte: capacity minus a free tail, if any.
            match a.free.iter().next_back() {
                Some((&off, &len)) if off + len == a.capacity => off,
                _ => a.capacity,
            }
        });
        st.stats.arena_high_water = hw.unwrap_or(0);
    }
}
