//! The names of the pipeline stages and what a stage receives and returns.
//!
//! A stage is a function from a [`StageContext`] (config, device, seed, where its upstream
//! artifacts are, where to keep checkpoints) to a [`StageOutput`] (tensors and metrics). The
//! orchestrator owns the graph, the cache keys and the atomic write of the artifact; a stage
//! never writes its own final artifact, so it cannot leave a half-written one behind.

use crate::artifact::{Artifact, ArtifactSchema};
use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::error::{CoreError, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Data,
    Backbone,
    Simnet,
    Denoise,
    Classifier,
    Eval,
}

impl Stage {
    /// Every stage in pipeline order.
    pub const ALL: [Stage; 6] = [
        Stage::Data,
        Stage::Backbone,
        Stage::Simnet,
        Stage::Denoise,
        Stage::Classifier,
        Stage::Eval,
    ];

    /// The stage's name on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Data => "data",
            Stage::Backbone => "backbone",
            Stage::Simnet => "simnet",
            Stage::Denoise => "denoise",
            Stage::Classifier => "classifier",
            Stage::Eval => "eval",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Stage {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        Stage::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
                CoreError::Unknown(format!(
                    "unknown stage `{s}`; the stages are: {}",
                    names.join(", ")
                ))
            })
    }
}

/// One artifact-producing node of the graph: a stage, and for stages that train several
/// variants (the classifier), which one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Node {
    pub stage: Stage,
    pub variant: Option<String>,
}

impl Node {
    /// The node of a single-artifact stage.
    pub fn stage(stage: Stage) -> Self {
        Node {
            stage,
            variant: None,
        }
    }

    /// A variant of a stage.
    pub fn variant(stage: Stage, variant: impl Into<String>) -> Self {
        Node {
            stage,
            variant: Some(variant.into()),
        }
    }

    /// File-name form: `simnet`, `classifier-full`.
    pub fn name(&self) -> String {
        match &self.variant {
            None => self.stage.name().to_string(),
            Some(v) => format!("{}-{}", self.stage.name(), v),
        }
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_stage_lists_the_stages() {
        let err = "nosuch".parse::<Stage>().unwrap_err().to_string();
        for s in Stage::ALL {
            assert!(err.contains(s.name()), "{err}");
        }
        assert_eq!("denoise".parse::<Stage>().unwrap(), Stage::Denoise);
    }

    #[test]
    fn node_names() {
        assert_eq!(Node::stage(Stage::Simnet).name(), "simnet");
        assert_eq!(
            Node::variant(Stage::Classifier, "full").name(),
            "classifier-full"
        );
    }
}
