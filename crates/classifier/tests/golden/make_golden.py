"""Golden values for the classifier losses, from the reference formulas in numpy (float64).

Run from this folder: /root/golden-venv/bin/python make_golden.py  (writes losses_golden.json).
Formulas (SPEC.md steps 3a/3b), written independently of the Rust code:
- weighted CE: mean_b(w_b * CE_b), CE_b = logsumexp(z_b) - z_b[y_b];
  its gradient w.r.t. the logits: w_b * (softmax(z_b) - onehot(y_b)) / B;
- relax(a) = (exp(mu*a) - 1) / (exp(mu) - 1);
- mask = max(C, eye), C[i, j] = [y_i == y_j], eye a scalar;
- A_hat = relax(A) * mask;
- GCN: mean_{i,j}(A_hat_ij * ||g_i - g_j||^2), computed the direct way over [B, B, D];
  its gradient, analytic: dL/dg_i = 2/B^2 * sum_j (A_hat_ij + A_hat_ji) (g_i - g_j)
  (differentiate sum_{i,j} A_ij ||g_i - g_j||^2 / B^2: g_k appears as the first index with
  weight A_kj and as the second with weight A_ik, each term giving 2 (g_k - g_other));
  the script checks that formula against central finite differences before writing it;
- COS: mean_{i,j}((cos(g_i, g_j) - A_hat_ij)^2), cos = g_i.g_j / (|g_i| |g_j|);
  its gradient by central finite differences (h = 1e-6, float64).
"""
import json

import numpy as np

rng = np.random.default_rng(3)


def relax(a, mu):
    return np.expm1(mu * a) / np.expm1(mu)


def mask(y, eye):
    return np.maximum((y[:, None] == y[None, :]).astype(np.float64), eye)


def gcn(g, ah):
    d = ((g[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    return (ah * d).mean()


def gcn_grad(g, ah):
    b = g.shape[0]
    s = ah + ah.T
    return 2.0 / b**2 * (s.sum(1)[:, None] * g - s @ g)


def cos(g, ah):
    n = np.linalg.norm(g, axis=1)
    c = (g @ g.T) / (n[:, None] * n[None, :])
    return ((c - ah) ** 2).mean()


def numgrad(f, g, h=1e-6):
    out = np.zeros_like(g)
    for idx in np.ndindex(*g.shape):
        gp, gm = g.copy(), g.copy()
        gp[idx] += h
        gm[idx] -= h
        out[idx] = (f(gp) - f(gm)) / (2 * h)
    return out


def f32(x):
    """Rounds inputs to float32 so that Rust and numpy start from identical values."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


# Weighted cross-entropy.
B, C = 6, 5
z = f32(rng.normal(0, 2, size=(B, C)))
y = rng.integers(0, C, size=B)
w = f32(rng.uniform(0.2, 2.0, size=B))
lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
ce = lse - z[np.arange(B), y]
p = np.exp(z - lse[:, None])
onehot = np.eye(C)[y]
ce_case = {
    "logits": z.tolist(), "labels": y.tolist(), "weights": w.tolist(),
    "per_sample": ce.tolist(), "loss": float((w * ce).mean()),
    "grad_logits": (w[:, None] * (p - onehot) / B).tolist(),
}

# Relax on a grid, two exponents.
grid = f32(np.linspace(0, 1, 11))
relax_case = {"a": grid.tolist(), "mu": [-4.0, 2.0],
              "values": [relax(grid, -4.0).tolist(), relax(grid, 2.0).tolist()]}

# Graph losses.
B, D = 6, 4
g = f32(rng.normal(0, 1, size=(B, D)))
A = f32(rng.uniform(0, 1, size=(B, B)))
lab = np.array([0, 1, 0, 2, 1, 0])
graph_cases = []
for eye in (1.0, 0.3, 0.0):
    ah = relax(A, -4.0) * mask(lab, eye)
    an = gcn_grad(g, ah)
    nu = numgrad(lambda x: gcn(x, ah), g)
    assert np.abs(an - nu).max() < 1e-7, "analytic GCN gradient disagrees with finite differences"
    graph_cases.append({
        "eye": eye, "mask": mask(lab, eye).tolist(), "a_hat": ah.tolist(),
        "gcn": gcn(g, ah), "gcn_grad": an.tolist(),
        "cos": cos(g, ah), "cos_grad": numgrad(lambda x: cos(x, ah), g).tolist(),
    })

out = {"ce": ce_case, "relax": relax_case,
       "graph": {"g": g.tolist(), "a": A.tolist(), "labels": lab.tolist(), "mu": -4.0,
                 "cases": graph_cases}}
with open("losses_golden.json", "w") as f:
    json.dump(out, f)
