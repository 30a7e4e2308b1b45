//! Parity with the reference formulas (numpy goldens in tests/golden, see make_golden.py):
//! pair enumeration, head logits in training mode (joint and per-domain BatchNorm), running
//! statistics, the losses, and the eval-mode similarity matrix.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use simtrans_ops::BnMode;
use simtrans_simnet::head::{similarity, Discriminator, HeadKind, PairOrder, SimHead};
use simtrans_simnet::pairs;
use simtrans_simnet::train::head_forward;

#[test]
fn pair_enumeration_matches_the_reference_order() {
    let g = golden("pairs.json");
    let f = tensor(&g["features"]);
    let got = pairs::enumerate(&f).unwrap();
    assert_close("pairs", &got, &tensor(&g["pairs"]), 0.0);
    assert_eq!(pairs::targets(&labels(&g["labels"])), labels(&g["targets"]));
}

fn build(case: &serde_json::Value) -> (candle_nn::VarMap, SimHead, Discriminator) {
    let vm = varmap(&case["params"]);
    let vb = builder(&vm);
    let kind = HeadKind::from_config(case["head"].as_u64().unwrap() as u8).unwrap();
    let dim = case["dim"].as_u64().unwrap() as usize;
    let head = SimHead::new(kind, dim, vb.pp("head")).unwrap();
    let disc = Discriminator::new(kind.diff_dim(dim), vb.pp("disc")).unwrap();
    // Every parameter came from the golden file: nothing was created with a default.
    assert_eq!(
        vm.all_vars().len(),
        case["params"].as_object().unwrap().len()
    );
    (vm, head, disc)
}

#[test]
fn heads_losses_and_running_statistics_match_numpy() {
    for case in golden("heads.json").as_array().unwrap() {
        let fa = tensor(&case["features_a"]);
        let fb = tensor(&case["features_b"]);
        let la = labels(&case["labels_a"]);
        let beta = case["beta"].as_f64().unwrap();
        let head_no = case["head"].as_u64().unwrap();
        for (key, split) in [("joint", false), ("split", true)] {
            let want = &case[key];
            let what = format!("head {head_no} {key}");

            // The factorised training path.
            let (vm, head, disc) = build(case);
            let fwd = head_forward(&head, &fa, &la, &fb, split).unwrap();
            let want_logits =
                Tensor::from_vec(floats(&want["logits"]), fwd.logits.dims(), &Device::Cpu).unwrap();
            assert_close(&format!("{what} logits"), &fwd.logits, &want_logits, 1e-4);
            let l_sim = fwd.sim_loss().unwrap().to_scalar::<f32>().unwrap();
            let l_dom = fwd.dom_loss(&disc).unwrap().to_scalar::<f32>().unwrap();
            let total = fwd
                .simnet_loss(&disc, beta)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            for (name, got, w) in [
                ("l_sim", l_sim, "l_sim"),
                ("l_dom", l_dom, "l_dom"),
                ("total", total, "total"),
            ] {
                let w = want[w].as_f64().unwrap() as f32;
                assert!(
                    (got - w).abs() < 1e-5 * (1.0 + w.abs()),
                    "{what} {name}: {got} vs {w}"
                );
            }
            // β = 0 is exactly the plain similarity loss.
            let plain = fwd
                .simnet_loss(&disc, 0.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(plain, l_sim);
            // Running statistics after one training forward (from the base half when split).
            let data = vm.data().lock().unwrap();
            for (name, values) in want["running"].as_object().unwrap() {
                let got = data[name].as_tensor().clone();
                let w = Tensor::from_vec(floats(values), got.dims(), &Device::Cpu).unwrap();
                assert_close(&format!("{what} {name}"), &got, &w, 1e-5);
            }
            drop(data);

            // The literal reference form gives the same logits.
            let (_, head, _) = build(case);
            let x = Tensor::cat(
                &[
                    &pairs::enumerate(&fa).unwrap(),
                    &pairs::enumerate(&fb).unwrap(),
                ],
                0,
            )
            .unwrap();
            let mode = if split {
                BnMode::Split(fa.dim(0).unwrap().pow(2))
            } else {
                BnMode::Train
            };
            let (logits, _) = head.forward_concat(&x, mode).unwrap();
            assert_close(
                &format!("{what} concat logits"),
                &logits,
                &want_logits,
                1e-4,
            );
        }

        // Eval mode: S[i, j] = sim([f_i ; f_j]) between A (rows) and B (columns).
        let (_, head, _) = build(case);
        let (logits, _) = head
            .forward_grid(&fa, &fb, PairOrder::RowFirst, BnMode::Eval)
            .unwrap();
        let s = similarity(&logits).unwrap().reshape((4, 3)).unwrap();
        assert_close(
            &format!("head {head_no} eval similarity"),
            &s,
            &tensor(&case["eval_similarity"]),
            1e-5,
        );
    }
}

#[test]
fn reference_state_dicts_map_onto_our_names() {
    let case = &golden("heads.json")[0];
    let ours: std::collections::BTreeMap<String, Tensor> = case["params"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), tensor(v)))
        .collect();
    // The reference's names: DataParallel-wrapped modules, plus entries we drop.
    let mut simnet = std::collections::BTreeMap::new();
    let mut disc = std::collections::BTreeMap::new();
    for (k, t) in &ours {
        if let Some(rest) = k.strip_prefix("head.") {
            simnet.insert(format!("similarity_head.module.{rest}"), t.clone());
        } else if let Some(rest) = k.strip_prefix("disc.") {
            disc.insert(format!("module.{rest}"), t.clone());
        }
    }
    let one = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    simnet.insert("backbone.module.resnet.conv1.weight".into(), one.clone());
    simnet.insert("backbone.module.resnet.fc.weight".into(), one.clone());
    simnet.insert(
        "similarity_head.module.fc1.1.num_batches_tracked".into(),
        one.clone(),
    );
    let mapped = simtrans_simnet::from_reference(&simnet, Some(&disc)).unwrap();
    let mut want: Vec<String> = ours.keys().cloned().collect();
    want.push("backbone.conv1.weight".into());
    want.sort();
    assert_eq!(mapped.keys().cloned().collect::<Vec<_>>(), want);
    for (k, t) in &ours {
        assert_eq!(max_diff(&mapped[k], t), 0.0);
    }
    simnet.insert("optimizer.state".into(), one);
    let err = simtrans_simnet::from_reference(&simnet, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("optimizer.state"), "{err}");
}

/// The head in bf16 (what `run.precision = "bf16"` does on CUDA, forced here on the CPU) follows
/// the f32 head: f32 logits and diff_feat in the compute dtype, logits within bf16 rounding, and
/// gradients that reach the f32 parameters pointing the same way (the numbers are the numpy
/// goldens' inputs; the f32 head itself is checked against them above).
#[test]
fn the_bf16_head_follows_the_f32_head() {
    use candle_core::DType;
    for case in golden("heads.json").as_array().unwrap() {
        let fa = tensor(&case["features_a"]);
        let head_no = case["head"].as_u64().unwrap();
        let run = |dtype: DType| {
            let (vm, head, _) = build(case);
            let h = head
                .first_layer_grid_in(&fa, &fa, PairOrder::ColFirst, dtype)
                .unwrap();
            assert_eq!(h.dtype(), dtype);
            let (logits, diff) = head.from_first_layer(&h, BnMode::Train).unwrap();
            assert_eq!((logits.dtype(), diff.dtype()), (DType::F32, dtype));
            let diff = diff.to_dtype(DType::F32).unwrap();
            // A loss whose gradient reaches every Linear of the head.
            let loss = (logits.sqr().unwrap().sum_all().unwrap()
                + diff.sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            let weight = vm
                .data()
                .lock()
                .unwrap()
                .get(match head_no {
                    4 => "head.fc1.0.weight",
                    _ => "head.fc.weight",
                })
                .unwrap()
                .as_tensor()
                .clone();
            let g = grads.get(&weight).expect("a gradient for the first Linear");
            assert_eq!(g.dtype(), DType::F32);
            (logits, g.flatten_all().unwrap())
        };
        let (l32, g32) = run(DType::F32);
        let (l16, g16) = run(DType::BF16);
        let scale = max_abs(&l32);
        let err = max_abs(&(&l16 - &l32).unwrap()) / scale;
        assert!(
            err < 3e-2,
            "head {head_no}: bf16 logits off by {err:.2e} of {scale:.3}"
        );
        let cos = cosine(&g32, &g16);
        eprintln!("head {head_no}: bf16 logits within {err:.2e}, gradient cosine {cos:.4}");
        // bf16 keeps 8 bits; three BatchNorms over a handful of rows amplify them (measured:
        // 0.984 for head 4). The whole-step ResNet test bounds bf16 at 0.9.
        assert!(cos > 0.95, "head {head_no}: bf16 gradient cosine {cos}");
    }
}

#[test]
fn the_bf16_discriminator_follows_the_f32_one() {
    use candle_core::DType;
    for case in golden("heads.json").as_array().unwrap() {
        let fa = tensor(&case["features_a"]);
        let head_no = case["head"].as_u64().unwrap();
        let (vm, head, disc) = build(case);
        let (_, diff) = head
            .forward_grid(&fa, &fa, PairOrder::ColFirst, BnMode::Train)
            .unwrap();
        let run = |dtype: DType| {
            let logits = disc.forward_in(&diff, dtype).unwrap();
            assert_eq!(logits.dtype(), DType::F32);
            let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let weight = vm.data().lock().unwrap()["disc.fc.weight"]
                .as_tensor()
                .clone();
            let g = grads.get(&weight).expect("a gradient for the first Linear");
            (logits, g.flatten_all().unwrap())
        };
        let (l32, g32) = run(DType::F32);
        // The f32 path is the plain one (what the numpy goldens check through `forward`).
        assert_eq!(
            max_abs(&(&l32 - disc.forward(&diff).unwrap()).unwrap()),
            0.0
        );
        let (l16, g16) = run(DType::BF16);
        let scale = max_abs(&l32);
        let err = max_abs(&(&l16 - &l32).unwrap()) / scale;
        let cos = cosine(&g32, &g16);
        eprintln!(
            "head {head_no}: bf16 discriminator logits within {err:.2e}, gradient cosine {cos:.4}"
        );
        assert!(
            err < 3e-2,
            "head {head_no}: bf16 logits off by {err:.2e} of {scale:.3}"
        );
        assert!(cos > 0.99, "head {head_no}: bf16 gradient cosine {cos}");
    }
}

#[test]
fn targets_made_beforehand_give_the_same_forward_and_must_fit() {
    use simtrans_simnet::train::{head_forward_with, PairTargets};
    let case = &golden("heads.json")[0];
    let (fa, fb) = (tensor(&case["features_a"]), tensor(&case["features_b"]));
    let la = labels(&case["labels_a"]);
    let (_, head, _) = build(case);
    let cpu = candle_core::Device::Cpu;
    let plain = head_forward(&head, &fa, &la, &fb, true).unwrap();
    let targets = PairTargets::new(&la, fb.dim(0).unwrap(), &cpu).unwrap();
    let with = head_forward_with(&head, &fa, &fb, targets, true).unwrap();
    assert_eq!(max_abs(&(&plain.logits - &with.logits).unwrap()), 0.0);
    // Targets for one image too few are refused.
    let short = PairTargets::new(&la[1..], fb.dim(0).unwrap(), &cpu).unwrap();
    assert!(head_forward_with(&head, &fa, &fb, short, true).is_err());
}
