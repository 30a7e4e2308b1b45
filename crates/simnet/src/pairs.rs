//! Pair enumeration, the reference's definition of which pairs SimNet sees.
//!
//! For a batch of `B` features the reference builds `B²` rows: row `k = i·B + j` is the
//! concatenation `[f_j ; f_i]` (the column image first), self-pairs and both orders included,
//! with target 1 when the two labels match. The training and inference paths never materialise
//! these concatenations (see [`crate::head`], which factorises the first layer), but this module
//! keeps the literal form: it is the definition the fast path is tested against.

use candle_core::{Device, Result, Tensor};

/// `[B, D]` features → `[B², 2D]` pairs; row `i·B + j` is `[f_j ; f_i]`.
pub fn enumerate(features: &Tensor) -> Result<Tensor> {
    let (b, d) = features.dims2()?;
    // The first half cycles fastest (row k holds f[k mod B]), the second half slowest (f[k div B]).
    let first = features
        .unsqueeze(0)?
        .broadcast_as((b, b, d))?
        .reshape((b * b, d))?;
    let second = features
        .unsqueeze(1)?
        .broadcast_as((b, b, d))?
        .reshape((b * b, d))?;
    Tensor::cat(&[&first, &second], 1)
}

/// Targets of [`enumerate`]'s rows: row `i·B + j` is 1 when `labels[i] == labels[j]`.
pub fn targets(labels: &[u32]) -> Vec<u32> {
    labels
        .iter()
        .flat_map(|li| labels.iter().map(move |lj| u32::from(li == lj)))
        .collect()
}

/// [`targets`] as a `u32` tensor of length `B²`.
pub fn targets_tensor(labels: &[u32], device: &Device) -> Result<Tensor> {
    Tensor::new(targets(labels), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_images_give_the_documented_order() {
        // The reference's docstring: rows [a,a], [b,a], [a,b], [b,b].
        let f = Tensor::new(&[[1f32], [2.]], &Device::Cpu).unwrap();
        let p = enumerate(&f).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            p,
            vec![vec![1., 1.], vec![2., 1.], vec![1., 2.], vec![2., 2.]]
        );
        assert_eq!(targets(&[3, 5]), vec![1, 0, 0, 1]);
    }
}
