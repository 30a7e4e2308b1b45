//! The similarity matrix of one category, computed in row blocks (SPEC step 2).
//!
//! `S[i, j]` is the SimNet similarity of the ordered pair `[f_i ; f_j]` of two web images of the
//! same category, diagonal included. A category has up to a few thousand web images, and the
//! SimNet head acts on every ordered pair, so the pair batch of a whole category does not fit in
//! memory. [`similarity_matrix`] therefore asks a caller-supplied head for `b` rows of `S` at a
//! time: `sim_block(rows [b, D], all [L, D]) -> [b, L]`, where row `r` of the answer holds the
//! similarities `[rows_r ; all_j]` for every `j`. The SimNet crate supplies the real head (with its
//! first layer factorised: `W [f_i ; f_j] = W_a f_i + W_b f_j`, so the `[b·L, 2D]` concatenation
//! itself need never exist); [`concat_pairs`] builds that concatenation explicitly for tests and
//! for checking a factorised head against the plain one.
//!
//! **Memory bound.** Peak memory is the features `[L, D]`, the finished matrix `S [L, L]`
//! (twice, while the blocks are concatenated), and whatever the head allocates for one block. For
//! head type 4 the widest intermediate is the first layer's output `[b·L, 2D]`: with `L = 1000`
//! images and `D = 2048`, that is `b · 1000 · 4096 · 4 bytes ≈ b · 16.4 MB` in f32, and an eval-mode
//! head keeps about three such tensors alive at once (pre-activation, BatchNorm output, ReLU
//! output), so about `b · 49 MB` per block. A 2 GB budget thus allows `b ≈ 40` rows at
//! `L = 1000` (and `b ≈ 10` at `L = 4000`); `b = 256` would need about 12.6 GB. The features
//! (8 MB) and `S` (4 MB) are negligible by comparison. [`rows_for_budget`] turns a byte budget into
//! a block size with this estimate.

use candle_core::Tensor;

use crate::error::{DenoiseError, Result};

/// Live copies of the widest per-block intermediate assumed by [`rows_for_budget`].
pub const LIVE_COPIES: usize = 3;

/// The largest number of rows per block whose widest intermediate, `[b·L, width]` in f32 with
/// [`LIVE_COPIES`] copies alive, fits in `budget_bytes`; at least 1. For head type 4, `width` is
/// `2D` (4096 for ResNet-50 features).
pub fn rows_for_budget(budget_bytes: usize, l: usize, width: usize) -> usize {
    let per_row = l.max(1) * width.max(1) * std::mem::size_of::<f32>() * LIVE_COPIES;
    (budget_bytes / per_row).max(1)
}

/// All ordered pairs of `rows [b, D]` with `all [L, D]`, concatenated: `[b·L, 2D]`, row
/// `r·L + j` = `[rows_r ; all_j]`. This is the input of an unfactorised SimNet head for rows
/// `rows` of `S`; its size is exactly what the streaming avoids, so use it only on small inputs.
pub fn concat_pairs(rows: &Tensor, all: &Tensor) -> Result<Tensor> {
    let (b, d) = rows.dims2()?;
    let (l, d2) = all.dims2()?;
    if d != d2 {
        return Err(DenoiseError::Shape {
            what: "pair features",
            expected: format!("[L, {d}] like the rows"),
            got: vec![l, d2],
        });
    }
    let left = rows.unsqueeze(1)?.broadcast_as((b, l, d))?;
    let right = all.unsqueeze(0)?.broadcast_as((b, l, d))?;
    Ok(Tensor::cat(&[left, right], 2)?.reshape((b * l, 2 * d))?)
}

/// Computes `S [L, L]` from the features `feats [L, D]` of one category, `row_block` rows at a
/// time, with `sim_block(rows, all)` returning the `[b, L]` similarities of `rows` against all
/// features (row `r` = pairs `[rows_r ; all_j]`). The result is on the device and in the dtype
/// the head returns; any block size gives the same matrix.
pub fn similarity_matrix<F, E>(feats: &Tensor, row_block: usize, mut sim_block: F) -> Result<Tensor>
where
    F: FnMut(&Tensor, &Tensor) -> std::result::Result<Tensor, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if row_block == 0 {
        return Err(DenoiseError::ZeroRowBlock);
    }
    let (l, _) = match feats.dims() {
        [l, d] if *l > 0 => (*l, *d),
        dims => {
            return Err(DenoiseError::Shape {
                what: "category features",
                expected: "[L, D] with L ≥ 1".into(),
                got: dims.to_vec(),
            })
        }
    };
    let mut blocks = Vec::with_capacity(l.div_ceil(row_block));
    let mut start = 0;
    while start < l {
        let b = row_block.min(l - start);
        let rows = feats.narrow(0, start, b)?;
        let block = sim_block(&rows, feats).map_err(|e| DenoiseError::SimBlock {
            start,
            end: start + b,
            source: e.into(),
        })?;
        if block.dims() != [b, l] {
            return Err(DenoiseError::Shape {
                what: "similarity block returned by the head",
                expected: format!("[{b}, {l}] for rows {start}..{}", start + b),
                got: block.dims().to_vec(),
            });
        }
        blocks.push(block);
        start += b;
    }
    Ok(Tensor::cat(&blocks, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Deterministic pseudo-random values in [lo, hi) (shared with the other crates' tests).
    fn det(shape: &[usize], seed: f64, lo: f32, hi: f32) -> Tensor {
        simtrans_core::seed::det_tensor(shape, seed, lo, hi).unwrap()
    }

    /// A small asymmetric stand-in for the SimNet head: a one-hidden-layer MLP on the
    /// concatenated pair, then a sigmoid, computed the unfactorised way.
    struct ToyHead {
        w1: Tensor,
        w2: Tensor,
    }

    impl ToyHead {
        fn new(d: usize, h: usize) -> Self {
            Self {
                w1: det(&[2 * d, h], 1.0, -1.0, 1.0),
                w2: det(&[h, 1], 2.0, -1.0, 1.0),
            }
        }

        fn block(&self, rows: &Tensor, all: &Tensor) -> candle_core::Result<Tensor> {
            let (b, l) = (rows.dim(0)?, all.dim(0)?);
            let pairs = concat_pairs(rows, all).map_err(candle_core::Error::wrap)?;
            let logits = pairs.matmul(&self.w1)?.relu()?.matmul(&self.w2)?;
            candle_nn::ops::sigmoid(&logits)?.reshape((b, l))
        }
    }

    #[test]
    fn every_block_size_gives_the_one_shot_matrix() {
        let (l, d) = (13, 6);
        let feats = det(&[l, d], 3.0, -2.0, 2.0);
        let head = ToyHead::new(d, 8);
        let one_shot = head.block(&feats, &feats).unwrap();
        for row_block in [1, 2, 5, 12, 13, 100] {
            let s = similarity_matrix(&feats, row_block, |r, a| head.block(r, a)).unwrap();
            assert_eq!(s.dims(), [l, l]);
            let diff = (&s - &one_shot).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() < 1e-6,
                "row_block {row_block}"
            );
        }
        // The toy head is not symmetric, so the test would notice swapped pair order.
        let asym = (&one_shot - one_shot.t().unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(asym.to_scalar::<f32>().unwrap() > 1e-3);
    }

    #[test]
    fn pair_rows_follow_the_documented_order() {
        let rows = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let all = Tensor::new(&[[10f32, 20.], [30., 40.], [50., 60.]], &Device::Cpu).unwrap();
        let p = concat_pairs(&rows, &all).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(p.len(), 6);
        assert_eq!(p[0], vec![1., 2., 10., 20.]);
        assert_eq!(p[2], vec![1., 2., 50., 60.]);
        assert_eq!(p[4], vec![3., 4., 30., 40.]);
    }

    #[test]
    fn bad_heads_and_block_sizes_are_errors() {
        let feats = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        let wrong = similarity_matrix(&feats, 2, |r, _| {
            Tensor::zeros((r.dim(0)?, 3), DType::F32, &Device::Cpu)
        });
        assert!(matches!(wrong, Err(DenoiseError::Shape { .. })));
        let failing = similarity_matrix(&feats, 3, |_, _| -> candle_core::Result<Tensor> {
            Err(candle_core::Error::Msg("boom".into()))
        });
        let msg = failing.unwrap_err().to_string();
        assert!(msg.contains("0..3") && msg.contains("boom"), "{msg}");
        let zero = similarity_matrix(&feats, 0, |r, a| r.matmul(&a.t()?));
        assert!(matches!(zero, Err(DenoiseError::ZeroRowBlock)));
    }

    #[test]
    fn budget_estimate_matches_the_documented_numbers() {
        // L = 1000, D = 2048, head type 4: 2 GB allows about 40 rows.
        let b = rows_for_budget(2 << 30, 1000, 4096);
        assert!((35..=45).contains(&b), "{b}");
        assert_eq!(rows_for_budget(1, 1000, 4096), 1);
    }
}
