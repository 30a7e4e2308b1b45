//! Access to candle's CUDA storage for the ops that launch work themselves (`cudnn`,
//! `kernels`, `headops`): a tensor's storage, device addresses with the guards that order their
//! use on a stream, fresh buffers, and results wrapped back into tensors.
//!
//! Why a module of its own: all three need these and nothing else of one another, so keeping
//! them here keeps the dependencies between those modules one-way.

use crate::hostprof;
use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

pub(crate) fn cuda_of(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("the cuDNN path needs every tensor on the CUDA device"),
    }
}

pub(crate) fn wrap(s: CudaStorage, shape: &Shape) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape.clone(), BackpropOp::none(), false)
}

/// The device address of a contiguous tensor's first element (its storage plus the layout's
/// offset), with the guard that orders the access on `stream`.
pub(crate) fn ptr<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let Some((start, _)) = l.contiguous_offsets() else {
        bail!("the cuDNN path needs contiguous tensors")
    };
    ptr_at(s, start, stream)
}

/// The device address of element `start` of a storage (any layout), with the guard that
/// orders the access on `stream`.
pub(crate) fn ptr_at<'a>(
    s: &'a CudaStorage,
    start: usize,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    fn at<'a, T>(
        s: &'a CudaSlice<T>,
        start: usize,
        stream: &'a CudaStream,
    ) -> (u64, SyncOnDrop<'a>) {
        let (p, g) = s.device_ptr(stream);
        (p + (start * std::mem::size_of::<T>()) as u64, g)
    }
    Ok(match &s.slice {
        CudaStorageSlice::F32(x) => at(x, start, stream),
        CudaStorageSlice::BF16(x) => at(x, start, stream),
        CudaStorageSlice::F16(x) => at(x, start, stream),
        CudaStorageSlice::U32(x) => at(x, start, stream),
        _ => bail!(
            "the cuDNN path supports f32, bf16, f16 (and u32 indices), not {:?}",
            s.dtype()
        ),
    })
}

/// A fresh buffer of `n` elements of `dtype` and its address.
pub(crate) fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    let _timer = hostprof::Timer::start("alloc");
    let d = dev.clone();
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n) }?, d),
        DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n) }?, d),
        DType::F16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::f16>(n) }?, d),
        other => bail!("the cuDNN path supports f32, bf16 and f16, not {other:?}"),
    })
}

pub(crate) fn ptr_mut<'a>(
    s: &'a mut CudaStorage,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let dtype = s.dtype();
    Ok(match &mut s.slice {
        CudaStorageSlice::F32(x) => x.device_ptr_mut(stream),
        CudaStorageSlice::BF16(x) => x.device_ptr_mut(stream),
        CudaStorageSlice::F16(x) => x.device_ptr_mut(stream),
        _ => bail!("the cuDNN path supports f32, bf16 and f16, not {dtype:?}"),
    })
}

pub(crate) fn cpu_refused(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name} is the cuDNN kernel and runs on CUDA devices only")
}
