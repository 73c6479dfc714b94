//! Writing models out: a safetensors writer and `recforge convert` (any source → HF folder).
//! Every output is written under a temporary name and renamed into place, so an interrupted
//! run never leaves a half-written model behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::source::ModelSource;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I8 => "I8",
        DType::I32 => "I32",
        DType::U32 => "U32",
    }
}

/// Serialize tensors in the safetensors format (8-byte header length, JSON header, data).
pub fn safetensors_bytes(tensors: &[(String, &HostTensor)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for (name, t) in tensors {
        let n = t.data.as_bytes().len();
        header.insert(name.clone(), serde_json::json!({"dtype": st_dtype(t.dtype()), "shape": t.shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + off);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, t) in tensors {
        out.extend_from_slice(t.data.as_bytes());
    }
    out
}

/// Write `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)?;
    f.commit()
}

/// A file written under a temporary name in its folder: [`AtomicFile::commit`] renames it into
/// place; dropped before that (an error, an interrupt) it is removed, so the name never holds a
/// half-written file.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<std::fs::File>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = tmp_name(path);
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            file: Some(file),
        })
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let f = self.file.as_mut().expect("open until committed");
        f.write_all(bytes).map_err(|e| Error::io(&self.path, e))
    }

    /// Flush to disk and give the file its name.
    pub fn commit(mut self) -> Result<()> {
        let f = self.file.take().expect("open until committed");
        let res = f
            .sync_all()
            .and_then(|_| std::fs::rename(&self.tmp, &self.path));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(Error::io(&self.path, e));
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `src` as a Hugging Face LLaMA folder (config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json). Tensors keep the precision the source gives them (quantized GGUF
/// types arrive dequantized to f32), so the converted model computes the same logits.
pub fn to_hf_folder(
    src: &dyn ModelSource,
    out: &Path,
    progress: impl FnMut(usize, usize),
) -> Result<()> {
    to_hf_folder_with(src, out, progress, |_, t| Ok(t))
}

/// `to_hf_folder` with every tensor passed through `transform(name, tensor)` first (merging an
/// adapter).
pub fn to_hf_folder_with(
    src: &dyn ModelSource,
    out: &Path,
    mut progress: impl FnMut(usize, usize),
    mut transform: impl FnMut(&str, HostTensor) -> Result<HostTensor>,
) -> Result<()> {
    if out.exists() {
        return Err(Error::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output already exists; remove it or choose another path",
            ),
        ));
    }
    let cfg = src.config().clone();
    let tok = src.tokenizer()?;
    let names = cfg.tensor_names();
    let mut tensors = Vec::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        tensors.push((n.clone(), transform(n, src.tensor(n)?)?));
        progress(i + 1, names.len());
    }
    let tmp = tmp_name(out);
    let res = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let w = |name: &str, bytes: &[u8]| -> Result<()> {
            let p = tmp.join(name);
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
        };
        w("config.json", cfg.to_hf_json().as_bytes())?;
        w("tokenizer.json", tok.to_json()?.as_bytes())?;
        let name_of = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
        let tc = serde_json::json!({
            "chat_template": tok.chat_template,
            "bos_token": name_of(tok.bos_id),
            "eos_token": name_of(tok.eos_ids.first().copied()),
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        w(
            "tokenizer_config.json",
            serde_json::to_string_pretty(&tc).expect("json").as_bytes(),
        )?;
        let refs: Vec<(String, &HostTensor)> =
            tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        w("model.safetensors", &safetensors_bytes(&refs))?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}
