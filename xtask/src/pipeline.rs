//! The stage graph, its cache keys, and the walk that runs what is stale.
//!
//! Per seed the graph is: `data → backbone → simnet → denoise → classifier-<variant> → eval`,
//! where each classifier variant depends only on what it uses (the baselines never wait for the
//! SimNet). A node is skipped when its artifact is intact and its recorded cache key equals the
//! key computed now from its config section, the seed, the data-set manifest and the checksums
//! of its upstream artifacts; any change upstream therefore invalidates exactly the nodes below.
//! The stage functions are behind the [`StageRunner`] trait so the walk can be tested without
//! training anything.
//!
//! An imported artifact (`cargo xtask import`) is always fresh and ends the walk upstream: it
//! stands for its source file, and its checksum enters the keys below it like any other. The
//! eval node reads the backbone, SimNet and denoise artifacts only for their metrics, so those
//! are upstream of it only where they exist (a run holding just an imported classifier can be
//! evaluated).

use anyhow::{bail, Context, Result};
use simtrans_core::artifact::{Artifact, ArtifactMeta};
use simtrans_core::store::{cache_key, is_imported};
use simtrans_core::{Config, Freshness, Node, RunStore, Stage, StageContext, StageOutput};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// Computes one node's output; implemented by the real stage crates and by test fakes.
pub trait StageRunner {
    /// Runs the stage of `ctx.node`.
    fn run(&self, ctx: &StageContext) -> Result<StageOutput>;
    /// The schema version the stage writes.
    fn schema_version(&self, stage: Stage) -> u32;
    /// Hash of the data set's manifest (part of every key).
    fn manifest_hash(&self, config: &Config) -> String;
    /// Checks and warnings logged before a node is built (never changes what it computes).
    fn before(&self, _ctx: &StageContext) -> Result<()> {
        Ok(())
    }
}

/// The classifier variants and what each reads.
pub const VARIANTS: [&str; 5] = ["naive", "weighting", "graph", "full", "clean"];

/// Upstream nodes of a node.
pub fn upstream(node: &Node, config: &Config) -> Vec<Node> {
    let n = Node::stage;
    match node.stage {
        Stage::Data => vec![],
        Stage::Backbone => vec![n(Stage::Data)],
        Stage::Simnet => vec![n(Stage::Data), n(Stage::Backbone)],
        Stage::Denoise => vec![n(Stage::Data), n(Stage::Simnet)],
        Stage::Classifier => {
            let mut up = vec![n(Stage::Data), n(Stage::Backbone)];
            match node.variant.as_deref() {
                Some("weighting") => up.push(n(Stage::Denoise)),
                Some("graph") => up.push(n(Stage::Simnet)),
                Some("full") => up.extend([n(Stage::Simnet), n(Stage::Denoise)]),
                _ => {}
            }
            up
        }
        Stage::Eval => {
            let mut up = vec![
                n(Stage::Data),
                n(Stage::Backbone),
                n(Stage::Simnet),
                n(Stage::Denoise),
            ];
            up.extend(
                variants(config)
                    .into_iter()
                    .map(|v| Node::variant(Stage::Classifier, v)),
            );
            up
        }
    }
}

/// Whether `up` is upstream of `node` only when its artifact exists (see the module doc).
pub fn is_optional_upstream(node: &Node, up: &Node) -> bool {
    node.stage == Stage::Eval
        && matches!(up.stage, Stage::Backbone | Stage::Simnet | Stage::Denoise)
}

/// The classifier variants this config trains.
pub fn variants(config: &Config) -> Vec<String> {
    let mut v: Vec<String> = if config.run.ablations {
        VARIANTS.iter().map(|s| s.to_string()).collect()
    } else {
        config.classifier.variants.clone()
    };
    if !has_noise_ground_truth(config) {
        v.retain(|x| x != "clean");
    }
    v
}

/// Only the embedded benchmark knows which web images are noise.
pub fn has_noise_ground_truth(config: &Config) -> bool {
    config.run.dataset == simtrans_core::config::DatasetKind::Demo
}

/// The nodes of a stage in this config.
pub fn nodes_of(stage: Stage, config: &Config) -> Vec<Node> {
    match stage {
        Stage::Classifier => variants(config)
            .into_iter()
            .map(|v| Node::variant(Stage::Classifier, v))
            .collect(),
        s => vec![Node::stage(s)],
    }
}

/// Every node in execution order.
pub fn all_nodes(config: &Config) -> Vec<Node> {
    Stage::ALL
        .iter()
        .flat_map(|&s| nodes_of(s, config))
        .collect()
}

/// What happened to a node during a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its artifact was fresh.
    Cached,
    /// It was (re)built.
    Built,
}

/// Runs stages of one run directory.
pub struct Pipeline<'a> {
    pub store: RunStore,
    pub config: Config,
    pub device: candle_core::Device,
    pub runner: &'a dyn StageRunner,
}

impl Pipeline<'_> {
    fn rebuild_hint(&self) -> String {
        format!("cargo xtask stage --run {}", self.store.name)
    }

    /// The upstream nodes of `node` in this run: [`upstream`] less the optional ones whose
    /// artifact does not exist.
    fn upstream_here(&self, seed: u64, node: &Node) -> Vec<Node> {
        upstream(node, &self.config)
            .into_iter()
            .filter(|up| {
                !is_optional_upstream(node, up) || self.store.artifact_path(seed, up).exists()
            })
            .collect()
    }

    /// Whether the node's artifact exists, is intact and was imported.
    fn is_imported(&self, seed: u64, node: &Node) -> bool {
        Artifact::verify(&self.store.artifact_path(seed, node)).is_ok_and(|m| is_imported(&m))
    }

    fn key(&self, seed: u64, node: &Node) -> Result<(String, BTreeMap<String, String>)> {
        let mut sums = BTreeMap::new();
        for up in self.upstream_here(seed, node) {
            let path = self.store.artifact_path(seed, &up);
            let meta = Artifact::verify(&path).map_err(|e| {
                anyhow::anyhow!(
                    "{node} needs {up}: {e}; build it with `cargo xtask stage {} --run {}`",
                    up.stage,
                    self.store.name
                )
            })?;
            sums.insert(up.name(), meta.checksum);
        }
        let key = cache_key(
            node,
            seed,
            &node_inputs(node, &self.config)?,
            &sums,
            &self.runner.manifest_hash(&self.config),
        );
        Ok((key, sums))
    }

    /// Checks that every upstream node of `node` is fresh, naming the command that rebuilds the first one that is not.
    pub fn require_upstream(&self, seed: u64, node: &Node) -> Result<()> {
        for up in self.upstream_here(seed, node) {
            if self.is_imported(seed, &up) {
                continue;
            }
            self.require_upstream(seed, &up)?;
            let (key, _) = self.key(seed, &up)?;
            let path = self.store.artifact_path(seed, &up);
            let cmd = format!("cargo xtask stage {} --run {}", up.stage, self.store.name);
            match self.store.freshness(seed, &up, &key) {
                Freshness::Fresh(_) => {}
                Freshness::Missing => bail!(
                    "{up} artifact missing at {}: build it with `{cmd}`",
                    path.display()
                ),
                Freshness::Stale { reason } => bail!(
                    "{up} artifact at {} is stale ({reason}): rebuild it with `{cmd}`",
                    path.display()
                ),
                Freshness::Corrupt { reason } => bail!(
                    "{up} artifact at {} is unusable ({reason}): rebuild it with `{cmd}`",
                    path.display()
                ),
            }
        }
        Ok(())
    }

    /// Builds one node if stale (or always when `force`), returning what happened.
    pub fn ensure(&self, seed: u64, node: &Node, force: bool) -> Result<Outcome> {
        if !force && self.is_imported(seed, node) {
            tracing::info!("seed {seed}: {node} is imported; kept as it is");
            return Ok(Outcome::Cached);
        }
        let (key, upstream_sums) = self.key(seed, node)?;
        let path = self.store.artifact_path(seed, node);
        let ctx = StageContext {
            config: self.config.clone(),
            device: self.device.clone(),
            seed,
            node: node.clone(),
            cache_key: key.clone(),
            seed_dir: self.store.seed_dir(seed),
            upstream: self
                .upstream_here(seed, node)
                .into_iter()
                .map(|u| (u.name(), self.store.artifact_path(seed, &u)))
                .collect(),
            rebuild_hint: self.rebuild_hint(),
        };
        if force {
            ctx.checkpoints().clear()?;
        } else {
            match self.store.freshness(seed, node, &key) {
                Freshness::Fresh(_) => {
                    tracing::info!("seed {seed}: {node} is up to date ({})", path.display());
                    return Ok(Outcome::Cached);
                }
                Freshness::Missing => {}
                Freshness::Stale { reason } => {
                    tracing::info!("seed {seed}: {node} is stale: {reason}")
                }
                Freshness::Corrupt { reason } => {
                    tracing::warn!("seed {seed}: {node} is unusable, rebuilding: {reason}")
                }
            }
        }
        tracing::info!("seed {seed}: running {node}");
        self.runner.before(&ctx)?;
        let start = Instant::now();
        let out = self
            .runner
            .run(&ctx)
            .with_context(|| format!("stage {node} (seed {seed}) failed"))?;
        self.save(
            seed,
            node,
            key,
            upstream_sums,
            out,
            start.elapsed().as_secs_f64(),
        )?;
        ctx.checkpoints().clear()?;
        tracing::info!(
            "seed {seed}: {node} done in {:.1} s → {}",
            start.elapsed().as_secs_f64(),
            path.display()
        );
        Ok(Outcome::Built)
    }

    /// Writes a node's artifact (atomically) with its provenance: the key it was built under,
    /// its upstream checksums, the crate version and the time it took; returns its path.
    pub fn save(
        &self,
        seed: u64,
        node: &Node,
        cache_key: String,
        upstream: BTreeMap<String, String>,
        out: StageOutput,
        wall_seconds: f64,
    ) -> Result<std::path::PathBuf> {
        let meta = ArtifactMeta {
            node: node.name(),
            schema_version: self.runner.schema_version(node.stage),
            cache_key,
            upstream,
            crate_version: env!("CARGO_PKG_VERSION").into(),
            wall_seconds,
            metrics: out.metrics,
            extra: out.meta,
            checksum: String::new(),
        };
        let path = self.store.artifact_path(seed, node);
        Artifact::new(meta, out.tensors).save(&path)?;
        Ok(path)
    }

    /// Walks every node of every seed; nodes of `force` stages are rebuilt.
    pub fn reproduce(
        &self,
        seeds: &[u64],
        force: &BTreeSet<Stage>,
    ) -> Result<BTreeMap<(u64, String), Outcome>> {
        self.store.save_config(&self.config)?;
        let mut outcomes = BTreeMap::new();
        for &seed in seeds {
            for node in all_nodes(&self.config) {
                let o = self.ensure(seed, &node, force.contains(&node.stage))?;
                outcomes.insert((seed, node.name()), o);
            }
        }
        Ok(outcomes)
    }

    /// Runs every node of one stage on cached upstream artifacts (rebuilding it when `force`;
    /// otherwise only when stale, so a killed run resumes from its checkpoints).
    pub fn stage(&self, stage: Stage, seeds: &[u64], force: bool) -> Result<Vec<Outcome>> {
        self.store.save_config(&self.config)?;
        let mut outcomes = vec![];
        for &seed in seeds {
            for node in nodes_of(stage, &self.config) {
                self.require_upstream(seed, &node)?;
                outcomes.push(self.ensure(seed, &node, force)?);
            }
        }
        Ok(outcomes)
    }
}

/// What a node's result depends on in the config: its stage's section, or for a classifier
/// variant only the part of `[classifier]` that variant reads.
pub fn node_inputs(node: &Node, config: &Config) -> Result<String> {
    Ok(match (node.stage, node.variant.as_deref()) {
        (Stage::Classifier, Some(v)) => {
            let variant: simtrans_classifier::Variant = v.parse()?;
            config.inputs_with(Stage::Classifier, variant.reads(&config.classifier))
        }
        (stage, _) => config.stage_inputs(stage),
    })
}

/// The seeds of a run: `seed, seed+1, …`.
pub fn seeds(config: &Config) -> Vec<u64> {
    (0..config.run.seeds.max(1) as u64)
        .map(|k| config.run.seed + k)
        .collect()
}
