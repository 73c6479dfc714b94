//! Where a device's time goes: while profiling is on, every kernel launch, memset and copy of a
//! `Device` is timed and filed under its name (`bench-train --profile`). Off by default; when
//! off, an operation costs one relaxed atomic load more.
//!
//! On CUDA each operation is bracketed by two timing events on the device's one stream. While
//! work is queued ahead of it (the usual case inside a step) its time is what the GPU spent on
//! it, without the host's launch overhead or the gaps between operations (the profile's total
//! against the step's wall time shows those). When the GPU is idle as it is issued, the start
//! event fires at once and the span also holds the host's issue time (finding the function,
//! packing the arguments, the launch call, and a module's first load): read the times of small
//! kernels after a synchronizing copy with that in mind. In the simulator
//! the host's wall clock times each operation: the counts are exact, the times are the
//! simulator's, not a GPU's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cudarc::driver::{sys, CudaEvent};

use super::cuda::CudaDevice;
use crate::error::{Error, Result};

/// One name's share of a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's name, or "memset", "copy device→device", "copy host→device",
    /// "copy device→host".
    pub name: String,
    pub launches: u64,
    /// Summed over the launches, in milliseconds.
    pub ms: f64,
}

/// What ran between `Device::profile_start` and `Device::profile_stop`.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Most time first (ties by name).
    pub kernels: Vec<KernelTime>,
    /// How the times were taken: "CUDA events" or "simulator wall clock".
    pub timer: &'static str,
}

impl Profile {
    /// The summed time of every operation, in milliseconds.
    pub fn total_ms(&self) -> f64 {
        self.kernels.iter().map(|k| k.ms).sum()
    }

    pub fn launches(&self) -> u64 {
        self.kernels.iter().map(|k| k.launches).sum()
    }

    pub fn get(&self, name: &str) -> Option<&KernelTime> {
        self.kernels.iter().find(|k| k.name == name)
    }
}

enum Span {
    /// Start and end events, recorded around the operation on the device's stream.
    Cuda(CudaEvent, CudaEvent),
    /// Seconds of host wall clock (the simulator runs an operation before returning).
    Host(f64),
}

#[derive(Default)]
pub(crate) struct Profiler {
    on: AtomicBool,
    spans: Mutex<Vec<(String, Span)>>,
}

fn poisoned() -> Error {
    Error::Device("the profiler's record was poisoned by a panic".into())
}

impl Profiler {
    pub(crate) fn start(&self) -> Result<()> {
        self.spans.lock().map_err(|_| poisoned())?.clear();
        self.on.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Run `op` (which queues or runs one device operation), timing it under `name` while
    /// profiling is on. `cuda`: the device whose stream the operation goes to (None: the
    /// simulator).
    pub(crate) fn time<R>(
        &self,
        name: &str,
        cuda: Option<&CudaDevice>,
        op: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        if !self.on.load(Ordering::Relaxed) {
            return op();
        }
        let span_err = |e| Error::Device(format!("profiling '{name}': {e:?}"));
        let (r, span) = match cuda {
            Some(d) => {
                let ctx = d.stream().context();
                let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT); // with timing
                let start = ctx.new_event(flags).map_err(span_err)?;
                let end = ctx.new_event(flags).map_err(span_err)?;
                start.record(d.stream()).map_err(span_err)?;
                let r = op()?;
                end.record(d.stream()).map_err(span_err)?;
                (r, Span::Cuda(start, end))
            }
            None => {
                let t = Instant::now();
                let r = op()?;
                (r, Span::Host(t.elapsed().as_secs_f64()))
            }
        };
        self.spans
            .lock()
            .map_err(|_| poisoned())?
            .push((name.to_string(), span));
        Ok(r)
    }

    /// Turn profiling off and sum what was recorded by name. The caller synchronizes the
    /// device first (CUDA events are read here).
    pub(crate) fn stop(&self) -> Result<Profile> {
        self.on.store(false, Ordering::Relaxed);
        let spans = std::mem::take(&mut *self.spans.lock().map_err(|_| poisoned())?);
        let mut timer = "simulator wall clock";
        let mut kernels: Vec<KernelTime> = vec![];
        for (name, span) in spans {
            let ms = match span {
                Span::Cuda(s, e) => {
                    timer = "CUDA events";
                    s.elapsed_ms(&e).map_err(|e| {
                        Error::Device(format!("reading the time of '{name}': {e:?}"))
                    })? as f64
                }
                Span::Host(secs) => secs * 1e3,
            };
            match kernels.iter_mut().find(|k| k.name == name) {
                Some(k) => {
                    k.launches += 1;
                    k.ms += ms;
                }
                None => kernels.push(KernelTime {
                    name,
                    launches: 1,
                    ms,
                }),
            }
        }
        kernels.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        Ok(Profile { kernels, timer })
    }
}
