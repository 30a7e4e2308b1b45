//! The similarity heads (types 4 and 2) and the domain discriminator, with a factorised first layer.
//!
//! The head classifies a pair of backbone features as dissimilar (logit 0) or similar (logit 1).
//! Its first layer is one `Linear(2D → H)` applied to the concatenation of the two features, the
//! parameter layout of the reference (so its checkpoints load). Because that layer is linear,
//! `W·[a ; b] + bias = W_a·a + W_b·b + bias` with `W_a`, `W_b` the column halves of `W`: the
//! per-image projections are computed once (one `[B, D]×[D, 2H]` product, with `W` viewed as
//! `[2H, D]`) and added over the pair grid ([`headops::pair_grid`]), instead of one
//! `[B², 2D]×[2D, H]` product, and the `B²` concatenations never exist. Everything after the
//! first layer is row-wise except BatchNorm, whose statistics see all rows either way, so the
//! result is exactly the reference's.
//!
//! Parameter names follow the reference modules with its `DataParallel` wrappers removed:
//!
//! | ours | reference state dict |
//! |---|---|
//! | `backbone.<torchvision name>` | `backbone.module.resnet.<torchvision name>` |
//! | `head.fc1.0.*`, `head.fc1.1.*`, `head.fc2.{0,1}.*`, `head.fc3.{0,1}.*`, `head.fc4.*` (type 4) | `similarity_head.module.` + the same |
//! | `head.fc.*`, `head.bn.*`, `head.fc2.*` (type 2) | `similarity_head.module.` + the same |
//! | `disc.fc.*`, `disc.bn.*` (LayerNorm), `disc.fc2.*` | the discriminator's `module.` + the same |
//!
//! BatchNorm `num_batches_tracked` entries of a PyTorch state dict carry no information here
//! (momentum is fixed at 0.1) and are dropped when converting ([`crate::model::from_reference`]).

use crate::SimnetError;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use simtrans_core::device::{precision, Precision};
use simtrans_ops::headops::{self, Grid};
use simtrans_ops::{BatchNorm, BnMode};

/// Which head architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// `Linear(2D→2D)→BN→ReLU→Linear(2D→D)→BN→ReLU` (= diff_feat) `→Linear(D→D)→BN→ReLU→Linear(D→2)`.
    Type4,
    /// `Linear(2D→4D)→BN→ReLU` (= diff_feat) `→Linear(4D→2)`.
    Type2,
}

impl HeadKind {
    /// The config's `simnet.head` number.
    pub fn from_config(head: u8) -> std::result::Result<Self, SimnetError> {
        match head {
            4 => Ok(HeadKind::Type4),
            2 => Ok(HeadKind::Type2),
            other => Err(SimnetError::Config(format!(
                "simnet.head = {other} is not a head type; use 4 (the reference script's) or 2"
            ))),
        }
    }

    /// The number used in the config and the artifact metadata.
    pub fn number(self) -> u8 {
        match self {
            HeadKind::Type4 => 4,
            HeadKind::Type2 => 2,
        }
    }

    /// Width of `diff_feat` (the discriminator's input) for feature dimension `d`.
    pub fn diff_dim(self, d: usize) -> usize {
        match self {
            HeadKind::Type4 => d,
            HeadKind::Type2 => 4 * d,
        }
    }

    /// Width of the first layer's output for feature dimension `d`.
    pub fn first_width(self, d: usize) -> usize {
        match self {
            HeadKind::Type4 => 2 * d,
            HeadKind::Type2 => 4 * d,
        }
    }
}

/// Which image of a grid pair fills the first half of the concatenation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairOrder {
    /// Grid row `r·C + c` is `[rows_r ; cols_c]`: the similarity matrix `S[i,j] = sim([f_i ; f_j])`.
    RowFirst,
    /// Grid row `r·C + c` is `[cols_c ; rows_r]`: the reference's pair enumeration (row `i·B + j` is `[f_j ; f_i]`).
    ColFirst,
}

/// A `Linear` layer with PyTorch's default initialisation (weight and bias uniform in ±1/√in).
pub fn linear(input: usize, output: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (input as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.get_with_hints((output, input), "weight", init)?;
    let bias = vb.get_with_hints(output, "bias", init)?;
    Ok(Linear::new(weight, Some(bias)))
}

/// The dtype the head (and the discriminator's Linears) compute in on `device`: bf16 on CUDA
/// under `run.precision = "bf16"`, as PyTorch's autocast runs `Linear` layers, else f32. The
/// parameters stay f32 (their gradients come back through the casts), BatchNorm keeps f32
/// statistics, the logits leave the head in f32 and diff_feat in this dtype.
///
/// Why: type 4's head runs `Linear(2D→2D)` and `Linear(2D→D)` on every pair. For the 300-image
/// similarity matrix of step 2 that is 90,000 rows and about 2.3 TFLOP. On its own it bought
/// nothing measurable (run 13: the ops around the products bound the head); with the head's
/// kernels (`simtrans_ops::headops`) the bf16 similarity matrix took 8.9 ms (run 15).
/// `gpu.head_bf16 = false` keeps the head and the discriminator in f32 under bf16, to measure
/// the difference.
pub fn compute_dtype(device: &Device) -> DType {
    if simtrans_ops::gpu::settings().head_bf16 && device.is_cuda() && precision() == Precision::Bf16
    {
        DType::BF16
    } else {
        DType::F32
    }
}

/// `lin` applied to `x` (`[N, in]`) in `dtype` (input, weight and bias cast to it): candle-nn's
/// `Linear` with its weight through [`headops::transposed`] and its bias through
/// [`headops::add_bias`] (one pass each on CUDA).
fn linear_in(lin: &Linear, x: &Tensor, dtype: DType) -> Result<Tensor> {
    let (out, input) = lin.weight().dims2()?;
    let y = x
        .to_dtype(dtype)?
        .matmul(&headops::transposed(lin.weight(), (out, input), dtype)?)?;
    match lin.bias() {
        Some(b) => headops::add_bias(&y, b),
        None => Ok(y),
    }
}

/// A Linear followed by BatchNorm (one `nn.Sequential(Linear, BN, ReLU)` block of the reference).
#[derive(Debug, Clone)]
struct Block {
    fc: Linear,
    bn: BatchNorm,
}

impl Block {
    fn new(input: usize, output: usize, fc: VarBuilder, bn: VarBuilder) -> Result<Self> {
        Ok(Block {
            fc: linear(input, output, fc)?,
            bn: BatchNorm::new(output, bn)?,
        })
    }

    /// `relu(bn(fc(x)))` with the Linear in `dtype`; BatchNorm and ReLU one fused op on CUDA.
    /// In evaluation mode the Linear's bias goes to the BatchNorm
    /// ([`BatchNorm::forward_relu_after_bias`]), which folds it into its running mean on CUDA.
    fn forward(&self, x: &Tensor, mode: BnMode, dtype: DType) -> Result<Tensor> {
        match (mode, self.fc.bias()) {
            (BnMode::Eval, Some(bias)) => {
                let unbiased = Linear::new(self.fc.weight().clone(), None);
                self.bn
                    .forward_relu_after_bias(&linear_in(&unbiased, x, dtype)?, bias, mode)
            }
            _ => self.bn.forward_relu(&linear_in(&self.fc, x, dtype)?, mode),
        }
    }
}

/// A similarity head of type 4 or 2.
#[derive(Debug, Clone)]
pub struct SimHead {
    kind: HeadKind,
    dim: usize,
    /// The first Linear (weight `[H, 2D]`) and its BatchNorm.
    first: Block,
    /// Type 4 only: the block producing diff_feat (`fc2`) and the one after it (`fc3`).
    middle: Option<(Block, Block)>,
    /// The final Linear to 2 logits.
    out: Linear,
}

impl SimHead {
    /// A head for features of dimension `dim`; `vb` is the head's prefix (`head`).
    pub fn new(kind: HeadKind, dim: usize, vb: VarBuilder) -> Result<Self> {
        let h = kind.first_width(dim);
        match kind {
            HeadKind::Type4 => Ok(SimHead {
                kind,
                dim,
                first: Block::new(2 * dim, h, vb.pp("fc1.0"), vb.pp("fc1.1"))?,
                middle: Some((
                    Block::new(h, dim, vb.pp("fc2.0"), vb.pp("fc2.1"))?,
                    Block::new(dim, dim, vb.pp("fc3.0"), vb.pp("fc3.1"))?,
                )),
                out: linear(dim, 2, vb.pp("fc4"))?,
            }),
            HeadKind::Type2 => Ok(SimHead {
                kind,
                dim,
                first: Block::new(2 * dim, h, vb.pp("fc"), vb.pp("bn"))?,
                middle: None,
                out: linear(h, 2, vb.pp("fc2"))?,
            }),
        }
    }

    /// The head type.
    pub fn kind(&self) -> HeadKind {
        self.kind
    }

    /// The feature dimension D (pairs are 2D wide).
    pub fn feature_dim(&self) -> usize {
        self.dim
    }

    /// Width of diff_feat.
    pub fn diff_dim(&self) -> usize {
        self.kind.diff_dim(self.dim)
    }

    /// The first Linear on literal `[N, 2D]` concatenations (the reference form), before
    /// BatchNorm, in the head's [`compute_dtype`].
    pub fn first_layer_concat(&self, pairs: &Tensor) -> Result<Tensor> {
        linear_in(&self.first.fc, pairs, compute_dtype(pairs.device()))
    }

    /// The first Linear on every pair of a `rows × cols` grid, factorised: `[R, D]`, `[C, D]` →
    /// `[R·C, H]`, grid row `r·C + c`, concatenation order given by `order`; in the head's
    /// [`compute_dtype`].
    pub fn first_layer_grid(
        &self,
        rows: &Tensor,
        cols: &Tensor,
        order: PairOrder,
    ) -> Result<Tensor> {
        self.first_layer_grid_in(rows, cols, order, compute_dtype(rows.device()))
    }

    /// [`Self::first_layer_grid`] in `dtype` (what the rest of the head then computes in).
    pub fn first_layer_grid_in(
        &self,
        rows: &Tensor,
        cols: &Tensor,
        order: PairOrder,
        dtype: DType,
    ) -> Result<Tensor> {
        let (r, d) = rows.dims2()?;
        let d2 = cols.dim(1)?;
        if d != self.dim || d2 != self.dim {
            candle_core::bail!(
                "similarity head expects {}-d features, got rows of {d} and columns of {d2}",
                self.dim
            );
        }
        let grid = Grid {
            rows: (0, r),
            cols: (r, cols.dim(0)?),
        };
        self.first_layer_grids(&Tensor::cat(&[rows, cols], 0)?, &[grid], order, dtype)
    }

    /// The first Linear on grids of pairs among the images of `features` (`[N, D]`): the
    /// grids' `[rows·cols, H]` outputs, concatenated, in `dtype`; a grid's row image fills the
    /// half of the concatenation that `order` gives it.
    pub fn first_layer_grids(
        &self,
        features: &Tensor,
        grids: &[Grid],
        order: PairOrder,
        dtype: DType,
    ) -> Result<Tensor> {
        let (n, d) = features.dims2()?;
        if d != self.dim {
            candle_core::bail!(
                "similarity head expects {}-d features, got {n} of {d}",
                self.dim
            );
        }
        let w = self.first.fc.weight();
        let h = w.dim(0)?;
        // q[i, 2k + s] = half s of unit k's weights · f_i: W [H, 2D] read as [2H, D].
        let q = features
            .to_dtype(dtype)?
            .matmul(&headops::transposed(w, (2 * h, d), dtype)?)?;
        let slots = match order {
            PairOrder::RowFirst => (0, 1),
            PairOrder::ColFirst => (1, 0),
        };
        let bias = match self.first.fc.bias() {
            Some(b) => b.clone(),
            None => Tensor::zeros(h, DType::F32, features.device())?,
        };
        headops::pair_grid(&q, &bias, grids, slots)
    }

    /// The rest of the head from the first Linear's output: `(logits [N, 2], diff_feat [N,
    /// diff_dim])`, the logits in f32 and diff_feat in the dtype of `h`, which its Linears
    /// compute in (as under PyTorch's autocast, where diff_feat leaves a bf16 BatchNorm).
    pub fn from_first_layer(&self, h: &Tensor, mode: BnMode) -> Result<(Tensor, Tensor)> {
        let dtype = h.dtype();
        let x = self.first.bn.forward_relu(h, mode)?;
        let (logits, diff) = match &self.middle {
            Some((fc2, fc3)) => {
                let diff = fc2.forward(&x, mode, dtype)?;
                let last = fc3.forward(&diff, mode, dtype)?;
                (linear_in(&self.out, &last, dtype)?, diff)
            }
            None => (linear_in(&self.out, &x, dtype)?, x),
        };
        Ok((logits.to_dtype(DType::F32)?, diff))
    }

    /// The reference forward on literal `[N, 2D]` pairs.
    pub fn forward_concat(&self, pairs: &Tensor, mode: BnMode) -> Result<(Tensor, Tensor)> {
        self.from_first_layer(&self.first_layer_concat(pairs)?, mode)
    }

    /// The forward on every pair of a grid (factorised first layer).
    pub fn forward_grid(
        &self,
        rows: &Tensor,
        cols: &Tensor,
        order: PairOrder,
        mode: BnMode,
    ) -> Result<(Tensor, Tensor)> {
        self.from_first_layer(&self.first_layer_grid(rows, cols, order)?, mode)
    }
}

/// The domain discriminator on diff_feat: `Linear → LayerNorm → ReLU → Linear(→2)`.
#[derive(Debug, Clone)]
pub struct Discriminator {
    fc: Linear,
    ln_weight: Tensor,
    ln_bias: Tensor,
    fc2: Linear,
}

impl Discriminator {
    /// A discriminator for `dim`-wide diff_feat; `vb` is its prefix (`disc`).
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Discriminator {
            fc: linear(dim, dim, vb.pp("fc"))?,
            ln_weight: vb
                .pp("bn")
                .get_with_hints(dim, "weight", Init::Const(1.0))?,
            ln_bias: vb.pp("bn").get_with_hints(dim, "bias", Init::Const(0.0))?,
            fc2: linear(dim, 2, vb.pp("fc2"))?,
        })
    }

    /// `[N, dim]` → domain logits `[N, 2]` (0 = source/base, 1 = target/web), f32, with its
    /// Linears in the head's [`compute_dtype`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(x, compute_dtype(x.device()))
    }

    /// [`Self::forward`] with its Linears in `dtype`: as PyTorch's autocast runs it, the
    /// LayerNorm computes in f32 whatever `dtype` ([`headops::layer_norm_relu`]; its output
    /// is rounded to `dtype` for the next Linear, as autocast's cast would), and the logits
    /// leave in f32.
    pub fn forward_in(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let h = linear_in(&self.fc, x, dtype)?;
        let h = headops::layer_norm_relu(&h, &self.ln_weight, &self.ln_bias, 1e-5)?;
        linear_in(&self.fc2, &h, dtype)?.to_dtype(DType::F32)
    }
}

/// Similarity = softmax(logits)[:, 1] for `[N, 2]` logits.
pub fn similarity(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(logits, 1)?
        .narrow(1, 1, 1)?
        .squeeze(1)
}
