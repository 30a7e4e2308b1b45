//! The error type of the data stage.
//!
//! Every variant names the file, folder or setting at fault and, where there is one, what to do
//! about it, so that the orchestrator can print it as it is.

use std::path::PathBuf;

/// Errors raised while resolving, building, loading or transforming data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An error of the shared plumbing (artifacts, config).
    #[error(transparent)]
    Core(#[from] simtrans_core::CoreError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file or folder could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An IDX file is malformed or not what was expected.
    #[error("IDX file {file}: {reason}")]
    Idx { file: String, reason: String },
    /// The demo recipe cannot be built from the source it was given.
    #[error("demo recipe: {0}")]
    Recipe(String),
    /// A data set folder does not have the expected layout or content.
    #[error("{path}: {reason}; {fix}")]
    Layout {
        path: PathBuf,
        reason: String,
        fix: String,
    },
    /// An image could not be decoded.
    #[error("image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    /// A data artifact is inconsistent.
    #[error("data artifact: {0}; rerun the data stage with --force data")]
    Artifact(String),
    /// A request the loader or sampler cannot satisfy (unknown id, empty input).
    #[error("{0}")]
    Invalid(String),
    /// A path of the data stage that is not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(String),
}

/// Result with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// A layout error.
    pub fn layout(
        path: impl Into<PathBuf>,
        reason: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        DataError::Layout {
            path: path.into(),
            reason: reason.into(),
            fix: fix.into(),
        }
    }
}
