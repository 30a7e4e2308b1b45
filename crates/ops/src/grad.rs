//! The one entry point for a training step's gradients: [`backward`].
//!
//! It is `loss.backward()`, plus what issue #9's CUDA path needs. On a CUDA build the fused
//! residual chain (`cudnn::residual_blocks`) reads its parameters in place, outside candle's
//! graph, and hands their gradients over here as views of its own buffers. With
//! `gpu.side_grads = false` it packs its parameters with candle's `cat` every step instead
//! (about 160 copies in a ResNet-50), and candle's `cat` backward zero-fills and adds a
//! gradient per parameter, twice for the 4-D weights: several hundred launches per step. On an
//! H100 the hand-over took ResNet-50 TF32 training at batch 8 from 482 to 938 images/s
//! (BENCHMARKS.md, run 11). A fused chain that hands its gradients over refuses a backward
//! pass that does not come through [`backward`], so a forgotten call site fails loudly instead
//! of leaving the network untrained.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use std::cell::{Cell, RefCell};

thread_local! {
    /// `Some` while [`backward`] runs: the (parameter, gradient) pairs handed over so far.
    static HANDED_OVER: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
    /// Whether [`inference`] runs on this thread.
    static INFERENCE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` as inference: nothing it computes will be differentiated, so fused ops may skip
/// what only a backward pass needs. On CUDA the fused residual chain then reads its parameters
/// in place (no packing) and frees each block's buffers as soon as the next block has read
/// them, instead of keeping every block's for a backward pass: fewer launches, and the peak
/// memory of one block instead of the whole network. A backward pass through such a result
/// fails with an error. Callers detach what they keep (as `SimNet::features` does).
pub fn inference<T>(f: impl FnOnce() -> T) -> T {
    /// Restores the previous state, also when `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            INFERENCE.with(|i| i.set(self.0));
        }
    }
    let _restore = Restore(INFERENCE.with(|i| i.replace(true)));
    f()
}

/// Whether this thread runs inside [`inference`].
pub fn in_inference() -> bool {
    INFERENCE.with(|i| i.get())
}

/// The gradients of `loss` with respect to every variable it depends on.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    /// Ends the collection even when the backward pass fails.
    struct Collecting;
    impl Drop for Collecting {
        fn drop(&mut self) {
            HANDED_OVER.with(|h| h.borrow_mut().take());
        }
    }
    HANDED_OVER.with(|h| *h.borrow_mut() = Some(Vec::new()));
    let _collecting = Collecting;
    let mut grads = loss.backward()?;
    let handed = HANDED_OVER
        .with(|h| h.borrow_mut().take())
        .unwrap_or_default();
    for (param, grad) in handed {
        let total = match grads.get(&param) {
            Some(g) => (g + &grad)?,
            None => grad,
        };
        grads.insert(&param, total);
    }
    Ok(grads)
}

/// Hands the gradient of `param` over to the running [`backward`]; an error outside one.
pub fn hand_over(param: &Tensor, grad: Tensor) -> Result<()> {
    HANDED_OVER.with(|h| match h.borrow_mut().as_mut() {
        Some(list) => {
            list.push((param.clone(), grad));
            Ok(())
        }
        None => candle_core::bail!(
            "a fused op that hands its parameters' gradients over (the CUDA default; \
             gpu.side_grads = false turns it off) needs its backward pass through \
             crate::grad::backward, not Tensor::backward"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Var};

    /// Identity forward; the backward passes the gradient on and hands `Σ grad` (per element
    /// of the parameter) over for the parameter, as the fused chain does for its weights.
    struct HandsOver(Tensor);

    impl CustomOp1 for HandsOver {
        fn name(&self) -> &'static str {
            "hands-over"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            let v = s.as_slice::<f32>()?;
            let n = l.shape().elem_count();
            let out = v[l.start_offset()..l.start_offset() + n].to_vec();
            Ok((CpuStorage::F32(out), l.shape().clone()))
        }
        fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            let total = grad.sum_all()?.broadcast_as(self.0.shape())?.contiguous()?;
            hand_over(&self.0, total)?;
            Ok(Some(grad.clone()))
        }
    }

    #[test]
    fn inference_scopes_nest_and_end() {
        assert!(!in_inference());
        let inner = inference(|| {
            assert!(in_inference());
            inference(in_inference)
        });
        assert!(inner && !in_inference());
        // A panic inside still ends the scope.
        let caught = std::panic::catch_unwind(|| inference(|| panic!("inside")));
        assert!(caught.is_err() && !in_inference());
    }

    #[test]
    fn handed_over_gradients_join_the_graphs() {
        let dev = Device::Cpu;
        let a = Var::new(&[1f32, 2., 3.], &dev).unwrap();
        let p = Var::new(&[4f32, 5.], &dev).unwrap();
        let y = a
            .as_tensor()
            .apply_op1(HandsOver(p.as_tensor().clone()))
            .unwrap();
        // loss = Σ y² + Σ p: ∂/∂a = 2a through the graph; ∂/∂p = 1 through the graph plus the
        // handed-over Σ 2a = 12.
        let loss =
            (y.sqr().unwrap().sum_all().unwrap() + p.as_tensor().sum_all().unwrap()).unwrap();
        let grads = backward(&loss).unwrap();
        let got = |v: &Var| grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got(&a), [2., 4., 6.]);
        assert_eq!(got(&p), [13., 13.]);
        // Tensor::backward on its own cannot take them: the op's backward fails loudly.
        assert!(loss.backward().is_err());
        // And outside any backward pass, handing over is an error.
        assert!(hand_over(p.as_tensor(), p.as_tensor().clone()).is_err());
    }
}
