//! Batched generation over the paged KV cache: many prompts decoded together, one forward per
//! step for every running sequence (the linears read their weights once for the whole batch),
//! continuous admission as sequences finish, a prefix common to every prompt computed once and
//! its blocks shared (TALLRec and ranking prompts share a long instruction), and preemption by
//! recomputation when the cache runs out of blocks.
//!
//! Each request keeps its own sampling parameters and its own seeded generator, drawing one
//! uniform number per token exactly as [`generate`](super::generate::generate) does, so a
//! request's tokens do not depend on what else is in the batch: on the CPU reference they are
//! the tokens `generate` gives for it alone (`tests/batch_generate.rs`) — with the LLM.int8
//! decomposition off, since its outlier columns are chosen over the rows of a batch. On a GPU
//! the paged and contiguous attention kernels also round differently.
//!
//! A step is one of two kinds:
//! - a prefill of the sequences admitted together, as many as fit `max_prefill_tokens` (or a
//!   chunk of that many tokens of one longer sequence, after the chunks before it): each one's
//!   tokens not yet in the cache (the whole prompt, or what follows the
//!   shared prefix, or — after a preemption — the prompt and what it had generated) as one
//!   forward, so the linears see all their rows at once; with nothing cached before them,
//!   flash attention over the step's own K/V, else attention through the block tables (the
//!   same number of at most `GATHER_ABOVE_QUERIES` tokens for each sequence:
//!   `Backend::paged_attention` with that many queries; otherwise the flash attention over
//!   their K/V gathered from the blocks);
//! - a decode step of every running sequence: one token each, `Backend::paged_attention` with
//!   one query per sequence, and one `Backend::sample` over the batch's logits.

use std::collections::VecDeque;
use std::time::Instant;

use super::generate::{GenerateOptions, Generation, StopReason};
use super::paged::{PagedKv, SeqId};
use crate::backend::{Backend, SeqSpan};
use crate::error::{Error, Result};
use crate::model::llama::AdapterView;
use crate::model::lora::{gate_rows, RankBlock};
use crate::model::{CachedAttention, Llama, PagedAttention, PagedCache, PagedStep};
use crate::rng::Rng;

/// One prompt to complete, with its own stop tokens, sampling, seed and length.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    /// With a stacked adapter view (`DevAdapter::stacked_view`): which adapter of the stack
    /// this request runs with (None: the base model). Must be None otherwise.
    pub adapter: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the cache; None: enough for the shared prefix and `max_batch` sequences of the
    /// longest request, so nothing is ever preempted.
    pub num_blocks: Option<usize>,
    /// Compute the prefix common to every prompt once (when it is at least a block long).
    pub share_prefix: bool,
    /// Prompt tokens one prefill step computes at most: requests admitted together are
    /// prefilled in one forward while their own tokens stay within this, and a longer prompt
    /// is prefilled alone in chunks of this many. It bounds a step's activations whatever the
    /// prompts' lengths.
    pub max_prefill_tokens: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_batch: 16,
            block_size: 16,
            num_blocks: None,
            share_prefix: true,
            max_prefill_tokens: DEFAULT_PREFILL_TOKENS,
        }
    }
}

impl BatchOptions {
    /// Every count at least 1.
    pub fn validate(&self) -> Result<()> {
        if self.max_batch == 0 || self.block_size == 0 || self.max_prefill_tokens == 0 {
            return Err(Error::Invalid(format!(
                "batched generation: max batch {}, block size {} and prefill tokens {} must be at least 1",
                self.max_batch, self.block_size, self.max_prefill_tokens
            )));
        }
        Ok(())
    }
}

/// [`BatchOptions::max_prefill_tokens`]'s default: enough rows for the int8 GEMM to run at its
/// full rate, few enough that a step's activations stay small next to the weights and cache.
pub const DEFAULT_PREFILL_TOKENS: usize = 2048;

#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    /// Prompt tokens of every request (what a one-at-a-time run would prefill).
    pub prompt_tokens: usize,
    /// Tokens the prefills computed: the shared prefix once, each request's own part, and the
    /// recomputation after preemptions.
    pub prefill_tokens: usize,
    pub shared_prefix: usize,
    pub generated_tokens: usize,
    /// Forwards that prefilled requests' own tokens (several requests each when they fit
    /// `max_prefill_tokens` together).
    pub prefill_steps: usize,
    pub decode_steps: usize,
    /// Most sequences in one decode step.
    pub max_running: usize,
    pub preemptions: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl BatchStats {
    /// Generated tokens per second of the whole run (prefills included).
    pub fn tokens_per_sec(&self) -> f64 {
        let t = self.prefill_secs + self.decode_secs;
        if t > 0.0 {
            self.generated_tokens as f64 / t
        } else {
            0.0
        }
    }
}

#[derive(Clone, Debug)]
pub struct BatchGeneration {
    /// One per request, in request order. `prefill_secs` is the time of the prefill steps the
    /// request took part in (shared with the requests prefilled with it); `decode_secs` runs
    /// from its first prefill's end to its last token.
    pub generations: Vec<Generation>,
    pub stats: BatchStats,
}

/// A request's progress.
struct Seq {
    req: usize,
    rng: Rng,
    tokens: Vec<u32>,
    prefill_secs: f64,
    decode_start: Option<Instant>,
    done: Option<(StopReason, f64)>,
}

/// The shared prefix lives under this id; requests use their index.
const ROOT: SeqId = SeqId::MAX;

/// Tokens every prompt starts with, leaving each prompt at least one token of its own (its
/// prefill then yields the logits of its last position).
fn common_prefix(requests: &[Request]) -> usize {
    let first = &requests[0].prompt;
    let mut n = requests
        .iter()
        .map(|r| r.prompt.len() - 1)
        .min()
        .unwrap_or(0);
    for r in &requests[1..] {
        n = n.min(
            first
                .iter()
                .zip(&r.prompt)
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    n
}

/// How a batched run lays out its KV cache (what the memory plan needs to know before it runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLayout {
    /// Tokens of the prefix every prompt shares, computed once (0: none shared — shorter than
    /// a block, sharing off, or a single request).
    pub shared_prefix: usize,
    pub num_blocks: usize,
    /// Most sequences decoded together.
    pub max_running: usize,
    /// Whether the cache holds `max_running` sequences of the longest request (else sequences
    /// may be preempted and prefilled again with what they had generated).
    pub holds_every_running: bool,
}

/// The cache layout of [`generate_batch`] for these requests and options.
pub fn cache_layout(requests: &[Request], opts: &BatchOptions) -> CacheLayout {
    // A prefix's K/V depends on the adapter that computed it: requests with different
    // adapters of a stack share none.
    let one_adapter = requests.windows(2).all(|w| w[0].adapter == w[1].adapter);
    let common = if requests.is_empty() || !one_adapter {
        0
    } else {
        common_prefix(requests)
    };
    let longest = requests
        .iter()
        .map(|r| r.prompt.len().saturating_add(r.options.max_new_tokens))
        .max()
        .unwrap_or(0);
    cache_layout_of(requests.len(), common, longest, opts)
}

/// [`cache_layout`] from the numbers alone: `n` requests whose prompts share their first
/// `common` tokens (and each has a token past them), the longest prompt + its new tokens
/// `longest` (what `recforge plan` knows without building prompts).
pub fn cache_layout_of(
    n: usize,
    common: usize,
    longest: usize,
    opts: &BatchOptions,
) -> CacheLayout {
    let bs = opts.block_size.max(1);
    let shared = if opts.share_prefix && n > 1 && common >= bs {
        common
    } else {
        0
    };
    // Each running sequence: its own blocks past the prefix, plus one for a copy of the
    // prefix's partial last block.
    let per_seq = longest.saturating_sub(shared).div_ceil(bs) + 1;
    let max_running = opts.max_batch.min(n);
    let enough = shared
        .div_ceil(bs)
        .saturating_add(max_running.saturating_mul(per_seq));
    let num_blocks = opts.num_blocks.unwrap_or(enough);
    CacheLayout {
        shared_prefix: shared,
        num_blocks,
        max_running,
        holds_every_running: num_blocks >= enough,
    }
}

/// Generate a completion for every request, `opts.max_batch` at a time. `on_token(request,
/// token)` sees each new token as it is produced.
pub fn generate_batch<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: Option<&AdapterView<'_, B>>,
    requests: &[Request],
    opts: &BatchOptions,
    on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<BatchGeneration> {
    generate_batch_with(be, model, adapter, requests, opts, on_token, |_, _| Ok(()))
}

/// [`generate_batch`] that also hands each request's completion to `on_finish(request,
/// generation)` as soon as it is finished (requests finish out of order), so a caller can
/// write results while the others run.
pub fn generate_batch_with<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: Option<&AdapterView<'_, B>>,
    requests: &[Request],
    opts: &BatchOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
    mut on_finish: impl FnMut(usize, &Generation) -> Result<()>,
) -> Result<BatchGeneration> {
    let ctx = model.config.max_position_embeddings;
    opts.validate()?;
    for (i, r) in requests.iter().enumerate() {
        if r.prompt.is_empty() {
            return Err(Error::Invalid(format!("prompt {i} has no tokens")));
        }
        r.options.sampling.validate()?;
        if r.prompt.len().saturating_add(r.options.max_new_tokens) > ctx {
            return Err(Error::Invalid(format!(
                "prompt {i} ({}) + max new tokens ({}) exceed the model's context of {ctx}",
                r.prompt.len(),
                r.options.max_new_tokens
            )));
        }
    }
    let gates = Gates::new(adapter, requests)?;
    let bs = opts.block_size;
    let mut stats = BatchStats {
        block_size: bs,
        prompt_tokens: requests.iter().map(|r| r.prompt.len()).sum(),
        ..Default::default()
    };
    if requests.is_empty() {
        return Ok(BatchGeneration {
            generations: vec![],
            stats,
        });
    }
    let CacheLayout {
        shared_prefix: shared,
        num_blocks,
        ..
    } = cache_layout(requests, opts);
    stats.shared_prefix = shared;
    stats.num_blocks = num_blocks;
    let mut kv = PagedKv::new(num_blocks, bs)?;
    let mut cache = model.new_paged_cache(be, num_blocks, bs)?;

    if shared > 0 {
        kv.add_sequence(ROOT)?;
        let need = kv.blocks_for(ROOT, shared).unwrap_or(0);
        if need > kv.free_blocks() {
            return Err(Error::Invalid(format!(
                "the prompts' shared prefix of {shared} tokens needs {need} KV blocks of {bs}; the cache has {num_blocks}"
            )));
        }
        let (slots, _) = kv.append(ROOT, shared)?;
        let t0 = Instant::now();
        let tokens = &requests[0].prompt[..shared];
        let positions: Vec<u32> = (0..shared as u32).collect();
        let spans = [SeqSpan {
            q_start: 0,
            q_len: shared,
            kv_start: 0,
            kv_len: shared,
        }];
        let gate = gates.rows([(0, shared)])?;
        let step = PagedStep {
            tokens,
            positions: &positions,
            slots: &slots32(&slots),
            attention: PagedAttention::Fresh(&spans),
            logit_rows: &[],
            lora_gate: gate.as_deref(),
        };
        model.forward_paged(be, &step, &mut cache, adapter)?;
        stats.prefill_tokens += shared;
        stats.prefill_secs += t0.elapsed().as_secs_f64();
    }

    let mut seqs: Vec<Seq> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| Seq {
            req: i,
            rng: Rng::new(r.options.seed),
            tokens: vec![],
            prefill_secs: 0.0,
            decode_start: None,
            done: None,
        })
        .collect();
    let mut done: Vec<Option<Generation>> = vec![None; requests.len()];
    let mut queue: VecDeque<usize> = (0..requests.len()).collect();
    // Running requests, in admission order (the last admitted is preempted first).
    let mut running: Vec<usize> = vec![];

    loop {
        // Admit while there is room in the batch and in the cache, prefilling the admitted
        // requests together in one forward per `max_prefill_tokens` of their own tokens.
        loop {
            let mut group: Vec<(usize, Vec<u32>)> = vec![];
            let mut group_tokens = 0;
            let mut slots = vec![];
            while running.len() + group.len() < opts.max_batch {
                let Some(&r) = queue.front() else { break };
                let id = r as SeqId;
                let context: Vec<u32> = requests[r]
                    .prompt
                    .iter()
                    .chain(&seqs[r].tokens)
                    .copied()
                    .collect();
                let own = context.len() - shared;
                if !group.is_empty() && group_tokens + own > opts.max_prefill_tokens {
                    break;
                }
                if shared > 0 {
                    kv.fork(ROOT, id)?;
                } else {
                    kv.add_sequence(id)?;
                }
                let need = kv.blocks_for(id, own).unwrap_or(0);
                if need > kv.free_blocks() {
                    kv.free_sequence(id)?;
                    if running.is_empty() && group.is_empty() {
                        return Err(Error::Invalid(format!(
                            "prompt {r} needs {need} KV blocks of {bs} tokens for {own} tokens and the cache has {} free of {num_blocks}: give the cache more blocks",
                            kv.free_blocks()
                        )));
                    }
                    break;
                }
                queue.pop_front();
                let (s, copies) = kv.append(id, own)?;
                copy_blocks(be, &mut cache, &copies)?;
                slots.extend(slots32(&s));
                group_tokens += own;
                group.push((r, context));
            }
            if group.is_empty() {
                break;
            }
            let t0 = Instant::now();
            // A request with more own tokens than the cap (alone in its group) is prefilled in
            // chunks of the cap, each attending through its block table to what the earlier
            // ones cached; the last chunk is the step below, which yields its logits.
            let mut chunked = 0;
            if let [(r, context)] = group.as_slice() {
                let cap = opts.max_prefill_tokens;
                while context.len() - shared - chunked > cap {
                    let (a, b) = (shared + chunked, shared + chunked + cap);
                    let piece = [(*r as SeqId, &context[..], a, b)];
                    let slots = &slots[chunked..chunked + cap];
                    prefill_forward(
                        be, model, adapter, &gates, &mut cache, &kv, &piece, slots, false,
                    )?;
                    stats.prefill_steps += 1;
                    chunked += cap;
                }
            }
            let pieces: Vec<_> = group
                .iter()
                .map(|(r, c)| (*r as SeqId, &c[..], shared + chunked, c.len()))
                .collect();
            let slots = &slots[chunked..];
            let logits = prefill_forward(
                be, model, adapter, &gates, &mut cache, &kv, &pieces, slots, true,
            )?
            .ok_or_else(|| Error::Invalid("prefill: no logits".into()))?;
            let params: Vec<_> = group
                .iter()
                .map(|&(r, _)| requests[r].options.sampling)
                .collect();
            let us: Vec<f32> = group.iter().map(|&(r, _)| seqs[r].rng.uniform()).collect();
            let next = be.sample(&logits, &params, &us)?;
            let secs = t0.elapsed().as_secs_f64();
            stats.prefill_secs += secs;
            stats.prefill_tokens += group_tokens;
            stats.prefill_steps += 1;
            for (&(r, _), tok) in group.iter().zip(next) {
                let s = &mut seqs[r];
                s.prefill_secs += secs;
                s.decode_start.get_or_insert_with(Instant::now);
                if advance(s, &requests[r].options, tok, &mut on_token)? {
                    kv.free_sequence(r as SeqId)?;
                    let g = finished(s, &requests[r]);
                    on_finish(r, &g)?;
                    done[r] = Some(g);
                } else {
                    running.push(r);
                }
            }
        }
        if running.is_empty() {
            if queue.is_empty() {
                break;
            }
            continue;
        }

        // One slot each for the running sequences' last tokens: preempt the newest until
        // they fit (its blocks go back; it is prefilled again when readmitted).
        loop {
            let need: usize = running
                .iter()
                .map(|&r| kv.blocks_for(r as SeqId, 1).unwrap_or(0))
                .sum();
            if need <= kv.free_blocks() {
                break;
            }
            if running.len() == 1 {
                let r = running[0];
                return Err(Error::Invalid(format!(
                    "prompt {r} needs a KV block more than the cache of {num_blocks} blocks of {bs} tokens holds: give the cache more blocks"
                )));
            }
            let r = running.pop().expect("more than one");
            kv.free_sequence(r as SeqId)?;
            queue.push_front(r);
            stats.preemptions += 1;
        }
        let t0 = Instant::now();
        let ids: Vec<SeqId> = running.iter().map(|&r| r as SeqId).collect();
        let mut slots = Vec::with_capacity(ids.len());
        for &id in &ids {
            let (s, copies) = kv.append(id, 1)?;
            copy_blocks(be, &mut cache, &copies)?;
            slots.push(s[0] as u32);
        }
        let tokens: Vec<u32> = running
            .iter()
            .map(|&r| {
                *seqs[r]
                    .tokens
                    .last()
                    .expect("a running sequence has a token")
            })
            .collect();
        let lens: Vec<i32> = ids
            .iter()
            .map(|&id| kv.len(id).unwrap_or(0) as i32)
            .collect();
        let positions: Vec<u32> = lens.iter().map(|&l| l as u32 - 1).collect();
        let (tables, max_blocks) = kv.block_tables(&ids)?;
        let rows: Vec<usize> = (0..ids.len()).collect();
        let gate = gates.rows(running.iter().map(|&r| (r, 1)))?;
        let step = PagedStep {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
            attention: PagedAttention::Cached(CachedAttention {
                block_tables: &tables,
                max_blocks,
                context_lens: &lens,
                queries: &vec![1; ids.len()],
            }),
            logit_rows: &rows,
            lora_gate: gate.as_deref(),
        };
        let logits = model
            .forward_paged(be, &step, &mut cache, adapter)?
            .ok_or_else(|| Error::Invalid("decode: no logits".into()))?;
        let params: Vec<_> = running
            .iter()
            .map(|&r| requests[r].options.sampling)
            .collect();
        let us: Vec<f32> = running.iter().map(|&r| seqs[r].rng.uniform()).collect();
        let next = be.sample(&logits, &params, &us)?;
        stats.decode_steps += 1;
        stats.max_running = stats.max_running.max(running.len());
        let mut still = Vec::with_capacity(running.len());
        for (&r, &tok) in running.iter().zip(&next) {
            if advance(&mut seqs[r], &requests[r].options, tok, &mut on_token)? {
                kv.free_sequence(r as SeqId)?;
                let g = finished(&mut seqs[r], &requests[r]);
                on_finish(r, &g)?;
                done[r] = Some(g);
            } else {
                still.push(r);
            }
        }
        running = still;
        stats.decode_secs += t0.elapsed().as_secs_f64();
    }
    if shared > 0 {
        kv.free_sequence(ROOT)?;
    }
    debug_assert_eq!(kv.free_blocks(), num_blocks);
    let generations = done
        .into_iter()
        .map(|g| g.expect("every request finishes"))
        .collect::<Vec<_>>();
    stats.generated_tokens = generations.iter().map(|g| g.tokens.len()).sum();
    Ok(BatchGeneration { generations, stats })
}

/// A finished request's completion (its tokens move out of its progress).
fn finished(s: &mut Seq, req: &Request) -> Generation {
    let (stop, decode_secs) = s.done.expect("called when the request is done");
    Generation {
        prompt_tokens: req.prompt.len(),
        tokens: std::mem::take(&mut s.tokens),
        stop,
        prefill_secs: s.prefill_secs,
        decode_secs,
    }
}

/// What `generate` does with a drawn token: stop on a stop token or at the length limit, else
/// keep it (it is the next step's input). True when the request is finished.
fn advance(
    s: &mut Seq,
    o: &GenerateOptions,
    tok: u32,
    on_token: &mut impl FnMut(usize, u32) -> Result<()>,
) -> Result<bool> {
    let stop = if s.tokens.len() >= o.max_new_tokens {
        Some(StopReason::MaxTokens)
    } else if o.stop_ids.contains(&tok) {
        Some(StopReason::StopToken(tok))
    } else {
        s.tokens.push(tok);
        on_token(s.req, tok)?;
        (s.tokens.len() == o.max_new_tokens).then_some(StopReason::MaxTokens)
    };
    match stop {
        Some(why) => {
            let secs = s.decode_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
            s.done = Some((why, secs));
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Each request's adapter of a stacked adapter view, and a step's LoRA gate built from them.
/// Empty (no gate: all ones) for a single adapter or none.
struct Gates {
    blocks: Vec<RankBlock>,
    rank: usize,
    of: Vec<Option<usize>>,
}

impl Gates {
    fn new<B: Backend>(
        adapter: Option<&AdapterView<'_, B>>,
        requests: &[Request],
    ) -> Result<Gates> {
        let stacked = adapter.filter(|a| !a.blocks.is_empty());
        for (i, r) in requests.iter().enumerate() {
            match (r.adapter, stacked) {
                (Some(a), None) => {
                    return Err(Error::Invalid(format!(
                    "request {i} asks for adapter {a} of a stack, but no stacked adapter is given"
                )))
                }
                (Some(a), Some(v)) if a >= v.blocks.len() => {
                    return Err(Error::Invalid(format!(
                        "request {i} asks for adapter {a}, but the stack holds {}",
                        v.blocks.len()
                    )))
                }
                _ => {}
            }
        }
        Ok(match stacked {
            Some(v) => Gates {
                blocks: v.blocks.clone(),
                rank: v.rank,
                of: requests.iter().map(|r| r.adapter).collect(),
            },
            None => Gates {
                blocks: vec![],
                rank: 0,
                of: vec![],
            },
        })
    }

    /// The gate of a step whose rows are, in order, `n` rows of request `r` for each `(r, n)`;
    /// None without a stack.
    fn rows(&self, rows: impl IntoIterator<Item = (usize, usize)>) -> Result<Option<Vec<f32>>> {
        if self.blocks.is_empty() {
            return Ok(None);
        }
        let which: Vec<Option<usize>> = rows
            .into_iter()
            .flat_map(|(r, n)| std::iter::repeat_n(self.of[r], n))
            .collect();
        gate_rows(&self.blocks, self.rank, &which).map(Some)
    }
}

fn slots32(slots: &[u64]) -> Vec<u32> {
    slots.iter().map(|&s| s as u32).collect()
}

/// One prefill forward over `pieces` — (sequence, its tokens, from, to): the tokens
/// `from..to` of each, whose K/V go to `slots` (in order) — with nothing cached before them
/// when every `from` is 0 (the flash attention over the step's own K/V), else through the block
/// tables. With `logits`, the logits of each piece's last row.
#[allow(clippy::too_many_arguments)]
fn prefill_forward<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: Option<&AdapterView<'_, B>>,
    gates: &Gates,
    cache: &mut PagedCache<B>,
    kv: &PagedKv,
    pieces: &[(SeqId, &[u32], usize, usize)],
    slots: &[u32],
    logits: bool,
) -> Result<Option<crate::backend::Tensor<B>>> {
    let (mut tokens, mut positions) = (vec![], vec![]);
    let (mut spans, mut last_rows) = (vec![], vec![]);
    for &(_, context, from, to) in pieces {
        spans.push(SeqSpan {
            q_start: tokens.len(),
            q_len: to - from,
            kv_start: tokens.len(),
            kv_len: to - from,
        });
        tokens.extend_from_slice(&context[from..to]);
        positions.extend(from as u32..to as u32);
        last_rows.push(tokens.len() - 1);
    }
    // Only attention through the cache needs the block tables.
    let (tables, lens, queries);
    let attention = if pieces.iter().all(|p| p.2 == 0) {
        PagedAttention::Fresh(&spans)
    } else {
        let ids: Vec<SeqId> = pieces.iter().map(|p| p.0).collect();
        let max_blocks;
        (tables, max_blocks) = kv.block_tables(&ids)?;
        lens = pieces.iter().map(|p| p.3 as i32).collect::<Vec<i32>>();
        queries = spans.iter().map(|s| s.q_len).collect::<Vec<usize>>();
        PagedAttention::Cached(CachedAttention {
            block_tables: &tables,
            max_blocks,
            context_lens: &lens,
            queries: &queries,
        })
    };
    let gate = gates.rows(pieces.iter().map(|p| (p.0 as usize, p.3 - p.2)))?;
    let step = PagedStep {
        tokens: &tokens,
        positions: &positions,
        slots,
        attention,
        logit_rows: if logits { &last_rows } else { &[] },
        lora_gate: gate.as_deref(),
    };
    model.forward_paged(be, &step, cache, adapter)
}

/// Copy-on-write of shared, partially filled blocks, in every layer's K and V.
fn copy_blocks<B: Backend>(
    be: &B,
    cache: &mut PagedCache<B>,
    copies: &[super::paged::BlockCopy],
) -> Result<()> {
    let bs = cache.block_size;
    for c in copies {
        let (src, dst) = (c.src as usize * bs, c.dst as usize * bs);
        for t in cache.k.iter_mut().chain(cache.v.iter_mut()) {
            be.copy_rows_within(t, src, dst, bs)?;
        }
    }
    Ok(())
}
