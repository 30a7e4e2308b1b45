#!/usr/bin/env bash
# Builds the two binaries scripts/gpu-bench.sh runs, with `--features cuda`, on a machine
# without a GPU, and leaves them stripped and xz-compressed in .device-bin/ (git-ignored):
#   xtask.xz      the orchestrator (`xtask bench table`, `xtask reproduce --device cuda`)
#   gpu-tests.xz  crates/backbone/tests/gpu.rs
#   gpu-tests-simnet.xz  crates/simnet/tests/gpu.rs (the SimNet head on the GPU)
# Needs the toolchain of scripts/cuda-toolchain.sh (sourced from TOOLCHAIN, default
# ~/.cache/simtrans-cuda13/env.sh). The build goes to target/cuda so it never invalidates the
# CPU build in target/.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1090
source "${TOOLCHAIN:-$HOME/.cache/simtrans-cuda13/env.sh}"
export CARGO_TARGET_DIR=target/cuda
cargo build --release --features cuda -p xtask
# The executable of integration test `gpu` of crate $1.
test_binary() {
  cargo test --release --features cuda -p "$1" --test gpu --no-run --message-format=json |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])' | tail -1
}
mkdir -p .device-bin
cp target/cuda/release/xtask .device-bin/xtask
cp "$(test_binary simtrans-backbone)" .device-bin/gpu-tests
cp "$(test_binary simtrans-simnet)" .device-bin/gpu-tests-simnet
strip .device-bin/xtask .device-bin/gpu-tests .device-bin/gpu-tests-simnet
xz -T0 -6 -f .device-bin/xtask .device-bin/gpu-tests .device-bin/gpu-tests-simnet
ls -la .device-bin
