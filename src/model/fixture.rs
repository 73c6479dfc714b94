//! A tiny LLaMA with random weights, written both as a GGUF file (mixed F32 / F16 / BF16 /
//! Q8_0 / Q4_0 / Q4_1 tensors, llama.cpp's q/k row permutation, a byte-level BPE tokenizer in
//! its metadata) and as an HF folder holding exactly the same values. Quantized weights are
//! generated as quantized blocks, and their HF copy is computed from the block fields, so the
//! two files describe the same model bit for bit and must give identical logits.

use std::path::{Path, PathBuf};

use half::{bf16, f16};

use super::config::LlamaConfig;
use super::convert::{safetensors_bytes, write_atomic};
use super::gguf::{self, GgmlType, Value, WriteTensor};
use super::tokenizer::{bytes_to_unicode, gguf_metadata, tokenizer_json};
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::{HostData, HostTensor};

#[derive(Clone, Debug)]
pub struct FixtureSpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub tied: bool,
    pub seed: u64,
}

impl Default for FixtureSpec {
    fn default() -> Self {
        FixtureSpec {
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            intermediate: 96,
            tied: true,
            seed: 7,
        }
    }
}

pub struct Fixture {
    pub gguf: PathBuf,
    pub hf_dir: PathBuf,
    pub config: LlamaConfig,
}

pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// A few GPT-2-style merges on top of the 256 byte tokens.
pub const MERGES: [&str; 20] = [
    "Ġ t", "h e", "i n", "e r", "a n", "o n", "Ġ a", "r e", "Ġt he", "Ġ s", "e n", "a t", "o r",
    "Ġ w", "Ġ o", "i s", "Ġ c", "Ġ f", "Ġ m", "l l",
];
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";

/// The fixture's vocabulary: specials (control tokens), the 256 bytes, then one token per merge.
pub fn vocab() -> (Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; SPECIALS.len()];
    for c in bytes_to_unicode() {
        tokens.push(c.to_string());
        types.push(1);
    }
    for m in MERGES {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (tokens, types)
}

/// Random values exactly representable in `ty`, with their ggml encoding. `rows × cols`,
/// row-major; `std` sets the spread.
fn random_tensor(
    rng: &mut Rng,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    std: f32,
    center: f32,
) -> (Vec<f32>, Vec<u8>) {
    let n = rows * cols;
    let mut vals = Vec::with_capacity(n);
    let mut bytes = Vec::new();
    match ty {
        GgmlType::F32 => {
            for _ in 0..n {
                let v = center + std * rng.normal();
                vals.push(v);
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for _ in 0..n {
                let h = f16::from_f32(center + std * rng.normal());
                vals.push(h.to_f32());
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for _ in 0..n {
                let h = bf16::from_f32(center + std * rng.normal());
                vals.push(h.to_f32());
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
            }
        }
        GgmlType::Q8_0 => {
            for _ in 0..n / 32 {
                let d = f16::from_f32(std * rng.range(1.5, 3.0) / 127.0);
                bytes.extend_from_slice(&d.to_bits().to_le_bytes());
                for _ in 0..32 {
                    let q = rng.below(255) as i32 - 127;
                    bytes.push(q as i8 as u8);
                    vals.push(q as f32 * d.to_f32());
                }
            }
        }
        GgmlType::Q4_0 => {
            for _ in 0..n / 32 {
                let d = f16::from_f32(std * rng.range(1.5, 3.0) / 8.0);
                bytes.extend_from_slice(&d.to_bits().to_le_bytes());
                let q: Vec<u8> = (0..32).map(|_| rng.below(16) as u8).collect();
                for j in 0..16 {
                    bytes.push(q[j] | (q[j + 16] << 4));
                }
                vals.extend(q.iter().map(|&x| (x as i32 - 8) as f32 * d.to_f32()));
            }
        }
        GgmlType::Q4_1 => {
            for _ in 0..n / 32 {
                let d = f16::from_f32(std * rng.range(1.5, 3.0) / 8.0);
                let m = f16::from_f32(-7.5 * d.to_f32() + 0.1 * std * rng.normal());
                bytes.extend_from_slice(&d.to_bits().to_le_bytes());
                bytes.extend_from_slice(&m.to_bits().to_le_bytes());
                let q: Vec<u8> = (0..32).map(|_| rng.below(16) as u8).collect();
                for j in 0..16 {
                    bytes.push(q[j] | (q[j + 16] << 4));
                }
                vals.extend(q.iter().map(|&x| x as f32 * d.to_f32() + m.to_f32()));
            }
        }
        // Loading these is checked against gguf-py's dequantization (tests/ggml_quants.rs);
        // the fixture models do not use them.
        other => panic!("the fixture writer has no {} encoder", other.name()),
    }
    (vals, bytes)
}

/// Reorder whole rows of an encoded tensor (`row_bytes` each) by llama.cpp's q/k permutation.
fn permute_encoded_rows(bytes: &[u8], rows: usize, n_heads: usize) -> Vec<u8> {
    let rb = bytes.len() / rows;
    let hd = rows / n_heads;
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        let (h, i) = (r / hd, r % hd);
        let (s, j) = (i / (hd / 2), i % (hd / 2));
        let g = h * hd + 2 * j + s;
        out[g * rb..(g + 1) * rb].copy_from_slice(&bytes[r * rb..(r + 1) * rb]);
    }
    out
}

/// Write the fixture into `dir` (as `tiny.gguf` and the folder `tiny-hf/`).
pub fn write(dir: &Path, spec: &FixtureSpec) -> Result<Fixture> {
    let (tokens, types) = vocab();
    let head_dim = spec.hidden / spec.heads;
    let config = LlamaConfig {
        hidden_size: spec.hidden,
        intermediate_size: spec.intermediate,
        num_hidden_layers: spec.layers,
        num_attention_heads: spec.heads,
        num_key_value_heads: spec.kv_heads,
        head_dim,
        vocab_size: tokens.len(),
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: spec.tied,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    };
    let mut rng = Rng::new(spec.seed);
    let mut gg: Vec<WriteTensor> = vec![];
    let mut hf: Vec<(String, HostTensor)> = vec![];
    let (d, f, v) = (spec.hidden, spec.intermediate, tokens.len());

    // (hf name, gguf name, rows, cols, gguf type, hf dtype kept as f16/bf16?, permute heads)
    let mut push = |rng: &mut Rng,
                    hf_name: &str,
                    gg_name: &str,
                    rows: usize,
                    cols: usize,
                    ty: GgmlType,
                    std: f32,
                    center: f32,
                    permute: Option<usize>| {
        let (vals, mut bytes) = random_tensor(rng, ty, rows, cols, std, center);
        let shape = if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        let hf_data = match ty {
            GgmlType::F16 => HostData::F16(vals.iter().map(|x| f16::from_f32(*x)).collect()),
            GgmlType::BF16 => HostData::BF16(vals.iter().map(|x| bf16::from_f32(*x)).collect()),
            _ => HostData::F32(vals),
        };
        if let Some(nh) = permute {
            bytes = permute_encoded_rows(&bytes, rows, nh);
        }
        gg.push(WriteTensor {
            name: gg_name.into(),
            shape: shape.clone(),
            type_id: ty.id(),
            bytes,
        });
        hf.push((
            hf_name.into(),
            HostTensor::new(shape, hf_data).expect("shape"),
        ));
    };
    push(
        &mut rng,
        "model.embed_tokens.weight",
        "token_embd.weight",
        v,
        d,
        GgmlType::F16,
        0.5,
        0.0,
        None,
    );
    let w_std = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    for i in 0..spec.layers {
        // Vary the types between layers so every type appears in every role somewhere.
        let alt = i % 2 == 1;
        let (tq, tk, tv, to, tg, tu, td) = if alt {
            (
                GgmlType::Q4_1,
                GgmlType::Q8_0,
                GgmlType::BF16,
                GgmlType::Q4_0,
                GgmlType::F16,
                GgmlType::Q4_1,
                GgmlType::Q8_0,
            )
        } else {
            (
                GgmlType::Q8_0,
                GgmlType::Q4_0,
                GgmlType::Q4_1,
                GgmlType::BF16,
                GgmlType::Q4_1,
                GgmlType::Q8_0,
                GgmlType::F32,
            )
        };
        let hn = |s: &str| format!("model.layers.{i}.{s}");
        let gn = |s: &str| format!("blk.{i}.{s}.weight");
        let kvd = spec.kv_heads * head_dim;
        push(
            &mut rng,
            &hn("input_layernorm.weight"),
            &gn("attn_norm"),
            1,
            d,
            GgmlType::F32,
            0.1,
            1.0,
            None,
        );
        push(
            &mut rng,
            &hn("self_attn.q_proj.weight"),
            &gn("attn_q"),
            spec.heads * head_dim,
            d,
            tq,
            w_std(d) * 2.0,
            0.0,
            Some(spec.heads),
        );
        push(
            &mut rng,
            &hn("self_attn.k_proj.weight"),
            &gn("attn_k"),
            kvd,
            d,
            tk,
            w_std(d) * 2.0,
            0.0,
            Some(spec.kv_heads),
        );
        push(
            &mut rng,
            &hn("self_attn.v_proj.weight"),
            &gn("attn_v"),
            kvd,
            d,
            tv,
            w_std(d),
            0.0,
            None,
        );
        push(
            &mut rng,
            &hn("self_attn.o_proj.weight"),
            &gn("attn_output"),
            d,
            spec.heads * head_dim,
            to,
            w_std(d),
            0.0,
            None,
        );
        push(
            &mut rng,
            &hn("post_attention_layernorm.weight"),
            &gn("ffn_norm"),
            1,
            d,
            GgmlType::F32,
            0.1,
            1.0,
            None,
        );
        push(
            &mut rng,
            &hn("mlp.gate_proj.weight"),
            &gn("ffn_gate"),
            f,
            d,
            tg,
            w_std(d),
            0.0,
            None,
        );
        push(
            &mut rng,
            &hn("mlp.up_proj.weight"),
            &gn("ffn_up"),
            f,
            d,
            tu,
            w_std(d),
            0.0,
            None,
        );
        push(
            &mut rng,
            &hn("mlp.down_proj.weight"),
            &gn("ffn_down"),
            d,
            f,
            td,
            w_std(f),
            0.0,
            None,
        );
    }
    push(
        &mut rng,
        "model.norm.weight",
        "output_norm.weight",
        1,
        d,
        GgmlType::F32,
        0.1,
        1.0,
        None,
    );
    if !spec.tied {
        push(
            &mut rng,
            "lm_head.weight",
            "output.weight",
            v,
            d,
            GgmlType::Q8_0,
            w_std(d),
            0.0,
            None,
        );
    }
    // The HF copy holds q/k in rotate-half order (values were generated per HF row); the GGUF
    // copy holds the same rows in llama.cpp's permuted order.

    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String("recforge tiny fixture".into()),
        ),
        ("llama.block_count".into(), Value::U32(spec.layers as u32)),
        ("llama.context_length".into(), Value::U32(256)),
        ("llama.embedding_length".into(), Value::U32(d as u32)),
        ("llama.feed_forward_length".into(), Value::U32(f as u32)),
        (
            "llama.attention.head_count".into(),
            Value::U32(spec.heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(spec.kv_heads as u32),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(head_dim as u32),
        ),
        ("llama.vocab_size".into(), Value::U32(v as u32)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHAT_TEMPLATE.into()),
        ),
    ];
    let merges: Vec<String> = MERGES.iter().map(|s| s.to_string()).collect();
    md.extend(gguf_metadata(&tokens, &types, &merges, "smollm", 1, 2));

    std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
    let gguf_path = dir.join("tiny.gguf");
    write_atomic(&gguf_path, &gguf::encode(&md, &gg))?;

    let hf_dir = dir.join("tiny-hf");
    std::fs::create_dir_all(&hf_dir).map_err(|e| crate::error::Error::io(&hf_dir, e))?;
    write_atomic(&hf_dir.join("config.json"), config.to_hf_json().as_bytes())?;
    let tok_refs: Vec<&str> = tokens.iter().map(|s| s.as_str()).collect();
    let type_u: Vec<u64> = types.iter().map(|t| *t as u64).collect();
    let tj = tokenizer_json(&hf_dir, &tok_refs, &type_u, &MERGES, "smollm", None)?;
    write_atomic(&hf_dir.join("tokenizer.json"), tj.as_bytes())?;
    let tc = serde_json::json!({"chat_template": CHAT_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"});
    write_atomic(
        &hf_dir.join("tokenizer_config.json"),
        tc.to_string().as_bytes(),
    )?;
    let refs: Vec<(String, &HostTensor)> = hf.iter().map(|(n, t)| (n.clone(), t)).collect();
    write_atomic(&hf_dir.join("model.safetensors"), &safetensors_bytes(&refs))?;
    Ok(Fixture {
        gguf: gguf_path,
        hf_dir,
        config,
    })
}
