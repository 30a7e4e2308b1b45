//! Shared plumbing of simtrans-rs.
//!
//! Every pipeline stage needs the same few services: a typed configuration, a run directory in
//! which artifacts are written atomically and validated on load, cache keys that tell when an
//! artifact is stale, checkpoints to resume from, deterministic seeding, device names and the
//! arithmetic precision, and progress reporting. They live here, once, so that each stage crate
//! holds only the logic of its stage. This crate knows nothing about what a stage computes and
//! nothing about CUDA: the operations and their GPU paths are `simtrans-ops`'s.
//!
//! Inside, the modules form layers with no import circle: `error`, `hash` and `node` (the
//! stages' names) at the bottom; `seed`, `config` and `artifact` on them; `checkpoint` on
//! `artifact`; `stage` (the contract between the orchestrator and a stage) and `store` (the
//! run folder) on top.

pub mod artifact;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod device;
pub mod error;
pub mod hash;
pub mod node;
pub mod progress;
pub mod seed;
pub mod stage;
pub mod store;

pub use artifact::{Artifact, ArtifactMeta, ArtifactSchema, TensorSpec};
pub use config::{Config, Preset};
pub use error::{CoreError, Result};
pub use node::{Node, Stage};
pub use stage::{StageContext, StageOutput};
pub use store::{Freshness, RunStore};
