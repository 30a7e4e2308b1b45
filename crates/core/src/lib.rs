//! Shared plumbing of simtrans-rs.
//!
//! Every pipeline stage needs the same few services: a typed configuration, a run directory in
//! which artifacts are written atomically and validated on load, cache keys that tell when an
//! artifact is stale, deterministic seeding, the reference SGD (momentum, coupled weight decay,
//! step schedule, optional momentum reset each epoch), device selection and progress reporting,
//! and (with `--features cuda`) the cuDNN kernels of the training hot path, which the network
//! layers and the optimiser share.
//! They live here, once, so that each stage crate holds only the logic of its stage. This crate
//! knows nothing about what a stage computes.

pub mod artifact;
pub mod checkpoint;
pub mod compare;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cudnn;
pub mod device;
pub mod error;
pub mod grad;
pub mod hash;
pub mod headops;
pub mod hostprof;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod launch;
pub mod optim;
pub mod progress;
pub mod seed;
pub mod stage;
pub mod store;

pub use artifact::{Artifact, ArtifactMeta, ArtifactSchema, TensorSpec};
pub use config::{Config, Preset};
pub use error::{CoreError, Result};
pub use stage::{Node, Stage, StageContext, StageOutput};
pub use store::{Freshness, RunStore};
