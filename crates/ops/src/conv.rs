//! A fast trainable 2-D convolution for the CPU (im2col, one GEMM, col2im), and the one
//! entry point every network uses, which sends CUDA tensors to `crate::cudnn` (built
//! with `--features cuda`).
//!
//! candle's CPU `conv2d` is fine forward, but its backward goes through `conv_transpose2d` and
//! a kernel-sized `conv2d`, which dominate a training step of the demo network (measured: the
//! 16-channel 28-px layer of a batch of 64 took 227 ms forward + backward, 121 ms this way).
//! Here the input is unfolded once into a `[C·kh·kw, B·Ho·Wo]` matrix by a custom op whose
//! backward is the matching fold (col2im); the product with the `[O, C·kh·kw]` weight matrix is
//! an ordinary matmul, so its gradients come from candle's GEMMs. Other devices and dtypes use
//! candle's own `conv2d`. The input gradient of the stem (the image) is never computed: the
//! unfolded image does not track gradients, so autograd never calls the fold.
//!
//! An alternative kept candle's forward and computed the stride-1 input gradient as a
//! convolution with the flipped kernel; on the demo network it was slower in the same run
//! (`cargo run --release -p simtrans-backbone --example bench cpu 5 16`, both under the same
//! background load: 41.5 against 47.6 training images/s for this module), and whole demo
//! classifier epochs took about 11.5 s against 7.5 s, so this module stayed.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// The geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn cols(&self) -> usize {
        self.b * self.ho * self.wo
    }
    /// Input coordinate of output coordinate `o` at kernel offset `k`, if inside the image.
    fn src(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.pad)
            .filter(|&i| i < size)
    }
}

/// Unfolds `[B, C, H, W]` into `[C·kh·kw, B·Ho·Wo]` (row `(c, i, j)`, column `(b, oy, ox)`).
fn unfold<T: WithDType>(x: &[T], g: Geom) -> Vec<T> {
    let n = g.cols();
    let mut out = vec![T::zero(); g.rows() * n];
    out.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
        let c = row / (g.kh * g.kw);
        let (i, j) = ((row / g.kw) % g.kh, row % g.kw);
        for b in 0..g.b {
            let plane = &x[(b * g.c + c) * g.h * g.w..][..g.h * g.w];
            for oy in 0..g.ho {
                let Some(iy) = g.src(oy, i, g.h) else {
                    continue;
                };
                let src = &plane[iy * g.w..][..g.w];
                let d = &mut dst[(b * g.ho + oy) * g.wo..][..g.wo];
                for (ox, v) in d.iter_mut().enumerate() {
                    if let Some(ix) = g.src(ox, j, g.w) {
                        *v = src[ix];
                    }
                }
            }
        }
    });
    out
}

/// The adjoint of [`unfold`]: sums each column entry back into the pixel it came from.
fn fold<T: WithDType>(cols: &[T], g: Geom) -> Vec<T> {
    let n = g.cols();
    let mut out = vec![T::zero(); g.b * g.c * g.h * g.w];
    out.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(bc, plane)| {
            let (b, c) = (bc / g.c, bc % g.c);
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = &cols[((c * g.kh + i) * g.kw + j) * n..][..n];
                    for oy in 0..g.ho {
                        let Some(iy) = g.src(oy, i, g.h) else {
                            continue;
                        };
                        let src = &row[(b * g.ho + oy) * g.wo..][..g.wo];
                        let dst = &mut plane[iy * g.w..][..g.w];
                        for (ox, &v) in src.iter().enumerate() {
                            if let Some(ix) = g.src(ox, j, g.w) {
                                dst[ix] += v;
                            }
                        }
                    }
                }
            }
        });
    out
}

fn contiguous_slice<'a, T: WithDType>(st: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("im2col needs a contiguous tensor".into()))?;
    Ok(&st.as_slice::<T>()?[a..b])
}

struct Unfold(Geom);
struct Fold(Geom);

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "im2col"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let shape = Shape::from((g.rows(), g.cols()));
        Ok(match st {
            CpuStorage::F32(_) => (
                CpuStorage::F32(unfold(contiguous_slice::<f32>(st, l)?, g)),
                shape,
            ),
            CpuStorage::F64(_) => (
                CpuStorage::F64(unfold(contiguous_slice::<f64>(st, l)?, g)),
                shape,
            ),
            _ => candle_core::bail!("im2col supports f32 and f64"),
        })
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Fold(self.0))?))
    }
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "col2im"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let shape = Shape::from((g.b, g.c, g.h, g.w));
        Ok(match st {
            CpuStorage::F32(_) => (
                CpuStorage::F32(fold(contiguous_slice::<f32>(st, l)?, g)),
                shape,
            ),
            CpuStorage::F64(_) => (
                CpuStorage::F64(fold(contiguous_slice::<f64>(st, l)?, g)),
                shape,
            ),
            _ => candle_core::bail!("col2im supports f32 and f64"),
        })
    }
}

/// `conv2d(x [B, C, H, W], w [O, C, kh, kw])` with zero padding `padding` and stride `stride`
/// (no dilation, no groups), trainable: the im2col path on the CPU in f32/f64, cuDNN on CUDA
/// devices in builds with `--features cuda` (the weight is cast to the activations' dtype, so
/// bf16 activations train f32 master weights), candle's `conv2d` elsewhere.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cudnn::enabled()
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
    {
        return crate::cudnn::conv2d(x, &w.to_dtype(x.dtype())?, padding, stride);
    }
    let cpu_float = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if !cpu_float {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let (b, c, h, wd) = x.dims4()?;
    let (o, c2, kh, kw) = w.dims4()?;
    if c != c2 || h + 2 * padding < kh || wd + 2 * padding < kw || stride == 0 {
        candle_core::bail!(
            "conv2d: input {:?} does not fit weight {:?}",
            x.dims(),
            w.dims()
        )
    }
    let ho = (h + 2 * padding - kh) / stride + 1;
    let wo = (wd + 2 * padding - kw) / stride + 1;
    let g = Geom {
        b,
        c,
        h,
        w: wd,
        kh,
        kw,
        stride,
        pad: padding,
        ho,
        wo,
    };
    let cols = x.contiguous()?.apply_op1(Unfold(g))?;
    let out = w.reshape((o, g.rows()))?.matmul(&cols)?;
    out.reshape((o, b, ho, wo))?.transpose(0, 1)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: usize) -> Vec<f64> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f64) / 500.0 - 1.0)
            .collect()
    }

    /// The forward equals candle's conv2d, and both gradients satisfy the adjoint identity of a
    /// bilinear map: `⟨∂/∂x ⟨conv(x, w), u⟩, d⟩ = ⟨conv(d, w), u⟩` (and likewise for `w`), in f64,
    /// for every geometry ResNets use. (candle's own backward is not the reference: for a
    /// stride-2 convolution of an odd-by-even input it returns an input gradient of the wrong
    /// width.)
    #[test]
    fn forward_matches_candle_and_gradients_are_exact_adjoints() {
        let dev = Device::Cpu;
        let t = |n: usize, seed: usize, shape: &[usize]| {
            Tensor::from_vec(values(n, seed), shape, &dev).unwrap()
        };
        let dot = |a: &Tensor, b: &Tensor| {
            (a * b)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for (b, c, o, h, w, k, s, p) in [
            (2, 3, 4, 9, 7, 3, 1, 1),
            (2, 3, 5, 9, 8, 3, 2, 1),
            (1, 4, 6, 11, 11, 7, 2, 3),
            (3, 5, 2, 6, 6, 1, 1, 0),
            (2, 4, 3, 7, 7, 1, 2, 0),
        ] {
            let (nx, nw) = (b * c * h * w, o * c * k * k);
            let x = Var::from_tensor(&t(nx, 1, &[b, c, h, w])).unwrap();
            let wt = Var::from_tensor(&t(nw, 2, &[o, c, k, k])).unwrap();
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), p, s).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let err = (&ours - &theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(err < 1e-12, "forward {b} {c} {o} {h} {w} {k} {s} {p}");
            let u = t(ours.elem_count(), 3, ours.dims());
            let grads = (&ours * &u).unwrap().sum_all().unwrap().backward().unwrap();
            let (dx, dw) = (t(nx, 4, &[b, c, h, w]), t(nw, 5, &[o, c, k, k]));
            let gx = grads.get(x.as_tensor()).unwrap();
            let gw = grads.get(wt.as_tensor()).unwrap();
            let lhs_x = dot(gx, &dx);
            let rhs_x = dot(&dx.conv2d(wt.as_tensor(), p, s, 1, 1).unwrap(), &u);
            assert!(
                (lhs_x - rhs_x).abs() < 1e-9 * rhs_x.abs().max(1.0),
                "input gradient {b} {c} {o} {h} {w} {k} {s} {p}"
            );
            let lhs_w = dot(gw, &dw);
            let rhs_w = dot(&x.as_tensor().conv2d(&dw, p, s, 1, 1).unwrap(), &u);
            assert!(
                (lhs_w - rhs_w).abs() < 1e-9 * rhs_w.abs().max(1.0),
                "weight gradient {b} {c} {o} {h} {w} {k} {s} {p}"
            );
        }
    }
}
