//! Step 0 end to end on a tiny synthetic data index: artifact contents, rebuilding networks
//! from it, exact resume from a checkpoint, divergence detection and configuration errors.

use candle_core::{Device, Tensor};
use simtrans_backbone::{load_model, BackboneError};
use simtrans_core::{
    Artifact, ArtifactMeta, Config, CoreError, Node, Preset, Stage, StageContext, StageOutput,
};
use simtrans_data::{DataIndex, DatasetKind, Images, Item, Split};
use simtrans_ops::BnMode;
use std::collections::BTreeMap;
use std::path::Path;

/// 28×28 images: class c is a bright bar at rows 5c..5c+4 on a faint textured background.
fn index() -> DataIndex {
    let mut items = Vec::new();
    let mut pixels = Vec::new();
    let layout: [(Split, &[u32], u32); 4] = [
        (Split::BaseTrain, &[0, 1, 2], 8),
        (Split::BaseVal, &[0, 1, 2], 3),
        (Split::NovelWeb, &[3, 4], 6),
        (Split::NovelTest, &[3, 4], 3),
    ];
    for (split, classes, per) in layout {
        for &c in classes {
            for k in 0..per {
                let id = items.len() as u32;
                items.push(Item::clean(id, c, split));
                for r in 0..28u32 {
                    for col in 0..28u32 {
                        let bar = r >= 5 * c && r < 5 * c + 4;
                        pixels.push(if bar {
                            220
                        } else {
                            ((r * 7 + col * 13 + k * 29) % 40) as u8
                        });
                    }
                }
            }
        }
    }
    DataIndex {
        dataset: DatasetKind::Demo,
        class_names: (0..5).map(|c| format!("class{c}")).collect(),
        base_classes: vec![0, 1, 2],
        novel_classes: vec![3, 4],
        items,
        images: Images::Pixels {
            height: 28,
            width: 28,
            data: pixels,
        },
    }
}

fn save(out: StageOutput, node: &str, version: u32, path: &Path) -> Artifact {
    let meta = ArtifactMeta {
        node: node.into(),
        schema_version: version,
        extra: out.meta,
        metrics: out.metrics,
        ..Default::default()
    };
    let mut a = Artifact::new(meta, out.tensors);
    a.save(path).unwrap();
    a
}

fn context(dir: &Path, data: &Path, epochs: usize) -> StageContext {
    let mut config = Config::preset(Preset::Demo);
    config.backbone.small_width = 4;
    config.backbone.batch_size = 8;
    config.backbone.optim.epochs = epochs;
    config.backbone.optim.lr = 0.05;
    config.backbone.optim.lr_step = 1;
    config.data.workers = 1;
    StageContext {
        config,
        device: Device::Cpu,
        seed: 3,
        node: Node::stage(Stage::Backbone),
        cache_key: "key".into(),
        seed_dir: dir.to_path_buf(),
        upstream: BTreeMap::from([("data".to_string(), data.to_path_buf())]),
        rebuild_hint: "cargo xtask stage".into(),
    }
}

fn data_artifact(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("data.safetensors");
    save(
        index().to_output(serde_json::json!({})).unwrap(),
        "data",
        DataIndex::schema().version,
        &path,
    );
    path
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    simtrans_core::compare::max_abs_diff(a, b).unwrap()
}

#[test]
fn trains_resumes_exactly_and_rebuilds_from_the_artifact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_artifact(tmp.path());

    // Uninterrupted: two epochs.
    let whole_dir = tmp.path().join("whole");
    let whole = simtrans_backbone::run(&context(&whole_dir, &data, 2)).unwrap();
    assert!(whole.tensors.contains_key("layer1.0.bn1.running_mean"));
    assert_eq!(whole.tensors["fc.weight"].dims(), &[3, 32]);
    assert_eq!(whole.meta["arch"], "small");
    assert_eq!(whole.meta["classes"], "[0,1,2]");
    assert_eq!(whole.meta["feature_dim"], "32");
    let hist = whole.metrics["history"].as_array().unwrap();
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[1]["lr"].as_f64().unwrap(), 0.025);
    let acc = whole.metrics["val_acc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(whole.metrics["train_loss"].as_f64().unwrap().is_finite());
    let log = std::fs::read_to_string(whole_dir.join("logs/backbone.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);
    // Running statistics moved away from their initial values.
    let rv = whole.tensors["bn1.running_var"].to_vec1::<f32>().unwrap();
    assert!(rv.iter().any(|v| (v - 1.0).abs() > 1e-3), "{rv:?}");

    // Interrupted after one epoch, then resumed from its checkpoint: the same network.
    let resumed_dir = tmp.path().join("resumed");
    simtrans_backbone::run(&context(&resumed_dir, &data, 1)).unwrap();
    assert!(resumed_dir
        .join("checkpoints/backbone/epoch-00001.safetensors")
        .exists());
    let resumed = simtrans_backbone::run(&context(&resumed_dir, &data, 2)).unwrap();
    for (name, t) in &whole.tensors {
        assert_eq!(max_diff(t, &resumed.tensors[name]), 0.0, "{name}");
    }
    assert_eq!(resumed.metrics["history"].as_array().unwrap().len(), 2);

    // Rebuilding: same fc, trunk only, and a new fc all share the trained features.
    let art = save(
        whole,
        "backbone",
        simtrans_backbone::stage::SCHEMA_VERSION,
        &tmp.path().join("backbone.safetensors"),
    );
    let art = Artifact::load(
        art.path.as_ref().unwrap(),
        &simtrans_backbone::schema(),
        &Device::Cpu,
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1., (4, 3, 28, 28), &Device::Cpu).unwrap();
    let (same, vm) = load_model(&art, Some(3), &Device::Cpu).unwrap();
    let (logits, f) = same.forward(&x, BnMode::Eval).unwrap();
    let want = f
        .matmul(&art.tensors["fc.weight"].t().unwrap())
        .unwrap()
        .broadcast_add(&art.tensors["fc.bias"])
        .unwrap();
    assert!(max_diff(&logits, &want) < 1e-5);
    assert_eq!(vm.all_vars().len(), art.tensors.len());
    let (trunk, _) = load_model(&art, None, &Device::Cpu).unwrap();
    assert!(trunk.forward(&x, BnMode::Eval).is_err());
    assert_eq!(
        max_diff(&trunk.features(&x, BnMode::Eval).unwrap(), &f),
        0.0
    );
    let (other, _) = load_model(&art, Some(7), &Device::Cpu).unwrap();
    let (l7, f7) = other.forward(&x, BnMode::Eval).unwrap();
    assert_eq!(l7.dims(), &[4, 7]);
    assert_eq!(max_diff(&f7, &f), 0.0);
}

#[test]
fn divergence_stops_with_the_last_good_checkpoint_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_artifact(tmp.path());
    let mut ctx = context(&tmp.path().join("run"), &data, 3);
    // Epoch 0 trains normally; from epoch 1 on the learning rate is infinite.
    ctx.config.backbone.optim.lr_decay = f64::INFINITY;
    let err = simtrans_backbone::run(&ctx).unwrap_err();
    match &err {
        BackboneError::Core(CoreError::NonFinite {
            epoch,
            checkpoint_dir,
            ..
        }) => {
            assert_eq!(*epoch, 1);
            assert!(checkpoint_dir.join("epoch-00001.safetensors").exists());
            assert!(!checkpoint_dir.join("epoch-00002.safetensors").exists());
        }
        other => panic!("expected NonFinite, got {other}"),
    }
    assert!(err.to_string().contains("last good checkpoint"), "{err}");
}

#[test]
fn noisy_novel_and_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_artifact(tmp.path());
    let mut ctx = context(&tmp.path().join("novel"), &data, 1);
    ctx.config.backbone.pretrain_on = "noisy_novel".into();
    let out = simtrans_backbone::run(&ctx).unwrap();
    assert_eq!(out.meta["classes"], "[3,4]");
    assert!(out.metrics["val_acc"].is_null());

    ctx.config.backbone.pretrain_on = "web".into();
    let msg = simtrans_backbone::run(&ctx).unwrap_err().to_string();
    assert!(msg.contains("noisy_novel"), "{msg}");
    ctx.config.backbone.pretrain_on = "base".into();
    ctx.config.backbone.weights = "/nonexistent/w.safetensors".into();
    let msg = simtrans_backbone::run(&ctx).unwrap_err().to_string();
    assert!(msg.contains("/nonexistent/w.safetensors"), "{msg}");
    ctx.upstream.clear();
    let msg = simtrans_backbone::run(&ctx).unwrap_err().to_string();
    assert!(
        msg.contains("data") && msg.contains("cargo xtask stage"),
        "{msg}"
    );
}
