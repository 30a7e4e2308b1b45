//! The training loop end to end on synthetic images: artifact contents, exact resume from a
//! checkpoint, loading the artifact back for similarity matrices, and divergence detection.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::*;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use simtrans_backbone::{Arch, ResNet};
use simtrans_core::{Artifact, ArtifactMeta, Config, CoreError, Node, Preset, Stage, StageContext};
use simtrans_ops::BnMode;
use simtrans_simnet::head::PairOrder;
use simtrans_simnet::stage::{train, BackboneInit, Batches, EvalSet, TrainData};
use simtrans_simnet::{SimNet, SimnetError};
use std::collections::BTreeMap;

/// Images of 8×8 pixels whose mean colour depends on the class, plus per-image noise.
struct Synthetic {
    labels: BTreeMap<u32, u32>,
    a: Vec<u32>,
    b: Vec<u32>,
    val: Vec<u32>,
    test: Vec<u32>,
    batch: usize,
}

impl Synthetic {
    fn new() -> Self {
        let mut labels = BTreeMap::new();
        let mut sets: [Vec<u32>; 4] = Default::default();
        let mut id = 0u32;
        // (set, classes, images per class)
        for (set, classes, per) in [
            (0usize, 0..4u32, 12u32),
            (1, 10..12, 16),
            (2, 0..4, 4),
            (3, 10..12, 8),
        ] {
            for c in classes {
                for _ in 0..per {
                    labels.insert(id, c);
                    sets[set].push(id);
                    id += 1;
                }
            }
        }
        let [a, b, val, test] = sets;
        Synthetic {
            labels,
            a,
            b,
            val,
            test,
            batch: 8,
        }
    }
}

impl TrainData for Synthetic {
    fn images(
        &self,
        ids: &[u32],
        train: bool,
        seed: u64,
        device: &Device,
    ) -> simtrans_simnet::Result<Tensor> {
        let mut data = Vec::with_capacity(ids.len() * 3 * 64);
        for &id in ids {
            let c = self.labels[&id] as f32;
            let mut rng =
                simtrans_core::seed::rng(if train { seed } else { 0 }, &["img"], id as u64);
            for ch in 0..3 {
                let base = (c * (ch as f32 + 1.0)).sin();
                for _ in 0..64 {
                    data.push(base + 0.5 * (rng.random::<f32>() - 0.5));
                }
            }
        }
        Ok(Tensor::from_vec(data, (ids.len(), 3, 8, 8), device)?)
    }

    fn label(&self, id: u32) -> u32 {
        self.labels[&id]
    }

    fn epoch_batches(&self, rng: &mut ChaCha8Rng) -> simtrans_simnet::Result<(Batches, Batches)> {
        let mut a = self.a.clone();
        let mut b = self.b.clone();
        a.shuffle(rng);
        b.shuffle(rng);
        let chunks = |v: Vec<u32>| v.chunks(self.batch).map(|c| c.to_vec()).collect();
        Ok((chunks(a), chunks(b)))
    }

    fn eval_batches(
        &self,
        set: EvalSet,
        _rng: &mut ChaCha8Rng,
    ) -> simtrans_simnet::Result<Batches> {
        let v = match set {
            EvalSet::BaseVal => &self.val,
            EvalSet::NovelTest => &self.test,
        };
        Ok(v.chunks(8).map(|c| c.to_vec()).collect())
    }
}

fn backbone() -> BackboneInit {
    let vm = VarMap::new();
    let vb = simtrans_core::seed::var_builder(&vm, 5, "backbone", DType::F32, &Device::Cpu);
    ResNet::new(Arch::Small, 4, Some(4), vb).unwrap();
    let tensors = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    BackboneInit {
        arch: Arch::Small,
        small_width: 4,
        tensors,
    }
}

fn context(dir: &std::path::Path, epochs: usize) -> StageContext {
    let mut config = Config::preset(Preset::Demo);
    config.simnet.batch_a = 8;
    config.simnet.batch_b = 8;
    config.simnet.optim.epochs = epochs;
    config.simnet.optim.lr = 0.02;
    config.simnet.optim.lr_step = 1;
    StageContext {
        config,
        device: Device::Cpu,
        seed: 3,
        node: Node::stage(Stage::Simnet),
        cache_key: "test-key".into(),
        seed_dir: dir.to_path_buf(),
        upstream: BTreeMap::new(),
        rebuild_hint: "cargo xtask stage --run test".into(),
    }
}

#[test]
fn trains_resumes_exactly_and_loads_back() {
    let data = Synthetic::new();
    let init = backbone();

    let whole_dir = tempfile::tempdir().unwrap();
    let whole = train(&context(whole_dir.path(), 2), &data, &init).unwrap();

    // The same run killed after its first epoch and started again.
    let dir = tempfile::tempdir().unwrap();
    let first = train(&context(dir.path(), 1), &data, &init).unwrap();
    assert_eq!(first.metrics["history"].as_array().unwrap().len(), 1);
    let resumed = train(&context(dir.path(), 2), &data, &init).unwrap();
    assert_eq!(whole.metrics["history"], resumed.metrics["history"]);
    assert_eq!(
        whole.tensors.keys().collect::<Vec<_>>(),
        resumed.tensors.keys().collect::<Vec<_>>()
    );
    for (name, t) in &whole.tensors {
        assert_eq!(
            max_diff(t, &resumed.tensors[name]),
            0.0,
            "{name} differs after resume"
        );
    }
    // Training moved the weights away from the initial backbone, the head exists, fc is gone.
    assert!(whole.tensors.keys().any(|k| k.starts_with("head.fc1.0.")));
    assert!(whole.tensors.keys().any(|k| k.starts_with("disc.fc2.")));
    assert!(!whole
        .tensors
        .keys()
        .any(|k| k.contains("fc.weight") && k.starts_with("backbone.")));
    assert!(
        max_diff(
            &whole.tensors["backbone.conv1.weight"],
            &init.tensors["conv1.weight"]
        ) > 0.0
    );
    let hist = whole.metrics["history"].as_array().unwrap();
    assert_eq!(
        hist[1]["lr"].as_f64().unwrap(),
        0.01,
        "lr halves every lr_step epochs"
    );
    for k in ["f1_val", "f1_test", "final_f1_val", "test_selected_f1_test"] {
        let v = whole.metrics[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    // The log has one line per epoch.
    let log = std::fs::read_to_string(whole_dir.path().join("logs/simnet.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);

    // Loading the artifact back: S[i, j] = sim([f_i ; f_j]) in eval mode.
    let meta = ArtifactMeta {
        node: "simnet".into(),
        schema_version: simtrans_simnet::model::SCHEMA_VERSION,
        extra: whole.meta.clone(),
        ..Default::default()
    };
    let mut art = Artifact::new(meta, whole.tensors.clone());
    let path = whole_dir.path().join("simnet.safetensors");
    art.save(&path).unwrap();
    let art = Artifact::load(&path, &simtrans_simnet::schema(), &Device::Cpu).unwrap();
    let net = SimNet::load(&art, &Device::Cpu).unwrap();
    assert_eq!(net.feature_dim(), 32);
    let fi = net
        .features(&data.images(&data.val[..5], false, 0, &Device::Cpu).unwrap())
        .unwrap();
    let fj = net
        .features(
            &data
                .images(&data.test[..3], false, 0, &Device::Cpu)
                .unwrap(),
        )
        .unwrap();
    let s = net.similarity_matrix(&fi, &fj).unwrap();
    assert_eq!(s.dims(), &[5, 3]);
    // Blocking the rows to bound memory changes nothing but rounding (two rows per block here).
    let blocked = net.similarity_matrix_within(&fi, &fj, 2 * 3 * 64).unwrap();
    assert!(max_diff(&blocked, &s) < 1e-6);
    let (logits, _) = net
        .head
        .forward_concat(
            &Tensor::cat(&[&fi.get(4).unwrap(), &fj.get(1).unwrap()], 0)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            BnMode::Eval,
        )
        .unwrap();
    let want = simtrans_simnet::head::similarity(&logits)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let got = s.to_vec2::<f32>().unwrap()[4][1];
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // The matrix of a set with itself is the transpose of the reference enumeration's order.
    let (l, _) = net
        .head
        .forward_grid(&fi, &fi, PairOrder::ColFirst, BnMode::Eval)
        .unwrap();
    let enum_order = simtrans_simnet::head::similarity(&l)
        .unwrap()
        .reshape((5, 5))
        .unwrap();
    let st = net.similarity_matrix(&fi, &fi).unwrap().t().unwrap();
    assert!(max_diff(&enum_order, &st.contiguous().unwrap()) < 1e-6);
}

#[test]
fn a_non_finite_loss_stops_with_the_checkpoint_folder() {
    let data = Synthetic::new();
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = context(dir.path(), 1);
    ctx.config.simnet.beta = f64::NAN;
    match train(&ctx, &data, &backbone()) {
        Err(SimnetError::Core(CoreError::NonFinite { epoch, step, .. })) => {
            assert_eq!((epoch, step), (0, 0));
        }
        other => panic!("expected NonFinite, got {:?}", other.map(|o| o.metrics)),
    }
}

#[test]
fn unequal_batch_sizes_are_refused_before_training() {
    let data = Synthetic::new();
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = context(dir.path(), 1);
    ctx.config.simnet.batch_b = 6;
    match train(&ctx, &data, &backbone()) {
        Err(SimnetError::Config(msg)) => {
            assert!(msg.contains("must be equal"), "{msg}");
            assert!(
                !ctx.checkpoints().dir.exists(),
                "it trained before refusing"
            );
        }
        other => panic!(
            "expected a config error, got {:?}",
            other.map(|o| o.metrics)
        ),
    }
}

#[test]
fn select_val_keeps_the_best_validation_epoch() {
    let data = Synthetic::new();
    let init = backbone();
    let one_dir = tempfile::tempdir().unwrap();
    let one = train(&context(one_dir.path(), 1), &data, &init).unwrap();
    let two_dir = tempfile::tempdir().unwrap();
    let two = train(&context(two_dir.path(), 2), &data, &init).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut ctx = context(dir.path(), 2);
    ctx.config.simnet.select = simtrans_core::config::Selection::Val;
    let sel = train(&ctx, &data, &init).unwrap();
    let hist = sel.metrics["history"].as_array().unwrap();
    let f = |e: usize| hist[e]["f1_val"].as_f64().unwrap();
    let want_epoch = if f(1) > f(0) { 1 } else { 0 };
    assert_eq!(sel.metrics["epoch"].as_u64().unwrap() as usize, want_epoch);
    assert_eq!(sel.meta["epoch"], want_epoch.to_string());
    let reference = if want_epoch == 0 { &one } else { &two };
    for (name, t) in &reference.tensors {
        assert_eq!(max_diff(t, &sel.tensors[name]), 0.0, "{name}");
    }
    assert_eq!(sel.metrics["f1_val"].as_f64().unwrap(), f(want_epoch));
}

#[test]
fn simnet_learns_the_synthetic_classes() {
    // Class colours are separable, so a working loop lowers L_sim and finds similar pairs,
    // also between the target (novel) classes it never had labels for.
    let data = Synthetic::new();
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = context(dir.path(), 6);
    ctx.config.simnet.optim.lr_step = 25;
    ctx.config.simnet.optim.lr = 0.05;
    let out = train(&ctx, &data, &backbone()).unwrap();
    let hist = out.metrics["history"].as_array().unwrap();
    let l = |e: usize| hist[e]["l_sim"].as_f64().unwrap();
    assert!(l(5) < 0.7 * l(0), "L_sim {} -> {}", l(0), l(5));
    let f1_test = out.metrics["final_f1_test"].as_f64().unwrap();
    assert!(f1_test > 0.5, "novel pair F1 {f1_test}");
}

/// The real loader's images come decoded ahead and say how long the loop waited for them (the
/// epoch's log line); images built when taken have no such figure.
#[test]
fn images_ahead_report_the_input_wait_where_they_are_decoded_ahead() {
    let mut config = Config::preset(Preset::Demo);
    config.data.demo = simtrans_core::config::DemoConfig {
        base_train_per_class: 4,
        base_val_per_class: 1,
        web_per_class: 4,
        novel_test_per_class: 1,
        ..simtrans_core::config::DemoConfig::default_recipe()
    };
    let (index, _) = simtrans_data::build_index(&config, 0).unwrap();
    let data = simtrans_simnet::stage::IndexData::new(
        std::sync::Arc::new(index),
        &config.data,
        &config.simnet,
    )
    .unwrap();
    let jobs = vec![(vec![0, 1, 2], 1), (vec![3, 4], 2)];
    let mut ahead = data.images_ahead(jobs.clone(), true, &Device::Cpu);
    let shapes: Vec<Vec<usize>> = (&mut ahead).map(|x| x.unwrap().dims().to_vec()).collect();
    assert_eq!(shapes, [vec![3, 3, 28, 28], vec![2, 3, 28, 28]]);
    let wait = ahead.input_wait().expect("decoded ahead");
    assert!(wait.elapsed_s > 0.0 && (0.0..=wait.elapsed_s).contains(&wait.waited_s));

    let synthetic = Synthetic::new();
    let mut built = synthetic.images_ahead(jobs, true, &Device::Cpu);
    assert_eq!(built.by_ref().count(), 2);
    assert!(built.input_wait().is_none());
}
