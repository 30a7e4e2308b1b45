//! The error type of the checkpoint reader.
//!
//! A checkpoint comes from outside the project (the authors' downloads, a user's own training),
//! so every way it can be unreadable is a named variant whose message names the file, says
//! what was found and what to do; none of them is a panic. The message is complete by itself
//! (an underlying error is part of it, not a separate cause).

/// Why a checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PthError {
    /// The file could not be read from disk.
    #[error("{file}: cannot read it ({error})")]
    Io { file: String, error: std::io::Error },
    /// Neither a zip archive nor a legacy pickle sequence.
    #[error("{file}: not a PyTorch checkpoint ({what}); pass a file written by torch.save")]
    NotACheckpoint { file: String, what: String },
    /// The file ends, or a record in it ends, before what it declares.
    #[error("{file}: truncated: {what}; download or copy it again")]
    Truncated { file: String, what: String },
    /// The pickle does not parse.
    #[error("{file}: malformed pickle at byte {offset}: {what}; the file is damaged or not a checkpoint")]
    Pickle {
        file: String,
        offset: usize,
        what: String,
    },
    /// The pickle names a global a model checkpoint does not need; nothing of it was used.
    #[error("{file}: `{global}` is not a global a model checkpoint needs; refusing to read the file (a pickle can name any Python function, and this reader only accepts the tensor, container and module classes of a model)")]
    Disallowed { file: String, global: String },
    /// The file holds something other than a module or a state dict.
    #[error("{file}: holds {found}, not a model (a pickled nn.Module or a state dict of tensors)")]
    NotAModel { file: String, found: String },
    /// A tensor's storage is missing, too short, or of an unknown type.
    #[error("{file}: storage {key}: {what}")]
    Storage {
        file: String,
        key: String,
        what: String,
    },
    /// Building a tensor failed.
    #[error("{file}: {error}")]
    Candle {
        file: String,
        error: candle_core::Error,
    },
}

/// Result with [`PthError`].
pub type Result<T> = std::result::Result<T, PthError>;
