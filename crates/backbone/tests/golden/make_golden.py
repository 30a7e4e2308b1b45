"""Golden tensors for simtrans-backbone, computed once with numpy (float64) from the formulas
PyTorch documents for BatchNorm2d/1d, MaxPool2d(3, 2, 1), Conv2d and torchvision's ResNet.

Run from this folder: /root/golden-venv/bin/python make_golden.py  (numpy 2.x).
It writes golden.json, read by ../golden.rs. Network weights and inputs are not stored: both
sides generate them from the same closed formula (see `param` and `inputs`), so the file stays
small while the ResNet-18 golden still exercises every layer at full width.
"""
import json
import math

import numpy as np

EPS = 1e-5
MOM = 0.1


def phase(name):
    return (sum((i + 1) * b for i, b in enumerate(name.encode())) % 1000) / 100.0


def wave(name, shape):
    n = int(np.prod(shape))
    return np.sin(0.913 * np.arange(n, dtype=np.float64) + phase(name)).reshape(shape)


def param(name, shape):
    """The formula weights: the same rule as `formula_value` in ../golden.rs, rounded to float32
    as the Rust side stores them (train-mode BatchNorm magnifies any difference in the inputs)."""
    return f32(_param(name, shape))


def f32(a):
    return np.asarray(a).astype(np.float32).astype(np.float64)


def _param(name, shape):
    s = wave(name, shape)
    if len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        return 2.0 / math.sqrt(fan_in) * s
    if len(shape) == 2:
        return s / math.sqrt(shape[1])
    if name.endswith("running_var"):
        return 1.0 + 0.25 * (1.0 + s)
    if name.endswith("running_mean") or name.endswith("bias"):
        return 0.1 * s
    return 1.0 + 0.1 * s  # BatchNorm weight


def inputs(shape):
    return f32(1.5 * np.sin(0.37 * np.arange(int(np.prod(shape)), dtype=np.float64) + 0.5).reshape(shape))


# ---- layers ------------------------------------------------------------------------------------

def conv2d(x, w, stride, pad):
    b, c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (h + 2 * pad - k) // stride + 1
    wo = (wd + 2 * pad - k) // stride + 1
    out = np.zeros((b, o, ho, wo))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
            out += np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
    return out


class BN:
    """BatchNorm with PyTorch semantics over dim 1 of [B,C] or [B,C,H,W]."""

    def __init__(self, weight, bias, rm, rv):
        self.w, self.b, self.rm, self.rv = weight, bias, rm.copy(), rv.copy()

    def _shape(self, x):
        return (1, -1) + (1,) * (x.ndim - 2)

    def _train(self, x, update):
        axes = (0,) + tuple(range(2, x.ndim))
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        n = x.size // x.shape[1]
        if update:
            self.rm = (1 - MOM) * self.rm + MOM * mean
            self.rv = (1 - MOM) * self.rv + MOM * var * n / (n - 1)
        s = self._shape(x)
        return (x - mean.reshape(s)) / np.sqrt(var.reshape(s) + EPS) * self.w.reshape(s) + self.b.reshape(s)

    def __call__(self, x, mode):
        s = self._shape(x)
        if mode == "eval":
            return (x - self.rm.reshape(s)) / np.sqrt(self.rv.reshape(s) + EPS) * self.w.reshape(s) + self.b.reshape(s)
        if mode == "train":
            return self._train(x, True)
        n = mode  # split
        return np.concatenate([self._train(x[:n], True), self._train(x[n:], False)])


def max_pool(x):
    b, c, h, w = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2), (1, 2)), constant_values=-np.inf)
    out = np.full((b, c, ho, wo), -np.inf)
    for i in range(3):
        for j in range(3):
            out = np.maximum(out, xp[:, :, i:i + 2 * ho:2, j:j + 2 * wo:2])
    return out


class Net:
    """torchvision ResNet (basic blocks) or our small variant, with formula weights."""

    def __init__(self, arch, width=None, classes=10):
        self.arch, self.bns = arch, {}
        self.width, self.classes = width, classes

    def bn(self, name, c):
        if name not in self.bns:
            self.bns[name] = BN(param(name + ".weight", (c,)), param(name + ".bias", (c,)),
                                param(name + ".running_mean", (c,)), param(name + ".running_var", (c,)))
        return self.bns[name]

    def conv(self, x, name, cout, k, stride, pad):
        return conv2d(x, param(name + ".weight", (cout, x.shape[1], k, k)), stride, pad)

    def block(self, x, name, planes, stride, mode):
        y = np.maximum(self.bn(name + ".bn1", planes)(self.conv(x, name + ".conv1", planes, 3, stride, 1), mode), 0)
        y = self.bn(name + ".bn2", planes)(self.conv(y, name + ".conv2", planes, 3, 1, 1), mode)
        if stride != 1 or x.shape[1] != planes:
            x = self.bn(name + ".downsample.1", planes)(self.conv(x, name + ".downsample.0", planes, 1, stride, 0), mode)
        return np.maximum(y + x, 0)

    def forward(self, x, mode):
        if self.arch == "small":
            w = self.width
            widths, blocks = [w, 2 * w, 4 * w, 8 * w], [1, 1, 1, 1]
            y = np.maximum(self.bn("bn1", w)(self.conv(x, "conv1", w, 3, 1, 1), mode), 0)
        else:
            widths, blocks = [64, 128, 256, 512], [2, 2, 2, 2]
            y = np.maximum(self.bn("bn1", 64)(self.conv(x, "conv1", 64, 7, 2, 3), mode), 0)
            y = max_pool(y)
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                y = self.block(y, f"layer{i + 1}.{j}", planes, 2 if i > 0 and j == 0 else 1, mode)
        f = y.mean(axis=(2, 3))
        d = f.shape[1]
        logits = f @ param("fc.weight", (self.classes, d)).T + param("fc.bias", (self.classes,))
        return logits, f


# ---- goldens -----------------------------------------------------------------------------------

def t(a):
    a = np.asarray(a, dtype=np.float64)
    return {"shape": list(a.shape), "data": [float(f"{v:.9g}") for v in a.ravel()]}


rng = np.random.default_rng(20211)
out = {}

# BatchNorm 2d: train (with running-stat update), eval, split.
x4 = rng.normal(0.5, 2.0, (6, 3, 2, 3))
p = {k: rng.normal(0, 1, 3) for k in ["weight", "bias", "running_mean"]}
p["running_var"] = rng.uniform(0.5, 2.0, 3)
out["bn4.x"] = t(x4)
for k, v in p.items():
    out[f"bn4.{k}"] = t(v)
for mode, tag in [("train", "train"), ("eval", "eval"), (4, "split4")]:
    bn = BN(p["weight"], p["bias"], p["running_mean"], p["running_var"])
    out[f"bn4.{tag}.y"] = t(bn(x4, mode))
    out[f"bn4.{tag}.running_mean"] = t(bn.rm)
    out[f"bn4.{tag}.running_var"] = t(bn.rv)

# BatchNorm 1d on [B, C], two training steps then eval.
x2 = rng.normal(-1.0, 3.0, (5, 4))
x2b = rng.normal(2.0, 0.5, (5, 4))
q = {"weight": rng.normal(0, 1, 4), "bias": rng.normal(0, 1, 4), "running_mean": np.zeros(4), "running_var": np.ones(4)}
out["bn2.x"], out["bn2.x2"] = t(x2), t(x2b)
for k, v in q.items():
    out[f"bn2.{k}"] = t(v)
bn = BN(q["weight"], q["bias"], q["running_mean"], q["running_var"])
out["bn2.train1.y"] = t(bn(x2, "train"))
out["bn2.train2.y"] = t(bn(x2b, "train"))
out["bn2.after.running_mean"], out["bn2.after.running_var"] = t(bn.rm), t(bn.rv)
out["bn2.eval.y"] = t(bn(x2, "eval"))

# Max-pool 3x3 / 2 / pad 1, odd and even sizes.
xm = rng.normal(0, 1, (2, 2, 7, 6))
out["pool.x"], out["pool.y"] = t(xm), t(max_pool(xm))

# Networks: eval, then train (batch statistics, running statistics updated).
for arch, width, shape in [("resnet18", None, (4, 3, 48, 48)), ("small", 4, (3, 3, 28, 28))]:
    x = inputs(shape)
    net = Net(arch, width)
    for mode in ["eval", "train"]:
        logits, f = net.forward(x, mode)
        out[f"{arch}.{mode}.logits"], out[f"{arch}.{mode}.features"] = t(logits), t(f)
    for name in ["bn1", "layer1.0.bn2", "layer2.0.downsample.1", "layer4.0.bn1"] + (["layer4.1.bn2"] if arch == "resnet18" else []):
        out[f"{arch}.train.{name}.running_mean"] = t(net.bns[name].rm)
        out[f"{arch}.train.{name}.running_var"] = t(net.bns[name].rv)

out["_meta"] = {"numpy": np.__version__, "script": "make_golden.py"}
with open("golden.json", "w") as fh:
    json.dump(out, fh, separators=(",", ":"))
print("wrote golden.json with", len(out) - 1, "tensors")
