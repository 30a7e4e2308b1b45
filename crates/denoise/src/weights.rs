//! Sample weights of the web images of one category, from its similarity matrix (SPEC steps 3a/3b).
//!
//! The idea of SimTrans is that a clean web image resembles most of the other images of its
//! category while an outlier resembles few, so the average similarity of an image to its category
//! is a weight for its training loss. Given the similarity matrix `S [L, L]` of one category
//! (`S[i, j]` = SimNet similarity of the pair `[f_i ; f_j]`, diagonal included), the schemes are:
//!
//! * `savg1`: `w_i = ½ (mean_j S[i, j] + mean_j S[j, i])` — row and column mean (step 3a's default);
//! * `avg1`: `w_i = mean_j S[i, j]` — row mean only (step 3b's default);
//! * `avgR` / `avg<R>`: the mean of the `k = ⌊R·L⌋` largest entries of row `i` (so `avg1` is the
//!   special case R = 1);
//! * `none`: all ones (the unweighted baselines).
//!
//! Every scheme is then normalised to mean 1 within the category (`one_mean`), so that a weighted
//! loss keeps the scale of the unweighted one and categories of different sizes count alike.
//! No threshold is applied, as in the reference.
//!
//! **Rounding of `k`.** `k = ⌊R·L⌋`, the reference's `int(R·L)` (Python truncates the same f64
//! product, so `0.3 · 10 = 3.0000000000000004` gives 3 and `0.5 · 9` gives 4), then clamped to
//! `[1, L]` so that at least one entry is always averaged (the reference would divide by zero
//! for `R·L < 1`); `R = 1` averages the whole row.
//!
//! Everything runs as tensor operations on the device of `S` (CPU or CUDA); the only host
//! synchronisation is the scalar mean read by `one_mean` to reject degenerate categories. On CUDA,
//! `avgR` sorts each row with candle's on-chip sort, which holds a row (padded to a power of two)
//! in shared memory: rows up to 8192 entries are fine.

use std::fmt;

use candle_core::{DType, Tensor, D};

use crate::error::{DenoiseError, Result};

/// The accepted weight scheme names, as shown in error messages.
pub const VALID_SCHEMES: &str =
    "savg1, avg1, avgR (R = denoise.top_r), avg<R> with R in (0, 1] (e.g. avg0.5), none";

/// How a category's similarity matrix becomes per-image weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightScheme {
    /// All ones: no weighting.
    None,
    /// Row mean of `S`.
    Avg1,
    /// Half the sum of the row mean and the column mean of `S`.
    Savg1,
    /// Mean of the `⌈R·L⌉` largest entries of each row, `R` in (0, 1).
    AvgR(f64),
}

impl WeightScheme {
    /// Parses a scheme name from the config. `avgR` takes `R` from `top_r` (the
    /// `denoise.top_r` setting); `avg<R>` (for example `avg0.5`) names `R` explicitly; `avg1`
    /// is always the plain row mean. Names are matched exactly (they are case-sensitive).
    pub fn parse(name: &str, top_r: f64) -> Result<Self> {
        let scheme = match name {
            "none" => Self::None,
            "avg1" => Self::Avg1,
            "savg1" => Self::Savg1,
            "avgR" => Self::avg_r(top_r)?,
            other => match other.strip_prefix("avg").map(str::parse::<f64>) {
                Some(Ok(r)) => Self::avg_r(r)?,
                _ => {
                    return Err(DenoiseError::UnknownWeightScheme {
                        name: name.to_string(),
                        valid: VALID_SCHEMES,
                    })
                }
            },
        };
        Ok(scheme)
    }

    /// The `avgR` scheme for a fraction `r` in (0, 1]; `r = 1` is `Avg1`.
    pub fn avg_r(r: f64) -> Result<Self> {
        if !(r > 0.0 && r <= 1.0) {
            return Err(DenoiseError::InvalidTopR { r });
        }
        Ok(if r == 1.0 { Self::Avg1 } else { Self::AvgR(r) })
    }

    /// The canonical name (`savg1`, `avg1`, `avg0.5`, `none`), used as the key of the weight
    /// vector in the denoise artifact. Parsing the name gives the same scheme back.
    pub fn name(&self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Avg1 => "avg1".into(),
            Self::Savg1 => "savg1".into(),
            Self::AvgR(r) => format!("avg{r}"),
        }
    }
}

impl fmt::Display for WeightScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The number of entries `⌊R·L⌋` averaged per row by `avgR`, at least 1 (see the module doc).
pub fn top_count(r: f64, l: usize) -> usize {
    let k = (r * l as f64).floor();
    (k.max(1.0) as usize).min(l.max(1))
}

/// Checks that `s` is a non-empty square matrix and returns its side `L`.
fn side(s: &Tensor) -> Result<usize> {
    match s.dims() {
        [a, b] if a == b && *a > 0 => Ok(*a),
        dims => Err(DenoiseError::Shape {
            what: "similarity matrix",
            expected: "[L, L] with L ≥ 1".into(),
            got: dims.to_vec(),
        }),
    }
}

/// The weights of one category before normalisation, `[L]`, in the dtype and on the device of `s`.
pub fn raw_weights(s: &Tensor, scheme: WeightScheme) -> Result<Tensor> {
    let l = side(s)?;
    let w = match scheme {
        WeightScheme::None => Tensor::ones(l, s.dtype(), s.device())?,
        WeightScheme::Avg1 => s.mean(1)?,
        WeightScheme::Savg1 => ((s.mean(1)? + s.mean(0)?)? * 0.5)?,
        WeightScheme::AvgR(r) => {
            let k = top_count(r, l);
            if k == l {
                s.mean(1)?
            } else {
                let (sorted, _) = s.contiguous()?.sort_last_dim(false)?;
                sorted.narrow(D::Minus1, 0, k)?.mean(1)?
            }
        }
    };
    Ok(w)
}

/// Divides `w` by its mean so that it has mean 1. Fails if the mean is zero, negative or not
/// finite (a category whose similarities are all zero or NaN).
pub fn one_mean(w: &Tensor) -> Result<Tensor> {
    let mean = w.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !(mean.is_finite() && mean > 0.0) {
        return Err(DenoiseError::DegenerateWeights { mean });
    }
    Ok(w.affine(1.0 / mean, 0.0)?)
}

/// The normalised weights of one category, `[L]`: `one_mean(raw_weights(s, scheme))`.
pub fn weights(s: &Tensor, scheme: WeightScheme) -> Result<Tensor> {
    if scheme == WeightScheme::None {
        let l = side(s)?;
        return Ok(Tensor::ones(l, s.dtype(), s.device())?);
    }
    one_mean(&raw_weights(s, scheme)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn parses_every_name_and_round_trips() {
        let cases = [
            ("none", WeightScheme::None),
            ("avg1", WeightScheme::Avg1),
            ("savg1", WeightScheme::Savg1),
            ("avgR", WeightScheme::AvgR(0.5)),
            ("avg0.25", WeightScheme::AvgR(0.25)),
            ("avg1.0", WeightScheme::Avg1),
        ];
        for (name, want) in cases {
            let got = WeightScheme::parse(name, 0.5).unwrap();
            assert_eq!(got, want, "{name}");
            assert_eq!(WeightScheme::parse(&got.name(), 0.5).unwrap(), got);
        }
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        for bad in ["Savg1", "avg", "mean", "avgx", ""] {
            let err = WeightScheme::parse(bad, 0.5).unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
            assert!(err.contains("savg1") && err.contains("none"), "{err}");
        }
        for bad_r in ["avg0", "avg1.5", "avg-0.2", "avgNaN"] {
            assert!(matches!(
                WeightScheme::parse(bad_r, 0.5),
                Err(DenoiseError::InvalidTopR { .. })
            ));
        }
        assert!(matches!(
            WeightScheme::parse("avgR", 0.0),
            Err(DenoiseError::InvalidTopR { .. })
        ));
    }

    #[test]
    fn top_count_truncates_like_the_reference_with_a_floor_of_one() {
        assert_eq!(top_count(0.3, 10), 3);
        assert_eq!(top_count(0.39, 10), 3);
        assert_eq!(top_count(0.5, 9), 4);
        assert_eq!(top_count(0.5, 7), 3);
        assert_eq!(top_count(0.01, 7), 1);
        assert_eq!(top_count(1.0, 7), 7);
    }

    #[test]
    fn hand_computed_small_case() {
        let s = Tensor::new(
            &[[1.0f32, 0.5, 0.0], [0.3, 1.0, 0.2], [0.2, 0.1, 1.0]],
            &Device::Cpu,
        )
        .unwrap();
        // Row means 0.5, 0.5, 0.4333; column means 0.5, 0.5333, 0.4.
        let raw = raw_weights(&s, WeightScheme::Savg1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = [0.5, (0.5 + 1.6 / 3.0) / 2.0, (1.3 / 3.0 + 0.4) / 2.0];
        for (a, b) in raw.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{raw:?}");
        }
        // Top ⌊0.7·3⌋ = 2 per row: (1+0.5)/2, (1+0.3)/2, (1+0.2)/2.
        let top = raw_weights(&s, WeightScheme::AvgR(0.7))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in top.iter().zip([0.75, 0.65, 0.6]) {
            assert!((a - b).abs() < 1e-6, "{top:?}");
        }
        let w = weights(&s, WeightScheme::Avg1).unwrap();
        let mean = w.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 1.0).abs() < 1e-6);
    }

    #[test]
    fn degenerate_and_misshaped_inputs_are_errors() {
        let zeros = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            weights(&zeros, WeightScheme::Savg1),
            Err(DenoiseError::DegenerateWeights { .. })
        ));
        // No weighting needs no similarities, so a zero matrix is fine there.
        let ones = weights(&zeros, WeightScheme::None).unwrap();
        assert_eq!(ones.to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        let rect = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            weights(&rect, WeightScheme::Avg1),
            Err(DenoiseError::Shape { .. })
        ));
    }
}
