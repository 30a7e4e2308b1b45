//! This crate's own CUDA kernels (built with `--features cuda`), for the steps where cuDNN's
//! API costs extra passes over the activations: a training-mode BatchNorm with the ReLU and the
//! residual addition folded in (`cuda/bn.cu`, whose header says what was measured).
//!
//! `build.rs` compiles `cuda/*.cu` to PTX, embedded here; the driver compiles it for the GPU at
//! the first launch. Every function takes raw device addresses of contiguous tensors (as the
//! cuDNN calls of [`crate::cudnn`] do) and queues its kernels on the device's stream.
//! `SIMTRANS_OWN_BN=0` sends BatchNorm back to cuDNN, to measure the difference.

use candle_core::cuda::{CudaDevice, DeviceId};
use candle_core::{bail, DType, Result};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::cell::RefCell;
use std::collections::HashMap;

const BN_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bn.ptx"));

/// Whether training-mode BatchNorm runs on these kernels (yes unless `SIMTRANS_OWN_BN=0`).
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
    FUNCS.with(|f| {
        let mut f = f.borrow_mut();
        if let Some(found) = f.get(&(dev.id(), name)) {
            return Ok(found.clone());
        }
        let loaded = dev
            .get_or_load_custom_func(name, "simtrans_bn", BN_PTX)?
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
        let vec4 = self.hw % 4 == 0;
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

/// `y = [relu](BN(x) + residual)` of one range, with the batch statistics written to
/// `mean`/`inv_std` (f32 `[c]`, kept for the backward) and, when `running` is not `(0, 0)`,
/// the running statistics moved in place. `residual` 0 means none.
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
    (mean, inv_std): (u64, u64),
) -> Result<()> {
    r.check()?;
    let stream = dev.cuda_stream();
    let mut partial = partial_sums(dev, &r)?;
    let (pp, _gp) = partial.device_ptr_mut(&stream);
    let (n, c, hw, shares) = (r.n as i32, r.c as i32, r.hw as i32, r.shares() as u32);
    let f = func(dev, r.variant("stats", dtype)?)?;
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&x)
            .arg(&n)
            .arg(&c)
            .arg(&hw)
            .arg(&pp)
            .launch(cfg((r.c as u32, shares), THREADS))
    }
    .map_err(err)?;
    let f = func(dev, "bn_stats_finish")?;
    let (count, eps, momentum) = (r.count() as f64, eps as f32, momentum as f32);
    let shares = shares as i32;
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
            .launch(cfg(((r.c as u32).div_ceil(THREADS), 1), THREADS))
    }
    .map_err(err)?;
    let f = func(dev, r.variant("apply", dtype)?)?;
    let total = r.total() as i64;
    let relu = relu as i32;
    let blocks = (r.total() / r.vec()).div_ceil(THREADS as usize) as u32;
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
            .launch(cfg((blocks, 1), THREADS))
    }
    .map_err(err)?;
    Ok(())
}

/// The backward of [`bn_forward`] for one range: `dx` from `x`, the output gradient `dy` (taken
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
    (dx, dres): (u64, u64),
) -> Result<()> {
    r.check()?;
    let stream = dev.cuda_stream();
    let mut partial = partial_sums(dev, &r)?;
    let mut coef = unsafe { dev.alloc::<f32>(2 * r.c) }?;
    let (pp, _gp) = partial.device_ptr_mut(&stream);
    let (pc, _gc) = coef.device_ptr_mut(&stream);
    let (n, c, hw, shares) = (r.n as i32, r.c as i32, r.hw as i32, r.shares() as u32);
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
            .launch(cfg((r.c as u32, shares), THREADS))
    }
    .map_err(err)?;
    let f = func(dev, "bn_grad_finish")?;
    let (count, shares, accumulate) = (r.count() as f64, shares as i32, accumulate as i32);
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&pp)
            .arg(&c)
            .arg(&shares)
            .arg(&count)
            .arg(&accumulate)
            .arg(&dw)
            .arg(&db)
            .arg(&pc)
            .launch(cfg(((r.c as u32).div_ceil(THREADS), 1), THREADS))
    }
    .map_err(err)?;
    let f = func(dev, r.variant("grad_apply", dtype)?)?;
    let total = r.total() as i64;
    let blocks = (r.total() / r.vec()).div_ceil(THREADS as usize) as u32;
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
            .launch(cfg((blocks, 1), THREADS))
    }
    .map_err(err)?;
    Ok(())
}
