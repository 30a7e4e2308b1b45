//! This crate's own CUDA kernels (built with `--features cuda`), for the steps where cuDNN's
//! API costs extra passes or calls: BatchNorm with the ReLU and the residual addition folded
//! in (`cuda/bn.cu`), the SGD update in one pass (`cuda/sgd.cu`) and the stem's max-pooling
//! with a gather backward (`cuda/pool.cu`); each file's header says what was measured.
//!
//! `build.rs` compiles `cuda/*.cu` to PTX, embedded here; the driver compiles it for the GPU at
//! the first launch. The BatchNorm functions take raw device addresses of contiguous tensors
//! (as the cuDNN calls of [`crate::cudnn`] do) and queue their kernels on the device's stream.
//! `SIMTRANS_OWN_BN=0` sends training-mode BatchNorm back to cuDNN, to measure the difference.

use crate::cudnn::{cuda_of, ptr};
use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDevice, CudaStorage, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Result, Storage, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::cell::RefCell;
use std::collections::HashMap;

/// (module name, PTX) of each compiled file.
const BN: (&str, &str) = (
    "simtrans_bn",
    include_str!(concat!(env!("OUT_DIR"), "/bn.ptx")),
);
const SGD: (&str, &str) = (
    "simtrans_sgd",
    include_str!(concat!(env!("OUT_DIR"), "/sgd.ptx")),
);
const POOL: (&str, &str) = (
    "simtrans_pool",
    include_str!(concat!(env!("OUT_DIR"), "/pool.ptx")),
);

/// Whether BatchNorm runs on these kernels: yes unless `SIMTRANS_OWN_BN=0`, which gives
/// training mode back to cuDNN and evaluation mode back to candle's tensor ops.
pub fn own_batch_norm() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::cudnn::env_switch("SIMTRANS_OWN_BN", true))
}

fn err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("simtrans CUDA kernel: {e:?}"))
}

thread_local! {
    static FUNCS: RefCell<HashMap<(DeviceId, &'static str), CudaFunction>> =
        RefCell::new(HashMap::new());
}

/// The kernel `name` of the BatchNorm module on `dev`, loaded once per thread.
fn func(dev: &CudaDevice, name: &'static str) -> Result<CudaFunction> {
    func_of(dev, BN, name)
}

/// The kernel `name` of `module` on `dev`, loaded once per thread.
fn func_of(dev: &CudaDevice, module: (&str, &str), name: &'static str) -> Result<CudaFunction> {
    FUNCS.with(|f| {
        let mut f = f.borrow_mut();
        if let Some(found) = f.get(&(dev.id(), name)) {
            return Ok(found.clone());
        }
        let loaded = dev
            .get_or_load_custom_func(name, module.0, module.1)?
            .into_cuda_function();
        f.insert((dev.id(), name), loaded.clone());
        Ok(loaded)
    })
}

const THREADS: u32 = 256;

fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One BatchNorm launch's view of a contiguous NCHW tensor: `n` rows of `c` channels of `hw`
/// values (a split batch is one range per part, on offset addresses).
#[derive(Debug, Clone, Copy)]
pub struct BnRange {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
}

impl BnRange {
    fn count(&self) -> usize {
        self.n * self.hw
    }
    fn total(&self) -> usize {
        self.n * self.c * self.hw
    }
    /// The kernel variant for `dtype`: 4 values per access when a channel's plane allows it.
    fn variant(&self, base: &'static str, dtype: DType) -> Result<&'static str> {
        let vec4 = self.vec() == 4;
        Ok(match (base, dtype, vec4) {
            ("stats", DType::F32, false) => "bn_stats_f32",
            ("stats", DType::F32, true) => "bn_stats_f32x4",
            ("stats", DType::BF16, false) => "bn_stats_bf16",
            ("stats", DType::BF16, true) => "bn_stats_bf16x4",
            ("apply", DType::F32, false) => "bn_apply_f32",
            ("apply", DType::F32, true) => "bn_apply_f32x4",
            ("apply", DType::BF16, false) => "bn_apply_bf16",
            ("apply", DType::BF16, true) => "bn_apply_bf16x4",
            ("grad_stats", DType::F32, false) => "bn_grad_stats_f32",
            ("grad_stats", DType::F32, true) => "bn_grad_stats_f32x4",
            ("grad_stats", DType::BF16, false) => "bn_grad_stats_bf16",
            ("grad_stats", DType::BF16, true) => "bn_grad_stats_bf16x4",
            ("grad_apply", DType::F32, false) => "bn_grad_apply_f32",
            ("grad_apply", DType::F32, true) => "bn_grad_apply_f32x4",
            ("grad_apply", DType::BF16, false) => "bn_grad_apply_bf16",
            ("grad_apply", DType::BF16, true) => "bn_grad_apply_bf16x4",
            (_, other, _) => bail!("our BatchNorm kernels take f32 or bf16, not {other:?}"),
        })
    }
    /// Shares of the rows per channel in the reductions: enough blocks to fill a large GPU
    /// (about 2048) without splitting below one row.
    fn shares(&self) -> usize {
        2048usize.div_ceil(self.c).clamp(1, self.n.max(1))
    }
    fn vec(&self) -> usize {
        if self.hw % 4 == 0 {
            4
        } else {
            1
        }
    }
    /// One thread per channel (the `*_finish` and `bn_eval_stats` kernels).
    fn per_channel(&self) -> LaunchConfig {
        cfg(((self.c as u32).div_ceil(THREADS), 1), THREADS)
    }
    /// One block per channel and share of the rows (the reductions).
    fn reduction(&self) -> LaunchConfig {
        cfg((self.c as u32, self.shares() as u32), THREADS)
    }
    /// One thread per group of `vec()` values (the elementwise passes).
    fn elementwise(&self) -> LaunchConfig {
        let blocks = (self.total() / self.vec()).div_ceil(THREADS as usize);
        cfg((blocks as u32, 1), THREADS)
    }
    fn check(&self) -> Result<()> {
        if self.count() < 2 {
            bail!(
                "BatchNorm in training mode needs more than one value per channel, got {} rows \
                 of {} values",
                self.n,
                self.hw
            )
        }
        if self.c > i32::MAX as usize || self.hw > i32::MAX as usize {
            bail!("BatchNorm range {self:?} is too large for the kernels' indices")
        }
        Ok(())
    }
}

/// Grid (c, shares) sums of one reduction kernel into a fresh f64 buffer.
fn partial_sums(dev: &CudaDevice, r: &BnRange) -> Result<CudaSlice<f64>> {
    unsafe { dev.alloc::<f64>(r.c * r.shares() * 2) }
}

/// Which statistics normalise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stats {
    /// The batch's own (training mode); the running statistics, when given, move.
    Batch,
    /// The running statistics (evaluation mode); constants for the backward pass.
    Running,
}

/// `y = [relu](BN(x) + residual)` of one range, with the statistics used written to
/// `mean`/`inv_std` (f32 `[c]`, kept for the backward) and, in [`Stats::Batch`] mode when
/// `running` is not `(0, 0)`, the running statistics moved in place. `residual` 0 means none.
#[allow(clippy::too_many_arguments)]
pub fn bn_forward(
    dev: &CudaDevice,
    dtype: DType,
    r: BnRange,
    (x, residual, y): (u64, u64, u64),
    (w, b): (u64, u64),
    running: (u64, u64),
    (eps, momentum): (f64, f64),
    relu: bool,
    stats: Stats,
    (mean, inv_std): (u64, u64),
) -> Result<()> {
    let stream = dev.cuda_stream();
    let (n, c, hw, shares) = (r.n as i32, r.c as i32, r.hw as i32, r.shares() as i32);
    if stats == Stats::Running {
        if running.0 == 0 || running.1 == 0 {
            bail!("BatchNorm in evaluation mode needs running statistics")
        }
        let f = func(dev, "bn_eval_stats")?;
        let eps = eps as f32;
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&c)
                .arg(&eps)
                .arg(&running.0)
                .arg(&running.1)
                .arg(&mean)
                .arg(&inv_std)
                .launch(r.per_channel())
        }
        .map_err(err)?;
        return apply(
            dev,
            dtype,
            &r,
            (x, residual, y),
            (w, b),
            relu,
            (mean, inv_std),
        );
    }
    r.check()?;
    let mut partial = partial_sums(dev, &r)?;
    let (pp, _gp) = partial.device_ptr_mut(&stream);
    let f = func(dev, r.variant("stats", dtype)?)?;
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&x)
            .arg(&n)
            .arg(&c)
            .arg(&hw)
            .arg(&pp)
            .launch(r.reduction())
    }
    .map_err(err)?;
    let f = func(dev, "bn_stats_finish")?;
    let (count, eps, momentum) = (r.count() as f64, eps as f32, momentum as f32);
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&pp)
            .arg(&c)
            .arg(&shares)
            .arg(&count)
            .arg(&eps)
            .arg(&momentum)
            .arg(&running.0)
            .arg(&running.1)
            .arg(&mean)
            .arg(&inv_std)
            .launch(r.per_channel())
    }
    .map_err(err)?;
    apply(
        dev,
        dtype,
        &r,
        (x, residual, y),
        (w, b),
        relu,
        (mean, inv_std),
    )
}

/// The elementwise pass of [`bn_forward`].
fn apply(
    dev: &CudaDevice,
    dtype: DType,
    r: &BnRange,
    (x, residual, y): (u64, u64, u64),
    (w, b): (u64, u64),
    relu: bool,
    (mean, inv_std): (u64, u64),
) -> Result<()> {
    let stream = dev.cuda_stream();
    let (c, hw) = (r.c as i32, r.hw as i32);
    let f = func(dev, r.variant("apply", dtype)?)?;
    let total = r.total() as i64;
    let relu = relu as i32;
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&x)
            .arg(&residual)
            .arg(&y)
            .arg(&mean)
            .arg(&inv_std)
            .arg(&w)
            .arg(&b)
            .arg(&total)
            .arg(&c)
            .arg(&hw)
            .arg(&relu)
            .launch(r.elementwise())
    }
    .map_err(err)?;
    Ok(())
}

/// The backward of [`bn_forward`] for one range (`stats` as there): `dx` from `x`, the output gradient `dy` (taken
/// through the ReLU whose output is `y`, unless `y` is 0) and the saved statistics; the
/// parameter gradients are written to `dw`/`db` (added when `accumulate`), and the gradient
/// at the sum (the residual's) to `dres` unless it is 0.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward(
    dev: &CudaDevice,
    dtype: DType,
    r: BnRange,
    (x, dy, y): (u64, u64, u64),
    (mean, inv_std): (u64, u64),
    (w, dw, db): (u64, u64, u64),
    accumulate: bool,
    stats: Stats,
    (dx, dres): (u64, u64),
) -> Result<()> {
    let stream = dev.cuda_stream();
    let mut partial = partial_sums(dev, &r)?;
    let mut coef = unsafe { dev.alloc::<f32>(2 * r.c) }?;
    let (pp, _gp) = partial.device_ptr_mut(&stream);
    let (pc, _gc) = coef.device_ptr_mut(&stream);
    let (n, c, hw, shares) = (r.n as i32, r.c as i32, r.hw as i32, r.shares() as i32);
    let f = func(dev, r.variant("grad_stats", dtype)?)?;
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&x)
            .arg(&dy)
            .arg(&y)
            .arg(&mean)
            .arg(&inv_std)
            .arg(&n)
            .arg(&c)
            .arg(&hw)
            .arg(&pp)
            .launch(r.reduction())
    }
    .map_err(err)?;
    let f = func(dev, "bn_grad_finish")?;
    let (count, accumulate) = (r.count() as f64, accumulate as i32);
    let fixed = (stats == Stats::Running) as i32;
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&pp)
            .arg(&c)
            .arg(&shares)
            .arg(&count)
            .arg(&accumulate)
            .arg(&fixed)
            .arg(&dw)
            .arg(&db)
            .arg(&pc)
            .launch(r.per_channel())
    }
    .map_err(err)?;
    let f = func(dev, r.variant("grad_apply", dtype)?)?;
    let total = r.total() as i64;
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&x)
            .arg(&dy)
            .arg(&y)
            .arg(&mean)
            .arg(&inv_std)
            .arg(&w)
            .arg(&pc)
            .arg(&dx)
            .arg(&dres)
            .arg(&total)
            .arg(&c)
            .arg(&hw)
            .launch(r.elementwise())
    }
    .map_err(err)?;
    Ok(())
}

/// PyTorch's SGD step for one f32 CUDA variable `p` with gradient `g`, in place on the device
/// and in one pass (`cuda/sgd.cu`): `d = g + λ·p`; with momentum μ, `buf ← μ·buf + d`
/// (`buf ← d` on the first step, when `buf` is `None`) and `d = buf`; then `p ← p − lr·d`.
/// Returns the momentum buffer (the one passed in, updated in place, or a new one; `None`
/// without momentum).
pub fn sgd_update(
    param: &Tensor,
    grad: &Tensor,
    buf: Option<&Tensor>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> Result<Option<Tensor>> {
    let grad = grad.contiguous()?;
    if param.dtype() != DType::F32 || grad.dtype() != DType::F32 || !param.is_contiguous() {
        bail!("sgd_update needs contiguous f32 tensors")
    }
    if param.shape() != grad.shape() || buf.is_some_and(|b| b.shape() != param.shape()) {
        bail!(
            "sgd_update: parameter {:?}, gradient {:?}, momentum buffer {:?}",
            param.shape(),
            grad.shape(),
            buf.map(|b| b.shape())
        )
    }
    let n = param.elem_count();
    let (ps, pl) = param.storage_and_layout();
    let (gs, gl) = grad.storage_and_layout();
    let (ps, gs) = (cuda_of(&ps)?, cuda_of(&gs)?);
    let dev = ps.device().clone();
    let stream = dev.cuda_stream();
    let (pp, _g1) = ptr(ps, pl, &stream)?;
    let (pg, _g2) = ptr(gs, gl, &stream)?;
    // The momentum buffer: the one given, a fresh one (written by the kernel), or none.
    let mut fresh_buf = None;
    let fresh = momentum != 0.0 && buf.is_none();
    if fresh {
        fresh_buf = Some(unsafe { dev.alloc::<f32>(n) }?);
    }
    let locked = match buf {
        Some(b) if momentum != 0.0 => Some(b.storage_and_layout()),
        _ => None,
    };
    let mut keep = Vec::new();
    let pb = match (&locked, fresh_buf.as_mut()) {
        (Some((bs, bl)), _) => {
            let bs = cuda_of(bs)?;
            if !bl.is_contiguous() {
                bail!("sgd_update: the momentum buffer must be contiguous")
            }
            let (p, g) = ptr(bs, bl, &stream)?;
            keep.push(g);
            p
        }
        (None, Some(f)) => {
            let (p, g) = f.device_ptr_mut(&stream);
            keep.push(g);
            p
        }
        (None, None) => 0,
    };
    let f = func_of(&dev, SGD, "sgd_step")?;
    let (count, lr, mu, wd) = (n as i64, lr as f32, momentum as f32, weight_decay as f32);
    let fresh_flag = fresh as i32;
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 4096) as u32;
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&pp)
            .arg(&pg)
            .arg(&pb)
            .arg(&count)
            .arg(&lr)
            .arg(&mu)
            .arg(&wd)
            .arg(&fresh_flag)
            .launch(cfg((blocks, 1), THREADS))
    }
    .map_err(err)?;
    drop(keep);
    if momentum == 0.0 {
        return Ok(None);
    }
    Ok(Some(match fresh_buf {
        Some(b) => Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(b, dev.clone())),
            param.shape().clone(),
            BackpropOp::none(),
            false,
        ),
        None => buf.expect("a buffer was given").clone(),
    }))
}

/// The output side of the stem's 3×3 / stride 2 / padding 1 max-pooling.
pub fn pool_out(side: usize) -> usize {
    (side - 1) / 2 + 1
}

fn pool_kernel(dtype: DType, pass: &str) -> Result<&'static str> {
    Ok(match (pass, dtype) {
        ("fwd", DType::F32) => "max_pool_fwd_f32",
        ("fwd", DType::BF16) => "max_pool_fwd_bf16",
        ("bwd", DType::F32) => "max_pool_bwd_f32",
        ("bwd", DType::BF16) => "max_pool_bwd_bf16",
        (_, other) => bail!("our max-pooling kernels take f32 or bf16, not {other:?}"),
    })
}

/// One launch over `count` threads of a max-pooling kernel on `planes` planes of `h × w`.
fn pool_launch(
    dev: &CudaDevice,
    name: &'static str,
    (a, b, c): (u64, u64, u64),
    planes: usize,
    (h, w): (usize, usize),
    count: usize,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let f = func_of(dev, POOL, name)?;
    let (planes, hh, ww) = (planes as i64, h as i32, w as i32);
    let (oh, ow) = (pool_out(h) as i32, pool_out(w) as i32);
    let blocks = count.div_ceil(THREADS as usize) as u32;
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&a)
            .arg(&b)
            .arg(&c)
            .arg(&planes)
            .arg(&hh)
            .arg(&ww)
            .arg(&oh)
            .arg(&ow)
            .launch(cfg((blocks, 1), THREADS))
    }
    .map_err(err)?;
    Ok(())
}

/// Max-pooling (3×3, stride 2, padding 1) of `planes` contiguous `h × w` planes at `x` into
/// `y`, with the winning window position of each output (one byte) at `arg`.
pub fn max_pool_forward(
    dev: &CudaDevice,
    dtype: DType,
    (x, y, arg): (u64, u64, u64),
    planes: usize,
    (h, w): (usize, usize),
) -> Result<()> {
    let name = pool_kernel(dtype, "fwd")?;
    let count = planes * pool_out(h) * pool_out(w);
    pool_launch(dev, name, (x, y, arg), planes, (h, w), count)
}

/// The backward of [`max_pool_forward`]: `dx` (the input's shape) from the output gradient
/// `dy` and the recorded winners `arg`.
pub fn max_pool_backward(
    dev: &CudaDevice,
    dtype: DType,
    (dy, arg, dx): (u64, u64, u64),
    planes: usize,
    (h, w): (usize, usize),
) -> Result<()> {
    let name = pool_kernel(dtype, "bwd")?;
    pool_launch(dev, name, (dy, arg, dx), planes, (h, w), planes * h * w)
}
