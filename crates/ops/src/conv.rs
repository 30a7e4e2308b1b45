//! The trainable 2-D convolution of every network, and its fast CPU path.
//!
//! [`conv2d`] is the one entry point: CUDA tensors go to `crate::cudnn` (built with
//! `--features cuda`); f32/f64 CPU tensors to [`Conv2d`], this module's fused op; anything
//! else to candle's own `conv2d`.
//!
//! candle's CPU `conv2d` is fine forward, but its backward goes through `conv_transpose2d` and
//! a kernel-sized `conv2d`, which dominated a training step of the demo network (the 16-channel
//! 28-px layer of a batch of 64: 227 ms forward + backward). The definition here is im2col
//! ([`conv2d_composed`]): the batch unfolded into one `[C·kh·kw, B·Ho·Wo]` matrix by a custom
//! op whose backward is the matching fold (col2im), one matmul with the `[O, C·kh·kw]` weight
//! matrix whose gradients come from candle's GEMMs, and a transposing copy into `[B, O, Ho, Wo]`.
//! It is exact, and the gradient test below proves it, but it builds a 9× copy of the batch
//! (29 MB for a layer-1 convolution of the demo), the transposing copy and their gradients.
//!
//! [`Conv2d`] computes the same products one image at a time, straight into the output's
//! layout: the image unfolded into a `[C·kh·kw, Ho·Wo]` buffer reused across the images a task
//! handles (no unfold at all for a 1×1 stride-1 convolution), one `gemm` call per image writing
//! `[O, Ho·Wo]` in place, images in parallel. Its backward is two ops of the same kind: the
//! weight gradient summed over the images in a fixed grouping ([`WEIGHT_GRAD_PARTS`] partial
//! sums added in order, so the result does not depend on the thread count or on scheduling),
//! and the input gradient folded back per image — skipped when the input tracks no gradient,
//! as for the stem's images. Tested against the definition in values and gradients.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// The geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    /// Rows of an unfolded image: `C·kh·kw`, the weight matrix's columns.
    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Output pixels of one image, `Ho·Wo`.
    fn pixels(&self) -> usize {
        self.ho * self.wo
    }
    /// Values of one input image, `C·H·W`.
    fn image(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Whether an image is its own unfolding (a 1×1 stride-1 convolution without padding).
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Input coordinate of output coordinate `o` at kernel offset `k`, if inside the image.
    fn src(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.pad)
            .filter(|&i| i < size)
    }
    /// The output coordinates `lo..hi` (of `out`) whose input coordinate at kernel offset `k`
    /// lies inside an axis of `size`; the input coordinate of `lo` is `lo·stride + k − pad`.
    fn span(&self, k: usize, size: usize, out: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(k).div_ceil(self.stride).min(out);
        let hi = match (size + self.pad).checked_sub(k + 1) {
            Some(last) => (last / self.stride + 1).min(out),
            None => 0,
        };
        (lo, hi.max(lo))
    }
    /// The channel and kernel offsets `(c, i, j)` of unfolded row `row`.
    fn row(&self, row: usize) -> (usize, usize, usize) {
        let c = row / (self.kh * self.kw);
        (c, (row / self.kw) % self.kh, row % self.kw)
    }
}

/// Writes the `Ho·Wo` values that kernel offset `(i, j)` reads from one channel `plane`
/// (`H·W`) into `dst`, zeros where the kernel reads padding.
fn unfold_row<T: WithDType>(plane: &[T], g: &Geom, i: usize, j: usize, dst: &mut [T]) {
    let (lo, hi) = g.span(j, g.w, g.wo);
    if g.stride == 1 && g.w == g.wo && lo < hi {
        return unfold_row_shifted(plane, g, (i, j), (lo, hi), dst);
    }
    for (oy, d) in dst.chunks_exact_mut(g.wo).enumerate() {
        let Some(iy) = g.src(oy, i, g.h) else {
            d.fill(T::zero());
            continue;
        };
        d[..lo].fill(T::zero());
        d[hi..].fill(T::zero());
        if lo == hi {
            continue;
        }
        let src = &plane[iy * g.w + lo * g.stride + j - g.pad..];
        if g.stride == 1 {
            d[lo..hi].copy_from_slice(&src[..hi - lo]);
        } else {
            for (v, &s) in d[lo..hi].iter_mut().zip(src.iter().step_by(g.stride)) {
                *v = s;
            }
        }
    }
}

/// [`unfold_row`] where output and input rows are equally long and the stride is 1 (a "same"
/// convolution): the values the kernel reads from the image's rows are then one contiguous
/// run of `plane`, shifted, so they are copied in one piece, and only the `lo` leading and
/// `Wo − hi` trailing columns of each row (the padding, where the run wraps into a
/// neighbouring row) are zeroed afterwards. One copy per kernel offset instead of one per
/// output row: with 28-px rows the per-row calls cost more than the copying.
fn unfold_row_shifted<T: WithDType>(
    plane: &[T],
    g: &Geom,
    (i, j): (usize, usize),
    (lo, hi): (usize, usize),
    dst: &mut [T],
) {
    let wo = g.wo;
    let (top, bottom) = g.span(i, g.h, g.ho);
    dst[..top * wo].fill(T::zero());
    dst[bottom * wo..].fill(T::zero());
    if top == bottom {
        return;
    }
    // Output (top, lo) reads input (top + i − pad, lo + j − pad) = plane[start], and every
    // later output of rows top..bottom reads the input one further on, up to (bottom − 1, hi − 1).
    let first = top * wo + lo;
    let len = (bottom - 1) * wo + hi - first;
    let start = (top + i - g.pad) * g.w + lo + j - g.pad;
    dst[first..first + len].copy_from_slice(&plane[start..start + len]);
    for row in dst[top * wo..bottom * wo].chunks_exact_mut(wo) {
        row[..lo].fill(T::zero());
        row[hi..].fill(T::zero());
    }
}

/// The adjoint of [`unfold_row`]: adds each of the `Ho·Wo` values of `src` into the pixel of
/// `plane` it was read from.
fn fold_row<T: WithDType>(src: &[T], g: &Geom, i: usize, j: usize, plane: &mut [T]) {
    let (lo, hi) = g.span(j, g.w, g.wo);
    if lo == hi {
        return;
    }
    for (oy, s) in src.chunks_exact(g.wo).enumerate() {
        let Some(iy) = g.src(oy, i, g.h) else {
            continue;
        };
        let dst = &mut plane[iy * g.w + lo * g.stride + j - g.pad..];
        if g.stride == 1 {
            // A plain zip, which the compiler vectorises (a runtime `step_by` keeps it scalar).
            for (d, &v) in dst[..hi - lo].iter_mut().zip(&s[lo..hi]) {
                *d += v;
            }
        } else {
            for (d, &v) in dst.iter_mut().step_by(g.stride).zip(&s[lo..hi]) {
                *d += v;
            }
        }
    }
}

/// Unfolds one image `[C, H, W]` into `cols`, `[C·kh·kw, Ho·Wo]`.
fn unfold_image<T: WithDType>(x: &[T], g: &Geom, cols: &mut [T]) {
    let n = g.pixels();
    for (row, dst) in cols.chunks_exact_mut(n).enumerate() {
        let (c, i, j) = g.row(row);
        unfold_row(&x[c * g.h * g.w..][..g.h * g.w], g, i, j, dst);
    }
}

/// The adjoint of [`unfold_image`]: `dx = fold(cols)` for one image (overwrites `dx`).
fn fold_image<T: WithDType>(cols: &[T], g: &Geom, dx: &mut [T]) {
    dx.fill(T::zero());
    let n = g.pixels();
    for (row, src) in cols.chunks_exact(n).enumerate() {
        let (c, i, j) = g.row(row);
        fold_row(src, g, i, j, &mut dx[c * g.h * g.w..][..g.h * g.w]);
    }
}

/// Unfolds `[B, C, H, W]` into `[C·kh·kw, B·Ho·Wo]` (row `(c, i, j)`, column `(b, oy, ox)`).
fn unfold<T: WithDType>(x: &[T], g: Geom) -> Vec<T> {
    let n = g.pixels();
    let mut out = vec![T::zero(); g.rows() * g.b * n];
    out.par_chunks_mut(g.b * n)
        .enumerate()
        .for_each(|(row, dst)| {
            let (c, i, j) = g.row(row);
            for (b, d) in dst.chunks_exact_mut(n).enumerate() {
                unfold_row(&x[(b * g.c + c) * g.h * g.w..][..g.h * g.w], &g, i, j, d);
            }
        });
    out
}

/// The adjoint of [`unfold`]: sums each column entry back into the pixel it came from.
fn fold<T: WithDType>(cols: &[T], g: Geom) -> Vec<T> {
    let n = g.pixels();
    let mut out = vec![T::zero(); g.b * g.c * g.h * g.w];
    out.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(bc, plane)| {
            let (b, c) = (bc / g.c, bc % g.c);
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let row = &cols[((c * g.kh + i) * g.kw + j) * g.b * n..][..g.b * n];
                    fold_row(&row[b * n..][..n], &g, i, j, plane);
                }
            }
        });
    out
}

/// A row-major matrix operand of [`matmul`]: `rows × cols` values with strides.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous row-major matrix with `cols` columns.
    fn rows(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// The transpose of a contiguous row-major matrix with `cols` columns.
    fn transposed(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }
}

/// `dst [m, n] (+)= lhs [m, k] · rhs [k, n]` on the calling thread (`accumulate` adds to `dst`).
fn matmul<T: WithDType>(
    dst: &mut [T],
    (m, n, k): (usize, usize, usize),
    lhs: Mat<T>,
    rhs: Mat<T>,
    accumulate: bool,
) {
    let last = |mat: Mat<T>, rows: usize, cols: usize| {
        (rows - 1) * mat.row_stride + (cols - 1) * mat.col_stride
    };
    assert!(m > 0 && n > 0 && k > 0 && dst.len() >= m * n);
    assert!(lhs.data.len() > last(lhs, m, k) && rhs.data.len() > last(rhs, k, n));
    // SAFETY: the asserts keep every index gemm computes from these strides inside the
    // slices; `dst` is borrowed mutably and does not overlap the shared operands; gemm reads
    // `dst` only when `accumulate`; T is f32 or f64 (the ops below refuse other dtypes).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The number of partial sums the weight gradient is split into (images in contiguous groups,
/// groups in parallel, partial sums added in group order): fixed, so that the rounding does
/// not depend on the thread count.
const WEIGHT_GRAD_PARTS: usize = 8;

/// `y [B, O, Ho, Wo] = conv(x, w)`, image by image.
fn conv_forward<T: WithDType>(x: &[T], w: &[T], g: &Geom) -> Vec<T> {
    let (k, n) = (g.rows(), g.pixels());
    let mut y = vec![T::zero(); g.b * g.o * n];
    let lhs = Mat::rows(w, k);
    y.par_chunks_mut(g.o * n)
        .zip(x.par_chunks(g.image()))
        .for_each_init(Vec::new, |cols, (y, x)| {
            let rhs = if g.is_pointwise() {
                x
            } else {
                cols.resize(k * n, T::zero());
                unfold_image(x, g, cols);
                cols
            };
            matmul(y, (g.o, n, k), lhs, Mat::rows(rhs, n), false);
        });
    y
}

/// `∂L/∂w [O, C·kh·kw] = Σ_b dy_b · unfold(x_b)ᵀ`.
fn conv_weight_grad<T: WithDType>(x: &[T], dy: &[T], g: &Geom) -> Vec<T> {
    let (k, n) = (g.rows(), g.pixels());
    let per_part = g.b.div_ceil(WEIGHT_GRAD_PARTS);
    let parts: Vec<Vec<T>> = x
        .par_chunks(per_part * g.image())
        .zip(dy.par_chunks(per_part * g.o * n))
        .map(|(xs, dys)| {
            let mut dw = vec![T::zero(); g.o * k];
            let mut cols = Vec::new();
            let images = xs.chunks_exact(g.image()).zip(dys.chunks_exact(g.o * n));
            for (index, (x, dy)) in images.enumerate() {
                let unfolded = if g.is_pointwise() {
                    x
                } else {
                    cols.resize(k * n, T::zero());
                    unfold_image(x, g, &mut cols);
                    &cols
                };
                let rhs = Mat::transposed(unfolded, n);
                matmul(&mut dw, (g.o, k, n), Mat::rows(dy, n), rhs, index > 0);
            }
            dw
        })
        .collect();
    let mut dw = vec![T::zero(); g.o * k];
    dw.par_chunks_mut(k).enumerate().for_each(|(row, dst)| {
        for part in &parts {
            for (d, &v) in dst.iter_mut().zip(&part[row * k..][..k]) {
                *d += v;
            }
        }
    });
    dw
}

/// `∂L/∂x_b = fold(wᵀ · dy_b)`, image by image.
fn conv_input_grad<T: WithDType>(dy: &[T], w: &[T], g: &Geom) -> Vec<T> {
    let (k, n) = (g.rows(), g.pixels());
    let mut dx = vec![T::zero(); g.b * g.image()];
    let lhs = Mat::transposed(w, k);
    dx.par_chunks_mut(g.image())
        .zip(dy.par_chunks(g.o * n))
        .for_each_init(Vec::new, |cols, (dx, dy)| {
            if g.is_pointwise() {
                matmul(dx, (k, n, g.o), lhs, Mat::rows(dy, n), false);
            } else {
                cols.resize(k * n, T::zero());
                matmul(cols, (k, n, g.o), lhs, Mat::rows(dy, n), false);
                fold_image(cols, g, dx);
            }
        });
    dx
}

fn contiguous_slice<'a, T: WithDType>(st: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("conv2d needs contiguous tensors".into()))?;
    Ok(&st.as_slice::<T>()?[a..b])
}

/// Runs `f` on two contiguous f32 or f64 storages of one dtype.
fn on_floats(
    what: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32_op: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64_op: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    Ok(match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => {
            CpuStorage::F32(f32_op(contiguous_slice(s1, l1)?, contiguous_slice(s2, l2)?))
        }
        (CpuStorage::F64(_), CpuStorage::F64(_)) => {
            CpuStorage::F64(f64_op(contiguous_slice(s1, l1)?, contiguous_slice(s2, l2)?))
        }
        _ => candle_core::bail!("{what} supports f32 and f64 tensors of one dtype"),
    })
}

/// The three products of a convolution the fused op computes, each one candle op.
#[derive(Debug, Clone, Copy)]
enum Product {
    /// `(x, w) ↦ y`, differentiable through the other two.
    Output,
    /// `(x, dy) ↦ ∂L/∂w`.
    WeightGrad,
    /// `(dy, w) ↦ ∂L/∂x`.
    InputGrad,
}

/// The fused CPU convolution and its gradients; see the module doc.
struct Conv2d(Geom, Product);

impl Conv2d {
    fn run<T: WithDType>(&self, a: &[T], b: &[T]) -> Vec<T> {
        match self.1 {
            Product::Output => conv_forward(a, b, &self.0),
            Product::WeightGrad => conv_weight_grad(a, b, &self.0),
            Product::InputGrad => conv_input_grad(a, b, &self.0),
        }
    }
    fn shape(&self) -> Shape {
        let g = &self.0;
        match self.1 {
            Product::Output => Shape::from((g.b, g.o, g.ho, g.wo)),
            Product::WeightGrad => Shape::from((g.o, g.c, g.kh, g.kw)),
            Product::InputGrad => Shape::from((g.b, g.c, g.h, g.w)),
        }
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        match self.1 {
            Product::Output => "conv2d-cpu",
            Product::WeightGrad => "conv2d-cpu-weight-grad",
            Product::InputGrad => "conv2d-cpu-input-grad",
        }
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = on_floats(
            self.name(),
            (s1, l1),
            (s2, l2),
            |a, b| self.run(a, b),
            |a, b| self.run(a, b),
        )?;
        Ok((out, self.shape()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Product::Output = self.1 else {
            candle_core::bail!("{} has no backward pass", self.name())
        };
        let dy = dy.contiguous()?;
        let dw = x.apply_op2_no_bwd(&dy, &Conv2d(self.0, Product::WeightGrad))?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(w, &Conv2d(self.0, Product::InputGrad))?)
        } else {
            None
        };
        Ok((dx, Some(dw)))
    }
}

struct Unfold(Geom);
struct Fold(Geom);

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "im2col"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let shape = Shape::from((g.rows(), g.b * g.pixels()));
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
/// (no dilation, no groups), trainable: [`Conv2d`] on the CPU in f32/f64, cuDNN on CUDA
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
    let g = geometry(x, w, padding, stride)?;
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2d(g, Product::Output))
}

/// The definition of [`conv2d`]'s CPU path: the whole batch unfolded (im2col), one matmul, a
/// transposing copy; gradients through the fold and candle's matmul backward.
pub fn conv2d_composed(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let g = geometry(x, w, padding, stride)?;
    let cols = x.contiguous()?.apply_op1(Unfold(g))?;
    let out = w.reshape((g.o, g.rows()))?.matmul(&cols)?;
    out.reshape((g.o, g.b, g.ho, g.wo))?
        .transpose(0, 1)?
        .contiguous()
}

/// The geometry of `conv2d(x, w)`, or an error naming both shapes when they do not fit.
fn geometry(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Geom> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, c2, kh, kw) = w.dims4()?;
    if c != c2 || h + 2 * padding < kh || wd + 2 * padding < kw || stride == 0 || b == 0 || o == 0 {
        candle_core::bail!(
            "conv2d: input {:?} does not fit weight {:?}",
            x.dims(),
            w.dims()
        )
    }
    Ok(Geom {
        b,
        c,
        h,
        w: wd,
        o,
        kh,
        kw,
        stride,
        pad: padding,
        ho: (h + 2 * padding - kh) / stride + 1,
        wo: (wd + 2 * padding - kw) / stride + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A convolution entry point: `(x, w, padding, stride)`.
    type ConvFn = fn(&Tensor, &Tensor, usize, usize) -> Result<Tensor>;
    /// `(b, c, o, h, w, k, stride, pad)`.
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

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
            // More padding than image: whole kernel rows and columns read only zeros.
            (2, 2, 3, 3, 2, 7, 2, 3),
            (1, 2, 2, 8, 10, 5, 3, 2),
            (1, 1, 2, 4, 5, 3, 2, 0),
            // "Same" 5×5 on a non-square image: the shifted unfold with two padding columns.
            (2, 2, 3, 6, 5, 5, 1, 2),
        ] {
            let (nx, nw) = (b * c * h * w, o * c * k * k);
            let x = Var::from_tensor(&t(nx, 1, &[b, c, h, w])).unwrap();
            let wt = Var::from_tensor(&t(nw, 2, &[o, c, k, k])).unwrap();
            let convs: [ConvFn; 2] = [conv2d, conv2d_composed];
            for conv in convs {
                let ours = conv(x.as_tensor(), wt.as_tensor(), p, s).unwrap();
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

    /// `span` is exactly the set of output coordinates that `src` maps inside the image.
    #[test]
    fn span_is_where_the_kernel_reads_the_image() {
        for (stride, pad, k, size) in (1..4).flat_map(|s| {
            (0..4).flat_map(move |p| (0..8).flat_map(move |k| (1..9).map(move |n| (s, p, k, n))))
        }) {
            let out = 10;
            let g = Geom {
                b: 1,
                c: 1,
                h: size,
                w: size,
                o: 1,
                kh: k + 1,
                kw: k + 1,
                stride,
                pad,
                ho: out,
                wo: out,
            };
            let inside: Vec<usize> = (0..out).filter(|&o| g.src(o, k, size).is_some()).collect();
            let (lo, hi) = g.span(k, size, out);
            assert_eq!((lo..hi).collect::<Vec<_>>(), inside, "{g:?} k {k}");
            if lo < hi {
                assert_eq!(g.src(lo, k, size), Some(lo * stride + k - pad));
            }
        }
    }

    /// `unfold_row` (both of its paths, the shifted copy of "same" convolutions included) writes
    /// exactly the per-pixel definition, whatever `dst` held before: the image's value where
    /// the kernel reads inside it, else zero.
    #[test]
    fn unfold_row_is_the_per_pixel_definition() {
        let mut shifted = 0;
        for (stride, pad, k, h, w) in (1..3).flat_map(|s| {
            (0..3).flat_map(move |p| {
                (1..6).flat_map(move |k| {
                    (1..7).flat_map(move |h| (1..7).map(move |w| (s, p, k, h, w)))
                })
            })
        }) {
            if h + 2 * pad < k || w + 2 * pad < k {
                continue;
            }
            let (ho, wo) = (
                (h + 2 * pad - k) / stride + 1,
                (w + 2 * pad - k) / stride + 1,
            );
            let g = Geom {
                b: 1,
                c: 1,
                h,
                w,
                o: 1,
                kh: k,
                kw: k,
                stride,
                pad,
                ho,
                wo,
            };
            shifted += usize::from(stride == 1 && w == wo);
            let plane: Vec<f32> = (0..h * w).map(|v| v as f32 + 1.0).collect();
            for (i, j) in (0..k).flat_map(|i| (0..k).map(move |j| (i, j))) {
                let mut dst = vec![f32::NAN; ho * wo];
                unfold_row(&plane, &g, i, j, &mut dst);
                for (oy, ox) in (0..ho).flat_map(|y| (0..wo).map(move |x| (y, x))) {
                    let want = match (g.src(oy, i, h), g.src(ox, j, w)) {
                        (Some(iy), Some(ix)) => plane[iy * w + ix],
                        _ => 0.0,
                    };
                    assert_eq!(
                        dst[oy * wo + ox].to_bits(),
                        want.to_bits(),
                        "{g:?} ({i}, {j}) at ({oy}, {ox})"
                    );
                }
            }
        }
        assert!(
            shifted > 50,
            "the shifted path was tested on {shifted} geometries"
        );
    }

    /// The geometries of the tests below: batch sizes that do and do not divide into the
    /// weight gradient's parts, 3×3 with and without stride, 7×7 stem, 1×1 with and without
    /// stride.
    const GEOMETRIES: [Case; 7] = [
        (3, 4, 5, 9, 7, 3, 1, 1),
        (9, 3, 6, 10, 9, 3, 2, 1),
        (17, 4, 4, 6, 6, 3, 1, 1),
        (2, 3, 4, 15, 13, 7, 2, 3),
        (5, 6, 3, 5, 7, 1, 1, 0),
        (8, 4, 7, 7, 8, 1, 2, 0),
        (1, 2, 3, 4, 4, 3, 1, 1),
    ];

    /// `(x, w, u)`: f32 variables for the input and weight, and a fixed output cotangent.
    fn case((b, c, o, h, w, k, s, p): Case) -> (Var, Var, Tensor) {
        let dev = Device::Cpu;
        let f32s = |n: usize, seed: usize| {
            values(n, seed)
                .into_iter()
                .map(|v| v as f32)
                .collect::<Vec<_>>()
        };
        let x = Var::from_vec(f32s(b * c * h * w, 1), (b, c, h, w), &dev).unwrap();
        let wt = Var::from_vec(f32s(o * c * k * k, 2), (o, c, k, k), &dev).unwrap();
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let u = Tensor::from_vec(f32s(b * o * ho * wo, 3), (b, o, ho, wo), &dev).unwrap();
        (x, wt, u)
    }

    /// Output and gradients `(y, ∂/∂x, ∂/∂w)` of `Σ conv(x, w) · u`.
    fn run(conv: ConvFn, (x, wt, u): &(Var, Var, Tensor), p: usize, s: usize) -> [Tensor; 3] {
        let y = conv(x.as_tensor(), wt.as_tensor(), p, s).unwrap();
        let grads = crate::grad::backward(&(&y * u).unwrap().sum_all().unwrap()).unwrap();
        let dx = grads.get(x.as_tensor()).unwrap().clone();
        let dw = grads.get(wt.as_tensor()).unwrap().clone();
        [y, dx, dw]
    }

    fn max_relative_error(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff / scale
    }

    /// The fused op against its definition in f32: output, input gradient and weight gradient
    /// within 1e-5 of the largest value, for every geometry.
    #[test]
    fn fused_op_matches_the_composed_definition_in_f32() {
        for geom in GEOMETRIES {
            let (p, s) = (geom.7, geom.6);
            let inputs = case(geom);
            let fused = run(conv2d, &inputs, p, s);
            let composed = run(conv2d_composed, &inputs, p, s);
            for (name, (a, b)) in ["output", "input gradient", "weight gradient"]
                .iter()
                .zip(fused.iter().zip(&composed))
            {
                assert_eq!(a.dims(), b.dims(), "{name} {geom:?}");
                let err = max_relative_error(a, b);
                assert!(err < 1e-5, "{name} {geom:?}: relative error {err}");
            }
        }
    }

    /// The fused op's results do not depend on the number of threads: one thread and three
    /// give the same bits, output and both gradients.
    #[test]
    fn fused_op_is_bit_identical_across_thread_counts() {
        let on = |threads: usize, geom| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let out = run(conv2d, &case(geom), geom.7, geom.6);
                out.map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
        };
        for geom in GEOMETRIES {
            assert_eq!(on(1, geom), on(3, geom), "{geom:?}");
        }
    }

    /// An input that tracks no gradient (the stem's images) gets none computed; the weight's
    /// gradient is still there.
    #[test]
    fn an_untracked_input_gets_no_gradient() {
        let (x, wt, u) = case(GEOMETRIES[0]);
        let image = x.as_tensor().detach();
        let y = conv2d(&image, wt.as_tensor(), 1, 1).unwrap();
        let grads = crate::grad::backward(&(&y * &u).unwrap().sum_all().unwrap()).unwrap();
        assert!(grads.get(&image).is_none());
        assert!(grads.get(wt.as_tensor()).is_some());
    }
}
