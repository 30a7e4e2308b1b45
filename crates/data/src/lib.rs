//! The data stage of simtrans-rs: data set layouts, the embedded weak-shot benchmark, image
//! transforms, batch samplers and the `data` artifact.
//!
//! The stage resolves a data set once into a [`DataIndex`] (every image with a stable id, its
//! label, split and, for the demo benchmark, its noise truth) and hands it on as the `data`
//! artifact. Later stages read the index back with [`DataIndex::from_artifact`], draw batches of
//! ids with [`sampler`] and turn ids into normalised tensors with [`Loader`].

pub mod bench;
pub mod demo;
pub mod error;
pub mod idx;
pub mod index;
pub mod layouts;
pub mod loader;
mod mat;
pub mod onepass;
pub mod prefetch;
pub mod sampler;
pub mod synthetic;
pub mod transform;

pub use bench::{bench, BenchReport};
pub use error::{DataError, Result};
pub use index::{DataIndex, Images, Item, NoiseKind, Split};
pub use loader::{Augment, Loader};
pub use prefetch::{InputWait, Prefetch};
pub use simtrans_core::config::DatasetKind;

use simtrans_core::{StageContext, StageOutput};
use std::path::Path;

const MANIFESTS: [(DatasetKind, &str); 5] = [
    (
        DatasetKind::Demo,
        include_str!("../../../data-manifests/demo.toml"),
    ),
    (
        DatasetKind::Cub,
        include_str!("../../../data-manifests/cub.toml"),
    ),
    (
        DatasetKind::Car,
        include_str!("../../../data-manifests/car.toml"),
    ),
    (
        DatasetKind::Air,
        include_str!("../../../data-manifests/air.toml"),
    ),
    (
        DatasetKind::Webvision,
        include_str!("../../../data-manifests/webvision.toml"),
    ),
];

/// The text of `data-manifests/<dataset>.toml` as compiled into this library.
pub fn manifest(dataset: DatasetKind) -> &'static str {
    MANIFESTS
        .iter()
        .find(|(d, _)| *d == dataset)
        .map(|(_, t)| *t)
        .expect("every data set has a manifest")
}

/// SHA-256 (lower-case hex) of the embedded `data-manifests/<dataset>.toml`; part of the data
/// stage's cache key.
pub fn manifest_hash(dataset: DatasetKind) -> String {
    simtrans_core::hash::sha256_hex(manifest(dataset))
}

/// Builds the index of `config.run.dataset` for one seed, with metrics about it.
pub fn build_index(
    config: &simtrans_core::Config,
    seed: u64,
) -> Result<(DataIndex, serde_json::Value)> {
    match config.run.dataset {
        DatasetKind::Demo => {
            let source = demo::resolve_source(config.run.data_path.as_deref().map(Path::new))?;
            let junk = match &config.run.junk_path {
                Some(p) if config.data.demo.junk_rate > 0.0 => Some(demo::load_junk(Path::new(p))?),
                _ => None,
            };
            let index = demo::build(&config.data.demo, &source, junk.as_ref(), seed)?;
            if !source.is_fashion_mnist() {
                warn_foreign_idx(&config.data, &source.origin);
            }
            let mut metrics = serde_json::json!({ "source": source.origin });
            if let Some(j) = &junk {
                metrics["junk_source"] = serde_json::json!(j.origin);
            }
            Ok((index, metrics))
        }
        other => {
            let root = config.run.data_path.as_deref().ok_or_else(|| {
                DataError::layout(
                    "run.data_path",
                    format!("the `{}` data set needs its folder", other.name()),
                    format!(
                        "pass --data-path; data-manifests/{}.toml says what it must hold and how to obtain it",
                        other.name()
                    ),
                )
            })?;
            layouts::build(other, Path::new(root))
        }
    }
}

/// Warns about the two settings of the demo preset that are Fashion-MNIST's, when the IDX
/// folder holds another data set: its normalisation constants and horizontal flips.
fn warn_foreign_idx(data: &simtrans_core::config::DataConfig, origin: &str) {
    use simtrans_core::config::Normalise;
    if data.normalise == Normalise::Fixed {
        tracing::warn!(
            source = origin,
            mean = ?data.mean,
            std = ?data.std,
            "this IDX data set is not Fashion-MNIST but is normalised with the fixed data.mean and \
             data.std; set data.normalise = \"base_train\" to measure them on its base training images"
        );
    }
    if data.hflip {
        tracing::warn!(
            source = origin,
            "data.hflip = true mirrors training images; if a mirrored image of this data set means \
             something else (digits, letters), set data.hflip = false"
        );
    }
}

/// The normalisation the loaders of the later stages will use, for the data stage's metrics.
fn normalisation_metrics(
    index: &std::sync::Arc<DataIndex>,
    data: &simtrans_core::config::DataConfig,
) -> Result<serde_json::Value> {
    let (mean, std) = Loader::new(index.clone(), data)?.normalisation();
    Ok(serde_json::json!({ "from": data.normalise, "mean": mean, "std": std }))
}

/// The data stage: resolves `ctx.config`'s data set for `ctx.seed` and returns the index as
/// tensors, with counts per split and noise kind as metrics and class names as metadata.
pub fn run(ctx: &StageContext) -> Result<StageOutput> {
    let (index, mut metrics) = build_index(&ctx.config, ctx.seed)?;
    let index = std::sync::Arc::new(index);
    metrics["normalisation"] = normalisation_metrics(&index, &ctx.config.data)?;
    tracing::info!(
        items = index.items.len(),
        dataset = index.dataset.name(),
        "data index built"
    );
    index.to_output(metrics)
}
