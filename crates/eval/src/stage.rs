//! The eval node of one seed, and the report over all seeds.
//!
//! The classifier stage already measured each variant's final model on the novel test set
//! (it has the network in memory); the eval node gathers those numbers with the SimNet's pair F1,
//! the weight ROC-AUC and every stage's wall time into a [`SeedResult`], stored in its artifact's
//! metrics with the confusion matrices as tensors. [`write_report`] then reads the eval artifacts
//! of every seed and writes `eval.json`, `report.md` and the pictures.

use crate::report::{heatmap_png, markdown};
use crate::summary::{summarise, SeedResult, VariantResult};
use candle_core::{DType, Device, Tensor};
use simtrans_core::artifact::write_atomic;
use simtrans_core::{
    Artifact, ArtifactSchema, Config, Node, RunStore, Stage, StageContext, StageOutput, TensorSpec,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Layout version of `eval.safetensors`.
pub const SCHEMA_VERSION: u32 = 1;

/// What `eval.safetensors` must hold.
pub fn schema() -> ArtifactSchema {
    ArtifactSchema::new(
        Stage::Eval,
        SCHEMA_VERSION,
        vec![TensorSpec::new("confusion.*", DType::U32, &[None, None])],
    )
}

fn f64_at(v: &serde_json::Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// Gathers the results of one seed from its upstream artifacts.
pub fn run(ctx: &StageContext) -> anyhow::Result<StageOutput> {
    let mut result = SeedResult {
        seed: ctx.seed,
        ..Default::default()
    };
    let mut tensors = BTreeMap::new();
    for (name, path) in &ctx.upstream {
        let meta = Artifact::verify(path)?;
        let stage = name.split('-').next().unwrap_or(name).to_string();
        *result.wall_seconds.entry(stage).or_insert(0.0) += meta.wall_seconds;
        let m = &meta.metrics;
        if let Some(variant) = name.strip_prefix("classifier-") {
            let confusion: Vec<Vec<u64>> = serde_json::from_value(m["confusion_final"].clone())
                .map_err(|e| anyhow::anyhow!("{}: confusion_final: {e}", path.display()))?;
            let k = confusion.len();
            let flat: Vec<u32> = confusion.iter().flatten().map(|&c| c as u32).collect();
            tensors.insert(
                format!("confusion.{variant}"),
                Tensor::from_vec(flat, (k, k), &Device::Cpu)?,
            );
            result.variants.insert(
                variant.to_string(),
                VariantResult {
                    top1_final: f64_at(m, &["top1_final"])
                        .ok_or_else(|| anyhow::anyhow!("{}: no top1_final", path.display()))?,
                    top1_test_selected: f64_at(m, &["top1_test_selected"]),
                    per_class: serde_json::from_value(m["per_class_final"].clone())
                        .unwrap_or_default(),
                    confusion,
                },
            );
        } else if name == "simnet" {
            // The selected epoch's F1 (the final one unless simnet.select = "val").
            result.simnet_f1_base_val = f64_at(m, &["f1_val"]).filter(|x| x.is_finite());
            result.simnet_f1_novel_test = f64_at(m, &["f1_test"]).filter(|x| x.is_finite());
        } else if name == "denoise" {
            // The AUC of the weights step 3a uses.
            let scheme = &ctx.config.classifier.weights_3a;
            if let Some(obj) = m["weights_auc"].get(scheme).and_then(|v| v.as_object()) {
                for (kind, v) in obj {
                    if let Some(x) = v.as_f64() {
                        result.weights_auc.insert(kind.clone(), x);
                    }
                }
            }
        }
    }
    Ok(StageOutput {
        tensors,
        metrics: serde_json::to_value(&result)?,
        meta: BTreeMap::new(),
    })
}

/// Reads every seed's eval artifact and writes `eval.json`, `report.md` and PNGs in the run
/// folder; returns the summary.
pub fn write_report(
    store: &RunStore,
    config: &Config,
    seeds: &[u64],
) -> anyhow::Result<serde_json::Value> {
    let mut results = vec![];
    let mut class_names: Vec<String> = vec![];
    for &seed in seeds {
        let path = store.artifact_path(seed, &Node::stage(Stage::Eval));
        let a = Artifact::load(&path, &schema(), &Device::Cpu).map_err(|e| {
            anyhow::anyhow!("{e}; run `cargo xtask eval --run {}` first", store.name)
        })?;
        results.push(serde_json::from_value::<SeedResult>(
            a.meta.metrics.clone(),
        )?);
        if class_names.is_empty() {
            for v in ["naive", "full", "weighting", "graph", "clean"] {
                let p = store.artifact_path(seed, &Node::variant(Stage::Classifier, v));
                if let Ok(meta) = Artifact::verify(&p) {
                    if let Some(names) = meta.extra.get("class_names") {
                        class_names = serde_json::from_str(names).unwrap_or_default();
                        break;
                    }
                }
            }
        }
    }
    let summary = summarise(
        config.run.dataset.name(),
        &format!("{:?}", config.run.preset).to_lowercase(),
        &results,
    );
    write_atomic(
        &store.root.join("eval.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let mut md = markdown(&summary, &results, &class_names);
    if let Some(first) = results.first() {
        for (name, v) in &first.variants {
            let rows: Vec<Vec<f64>> = v
                .confusion
                .iter()
                .map(|r| r.iter().map(|&c| c as f64).collect())
                .collect();
            heatmap_png(&rows, 24, &store.root.join(format!("confusion-{name}.png")))?;
        }
        md.push_str(&similarity_pictures(store, first.seed)?);
    }
    write_atomic(&store.root.join("report.md"), md.as_bytes())?;
    Ok(summary)
}

/// Heat maps of each novel category's similarity matrix, rows and columns ordered by weight
/// (highest first), from the denoise artifact of one seed.
fn similarity_pictures(store: &RunStore, seed: u64) -> anyhow::Result<String> {
    let path: PathBuf = store.artifact_path(seed, &Node::stage(Stage::Denoise));
    let Ok(a) = Artifact::load(&path, &ArtifactSchema::any(), &Device::Cpu) else {
        return Ok(String::new());
    };
    let mut md = format!(
        "\n## Similarity matrices (seed {seed})\n\nEach novel category's web images, ordered by their `savg1` weight \
         (highest first, top-left); bright = similar. Clean images should form the bright top-left block.\n\n"
    );
    let mut k = 0;
    while let Some(s) = a.tensors.get(&format!("S.{k}")) {
        let s: Vec<Vec<f32>> = s.to_dtype(DType::F32)?.to_vec2()?;
        let w: Vec<f64> = s
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let r: f64 = row.iter().map(|&x| x as f64).sum();
                let c: f64 = s.iter().map(|row| row[i] as f64).sum();
                r + c
            })
            .collect();
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&i, &j| w[j].total_cmp(&w[i]));
        let sorted: Vec<Vec<f64>> = order
            .iter()
            .map(|&i| order.iter().map(|&j| s[i][j] as f64).collect())
            .collect();
        let file = format!("similarity-{k}.png");
        heatmap_png(&sorted, 2, &store.root.join(&file))?;
        md.push_str(&format!("![category {k}]({file}) "));
        k += 1;
    }
    md.push('\n');
    Ok(md)
}
