//! Step 2 of SimTrans: from the SimNet's pairwise similarities to per-image sample weights.
//!
//! For every novel category, the similarity of each pair of its web images is computed
//! (streamed over row blocks so that memory stays bounded), and each image's weight is its
//! average similarity to the rest of the category, normalised to mean 1. The classifier stage
//! trains on these weights (steps 3a/3b); where the noise ground truth is known (the embedded
//! benchmark), the ROC-AUC of the weights for clean vs noisy images measures how well they
//! separate the two.
//!
//! This crate holds the pure formulas as tensor functions (CPU and CUDA alike):
//! [`weights`] (the weight schemes and `one_mean`), [`similarity`] (the row-block streaming of
//! `S`), [`auc`] (weight quality) and [`transfer`] (whether the similarity transfers to the
//! novel web images, without ground truth). [`stage`] ties them to the data and SimNet
//! artifacts: it writes `denoise.safetensors` and looks weights up by image id for step 3.

pub mod auc;
pub mod bench;
pub mod error;
pub mod similarity;
pub mod stage;
pub mod transfer;
pub mod weights;

pub use error::{DenoiseError, Result};
pub use stage::{schema, transfer_check, transfer_check_files, SampleWeights, SCHEMA_VERSION};
pub use weights::WeightScheme;
