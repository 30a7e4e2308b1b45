//! `cargo xtask import`: a PyTorch checkpoint of the reference code as one of our artifacts.
//!
//! The file is read by `simtrans-pth` (which parses the pickle without executing it and refuses
//! any global a model does not need), its tensors are mapped and checked by the stage crate
//! that owns the artifact (`import` modules of backbone, simnet and classifier), and the
//! artifact is written atomically into the run's first seed with provenance "imported from
//! FILE (sha256 …)". Its cache key is `imported:<sha256>`: the walk treats it as fresh and as
//! the end of the graph upstream ([`crate::pipeline`]), and its checksum keys the stages below.
//! An imported classifier is evaluated on the novel test images on the way in, as the
//! reference's `eval_model.py` does, so `cargo xtask eval` reports it like a trained variant.

use crate::pipeline::{Pipeline, VARIANTS};
use anyhow::{bail, Context, Result};
use simtrans_core::artifact::Artifact;
use simtrans_core::store::imported_key;
use simtrans_core::{Node, Stage};
use simtrans_data::DataIndex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Metadata key of an imported artifact: `FILE (sha256 …)`.
pub const IMPORTED_FROM: &str = "imported_from";

/// What to import.
#[derive(Debug, Clone)]
pub struct Request {
    /// backbone, simnet or classifier.
    pub stage: Stage,
    /// The checkpoint.
    pub file: PathBuf,
    /// The SimNet's discriminator checkpoint (simnet only).
    pub disc: Option<PathBuf>,
    /// Which classifier variant the checkpoint is (classifier only).
    pub variant: String,
}

/// Imports `req` into the pipeline's run (first seed), building the data stage first if it is
/// stale; returns the artifact's path.
pub fn import(p: &Pipeline, req: &Request) -> Result<PathBuf> {
    if !matches!(
        req.stage,
        Stage::Backbone | Stage::Simnet | Stage::Classifier
    ) {
        bail!(
            "`{}` artifacts are not imported: import reads backbone, simnet or classifier checkpoints",
            req.stage
        );
    }
    let seed = p.config.run.seed;
    if p.config.run.seeds > 1 {
        tracing::warn!(
            "run.seeds = {}: the checkpoint goes into seed {seed} only",
            p.config.run.seeds
        );
    }
    // The files first: a bad checkpoint is refused before the data set is indexed.
    let ckpt = read(&req.file)?;
    let disc = req.disc.as_deref().map(read).transpose()?;
    p.store.save_config(&p.config)?;
    let data_node = Node::stage(Stage::Data);
    p.ensure(seed, &data_node, false)?;
    let data_path = p.store.artifact_path(seed, &data_node);
    let data_artifact =
        Artifact::load(&data_path, &DataIndex::schema(), &candle_core::Device::Cpu)?;
    let data = Arc::new(DataIndex::from_artifact(&data_artifact)?);

    let (node, out) = match req.stage {
        Stage::Backbone => {
            let out = simtrans_backbone::import::import(
                &ckpt.tensors,
                &p.config.backbone,
                &data.base_classes,
            )?;
            (Node::stage(Stage::Backbone), out)
        }
        Stage::Simnet => {
            let out = simtrans_simnet::import::import(
                &ckpt.tensors,
                disc.as_ref().map(|d| &d.tensors),
                &p.config.backbone,
                &p.config.simnet,
                seed,
            )?;
            (Node::stage(Stage::Simnet), out)
        }
        Stage::Classifier => {
            let variant: simtrans_classifier::Variant = req.variant.parse()?;
            let out = simtrans_classifier::import::import(
                &ckpt.tensors,
                &p.config,
                data,
                variant,
                &p.device,
            )?;
            (Node::variant(Stage::Classifier, variant.name()), out)
        }
        other => unreachable!("checked above: {other}"),
    };
    // Provenance, and the data artifact it was checked (a classifier: evaluated) against as
    // its one upstream.
    let provenance = format!("{} (sha256 {})", req.file.display(), ckpt.sha256);
    let mut out = out;
    out.meta.insert(IMPORTED_FROM.into(), provenance.clone());
    let upstream = BTreeMap::from([("data".to_string(), data_artifact.meta.checksum.clone())]);
    let path = p
        .save(seed, &node, imported_key(&ckpt.sha256), upstream, out, 0.0)
        .with_context(|| format!("writing the imported {node}"))?;
    if req.stage == Stage::Classifier {
        keep_variant(p, seed, &req.variant)?;
    }
    tracing::info!(
        "seed {seed}: {node} imported from {provenance} → {}",
        path.display()
    );
    Ok(path)
}

/// Reads a checkpoint, naming the file in the error.
fn read(path: &Path) -> Result<simtrans_pth::Checkpoint> {
    let ckpt = simtrans_pth::read(path)?;
    tracing::info!(
        "{}: {:?} {:?}, {} tensors{}",
        path.display(),
        ckpt.format,
        ckpt.layout,
        ckpt.tensors.len(),
        ckpt.modules
            .first()
            .map(|(_, class)| format!(", a pickled {class}"))
            .unwrap_or_default()
    );
    Ok(ckpt)
}

/// Saves the run's config with `classifier.variants` = the configured variants that have an
/// artifact in this seed, plus `variant`: so that `cargo xtask eval` evaluates what is there
/// instead of asking for variants nobody trained.
fn keep_variant(p: &Pipeline, seed: u64, variant: &str) -> Result<()> {
    let mut config = p.config.clone();
    let have = |v: &str| {
        v == variant
            || p.store
                .artifact_path(seed, &Node::variant(Stage::Classifier, v))
                .exists()
    };
    let kept: Vec<String> = VARIANTS
        .iter()
        .filter(|v| have(v))
        .map(|v| v.to_string())
        .collect();
    if config.classifier.variants != kept || config.run.ablations {
        tracing::info!(
            "classifier.variants of run `{}` is now {kept:?} (the variants with an artifact); \
             train others with `cargo xtask stage classifier --run {} --set classifier.variants=[…]`",
            p.store.name,
            p.store.name
        );
    }
    config.classifier.variants = kept;
    config.run.ablations = false;
    p.store.save_config(&config)?;
    Ok(())
}
