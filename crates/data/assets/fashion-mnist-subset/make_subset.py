#!/usr/bin/env python3
"""Builds the compact Fashion-MNIST subset embedded in simtrans-data.

Keeps, for each of the 10 classes, the first TRAIN_PER_CLASS images of the training file and
the first TEST_PER_CLASS images of the test file, in their original file order, and writes them
as gzipped IDX files (mtime 0, so the output is byte-for-byte reproducible).

Because each class keeps a prefix of its images in file order, the demo builder (which draws
each class's images from the head of that class in file order) builds the same benchmark from
this subset as from the full files, as long as the recipe fits in the subset.

Usage: python3 make_subset.py [SOURCE_DIR] [OUT_DIR]
  SOURCE_DIR defaults to /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist),
  OUT_DIR to the folder of this script. Needs only the Python standard library.
"""
import gzip
import os
import struct
import sys

TRAIN_PER_CLASS = 900
TEST_PER_CLASS = 300


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return dims, data[4 + 4 * ndim :]


def write_idx(path, dims, payload):
    header = struct.pack(">I", 0x800 | len(dims)) + struct.pack(">" + "I" * len(dims), *dims)
    with open(path, "wb") as f:
        f.write(gzip.compress(header + payload, compresslevel=9, mtime=0))


def subset(src, out, prefix, per_class):
    (n, h, w), pixels = read_idx(os.path.join(src, f"{prefix}-images-idx3-ubyte.gz"))
    (n2,), labels = read_idx(os.path.join(src, f"{prefix}-labels-idx1-ubyte.gz"))
    assert n == n2, "images and labels disagree on the count"
    taken = [0] * 10
    keep = []
    for i, y in enumerate(labels):
        if taken[y] < per_class:
            taken[y] += 1
            keep.append(i)
    assert all(t == per_class for t in taken), taken
    size = h * w
    write_idx(
        os.path.join(out, f"{prefix}-images-idx3-ubyte.gz"),
        (len(keep), h, w),
        b"".join(pixels[i * size : (i + 1) * size] for i in keep),
    )
    write_idx(
        os.path.join(out, f"{prefix}-labels-idx1-ubyte.gz"),
        (len(keep),),
        bytes(labels[i] for i in keep),
    )
    print(f"{prefix}: kept {len(keep)} of {n} images ({per_class} per class)")


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(__file__))
    subset(src, out, "train", TRAIN_PER_CLASS)
    subset(src, out, "t10k", TEST_PER_CLASS)


if __name__ == "__main__":
    main()
