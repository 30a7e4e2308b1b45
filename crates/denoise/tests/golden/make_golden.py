"""Golden values for the denoise crate, computed by the reference formulas in numpy.

Run from this folder: /root/golden-venv/bin/python make_golden.py  (writes denoise_golden.json).
The formulas are written from SPEC.md (steps 2, 3a, 3b), independently of the Rust code:
- savg1: w_i = (mean_j S_ij + mean_j S_ji) / 2; avg1: w_i = mean_j S_ij;
- avgR: mean of the k = int(R*L) largest entries of row i, the reference's get_avg rule
  (truncation of the f64 product: 0.3*10 = 3.0000000000000004 gives 3, 0.5*9 gives 4, 0.5*7
  gives 3), with a floor of 1 that the reference lacks (it would average nothing); L = 9 and
  L = 7 are the cases where R*L is fractional;
- one_mean: w / mean(w);
- AUC: the fraction of (clean, noisy) pairs where the clean weight is larger, ties counting 1/2,
  by brute force over all pairs (a different algorithm from the Rust mid-rank version).
"""
import json
import numpy as np

rng = np.random.default_rng(20211206)


def one_mean(w):
    return w / w.mean()


def top_mean(s, r):
    k = min(s.shape[1], max(1, int(r * s.shape[1])))
    return np.sort(s, axis=1)[:, ::-1][:, :k].mean(axis=1)


def auc(w, clean):
    pos, neg = w[clean], w[~clean]
    if len(pos) == 0 or len(neg) == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


cases = []
for L in (10, 7, 9):
    s = rng.uniform(0.0, 1.0, size=(L, L)).astype(np.float32)
    s64 = s.astype(np.float64)
    np.fill_diagonal(s64, 1.0)
    s = s64.astype(np.float32)
    cases.append({
        "s": s.tolist(),
        "weights": {
            "savg1": one_mean(0.5 * (s64.mean(1) + s64.mean(0))).tolist(),
            "avg1": one_mean(s64.mean(1)).tolist(),
            "avg0.5": one_mean(top_mean(s64, 0.5)).tolist(),
            "avg0.3": one_mean(top_mean(s64, 0.3)).tolist(),
            "none": [1.0] * L,
        },
    })

# Weights with deliberate ties (rounded to one decimal) and four noise kinds, 0 = clean.
n = 60
kinds = rng.integers(0, 4, size=n)
w = np.round(rng.normal(1.0, 0.3, size=n) + 0.2 * (kinds == 0), 1).astype(np.float32)
w64 = w.astype(np.float64)
auc_case = {
    "weights": w.tolist(),
    "kinds": kinds.tolist(),
    "overall": auc(w64, kinds == 0),
    "per_kind": {str(k): auc(w64[(kinds == 0) | (kinds == k)], kinds[(kinds == 0) | (kinds == k)] == 0)
                 for k in (1, 2, 3)},
}

with open("denoise_golden.json", "w") as f:
    json.dump({"weights": cases, "auc": auc_case}, f)
