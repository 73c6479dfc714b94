//! Tokenizers: HF `tokenizer.json` through the `tokenizers` crate, or one built from GGUF
//! metadata (`tokenizer.ggml.*`) as the same tokenizer.json structure, so both sources end up
//! as one `tokenizers::Tokenizer` and `recforge convert` can write it out.

use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value as Json};

use super::gguf::{GgufFile, Value};
use crate::error::{Error, Result};

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

impl TextTokenizer {
    pub fn from_json(
        path: &Path,
        json: &str,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        chat_template: Option<String>,
    ) -> Result<Self> {
        // Syntax first: the tokenizers crate panics (an `expect` in its decoder's
        // deserializer) when the text ends or breaks inside the decoder, instead of returning
        // an error; on syntactically valid JSON it returns errors.
        serde_json::from_str::<serde::de::IgnoredAny>(json)
            .map_err(|e| Error::format(path, format!("invalid tokenizer: not valid JSON: {e}")))?;
        let inner = tokenizers::Tokenizer::from_str(json)
            .map_err(|e| Error::format(path, format!("invalid tokenizer: {e}")))?;
        Ok(TextTokenizer {
            inner,
            bos_id,
            eos_ids,
            chat_template,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids `text` adds when it follows `prefix` in one text (`prefix_ids` being the
    /// prefix's own ids, special tokens included): the tail of the joint encoding when that
    /// starts with `prefix_ids`, as TALLRec (alpaca-lora) tokenizes prompt + response. It
    /// matters for SentencePiece tokenizers, which put a '▁' in front of a text on its own
    /// ("▁Yes") but not after a newline ("Yes"). Where a token would span the boundary (none
    /// does after the Alpaca template's closing newline), `text` is encoded on its own.
    pub fn encode_after(&self, prefix: &str, prefix_ids: &[u32], text: &str) -> Result<Vec<u32>> {
        let joint = self.encode(&format!("{prefix}{text}"), true)?;
        match joint.strip_prefix(prefix_ids) {
            Some(rest) => Ok(rest.to_vec()),
            None => self.encode(text, false),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer.json text.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(format!("cannot serialize: {e}")))
    }

    /// Wrap a user message in the model's chat format when it has a ChatML template
    /// (`<|im_start|>role\n...<|im_end|>`), the format of SmolLM2-Instruct and many others.
    pub fn chat_prompt(&self, user: &str) -> Option<String> {
        let t = self.chat_template.as_deref()?;
        if !t.contains("<|im_start|>") || self.token_id("<|im_start|>").is_none() {
            return None;
        }
        let mut s = String::new();
        // SmolLM2's template inserts this default system turn when none is given.
        if let Some(sys) = default_system_prompt(t) {
            s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
        }
        s.push_str(&format!(
            "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ));
        Some(s)
    }
}

/// The literal default system message of a ChatML template, if it has one
/// (`... '<|im_start|>system\nYou are ...<|im_end|>\n' ...`).
fn default_system_prompt(template: &str) -> Option<String> {
    // The newline after the role may be a literal newline or an escaped "\n".
    let (start, marker) = ["<|im_start|>system\n", "<|im_start|>system\\n"]
        .iter()
        .find_map(|m| template.find(m).map(|i| (i, *m)))?;
    let rest = &template[start + marker.len()..];
    let end = rest.find("<|im_end|>")?;
    let s = &rest[..end];
    if s.contains('{') || s.contains('+') || s.contains('\'') {
        return None; // a variable, not a literal
    }
    Some(s.to_string())
}

/// The GPT-2 byte ↔ unicode table used by byte-level BPE vocabularies: printable bytes map to
/// themselves, the rest to code points from U+0100 on.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("byte")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("code point")
        };
    }
    table
}

/// LLaMA 3's BPE takes a pre-token that is itself in the vocabulary as that one token, whether or
/// not the merges can build it (its tokenizer.json has `ignore_merges: true`; llama.cpp sets
/// the same for these pre-tokenizer names). Without it " Việt" became 3 tokens instead of 1.
fn ignores_merges(pre: &str) -> bool {
    matches!(pre, "llama3" | "llama-bpe" | "llama-v3")
}

fn pre_tokenizer_for(path: &Path, pre: &str) -> Result<Json> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Ok(match pre {
        // llama.cpp writes "gpt-2" for GPT-2's own vocabulary (its vocab test file has it).
        "gpt2" | "gpt-2" | "default" => byte_level(true),
        // llama.cpp's SMOLLM / STARCODER / REFACT family: single digits, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "codeshell" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
        }),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
                 "behavior": "Isolated", "invert": false},
                byte_level(false)
            ]
        }),
        other => {
            return Err(Error::unsupported(
                path,
                format!("tokenizer pre-tokenizer '{other}' (supported: gpt2 / gpt-2, default, smollm, starcoder, refact, codeshell, llama-bpe / llama3 / llama-v3, smaug-bpe)"),
            ))
        }
    })
}

/// The error for tokenizer metadata `key` that is absent or not what it should be.
fn missing_metadata(path: &Path, key: &str) -> Error {
    Error::format(
        path,
        format!("no tokenizer in this GGUF file: metadata '{key}' is missing or malformed"),
    )
}

/// Each entry of the metadata array `key`, through `conv`: None when the key is absent, an
/// error naming it when it is not an array or an entry does not convert.
fn metadata_array<'a, T>(
    f: &'a GgufFile,
    key: &str,
    conv: impl Fn(&'a Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(v) = f.get(key) else {
        return Ok(None);
    };
    let bad = || missing_metadata(f.path(), key);
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|x| conv(x).ok_or_else(bad))
        .collect::<Result<_>>()
        .map(Some)
}

/// That a per-token metadata array has one entry per token.
fn per_token(path: &Path, key: &str, len: usize, tokens: usize) -> Result<()> {
    if len == tokens {
        return Ok(());
    }
    Err(Error::format(
        path,
        format!("{key} has {len} entries for {tokens} tokens"),
    ))
}

/// Build the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
pub fn from_gguf(f: &GgufFile) -> Result<TextTokenizer> {
    let path = f.path();
    let missing = |k: &str| missing_metadata(path, k);
    let model = f
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .ok_or_else(|| missing("tokenizer.ggml.model"))?;
    if model != "gpt2" && model != "llama" {
        return Err(Error::unsupported(
            path,
            format!(
                "tokenizer model '{model}' (implemented: byte-level BPE 'gpt2' and SentencePiece \
                 BPE 'llama')"
            ),
        ));
    }
    let tokens: Vec<&str> = metadata_array(f, "tokenizer.ggml.tokens", Value::as_str)?
        .ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
    let merges: Vec<&str> =
        metadata_array(f, "tokenizer.ggml.merges", Value::as_str)?.unwrap_or_default();
    let types: Vec<u64> = metadata_array(f, "tokenizer.ggml.token_type", |t| {
        Some(t.as_u64().unwrap_or(1))
    })?
    .unwrap_or_else(|| vec![1; tokens.len()]);
    per_token(path, "tokenizer.ggml.token_type", types.len(), tokens.len())?;
    let pre = f
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let id_of = |k: &str| f.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    let bos = id_of("tokenizer.ggml.bos_token_id");
    let eos = id_of("tokenizer.ggml.eos_token_id");
    // llama.cpp's defaults when the key is absent: a BOS for SentencePiece vocabularies only.
    let add_bos = f
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(model == "llama");
    for (name, id) in [("bos", bos), ("eos", eos)] {
        if let Some(id) = id {
            if id as usize >= tokens.len() {
                return Err(Error::format(
                    path,
                    format!(
                        "{name} token id {id} is outside the vocabulary of {} tokens",
                        tokens.len()
                    ),
                ));
            }
        }
    }
    let chat_template = f
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(String::from);
    let bos_to_add = if add_bos { bos } else { None };
    let json = if model == "llama" {
        let scores: Vec<f32> =
            metadata_array(f, "tokenizer.ggml.scores", |v| v.as_f64().map(|x| x as f32))?
                .ok_or_else(|| missing("tokenizer.ggml.scores"))?;
        per_token(path, "tokenizer.ggml.scores", scores.len(), tokens.len())?;
        let unk = id_of("tokenizer.ggml.unknown_token_id").filter(|&u| (u as usize) < tokens.len());
        let space_prefix = f
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        spm_tokenizer_json(
            path,
            &tokens,
            &types,
            &scores,
            unk,
            space_prefix,
            bos_to_add,
        )?
    } else {
        tokenizer_json(path, &tokens, &types, &merges, pre, bos_to_add)?
    };
    TextTokenizer::from_json(path, &json, bos, eos.into_iter().collect(), chat_template)
}

/// The vocabulary map and the added tokens (ggml types 3 = control, special; 4 = user defined)
/// of a tokenizer.json.
fn vocab_and_added(
    path: &Path,
    tokens: &[&str],
    types: &[u64],
) -> Result<(serde_json::Map<String, Json>, Vec<Json>)> {
    let mut vocab = serde_json::Map::new();
    let mut added = vec![];
    for (i, (t, ty)) in tokens.iter().zip(types).enumerate() {
        if vocab.insert(t.to_string(), json!(i)).is_some() {
            return Err(Error::format(
                path,
                format!("token '{t}' appears twice in the vocabulary"),
            ));
        }
        if *ty == 3 || *ty == 4 {
            added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": *ty == 3}));
        }
    }
    Ok((vocab, added))
}

/// A post-processor that puts token `b` in front of every sequence.
fn bos_template(tokens: &[&str], b: u32) -> Json {
    let tok = tokens[b as usize];
    json!({"type": "TemplateProcessing",
           "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
           "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
           "special_tokens": {tok: {"id": tok, "ids": [b], "tokens": [tok]}}})
}

/// A SentencePiece BPE tokenizer.json, llama.cpp's `llama` tokenizer model (LLaMA 1 and 2 and
/// their kin). SentencePiece joins, at each step, the adjacent pair of pieces whose union is
/// the vocabulary piece with the highest score; a BPE whose merge list holds every split of
/// every piece into two vocabulary pieces, ranked by the whole piece's score, makes the same
/// choices. Spaces are '▁' (one in front of the text with `space_prefix`), and a character
/// outside the vocabulary becomes its UTF-8 bytes as `<0xXX>` tokens. GGUF keeps the scores,
/// not the merges, so they are rebuilt here.
fn spm_tokenizer_json(
    path: &Path,
    tokens: &[&str],
    types: &[u64],
    scores: &[f32],
    unk: Option<u32>,
    space_prefix: bool,
    bos_to_add: Option<u32>,
) -> Result<String> {
    let (vocab, added) = vocab_and_added(path, tokens, types)?;
    let id: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    // (piece, left, right): every split of a normal (1) or user-defined (4) piece into two
    // vocabulary pieces.
    let mut merges: Vec<(usize, usize, usize)> = vec![];
    for (i, t) in tokens.iter().enumerate() {
        if types[i] != 1 && types[i] != 4 {
            continue;
        }
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(at);
            if let (Some(&li), Some(&ri)) = (id.get(l), id.get(r)) {
                merges.push((i, li, ri));
            }
        }
    }
    // Highest score first; equal scores by piece id, then by the split's pieces (stable).
    merges.sort_by(|a, b| {
        scores[b.0]
            .total_cmp(&scores[a.0])
            .then(a.0.cmp(&b.0))
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    let merges: Vec<Json> = merges
        .iter()
        .map(|&(_, l, r)| json!([tokens[l], tokens[r]]))
        .collect();
    let mut normalizers = vec![];
    if space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let mut decoders = vec![
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
    ];
    if space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let j = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": bos_to_add.map(|b| bos_template(tokens, b)),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk.map(|u| tokens[u as usize]),
                  "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                  "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    Ok(j.to_string())
}

/// A byte-level BPE tokenizer.json. `types` are ggml token types (3 = control, 4 = user defined
/// become added tokens; control ones are special).
pub fn tokenizer_json(
    path: &Path,
    tokens: &[&str],
    types: &[u64],
    merges: &[&str],
    pre: &str,
    bos_to_add: Option<u32>,
) -> Result<String> {
    let (vocab, added) = vocab_and_added(path, tokens, types)?;
    let post = match bos_to_add {
        Some(b) => bos_template(tokens, b),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})
        }
    };
    let j = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_for(path, pre)?,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": ignores_merges(pre),
                  "vocab": vocab, "merges": merges}
    });
    Ok(j.to_string())
}

/// Metadata keys a GGUF writer needs to describe a tokenizer (fixtures).
pub fn gguf_metadata(
    tokens: &[String],
    types: &[i32],
    merges: &[String],
    pre: &str,
    bos: u32,
    eos: u32,
) -> Vec<(String, Value)> {
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
    ]
}
