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
}
