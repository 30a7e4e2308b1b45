//! Per-seed results and their summary over seeds: the stable `eval.json`.
//!
//! The per-seed eval artifact stores a [`SeedResult`] in its metrics; [`summarise`] turns the
//! results of all seeds into the JSON document other tools read. Its keys are a contract:
//! `dataset`, `preset`, `seeds`, `variants.<v>.{top1_final, top1_final_mean, top1_final_std,
//! top1_test_selected_mean, paired_diff_vs_naive_mean, paired_diff_vs_naive_std}`, `gap_closed`,
//! `simnet.pair_f1_base_val`, `weights_auc.{overall, closed_set, open_set}`, `wall_seconds.<stage>`,
//! `novel_top1` and `baseline_top1`, and the evidence keys of [`crate::evidence::add_evidence`].
//! Accuracies are fractions in [0, 1].

use crate::metrics::{mean, std};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// One classifier variant evaluated on the novel test set, one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct VariantResult {
    /// Top-1 of the final epoch (the model the stage kept).
    pub top1_final: f64,
    /// Best top-1 over epochs on the **test** set — only for comparison with the paper.
    pub top1_test_selected: Option<f64>,
    /// Per-class accuracy of the final model, in novel-class order.
    pub per_class: Vec<f64>,
    /// Confusion counts `[true][pred]` of the final model.
    pub confusion: Vec<Vec<u64>>,
    /// Per test image (in the data index's novel-test order): 1 where the final model is right.
    #[serde(default)]
    pub correct: Vec<u8>,
    /// Novel-test top-1 after every epoch (watched, never used for selection).
    #[serde(default)]
    pub top1_per_epoch: Vec<f64>,
    /// The graph term's accounting per graph epoch (the classifier's `history.graph_epochs`).
    #[serde(default)]
    pub graph_epochs: Vec<BTreeMap<String, Value>>,
}

/// Everything measured for one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SeedResult {
    pub seed: u64,
    pub variants: BTreeMap<String, VariantResult>,
    /// SimNet pair F1 of "similar" on the base validation split.
    pub simnet_f1_base_val: Option<f64>,
    /// SimNet pair F1 on the novel test set (reported, never used for selection).
    pub simnet_f1_novel_test: Option<f64>,
    /// Weight-vs-noise ROC-AUC by noise kind (`overall`, `closed_set`, `open_set`, `junk`).
    pub weights_auc: BTreeMap<String, f64>,
    /// Wall time of each stage (classifier variants summed under `classifier`).
    pub wall_seconds: BTreeMap<String, f64>,
    /// The transfer check of the seed's SimNet on its web images (`simtrans_denoise::transfer`).
    #[serde(default)]
    pub transfer: Option<simtrans_denoise::transfer::TransferCheck>,
}

fn opt_mean(xs: &[Option<f64>]) -> Value {
    let v: Vec<f64> = xs.iter().flatten().copied().collect();
    if v.is_empty() {
        Value::Null
    } else {
        json!(mean(&v))
    }
}

/// Summarises per-seed results into the `eval.json` document.
pub fn summarise(dataset: &str, preset: &str, results: &[SeedResult]) -> Value {
    let seeds: Vec<u64> = results.iter().map(|r| r.seed).collect();
    let names: Vec<String> = {
        let mut n: Vec<String> = results
            .iter()
            .flat_map(|r| r.variants.keys().cloned())
            .collect();
        n.sort();
        n.dedup();
        n
    };
    let top1 = |v: &str| -> Vec<f64> {
        results
            .iter()
            .filter_map(|r| r.variants.get(v).map(|x| x.top1_final))
            .collect()
    };
    let mut variants = Map::new();
    for name in &names {
        let finals = top1(name);
        let selected: Vec<Option<f64>> = results
            .iter()
            .filter_map(|r| r.variants.get(name).map(|x| x.top1_test_selected))
            .collect();
        // Paired differences: same seed, so same data and the same initialisation.
        let diffs: Vec<f64> = results
            .iter()
            .filter_map(|r| {
                Some(r.variants.get(name)?.top1_final - r.variants.get("naive")?.top1_final)
            })
            .collect();
        let wins = diffs.iter().filter(|d| **d > 0.0).count();
        let per_class: Vec<f64> = {
            let rows: Vec<&Vec<f64>> = results
                .iter()
                .filter_map(|r| r.variants.get(name).map(|x| &x.per_class))
                .collect();
            let k = rows.first().map_or(0, |r| r.len());
            (0..k)
                .map(|c| mean(&rows.iter().map(|r| r[c]).collect::<Vec<_>>()))
                .collect()
        };
        variants.insert(
            name.clone(),
            json!({
                "top1_final": finals,
                "top1_final_mean": mean(&finals),
                "top1_final_std": std(&finals),
                "top1_test_selected": selected,
                "top1_test_selected_mean": opt_mean(&selected),
                "paired_diff_vs_naive": diffs,
                "paired_diff_vs_naive_mean": if diffs.is_empty() { Value::Null } else { json!(mean(&diffs)) },
                "paired_diff_vs_naive_std": if diffs.is_empty() { Value::Null } else { json!(std(&diffs)) },
                "seeds_better_than_naive": wins,
                "per_class_mean": per_class,
            }),
        );
    }
    let mean_of = |v: &str| {
        let x = top1(v);
        (!x.is_empty()).then(|| mean(&x))
    };
    let gap_closed = match (mean_of("full"), mean_of("naive"), mean_of("clean")) {
        (Some(f), Some(n), Some(c)) if (c - n).abs() > 1e-12 => json!((f - n) / (c - n)),
        _ => Value::Null,
    };
    let mut auc = Map::new();
    let kinds: std::collections::BTreeSet<&String> =
        results.iter().flat_map(|r| r.weights_auc.keys()).collect();
    for k in kinds {
        let v: Vec<f64> = results
            .iter()
            .filter_map(|r| r.weights_auc.get(k).copied())
            .collect();
        auc.insert(k.clone(), json!(mean(&v)));
    }
    let mut wall = Map::new();
    let stages: std::collections::BTreeSet<&String> =
        results.iter().flat_map(|r| r.wall_seconds.keys()).collect();
    for s in stages {
        let total: f64 = results.iter().filter_map(|r| r.wall_seconds.get(s)).sum();
        wall.insert(s.clone(), json!(total));
    }
    let mut summary = json!({
        "dataset": dataset,
        "preset": preset,
        "seeds": seeds,
        "selection": "final epoch; top1_test_selected_* picks the best epoch on the test set and is reported only for comparison with the paper",
        "variants": variants,
        "gap_closed": gap_closed,
        "simnet": {
            "pair_f1_base_val": opt_mean(&results.iter().map(|r| r.simnet_f1_base_val).collect::<Vec<_>>()),
            "pair_f1_novel_test": opt_mean(&results.iter().map(|r| r.simnet_f1_novel_test).collect::<Vec<_>>()),
        },
        "weights_auc": auc,
        "wall_seconds": wall,
        "novel_top1": mean_of("full").map_or(Value::Null, |x| json!(x)),
        "baseline_top1": mean_of("naive").map_or(Value::Null, |x| json!(x)),
    });
    crate::evidence::add_evidence(&mut summary, results);
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(top1: f64) -> VariantResult {
        VariantResult {
            top1_final: top1,
            top1_test_selected: Some(top1 + 0.01),
            per_class: vec![top1, top1],
            confusion: vec![vec![1, 0], vec![0, 1]],
            ..Default::default()
        }
    }

    fn seed(s: u64, naive: f64, full: f64, clean: f64) -> SeedResult {
        SeedResult {
            seed: s,
            variants: BTreeMap::from([
                ("naive".into(), variant(naive)),
                ("full".into(), variant(full)),
                ("clean".into(), variant(clean)),
            ]),
            simnet_f1_base_val: Some(0.8),
            weights_auc: BTreeMap::from([("overall".into(), 0.9), ("closed_set".into(), 0.7)]),
            wall_seconds: BTreeMap::from([("simnet".into(), 10.0)]),
            ..Default::default()
        }
    }

    #[test]
    fn eval_json_has_the_contract_keys_and_values() {
        let r = [
            seed(0, 0.60, 0.70, 0.80),
            seed(1, 0.62, 0.68, 0.82),
            seed(2, 0.64, 0.62, 0.84),
        ];
        let j = summarise("demo", "demo", &r);
        assert_eq!(j["seeds"], json!([0, 1, 2]));
        let full = &j["variants"]["full"];
        assert_eq!(full["top1_final"], json!([0.70, 0.68, 0.62]));
        assert!((full["top1_final_mean"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // Paired differences 0.10, 0.06, -0.02: mean 0.0467, two seeds of three better.
        assert!((full["paired_diff_vs_naive_mean"].as_f64().unwrap() - 0.14 / 3.0).abs() < 1e-12);
        assert_eq!(full["seeds_better_than_naive"], json!(2));
        assert!(full["paired_diff_vs_naive_std"].as_f64().unwrap() > 0.0);
        assert!(
            (full["top1_test_selected_mean"].as_f64().unwrap() - (2.0 / 3.0 + 0.01)).abs() < 1e-12
        );
        // gap_closed = (0.6667 - 0.62) / (0.82 - 0.62).
        let g = j["gap_closed"].as_f64().unwrap();
        assert!((g - (2.0 / 3.0 - 0.62) / 0.20).abs() < 1e-9, "{g}");
        assert_eq!(j["novel_top1"], full["top1_final_mean"]);
        assert_eq!(
            j["baseline_top1"],
            j["variants"]["naive"]["top1_final_mean"]
        );
        assert!((j["simnet"]["pair_f1_base_val"].as_f64().unwrap() - 0.8).abs() < 1e-12);
        assert!((j["weights_auc"]["closed_set"].as_f64().unwrap() - 0.7).abs() < 1e-12);
        assert_eq!(j["wall_seconds"]["simnet"], json!(30.0));
    }

    #[test]
    fn without_an_oracle_gap_closed_is_null() {
        let mut r = seed(0, 0.6, 0.7, 0.8);
        r.variants.remove("clean");
        let j = summarise("cub", "paper", &[r]);
        assert!(j["gap_closed"].is_null());
        assert_eq!(j["variants"]["full"]["top1_final_std"], json!(0.0));
    }
}
