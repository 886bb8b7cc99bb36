//! The one error type of nash-core and every plugin.

use std::path::PathBuf;

/// Result with nash's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in nash, each variant saying where and what would be valid.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid. `path` is the dotted config path (`model.generator.layers[2]`).
    #[error("invalid config at `{path}`: {message}")]
    Config { path: String, message: String },
    /// Two tensors or layers do not fit together.
    #[error("shape mismatch in {context}: expected {expected}, got {actual}")]
    Shape {
        context: String,
        expected: String,
        actual: String,
    },
    /// An operation is not supported by this component, and why.
    #[error("{what} is not supported: {why}")]
    Unsupported { what: String, why: String },
    /// A plugin was refused or failed to load.
    #[error("plugin {path}: {message}")]
    Plugin { path: PathBuf, message: String },
    /// A data file is missing, truncated or mis-shaped.
    #[error("data file {path}: {message}")]
    Data { path: PathBuf, message: String },
    /// A checkpoint or state dictionary could not be read or applied.
    #[error("state `{key}`: {message}")]
    State { key: String, message: String },
    /// A loss or tensor became NaN or infinite.
    #[error("non-finite value in {what}")]
    NonFinite { what: String },
    /// An I/O error, with the file it happened on.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON (de)serialization error.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// A [`Error::Config`] at `path`.
    pub fn config(path: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
    /// A [`Error::Shape`] in `context`.
    pub fn shape(context: impl Into<String>, expected: impl ToString, actual: impl ToString) -> Self {
        Error::Shape {
            context: context.into(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }
    /// A [`Error::Unsupported`]: `what` cannot be done, because `why`.
    pub fn unsupported(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Unsupported {
            what: what.into(),
            why: why.into(),
        }
    }
    /// A [`Error::State`] for `key`.
    pub fn state(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::State {
            key: key.into(),
            message: message.into(),
        }
    }
    /// An [`Error::Io`] on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<dfdx::tensor::CpuError> for Error {
    fn from(e: dfdx::tensor::CpuError) -> Self {
        Error::Other(format!("tensor device error: {e:?}"))
    }
}

#[cfg(feature = "cuda")]
impl From<dfdx::tensor::CudaError> for Error {
    fn from(e: dfdx::tensor::CudaError) -> Self {
        Error::Other(format!("CUDA device error: {e:?}"))
    }
}
