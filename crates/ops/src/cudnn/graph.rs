//! Convolutions through cuDNN's backend ("graph") API: one execution plan per geometry, built
//! once, then only a variant pack and `cudnnBackendExecute` per call.
//!
//! Why: the first GPU profile of the whole step (H100, cuDNN 9, tf32) spent about 105 µs of
//! host time inside every legacy `cudnnConvolution{Forward,BackwardData,BackwardFilter}` call,
//! although its descriptors and algorithm were cached. A ResNet-50 step makes 158 of them, so
//! at batch 8, where the host issues work slower than the GPU runs it, they were 17 of the
//! step's 25 ms. The backend API lets the plan (the engine, its configuration and its
//! workspace size) be kept, which is how PyTorch calls cuDNN.
//!
//! The engine is the first of cuDNN's heuristics (mode A, as PyTorch) that suits the precision:
//! never one that down-converts its inputs or reduces in reduced precision, none that compiles
//! kernels at run time (seconds per geometry on first use), and for f32 data at
//! [`Precision::F32`] none on tensor cores (TF32), so the f32 path stays exact to rounding as
//! with the legacy API's FMA math. Where no engine can be planned, [`plan`] says so once
//! and the caller keeps the legacy call for that geometry. `gpu.cudnn_graph = false` uses the
//! legacy API everywhere, to measure the difference.

use super::{err, Geom, Handle};
use crate::hostprof;
use candle_core::cuda::CudaDevice;
use candle_core::{bail, DType, Result};
use cudarc::cudnn::sys;
use simtrans_core::device::Precision;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;
use sys::cudnnBackendAttributeName_t as A;
use sys::cudnnBackendAttributeType_t as T;
use sys::cudnnBackendDescriptorType_t as D;

/// Whether convolutions go through the backend API (`gpu.cudnn_graph = false` turns it off).
pub(super) fn enabled() -> bool {
    crate::gpu::settings().cudnn_graph
}

/// A backend descriptor, destroyed when dropped.
struct Desc(sys::cudnnBackendDescriptor_t);

impl Drop for Desc {
    fn drop(&mut self) {
        let _ = unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
    }
}

fn check(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(err(format!("{what}: {status:?}")))
    }
}

impl Desc {
    fn new(kind: D) -> Result<Self> {
        let mut raw: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
        check(
            unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut raw) },
            "create descriptor",
        )?;
        Ok(Desc(raw))
    }

    /// Sets attribute `name` to the elements of `values`, of cuDNN type `ty`.
    fn set<V>(&self, name: A, ty: T, values: &[V]) -> Result<&Self> {
        let status = unsafe {
            sys::cudnnBackendSetAttribute(
                self.0,
                name,
                ty,
                values.len() as i64,
                values.as_ptr() as *const c_void,
            )
        };
        check(status, &format!("set {name:?}"))?;
        Ok(self)
    }

    fn set_desc(&self, name: A, d: &Desc) -> Result<&Self> {
        self.set(name, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &[d.0])
    }

    fn finalize(&self) -> Result<()> {
        check(unsafe { sys::cudnnBackendFinalize(self.0) }, "finalize")
    }

    /// Reads up to `out.len()` elements of attribute `name`; returns how many there were.
    fn get<V>(&self, name: A, ty: T, out: &mut [V]) -> Result<usize> {
        let mut count = 0i64;
        let status = unsafe {
            sys::cudnnBackendGetAttribute(
                self.0,
                name,
                ty,
                out.len() as i64,
                &mut count,
                out.as_mut_ptr() as *mut c_void,
            )
        };
        check(status, &format!("get {name:?}"))?;
        Ok((count.max(0) as usize).min(out.len()))
    }
}

/// The unique ids of a convolution's three tensors in a plan and its variant packs.
const X: i64 = 1;
const W: i64 = 2;
const Y: i64 = 3;

/// The unique ids of a pass's operands in order (a, b, out): forward x, w → y; backward-data
/// dy, w → dx; backward-filter x, dy → dw.
fn operands(pass: u8) -> [i64; 3] {
    match pass {
        0 => [X, W, Y],
        1 => [Y, W, X],
        _ => [X, Y, W],
    }
}

/// The largest power of two, up to 16, that divides a device address: the alignment a plan
/// may assume of that operand (pointers into packed parameter buffers can be less aligned than
/// fresh allocations).
pub(super) fn alignment(ptr: u64) -> u8 {
    if ptr == 0 {
        16
    } else {
        1u8 << ptr.trailing_zeros().min(4)
    }
}

/// What one plan is built for: the pass (0 forward, 1 backward-data, 2 backward-filter), the
/// geometry, data type and precision, whether it adds to its output, and the alignments of
/// the pass's two inputs and output.
pub(super) type PlanKey = (u8, Geom, DType, Precision, bool, [u8; 3]);

/// A finalised execution plan and every descriptor it was built from (kept alive with it),
/// and the handle it was built for, dropped last (thread-local caches are destroyed in an
/// unspecified order at thread exit).
pub(super) struct Plan {
    plan: Desc,
    /// The workspace the plan needs, in bytes.
    pub(super) workspace: usize,
    _parts: Vec<Desc>,
    _handle: Rc<Handle>,
}

/// Plans per handle (its address) and key; `None` where no engine could be planned.
type Plans = HashMap<(usize, PlanKey), Option<Rc<Plan>>>;

thread_local! {
    static PLANS: RefCell<Plans> = RefCell::new(HashMap::new());
    /// Why each pass without a plan has none, in the order they were met.
    static FALLBACKS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// The convolution passes of this thread that found no plan and use the legacy API, each with
/// the reason (the GPU tests require none).
pub(super) fn fallbacks() -> Vec<String> {
    FALLBACKS.with(|f| f.borrow().clone())
}

/// The plan of one convolution pass, built on first use per thread and key; `None` when cuDNN
/// offers no suitable engine (then the caller uses the legacy API; a warning says so once).
pub(super) fn plan(dev: &CudaDevice, h: &Handle, key: PlanKey) -> Option<Rc<Plan>> {
    let (pass, g, dtype, p, accumulate, aligns) = key;
    let hkey = (h.0 as usize, key);
    if let Some(found) = PLANS.with(|m| m.borrow().get(&hkey).cloned()) {
        return found;
    }
    let made = match super::handle(dev).and_then(|owner| build(owner, key)) {
        Ok(plan) => Some(Rc::new(plan)),
        Err(e) => {
            let why = format!(
                "no cuDNN backend-API plan for pass {pass} of {g:?} in {dtype:?} at {p:?}, \
                 aligned {aligns:?}, adding {accumulate} ({e}); it uses the legacy API"
            );
            tracing::warn!("{why}");
            FALLBACKS.with(|f| f.borrow_mut().push(why));
            None
        }
    };
    PLANS.with(|m| m.borrow_mut().insert(hkey, made.clone()));
    made
}

/// A tensor descriptor of logical dims `[n, c, h, w]`, stored NCHW or NHWC.
fn tensor(
    uid: i64,
    dt: sys::cudnnDataType_t,
    dims: [usize; 4],
    nhwc: bool,
    align: u8,
) -> Result<Desc> {
    let [_, c, h, w] = dims.map(|d| d as i64);
    let strides = if nhwc {
        [h * w * c, 1, w * c, c]
    } else {
        [c * h * w, h * w, w, 1]
    };
    let d = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    d.set(
        A::CUDNN_ATTR_TENSOR_DATA_TYPE,
        T::CUDNN_TYPE_DATA_TYPE,
        &[dt],
    )?
    .set(
        A::CUDNN_ATTR_TENSOR_DIMENSIONS,
        T::CUDNN_TYPE_INT64,
        &dims.map(|x| x as i64),
    )?
    .set(A::CUDNN_ATTR_TENSOR_STRIDES, T::CUDNN_TYPE_INT64, &strides)?
    .set(A::CUDNN_ATTR_TENSOR_UNIQUE_ID, T::CUDNN_TYPE_INT64, &[uid])?
    .set(
        A::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
        T::CUDNN_TYPE_INT64,
        &[align as i64],
    )?;
    d.finalize()?;
    Ok(d)
}

/// Whether an engine's notes rule it out at this precision.
fn unsuitable(engine: &Desc, dtype: DType, p: Precision) -> Result<bool> {
    use sys::cudnnBackendNumericalNote_t as N;
    // Read as plain integers: a newer cuDNN may report notes this binding does not name.
    let mut notes = [0u32; 16];
    let n = engine.get(
        A::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
        T::CUDNN_TYPE_NUMERICAL_NOTE,
        &mut notes,
    )?;
    let has = |note: N| notes[..n].contains(&(note as u32));
    if has(N::CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS)
        || has(N::CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION)
        || (p == Precision::F32 && dtype == DType::F32 && has(N::CUDNN_NUMERICAL_NOTE_TENSOR_CORE))
    {
        return Ok(true);
    }
    // An engine whose behaviour cannot be read is taken as compiled ahead of time: the
    // notes are advisory, and refusing it would refuse every engine of such a cuDNN.
    let mut behaviour = [0u32; 16];
    let n = engine
        .get(
            A::CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE,
            T::CUDNN_TYPE_BEHAVIOR_NOTE,
            &mut behaviour,
        )
        .unwrap_or(0);
    let runtime_compiled =
        sys::cudnnBackendBehaviorNote_t::CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION as u32;
    Ok(behaviour[..n].contains(&runtime_compiled))
}

/// Builds the plan of `key`: the three tensors, the convolution, the operation and its graph,
/// then the first engine of cuDNN's heuristics (mode A, then its fallback list) that suits
/// the precision and that cuDNN can plan.
fn build(owner: Rc<Handle>, (pass, g, dtype, p, accumulate, aligns): PlanKey) -> Result<Plan> {
    let h: &Handle = &owner;
    let _timer = hostprof::Timer::start("cudnn graph, planning");
    let dt = super::data_type(dtype)?;
    let role = match pass {
        0 => "forward",
        1 => "backward-data",
        2 => "backward-filter",
        _ => bail!("no convolution pass {pass}"),
    };
    let uids = operands(pass);
    let align_of = |uid: i64| aligns[uids.iter().position(|&u| u == uid).unwrap_or(0)];
    let x = tensor(X, dt, g.x_dims(), g.nhwc, align_of(X))?;
    let w = tensor(W, dt, g.w_dims(), g.nhwc, align_of(W))?;
    let y = tensor(Y, dt, g.y_dims(), g.nhwc, align_of(Y))?;

    let conv = Desc::new(D::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
    let (pad, stride) = ([g.pad as i64; 2], [g.stride as i64; 2]);
    conv.set(
        A::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
        T::CUDNN_TYPE_DATA_TYPE,
        &[sys::cudnnDataType_t::CUDNN_DATA_FLOAT],
    )?
    .set(
        A::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
        T::CUDNN_TYPE_CONVOLUTION_MODE,
        &[sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
    )?
    .set(
        A::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS,
        T::CUDNN_TYPE_INT64,
        &[2i64],
    )?
    .set(
        A::CUDNN_ATTR_CONVOLUTION_DILATIONS,
        T::CUDNN_TYPE_INT64,
        &[1i64, 1],
    )?
    .set(
        A::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
        T::CUDNN_TYPE_INT64,
        &stride,
    )?
    .set(
        A::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS,
        T::CUDNN_TYPE_INT64,
        &pad,
    )?
    .set(
        A::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS,
        T::CUDNN_TYPE_INT64,
        &pad,
    )?;
    conv.finalize()?;

    let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
    // The operation's descriptor type and its attributes for x, w, y (or their gradients),
    // the convolution, alpha and beta.
    let (kind, [ax, aw, ay, conv_attr, alpha_attr, beta_attr]) = match pass {
        0 => (
            D::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR,
            [
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
            ],
        ),
        1 => (
            D::CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR,
            [
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA,
            ],
        ),
        _ => (
            D::CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR,
            [
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA,
            ],
        ),
    };
    let op = Desc::new(kind)?;
    op.set_desc(ax, &x)?
        .set_desc(aw, &w)?
        .set_desc(ay, &y)?
        .set_desc(conv_attr, &conv)?
        .set(alpha_attr, T::CUDNN_TYPE_FLOAT, &[alpha])?
        .set(beta_attr, T::CUDNN_TYPE_FLOAT, &[beta])?;
    op.finalize()?;

    let graph = Desc::new(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
    graph
        .set(
            A::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
            T::CUDNN_TYPE_HANDLE,
            &[h.0],
        )?
        .set_desc(A::CUDNN_ATTR_OPERATIONGRAPH_OPS, &op)?;
    graph.finalize()?;

    let mut refused = vec![];
    for mode in [
        sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
        sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
    ] {
        let (heur, configs) = match candidates(&graph, mode) {
            Ok(found) => found,
            Err(e) => {
                refused.push(format!("{mode:?}: {e}"));
                continue;
            }
        };
        for (i, config) in configs.into_iter().enumerate() {
            match try_plan(h, &config, dtype, p) {
                Ok((plan, engine, workspace)) => {
                    return Ok(Plan {
                        plan,
                        workspace,
                        _parts: vec![engine, config, heur, graph, op, conv, x, w, y],
                        _handle: owner.clone(),
                    })
                }
                Err(e) => refused.push(format!("{mode:?} #{i}: {e}")),
            }
        }
    }
    bail!("no {role} engine suits ({})", refused.join("; "))
}

/// The engine configurations cuDNN's heuristics in `mode` propose for `graph`, best first,
/// with the heuristics descriptor they belong to.
fn candidates(graph: &Desc, mode: sys::cudnnBackendHeurMode_t) -> Result<(Desc, Vec<Desc>)> {
    let heur = Desc::new(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heur.set_desc(A::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph)?
        .set(
            A::CUDNN_ATTR_ENGINEHEUR_MODE,
            T::CUDNN_TYPE_HEUR_MODE,
            &[mode],
        )?;
    heur.finalize()?;
    // cuDNN fills descriptors the caller made: one engine configuration per candidate.
    const CANDIDATES: usize = 16;
    let mut configs = (0..CANDIDATES)
        .map(|_| Desc::new(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
        .collect::<Result<Vec<_>>>()?;
    let mut raw: Vec<sys::cudnnBackendDescriptor_t> = configs.iter().map(|c| c.0).collect();
    let found = heur.get(
        A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
        T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
        &mut raw,
    )?;
    configs.truncate(found);
    Ok((heur, configs))
}

/// The finalised execution plan of one engine configuration, its engine and its workspace
/// size, unless the engine's notes rule it out or cuDNN cannot plan it.
fn try_plan(h: &Handle, config: &Desc, dtype: DType, p: Precision) -> Result<(Desc, Desc, usize)> {
    let engine = Desc::new(D::CUDNN_BACKEND_ENGINE_DESCRIPTOR)?;
    let mut slot = [engine.0];
    config.get(
        A::CUDNN_ATTR_ENGINECFG_ENGINE,
        T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
        &mut slot,
    )?;
    if unsuitable(&engine, dtype, p)? {
        bail!("unsuitable notes")
    }
    let plan = Desc::new(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
    plan.set(
        A::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
        T::CUDNN_TYPE_HANDLE,
        &[h.0],
    )?
    .set_desc(A::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, config)?;
    plan.finalize()?;
    let mut ws = [0i64];
    plan.get(
        A::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
        T::CUDNN_TYPE_INT64,
        &mut ws,
    )?;
    Ok((plan, engine, ws[0].max(0) as usize))
}

/// Runs `plan` on the pass's operands (a, b, out, as in [`plan`]'s pass) with `workspace`
/// (null when the plan needs none).
pub(super) fn execute(
    h: &Handle,
    plan: &Plan,
    pass: u8,
    (a, b, out): (u64, u64, u64),
    workspace: u64,
) -> Result<()> {
    let uids = operands(pass);
    let ptrs = [a, b, out].map(|p| p as *mut c_void);
    let pack = Desc::new(D::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
    pack.set(
        A::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
        T::CUDNN_TYPE_INT64,
        &uids,
    )?
    .set(
        A::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
        T::CUDNN_TYPE_VOID_PTR,
        &ptrs,
    )?
    .set(
        A::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
        T::CUDNN_TYPE_VOID_PTR,
        &[workspace as *mut c_void],
    )?;
    pack.finalize()?;
    check(
        unsafe { sys::cudnnBackendExecute(h.0, plan.plan.0, pack.0) },
        "execute",
    )
}
