//! The SimNet head's fused operations, each differentiable: the first Linear on grids of
//! pairs ([`pair_grid`]), LayerNorm followed by ReLU ([`layer_norm_relu`], the
//! discriminator's), a Linear's bias ([`add_bias`]), the losses' cross-entropy
//! ([`cross_entropy`]), a Linear's weight transposed and cast for its product
//! ([`transposed`]), and the global average pooling that makes the features the head consumes
//! ([`global_avg_pool`]).
//!
//! Why they exist: written as candle ops they cost far more than their arithmetic on a GPU.
//! candle's broadcasting additions run at a small fraction of the memory bandwidth, the
//! gradient of a transposed view comes back strided and is added into zeros, and a LayerNorm
//! of eight ops reads and writes its `[N, H]` activations about twenty times, forward and
//! backward (`kernels/src/head.cu` and `kernels/src/pool.cu` have the measurements; BENCHMARKS.md, runs 13 to
//! 15, what they bought). On CUDA devices (f32 or bf16) each is one op on our kernels, forward
//! and backward; elsewhere each is the plain composition of candle ops that defines it, so the
//! CPU path is unchanged bit for bit and is the reference the GPU tests compare with.
//! `gpu.head_kernels = false` sends CUDA devices to the plain path too, to measure the
//! difference.

use candle_core::{bail, DType, Result, Tensor, D};

/// One grid of pairs: rows `rows.0 .. rows.0 + rows.1` of the projections against columns
/// `cols.0 .. cols.0 + cols.1`; output row `r·cols.1 + c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub rows: (usize, usize),
    pub cols: (usize, usize),
}

impl Grid {
    /// Every pair within images `start .. start + len` (both orders and self-pairs).
    pub fn square(start: usize, len: usize) -> Self {
        Grid {
            rows: (start, len),
            cols: (start, len),
        }
    }

    fn pairs(&self) -> usize {
        self.rows.1 * self.cols.1
    }
}

/// Whether this module's ops run on our kernels for `x`: a CUDA tensor in f32 or bf16, unless
/// `gpu.head_kernels = false`.
#[cfg(feature = "cuda")]
fn on_kernels(x: &Tensor) -> bool {
    crate::gpu::settings().head_kernels
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// The first Linear `W·[f_a ; f_b] + bias` on grids of pairs, from the projections `q`
/// (`[N, 2H]`, `q[n, 2k + s] = (W_s·f_n)[k]` with `W_s` the `s`-th column half of the
/// `[H, 2D]` weight, that is `f · W.reshape(2H, D)ᵀ`) and the f32 `bias` `[H]`: the grids'
/// `[rows·cols, H]` outputs, concatenated, in q's dtype, each value `q_row + (q_col + bias)`.
/// A pair's first image takes half `slots.0`, its second half `slots.1` (they must differ).
/// Differentiable in `q` and `bias`.
pub fn pair_grid(
    q: &Tensor,
    bias: &Tensor,
    grids: &[Grid],
    slots: (usize, usize),
) -> Result<Tensor> {
    let (n, two_h) = q.dims2()?;
    let h = two_h / 2;
    if two_h % 2 != 0 || bias.dims1()? != h {
        bail!(
            "pair_grid: projections {:?} need an even width 2H and a bias of H, got bias {:?}",
            q.dims(),
            bias.dims()
        )
    }
    if slots.0 > 1 || slots.1 > 1 || slots.0 == slots.1 {
        bail!("pair_grid: slots must be (0, 1) or (1, 0), got {slots:?}")
    }
    for g in grids {
        if g.rows.0 + g.rows.1 > n || g.cols.0 + g.cols.1 > n {
            bail!("pair_grid: grid {g:?} reaches past the {n} projected images")
        }
    }
    #[cfg(feature = "cuda")]
    if on_kernels(q) {
        return gpu::pair_grid(q, bias, grids, slots);
    }
    let q3 = q.reshape((n, h, 2))?;
    let half = |(start, len): (usize, usize), slot: usize| {
        q3.narrow(0, start, len)?.narrow(2, slot, 1)?.squeeze(2)
    };
    let bias = bias.to_dtype(q.dtype())?;
    let mut parts = Vec::with_capacity(grids.len());
    for g in grids {
        let a = half(g.rows, slots.0)?.unsqueeze(1)?;
        let b = half(g.cols, slots.1)?.broadcast_add(&bias)?.unsqueeze(0)?;
        parts.push(a.broadcast_add(&b)?.reshape((g.pairs(), h))?);
    }
    Tensor::cat(&parts, 0)
}

/// `relu(LayerNorm(x)·w + b)` over the last dimension of `x` `[N, H]` (biased variance, `eps`
/// inside the square root), computed in f32 and returned in x's dtype; `w`, `b` f32 `[H]`.
/// Differentiable in all three.
pub fn layer_norm_relu(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let (_, h) = x.dims2()?;
    if w.dims1()? != h || b.dims1()? != h {
        bail!(
            "layer_norm_relu: input {:?} with weight {:?} and bias {:?}",
            x.dims(),
            w.dims(),
            b.dims()
        )
    }
    #[cfg(feature = "cuda")]
    if on_kernels(x) {
        return gpu::layer_norm_relu(x, w, b, eps);
    }
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .broadcast_mul(w)?
        .broadcast_add(b)?
        .relu()?
        .to_dtype(x.dtype())
}

/// `x + bias` for `x` `[N, H]` and an f32 `bias` `[H]` (a Linear's), in x's dtype: as
/// candle-nn's `Linear` adds it (the bias cast to x's dtype, then a broadcasting addition),
/// or on CUDA one pass that adds in f32. Differentiable in both.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, h) = x.dims2()?;
    if bias.dims1()? != h {
        bail!("add_bias: input {:?} with bias {:?}", x.dims(), bias.dims())
    }
    #[cfg(feature = "cuda")]
    if on_kernels(x) {
        return gpu::add_bias(x, bias);
    }
    x.broadcast_add(&bias.to_dtype(x.dtype())?)
}

/// candle-nn's `cross_entropy` (the mean over rows of `−log softmax(logits)[target]`) for
/// f32 logits `[N, C]` and u32 targets `[N]`; on CUDA one kernel each way instead of about a
/// dozen small ops. Differentiable in the logits.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_kernels(logits) && logits.dtype() == DType::F32 && targets.dtype() == DType::U32 {
        return gpu::cross_entropy(logits, targets);
    }
    candle_nn::loss::cross_entropy(logits, targets)
}

/// `w` (contiguous, `rows·cols` values) read as `[rows, cols]`, transposed and cast to
/// `dtype`: `[cols, rows]`, the right-hand side of a Linear's `x·Wᵀ`. Elsewhere the view
/// `w.reshape((rows, cols)).to_dtype(dtype).t()`, as candle-nn's `Linear` uses it; on CUDA a
/// contiguous copy, so that the product's gradient for it comes back contiguous and returns
/// to `w` in one pass (`kernels/src/head.cu`'s transpose kernels). Differentiable in `w`.
pub fn transposed(w: &Tensor, (rows, cols): (usize, usize), dtype: DType) -> Result<Tensor> {
    if w.elem_count() != rows * cols {
        bail!("transposed: {:?} is not [{rows}, {cols}]", w.dims())
    }
    #[cfg(feature = "cuda")]
    if on_kernels(w) && matches!(dtype, DType::F32 | DType::BF16) {
        return gpu::transposed(w, (rows, cols), dtype);
    }
    w.reshape((rows, cols))?.to_dtype(dtype)?.t()
}

/// The mean over the spatial positions of `x` `[B, C, H, W]`, as `[B, C]` in f32 (f64 for an
/// f64 `x`): `x.to_dtype(f32).mean((2, 3))`, or on CUDA one kernel that reads x in its own
/// layout (the trunk's channels-last output needs no copy) and one back. Differentiable.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_kernels(x) && x.rank() == 4 {
        return gpu::global_avg_pool(x);
    }
    match x.dtype() {
        DType::F64 | DType::F32 => x.mean((2, 3)),
        _ => x.to_dtype(DType::F32)?.mean((2, 3)),
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    //! The CUDA ops behind this module's functions: each a candle custom op whose forward and
    //! backward queue `crate::launch`'s sequences on the device's stream.

    use super::Grid;
    use crate::kernels::Cuda;
    use crate::launch::{self, PairGrid};
    use crate::storage::{alloc, cpu_refused, cuda_of, ptr, ptr_at, ptr_mut, wrap};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::{CudaDevice, CudaStorage};
    use candle_core::{
        bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    };
    use cudarc::driver::{CudaSlice, DevicePtr};
    use std::sync::{Arc, Mutex};

    /// The CUDA device `t` lives on (a backward pass builds its outputs there).
    fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
        match t.device() {
            candle_core::Device::Cuda(d) => Ok(d.clone()),
            other => bail!("a backward pass of our CUDA ops met a tensor on {other:?}"),
        }
    }

    /// Refuses parameters (weights, biases) that are not f32, naming the op.
    fn f32_params(op: &str, params: &[&CudaStorage]) -> Result<()> {
        if let Some(p) = params.iter().find(|p| p.dtype() != DType::F32) {
            bail!("{op}: its parameters must be f32, got {:?}", p.dtype())
        }
        Ok(())
    }

    /// The kernels' view of the grids: addresses of q (or dq) rows and of each output block.
    fn plan(
        grids: &[Grid],
        q: u64,
        q_elt: usize,
        out: u64,
        out_elt: usize,
        h: usize,
    ) -> Vec<PairGrid> {
        let mut at = 0;
        grids
            .iter()
            .map(|g| {
                let p = PairGrid {
                    qr: q + (g.rows.0 * 2 * h * q_elt) as u64,
                    qc: q + (g.cols.0 * 2 * h * q_elt) as u64,
                    out: out + (at * h * out_elt) as u64,
                    rows: g.rows.1,
                    cols: g.cols.1,
                };
                at += g.pairs();
                p
            })
            .collect()
    }

    struct PairGridOp {
        grids: Vec<Grid>,
        slots: (usize, usize),
    }

    impl CustomOp2 for PairGridOp {
        fn name(&self) -> &'static str {
            "simtrans-pair-grid"
        }
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_refused(self.name())
        }
        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            f32_params("pair_grid", &[b])?;
            let dev = q.device().clone();
            let stream = dev.cuda_stream();
            let h = ql.dims()[1] / 2;
            let pairs: usize = self.grids.iter().map(Grid::pairs).sum();
            let mut out = alloc(&dev, q.dtype(), pairs * h)?;
            {
                let (pq, _g1) = ptr(q, ql, &stream)?;
                let (pb, _g2) = ptr(b, bl, &stream)?;
                let (po, _g3) = ptr_mut(&mut out, &stream)?;
                let elt = q.dtype().size_in_bytes();
                let plan = plan(&self.grids, pq, elt, po, elt, h);
                launch::pair_grid_forward(&Cuda(&dev), q.dtype(), &plan, pb, h, self.slots)?;
            }
            Ok((out, Shape::from((pairs, h))))
        }
        fn bwd(
            &self,
            q: &Tensor,
            bias: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (n, two_h) = q.dims2()?;
            let h = two_h / 2;
            let op = PairGridBackward {
                grids: self.grids.clone(),
                slots: self.slots,
                images: n,
            };
            // dq in f32: the rows' sums in one half, the columns' in the other.
            let dq = grad.contiguous()?.apply_op1_no_bwd(&op)?;
            // Every output row is in exactly one grid row, so the bias's gradient is the sum of
            // the rows' half over the images.
            let dbias = bias
                .track_op()
                .then(|| {
                    dq.reshape((n, h, 2))?
                        .narrow(2, self.slots.0, 1)?
                        .sum((0, 2))
                })
                .transpose()?;
            let dq = q.track_op().then(|| dq.to_dtype(q.dtype())).transpose()?;
            Ok((dq, dbias))
        }
    }

    struct PairGridBackward {
        grids: Vec<Grid>,
        slots: (usize, usize),
        images: usize,
    }

    impl CustomOp1 for PairGridBackward {
        fn name(&self) -> &'static str {
            "simtrans-pair-grid-backward"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cpu_refused(self.name())
        }
        fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = g.device().clone();
            let stream = dev.cuda_stream();
            let h = gl.dims()[1];
            let dq: CudaSlice<f32> = dev.alloc_zeros(self.images * 2 * h)?;
            let mut dq = CudaStorage::wrap_cuda_slice(dq, dev.clone());
            {
                let (pg, _g1) = ptr(g, gl, &stream)?;
                let (pd, _g2) = ptr_mut(&mut dq, &stream)?;
                let plan = plan(&self.grids, pd, 4, pg, g.dtype().size_in_bytes(), h);
                launch::pair_grid_backward(&Cuda(&dev), g.dtype(), &plan, h, self.slots)?;
            }
            Ok((dq, Shape::from((self.images, 2 * h))))
        }
    }

    pub(super) fn pair_grid(
        q: &Tensor,
        bias: &Tensor,
        grids: &[Grid],
        slots: (usize, usize),
    ) -> Result<Tensor> {
        let op = PairGridOp {
            grids: grids.to_vec(),
            slots,
        };
        q.contiguous()?
            .apply_op2(&bias.to_dtype(DType::F32)?.contiguous()?, op)
    }

    struct AddBias;

    impl CustomOp2 for AddBias {
        fn name(&self) -> &'static str {
            "simtrans-add-bias"
        }
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_refused(self.name())
        }
        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            f32_params("add_bias", &[b])?;
            let dev = x.device().clone();
            let stream = dev.cuda_stream();
            let (n, h) = (xl.dims()[0], xl.dims()[1]);
            let mut y = alloc(&dev, x.dtype(), n * h)?;
            {
                let (px, _g1) = ptr(x, xl, &stream)?;
                let (pb, _g2) = ptr(b, bl, &stream)?;
                let (py, _g3) = ptr_mut(&mut y, &stream)?;
                launch::add_bias_forward(&Cuda(&dev), x.dtype(), (px, pb, py), (n, h))?;
            }
            Ok((y, xl.shape().clone()))
        }
        fn bwd(
            &self,
            x: &Tensor,
            b: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let db = b
                .track_op()
                .then(|| grad.contiguous()?.apply_op1_no_bwd(&ColumnSums))
                .transpose()?;
            Ok((x.track_op().then(|| grad.clone()), db))
        }
    }

    /// `Σ_r g[r, k]` in f32: the bias's gradient.
    struct ColumnSums;

    impl CustomOp1 for ColumnSums {
        fn name(&self) -> &'static str {
            "simtrans-column-sums"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cpu_refused(self.name())
        }
        fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = g.device().clone();
            let stream = dev.cuda_stream();
            let (n, h) = (gl.dims()[0], gl.dims()[1]);
            let mut db = alloc(&dev, DType::F32, h)?;
            {
                let (pg, _g1) = ptr(g, gl, &stream)?;
                let (pd, _g2) = ptr_mut(&mut db, &stream)?;
                launch::add_bias_backward(&Cuda(&dev), g.dtype(), (pg, pd), (n, h))?;
            }
            Ok((db, Shape::from(h)))
        }
    }

    pub(super) fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op2(&bias.to_dtype(DType::F32)?.contiguous()?, AddBias)
    }

    struct CrossEntropy;

    impl CustomOp2 for CrossEntropy {
        fn name(&self) -> &'static str {
            "simtrans-cross-entropy"
        }
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_refused(self.name())
        }
        fn cuda_fwd(
            &self,
            l: &CudaStorage,
            ll: &Layout,
            t: &CudaStorage,
            tl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (n, c) = (ll.dims()[0], ll.dims()[1]);
            if tl.dims() != [n] {
                bail!(
                    "cross_entropy: logits {:?} with targets {:?}",
                    ll.dims(),
                    tl.dims()
                )
            }
            let dev = l.device().clone();
            let stream = dev.cuda_stream();
            let mut loss = alloc(&dev, DType::F32, 1)?;
            {
                let (pl, _g1) = ptr(l, ll, &stream)?;
                let (pt, _g2) = ptr(t, tl, &stream)?;
                let (po, _g3) = ptr_mut(&mut loss, &stream)?;
                launch::cross_entropy_forward(&Cuda(&dev), (pl, pt, po), (n, c))?;
            }
            Ok((loss, Shape::from(())))
        }
        fn bwd(
            &self,
            logits: &Tensor,
            targets: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (n, c) = logits.dims2()?;
            let dev = cuda_device(logits)?;
            let stream = dev.cuda_stream();
            let (logits, grad) = (logits.contiguous()?, grad.contiguous()?);
            let (ls, ll) = logits.storage_and_layout();
            let (ts, tl) = targets.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let mut d = alloc(&dev, DType::F32, n * c)?;
            {
                let (pl, _g1) = ptr(cuda_of(&ls)?, ll, &stream)?;
                let (pt, _g2) = ptr(cuda_of(&ts)?, tl, &stream)?;
                let (pg, _g3) = ptr(cuda_of(&gs)?, gl, &stream)?;
                let (pd, _g4) = ptr_mut(&mut d, &stream)?;
                launch::cross_entropy_backward(&Cuda(&dev), (pl, pt, pg, pd), (n, c))?;
            }
            Ok((Some(wrap(d, &Shape::from((n, c)))), None))
        }
    }

    pub(super) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy)
    }

    /// `[rows, cols]` → `[cols, rows]` in `to`.
    struct Transpose {
        rows: usize,
        cols: usize,
        to: DType,
    }

    impl CustomOp1 for Transpose {
        fn name(&self) -> &'static str {
            "simtrans-transpose"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cpu_refused(self.name())
        }
        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let stream = dev.cuda_stream();
            let mut y = alloc(&dev, self.to, self.rows * self.cols)?;
            {
                let (px, _g1) = ptr(x, xl, &stream)?;
                let (py, _g2) = ptr_mut(&mut y, &stream)?;
                launch::transpose(
                    &Cuda(&dev),
                    (x.dtype(), self.to),
                    (px, py),
                    (self.rows, self.cols),
                )?;
            }
            Ok((y, Shape::from((self.cols, self.rows))))
        }
        fn bwd(&self, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            let back = Transpose {
                rows: self.cols,
                cols: self.rows,
                to: w.dtype(),
            };
            let g = grad.contiguous()?.apply_op1_no_bwd(&back)?;
            Ok(Some(g.reshape(w.shape())?))
        }
    }

    pub(super) fn transposed(
        w: &Tensor,
        (rows, cols): (usize, usize),
        to: DType,
    ) -> Result<Tensor> {
        w.contiguous()?.apply_op1(Transpose { rows, cols, to })
    }

    struct AvgPool;

    impl CustomOp1 for AvgPool {
        fn name(&self) -> &'static str {
            "simtrans-global-avg-pool"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cpu_refused(self.name())
        }
        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
            let (dims, st) = (xl.dims(), xl.stride());
            let (b, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
            if st[2] != w * st[3] && h > 1 {
                bail!("global_avg_pool: a layout {st:?} whose H and W do not flatten")
            }
            let dev = x.device().clone();
            let stream = dev.cuda_stream();
            let mut y = alloc(&dev, DType::F32, b * c)?;
            {
                let (px, _g1) = ptr_at(x, xl.start_offset(), &stream)?;
                let (py, _g2) = ptr_mut(&mut y, &stream)?;
                launch::avg_pool_forward(
                    &Cuda(&dev),
                    x.dtype(),
                    (px, py),
                    (b, c, h * w),
                    (st[0], st[1], st[3]),
                )?;
            }
            Ok((y, Shape::from((b, c))))
        }
        fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            let (b, c, h, w) = x.dims4()?;
            let grad = grad.contiguous()?;
            let dev = cuda_device(&grad)?;
            let stream = dev.cuda_stream();
            let (gs, gl) = grad.storage_and_layout();
            let mut dx = alloc(&dev, x.dtype(), b * c * h * w)?;
            {
                let (pg, _g1) = ptr(cuda_of(&gs)?, gl, &stream)?;
                let (pd, _g2) = ptr_mut(&mut dx, &stream)?;
                launch::avg_pool_backward(&Cuda(&dev), x.dtype(), (pg, pd), (b * c, h * w))?;
            }
            Ok(Some(wrap(dx, x.shape())))
        }
    }

    pub(super) fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
        let st = x.stride();
        let flat = x.dim(2)? <= 1 || st[2] == x.dim(3)? * st[3];
        let x = if flat { x.clone() } else { x.contiguous()? };
        x.apply_op1(AvgPool)
    }

    /// Each row's mean and rstd, kept by the forward for the backward.
    type RowStats = Arc<(CudaSlice<f32>, CudaSlice<f32>)>;

    struct LayerNormRelu {
        eps: f64,
        stats: Mutex<Option<RowStats>>,
    }

    impl CustomOp3 for LayerNormRelu {
        fn name(&self) -> &'static str {
            "simtrans-layer-norm-relu"
        }
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_refused(self.name())
        }
        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            f32_params("layer_norm_relu", &[w, b])?;
            let dev = x.device().clone();
            let stream = dev.cuda_stream();
            let (n, h) = (xl.dims()[0], xl.dims()[1]);
            let mut y = alloc(&dev, x.dtype(), n * h)?;
            let mut mean = unsafe { dev.alloc::<f32>(n.max(1)) }?;
            let mut rstd = unsafe { dev.alloc::<f32>(n.max(1)) }?;
            {
                let (px, _g1) = ptr(x, xl, &stream)?;
                let (pw, _g2) = ptr(w, wl, &stream)?;
                let (pb, _g3) = ptr(b, bl, &stream)?;
                let (py, _g4) = ptr_mut(&mut y, &stream)?;
                let (pm, _g5) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut mean, &stream);
                let (pr, _g6) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut rstd, &stream);
                launch::layer_norm_relu_forward(
                    &Cuda(&dev),
                    x.dtype(),
                    (px, pw, pb, py),
                    (pm, pr),
                    (n, h),
                    self.eps,
                )?;
            }
            *self.stats.lock().expect("LayerNorm statistics") = Some(Arc::new((mean, rstd)));
            Ok((y, xl.shape().clone()))
        }
        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _b: &Tensor,
            res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let Some(stats) = self.stats.lock().expect("LayerNorm statistics").clone() else {
                bail!("layer_norm_relu backward before its forward pass")
            };
            let (n, h) = x.dims2()?;
            let (x, y, dy) = (
                x.contiguous()?,
                res.contiguous()?,
                grad.contiguous()?.to_dtype(x.dtype())?,
            );
            let dev = cuda_device(&x)?;
            let stream = dev.cuda_stream();
            let (xs, xl) = x.storage_and_layout();
            let (ys, yl) = y.storage_and_layout();
            let (gs, gl) = dy.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (xs, ys, gs, ws) = (cuda_of(&xs)?, cuda_of(&ys)?, cuda_of(&gs)?, cuda_of(&ws)?);
            let mut dx = alloc(&dev, x.dtype(), n * h)?;
            let mut dw = alloc(&dev, DType::F32, h)?;
            let mut db = alloc(&dev, DType::F32, h)?;
            {
                let (px, _g1) = ptr(xs, xl, &stream)?;
                let (py, _g2) = ptr(ys, yl, &stream)?;
                let (pg, _g3) = ptr(gs, gl, &stream)?;
                let (pw, _g4) = ptr(ws, wl, &stream)?;
                let (pm, _g5) = stats.0.device_ptr(&stream);
                let (pr, _g6) = stats.1.device_ptr(&stream);
                let (pdx, _g7) = ptr_mut(&mut dx, &stream)?;
                let (pdw, _g8) = ptr_mut(&mut dw, &stream)?;
                let (pdb, _g9) = ptr_mut(&mut db, &stream)?;
                launch::layer_norm_relu_backward(
                    &Cuda(&dev),
                    x.dtype(),
                    (px, py, pg, pw),
                    (pm, pr),
                    (pdx, pdw, pdb),
                    (n, h),
                )?;
            }
            Ok((
                Some(wrap(dx, x.shape())),
                Some(wrap(dw, &Shape::from(h))),
                Some(wrap(db, &Shape::from(h))),
            ))
        }
    }

    pub(super) fn layer_norm_relu(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let op = LayerNormRelu {
            eps,
            stats: Mutex::new(None),
        };
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
    }
}
