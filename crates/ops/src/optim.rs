//! SGD with the reference's PyTorch semantics, and the step learning-rate schedule.
//!
//! candle-nn's SGD has neither momentum nor weight decay. PyTorch's `torch.optim.SGD` with
//! momentum μ, weight decay λ, no dampening and no Nesterov does, per parameter p with gradient g:
//! `d = g + λ·p`; `buf = d` on the first step, else `buf = μ·buf + d`; `p ← p − lr·buf`.
//! The reference rebuilt its optimiser every epoch, which zeroes the buffers: [`Sgd::reset_momentum`].

use candle_core::{backprop::GradStore, Tensor, Var};
use simtrans_core::error::{CoreError, Result};
use std::collections::BTreeMap;

/// Stochastic gradient descent with momentum and coupled weight decay.
pub struct Sgd {
    vars: Vec<(String, Var)>,
    buffers: BTreeMap<String, Tensor>,
    /// Current learning rate.
    pub lr: f64,
    momentum: f64,
    weight_decay: f64,
}

impl Sgd {
    /// An optimiser over named variables (usually a VarMap's trainable entries).
    pub fn new(vars: Vec<(String, Var)>, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        Sgd {
            vars,
            buffers: BTreeMap::new(),
            lr,
            momentum,
            weight_decay,
        }
    }

    /// The variables it updates.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update from gradients; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        #[cfg(feature = "cuda")]
        let mut on_kernels = vec![];
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            #[cfg(feature = "cuda")]
            if crate::cudnn::enabled()
                && var.device().is_cuda()
                && var.dtype() == candle_core::DType::F32
                && var.as_tensor().is_contiguous()
            {
                // The same update, in place, eight variables per kernel (below).
                on_kernels.push((name, var, g));
                continue;
            }
            // Detached: the parameter is a variable, so arithmetic on it records a graph, and
            // a momentum buffer built from it would hold the previous buffer, this step's
            // gradient and temporaries, every step's in a chain until the buffers are reset
            // (about 1 GB per step of the paper's SimNet on the CPU, measured).
            let p = var.as_tensor().detach();
            let mut d = g.detach();
            if self.weight_decay != 0.0 {
                d = (d + (&p * self.weight_decay)?)?;
            }
            if self.momentum != 0.0 {
                let buf = match self.buffers.get(name) {
                    None => d,
                    Some(b) => ((b * self.momentum)? + d)?,
                };
                self.buffers.insert(name.clone(), buf.clone());
                d = buf;
            }
            var.set(&(p - (d * self.lr)?)?)?;
        }
        #[cfg(feature = "cuda")]
        if !on_kernels.is_empty() {
            let items: Vec<_> = on_kernels
                .iter()
                .map(|(name, var, g)| (var.as_tensor(), *g, self.buffers.get(*name)))
                .collect();
            let bufs =
                crate::kernels::sgd_update_many(&items, self.lr, self.momentum, self.weight_decay)?;
            for ((name, _, _), buf) in on_kernels.iter().zip(bufs) {
                if let Some(buf) = buf {
                    self.buffers.insert((*name).clone(), buf);
                }
            }
        }
        Ok(())
    }

    /// Zeroes the momentum buffers (the reference's per-epoch optimiser rebuild).
    pub fn reset_momentum(&mut self) {
        self.buffers.clear();
    }

    /// The momentum buffers, for checkpoints (`momentum.<var name>`).
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        self.buffers
            .iter()
            .map(|(k, v)| (format!("momentum.{k}"), v.clone()))
            .collect()
    }

    /// Restores buffers saved by [`Sgd::state`]; other entries of the map are ignored.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        self.buffers.clear();
        for (k, v) in state {
            if let Some(name) = k.strip_prefix("momentum.") {
                if !self.vars.iter().any(|(n, _)| n == name) {
                    return Err(CoreError::Config(format!(
                        "checkpoint has momentum for unknown variable `{name}`"
                    )));
                }
                self.buffers.insert(name.to_string(), v.clone());
            }
        }
        Ok(())
    }
}

/// `lr0 · decay^⌊epoch / step⌋`.
pub fn step_lr(lr0: f64, decay: f64, step: usize, epoch: usize) -> f64 {
    lr0 * decay.powi((epoch / step.max(1)) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn momentum_and_weight_decay_follow_pytorch() {
        // Hand-computed PyTorch SGD(lr=0.1, momentum=0.9, weight_decay=0.01) on loss = sum(p·c).
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let c = Tensor::new(&[0.5f32, 3.0], &Device::Cpu).unwrap();
        let mut opt = Sgd::new(vec![("p".into(), p.clone())], 0.1, 0.9, 0.01);
        let mut expect = [1.0f64, -2.0];
        let mut buf = [0.0f64; 2];
        let cc = [0.5f64, 3.0];
        for step in 0..3 {
            let loss = (p.as_tensor() * &c).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            for i in 0..2 {
                let d = cc[i] + 0.01 * expect[i];
                buf[i] = if step == 0 { d } else { 0.9 * buf[i] + d };
                expect[i] -= 0.1 * buf[i];
            }
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - expect[i]).abs() < 1e-6,
                "{got:?} vs {expect:?}"
            );
        }
        // The momentum buffers are plain values: no graph links one step's to the last.
        for (name, buf) in opt.state() {
            assert!(!buf.track_op(), "{name} records a graph");
        }
        opt.reset_momentum();
        assert!(opt.state().is_empty());
    }

    #[test]
    fn schedule_steps() {
        assert_eq!(step_lr(5e-3, 0.5, 25, 0), 5e-3);
        assert_eq!(step_lr(5e-3, 0.5, 25, 24), 5e-3);
        assert_eq!(step_lr(5e-3, 0.5, 25, 25), 2.5e-3);
        assert_eq!(step_lr(1e-4, 0.5, 20, 45), 2.5e-5);
    }
}
