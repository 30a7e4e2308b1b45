//! The ResNet family with trainable BatchNorm and torchvision's parameter names.
//!
//! ResNet-18/34 (basic blocks) and ResNet-50 (bottleneck blocks, stride on the 3×3 convolution
//! as in torchvision's "V1.5") have torchvision's layout exactly, so a torchvision or timm state
//! dict (`conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`,
//! `fc.weight`) loads without renaming. The `small` variant is ours, for the 28-px images of the
//! CPU demo: a 3×3 stride-1 stem without max-pool, then one basic block per stage with widths
//! `w·(1, 2, 4, 8)` and strides (1, 2, 2, 2), so a 28-px image ends as a 4×4 map of `8w`
//! channels. One block per stage keeps a demo epoch to seconds on two cores; deeper variants
//! did not change what the demo measures.
//!
//! Initialisation follows torchvision: convolutions Kaiming-normal (fan-out, ReLU gain),
//! BatchNorm weight 1 and bias 0, and the classifier PyTorch's `Linear` default
//! (uniform in ±1/√fan-in for weight and bias). Draws come from the VarBuilder, which in this
//! project is [`simtrans_core::seed::var_builder`] (candle's CPU generator cannot be seeded).

use candle_core::{bail, DType, Result, Tensor};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::{Init, Module, VarBuilder};
pub use simtrans_core::config::Arch;
use simtrans_ops::bn::{BatchNorm, BnMode};

/// torchvision's convolution initialisation.
const CONV_INIT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: candle_nn::init::NonLinearity::ReLU,
};

/// The lower-case name of an architecture (as in the config and artifact metadata).
pub fn arch_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Resnet18 => "resnet18",
        Arch::Resnet34 => "resnet34",
        Arch::Resnet50 => "resnet50",
        Arch::Small => "small",
    }
}

/// Parses [`arch_name`]'s output.
pub fn parse_arch(name: &str) -> Option<Arch> {
    [Arch::Resnet18, Arch::Resnet34, Arch::Resnet50, Arch::Small]
        .into_iter()
        .find(|a| arch_name(*a) == name)
}

/// A bias-free convolution.
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", CONV_INIT)?;
        Ok(Conv {
            weight,
            stride,
            padding,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        simtrans_ops::conv::conv2d(x, &self.weight, self.padding, self.stride)
    }
}

/// A fully connected layer initialised as PyTorch's `nn.Linear`.
pub fn linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<candle_nn::Linear> {
    let bound = 1.0 / (cin as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.get_with_hints((cout, cin), "weight", init)?;
    let bias = vb.get_with_hints(cout, "bias", init)?;
    Ok(candle_nn::Linear::new(weight, Some(bias)))
}

/// The 1×1 convolution + BatchNorm shortcut of a block that changes shape.
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv,
    bn: BatchNorm,
}

impl Downsample {
    fn maybe(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Option<Self>> {
        if stride == 1 && cin == cout {
            return Ok(None);
        }
        let vb = vb.pp("downsample");
        Ok(Some(Downsample {
            conv: Conv::new(cin, cout, 1, stride, 0, vb.pp("0"))?,
            bn: BatchNorm::new(cout, vb.pp("1"))?,
        }))
    }

    fn forward(this: &Option<Self>, x: &Tensor, mode: BnMode) -> Result<Tensor> {
        match this {
            None => Ok(x.clone()),
            Some(d) => d.bn.forward(&d.conv.forward(x)?, mode),
        }
    }
}

/// A residual block, `relu(main(x) + shortcut(x))`: the main path is a chain of convolution +
/// BatchNorm layers with a ReLU after every one but the last (two 3×3 layers in a basic
/// block, 1×1, 3×3, 1×1 in a bottleneck), the shortcut the identity or a [`Downsample`].
#[derive(Debug, Clone)]
struct Block {
    main: Vec<(Conv, BatchNorm)>,
    down: Option<Downsample>,
}

impl Block {
    fn basic(cin: usize, planes: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Block {
            main: vec![
                (
                    Conv::new(cin, planes, 3, stride, 1, vb.pp("conv1"))?,
                    BatchNorm::new(planes, vb.pp("bn1"))?,
                ),
                (
                    Conv::new(planes, planes, 3, 1, 1, vb.pp("conv2"))?,
                    BatchNorm::new(planes, vb.pp("bn2"))?,
                ),
            ],
            down: Downsample::maybe(cin, planes, stride, vb)?,
        })
    }

    fn bottleneck(cin: usize, planes: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let out = planes * 4;
        Ok(Block {
            main: vec![
                (
                    Conv::new(cin, planes, 1, 1, 0, vb.pp("conv1"))?,
                    BatchNorm::new(planes, vb.pp("bn1"))?,
                ),
                (
                    Conv::new(planes, planes, 3, stride, 1, vb.pp("conv2"))?,
                    BatchNorm::new(planes, vb.pp("bn2"))?,
                ),
                (
                    Conv::new(planes, out, 1, 1, 0, vb.pp("conv3"))?,
                    BatchNorm::new(out, vb.pp("bn3"))?,
                ),
            ],
            down: Downsample::maybe(cin, out, stride, vb)?,
        })
    }

    /// Whether main-path layer `i` is followed by a ReLU (all but the last).
    fn relu_after(&self, i: usize) -> bool {
        i + 1 < self.main.len()
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Result<Tensor> {
        let mut y = x.clone();
        for (i, (conv, bn)) in self.main.iter().enumerate() {
            let z = conv.forward(&y)?;
            y = if self.relu_after(i) {
                bn.forward_relu(&z, mode)?
            } else {
                bn.forward(&z, mode)?
            };
        }
        add_relu(&y, &Downsample::forward(&self.down, x, mode)?)
    }
}

/// The trunk on a CUDA device with fused ops: the stem as its own ops, then all residual
/// blocks as one op ([`simtrans_ops::cudnn::residual_blocks`]), or one op per block with
/// `SIMTRANS_FUSED_CHAIN=0`. `None` where the layer-by-layer path applies (no CUDA,
/// `SIMTRANS_CUDNN=0` or `SIMTRANS_FUSED_BLOCKS=0`, evaluation mode without our BatchNorm
/// kernels, or a BatchNorm with fewer than two values per channel, which the layer-by-layer
/// path reports).
#[cfg(feature = "cuda")]
fn fused_trunk(net: &ResNet, x: &Tensor, mode: BnMode) -> Result<Option<Tensor>> {
    use simtrans_ops::cudnn::{self, BlockUnit, BlockUnits, Norm};
    let norm = match mode {
        // Evaluation mode needs our BatchNorm kernels (cuDNN's has no backward there).
        BnMode::Eval if !simtrans_ops::kernels::own_batch_norm() => return Ok(None),
        BnMode::Eval => Norm::Running,
        _ => Norm::Batch(mode.split()),
    };
    if !(cudnn::enabled()
        && cudnn::fused_blocks()
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16))
    {
        return Ok(None);
    }
    fn unit<'a>(c: &'a Conv, bn: &'a BatchNorm, relu: bool) -> BlockUnit<'a> {
        BlockUnit {
            weight: &c.weight,
            stride: c.stride,
            padding: c.padding,
            bn: bn.tensors(),
            relu,
        }
    }
    let (b, _, h, w) = x.dims4()?;
    let rows = match mode.split() {
        Some(n) if n < b => n.min(b - n),
        _ => b,
    };
    // Every BatchNorm needs two values per channel in each half.
    let enough = |h: usize, w: usize| !mode.is_training() || rows * h * w >= 2;
    let side =
        |s: usize, c: &Conv| (s + 2 * c.padding - c.weight.dim(2).unwrap_or(1)) / c.stride + 1;
    let (mut h, mut w) = (side(h, &net.conv1), side(w, &net.conv1));
    if !enough(h, w) {
        return Ok(None);
    }
    if net.max_pool {
        use simtrans_ops::launch::pool_out;
        (h, w) = (pool_out(h), pool_out(w));
    }
    let mut units = Vec::new();
    for block in net.layers.iter().flatten() {
        let main: Vec<BlockUnit> = block
            .main
            .iter()
            .enumerate()
            .map(|(i, (conv, bn))| unit(conv, bn, block.relu_after(i)))
            .collect();
        let stride = main.iter().map(|u| u.stride).max().unwrap_or(1);
        (h, w) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        if !enough(h, w) {
            return Ok(None);
        }
        let shortcut = block.down.as_ref().map(|d| unit(&d.conv, &d.bn, false));
        units.push(BlockUnits { main, shortcut });
    }
    let (eps, momentum) = (simtrans_ops::bn::EPS, simtrans_ops::bn::MOMENTUM);
    let per_op = if cudnn::fused_chain() { units.len() } else { 1 };
    let mut y = net.stem(x, mode)?;
    for u in units.chunks(per_op.max(1)) {
        y = cudnn::residual_blocks(&y, u, norm, eps, momentum)?;
    }
    Ok(Some(y))
}

/// Max-pooling with a 3×3 window, stride 2 and padding 1 (the ResNet stem), written as the
/// maximum of shifted strided selections of the input padded with −∞, because candle's
/// `max_pool2d` has no backward pass for a kernel that differs from its stride. The forward
/// pass is exact. Where several inputs of a window tie for the maximum, candle's `maximum`
/// shares the gradient between them, whereas PyTorch gives it to one; after a ReLU the only
/// common ties are zeros, whose gradient the ReLU discards anyway. On CUDA devices our kernel
/// (`simtrans_ops::cudnn::max_pool_3x3_s2_p1`) runs instead and, like PyTorch, gives the
/// gradient to the first of the tied inputs.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if simtrans_ops::cudnn::enabled()
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
    {
        return simtrans_ops::cudnn::max_pool_3x3_s2_p1(x);
    }
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let dev = x.device();
    let pad_h = Tensor::full(f32::NEG_INFINITY, (b, c, 1, w), dev)?.to_dtype(x.dtype())?;
    let x = Tensor::cat(&[&pad_h, x, &pad_h], 2)?;
    let pad_w = Tensor::full(f32::NEG_INFINITY, (b, c, h + 2, 1), dev)?.to_dtype(x.dtype())?;
    let x = Tensor::cat(&[&pad_w, &x, &pad_w], 3)?;
    // The window of output r covers padded rows 2r, 2r+1, 2r+2; max over rows, then columns.
    let pick = |t: &Tensor, dim: usize, n: usize, k: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n).map(|r| (2 * r + k) as u32).collect();
        t.index_select(&Tensor::new(idx.as_slice(), dev)?, dim)
    };
    let rows = pick(&x, 2, ho, 0)?
        .maximum(&pick(&x, 2, ho, 1)?)?
        .maximum(&pick(&x, 2, ho, 2)?)?;
    pick(&rows, 3, wo, 0)?
        .maximum(&pick(&rows, 3, wo, 1)?)?
        .maximum(&pick(&rows, 3, wo, 2)?)
}

/// `relu(a + b)`, a residual block's tail: one fused op on CUDA devices.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if simtrans_ops::cudnn::enabled() && a.device().is_cuda() {
        return simtrans_ops::cudnn::add_relu(a, b);
    }
    (a + b)?.relu()
}

/// A ResNet trunk with an optional classifier `fc`.
#[derive(Debug, Clone)]
pub struct ResNet {
    arch: Arch,
    conv1: Conv,
    bn1: BatchNorm,
    max_pool: bool,
    layers: Vec<Vec<Block>>,
    fc: Option<candle_nn::Linear>,
    feature_dim: usize,
    num_classes: Option<usize>,
}

impl ResNet {
    /// Builds (or, from a VarBuilder over existing variables, rebuilds) a network.
    /// `small_width` is the first-stage width of [`Arch::Small`] and ignored otherwise;
    /// `num_classes` adds the classifier `fc`.
    pub fn new(
        arch: Arch,
        small_width: usize,
        num_classes: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (stem, max_pool, widths, blocks, bottleneck): (
            Conv,
            bool,
            [usize; 4],
            [usize; 4],
            bool,
        ) = match arch {
            Arch::Small => {
                if small_width == 0 {
                    bail!("the small ResNet needs small_width > 0")
                }
                let w = small_width;
                (
                    Conv::new(3, w, 3, 1, 1, vb.pp("conv1"))?,
                    false,
                    [w, 2 * w, 4 * w, 8 * w],
                    [1, 1, 1, 1],
                    false,
                )
            }
            Arch::Resnet18 => (
                Conv::new(3, 64, 7, 2, 3, vb.pp("conv1"))?,
                true,
                [64, 128, 256, 512],
                [2, 2, 2, 2],
                false,
            ),
            Arch::Resnet34 => (
                Conv::new(3, 64, 7, 2, 3, vb.pp("conv1"))?,
                true,
                [64, 128, 256, 512],
                [3, 4, 6, 3],
                false,
            ),
            Arch::Resnet50 => (
                Conv::new(3, 64, 7, 2, 3, vb.pp("conv1"))?,
                true,
                [64, 128, 256, 512],
                [3, 4, 6, 3],
                true,
            ),
        };
        let stem_width = stem.weight.dim(0)?;
        let bn1 = BatchNorm::new(stem_width, vb.pp("bn1"))?;
        let mut cin = stem_width;
        let mut layers = Vec::with_capacity(4);
        for (i, (&planes, &n)) in widths.iter().zip(&blocks).enumerate() {
            let vbl = vb.pp(format!("layer{}", i + 1));
            let mut layer = Vec::with_capacity(n);
            for j in 0..n {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                let block = if bottleneck {
                    Block::bottleneck(cin, planes, stride, vbl.pp(j.to_string()))?
                } else {
                    Block::basic(cin, planes, stride, vbl.pp(j.to_string()))?
                };
                cin = if bottleneck { planes * 4 } else { planes };
                layer.push(block);
            }
            layers.push(layer);
        }
        let fc = match num_classes {
            Some(n) => Some(linear(cin, n, vb.pp("fc"))?),
            None => None,
        };
        Ok(ResNet {
            arch,
            conv1: stem,
            bn1,
            max_pool,
            layers,
            fc,
            feature_dim: cin,
            num_classes,
        })
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The size of the pooled feature (512 for ResNet-18/34, 2048 for ResNet-50, `8w` for small).
    pub fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    /// The classifier's output size, if it has one.
    pub fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }

    /// The stem: convolution, BatchNorm + ReLU, then max-pooling (unless `Small`).
    fn stem(&self, x: &Tensor, mode: BnMode) -> Result<Tensor> {
        let y = self.bn1.forward_relu(&self.conv1.forward(x)?, mode)?;
        match self.max_pool {
            true => max_pool_3x3_s2_p1(&y),
            false => Ok(y),
        }
    }

    /// Pooled features `[B, D]` of images `[B, 3, H, W]`.
    ///
    /// With `run.precision = "bf16"` on a CUDA device the trunk computes in bf16 (weights are
    /// cast per convolution, BatchNorm keeps f32 statistics) and the features come back in f32.
    pub fn features(&self, x: &Tensor, mode: BnMode) -> Result<Tensor> {
        let low = x.device().is_cuda()
            && simtrans_core::device::precision() == simtrans_core::device::Precision::Bf16;
        let x = if low {
            x.to_dtype(DType::BF16)?
        } else {
            x.clone()
        };
        #[cfg(feature = "cuda")]
        let fused = fused_trunk(self, &x, mode)?;
        #[cfg(not(feature = "cuda"))]
        let fused = None;
        let y = match fused {
            Some(y) => y,
            None => {
                let mut y = self.stem(&x, mode)?;
                for block in self.layers.iter().flatten() {
                    y = block.forward(&y, mode)?;
                }
                y
            }
        };
        // f32 features whatever the trunk's dtype.
        simtrans_ops::headops::global_avg_pool(&y)
    }

    /// `(logits [B, classes], features [B, D])`; an error for a network built without `fc`.
    pub fn forward(&self, x: &Tensor, mode: BnMode) -> Result<(Tensor, Tensor)> {
        let Some(fc) = &self.fc else {
            bail!("this ResNet was built without a classifier (num_classes = None); use features()")
        };
        let f = self.features(x, mode)?;
        Ok((fc.forward(&f)?, f))
    }

    /// The classifier applied to features computed earlier.
    pub fn classify(&self, features: &Tensor) -> Result<Tensor> {
        match &self.fc {
            Some(fc) => fc.forward(features),
            None => bail!("this ResNet was built without a classifier (num_classes = None)"),
        }
    }
}

/// The dtype every network of this project computes in.
pub const DTYPE: DType = DType::F32;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn build(arch: Arch, classes: Option<usize>) -> (ResNet, VarMap) {
        let vm = VarMap::new();
        let vb = simtrans_core::seed::var_builder(&vm, 1, "resnet", DTYPE, &Device::Cpu);
        (ResNet::new(arch, 4, classes, vb).unwrap(), vm)
    }

    fn names(vm: &VarMap) -> Vec<String> {
        let mut n: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        n.sort();
        n
    }

    #[test]
    fn torchvision_names_and_counts() {
        // Parameter counts of torchvision (weights + biases, no running statistics).
        for (arch, params, tensors) in [
            (Arch::Resnet18, 11_689_512usize, 102usize),
            (Arch::Resnet34, 21_797_672, 182),
            (Arch::Resnet50, 25_557_032, 267),
        ] {
            let (net, vm) = build(arch, Some(1000));
            let trainable = crate::trainable_vars(&vm);
            let count: usize = trainable.iter().map(|(_, v)| v.elem_count()).sum();
            assert_eq!(count, params, "{arch:?}");
            // state_dict entries without num_batches_tracked.
            assert_eq!(vm.all_vars().len(), tensors, "{arch:?}");
            let n = names(&vm);
            for want in [
                "conv1.weight",
                "bn1.running_var",
                "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.running_mean",
                "fc.bias",
            ] {
                assert!(n.iter().any(|x| x == want), "{arch:?} lacks {want}");
            }
            assert_eq!(
                net.feature_dim(),
                if arch == Arch::Resnet50 { 2048 } else { 512 }
            );
        }
    }

    #[test]
    fn small_net_shapes_and_max_pool() {
        let (net, vm) = build(Arch::Small, Some(5));
        assert!(!names(&vm)
            .iter()
            .any(|n| n.starts_with("layer1.0.downsample")));
        let x = Tensor::zeros((2, 3, 28, 28), DTYPE, &Device::Cpu).unwrap();
        let (logits, f) = net.forward(&x, BnMode::Eval).unwrap();
        assert_eq!(logits.dims(), &[2, 5]);
        assert_eq!(f.dims(), &[2, 32]);

        // Max-pool against a direct loop, odd and even sizes, negative values.
        for (h, w) in [(5usize, 6usize), (4, 7)] {
            let vals: Vec<f32> = (0..h * w).map(|i| ((i * 37 % 11) as f32) - 7.0).collect();
            let x = Tensor::from_vec(vals.clone(), (1, 1, h, w), &Device::Cpu).unwrap();
            let y = max_pool_3x3_s2_p1(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
            assert_eq!(y.len(), ho * wo);
            for r in 0..ho {
                for c in 0..wo {
                    let mut m = f32::NEG_INFINITY;
                    for dr in 0..3 {
                        for dc in 0..3 {
                            let (i, j) = ((2 * r + dr) as isize - 1, (2 * c + dc) as isize - 1);
                            if i >= 0 && j >= 0 && (i as usize) < h && (j as usize) < w {
                                m = m.max(vals[i as usize * w + j as usize]);
                            }
                        }
                    }
                    assert_eq!(y[r * wo + c], m);
                }
            }
        }
    }

    #[test]
    fn training_step_reaches_every_trainable_variable_and_no_running_stat() {
        let (net, vm) = build(Arch::Resnet18, Some(3));
        let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        let (logits, _) = net.forward(&x, BnMode::Train).unwrap();
        let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in crate::trainable_vars(&vm) {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm.is_finite() && norm > 0.0, "{name}: {norm}");
        }
        for (name, var) in vm.data().lock().unwrap().iter() {
            if crate::is_running_stat(name) {
                assert!(
                    grads.get(var.as_tensor()).is_none(),
                    "{name} got a gradient"
                );
            }
        }
        // Max-pool routes each output's gradient to its window's maximum.
        let v = candle_core::Var::new(
            &[[[[1f32, 5., 2.], [0., 3., 4.], [9., 1., 1.]]]],
            &Device::Cpu,
        )
        .unwrap();
        let g = max_pool_3x3_s2_p1(v.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Windows (2×2 outputs): max 5, 5, 9, 4 → position 1 twice, positions 6 and 5 once.
        assert_eq!(g, vec![0., 2., 0., 0., 0., 1., 1., 0., 0.]);
    }
}
