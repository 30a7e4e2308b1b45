//! The one error type of the plumbing crate.
//!
//! Each variant names the file or the thing that is wrong and, where there is one, the command
//! that fixes it, so that the orchestrator can print it as a one-line message.

use std::path::PathBuf;

/// Errors raised by the shared plumbing.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A name on the command line or in a config that matches nothing known.
    #[error("{0}")]
    Unknown(String),
    /// A configuration file or override could not be understood.
    #[error("config: {0}")]
    Config(String),
    /// An artifact a stage needs is not in the run directory.
    #[error("{node} artifact missing at {path}: build it with `{command}`")]
    ArtifactMissing {
        node: String,
        path: PathBuf,
        command: String,
    },
    /// An artifact exists but was built from another configuration or other inputs.
    #[error("{node} artifact at {path} is stale ({reason}): rebuild it with `{command}`")]
    ArtifactStale {
        node: String,
        path: PathBuf,
        reason: String,
        command: String,
    },
    /// An artifact is truncated, edited by hand, or not one of ours.
    #[error("{path} is corrupt or foreign ({reason}): delete it and rerun its stage")]
    ArtifactCorrupt { path: PathBuf, reason: String },
    /// An artifact is readable but does not have the tensors the stage expects.
    #[error("{path} does not match the {node} schema v{version}: {reason}; rerun the stage with --force {node}")]
    Schema {
        path: PathBuf,
        node: String,
        version: u32,
        reason: String,
    },
    /// The requested device is unavailable in this build or on this machine.
    #[error("device {0}")]
    Device(String),
    /// A stage that has not been built yet.
    #[error("stage `{0}` is not implemented yet; no artifact was written")]
    NotImplemented(String),
    /// Training diverged.
    #[error("{what} became NaN or infinite at epoch {epoch}, step {step}; the last good checkpoint is kept in {checkpoint_dir}")]
    NonFinite {
        what: String,
        epoch: usize,
        step: usize,
        checkpoint_dir: PathBuf,
    },
}

/// Result with [`CoreError`].
pub type Result<T> = std::result::Result<T, CoreError>;

impl CoreError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }
}
