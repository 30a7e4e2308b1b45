//! This crate's own CUDA kernels (built with `--features cuda`), for the steps where cuDNN's
//! API costs extra passes or calls: BatchNorm with the ReLU and the residual addition folded
//! in (`kernels/src/bn.cu`), the SGD update in one pass (`kernels/src/sgd.cu`) and the stem's max-pooling
//! with a gather backward (`kernels/src/pool.cu`); each file's header says what was measured.
//!
//! `simtrans-kernels` compiles `kernels/src/*.cu` to PTX and embeds it; the driver compiles it for the GPU at
//! the first launch. Which kernel runs when, on which grid, is [`crate::launch`]'s (written
//! once for the GPU and the CPU emulator of the tests); here is [`Cuda`], which queues those
//! launches on a device's stream, and the SGD update on candle tensors.
//! `gpu.own_batch_norm = false` sends training-mode BatchNorm back to cuDNN, to measure the
//! difference.

use crate::launch::{Arg, Launch, Module, Runner};
use crate::storage::{cuda_of, ptr};
use candle_core::cuda::{CudaDevice, CudaStorage, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Result, Storage, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg};
use simtrans_kernels::{BN, HEAD, POOL, SGD};
use std::cell::RefCell;
use std::collections::HashMap;

/// Whether BatchNorm runs on these kernels: yes unless `gpu.own_batch_norm = false`, which
/// gives training mode back to cuDNN and evaluation mode back to candle's tensor ops.
pub fn own_batch_norm() -> bool {
    crate::gpu::settings().own_batch_norm
}

fn err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("simtrans CUDA kernel: {e:?}"))
}

thread_local! {
    static FUNCS: RefCell<HashMap<(DeviceId, &'static str), CudaFunction>> =
        RefCell::new(HashMap::new());
}

/// The kernel `name` of `module` on `dev`, loaded once per thread.
fn func_of(dev: &CudaDevice, module: Module, name: &'static str) -> Result<CudaFunction> {
    FUNCS.with(|f| {
        let mut f = f.borrow_mut();
        if let Some(found) = f.get(&(dev.id(), name)) {
            return Ok(found.clone());
        }
        let (module_name, ptx) = match module {
            Module::Bn => BN,
            Module::Head => HEAD,
            Module::Pool => POOL,
            Module::Sgd => SGD,
        };
        let loaded = dev
            .get_or_load_custom_func(name, module_name, ptx)?
            .into_cuda_function();
        f.insert((dev.id(), name), loaded.clone());
        Ok(loaded)
    })
}

/// Runs the launch sequences of [`crate::launch`] on a CUDA device, queued on its stream.
pub struct Cuda<'a>(pub &'a CudaDevice);

impl Runner for Cuda<'_> {
    type Buf = CudaSlice<u8>;
    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // cudaMalloc's (and the stream pool's) allocations are 256-byte aligned.
        crate::hostprof::timed("alloc", || unsafe { self.0.alloc::<u8>(bytes.max(1)) })
    }
    fn addr(&self, buf: &mut CudaSlice<u8>) -> u64 {
        // One stream orders every access, so the guard's event is not needed.
        buf.device_ptr_mut(&self.0.cuda_stream()).0
    }
    fn launch(&self, module: Module, name: &'static str, at: Launch, args: &[Arg]) -> Result<()> {
        let _timer = crate::hostprof::Timer::start("kernel launch");
        let f = func_of(self.0, module, name)?;
        let stream = self.0.cuda_stream();
        let mut b = stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (at.grid.0, at.grid.1, 1),
            block_dim: (at.block, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(err)?;
        Ok(())
    }
}

/// PyTorch's SGD step for one f32 CUDA variable `p` with gradient `g`, in place on the device
/// and in one pass (`kernels/src/sgd.cu`): `d = g + λ·p`; with momentum μ, `buf ← μ·buf + d`
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
    let mut bufs = sgd_update_many(&[(param, grad, buf)], lr, momentum, weight_decay)?;
    Ok(bufs.pop().flatten())
}

/// [`sgd_update`] on many f32 CUDA variables of one device, eight per launch
/// ([`crate::launch::sgd_steps`]): `(param, grad, momentum buffer)` each. Returns each one's
/// momentum buffer as [`sgd_update`] does. Parameters with and without a buffer may mix; the
/// buffers made here are fresh ones.
pub fn sgd_update_many(
    items: &[(&Tensor, &Tensor, Option<&Tensor>)],
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> Result<Vec<Option<Tensor>>> {
    let _timer = crate::hostprof::Timer::start("sgd update");
    let Some((first, _, _)) = items.first() else {
        return Ok(vec![]);
    };
    let candle_core::Device::Cuda(dev) = first.device() else {
        bail!("sgd_update_many needs CUDA tensors")
    };
    let grads: Vec<Tensor> = items
        .iter()
        .map(|(_, g, _)| g.contiguous())
        .collect::<Result<_>>()?;
    // Every buffer before any launch: the given ones, or fresh ones the kernels write.
    let mut bufs = Vec::with_capacity(items.len());
    for ((p, g, b), g2) in items.iter().zip(&grads) {
        if p.dtype() != DType::F32 || g2.dtype() != DType::F32 || !p.is_contiguous() {
            bail!("sgd_update_many needs contiguous f32 tensors")
        }
        if p.shape() != g.shape() || b.is_some_and(|b| b.shape() != p.shape() || !b.is_contiguous())
        {
            bail!(
                "sgd_update_many: parameter {:?}, gradient {:?}, momentum buffer {:?}",
                p.shape(),
                g.shape(),
                b.map(|b| b.shape())
            )
        }
        bufs.push(match (b, momentum != 0.0) {
            (_, false) => (None, false),
            (Some(b), true) => (Some((*b).clone()), false),
            (None, true) => {
                let fresh = unsafe { dev.alloc::<f32>(p.elem_count()) }?;
                let t = Tensor::from_storage(
                    Storage::Cuda(CudaStorage::wrap_cuda_slice(fresh, dev.clone())),
                    p.shape().clone(),
                    BackpropOp::none(),
                    false,
                );
                (Some(t), true)
            }
        });
    }
    let stream = dev.cuda_stream();
    for fresh in [false, true] {
        let chosen: Vec<usize> = (0..items.len()).filter(|&i| bufs[i].1 == fresh).collect();
        if chosen.is_empty() {
            continue;
        }
        let locked: Vec<_> = chosen
            .iter()
            .map(|&i| {
                (
                    items[i].0.storage_and_layout(),
                    grads[i].storage_and_layout(),
                    bufs[i].0.as_ref().map(|b| b.storage_and_layout()),
                )
            })
            .collect();
        let mut guards = Vec::with_capacity(3 * locked.len());
        let mut tensors = Vec::with_capacity(locked.len());
        for ((ps, pl), (gs, gl), b) in &locked {
            let (pp, g1) = ptr(cuda_of(ps)?, pl, &stream)?;
            let (pg, g2) = ptr(cuda_of(gs)?, gl, &stream)?;
            guards.push(g1);
            guards.push(g2);
            let pb = match b {
                Some((bs, bl)) => {
                    let (pb, g3) = ptr(cuda_of(bs)?, bl, &stream)?;
                    guards.push(g3);
                    pb
                }
                None => 0,
            };
            tensors.push(crate::launch::SgdTensor {
                p: pp,
                g: pg,
                buf: pb,
                n: pl.shape().elem_count(),
            });
        }
        crate::launch::sgd_steps(&Cuda(dev), &tensors, (lr, momentum, weight_decay), fresh)?;
        drop(guards);
    }
    Ok(bufs.into_iter().map(|(b, _)| b).collect())
}
