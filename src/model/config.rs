//! The LLaMA configuration, read from a Hugging Face `config.json` or from GGUF metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The fields of HF's config.json we read; unknown fields are ignored.
#[derive(Deserialize)]
struct HfConfigJson {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(|x| vec![x])
            .unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => vec![],
    }
}

/// The largest model dimensions [`LlamaConfig::validate`] accepts.
pub const MAX_LAYERS: usize = 1 << 10;
pub const MAX_WIDTH: usize = 1 << 16;
pub const MAX_INTERMEDIATE: usize = 1 << 18;
pub const MAX_VOCAB: usize = 1 << 22;
pub const MAX_HEADS: usize = 1 << 10;
pub const MAX_HEAD_DIM: usize = 1 << 10;

impl LlamaConfig {
    /// Parse an HF `config.json`.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self> {
        let j: HfConfigJson = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("invalid config.json: {e}")))?;
        let arch_ok = match (&j.architectures, &j.model_type) {
            (Some(a), _) if !a.is_empty() => a.iter().all(|a| a == "LlamaForCausalLM"),
            (_, Some(t)) => t == "llama",
            _ => false,
        };
        if !arch_ok {
            let what = j
                .architectures
                .as_ref()
                .map(|a| a.join(", "))
                .or(j.model_type.clone())
                .unwrap_or_else(|| "none given".into());
            return Err(Error::unsupported(
                path,
                format!(
                    "architecture '{what}': recforge runs LLaMA-family models (LlamaForCausalLM)"
                ),
            ));
        }
        if let Some(rs) = &j.rope_scaling {
            if !rs.is_null() {
                return Err(Error::unsupported(
                    path,
                    format!("rope_scaling {rs} (only plain RoPE is implemented)"),
                ));
            }
        }
        // LLaMA's linears have no bias and its MLP is SwiGLU; a checkpoint that says otherwise
        // would load with those weights or that activation silently replaced.
        for (flag, set) in [
            ("attention_bias", j.attention_bias),
            ("mlp_bias", j.mlp_bias),
        ] {
            if set == Some(true) {
                return Err(Error::unsupported(
                    path,
                    format!("{flag}: true (linear biases are not implemented)"),
                ));
            }
        }
        if let Some(act) = j
            .hidden_act
            .as_deref()
            .filter(|a| !matches!(*a, "silu" | "swish"))
        {
            return Err(Error::unsupported(
                path,
                format!("hidden_act '{act}' (the MLP is SwiGLU: silu)"),
            ));
        }
        let need = |v: Option<usize>, name: &str| {
            v.ok_or_else(|| Error::format(path, format!("config.json has no '{name}'")))
        };
        let hidden_size = need(j.hidden_size, "hidden_size")?;
        let heads = need(j.num_attention_heads, "num_attention_heads")?;
        let cfg = LlamaConfig {
            hidden_size,
            intermediate_size: need(j.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(j.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: j.num_key_value_heads.unwrap_or(heads),
            head_dim: j
                .head_dim
                .unwrap_or(hidden_size.checked_div(heads).unwrap_or(0)),
            vocab_size: need(j.vocab_size, "vocab_size")?,
            rms_norm_eps: j.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: j.rope_theta.unwrap_or(10000.0),
            max_position_embeddings: j.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: j.tie_word_embeddings.unwrap_or(false),
            bos_token_id: ids(&j.bos_token_id).first().copied(),
            eos_token_ids: ids(&j.eos_token_id),
        };
        cfg.validate()
            .map_err(|m| Error::format(path, format!("config.json: {m}")))?;
        Ok(cfg)
    }

    /// Internal consistency of the numbers (not of the weights).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let c = self;
        if c.hidden_size == 0
            || c.num_hidden_layers == 0
            || c.num_attention_heads == 0
            || c.vocab_size == 0
            || c.intermediate_size == 0
        {
            return Err("hidden_size, intermediate_size, num_hidden_layers, num_attention_heads and vocab_size must be positive".into());
        }
        if c.num_key_value_heads == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                c.num_attention_heads, c.num_key_value_heads
            ));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even and positive (rotary pairs)",
                c.head_dim
            ));
        }
        if c.rope_theta.is_nan()
            || c.rope_theta <= 0.0
            || c.rms_norm_eps.is_nan()
            || c.rms_norm_eps <= 0.0
        {
            return Err("rope_theta and rms_norm_eps must be positive".into());
        }
        // Far past any published LLaMA-family model (LLaMA-3 405B: 126 layers, hidden 16384,
        // intermediate 53248, 128 heads; vocabularies up to ~256k), and small enough that the
        // memory plan's byte counts (layers × tokens × widths) cannot overflow.
        for (name, v, most) in [
            ("num_hidden_layers", c.num_hidden_layers, MAX_LAYERS),
            ("hidden_size", c.hidden_size, MAX_WIDTH),
            ("intermediate_size", c.intermediate_size, MAX_INTERMEDIATE),
            ("vocab_size", c.vocab_size, MAX_VOCAB),
            ("num_attention_heads", c.num_attention_heads, MAX_HEADS),
            ("head_dim", c.head_dim, MAX_HEAD_DIM),
        ] {
            if v > most {
                return Err(format!(
                    "{name} {v} is more than recforge takes (at most {most}): a corrupt config?"
                ));
            }
        }
        Ok(())
    }

    /// HF `config.json` text for this model (used by `recforge convert`).
    pub fn to_hf_json(&self) -> String {
        self.to_hf_json_as(crate::tensor::DType::F32)
    }

    /// `config.json` for weights stored in `dtype` (its `torch_dtype`, which
    /// `torch_dtype="auto"` loads them in).
    pub fn to_hf_json_as(&self, dtype: crate::tensor::DType) -> String {
        use crate::tensor::DType;
        let torch_dtype = match dtype {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        };
        let eos = match self.eos_token_ids.as_slice() {
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "hidden_act": "silu",
            "torch_dtype": torch_dtype,
        });
        serde_json::to_string_pretty(&v).expect("json")
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Expected row-major shape of each canonical (HF-named) tensor.
    pub fn expected_shape(&self, name: &str) -> Option<Vec<usize>> {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            return Some(vec![v, d]);
        }
        if name == "model.norm.weight" {
            return Some(vec![d]);
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (_, suffix) = rest.split_once('.')?;
        Some(match suffix {
            "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![d],
            "self_attn.q_proj.weight" => vec![self.q_dim(), d],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![self.kv_dim(), d],
            "self_attn.o_proj.weight" => vec![d, self.q_dim()],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![f, d],
            "mlp.down_proj.weight" => vec![d, f],
            _ => return None,
        })
    }

    /// Every tensor name the model needs, in a fixed order.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v = vec!["model.embed_tokens.weight".to_string()];
        for i in 0..self.num_hidden_layers {
            for s in LAYER_TENSORS {
                v.push(format!("model.layers.{i}.{s}"));
            }
        }
        v.push("model.norm.weight".into());
        if !self.tie_word_embeddings {
            v.push("lm_head.weight".into());
        }
        v
    }
}

pub const LAYER_TENSORS: [&str; 9] = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];
