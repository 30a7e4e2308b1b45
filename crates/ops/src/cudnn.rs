//! cuDNN kernels for the training hot path on CUDA devices (built with `--features cuda`).
//!
//! candle 0.11 trains a ResNet on CUDA correctly but slowly: its convolution is im2col + GEMM
//! forward and goes through `conv_transpose2d` backward, and a training-mode BatchNorm written
//! with tensor ops costs about ten passes over every activation. Measured on an H100 (issue #9)
//! that gave 104 ResNet-50 training images/s at batch 64 where PyTorch reaches 1706. This module
//! hands both layers to cuDNN, which is what PyTorch calls for them:
//!
//! - [`conv2d`]: forward, backward-data and backward-filter convolutions (NCHW, f32 or bf16
//!   data with f32 accumulation). Each runs on an execution plan of cuDNN's backend API,
//!   built once per geometry from cuDNN's heuristics (as PyTorch without `benchmark=True`);
//!   the legacy calls remain for `gpu.cudnn_graph = false`, measured algorithm choice and any
//!   geometry without a plan. [`Precision::F32`] excludes tensor-core (TF32) engines, so the
//!   result matches the CPU to rounding; `tf32` and `bf16` allow them.
//! - [`batch_norm_train`] and [`batch_norm_eval`]: one fused forward (training mode also moves
//!   the running statistics: momentum, unbiased variance, PyTorch's rule) and one fused
//!   backward giving all three gradients, optionally with the ReLU that follows folded in (one
//!   autograd node instead of two). They run on our own kernels ([`crate::kernels`]), which
//!   make fewer passes than cuDNN's BatchNorm; `gpu.own_batch_norm = false` gives training mode back to
//!   cuDNN.
//! - [`residual_blocks`]: a run of whole ResNet blocks as one op, so candle's autograd sees
//!   one node instead of about ten per block.
//! - [`add_relu`] (a residual block's tail) and [`max_pool_3x3_s2_p1`] (the stem), so the
//!   ReLUs and the pooling do not go through candle's multi-pass elementwise backward.
//!
//! Each is a candle custom op, so autograd, the optimiser and every other op see ordinary
//! tensors that stay on the device. The ops refuse the CPU; callers dispatch on the device.

use crate::storage::{alloc, cpu_refused, cuda_of, ptr, ptr_mut, wrap};
use crate::{gpu, hostprof, kernels, launch};
use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDevice, CudaStorage};
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    StorageRef, Tensor,
};
use cudarc::cudnn::{result as dnn, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use simtrans_core::device::{precision, Precision};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

mod graph;

/// Whether CUDA tensors take this path: yes unless `gpu.cudnn = false`, which falls back to
/// candle's own convolution and the tensor-op BatchNorm (to measure the difference on the same
/// machine, as `scripts/gpu-bench.sh` does).
pub fn enabled() -> bool {
    gpu::settings().cudnn
}

/// An owned cuDNN object of raw type `$raw`, destroyed with `$destroy` when dropped. A failure
/// then is ignored: at thread exit the context may already be gone, and nothing useful can be
/// done about it.
macro_rules! owned {
    ($(#[$doc:meta])* $name:ident($raw:ty), $destroy:path) => {
        $(#[$doc])*
        struct $name($raw);

        impl Drop for $name {
            fn drop(&mut self) {
                let _ = unsafe { $destroy(self.0) };
            }
        }
    };
}

fn err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN: {e:?}"))
}

owned!(
    /// A cuDNN handle bound to a device's stream. Handles are per thread (cuDNN's rule) and
    /// per device, created on first use.
    Handle(sys::cudnnHandle_t),
    dnn::destroy_handle
);

/// What a convolution call needs from cuDNN's algorithm choice.
#[derive(Clone, Copy)]
enum Algo {
    Fwd(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// (pass, geometry, dtype, precision) of a cached algorithm choice.
type AlgoKey = (u8, Geom, DType, Precision);

thread_local! {
    static HANDLES: RefCell<HashMap<candle_core::cuda::DeviceId, Rc<Handle>>> =
        RefCell::new(HashMap::new());
    /// (pass, geometry, dtype, math) → (algorithm, workspace bytes).
    static ALGOS: RefCell<HashMap<AlgoKey, (Algo, usize)>> =
        RefCell::new(HashMap::new());
    /// (0, geometry, dtype, math) → the convolution's descriptors.
    static DESCS: RefCell<HashMap<AlgoKey, Rc<Descs>>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> Result<Rc<Handle>> {
    HANDLES.with(|h| {
        let mut h = h.borrow_mut();
        if let Some(found) = h.get(&dev.id()) {
            return Ok(found.clone());
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().map_err(err)?;
        keep_freed_memory(stream.context())?;
        let raw = dnn::create_handle().map_err(err)?;
        let made = Rc::new(Handle(raw));
        unsafe { dnn::set_stream(raw, stream.cu_stream() as *mut _) }.map_err(err)?;
        h.insert(dev.id(), made.clone());
        Ok(made)
    })
}

/// Tells the device's stream-ordered memory pool (which candle allocates from) to keep freed
/// memory instead of returning it to the driver at every synchronisation, its default: a
/// training step reads its loss back, so otherwise every step would map its working memory
/// afresh. PyTorch's caching allocator behaves like this too. Measured in BENCHMARKS.md's run 7
/// (tf32, batch 8 / 64 / 128 / SimNet / similarity matrix): the driver's default gave 307 / 1651
/// / 2039 / 1349 / 3236 images/s against 386 / 1782 / 2042 / 1357 / 4377 this way, so the
/// switch that kept the default is gone.
fn keep_freed_memory(ctx: &cudarc::driver::CudaContext) -> Result<()> {
    use cudarc::driver::sys as drv;
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool: drv::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    unsafe {
        drv::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(err)?;
        drv::cuMemPoolSetAttribute(
            pool,
            drv::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        )
        .result()
        .map_err(err)
    }
}

fn data_type(dtype: DType) -> Result<sys::cudnnDataType_t> {
    Ok(match dtype {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        other => bail!("the cuDNN path supports f32, bf16 and f16, not {other:?}"),
    })
}

owned!(
    TensorDesc(sys::cudnnTensorDescriptor_t),
    dnn::destroy_tensor_descriptor
);

impl TensorDesc {
    fn nchw(dtype: sys::cudnnDataType_t, dims: [usize; 4]) -> Result<Self> {
        Self::new(sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, dtype, dims)
    }
    /// A tensor of logical dims `[n, c, h, w]` stored in `format`.
    fn new(
        format: sys::cudnnTensorFormat_t,
        dtype: sys::cudnnDataType_t,
        dims: [usize; 4],
    ) -> Result<Self> {
        let d = TensorDesc(dnn::create_tensor_descriptor().map_err(err)?);
        unsafe { dnn::set_tensor4d_descriptor(d.0, format, dtype, dims.map(|x| x as i32)) }
            .map_err(err)?;
        Ok(d)
    }
}

owned!(
    FilterDesc(sys::cudnnFilterDescriptor_t),
    dnn::destroy_filter_descriptor
);
owned!(
    ConvDesc(sys::cudnnConvolutionDescriptor_t),
    dnn::destroy_convolution_descriptor
);
owned!(
    /// A ReLU (NaN-propagating, as PyTorch's).
    ReluDesc(sys::cudnnActivationDescriptor_t),
    sys::cudnnDestroyActivationDescriptor
);

impl ReluDesc {
    fn new() -> Result<Self> {
        let d = ReluDesc(dnn::create_activation_descriptor().map_err(err)?);
        unsafe {
            dnn::set_activation_descriptor(
                d.0,
                sys::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU,
                sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                0.0,
            )
        }
        .map_err(err)?;
        Ok(d)
    }
}

const ONE: f32 = 1.0;
const ZERO: f32 = 0.0;
fn one() -> *const c_void {
    &ONE as *const f32 as *const c_void
}
fn zero() -> *const c_void {
    &ZERO as *const f32 as *const c_void
}

/// `[B, C, H, W]` of a rank-2 or rank-4 shape (`[B, C]` is `H = W = 1`).
fn nchw(dims: &[usize]) -> Result<[usize; 4]> {
    Ok(match *dims {
        [b, c] => [b, c, 1, 1],
        [b, c, h, w] => [b, c, h, w],
        _ => bail!("expected [B, C] or [B, C, H, W], got {dims:?}"),
    })
}

/// ReLU in place on a contiguous buffer described by `desc`.
fn relu_in_place(h: &Handle, desc: &TensorDesc, y: u64) -> Result<()> {
    let act = ReluDesc::new()?;
    unsafe {
        sys::cudnnActivationForward(
            h.0,
            act.0,
            one(),
            desc.0,
            y as *const c_void,
            zero(),
            desc.0,
            y as *mut c_void,
        )
    }
    .result()
    .map_err(err)
}

/// `dx = dy · [y > 0]` for the ReLU output `y`.
fn relu_backward(h: &Handle, desc: &TensorDesc, y: u64, dy: u64, dx: u64) -> Result<()> {
    let act = ReluDesc::new()?;
    unsafe {
        sys::cudnnActivationBackward(
            h.0,
            act.0,
            one(),
            desc.0,
            y as *const c_void,
            desc.0,
            dy as *const c_void,
            desc.0,
            y as *const c_void,
            zero(),
            desc.0,
            dx as *mut c_void,
        )
    }
    .result()
    .map_err(err)
}

/// The geometry of one convolution: input `[b, c, h, w]`, weight `[o, c, k, k]`, output
/// `[b, o, ho, wo]` (logical dims); stored NCHW (weights OIHW), or channels-last when `nhwc`
/// (NHWC, weights OHWI).
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
    nhwc: bool,
}

impl Geom {
    fn format(&self) -> sys::cudnnTensorFormat_t {
        if self.nhwc {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        }
    }
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

/// cuDNN's default math allows TF32 for f32 data on Ampere and later; exact f32 needs FMA.
fn math_type(p: Precision, dtype: DType) -> sys::cudnnMathType_t {
    match (p, dtype) {
        (Precision::F32, DType::F32) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

/// Whether convolutions run on cached plans of cuDNN's backend API (the default) rather than
/// its legacy calls (`gpu.cudnn_graph = false`). The legacy calls cost about 105 µs of host
/// time each on an H100 with cuDNN 9, a cached plan's execution about 30 µs, which doubled
/// ResNet-50 training at batch 8 (BENCHMARKS.md, run 11). Measured algorithm choice
/// ([`find_mode`]) keeps the legacy calls.
pub fn graph_api() -> bool {
    graph::enabled() && !find_mode()
}

/// The convolution passes (pass, geometry, dtype, precision) of the calling thread that found
/// no backend-API plan and fell back to the legacy call, each with the reason (each was also
/// logged once).
pub fn graph_fallbacks() -> Vec<String> {
    graph::fallbacks()
}

/// Whether convolution algorithms are chosen by running them (`gpu.cudnn_find = true`,
/// PyTorch's `cudnn.benchmark = True`: faster, and the choice may differ between runs) rather
/// than by cuDNN's heuristics (the default: the same algorithms every run).
pub fn find_mode() -> bool {
    gpu::settings().cudnn_find
}

/// The descriptors of a geometry, made once per thread (a ResNet step makes about 160
/// convolution calls over a few dozen geometries).
fn descs(g: &Geom, dtype: DType, p: Precision) -> Result<Rc<Descs>> {
    let key = (0, *g, dtype, p);
    if let Some(found) = DESCS.with(|d| d.borrow().get(&key).cloned()) {
        return Ok(found);
    }
    let made = Rc::new(make_descs(g, dtype, p)?);
    DESCS.with(|d| d.borrow_mut().insert(key, made.clone()));
    Ok(made)
}

fn make_descs(g: &Geom, dtype: DType, p: Precision) -> Result<Descs> {
    let dt = data_type(dtype)?;
    let w = FilterDesc(dnn::create_filter_descriptor().map_err(err)?);
    unsafe { dnn::set_filter4d_descriptor(w.0, dt, g.format(), g.w_dims().map(|x| x as i32)) }
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
    unsafe { dnn::set_convolution_math_type(conv.0, math_type(p, dtype)) }.map_err(err)?;
    Ok(Descs {
        x: TensorDesc::new(g.format(), dt, g.x_dims())?,
        w,
        y: TensorDesc::new(g.format(), dt, g.y_dims())?,
        conv,
    })
}

/// The best algorithm for a pass (0 forward, 1 backward-data, 2 backward-filter) in the
/// requested math (heuristics, or measured with [`find_mode`]) and its workspace size, cached
/// per geometry.
fn algorithm(pass: u8, h: &Handle, d: &Descs, g: &Geom, dtype: DType) -> Result<(Algo, usize)> {
    let p = precision();
    let key = (pass, *g, dtype, p);
    if let Some(found) = ALGOS.with(|a| a.borrow().get(&key).copied()) {
        return Ok(found);
    }
    const MAX: usize = 8;
    let mut count = 0i32;
    let find = find_mode();
    // Heuristics honour the descriptor's math type (the f32 tests hold to 1e-6). A measured
    // search may report tensor-op algorithms; exact f32 must not take them.
    let fma = math_type(p, dtype) == sys::cudnnMathType_t::CUDNN_FMA_MATH;
    let exact_enough =
        |m: sys::cudnnMathType_t| !find || !fma || m == sys::cudnnMathType_t::CUDNN_FMA_MATH;
    let chosen = unsafe {
        match pass {
            0 => {
                let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; MAX] = std::mem::zeroed();
                if find {
                    sys::cudnnFindConvolutionForwardAlgorithm(
                        h.0,
                        d.x.0,
                        d.w.0,
                        d.conv.0,
                        d.y.0,
                        MAX as i32,
                        &mut count,
                        perf.as_mut_ptr(),
                    )
                    .result()
                } else {
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
                }
                .map_err(err)?;
                let best = perf[..count as usize]
                    .iter()
                    .find(|r| {
                        r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                            && exact_enough(r.mathType)
                    })
                    .ok_or_else(|| err("no forward algorithm for this convolution"))?;
                let ws = dnn::get_convolution_forward_workspace_size(
                    h.0, d.x.0, d.w.0, d.conv.0, d.y.0, best.algo,
                )
                .map_err(err)?;
                (Algo::Fwd(best.algo), ws)
            }
            1 => {
                let mut perf: [sys::cudnnConvolutionBwdDataAlgoPerf_t; MAX] = std::mem::zeroed();
                if find {
                    sys::cudnnFindConvolutionBackwardDataAlgorithm(
                        h.0,
                        d.w.0,
                        d.y.0,
                        d.conv.0,
                        d.x.0,
                        MAX as i32,
                        &mut count,
                        perf.as_mut_ptr(),
                    )
                    .result()
                } else {
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
                }
                .map_err(err)?;
                let best = perf[..count as usize]
                    .iter()
                    .find(|r| {
                        r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                            && exact_enough(r.mathType)
                    })
                    .ok_or_else(|| err("no backward-data algorithm for this convolution"))?;
                let ws = dnn::get_convolution_backward_data_workspace_size(
                    h.0, d.w.0, d.y.0, d.conv.0, d.x.0, best.algo,
                )
                .map_err(err)?;
                (Algo::Data(best.algo), ws)
            }
            _ => {
                let mut perf: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; MAX] = std::mem::zeroed();
                if find {
                    sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                        h.0,
                        d.x.0,
                        d.y.0,
                        d.conv.0,
                        d.w.0,
                        MAX as i32,
                        &mut count,
                        perf.as_mut_ptr(),
                    )
                    .result()
                } else {
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
                }
                .map_err(err)?;
                let best = perf[..count as usize]
                    .iter()
                    .find(|r| {
                        r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                            && exact_enough(r.mathType)
                    })
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

/// One convolution pass on raw device addresses: `a` and `b` are the two inputs of the pass
/// (forward: x, w; backward-data: dy, w; backward-filter: x, dy), `out` receives the result,
/// or has it added when `accumulate`.
#[allow(clippy::too_many_arguments)]
fn conv_raw(
    dev: &CudaDevice,
    h: &Handle,
    pass: u8,
    g: &Geom,
    dtype: DType,
    (a, b, out): (u64, u64, u64),
    accumulate: bool,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let p = precision();
    // The backend API's cached plan where cuDNN offers one, else the legacy call.
    let planned = if graph_api() {
        let aligns = [a, b, out].map(graph::alignment);
        graph::plan(dev, h, (pass, *g, dtype, p, accumulate, aligns))
    } else {
        None
    };
    /// How this pass runs.
    enum Launch {
        Plan(Rc<graph::Plan>),
        Legacy(Rc<Descs>, Algo),
    }
    let (launch, ws_bytes) = match planned {
        Some(plan) => {
            let ws = plan.workspace;
            (Launch::Plan(plan), ws)
        }
        None => {
            let d = descs(g, dtype, p)?;
            let (algo, ws) = algorithm(pass, h, &d, g, dtype)?;
            (Launch::Legacy(d, algo), ws)
        }
    };
    let mut work = if ws_bytes > 0 {
        Some(hostprof::timed("alloc", || unsafe {
            dev.alloc::<u8>(ws_bytes)
        })?)
    } else {
        None
    };
    let (pw, _gw) = match work.as_mut() {
        Some(w) => {
            let (p, g) = w.device_ptr_mut(&stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (d, algo) = match launch {
        Launch::Plan(plan) => {
            let _timer = hostprof::Timer::start("cudnn convolution");
            return graph::execute(h, &plan, pass, (a, b, out), pw);
        }
        Launch::Legacy(d, algo) => (d, algo),
    };
    let beta = if accumulate { one() } else { zero() };
    let (pa, pb, po, pw) = (
        a as *const c_void,
        b as *const c_void,
        out as *mut c_void,
        pw as *mut c_void,
    );
    let _timer = hostprof::Timer::start("cudnn convolution");
    unsafe {
        match algo {
            Algo::Fwd(algo) => dnn::convolution_forward(
                h.0,
                one(),
                d.x.0,
                pa,
                d.w.0,
                pb,
                d.conv.0,
                algo,
                pw,
                ws_bytes,
                beta,
                d.y.0,
                po,
            ),
            Algo::Data(algo) => dnn::convolution_backward_data(
                h.0,
                one(),
                d.w.0,
                pb,
                d.y.0,
                pa,
                d.conv.0,
                algo,
                pw,
                ws_bytes,
                beta,
                d.x.0,
                po,
            ),
            Algo::Filter(algo) => dnn::convolution_backward_filter(
                h.0,
                one(),
                d.x.0,
                pa,
                d.y.0,
                pb,
                d.conv.0,
                algo,
                pw,
                ws_bytes,
                beta,
                d.w.0,
                po,
            ),
        }
    }
    .map_err(err)
}

/// Runs one convolution pass on storages into a fresh output of `out_dims`.
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
    let mut out = alloc(&dev, dtype, out_dims.iter().product())?;
    {
        let (pa, _ga) = ptr(a, al, &stream)?;
        let (pb, _gb) = ptr(b, bl, &stream)?;
        let (po, _go) = ptr_mut(&mut out, &stream)?;
        conv_raw(&dev, &h, pass, g, dtype, (pa, pb, po), false)?;
    }
    Ok((out, Shape::from(out_dims.to_vec())))
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
        nhwc: false,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, ConvFwd(g))
}

/// Per row range, the batch mean and inverse standard deviation cuDNN saved for the backward.
type Stats = Vec<(CudaSlice<f32>, CudaSlice<f32>)>;

/// A BatchNorm of a contiguous `[B, C, H, W]` tensor (`[B, C]` is `H = W = 1`). In training
/// mode it normalises one or two row ranges of the batch (the split mode normalises each with
/// its own statistics; both are contiguous in memory, so each is one call on an offset
/// address); in evaluation mode (our kernels only) the whole batch with the running statistics.
#[derive(Debug, Clone)]
struct BnSpec {
    dims: [usize; 4],
    /// `(first row, rows, moves or reads the running statistics)` of each range.
    parts: Vec<(usize, usize, bool)>,
    eps: f64,
    momentum: f64,
    stats: launch::Stats,
    /// Stored NHWC (our kernels only).
    channels_last: bool,
}

impl BnSpec {
    fn new(dims: [usize; 4], split: Option<usize>, eps: f64, momentum: f64) -> Result<Self> {
        let batch = dims[0];
        let parts = match split {
            None => vec![(0, batch, true)],
            Some(n) if n == batch => vec![(0, batch, true)],
            Some(n) if n > 0 && n < batch => vec![(0, n, true), (n, batch - n, false)],
            Some(n) => bail!("BatchNorm split at {n} needs 0 < n <= batch size {batch}"),
        };
        Ok(BnSpec {
            dims,
            parts,
            eps,
            momentum,
            stats: launch::Stats::Batch,
            channels_last: false,
        })
    }

    /// Evaluation mode: the running statistics normalise and stay as they are.
    fn eval(dims: [usize; 4], eps: f64) -> Self {
        BnSpec {
            dims,
            parts: vec![(0, dims[0], true)],
            eps,
            momentum: 0.0,
            stats: launch::Stats::Running,
            channels_last: false,
        }
    }

    /// The same BatchNorm on a channels-last (NHWC) tensor of the same logical dims.
    fn with_channels_last(self, channels_last: bool) -> Self {
        BnSpec {
            channels_last,
            ..self
        }
    }

    /// The offset in bytes of the range starting at row `start`.
    fn offset(&self, dtype: DType, start: usize) -> u64 {
        let [_, c, h, w] = self.dims;
        (start * c * h * w * dtype.size_in_bytes()) as u64
    }

    /// cuDNN's descriptors of a range of `rows` rows and of the per-channel parameters.
    fn cudnn_descs(&self, dtype: DType, rows: usize) -> Result<(TensorDesc, TensorDesc)> {
        let [_, c, h, w] = self.dims;
        Ok((
            TensorDesc::nchw(data_type(dtype)?, [rows, c, h, w])?,
            TensorDesc::nchw(sys::cudnnDataType_t::CUDNN_DATA_FLOAT, [1, c, 1, 1])?,
        ))
    }

    fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// `y = BatchNorm(x)` (`+ residual` unless it is 0, then ReLU when `relu`); the running
    /// statistics at `running` (0, 0 for none) move from the first range. Returns the saved
    /// statistics. Runs on our own kernels ([`kernels`]) unless `gpu.own_batch_norm = false`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        dev: &CudaDevice,
        h: &Handle,
        dtype: DType,
        (x, y): (u64, u64),
        (w, b): (u64, u64),
        running: (u64, u64),
        relu: bool,
        residual: u64,
    ) -> Result<Stats> {
        let stream = dev.cuda_stream();
        let c = self.dims[1];
        let own = self.own()?;
        let mut saved = Vec::with_capacity(self.parts.len());
        for &(start, rows, update) in &self.parts {
            let off = self.offset(dtype, start);
            let mut mean = hostprof::timed("alloc", || unsafe { dev.alloc::<f32>(c) })?;
            let mut inv_std = hostprof::timed("alloc", || unsafe { dev.alloc::<f32>(c) })?;
            {
                let (pmean, _g1) = mean.device_ptr_mut(&stream);
                let (pinv, _g2) = inv_std.device_ptr_mut(&stream);
                let (pm, pv) = if update { running } else { (0, 0) };
                if own {
                    launch::bn_forward(
                        &kernels::Cuda(dev),
                        dtype,
                        self.range(rows),
                        (x + off, at(residual, off), y + off),
                        (w, b),
                        (pm, pv),
                        (self.eps, self.momentum),
                        relu,
                        self.stats,
                        (pmean, pinv),
                    )?;
                } else {
                    let (xd, pd) = self.cudnn_descs(dtype, rows)?;
                    unsafe {
                        sys::cudnnBatchNormalizationForwardTraining(
                            h.0,
                            sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                            one(),
                            zero(),
                            xd.0,
                            (x + off) as *const c_void,
                            xd.0,
                            (y + off) as *mut c_void,
                            pd.0,
                            w as *const c_void,
                            b as *const c_void,
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
            }
            saved.push((mean, inv_std));
        }
        if !own {
            let all = TensorDesc::nchw(data_type(dtype)?, self.dims)?;
            if residual != 0 {
                add_tensor(h, &all, (1.0, residual), (1.0, y))?;
            }
            if relu {
                relu_in_place(h, &all, y)?;
            }
        }
        Ok(saved)
    }

    /// Whether our kernels run (else cuDNN's BatchNorm, training mode only).
    fn own(&self) -> Result<bool> {
        let own = kernels::own_batch_norm();
        if !own && (self.stats == launch::Stats::Running || self.channels_last) {
            bail!(
                "BatchNorm in evaluation mode or channels-last runs on our kernels only \
                 (gpu.own_batch_norm = false)"
            )
        }
        Ok(own)
    }

    /// One range of `rows` rows as our kernels see it.
    fn range(&self, rows: usize) -> launch::BnRange {
        let [_, c, h, w] = self.dims;
        let r = launch::BnRange::nchw(rows, c, h * w);
        launch::BnRange {
            channels_last: r.channels_last || self.channels_last,
            ..r
        }
    }

    /// `dx` and (written, or added when `accumulate_params`) `dw`, `db` from `x` and the
    /// gradient `dy` of the output (`w`, `b` are the forward's). With a fused ReLU (`relu`:
    /// by its output, or recomputed on our kernels) `dy` is taken through that ReLU first,
    /// and `dres` (0 for none) receives the gradient at the BatchNorm's output (+ residual),
    /// which is the residual's gradient.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dev: &CudaDevice,
        h: &Handle,
        dtype: DType,
        (x, dy, dx): (u64, u64, u64),
        (w, b, dw, db): (u64, u64, u64, u64),
        saved: &Stats,
        accumulate_params: bool,
        (relu, dres): (launch::Relu, u64),
    ) -> Result<()> {
        if saved.len() != self.parts.len() {
            bail!("BatchNorm backward before its forward pass")
        }
        let stream = dev.cuda_stream();
        let own = self.own()?;
        if relu == launch::Relu::Recompute && !own {
            bail!("a recomputed ReLU mask needs our BatchNorm kernels")
        }
        let relu_out = relu.output();
        // cuDNN's path: the ReLU's backward and the residual's copy as passes of their own.
        let mut through_relu = None;
        let mut dy = dy;
        if !own && (relu_out != 0 || dres != 0) {
            let all = TensorDesc::nchw(data_type(dtype)?, self.dims)?;
            if relu_out != 0 {
                let mut g = alloc(dev, dtype, self.len())?;
                let (pg, _gg) = ptr_mut(&mut g, &stream)?;
                relu_backward(h, &all, relu_out, dy, pg)?;
                dy = pg;
                drop(_gg);
                through_relu = Some(g);
            }
            if dres != 0 {
                add_tensor(h, &all, (1.0, dy), (0.0, dres))?;
            }
        }
        for (i, (&(start, rows, _), (mean, inv_std))) in
            self.parts.iter().zip(saved.iter()).enumerate()
        {
            let off = self.offset(dtype, start);
            let (pm, _g4) = mean.device_ptr(&stream);
            let (pi, _g5) = inv_std.device_ptr(&stream);
            // The parameter gradients of the later ranges add to the first's.
            let add_params = i > 0 || accumulate_params;
            if own {
                launch::bn_backward(
                    &kernels::Cuda(dev),
                    dtype,
                    self.range(rows),
                    (x + off, dy + off, relu.offset(off)),
                    (pm, pi),
                    (w, b, dw, db),
                    add_params,
                    self.stats,
                    (dx + off, at(dres, off)),
                )?;
                continue;
            }
            let param_beta = if add_params { one() } else { zero() };
            let (xd, pd) = self.cudnn_descs(dtype, rows)?;
            unsafe {
                sys::cudnnBatchNormalizationBackward(
                    h.0,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    one(),
                    zero(),
                    one(),
                    param_beta,
                    xd.0,
                    (x + off) as *const c_void,
                    xd.0,
                    (dy + off) as *const c_void,
                    xd.0,
                    (dx + off) as *mut c_void,
                    pd.0,
                    w as *const c_void,
                    dw as *mut c_void,
                    db as *mut c_void,
                    self.eps,
                    pm as *const c_void,
                    pi as *const c_void,
                )
            }
            .result()
            .map_err(err)?;
        }
        drop(through_relu);
        Ok(())
    }
}

/// The mask source of a ReLU after a BatchNorm without a residual, whose output is at `y`:
/// recomputed from the input on our kernels (one tensor less to read), else `y`; also `y`
/// with `gpu.relu_recompute = false`, to measure the difference.
fn relu_mask(y: u64) -> launch::Relu {
    if gpu::settings().relu_recompute && kernels::own_batch_norm() {
        launch::Relu::Recompute
    } else {
        launch::Relu::Output(y)
    }
}

/// `base + offset`, or 0 (no tensor) when `base` is 0.
fn at(base: u64, offset: u64) -> u64 {
    if base == 0 {
        0
    } else {
        base + offset
    }
}

/// `c ← alpha·a + beta·c` over a contiguous buffer described by `desc`.
fn add_tensor(
    h: &Handle,
    desc: &TensorDesc,
    (alpha, a): (f32, u64),
    (beta, c): (f32, u64),
) -> Result<()> {
    unsafe {
        sys::cudnnAddTensor(
            h.0,
            &alpha as *const f32 as *const c_void,
            desc.0,
            a as *const c_void,
            &beta as *const f32 as *const c_void,
            desc.0,
            c as *mut c_void,
        )
    }
    .result()
    .map_err(err)
}

/// A tensor's storage, read-locked, with its layout.
type Locked<'a> = (StorageRef<'a>, &'a Layout);

/// The running statistics' addresses (0, 0 for none), with the locks and guards that keep
/// them valid while cuDNN writes to them.
fn running_ptrs<'a>(
    locks: &'a Option<(Locked<'a>, Locked<'a>)>,
    stream: &'a CudaStream,
    keep: &mut Vec<SyncOnDrop<'a>>,
) -> Result<(u64, u64)> {
    Ok(match locks {
        Some(((ms, ml), (vs, vl))) => {
            let (pm, gm) = f32_param_ptr(cuda_of(ms)?, ml, stream)?;
            let (pv, gv) = f32_param_ptr(cuda_of(vs)?, vl, stream)?;
            keep.push(gm);
            keep.push(gv);
            (pm, pv)
        }
        None => (0, 0),
    })
}

/// A BatchNorm (optionally followed by a ReLU) as one autograd op.
struct BnOp {
    spec: BnSpec,
    /// Apply a ReLU to the output (and its derivative in the backward pass).
    relu: bool,
    /// Running mean and variance (f32 `[C]`): moved in place by a training-mode forward pass,
    /// read by an evaluation-mode one.
    running: Option<(Tensor, Tensor)>,
    saved: Mutex<Stats>,
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

impl CustomOp3 for BnOp {
    fn name(&self) -> &'static str {
        "simtrans-batchnorm"
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
        let mut y = alloc(&dev, x.dtype(), self.spec.len())?;
        let saved = {
            let locks = self
                .running
                .as_ref()
                .map(|(m, v)| (m.storage_and_layout(), v.storage_and_layout()));
            let mut keep = Vec::new();
            let running = running_ptrs(&locks, &stream, &mut keep)?;
            let (px, _gx) = ptr(x, xl, &stream)?;
            let (pw, _gw) = f32_param_ptr(w, wl, &stream)?;
            let (pb, _gb) = f32_param_ptr(b, bl, &stream)?;
            let (py, _gy) = ptr_mut(&mut y, &stream)?;
            self.spec.forward(
                &dev,
                &h,
                x.dtype(),
                (px, py),
                (pw, pb),
                running,
                self.relu,
                0,
            )?
        };
        *self.saved.lock().expect("batchnorm saved statistics") = saved;
        Ok((y, xl.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let saved = self.saved.lock().expect("batchnorm saved statistics");
        let (bs, bl) = b.storage_and_layout();
        let c = self.spec.dims[1];
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (rs, rl) = res.storage_and_layout();
        let (xs, gs, ws, rs) = (cuda_of(&xs)?, cuda_of(&gs)?, cuda_of(&ws)?, cuda_of(&rs)?);
        let dev = xs.device().clone();
        let stream = dev.cuda_stream();
        let h = handle(&dev)?;
        let mut dx = alloc(&dev, xs.dtype(), self.spec.len())?;
        let mut dw = alloc(&dev, DType::F32, c)?;
        let mut db = alloc(&dev, DType::F32, c)?;
        {
            let (px, _gx) = ptr(xs, xl, &stream)?;
            let (pg, _gg) = ptr(gs, gl, &stream)?;
            let (pw, _gw) = f32_param_ptr(ws, wl, &stream)?;
            let (pb, _gb) = f32_param_ptr(cuda_of(&bs)?, bl, &stream)?;
            let (pdx, _g1) = ptr_mut(&mut dx, &stream)?;
            let (pdw, _g2) = ptr_mut(&mut dw, &stream)?;
            let (pdb, _g3) = ptr_mut(&mut db, &stream)?;
            // With the ReLU, its output (our result) masks the gradient.
            let (pr, _gr) = ptr(rs, rl, &stream)?;
            let relu = if self.relu {
                relu_mask(pr)
            } else {
                launch::Relu::None
            };
            self.spec.backward(
                &dev,
                &h,
                xs.dtype(),
                (px, pg, pdx),
                (pw, pb, pdw, pdb),
                &saved,
                false,
                (relu, 0),
            )?;
        }
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
/// batch variance), as PyTorch does. With `split = Some(n)`, rows `[0, n)` and `[n, B)` are
/// normalised separately and only the first range moves the running statistics (the
/// reference's two-GPU DataParallel). With `relu`, returns `relu(BatchNorm(x))` as one op.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running: Option<(&Tensor, &Tensor)>,
    split: Option<usize>,
    eps: f64,
    momentum: f64,
    relu: bool,
) -> Result<Tensor> {
    let spec = BnSpec::new(nchw(x.dims())?, split, eps, momentum)?;
    batch_norm(x, weight, bias, running, spec, relu)
}

/// Evaluation-mode BatchNorm on our kernels: `x·s + (b − μ·s)` with `s = w / √(σ² + ε)` from
/// the running statistics `(μ, σ²)`, then ReLU when `relu`; one op each way, differentiable
/// in `x`, `weight` and `bias` (the statistics are constants).
pub fn batch_norm_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running: (&Tensor, &Tensor),
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let spec = BnSpec::eval(nchw(x.dims())?, eps);
    batch_norm(x, weight, bias, Some(running), spec, relu)
}

fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running: Option<(&Tensor, &Tensor)>,
    spec: BnSpec,
    relu: bool,
) -> Result<Tensor> {
    let op = BnOp {
        spec,
        relu,
        running: running.map(|(m, v)| (m.clone(), v.clone())),
        saved: Mutex::new(Vec::new()),
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// `dx = dy · [y > 0]` from `(y, dy)`: the backward of every fused ReLU here.
struct ReluBackward;

impl CustomOp2 for ReluBackward {
    fn name(&self) -> &'static str {
        "cudnn-relu-backward"
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
        y: &CudaStorage,
        yl: &Layout,
        dy: &CudaStorage,
        dyl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = y.device().clone();
        let stream = dev.cuda_stream();
        let h = handle(&dev)?;
        let desc = TensorDesc::nchw(data_type(y.dtype())?, flat4(yl.shape().elem_count()))?;
        let mut dx = alloc(&dev, y.dtype(), yl.shape().elem_count())?;
        {
            let (py, _g1) = ptr(y, yl, &stream)?;
            let (pdy, _g2) = ptr(dy, dyl, &stream)?;
            let (pdx, _g3) = ptr_mut(&mut dx, &stream)?;
            relu_backward(&h, &desc, py, pdy, pdx)?;
        }
        Ok((dx, yl.shape().clone()))
    }
}

/// An elementwise op's view of `n` values: `[1, 1, 1, n]` (cuDNN wants 4-D descriptors).
fn flat4(n: usize) -> [usize; 4] {
    [1, 1, 1, n]
}

/// `relu(a + b)`, the tail of a residual block.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "cudnn-add-relu"
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
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if al.shape() != bl.shape() || a.dtype() != b.dtype() {
            bail!(
                "add_relu: {:?} {:?} and {:?} {:?}",
                al.shape(),
                a.dtype(),
                bl.shape(),
                b.dtype()
            )
        }
        let dev = a.device().clone();
        let stream = dev.cuda_stream();
        let h = handle(&dev)?;
        let n = al.shape().elem_count();
        let desc = TensorDesc::nchw(data_type(a.dtype())?, flat4(n))?;
        let op = OpDesc::add()?;
        let mut y = alloc(&dev, a.dtype(), n)?;
        {
            let (pa, _g1) = ptr(a, al, &stream)?;
            let (pb, _g2) = ptr(b, bl, &stream)?;
            let (py, _g3) = ptr_mut(&mut y, &stream)?;
            unsafe {
                sys::cudnnOpTensor(
                    h.0,
                    op.0,
                    one(),
                    desc.0,
                    pa as *const c_void,
                    one(),
                    desc.0,
                    pb as *const c_void,
                    zero(),
                    desc.0,
                    py as *mut c_void,
                )
            }
            .result()
            .map_err(err)?;
            relu_in_place(&h, &desc, py)?;
        }
        Ok((y, al.shape().clone()))
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &ReluBackward)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

owned!(
    /// An elementwise addition for `cudnnOpTensor` (f32 arithmetic).
    OpDesc(sys::cudnnOpTensorDescriptor_t),
    sys::cudnnDestroyOpTensorDescriptor
);

impl OpDesc {
    fn add() -> Result<Self> {
        let mut raw = std::ptr::null_mut();
        unsafe { sys::cudnnCreateOpTensorDescriptor(&mut raw) }
            .result()
            .map_err(err)?;
        let d = OpDesc(raw);
        unsafe {
            sys::cudnnSetOpTensorDescriptor(
                d.0,
                sys::cudnnOpTensorOp_t::CUDNN_OP_TENSOR_ADD,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
            )
        }
        .result()
        .map_err(err)?;
        Ok(d)
    }
}

/// `relu(a + b)` through cuDNN (same shape, dtype and CUDA device); the gradient reaches both.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

/// The stem's max-pooling as one op on our kernels ([`launch::max_pool_forward`]); the
/// forward keeps each output's winning window position for the backward.
struct MaxPool {
    arg: Mutex<Option<Arc<CudaSlice<u8>>>>,
}

/// `dx` from `dy` and the winners recorded by the forward.
struct MaxPoolBackward {
    arg: Arc<CudaSlice<u8>>,
    x_dims: [usize; 4],
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "simtrans-max-pool"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let stream = dev.cuda_stream();
        let [b, c, h, w] = nchw(xl.dims())?;
        let y_dims = [b, c, launch::pool_out(h), launch::pool_out(w)];
        let n: usize = y_dims.iter().product();
        let mut y = alloc(&dev, x.dtype(), n)?;
        let mut arg = unsafe { dev.alloc::<u8>(n) }?;
        {
            let (px, _g1) = ptr(x, xl, &stream)?;
            let (py, _g2) = ptr_mut(&mut y, &stream)?;
            let (pa, _g3) = arg.device_ptr_mut(&stream);
            launch::max_pool_forward(&kernels::Cuda(&dev), x.dtype(), (px, py, pa), b * c, (h, w))?;
        }
        *self.arg.lock().expect("max-pool winners") = Some(Arc::new(arg));
        Ok((y, Shape::from(y_dims.to_vec())))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(arg) = self.arg.lock().expect("max-pool winners").clone() else {
            bail!("max-pool backward before its forward pass")
        };
        let op = MaxPoolBackward {
            arg,
            x_dims: nchw(x.dims())?,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "simtrans-max-pool-backward"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }
    fn cuda_fwd(&self, dy: &CudaStorage, dyl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = dy.device().clone();
        let stream = dev.cuda_stream();
        let [b, c, h, w] = self.x_dims;
        let mut dx = alloc(&dev, dy.dtype(), self.x_dims.iter().product())?;
        {
            let (pdy, _g1) = ptr(dy, dyl, &stream)?;
            let (pa, _g2) = self.arg.device_ptr(&stream);
            let (pdx, _g3) = ptr_mut(&mut dx, &stream)?;
            launch::max_pool_backward(
                &kernels::Cuda(&dev),
                dy.dtype(),
                (pdy, pa, pdx),
                b * c,
                (h, w),
            )?;
        }
        Ok((dx, Shape::from(self.x_dims.to_vec())))
    }
}

/// The ResNet stem's max-pooling (3×3, stride 2, padding 1) of a contiguous `[B, C, H, W]`
/// CUDA tensor in f32 or bf16. Where several inputs of a window tie for the maximum, the
/// gradient goes to the first of them, as in PyTorch.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool {
        arg: Mutex::new(None),
    })
}

/// Whether residual blocks run fused ([`residual_blocks`]); yes unless
/// `gpu.fused_blocks = false` (then each layer is its own op, for the A/B measurement).
pub fn fused_blocks() -> bool {
    gpu::settings().fused_blocks
}

/// Whether the fused chain reads its parameters in place (no packing) and hands their
/// gradients to [`crate::grad::backward`] directly; yes unless `gpu.side_grads = false`
/// (packed parameters). Measured on an H100 (BENCHMARKS.md, run 11): ResNet-50 TF32 training
/// at batch 8 went from 482 to 938 images/s, where the host's issuing bounds the step.
pub fn side_grads() -> bool {
    gpu::settings().side_grads
}

/// Whether the fused residual blocks run channels-last (NHWC) inside; yes unless
/// `gpu.channels_last = false`, and only with our BatchNorm kernels. cuDNN's tensor-core
/// convolutions work on NHWC data; given NCHW, they transpose their inputs and outputs at
/// every call (13 % of a ResNet-50 step's GPU time at batch 64 with TF32, runs 7 and 10 in
/// BENCHMARKS.md). Channels-last, the chain's input and output are transposed once, and the
/// weights once per step: TF32 at batch 128 went from 2159 to 2405 images/s (run 11), and
/// batches of 64 and 128 gained in every run. At batch 8, where the host bounds the step, the
/// runs disagree (run 12: 820 against 1010 channels-first; runs 10 and 11 the other way).
pub fn channels_last() -> bool {
    gpu::settings().channels_last
}

/// Whether the fused chain keeps nothing for a backward pass inside
/// [`crate::grad::inference`]; yes unless `gpu.lean_inference = false` (then inference runs as
/// training-time forwards do, to rule it out when results differ).
pub fn lean_inference() -> bool {
    gpu::settings().lean_inference
}

/// Whether all the residual blocks of a network run as one op; yes unless
/// `gpu.fused_chain = false` (then one op per block, for the A/B measurement).
pub fn fused_chain() -> bool {
    gpu::settings().fused_chain
}

/// One convolution + training-mode BatchNorm (+ ReLU) of a residual block, by reference to the
/// network's own tensors.
pub struct BlockUnit<'a> {
    /// Convolution weight `[O, C, k, k]` (f32; cast to the activations' dtype).
    pub weight: &'a Tensor,
    pub stride: usize,
    pub padding: usize,
    /// BatchNorm weight, bias (f32 `[O]`), running mean and variance (moved in place).
    pub bn: [&'a Tensor; 4],
    /// A ReLU after the BatchNorm.
    pub relu: bool,
}

/// Where one unit lives in the packed parameters, and its geometry.
#[derive(Debug, Clone)]
struct UnitPlan {
    /// The unit's place in the chain (main units, then the shortcut, block after block).
    index: usize,
    g: Geom,
    relu: bool,
    /// Element offset of the weight in the packed weights.
    w_off: usize,
    /// Element offset of the BatchNorm weight in the packed BatchNorm parameters (the bias
    /// follows it).
    bn_off: usize,
    bn: BnSpec,
}

/// What the forward pass keeps of one block for the backward pass.
struct BlockSaved {
    /// Convolution outputs of the main units.
    conv_out: Vec<CudaStorage>,
    /// BatchNorm(+ReLU) outputs of the main units but the last.
    unit_out: Vec<CudaStorage>,
    stats: Vec<Stats>,
    shortcut: Option<(CudaStorage, Stats)>,
    /// The block's output, unless it is the chain's last (whose output is the op's result).
    output: Option<CudaStorage>,
}

/// One residual block of a [`ResChain`]: `relu(main(x) + shortcut(x))` where `main` is a
/// chain of convolution + BatchNorm (+ ReLU) units and `shortcut` is one such unit or the
/// identity. Offsets are into the chain's packed parameters.
struct BlockPlan {
    main: Vec<UnitPlan>,
    shortcut: Option<UnitPlan>,
    /// Index in the chain's running statistics of this block's first unit (main units, then
    /// the shortcut, follow in order).
    running: usize,
}

/// The device addresses of every unit's parameters as the chain reads them, by unit index:
/// its convolution weight, and its BatchNorm weight and bias.
struct Addrs {
    weight: Vec<u64>,
    bn: Vec<(u64, u64)>,
}

/// A unit's BatchNorm weight and bias addresses (or their gradients') in packed parameters
/// starting at `base`.
fn bn_ptrs(u: &UnitPlan, base: u64) -> (u64, u64) {
    (
        base + 4 * u.bn_off as u64,
        base + 4 * (u.bn_off + u.g.o) as u64,
    )
}

impl BlockPlan {
    fn in_dims(&self) -> [usize; 4] {
        self.main[0].g.x_dims()
    }
    fn out_dims(&self) -> [usize; 4] {
        self.main.last().expect("a block has units").g.y_dims()
    }

    /// The forward pass from `x` into `y`, with the parameters at `a` and every unit's
    /// running statistics in `running`.
    fn forward(
        &self,
        dev: &CudaDevice,
        h: &Handle,
        dtype: DType,
        (px, py): (u64, u64),
        a: &Addrs,
        running: &[(u64, u64)],
    ) -> Result<BlockSaved> {
        let stream = dev.cuda_stream();
        let mut conv_out = Vec::new();
        let mut unit_out = Vec::new();
        let mut stats = Vec::new();
        // The shortcut first: the last main unit adds it before the block's ReLU.
        let mut shortcut_out = None;
        let shortcut = match &self.shortcut {
            None => None,
            Some(u) => {
                let n: usize = u.g.y_dims().iter().product();
                let mut t = alloc(dev, dtype, n)?;
                let mut b = alloc(dev, dtype, n)?;
                let s = {
                    let (pt, _gt) = ptr_mut(&mut t, &stream)?;
                    let (pb, _gb) = ptr_mut(&mut b, &stream)?;
                    conv_raw(dev, h, 0, &u.g, dtype, (px, a.weight[u.index], pt), false)?;
                    u.bn.forward(
                        dev,
                        h,
                        dtype,
                        (pt, pb),
                        a.bn[u.index],
                        running[self.main.len()],
                        false,
                        0,
                    )?
                };
                shortcut_out = Some(b);
                Some((t, s))
            }
        };
        let residual = match shortcut_out.as_mut() {
            Some(b) => ptr_mut(b, &stream)?.0,
            None => px,
        };
        let mut cur = px;
        let last = self.main.len() - 1;
        for (i, u) in self.main.iter().enumerate() {
            let n: usize = u.g.y_dims().iter().product();
            let mut t = alloc(dev, dtype, n)?;
            let (pt, _gt) = ptr_mut(&mut t, &stream)?;
            conv_raw(dev, h, 0, &u.g, dtype, (cur, a.weight[u.index], pt), false)?;
            let (pa, relu, res) = if i == last {
                (py, true, residual)
            } else {
                unit_out.push(alloc(dev, dtype, n)?);
                let a = unit_out.last_mut().expect("just pushed");
                (ptr_mut(a, &stream)?.0, u.relu, 0)
            };
            stats.push(u.bn.forward(
                dev,
                h,
                dtype,
                (pt, pa),
                a.bn[u.index],
                running[i],
                relu,
                res,
            )?);
            cur = pa;
            drop(_gt);
            conv_out.push(t);
        }
        drop(shortcut_out);
        Ok(BlockSaved {
            conv_out,
            unit_out,
            stats,
            shortcut,
            output: None,
        })
    }

    /// The backward pass: from the block's input `x`, its output `y` and that output's
    /// gradient `dy` (parameters at `a`), writes the input gradient to `dx` and the parameter
    /// gradients into the packed buffers at `dw` and `dp`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dev: &CudaDevice,
        h: &Handle,
        dtype: DType,
        saved: &BlockSaved,
        (px, a): (u64, &Addrs),
        (pr, pz): (u64, u64),
        (pdx, pdw, pdp): (u64, u64, u64),
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        let unit = |u: &UnitPlan, kept, (x, dy), relu, (dx, accumulate)| {
            u.backward(
                dev,
                h,
                dtype,
                a,
                kept,
                (x, dy),
                relu,
                (pdw, pdp),
                (dx, accumulate),
            )
        };
        // A projection shortcut writes its input gradient to dx first; with the identity, the
        // last main unit writes the gradient at the sum there. The main path's first
        // convolution then adds to dx.
        let identity = match (&self.shortcut, &saved.shortcut) {
            (Some(u), Some((t, s))) => {
                let relu = (launch::Relu::Output(pr), 0);
                unit(u, (t, s), (px, pz), relu, (pdx, false))?;
                false
            }
            (None, None) => true,
            _ => bail!("residual block: shortcut state does not match its plan"),
        };
        // The main path, last unit first. `pg_cur` is the gradient at the current unit's
        // output; `g_buf` owns the buffer it points into (the incoming gradient for the last
        // unit), which a reassignment frees only after the kernels that read it were queued.
        let mut g_buf: Option<CudaStorage> = None;
        let mut pg_cur = pz;
        let last = self.main.len() - 1;
        for (i, u) in self.main.iter().enumerate().rev() {
            // The ReLU after the unit: the block's own, by its output, for the last unit (which
            // adds the residual); recomputed from the input for the others.
            let relu = if i == last {
                (launch::Relu::Output(pr), if identity { pdx } else { 0 })
            } else if u.relu {
                let a = &saved.unit_out[i];
                (
                    relu_mask(ptr(a, &Layout::contiguous(a_len(u)), &stream)?.0),
                    0,
                )
            } else {
                (launch::Relu::None, 0)
            };
            let kept = (&saved.conv_out[i], &saved.stats[i]);
            if i == 0 {
                unit(u, kept, (px, pg_cur), relu, (pdx, true))?;
                continue;
            }
            let input = &saved.unit_out[i - 1];
            let m = a_len(&self.main[i - 1]);
            let pin = ptr(input, &Layout::contiguous(m), &stream)?.0;
            let mut gin = alloc(dev, dtype, m)?;
            let pgin = ptr_mut(&mut gin, &stream)?.0;
            unit(u, kept, (pin, pg_cur), relu, (pgin, false))?;
            pg_cur = pgin;
            g_buf = Some(gin);
        }
        drop(g_buf);
        Ok(())
    }
}

impl UnitPlan {
    /// One unit's backward: the BatchNorm's (through the ReLU as `relu` says, the residual's
    /// gradient to `dres` unless 0) from the gradient `dy` at the unit's output into a fresh
    /// buffer, from it the weight gradient (input `x`) into the packed `dw` and the input
    /// gradient into `dx` (added when `accumulate`). `kept` is what the forward kept: the
    /// convolution's output and the BatchNorm's statistics.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dev: &CudaDevice,
        h: &Handle,
        dtype: DType,
        a: &Addrs,
        (conv_out, stats): (&CudaStorage, &Stats),
        (x, dy): (u64, u64),
        (relu, dres): (launch::Relu, u64),
        (pdw, pdp): (u64, u64),
        (dx, accumulate): (u64, bool),
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        let n = a_len(self);
        let (pt, _gt) = ptr(conv_out, &Layout::contiguous(n), &stream)?;
        let mut dt = alloc(dev, dtype, n)?;
        let (pdt, _gdt) = ptr_mut(&mut dt, &stream)?;
        let (pg, pb) = a.bn[self.index];
        let (pdg, pdb) = bn_ptrs(self, pdp);
        let (g, bn_grads) = ((pt, dy, pdt), (pg, pb, pdg, pdb));
        self.bn
            .backward(dev, h, dtype, g, bn_grads, stats, false, (relu, dres))?;
        let pdw = pdw + (dtype.size_in_bytes() * self.w_off) as u64;
        conv_raw(dev, h, 2, &self.g, dtype, (x, pdt, pdw), false)?;
        conv_raw(
            dev,
            h,
            1,
            &self.g,
            dtype,
            (pdt, a.weight[self.index], dx),
            accumulate,
        )
    }
}

/// A run of residual blocks as one autograd op. Inside, cuDNN and our kernels run every
/// layer and the backward chains the gradients through buffers the op owns, so candle
/// materialises (and zero-fills, then adds) only the chain input's gradient instead of one per
/// layer or block, and a shortcut's gradient is accumulated by the convolution itself.
///
/// Two ways in: with the parameters packed into the op's second and third inputs (candle's
/// graph carries their gradients back through its `cat`), or, with [`side_grads`], read in
/// place from each unit's own tensors ([`SideChain`], the op's only input is `x`), their
/// gradients handed to [`crate::grad::backward`] as views of the op's packed gradient buffers.
///
/// (Runs 8 and 9 of `docs/results/gpu-h100-2026-11-26` also put the stem — convolution, BatchNorm +
/// ReLU, max-pooling — inside: batch 8 and the similarity matrix were slower, batch 64 the
/// same, so the stem stays outside; commit 13b02ac has that version.)
struct ResChain {
    blocks: Vec<BlockPlan>,
    /// Running statistics per unit, block after block.
    running: Vec<(Tensor, Tensor)>,
    saved: Mutex<Vec<BlockSaved>>,
    /// Elements of the packed weights and of the packed BatchNorm parameters.
    packed_len: (usize, usize),
    /// Keep each block's buffers for a backward pass; without it ([`crate::grad::inference`])
    /// they are freed block by block.
    keep: bool,
    /// Activations NHWC and weights OHWI ([`channels_last`]): the op's input and output are
    /// `[b, h, w, c]`.
    nhwc: bool,
}

/// Per unit (by index): the weight as the chain reads it (in the activations' dtype, OHWI
/// when channels-last), the BatchNorm weight and bias, and the weight variable its gradient
/// belongs to.
struct UnitTensors {
    weight: Tensor,
    bn: [Tensor; 2],
    variable: Tensor,
}

/// The chain with its parameters read in place and their gradients handed over
/// ([`side_grads`]).
struct SideChain {
    chain: ResChain,
    units: Vec<UnitTensors>,
}

impl ResChain {
    /// Every unit of the chain, block after block.
    fn units(&self) -> impl Iterator<Item = &UnitPlan> {
        self.blocks
            .iter()
            .flat_map(|b| b.main.iter().chain(b.shortcut.iter()))
    }

    /// The units' parameter addresses in packed buffers at `pw` (weights, `es` bytes per
    /// element) and `pp` (BatchNorm parameters, f32).
    fn packed_addrs(&self, pw: u64, pp: u64, es: u64) -> Addrs {
        let units: Vec<&UnitPlan> = self.units().collect();
        let mut a = Addrs {
            weight: vec![0; units.len()],
            bn: vec![(0, 0); units.len()],
        };
        for u in units {
            a.weight[u.index] = pw + es * u.w_off as u64;
            a.bn[u.index] = bn_ptrs(u, pp);
        }
        a
    }

    /// The forward pass of every block from `x`, the parameters at `a`.
    fn run_forward(&self, x: &CudaStorage, xl: &Layout, a: &Addrs) -> Result<(CudaStorage, Shape)> {
        let _timer = hostprof::Timer::start("fused chain, forward");
        let dev = x.device().clone();
        let stream = dev.cuda_stream();
        let h = handle(&dev)?;
        let dtype = x.dtype();
        let out_dims = self.blocks.last().expect("a chain has blocks").out_dims();
        let mut y = alloc(&dev, dtype, out_dims.iter().product())?;
        let mut saved = Vec::with_capacity(self.blocks.len());
        {
            let locks: Vec<_> = self
                .running
                .iter()
                .map(|(m, v)| Some((m.storage_and_layout(), v.storage_and_layout())))
                .collect();
            let mut keep = Vec::new();
            let mut running = Vec::new();
            for l in &locks {
                running.push(running_ptrs(l, &stream, &mut keep)?);
            }
            let (px, _gx) = ptr(x, xl, &stream)?;
            let (py, _gy) = ptr_mut(&mut y, &stream)?;
            let mut cur = px;
            // Without `keep`, the output of the block before, which the current one reads.
            let mut input: Option<CudaStorage> = None;
            for (k, b) in self.blocks.iter().enumerate() {
                let mut out = if k + 1 < self.blocks.len() {
                    Some(alloc(&dev, dtype, b.out_dims().iter().product())?)
                } else {
                    None
                };
                let pout = match out.as_mut() {
                    Some(o) => ptr_mut(o, &stream)?.0,
                    None => py,
                };
                let mut s = b.forward(&dev, &h, dtype, (cur, pout), a, &running[b.running..])?;
                if self.keep {
                    s.output = out;
                    saved.push(s);
                } else {
                    // The block's work is queued: its buffers and its input can go (the
                    // stream frees them after it).
                    drop(s);
                    input = out;
                }
                cur = pout;
            }
            drop(input);
        }
        *self.saved.lock().expect("chain saved state") = saved;
        let [b, c, hh, w] = out_dims;
        let shape = if self.nhwc { [b, hh, w, c] } else { out_dims };
        Ok((y, Shape::from(shape.to_vec())))
    }

    /// The backward pass of every block, the parameters at `a`: the input's gradient and the
    /// packed gradients of the weights (in the activations' dtype) and of the BatchNorm
    /// parameters (f32).
    fn run_backward(
        &self,
        x: &Tensor,
        res: &Tensor,
        grad: &Tensor,
        a: &Addrs,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let _timer = hostprof::Timer::start("fused chain, backward");
        let grad = grad.contiguous()?;
        let saved = self.saved.lock().expect("chain saved state");
        if saved.len() != self.blocks.len() {
            bail!("residual blocks' backward before their forward pass")
        }
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (rs, rl) = res.storage_and_layout();
        let (xs, gs, rs) = (cuda_of(&xs)?, cuda_of(&gs)?, cuda_of(&rs)?);
        let dev = xs.device().clone();
        let stream = dev.cuda_stream();
        let h = handle(&dev)?;
        let dtype = xs.dtype();
        let (w_len, p_len) = self.packed_len;
        let mut dx = alloc(&dev, dtype, xl.shape().elem_count())?;
        let mut dw = alloc(&dev, dtype, w_len)?;
        let mut dp = alloc(&dev, DType::F32, p_len)?;
        {
            let (px, _g1) = ptr(xs, xl, &stream)?;
            // The gradient of the chain's output, and that output (the last ReLU's mask).
            let (pz, _g4) = ptr(gs, gl, &stream)?;
            let (pr, _g8) = ptr(rs, rl, &stream)?;
            let (pdx, _g5) = ptr_mut(&mut dx, &stream)?;
            let (pdw, _g6) = ptr_mut(&mut dw, &stream)?;
            let (pdp, _g7) = ptr_mut(&mut dp, &stream)?;
            // Block after block from the last: each one's input gradient is the output
            // gradient of the one before, in a buffer that `g_buf` owns until the kernels
            // reading it are queued.
            let mut g_buf: Option<CudaStorage> = None;
            let (mut pg, mut pout) = (pz, pr);
            for (k, b) in self.blocks.iter().enumerate().rev() {
                let pin = match k {
                    0 => px,
                    _ => {
                        let prev = saved[k - 1].output.as_ref();
                        let prev = prev.expect("every block but the last keeps its output");
                        ptr(
                            prev,
                            &Layout::contiguous(b.in_dims().iter().product::<usize>()),
                            &stream,
                        )?
                        .0
                    }
                };
                let mut din = match k {
                    0 => None,
                    _ => Some(alloc(&dev, dtype, b.in_dims().iter().product())?),
                };
                let pdin = match din.as_mut() {
                    Some(d) => ptr_mut(d, &stream)?.0,
                    None => pdx,
                };
                b.backward(
                    &dev,
                    &h,
                    dtype,
                    &saved[k],
                    (pin, a),
                    (pout, pg),
                    (pdin, pdw, pdp),
                )?;
                (pg, pout) = (pdin, pin);
                g_buf = din;
            }
            drop(g_buf);
        }
        Ok((
            wrap(dx, x.shape()),
            wrap(dw, &Shape::from(w_len)),
            wrap(dp, &Shape::from(p_len)),
        ))
    }
}

impl CustomOp3 for ResChain {
    fn name(&self) -> &'static str {
        "simtrans-residual-chain"
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
        p: &CudaStorage,
        pl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if w.dtype() != x.dtype() {
            bail!(
                "residual blocks: weights in {:?}, activations in {:?}",
                w.dtype(),
                x.dtype()
            )
        }
        let stream = x.device().cuda_stream();
        let (pw, _gw) = ptr(w, wl, &stream)?;
        let (pp, _gp) = f32_param_ptr(p, pl, &stream)?;
        let es = x.dtype().size_in_bytes() as u64;
        self.run_forward(x, xl, &self.packed_addrs(pw, pp, es))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        p: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ws, wl) = w.storage_and_layout();
        let (ps, pl) = p.storage_and_layout();
        let (ws, ps) = (cuda_of(&ws)?, cuda_of(&ps)?);
        let stream = ws.device().cuda_stream();
        let (pw, _gw) = ptr(ws, wl, &stream)?;
        let (pp, _gp) = f32_param_ptr(ps, pl, &stream)?;
        let es = w.dtype().size_in_bytes() as u64;
        let a = self.packed_addrs(pw, pp, es);
        let (dx, dw, dp) = self.run_backward(x, res, grad, &a)?;
        Ok((Some(dx), Some(dw), Some(dp)))
    }
}

impl SideChain {
    /// The units' parameter addresses, read from their own tensors (the guards keep them
    /// valid while the work is queued).
    fn addrs<'a>(
        locks: &'a [(Locked<'a>, Locked<'a>, Locked<'a>)],
        stream: &'a CudaStream,
        keep: &mut Vec<SyncOnDrop<'a>>,
    ) -> Result<Addrs> {
        let mut a = Addrs {
            weight: Vec::with_capacity(locks.len()),
            bn: Vec::with_capacity(locks.len()),
        };
        for ((ws, wl), (gs, gl), (bs, bl)) in locks {
            let (pw, g1) = ptr(cuda_of(ws)?, wl, stream)?;
            let (pg, g2) = f32_param_ptr(cuda_of(gs)?, gl, stream)?;
            let (pb, g3) = f32_param_ptr(cuda_of(bs)?, bl, stream)?;
            keep.extend([g1, g2, g3]);
            a.weight.push(pw);
            a.bn.push((pg, pb));
        }
        Ok(a)
    }

    fn locks(&self) -> Vec<(Locked<'_>, Locked<'_>, Locked<'_>)> {
        self.units
            .iter()
            .map(|u| {
                (
                    u.weight.storage_and_layout(),
                    u.bn[0].storage_and_layout(),
                    u.bn[1].storage_and_layout(),
                )
            })
            .collect()
    }
}

impl CustomOp1 for SideChain {
    fn name(&self) -> &'static str {
        "simtrans-residual-chain-side-grads"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_refused(CustomOp1::name(self))
    }
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        if let Some(u) = self.units.iter().find(|u| u.weight.dtype() != x.dtype()) {
            bail!(
                "residual blocks: a weight in {:?}, activations in {:?}",
                u.weight.dtype(),
                x.dtype()
            )
        }
        let stream = x.device().cuda_stream();
        let locks = self.locks();
        let mut keep = Vec::new();
        let a = Self::addrs(&locks, &stream, &mut keep)?;
        self.chain.run_forward(x, xl, &a)
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (dx, dw, dp) = {
            let stream = match &*x.storage_and_layout().0 {
                Storage::Cuda(s) => s.device().cuda_stream(),
                _ => bail!("residual blocks: the backward needs CUDA tensors"),
            };
            let locks = self.locks();
            let mut keep = Vec::new();
            let a = Self::addrs(&locks, &stream, &mut keep)?;
            self.chain.run_backward(x, res, grad, &a)?
        };
        // Each weight's gradient as a view of the packed buffers (f32, as the variables;
        // channels-last weights are OHWI there, permuted back to OIHW), then the BatchNorm
        // parameters'.
        let dw = dw.to_dtype(DType::F32)?;
        for u in self.chain.units() {
            let t = &self.units[u.index];
            let flat = dw.narrow(0, u.w_off, t.variable.elem_count())?;
            let g = match t.variable.dims() {
                &[o, i, kh, kw] if self.chain.nhwc => {
                    flat.reshape((o, kh, kw, i))?.permute((0, 3, 1, 2))?
                }
                _ => flat.reshape(t.variable.shape())?,
            };
            crate::grad::hand_over(&t.variable, g)?;
            for (k, param) in t.bn.iter().enumerate() {
                let g = dp.narrow(0, u.bn_off + k * u.g.o, u.g.o)?;
                crate::grad::hand_over(param, g.reshape(param.shape())?)?;
            }
        }
        Ok(Some(dx))
    }
}

/// Elements of a unit's output.
fn a_len(u: &UnitPlan) -> usize {
    u.g.y_dims().iter().product()
}

/// Which statistics the BatchNorms of a fused block use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// The batch's (training mode), with the split of [`batch_norm_train`].
    Batch(Option<usize>),
    /// The running statistics (evaluation mode; our kernels only).
    Running,
}

/// One residual block for [`residual_blocks`]: its main path (every unit but the last may
/// have a ReLU) and its shortcut (a unit without ReLU, or `None` for the identity).
pub struct BlockUnits<'a> {
    pub main: Vec<BlockUnit<'a>>,
    pub shortcut: Option<BlockUnit<'a>>,
}

/// Residual blocks `relu(main(x) + shortcut(x))`, each feeding the next, as one autograd op,
/// their BatchNorms normalising as `norm` says. Inside, cuDNN and our kernels run every layer,
/// and the backward chains the gradients through buffers the op owns. With [`side_grads`]
/// (the default) the parameters' gradients go to [`crate::grad::backward`] directly (see
/// there) instead of through candle's graph. With [`channels_last`] the op works on NHWC
/// data: `x` and the weights are transposed on the way in and the result on the way out
/// (candle's copies, so their gradients follow through its graph); input and output are NCHW
/// either way.
pub fn residual_blocks(
    x: &Tensor,
    blocks: &[BlockUnits],
    norm: Norm,
    eps: f64,
    momentum: f64,
) -> Result<Tensor> {
    if blocks.is_empty() {
        bail!("residual_blocks: no blocks")
    }
    let mut x_dims = nchw(x.dims())?;
    let nhwc = channels_last() && kernels::own_batch_norm();
    let x = if nhwc {
        x.permute((0, 2, 3, 1))?.contiguous()?
    } else {
        x.contiguous()?
    };
    // Handing the gradients over needs the op in candle's graph through its input. Inference
    // reads the parameters in place too, and hands nothing over.
    let inference = crate::grad::in_inference() && lean_inference();
    let side = (side_grads() && x.track_op()) || inference;
    let mut planner = ChainPlanner {
        norm,
        eps,
        momentum,
        nhwc,
        side,
        dtype: x.dtype(),
        weights: Vec::new(),
        bn_params: Vec::new(),
        running: Vec::new(),
        side_units: Vec::new(),
        w_off: 0,
        bn_off: 0,
        index: 0,
    };
    let mut plans = Vec::with_capacity(blocks.len());
    for block in blocks {
        let (plan, y_dims) = planner.block(block, x_dims)?;
        plans.push(plan);
        x_dims = y_dims;
    }
    let y = planner.apply(&x, plans, !inference)?;
    if nhwc {
        y.permute((0, 3, 1, 2))?.contiguous()
    } else {
        Ok(y)
    }
}

/// Plans the units of [`residual_blocks`] in order (each block's main path, then its
/// shortcut), collecting the tensors the chain reads: in place ([`side_grads`]) or packed.
struct ChainPlanner {
    norm: Norm,
    eps: f64,
    momentum: f64,
    nhwc: bool,
    /// Whether the parameters are read in place (else packed into two tensors).
    side: bool,
    /// The chain's data type (the input's).
    dtype: DType,
    weights: Vec<Tensor>,
    bn_params: Vec<Tensor>,
    running: Vec<(Tensor, Tensor)>,
    side_units: Vec<UnitTensors>,
    /// Offsets into the packed weights and BatchNorm parameters, and the unit count so far.
    w_off: usize,
    bn_off: usize,
    index: usize,
}

impl ChainPlanner {
    /// One block on input dimensions `x_dims`: its plan and its output dimensions.
    fn block(&mut self, block: &BlockUnits, x_dims: [usize; 4]) -> Result<(BlockPlan, [usize; 4])> {
        let (main, shortcut) = (&block.main, block.shortcut.as_ref());
        if main.is_empty()
            || main.last().is_some_and(|u| u.relu)
            || shortcut.is_some_and(|u| u.relu)
        {
            bail!(
                "residual_blocks: a non-empty main path whose last unit and shortcut have no ReLU"
            )
        }
        // Units are planned (and their running statistics listed) in this order.
        let first_running = self.index;
        let mut main_plans = Vec::new();
        let mut input = x_dims;
        for u in main {
            let p = self.unit(u, input)?;
            input = p.g.y_dims();
            main_plans.push(p);
        }
        let shortcut = match shortcut {
            Some(u) => {
                let p = self.unit(u, x_dims)?;
                if p.g.y_dims() != input {
                    bail!(
                        "residual_blocks: shortcut gives {:?}, main path {input:?}",
                        p.g.y_dims()
                    )
                }
                Some(p)
            }
            None if x_dims != input => {
                bail!("residual_blocks: identity shortcut of {x_dims:?} onto {input:?}")
            }
            None => None,
        };
        let plan = BlockPlan {
            main: main_plans,
            shortcut,
            running: first_running,
        };
        Ok((plan, input))
    }

    /// One unit on `input` dimensions, its tensors listed for the chain.
    fn unit(&mut self, u: &BlockUnit, input: [usize; 4]) -> Result<UnitPlan> {
        let (o, c, kh, kw) = u.weight.dims4()?;
        if c != input[1] {
            bail!(
                "residual_blocks: weight {:?} on input {input:?}",
                u.weight.dims()
            )
        }
        let g = Geom {
            b: input[0],
            c,
            h: input[2],
            w: input[3],
            o,
            kh,
            kw,
            pad: u.padding,
            stride: u.stride,
            nhwc: self.nhwc,
        };
        let p = UnitPlan {
            index: self.index,
            g,
            relu: u.relu,
            w_off: self.w_off,
            bn_off: self.bn_off,
            bn: match self.norm {
                Norm::Batch(split) => BnSpec::new(g.y_dims(), split, self.eps, self.momentum)?,
                Norm::Running => BnSpec::eval(g.y_dims(), self.eps),
            }
            .with_channels_last(self.nhwc),
        };
        self.index += 1;
        self.w_off += u.weight.elem_count();
        self.bn_off += 2 * o;
        // The weight as the chain reads it: a copy only where the dtype or layout differs, and
        // one copy where both do (the cast reads the permuted view).
        let w = if self.nhwc {
            u.weight.permute((0, 2, 3, 1))?
        } else {
            u.weight.clone()
        };
        let w = w.to_dtype(self.dtype)?;
        if self.side {
            self.side_units.push(UnitTensors {
                weight: w.detach().contiguous()?,
                bn: [u.bn[0].clone(), u.bn[1].clone()],
                variable: u.weight.clone(),
            });
        } else {
            self.weights.push(w.flatten_all()?);
            self.bn_params.push(u.bn[0].flatten_all()?);
            self.bn_params.push(u.bn[1].flatten_all()?);
        }
        self.running.push((u.bn[2].clone(), u.bn[3].clone()));
        Ok(p)
    }

    /// The planned chain applied to `x` as one autograd op; `keep`: keep what a backward pass
    /// needs.
    fn apply(self, x: &Tensor, blocks: Vec<BlockPlan>, keep: bool) -> Result<Tensor> {
        let chain = ResChain {
            blocks,
            running: self.running,
            saved: Mutex::new(Vec::new()),
            packed_len: (self.w_off, self.bn_off),
            keep,
            nhwc: self.nhwc,
        };
        if self.side {
            let units = self.side_units;
            x.apply_op1(SideChain { chain, units })
        } else {
            let (weights, bn_params) = (self.weights, self.bn_params);
            let (w, p) = hostprof::timed("fused chain, packing", || -> Result<_> {
                Ok((Tensor::cat(&weights, 0)?, Tensor::cat(&bn_params, 0)?))
            })?;
            x.apply_op3(&w, &p, chain)
        }
    }
}
