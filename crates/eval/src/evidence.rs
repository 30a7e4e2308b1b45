//! Whether SimTrans helped, which component did, and whether its similarity transferred: the
//! evidence part of `eval.json` and the report.
//!
//! From the per-seed results ([`SeedResult`]) it computes, for every variant against `naive`:
//! the paired difference's 95 % t-interval over seeds, a paired bootstrap over the test images of
//! each seed, and the verdict those say in words (over seeds where there are two or more, else
//! the one seed's bootstrap); the interaction of the two components (`full − weighting − graph +
//! naive`); how settled each variant's final epoch is (the spread of its last three epochs); the
//! graph term's accounting per graph epoch; and the transfer check of every seed with, where the
//! truth is known, how well its label-free figures track the truth across seeds.

use crate::stats::{paired_bootstrap, t_interval, Interval, Verdict};
use crate::summary::SeedResult;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Bootstrap resamples per seed and comparison.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// Epochs at the end of training whose spread says whether the final epoch is settled.
pub const LAST_EPOCHS: usize = 3;

/// The verdict of a set of paired differences and how it was reached.
fn verdict(ci: Option<&Interval>, bootstrap: &[Interval], seeds: usize) -> (Value, Value) {
    match (ci, bootstrap) {
        (Some(ci), _) => (
            json!(Verdict::of(ci)),
            json!(format!("95 % t-interval over {seeds} seeds")),
        ),
        (None, [one]) => (
            json!(Verdict::of(one)),
            json!("95 % paired bootstrap over the test images of the one seed"),
        ),
        _ => (Value::Null, Value::Null),
    }
}

/// The paired bootstrap of `v` against `naive` on each seed where both have per-image results.
fn bootstraps(results: &[SeedResult], v: &str) -> Vec<(u64, Interval)> {
    results
        .iter()
        .enumerate()
        .filter_map(|(k, r)| {
            let a = &r.variants.get(v)?.correct;
            let b = &r.variants.get("naive")?.correct;
            let (a, b): (Vec<bool>, Vec<bool>) = (
                a.iter().map(|&x| x != 0).collect(),
                b.iter().map(|&x| x != 0).collect(),
            );
            // Same images in the same order (the eval stage checked the ids); seeded per seed
            // and variant so that every report of the same artifacts prints the same bounds.
            let seed = r.seed.wrapping_mul(1_000_003) ^ (k as u64) ^ name_hash(v);
            paired_bootstrap(&a, &b, BOOTSTRAP_RESAMPLES, seed)
                .ok()
                .map(|i| (r.seed, i))
        })
        .collect()
}

/// A stable small hash of a variant name (FNV-1a), to seed its bootstrap.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn interval_json(i: &Interval) -> Value {
    json!({ "mean": i.mean, "lo": i.lo, "hi": i.hi })
}

/// Max − min of the last [`LAST_EPOCHS`] epochs of a per-epoch curve.
fn last_spread(curve: &[f64]) -> Option<f64> {
    (curve.len() >= LAST_EPOCHS).then(|| {
        let tail = &curve[curve.len() - LAST_EPOCHS..];
        let hi = tail.iter().cloned().fold(f64::MIN, f64::max);
        let lo = tail.iter().cloned().fold(f64::MAX, f64::min);
        hi - lo
    })
}

/// Pearson correlation of two equally long samples; None below 3 points or without spread.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 3 || y.len() != n {
        return None;
    }
    let (mx, my) = (
        x.iter().sum::<f64>() / n as f64,
        y.iter().sum::<f64>() / n as f64,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// The evidence of one variant against `naive`.
fn variant_evidence(results: &[SeedResult], name: &str) -> Value {
    let curves: Vec<f64> = results
        .iter()
        .filter_map(|r| last_spread(&r.variants.get(name)?.top1_per_epoch))
        .collect();
    let mut out = json!({
        "last3_spread": curves,
        "last3_spread_max": curves.iter().cloned().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
    });
    if name == "naive" {
        return out;
    }
    let diffs: Vec<f64> = results
        .iter()
        .filter_map(|r| {
            Some(r.variants.get(name)?.top1_final - r.variants.get("naive")?.top1_final)
        })
        .collect();
    let ci = t_interval(&diffs);
    let boots = bootstraps(results, name);
    let boot_intervals: Vec<Interval> = boots.iter().map(|(_, i)| *i).collect();
    let (v, basis) = verdict(ci.as_ref(), &boot_intervals, diffs.len());
    out["paired_diff_ci95"] = ci.as_ref().map_or(Value::Null, interval_json);
    out["paired_bootstrap_ci95"] = boots
        .iter()
        .map(|(seed, i)| json!({ "seed": seed, "mean": i.mean, "lo": i.lo, "hi": i.hi }))
        .collect();
    out["verdict"] = v;
    out["verdict_basis"] = basis;
    out
}

/// `full − weighting − graph + naive` per seed: what the combination adds beyond the sum of its
/// components (0 = additive).
fn interaction(results: &[SeedResult]) -> Value {
    let per_seed: Vec<f64> = results
        .iter()
        .filter_map(|r| {
            let t = |v: &str| r.variants.get(v).map(|x| x.top1_final);
            Some(t("full")? - t("weighting")? - t("graph")? + t("naive")?)
        })
        .collect();
    if per_seed.is_empty() {
        return Value::Null;
    }
    let ci = t_interval(&per_seed);
    json!({
        "per_seed": per_seed,
        "mean": per_seed.iter().sum::<f64>() / per_seed.len() as f64,
        "ci95": ci.as_ref().map_or(Value::Null, interval_json),
        "verdict": ci.as_ref().map_or(Value::Null, |c| json!(Verdict::of(c))),
    })
}

/// Means over seeds of the graph term's accounting, graph epoch by graph epoch.
fn graph_terms(results: &[SeedResult], name: &str) -> Value {
    let runs: Vec<&Vec<BTreeMap<String, Value>>> = results
        .iter()
        .filter_map(|r| r.variants.get(name).map(|v| &v.graph_epochs))
        .filter(|g| !g.is_empty())
        .collect();
    let Some(first) = runs.first() else {
        return Value::Null;
    };
    let keys = [
        "ce",
        "alpha_reg",
        "a_hat_same_label",
        "a_hat_cross_label",
        "a_hat_same_true_class",
        "a_hat_cross_true_class",
    ];
    (0..first.len())
        .map(|e| {
            let mut row = Map::new();
            row.insert(
                "epoch".into(),
                first[e].get("epoch").cloned().unwrap_or(Value::Null),
            );
            for k in keys {
                let xs: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.get(e)?.get(k)?.as_f64())
                    .collect();
                row.insert(
                    k.into(),
                    if xs.is_empty() {
                        Value::Null
                    } else {
                        json!(xs.iter().sum::<f64>() / xs.len() as f64)
                    },
                );
            }
            Value::Object(row)
        })
        .collect()
}

/// The transfer checks of every seed and, where the truth is known, how the label-free figures
/// track it across seeds.
fn transfer(results: &[SeedResult]) -> Value {
    let checks: Vec<(u64, &simtrans_denoise::transfer::TransferCheck)> = results
        .iter()
        .filter_map(|r| r.transfer.as_ref().map(|t| (r.seed, t)))
        .collect();
    if checks.is_empty() {
        return Value::Null;
    }
    let per_seed: Vec<Value> = checks
        .iter()
        .map(|(seed, c)| {
            let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
            v["seed"] = json!(seed);
            v
        })
        .collect();
    let mean = |f: &dyn Fn(&simtrans_denoise::transfer::TransferCheck) -> Option<f64>| {
        let xs: Vec<f64> = checks.iter().filter_map(|(_, c)| f(c)).collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    };
    // Label-free figure against its truth, seed by seed.
    let pairs =
        |free: &dyn Fn(&simtrans_denoise::transfer::TransferCheck) -> Option<f64>,
         truth: &dyn Fn(&simtrans_denoise::transfer::TransferCheck) -> Option<f64>| {
            let (x, y): (Vec<f64>, Vec<f64>) = checks
                .iter()
                .filter_map(|(_, c)| Some((free(c)?, truth(c)?)))
                .unzip();
            json!({ "label_free": x, "truth": y, "pearson": pearson(&x, &y) })
        };
    let truth_ratio = |c: &simtrans_denoise::transfer::TransferCheck| {
        let t = c.truth.as_ref()?;
        (t.same.mean_relax > 0.0).then(|| t.cross.mean_relax / t.same.mean_relax)
    };
    let simnet_f1: Vec<(f64, f64)> = results
        .iter()
        .filter_map(|r| Some((r.transfer.as_ref()?.auc?, r.simnet_f1_novel_test?)))
        .collect();
    let (auc_x, f1_y): (Vec<f64>, Vec<f64>) = simnet_f1.into_iter().unzip();
    json!({
        "warn_rule": format!("cross_to_same >= {} with alpha > 0 and eye > 0", simtrans_denoise::transfer::WARN_RATIO),
        "warned_seeds": checks.iter().filter(|(_, c)| c.warn).map(|(s, _)| *s).collect::<Vec<_>>(),
        "auc_mean": mean(&|c| c.auc),
        "cross_to_same_mean": mean(&|c| Some(c.cross_to_same)),
        "cross_share_mean": mean(&|c| Some(c.cross_share)),
        "truth_auc_mean": mean(&|c| c.truth.as_ref()?.auc),
        "truth_cross_to_same_mean": mean(&truth_ratio),
        "truth_cross_share_mean": mean(&|c| Some(c.truth.as_ref()?.cross_share)),
        "tracking": {
            "auc": pairs(&|c| c.auc, &|c| c.truth.as_ref()?.auc),
            "cross_to_same": pairs(&|c| Some(c.cross_to_same), &truth_ratio),
            "cross_share": pairs(&|c| Some(c.cross_share), &|c| Some(c.truth.as_ref()?.cross_share)),
            "auc_vs_simnet_novel_f1": { "label_free": auc_x, "truth": f1_y, "pearson": pearson(&auc_x, &f1_y) },
        },
        "per_seed": per_seed,
    })
}

/// Adds the evidence to a summary made by [`crate::summary::summarise`]: per variant
/// (`paired_diff_ci95`, `paired_bootstrap_ci95`, `verdict`, `verdict_basis`, `last3_spread`,
/// `last3_spread_max`), and `interaction`, `graph_terms.<variant>`, `transfer` at the top.
pub fn add_evidence(summary: &mut Value, results: &[SeedResult]) {
    let names: Vec<String> = summary["variants"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let mut graph = Map::new();
    for name in &names {
        let ev = variant_evidence(results, name);
        if let (Some(slot), Some(ev)) = (summary["variants"][name].as_object_mut(), ev.as_object())
        {
            slot.extend(ev.clone());
        }
        let g = graph_terms(results, name);
        if !g.is_null() {
            graph.insert(name.clone(), g);
        }
    }
    summary["interaction"] = interaction(results);
    summary["graph_terms"] = Value::Object(graph);
    summary["transfer"] = transfer(results);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::VariantResult;

    fn variant(top1: f64, correct: Vec<u8>, curve: Vec<f64>) -> VariantResult {
        VariantResult {
            top1_final: top1,
            top1_test_selected: None,
            per_class: vec![],
            confusion: vec![],
            correct,
            top1_per_epoch: curve,
            graph_epochs: vec![],
        }
    }

    fn seed(s: u64, parts: &[(&str, f64)]) -> SeedResult {
        SeedResult {
            seed: s,
            variants: parts
                .iter()
                .map(|(n, t)| {
                    let hits = (t * 100.0).round() as usize;
                    let correct = (0..100).map(|i| u8::from(i < hits)).collect();
                    (
                        n.to_string(),
                        variant(*t, correct, vec![0.5, *t, *t - 0.01, *t]),
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn verdicts_intervals_and_interaction_from_paired_results() {
        // `weighting` beats naive by 3 to 5 points on every seed; `graph` is ±1 around it.
        let results = [
            seed(
                0,
                &[
                    ("naive", 0.70),
                    ("weighting", 0.74),
                    ("graph", 0.71),
                    ("full", 0.76),
                ],
            ),
            seed(
                1,
                &[
                    ("naive", 0.60),
                    ("weighting", 0.63),
                    ("graph", 0.59),
                    ("full", 0.62),
                ],
            ),
            seed(
                2,
                &[
                    ("naive", 0.65),
                    ("weighting", 0.70),
                    ("graph", 0.66),
                    ("full", 0.69),
                ],
            ),
        ];
        let mut summary = crate::summary::summarise("demo", "demo", &results);
        add_evidence(&mut summary, &results);
        let w = &summary["variants"]["weighting"];
        assert_eq!(w["verdict"], json!("helped"), "{w}");
        // Differences 0.04, 0.03, 0.05: t-interval 0.04 ± 4.302653 · 0.01 / √3.
        let half = 4.302653 * 0.01 / 3f64.sqrt();
        let ci = &w["paired_diff_ci95"];
        assert!(
            (ci["lo"].as_f64().unwrap() - (0.04 - half)).abs() < 1e-6,
            "{ci}"
        );
        assert!(
            (ci["hi"].as_f64().unwrap() - (0.04 + half)).abs() < 1e-6,
            "{ci}"
        );
        assert_eq!(w["paired_bootstrap_ci95"].as_array().unwrap().len(), 3);
        assert_eq!(
            summary["variants"]["graph"]["verdict"],
            json!("indistinguishable")
        );
        // Last three epochs t, t − 0.01, t: spread 0.01 on every seed.
        assert!((w["last3_spread_max"].as_f64().unwrap() - 0.01).abs() < 1e-12);
        // Interaction per seed: 0.76−0.74−0.71+0.70 = 0.01, 0.62−0.63−0.59+0.60 = 0, 0.69−0.70−0.66+0.65 = −0.02.
        let inter = &summary["interaction"];
        let per: Vec<f64> = inter["per_seed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (a, b) in per.iter().zip([0.01, 0.0, -0.02]) {
            assert!((a - b).abs() < 1e-9, "{per:?}");
        }
        assert_eq!(inter["verdict"], json!("indistinguishable"));
    }

    #[test]
    fn one_seed_falls_back_to_the_bootstrap_over_test_images() {
        let results = [seed(0, &[("naive", 0.50), ("full", 0.80)])];
        let mut summary = crate::summary::summarise("demo", "demo", &results);
        add_evidence(&mut summary, &results);
        let f = &summary["variants"]["full"];
        assert!(f["paired_diff_ci95"].is_null());
        assert_eq!(f["verdict"], json!("helped"));
        assert!(f["verdict_basis"].as_str().unwrap().contains("bootstrap"));
        assert!(summary["interaction"].is_null());
        assert!(summary["transfer"].is_null());
    }

    #[test]
    fn pearson_by_hand() {
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap() + 1.0).abs() < 1e-12);
        // x = 1..4, y = 1, 3, 2, 4: Σdx·dy = 4, Σdx² = Σdy² = 5, r = 0.8.
        assert!(
            (pearson(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap() - 0.8).abs() < 1e-12
        );
        assert!(pearson(&[1.0, 2.0], &[1.0, 2.0]).is_none());
        assert!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_none());
    }
}
