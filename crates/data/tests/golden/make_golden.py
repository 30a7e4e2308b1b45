#!/usr/bin/env python3
"""Goldens for simtrans-data's transforms, computed once with Pillow and torchvision's formulas.

Pixels: Pillow (the library the reference's torchvision transforms call on PIL images):
  - Image.rotate(angle, NEAREST, expand=False, fillcolor=0)   (RandomRotation)
  - Image.resize((w, h), BILINEAR)                             (Resize, RandomResizedCrop)
Geometry: torchvision's formulas (RandomResizedCrop.get_params with scripted draws,
Resize's output size for an int, CenterCrop's offsets), written out below in Python so that
Python's round-half-to-even is what is tested.

Run with /root/golden-venv/bin/python (numpy + pillow); writes transforms.json beside this file.
"""
import json
import math
import os

import numpy as np
from PIL import Image

rng = np.random.default_rng(1234)


def image(w, h, mode):
    if mode == "L":
        a = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    else:
        a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, mode)


def planar(img):
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[None]
    else:
        a = a.transpose(2, 0, 1)
    return {"width": img.width, "height": img.height, "channels": a.shape[0], "data": a.reshape(-1).tolist()}


def get_params(width, height, scale, ratio, uniforms, ints):
    """torchvision.transforms.RandomResizedCrop.get_params with scripted draws."""
    u = iter(uniforms)
    k = iter(ints)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * next(u))
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * next(u))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = next(k) % (height - h + 1)
            j = next(k) % (width - w + 1)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def resize_size(w, h, size):
    """torchvision Resize(int): the shorter side becomes size, the longer int(size*long/short)."""
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return w, h
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def center_offsets(w, h, cw, ch):
    return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))


out = {"rotate": [], "resize": [], "crop_params": [], "resize_size": [], "center": []}

for (w, h, mode) in [(28, 28, "L"), (9, 7, "RGB"), (16, 11, "L")]:
    img = image(w, h, mode)
    for angle in [0.0, 7.0, -12.5, 29.3, -29.9, 90.0, 3.3]:
        fill = 0 if mode == "L" else (0, 0, 0)
        r = img.rotate(angle, Image.NEAREST, expand=False, fillcolor=fill)
        out["rotate"].append({"input": planar(img), "angle": angle, "output": planar(r)})

for (w, h, mode, ow, oh) in [
    (28, 28, "L", 32, 32),
    (28, 28, "L", 20, 20),
    (21, 17, "L", 28, 28),
    (13, 9, "RGB", 7, 11),
    (40, 30, "RGB", 13, 10),
    (30, 45, "L", 255 // 5, 383 // 5),
]:
    img = image(w, h, mode)
    r = img.resize((ow, oh), Image.BILINEAR)
    out["resize"].append({"input": planar(img), "output": planar(r)})

prng = np.random.default_rng(7)
for (w, h) in [(28, 28), (224, 224), (500, 333), (40, 400), (400, 40), (10, 10)]:
    for t in range(4):
        scale = [0.5, 1.0] if t % 2 == 0 else [0.08, 1.0]
        ratio = [3 / 4, 4 / 3]
        uniforms = prng.random(20).tolist()
        if t == 3:
            # Force the fallback: every attempt asks for a too-wide box.
            uniforms = [1.0 - 1e-12, 1.0 - 1e-12] * 10
            scale = [1.0, 1.0]
            ratio = [3.0, 4.0]
        ints = prng.integers(0, 10**6, 2).tolist()
        i, j, hh, ww = get_params(w, h, scale, ratio, uniforms, ints)
        out["crop_params"].append(
            {"width": w, "height": h, "scale": scale, "ratio": ratio, "uniforms": uniforms, "ints": ints,
             "box": [i, j, hh, ww]}
        )

for (w, h, s) in [(28, 28, 32), (500, 333, 255), (333, 500, 255), (255, 300, 255), (640, 480, 256), (7, 5, 4)]:
    out["resize_size"].append({"width": w, "height": h, "size": s, "out": list(resize_size(w, h, s))})

for (w, h, c) in [(32, 32, 28), (255, 383, 224), (383, 255, 224), (33, 33, 28), (31, 34, 28), (224, 224, 224)]:
    out["center"].append({"width": w, "height": h, "crop": c, "top_left": list(center_offsets(w, h, c, c))})

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transforms.json")
with open(path, "w") as f:
    json.dump(out, f)
print("wrote", path)
