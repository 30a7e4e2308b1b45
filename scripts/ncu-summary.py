#!/usr/bin/env python3
"""Sums the kernel times of an `ncu --csv --metrics gpu__time_duration.sum` log by kind of kernel.

    python3 scripts/ncu-summary.py ncu.csv[.xz]

scripts/gpu-bench.sh (section `profile`) writes such a log for ResNet-50 training steps; this
says where their GPU time goes (convolutions, BatchNorm, layout transforms, elementwise work).
"""
import collections
import csv
import lzma
import sys

KINDS = [  # (kind, substrings of the kernel name, lower case), first match wins
    ("layout transform NCHW<->NHWC", ["nchwtonhwc", "nhwctonchw"]),
    ("convolution weight gradient", ["wgrad", "bwd_filter"]),
    ("convolution input gradient", ["dgrad", "bwd_data"]),
    ("BatchNorm backward (cuDNN)", ["bn_bw"]),
    ("BatchNorm forward (cuDNN)", ["bn_fw"]),
    ("BatchNorm backward (ours)", ["bn_grad"]),
    ("BatchNorm forward (ours)", ["bn_stats", "bn_apply", "bn_eval"]),
    ("SGD update (ours)", ["sgd_step"]),
    ("max-pool", ["pool"]),
    ("cuDNN elementwise (ReLU, add)", ["op_generic_tensor"]),
    ("candle elementwise", ["badd", "bmul", "bsub", "bdiv", "affine", "fill", "copy", "cast", "ucopy"]),
    ("convolution forward and other GEMMs", ["xmma", "cutlass", "gemm", "implicit", "conv"]),
]


def kind(name):
    low = name.lower()
    for k, keys in KINDS:
        if any(s in low for s in keys):
            return k
    return "other"


def main(path):
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt") as f:
        rows = list(csv.DictReader(line for line in f if line.startswith('"')))
    times = collections.Counter()
    counts = collections.Counter()
    for r in rows:
        ms = float(r["Metric Value"].replace(",", "")) / 1e6
        times[kind(r["Kernel Name"])] += ms
        counts[kind(r["Kernel Name"])] += 1
    total = sum(times.values())
    print(f"{len(rows)} kernels, {total:.1f} ms of GPU time")
    for k, t in times.most_common():
        print(f"  {k:38s} {t:7.2f} ms  {100 * t / total:5.1f} %  ({counts[k]} kernels)")


if __name__ == "__main__":
    main(sys.argv[1])
