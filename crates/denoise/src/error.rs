//! The typed error of the denoise crate.
//!
//! The denoise stage turns similarity matrices into sample weights that the classifier stage
//! trusts blindly, so every way the inputs can be wrong (a misspelt weight scheme, a matrix of the
//! wrong shape, a category whose weights cannot be normalised) is a named variant whose message
//! says what is wrong and what to do about it.

/// Errors raised by the denoise crate.
#[derive(Debug, thiserror::Error)]
pub enum DenoiseError {
    /// Shared plumbing failed (config, artifacts, store).
    #[error(transparent)]
    Core(#[from] simtrans_core::CoreError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A weight scheme name in the config is not one we know.
    #[error("unknown weight scheme `{name}`: use one of {valid} (fix classifier.weights_3a / weights_3b in the config)")]
    UnknownWeightScheme {
        /// The name as written in the config.
        name: String,
        /// The accepted names, comma separated.
        valid: &'static str,
    },
    /// The fraction R of the `avgR` scheme is outside (0, 1].
    #[error("avgR fraction R = {r} is outside (0, 1]: set denoise.top_r (or the number after `avg`) to a value in (0, 1]")]
    InvalidTopR {
        /// The offending fraction.
        r: f64,
    },
    /// A tensor handed to a denoise function has the wrong shape.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        /// The tensor in question.
        what: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The shape that arrived.
        got: Vec<usize>,
    },
    /// A category's raw weights have a mean that is zero, negative or not finite, so `one_mean`
    /// cannot normalise them.
    #[error("the raw weights of a category have mean {mean}; they cannot be normalised to mean 1 (is the similarity matrix all zeros or NaN? check the SimNet artifact; a network trained for only a few steps from random weights does this: evaluation mode normalises with BatchNorm running statistics that have not settled)")]
    DegenerateWeights {
        /// The mean that was found.
        mean: f64,
    },
    /// The similarity head failed on a block of rows.
    #[error("similarity head failed on rows {start}..{end} of S: {source}")]
    SimBlock {
        /// First row of the block.
        start: usize,
        /// One past the last row of the block.
        end: usize,
        /// What the head reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A block size of zero was requested.
    #[error("web image {id} has no `{scheme}` weight in the denoise artifact: it is stale or from another data index; rebuild it with `cargo xtask stage denoise --run NAME --force denoise`")]
    MissingWeight { id: u32, scheme: String },
    #[error("row block size must be at least 1 (set denoise.row_block)")]
    ZeroRowBlock,
    /// Two slices that must be parallel have different lengths.
    #[error("{what}: {left} scores but {right} labels; pass one label per score")]
    LengthMismatch {
        /// What was being compared.
        what: &'static str,
        /// Length of the first slice.
        left: usize,
        /// Length of the second slice.
        right: usize,
    },
}

/// Result alias of the denoise crate.
pub type Result<T> = std::result::Result<T, DenoiseError>;
