//! The adversarial step: which optimiser touches which parameters, per-domain BatchNorm,
//! β = 0, and the factorised first layer against the literal concatenation.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use common::*;
use simtrans_ops::optim::Sgd;
use simtrans_ops::{BatchNorm, BnMode};
use simtrans_simnet::head::{linear, Discriminator, HeadKind, PairOrder, SimHead};
use simtrans_simnet::pairs;
use simtrans_simnet::train::{FeatureNet, Trainer};
use std::collections::BTreeMap;

/// A stand-in backbone: Linear → BatchNorm → ReLU, so that `bn_split` matters in it too.
struct TinyNet {
    fc: candle_nn::Linear,
    bn: BatchNorm,
}

impl TinyNet {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(TinyNet {
            fc: linear(6, 5, vb.pp("fc"))?,
            bn: BatchNorm::new(5, vb.pp("bn"))?,
        })
    }
}

impl FeatureNet for TinyNet {
    fn features(&self, images: &Tensor, mode: BnMode) -> Result<Tensor> {
        self.bn.forward(&self.fc.forward(images)?, mode)?.relu()
    }
}

struct Setup {
    sim_vm: VarMap,
    disc_vm: VarMap,
    net: TinyNet,
    head: SimHead,
    disc: Discriminator,
    images_a: Tensor,
    labels_a: Vec<u32>,
    images_b: Tensor,
}

fn snapshot(vm: &VarMap) -> BTreeMap<String, Vec<f32>> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| {
            let t = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n.clone(), t)
        })
        .collect()
}

fn images(seed: u64, n: usize, shift: f64) -> Tensor {
    // Deterministic pseudo-images from the crate's seeded initialiser.
    let vm = VarMap::new();
    let vb = simtrans_core::seed::var_builder(&vm, seed, "images", DType::F32, &Device::Cpu);
    let t = vb
        .get_with_hints(
            (n, 6),
            "x",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )
        .unwrap();
    (t + shift).unwrap()
}

fn setup(kind: HeadKind) -> Setup {
    let sim_vm = VarMap::new();
    let disc_vm = VarMap::new();
    let vb = simtrans_core::seed::var_builder(&sim_vm, 1, "simnet", DType::F32, &Device::Cpu);
    let net = TinyNet::new(vb.pp("backbone")).unwrap();
    let head = SimHead::new(kind, 5, vb.pp("head")).unwrap();
    let dvb = simtrans_core::seed::var_builder(&disc_vm, 1, "disc", DType::F32, &Device::Cpu);
    let disc = Discriminator::new(kind.diff_dim(5), dvb.pp("disc")).unwrap();
    Setup {
        sim_vm,
        disc_vm,
        net,
        head,
        disc,
        images_a: images(2, 6, 0.0),
        labels_a: vec![0, 1, 0, 2, 1, 0],
        images_b: images(3, 4, 2.0),
    }
}

fn trainer(s: &Setup, beta: f64, bn_split: bool) -> Trainer {
    Trainer {
        sim_opt: Sgd::new(
            simtrans_backbone::trainable_vars(&s.sim_vm),
            0.05,
            0.9,
            1e-4,
        ),
        disc_opt: Sgd::new(
            simtrans_backbone::trainable_vars(&s.disc_vm),
            0.05,
            0.9,
            1e-4,
        ),
        beta,
        bn_split,
    }
}

fn assert_all_changed(
    before: &BTreeMap<String, Vec<f32>>,
    after: &BTreeMap<String, Vec<f32>>,
    what: &str,
) {
    for (name, b) in before {
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            continue;
        }
        assert_ne!(b, &after[name], "{what}: `{name}` did not change");
    }
}

#[test]
fn simnet_update_leaves_the_discriminator_alone_and_vice_versa() {
    for kind in [HeadKind::Type4, HeadKind::Type2] {
        let s = setup(kind);
        let mut t = trainer(&s, 0.1, true);
        let fwd = t
            .forward(&s.net, &s.head, &s.images_a, &s.labels_a, &s.images_b)
            .unwrap();

        let sim0 = snapshot(&s.sim_vm);
        let disc0 = snapshot(&s.disc_vm);
        t.simnet_update(&fwd, &s.disc).unwrap();
        let sim1 = snapshot(&s.sim_vm);
        assert_eq!(
            disc0,
            snapshot(&s.disc_vm),
            "the SimNet step changed the discriminator"
        );
        assert_all_changed(&sim0, &sim1, "SimNet step");

        t.discriminator_update(&fwd, &s.disc).unwrap();
        assert_eq!(
            sim1,
            snapshot(&s.sim_vm),
            "the discriminator step changed SimNet"
        );
        assert_all_changed(&disc0, &snapshot(&s.disc_vm), "discriminator step");
    }
}

#[test]
fn the_discriminator_step_reuses_the_simnet_backward_pass() {
    // With β ≠ 0 the discriminator's gradient comes from the SimNet backward pass, rescaled by
    // −1/β; the update must be the separate pass's on detached diff_feat, to rounding, over
    // two steps (the second with momentum).
    for beta in [0.1, 0.7] {
        let (s1, s2) = (setup(HeadKind::Type4), setup(HeadKind::Type4));
        let (mut t1, mut t2) = (trainer(&s1, beta, true), trainer(&s2, beta, true));
        let disc0 = snapshot(&s1.disc_vm);
        for _ in 0..2 {
            let fwd = t1
                .forward(&s1.net, &s1.head, &s1.images_a, &s1.labels_a, &s1.images_b)
                .unwrap();
            let losses = fwd.losses(&s1.disc, beta).unwrap();
            let grads = losses.total.backward().unwrap();
            t1.sim_opt.step(&grads).unwrap();
            let (l_dom, _) = t1
                .discriminator_step(&losses, grads, &fwd, &s1.disc)
                .unwrap();

            let fwd = t2
                .forward(&s2.net, &s2.head, &s2.images_a, &s2.labels_a, &s2.images_b)
                .unwrap();
            t2.simnet_update(&fwd, &s2.disc).unwrap();
            let (l_dom2, _) = t2.discriminator_update(&fwd, &s2.disc).unwrap();
            let (a, b) = (
                l_dom.to_scalar::<f32>().unwrap(),
                l_dom2.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "β {beta}: L_dom {a} vs {b}"
            );
        }
        let (got, want) = (snapshot(&s1.disc_vm), snapshot(&s2.disc_vm));
        for (name, w) in &want {
            let g = &got[name];
            let scale = w.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let moved = w
                .iter()
                .zip(&disc0[name])
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                moved > 1e3 * diff,
                "β {beta}: `{name}` moved {moved:e}, off by {diff:e}"
            );
            assert!(diff <= 1e-5 * scale, "β {beta}: `{name}` off by {diff:e}");
        }
    }
}

#[test]
fn beta_zero_is_the_plain_similarity_step_and_beta_changes_it() {
    let run = |beta: f64, manual: bool| {
        let s = setup(HeadKind::Type4);
        let mut t = trainer(&s, beta, true);
        let fwd = t
            .forward(&s.net, &s.head, &s.images_a, &s.labels_a, &s.images_b)
            .unwrap();
        if manual {
            // Plain similarity loss: cross-entropy on A's pairs, nothing else.
            let logits_a = fwd.logits.narrow(0, 0, 36).unwrap();
            let targets = pairs::targets_tensor(&s.labels_a, &Device::Cpu).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits_a, &targets).unwrap();
            t.sim_opt.step(&loss.backward().unwrap()).unwrap();
        } else {
            let (l_sim, total) = t.simnet_update(&fwd, &s.disc).unwrap();
            if beta == 0.0 {
                assert_eq!(
                    l_sim.to_scalar::<f32>().unwrap(),
                    total.to_scalar::<f32>().unwrap()
                );
            }
        }
        snapshot(&s.sim_vm)
    };
    let plain = run(0.0, true);
    assert_eq!(run(0.0, false), plain);
    assert_ne!(
        run(0.5, false),
        plain,
        "β > 0 had no effect on the SimNet update"
    );
}

#[test]
fn bn_split_normalises_each_half_with_its_own_statistics() {
    // Directly: each half comes out with the affine parameters' mean and (unit) spread, and
    // the running mean moves towards the first half's mean only.
    let vm = VarMap::new();
    let vb = simtrans_core::seed::var_builder(&vm, 0, "bn", DType::F32, &Device::Cpu);
    let bn = BatchNorm::new(3, vb).unwrap();
    let a = images(5, 8, 0.0).narrow(1, 0, 3).unwrap();
    let b = images(6, 4, 0.0)
        .narrow(1, 0, 3)
        .unwrap()
        .affine(3.0, 10.0)
        .unwrap();
    let x = Tensor::cat(&[&a, &b], 0).unwrap();
    let y = bn.forward(&x, BnMode::Split(8)).unwrap();
    for (part, n) in [
        (y.narrow(0, 0, 8).unwrap(), 8usize),
        (y.narrow(0, 8, 4).unwrap(), 4),
    ] {
        let mean = part.mean(0).unwrap().to_vec1::<f32>().unwrap();
        let var = part
            .sqr()
            .unwrap()
            .mean(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for c in 0..3 {
            assert!(mean[c].abs() < 1e-5, "half of {n}: mean {}", mean[c]);
            assert!((var[c] - 1.0).abs() < 1e-3, "half of {n}: var {}", var[c]);
        }
    }
    let rm = vm.data().lock().unwrap()["running_mean"]
        .as_tensor()
        .clone();
    let want = (a.mean(0).unwrap() * 0.1).unwrap();
    assert_close("running mean from the first half", &rm, &want, 1e-6);

    // Through the whole step: with bn_split the base pairs' logits do not depend on the web
    // images at all (backbone and head); with joint statistics they do.
    for (split, independent) in [(true, true), (false, false)] {
        let s = setup(HeadKind::Type4);
        let t = trainer(&s, 0.1, split);
        let l1 = t
            .forward(&s.net, &s.head, &s.images_a, &s.labels_a, &s.images_b)
            .unwrap()
            .logits
            .narrow(0, 0, 36)
            .unwrap();
        let other_b = images(9, 4, -1.0);
        let l2 = t
            .forward(&s.net, &s.head, &s.images_a, &s.labels_a, &other_b)
            .unwrap()
            .logits
            .narrow(0, 0, 36)
            .unwrap();
        let d = max_diff(&l1, &l2);
        assert_eq!(
            d == 0.0,
            independent,
            "bn_split={split}: max difference {d}"
        );
    }
}

#[test]
fn factorised_first_layer_equals_the_concatenation() {
    let s = setup(HeadKind::Type4);
    let f = s.net.features(&s.images_a, BnMode::Train).unwrap();
    let g = s.net.features(&s.images_b, BnMode::Train).unwrap();
    // The reference enumeration: row i·B + j is [f_j ; f_i].
    let fast = s
        .head
        .first_layer_grid(&f, &f, PairOrder::ColFirst)
        .unwrap();
    let slow = s
        .head
        .first_layer_concat(&pairs::enumerate(&f).unwrap())
        .unwrap();
    assert!(max_diff(&fast, &slow) < 1e-5);
    // The similarity-matrix order between two sets: row i·C + j is [f_i ; g_j].
    let (r, c) = (f.dim(0).unwrap(), g.dim(0).unwrap());
    let concat: Vec<Tensor> = (0..r)
        .flat_map(|i| {
            let f = &f;
            let g = &g;
            (0..c).map(move |j| Tensor::cat(&[&f.get(i).unwrap(), &g.get(j).unwrap()], 0).unwrap())
        })
        .collect();
    let slow = s
        .head
        .first_layer_concat(&Tensor::stack(&concat, 0).unwrap())
        .unwrap();
    let fast = s
        .head
        .first_layer_grid(&f, &g, PairOrder::RowFirst)
        .unwrap();
    assert!(max_diff(&fast, &slow) < 1e-5);
    // And the whole head agrees, in both modes.
    for mode in [BnMode::Eval, BnMode::Train] {
        let (a, da) = s
            .head
            .forward_grid(&f, &g, PairOrder::RowFirst, mode)
            .unwrap();
        let (b, db) = s
            .head
            .forward_concat(&Tensor::stack(&concat, 0).unwrap(), mode)
            .unwrap();
        assert!(max_diff(&a, &b) < 1e-5, "{mode:?}");
        assert!(max_diff(&da, &db) < 1e-5, "{mode:?}");
    }
}
