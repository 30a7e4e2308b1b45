#!/usr/bin/env bash
# Every GPU check of issue #9 in one run, for a machine with an NVIDIA GPU and no network:
#   1. the GPU-against-CPU tests of crates/backbone/tests/gpu.rs (f32, TF32, bf16);
#   2. the five workloads of BENCHMARKS.md's table (`xtask bench table`) at f32, tf32 and bf16;
#   3. the same ResNet-50 steps on candle's own CUDA convolution and BatchNorm
#      (SIMTRANS_CUDNN=0), the "before" figures on the same card;
#   4. the demo pipeline end to end on the GPU (`xtask reproduce --device cuda`), time-limited.
#
#   scripts/gpu-bench.sh [BIN_DIR] [OUT_DIR]
#
# BIN_DIR holds `xtask` and `gpu-tests` (plain or .xz), as scripts/build-gpu-bins.sh leaves them;
# OUT_DIR (default $OUT, else ./gpu-bench-out) receives gpu.txt, log.txt and one JSON per run.
# Needs nothing but the binaries, the NVIDIA driver and the CUDA 13 / cuDNN 9 libraries
# (PyTorch's wheels provide them; they are located below if the loader does not know them).
set -uo pipefail
BIN=$(realpath "${1:-.device-bin}")
OUT=$(mkdir -p "${2:-${OUT:-gpu-bench-out}}" && realpath "${2:-${OUT:-gpu-bench-out}}")
LOG="$OUT/log.txt"
WORK=$(mktemp -d)
say() { echo "== $*" | tee -a "$LOG"; }

for f in "$BIN"/*.xz; do
  [ -e "$f" ] || continue
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$f" "$WORK/$(basename "${f%.xz}")"
done
for f in xtask gpu-tests; do
  [ -e "$WORK/$f" ] || cp "$BIN/$f" "$WORK/$f"
  chmod +x "$WORK/$f"
done

# Shared libraries the binaries link against, where the loader does not already find them.
for lib in libcudnn.so.9 libcublasLt.so.13 libcublas.so.13 libcudart.so.13 libcurand.so.10; do
  if ! ldconfig -p | grep -q "$lib"; then
    found=$(find / -xdev -name "$lib" 2>/dev/null | head -1)
    [ -n "$found" ] && export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
done
say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
ldd "$WORK/xtask" | grep -E "not found|cudnn|cublas" | tee -a "$LOG"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
date -u +%FT%TZ >>"$OUT/gpu.txt"
cat "$OUT/gpu.txt" | tee -a "$LOG"

cd "$WORK" || exit 1
say "1. GPU against CPU"
SIMTRANS_REQUIRE_GPU=1 timeout 300 ./gpu-tests --test-threads 1 --nocapture 2>&1 | tee -a "$LOG"

say "2. the table at f32, tf32, bf16"
for p in f32 tf32 bf16; do
  timeout 300 ./xtask bench table --device cuda --precision "$p" --runs-dir "$WORK/runs" --run "table-$p" 2>&1 | tee -a "$LOG"
  cp "$WORK/runs/table-$p/bench-table.json" "$OUT/table-$p.json" 2>/dev/null
done

say "3. candle's own CUDA convolution and BatchNorm (SIMTRANS_CUDNN=0)"
SIMTRANS_CUDNN=0 timeout 180 ./xtask bench backbone --device cuda --runs-dir "$WORK/runs" --run candle 2>&1 | tee -a "$LOG"
cp "$WORK/runs/candle/bench-backbone.json" "$OUT/candle-backbone.json" 2>/dev/null

say "4. demo pipeline on the GPU"
start=$(date +%s)
timeout "${DEMO_LIMIT:-240}" ./xtask reproduce --device cuda --runs-dir "$WORK/runs" --run demo-gpu 2>&1 | tail -25 | tee -a "$LOG"
say "demo exit $? after $(($(date +%s) - start)) s"
cp "$WORK/runs/demo-gpu/eval.json" "$OUT/demo-eval.json" 2>/dev/null
say "done"
