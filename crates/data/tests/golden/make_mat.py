#!/usr/bin/env python3
"""MATLAB v5 files shaped like CompCars' misc/make_model_name.mat, for the Car layout's reader.

Writes model_names_{compressed,plain}.mat: variables `make_names` and `model_names`, N x 1 cell
arrays of char rows; model 3 has an empty name (the reference maps it to 'unknown') and names
carry the stray spaces CompCars has. Also writes model_names_expected.json: model id -> name,
trimmed, as the reference's loader builds it with scipy.io.loadmat.
Run with /root/golden-venv/bin/python (numpy + scipy).
"""
import json
import os

import numpy as np
import scipy.io as sio

here = os.path.dirname(os.path.abspath(__file__))
models = ["Arrizo 7", " Yuexiang hatchback", "", "Volvo S60 ", "BWM 3 Series", "A" * 70]
makes = ["Chery", "Changan"]


def cell(strings):
    c = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        c[i, 0] = np.array(s) if s else np.zeros((0, 0), dtype="U1")
    return c


for name, compress in [("compressed", True), ("plain", False)]:
    sio.savemat(
        os.path.join(here, f"model_names_{name}.mat"),
        {"make_names": cell(makes), "model_names": cell(models)},
        do_compression=compress,
        oned_as="column",
    )

# What the reference builds from the file.
info = sio.loadmat(os.path.join(here, "model_names_plain.mat"))
expected = {}
for i, n in enumerate(info["model_names"]):
    expected[str(i + 1)] = n[0][0].strip() if len(n[0]) > 0 else "unknown"
with open(os.path.join(here, "model_names_expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
print(expected)
