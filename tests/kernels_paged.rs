//! The paged KV cache end to end: the host allocator (`PagedKv`) hands out slots — with shared
//! prompt prefixes and copy-on-write — the `kv_write` kernel stores K/V there, and paged decode
//! attention (split into partitions of 512 keys along the context, then merged) must equal
//! contiguous attention (`Cpu::attention`) on the same data: contexts needing one, two and
//! several partitions, lengths that are not multiples of the block or partition size, very
//! different lengths in one batch, 1 and 3 query tokens per sequence, head_dim 64 / 96 / 128,
//! GQA and MHA, block sizes 16, 24 and 32. Simulator always; CUDA when a GPU is usable.

mod common;

use std::collections::HashMap;

use common::devices;
use half::bf16;
use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::ops::paged::{
    kv_gather, kv_write, paged_decode, paged_decode_scratch_len, DecodeBatch, PagedShape,
    PAGED_DECODE_PARTITION,
};
use recforge::backend::gpu::{DevBuf, Device};
use recforge::backend::{Backend, SeqSpan};
use recforge::infer::paged::PagedKv;
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

/// A paged cache on one device plus the host's copy of every sequence's K/V rows (to build the
/// contiguous reference).
struct Cache<'d> {
    dev: &'d Device,
    shape: PagedShape,
    kv: PagedKv,
    kc: DevBuf<bf16>,
    vc: DevBuf<bf16>,
    host: HashMap<u64, (Vec<bf16>, Vec<bf16>)>,
}

impl<'d> Cache<'d> {
    fn new(dev: &'d Device, shape: PagedShape) -> Self {
        let n = shape.slots() * shape.row();
        Cache {
            dev,
            shape,
            kv: PagedKv::new(shape.num_blocks, shape.block_size).unwrap(),
            // Poisoned: a key read from a slot nobody wrote makes the output NaN.
            kc: dev.upload(&vec![bf16::NAN; n]).unwrap(),
            vc: dev.upload(&vec![bf16::NAN; n]).unwrap(),
            host: HashMap::new(),
        }
    }

    fn add(&mut self, id: u64) {
        self.kv.add_sequence(id).unwrap();
        self.host.insert(id, (vec![], vec![]));
    }

    fn fork(&mut self, parent: u64, child: u64) {
        self.kv.fork(parent, child).unwrap();
        let h = self.host[&parent].clone();
        self.host.insert(child, h);
    }

    /// Append `n` random tokens to `id`: copy-on-write block copies first, then `kv_write`.
    fn append(&mut self, id: u64, n: usize, rng: &mut Rng) {
        let (dev, row, bs) = (self.dev, self.shape.row(), self.shape.block_size);
        let (slots, copies) = self.kv.append(id, n).unwrap();
        for c in copies {
            let (s, d) = (c.src as usize * bs * row, c.dst as usize * bs * row);
            dev.copy_within(&mut self.kc, s, d, bs * row).unwrap();
            dev.copy_within(&mut self.vc, s, d, bs * row).unwrap();
        }
        if n == 0 {
            return;
        }
        let slots: Vec<u32> = slots.iter().map(|&s| u32::try_from(s).unwrap()).collect();
        let k: Vec<bf16> = (0..n * row).map(|_| bf16::from_f32(rng.normal())).collect();
        let v: Vec<bf16> = (0..n * row).map(|_| bf16::from_f32(rng.normal())).collect();
        kv_write(
            dev,
            &dev.upload(&k).unwrap(),
            &dev.upload(&v).unwrap(),
            &dev.upload(&slots).unwrap(),
            &slots,
            self.shape,
            &mut self.kc,
            &mut self.vc,
        )
        .unwrap();
        let h = self.host.get_mut(&id).unwrap();
        h.0.extend(k);
        h.1.extend(v);
    }

    /// Fill sequences `ids` to `lens` in interleaved chunks of random size, so every sequence's
    /// blocks are scattered over the cache (not consecutive).
    fn fill(&mut self, ids: &[u64], lens: &[usize], rng: &mut Rng) {
        let mut have = vec![0usize; ids.len()];
        while have.iter().zip(lens).any(|(h, l)| h < l) {
            for (i, &id) in ids.iter().enumerate() {
                let n = (lens[i] - have[i]).min(1 + rng.below(90) as usize);
                if n > 0 {
                    self.append(id, n, rng);
                    have[i] += n;
                }
            }
        }
    }
}

/// Worst error seen, in units of the allowed tolerance (≤ 1 passes).
struct Check {
    worst: f32,
}

/// Paged decode of `ids` (each with `queries` new tokens at the end of its context) on the
/// cache's device against `Cpu::attention` over the same K/V stored contiguously.
fn check_decode(
    c: &Cache,
    ids: &[u64],
    heads: usize,
    queries: usize,
    rng: &mut Rng,
    what: &str,
) -> Check {
    let (dev, shape) = (c.dev, c.shape);
    let (kvh, hd) = (shape.kv_heads, shape.head_dim);
    let row = shape.row();
    c.kv.check_invariants().unwrap();
    let (tables, max_blocks) = c.kv.block_tables(ids).unwrap();
    let lens: Vec<i32> = ids.iter().map(|&i| c.kv.len(i).unwrap() as i32).collect();
    let per_seq = queries * heads * hd;
    let q: Vec<bf16> = (0..ids.len() * per_seq)
        .map(|_| bf16::from_f32(rng.normal()))
        .collect();
    // Output and scratch poisoned: an element the kernels do not write (or a partial the
    // reduction reads but nobody wrote) shows up as NaN.
    let mut out = dev.upload(&vec![bf16::NAN; q.len()]).unwrap();
    let max_len = lens.iter().copied().max().unwrap() as usize;
    let need = paged_decode_scratch_len(ids.len(), queries, heads, hd, max_len);
    let mut scratch = (need > 0).then(|| dev.upload(&vec![f32::NAN; need]).unwrap());
    let (tables_d, lens_d) = (dev.upload(&tables).unwrap(), dev.upload(&lens).unwrap());
    let batch = DecodeBatch {
        block_tables: &tables_d,
        max_blocks,
        context_lens: &lens_d,
        host_context_lens: &lens,
        queries,
    };
    paged_decode(
        dev,
        &dev.upload(&q).unwrap(),
        &c.kc,
        &c.vc,
        shape,
        heads,
        &batch,
        scratch.as_mut(),
        &mut out,
    )
    .unwrap();
    let got = dev.download(&out).unwrap();

    let cpu = Cpu::new();
    let f = |x: &[bf16]| x.iter().map(|y| y.to_f32()).collect::<Vec<f32>>();
    let up = |x: Vec<f32>, s: &[usize]| {
        cpu.upload(&HostTensor::f32(s.to_vec(), x).unwrap())
            .unwrap()
    };
    let mut check = Check { worst: 0.0 };
    for (b, &id) in ids.iter().enumerate() {
        let len = lens[b] as usize;
        assert!(len >= queries, "{what}: the test needs len ≥ queries");
        let (k, v) = &c.host[&id];
        assert_eq!(k.len(), len * row);
        let positions: Vec<u32> = (0..queries).map(|i| (len - queries + i) as u32).collect();
        let pos = cpu
            .upload(&HostTensor::new(vec![queries], HostData::U32(positions)).unwrap())
            .unwrap();
        let mut want = cpu.zeros(&[queries, heads, hd], DType::F32).unwrap();
        let spans = [SeqSpan {
            q_start: 0,
            q_len: queries,
            kv_start: 0,
            kv_len: len,
        }];
        cpu.attention(
            &up(f(&q[b * per_seq..(b + 1) * per_seq]), &[queries, heads, hd]),
            &up(f(k), &[len, kvh, hd]),
            &up(f(v), &[len, kvh, hd]),
            &pos,
            &spans,
            &mut want,
        )
        .unwrap();
        let want = cpu.download(&want).unwrap().to_f32().unwrap();
        for i in 0..per_seq {
            // Tolerance: the kernel computes in f32 and rounds once to bf16 — half an ulp, at most
            // 2^-8 of the value (bf16 keeps 8 significant bits); the reference is f32. The two
            // f32 results differ only by summation order (and 2^x for e^x): ~1e-6 relative to
            // the O(1) magnitudes of v. So: 2^-8 relative for the rounding plus 1e-4 absolute for
            // the f32 differences, which dominate only for outputs near zero. (Seen on the
            // simulator: all but a few dozen of ~81k outputs equal the reference rounded to
            // bf16; those differ by one ulp, where the two f32 results straddle a rounding
            // boundary.)
            let (g, w) = (got[b * per_seq + i].to_f32(), want[i]);
            let tol = w.abs() / 256.0 + 1e-4;
            let err = (g - w).abs();
            assert!(
                err <= tol,
                "{what} on {}: sequence {b} (len {len}) query {} head {} dim {}: {g} vs {w}",
                dev.name(),
                i / (heads * hd),
                i / hd % heads,
                i % hd
            );
            check.worst = check.worst.max(err / tol);
        }
    }
    check
}

struct Case {
    block_size: usize,
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    lens: Vec<usize>,
}

#[test]
fn paged_decode_equals_contiguous_attention_across_partitions() {
    assert_eq!(
        PAGED_DECODE_PARTITION, 512,
        "the lengths below are chosen around 512"
    );
    // Every combination of block size 16 / 32, head_dim 64 / 128, heads 6 on 2 KV heads (GQA)
    // / 4 on 4 (MHA) and 1 / 3 queries per sequence, each on one batch of very different
    // lengths: 1 key (3 with 3 queries), a partial block (17), 511 and 513 around one partition,
    // 1300 (three partitions, the last partial) — so sequences finished by the first kernel and
    // merged ones share a launch. 6/2 with 3 queries is 9 rows per KV head: two row chunks.
    let mut cases = vec![];
    for block_size in [16, 32] {
        for head_dim in [64, 128] {
            for (heads, kv_heads) in [(6, 2), (4, 4)] {
                for queries in [1, 3] {
                    let lens = [1, 17, 511, 513, 1300].map(|l: usize| l.max(queries));
                    cases.push(Case {
                        block_size,
                        head_dim,
                        heads,
                        kv_heads,
                        queries,
                        lens: lens.to_vec(),
                    });
                }
            }
        }
    }
    // Exact multiples of the partition (512, 1024) and one past (1025).
    cases.push(Case {
        block_size: 32,
        head_dim: 64,
        heads: 4,
        kv_heads: 4,
        queries: 1,
        lens: vec![512, 1024, 1025, 40],
    });
    // A block size that is not a power of two, head_dim 96 (lanes without a piece) and 32,
    // 8 query heads on one KV head, 2 queries (16 rows: two full row chunks).
    cases.push(Case {
        block_size: 24,
        head_dim: 96,
        heads: 8,
        kv_heads: 1,
        queries: 2,
        lens: vec![100, 700],
    });
    // A chunk of a long prefill: 20 queries (40 rows per KV head: five row chunks), blocks of
    // 4, head_dim 64 and 32.
    for head_dim in [64, 32] {
        cases.push(Case {
            block_size: 4,
            head_dim,
            heads: 4,
            kv_heads: 2,
            queries: 20,
            lens: vec![33, 53],
        });
    }
    cases.push(Case {
        block_size: 5,
        head_dim: 32,
        heads: 2,
        kv_heads: 1,
        queries: 1,
        lens: vec![2, 1100],
    });
    let mut rng = Rng::new(51);
    for dev in devices() {
        for c in &cases {
            let blocks: usize = c.lens.iter().map(|l| l.div_ceil(c.block_size)).sum();
            let shape = PagedShape {
                num_blocks: blocks + 3,
                block_size: c.block_size,
                kv_heads: c.kv_heads,
                head_dim: c.head_dim,
            };
            let mut cache = Cache::new(&dev, shape);
            let ids: Vec<u64> = (0..c.lens.len() as u64).collect();
            for &id in &ids {
                cache.add(id);
            }
            cache.fill(&ids, &c.lens, &mut rng);
            let what = format!(
                "block {} hd {} heads {}/{} queries {} lens {:?}",
                c.block_size, c.head_dim, c.heads, c.kv_heads, c.queries, c.lens
            );
            let r = check_decode(&cache, &ids, c.heads, c.queries, &mut rng, &what);
            eprintln!("{what}: worst error {:.3} of the tolerance", r.worst);
        }
    }
}

#[test]
fn paged_decode_reads_shared_prefixes_and_copied_blocks() {
    let mut rng = Rng::new(52);
    let shape = PagedShape {
        num_blocks: 200,
        block_size: 16,
        kv_heads: 2,
        head_dim: 64,
    };
    for dev in devices() {
        let mut cache = Cache::new(&dev, shape);
        // A shared prompt of 530 tokens: one full partition plus 18 keys, ending in a partial
        // block that each continuation copies on write. Continuations of 1, 40, 0 and 600
        // tokens (lengths 531, 570, 530, 1130), plus an unrelated short sequence.
        cache.add(0);
        cache.fill(&[0], &[530], &mut rng);
        for (id, extra) in [(1u64, 1usize), (2, 40), (3, 0), (4, 600)] {
            cache.fork(0, id);
            cache.append(id, extra, &mut rng);
        }
        cache.add(9);
        cache.fill(&[9], &[150], &mut rng);
        let t = |id| cache.kv.block_table(id).unwrap().to_vec();
        assert_eq!(t(1)[..33], t(0)[..33], "the full prefix blocks stay shared");
        assert_ne!(t(1)[33], t(0)[33], "the partial block was copied");
        assert_eq!(t(3), t(0), "a fork without new tokens shares everything");
        for queries in [1, 3] {
            let what = format!("shared prefix, {queries} queries");
            let r = check_decode(&cache, &[1, 2, 3, 4, 9], 6, queries, &mut rng, &what);
            eprintln!("{what}: worst error {:.3} of the tolerance", r.worst);
        }
    }
}

#[test]
fn paged_decode_gives_zeros_for_an_empty_context() {
    let mut rng = Rng::new(53);
    let shape = PagedShape {
        num_blocks: 4,
        block_size: 16,
        kv_heads: 1,
        head_dim: 32,
    };
    for dev in devices() {
        let mut cache = Cache::new(&dev, shape);
        cache.add(0);
        cache.add(1);
        cache.fill(&[1], &[20], &mut rng);
        let lens = [0i32, 20];
        let tables: Vec<i32> = [
            [0, 0],
            [
                cache.kv.block_table(1).unwrap()[0] as i32,
                cache.kv.block_table(1).unwrap()[1] as i32,
            ],
        ]
        .concat();
        let q: Vec<bf16> = (0..2 * 2 * 32)
            .map(|_| bf16::from_f32(rng.normal()))
            .collect();
        let mut out = dev.upload(&vec![bf16::NAN; q.len()]).unwrap();
        let (tables_d, lens_d) = (dev.upload(&tables).unwrap(), dev.upload(&lens).unwrap());
        let batch = DecodeBatch {
            block_tables: &tables_d,
            max_blocks: 2,
            context_lens: &lens_d,
            host_context_lens: &lens,
            queries: 1,
        };
        paged_decode(
            &dev,
            &dev.upload(&q).unwrap(),
            &cache.kc,
            &cache.vc,
            shape,
            2,
            &batch,
            None,
            &mut out,
        )
        .unwrap();
        let got = dev.download(&out).unwrap();
        assert!(
            got[..64].iter().all(|x| x.to_f32() == 0.0),
            "{:?}",
            &got[..64]
        );
        assert!(got[64..].iter().all(|x| x.is_finite() && x.to_f32() != 0.0));
    }
}

#[test]
fn paged_decode_rejects_bad_shapes_lengths_and_scratch() {
    let dev = Device::sim();
    let shape = PagedShape {
        num_blocks: 80,
        block_size: 16,
        kv_heads: 2,
        head_dim: 64,
    };
    let n = shape.slots() * shape.row();
    let (kc, vc) = (
        dev.alloc_zeros::<bf16>(n).unwrap(),
        dev.alloc_zeros::<bf16>(n).unwrap(),
    );
    let tables = dev.upload(&(0..80).collect::<Vec<i32>>()).unwrap();
    let run =
        |shape: PagedShape, heads: usize, queries: usize, len: i32, scratch: Option<usize>| {
            let lens = [len];
            let lens_d = dev.upload(&lens).unwrap();
            let batch = DecodeBatch {
                block_tables: &tables,
                max_blocks: 80,
                context_lens: &lens_d,
                host_context_lens: &lens,
                queries,
            };
            let qn = queries * heads * shape.head_dim;
            let mut out = dev.alloc_zeros::<bf16>(qn).unwrap();
            let mut s = scratch.map(|n| dev.alloc_zeros::<f32>(n).unwrap());
            paged_decode(
                &dev,
                &dev.alloc_zeros(qn).unwrap(),
                &kc,
                &vc,
                shape,
                heads,
                &batch,
                s.as_mut(),
                &mut out,
            )
            .map_err(|e| e.to_string())
        };
    let need = paged_decode_scratch_len(1, 1, 4, 64, 1280);
    assert_eq!(need, 4 * 3 * 66);
    assert_eq!(
        paged_decode_scratch_len(7, 3, 4, 64, 512),
        0,
        "one partition needs none"
    );
    run(shape, 4, 1, 1280, Some(need)).unwrap();
    run(shape, 4, 1, 512, None).unwrap();
    let e = run(shape, 4, 1, 1280, Some(need - 1)).unwrap_err();
    assert!(
        e.contains("scratch") && e.contains(&need.to_string()),
        "{e}"
    );
    let e = run(shape, 4, 1, 1280, None).unwrap_err();
    assert!(e.contains("scratch of 0"), "{e}");
    let e = run(shape, 4, 1, 80 * 16 + 1, Some(1 << 20)).unwrap_err();
    assert!(e.contains("context length 1281"), "{e}");
    let e = run(shape, 4, 1, -1, None).unwrap_err();
    assert!(e.contains("context length -1"), "{e}");
    let e = run(shape, 5, 1, 10, None).unwrap_err();
    assert!(e.contains("heads 5"), "{e}");
    let e = run(shape, 4, 0, 10, None).unwrap_err();
    assert!(e.contains("queries per sequence 0"), "{e}");
    let bad_hd = PagedShape {
        head_dim: 48,
        ..shape
    };
    let e = run(bad_hd, 4, 1, 10, None).unwrap_err();
    assert!(e.contains("head_dim 48"), "{e}");
}

#[test]
fn kv_write_rejects_slots_outside_the_cache() {
    let dev = Device::sim();
    let shape = PagedShape {
        num_blocks: 2,
        block_size: 4,
        kv_heads: 1,
        head_dim: 32,
    };
    let z = |n: usize| dev.upload(&vec![bf16::ZERO; n]).unwrap();
    let (mut kc, mut vc) = (z(8 * 32), z(8 * 32));
    let e = kv_write(
        &dev,
        &z(32),
        &z(32),
        &dev.upload(&[8u32]).unwrap(),
        &[8],
        shape,
        &mut kc,
        &mut vc,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("slot 8"), "{e}");
}

/// `kv_gather` reads every sequence's rows back in order through its block table — shared
/// prefix blocks, copied blocks, scattered blocks — bit for bit what was written, with rows of
/// 16-byte pieces (64 × 2) and of odd sizes (3 × 5: the scalar path). Outputs poisoned first.
#[test]
fn kv_gather_reads_back_what_was_written() {
    let mut rng = Rng::new(53);
    for (kv_heads, head_dim) in [(2, 64), (3, 5)] {
        let shape = PagedShape {
            num_blocks: 60,
            block_size: 8,
            kv_heads,
            head_dim,
        };
        for dev in devices() {
            let mut cache = Cache::new(&dev, shape);
            cache.add(0);
            cache.fill(&[0], &[45], &mut rng);
            cache.fork(0, 1);
            cache.append(1, 30, &mut rng);
            cache.add(2);
            cache.fill(&[2, 0], &[77, 100], &mut rng);
            for id in [0u64, 1, 2] {
                let bs = shape.block_size;
                let slots: Vec<u32> = (0..cache.kv.len(id).unwrap())
                    .map(|j| {
                        (cache.kv.block_table(id).unwrap()[j / bs] as usize * bs + j % bs) as u32
                    })
                    .collect();
                let n = slots.len() * shape.row();
                let (mut k, mut v) = (
                    dev.upload(&vec![bf16::NAN; n]).unwrap(),
                    dev.upload(&vec![bf16::NAN; n]).unwrap(),
                );
                kv_gather(
                    &dev,
                    &cache.kc,
                    &cache.vc,
                    &dev.upload(&slots).unwrap(),
                    &slots,
                    shape,
                    &mut k,
                    &mut v,
                )
                .unwrap();
                let bits = |x: &[bf16]| x.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
                let (hk, hv) = &cache.host[&id];
                let what = format!("{}, {kv_heads} × {head_dim}, sequence {id}", dev.name());
                assert_eq!(bits(&dev.download(&k).unwrap()), bits(hk), "{what}: K");
                assert_eq!(bits(&dev.download(&v).unwrap()), bits(hv), "{what}: V");
            }
        }
    }
}

#[test]
fn kv_gather_rejects_slots_outside_the_cache_and_wrong_sizes() {
    let dev = Device::sim();
    let shape = PagedShape {
        num_blocks: 2,
        block_size: 4,
        kv_heads: 1,
        head_dim: 32,
    };
    let z = |n: usize| dev.upload(&vec![bf16::ZERO; n]).unwrap();
    let (kc, vc) = (z(8 * 32), z(8 * 32));
    let (mut k, mut v) = (z(32), z(32));
    let e = kv_gather(
        &dev,
        &kc,
        &vc,
        &dev.upload(&[8u32]).unwrap(),
        &[8],
        shape,
        &mut k,
        &mut v,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("kv_gather_bf16") && e.contains("slot 8"), "{e}");
    let mut short = z(31);
    let e = kv_gather(
        &dev,
        &kc,
        &vc,
        &dev.upload(&[1u32]).unwrap(),
        &[1],
        shape,
        &mut short,
        &mut v,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("kv_gather_bf16: k 31"), "{e}");
}
