//! A tiny end-to-end CPU run whose results are pinned: any change that moves what the CPU path
//! computes (a fused op's rounding, an order of operations, a data draw) fails here, so that
//! it is made on purpose and the README's figures are refreshed with it.
//!
//! The pinned values are in `tests/pinned/demo-tiny.json`. When a change is meant to move them,
//! run this test, check the printed values, and replace the file with them (the failure message
//! prints the whole file). CPU results are deterministic for one binary on one machine, but
//! not across machines (README, "Why earlier versions of this README printed other numbers"):
//! on an AMD EPYC with AVX-512 (2026-12-03) the binary of f4793c4, which passed CI with it, moved
//! the graph epoch's means and the transfer AUC by 1–2·10⁻⁶ relative, every accuracy unchanged.
//! So accuracies (counts of correct test images) must match exactly, and every other number to
//! [`REL_TOL`] relative: far above that rounding, far below what a change of formula, data draw
//! or schedule moves.

use std::process::Command;

mod common;

/// On top of [`common::TINY`] (later `--set`s win): all five variants, fewer epochs.
const PINNED: &[&str] = &[
    "--ablations",
    "--set=backbone.optim.epochs=2",
    "--set=simnet.optim.epochs=2",
    "--set=denoise.transfer_images=40",
    "--set=classifier.epochs_3a=1",
];

/// What is pinned: every variant's final top-1, the SimNet's pair F1s, the weight AUC, the
/// transfer check's AUC and the first graph epoch's loss terms of `full`.
fn fingerprint(eval: &serde_json::Value) -> serde_json::Value {
    let mut variants = serde_json::Map::new();
    for (name, v) in eval["variants"].as_object().expect("variants") {
        variants.insert(name.clone(), v["top1_final"].clone());
    }
    serde_json::json!({
        "top1_final": variants,
        "simnet": eval["simnet"],
        "weights_auc_overall": eval["weights_auc"]["overall"],
        "transfer_auc": eval["transfer"]["per_seed"][0]["auc"],
        "full_first_graph_epoch": eval["graph_terms"]["full"][0],
    })
}

#[test]
fn a_tiny_demo_run_reproduces_its_pinned_results() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("reproduce")
        .args(common::TINY)
        .args(PINNED)
        .env("SIMTRANS_RUNS", dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let eval: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("default/eval.json")).unwrap(),
    )
    .unwrap();
    let got = fingerprint(&eval);
    let pinned: serde_json::Value =
        serde_json::from_str(include_str!("pinned/demo-tiny.json")).unwrap();
    let mut differences = vec![];
    compare("", &got, &pinned, &mut differences);
    assert!(
        differences.is_empty(),
        "the tiny demo run no longer reproduces its pinned results ({differences:#?}). If the \
         change is meant to move them, replace xtask/tests/pinned/demo-tiny.json with:\n{}",
        serde_json::to_string_pretty(&got).unwrap()
    );
}

/// How far a pinned number other than an accuracy may move between machines, relative.
const REL_TOL: f64 = 2e-5;

/// Every place where `got` differs from `pinned`: structure and accuracies (under
/// `top1_final`) exactly, other numbers beyond [`REL_TOL`].
fn compare(path: &str, got: &serde_json::Value, pinned: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (got, pinned) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => compare(&format!("{path}.{k}"), x, y, out),
                    _ => out.push(format!("{path}.{k}: present on one side only")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                compare(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (Value::Number(x), Value::Number(y)) if !path.starts_with(".top1_final") => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            if (x - y).abs() > REL_TOL * y.abs().max(1e-12) {
                out.push(format!("{path}: {x} (pinned {y})"));
            }
        }
        (x, y) if x != y => out.push(format!("{path}: {x} (pinned {y})")),
        _ => {}
    }
}
