//! The error type of the backbone crate.
//!
//! Each variant says what is wrong with which file or setting and how to fix it.

use std::path::PathBuf;

/// Errors of weight loading and step 0.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// Plumbing: artifacts, checkpoints, configuration, non-finite losses.
    #[error(transparent)]
    Core(#[from] simtrans_core::CoreError),
    /// The data index or image loading failed.
    #[error(transparent)]
    Data(#[from] simtrans_data::DataError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A state dict does not fit the network.
    #[error("{path}: the weights do not fit the network ({} problems): {}; check that the file belongs to this architecture", problems.len(), problems.join("; "))]
    StateDict {
        path: PathBuf,
        problems: Vec<String>,
    },
    /// A reference checkpoint does not fit the configured network.
    #[error("{0}")]
    Import(String),
    /// Pretrained weights could not be found or downloaded.
    #[error("{0}")]
    Weights(String),
    /// A configuration value this stage does not understand.
    #[error("backbone config: {0}")]
    Config(String),
}

/// Result with [`BackboneError`].
pub type Result<T> = std::result::Result<T, BackboneError>;
