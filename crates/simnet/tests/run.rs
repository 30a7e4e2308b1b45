//! The stage entry point on the real data path: a tiny demo benchmark index from the data
//! crate (embedded Fashion-MNIST subset), a seeded small backbone artifact, one epoch.

use candle_core::{DType, Device};
use candle_nn::VarMap;
use simtrans_backbone::{Arch, ResNet};
use simtrans_core::{Artifact, ArtifactMeta, Config, Node, Preset, Stage, StageContext};
use std::collections::BTreeMap;

fn context(dir: &std::path::Path, node: Node, config: &Config) -> StageContext {
    StageContext {
        config: config.clone(),
        device: Device::Cpu,
        seed: 0,
        node,
        cache_key: "run-test".into(),
        seed_dir: dir.to_path_buf(),
        upstream: BTreeMap::from([
            ("data".to_string(), dir.join("data.safetensors")),
            ("backbone".to_string(), dir.join("backbone.safetensors")),
        ]),
        rebuild_hint: "cargo xtask stage --run test".into(),
    }
}

#[test]
fn run_trains_from_the_data_and_backbone_artifacts() {
    let mut config = Config::preset(Preset::Demo);
    let demo = &mut config.data.demo;
    demo.base_train_per_class = 10;
    demo.base_val_per_class = 4;
    demo.web_per_class = 10;
    demo.novel_test_per_class = 4;
    config.backbone.small_width = 4;
    let s = &mut config.simnet;
    s.batch_a = 10;
    s.batch_b = 10;
    s.classes_a = 3;
    s.classes_b = 2;
    s.val_batches = 2;
    s.val_classes = 3;
    s.val_per_class = 3;
    s.optim.epochs = 1;
    let dir = tempfile::tempdir().unwrap();

    let out = simtrans_data::run(&context(dir.path(), Node::stage(Stage::Data), &config)).unwrap();
    let meta = ArtifactMeta {
        node: "data".into(),
        schema_version: simtrans_data::index::SCHEMA_VERSION,
        extra: out.meta,
        metrics: out.metrics,
        ..Default::default()
    };
    Artifact::new(meta, out.tensors)
        .save(&dir.path().join("data.safetensors"))
        .unwrap();

    let vm = VarMap::new();
    let vb = simtrans_core::seed::var_builder(&vm, 0, "backbone", DType::F32, &Device::Cpu);
    ResNet::new(Arch::Small, 4, Some(6), vb).unwrap();
    let tensors = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let meta = ArtifactMeta {
        node: "backbone".into(),
        schema_version: simtrans_backbone::stage::SCHEMA_VERSION,
        extra: BTreeMap::from([
            ("arch".to_string(), "small".to_string()),
            ("small_width".to_string(), "4".to_string()),
        ]),
        ..Default::default()
    };
    Artifact::new(meta, tensors)
        .save(&dir.path().join("backbone.safetensors"))
        .unwrap();

    let ctx = context(dir.path(), Node::stage(Stage::Simnet), &config);
    let out = simtrans_simnet::stage::run(&ctx).unwrap();
    assert_eq!(out.meta["arch"], "small");
    assert_eq!(out.meta["head"], "4");
    assert_eq!(out.meta["feature_dim"], "32");
    let hist = out.metrics["history"].as_array().unwrap();
    assert_eq!(hist.len(), 1);
    assert!(hist[0]["steps"].as_u64().unwrap() >= 1, "{}", hist[0]);
    for k in ["f1_val", "f1_test"] {
        let v = out.metrics[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert!(out.tensors.contains_key("backbone.layer4.0.conv2.weight"));
}
