//! The typed error of the classifier crate.
//!
//! The classifier stage is configured by strings (variant names, the regulariser, weight schemes)
//! and fed tensors by several other crates; each way that can go wrong is a named variant whose
//! message says what is wrong and how to fix it.

/// Errors raised by the classifier crate.
#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    /// Shared plumbing failed (config, artifacts, store, checkpoints).
    #[error(transparent)]
    Core(#[from] simtrans_core::CoreError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The denoise crate failed (for example an unknown weight scheme name).
    #[error(transparent)]
    Denoise(#[from] simtrans_denoise::DenoiseError),
    /// A variant name is not one we know.
    #[error("unknown classifier variant `{name}`: use one of {valid} (fix classifier.variants in the config)")]
    UnknownVariant {
        /// The name as written.
        name: String,
        /// The accepted names.
        valid: &'static str,
    },
    /// A graph regulariser name is not one we know.
    #[error(
        "unknown graph regulariser `{name}`: use one of {valid} (fix classifier.reg in the config)"
    )]
    UnknownReg {
        /// The name as written.
        name: String,
        /// The accepted names.
        valid: &'static str,
    },
    /// The relax exponent μ is zero or not finite; relax divides by e^μ − 1.
    #[error("relax exponent mu = {mu} is unusable: it must be finite and non-zero (the paper uses -4; set classifier.mu)")]
    InvalidMu {
        /// The offending exponent.
        mu: f64,
    },
    /// A tensor handed to a loss has the wrong shape.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        /// The tensor in question.
        what: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The shape that arrived.
        got: Vec<usize>,
    },
    /// The classifier settings cannot give a sensible schedule.
    #[error("classifier config: {0}")]
    Config(String),
}

/// Result alias of the classifier crate.
pub type Result<T> = std::result::Result<T, ClassifierError>;
