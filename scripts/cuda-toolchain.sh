#!/usr/bin/env bash
# Builds a CUDA 13.0 toolchain for `cargo build --release --features cuda` on a machine with no
# GPU and no NVIDIA driver, from PyPI wheels only (about 1 GB under DEST).
#
#   scripts/cuda-toolchain.sh [DEST]        # default DEST=~/.cache/simtrans-cuda13
#   source DEST/env.sh
#   cargo build --release --features cuda -p xtask
#
# Why 13.0: the GPU machines run driver 580 (CUDA 13.0). candle's kernels ship as PTX that the
# driver compiles at load time, and a newer nvcc writes a PTX version that driver refuses.
# The driver library (libcuda) and cuDNN are not needed to build, only to link: this script
# makes link-time stubs exporting the symbols cudarc can reference, with the real sonames
# (libcuda.so.1, libcudnn.so.9). The stubs never ship; on the GPU machine the driver and the
# installed cuDNN 9 (e.g. PyTorch's nvidia-cudnn-cu13 wheel) provide the real libraries.
set -euo pipefail
DEST=${1:-$HOME/.cache/simtrans-cuda13}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$DEST/wheels" "$DEST/tree"

python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST/wheels" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3
for whl in "$DEST"/wheels/*.whl; do
  python3 -m zipfile -e "$whl" "$DEST/tree"
done
CUDA="$DEST/tree/nvidia/cu13"
chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/*
# The linker looks for unversioned names; cudarc also searches lib64.
(cd "$CUDA/lib" &&
  for name in cublas cublasLt cudart nvrtc; do ln -sf "lib$name.so.13" "lib$name.so"; done &&
  ln -sf libcurand.so.10 libcurand.so)
ln -sfn lib "$CUDA/lib64"

# cudarc's sources list every symbol it may import (the workspace must be fetched first).
(cd "$ROOT" && cargo fetch --quiet)
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
stub() { # stub <symbol prefix> <sys module> <soname> <output>
  grep -ohE "^ +fn ($1[A-Za-z0-9_]*)\(" "$CUDARC/src/$2/sys/mod.rs" | sed -E 's/ *fn //; s/\(//' |
    sort -u | awk '{ print "int " $1 "(void) { return 999; }" }' >"$DEST/$3.c"
  gcc -shared -fPIC -Wl,-soname,"$3" -o "$4" "$DEST/$3.c"
}
mkdir -p "$CUDA/lib/stubs"
stub cu driver libcuda.so.1 "$CUDA/lib/stubs/libcuda.so"
stub cudnn cudnn libcudnn.so.9 "$CUDA/lib/stubs/libcudnn.so"

cat >"$DEST/env.sh" <<EOF
export CUDA_ROOT=$CUDA
export CUDA_HOME=$CUDA
export CUDA_PATH=$CUDA
export PATH=$CUDA/bin:\$PATH
export CUDA_COMPUTE_CAP=90
EOF
"$CUDA/bin/nvcc" --version | tail -1
echo "toolchain ready: source $DEST/env.sh"
