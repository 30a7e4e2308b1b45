//! How well sample weights separate clean from noisy web images: ROC-AUC.
//!
//! The paper could only show pictures of high- and low-weight images. Where the noise ground truth
//! is known (the embedded benchmark records it), the weights can be scored directly: the ROC-AUC
//! of the weight as a score for "clean" is the probability that a random clean image gets a
//! higher weight than a random noisy one, ties counting one half. 1 is a perfect separation, 0.5
//! is chance, 0 is perfectly reversed. It is reported overall (clean vs every noisy image) and per
//! noise kind (clean vs that kind only), so one can see which kind of noise the SimNet catches.
//!
//! The AUC is computed from mid-ranks (the Mann–Whitney U statistic) in `O(N log N)` on the host:
//! it runs once per stage on a few thousand numbers, not in a training loop. Images whose noise is
//! unknown must be left out by the caller. Because every category's weights are normalised to
//! mean 1, the weights of all categories can be pooled into one overall AUC; a per-category AUC
//! is the same call on one category's images.

use serde::Serialize;

use crate::error::{DenoiseError, Result};

/// ROC-AUC of `scores` for separating `positive` from the other items, ties counted ½.
/// `None` when either class is empty (the AUC is undefined). Scores are ordered by
/// `f32::total_cmp`, so pass finite scores.
pub fn roc_auc(scores: &[f32], positive: &[bool]) -> Result<Option<f64>> {
    if scores.len() != positive.len() {
        return Err(DenoiseError::LengthMismatch {
            what: "ROC-AUC",
            left: scores.len(),
            right: positive.len(),
        });
    }
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = scores.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return Ok(None);
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum the 1-based mid-ranks of the positives; a run of equal scores shares the mean rank.
    let mut rank_sum = 0.0f64;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]].total_cmp(&scores[order[start]]).is_eq() {
            end += 1;
        }
        let mid_rank = (start + 1 + end) as f64 / 2.0;
        let pos_in_run = order[start..end].iter().filter(|&&i| positive[i]).count();
        rank_sum += mid_rank * pos_in_run as f64;
        start = end;
    }
    let (p, n) = (n_pos as f64, n_neg as f64);
    Ok(Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n)))
}

/// The AUC of clean images against one noise kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KindAuc<K> {
    /// The noise kind.
    pub kind: K,
    /// How many images of this kind there are.
    pub count: usize,
    /// Clean vs this kind only; `None` without clean images.
    pub auc: Option<f64>,
}

/// Weight quality against the noise ground truth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AucReport<K> {
    /// Clean images.
    pub n_clean: usize,
    /// Noisy images (every kind but the clean one).
    pub n_noisy: usize,
    /// Clean vs all noisy images; `None` if either is absent.
    pub overall: Option<f64>,
    /// Clean vs each noise kind present, in ascending order of kind.
    pub per_kind: Vec<KindAuc<K>>,
}

/// Scores `weights` (higher = more likely clean) against the ground-truth noise `kinds` of the
/// same images, `clean` being the kind that means "not noise". Pass only images whose noise is
/// known. Kinds can be any ordered label (for example the data crate's noise kind as `u8`).
pub fn weight_auc<K: Copy + Ord>(weights: &[f32], kinds: &[K], clean: K) -> Result<AucReport<K>> {
    if weights.len() != kinds.len() {
        return Err(DenoiseError::LengthMismatch {
            what: "weight AUC",
            left: weights.len(),
            right: kinds.len(),
        });
    }
    let is_clean: Vec<bool> = kinds.iter().map(|&k| k == clean).collect();
    let n_clean = is_clean.iter().filter(|&&c| c).count();
    let overall = roc_auc(weights, &is_clean)?;
    let mut noisy_kinds: Vec<K> = kinds.iter().copied().filter(|&k| k != clean).collect();
    noisy_kinds.sort();
    noisy_kinds.dedup();
    let mut per_kind = Vec::with_capacity(noisy_kinds.len());
    for kind in noisy_kinds {
        let (mut s, mut p) = (Vec::new(), Vec::new());
        for (&w, &k) in weights.iter().zip(kinds) {
            if k == clean || k == kind {
                s.push(w);
                p.push(k == clean);
            }
        }
        per_kind.push(KindAuc {
            kind,
            count: p.len() - n_clean,
            auc: roc_auc(&s, &p)?,
        });
    }
    Ok(AucReport {
        n_clean,
        n_noisy: weights.len() - n_clean,
        overall,
        per_kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auc(s: &[f32], p: &[bool]) -> f64 {
        roc_auc(s, p).unwrap().unwrap()
    }

    #[test]
    fn hand_cases() {
        let p = [true, true, false, false];
        assert_eq!(auc(&[0.9, 0.8, 0.2, 0.1], &p), 1.0);
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &p), 0.0);
        assert_eq!(auc(&[0.5; 4], &p), 0.5);
        // One clean-noisy tie out of four pairs, the other three pairs won: (3 + ½)/4.
        assert_eq!(auc(&[0.9, 0.5, 0.5, 0.1], &p), 0.875);
        // Order of the input does not matter.
        assert_eq!(
            auc(&[0.5, 0.1, 0.9, 0.5], &[false, false, true, true]),
            0.875
        );
    }

    #[test]
    fn undefined_and_mismatched() {
        assert_eq!(roc_auc(&[1.0, 2.0], &[true, true]).unwrap(), None);
        assert_eq!(roc_auc(&[], &[]).unwrap(), None);
        assert!(matches!(
            roc_auc(&[1.0], &[true, false]),
            Err(DenoiseError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn per_kind_compares_clean_with_that_kind_only() {
        // Kind 1 is always below the clean images, kind 2 always above.
        let w = [0.5f32, 0.6, 0.1, 0.2, 0.9];
        let k = [0u8, 0, 1, 1, 2];
        let r = weight_auc(&w, &k, 0).unwrap();
        assert_eq!((r.n_clean, r.n_noisy), (2, 3));
        assert_eq!(r.overall, Some(4.0 / 6.0));
        assert_eq!(r.per_kind.len(), 2);
        assert_eq!(
            (r.per_kind[0].kind, r.per_kind[0].count, r.per_kind[0].auc),
            (1, 2, Some(1.0))
        );
        assert_eq!(
            (r.per_kind[1].kind, r.per_kind[1].count, r.per_kind[1].auc),
            (2, 1, Some(0.0))
        );
    }
}
