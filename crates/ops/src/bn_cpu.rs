//! BatchNorm in training mode as one CPU op each way, with [`crate::bn`]'s plain candle
//! composition as its definition.
//!
//! The composition (a `[C, N]` transposed copy, mean, centring, variance, scale, shift, the
//! transpose back, ReLU) makes about a dozen passes over the activations forward and twice as
//! many backward, each into a freshly zeroed buffer; on the demo network that chain was a
//! sixth of a training step. Here the forward reads the input twice (mean, then the centred
//! variance, per channel) and writes the output once, and the backward reads it twice more
//! (the two per-channel sums) and writes the input gradient once, all on the `[B, C, …]` layout
//! as it is, channels in parallel. Statistics are summed in f64 (the composition sums in f32),
//! so results agree with the definition to rounding, not bit for bit: the tests hold values
//! and gradients to it at 1e-5 relative.
//!
//! Backward, per channel with `x̂ = (x − μ)·r`, `r = 1/√(σ² + ε)`, `g` the output gradient
//! (zero where the fused ReLU's output is 0): `∂β = Σg`, `∂γ = Σ g·x̂`,
//! `∂x = γ·r·(g − ∂β/N − x̂·∂γ/N)`.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Per-channel mean, biased variance and `1/√(σ² + ε)` of one forward pass.
#[derive(Debug, Clone)]
pub(crate) struct Stats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    rstd: Vec<f64>,
}

/// Whether `x` takes this path: an f32 tensor on the CPU whose channels are dimension 1.
pub(crate) fn applies(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32
}

/// `y = [relu](γ·(x − μ)·r + β)` with batch statistics; returns `y` and the statistics (for
/// the running estimates).
pub(crate) fn train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Stats)> {
    let x = x.contiguous()?;
    let stats = Arc::new(Mutex::new(None));
    let op = BnTrain {
        eps,
        relu,
        stats: stats.clone(),
    };
    let y = x.apply_op3(weight, bias, op)?;
    let stats = stats
        .lock()
        .expect("BatchNorm statistics")
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("BatchNorm forward left no statistics".into()))?;
    Ok((y, stats))
}

/// `(B, C, inner)` of a `[B, C, …]` shape.
fn geometry(dims: &[usize]) -> (usize, usize, usize) {
    (dims[0], dims[1], dims[2..].iter().product())
}

/// The f32 values of a CPU storage from the layout's offset (contiguous layouts only).
fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    if !l.is_contiguous() {
        bail!("fused BatchNorm: {what} must be contiguous")
    }
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => bail!("fused BatchNorm: {what} must be f32"),
    }
}

/// The values of a CPU tensor (contiguous f32), for the backward pass.
fn with_values<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(cpu) => Ok(f(values(cpu, l, what)?)),
        _ => bail!("fused BatchNorm: {what} is not on the CPU"),
    }
}

/// Sums `f(k, v)` over channel `c`'s values (`k` the position in the buffer) in f64.
fn channel_sum(
    x: &[f32],
    (b, c_n, inner): (usize, usize, usize),
    c: usize,
    mut f: impl FnMut(usize, f32) -> f64,
) -> f64 {
    let mut s = 0f64;
    for bi in 0..b {
        let start = (bi * c_n + c) * inner;
        for (k, &v) in x[start..start + inner].iter().enumerate() {
            s += f(start + k, v);
        }
    }
    s
}

struct BnTrain {
    eps: f64,
    relu: bool,
    stats: Arc<Mutex<Option<Stats>>>,
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "simtrans-batch-norm-train-cpu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = values(xs, xl, "the input")?;
        let (w, bias) = (values(ws, wl, "the weight")?, values(bs, bl, "the bias")?);
        let g = geometry(xl.dims());
        let (_, c_n, inner) = g;
        let n = (x.len() / c_n) as f64;
        let per_channel: Vec<(f64, f64)> = (0..c_n)
            .into_par_iter()
            .map(|c| {
                let mean = channel_sum(x, g, c, |_, v| v as f64) / n;
                let var = channel_sum(x, g, c, |_, v| (v as f64 - mean).powi(2)) / n;
                (mean, var)
            })
            .collect();
        let mean: Vec<f64> = per_channel.iter().map(|p| p.0).collect();
        let var: Vec<f64> = per_channel.iter().map(|p| p.1).collect();
        let rstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(inner.max(1))
            .zip(x.par_chunks(inner.max(1)))
            .enumerate()
            .for_each(|(k, (dst, src))| {
                let c = k % c_n;
                let scale = (w[c] as f64 * rstd[c]) as f32;
                let shift = (bias[c] as f64 - mean[c] * w[c] as f64 * rstd[c]) as f32;
                for (o, &v) in dst.iter_mut().zip(src) {
                    let t = v * scale + shift;
                    *o = if self.relu { t.max(0.0) } else { t };
                }
            });
        *self.stats.lock().expect("BatchNorm statistics") = Some(Stats { mean, var, rstd });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.lock().expect("BatchNorm statistics").clone() else {
            bail!("fused BatchNorm backward before its forward pass")
        };
        let g @ (_, c_n, _) = geometry(x.dims());
        let weight = w.to_vec1::<f32>()?;
        let relu = self.relu;
        let (dx, dw, db) = with_values(x, "the input", |xv| {
            with_values(grad, "the gradient", |gv| {
                with_values(res, "the output", |yv| {
                    backward(xv, gv, relu.then_some(yv), g, &stats, &weight)
                })
            })
        })???;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, c_n, dev)?),
            Some(Tensor::from_vec(db, c_n, dev)?),
        ))
    }
}

/// `(∂x, ∂γ, ∂β)` of input `x`, output gradient `g` and, with the fused ReLU, its output `y`
/// (the gradient passes where `y > 0`).
fn backward(
    x: &[f32],
    g: &[f32],
    y: Option<&[f32]>,
    geom @ (_, c_n, inner): (usize, usize, usize),
    stats: &Stats,
    weight: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = (x.len() / c_n) as f64;
    let grad = |k: usize| match y {
        Some(y) if y[k] <= 0.0 => 0.0,
        _ => g[k] as f64,
    };
    let sums: Vec<(f64, f64)> = (0..c_n)
        .into_par_iter()
        .map(|c| {
            let (mean, r) = (stats.mean[c], stats.rstd[c]);
            let db = channel_sum(g, geom, c, |k, _| grad(k));
            let dw = channel_sum(g, geom, c, |k, _| grad(k) * (x[k] as f64 - mean) * r);
            (dw, db)
        })
        .collect();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(inner.max(1))
        .enumerate()
        .for_each(|(chunk, dst)| {
            let c = chunk % c_n;
            let (mean, r) = (stats.mean[c], stats.rstd[c]);
            let (dw, db) = sums[c];
            let a = weight[c] as f64 * r;
            for (i, o) in dst.iter_mut().enumerate() {
                let k = chunk * inner + i;
                let xhat = (x[k] as f64 - mean) * r;
                *o = (a * (grad(k) - db / n - xhat * dw / n)) as f32;
            }
        });
    let dw = sums.iter().map(|s| s.0 as f32).collect();
    let db = sums.iter().map(|s| s.1 as f32).collect();
    (dx, dw, db)
}
