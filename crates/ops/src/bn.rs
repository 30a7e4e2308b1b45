//! Batch normalisation that trains, with the split-batch mode the reference got from two GPUs.
//!
//! candle-transformers' ResNet calls its BatchNorm in inference mode only, and candle-nn's
//! BatchNorm has no way to normalise two halves of a batch separately. The reference trained
//! SimNet with `DataParallel` on two GPUs, so each half of its batch (base images, web images)
//! was normalised with its own statistics and only the first GPU's running statistics survived.
//! [`BnMode::Split`] reproduces that on one device.
//!
//! Semantics follow PyTorch's `BatchNorm1d/2d` (eps 1e-5, momentum 0.1): in training the batch
//! mean and the *biased* batch variance normalise, and the running estimates move towards the
//! batch mean and the *unbiased* batch variance. Running statistics are variables of the
//! [`VarMap`](candle_nn::VarMap) (so they are saved with the model) but are never trained:
//! `simtrans_backbone::trainable_vars` leaves them out and the forward pass never differentiates them.

use candle_core::{bail, DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// PyTorch's default epsilon.
pub const EPS: f64 = 1e-5;
/// PyTorch's default momentum of the running statistics.
pub const MOMENTUM: f64 = 0.1;

/// Which statistics a BatchNorm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnMode {
    /// Batch statistics; the running statistics are updated.
    Train,
    /// Running statistics; nothing is updated.
    Eval,
    /// Rows `[0, n)` and `[n, B)` are normalised with their own batch statistics (the
    /// reference's two-GPU `DataParallel`); the running statistics are updated from rows
    /// `[0, n)` only. `Split(B)` is [`BnMode::Train`].
    Split(usize),
}

impl BnMode {
    /// Whether this mode uses batch statistics.
    pub fn is_training(self) -> bool {
        !matches!(self, BnMode::Eval)
    }

    /// The first range's rows in [`BnMode::Split`], else `None`.
    pub fn split(self) -> Option<usize> {
        match self {
            BnMode::Split(n) => Some(n),
            _ => None,
        }
    }
}

/// Whether evaluation-mode BatchNorm of `x` runs on our kernels: a CUDA tensor in f32 or bf16,
/// unless `gpu.own_batch_norm = false` or `gpu.cudnn = false`.
#[cfg(feature = "cuda")]
fn eval_on_kernels(x: &Tensor) -> bool {
    crate::cudnn::enabled()
        && crate::kernels::own_batch_norm()
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// A BatchNorm over the channel dimension (dimension 1) of `[B, C]` or `[B, C, H, W]` inputs,
/// with torchvision's parameter names: `weight`, `bias`, `running_mean`, `running_var`.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    channels: usize,
}

impl BatchNorm {
    /// A BatchNorm over `c` channels: weight 1, bias 0, running mean 0, running variance 1
    /// (PyTorch's initialisation), or the values already in the VarBuilder's map.
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
        // A tensor that is a VarMap variable shares its storage with the returned Var, so the
        // in-place updates below are visible in the map (and saved with it).
        Ok(BatchNorm {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            channels: c,
        })
    }

    /// Weight, bias, running mean and running variance (the running statistics are the
    /// variables themselves: a fused kernel moves them in place).
    pub fn tensors(&self) -> [&Tensor; 4] {
        [
            &self.weight,
            &self.bias,
            self.running_mean.as_tensor(),
            self.running_var.as_tensor(),
        ]
    }

    /// The number of channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The current running mean (detached copy of the variable's value).
    pub fn running_mean(&self) -> Tensor {
        self.running_mean.as_tensor().detach()
    }

    /// The current running variance (detached copy of the variable's value).
    pub fn running_var(&self) -> Tensor {
        self.running_var.as_tensor().detach()
    }

    /// The shape that broadcasts a per-channel vector against an input of `rank` dimensions.
    fn channel_shape(&self, rank: usize) -> Vec<usize> {
        let mut shape = vec![1; rank];
        shape[1] = self.channels;
        shape
    }

    /// Normalises `x` (`[B, C]` or `[B, C, H, W]`) in the given mode.
    pub fn forward(&self, x: &Tensor, mode: BnMode) -> Result<Tensor> {
        self.forward_with(x, mode, false)
    }

    /// `relu(self.forward(x, mode))`; one fused op on CUDA devices.
    pub fn forward_relu(&self, x: &Tensor, mode: BnMode) -> Result<Tensor> {
        self.forward_with(x, mode, true)
    }

    /// `relu(self.forward(x + bias, mode))` for a per-channel `bias` (the preceding Linear's,
    /// f32). In evaluation mode on CUDA the bias is folded into the running mean,
    /// `(x + b − μ)·s = (x − (μ − b))·s`, so the addition costs no pass over `x`.
    pub fn forward_relu_after_bias(
        &self,
        x: &Tensor,
        bias: &Tensor,
        mode: BnMode,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if mode == BnMode::Eval && eval_on_kernels(x) && x.rank() == 2 && x.dim(1)? == self.channels
        {
            let mean = (self.running_mean.as_tensor().detach() - bias.detach())?;
            return self.eval_kernel(x, &mean, true);
        }
        self.forward_relu(&x.broadcast_add(&bias.to_dtype(x.dtype())?)?, mode)
    }

    fn forward_with(&self, x: &Tensor, mode: BnMode, relu: bool) -> Result<Tensor> {
        let rank = x.rank();
        if !(rank == 2 || rank == 4) || x.dim(1)? != self.channels {
            bail!(
                "BatchNorm over {} channels expects [B, {0}] or [B, {0}, H, W], got {:?}",
                self.channels,
                x.dims()
            )
        }
        let batch = x.dim(0)?;
        #[cfg(feature = "cuda")]
        if mode.is_training()
            && crate::cudnn::enabled()
            && x.device().is_cuda()
            && matches!(x.dtype(), DType::F32 | DType::BF16)
        {
            // One fused cuDNN op each way, the split halves included (statistics in f32
            // whatever the activations' dtype).
            if x.elem_count() / self.channels < 2 {
                bail!(
                    "BatchNorm in training mode needs more than one value per channel, got input {:?}",
                    x.dims()
                )
            }
            return crate::cudnn::batch_norm_train(
                x,
                &self.weight,
                &self.bias,
                Some((self.running_mean.as_tensor(), self.running_var.as_tensor())),
                mode.split(),
                EPS,
                MOMENTUM,
                relu,
            );
        }
        #[cfg(feature = "cuda")]
        if mode == BnMode::Eval && eval_on_kernels(x) {
            // One pass each way on our kernels instead of candle's broadcast ops.
            return self.eval_kernel(x, self.running_mean.as_tensor(), relu);
        }
        match mode {
            BnMode::Eval if relu => self.eval(x)?.relu(),
            BnMode::Eval => self.eval(x),
            BnMode::Train => self.train(x, true, relu),
            BnMode::Split(n) if n == batch => self.train(x, true, relu),
            BnMode::Split(n) => {
                if n == 0 || n > batch {
                    bail!("BatchNorm Split({n}) needs 0 < n <= batch size {batch}")
                }
                let first = self.train(&x.narrow(0, 0, n)?, true, relu)?;
                let second = self.train(&x.narrow(0, n, batch - n)?, false, relu)?;
                Tensor::cat(&[first, second], 0)
            }
        }
    }

    /// Evaluation mode on our kernels with running mean `mean` (the running variance's).
    #[cfg(feature = "cuda")]
    fn eval_kernel(&self, x: &Tensor, mean: &Tensor, relu: bool) -> Result<Tensor> {
        crate::cudnn::batch_norm_eval(
            x,
            &self.weight,
            &self.bias,
            (mean, self.running_var.as_tensor()),
            EPS,
            relu,
        )
    }

    /// Running statistics: `y = x·s + (b − μ·s)` with `s = w / √(σ² + ε)`.
    fn eval(&self, x: &Tensor) -> Result<Tensor> {
        let shape = self.channel_shape(x.rank());
        let mean = self.running_mean.as_tensor().detach();
        let var = self.running_var.as_tensor().detach();
        let scale = (&self.weight / (var + EPS)?.sqrt()?)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        let scale = scale.reshape(shape.as_slice())?.to_dtype(x.dtype())?;
        let shift = shift.reshape(shape.as_slice())?.to_dtype(x.dtype())?;
        x.broadcast_mul(&scale)?.broadcast_add(&shift)
    }

    /// Batch statistics, differentiated as PyTorch does (the mean and the variance depend on
    /// `x`); optionally moves the running statistics. f32 on the CPU runs as one fused op each
    /// way ([`crate::bn_cpu`]); everything else as [`Self::train_composed`], its definition.
    fn train(&self, x: &Tensor, update: bool, relu: bool) -> Result<Tensor> {
        let count = x.elem_count() / self.channels;
        if count < 2 {
            bail!(
                "BatchNorm in training mode needs more than one value per channel, got input {:?}",
                x.dims()
            )
        }
        let (y, mean, var) = if crate::bn_cpu::applies(x, &self.weight) {
            let (y, stats) = crate::bn_cpu::train(x, &self.weight, &self.bias, EPS, relu)?;
            let dev = x.device();
            (
                y,
                Tensor::new(stats.mean.as_slice(), dev)?,
                Tensor::new(stats.var.as_slice(), dev)?,
            )
        } else {
            self.train_composed(x, relu)?
        };
        if update {
            self.update_running(&mean, &var, count)?;
        }
        Ok(y)
    }

    /// Moves the running estimates towards the batch mean and the unbiased batch variance
    /// (`var` is the biased one over `count` values per channel).
    fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let dtype = self.running_mean.dtype();
        let batch_mean = mean.detach().flatten_all()?.to_dtype(dtype)?;
        let unbiased =
            (var.detach().flatten_all()? * (count as f64 / (count - 1) as f64))?.to_dtype(dtype)?;
        let rm = ((self.running_mean.as_tensor().detach() * (1.0 - MOMENTUM))?
            + (batch_mean * MOMENTUM)?)?;
        let rv =
            ((self.running_var.as_tensor().detach() * (1.0 - MOMENTUM))? + (unbiased * MOMENTUM)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)
    }

    /// The definition of training-mode BatchNorm in candle ops: the output, and the batch
    /// mean and biased variance per channel.
    ///
    /// The work happens on a `[C, N]` copy of the input (N = values per channel): reducing and
    /// broadcasting along the last dimension is an order of magnitude faster in candle, forward
    /// and backward, than reducing over dimensions (0, 2, 3) at once.
    fn train_composed(&self, x: &Tensor, relu: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let dims = x.dims().to_vec();
        let c = self.channels;
        let count = x.elem_count() / c;
        // Statistics in f32 at least, whatever the activations' dtype.
        let xs = if x.dtype() == DType::F64 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let flat = xs.transpose(0, 1)?.contiguous()?.reshape((c, count))?;
        let mean = flat.mean_keepdim(1)?;
        let centred = flat.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(1)?;
        let w = self.weight.to_dtype(xs.dtype())?.reshape((c, 1))?;
        let b = self.bias.to_dtype(xs.dtype())?.reshape((c, 1))?;
        let scale = w.broadcast_div(&(&var + EPS)?.sqrt()?)?;
        let y = centred.broadcast_mul(&scale)?.broadcast_add(&b)?;
        let mut swapped = dims.clone();
        swapped.swap(0, 1);
        let y = y.reshape(swapped)?.transpose(0, 1)?.contiguous()?;
        let y = y.to_dtype(x.dtype())?;
        let y = if relu { y.relu()? } else { y };
        Ok((y, mean, var))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn bn(c: usize) -> (BatchNorm, VarMap) {
        let vm = VarMap::new();
        let vb = simtrans_core::seed::var_builder(&vm, 0, "bn", DType::F32, &Device::Cpu);
        (BatchNorm::new(c, vb).unwrap(), vm)
    }

    #[test]
    fn running_stats_live_in_the_varmap_and_move_with_momentum() {
        let (bn, vm) = bn(2);
        // Channel 0 values 1,3 (mean 2, biased var 1, unbiased 2); channel 1 values 0,0.
        let x = Tensor::new(&[[1f32, 0.], [3., 0.]], &Device::Cpu).unwrap();
        let y = bn
            .forward(&x, BnMode::Train)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(
            (y[0][0] + 1.0).abs() < 1e-4 && (y[1][0] - 1.0).abs() < 1e-4,
            "{y:?}"
        );
        assert_eq!(y[0][1], 0.0);
        let data = vm.data().lock().unwrap();
        let rm = data["running_mean"].as_tensor().to_vec1::<f32>().unwrap();
        let rv = data["running_var"].as_tensor().to_vec1::<f32>().unwrap();
        assert!((rm[0] - 0.2).abs() < 1e-6 && rm[1] == 0.0, "{rm:?}");
        assert!(
            (rv[0] - 1.1).abs() < 1e-6 && (rv[1] - 0.9).abs() < 1e-6,
            "{rv:?}"
        );
    }

    #[test]
    fn eval_leaves_running_stats_alone_and_split_of_full_batch_is_train() {
        let (a, _) = bn(3);
        let (b, _) = bn(3);
        let x = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 2, 2))
            .unwrap();
        let ya = a.forward(&x, BnMode::Train).unwrap();
        let yb = b.forward(&x, BnMode::Split(2)).unwrap();
        let d = (ya - yb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        let before = a.running_mean().to_vec1::<f32>().unwrap();
        a.forward(&x, BnMode::Eval).unwrap();
        assert_eq!(a.running_mean().to_vec1::<f32>().unwrap(), before);
        assert!(a.forward(&x, BnMode::Split(0)).is_err());
        assert!(a.forward(&x, BnMode::Split(3)).is_err());
        assert!(a
            .forward(
                &x.narrow(0, 0, 1).unwrap().flatten_from(1).unwrap(),
                BnMode::Train
            )
            .is_err());
    }

    /// The largest `|a − b| / max(|b|, 1)` over two tensors.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
            .fold(0.0, f32::max)
    }

    #[test]
    fn the_fused_cpu_op_matches_its_definition_values_and_gradients() {
        use candle_core::Var;
        let dev = Device::Cpu;
        for (shape, relu) in [
            (vec![4usize, 3, 5, 5], true),
            (vec![4, 3, 5, 5], false),
            (vec![6, 8], true),
            (vec![7, 2, 3, 1], false),
            (vec![3, 2, 17, 19], true),
        ] {
            let c = shape[1];
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 1., shape.as_slice(), &dev)
                    .unwrap()
                    .affine(3.0, 0.5)
                    .unwrap(),
            )
            .unwrap();
            let (fused, fused_vm) = bn(c);
            let (plain, plain_vm) = bn(c);
            // Non-trivial affine parameters, the same in both.
            for vm in [&fused_vm, &plain_vm] {
                let data = vm.data().lock().unwrap();
                data["weight"]
                    .set(&Tensor::arange(1f32, 1. + c as f32, &dev).unwrap())
                    .unwrap();
                data["bias"]
                    .set(&(Tensor::arange(0f32, c as f32, &dev).unwrap() * -0.3).unwrap())
                    .unwrap();
            }
            let probe = Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap();
            let y_fused = fused.train(x.as_tensor(), true, relu).unwrap();
            let (y_plain, mean, var) = plain.train_composed(x.as_tensor(), relu).unwrap();
            let count = x.elem_count() / c;
            plain.update_running(&mean, &var, count).unwrap();
            assert!(
                rel_diff(&y_fused, &y_plain) < 1e-5,
                "{shape:?} relu {relu}: values"
            );
            assert!(rel_diff(&fused.running_mean(), &plain.running_mean()) < 1e-5);
            assert!(rel_diff(&fused.running_var(), &plain.running_var()) < 1e-5);
            // Gradients of a random projection of the output, for x, weight and bias.
            let g_fused = (y_fused * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g_plain = (y_plain * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, t) in [
                ("x", x.as_tensor()),
                ("weight", &fused.weight),
                ("bias", &fused.bias),
            ] {
                let other = match name {
                    "x" => x.as_tensor(),
                    "weight" => &plain.weight,
                    _ => &plain.bias,
                };
                let (a, b) = (g_fused.get(t).unwrap(), g_plain.get(other).unwrap());
                assert!(
                    rel_diff(a, b) < 1e-5,
                    "{shape:?} relu {relu}: gradient of {name} differs by {}",
                    rel_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn split_mode_takes_the_fused_path_on_each_half() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1., (6, 2, 3, 3), &dev).unwrap() * 2.0).unwrap();
        let (split, _) = bn(2);
        let (halves, _) = bn(2);
        let y = split.forward_relu(&x, BnMode::Split(4)).unwrap();
        let a = halves
            .train(&x.narrow(0, 0, 4).unwrap(), true, true)
            .unwrap();
        let b = halves
            .train(&x.narrow(0, 4, 2).unwrap(), false, true)
            .unwrap();
        let want = Tensor::cat(&[a, b], 0).unwrap();
        assert_eq!(rel_diff(&y, &want), 0.0);
        assert_eq!(
            split.running_mean().to_vec1::<f32>().unwrap(),
            halves.running_mean().to_vec1::<f32>().unwrap()
        );
    }
}
