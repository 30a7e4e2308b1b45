//! The losses of steps 3a and 3b: weighted cross-entropy and the similarity-graph regulariser.
//!
//! Step 3a trains the novel classifier on web images with each image's cross-entropy scaled by its
//! denoise weight, `mean_b(w_b · CE_b)`, so that outliers (low weight) pull less. Step 3b adds, on
//! graph epochs, a regulariser that makes the classifier's pooled features `g` of images the SimNet
//! finds similar lie close together:
//!
//! * `A [B, B]`: SimNet similarities of the same augmented batch, `A[i, j] = sim([f_j ; f_i])` —
//!   the SimNet's pair row order (pair row `k = i·B + j` is `[f_j ; f_i]`), so the SimNet's `[B²]`
//!   output reshaped row-major to `[B, B]` is `A` ([`pair_matrix`]). `A` comes from the frozen
//!   SimNet and is **detached** here: gradients reach `g` only.
//! * `Â = relax(A) ⊙ max(C, eye)` ([`adjacency`]), with `relax(a) = (e^{μa} − 1)/(e^{μ} − 1)`
//!   (μ = −4: a concave map of [0, 1] onto [0, 1] that lifts middling similarities) and `C` the
//!   same-label matrix of the batch. `eye` is a scalar floor of the mask: `eye = 1` (the default)
//!   makes it all ones, so every pair is regularised; `eye = 0` keeps same-label pairs only;
//!   values in between down-weight cross-label pairs.
//! * GCN regulariser ([`gcn_loss`]): `mean_{i,j}(Â_ij · ‖g_i − g_j‖²)`, computed from the Gram
//!   matrix as `‖g_i‖² + ‖g_j‖² − 2 g_i·g_j` (clamped at 0 against rounding) so that the
//!   `[B, B, D]` difference tensor never exists (128 × 128 × 2048 floats would be 134 MB per batch
//!   plus its gradient). The price is cancellation: the absolute error of a distance is about
//!   `1e-7 · ‖g‖²` in f32, far below the distances that matter for features of unit-order scale.
//! * COS regulariser ([`cos_loss`]): `mean_{i,j}((cos(g_i, g_j) − Â_ij)²)`, with each `g_i`
//!   divided by `max(‖g_i‖, 1e-8)` (a zero feature has cosine 0 with everything, and no NaN).
//!
//! The step-3b loss of a graph epoch is `weighted_ce + α · regulariser` ([`GraphReg`]).
//! All functions are tensor expressions that run unchanged on CPU and CUDA.

use std::str::FromStr;

use candle_core::{DType, Tensor, D};
use simtrans_core::config::ClassifierConfig;

use crate::error::{ClassifierError, Result};

/// Checks that `t` has exactly `expected` dimensions.
fn expect_dims(t: &Tensor, what: &'static str, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(ClassifierError::Shape {
            what,
            expected: format!("{expected:?}"),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// Per-sample cross-entropy `CE_b = −log softmax(logits_b)[labels_b]`, `[B]`.
/// `logits [B, C]` (float), `labels [B]` (an integer dtype: u32 or i64) holding class positions.
pub fn cross_entropy_per_sample(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, _) = logits.dims2()?;
    expect_dims(labels, "labels", &[b])?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(logp.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?)
}

/// The weighted cross-entropy of steps 3a/3b, `mean_b(w_b · CE_b)`, a scalar. `weights [B]` are the
/// denoise weights of the batch's images (all ones for the unweighted variants); they are
/// constants, detached here.
pub fn weighted_ce(logits: &Tensor, labels: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let ce = cross_entropy_per_sample(logits, labels)?;
    expect_dims(weights, "sample weights", ce.dims())?;
    let w = weights.detach().to_dtype(ce.dtype())?;
    Ok((ce * w)?.mean_all()?)
}

/// `relax(a) = (e^{μa} − 1)/(e^{μ} − 1)`, element-wise. Maps 0 → 0 and 1 → 1; μ must be finite and
/// non-zero (the μ → 0 limit, the identity, is not needed by any configuration).
pub fn relax(a: &Tensor, mu: f64) -> Result<Tensor> {
    if !mu.is_finite() || mu == 0.0 {
        return Err(ClassifierError::InvalidMu { mu });
    }
    let denom = mu.exp_m1();
    Ok((a.affine(mu, 0.0)?.exp()? - 1.0)?.affine(1.0 / denom, 0.0)?)
}

/// The mask `max(C, eye)`, `[B, B]` in `dtype`: `C[i, j] = 1` where `labels_i == labels_j`, else 0,
/// floored element-wise at the scalar `eye` (see the module doc).
pub fn label_mask(labels: &Tensor, eye: f64, dtype: DType) -> Result<Tensor> {
    let b = labels.dims1()?;
    let same = labels
        .unsqueeze(1)?
        .broadcast_as((b, b))?
        .eq(&labels.unsqueeze(0)?.broadcast_as((b, b))?)?
        .to_dtype(dtype)?;
    Ok(same.maximum(eye)?)
}

/// The SimNet's pair similarities of a batch, `[B²]` in pair row order (row `i·B + j` = `[f_j ;
/// f_i]`), as the matrix `A [B, B]` with `A[i, j] = sim([f_j ; f_i])`.
pub fn pair_matrix(pair_sims: &Tensor) -> Result<Tensor> {
    let n = pair_sims.dims1()?;
    let b = (n as f64).sqrt().round() as usize;
    if b * b != n {
        return Err(ClassifierError::Shape {
            what: "pair similarities",
            expected: "[B²] for a batch of B images".into(),
            got: vec![n],
        });
    }
    Ok(pair_sims.reshape((b, b))?)
}

/// The regulariser's adjacency `Â = relax(A) ⊙ max(C, eye)`, `[B, B]`, detached from `A`.
pub fn adjacency(a: &Tensor, labels: &Tensor, mu: f64, eye: f64) -> Result<Tensor> {
    let b = labels.dims1()?;
    expect_dims(a, "SimNet similarity matrix A", &[b, b])?;
    let mask = label_mask(labels, eye, a.dtype())?;
    Ok((relax(&a.detach(), mu)? * mask)?)
}

/// Squared Euclidean distances `‖g_i − g_j‖²`, `[B, B]`, from the Gram matrix, clamped at 0.
pub fn squared_distances(g: &Tensor) -> Result<Tensor> {
    let sq = g.sqr()?.sum_keepdim(1)?;
    let gram = g.matmul(&g.t()?)?;
    let d = (sq.broadcast_add(&sq.t()?)? - gram.affine(2.0, 0.0)?)?;
    Ok(d.maximum(0.0)?)
}

/// Checks `g [B, D]` against `Â [B, B]` and returns `Â` detached in the dtype of `g`.
fn check_graph(g: &Tensor, a_hat: &Tensor) -> Result<Tensor> {
    let (b, _) = g.dims2()?;
    expect_dims(a_hat, "adjacency Â", &[b, b])?;
    Ok(a_hat.detach().to_dtype(g.dtype())?)
}

/// The GCN regulariser `mean_{i,j}(Â_ij · ‖g_i − g_j‖²)`, a scalar; gradients flow to `g` only.
pub fn gcn_loss(g: &Tensor, a_hat: &Tensor) -> Result<Tensor> {
    let a_hat = check_graph(g, a_hat)?;
    Ok((a_hat * squared_distances(g)?)?.mean_all()?)
}

/// Cosine similarities `cos(g_i, g_j)`, `[B, B]`, each row of `g` divided by `max(‖g_i‖, 1e-8)`.
pub fn cosine_matrix(g: &Tensor) -> Result<Tensor> {
    let norm = g.sqr()?.sum_keepdim(1)?.maximum(1e-16)?.sqrt()?;
    let unit = g.broadcast_div(&norm)?;
    Ok(unit.matmul(&unit.t()?)?)
}

/// The COS regulariser `mean_{i,j}((cos(g_i, g_j) − Â_ij)²)`, a scalar; gradients flow to `g` only.
pub fn cos_loss(g: &Tensor, a_hat: &Tensor) -> Result<Tensor> {
    let a_hat = check_graph(g, a_hat)?;
    Ok((cosine_matrix(g)? - a_hat)?.sqr()?.mean_all()?)
}

/// Which graph regulariser step 3b uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// `Â`-weighted squared distances (the paper's default).
    Gcn,
    /// Squared difference between cosine similarity and `Â`.
    Cos,
}

impl Reg {
    /// The accepted names.
    pub const VALID: &'static str = "gcn, cos";

    /// The regulariser's value for features `g` and adjacency `Â`.
    pub fn loss(self, g: &Tensor, a_hat: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gcn => gcn_loss(g, a_hat),
            Self::Cos => cos_loss(g, a_hat),
        }
    }
}

impl FromStr for Reg {
    type Err = ClassifierError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gcn" => Ok(Self::Gcn),
            "cos" => Ok(Self::Cos),
            _ => Err(ClassifierError::UnknownReg {
                name: s.to_string(),
                valid: Self::VALID,
            }),
        }
    }
}

/// The graph term of a step-3b graph epoch, with its settings from the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GraphReg {
    /// Which regulariser.
    pub reg: Reg,
    /// Its weight α in the total loss.
    pub alpha: f64,
    /// Relax exponent μ.
    pub mu: f64,
    /// Floor of the same-label mask.
    pub eye: f64,
}

impl GraphReg {
    /// Reads `reg`, `alpha`, `mu` and `eye` from the classifier config, validating them.
    pub fn from_config(cfg: &ClassifierConfig) -> Result<Self> {
        if !cfg.mu.is_finite() || cfg.mu == 0.0 {
            return Err(ClassifierError::InvalidMu { mu: cfg.mu });
        }
        if !cfg.alpha.is_finite() || cfg.alpha < 0.0 {
            return Err(ClassifierError::Config(format!(
                "alpha = {} must be finite and ≥ 0 (the paper uses 0.1)",
                cfg.alpha
            )));
        }
        Ok(Self {
            reg: cfg.reg.parse()?,
            alpha: cfg.alpha,
            mu: cfg.mu,
            eye: cfg.eye,
        })
    }

    /// `α · reg(g, Â)` with `Â = adjacency(A, labels, μ, eye)`; `A` is detached.
    pub fn loss(&self, g: &Tensor, a: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let a_hat = adjacency(a, labels, self.mu, self.eye)?;
        Ok(self.reg.loss(g, &a_hat)?.affine(self.alpha, 0.0)?)
    }

    /// The two terms of a graph epoch's loss and the adjacency they used, kept apart for the
    /// graph-term accounting of the report; [`GraphTerms::total`] is the loss of a graph epoch,
    /// `mean_b(w_b · CE_b) + α · reg(g, Â)`.
    pub fn terms(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        weights: &Tensor,
        g: &Tensor,
        a: &Tensor,
    ) -> Result<GraphTerms> {
        let ce = weighted_ce(logits, labels, weights)?;
        let a_hat = adjacency(a, labels, self.mu, self.eye)?;
        let reg = self.reg.loss(g, &a_hat)?.affine(self.alpha, 0.0)?;
        Ok(GraphTerms { ce, reg, a_hat })
    }
}

/// One graph batch's loss in its parts.
#[derive(Debug, Clone)]
pub struct GraphTerms {
    /// `mean_b(w_b · CE_b)`.
    pub ce: Tensor,
    /// `α · reg(g, Â)`.
    pub reg: Tensor,
    /// `Â [B, B]` (detached).
    pub a_hat: Tensor,
}

impl GraphTerms {
    /// `ce + α · reg`, the loss that is differentiated.
    pub fn total(&self) -> Result<Tensor> {
        Ok((&self.ce + &self.reg)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic pseudo-random values in [lo, hi) (shared with the other crates' tests).
    fn det(shape: &[usize], seed: f64, lo: f32, hi: f32) -> Tensor {
        simtrans_core::seed::det_tensor(shape, seed, lo, hi).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        simtrans_core::compare::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn gram_form_equals_the_direct_form() {
        let (b, d) = (7, 5);
        let g = det(&[b, d], 1.0, -2.0, 2.0);
        let a_hat = det(&[b, b], 2.0, 0.0, 1.0);
        // The direct form materialises [B, B, D], fine at this size.
        let diff = g
            .unsqueeze(1)
            .unwrap()
            .broadcast_sub(&g.unsqueeze(0).unwrap())
            .unwrap();
        let direct_d = diff.sqr().unwrap().sum(2).unwrap();
        assert!(max_abs_diff(&squared_distances(&g).unwrap(), &direct_d) < 1e-5);
        let direct = (&a_hat * &direct_d).unwrap().mean_all().unwrap();
        let fast = gcn_loss(&g, &a_hat).unwrap();
        assert!(max_abs_diff(&direct, &fast) < 1e-5);

        // Their gradients agree too.
        let gv = Var::from_tensor(&g).unwrap();
        let fast_grad = gcn_loss(gv.as_tensor(), &a_hat)
            .unwrap()
            .backward()
            .unwrap();
        let gd = gv.as_tensor();
        let direct = (&a_hat
            * gd.unsqueeze(1)
                .unwrap()
                .broadcast_sub(&gd.unsqueeze(0).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .sum(2)
                .unwrap())
        .unwrap()
        .mean_all()
        .unwrap();
        let direct_grad = direct.backward().unwrap();
        assert!(max_abs_diff(fast_grad.get(&gv).unwrap(), direct_grad.get(&gv).unwrap()) < 1e-5);
    }

    #[test]
    fn similarity_matrix_gets_no_gradient() {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&det(&[4, 3], 3.0, -2.0, 2.0)).unwrap();
        let a = Var::from_tensor(&det(&[4, 4], 4.0, 0.0, 1.0)).unwrap();
        let labels = Tensor::new(&[0u32, 1, 0, 2], &dev).unwrap();
        for reg in [Reg::Gcn, Reg::Cos] {
            let gr = GraphReg {
                reg,
                alpha: 0.1,
                mu: -4.0,
                eye: 0.0,
            };
            let grads = gr
                .loss(g.as_tensor(), a.as_tensor(), &labels)
                .unwrap()
                .backward()
                .unwrap();
            assert!(grads.get(&g).is_some());
            assert!(grads.get(&a).is_none(), "{reg:?} leaked a gradient into A");
        }
    }

    #[test]
    fn relax_endpoints_mask_and_names() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[0f32, 0.5, 1.0], &dev).unwrap();
        let r = relax(&a, -4.0).unwrap().to_vec1::<f32>().unwrap();
        assert!(r[0].abs() < 1e-7 && (r[2] - 1.0).abs() < 1e-6);
        // Concave for μ < 0: a middling similarity is lifted.
        assert!(r[1] > 0.8);
        assert!(matches!(
            relax(&a, 0.0),
            Err(ClassifierError::InvalidMu { .. })
        ));

        let labels = Tensor::new(&[3u32, 1, 3], &dev).unwrap();
        let m = label_mask(&labels, 0.0, DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(
            m,
            vec![vec![1., 0., 1.], vec![0., 1., 0.], vec![1., 0., 1.]]
        );
        let all = label_mask(&labels, 1.0, DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(all, vec![vec![1.0; 3]; 3]);

        assert_eq!("GCN".parse::<Reg>().unwrap(), Reg::Gcn);
        let err = "l2".parse::<Reg>().unwrap_err().to_string();
        assert!(err.contains("`l2`") && err.contains("gcn, cos"), "{err}");

        let pairs = Tensor::arange(0f32, 9.0, &dev).unwrap();
        let m = pair_matrix(&pairs).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[1], vec![3., 4., 5.]);
        assert!(pair_matrix(&Tensor::zeros(8, DType::F32, &dev).unwrap()).is_err());
    }

    #[test]
    fn zero_features_give_finite_cosine_gradients() {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::zeros((3, 4), DType::F32, &dev).unwrap()).unwrap();
        let a_hat = Tensor::ones((3, 3), DType::F32, &dev).unwrap();
        let loss = cos_loss(g.as_tensor(), &a_hat).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        let grads = loss.backward().unwrap();
        let grad = grads
            .get(&g)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(grad.iter().all(|x| x.is_finite()), "{grad:?}");
    }
}
