//! What a stage receives and returns.
//!
//! A stage is a function from a [`StageContext`] (config, device, seed, where its upstream
//! artifacts are, where to keep checkpoints) to a [`StageOutput`] (tensors and metrics). The
//! orchestrator owns the graph, the cache keys and the atomic write of the artifact; a stage
//! never writes its own final artifact, so it cannot leave a half-written one behind.

use crate::artifact::{Artifact, ArtifactSchema};
use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::error::{CoreError, Result};
pub use crate::node::{Node, Stage};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Everything a stage needs to run.
#[derive(Debug, Clone)]
pub struct StageContext {
    /// The resolved configuration of the run.
    pub config: Config,
    /// Where tensors live.
    pub device: Device,
    /// This seed's value (one run of `--seeds N` per seed).
    pub seed: u64,
    /// The node being built.
    pub node: Node,
    /// Its cache key (tags its checkpoints so a resume never mixes configurations).
    pub cache_key: String,
    /// `runs/<name>/seed-<s>`.
    pub seed_dir: PathBuf,
    /// Upstream node name → its validated artifact path.
    pub upstream: BTreeMap<String, PathBuf>,
    /// The command that rebuilds upstream nodes, for error messages (`cargo xtask stage … --run NAME`).
    pub rebuild_hint: String,
}

impl StageContext {
    /// Loads and validates an upstream artifact by node name.
    pub fn load_upstream(&self, node: &str, schema: &ArtifactSchema) -> Result<Artifact> {
        let path = self
            .upstream
            .get(node)
            .ok_or_else(|| CoreError::ArtifactMissing {
                node: node.to_string(),
                path: self.seed_dir.join(format!("{node}.safetensors")),
                command: format!("{} {}", self.rebuild_hint, node),
            })?;
        Artifact::load(path, schema, &self.device)
    }

    /// The checkpoint folder of this node.
    pub fn checkpoints(&self) -> Checkpoints {
        Checkpoints::new(
            self.seed_dir.join("checkpoints").join(self.node.name()),
            self.cache_key.clone(),
        )
    }

    /// A deterministic random generator for one purpose and epoch of this node and seed.
    pub fn rng(&self, purpose: &str, epoch: u64) -> rand_chacha::ChaCha8Rng {
        crate::seed::rng(self.seed, &[&self.node.name(), purpose], epoch)
    }

    /// Appends one JSON line to `logs/<node>.jsonl` (training curves for the report).
    pub fn log_json(&self, record: &serde_json::Value) -> Result<()> {
        use std::io::Write;
        let dir = self.seed_dir.join("logs");
        std::fs::create_dir_all(&dir).map_err(|e| CoreError::io(&dir, e))?;
        let path = dir.join(format!("{}.jsonl", self.node.name()));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| CoreError::io(&path, e))?;
        writeln!(f, "{record}").map_err(|e| CoreError::io(&path, e))
    }
}

/// What a stage returns; the orchestrator adds the provenance metadata and writes it.
#[derive(Debug, Default)]
pub struct StageOutput {
    /// The artifact's tensors.
    pub tensors: BTreeMap<String, Tensor>,
    /// Metrics recorded in the artifact metadata and the report.
    pub metrics: serde_json::Value,
    /// Extra string metadata (class names, architecture, …).
    pub meta: BTreeMap<String, String>,
}
