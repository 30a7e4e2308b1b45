//! Steps 3a and 3b of SimTrans: the novel-class classifier trained on noisy web images.
//!
//! Step 3a trains a ResNet on the web images of the novel categories with each image's
//! cross-entropy scaled by its denoise weight; step 3b continues from it, alternating graph epochs
//! (weighted cross-entropy plus a regulariser that pulls together the features of images the
//! frozen SimNet finds similar) with classification-only epochs. The baselines of the ablation
//! table are the same code path with switches.
//!
//! This crate holds the pure parts as tensor functions (CPU and CUDA alike): [`losses`] (weighted
//! cross-entropy, relax, the label mask, the GCN and COS regularisers) and [`variants`] (the
//! ablation variants, their switches and the epoch schedule). The stage `run` function that
//! trains the network lives beside them once the data, backbone and SimNet crates are ready.

pub mod bench;
pub mod error;
pub mod import;
pub mod losses;
pub mod stage;
pub mod variants;

pub use error::{ClassifierError, Result};
pub use losses::{GraphReg, Reg};
pub use variants::Variant;
