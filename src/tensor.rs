//! Host-side tensors: the one in-memory representation every model source is loaded into,
//! whatever file it came from, and the element types the backends know.

use half::{bf16, f16};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I8,
    I32,
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::I32 => "i32",
            DType::U32 => "u32",
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Typed host storage.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I8(Vec<i8>),
    I32(Vec<i32>),
    U32(Vec<u32>),
}

impl HostData {
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
            HostData::I8(_) => DType::I8,
            HostData::I32(_) => DType::I32,
            HostData::U32(_) => DType::U32,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::I8(v) => v.len(),
            HostData::I32(v) => v.len(),
            HostData::U32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => HostData::F32(vec![0.0; len]),
            DType::F16 => HostData::F16(vec![f16::ZERO; len]),
            DType::BF16 => HostData::BF16(vec![bf16::ZERO; len]),
            DType::I8 => HostData::I8(vec![0; len]),
            DType::I32 => HostData::I32(vec![0; len]),
            DType::U32 => HostData::U32(vec![0; len]),
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
            HostData::I8(v) => bytemuck::cast_slice(v),
            HostData::I32(v) => bytemuck::cast_slice(v),
            HostData::U32(v) => bytemuck::cast_slice(v),
        }
    }
    /// Little-endian bytes → typed data (copies, so the source may be unaligned, e.g. a memmap).
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Result<Self> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(Error::Invalid(format!(
                "{} bytes is not a whole number of {dtype} elements",
                bytes.len()
            )));
        }
        fn read<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
            let n = bytes.len() / std::mem::size_of::<T>();
            let mut v: Vec<T> = vec![T::zeroed(); n];
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
            v
        }
        Ok(match dtype {
            DType::F32 => HostData::F32(read(bytes)),
            DType::F16 => HostData::F16(read(bytes)),
            DType::BF16 => HostData::BF16(read(bytes)),
            DType::I8 => HostData::I8(read(bytes)),
            DType::I32 => HostData::I32(read(bytes)),
            DType::U32 => HostData::U32(read(bytes)),
        })
    }
    /// Exact widening of float data to f32 (f16 and bf16 are subsets of f32).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(match self {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            other => {
                return Err(Error::Invalid(format!(
                    "expected float data, found {}",
                    other.dtype()
                )))
            }
        })
    }
}

/// A host tensor: row-major, last dimension fastest (the safetensors / PyTorch convention).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: HostData) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape(format!(
                "shape {shape:?} has {n} elements but the data has {}",
                data.len()
            )));
        }
        Ok(HostTensor { shape, data })
    }
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Result<Self> {
        Self::new(shape, HostData::F32(v))
    }
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.data.to_f32()
    }
    /// No NaN or infinity among the values (read in place; integer tensors always are).
    pub fn all_finite(&self) -> bool {
        match &self.data {
            HostData::F32(x) => x.iter().all(|x| x.is_finite()),
            HostData::F16(x) => x.iter().all(|x| x.is_finite()),
            HostData::BF16(x) => x.iter().all(|x| x.is_finite()),
            _ => true,
        }
    }
    /// The same values in another float type (rounding to nearest even when narrowing); a tensor
    /// already of `dtype` is returned as is. Integer tensors convert only to themselves.
    pub fn to_dtype(&self, dtype: DType) -> Result<HostTensor> {
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        if !self.dtype().is_float() || !dtype.is_float() {
            return Err(Error::Invalid(format!(
                "cannot convert a {} tensor to {dtype}",
                self.dtype()
            )));
        }
        let v = self.to_f32()?;
        let data = match dtype {
            DType::F32 => HostData::F32(v),
            DType::F16 => HostData::F16(v.into_iter().map(f16::from_f32).collect()),
            DType::BF16 => HostData::BF16(v.into_iter().map(bf16::from_f32).collect()),
            _ => unreachable!("float checked above"),
        };
        HostTensor::new(self.shape.clone(), data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_conversion_rounds_to_nearest_and_refuses_integers() {
        // 1 + 2^-8 is halfway between two bf16 values (1 and 1 + 2^-7): ties go to even (1.0);
        // 1 + 3·2^-9 rounds up to 1 + 2^-7. f16 keeps both exactly.
        let t = HostTensor::f32(vec![3], vec![1.0 + 1.0 / 256.0, 1.0 + 3.0 / 512.0, -2.5]).unwrap();
        let b = t.to_dtype(DType::BF16).unwrap().to_f32().unwrap();
        assert_eq!(b, vec![1.0, 1.0 + 1.0 / 128.0, -2.5]);
        assert_eq!(
            t.to_dtype(DType::F16).unwrap().to_f32().unwrap(),
            t.to_f32().unwrap()
        );
        assert_eq!(t.to_dtype(DType::F32).unwrap(), t);
        let i = HostTensor::new(vec![2], HostData::U32(vec![1, 2])).unwrap();
        assert!(i.to_dtype(DType::F32).is_err());
        assert_eq!(i.to_dtype(DType::U32).unwrap(), i);
    }
}
