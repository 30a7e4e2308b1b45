//! A BatchNorm with per-domain statistics, for `[N, C]` inputs, used by the head until the
//! backbone crate's `BatchNorm` (the shared implementation, see docs/CONTRACTS.md) is available.
//!
//! Semantics are PyTorch's `BatchNorm1d`: training mode normalises with the biased batch
//! variance and updates the running statistics with momentum 0.1 and the unbiased variance;
//! eval mode uses the running statistics. `Split(n)` normalises rows `[0, n)` and `[n, N)`
//! with their own statistics and updates the running statistics from rows `[0, n)` only.

use candle_core::{Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// How a BatchNorm computes its statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnMode {
    /// Batch statistics over all rows; running statistics updated.
    Train,
    /// Running statistics.
    Eval,
    /// Rows `[0, n)` and `[n, N)` use their own batch statistics; running statistics from `[0, n)`.
    Split(usize),
}

/// BatchNorm over the channel dimension of `[N, C]`.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm {
    /// Parameters `weight`, `bias`, `running_mean`, `running_var` (PyTorch names).
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
        Ok(BatchNorm {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
        })
    }

    fn affine(&self, normed: &Tensor) -> Result<Tensor> {
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }

    /// Normalises with this part's own statistics and optionally updates the running ones.
    fn batch(&self, x: &Tensor, update: bool) -> Result<Tensor> {
        let n = x.dim(0)?;
        if n < 2 {
            candle_core::bail!("BatchNorm in training mode needs at least 2 rows, got {n}");
        }
        let mean = x.mean_keepdim(0)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(0)?;
        if update {
            let mean_d = mean.detach().squeeze(0)?;
            let unbiased = (var.detach().squeeze(0)? * (n as f64 / (n as f64 - 1.0)))?;
            let rm = ((self.running_mean.as_tensor() * (1.0 - MOMENTUM))? + (mean_d * MOMENTUM)?)?;
            let rv = ((self.running_var.as_tensor() * (1.0 - MOMENTUM))? + (unbiased * MOMENTUM)?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
        }
        self.affine(&centred.broadcast_div(&(var + EPS)?.sqrt()?)?)
    }

    /// `[N, C]` → `[N, C]`.
    pub fn forward(&self, x: &Tensor, mode: BnMode) -> Result<Tensor> {
        match mode {
            BnMode::Eval => {
                let denom = (self.running_var.as_tensor() + EPS)?.sqrt()?;
                let normed = x
                    .broadcast_sub(self.running_mean.as_tensor())?
                    .broadcast_div(&denom)?;
                self.affine(&normed)
            }
            BnMode::Train => self.batch(x, true),
            BnMode::Split(n) => {
                let total = x.dim(0)?;
                if n == 0 || n >= total {
                    candle_core::bail!(
                        "BatchNorm split at {n} of {total} rows leaves a part empty"
                    );
                }
                let first = self.batch(&x.narrow(0, 0, n)?, true)?;
                let second = self.batch(&x.narrow(0, n, total - n)?, false)?;
                Tensor::cat(&[&first, &second], 0)
            }
        }
    }
}
