//! Does the SimNet's similarity transfer to the novel web images? A check that needs no labels
//! beyond the ones the web images came with.
//!
//! The SimNet is trained on base-category pairs and used on novel web images. Step 3b's graph term
//! regularises every pair of a graph batch with `Â = relax(A) ⊙ max(C, eye)`: with `eye > 0`, pairs
//! of images found for *different* categories are pulled together in proportion to their relaxed
//! similarity. If the similarity transferred, such cross-category pairs are mostly dissimilar and
//! their pull is small; if it did not, the regulariser pulls the categories' features together and
//! can undo what the cross-entropy learns (the failure the evidence issue measured).
//!
//! The denoise stage stores the SimNet similarities of a sample of web images across categories
//! (`transfer.ids`, `transfer.S`, [`crate::stage`]). From them, with only the web labels:
//!
//! * [`PairStats`] of `S`, `relax(S)` and `Â` for same-category and cross-category pairs (web labels);
//! * `auc`: the probability that a same-category pair is more similar than a cross-category pair
//!   (ROC-AUC of `S` as a score for "same category"; 0.5 = the similarity ignores categories);
//! * `cross_to_same`: mean `Â` of a cross-category pair over that of a same-category pair;
//! * `cross_share`: the share of a graph batch's total `Â` that falls on cross-category pairs, for
//!   a batch drawn uniformly from the web images (the category sizes give the pair mix).
//!
//! **Warning rule** (fixed here, reported, never used to change a result): the check warns when
//! the graph term is on (`α > 0`, `eye > 0`) and `cross_to_same ≥` [`WARN_RATIO`], i.e. a pair of
//! images of different categories is regularised at least half as strongly as a pair of the same
//! category. For scale: on the demo's web sets (50 % clean, 30 % from a confusable partner, 20 %
//! open-set), a SimNet that is exactly right about true classes gives about 0.3, one that says
//! the same for every pair gives 1.
//!
//! Where the true class of every sampled image is known (the demo), [`TruthStats`] puts beside it
//! the same quantities by *true* class, and the share of `Â` that falls on pairs whose true
//! classes differ: what the label-free figures estimate. Junk (no true class) counts as a class of
//! its own per image.

use serde::{Deserialize, Serialize};

use crate::auc::roc_auc;
use crate::error::{DenoiseError, Result};

/// The check warns when `cross_to_same` reaches this (see the module doc).
pub const WARN_RATIO: f64 = 0.5;

/// The graph term's settings that the check needs (from `[classifier]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GraphSettings {
    /// Relax exponent μ.
    pub mu: f64,
    /// Floor of the same-label mask.
    pub eye: f64,
    /// Weight of the graph term (0: off).
    pub alpha: f64,
}

impl GraphSettings {
    /// The settings of `[classifier]`.
    pub fn from_config(c: &simtrans_core::config::ClassifierConfig) -> Self {
        GraphSettings {
            mu: c.mu,
            eye: c.eye,
            alpha: c.alpha,
        }
    }
}

/// `relax(s) = (e^{μs} − 1)/(e^{μ} − 1)`, the scalar form of step 3b's relax.
pub fn relax(s: f64, mu: f64) -> f64 {
    (mu * s).exp_m1() / mu.exp_m1()
}

/// Means over one kind of pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct PairStats {
    /// How many ordered pairs (i ≠ j).
    pub pairs: usize,
    /// Mean SimNet similarity `S`.
    pub mean_s: f64,
    /// Mean `relax(S)`.
    pub mean_relax: f64,
    /// Mean adjacency `Â` (`relax(S)`, times `eye` on cross-category pairs).
    pub mean_a_hat: f64,
}

/// The check measured by true class (only where every sampled image's truth is known).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruthStats {
    /// Pairs of the same true class.
    pub same: PairStats,
    /// Pairs of different true classes.
    pub cross: PairStats,
    /// ROC-AUC of `S` for "same true class".
    pub auc: Option<f64>,
    /// Share of a graph batch's `Â` (web-label mask) on pairs whose true classes differ.
    pub cross_share: f64,
}

/// The transfer check of one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferCheck {
    /// Images in the sample.
    pub images: usize,
    /// Pairs found for the same category.
    pub same: PairStats,
    /// Pairs found for different categories.
    pub cross: PairStats,
    /// ROC-AUC of `S` for "same category" (web labels).
    pub auc: Option<f64>,
    /// `cross.mean_a_hat / same.mean_a_hat`.
    pub cross_to_same: f64,
    /// Share of a uniformly drawn graph batch's `Â` on cross-category pairs.
    pub cross_share: f64,
    /// Whether the warning rule fired.
    pub warn: bool,
    /// The same by true class, where known.
    pub truth: Option<TruthStats>,
}

impl TransferCheck {
    /// The warning's text (with the switches that turn the graph term off), when it fired.
    pub fn warning(&self) -> Option<String> {
        self.warn.then(|| {
            format!(
                "the SimNet's similarity may not transfer to the novel web images: a pair of images \
                 found for different categories gets {:.0} % of the graph adjacency of a pair of the \
                 same category (warning at {:.0} %), and {:.0} % of a graph batch's adjacency falls on \
                 such pairs, so step 3b's graph term would pull the categories' features together. \
                 `--set classifier.eye=0` regularises same-category pairs only; \
                 `--set classifier.alpha=0` turns the graph term off",
                100.0 * self.cross_to_same,
                100.0 * WARN_RATIO,
                100.0 * self.cross_share
            )
        })
    }
}

/// Accumulates [`PairStats`].
#[derive(Default)]
struct Sums {
    n: usize,
    s: f64,
    relax: f64,
    a_hat: f64,
}

impl Sums {
    fn add(&mut self, s: f64, relaxed: f64, a_hat: f64) {
        self.n += 1;
        self.s += s;
        self.relax += relaxed;
        self.a_hat += a_hat;
    }

    fn stats(&self) -> PairStats {
        let n = self.n.max(1) as f64;
        PairStats {
            pairs: self.n,
            mean_s: self.s / n,
            mean_relax: self.relax / n,
            mean_a_hat: self.a_hat / n,
        }
    }
}

/// Share of `Â` on cross pairs when a fraction `p_cross` of a batch's pairs are cross pairs.
fn share(p_cross: f64, same: &PairStats, cross: &PairStats) -> f64 {
    let c = p_cross * cross.mean_a_hat;
    let total = (1.0 - p_cross) * same.mean_a_hat + c;
    if total > 0.0 {
        c / total
    } else {
        0.0
    }
}

/// The fraction of ordered pairs (i ≠ j) of a uniformly drawn batch whose images come from
/// different categories, for categories of these sizes.
pub fn cross_pair_fraction(class_sizes: &[usize]) -> f64 {
    let n: f64 = class_sizes.iter().sum::<usize>() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let same: f64 = class_sizes
        .iter()
        .map(|&k| k as f64 * (k as f64 - 1.0).max(0.0))
        .sum();
    1.0 - same / (n * (n - 1.0))
}

/// The check on the sample's similarity matrix `s` (`[M, M]` row-major, `S[i, j] =
/// sim([f_i ; f_j])`), the sampled images' web labels, their true labels where every one is
/// known (`None` entries: junk), and the sizes of the web categories.
pub fn check(
    s: &[f32],
    web_labels: &[u32],
    true_labels: Option<&[Option<u32>]>,
    class_sizes: &[usize],
    graph: GraphSettings,
) -> Result<TransferCheck> {
    let m = web_labels.len();
    if s.len() != m * m {
        return Err(DenoiseError::LengthMismatch {
            what: "transfer check: S entries and sampled images squared",
            left: s.len(),
            right: m * m,
        });
    }
    if let Some(t) = true_labels {
        if t.len() != m {
            return Err(DenoiseError::LengthMismatch {
                what: "transfer check: true labels and sampled images",
                left: t.len(),
                right: m,
            });
        }
    }
    let (mut same, mut cross) = (Sums::default(), Sums::default());
    let (mut true_same, mut true_cross) = (Sums::default(), Sums::default());
    let mut scores = Vec::with_capacity(m * m.saturating_sub(1));
    let mut same_web = Vec::with_capacity(scores.capacity());
    let mut same_true = Vec::with_capacity(if true_labels.is_some() {
        scores.capacity()
    } else {
        0
    });
    // Â mass (web-label mask) on pairs of different true classes, and in all, per web relation.
    let mut truth_cross_mass = [0.0f64; 2];
    let mut truth_all_mass = [0.0f64; 2];
    for i in 0..m {
        for j in 0..m {
            if i == j {
                continue;
            }
            let v = s[i * m + j] as f64;
            let r = relax(v, graph.mu);
            let is_same = web_labels[i] == web_labels[j];
            let a_hat = if is_same { r } else { graph.eye * r };
            if is_same { &mut same } else { &mut cross }.add(v, r, a_hat);
            scores.push(v as f32);
            same_web.push(is_same);
            if let Some(t) = true_labels {
                let same_class = matches!((t[i], t[j]), (Some(a), Some(b)) if a == b);
                if same_class {
                    &mut true_same
                } else {
                    &mut true_cross
                }
                .add(v, r, r);
                same_true.push(same_class);
                let slot = usize::from(!is_same);
                truth_all_mass[slot] += a_hat;
                if !same_class {
                    truth_cross_mass[slot] += a_hat;
                }
            }
        }
    }
    let (same, cross) = (same.stats(), cross.stats());
    let p_cross = cross_pair_fraction(class_sizes);
    let cross_to_same = if same.mean_a_hat > 0.0 {
        cross.mean_a_hat / same.mean_a_hat
    } else {
        0.0
    };
    let truth = match true_labels {
        None => None,
        Some(_) => {
            // Reweight the sample's two web relations to the batch's pair mix.
            let mean = |mass: f64, n: usize| if n > 0 { mass / n as f64 } else { 0.0 };
            let weights = [1.0 - p_cross, p_cross];
            let counts = [same.pairs, cross.pairs];
            let (mut num, mut den) = (0.0, 0.0);
            for k in 0..2 {
                num += weights[k] * mean(truth_cross_mass[k], counts[k]);
                den += weights[k] * mean(truth_all_mass[k], counts[k]);
            }
            Some(TruthStats {
                same: true_same.stats(),
                cross: true_cross.stats(),
                auc: roc_auc(&scores, &same_true)?,
                cross_share: if den > 0.0 { num / den } else { 0.0 },
            })
        }
    };
    Ok(TransferCheck {
        images: m,
        same,
        cross,
        auc: roc_auc(&scores, &same_web)?,
        cross_to_same,
        cross_share: share(p_cross, &same, &cross),
        warn: graph.alpha > 0.0 && graph.eye > 0.0 && cross_to_same >= WARN_RATIO,
        truth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRAPH: GraphSettings = GraphSettings {
        mu: -4.0,
        eye: 1.0,
        alpha: 0.1,
    };

    /// A similarity matrix of `per` images in each of `classes` categories with `same` within a
    /// category and `other` across.
    fn blocks(classes: u32, per: usize, same: f32, other: f32) -> (Vec<f32>, Vec<u32>) {
        let labels: Vec<u32> = (0..classes)
            .flat_map(|c| std::iter::repeat_n(c, per))
            .collect();
        let m = labels.len();
        let s = (0..m * m)
            .map(|k| {
                if labels[k / m] == labels[k % m] {
                    same
                } else {
                    other
                }
            })
            .collect();
        (s, labels)
    }

    #[test]
    fn relax_is_the_step_3b_formula() {
        assert!((relax(0.0, -4.0)).abs() < 1e-15);
        assert!((relax(1.0, -4.0) - 1.0).abs() < 1e-15);
        // (e^{-2} - 1) / (e^{-4} - 1) = 0.8808
        assert!((relax(0.5, -4.0) - 0.880797).abs() < 1e-6);
    }

    #[test]
    fn a_similarity_that_separates_categories_does_not_warn() {
        let (s, labels) = blocks(4, 10, 0.9, 0.05);
        let c = check(&s, &labels, None, &[10; 4], GRAPH).unwrap();
        assert!(!c.warn, "{c:?}");
        assert!(c.warning().is_none());
        assert_eq!(c.auc, Some(1.0));
        assert_eq!(c.same.pairs, 4 * 10 * 9);
        assert_eq!(c.cross.pairs, 40 * 39 - 360);
        let want = relax(0.05f32 as f64, -4.0) / relax(0.9f32 as f64, -4.0);
        assert!((c.cross_to_same - want).abs() < 1e-9, "{c:?}");
        // Pair mix of 4 categories of 10: 1 - 4·10·9 / (40·39) = 0.769.
        let p = 1.0 - 360.0 / 1560.0;
        let share = p * want / (1.0 - p + p * want);
        assert!((c.cross_share - share).abs() < 1e-9);
    }

    #[test]
    fn a_similarity_blind_to_categories_warns_and_names_the_switches() {
        let (s, labels) = blocks(4, 10, 0.5, 0.5);
        let c = check(&s, &labels, None, &[10; 4], GRAPH).unwrap();
        assert!(c.warn);
        assert!((c.cross_to_same - 1.0).abs() < 1e-12);
        assert_eq!(c.auc, Some(0.5));
        let w = c.warning().unwrap();
        assert!(
            w.contains("classifier.eye=0") && w.contains("classifier.alpha=0"),
            "{w}"
        );
        // The graph term off, or restricted to same-category pairs: nothing to warn about.
        for graph in [
            GraphSettings { eye: 0.0, ..GRAPH },
            GraphSettings {
                alpha: 0.0,
                ..GRAPH
            },
        ] {
            let c = check(&s, &labels, None, &[10; 4], graph).unwrap();
            assert!(!c.warn, "{graph:?}");
        }
    }

    #[test]
    fn truth_measures_the_same_pairs_by_true_class() {
        // Two categories of 4; image 3 (found for category 0) is truly of class 1, and the
        // SimNet sees the truth: 1 within a true class, 0 across.
        let web = [0u32, 0, 0, 0, 1, 1, 1, 1];
        let truth: Vec<Option<u32>> = [0, 0, 0, 1, 1, 1, 1, 1].map(Some).to_vec();
        let m = web.len();
        let s: Vec<f32> = (0..m * m)
            .map(|k| f32::from(truth[k / m] == truth[k % m]))
            .collect();
        let c = check(&s, &web, Some(&truth), &[4, 4], GRAPH).unwrap();
        let t = c.truth.as_ref().unwrap();
        assert_eq!(t.auc, Some(1.0));
        assert_eq!(t.same.pairs, 3 * 2 + 5 * 4);
        assert!((t.same.mean_s - 1.0).abs() < 1e-12 && t.cross.mean_s.abs() < 1e-12);
        // Every pair with Â > 0 is of one true class: no adjacency on different classes.
        assert!(t.cross_share.abs() < 1e-12, "{t:?}");
        // By web label, the noisy image makes cross-category pairs similar: it and the four
        // images of category 1, both ways, 8 of the 32.
        assert!((c.cross.mean_s - 8.0 / 32.0).abs() < 1e-9, "{c:?}");
        assert!(c.auc.unwrap() < 1.0);
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        assert!(check(&[0.0; 5], &[0, 1], None, &[1, 1], GRAPH).is_err());
        let truth = [Some(0u32)];
        assert!(check(&[0.0; 4], &[0, 1], Some(&truth), &[1, 1], GRAPH).is_err());
    }

    #[test]
    fn cross_pair_fraction_counts_ordered_pairs() {
        assert!((cross_pair_fraction(&[2, 2]) - (1.0 - 4.0 / 12.0)).abs() < 1e-12);
        assert_eq!(cross_pair_fraction(&[5]), 0.0);
    }
}
