//! The authors' checkpoint layouts in: the fixtures of `scripts/make-torch-fixtures.py`
//! (written by torch, read by simtrans-pth) imported through the stage crates reproduce what
//! PyTorch computed on fixed inputs, and `cargo xtask import` puts them into a run on a CUB
//! tree where `eval`, `stage denoise` and `stage classifier` use them.

use candle_core::{DType, Device, Tensor, D};
use simtrans_core::config::{Config, Preset};
use simtrans_ops::BnMode;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/pth/tests/fixtures")
        .join(name)
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap()
}

fn tensors(name: &str) -> BTreeMap<String, Tensor> {
    simtrans_pth::read(&fixture(name)).unwrap().tensors
}

/// The largest `|a − b| / max(|b|, 1)`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let v = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (a, b) = (v(a), v(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max)
}

/// The demo preset's small network at the fixtures' width.
fn small() -> Config {
    let mut c = Config::preset(Preset::Demo);
    c.backbone.small_width = 4;
    c
}

#[test]
fn imported_classifiers_and_backbones_compute_what_pytorch_computed() {
    let want = expected();
    let input = &want["input"];
    for file in [
        "classifier_whole.pth",
        "classifier_params.pth",
        "classifier_params_legacy.pth",
    ] {
        let t = tensors(file);
        let prefix = simtrans_backbone::import::resnet_prefix(
            &t,
            &["module.backbone.", "backbone.", "module.", ""],
        );
        let resnet = simtrans_backbone::import::under(&t, prefix);
        let (net, _) = simtrans_backbone::import::resnet_from_tensors(
            &resnet,
            &small().backbone,
            50,
            "test",
            &Device::Cpu,
        )
        .unwrap();
        let (logits, features) = net.forward(input, BnMode::Eval).unwrap();
        assert!(
            rel_diff(&logits, &want["classifier/logits"]) < 1e-5,
            "{file}"
        );
        assert!(
            rel_diff(&features, &want["classifier/features"]) < 1e-5,
            "{file}"
        );
    }
    let classes: Vec<u32> = (0..150).collect();
    let out = simtrans_backbone::import::import(
        &tensors("backbone_step0.pth"),
        &small().backbone,
        &classes,
    )
    .unwrap();
    let map: HashMap<String, Tensor> = out.tensors.into_iter().collect();
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let net =
        simtrans_backbone::ResNet::new(simtrans_backbone::Arch::Small, 4, Some(150), vb).unwrap();
    simtrans_backbone::weights::load_tensors(&vm, &map, &[]).unwrap();
    let (logits, _) = net.forward(input, BnMode::Eval).unwrap();
    assert!(rel_diff(&logits, &want["backbone_step0/logits"]) < 1e-5);
}

#[test]
fn imported_simnets_compute_what_pytorch_computed() {
    let want = expected();
    let input = &want["input"];
    for head in [4u8, 2] {
        let stem = format!("simnet_head{head}");
        let disc = (head == 4).then(|| tensors("domain_classifier.pth"));
        let mut config = small();
        config.simnet.head = head;
        let out = simtrans_simnet::import::import(
            &tensors(&format!("{stem}.pth")),
            disc.as_ref(),
            &config.backbone,
            &config.simnet,
            0,
        )
        .unwrap();
        let artifact = simtrans_core::Artifact::new(
            simtrans_core::ArtifactMeta {
                extra: out.meta,
                ..Default::default()
            },
            out.tensors,
        );
        let net = simtrans_simnet::SimNet::load(&artifact, &Device::Cpu).unwrap();
        let features = net.features(input).unwrap();
        assert!(
            rel_diff(&features, &want[&format!("{stem}/features")]) < 1e-5,
            "{stem}"
        );
        // The reference's pair enumeration is the grid's column-first order.
        let (logits, diff) = net
            .head
            .forward_grid(
                &features,
                &features,
                simtrans_simnet::head::PairOrder::ColFirst,
                BnMode::Eval,
            )
            .unwrap();
        assert!(
            rel_diff(&logits, &want[&format!("{stem}/similarities")]) < 1e-5,
            "{stem}"
        );
        assert!(
            rel_diff(&diff, &want[&format!("{stem}/diff_feat")]) < 1e-5,
            "{stem}"
        );
        // S[i, j] is the softmax of the pair [f_i ; f_j]: row j·B + i of the reference's.
        let s = net.similarity_matrix(&features, &features).unwrap();
        let p = candle_nn::ops::softmax(&want[&format!("{stem}/similarities")], D::Minus1)
            .unwrap()
            .narrow(1, 1, 1)
            .unwrap()
            .reshape((4, 4))
            .unwrap()
            .t()
            .unwrap();
        assert!(rel_diff(&s, &p) < 1e-5, "{stem}");
        if head == 4 {
            let d = net.disc.forward(&diff).unwrap();
            assert!(rel_diff(&d, &want["domain_classifier/logits"]) < 1e-5);
        }
    }
}

/// The paper preset on a miniature CUB tree with the fixtures' small network.
const CUB: &[&str] = &[
    "--dataset=cub",
    "--device=cpu",
    "--set=backbone.arch=small",
    "--set=backbone.small_width=4",
    "--set=data.image_size=16",
    "--set=denoise.feature_batch=16",
    "--set=classifier.epochs_3a=1",
    "--set=classifier.epochs_3b=1",
    "--set=classifier.batch_size=8",
    "--set=classifier.graph_batch_size=16",
];

fn xtask(args: &[&str], runs: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("SIMTRANS_RUNS", runs)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_authors_models_import_into_a_cub_run_and_the_pipeline_continues_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cub");
    let spec = simtrans_data::synthetic::CubTree {
        train: 1,
        test: 2,
        web: 2,
        size: simtrans_data::synthetic::PhotoSize::Fixed(24, 20),
    };
    simtrans_data::synthetic::cub_tree(&root, &spec).unwrap();
    let runs = dir.path().join("runs");
    let data = format!("--data-path={}", root.display());
    let with = |mut head: Vec<String>| {
        head.push(data.clone());
        head.extend(CUB.iter().map(|s| s.to_string()));
        head
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        xtask(&refs, &runs)
    };

    // The step-3 classifier: imported, measured on the novel test images, then evaluated.
    let classifier = fixture("classifier_whole.pth").display().to_string();
    let (ok, log) = run(with(vec![
        "import".into(),
        "--stage=classifier".into(),
        classifier.clone(),
        "--run=authors".into(),
    ]));
    assert!(ok, "{log}");
    let artifact = runs.join("authors/seed-0/classifier-full.safetensors");
    let meta = simtrans_core::Artifact::verify(&artifact).unwrap();
    assert!(simtrans_core::store::is_imported(&meta));
    let sha = simtrans_pth::read(&fixture("classifier_whole.pth"))
        .unwrap()
        .sha256;
    assert!(
        meta.extra["imported_from"].contains(&sha),
        "{:?}",
        meta.extra
    );
    let (ok, log) = run(vec!["eval".into(), "--run=authors".into()]);
    assert!(ok, "{log}");
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("authors/eval.json")).unwrap())
            .unwrap();
    let variants: Vec<&String> = eval["variants"].as_object().unwrap().keys().collect();
    assert_eq!(variants, ["full"], "{eval}");
    let top1 = eval["variants"]["full"]["top1_final"][0].as_f64().unwrap();
    assert_eq!(top1, meta.metrics["top1_final"].as_f64().unwrap());
    // 2 test images of each of the 50 novel classes, all predicted.
    assert_eq!(meta.metrics["test_ids"].as_array().unwrap().len(), 100);
    assert_eq!(
        eval["variants"]["full"]["per_class_mean"]
            .as_array()
            .unwrap()
            .len(),
        50
    );

    // A wrong class count is refused with the fields to check, and nothing is written.
    let (ok, log) = run(with(vec![
        "import".into(),
        "--stage=classifier".into(),
        fixture("backbone_step0.pth").display().to_string(),
        "--run=wrong".into(),
        "--variant=naive".into(),
    ]));
    assert!(!ok);
    assert!(
        log.contains("its fc has 150 rows where the data set has 50 classes"),
        "{log}"
    );
    assert!(!runs
        .join("wrong/seed-0/classifier-naive.safetensors")
        .exists());
    // The hostile pickle is refused by name.
    let (ok, log) = run(with(vec![
        "import".into(),
        "--stage=simnet".into(),
        fixture("hostile_global.pth").display().to_string(),
        "--run=wrong".into(),
    ]));
    assert!(!ok && log.contains(".system` is not a global"), "{log}");

    // Only the three trained stages are imported, and a missing file is named.
    let (ok, log) = run(with(vec![
        "import".into(),
        "--stage=denoise".into(),
        classifier.clone(),
        "--run=wrong".into(),
    ]));
    assert!(
        !ok && log.contains("`denoise` artifacts are not imported"),
        "{log}"
    );
    let (ok, log) = run(with(vec![
        "import".into(),
        "--stage=backbone".into(),
        "no-such-file.pth".into(),
        "--run=wrong".into(),
    ]));
    assert!(
        !ok && log.contains("no-such-file.pth: cannot read it"),
        "{log}"
    );

    // Step 0 and the SimNet imported: denoise and a classifier variant run on them.
    for (stage, file, extra) in [
        ("backbone", "backbone_step0.pth", None),
        ("simnet", "simnet_head4.pth", Some("domain_classifier.pth")),
    ] {
        let mut args = vec![
            "import".to_string(),
            format!("--stage={stage}"),
            fixture(file).display().to_string(),
            "--run=continued".into(),
        ];
        if let Some(d) = extra {
            args.push(format!("--disc={}", fixture(d).display()));
        }
        let (ok, log) = run(with(args));
        assert!(ok, "{stage}: {log}");
    }
    let (ok, log) = run(vec![
        "stage".into(),
        "denoise".into(),
        "--run=continued".into(),
    ]);
    assert!(ok, "{log}");
    let denoise =
        simtrans_core::Artifact::verify(&runs.join("continued/seed-0/denoise.safetensors"))
            .unwrap();
    let simnet =
        simtrans_core::Artifact::verify(&runs.join("continued/seed-0/simnet.safetensors")).unwrap();
    assert_eq!(denoise.upstream["simnet"], simnet.checksum);
    let (ok, log) = run(vec![
        "stage".into(),
        "classifier".into(),
        "--run=continued".into(),
        "--set=classifier.variants=[\"full\"]".into(),
        // Step 3 starts from the imported step-0 network.
        "--set=classifier.init=backbone".into(),
    ]);
    assert!(ok, "{log}");
    assert!(runs
        .join("continued/seed-0/classifier-full.safetensors")
        .exists());
}
