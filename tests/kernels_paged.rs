//! The paged KV cache end to end: the host allocator (`PagedKv`) hands out slots — with a shared
//! prompt prefix and copy-on-write — the `kv_write` kernel stores K/V there, and paged decode
//! attention must equal contiguous attention (`Cpu::attention`) on the same data, for sequences of
//! very different lengths in one batch. Simulator always; CUDA when a GPU is usable.

mod common;

use common::devices;
use half::bf16;
use recforge::backend::cpu::Cpu;
use recforge::backend::gpu::ops::paged::{kv_write, paged_decode, PagedShape};
use recforge::backend::gpu::Device;
use recforge::backend::{Backend, SeqSpan};
use recforge::infer::paged::PagedKv;
use recforge::rng::Rng;
use recforge::tensor::{DType, HostData, HostTensor};

#[test]
fn paged_decode_equals_contiguous_attention() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(51);
    let (heads, kvh, hd, bs) = (6usize, 2usize, 64usize, 16usize);
    let row = kvh * hd;
    for dev in devices() {
        let shape = PagedShape {
            num_blocks: 40,
            block_size: bs,
            kv_heads: kvh,
            head_dim: hd,
        };
        let mut kv = PagedKv::new(shape.num_blocks, bs).unwrap();
        let mut kc = dev.alloc_zeros::<bf16>(shape.slots() * row).unwrap();
        let mut vc = dev.alloc_zeros::<bf16>(shape.slots() * row).unwrap();
        // The host's view of every sequence's K/V rows, to build the contiguous reference.
        let mut host: Vec<(Vec<bf16>, Vec<bf16>)> = vec![];
        let write = |dev: &Device,
                     kv: &mut PagedKv,
                     id: u64,
                     n: usize,
                     kc: &mut recforge::backend::gpu::DevBuf<bf16>,
                     vc: &mut recforge::backend::gpu::DevBuf<bf16>,
                     rng: &mut Rng| {
            let (slots, copies) = kv.append(id, n).unwrap();
            for c in copies {
                let (s, d) = (c.src as usize * bs * row, c.dst as usize * bs * row);
                dev.copy_within(kc, s, d, bs * row).unwrap();
                dev.copy_within(vc, s, d, bs * row).unwrap();
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
                shape,
                kc,
                vc,
            )
            .unwrap();
            (k, v)
        };
        // A shared prompt of 21 tokens (one full block and a partial one), then three
        // continuations of very different lengths; plus an unrelated long sequence.
        kv.add_sequence(0).unwrap();
        let prefix = write(&dev, &mut kv, 0, 21, &mut kc, &mut vc, &mut rng);
        for (id, extra) in [(1u64, 1usize), (2, 40), (3, 0)] {
            kv.fork(0, id).unwrap();
            let (mut k, mut v) = prefix.clone();
            if extra > 0 {
                let (k2, v2) = write(&dev, &mut kv, id, extra, &mut kc, &mut vc, &mut rng);
                k.extend(k2);
                v.extend(v2);
            }
            host.push((k, v));
        }
        kv.add_sequence(9).unwrap();
        host.push(write(&dev, &mut kv, 9, 150, &mut kc, &mut vc, &mut rng));
        kv.check_invariants().unwrap();
        let ids = [1u64, 2, 3, 9];
        let max_blocks = ids
            .iter()
            .map(|&i| kv.block_table(i).unwrap().len())
            .max()
            .unwrap();
        let mut tables = vec![0i32; ids.len() * max_blocks];
        for (b, &i) in ids.iter().enumerate() {
            for (j, &blk) in kv.block_table(i).unwrap().iter().enumerate() {
                tables[b * max_blocks + j] = blk as i32;
            }
        }
        let lens: Vec<i32> = ids.iter().map(|&i| kv.len(i).unwrap() as i32).collect();
        let q: Vec<bf16> = (0..ids.len() * heads * hd)
            .map(|_| bf16::from_f32(rng.normal()))
            .collect();
        let mut out = dev.upload(&vec![bf16::NAN; q.len()]).unwrap();
        paged_decode(
            &dev,
            &dev.upload(&q).unwrap(),
            &kc,
            &vc,
            &dev.upload(&tables).unwrap(),
            &dev.upload(&lens).unwrap(),
            shape,
            heads,
            max_blocks,
            &mut out,
        )
        .unwrap();
        let got = dev.download(&out).unwrap();
        for (b, (k, v)) in host.iter().enumerate() {
            let len = lens[b] as usize;
            assert_eq!(k.len(), len * row);
            let f = |x: &[bf16]| x.iter().map(|y| y.to_f32()).collect::<Vec<f32>>();
            let up = |x: Vec<f32>, s: &[usize]| {
                cpu.upload(&HostTensor::f32(s.to_vec(), x).unwrap())
                    .unwrap()
            };
            let qb = f(&q[b * heads * hd..(b + 1) * heads * hd]);
            let pos = cpu
                .upload(
                    &HostTensor::new(vec![1], HostData::U32(vec![(len.max(1) - 1) as u32]))
                        .unwrap(),
                )
                .unwrap();
            let mut want = cpu.zeros(&[1, heads, hd], DType::F32).unwrap();
            let spans = [SeqSpan {
                q_start: 0,
                q_len: 1,
                kv_start: 0,
                kv_len: len,
            }];
            cpu.attention(
                &up(qb, &[1, heads, hd]),
                &up(f(k), &[len, kvh, hd]),
                &up(f(v), &[len, kvh, hd]),
                &pos,
                &spans,
                &mut want,
            )
            .unwrap();
            let want = cpu.download(&want).unwrap().to_f32().unwrap();
            for i in 0..heads * hd {
                // bf16 output (2^-8 relative) plus f32 softmax differences of ~1e-6.
                let g = got[b * heads * hd + i].to_f32();
                assert!(
                    (g - want[i]).abs() <= want[i].abs() / 256.0 + 1e-4,
                    "{}: sequence {b} (len {len}) [{i}]: {g} vs {}",
                    dev.name(),
                    want[i]
                );
            }
        }
    }
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
