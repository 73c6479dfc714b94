//! The paged KV cache, host side: fixed-size blocks from a free list, a block table per
//! sequence, reference counts so sequences forked from a common prompt prefix share its blocks,
//! copy-on-write when a shared block would be written, and the slot (block · block_size +
//! offset) of every new token for the kernel that writes K/V. Running out of blocks is a clear
//! error that leaves every sequence exactly as it was (the caller may preempt and retry).

use std::collections::HashMap;

use crate::error::{Error, Result};

pub type SeqId = u64;

/// A device copy the caller must perform before writing the new tokens: the whole block `src`
/// to block `dst` (copy-on-write of a shared, partially filled block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: u32,
    pub dst: u32,
}

#[derive(Clone, Debug, Default)]
struct SeqBlocks {
    blocks: Vec<u32>,
    len: usize,
}

#[derive(Debug)]
pub struct PagedKv {
    block_size: usize,
    free: Vec<u32>,
    refcount: Vec<u32>,
    seqs: HashMap<SeqId, SeqBlocks>,
}

impl PagedKv {
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self> {
        crate::model::llama::check_cache_size(num_blocks, block_size)?;
        // Pop from the end: hand out low block numbers first (easier to read in dumps).
        Ok(PagedKv {
            block_size,
            free: (0..num_blocks as u32).rev().collect(),
            refcount: vec![0; num_blocks],
            seqs: HashMap::new(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Start an empty sequence.
    pub fn add_sequence(&mut self, id: SeqId) -> Result<()> {
        if self.seqs.contains_key(&id) {
            return Err(Error::Invalid(format!(
                "paged KV: sequence {id} already exists"
            )));
        }
        self.seqs.insert(id, SeqBlocks::default());
        Ok(())
    }

    /// Start `child` as a copy of `parent` that shares all its blocks (a common prompt prefix
    /// computed once). Writing into a shared block later copies it first.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        if self.seqs.contains_key(&child) {
            return Err(Error::Invalid(format!(
                "paged KV: sequence {child} already exists"
            )));
        }
        let p = self
            .seqs
            .get(&parent)
            .ok_or_else(|| Error::Invalid(format!("paged KV: no sequence {parent}")))?
            .clone();
        for &b in &p.blocks {
            self.refcount[b as usize] += 1;
        }
        self.seqs.insert(child, p);
        Ok(())
    }

    /// Tokens stored for `id`.
    pub fn len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.len)
    }

    pub fn block_table(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.blocks.as_slice())
    }

    /// The block tables of `ids` as the paged attention takes them: `[ids.len(), max_blocks]`
    /// block numbers padded with 0, and max_blocks (at least 1).
    pub fn block_tables(&self, ids: &[SeqId]) -> Result<(Vec<i32>, usize)> {
        let tables: Vec<&[u32]> = ids
            .iter()
            .map(|&id| {
                self.block_table(id)
                    .ok_or_else(|| Error::Invalid(format!("paged KV: no sequence {id}")))
            })
            .collect::<Result<_>>()?;
        let mb = tables.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
        let mut flat = vec![0i32; ids.len() * mb];
        for (i, t) in tables.iter().enumerate() {
            for (j, &b) in t.iter().enumerate() {
                flat[i * mb + j] = b as i32;
            }
        }
        Ok((flat, mb))
    }

    /// Blocks `append(id, n)` would take from the free list now (None for an unknown sequence).
    pub fn blocks_for(&self, id: SeqId, n: usize) -> Option<usize> {
        self.seqs.get(&id).map(|s| self.blocks_needed(s, n))
    }

    /// Blocks `append(id, n)` would take from the free list.
    fn blocks_needed(&self, s: &SeqBlocks, n: usize) -> usize {
        let new_blocks = (s.len + n).div_ceil(self.block_size) - s.len.div_ceil(self.block_size);
        let cow = n > 0
            && !s.len.is_multiple_of(self.block_size)
            && s.blocks
                .last()
                .is_some_and(|&b| self.refcount[b as usize] > 1);
        new_blocks + cow as usize
    }

    /// Reserve slots for `n` new tokens of `id`: returns their slots and the block copies to do
    /// first. On failure (not enough free blocks) nothing changes.
    pub fn append(&mut self, id: SeqId, n: usize) -> Result<(Vec<u64>, Vec<BlockCopy>)> {
        let s = self
            .seqs
            .get(&id)
            .ok_or_else(|| Error::Invalid(format!("paged KV: no sequence {id}")))?;
        let need = self.blocks_needed(s, n);
        if need > self.free.len() {
            return Err(Error::Invalid(format!(
                "paged KV: sequence {id} needs {need} more blocks of {} tokens for {n} tokens, {} are free (of {}); free or preempt a sequence",
                self.block_size,
                self.free.len(),
                self.refcount.len()
            )));
        }
        let mut s = self.seqs.remove(&id).expect("checked above");
        let mut copies = vec![];
        if n > 0 && !s.len.is_multiple_of(self.block_size) {
            let last = *s.blocks.last().expect("a partial block exists");
            if self.refcount[last as usize] > 1 {
                let fresh = self.take();
                self.refcount[last as usize] -= 1;
                *s.blocks.last_mut().expect("non-empty") = fresh;
                copies.push(BlockCopy {
                    src: last,
                    dst: fresh,
                });
            }
        }
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n {
            if s.len.is_multiple_of(self.block_size) {
                let b = self.take();
                s.blocks.push(b);
            }
            let b = *s.blocks.last().expect("non-empty") as u64;
            slots.push(b * self.block_size as u64 + (s.len % self.block_size) as u64);
            s.len += 1;
        }
        self.seqs.insert(id, s);
        Ok((slots, copies))
    }

    fn take(&mut self) -> u32 {
        let b = self.free.pop().expect("capacity checked before mutating");
        debug_assert_eq!(self.refcount[b as usize], 0);
        self.refcount[b as usize] = 1;
        b
    }

    /// Drop a sequence, returning blocks no other sequence uses to the free list.
    pub fn free_sequence(&mut self, id: SeqId) -> Result<()> {
        let s = self
            .seqs
            .remove(&id)
            .ok_or_else(|| Error::Invalid(format!("paged KV: no sequence {id}")))?;
        for b in s.blocks {
            let rc = &mut self.refcount[b as usize];
            *rc -= 1;
            if *rc == 0 {
                self.free.push(b);
            }
        }
        Ok(())
    }

    /// Internal consistency (tests, debugging): every block is free xor referenced, and each
    /// reference count equals the number of block tables holding the block.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut count = vec![0u32; self.refcount.len()];
        for s in self.seqs.values() {
            if s.blocks.len() != s.len.div_ceil(self.block_size) {
                return Err(format!(
                    "a sequence of {} tokens holds {} blocks",
                    s.len,
                    s.blocks.len()
                ));
            }
            for &b in &s.blocks {
                count[b as usize] += 1;
            }
        }
        let mut is_free = vec![false; self.refcount.len()];
        for &b in &self.free {
            if std::mem::replace(&mut is_free[b as usize], true) {
                return Err(format!("block {b} is on the free list twice"));
            }
        }
        for b in 0..self.refcount.len() {
            if count[b] != self.refcount[b] {
                return Err(format!(
                    "block {b}: refcount {} but {} tables hold it",
                    self.refcount[b], count[b]
                ));
            }
            if is_free[b] == (count[b] > 0) {
                return Err(format!(
                    "block {b}: free = {}, held by {} tables",
                    is_free[b], count[b]
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn slots_follow_the_block_table() {
        let mut kv = PagedKv::new(8, 4).unwrap();
        kv.add_sequence(1).unwrap();
        let (slots, copies) = kv.append(1, 6).unwrap();
        assert!(copies.is_empty());
        let t = kv.block_table(1).unwrap().to_vec();
        assert_eq!(t.len(), 2);
        let want: Vec<u64> = (0..6)
            .map(|i| t[i / 4] as u64 * 4 + (i % 4) as u64)
            .collect();
        assert_eq!(slots, want);
        assert_eq!(kv.free_blocks(), 6);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn forked_prefixes_share_blocks_and_copy_on_write() {
        let mut kv = PagedKv::new(8, 4).unwrap();
        kv.add_sequence(0).unwrap();
        kv.append(0, 6).unwrap(); // one full block and one half block
        kv.fork(0, 1).unwrap();
        kv.fork(0, 2).unwrap();
        assert_eq!(kv.free_blocks(), 6, "forks take no blocks");
        let shared = kv.block_table(0).unwrap().to_vec();
        // Appending to a child copies the shared partial block, keeps the full one shared.
        let (slots, copies) = kv.append(1, 1).unwrap();
        let t1 = kv.block_table(1).unwrap().to_vec();
        assert_eq!(t1[0], shared[0], "the full prefix block stays shared");
        assert_ne!(t1[1], shared[1]);
        assert_eq!(
            copies,
            vec![BlockCopy {
                src: shared[1],
                dst: t1[1]
            }]
        );
        assert_eq!(slots, vec![t1[1] as u64 * 4 + 2]);
        // The parent still owns its partial block; a second child copies too.
        let (_, copies) = kv.append(2, 3).unwrap();
        assert_eq!(copies.len(), 1);
        // Now only the parent holds shared[1]: appending to it needs no copy.
        let (_, copies) = kv.append(0, 1).unwrap();
        assert!(copies.is_empty());
        kv.check_invariants().unwrap();
        for id in [0, 1, 2] {
            kv.free_sequence(id).unwrap();
        }
        assert_eq!(kv.free_blocks(), 8);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn running_out_of_blocks_changes_nothing() {
        let mut kv = PagedKv::new(3, 4).unwrap();
        kv.add_sequence(1).unwrap();
        kv.append(1, 10).unwrap();
        let before = (
            kv.block_table(1).unwrap().to_vec(),
            kv.len(1),
            kv.free_blocks(),
        );
        let e = kv.append(1, 3).unwrap_err().to_string();
        assert!(
            e.contains("needs 1 more blocks") && e.contains("0 are free"),
            "{e}"
        );
        assert_eq!(
            (
                kv.block_table(1).unwrap().to_vec(),
                kv.len(1),
                kv.free_blocks()
            ),
            before
        );
        // Copy-on-write counts against capacity too.
        let mut kv = PagedKv::new(2, 4).unwrap();
        kv.add_sequence(0).unwrap();
        kv.append(0, 5).unwrap();
        kv.fork(0, 1).unwrap();
        let e = kv.append(1, 1).unwrap_err().to_string();
        assert!(e.contains("needs 1 more"), "{e}");
        kv.check_invariants().unwrap();
        assert!(kv
            .append(7, 1)
            .unwrap_err()
            .to_string()
            .contains("no sequence 7"));
        assert!(kv
            .fork(0, 1)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
    }

    #[test]
    fn random_operations_keep_the_invariants() {
        let mut rng = Rng::new(5);
        let mut kv = PagedKv::new(40, 16).unwrap();
        let mut live: Vec<SeqId> = vec![];
        let mut next = 0;
        for _ in 0..3000 {
            match rng.below(10) {
                0 | 1 => {
                    kv.add_sequence(next).unwrap();
                    live.push(next);
                    next += 1;
                }
                2 if !live.is_empty() => {
                    let p = live[rng.below(live.len() as u64) as usize];
                    kv.fork(p, next).unwrap();
                    live.push(next);
                    next += 1;
                }
                3 if !live.is_empty() => {
                    let i = rng.below(live.len() as u64) as usize;
                    kv.free_sequence(live.swap_remove(i)).unwrap();
                }
                _ if !live.is_empty() => {
                    let id = live[rng.below(live.len() as u64) as usize];
                    let before = kv.len(id).unwrap();
                    let n = rng.below(40) as usize;
                    match kv.append(id, n) {
                        Ok((slots, _)) => {
                            assert_eq!(slots.len(), n);
                            assert_eq!(kv.len(id).unwrap(), before + n);
                            let t = kv.block_table(id).unwrap();
                            for (j, s) in slots.iter().enumerate() {
                                let pos = before + j;
                                assert_eq!(*s, t[pos / 16] as u64 * 16 + (pos % 16) as u64);
                            }
                        }
                        Err(_) => assert_eq!(kv.len(id).unwrap(), before),
                    }
                }
                _ => {}
            }
            kv.check_invariants().unwrap();
        }
    }
}
