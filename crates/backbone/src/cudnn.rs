//! cuDNN kernels for the training hot path on CUDA devices (built with `--features cuda`).
//!
//! candle 0.11 trains a ResNet on CUDA correctly but slowly: its convolution is im2col + GEMM
//! forward and goes through `conv_transpose2d` backward, and a training-mode BatchNorm written
//! with tensor ops costs about ten passes over every activation. Measured on an H100 (issue #9)
//! that gave 104 ResNet-50 training images/s at batch 64 where PyTorch reaches 1706. This module
//! hands both layers to cuDNN, which is what PyTorch calls for them:
//!
//! - [`conv2d`]: forward, backward-data and backward-filter convolutions (NCHW, f32 or bf16
//!   data with f32 accumulation). Algorithms come from cuDNN's heuristics (as PyTorch without
//!   `benchmark=True`) and are cached per geometry. [`Precision::F32`] asks for FMA math, so
//!   the result matches the CPU to rounding; `tf32` and `bf16` allow tensor-core math.
//! - [`batch_norm_train`]: one fused forward that also moves the running statistics (momentum,
//!   unbiased variance: PyTorch's rule) and one fused backward giving all three gradients.
//!
//! Each is a candle custom op, so autograd, the optimiser and every other op see ordinary
//! tensors that stay on the device. The ops refuse the CPU; callers dispatch on the device.

use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use cudarc::cudnn::{result as dnn, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use simtrans_core::device::{precision, Precision};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::Mutex;

/// Whether CUDA tensors take this path: yes unless the environment sets `SIMTRANS_CUDNN=0`,
/// which falls back to candle's own convolution and the tensor-op BatchNorm (to measure the
/// difference on the same machine, as `scripts/gpu-bench.sh` does).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SIMTRANS_CUDNN").map_or(true, |v| v != "0"))
}

fn err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN: {e:?}"))
}

/// A cuDNN handle bound to a device's stream. Handles are per thread (cuDNN's rule) and per
/// device, created on first use.
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // At thread exit the context may already be gone; nothing useful can be done then.
        let _ = unsafe { dnn::destroy_handle(self.0) };
    }
}

/// What a convolution call needs from cuDNN's algorithm choice.
#[derive(Clone, Copy)]
enum Algo {
    Fwd(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

thread_local! {
    static HANDLES: RefCell<HashMap<candle_core::cuda::DeviceId, Rc<Handle>>> =
        RefCell::new(HashMap::new());
    /// (pass, geometry, dtype, math) → (algorithm, workspace bytes).
    static ALGOS: RefCell<HashMap<(u8, Geom, DType, Precision), (Algo, usize)>> =
        RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> Result<Rc<Handle>> {
    HANDLES.with(|h| {
        let mut h = h.borrow_mut();
        if let Some(found) = h.get(&dev.id()) {
            return Ok(found.clone());
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().map_err(err)?;
        let raw = dnn::create_handle().map_err(err)?;
        let made = Rc::new(Handle(raw));
        unsafe { dnn::set_stream(raw, stream.cu_stream() as *mut _) }.map_err(err)?;
        h.insert(dev.id(), made.clone());
        Ok(made)
    })
}

fn data_type(dtype: DType) -> Result<sys::cudnnDataType_t> {
    Ok(match dtype {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        other => bail!("the cuDNN path supports f32, bf16 and f16, not {other:?}"),
    })
}

struct TensorDesc(sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    fn nchw(dtype: sys::cudnnDataType_t, dims: [usize; 4]) -> Result<Self> {
        let d = TensorDesc(dnn::create_tensor_descriptor().map_err(err)?);
        unsafe {
            dnn::set_tensor4d_descriptor(
                d.0,
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                dtype,
                dims.map(|x| x as i32),
            )
        }
        .map_err(err)?;
        Ok(d)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        let _ = unsafe { dnn::destroy_tensor_descriptor(self.0) };
    }
}

struct FilterDesc(sys::cudnnFilterDescriptor_t);

impl Drop for FilterDesc {
    fn drop(&mut self) {
        let _ = unsafe { dnn::destroy_filter_descriptor(self.0) };
    }
}

struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

impl Drop for ConvDesc {
    fn drop(&mut self) {
        let _ = unsafe { dnn::destroy_convolution_descriptor(self.0) };
    }
}

/// The geometry of one convolution: input `[b, c, h, w]`, weight `[o, c, k, k]`, output
/// `[b, o, ho, wo]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    pad: usize,
    stride: usize,
}

impl Geom {
    fn out(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.kh) / self.stride + 1,
            (self.w + 2 * self.pad - self.kw) / self.stride + 1,
        )
    }
    fn x_dims(&self) -> [usize; 4] {
        [self.b, self.c, self.h, self.w]
    }
    fn w_dims(&self) -> [usize; 4] {
        [self.o, self.c, self.kh, self.kw]
    }
    fn y_dims(&self) -> [usize; 4] {
        let (ho, wo) = self.out();
        [self.b, self.o, ho, wo]
    }
}

/// The three descriptors and the convolution descriptor of one geometry in one dtype.
struct Descs {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
}

fn descs(g: &Geom, dtype: DType, p: Precision) -> Result<Descs> {
    let dt = data_type(dtype)?;
    let w = FilterDesc(dnn::create_filter_descriptor().map_err(err)?);
    unsafe {
        dnn::set_filter4d_descriptor(
            w.0,
            dt,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            g.w_dims().map(|x| x as i32),
        )
    }
    .map_err(err)?;
    let conv = ConvDesc(dnn::create_convolution_descriptor().map_err(err)?);
    let (pad, stride) = (g.pad as i32, g.stride as i32);
    unsafe {
        dnn::set_convolution2d_descriptor(
            conv.0,
            pad,
            pad,
            stride,
            stride,
            1,
            1,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )
    }
    .map_err(err)?;
    // cuDNN's default math allows TF32 for f32 data on Ampere and later; exact f32 needs FMA.
    let math = match (p, dtype) {
        (Precision::F32, DType::F32) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    };
    unsafe { dnn::set_convolution_math_type(conv.0, math) }.map_err(err)?;
    Ok(Descs {
        x: TensorDesc::nchw(dt, g.x_dims())?,
        w,
        y: TensorDesc::nchw(dt, g.y_dims())?,
        conv,
    })
}

/// The heuristically best algorithm for a pass (0 forward, 1 backward-data, 2 backward-filter)
/// and its workspace size, cached per geometry.
fn algorithm(pass: u8, h: &Handle, d: &Descs, g: &Geom, dtype: DType) -> Result<(Algo, usize)> {
    let p = precision();
    let key = (pass, *g, dtype, p);
    if let Some(found) = ALGOS.with(|a| a.borrow().get(&key).copied()) {
        return Ok(found);
    }
    const MAX: usize = 8;
    let mut count = 0i32;
    let chosen = unsafe {
        match pass {
            0 => {
                let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; MAX] = std::mem::zeroed();
                dnn::get_convolution_forward_algorithm(
                    h.0,
                    d.x.0,
                    d.w.0,
                    d.conv.0,
                    d.y.0,
                    MAX as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                )
                .map_err(err)?;
                let best = perf[..count as usize]
                    .iter()
                    .find(|r| r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                    .ok_or_else(|| err("no forward algorithm for this convolution"))?;
                let ws = dnn::get_convolution_forward_workspace_size(
                    h.0, d.x.0, d.w.0, d.conv.0, d.y.0, best.algo,
                )
                .map_err(err)?;
                (Algo::Fwd(best.algo), ws)
            }
            1 => {
                let mut perf: [sys::cudnnConvolutionBwdDataAlgoPerf_t; MAX] = std::mem::zeroed();
                dnn::get_convolution_backward_data_algorithm(
                    h.0,
                    d.w.0,
                    d.y.0,
                    d.conv.0,
                    d.x.0,
                    MAX as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                )
                .map_err(err)?;
                let best = perf[..count as usize]
                    .iter()
                    .find(|r| r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                    .ok_or_else(|| err("no backward-data algorithm for this convolution"))?;
                let ws = dnn::get_convolution_backward_data_workspace_size(
                    h.0, d.w.0, d.y.0, d.conv.0, d.x.0, best.algo,
                )
                .map_err(err)?;
                (Algo::Data(best.algo), ws)
            }
            _ => {
                let mut perf: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; MAX] = std::mem::zeroed();
                dnn::get_convolution_backward_filter_algorithm(
                    h.0,
                    d.x.0,
                    d.y.0,
                    d.conv.0,
                    d.w.0,
                    MAX as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                )
                .map_err(err)?;
                let best = perf[..count as usize]
                    .iter()
                    .find(|r| r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                    .ok_or_else(|| err("no backward-filter algorithm for this convolution"))?;
                let ws = dnn::get_convolution_backward_filter_workspace_size(
                    h.0, d.x.0, d.y.0, d.conv.0, d.w.0, best.algo,
                )
                .map_err(err)?;
                (Algo::Filter(best.algo), ws)
            }
        }
    };
    ALGOS.with(|a| a.borrow_mut().insert(key, chosen));
    Ok(chosen)
}

/// The device address of a contiguous tensor's first element (its storage plus the layout's
/// offset), with the guard that orders the access on `stream`.
fn ptr<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let Some((start, _)) = l.contiguous_offsets() else {
        bail!("the cuDNN path needs contiguous tensors")
    };
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
        _ => bail!(
            "the cuDNN path supports f32, bf16 and f16, not {:?}",
            s.dtype()
        ),
    })
}

/// A fresh buffer of `n` elements of `dtype` and its address.
fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    let d = dev.clone();
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n) }?, d),
        DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n) }?, d),
        DType::F16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::f16>(n) }?, d),
        other => bail!("the cuDNN path supports f32, bf16 and f16, not {other:?}"),
    })
}

fn ptr_mut<'a>(s: &'a mut CudaStorage, stream: &'a CudaStream) -> Result<(u64, SyncOnDrop<'a>)> {
    let dtype = s.dtype();
    Ok(match &mut s.slice {
        CudaStorageSlice::F32(x) => x.device_ptr_mut(stream),
        CudaStorageSlice::BF16(x) => x.device_ptr_mut(stream),
        CudaStorageSlice::F16(x) => x.device_ptr_mut(stream),
        _ => bail!("the cuDNN path supports f32, bf16 and f16, not {dtype:?}"),
    })
}

/// Runs one convolution pass. `a` and `b` are the two inputs of the pass (forward: x, w;
/// backward-data: dy, w; backward-filter: x, dy); the output has `out_dims`.
fn conv_pass(
    pass: u8,
    g: &Geom,
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    out_dims: [usize; 4],
) -> Result<(CudaStorage, Shape)> {
    let dev = a.device().clone();
    let dtype = a.dtype();
    if b.dtype() != dtype {
        bail!("cuDNN convolution: inputs in {dtype:?} and {:?}", b.dtype())
    }
    let stream = dev.cuda_stream();
    let h = handle(&dev)?;
    let d = descs(g, dtype, precision())?;
    let (algo, ws_bytes) = algorithm(pass, &h, &d, g, dtype)?;
    let mut work = if ws_bytes > 0 {
        Some(unsafe { dev.alloc::<u8>(ws_bytes) }?)
    } else {
        None
    };
    let mut out = alloc(&dev, dtype, out_dims.iter().product())?;
    {
        let (pa, _ga) = ptr(a, al, &stream)?;
        let (pb, _gb) = ptr(b, bl, &stream)?;
        let (po, _go) = ptr_mut(&mut out, &stream)?;
        let (pw, _gw) = match work.as_mut() {
            Some(w) => {
                let (p, g) = w.device_ptr_mut(&stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (one, zero) = (1f32, 0f32);
        let one = &one as *const f32 as *const c_void;
        let zero = &zero as *const f32 as *const c_void;
        let (pa, pb, po, pw) = (
            pa as *const c_void,
            pb as *const c_void,
            po as *mut c_void,
            pw as *mut c_void,
        );
        unsafe {
            match algo {
                Algo::Fwd(algo) => dnn::convolution_forward(
                    h.0, one, d.x.0, pa, d.w.0, pb, d.conv.0, algo, pw, ws_bytes, zero, d.y.0, po,
                ),
                Algo::Data(algo) => dnn::convolution_backward_data(
                    h.0, one, d.w.0, pb, d.y.0, pa, d.conv.0, algo, pw, ws_bytes, zero, d.x.0, po,
                ),
                Algo::Filter(algo) => dnn::convolution_backward_filter(
                    h.0, one, d.x.0, pa, d.y.0, pb, d.conv.0, algo, pw, ws_bytes, zero, d.w.0, po,
                ),
            }
        }
        .map_err(err)?;
    }
    Ok((out, Shape::from(out_dims.to_vec())))
}

fn cpu_refused(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name} is the cuDNN kernel and runs on CUDA devices only")
}

/// `conv(x, w)`, differentiable in both arguments.
struct ConvFwd(Geom);
/// `∂/∂x` from `(dy, w)`.
struct ConvBwdData(Geom);
/// `∂/∂w` from `(x, dy)`.
struct ConvBwdFilter(Geom);

impl CustomOp2 for ConvFwd {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
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
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        conv_pass(0, &self.0, (x, xl), (w, wl), self.0.y_dims())
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The image fed to the stem tracks no gradient: skip its (large) backward-data pass.
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &ConvBwdData(self.0))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &ConvBwdFilter(self.0))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl CustomOp2 for ConvBwdData {
    fn name(&self) -> &'static str {
        "cudnn-conv2d-backward-data"
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
        dy: &CudaStorage,
        dyl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        conv_pass(1, &self.0, (dy, dyl), (w, wl), self.0.x_dims())
    }
}

impl CustomOp2 for ConvBwdFilter {
    fn name(&self) -> &'static str {
        "cudnn-conv2d-backward-filter"
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
        dy: &CudaStorage,
        dyl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        conv_pass(2, &self.0, (x, xl), (dy, dyl), self.0.w_dims())
    }
}

/// `conv2d(x [B, C, H, W], w [O, C, kh, kw])` with zero padding and stride (no dilation, no
/// groups) through cuDNN; `x` and `w` on the same CUDA device in the same dtype.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, c2, kh, kw) = w.dims4()?;
    if c != c2 || h + 2 * padding < kh || wd + 2 * padding < kw || stride == 0 {
        bail!(
            "conv2d: input {:?} does not fit weight {:?}",
            x.dims(),
            w.dims()
        )
    }
    let g = Geom {
        b,
        c,
        h,
        w: wd,
        o,
        kh,
        kw,
        pad: padding,
        stride,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, ConvFwd(g))
}

/// Training-mode BatchNorm of a contiguous `[B, C, H, W]` input (`[B, C]` is `H = W = 1`).
struct BnTrain {
    dims: [usize; 4],
    eps: f64,
    momentum: f64,
    /// Running mean and variance (f32 `[C]`), moved in place by the forward pass.
    running: Option<(Tensor, Tensor)>,
    /// The batch mean and inverse standard deviation cuDNN saved for the backward pass.
    saved: Mutex<Option<(CudaSlice<f32>, CudaSlice<f32>)>>,
}

fn cuda_of<'a>(s: &'a Storage) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("the cuDNN BatchNorm needs every tensor on the CUDA device"),
    }
}

fn f32_param_ptr<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    if s.dtype() != DType::F32 {
        bail!(
            "BatchNorm parameters and statistics must be f32, got {:?}",
            s.dtype()
        )
    }
    ptr(s, l, stream)
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "cudnn-batchnorm-train"
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
        let dev = x.device().clone();
        let stream = dev.cuda_stream();
        let h = handle(&dev)?;
        let c = self.dims[1];
        let xd = TensorDesc::nchw(data_type(x.dtype())?, self.dims)?;
        let pd = TensorDesc::nchw(sys::cudnnDataType_t::CUDNN_DATA_FLOAT, [1, c, 1, 1])?;
        let mut y = alloc(&dev, x.dtype(), self.dims.iter().product())?;
        let mut mean = unsafe { dev.alloc::<f32>(c) }?;
        let mut inv_std = unsafe { dev.alloc::<f32>(c) }?;
        {
            let locks = self
                .running
                .as_ref()
                .map(|(m, v)| (m.storage_and_layout(), v.storage_and_layout()));
            let mut keep = Vec::new();
            let (pm, pv) = match &locks {
                Some(((ms, ml), (vs, vl))) => {
                    let (pm, gm) = f32_param_ptr(cuda_of(ms)?, ml, &stream)?;
                    let (pv, gv) = f32_param_ptr(cuda_of(vs)?, vl, &stream)?;
                    keep.push(gm);
                    keep.push(gv);
                    (pm, pv)
                }
                None => (0, 0),
            };
            let (px, _gx) = ptr(x, xl, &stream)?;
            let (pw, _gw) = f32_param_ptr(w, wl, &stream)?;
            let (pb, _gb) = f32_param_ptr(b, bl, &stream)?;
            let (py, _gy) = ptr_mut(&mut y, &stream)?;
            let (pmean, _g1) = mean.device_ptr_mut(&stream);
            let (pinv, _g2) = inv_std.device_ptr_mut(&stream);
            let (one, zero) = (1f32, 0f32);
            unsafe {
                sys::cudnnBatchNormalizationForwardTraining(
                    h.0,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    &one as *const f32 as *const c_void,
                    &zero as *const f32 as *const c_void,
                    xd.0,
                    px as *const c_void,
                    xd.0,
                    py as *mut c_void,
                    pd.0,
                    pw as *const c_void,
                    pb as *const c_void,
                    self.momentum,
                    pm as *mut c_void,
                    pv as *mut c_void,
                    self.eps,
                    pmean as *mut c_void,
                    pinv as *mut c_void,
                )
            }
            .result()
            .map_err(err)?;
        }
        *self.saved.lock().expect("batchnorm saved statistics") = Some((mean, inv_std));
        Ok((y, xl.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let saved = self.saved.lock().expect("batchnorm saved statistics");
        let Some((mean, inv_std)) = saved.as_ref() else {
            bail!("BatchNorm backward before its forward pass")
        };
        let c = self.dims[1];
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (xs, gs, ws) = (cuda_of(&xs)?, cuda_of(&gs)?, cuda_of(&ws)?);
        let dev = xs.device().clone();
        let stream = dev.cuda_stream();
        let h = handle(&dev)?;
        let xd = TensorDesc::nchw(data_type(xs.dtype())?, self.dims)?;
        let pd = TensorDesc::nchw(sys::cudnnDataType_t::CUDNN_DATA_FLOAT, [1, c, 1, 1])?;
        let mut dx = alloc(&dev, xs.dtype(), self.dims.iter().product())?;
        let mut dw = alloc(&dev, DType::F32, c)?;
        let mut db = alloc(&dev, DType::F32, c)?;
        {
            let (px, _gx) = ptr(xs, xl, &stream)?;
            let (pg, _gg) = ptr(gs, gl, &stream)?;
            let (pw, _gw) = f32_param_ptr(ws, wl, &stream)?;
            let (pdx, _g1) = ptr_mut(&mut dx, &stream)?;
            let (pdw, _g2) = ptr_mut(&mut dw, &stream)?;
            let (pdb, _g3) = ptr_mut(&mut db, &stream)?;
            let (pm, _g4) = mean.device_ptr(&stream);
            let (pi, _g5) = inv_std.device_ptr(&stream);
            let (one, zero) = (1f32, 0f32);
            let (one, zero) = (
                &one as *const f32 as *const c_void,
                &zero as *const f32 as *const c_void,
            );
            unsafe {
                sys::cudnnBatchNormalizationBackward(
                    h.0,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    one,
                    zero,
                    one,
                    zero,
                    xd.0,
                    px as *const c_void,
                    xd.0,
                    pg as *const c_void,
                    xd.0,
                    pdx as *mut c_void,
                    pd.0,
                    pw as *const c_void,
                    pdw as *mut c_void,
                    pdb as *mut c_void,
                    self.eps,
                    pm as *const c_void,
                    pi as *const c_void,
                )
            }
            .result()
            .map_err(err)?;
        }
        let wrap = |s: CudaStorage, shape: &Shape| {
            Tensor::from_storage(Storage::Cuda(s), shape.clone(), BackpropOp::none(), false)
        };
        let pshape = Shape::from(c);
        Ok((
            Some(wrap(dx, x.shape())),
            Some(wrap(dw, &pshape)),
            Some(wrap(db, &pshape)),
        ))
    }
}

/// Training-mode BatchNorm through cuDNN: normalises `x` (`[B, C]` or `[B, C, H, W]`, f32 or
/// bf16) with its batch statistics and the f32 `weight`/`bias`; when `running` is given, moves
/// the running mean and variance in place (`r ← (1 − momentum)·r + momentum·batch`, unbiased
/// batch variance), as PyTorch does.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running: Option<(&Tensor, &Tensor)>,
    eps: f64,
    momentum: f64,
) -> Result<Tensor> {
    let dims = match *x.dims() {
        [b, c] => [b, c, 1, 1],
        [b, c, h, w] => [b, c, h, w],
        _ => bail!(
            "BatchNorm expects [B, C] or [B, C, H, W], got {:?}",
            x.dims()
        ),
    };
    let op = BnTrain {
        dims,
        eps,
        momentum,
        running: running.map(|(m, v)| (m.clone(), v.clone())),
        saved: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}
