"""Goldens for simtrans-simnet, computed with numpy from the reference formulas of SPEC.md step 1.

Run: /root/golden-venv/bin/python crates/simnet/tests/golden/make_golden.py
Writes pairs.json and heads.json beside this script. Parameters are random (not the default
initialisation) so that every BatchNorm / LayerNorm affine term matters.
"""
import json
import os

import numpy as np

EPS = 1e-5
MOMENTUM = 0.1
HERE = os.path.dirname(os.path.abspath(__file__))


def enumerate_pairs(f):
    """Row k = i*B + j is [f_j ; f_i] (self-pairs and both orders)."""
    b = f.shape[0]
    rows = []
    for i in range(b):
        for j in range(b):
            rows.append(np.concatenate([f[j], f[i]]))
    return np.stack(rows)


def pair_targets(labels):
    b = len(labels)
    return np.array([int(labels[i] == labels[j]) for i in range(b) for j in range(b)])


def linear(x, p, name):
    return x @ p[name + ".weight"].T + p[name + ".bias"]


def bn_train(x, p, name, split, running):
    """Training-mode BatchNorm1d; with `split`, rows [0,split) and [split,N) use their own
    statistics and the running statistics are updated from the first part only."""
    parts = [x] if split is None else [x[:split], x[split:]]
    outs = []
    for k, part in enumerate(parts):
        mean = part.mean(0)
        var = part.var(0)
        outs.append((part - mean) / np.sqrt(var + EPS) * p[name + ".weight"] + p[name + ".bias"])
        if k == 0:
            n = part.shape[0]
            running[name + ".running_mean"] = (1 - MOMENTUM) * p[name + ".running_mean"] + MOMENTUM * mean
            running[name + ".running_var"] = (1 - MOMENTUM) * p[name + ".running_var"] + MOMENTUM * var * n / (n - 1)
    return np.concatenate(outs)


def bn_eval(x, p, name):
    return (x - p[name + ".running_mean"]) / np.sqrt(p[name + ".running_var"] + EPS) * p[name + ".weight"] + p[name + ".bias"]


def bn(x, p, name, mode, split, running):
    if mode == "eval":
        return bn_eval(x, p, name)
    return bn_train(x, p, name, split, running)


def relu(x):
    return np.maximum(x, 0)


def head4(x, p, mode, split=None):
    running = {}
    h = relu(bn(linear(x, p, "head.fc1.0"), p, "head.fc1.1", mode, split, running))
    diff = relu(bn(linear(h, p, "head.fc2.0"), p, "head.fc2.1", mode, split, running))
    h = relu(bn(linear(diff, p, "head.fc3.0"), p, "head.fc3.1", mode, split, running))
    return linear(h, p, "head.fc4"), diff, running


def head2(x, p, mode, split=None):
    running = {}
    diff = relu(bn(linear(x, p, "head.fc"), p, "head.bn", mode, split, running))
    return linear(diff, p, "head.fc2"), diff, running


def layer_norm(x, p, name):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * p[name + ".weight"] + p[name + ".bias"]


def disc(x, p):
    return linear(relu(layer_norm(linear(x, p, "disc.fc"), p, "disc.bn")), p, "disc.fc2")


def log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def softmax(z):
    return np.exp(log_softmax(z))


def ce(z, y):
    return -log_softmax(z)[np.arange(len(y)), y].mean()


def params(rng, head, d):
    p = {}

    def lin(name, o, i):
        p[name + ".weight"] = rng.normal(0, 1 / np.sqrt(i), (o, i))
        p[name + ".bias"] = rng.normal(0, 0.1, o)

    def norm(name, c, running=True):
        p[name + ".weight"] = 1 + rng.normal(0, 0.2, c)
        p[name + ".bias"] = rng.normal(0, 0.2, c)
        if running:
            p[name + ".running_mean"] = rng.normal(0, 0.3, c)
            p[name + ".running_var"] = rng.uniform(0.5, 1.5, c)

    if head == 4:
        lin("head.fc1.0", 2 * d, 2 * d); norm("head.fc1.1", 2 * d)
        lin("head.fc2.0", d, 2 * d); norm("head.fc2.1", d)
        lin("head.fc3.0", d, d); norm("head.fc3.1", d)
        lin("head.fc4", 2, d)
        diff_dim = d
    else:
        lin("head.fc", 4 * d, 2 * d); norm("head.bn", 4 * d)
        lin("head.fc2", 2, 4 * d)
        diff_dim = 4 * d
    lin("disc.fc", diff_dim, diff_dim); norm("disc.bn", diff_dim, running=False)
    lin("disc.fc2", 2, diff_dim)
    return p


def tolist(a):
    return np.asarray(a, dtype=np.float64).ravel().tolist()


def encode(p):
    return {k: {"shape": list(v.shape), "data": tolist(v)} for k, v in p.items()}


def main():
    rng = np.random.default_rng(20211)

    # Pair enumeration.
    f = rng.normal(size=(3, 2))
    labels = [4, 1, 4]
    pairs = {
        "features": {"shape": [3, 2], "data": tolist(f)},
        "labels": labels,
        "pairs": {"shape": [9, 4], "data": tolist(enumerate_pairs(f))},
        "targets": pair_targets(labels).tolist(),
    }
    with open(os.path.join(HERE, "pairs.json"), "w") as fh:
        json.dump(pairs, fh, indent=1)

    # Heads, discriminator and the combined loss.
    d = 4
    beta = 0.1
    cases = []
    for head in (4, 2):
        p = params(rng, head, d)
        fa = rng.normal(size=(4, d))
        fb = rng.normal(size=(3, d)) + 0.5
        la = [0, 1, 0, 2]
        lb = [5, 5, 6]
        net = head4 if head == 4 else head2
        pa, pb = enumerate_pairs(fa), enumerate_pairs(fb)
        x = np.concatenate([pa, pb])
        na = pa.shape[0]
        ya = pair_targets(la)
        dom = np.concatenate([np.zeros(na, int), np.ones(pb.shape[0], int)])
        case = {"head": head, "dim": d, "beta": beta, "params": encode(p),
                "features_a": {"shape": list(fa.shape), "data": tolist(fa)},
                "features_b": {"shape": list(fb.shape), "data": tolist(fb)},
                "labels_a": la, "labels_b": lb}
        for split_name, split in (("joint", None), ("split", na)):
            logits, diff, running = net(x, p, "train", split)
            l_sim = ce(logits[:na], ya)
            l_dom = ce(disc(diff, p), dom)
            case[split_name] = {
                "logits": tolist(logits),
                "diff_dim": diff.shape[1],
                "l_sim": float(l_sim),
                "l_dom": float(l_dom),
                "total": float(l_sim - beta * l_dom),
                "running": {k: tolist(v) for k, v in running.items()},
            }
        # Eval mode: the similarity matrix S[i,j] = softmax(head([f_i ; f_j]))[1] between A and B.
        rows = np.stack([np.concatenate([fa[i], fb[j]]) for i in range(4) for j in range(3)])
        logits, _, _ = net(rows, p, "eval")
        case["eval_similarity"] = {"shape": [4, 3], "data": tolist(softmax(logits)[:, 1])}
        cases.append(case)
    with open(os.path.join(HERE, "heads.json"), "w") as fh:
        json.dump(cases, fh, indent=1)


if __name__ == "__main__":
    main()
