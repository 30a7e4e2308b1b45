//! The whole method on a real data set's layout, not the embedded benchmark: `cargo xtask
//! smoke` writes a miniature CUB tree (the reference's 200 classes and 150/50 split, a few
//! photographs of CUB's sizes each, web folders with a corrupt file and a text file) and runs
//! every stage on it, here on the CPU with a tiny network. This is the path a researcher's
//! first run on the authors' data takes (file lists, decoding, the loader, web images without a
//! recorded noise, the report); the demo benchmark exercises none of the file handling.

use std::process::Command;

// On top of the smoke run's own settings (one epoch per stage, random weights).
const TINY: &[&str] = &[
    "--device=cpu",
    "--set=backbone.arch=small",
    "--set=backbone.small_width=4",
    "--set=backbone.batch_size=32",
    "--set=data.image_size=16",
    "--set=simnet.batch_a=8",
    "--set=simnet.classes_a=4",
    "--set=simnet.batch_b=8",
    "--set=denoise.feature_batch=16",
    "--set=classifier.epochs_3b=2",
    "--set=classifier.batch_size=8",
    "--set=classifier.graph_batch_size=16",
];

#[test]
fn the_method_runs_end_to_end_on_a_cub_tree() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("smoke")
        .args(TINY)
        .env("SIMTRANS_RUNS", &runs)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("smoke/eval.json")).unwrap())
            .unwrap();
    assert_eq!(eval["dataset"], "cub", "{eval}");
    for v in ["naive", "full"] {
        // A fraction of the 50 novel test images, one accuracy per class.
        let top1 = eval["variants"][v]["top1_final"][0].as_f64();
        assert!(
            top1.is_some_and(|t| (0.0..=1.0).contains(&t)),
            "{v}: {eval}"
        );
        let per_class = eval["variants"][v]["per_class_mean"].as_array().unwrap();
        assert_eq!(per_class.len(), 50, "{v}");
    }
    // CUB's web images carry no recorded noise: no weight ROC-AUC, and the pair F1 on novel
    // test pairs is measured while the base validation split is empty.
    assert_eq!(eval["weights_auc"], serde_json::json!({}), "{eval}");
    assert!(eval["simnet"]["pair_f1_base_val"].is_null(), "{eval}");
    assert!(eval["simnet"]["pair_f1_novel_test"].is_number(), "{eval}");
    let report = std::fs::read_to_string(runs.join("smoke/report.md")).unwrap();
    assert!(
        report.contains("ROC-AUC of the sample weights: not measured"),
        "{report}"
    );
    assert!(report.contains("the largest confusions"), "{report}");
    // Similarity and weight pictures of the first 8 of the 50 categories only.
    assert!(runs.join("smoke/similarity-7.png").exists());
    assert!(!runs.join("smoke/similarity-8.png").exists());
    assert!(!runs.join("smoke/weights-8.png").exists());
    assert!(report.contains("The first 8 categories only"), "{report}");
    assert!(stdout.contains("novel-class top-1"), "{stdout}");
    // The smoke line: the network, and each stage's time.
    assert!(
        stdout.contains(
            "smoke: small at 16 px on cpu (f32), one epoch per stage on 1750 synthetic photographs"
        ) && stdout.contains("(each stage when built: data "),
        "{stdout}"
    );

    // The corrupt web file was skipped and counted, the text file too; the index keeps the
    // 150 × 9 base training images and every usable web image of the novel classes (50 × 4):
    // the tree has training images for 40 backbone steps of 32 images and, for the SimNet
    // target batches of 8 from 2 classes, four web images per novel class.
    let artifact = simtrans_core::Artifact::load(
        &runs.join("smoke/seed-0/data.safetensors"),
        &simtrans_data::DataIndex::schema(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let index = simtrans_data::DataIndex::from_artifact(&artifact).unwrap();
    let counts = index.split_counts();
    let want = [
        ("base_train", 1350),
        ("base_val", 0),
        ("base_test", 150),
        ("novel_web", 200),
        ("novel_test", 50),
    ];
    assert_eq!(counts, want.into_iter().collect(), "{counts:?}");
    let metrics = &artifact.meta.metrics;
    assert_eq!(metrics["skipped_web_images"], 2, "{metrics}");
    let skipped = metrics["skipped"].to_string();
    assert!(
        skipped.contains("x_corrupt.jpg") && skipped.contains("y_notes.txt"),
        "{skipped}"
    );
}
