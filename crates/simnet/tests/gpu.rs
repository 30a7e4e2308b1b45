//! The SimNet head and the discriminator on CUDA against the CPU (issue #9): under
//! `run.precision = "bf16"` both compute their Linears in bf16 on the GPU
//! (`head::compute_dtype`), and the head's logits, diff_feat and first-Linear gradient, the
//! discriminator's logits and the gradients of its LayerNorm and first Linear must follow the
//! CPU's f32 ones. On CUDA the first layer's pair grid and the LayerNorm run on our kernels
//! (`simtrans_ops::headops`), so this also checks those against the plain CPU ops. It needs a GPU and a
//! `--features cuda` build, so it is `#[ignore]`d; `scripts/gpu-bench.sh` runs it with
//! `--include-ignored`.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{cosine, max_abs};
use simtrans_core::device::{set_precision, Precision};
use simtrans_ops::gpu::test_device as gpu;
use simtrans_ops::BnMode;
use simtrans_simnet::head::{
    compute_dtype, similarity, Discriminator, HeadKind, PairOrder, SimHead,
};
use simtrans_simnet::train::head_forward;

/// Feature width of the test heads (the paper's is 2048; the arithmetic is the same).
const DIM: usize = 32;

fn head_on(kind: HeadKind, dev: &Device) -> (VarMap, SimHead, Discriminator) {
    let vm = VarMap::new();
    // The same seed gives the same parameters on every device.
    let vb = simtrans_core::seed::var_builder(&vm, 21, "head", DType::F32, dev);
    let head = SimHead::new(kind, DIM, vb.pp("head")).unwrap();
    let disc = Discriminator::new(kind.diff_dim(DIM), vb.pp("disc")).unwrap();
    (vm, head, disc)
}

fn features(n: usize, seed: f64) -> Tensor {
    simtrans_core::seed::det_tensor(&[n, DIM], seed, -1.0, 1.0).unwrap()
}

/// `max|a − b| / max|b|`.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    simtrans_core::compare::max_abs_diff(a, b).unwrap() / max_abs(b).max(1e-30)
}

/// What [`run`] returns: logits, diff_feat (f32), the first Linear's gradient, the eval
/// similarities, the domain logits, and the domain loss's gradients of the discriminator's
/// LayerNorm weight and first Linear.
type Outputs = (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor);

/// One training forward (the step-1 path: pairs within A and within B, per-domain BatchNorm)
/// and its first-layer weight gradient, the eval-mode similarity matrix A × B, and the
/// discriminator's logits on the forward's diff_feat with their loss's gradients.
fn run(kind: HeadKind, dev: &Device) -> Outputs {
    let (fa, fb) = (
        features(6, 1.0).to_device(dev).unwrap(),
        features(5, 2.0).to_device(dev).unwrap(),
    );
    let labels = [0u32, 1, 0, 2, 1, 0];
    let (vm, head, disc) = head_on(kind, dev);
    let fwd = head_forward(&head, &fa, &labels, &fb, true).unwrap();
    let loss = fwd.sim_loss().unwrap();
    let grads = loss.backward().unwrap();
    let name = match kind {
        HeadKind::Type4 => "head.fc1.0.weight",
        HeadKind::Type2 => "head.fc.weight",
    };
    let weight = vm.data().lock().unwrap()[name].as_tensor().clone();
    let g = grads
        .get(&weight)
        .expect("a gradient for the first Linear")
        .clone();
    assert_eq!(g.dtype(), DType::F32, "the parameters' gradients stay f32");
    let (logits, _) = head
        .forward_grid(&fa, &fb, PairOrder::RowFirst, BnMode::Eval)
        .unwrap();
    let s = similarity(&logits).unwrap();
    let domain = disc.forward(&fwd.diff_feat).unwrap();
    let dgrads = fwd.dom_loss(&disc).unwrap().backward().unwrap();
    let disc_grad = |name: &str| {
        let v = vm.data().lock().unwrap()[name].as_tensor().clone();
        dgrads.get(&v).expect("a discriminator gradient").clone()
    };
    let (ln, fc) = (disc_grad("disc.bn.weight"), disc_grad("disc.fc.weight"));
    let diff = fwd.diff_feat.to_dtype(DType::F32).unwrap();
    (fwd.logits, diff, g, s, domain, ln, fc)
}

#[test]
#[ignore = "needs a CUDA build and a GPU (scripts/gpu-bench.sh runs it)"]
fn the_head_computes_in_bf16_on_the_gpu_and_follows_the_cpu() {
    let dev = gpu("the_head_computes_in_bf16_on_the_gpu_and_follows_the_cpu");
    let mut failed = vec![];
    for kind in [HeadKind::Type4, HeadKind::Type2] {
        set_precision(Precision::F32);
        let cpu = run(kind, &Device::Cpu);
        for (p, want, tol, min_cos) in [
            (Precision::F32, DType::F32, 1e-5, 0.9999),
            (Precision::Bf16, DType::BF16, 5e-2, 0.95),
        ] {
            set_precision(p);
            assert_eq!(compute_dtype(&dev), want, "{p:?}");
            let (_, head, _) = head_on(kind, &dev);
            let h = head
                .first_layer_grid(
                    &features(3, 3.0).to_device(&dev).unwrap(),
                    &features(2, 4.0).to_device(&dev).unwrap(),
                    PairOrder::RowFirst,
                )
                .unwrap();
            assert_eq!(h.dtype(), want, "{kind:?} {p:?}: the first layer's dtype");
            let gpu = run(kind, &dev);
            assert_eq!(
                [gpu.0.dtype(), gpu.3.dtype(), gpu.4.dtype()],
                [DType::F32; 3],
                "{kind:?} {p:?}: logits, similarities and domain logits leave in f32"
            );
            for (what, e) in [
                ("logits", rel_err(&gpu.0, &cpu.0)),
                ("diff_feat", rel_err(&gpu.1, &cpu.1)),
                ("eval similarity", rel_err(&gpu.3, &cpu.3)),
                ("domain logits", rel_err(&gpu.4, &cpu.4)),
            ] {
                eprintln!("{kind:?} {p:?} {what}: {e:.2e}");
                if e > tol {
                    failed.push(format!("{kind:?} {p:?} {what}: {e:.3e} > {tol:e}"));
                }
            }
            for (what, g, c) in [
                ("first-layer", &gpu.2, &cpu.2),
                ("discriminator LayerNorm weight", &gpu.5, &cpu.5),
                ("discriminator first Linear", &gpu.6, &cpu.6),
            ] {
                let c = cosine(g, c);
                eprintln!("{kind:?} {p:?} {what} gradient cosine: {c:.6}");
                if c < min_cos {
                    failed.push(format!(
                        "{kind:?} {p:?} {what} gradient cosine {c} < {min_cos}"
                    ));
                }
            }
        }
    }
    set_precision(Precision::F32);
    assert!(failed.is_empty(), "over tolerance: {failed:#?}");
}
