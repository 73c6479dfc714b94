//! The device layer's memory accounting and the arena a planned run is carved from
//! (`backend::gpu::arena`): best-fit blocks, coalescing, zeroed reuse, clear exhaustion, exact
//! counters, and kernels that compute the same bits on arena buffers as on their own
//! allocations. Runs on the simulator, and on CUDA when a GPU is usable.

mod common;

use recforge::backend::gpu::backend::Gpu;
use recforge::backend::gpu::device::DevElem;
use recforge::backend::gpu::{Arg, DevBuf, Device, Launch};
use recforge::backend::Backend;
use recforge::memory::{self, TrainSetup};
use recforge::model::lora::parse_targets;
use recforge::model::random::random_llama;
use recforge::rng::Rng;
use recforge::train::step::HEAD_CHUNK;
use recforge::train::{Example, TrainConfig, Trainer};

/// The simulator schedules blocks on RF_SIM_THREADS OS threads (read once, at the first
/// launch); f32 atomics (attention backward) then sum in a scheduling-dependent order. One
/// thread makes a run reproducible bit for bit, which the comparison below needs. Every test
/// here calls this first, so no launch can precede it.
fn deterministic_sim() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("RF_SIM_THREADS", "1"));
}

fn fresh(like: &Device) -> Device {
    if like.is_sim() {
        Device::sim()
    } else {
        Device::cuda(0).expect("the GPU opened before opens again")
    }
}

fn addr(a: Arg) -> u64 {
    match a {
        Arg::Ptr(p) => p,
        other => panic!("not a pointer: {other:?}"),
    }
}

/// Where `b` lies in the device's arena. On CUDA its address must say the same; in the
/// simulator each block is a guarded mapping of its own.
fn offset<T: DevElem>(dev: &Device, base: u64, b: &DevBuf<T>) -> u64 {
    let off = b.arena_offset().expect("an arena block");
    if !dev.is_sim() {
        assert_eq!(
            addr(dev.ptr(b).unwrap()),
            base + off,
            "address = base + offset"
        );
    }
    off
}

#[test]
fn blocks_are_best_fit_coalesced_and_counted() {
    deterministic_sim();
    for d in common::devices() {
        let dev = fresh(&d);
        dev.reserve_arena(4096).unwrap();
        let s0 = dev.memory_stats();
        assert_eq!(s0.arena, Some(4096));
        assert_eq!((s0.in_use, s0.device_allocations), (0, 1));

        // Three 1 KiB buffers fill the first 3 KiB in order; a 1-byte one takes a 256-byte block.
        let a = dev.alloc_zeros::<f32>(256).unwrap();
        let b = dev.alloc_zeros::<f32>(256).unwrap();
        let c = dev.alloc_zeros::<f32>(256).unwrap();
        let tiny = dev.alloc_zeros::<u8>(1).unwrap();
        let base = addr(dev.ptr(&a).unwrap());
        assert_eq!(offset(&dev, base, &a), 0);
        assert_eq!(offset(&dev, base, &b), 1024);
        assert_eq!(offset(&dev, base, &c), 2048);
        assert_eq!(offset(&dev, base, &tiny), 3072);
        let s = dev.memory_stats();
        assert_eq!((s.in_use, s.peak, s.buffers), (3328, 3328, 4));
        assert_eq!(s.arena_high_water, 3328);
        assert_eq!(s.device_allocations, 1, "no driver call after the arena");

        // Free b: two holes, b's 1 KiB at 1024 and the 768-byte tail at 3328. A 512-byte
        // request takes the smallest that fits (the tail); a 1 KiB one then takes b's hole.
        drop(b);
        let half = dev.alloc_zeros::<f32>(128).unwrap();
        assert_eq!(offset(&dev, base, &half), 3328);
        let b2 = dev.alloc_zeros::<f32>(256).unwrap();
        assert_eq!(offset(&dev, base, &b2), 1024);

        // Full (256 bytes left): a 1 KiB request is an error that names the sizes.
        let e = dev
            .alloc_zeros::<f32>(256)
            .err()
            .expect("the arena is full");
        let msg = e.to_string();
        assert!(
            msg.contains("arena exhausted")
                && msg.contains("1.0 KiB")
                && msg.contains("256 B free")
                && msg.contains("4.0 KiB arena"),
            "{msg}"
        );
        // A failed request changes nothing.
        assert_eq!(dev.memory_stats().in_use, 3840);

        // Everything back: the neighbours coalesce into one 4 KiB block again.
        drop((a, b2, c, tiny, half));
        assert_eq!(dev.memory_stats().in_use, 0);
        let all = dev.alloc_zeros::<u8>(4096).unwrap();
        assert_eq!(offset(&dev, base, &all), 0);
        drop(all);

        // reset_peak starts from what is held now.
        let keep = dev.alloc_zeros::<f32>(64).unwrap();
        dev.reset_peak();
        let s = dev.memory_stats();
        assert_eq!((s.peak, s.in_use), (256, 256));
        assert_eq!(s.arena_high_water, 256);
        drop(keep);

        // One arena per device.
        let e = dev.reserve_arena(1024).unwrap_err().to_string();
        assert!(e.contains("already reserved"), "{e}");
    }
}

#[test]
fn reused_blocks_come_back_zeroed_and_every_copy_works() {
    deterministic_sim();
    for d in common::devices() {
        let dev = fresh(&d);
        dev.reserve_arena(1 << 16).unwrap();
        let poison: Vec<f32> = (0..1000).map(|i| f32::NAN + i as f32).collect();
        let p = dev.upload(&poison).unwrap();
        let base = addr(dev.ptr(&p).unwrap());
        let first = offset(&dev, base, &p);
        drop(p);
        // The same block again: alloc_zeros must clear the poison (on CUDA; in the simulator
        // the block is a fresh mapping).
        let z = dev.alloc_zeros::<f32>(1000).unwrap();
        assert_eq!(offset(&dev, base, &z), first);
        assert!(dev.download(&z).unwrap().iter().all(|&x| x == 0.0));

        // upload / write / download / copy / copy_within / fill_zero on arena buffers.
        let vals: Vec<u32> = (0..777).map(|i| i * 3 + 1).collect();
        let src = dev.upload(&vals).unwrap();
        assert_eq!(dev.download(&src).unwrap(), vals);
        let mut dst = dev.alloc_zeros::<u32>(900).unwrap();
        dev.copy(&src, 5, &mut dst, 100, 700).unwrap();
        let got = dev.download(&dst).unwrap();
        assert_eq!(&got[100..800], &vals[5..705]);
        assert!(got[..100].iter().chain(&got[800..]).all(|&x| x == 0));
        dev.copy_within(&mut dst, 100, 0, 50).unwrap();
        assert_eq!(&dev.download(&dst).unwrap()[..50], &vals[5..55]);
        let more: Vec<u32> = (0..900).rev().collect();
        dev.write(&mut dst, &more).unwrap();
        assert_eq!(dev.download(&dst).unwrap(), more);
        dev.fill_zero(&mut dst).unwrap();
        assert!(dev.download(&dst).unwrap().iter().all(|&x| x == 0));
        // Bad ranges are still refused.
        assert!(dev.copy(&src, 700, &mut dst, 0, 100).is_err());
        assert!(dev.copy_within(&mut dst, 0, 10, 20).is_err());

        // A buffer is refused by another device, arena or not.
        let other = fresh(&d);
        assert!(other.download(&src).is_err());
        assert!(other.ptr(&src).is_err());
        let own = other.alloc_zeros::<u32>(4).unwrap();
        assert!(dev.download(&own).is_err());
    }
}

#[test]
fn without_an_arena_every_buffer_is_a_device_allocation_and_is_counted() {
    deterministic_sim();
    for d in common::devices() {
        let dev = fresh(&d);
        let a = dev.alloc_zeros::<f32>(10).unwrap(); // 40 bytes: one 256-byte block
        let b = dev.upload(&vec![1u8; 300]).unwrap(); // 300 bytes: two blocks
        let s = dev.memory_stats();
        assert_eq!((s.in_use, s.peak, s.buffers), (768, 768, 2));
        assert_eq!((s.device_allocations, s.arena), (2, None));
        drop(a);
        let s = dev.memory_stats();
        assert_eq!((s.in_use, s.peak), (512, 768));
        drop(b);
        assert_eq!(dev.memory_stats().in_use, 0);
    }
}

#[test]
fn empty_buffers_work_with_and_without_an_arena() {
    // The CUDA driver refuses 0-byte allocations; an empty batch or no outlier columns must
    // still give a usable empty buffer, as the simulator and the arena do.
    deterministic_sim();
    for d in common::devices() {
        for arena in [false, true] {
            let dev = fresh(&d);
            if arena {
                dev.reserve_arena(4096).unwrap();
            }
            let mut z = dev.alloc_zeros::<f32>(0).unwrap();
            let u = dev.upload::<i8>(&[]).unwrap();
            assert!(z.is_empty() && u.is_empty());
            dev.fill_zero(&mut z).unwrap();
            dev.write(&mut z, &[]).unwrap();
            assert_eq!(
                dev.download(&z).unwrap(),
                Vec::<f32>::new(),
                "{}",
                dev.name()
            );
            assert_eq!(
                dev.download(&u).unwrap(),
                Vec::<i8>::new(),
                "{}",
                dev.name()
            );
            // An empty buffer still counts one block, so the plan's accounting stays exact.
            assert_eq!(
                dev.memory_stats().in_use,
                512,
                "{} arena {arena}",
                dev.name()
            );
        }
    }
}

#[test]
fn training_in_an_arena_is_bit_identical_to_training_without_one() {
    deterministic_sim();
    let mut model_cfg = memory::named_shape("smollm2-135m").unwrap();
    model_cfg.num_hidden_layers = 2;
    model_cfg.vocab_size = 500;
    model_cfg.bos_token_id = None;
    model_cfg.eos_token_ids = vec![];
    let (batch, seq, r) = (2, 24, 4);
    let plan = memory::plan_training(&TrainSetup {
        model: model_cfg.clone(),
        batch,
        seq,
        lora_rank: r,
        targets: vec!["q".into(), "v".into(), "down".into()],
        checkpointing: memory::Checkpointing::All,
        logits_chunk: HEAD_CHUNK,
        budget: 24 * memory::GIB,
    })
    .unwrap();
    let mut rng = Rng::new(5);
    let data: Vec<Example> = (0..2 * batch)
        .map(|_| {
            let ids: Vec<u32> = (0..seq).map(|_| rng.below(500) as u32).collect();
            Example::language_model(ids).unwrap()
        })
        .collect();
    for d in common::devices() {
        let run = |arena: bool| {
            let be = Gpu::new(fresh(&d));
            if arena {
                be.reserve_arena(plan.total()).unwrap();
            }
            let model = random_llama(&be, &model_cfg, 3).unwrap();
            let mut cfg = TrainConfig::preset("tallrec").unwrap();
            cfg.lora.r = r;
            cfg.lora.targets = parse_targets("q,v,down").unwrap();
            cfg.batch_size = batch;
            cfg.grad_accum = 2;
            cfg.cutoff = seq;
            cfg.steps = 2;
            cfg.lr = 1e-3;
            let mut tr = Trainer::new(&be, &model, cfg, data.clone(), "arena").unwrap();
            let losses: Vec<f64> = (0..2).map(|_| tr.step().unwrap().loss).collect();
            let st = be.memory_stats().unwrap();
            let weights: Vec<Vec<f32>> = tr
                .adapter
                .to_host(&be)
                .unwrap()
                .layers
                .values()
                .flat_map(|p| [p.a.clone(), p.b.clone()])
                .collect();
            (losses, weights, st)
        };
        let (l1, w1, s1) = run(false);
        let (l2, w2, s2) = run(true);
        if d.is_sim() {
            assert_eq!(l1, l2, "{}", d.name());
            assert!(w1 == w2, "{}: the adapters differ", d.name());
        } else {
            // On a GPU the attention backward's f32 atomics sum in a different order on every
            // run, so only the first forward pass (no atomics) is reproducible bit for bit.
            assert_eq!(l1[0], l2[0], "{}", d.name());
            eprintln!(
                "{}: first-step loss identical with and without the arena; later steps not \
                 compared bit for bit (f32 atomics)",
                d.name()
            );
        }
        // The same buffers either way; without the arena each one was a device allocation.
        assert_eq!((s1.peak, s1.buffers), (s2.peak, s2.buffers));
        assert_eq!(s1.device_allocations, s1.buffers);
        assert_eq!((s2.device_allocations, s1.arena), (1, None));
    }
}

/// The device's profiler files every launch, memset and copy under its name while it is on,
/// and nothing before or after; each start begins a fresh record. On CUDA the times come from
/// events on the stream, in the simulator from the host's clock.
#[test]
fn the_profiler_counts_each_operation_under_its_name() {
    deterministic_sim();
    for dev in common::devices() {
        let mut a = dev.alloc_zeros::<u32>(1000).unwrap();
        let mut b = dev.alloc_zeros::<u32>(1000).unwrap();
        let zero = |dev: &Device, buf: &mut DevBuf<u32>| {
            let p = dev.ptr_mut(buf).unwrap();
            dev.launch("zero_u32", Launch::linear(4, 256), &[p, Arg::I32(1000)])
                .unwrap();
        };
        zero(&dev, &mut a); // before profiling: not counted
        dev.profile_start().unwrap();
        for _ in 0..3 {
            zero(&dev, &mut a);
        }
        dev.fill_zero(&mut b).unwrap();
        dev.copy(&a, 0, &mut b, 10, 100).unwrap();
        dev.copy_within(&mut b, 0, 500, 100).unwrap();
        dev.write(&mut a, &[7u32; 1000]).unwrap();
        assert_eq!(dev.download(&a).unwrap()[999], 7);
        let p = dev.profile_stop().unwrap();
        zero(&dev, &mut a); // after: not counted
        let n = |name: &str| p.get(name).map(|k| k.launches).unwrap_or(0);
        assert_eq!(n("zero_u32"), 3, "{p:?}");
        assert_eq!(n("memset"), 1, "{p:?}");
        assert_eq!(n("copy device→device"), 2, "{p:?}");
        assert_eq!(n("copy host→device"), 1, "{p:?}");
        assert_eq!(n("copy device→host"), 1, "{p:?}");
        assert_eq!(p.launches(), 8, "{p:?}");
        assert!(p.kernels.iter().all(|k| k.ms >= 0.0), "{p:?}");
        assert_eq!(
            p.timer,
            if dev.is_sim() {
                "simulator wall clock"
            } else {
                "CUDA events"
            }
        );
        dev.profile_start().unwrap();
        let p = dev.profile_stop().unwrap();
        assert!(
            p.kernels.is_empty(),
            "a new start forgets the last record: {p:?}"
        );
    }
}
