//! BatchNorm in training mode as one CPU op each way, with [`crate::bn`]'s plain candle
//! composition as its definition.
//!
//! The composition (a `[C, N]` transposed copy, mean, centring, variance, scale, shift, the
//! transpose back, ReLU) makes about a dozen passes over the activations forward and twice as
//! many backward, each into a freshly zeroed buffer; on the demo network that chain was a
//! sixth of a training step. Here the forward reads the input twice (mean, then the centred
//! variance, per channel) and writes the output once, and the backward reads it once more
//! (both per-channel sums in one pass over each row) and writes the input gradient once, all
//! on the `[B, C, …]` layout as it is, channels in parallel. Each row of a channel (its values
//! in one image) is summed in eight f32 lanes and the rows are added in f64, and the input gradient
//! is computed in f32 (the composition sums and computes in f32), so results agree with the
//! definition to rounding, not bit for bit: the tests hold values and gradients to it at 1e-5
//! relative.
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

/// The rows of channel `c`: its `inner` contiguous values in each of the `b` images.
fn channel_rows(
    x: &[f32],
    (b, c_n, inner): (usize, usize, usize),
    c: usize,
) -> impl Iterator<Item = &[f32]> {
    (0..b).map(move |bi| &x[(bi * c_n + c) * inner..][..inner])
}

/// Lanes of the per-row sums: eight independent f32 accumulators, which the compiler keeps
/// in vector registers (two of SSE's, as the workspace builds for baseline x86-64) instead of
/// one serial chain of additions.
const LANES: usize = 8;

/// `S` sums `Σ f(values at i)[s]` over the positions `i` of `K` rows of equal length, each in
/// [`LANES`] f32 partial sums (lane `l` takes the positions `≡ l` mod [`LANES`], in order, the
/// positions past the last whole group of lanes a serial f32 sum), added in f64. A row is one
/// channel of one image (at most a few thousand values), so the f32 partials lose no more than
/// the definition's own f32 sums; rows are added in f64. The rows are read as groups of
/// [`LANES`] values, so the inner loop carries no bounds checks, and several sums take one pass.
#[inline(always)]
fn row_sums<const K: usize, const S: usize>(
    rows: [&[f32]; K],
    f: impl Fn([f32; K]) -> [f32; S],
) -> [f64; S] {
    let n = rows[0].len();
    debug_assert!(rows.iter().all(|r| r.len() == n));
    let whole = n - n % LANES;
    let mut acc = [[0f32; LANES]; S];
    for start in (0..whole).step_by(LANES) {
        let group: [&[f32; LANES]; K] =
            rows.map(|r| r[start..start + LANES].try_into().expect("a whole group"));
        for l in 0..LANES {
            let terms = f(group.map(|g| g[l]));
            for (a, t) in acc.iter_mut().zip(terms) {
                a[l] += t;
            }
        }
    }
    let mut tail = [0f32; S];
    for i in whole..n {
        for (t, v) in tail.iter_mut().zip(f(rows.map(|r| r[i]))) {
            *t += v;
        }
    }
    let mut out = [0f64; S];
    for ((o, a), t) in out.iter_mut().zip(acc).zip(tail) {
        *o = a.iter().map(|&v| v as f64).sum::<f64>() + t as f64;
    }
    out
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
                let rows = || channel_rows(x, g, c);
                let mean = rows().map(|r| row_sums([r], |[v]| [v])[0]).sum::<f64>() / n;
                let m = mean as f32;
                let var = rows()
                    .map(|r| row_sums([r], |[v]| [(v - m) * (v - m)])[0])
                    .sum::<f64>()
                    / n;
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
    // The output gradient with the fused ReLU's mask applied.
    let masked = |g: f32, y: f32| if y <= 0.0 { 0.0 } else { g };
    let sums: Vec<(f64, f64)> = (0..c_n)
        .into_par_iter()
        .map(|c| {
            let m = stats.mean[c] as f32;
            let (mut db, mut dxc) = (0f64, 0f64);
            let rows = channel_rows(g, geom, c).zip(channel_rows(x, geom, c));
            match y {
                Some(y) => {
                    for ((g, x), y) in rows.zip(channel_rows(y, geom, c)) {
                        let [b, d] = row_sums([g, y, x], |[g, y, x]| {
                            let g = masked(g, y);
                            [g, g * (x - m)]
                        });
                        (db, dxc) = (db + b, dxc + d);
                    }
                }
                None => {
                    for (g, x) in rows {
                        let [b, d] = row_sums([g, x], |[g, x]| [g, g * (x - m)]);
                        (db, dxc) = (db + b, dxc + d);
                    }
                }
            }
            (dxc * stats.rstd[c], db)
        })
        .collect();
    // ∂x = a·g + k1 + k2·(x − μ) with a = γ·r, k1 = −a·∂β/N, k2 = −a·r·∂γ/N.
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(inner.max(1))
        .enumerate()
        .for_each(|(chunk, dst)| {
            let c = chunk % c_n;
            let (mean, r) = (stats.mean[c], stats.rstd[c]);
            let (dw, db) = sums[c];
            let a = weight[c] as f64 * r;
            let (k1, k2) = ((-a * db / n) as f32, (-a * r * dw / n) as f32);
            let (a, m) = (a as f32, mean as f32);
            let xs = &x[chunk * inner..][..dst.len()];
            let gs = &g[chunk * inner..][..dst.len()];
            match y {
                Some(y) => {
                    let ys = &y[chunk * inner..][..dst.len()];
                    for (((o, &x), &g), &y) in dst.iter_mut().zip(xs).zip(gs).zip(ys) {
                        *o = a * masked(g, y) + k1 + k2 * (x - m);
                    }
                }
                None => {
                    for ((o, &x), &g) in dst.iter_mut().zip(xs).zip(gs) {
                        *o = a * g + k1 + k2 * (x - m);
                    }
                }
            }
        });
    let dw = sums.iter().map(|s| s.0 as f32).collect();
    let db = sums.iter().map(|s| s.1 as f32).collect();
    (dx, dw, db)
}
