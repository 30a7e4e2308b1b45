//! Kill -9 at any point, rerun the same command: the run completes from its checkpoints and
//! ends with exactly the metrics of an uninterrupted run (CPU, same seed). A tiny demo
//! configuration keeps this to seconds.

use simtrans_core::{Artifact, ArtifactSchema, Node, Stage};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::TINY;

fn command(runs: &Path, run: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.arg("reproduce")
        .arg("--run")
        .arg(run)
        .args(TINY)
        .env("SIMTRANS_RUNS", runs)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Starts the run and kills it (SIGKILL) as soon as `marker` exists; returns whether it was
/// killed (false if it finished first).
fn run_and_kill_at(runs: &Path, run: &str, marker: &Path) -> bool {
    let mut child = command(runs, run).spawn().unwrap();
    let start = Instant::now();
    loop {
        if marker.exists() {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "the run failed before {}",
                marker.display()
            );
            return false;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn checkpoint(runs: &Path, run: &str, node: &str, epochs_done: usize) -> PathBuf {
    runs.join(run)
        .join("seed-0/checkpoints")
        .join(node)
        .join(format!("epoch-{epochs_done:05}.safetensors"))
}

fn eval_json(runs: &Path, run: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(runs.join(run).join("eval.json")).unwrap())
        .unwrap()
}

fn tensors(runs: &Path, run: &str, node: &Node) -> Vec<(String, Vec<f32>)> {
    let path = runs
        .join(run)
        .join("seed-0")
        .join(format!("{}.safetensors", node.name()));
    let a = Artifact::load(&path, &ArtifactSchema::any(), &candle_core::Device::Cpu).unwrap();
    a.tensors
        .iter()
        .filter(|(_, t)| t.dtype() == candle_core::DType::F32)
        .map(|(n, t)| {
            (
                n.clone(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path();
    assert!(command(runs, "straight").status().unwrap().success());

    // Kill inside three training stages in turn, each right after its first checkpoint.
    let mut kills = 0;
    for node in ["backbone", "simnet", "classifier-full"] {
        kills += run_and_kill_at(runs, "killed", &checkpoint(runs, "killed", node, 1)) as usize;
    }
    assert!(kills >= 2, "the kills landed too late to test anything");
    assert!(command(runs, "killed").status().unwrap().success());

    let a = eval_json(runs, "straight");
    let b = eval_json(runs, "killed");
    for v in ["naive", "full"] {
        assert_eq!(
            a["variants"][v]["top1_final"], b["variants"][v]["top1_final"],
            "{v}"
        );
    }
    for node in [
        Node::stage(Stage::Backbone),
        Node::stage(Stage::Simnet),
        Node::variant(Stage::Classifier, "full"),
    ] {
        assert_eq!(
            tensors(runs, "straight", &node),
            tensors(runs, "killed", &node),
            "{node}"
        );
    }
    // A second run of the finished command rebuilds nothing.
    let before = std::fs::metadata(runs.join("killed/seed-0/classifier-full.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(command(runs, "killed").status().unwrap().success());
    let after = std::fs::metadata(runs.join("killed/seed-0/classifier-full.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
}
