//! Confidence intervals for "variant minus baseline", and what they say in words.
//!
//! Two sources of doubt sit on a paired difference of top-1 accuracies. Over **seeds**, the whole
//! pipeline is redrawn (data roles, initialisation, batches): [`t_interval`] gives the Student-t
//! interval of the mean paired difference, the question "would another seed agree?". Within one
//! seed, the **test set** is a sample too: [`paired_bootstrap`] resamples the test images with
//! replacement, keeping each image's pair of outcomes together. [`Verdict`] turns an interval
//! into the report's words. Numbers are fractions; nothing here formats percentages.

use serde::{Deserialize, Serialize};

/// `t_{0.975, df}` for df = 1..=30.
const T_975: [f64; 30] = [
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
    2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
    2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
    2.048407, 2.045230, 2.042272,
];

/// The two-sided 95 % Student-t quantile `t_{0.975, df}`: exact table values up to 30 degrees
/// of freedom, the Cornish–Fisher expansion in `1/df` beyond (within 1e-5 there); infinite for
/// `df = 0`.
pub fn t_quantile_975(df: usize) -> f64 {
    match df {
        0 => f64::INFINITY,
        1..=30 => T_975[df - 1],
        _ => {
            let z: f64 = 1.959_963_984_540_054;
            let v = df as f64;
            let (z3, z5, z7) = (z.powi(3), z.powi(5), z.powi(7));
            z + (z3 + z) / (4.0 * v)
                + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * v * v)
                + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * v * v * v)
        }
    }
}

/// An estimate with its 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// The point estimate (a mean, or the observed difference).
    pub mean: f64,
    /// Lower bound.
    pub lo: f64,
    /// Upper bound.
    pub hi: f64,
}

impl Interval {
    /// Whether the whole interval lies above 0.
    pub fn above_zero(&self) -> bool {
        self.lo > 0.0
    }

    /// Whether the whole interval lies below 0.
    pub fn below_zero(&self) -> bool {
        self.hi < 0.0
    }
}

/// The 95 % t-interval of the mean of `xs` (sample standard deviation, n − 1); `None` for fewer
/// than two values (one seed has no spread).
pub fn t_interval(xs: &[f64]) -> Option<Interval> {
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t_quantile_975(n - 1) * (var / n as f64).sqrt();
    Some(Interval {
        mean,
        lo: mean - half,
        hi: mean + half,
    })
}

/// Why a bootstrap could not run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatsError {
    /// The two models were not measured on the same number of images.
    #[error("paired bootstrap: {left} and {right} test images; both models must be measured on the same images")]
    LengthMismatch {
        /// Images measured for the first model (`a`).
        left: usize,
        /// Images measured for the second model (`b`).
        right: usize,
    },
    /// Nothing to resample.
    #[error("paired bootstrap: no test images, or no resamples asked for")]
    Empty,
}

/// SplitMix64: a small, fast, deterministic generator for the resampling.
struct SplitMix64(u64);

impl SplitMix64 {
    /// The next 64 pseudo-random bits.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2⁻³² for test-set sizes).
    fn below(&mut self, n: usize) -> usize {
        (((self.next() >> 32) * n as u64) >> 32) as usize
    }
}

/// Paired bootstrap of `mean(a) − mean(b)`, where `a[i]`, `b[i]` say whether two models got test
/// image `i` right. Draws `resamples` index sets with replacement (deterministic from `seed`);
/// `mean` is the observed difference and `lo`/`hi` the 2.5th and 97.5th percentiles of the
/// resampled differences, by the nearest-rank rule on the sorted values (rank ⌈p·B⌉).
pub fn paired_bootstrap(
    a: &[bool],
    b: &[bool],
    resamples: usize,
    seed: u64,
) -> Result<Interval, StatsError> {
    if a.len() != b.len() {
        return Err(StatsError::LengthMismatch {
            left: a.len(),
            right: b.len(),
        });
    }
    let n = a.len();
    if n == 0 || resamples == 0 {
        return Err(StatsError::Empty);
    }
    // Each image contributes −1, 0 or +1 to the difference of hits.
    let d: Vec<i64> = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| i64::from(x) - i64::from(y))
        .collect();
    let observed = d.iter().sum::<i64>() as f64 / n as f64;
    let mut rng = SplitMix64(seed);
    let mut diffs: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| d[rng.below(n)]).sum::<i64>() as f64 / n as f64)
        .collect();
    diffs.sort_by(f64::total_cmp);
    let rank = |p: f64| diffs[((p * resamples as f64).ceil() as usize).clamp(1, resamples) - 1];
    Ok(Interval {
        mean: observed,
        lo: rank(0.025),
        hi: rank(0.975),
    })
}

/// What an interval of "variant − baseline" says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The interval lies above 0.
    Helped,
    /// The interval lies below 0.
    Hurt,
    /// The interval contains 0.
    Indistinguishable,
}

impl Verdict {
    /// The verdict of an interval.
    pub fn of(interval: &Interval) -> Self {
        if interval.above_zero() {
            Self::Helped
        } else if interval.below_zero() {
            Self::Hurt
        } else {
            Self::Indistinguishable
        }
    }

    /// Words for the report.
    pub fn words(self) -> &'static str {
        match self {
            Self::Helped => "helped",
            Self::Hurt => "hurt",
            Self::Indistinguishable => "cannot be told apart from the baseline",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_interval_by_hand() {
        let ci = t_interval(&[0.01, 0.03, -0.01, 0.05, 0.02]).unwrap();
        // mean 0.02, sample sd √0.0005, half-width 2.776445 · √0.0005 / √5.
        let half = 2.776445 * 0.0005f64.sqrt() / 5f64.sqrt();
        assert!((ci.mean - 0.02).abs() < 1e-12);
        assert!((ci.lo - (0.02 - half)).abs() < 1e-9 && (ci.hi - (0.02 + half)).abs() < 1e-9);
        // n = 2: mean 0.1, sd = 0.1·√2, half-width 12.706205 · 0.1.
        let ci = t_interval(&[0.0, 0.2]).unwrap();
        assert!((ci.lo - (0.1 - 1.2706205)).abs() < 1e-9, "{ci:?}");
        assert!(t_interval(&[0.3]).is_none());
    }

    #[test]
    fn t_quantiles() {
        assert_eq!(t_quantile_975(1), 12.706205);
        assert_eq!(t_quantile_975(2), 4.302653);
        assert_eq!(t_quantile_975(10), 2.228139);
        assert_eq!(t_quantile_975(30), 2.042272);
        let t31 = t_quantile_975(31);
        assert!(
            t31 < 2.042272 && t31 > 1.96 && (t31 - 2.039513).abs() < 1e-4,
            "{t31}"
        );
        assert!((t_quantile_975(100) - 1.983972).abs() < 1e-4);
        assert!((t_quantile_975(1_000_000) - 1.959964).abs() < 1e-5);
        assert!(t_quantile_975(0).is_infinite());
    }

    #[test]
    fn bootstrap_cases() {
        let a: Vec<bool> = (0..50).map(|i| i % 3 == 0).collect();
        let same = paired_bootstrap(&a, &a, 500, 1).unwrap();
        assert_eq!((same.mean, same.lo, same.hi), (0.0, 0.0, 0.0));
        let all = paired_bootstrap(&[true; 20], &[false; 20], 500, 1).unwrap();
        assert_eq!((all.mean, all.lo, all.hi), (1.0, 1.0, 1.0));
        // a right on 60 of 100, b on 50 of them (a subset): difference 0.10.
        let a: Vec<bool> = (0..100).map(|i| i < 60).collect();
        let b: Vec<bool> = (0..100).map(|i| i < 50).collect();
        let ci = paired_bootstrap(&a, &b, 2000, 7).unwrap();
        assert!((ci.mean - 0.10).abs() < 1e-12);
        assert!(ci.lo > 0.0 && ci.lo < 0.10 && ci.hi > 0.10, "{ci:?}");
        assert!(Verdict::of(&ci) == Verdict::Helped);
        assert_eq!(ci, paired_bootstrap(&a, &b, 2000, 7).unwrap());
        // Another seed draws other resamples (seen on a test set fine enough to show it).
        let a: Vec<bool> = (0..997).map(|i| i % 3 != 0).collect();
        let b: Vec<bool> = (0..997).map(|i| i % 5 != 0).collect();
        let (x, y) = (
            paired_bootstrap(&a, &b, 2000, 7).unwrap(),
            paired_bootstrap(&a, &b, 2000, 8).unwrap(),
        );
        assert_eq!(x.mean, y.mean);
        assert!(x.lo != y.lo || x.hi != y.hi, "{x:?} {y:?}");
        assert_eq!(
            paired_bootstrap(&a, &b[..99], 10, 0),
            Err(StatsError::LengthMismatch {
                left: 997,
                right: 99
            })
        );
        assert_eq!(paired_bootstrap(&[], &[], 10, 0), Err(StatsError::Empty));
    }

    #[test]
    fn verdicts() {
        let i = |lo, hi| Interval { mean: 0.0, lo, hi };
        assert_eq!(Verdict::of(&i(0.01, 0.02)), Verdict::Helped);
        assert_eq!(Verdict::of(&i(-0.02, -0.01)), Verdict::Hurt);
        assert_eq!(Verdict::of(&i(-0.01, 0.02)), Verdict::Indistinguishable);
        assert_eq!(Verdict::Hurt.words(), "hurt");
    }
}
