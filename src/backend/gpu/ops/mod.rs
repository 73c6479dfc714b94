//! Kernel launch wrappers, one per kernel family, written once over `Device` (CUDA or the
//! simulator): check shapes, build the launch explicitly, name the kernel `<op>_<dtype>`.

pub mod attention;
pub mod dense;
pub mod elementwise;
pub mod embedding;
pub mod lora;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod paged;
pub mod rope;
pub mod sampling;
pub mod swiglu;
pub mod w8a16;
pub mod w8a8;

pub use norm::*;
