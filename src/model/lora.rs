//! LoRA adapters on the host: which projections they target, their hyper-parameters, and their
//! f32 weights (PEFT layout: A `[r, in]`, B `[out, r]`, scaling alpha / r). The trainer moves
//! them to a backend; `model::adapter` reads and writes them in PEFT's file format.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use super::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// A projection of a LLaMA layer that can carry an adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// PEFT's module name (`target_modules` entry).
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The command line's and the memory plan's name: q, k, v, o, gate, up or down.
    pub fn short_name(self) -> &'static str {
        self.peft_name().trim_end_matches("_proj")
    }

    /// The HF module path inside a layer, e.g. `self_attn.q_proj`.
    pub fn module_path(self) -> String {
        let parent = match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        };
        format!("{parent}.{}", self.peft_name())
    }

    /// (in_features, out_features) of this projection.
    pub fn dims(self, c: &LlamaConfig) -> (usize, usize) {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        match self {
            Target::Q => (d, q),
            Target::K | Target::V => (d, kv),
            Target::O => (q, d),
            Target::Gate | Target::Up => (d, f),
            Target::Down => (f, d),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.peft_name())
    }
}

impl FromStr for Target {
    type Err = Error;
    /// Accepts PEFT names (`q_proj`) and short ones (`q`, `gate`).
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let short = s.strip_suffix("_proj").unwrap_or(s);
        Ok(match short {
            "q" => Target::Q,
            "k" => Target::K,
            "v" => Target::V,
            "o" => Target::O,
            "gate" => Target::Gate,
            "up" => Target::Up,
            "down" => Target::Down,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown LoRA target '{s}': expected some of q, k, v, o, gate, up, down \
                     (or their PEFT names q_proj ...)"
                )))
            }
        })
    }
}

/// Parse a comma-separated target list such as `q,v` or `q_proj,k_proj` into sorted targets.
/// A module named twice (`q,v,q`, `q,q_proj`) is refused, as the memory plan refuses it: it is
/// more likely a slip for another module than a request for one adapter.
pub fn parse_targets(s: &str) -> Result<Vec<Target>> {
    let mut t: Vec<Target> = Vec::new();
    for p in s.split(',').filter(|p| !p.trim().is_empty()) {
        let target = Target::from_str(p)?;
        if t.contains(&target) {
            return Err(Error::Invalid(format!(
                "LoRA target '{}' is listed twice",
                target.short_name()
            )));
        }
        t.push(target);
    }
    t.sort();
    if t.is_empty() {
        return Err(Error::Invalid(
            "LoRA needs at least one target module (some of q, k, v, o, gate, up, down)".into(),
        ));
    }
    Ok(t)
}

/// LoRA hyper-parameters (PEFT's `LoraConfig` subset that matters here).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// Sorted, without duplicates.
    pub targets: Vec<Target>,
}

impl LoraConfig {
    /// PEFT scaling: alpha / r.
    pub fn scale(&self) -> f32 {
        self.alpha / self.r as f32
    }
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Invalid("LoRA rank r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Invalid(format!(
                "LoRA dropout {} must be in [0, 1)",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::Invalid(
                "LoRA needs at least one target module".into(),
            ));
        }
        if !self.alpha.is_finite() {
            return Err(Error::Invalid("LoRA alpha must be finite".into()));
        }
        Ok(())
    }
}

/// One adapter's weights: A `[r, in]` and B `[out, r]`, row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostLora {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// A whole adapter: config plus one `HostLora` per (layer, target).
#[derive(Clone, Debug, PartialEq)]
pub struct HostAdapter {
    pub config: LoraConfig,
    /// Recorded in `adapter_config.json` as `base_model_name_or_path`.
    pub base_model: String,
    pub layers: BTreeMap<(usize, Target), HostLora>,
}

impl HostAdapter {
    /// PEFT's initialisation: A Kaiming-uniform with a = √5 (bound 1/√in), B zero, so the
    /// adapted model starts equal to the base. Deterministic in `seed`.
    pub fn init(cfg: &LlamaConfig, lora: &LoraConfig, seed: u64, base_model: &str) -> Result<Self> {
        lora.validate()?;
        let mut rng = Rng::new(seed);
        let mut layers = BTreeMap::new();
        for l in 0..cfg.num_hidden_layers {
            for &t in &lora.targets {
                let (k, n) = t.dims(cfg);
                let bound = 1.0 / (k as f32).sqrt();
                let a = (0..lora.r * k).map(|_| rng.range(-bound, bound)).collect();
                layers.insert(
                    (l, t),
                    HostLora {
                        a,
                        b: vec![0.0; n * lora.r],
                        r: lora.r,
                        in_features: k,
                        out_features: n,
                    },
                );
            }
        }
        Ok(HostAdapter {
            config: lora.clone(),
            base_model: base_model.to_string(),
            layers,
        })
    }

    /// Checks that every tensor matches the model's shapes and the config's rank and targets.
    pub fn check_against(&self, cfg: &LlamaConfig) -> Result<()> {
        for (&(l, t), w) in &self.layers {
            if l >= cfg.num_hidden_layers {
                return Err(Error::Shape(format!(
                    "adapter has layer {l} but the model has {} layers",
                    cfg.num_hidden_layers
                )));
            }
            let (k, n) = t.dims(cfg);
            if w.in_features != k
                || w.out_features != n
                || w.a.len() != w.r * k
                || w.b.len() != n * w.r
                || w.r != self.config.r
            {
                return Err(Error::Shape(format!(
                    "adapter layer {l} {t}: A {}×{} and B {}×{} do not fit the model's {k}→{n} \
                     projection with r = {}",
                    w.r, w.in_features, w.out_features, w.r, self.config.r
                )));
            }
        }
        Ok(())
    }
}

/// Where one adapter of a [`StackedAdapter`] sits among its ranks, and the scale (its alpha / r)
/// the rows that use it are gated by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankBlock {
    pub offset: usize,
    pub rank: usize,
    pub scale: f32,
}

/// Several adapters of one model as one, so that the rows of one batch can each use a different
/// adapter (one per user, say) in a single forward pass: the gated LoRA of every adapted
/// projection computes `y += s · ((x · Aᵀ) ⊙ g) · Bᵀ` over the stacked ranks, and a row's gate
/// `g` holds its adapter's scale on that adapter's rank block and zeros elsewhere
/// ([`StackedAdapter::gate`]), so the other blocks add exactly nothing to it.
///
/// `adapter` has rank Σ rᵢ and alpha equal to it (its own scale is 1: each adapter's scale is in
/// the gate), the union of the adapters' targets, and zero blocks where an adapter lacks a
/// projection. Every row computes the down-projection of every rank, so the LoRA work grows
/// with the number of adapters stacked: meant for a handful per batch (the gated kernels'
/// benchmark compares 8 against 1), not for hundreds.
#[derive(Clone, Debug, PartialEq)]
pub struct StackedAdapter {
    pub adapter: HostAdapter,
    pub blocks: Vec<RankBlock>,
}

/// Stack `adapters` (each checked against the model config `cfg`) in order: adapter i's ranks
/// are block i.
pub fn stack(adapters: &[&HostAdapter], cfg: &LlamaConfig) -> Result<StackedAdapter> {
    if adapters.is_empty() {
        return Err(Error::Invalid(
            "stacking adapters needs at least one".into(),
        ));
    }
    let mut blocks = Vec::with_capacity(adapters.len());
    let mut total = 0usize;
    for (i, a) in adapters.iter().enumerate() {
        a.config
            .validate()
            .and_then(|()| a.check_against(cfg))
            .map_err(|e| Error::Invalid(format!("adapter {i} of the stack: {e}")))?;
        blocks.push(RankBlock {
            offset: total,
            rank: a.config.r,
            scale: a.config.scale(),
        });
        total = total
            .checked_add(a.config.r)
            .ok_or_else(|| Error::Invalid("the stacked rank overflows".into()))?;
    }
    let keys: std::collections::BTreeSet<(usize, Target)> = adapters
        .iter()
        .flat_map(|a| a.layers.keys().copied())
        .collect();
    let mut layers = BTreeMap::new();
    for key in keys {
        let (k, n) = key.1.dims(cfg);
        let mut a_all = vec![0.0f32; total * k];
        let mut b_all = vec![0.0f32; n * total];
        for (ad, blk) in adapters.iter().zip(&blocks) {
            let Some(w) = ad.layers.get(&key) else {
                continue;
            };
            // A's rows are ranks: adapter i's r rows go to rows offset..offset + r.
            a_all[blk.offset * k..(blk.offset + w.r) * k].copy_from_slice(&w.a);
            // B's columns are ranks: each output row's r values go to columns offset.. .
            for (dst, src) in b_all.chunks_exact_mut(total).zip(w.b.chunks_exact(w.r)) {
                dst[blk.offset..blk.offset + w.r].copy_from_slice(src);
            }
        }
        layers.insert(
            key,
            HostLora {
                a: a_all,
                b: b_all,
                r: total,
                in_features: k,
                out_features: n,
            },
        );
    }
    let mut targets: Vec<Target> = layers.keys().map(|&(_, t)| t).collect();
    targets.sort_unstable();
    targets.dedup();
    Ok(StackedAdapter {
        adapter: HostAdapter {
            config: LoraConfig {
                r: total,
                alpha: total as f32,
                dropout: 0.0,
                targets,
            },
            base_model: adapters[0].base_model.clone(),
            layers,
        },
        blocks,
    })
}

impl StackedAdapter {
    /// The LoRA gate of a batch `[rows, R]` (f32, row-major; R the stacked rank): row i takes
    /// adapter `which[i]`'s rank block at that adapter's scale and zeros elsewhere; a `None` row
    /// runs the base model alone.
    pub fn gate(&self, which: &[Option<usize>]) -> Result<Vec<f32>> {
        gate_rows(&self.blocks, self.adapter.config.r, which)
    }
}

/// [`StackedAdapter::gate`] from the stack's blocks and total rank alone (what an adapter view
/// on a backend keeps of the stack).
pub fn gate_rows(blocks: &[RankBlock], rank: usize, which: &[Option<usize>]) -> Result<Vec<f32>> {
    let mut g = vec![0.0f32; which.len() * rank];
    if rank == 0 {
        return Ok(g);
    }
    for (row, w) in g.chunks_exact_mut(rank).zip(which) {
        if let Some(i) = *w {
            let b = blocks.get(i).ok_or_else(|| {
                Error::Invalid(format!(
                    "adapter {i} asked for, but the stack holds {}",
                    blocks.len()
                ))
            })?;
            if b.offset + b.rank > rank {
                return Err(Error::Shape(format!(
                    "adapter {i}'s ranks {}..{} lie past the stack's rank {rank}",
                    b.offset,
                    b.offset + b.rank
                )));
            }
            row[b.offset..b.offset + b.rank].fill(b.scale);
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_lists_parse_sorted_and_refuse_slips() {
        use Target::*;
        assert_eq!(parse_targets("v, q").unwrap(), vec![Q, V]);
        assert_eq!(parse_targets("down_proj,q,").unwrap(), vec![Q, Down]);
        let err = |s: &str| parse_targets(s).unwrap_err().to_string();
        assert!(err("q,v,q").contains("'q' is listed twice"));
        assert!(err("q,q_proj").contains("'q' is listed twice"));
        assert!(err(" , ").contains("at least one target"));
        assert!(err("q,zz").contains("unknown LoRA target 'zz'"));
    }

    /// An adapter of rank r on `targets` with random A and B.
    fn random(cfg: &LlamaConfig, r: usize, alpha: f32, targets: &str, seed: u64) -> HostAdapter {
        let lora = LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            targets: parse_targets(targets).unwrap(),
        };
        let mut a = HostAdapter::init(cfg, &lora, seed, "test").unwrap();
        let mut rng = Rng::new(seed + 7);
        for w in a.layers.values_mut() {
            w.b.iter_mut().for_each(|x| *x = rng.range(-1.0, 1.0));
        }
        a
    }

    /// `s · (x · Aᵀ ⊙ g) · Bᵀ` for one row x, in f64.
    fn lora_row(w: &HostLora, scale: f64, gate: &[f32], x: &[f32]) -> Vec<f64> {
        let h: Vec<f64> = (0..w.r)
            .map(|j| {
                let a = &w.a[j * w.in_features..(j + 1) * w.in_features];
                a.iter()
                    .zip(x)
                    .map(|(&a, &x)| a as f64 * x as f64)
                    .sum::<f64>()
                    * gate[j] as f64
            })
            .collect();
        (0..w.out_features)
            .map(|n| {
                scale
                    * (0..w.r)
                        .map(|j| h[j] * w.b[n * w.r + j] as f64)
                        .sum::<f64>()
            })
            .collect()
    }

    #[test]
    fn a_stack_row_gated_to_one_adapter_is_that_adapter() {
        let cfg = crate::model::random::shape("tiny").unwrap();
        // Ranks 3, 5, 2 with scales 16/3, 0.7 and 4; targets that overlap only in part.
        let ads = [
            random(&cfg, 3, 16.0, "q,v", 1),
            random(&cfg, 5, 3.5, "v,gate,down", 2),
            random(&cfg, 2, 8.0, "q", 3),
        ];
        let refs: Vec<&HostAdapter> = ads.iter().collect();
        let st = stack(&refs, &cfg).unwrap();
        assert_eq!(st.adapter.config.r, 10);
        assert_eq!(st.adapter.config.scale(), 1.0);
        let t = |s: &str| parse_targets(s).unwrap();
        assert_eq!(st.adapter.config.targets, t("q,v,gate,down"));
        assert_eq!(
            st.blocks
                .iter()
                .map(|b| (b.offset, b.rank))
                .collect::<Vec<_>>(),
            vec![(0, 3), (3, 5), (8, 2)]
        );
        st.adapter.check_against(&cfg).unwrap();
        let mut rng = Rng::new(9);
        let gates = st.gate(&[Some(0), Some(1), Some(2), None]).unwrap();
        for (&key, w) in &st.adapter.layers {
            let x: Vec<f32> = (0..w.in_features).map(|_| rng.range(-1.0, 1.0)).collect();
            for (row, which) in [Some(0), Some(1), Some(2), None].into_iter().enumerate() {
                let got = lora_row(w, 1.0, &gates[row * 10..(row + 1) * 10], &x);
                // The adapter alone, or nothing where it has no such projection (or the row
                // runs the base model).
                let want = match which.and_then(|i| ads[i].layers.get(&key).map(|l| (i, l))) {
                    Some((i, l)) => lora_row(l, ads[i].config.scale() as f64, &vec![1.0; l.r], &x),
                    None => vec![0.0; w.out_features],
                };
                // Both in f64 from the same f32 values: only the place of the scale's product
                // differs, a few f64 roundings of values below ~100.
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-9, "{key:?} row {row}: {g} vs {w}");
                }
            }
        }
        let err = st.gate(&[Some(3)]).unwrap_err().to_string();
        assert!(
            err.contains("adapter 3 asked for, but the stack holds 3"),
            "{err}"
        );
    }
}
