//! Model sources: a GGUF file or a Hugging Face folder, both presented as the same thing —
//! a `LlamaConfig`, tensors under their HF names in HF layout, and a tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::config::LlamaConfig;
use super::gguf::{self, GgufFile};
use super::tokenizer::{self, TextTokenizer};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor};

pub trait ModelSource {
    /// The file or folder this model came from (for messages).
    fn path(&self) -> &Path;
    fn config(&self) -> &LlamaConfig;
    /// Load one tensor by its HF name, in HF layout, with its shape checked against the config.
    fn tensor(&self, name: &str) -> Result<HostTensor>;
    fn tokenizer(&self) -> Result<TextTokenizer>;
    /// Short description of the source format, e.g. "gguf v3" or "hf safetensors (2 shards)".
    fn format(&self) -> String;
}

/// Open a model: a `.gguf` file, or a folder with config.json + safetensors.
pub fn open(path: impl AsRef<Path>) -> Result<Box<dyn ModelSource>> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        Ok(Box::new(HfSource::open(path)?))
    } else {
        Ok(Box::new(GgufSource::open(path)?))
    }
}

/// LLaMA's linears have no bias: a file that holds one would lose it silently at load.
fn refuse_bias(path: &Path, tensor: &str) -> Result<()> {
    if tensor.ends_with(".bias") {
        return Err(Error::unsupported(
            path,
            format!("tensor '{tensor}': linear biases are not implemented (LLaMA has none)"),
        ));
    }
    Ok(())
}

fn check_shape(
    path: &Path,
    cfg: &LlamaConfig,
    name: &str,
    shown: &str,
    t: &HostTensor,
) -> Result<()> {
    match cfg.expected_shape(name) {
        Some(s) if s != t.shape => Err(Error::format(
            path,
            format!(
                "tensor {shown} has shape {:?} but the config implies {:?}",
                t.shape, s
            ),
        )),
        None => Err(Error::Invalid(format!(
            "'{name}' is not a LLaMA tensor name"
        ))),
        _ => Ok(()),
    }
}

// ----------------------------------------------------------------------------------------------

pub struct GgufSource {
    file: GgufFile,
    config: LlamaConfig,
}

/// HF name → GGUF name.
pub fn gguf_name(hf: &str) -> Option<String> {
    Some(match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (i, suffix) = rest.split_once('.')?;
            let g = match suffix {
                "input_layernorm.weight" => "attn_norm",
                "self_attn.q_proj.weight" => "attn_q",
                "self_attn.k_proj.weight" => "attn_k",
                "self_attn.v_proj.weight" => "attn_v",
                "self_attn.o_proj.weight" => "attn_output",
                "post_attention_layernorm.weight" => "ffn_norm",
                "mlp.gate_proj.weight" => "ffn_gate",
                "mlp.up_proj.weight" => "ffn_up",
                "mlp.down_proj.weight" => "ffn_down",
                _ => return None,
            };
            format!("blk.{i}.{g}.weight")
        }
    })
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let arch = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::format(path, "GGUF metadata has no general.architecture"))?;
        if arch != "llama" {
            return Err(Error::unsupported(
                path,
                format!("architecture '{arch}': recforge runs LLaMA-family models ('llama')"),
            ));
        }
        let num = |k: &str| -> Result<u64> {
            file.get(&format!("llama.{k}"))
                .and_then(|v| v.as_u64())
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!("GGUF metadata 'llama.{k}' is missing or not an integer"),
                    )
                })
        };
        let float = |k: &str, default: f64| -> f64 {
            file.get(&format!("llama.{k}"))
                .and_then(|v| v.as_f64())
                .unwrap_or(default)
        };
        let hidden = num("embedding_length")? as usize;
        let heads = num("attention.head_count")? as usize;
        let kv_heads = num("attention.head_count_kv").unwrap_or(heads as u64) as usize;
        let head_dim = match num("rope.dimension_count") {
            Ok(d) => d as usize,
            Err(_) if heads > 0 => hidden / heads,
            Err(e) => return Err(e),
        };
        let n_vocab_tokens = file
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len());
        let vocab = match (num("vocab_size"), n_vocab_tokens) {
            (Ok(v), _) => v as usize,
            (Err(_), Some(n)) => n,
            (Err(e), None) => return Err(e),
        };
        if file
            .get("llama.rope.scaling.type")
            .and_then(|v| v.as_str())
            .is_some_and(|t| t != "none")
        {
            return Err(Error::unsupported(
                path,
                "rope scaling (only plain RoPE is implemented)",
            ));
        }
        for t in &file.tensors {
            refuse_bias(path, &t.name)?;
        }
        let id = |k: &str| {
            file.get(k)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        let config = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: num("feed_forward_length")? as usize,
            num_hidden_layers: num("block_count")? as usize,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: vocab,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: float("rope.freq_base", 10000.0),
            max_position_embeddings: num("context_length").unwrap_or(2048) as usize,
            tie_word_embeddings: file.tensor_info("output.weight").is_none(),
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        config
            .validate()
            .map_err(|m| Error::format(path, format!("GGUF metadata: {m}")))?;
        Ok(GgufSource { file, config })
    }
}

impl ModelSource for GgufSource {
    fn path(&self) -> &Path {
        self.file.path()
    }
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn format(&self) -> String {
        format!("gguf v{}", self.file.version)
    }
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let g = gguf_name(name)
            .ok_or_else(|| Error::Invalid(format!("'{name}' is not a LLaMA tensor name")))?;
        let info = self.file.tensor_info(&g).ok_or_else(|| {
            Error::format(
                self.path(),
                format!("missing tensor '{g}' (HF name '{name}')"),
            )
        })?;
        let mut t = self.file.load(info)?;
        check_shape(
            self.path(),
            &self.config,
            name,
            &format!("'{g}' (HF name '{name}')"),
            &t,
        )?;
        if name.ends_with("q_proj.weight") {
            t = gguf::unpermute_rows(&t, self.config.num_attention_heads)?;
        } else if name.ends_with("k_proj.weight") {
            t = gguf::unpermute_rows(&t, self.config.num_key_value_heads)?;
        }
        Ok(t)
    }
    fn tokenizer(&self) -> Result<TextTokenizer> {
        tokenizer::from_gguf(&self.file)
    }
}

// ----------------------------------------------------------------------------------------------

struct StEntry {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct HfSource {
    dir: PathBuf,
    config: LlamaConfig,
    shards: Vec<(PathBuf, memmap2::Mmap)>,
    index: HashMap<String, StEntry>,
}

fn st_dtype(path: &Path, name: &str, d: safetensors::Dtype) -> Result<DType> {
    Ok(match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => {
            return Err(Error::unsupported(
                path,
                format!("tensor '{name}' has dtype {other:?} (supported: F32, F16, BF16)"),
            ))
        }
    })
}

impl HfSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config = LlamaConfig::from_hf_json(&cfg_path, &text)?;
        let index_path = dir.join("model.safetensors.index.json");
        let shard_files: Vec<PathBuf> = if index_path.exists() {
            let t = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let j: serde_json::Value = serde_json::from_str(&t)
                .map_err(|e| Error::format(&index_path, format!("invalid JSON: {e}")))?;
            let map = j
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, "no 'weight_map' object"))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::format(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in this folder",
                ));
            }
            vec![single]
        };
        let mut shards = vec![];
        let mut index = HashMap::new();
        for (si, p) in shard_files.into_iter().enumerate() {
            let file = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
            // SAFETY: read-only private map kept alive with the source.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&p, e))?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                    Error::format(&p, format!("invalid or truncated safetensors file: {e:?}"))
                })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                refuse_bias(&p, &name)?;
                let dtype = st_dtype(&p, &name, info.dtype)?;
                let (s, e) = info.data_offsets;
                if base + e > map.len() {
                    return Err(Error::format(&p, format!("truncated safetensors file: tensor '{name}' ends past the end of the file")));
                }
                index.insert(
                    name,
                    StEntry {
                        shard: si,
                        dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            shards.push((p, map));
        }
        Ok(HfSource {
            dir: dir.to_path_buf(),
            config,
            shards,
            index,
        })
    }
}

impl ModelSource for HfSource {
    fn path(&self) -> &Path {
        &self.dir
    }
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn format(&self) -> String {
        format!(
            "hf safetensors ({} shard{})",
            self.shards.len(),
            if self.shards.len() == 1 { "" } else { "s" }
        )
    }
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let e = self.index.get(name).ok_or_else(|| {
            Error::format(
                &self.dir,
                format!("missing tensor '{name}' in the safetensors files"),
            )
        })?;
        let (p, map) = &self.shards[e.shard];
        let data = HostData::from_le_bytes(e.dtype, &map[e.start..e.end])
            .map_err(|err| Error::format(p, format!("tensor '{name}': {err}")))?;
        let t = HostTensor::new(e.shape.clone(), data)
            .map_err(|err| Error::format(p, format!("tensor '{name}': {err}")))?;
        check_shape(p, &self.config, name, &format!("'{name}'"), &t)?;
        Ok(t)
    }
    fn tokenizer(&self) -> Result<TextTokenizer> {
        let tp = self.dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&tp).map_err(|e| Error::io(&tp, e))?;
        let mut chat_template = None;
        let tc = self.dir.join("tokenizer_config.json");
        if let Ok(t) = std::fs::read_to_string(&tc) {
            let j: serde_json::Value = serde_json::from_str(&t)
                .map_err(|e| Error::format(&tc, format!("invalid JSON: {e}")))?;
            chat_template = j
                .get("chat_template")
                .and_then(|v| v.as_str())
                .map(String::from);
        }
        TextTokenizer::from_json(
            &tp,
            &json,
            self.config.bos_token_id,
            self.config.eos_token_ids.clone(),
            chat_template,
        )
    }
}
