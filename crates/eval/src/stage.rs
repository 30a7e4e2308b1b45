//! The eval node of one seed, and the report over all seeds.
//!
//! The classifier stage already measured each variant's final model on the novel test set
//! (it has the network in memory); the eval node gathers those numbers with the SimNet's pair F1,
//! the weight ROC-AUC and every stage's wall time into a [`SeedResult`], stored in its artifact's
//! metrics with the confusion matrices as tensors. [`write_report`] then reads the eval artifacts
//! of every seed and writes `eval.json`, `report.md` and the pictures.

use crate::report::{heatmap_png, line_chart_png, markdown, stacked_histogram_png, PALETTE};
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
    let mut test_ids: Option<(String, serde_json::Value)> = None;
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
            // Paired comparisons need every variant's test images in one order.
            match &test_ids {
                Some((first, ids)) if *ids != m["test_ids"] => anyhow::bail!(
                    "{} and {first} were measured on different test images; rebuild the classifier \
                     stage (`cargo xtask stage classifier --run …`)",
                    path.display()
                ),
                Some(_) => {}
                None => test_ids = Some((path.display().to_string(), m["test_ids"].clone())),
            }
            result.variants.insert(
                variant.to_string(),
                VariantResult {
                    top1_final: f64_at(m, &["top1_final"])
                        .ok_or_else(|| anyhow::anyhow!("{}: no top1_final", path.display()))?,
                    top1_test_selected: f64_at(m, &["top1_test_selected"]),
                    per_class: serde_json::from_value(m["per_class_final"].clone())
                        .unwrap_or_default(),
                    confusion,
                    correct: serde_json::from_value(m["correct_final"].clone()).unwrap_or_default(),
                    top1_per_epoch: serde_json::from_value(
                        m["history"]["top1_test_per_epoch"].clone(),
                    )
                    .unwrap_or_default(),
                    graph_epochs: serde_json::from_value(m["history"]["graph_epochs"].clone())
                        .unwrap_or_default(),
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
    result.transfer = transfer(ctx)?;
    Ok(StageOutput {
        tensors,
        metrics: serde_json::to_value(&result)?,
        meta: BTreeMap::new(),
    })
}

/// The transfer check of the seed's denoise artifact, with the graph term's settings of the
/// config (`None` when the node has no denoise upstream).
fn transfer(
    ctx: &StageContext,
) -> anyhow::Result<Option<simtrans_denoise::transfer::TransferCheck>> {
    let (Some(denoise), Some(data)) = (ctx.upstream.get("denoise"), ctx.upstream.get("data"))
    else {
        return Ok(None);
    };
    Ok(Some(simtrans_denoise::transfer_check_files(
        denoise,
        data,
        &ctx.config.classifier,
    )?))
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
            // 24 pixels per entry, fewer for many classes: at most 1200 pixels a side up to
            // 600 classes, 2 per entry beyond.
            let cell = (1200 / rows.len().max(1)).clamp(2, 24) as u32;
            heatmap_png(
                &rows,
                cell,
                &store.root.join(format!("confusion-{name}.png")),
            )?;
        }
        md.push_str(&curves(
            store,
            first.seed,
            &first.variants.keys().cloned().collect::<Vec<_>>(),
        )?);
        md.push_str(&graph_pictures(store, &summary)?);
        md.push_str(&weight_histogram(store, first.seed)?);
        md.push_str(&similarity_pictures(store, first.seed)?);
    }
    write_atomic(&store.root.join("report.md"), md.as_bytes())?;
    Ok(summary)
}

/// Novel-test top-1 after every epoch of each variant (the test set is only watched, never
/// used for selection).
fn curves(store: &RunStore, seed: u64, variants: &[String]) -> anyhow::Result<String> {
    let mut series = vec![];
    let mut legend = vec![];
    let mut table = String::new();
    for (k, v) in variants.iter().enumerate() {
        let path = store.artifact_path(seed, &Node::variant(Stage::Classifier, v));
        let Ok(meta) = Artifact::verify(&path) else {
            continue;
        };
        let acc: Vec<f64> = meta.metrics["history"]["top1_test_per_epoch"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        legend.push(format!("{} = `{v}`", PALETTE[k % PALETTE.len()].1));
        let cells: Vec<String> = acc.iter().map(|a| format!("{:.1}", 100.0 * a)).collect();
        table.push_str(&format!("| `{v}` | {} |\n", cells.join(" | ")));
        series.push(acc);
    }
    if series.is_empty() {
        return Ok(String::new());
    }
    let lo = series.iter().flatten().fold(1.0f64, |m, &x| m.min(x));
    let hi = series.iter().flatten().fold(0.0f64, |m, &x| m.max(x));
    line_chart_png(
        &series,
        lo,
        hi.max(lo + 1e-9),
        &store.root.join("curves-top1.png"),
    )?;
    let epochs = series.iter().map(|s| s.len()).max().unwrap_or(0);
    let header: Vec<String> = (0..epochs).map(|e| e.to_string()).collect();
    Ok(format!(
        "\n## Training curves (seed {seed})\n\nNovel-test top-1 after each epoch (3a epochs, then 3b), watched only; \
         y from {:.1} % to {:.1} %; {}.\n\n![curves](curves-top1.png)\n\n| variant | {} |\n|---|{}\n{table}",
        100.0 * lo,
        100.0 * hi,
        legend.join(", "),
        header.join(" | "),
        "---|".repeat(epochs)
    ))
}

/// Per graph variant, the mean adjacency `Â` over same-label and cross-label pairs (and by true
/// class where known) across the graph epochs, means over seeds (`graph_terms` of the summary).
fn graph_pictures(store: &RunStore, summary: &serde_json::Value) -> anyhow::Result<String> {
    let Some(vars) = summary["graph_terms"].as_object() else {
        return Ok(String::new());
    };
    let keys = [
        ("a_hat_same_label", "same web label"),
        ("a_hat_cross_label", "different web labels"),
        ("a_hat_same_true_class", "same true class"),
        ("a_hat_cross_true_class", "different true classes"),
    ];
    let mut md = String::new();
    for (name, rows) in vars {
        let rows = rows.as_array().cloned().unwrap_or_default();
        let mut series = vec![];
        let mut legend = vec![];
        for (k, label) in keys {
            let s: Vec<f64> = rows.iter().filter_map(|r| r[k].as_f64()).collect();
            if s.len() == rows.len() && !s.is_empty() {
                legend.push(format!("{} = {label}", PALETTE[series.len()].1));
                series.push(s);
            }
        }
        if series.is_empty() {
            continue;
        }
        let file = format!("graph-{name}.png");
        line_chart_png(&series, 0.0, 1.0, &store.root.join(&file))?;
        md.push_str(&format!(
            "\n`{name}`: mean `Â` per graph epoch, y from 0 to 1; {}.\n\n![graph term of {name}]({file})\n",
            legend.join(", ")
        ));
    }
    Ok(md)
}

/// Histograms of the `savg1` weights of the web images, one per novel category, stacked by the
/// recorded noise kind.
fn weight_histogram(store: &RunStore, seed: u64) -> anyhow::Result<String> {
    let denoise = store.artifact_path(seed, &Node::stage(Stage::Denoise));
    let data = store.artifact_path(seed, &Node::stage(Stage::Data));
    let (Ok(d), Ok(x)) = (
        Artifact::load(&denoise, &ArtifactSchema::any(), &Device::Cpu),
        Artifact::load(&data, &ArtifactSchema::any(), &Device::Cpu),
    ) else {
        return Ok(String::new());
    };
    let (Some(ids), Some(offsets), Some(w), Some(noise)) = (
        d.tensors.get("ids"),
        d.tensors.get("class_offsets"),
        d.tensors.get("weights.savg1"),
        x.tensors.get("noise"),
    ) else {
        return Ok(String::new());
    };
    let ids = ids.to_vec1::<u32>()?;
    let offsets = offsets.to_vec1::<u32>()?;
    let w = w.to_vec1::<f32>()?;
    let noise = noise.to_vec1::<u8>()?;
    let kinds = ["clean", "closed-set", "open-set", "junk", "unknown"];
    let legend: Vec<String> = kinds
        .iter()
        .enumerate()
        .map(|(k, name)| format!("{} = {name}", PALETTE[k].1))
        .collect();
    let mut md = format!(
        "\n## Sample weights (seed {seed})\n\n`savg1` weights of each novel category's web images (mean 1 per \
         category), 30 bins over [0, 2], stacked by recorded noise: {}.\n\n",
        legend.join(", ")
    );
    for (k, pair) in offsets.windows(2).enumerate() {
        if k == MAX_PICTURED_CATEGORIES {
            md.push_str(&format!(
                "\n\n(The first {MAX_PICTURED_CATEGORIES} categories only; every weight is in the denoise artifact.)"
            ));
            break;
        }
        let mut series = vec![vec![]; kinds.len()];
        for i in pair[0] as usize..pair[1] as usize {
            let kind = noise.get(ids[i] as usize).copied().unwrap_or(4).min(4) as usize;
            series[kind].push(w[i] as f64);
        }
        let file = format!("weights-{k}.png");
        stacked_histogram_png(&series, 30, 0.0, 2.0, &store.root.join(&file))?;
        md.push_str(&format!("![category {k}]({file}) "));
    }
    md.push('\n');
    Ok(md)
}

/// The similarity and weight pictures of the report: the first this many categories (CUB has
/// 50).
const MAX_PICTURED_CATEGORIES: usize = 8;
/// Entries per side of a similarity picture, at most: a larger matrix (a real data set's web
/// folder holds hundreds to thousands of images) is drawn as means of square blocks.
const MAX_PICTURE_SIDE: usize = 300;

/// Means of `side × side` blocks of a square matrix (the last blocks may be smaller).
fn block_means(m: &[Vec<f64>], side: usize) -> Vec<Vec<f64>> {
    let side = side.max(1);
    let n = m.len().div_ceil(side);
    (0..n)
        .map(|bi| {
            (0..n)
                .map(|bj| {
                    let rows = bi * side..((bi + 1) * side).min(m.len());
                    let cols = bj * side..((bj + 1) * side).min(m.len());
                    let count = (rows.len() * cols.len()) as f64;
                    rows.map(|i| m[i][cols.clone()].iter().sum::<f64>())
                        .sum::<f64>()
                        / count
                })
                .collect()
        })
        .collect()
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
        if k == MAX_PICTURED_CATEGORIES {
            md.push_str(&format!(
                "\n\n(The first {MAX_PICTURED_CATEGORIES} categories only; every matrix is in the denoise artifact.)"
            ));
            break;
        }
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
        let side = sorted.len().div_ceil(MAX_PICTURE_SIDE);
        heatmap_png(&block_means(&sorted, side), 2, &store.root.join(&file))?;
        md.push_str(&format!("![category {k}]({file}) "));
        k += 1;
    }
    md.push('\n');
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::block_means;

    #[test]
    fn block_means_average_square_blocks_and_keep_small_matrices() {
        let m: Vec<Vec<f64>> = (0..5)
            .map(|i| (0..5).map(|j| (10 * i + j) as f64).collect())
            .collect();
        assert_eq!(block_means(&m, 1), m);
        let b = block_means(&m, 2);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0][0], (0.0 + 1.0 + 10.0 + 11.0) / 4.0);
        assert_eq!(b[0][2], (4.0 + 14.0) / 2.0);
        assert_eq!(b[2][2], 44.0);
    }
}
