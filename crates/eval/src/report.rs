//! `report.md` and its pictures, from the summary and the per-seed results.
//!
//! The report states how every number was selected (final epoch; the test-selected column is
//! labelled as such), shows each variant's paired difference to the baseline as measured, and
//! never hides a component that moves accuracy the wrong way.

use crate::summary::SeedResult;
use serde_json::Value;
use std::fmt::Write as _;

fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or("—".into(), |x| format!("{:.2}", 100.0 * x))
}

/// Above this many classes a confusion matrix is only drawn (the picture) and its largest
/// confusions listed: a 50 × 50 table (CUB's novel classes) reads as nothing.
pub const MAX_TABLE_CLASSES: usize = 20;

/// The `most` largest off-diagonal counts of a confusion matrix, `(true, predicted, count)`,
/// largest first (ties by position).
pub fn top_confusions(confusion: &[Vec<u64>], most: usize) -> Vec<(usize, usize, u64)> {
    let mut off: Vec<(usize, usize, u64)> = confusion
        .iter()
        .enumerate()
        .flat_map(|(i, row)| {
            row.iter()
                .enumerate()
                .filter(move |&(j, &c)| j != i && c > 0)
                .map(move |(j, &c)| (i, j, c))
        })
        .collect();
    off.sort_by(|a, b| b.2.cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    off.truncate(most);
    off
}

/// The Markdown report.
pub fn markdown(summary: &Value, results: &[SeedResult], class_names: &[String]) -> String {
    let mut s = String::new();
    let seeds = summary["seeds"].as_array().map_or(0, |a| a.len());
    let _ = writeln!(s, "# SimTrans report\n");
    let _ = writeln!(
        s,
        "Data set `{}`, preset `{}`, {} seed(s) {}. Top-1 accuracy (%) on the clean novel test set. \
         **Final** = the last epoch (how every model here is selected). *Test-selected* = the best epoch \
         on the test set, shown only to compare with the paper, which selected that way. Paired \
         difference = the variant minus `naive` on the same seed (same data, same initialisation).\n",
        summary["dataset"].as_str().unwrap_or("?"),
        summary["preset"].as_str().unwrap_or("?"),
        seeds,
        summary["seeds"]
    );
    if let Some(b) = summary["benchmark"].as_str() {
        let _ = writeln!(s, "Seeds: {b}.\n");
    }
    let _ = writeln!(s, "## Ablation\n");
    let _ = writeln!(
        s,
        "| variant | final (mean ± std) | per seed | paired diff vs naive (mean ± std) | seeds better than naive | test-selected (mean) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let order = ["naive", "weighting", "graph", "full", "clean"];
    if let Some(vars) = summary["variants"].as_object() {
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort_by_key(|n| order.iter().position(|o| o == n).unwrap_or(order.len()));
        for name in names {
            let v = &vars[name];
            let per_seed: Vec<String> = v["top1_final"]
                .as_array()
                .map(|a| a.iter().map(pct).collect())
                .unwrap_or_default();
            let diff = if name == "naive" {
                "—".to_string()
            } else {
                format!(
                    "{} ± {}",
                    pct(&v["paired_diff_vs_naive_mean"]),
                    pct(&v["paired_diff_vs_naive_std"])
                )
            };
            let wins = if name == "naive" {
                "—".to_string()
            } else {
                format!("{}/{}", v["seeds_better_than_naive"], per_seed.len())
            };
            let _ = writeln!(
                s,
                "| `{name}` | {} ± {} | {} | {diff} | {wins} | {} |",
                pct(&v["top1_final_mean"]),
                pct(&v["top1_final_std"]),
                per_seed.join(", "),
                pct(&v["top1_test_selected_mean"]),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nVariants: `naive` = web images, unweighted (the webly-supervised baseline); `weighting` = SimNet sample \
         weights; `graph` = unweighted + graph regularisation; `full` = weights + graph (SimTrans); `clean` = the \
         clean web images only (the oracle upper bound, possible only where the noise is known).\n"
    );
    s.push_str(&evidence_markdown(summary));
    let gap = summary["gap_closed"].as_f64().map_or(
        "— (needs `naive`, `full` and `clean`; `--ablations` trains `clean` where the data set \
         records which web images are clean, as the demo benchmark does)"
            .into(),
        |g| format!("{g:.2}"),
    );
    let _ = writeln!(
        s,
        "Gap closed, (full − naive) / (clean − naive), means over seeds: **{gap}**\n"
    );
    let _ = writeln!(s, "## SimNet and sample weights\n");
    let f1 = |v: &Value, missing: &str| {
        v.as_f64().map_or(format!("— ({missing})"), |x| {
            format!("{:.2} %", 100.0 * x)
        })
    };
    let _ = writeln!(
        s,
        "- SimNet pair F1 of \"similar\": base validation {}, novel test {} (reported, not used for selection).",
        f1(
            &summary["simnet"]["pair_f1_base_val"],
            "the data set has no base validation split"
        ),
        f1(&summary["simnet"]["pair_f1_novel_test"], "no novel test pairs")
    );
    match summary["weights_auc"].as_object().filter(|a| !a.is_empty()) {
        None => {
            let _ = writeln!(
                s,
                "- ROC-AUC of the sample weights: not measured. Either this data set does not \
                 record which web images are noise, or the denoise stage scored no scheme of \
                 that name (`classifier.weights_3a`)."
            );
        }
        Some(auc) => {
            let parts: Vec<String> = auc
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k} {}",
                        v.as_f64().map_or("—".into(), |x| format!("{x:.3}"))
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "- ROC-AUC of the sample weights, clean vs noisy web images: {}.",
                parts.join(", ")
            );
        }
    }
    let _ = writeln!(s, "\n## Wall time (seconds, all seeds)\n");
    if let Some(w) = summary["wall_seconds"].as_object() {
        for (k, v) in w {
            let _ = writeln!(s, "- {k}: {:.1}", v.as_f64().unwrap_or(0.0));
        }
    }
    if let Some(first) = results.first() {
        let _ = writeln!(
            s,
            "\n## Confusion matrices (seed {}, final epoch, rows = true class)\n",
            first.seed
        );
        let class = |i: usize| class_names.get(i).map_or("?", |s| s.as_str());
        for (name, v) in &first.variants {
            let _ = writeln!(s, "### `{name}` ![confusion](confusion-{name}.png)\n");
            if class_names.len() > MAX_TABLE_CLASSES {
                let _ = writeln!(
                    s,
                    "{} classes: the picture above only; the largest confusions:\n",
                    class_names.len()
                );
                let _ = writeln!(
                    s,
                    "| true class | predicted as | test images |\n|---|---|---|"
                );
                for (i, j, c) in top_confusions(&v.confusion, 10) {
                    let _ = writeln!(s, "| {} | {} | {c} |", class(i), class(j));
                }
                let _ = writeln!(s);
                continue;
            }
            let _ = writeln!(s, "| true \\ pred | {} |", class_names.join(" | "));
            let _ = writeln!(s, "|---|{}", "---|".repeat(class_names.len()));
            for (i, row) in v.confusion.iter().enumerate() {
                let cells: Vec<String> = row.iter().map(|c| c.to_string()).collect();
                let _ = writeln!(s, "| {} | {} |", class(i), cells.join(" | "));
            }
            let _ = writeln!(s);
        }
    }
    s
}

/// Points (of accuracy) with a sign, from a fraction.
fn points(x: f64) -> String {
    format!("{:+.2}", 100.0 * x)
}

fn interval_text(v: &Value) -> Option<String> {
    Some(format!(
        "{} to {}",
        points(v["lo"].as_f64()?),
        points(v["hi"].as_f64()?)
    ))
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("—".into(), |x| format!("{x:.digits$}"))
}

/// The report's evidence: verdicts with confidence intervals, the interaction, how settled the
/// final epoch is, the transfer check and the graph-term accounting (keys of
/// [`crate::evidence::add_evidence`]).
pub fn evidence_markdown(summary: &Value) -> String {
    let mut s = String::new();
    let order = ["weighting", "graph", "full", "clean"];
    let vars = summary["variants"].as_object();
    let _ = writeln!(
        s,
        "## Did it help? Paired differences with 95 % confidence intervals
"
    );
    let _ = writeln!(
        s,
        "Points of top-1 against `naive` on the same seed. *Over seeds*: Student-t interval of the \
         paired differences (what another seed would do). *Over test images*: paired bootstrap \
         of one seed's test set ({} resamples; the test set's sampling noise alone). A component \
         **helped** or **hurt** when the interval over seeds excludes 0 (with one seed: the \
         bootstrap's), else it cannot be told apart from the baseline at this confidence.\n",
        crate::evidence::BOOTSTRAP_RESAMPLES
    );
    let _ = writeln!(
        s,
        "| variant | mean diff | 95 % CI over seeds | 95 % CI over test images, per seed | verdict |\n|---|---|---|---|---|"
    );
    let mut sentences = vec![];
    for name in order {
        let Some(v) = vars.and_then(|m| m.get(name)) else {
            continue;
        };
        let boots: Vec<String> = v["paired_bootstrap_ci95"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| Some(format!("s{}: {}", b["seed"], interval_text(b)?)))
                    .collect()
            })
            .unwrap_or_default();
        let verdict = v["verdict"].as_str().unwrap_or("—");
        let ci = interval_text(&v["paired_diff_ci95"]).unwrap_or("— (one seed)".into());
        let _ = writeln!(
            s,
            "| `{name}` | {} | {ci} | {} | {verdict} |",
            v["paired_diff_vs_naive_mean"]
                .as_f64()
                .map_or("—".into(), points),
            boots.join("; ")
        );
        let words = match verdict {
            "helped" => "helped",
            "hurt" => "hurt",
            _ => "cannot be told apart from `naive`",
        };
        sentences.push(format!(
            "- `{name}` {words}: {} points on average ({}, {}).",
            v["paired_diff_vs_naive_mean"]
                .as_f64()
                .map_or("—".into(), points),
            interval_text(&v["paired_diff_ci95"])
                .map_or("no interval over one seed".into(), |c| format!(
                    "95 % CI {c}"
                )),
            v["verdict_basis"].as_str().unwrap_or("no basis")
        ));
    }
    let _ = writeln!(s, "\n{}", sentences.join("\n"));
    let inter = &summary["interaction"];
    if !inter.is_null() {
        let _ = writeln!(
            s,
            "- Interaction, `full − weighting − graph + naive` (0 = the two components add up): \
             {} points ({}); {}.",
            inter["mean"].as_f64().map_or("—".into(), points),
            interval_text(&inter["ci95"]).map_or("no interval over one seed".into(), |c| format!(
                "95 % CI {c}"
            )),
            match inter["verdict"].as_str() {
                Some("helped") => "the combination does better than the sum of its parts",
                Some("hurt") => "the combination does worse than the sum of its parts",
                Some(_) => "not distinguishable from additive",
                None => "one seed: no verdict",
            }
        );
    }
    let spreads: Vec<String> = vars
        .map(|m| {
            m.iter()
                .filter_map(|(n, v)| {
                    Some(format!(
                        "`{n}` {:.2}",
                        100.0 * v["last3_spread_max"].as_f64()?
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    if !spreads.is_empty() {
        let _ = writeln!(
            s,
            "- How settled the final epoch is: largest spread (max − min, points) of the last \
             {} epochs over seeds: {}.",
            crate::evidence::LAST_EPOCHS,
            spreads.join(", ")
        );
    }
    s.push_str(&transfer_markdown(&summary["transfer"]));
    s.push_str(&graph_terms_markdown(&summary["graph_terms"]));
    s.push('\n');
    s
}

/// The transfer check's section.
fn transfer_markdown(t: &Value) -> String {
    let mut s = String::new();
    if t.is_null() {
        return s;
    }
    let _ = writeln!(
        s,
        "\n## Does the similarity transfer to the novel web images?\n"
    );
    let _ = writeln!(
        s,
        "Measured on a sample of web images across categories, with only the categories they were \
         found for (no ground truth): mean SimNet similarity of pairs found for the same and for \
         different categories, the ROC-AUC of the similarity for \"same category\", the graph \
         adjacency `Â` of a cross-category pair relative to a same-category pair (*cross/same*), and \
         the share of a graph batch's `Â` on cross-category pairs. Warning rule: {}. Where the data \
         set records the truth, the same by true class beside it.\n",
        t["warn_rule"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "| seed | S same / cross | AUC | cross/same | cross share | warns | true AUC | true cross/same | Â share on different true classes |\n|---|---|---|---|---|---|---|---|---|"
    );
    for c in t["per_seed"].as_array().into_iter().flatten() {
        let tr = &c["truth"];
        let true_ratio = match (
            tr["cross"]["mean_relax"].as_f64(),
            tr["same"]["mean_relax"].as_f64(),
        ) {
            (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
            _ => "—".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |",
            c["seed"],
            num(&c["same"]["mean_s"], 3),
            num(&c["cross"]["mean_s"], 3),
            num(&c["auc"], 3),
            num(&c["cross_to_same"], 2),
            num(&c["cross_share"], 2),
            if c["warn"].as_bool() == Some(true) {
                "**yes**"
            } else {
                "no"
            },
            num(&tr["auc"], 3),
            true_ratio,
            num(&tr["cross_share"], 2),
        );
    }
    let warned = t["warned_seeds"].as_array().map_or(0, |a| a.len());
    let _ = writeln!(
        s,
        "\n{}",
        if warned > 0 {
            format!(
                "**Warning** ({warned} seed(s)): the SimNet's similarity may not transfer, so the graph \
                 term may pull the novel categories' features together. `--set classifier.eye=0` \
                 regularises same-category pairs only; `--set classifier.alpha=0` turns the term off."
            )
        } else {
            "No seed triggered the warning.".into()
        }
    );
    let tr = &t["tracking"];
    let r = |k: &str| num(&tr[k]["pearson"], 2);
    if !tr["auc"]["truth"].as_array().is_none_or(|a| a.is_empty()) {
        let _ = writeln!(
            s,
            "\nHow the label-free figures track the truth across seeds (Pearson r; needs 3 seeds): \
             AUC {}, cross/same {}, cross share {}; label-free AUC against the SimNet's pair F1 on \
             novel test pairs {}. Means: label-free AUC {} vs true {}; cross/same {} vs true {}.",
            r("auc"),
            r("cross_to_same"),
            r("cross_share"),
            r("auc_vs_simnet_novel_f1"),
            num(&t["auc_mean"], 3),
            num(&t["truth_auc_mean"], 3),
            num(&t["cross_to_same_mean"], 2),
            num(&t["truth_cross_to_same_mean"], 2),
        );
    }
    s
}

/// The graph term's accounting per graph epoch, means over seeds.
fn graph_terms_markdown(g: &Value) -> String {
    let mut s = String::new();
    let Some(vars) = g.as_object().filter(|m| !m.is_empty()) else {
        return s;
    };
    let _ = writeln!(
        s,
        "\n## Graph-term accounting (means over seeds, per graph epoch)\n\nWeighted CE and \
         `α·reg` of step 3b's graph epochs apart, and the mean adjacency `Â` over pairs of a graph \
         batch with the same or different web labels (and true classes, where known). A large \
         cross-label `Â` means the term pulls different categories together.\n"
    );
    for (name, rows) in vars {
        let _ = writeln!(
            s,
            "`{name}`:\n\n| epoch | weighted CE | α·reg | Â same label | Â cross label | Â same true class | Â different true classes |\n|---|---|---|---|---|---|---|"
        );
        for r in rows.as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r["epoch"],
                num(&r["ce"], 4),
                num(&r["alpha_reg"], 4),
                num(&r["a_hat_same_label"], 3),
                num(&r["a_hat_cross_label"], 3),
                num(&r["a_hat_same_true_class"], 3),
                num(&r["a_hat_cross_true_class"], 3),
            );
        }
        let _ = writeln!(s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::{summarise, VariantResult};
    use std::collections::BTreeMap;

    #[test]
    fn report_lists_variants_in_order_and_labels_selection() {
        let v = |t| VariantResult {
            top1_final: t,
            top1_test_selected: Some(t),
            per_class: vec![t; 2],
            confusion: vec![vec![3, 1], vec![0, 4]],
            ..Default::default()
        };
        let r = SeedResult {
            seed: 0,
            variants: BTreeMap::from([("full".into(), v(0.7)), ("naive".into(), v(0.6))]),
            ..Default::default()
        };
        let mut j = summarise("demo", "demo", std::slice::from_ref(&r));
        assert!(!markdown(&j, std::slice::from_ref(&r), &[]).contains("Seeds:"));
        j["benchmark"] = serde_json::json!("one benchmark for every seed");
        let md = markdown(&j, &[r], &["Coat".into(), "Shirt".into()]);
        assert!(
            md.contains("Seeds: one benchmark for every seed.\n"),
            "{md}"
        );
        let naive = md.find("| `naive`").unwrap();
        let full = md.find("| `full`").unwrap();
        assert!(naive < full, "{md}");
        assert!(
            md.contains("| `full` | 70.00 ± 0.00 | 70.00 | 10.00 ± 0.00 | 1/1 | 70.00 |"),
            "{md}"
        );
        assert!(md.contains("Test-selected"));
        assert!(md.contains("| Coat | 3 | 1 |"), "{md}");
    }

    #[test]
    fn the_evidence_section_states_verdicts_and_the_transfer_warning() {
        // Three seeds where `full` loses 4 to 6 points; a SimNet blind to categories.
        let v = |t: f64| VariantResult {
            top1_final: t,
            correct: (0..100).map(|i| u8::from((i as f64) < 100.0 * t)).collect(),
            top1_per_epoch: vec![t - 0.1, t, t, t],
            ..Default::default()
        };
        let labels: Vec<u32> = (0..20).map(|i| i / 10).collect();
        let blind = simtrans_denoise::transfer::check(
            &[0.5; 400],
            &labels,
            None,
            &[10, 10],
            simtrans_denoise::transfer::GraphSettings {
                mu: -4.0,
                eye: 1.0,
                alpha: 0.1,
            },
        )
        .unwrap();
        let results: Vec<SeedResult> = [(0, 0.80, 0.74), (1, 0.78, 0.74), (2, 0.79, 0.74)]
            .into_iter()
            .map(|(s, n, f)| SeedResult {
                seed: s,
                variants: BTreeMap::from([("naive".into(), v(n)), ("full".into(), v(f))]),
                transfer: Some(blind.clone()),
                ..Default::default()
            })
            .collect();
        let j = summarise("demo", "demo", &results);
        assert_eq!(j["variants"]["full"]["verdict"], serde_json::json!("hurt"));
        let md = markdown(&j, &results, &["Coat".into(), "Shirt".into()]);
        assert!(
            md.contains("- `full` hurt: -5.00 points on average"),
            "{md}"
        );
        assert!(md.contains("**Warning** (3 seed(s))"), "{md}");
        assert!(md.contains("classifier.eye=0"), "{md}");
        assert!(md.contains("| 0 | 0.500 / 0.500 | 0.500 | 1.00 |"), "{md}");
    }

    #[test]
    fn real_data_reports_say_what_was_not_measured_and_list_confusions() {
        // 25 classes, no recorded noise, no base validation split: what a CUB run gives.
        let n = 25;
        let mut confusion = vec![vec![0u64; n]; n];
        for (i, row) in confusion.iter_mut().enumerate() {
            row[i] = 2;
        }
        confusion[3][7] = 5;
        confusion[1][2] = 1;
        confusion[20][0] = 3;
        let r = SeedResult {
            seed: 0,
            variants: BTreeMap::from([(
                "naive".into(),
                VariantResult {
                    top1_final: 0.5,
                    top1_test_selected: None,
                    per_class: vec![0.5; n],
                    confusion: confusion.clone(),
                    ..Default::default()
                },
            )]),
            simnet_f1_novel_test: Some(0.25),
            ..Default::default()
        };
        let names: Vec<String> = (0..n).map(|i| format!("bird{i}")).collect();
        let j = summarise("cub", "paper", std::slice::from_ref(&r));
        let md = markdown(&j, &[r], &names);
        assert!(
            md.contains("base validation — (the data set has no base validation split)"),
            "{md}"
        );
        assert!(md.contains("novel test 25.00 %"), "{md}");
        assert!(
            md.contains("ROC-AUC of the sample weights: not measured"),
            "{md}"
        );
        assert!(!md.contains("| true \\ pred"), "a 25-class table: {md}");
        let rows = [
            "| bird3 | bird7 | 5 |",
            "| bird20 | bird0 | 3 |",
            "| bird1 | bird2 | 1 |",
        ];
        let at: Vec<usize> = rows.iter().map(|r| md.find(r).expect(r)).collect();
        assert!(at[0] < at[1] && at[1] < at[2], "{md}");
        assert_eq!(top_confusions(&confusion, 2), [(3, 7, 5), (20, 0, 3)]);
    }
}
