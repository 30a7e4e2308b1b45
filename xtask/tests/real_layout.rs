//! The whole method on a real data set's layout, not the embedded benchmark: a miniature CUB
//! tree (the reference's 200 classes and 150/50 split, a few tiny JPEG files each, web folders
//! with a corrupt file) through every stage with `cargo xtask reproduce --dataset cub`, on the
//! CPU with a tiny network. This is the path a researcher's first run on the authors' data
//! takes (file lists, decoding, the loader, web images without a recorded noise, the report);
//! the demo benchmark exercises none of the file handling.

use std::path::Path;
use std::process::Command;

fn jpeg(path: &Path, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(24, 20, |x, y| {
        image::Rgb([shade, (x * 10) as u8, (y * 12) as u8])
    })
    .save(path)
    .unwrap();
}

/// CUB_200_2011 with three training images and one test image per class, and CUB_web with four
/// web images per class plus, in class 043 (novel), a corrupt file and a text file.
fn cub_tree(root: &Path) {
    let (mut images, mut split) = (String::new(), String::new());
    let mut k = 0;
    for n in 1..=200u32 {
        let folder = format!("{n:03}.Bird_{n}");
        for train in [1, 1, 1, 0] {
            k += 1;
            let rel = format!("{folder}/img_{k}.jpg");
            images += &format!("{k} {rel}\n");
            split += &format!("{k} {train}\n");
            jpeg(&root.join("CUB_200_2011/images").join(&rel), n as u8);
        }
        for w in 0..4u8 {
            let shade = if w == 3 { 255 - n as u8 } else { n as u8 };
            jpeg(
                &root
                    .join("CUB_web")
                    .join(&folder)
                    .join(format!("web_{w}.jpg")),
                shade,
            );
        }
    }
    std::fs::write(root.join("CUB_200_2011/images.txt"), images).unwrap();
    std::fs::write(root.join("CUB_200_2011/train_test_split.txt"), split).unwrap();
    let web43 = root.join("CUB_web/043.Bird_43");
    std::fs::write(web43.join("x_corrupt.jpg"), b"\xff\xd8\xff\xe0 not a jpeg").unwrap();
    std::fs::write(web43.join("y_notes.txt"), b"hello").unwrap();
}

const TINY: &[&str] = &[
    "--device=cpu",
    "--set=backbone.arch=small",
    "--set=backbone.small_width=4",
    "--set=backbone.weights=scratch",
    "--set=backbone.batch_size=32",
    "--set=backbone.optim.epochs=1",
    "--set=data.image_size=16",
    "--set=simnet.optim.epochs=1",
    "--set=simnet.batch_a=8",
    "--set=simnet.classes_a=4",
    "--set=simnet.batch_b=8",
    "--set=denoise.feature_batch=16",
    "--set=classifier.init=backbone",
    "--set=classifier.epochs_3a=1",
    "--set=classifier.epochs_3b=2",
    "--set=classifier.batch_size=8",
    "--set=classifier.graph_batch_size=16",
];

#[test]
fn the_method_runs_end_to_end_on_a_cub_tree() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let runs = dir.path().join("runs");
    cub_tree(&data);
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["reproduce", "--dataset", "cub", "--data-path"])
        .arg(&data)
        .args(TINY)
        .env("SIMTRANS_RUNS", &runs)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("default/eval.json")).unwrap())
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
    let report = std::fs::read_to_string(runs.join("default/report.md")).unwrap();
    assert!(
        report.contains("ROC-AUC of the sample weights: not measured"),
        "{report}"
    );
    assert!(report.contains("the largest confusions"), "{report}");
    // Similarity and weight pictures of the first 8 of the 50 categories only.
    assert!(runs.join("default/similarity-7.png").exists());
    assert!(!runs.join("default/similarity-8.png").exists());
    assert!(!runs.join("default/weights-8.png").exists());
    assert!(report.contains("The first 8 categories only"), "{report}");
    assert!(stdout.contains("novel-class top-1"), "{stdout}");

    // The corrupt web file was skipped and counted, the text file too; the index keeps the
    // 150 × 3 base training images and every usable web image of the novel classes (50 × 4).
    let artifact = simtrans_core::Artifact::load(
        &runs.join("default/seed-0/data.safetensors"),
        &simtrans_data::DataIndex::schema(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let index = simtrans_data::DataIndex::from_artifact(&artifact).unwrap();
    use simtrans_data::Split;
    let count = |split| index.items_in(split).len();
    assert_eq!(
        [
            Split::BaseTrain,
            Split::BaseTest,
            Split::NovelWeb,
            Split::NovelTest
        ]
        .map(count),
        [450, 150, 200, 50]
    );
    let metrics = &artifact.meta.metrics;
    assert_eq!(metrics["skipped_web_images"], 2, "{metrics}");
    let skipped = metrics["skipped"].to_string();
    assert!(
        skipped.contains("x_corrupt.jpg") && skipped.contains("y_notes.txt"),
        "{skipped}"
    );
}
