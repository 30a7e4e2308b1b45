//! Classification metrics and the statistics of repeated runs.
//!
//! Plain functions over labels and predictions, so that they can be checked by hand.

/// A confusion matrix: `counts[true][pred]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Confusion {
    pub counts: Vec<Vec<u64>>,
}

impl Confusion {
    /// Counts (label, prediction) pairs over `classes` classes.
    pub fn new(classes: usize, labels: &[u32], preds: &[u32]) -> Self {
        let mut counts = vec![vec![0u64; classes]; classes];
        for (&l, &p) in labels.iter().zip(preds) {
            counts[l as usize][p as usize] += 1;
        }
        Confusion { counts }
    }

    /// Fraction of correct predictions (0 when empty).
    pub fn top1(&self) -> f64 {
        let total: u64 = self.counts.iter().flatten().sum();
        let correct: u64 = (0..self.counts.len()).map(|i| self.counts[i][i]).sum();
        if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        }
    }

    /// Recall of each class (its per-class accuracy); NaN-free: 0 for an absent class.
    pub fn per_class_accuracy(&self) -> Vec<f64> {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let n: u64 = row.iter().sum();
                if n == 0 {
                    0.0
                } else {
                    row[i] as f64 / n as f64
                }
            })
            .collect()
    }
}

/// F1 of the positive class from (target, predicted) booleans; 0 when undefined.
pub fn f1(targets: &[bool], preds: &[bool]) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
    for (&t, &p) in targets.iter().zip(preds) {
        match (t, p) {
            (true, true) => tp += 1,
            (false, true) => fp += 1,
            (true, false) => fn_ += 1,
            _ => {}
        }
    }
    if tp == 0 {
        0.0
    } else {
        2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
    }
}

/// Mean of a sample (NaN when empty).
pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Sample standard deviation (n − 1 in the denominator); 0 for fewer than two values.
pub fn std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_top1_and_per_class() {
        let c = Confusion::new(3, &[0, 0, 1, 1, 2, 2], &[0, 1, 1, 1, 0, 2]);
        assert_eq!(c.counts, vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]);
        assert!((c.top1() - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(c.per_class_accuracy(), vec![0.5, 1.0, 0.5]);
    }

    #[test]
    fn f1_by_hand() {
        // tp = 2, fp = 1, fn = 1 → 4 / 6.
        let t = [true, true, true, false, false];
        let p = [true, true, false, true, false];
        assert!((f1(&t, &p) - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(f1(&[false, false], &[false, false]), 0.0);
    }

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean(&[1.0, 2.0, 3.0]), 2.0);
        assert!((std(&[1.0, 2.0, 3.0]) - 1.0).abs() < 1e-12);
        assert_eq!(std(&[5.0]), 0.0);
    }
}
