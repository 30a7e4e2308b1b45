//! The eval node of one seed, and the report over all seeds.
//!
//! The classifier stage already measured each variant's final model on the novel test set
//! (it has the network in memory); the eval node gathers those numbers with the SimNet's pair F1,
//! the weight ROC-AUC and every stage's wall time into a [`SeedResult`], stored in its artifact's
//! metrics with the confusion matrices as tensors. [`write_report`] then reads the eval artifacts
//! of every seed and writes `eval.json`, `report.md` and the pictures.

use crate::figures::{roc_curve, save, Heatmap, Histogram, Line, Lines};
use crate::report::markdown;
use crate::summary::{summarise, SeedResult, VariantResult};
use candle_core::{DType, Device, Tensor};
use simtrans_core::artifact::write_atomic;
use simtrans_core::{
    Artifact, ArtifactSchema, Config, Node, RunStore, Stage, StageContext, StageOutput, TensorSpec,
};
use simtrans_data::NoiseKind;
use std::collections::BTreeMap;

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
    let mut summary = summarise(
        config.run.dataset.name(),
        &format!("{:?}", config.run.preset).to_lowercase(),
        &results,
    );
    summary["benchmark"] = serde_json::json!(what_a_seed_varies(config));
    write_atomic(
        &store.root.join("eval.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let mut md = markdown(&summary, &results, &class_names);
    if let Some(first) = results.first() {
        let pictures = Pictures {
            store,
            config,
            summary: &summary,
            results: &results,
            class_names: &class_names,
        };
        pictures.confusions(first)?;
        md.push_str(&pictures.curves()?);
        md.push_str(&pictures.simnet_f1()?);
        md.push_str(&graph_pictures(store, &summary)?);
        if let Some(web) = pictures.web_weights(first.seed)? {
            md.push_str(&pictures.weights(first.seed, &web)?);
            md.push_str(&pictures.similarities(first.seed, &web)?);
        }
    }
    write_atomic(&store.root.join("report.md"), md.as_bytes())?;
    Ok(summary)
}

/// What the report's figures are drawn from; each method writes its figures (PNG and SVG)
/// into the run folder and returns the Markdown that shows them.
struct Pictures<'a> {
    store: &'a RunStore,
    config: &'a Config,
    /// `eval.json`'s content.
    summary: &'a serde_json::Value,
    results: &'a [SeedResult],
    class_names: &'a [String],
}

/// The mean over seeds of each epoch's value, with the min–max band (epochs that some seeds
/// lack are left out).
fn mean_with_band(per_seed: &[Vec<f64>]) -> Line {
    let epochs = per_seed.iter().map(Vec::len).min().unwrap_or(0);
    let mut line = Line {
        markers: true,
        ..Line::default()
    };
    for e in 0..epochs {
        let v: Vec<f64> = per_seed.iter().map(|s| s[e]).collect();
        let mean = crate::metrics::mean(&v);
        let (lo, hi) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        line.points.push((e as f64, mean));
        if per_seed.len() > 1 {
            line.band.push((e as f64, lo, hi));
        }
    }
    line
}

impl Pictures<'_> {
    fn class(&self, k: usize) -> String {
        self.class_names
            .get(k)
            .cloned()
            .unwrap_or_else(|| format!("category {k}"))
    }

    /// Which seeds a curve stands for: `seed 0`, or `mean over 5 seeds`.
    fn seeds_text(&self) -> String {
        match self.results.len() {
            1 => format!("seed {}", self.results[0].seed),
            n => format!("mean over {n} seeds"),
        }
    }

    /// [`Self::seeds_text`] for a figure, which draws the seeds' min–max band around the mean.
    fn seeds_caption(&self) -> String {
        match self.results.len() {
            1 => self.seeds_text(),
            _ => format!("{}, band: min–max", self.seeds_text()),
        }
    }

    /// One confusion matrix per variant of the first seed, class names on both axes.
    fn confusions(&self, first: &SeedResult) -> anyhow::Result<()> {
        for (name, v) in &first.variants {
            let rows: Vec<Vec<f64>> = v
                .confusion
                .iter()
                .map(|r| r.iter().map(|&c| c as f64).collect())
                .collect();
            let small = rows.len() <= MAX_NAMED_CLASSES;
            let figure = Heatmap {
                title: format!("Confusion of `{name}` (seed {}, final epoch)", first.seed),
                x_label: "predicted class".into(),
                y_label: "true class".into(),
                values: rows,
                value_label: "test images".into(),
                names: small.then(|| self.class_names.to_vec()),
                annotate: small,
                ..Heatmap::default()
            };
            save(
                &figure,
                &self.store.root.join(format!("confusion-{name}.png")),
            )?;
        }
        Ok(())
    }

    /// The graph epochs of a variant that has them (global epoch numbers), from the first seed.
    fn graph_epochs(&self) -> Vec<f64> {
        let Some(first) = self.results.first() else {
            return vec![];
        };
        first
            .variants
            .values()
            .find(|v| !v.graph_epochs.is_empty())
            .map(|v| {
                v.graph_epochs
                    .iter()
                    .filter_map(|r| r.get("epoch").and_then(|e| e.as_f64()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A training-curve figure's shared frame: the 3a/3b boundary marked, graph epochs shaded.
    fn epoch_frame(&self, title: String, y_label: &str) -> Lines {
        let c = &self.config.classifier;
        Lines {
            title,
            x_label: format!(
                "epoch (step 3a: 0–{}, step 3b: {}–{})",
                c.epochs_3a.saturating_sub(1),
                c.epochs_3a,
                c.epochs_3a + c.epochs_3b - 1
            ),
            y_label: y_label.into(),
            spans: self
                .graph_epochs()
                .iter()
                .map(|&e| (e - 0.5, e + 0.5))
                .collect(),
            span_label: "graph epoch of 3b".into(),
            marks: vec![(c.epochs_3a as f64 - 0.5, "step 3b".into())],
            x_integer: true,
            headroom: 0.5,
            ..Lines::default()
        }
    }

    /// Novel-test top-1 per epoch of each variant, and the training loss per epoch (with the
    /// graph epochs' weighted CE and α·reg apart).
    fn curves(&self) -> anyhow::Result<String> {
        let variants: Vec<String> = self.results[0].variants.keys().cloned().collect();
        let mut top1 = self.epoch_frame(
            format!("Novel test top-1 per epoch ({})", self.seeds_caption()),
            "top-1 on the novel test images (%)",
        );
        for v in &variants {
            let per_seed: Vec<Vec<f64>> = self
                .results
                .iter()
                .filter_map(|r| r.variants.get(v))
                .map(|r| r.top1_per_epoch.iter().map(|a| 100.0 * a).collect())
                .collect();
            let line = mean_with_band(&per_seed);
            if !line.points.is_empty() {
                top1.lines.push(Line {
                    name: v.clone(),
                    ..line
                });
            }
        }
        if top1.lines.is_empty() {
            return Ok(String::new());
        }
        save(&top1, &self.store.root.join("curves-top1.png"))?;
        // The figure's curves as numbers.
        let epochs = top1.lines.iter().map(|l| l.points.len()).max().unwrap_or(0);
        let mut table = format!(
            "\n| variant (top-1 %, {}) | {} |\n|---|{}\n",
            self.seeds_text(),
            (0..epochs)
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(epochs)
        );
        for line in &top1.lines {
            let cells: Vec<String> = line.points.iter().map(|p| format!("{:.1}", p.1)).collect();
            table.push_str(&format!("| `{}` | {} |\n", line.name, cells.join(" | ")));
        }

        let mut loss = self.epoch_frame(
            format!("Training loss per epoch ({})", self.seeds_caption()),
            "mean loss per batch",
        );
        for v in &variants {
            let histories: Vec<serde_json::Value> = self
                .results
                .iter()
                .filter_map(|r| {
                    let node = Node::variant(Stage::Classifier, v);
                    Artifact::verify(&self.store.artifact_path(r.seed, &node)).ok()
                })
                .map(|meta| meta.metrics["history"].clone())
                .collect();
            let series = |key: &str| -> Vec<Vec<f64>> {
                histories
                    .iter()
                    .map(|h| {
                        h[key]
                            .as_array()
                            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                            .unwrap_or_default()
                    })
                    .collect()
            };
            let total = mean_with_band(&series("train_loss"));
            if !total.points.is_empty() {
                loss.lines.push(Line {
                    name: format!("{v}: total"),
                    ..total
                });
            }
        }
        // The graph epochs' two terms of SimTrans, means over seeds.
        let full_terms = self.summary["graph_terms"]["full"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (key, what) in [("ce", "weighted CE"), ("alpha_reg", "α·reg")] {
            let points: Vec<(f64, f64)> = full_terms
                .iter()
                .filter_map(|r| Some((r["epoch"].as_f64()?, r[key].as_f64()?)))
                .collect();
            if !points.is_empty() {
                loss.lines.push(Line {
                    name: format!("full: {what} of its graph epochs"),
                    points,
                    band: vec![],
                    markers: true,
                });
            }
        }
        let loss_md = if loss.lines.is_empty() {
            String::new()
        } else {
            save(&loss, &self.store.root.join("curves-loss.png"))?;
            "\n![training loss per epoch](curves-loss.png)\n".into()
        };
        Ok(format!(
            "\n## Training curves\n\nNovel-test top-1 after each epoch, watched only (never used to select). \
             The vertical line is the start of step 3b; shaded epochs are its graph epochs (batch \
             `graph_batch_size`, graph term on for `graph` and `full`). Each figure is also an SVG \
             beside the PNG.\n\n![novel test top-1 per epoch](curves-top1.png)\n{table}{loss_md}"
        ))
    }

    /// SimNet's pair F1 of "similar" per epoch on the base validation pairs and the novel test
    /// pairs.
    fn simnet_f1(&self) -> anyhow::Result<String> {
        let histories: Vec<Vec<serde_json::Value>> = self
            .results
            .iter()
            .filter_map(|r| {
                let node = Node::stage(Stage::Simnet);
                Artifact::verify(&self.store.artifact_path(r.seed, &node)).ok()
            })
            .map(|meta| {
                meta.metrics["history"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        let mut figure = Lines {
            title: format!("SimNet pair F1 per epoch ({})", self.seeds_caption()),
            x_label: "SimNet epoch (step 1)".into(),
            y_label: "F1 of \"same category\" pairs".into(),
            y_range: Some((0.0, 1.0)),
            x_integer: true,
            ..Lines::default()
        };
        for (key, name) in [
            ("f1_val", "base validation pairs"),
            ("f1_test", "novel test pairs (transfer)"),
        ] {
            let per_seed: Vec<Vec<f64>> = histories
                .iter()
                .map(|h| h.iter().filter_map(|r| r[key].as_f64()).collect())
                .collect();
            let line = mean_with_band(&per_seed);
            if !line.points.is_empty() {
                figure.lines.push(Line {
                    name: name.into(),
                    ..line
                });
            }
        }
        if figure.lines.is_empty() {
            return Ok(String::new());
        }
        save(&figure, &self.store.root.join("simnet-f1.png"))?;
        Ok("\n## SimNet\n\n![SimNet pair F1 per epoch](simnet-f1.png)\n".into())
    }

    /// The denoise artifact of `seed` with the data index's noise ground truth per web image
    /// (`None` where either artifact or one of its tensors is missing).
    fn web_weights(&self, seed: u64) -> anyhow::Result<Option<WebWeights>> {
        let denoise = self.store.artifact_path(seed, &Node::stage(Stage::Denoise));
        let data = self.store.artifact_path(seed, &Node::stage(Stage::Data));
        let (Ok(d), Ok(x)) = (
            Artifact::load(&denoise, &ArtifactSchema::any(), &Device::Cpu),
            Artifact::load(&data, &ArtifactSchema::any(), &Device::Cpu),
        ) else {
            return Ok(None);
        };
        let (Some(ids), Some(offsets), Some(w), Some(noise)) = (
            d.tensors.get("ids"),
            d.tensors.get("class_offsets"),
            d.tensors.get("weights.savg1"),
            x.tensors.get("noise"),
        ) else {
            return Ok(None);
        };
        let ids = ids.to_vec1::<u32>()?;
        let noise = noise.to_vec1::<u8>()?;
        Ok(Some(WebWeights {
            kind: ids
                .iter()
                .map(|&id| {
                    noise
                        .get(id as usize)
                        .and_then(|&v| NoiseKind::from_u8(v))
                        .unwrap_or(NoiseKind::Unknown)
                })
                .collect(),
            offsets: offsets.to_vec1::<u32>()?,
            weights: w.to_vec1::<f32>()?,
            artifact: d,
        }))
    }

    /// Per novel category, a histogram of the `savg1` weights by recorded noise kind; and the
    /// ROC curves of the weights against that ground truth, over all categories.
    fn weights(&self, seed: u64, web: &WebWeights) -> anyhow::Result<String> {
        let mut md = format!(
            "\n## Sample weights (seed {seed})\n\n`savg1` weights of each novel category's web images \
             (mean 1 per category), by the noise kind the data set recorded.\n\n"
        );
        for (k, pair) in web.offsets.windows(2).enumerate() {
            if k == MAX_PICTURED_CATEGORIES {
                md.push_str(&format!(
                    "\n\n(The first {MAX_PICTURED_CATEGORIES} categories only; every weight is in the denoise artifact.)"
                ));
                break;
            }
            let mut groups: Vec<(String, Vec<f64>)> = NoiseKind::ALL
                .iter()
                .map(|&k| (kind_label(k), vec![]))
                .collect();
            for i in pair[0] as usize..pair[1] as usize {
                groups[web.kind[i] as usize].1.push(web.weights[i] as f64);
            }
            let figure = Histogram {
                title: format!("Weights of the web images of {}", self.class(k)),
                x_label: "savg1 weight (1 = the category's mean)".into(),
                y_label: "web images".into(),
                range: (0.0, 2.0),
                bins: 30,
                groups,
            };
            let file = format!("weights-{k}.png");
            save(&figure, &self.store.root.join(&file))?;
            md.push_str(&format!("![weights of {}]({file}) ", self.class(k)));
        }
        let mut roc = Lines {
            title: format!("Do the weights find the clean images? (seed {seed}, all categories)"),
            x_label: "false-positive rate (noisy images kept)".into(),
            y_label: "true-positive rate (clean images kept)".into(),
            x_range: Some((0.0, 1.0)),
            y_range: Some((0.0, 1.0)),
            diagonal: true,
            ..Lines::default()
        };
        let clean = NoiseKind::Clean;
        for kind in [NoiseKind::ClosedSet, NoiseKind::OpenSet, NoiseKind::Junk] {
            let pick: Vec<usize> = (0..web.kind.len())
                .filter(|&i| web.kind[i] == clean || web.kind[i] == kind)
                .collect();
            let scores: Vec<f32> = pick.iter().map(|&i| web.weights[i]).collect();
            let positive: Vec<bool> = pick.iter().map(|&i| web.kind[i] == clean).collect();
            if let Some((points, auc)) = roc_curve(&scores, &positive) {
                roc.lines.push(Line {
                    name: format!("clean vs {}: AUC {auc:.3}", kind_label(kind)),
                    points,
                    ..Line::default()
                });
            }
        }
        if !roc.lines.is_empty() {
            save(&roc, &self.store.root.join("weights-roc.png"))?;
            md.push_str("\n\n![ROC of the weights](weights-roc.png)");
        }
        md.push('\n');
        Ok(md)
    }

    /// Heat maps of each novel category's similarity matrix, the web images ordered by recorded
    /// noise kind (then by weight, highest first), the kinds' blocks marked.
    fn similarities(&self, seed: u64, web: &WebWeights) -> anyhow::Result<String> {
        let mut md = format!(
            "\n## Similarity matrices (seed {seed})\n\nEach novel category's web images, grouped by the \
             noise kind the data set recorded and by weight within a group (highest first). If the \
             similarity transfers, the clean block (top left) is the brightest.\n\n"
        );
        let mut k = 0;
        while let Some(s) = web.artifact.tensors.get(&format!("S.{k}")) {
            if k == MAX_PICTURED_CATEGORIES || k + 1 >= web.offsets.len() {
                md.push_str(&format!(
                    "\n\n(The first {k} categories only; every matrix is in the denoise artifact.)"
                ));
                break;
            }
            let s: Vec<Vec<f32>> = s.to_dtype(DType::F32)?.to_vec2()?;
            let first = web.offsets[k] as usize;
            let kind = |i: usize| {
                web.kind
                    .get(first + i)
                    .copied()
                    .unwrap_or(NoiseKind::Unknown)
            };
            let weight = |i: usize| web.weights.get(first + i).copied().unwrap_or(0.0);
            let mut order: Vec<usize> = (0..s.len()).collect();
            order.sort_by(|&i, &j| kind(i).cmp(&kind(j)).then(weight(j).total_cmp(&weight(i))));
            let sorted: Vec<Vec<f64>> = order
                .iter()
                .map(|&i| order.iter().map(|&j| s[i][j] as f64).collect())
                .collect();
            let side = sorted.len().div_ceil(MAX_PICTURE_SIDE);
            let mut blocks: Vec<(usize, String)> = vec![];
            let mut previous = None;
            for (pos, &i) in order.iter().enumerate() {
                if previous != Some(kind(i)) {
                    previous = Some(kind(i));
                    blocks.push((pos / side, kind_label(kind(i))));
                }
            }
            if order.iter().all(|&i| kind(i) == NoiseKind::Unknown) {
                blocks.clear();
            }
            let figure = Heatmap {
                title: format!("Similarity of the web images of {}", self.class(k)),
                x_label: format!("web image (grouped by noise kind){}", block_note(side)),
                y_label: "web image".into(),
                values: block_means(&sorted, side),
                value_label: "SimNet similarity S (P(same category))".into(),
                value_range: Some((0.0, 1.0)),
                blocks,
                ..Heatmap::default()
            };
            let file = format!("similarity-{k}.png");
            save(&figure, &self.store.root.join(&file))?;
            md.push_str(&format!("![similarity of {}]({file}) ", self.class(k)));
            k += 1;
        }
        md.push('\n');
        Ok(md)
    }
}

/// A noise kind as the figures name it (`closed-set` for the metrics' `closed_set`).
fn kind_label(kind: NoiseKind) -> String {
    kind.name().replace('_', "-")
}
/// Confusion matrices up to this many classes get names and counts on the figure.
const MAX_NAMED_CLASSES: usize = 30;

fn block_note(side: usize) -> String {
    if side > 1 {
        format!(", means of {side}×{side} blocks")
    } else {
        String::new()
    }
}

/// The web images of one seed's denoise artifact: per image (in the artifact's order) its
/// recorded noise kind and `savg1` weight, the categories' offsets.
struct WebWeights {
    kind: Vec<NoiseKind>,
    weights: Vec<f32>,
    offsets: Vec<u32>,
    artifact: Artifact,
}

/// Per graph variant, the mean adjacency `Â` over same-label and cross-label pairs (and by true
/// class where known) across the graph epochs, means over seeds (`graph_terms` of the summary).
fn graph_pictures(store: &RunStore, summary: &serde_json::Value) -> anyhow::Result<String> {
    let Some(vars) = summary["graph_terms"].as_object() else {
        return Ok(String::new());
    };
    let keys = [
        ("a_hat_same_label", "pairs of the same web label"),
        ("a_hat_cross_label", "pairs of different web labels"),
        ("a_hat_same_true_class", "pairs of the same true class"),
        ("a_hat_cross_true_class", "pairs of different true classes"),
    ];
    let mut md = String::new();
    for (name, rows) in vars {
        let rows = rows.as_array().cloned().unwrap_or_default();
        let mut figure = Lines {
            title: format!("Graph adjacency of `{name}` (mean over seeds)"),
            x_label: "epoch (graph epochs of step 3b)".into(),
            y_label: "mean Â of a pair".into(),
            x_integer: true,
            headroom: 0.6,
            ..Lines::default()
        };
        for (k, label) in keys {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| Some((r["epoch"].as_f64()?, r[k].as_f64()?)))
                .collect();
            if points.len() == rows.len() && !points.is_empty() {
                figure.lines.push(Line {
                    name: label.into(),
                    points,
                    band: vec![],
                    markers: true,
                });
            }
        }
        if figure.lines.is_empty() {
            continue;
        }
        let file = format!("graph-{name}.png");
        save(&figure, &store.root.join(&file))?;
        md.push_str(&format!("\n![graph term of {name}]({file})\n"));
    }
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

/// What the seeds of a run redraw, for `eval.json`'s `benchmark` and the report: whether the
/// intervals over seeds are about training runs on one benchmark or about benchmarks too.
pub fn what_a_seed_varies(config: &Config) -> String {
    use simtrans_core::config::{BenchmarkSeed, DatasetKind};
    match (config.run.dataset, config.data.demo.benchmark_seed) {
        (DatasetKind::Demo, BenchmarkSeed::Fixed(s)) => format!(
            "one benchmark, drawn with data.demo.benchmark_seed = {s}, for every seed: a seed \
             varies the training only (initialisation, batches, augmentation)"
        ),
        (DatasetKind::Demo, BenchmarkSeed::Run) => "each seed draws its own benchmark \
             (data.demo.benchmark_seed = \"run\"): a seed varies the data roles and the noise \
             too"
        .into(),
        (other, _) => format!(
            "the {} data set as it is for every seed: a seed varies the training only",
            other.name()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{block_means, what_a_seed_varies};
    use simtrans_core::config::{BenchmarkSeed, Config, DatasetKind, Preset};

    #[test]
    fn the_report_says_what_a_seed_redraws() {
        let mut c = Config::preset(Preset::Demo);
        let fixed = what_a_seed_varies(&c);
        assert!(fixed.contains("benchmark_seed = 0") && fixed.contains("training only"));
        c.data.demo.benchmark_seed = BenchmarkSeed::Run;
        assert!(what_a_seed_varies(&c).contains("noise too"));
        let mut cub = Config::preset(Preset::Paper);
        cub.run.dataset = DatasetKind::Cub;
        cub.data.demo.benchmark_seed = BenchmarkSeed::Run;
        let real = what_a_seed_varies(&cub);
        assert!(real.contains("cub data set") && real.contains("training only"));
    }

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
