//! GGUF (llama.cpp's model format, versions 2 and 3): parsing, dequantization of the tensor
//! types we accept, and a small writer used by the test fixtures.
//!
//! Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
//! key/values, the tensor infos (name, dims with `ne[0]` the FASTEST dimension, type, offset into
//! the data section), then the data section starting at the next multiple of `general.alignment`
//! (default 32). All integers little-endian.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::tensor::{HostData, HostTensor};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The longest metadata array read. Real files' longest are the vocabulary's tokens, scores
/// and merges (10^5 entries); a longer count is corruption, refused before the entries (each
/// a `Value` of several times its size on disk) fill memory.
const MAX_ARRAY_LEN: usize = 1 << 24;

/// The fewest bytes one metadata value of GGUF type `type_id` takes in the file.
fn value_min_bytes(type_id: u32) -> u64 {
    match type_id {
        2 | 3 => 2,
        4..=6 => 4,
        // A string's length; an array's item type and count.
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => 1,
    }
}

/// ggml tensor type ids (ggml.h `enum ggml_type`), named as ggml names them.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
}

impl GgmlType {
    /// Every type recforge reads.
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }
    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2_K => (256, 84),
            GgmlType::Q3_K => (256, 110),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q5_K => (256, 176),
            GgmlType::Q6_K => (256, 210),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }
}

/// Names of the ggml types we do not accept, for error messages.
fn ggml_type_name(id: u32) -> String {
    let known = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    match known.get(id as usize) {
        Some(n) => format!("{n} (type id {id})"),
        None => format!("type id {id}"),
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the fastest dimension.
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Row-major shape (slowest first), the safetensors / PyTorch convention.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::format(
                self.path,
                format!(
                    "truncated GGUF file: needed {n} bytes for {what} at offset {} but the file has {} bytes",
                    self.pos,
                    self.buf.len()
                ),
            )),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    /// A count of entries that each take at least `min_bytes` of the file: a count the rest
    /// of the file cannot hold is corruption, caught before anything is reserved for it.
    fn len(&mut self, what: &str, min_bytes: u64) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n > left / min_bytes.max(1) {
            return Err(Error::format(
                self.path,
                format!(
                    "truncated or corrupted GGUF file: {what} claims {n} entries at offset {} but only {left} bytes remain",
                    self.pos,
                ),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::format(
                self.path,
                format!("corrupted GGUF file: {what} is not valid UTF-8"),
            )
        })
    }
    fn value(&mut self, type_id: u32, what: &str, depth: u32) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(self.u16(what)?),
            3 => Value::I16(self.u16(what)? as i16),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => Value::Bool(self.u8(what)? != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 4 {
                    return Err(Error::format(
                        self.path,
                        format!("corrupted GGUF file: arrays nested too deeply in {what}"),
                    ));
                }
                let item_type = self.u32(what)?;
                let n = self.len(what, value_min_bytes(item_type))?;
                if n > MAX_ARRAY_LEN {
                    return Err(Error::format(
                        self.path,
                        format!(
                            "corrupted GGUF file: {what} is an array of {n} entries; recforge \
                             reads at most {MAX_ARRAY_LEN} (vocabularies hold ~10^5)"
                        ),
                    ));
                }
                // Reserve what the file can hold, not what the count claims: each entry
                // costs more in memory than its bytes on disk.
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(item_type, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!("corrupted GGUF file: unknown metadata value type {other} in {what}"),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this struct; a file truncated underneath
        // us by another process is outside what any reader can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: memmap2::Mmap) -> Result<Self> {
        let mut c = Cursor {
            buf: &map,
            pos: 0,
            path,
        };
        let magic = c.take(4, "the magic number")?;
        if magic != MAGIC {
            return Err(Error::format(
                path,
                format!("not a GGUF file: magic bytes are {magic:?}, expected \"GGUF\""),
            ));
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(
                path,
                format!("GGUF version {version} (2 and 3 are supported)"),
            ));
        }
        // A tensor entry is at least a name length, a rank, one dim, a type and an offset;
        // a metadata entry a key length, a type and a one-byte value.
        let n_tensors = c.len("the tensor count", 8 + 4 + 8 + 4 + 8)?;
        let n_kv = c.len("the metadata count", 8 + 4 + 1)?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("the type of metadata '{key}'"))?;
            let v = c.value(ty, &format!("metadata '{key}'"), 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            let n_dims = c.u32(&format!("the rank of tensor '{name}'"))?;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::format(
                    path,
                    format!("corrupted GGUF file: tensor '{name}' has {n_dims} dimensions"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("the dims of tensor '{name}'"))?);
            }
            let type_id = c.u32(&format!("the type of tensor '{name}'"))?;
            let offset = c.u64(&format!("the offset of tensor '{name}'"))?;
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!("corrupted GGUF file: general.alignment is {v:?}"),
                    )
                })?,
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file = GgufFile {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
            data_start: data_start as usize,
        };
        // Validate every tensor's extent now, so a truncated file fails at open, not mid-load.
        for t in &file.tensors {
            file.byte_range(t)?;
        }
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Byte offset of the tensor data: everything before it is header and metadata.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn byte_range(&self, t: &TensorInfo) -> Result<std::ops::Range<usize>> {
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| {
            Error::unsupported(
                &self.path,
                format!(
                    "tensor '{}' has ggml type {}; supported: {}",
                    t.name,
                    ggml_type_name(t.type_id),
                    GgmlType::ALL.map(GgmlType::name).join(", ")
                ),
            )
        })?;
        let (bs, bb) = ty.block();
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!(
                        "corrupted GGUF file: tensor '{}' has impossible dims {:?}",
                        t.name, t.dims
                    ),
                )
            })?;
        if !t.dims[0].is_multiple_of(bs as u64) {
            return Err(Error::format(
                &self.path,
                format!("tensor '{}' of type {} has a row of {} elements, not a multiple of its block size {bs}", t.name, ty.name(), t.dims[0]),
            ));
        }
        let bytes = (n / bs as u64).checked_mul(bb as u64);
        let start = (self.data_start as u64).checked_add(t.offset);
        let end = match (start, bytes) {
            (Some(s), Some(b)) => s.checked_add(b),
            _ => None,
        };
        match (start, end) {
            (Some(s), Some(e)) if e <= self.map.len() as u64 => Ok(s as usize..e as usize),
            _ => Err(Error::format(
                &self.path,
                format!(
                    "truncated GGUF file: tensor '{}' ({} {:?}) extends past the end of the file ({} bytes)",
                    t.name,
                    ty.name(),
                    t.dims,
                    self.map.len()
                ),
            )),
        }
    }

    /// The raw bytes of a tensor.
    pub fn raw(&self, t: &TensorInfo) -> Result<&[u8]> {
        Ok(&self.map[self.byte_range(t)?])
    }

    /// Load a tensor in row-major order; quantized types are dequantized to f32, float types
    /// are kept in their own precision.
    pub fn load(&self, t: &TensorInfo) -> Result<HostTensor> {
        let bytes = self.raw(t)?;
        let ty = GgmlType::from_id(t.type_id).expect("checked by byte_range");
        let data = match ty {
            GgmlType::F32 => HostData::from_le_bytes(crate::tensor::DType::F32, bytes)?,
            GgmlType::F16 => HostData::from_le_bytes(crate::tensor::DType::F16, bytes)?,
            GgmlType::BF16 => HostData::from_le_bytes(crate::tensor::DType::BF16, bytes)?,
            q => HostData::F32(dequantize(q, bytes)),
        };
        HostTensor::new(t.shape(), data)
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantize whole blocks of a quantized ggml type (ggml-quants.c `dequantize_row_*`).
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let (bs, bb) = ty.block();
    let mut out = vec![0f32; bytes.len() / bb * bs];
    for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
        match ty {
            // d: f16, qs: 32 × i8;  x = q·d
            GgmlType::Q8_0 => {
                let d = f16_at(blk, 0);
                for j in 0..32 {
                    o[j] = (blk[2 + j] as i8) as f32 * d;
                }
            }
            // d: f16, qs: 16 bytes; low nibbles are elements 0..16, high nibbles 16..32; x = (q-8)·d
            GgmlType::Q4_0 => {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    let q = blk[2 + j];
                    o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
            // d, m: f16, qs: 16 bytes as Q4_0; x = q·d + m
            GgmlType::Q4_1 => {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for j in 0..16 {
                    let q = blk[4 + j];
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            // d: f16, qh: 32 high bits (u32 LE), qs: 16 bytes as Q4_0; x = (q | h<<4) - 16)·d
            GgmlType::Q5_0 => {
                let d = f16_at(blk, 0);
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                for j in 0..16 {
                    let q = blk[6 + j];
                    let lo = (q & 0x0f) as u32 | ((qh >> j) & 1) << 4;
                    let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    o[j] = (lo as i32 - 16) as f32 * d;
                    o[j + 16] = (hi as i32 - 16) as f32 * d;
                }
            }
            // d, m: f16, then as Q5_0 without the offset; x = q·d + m
            GgmlType::Q5_1 => {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
                for j in 0..16 {
                    let q = blk[8 + j];
                    let lo = (q & 0x0f) as u32 | ((qh >> j) & 1) << 4;
                    let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    o[j] = lo as f32 * d + m;
                    o[j + 16] = hi as f32 * d + m;
                }
            }
            // 256 elements in 16 sub-blocks of 16. scales: 16 bytes (low nibble the sub-block's
            // scale, high nibble its min), qs: 64 bytes of 2-bit quants, d, dmin: f16;
            // x = d·sc·q − dmin·m. Element 128h + 32s + l is bits 2s..2s+2 of qs[32h + l].
            GgmlType::Q2_K => {
                let (sc, qs) = (&blk[..16], &blk[16..80]);
                let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
                for h in 0..2 {
                    for s in 0..4 {
                        for l in 0..32 {
                            let e = 128 * h + 32 * s + l;
                            let k = sc[e / 16];
                            let q = (qs[32 * h + l] >> (2 * s)) & 3;
                            o[e] = d * (k & 0x0f) as f32 * q as f32 - dmin * (k >> 4) as f32;
                        }
                    }
                }
            }
            // 256 elements in 16 sub-blocks of 16. hmask: 32 bytes of high bits, qs: 64 bytes of
            // 2-bit lows (placed as Q2_K's), 16 6-bit scales packed in 12 bytes (below), d: f16
            // at the end; x = d·(sc − 32)·(q − 4·(1 − h)), the high bit of element 128h + 32s + l
            // being bit 4h + s of hmask[l] — set means no offset.
            GgmlType::Q3_K => {
                let (hm, qs, sc) = (&blk[..32], &blk[32..96], &blk[96..108]);
                let d = f16_at(blk, 108);
                for h in 0..2 {
                    for s in 0..4 {
                        for l in 0..32 {
                            let e = 128 * h + 32 * s + l;
                            let q = ((qs[32 * h + l] >> (2 * s)) & 3) as i32;
                            let offset = if (hm[l] >> (4 * h + s)) & 1 == 1 {
                                0
                            } else {
                                4
                            };
                            o[e] = d * q3k_scale(sc, e / 16) * (q - offset) as f32;
                        }
                    }
                }
            }
            // 256 elements in 8 sub-blocks of 32, each with a 6-bit scale and min packed in 12
            // bytes; d, dmin: f16; 4-bit qs; x = d·sc·q − dmin·m. Q5_K adds a fifth bit per
            // element from 32 bytes qh before qs (bit 2c for the low nibbles of chunk c, 2c + 1
            // for the high ones).
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let sc = &blk[4..16];
                let (qh, qs) = match ty {
                    GgmlType::Q5_K => (Some(&blk[16..48]), &blk[48..176]),
                    _ => (None, &blk[16..144]),
                };
                let high = |l: usize, bit: usize| qh.map_or(0, |h: &[u8]| ((h[l] >> bit) & 1) << 4);
                for c in 0..4 {
                    let (s1, m1) = k_scale_min(sc, 2 * c);
                    let (s2, m2) = k_scale_min(sc, 2 * c + 1);
                    let (d1, n1, d2, n2) = (d * s1, dmin * m1, d * s2, dmin * m2);
                    let q = &qs[32 * c..32 * c + 32];
                    for l in 0..32 {
                        o[64 * c + l] = d1 * ((q[l] & 0x0f) | high(l, 2 * c)) as f32 - n1;
                        o[64 * c + 32 + l] = d2 * ((q[l] >> 4) | high(l, 2 * c + 1)) as f32 - n2;
                    }
                }
            }
            // ql: 128 bytes of low nibbles, qh: 64 bytes of 2-bit highs, 16 i8 scales (one per
            // 16 elements), d: f16 at the end; x = d·sc·(q − 32), two halves of 128
            GgmlType::Q6_K => {
                let d = f16_at(blk, 208);
                for h in 0..2 {
                    let ql = &blk[64 * h..64 * h + 64];
                    let qh = &blk[128 + 32 * h..128 + 32 * h + 32];
                    let sc = &blk[192 + 8 * h..192 + 8 * h + 8];
                    let y = &mut o[128 * h..128 * h + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | (qh[l] & 3) << 4) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) as i32 - 32;
                        let s = |k: usize| d * (sc[is + k] as i8) as f32;
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("not a block type"),
        }
    }
    out
}

/// Scale `i` (0..16) of a Q3_K block, less its offset of 32: the low 4 bits from the nibbles
/// of bytes 0..8 (low nibbles for scales 0..8, high for 8..16), the top 2 bits from bytes
/// 8..12 (byte 8 + i % 4, bits 2·(i / 4)).
fn q3k_scale(sc: &[u8], i: usize) -> f32 {
    let low = if i < 8 { sc[i] & 0x0f } else { sc[i - 8] >> 4 };
    let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
    ((low | high << 4) as i32 - 32) as f32
}

/// Scale and min `j` (0..8) of a Q4_K / Q5_K block: 6 bits each, packed in 12 bytes — the
/// first four pairs in the low 6 bits of bytes j and j + 4, the last four from the nibbles of
/// bytes j + 4 and the top 2 bits of bytes j − 4 and j.
fn k_scale_min(q: &[u8], j: usize) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// Undo llama.cpp's row permutation of attn_q / attn_k. llama.cpp's converter reorders the rows
/// of each head from HF's rotate-half order (first half, second half) to interleaved pairs:
/// gguf row `h·hd + 2j + s` holds HF row `h·hd + s·hd/2 + j`.
pub fn unpermute_rows(w: &HostTensor, n_heads: usize) -> Result<HostTensor> {
    permute_impl(w, n_heads, false)
}

/// llama.cpp's permutation (HF → gguf), for writing fixtures.
pub fn permute_rows(w: &HostTensor, n_heads: usize) -> Result<HostTensor> {
    permute_impl(w, n_heads, true)
}

fn permute_impl(w: &HostTensor, n_heads: usize, to_gguf: bool) -> Result<HostTensor> {
    let rows = w.shape[0];
    let cols: usize = w.shape[1..].iter().product();
    if n_heads == 0 || !rows.is_multiple_of(n_heads) || !(rows / n_heads).is_multiple_of(2) {
        return Err(Error::Shape(format!(
            "cannot split {rows} rows into {n_heads} rotary heads"
        )));
    }
    let hd = rows / n_heads;
    let map = |r: usize| -> usize {
        // r is an HF row; return its gguf row
        let (h, i) = (r / hd, r % hd);
        let (s, j) = (i / (hd / 2), i % (hd / 2));
        h * hd + 2 * j + s
    };
    fn go<T: Copy>(
        src: &[T],
        cols: usize,
        rows: usize,
        to_gguf: bool,
        map: &dyn Fn(usize) -> usize,
    ) -> Vec<T> {
        let mut dst = src.to_vec();
        for r in 0..rows {
            let g = map(r);
            let (from, to) = if to_gguf { (r, g) } else { (g, r) };
            dst[to * cols..(to + 1) * cols].copy_from_slice(&src[from * cols..(from + 1) * cols]);
        }
        dst
    }
    let data = match &w.data {
        HostData::F32(v) => HostData::F32(go(v, cols, rows, to_gguf, &map)),
        HostData::F16(v) => HostData::F16(go(v, cols, rows, to_gguf, &map)),
        HostData::BF16(v) => HostData::BF16(go(v, cols, rows, to_gguf, &map)),
        other => {
            return Err(Error::Invalid(format!(
                "cannot permute {} rows",
                other.dtype()
            )))
        }
    };
    HostTensor::new(w.shape.clone(), data)
}

// ----------------------------------------------------------------------------------------------
// Writer (fixtures and tests).

/// Tensor data to write, already encoded in a ggml type.
pub struct WriteTensor {
    pub name: String,
    /// Row-major shape (slowest first); written reversed as ggml dims.
    pub shape: Vec<usize>,
    pub type_id: u32,
    pub bytes: Vec<u8>,
}

impl WriteTensor {
    pub fn f32(name: &str, shape: Vec<usize>, v: &[f32]) -> Self {
        WriteTensor {
            name: name.into(),
            shape,
            type_id: GgmlType::F32.id(),
            bytes: bytemuck::cast_slice(v).to_vec(),
        }
    }
    pub fn f16(name: &str, shape: Vec<usize>, v: &[f16]) -> Self {
        WriteTensor {
            name: name.into(),
            shape,
            type_id: GgmlType::F16.id(),
            bytes: bytemuck::cast_slice(v).to_vec(),
        }
    }
    pub fn bf16(name: &str, shape: Vec<usize>, v: &[bf16]) -> Self {
        WriteTensor {
            name: name.into(),
            shape,
            type_id: GgmlType::BF16.id(),
            bytes: bytemuck::cast_slice(v).to_vec(),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            let item_type = items.first().map(|i| i.type_id()).unwrap_or(4);
            out.extend_from_slice(&item_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Serialize a GGUF v3 file (alignment 32).
pub fn encode(metadata: &[(String, Value)], tensors: &[WriteTensor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let align = DEFAULT_ALIGNMENT as usize;
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&t.type_id.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.bytes.len().div_ceil(align) * align;
    }
    out.resize(out.len().div_ceil(align) * align, 0);
    for t in tensors {
        out.extend_from_slice(&t.bytes);
        out.resize(out.len().div_ceil(align) * align, 0);
    }
    out
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    #[test]
    fn every_type_id_read_is_listed_once() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty), "{}", ty.name());
            assert_eq!(GgmlType::ALL.iter().filter(|&&t| t == ty).count(), 1);
        }
        for id in 0..64 {
            if let Some(ty) = GgmlType::from_id(id) {
                assert!(
                    GgmlType::ALL.contains(&ty),
                    "type id {id} is read but not listed"
                );
            }
        }
    }

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q8_0_block_by_hand() {
        let mut blk = h(0.5).to_vec();
        for j in 0..32 {
            blk.push((j as i8 - 16) as u8);
        }
        let x = dequantize(GgmlType::Q8_0, &blk);
        for j in 0..32 {
            assert_eq!(x[j], (j as f32 - 16.0) * 0.5, "element {j}");
        }
    }

    #[test]
    fn q4_0_block_by_hand() {
        let mut blk = h(0.25).to_vec();
        // byte j: low nibble j, high nibble 15-j
        for j in 0..16u8 {
            blk.push(j | ((15 - j) << 4));
        }
        let x = dequantize(GgmlType::Q4_0, &blk);
        for j in 0..16 {
            assert_eq!(x[j], (j as f32 - 8.0) * 0.25);
            assert_eq!(x[j + 16], ((15 - j) as f32 - 8.0) * 0.25);
        }
    }

    #[test]
    fn q4_1_block_by_hand() {
        let mut blk = h(2.0).to_vec();
        blk.extend_from_slice(&h(-3.0));
        for j in 0..16u8 {
            blk.push((j % 7) | ((j / 2) << 4));
        }
        let x = dequantize(GgmlType::Q4_1, &blk);
        for j in 0..16 {
            assert_eq!(x[j], (j % 7) as f32 * 2.0 - 3.0);
            assert_eq!(x[j + 16], (j / 2) as f32 * 2.0 - 3.0);
        }
    }

    #[test]
    fn permutation_matches_llama_cpp_reshape() {
        // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, hd, cols) = (3, 4, 2);
        let rows = n_head * hd;
        let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let w = HostTensor::f32(vec![rows, cols], v.clone()).unwrap();
        let g = permute_rows(&w, n_head).unwrap().to_f32().unwrap();
        for h in 0..n_head {
            for j in 0..hd / 2 {
                for s in 0..2 {
                    // after swapaxes, index (h, j, s) comes from (h, s, j)
                    let dst_row = h * hd + j * 2 + s;
                    let src_row = h * hd + s * (hd / 2) + j;
                    for c in 0..cols {
                        assert_eq!(g[dst_row * cols + c], v[src_row * cols + c]);
                    }
                }
            }
        }
        let back = unpermute_rows(&HostTensor::f32(vec![rows, cols], g).unwrap(), n_head).unwrap();
        assert_eq!(back.to_f32().unwrap(), v);
    }

    #[test]
    fn roundtrip_header_and_metadata() {
        let md = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            (
                "a.list".to_string(),
                Value::Array(vec![Value::I32(-1), Value::I32(7)]),
            ),
            ("general.alignment".to_string(), Value::U32(32)),
        ];
        let t = WriteTensor::f32("x", vec![2, 3], &[1., 2., 3., 4., 5., 6.]);
        let bytes = encode(&md, &[t]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, &bytes).unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(
            f.get("a.list").unwrap().as_array().unwrap()[0],
            Value::I32(-1)
        );
        let info = f.tensor_info("x").unwrap().clone();
        assert_eq!(info.dims, vec![3, 2]);
        let x = f.load(&info).unwrap();
        assert_eq!(x.shape, vec![2, 3]);
        assert_eq!(x.to_f32().unwrap(), vec![1., 2., 3., 4., 5., 6.]);
    }
}
