//! One error type for the library. Every variant that comes from user input names the file
//! (or the tensor) and the problem, so a CLI can print it and exit non-zero without a panic.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The I/O error's text is part of the message (not a separate `source`), so a chain
    /// printer such as anyhow's `{:#}` does not say it twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A file whose contents are not what its format requires (truncated, corrupted, ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// Something valid in the format that this engine does not support (a tensor type, an
    /// architecture).
    #[error("{path}: unsupported: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    /// A tensor or buffer whose shape disagrees with what the model or the op expects.
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A device (CUDA, simulator) error, naming the kernel or operation.
    #[error("device: {0}")]
    Device(String),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            err: source,
        }
    }
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn unsupported(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}
