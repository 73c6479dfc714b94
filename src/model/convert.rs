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

/// One tensor's entry in a safetensors header: name, dtype, shape and byte range in the data.
struct Entry {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    range: (u64, u64),
}

/// The JSON header of a safetensors file (`__metadata__` format "pt", then every tensor).
fn header_json(entries: &[Entry]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    for e in entries {
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [e.range.0, e.range.1]}),
        );
    }
    serde_json::Value::Object(header).to_string().into_bytes()
}

/// Serialize tensors in the safetensors format (8-byte header length, JSON header, data).
pub fn safetensors_bytes(tensors: &[(String, &HostTensor)]) -> Vec<u8> {
    let mut off = 0u64;
    let entries: Vec<Entry> = tensors
        .iter()
        .map(|(name, t)| {
            let n = t.data.as_bytes().len() as u64;
            off += n;
            Entry {
                name: name.clone(),
                dtype: st_dtype(t.dtype()),
                shape: t.shape.clone(),
                range: (off - n, off),
            }
        })
        .collect();
    let mut h = header_json(&entries);
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + off as usize);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, t) in tensors {
        out.extend_from_slice(t.data.as_bytes());
    }
    out
}

/// A safetensors file written one tensor at a time, so a model is never held whole in memory
/// (a 7B model in bf16 is 13.5 GB; held twice, as the tensors and as the file's bytes, it
/// would not fit a 24 GiB machine). The header must precede the data but its offsets are known
/// only at the end, so room is reserved for it first, sized by a header with every tensor
/// given the longest dtype name and 20-digit offsets; the real header is written into that
/// room at the end, padded with spaces (the format allows trailing whitespace in the header).
struct SafetensorsStream {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    room: usize,
    written: Vec<Entry>,
    off: u64,
}

impl SafetensorsStream {
    /// `planned`: every tensor's name and shape, in the order they will be appended.
    fn create(path: &Path, planned: &[(String, Vec<usize>)]) -> Result<Self> {
        let widest: Vec<Entry> = planned
            .iter()
            .map(|(name, shape)| Entry {
                name: name.clone(),
                dtype: "BF16",
                shape: shape.clone(),
                range: (u64::MAX / 2, u64::MAX / 2),
            })
            .collect();
        let room = header_json(&widest).len().next_multiple_of(8);
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut s = SafetensorsStream {
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            room,
            written: Vec::with_capacity(planned.len()),
            off: 0,
        };
        s.write(&vec![0u8; 8 + room])?;
        Ok(s)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }

    fn append(&mut self, name: &str, t: &HostTensor) -> Result<()> {
        let bytes = t.data.as_bytes();
        self.write(bytes)?;
        let start = self.off;
        self.off += bytes.len() as u64;
        self.written.push(Entry {
            name: name.to_string(),
            dtype: st_dtype(t.dtype()),
            shape: t.shape.clone(),
            range: (start, self.off),
        });
        Ok(())
    }

    /// Write the header into its room and flush the file to disk.
    fn finish(self) -> Result<()> {
        use std::io::{Seek, SeekFrom};
        let mut h = header_json(&self.written);
        if h.len() > self.room {
            return Err(Error::Invalid(format!(
                "{}: the safetensors header ({} bytes) outgrew the {} bytes reserved for it \
                 (a tensor not in the plan?)",
                self.path.display(),
                h.len(),
                self.room
            )));
        }
        h.resize(self.room, b' ');
        let path = self.path.clone();
        let mut f = self
            .file
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        let io = |e| Error::io(&path, e);
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        f.write_all(&(self.room as u64).to_le_bytes()).map_err(io)?;
        f.write_all(&h).map_err(io)?;
        f.sync_all().map_err(io)
    }
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
    /// Open the temporary file beside `path`, creating missing parent folders. A `path` that
    /// is a folder is refused here, not at the final rename.
    pub fn create(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Err(folder_for_a_file(path));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
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

/// Whether two paths name the same place, by their [`resolved`] forms (so `./a.json` and
/// `a.json`, or a link and its target, are one, whether or not the file exists yet).
pub fn same_file(a: &Path, b: &Path) -> bool {
    resolved(a) == resolved(b)
}

/// `p` as an absolute path with its existing part's links and `..` resolved (what is below
/// it, not yet created, taken as written), so two spellings of one place compare equal.
pub fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut rest = vec![];
    let mut at = abs.as_path();
    loop {
        if let Ok(c) = at.canonicalize() {
            return rest.iter().rev().fold(c, |acc, n| acc.join(n));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                at = parent;
            }
            _ => return abs,
        }
    }
}

fn folder_for_a_file(path: &Path) -> Error {
    Error::Invalid(format!(
        "{}: is a folder; the output is a file, so give a file name",
        path.display()
    ))
}

/// What an output path is to become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    File,
    Folder,
}

/// Refuse, before a long run, an output its end could not write: a file path naming a folder,
/// a folder path naming a file, a path below a file, or a place whose nearest existing folder
/// takes no new file (checked by creating and removing a hidden probe file there). Missing
/// folders are fine: the writers create them. Nothing is left behind.
pub fn check_output(path: &Path, kind: Output) -> Result<()> {
    let refuse = |what: &Path, why: &str| Err(Error::Invalid(format!("{}: {why}", what.display())));
    if let Ok(meta) = std::fs::metadata(path) {
        match kind {
            Output::File if meta.is_dir() => return Err(folder_for_a_file(path)),
            Output::Folder if !meta.is_dir() => {
                return refuse(path, "exists and is not a folder; the output is a folder")
            }
            _ => {}
        }
    }
    // The nearest folder that exists: where the file, or the first missing folder, is created.
    let start = match kind {
        Output::Folder if path.is_dir() => path,
        _ => path.parent().unwrap_or(Path::new("")),
    };
    let mut at = start;
    let dir = loop {
        let here = if at.as_os_str().is_empty() {
            Path::new(".")
        } else {
            at
        };
        match std::fs::metadata(here) {
            Ok(m) if m.is_dir() => break here,
            Ok(_) => return refuse(here, "is not a folder, so nothing can be written below it"),
            Err(_) => match at.parent() {
                Some(p) => at = p,
                None => break here,
            },
        }
    };
    let probe = dir.join(format!(".recforge-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        // A probe of an earlier process with this id: the folder takes files.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => refuse(dir, &format!("cannot create a file in this folder ({e})")),
    }
}

fn tmp_name(path: &Path) -> PathBuf {
    hidden_beside(path, "tmp")
}

/// `.NAME.KIND-PID` beside `path` (NAME its file name, PID this process's id): where a writer
/// puts what becomes `path` once complete, or moves the old `path` aside.
pub fn hidden_beside(path: &Path, kind: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{kind}-{}", std::process::id()))
}

/// The entries [`hidden_beside`] names for `path` with one of `kinds`, by any process: each
/// with the process id its name ends in (None where that is not a number).
pub fn all_hidden_beside(path: &Path, kinds: &[&str]) -> Vec<(PathBuf, Option<u32>)> {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return vec![];
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return vec![];
    };
    let prefixes: Vec<String> = kinds.iter().map(|k| format!(".{name}.{k}-")).collect();
    entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let pid = prefixes.iter().find_map(|p| n.strip_prefix(p.as_str()))?;
            Some((e.path(), pid.parse::<u32>().ok()))
        })
        .collect()
}

/// Removes what [`all_hidden_beside`] finds for `path` that processes no longer running left
/// (killed mid-write). Only where /proc says which processes run (Linux); another running
/// process's write in progress is left alone.
pub fn remove_stale_beside(path: &Path, kinds: &[&str]) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let me = std::process::id();
    for (p, pid) in all_hidden_beside(path, kinds) {
        if let Some(pid) = pid {
            if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
                    _ => std::fs::remove_file(&p),
                };
            }
        }
    }
}

/// The error text of a conversion stopped by Ctrl-C.
pub const INTERRUPTED: &str = "interrupted";

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

/// `to_hf_folder` with every tensor stored in `dtype` (f32, f16 or bf16) instead of the
/// precision the source gives it — bf16 halves a dequantized GGUF's f32 output. None keeps the
/// source's.
pub fn to_hf_folder_as(
    src: &dyn ModelSource,
    out: &Path,
    dtype: Option<DType>,
    progress: impl FnMut(usize, usize),
) -> Result<()> {
    to_hf_folder_with(src, out, progress, |name, t| {
        cast_for_output(name, t, dtype)
    })
}

/// `t` in `dtype` (rounded to nearest even), or as it is for None. Only f32, f16 and bf16 are
/// output types; a finite value that f16 cannot hold is an error naming the tensor.
pub fn cast_for_output(name: &str, t: HostTensor, dtype: Option<DType>) -> Result<HostTensor> {
    let Some(dtype) = dtype else {
        return Ok(t);
    };
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Invalid(format!(
            "models are written in f32, f16 or bf16, not {dtype}"
        )));
    }
    if t.dtype() == dtype {
        return Ok(t);
    }
    let c = t.to_dtype(dtype)?;
    if !c.all_finite() && t.all_finite() {
        return Err(Error::Invalid(format!(
            "tensor {name} has values beyond the range of {dtype} (f16 holds up to 65504): \
             write it in bf16 or f32"
        )));
    }
    Ok(c)
}

/// `to_hf_folder` with every tensor passed through `transform(name, tensor)` first (merging an
/// adapter, changing the precision).
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
    check_output(out, Output::Folder)?;
    let cfg = src.config().clone();
    let tok = src.tokenizer()?;
    let names = cfg.tensor_names();
    let mut planned = Vec::with_capacity(names.len());
    for n in &names {
        let shape = cfg
            .expected_shape(n)
            .ok_or_else(|| Error::Invalid(format!("'{n}' is not a LLaMA tensor name")))?;
        planned.push((n.clone(), shape));
    }
    // What a killed earlier run into the same `out` left behind.
    remove_stale_beside(out, &["tmp"]);
    let tmp = tmp_name(out);
    let res = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let w = |name: &str, bytes: &[u8]| -> Result<()> {
            let p = tmp.join(name);
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
        };
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
        // One tensor in memory at a time: loaded, transformed, appended, dropped.
        let mut st = SafetensorsStream::create(&tmp.join("model.safetensors"), &planned)?;
        // Elements written per float type: config.json names the one most weights are in.
        let mut per_dtype: Vec<(DType, usize)> = vec![];
        for (i, (n, shape)) in planned.iter().enumerate() {
            // Ctrl-C (where the caller installed `stop_on_interrupt`): the partial folder goes.
            if crate::interrupted() {
                return Err(Error::Invalid(INTERRUPTED.into()));
            }
            let t = transform(n, src.tensor(n)?)?;
            if &t.shape != shape {
                return Err(Error::Shape(format!(
                    "tensor {n} has shape {:?}, the config implies {shape:?}",
                    t.shape
                )));
            }
            st.append(n, &t)?;
            match per_dtype.iter_mut().find(|(d, _)| *d == t.dtype()) {
                Some((_, count)) => *count += t.data.len(),
                None => per_dtype.push((t.dtype(), t.data.len())),
            }
            progress(i + 1, names.len());
        }
        st.finish()?;
        let main = per_dtype.iter().max_by_key(|(_, c)| *c).map(|(d, _)| *d);
        w(
            "config.json",
            cfg.to_hf_json_as(main.unwrap_or(DType::F32)).as_bytes(),
        )?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn outputs_are_checked_without_leaving_anything() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f.txt");
        std::fs::write(&file, "x").unwrap();
        // Missing folders are fine (the writers create them); nothing is created by the check.
        check_output(&d.path().join("new/deeper/out.json"), Output::File).unwrap();
        check_output(&d.path().join("new/adapter"), Output::Folder).unwrap();
        check_output(d.path(), Output::Folder).unwrap();
        check_output(&file, Output::File).unwrap();
        assert_eq!(names(d.path()), ["f.txt"]);
        let err = |p: &Path, k| check_output(p, k).unwrap_err().to_string();
        assert!(err(d.path(), Output::File).contains("is a folder"));
        assert!(err(&file, Output::Folder).contains("is not a folder"));
        let below = err(&file.join("x/y.json"), Output::File);
        assert!(
            below.contains("f.txt") && below.contains("nothing can be written below it"),
            "{below}"
        );
        assert_eq!(names(d.path()), ["f.txt"]);
    }

    #[test]
    fn a_streamed_safetensors_file_reads_back_as_the_whole_one() {
        use crate::tensor::HostData;
        let tensors: Vec<(String, HostTensor)> = vec![
            (
                "w.f32".into(),
                HostTensor::f32(vec![3, 5], (0..15).map(|i| i as f32 - 7.5).collect()).unwrap(),
            ),
            (
                "b.bf16".into(),
                HostTensor::new(
                    vec![7],
                    HostData::BF16(
                        (0..7)
                            .map(|i| half::bf16::from_f32(i as f32 * 0.25))
                            .collect(),
                    ),
                )
                .unwrap(),
            ),
            (
                "a.i8".into(),
                HostTensor::new(vec![1, 3], HostData::I8(vec![-128, 0, 127])).unwrap(),
            ),
            (
                "z.f16".into(),
                HostTensor::new(
                    vec![2, 1],
                    HostData::F16(vec![half::f16::from_f32(-2.0), half::f16::MAX]),
                )
                .unwrap(),
            ),
        ];
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m.safetensors");
        let planned: Vec<(String, Vec<usize>)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect();
        let mut st = SafetensorsStream::create(&path, &planned).unwrap();
        for (n, t) in &tensors {
            st.append(n, t).unwrap();
        }
        st.finish().unwrap();
        let streamed = std::fs::read(&path).unwrap();
        let refs: Vec<(String, &HostTensor)> =
            tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        let whole = safetensors_bytes(&refs);
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&streamed).unwrap(),
            safetensors::SafeTensors::deserialize(&whole).unwrap(),
        );
        let mut names = a.names();
        names.sort();
        let mut want = b.names();
        want.sort();
        assert_eq!(names, want);
        for n in names {
            let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
            assert_eq!(
                (x.dtype(), x.shape(), x.data()),
                (y.dtype(), y.shape(), y.data()),
                "{n}"
            );
        }
        // The header's room is whole 8-byte words and the data follows it directly.
        let room = u64::from_le_bytes(streamed[..8].try_into().unwrap()) as usize;
        assert_eq!(room % 8, 0);
        let data: usize = tensors.iter().map(|(_, t)| t.data.as_bytes().len()).sum();
        assert_eq!(streamed.len(), 8 + room + data);
    }

    #[test]
    fn atomic_files_make_their_folders_and_refuse_a_folder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/out.json");
        write_atomic(&p, b"{}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
        let e = write_atomic(&d.path().join("a"), b"{}").unwrap_err();
        assert!(e.to_string().contains("is a folder"), "{e}");
        assert_eq!(names(&d.path().join("a")), ["b"]);
        assert_eq!(names(&d.path().join("a/b")), ["out.json"]);
    }
}
