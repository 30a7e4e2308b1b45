#!/usr/bin/env bash
# Runs CI's check on a fresh clone of the committed HEAD: what is not committed is not tested.
# Usage: scripts/check-clean-clone.sh   (from anywhere inside the repository)
set -euo pipefail
top=$(git rev-parse --show-toplevel)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
git clone -q "$top" "$dir/simtrans-rs"
cd "$dir/simtrans-rs"
echo "clean clone of $(git rev-parse --short HEAD) in $dir/simtrans-rs"
CI=true bash .ci/run
