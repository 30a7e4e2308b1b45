//! 2-d convolution with a faster backward pass on the CPU.
//!
//! candle differentiates `conv2d` with a `conv_transpose2d` for the input gradient, whose CPU
//! kernel is a direct loop about twice as slow as the im2col convolution (138 ms against 68 ms
//! for the demo network's first stage at batch 64), and it computes that gradient even for the
//! network's input image, which needs none. On the CPU this module wraps the convolution in a
//! custom operation whose backward computes, for stride 1, the input gradient as a convolution
//! with the flipped, transposed kernel (the identical sum), skips it when the caller says the
//! input needs no gradient, and otherwise does what candle does. Other devices use candle's
//! convolution unchanged.

use candle_core::{bail, CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `x.conv2d(w, padding, stride, 1, 1)` (square kernels, no groups); `input_grad = false`
/// leaves `x` without a gradient (the stem's input image).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    input_grad: bool,
) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let op = Conv {
        padding,
        stride,
        input_grad,
    };
    x.contiguous()?
        .apply_op2_arc(&w.contiguous()?, Arc::new(Box::new(op)))
}

struct Conv {
    padding: usize,
    stride: usize,
    input_grad: bool,
}

/// A tensor holding a copy of a contiguous CPU storage's values.
fn tensor_of(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("conv2d: non-contiguous operand")
    };
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], l.shape(), &Device::Cpu),
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], l.shape(), &Device::Cpu),
        _ => bail!("conv2d: only f32 and f64 are supported on the CPU"),
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "simtrans-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = tensor_of(s1, l1)?.conv2d(&tensor_of(s2, l2)?, self.padding, self.stride, 1, 1)?;
        let shape = y.shape().clone();
        let flat = y.flatten_all()?;
        let storage = match flat.dtype() {
            candle_core::DType::F32 => CpuStorage::F32(flat.to_vec1()?),
            candle_core::DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            other => bail!("conv2d: unexpected dtype {other:?}"),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (p, s) = (self.padding, self.stride);
        let (_, _, kh, kw) = w.dims4()?;
        let grad_x = if !self.input_grad {
            None
        } else if s == 1 && kh == kw && p < kh {
            let flipped = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
            Some(grad.conv2d(&flipped, kh - 1 - p, 1, 1, 1)?)
        } else {
            // The full transposed convolution (no padding), padded with zeros where no window
            // reached (the stride does not divide the padded size), then cropped by the padding.
            // (candle's own rule takes the output padding from the height alone, which is wrong
            // for non-square inputs.)
            let full = grad.conv_transpose2d(w, 0, 0, s, 1)?;
            let (h, wd) = (x.dim(2)?, x.dim(3)?);
            let eh = (p + h).saturating_sub(full.dim(2)?);
            let ew = (p + wd).saturating_sub(full.dim(3)?);
            let full = full.pad_with_zeros(2, 0, eh)?.pad_with_zeros(3, 0, ew)?;
            Some(full.narrow(2, p, h)?.narrow(3, p, wd)?)
        };
        let gw = x
            .transpose(0, 1)?
            .conv2d(&grad.transpose(0, 1)?, p, 1, s, 1)?
            .transpose(0, 1)?;
        let gw = if gw.dim(2)? != kh || gw.dim(3)? != kw {
            gw.narrow(2, 0, kh)?.narrow(3, 0, kw)?
        } else {
            gw
        };
        Ok((grad_x, Some(gw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    #[test]
    fn values_and_gradients_equal_candles_convolution() {
        let dev = Device::Cpu;
        for (cin, cout, k, p, s, h, w) in [
            (3usize, 4usize, 3usize, 1usize, 1usize, 7usize, 6usize),
            (4, 5, 3, 1, 2, 8, 8),
            (4, 5, 3, 1, 2, 7, 7),
            (4, 6, 1, 0, 2, 6, 6),
            (4, 6, 1, 0, 2, 5, 5),
            (3, 4, 7, 3, 2, 11, 11),
            (3, 4, 7, 3, 2, 12, 12),
            (2, 3, 1, 0, 1, 5, 5),
        ] {
            let x =
                Var::from_tensor(&Tensor::randn(0f64, 1., (2, cin, h, w), &dev).unwrap()).unwrap();
            let k_ = Var::from_tensor(&Tensor::randn(0f64, 1., (cout, cin, k, k), &dev).unwrap())
                .unwrap();
            let mix = Tensor::randn(
                0f64,
                1.,
                (2, cout, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1),
                &dev,
            )
            .unwrap();
            let ours = conv2d(x.as_tensor(), k_.as_tensor(), p, s, true).unwrap();
            let theirs = x.as_tensor().conv2d(k_.as_tensor(), p, s, 1, 1).unwrap();
            let g1 = (&ours * &mix)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&theirs * &mix)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let close = |a: &Tensor, b: &Tensor| {
                let d = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let m = b
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(d <= 1e-12 * m.max(1.0), "k{k} p{p} s{s}: {d} vs {m}");
            };
            close(&ours, &theirs);
            close(
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            close(
                g1.get(k_.as_tensor()).unwrap(),
                g2.get(k_.as_tensor()).unwrap(),
            );
            // Without an input gradient only the kernel gets one.
            let y = conv2d(x.as_tensor(), k_.as_tensor(), p, s, false).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            assert!(g.get(x.as_tensor()).is_none() && g.get(k_.as_tensor()).is_some());
            assert_eq!(y.dtype(), DType::F64);
        }
    }
}
