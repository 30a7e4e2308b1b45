#!/usr/bin/env bash
# Every GPU check of issue #9 in one run, for a machine with an NVIDIA GPU and no network:
#   1. (section `tests`) the GPU-against-CPU tests of crates/backbone/tests/gpu.rs (f32,
#      TF32, bf16; the whole steps on every path of the `[gpu]` config: fused, layer by layer,
#      cuDNN's BatchNorm, packed parameters, channels-first) and crates/simnet/tests/gpu.rs
#      (the SimNet head). They are `#[ignore]`d in the CPU suite; here they run with
#      `--include-ignored`, and a failure names the path and precision;
#      (`smoke`) every stage of the demo once on the GPU (tf32, one seed), and the input
#      pipeline alone (`xtask bench data`);
#   2. the workloads of BENCHMARKS.md's table (`xtask bench table`) at f32, tf32 and bf16
#      (sections `find`, `ab`, `cl` and `host`: with measured algorithm choice, one A/B switch
#      at a time, tf32 and bf16 channels-first, and tf32 with the host's calls timed by kind);
#   3. candle's own CUDA convolution and BatchNorm (gpu.cudnn=false): the "before" figures;
#   4. the demo pipeline end to end on the GPU (`xtask reproduce --device cuda`) at each
#      precision (DEMO_PRECISIONS), for the accuracy cost of tf32 and bf16; each run
#      time-limited (DEMO_LIMIT);
#   5. (section `profile`) per-kernel times of ResNet-50 steps under Nsight Compute;
#   6. (section `paper`) the paper configuration end to end on a synthetic CUB tree, one epoch
#      per stage (`xtask smoke`), at PAPER_PRECISIONS (default bf16).
#
#   scripts/gpu-bench.sh [BIN_DIR] [OUT_DIR]
#   SECTIONS="tests table" scripts/gpu-bench.sh     # a subset (tests smoke table find quick cl host ab candle demo profile paper)
#   SECTIONS=next scripts/gpu-bench.sh               # the next lease's one call: tests smoke quick ab (head kernels, shared discriminator gradient, bf16) demo (bf16) profile (bf16 SimNet, similarity) paper (bf16, tf32)
#
# BIN_DIR holds `xtask`, `gpu-tests` and `gpu-tests-simnet` (plain or .xz), as
# scripts/build-gpu-bins.sh leaves them;
# OUT_DIR (default $OUT, else ./gpu-bench-out) receives gpu.txt, log.txt and results.json.
# Needs nothing but the binaries, the NVIDIA driver and the CUDA 13 / cuDNN 9 libraries
# (PyTorch's wheels provide them; they are located below if the loader does not know them).
set -uo pipefail
BIN=$(realpath "${1:-.device-bin}")
OUT=$(mkdir -p "${2:-${OUT:-gpu-bench-out}}" && realpath "${2:-${OUT:-gpu-bench-out}}")
LOG="$OUT/log.txt"
WORK=$(mktemp -d)
say() { echo "== [${SECONDS}s] $*" | tee -a "$LOG"; }

for f in "$BIN"/*.xz; do
  [ -e "$f" ] || continue
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$f" "$WORK/$(basename "${f%.xz}")"
done
for f in xtask gpu-tests gpu-tests-simnet; do
  [ -e "$WORK/$f" ] || cp "$BIN/$f" "$WORK/$f" || continue
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
SECTIONS=${SECTIONS:-tests table candle demo paper}
# The one call planned for the next lease (after session 8), in the order the sections run:
# correctness first (tests, every stage once), the tf32 and bf16 tables (with the phases of
# the SimNet step and the similarity matrix), at bf16 the head's kernels and the shared
# discriminator gradient each switched off (the A/B of run 15, to see its SimNet figure
# again: it was at parity with PyTorch bf16), the demo's accuracy at bf16 (two seeds), the bf16
# SimNet step and similarity matrix under ncu, then the paper configuration at bf16 and tf32.
if [ "$SECTIONS" = next ]; then
  SECTIONS="tests smoke quick ab demo profile paper"
  PAPER_PRECISIONS=${PAPER_PRECISIONS:-bf16 tf32}
  DEMO_PRECISIONS=${DEMO_PRECISIONS:-bf16}
  AB=${AB:-gpu.head_kernels=false gpu.disc_reuse=false}
  AB_PRECISION=${AB_PRECISION:-bf16}
  PROFILE=${PROFILE:-profile-simnet:bf16 profile-similarity:bf16}
fi
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

# Every JSON result goes into one file (the device tool returns at most 8 files), rebuilt after
# each step so a run cut short still returns what it measured.
collect() {
  python3 - "$WORK/runs" "$OUT/results.json" <<'PY'
import json, pathlib, sys
runs, out = pathlib.Path(sys.argv[1]), {}
for f in sorted(runs.glob("*/bench-*.json")) + sorted(runs.glob("*/eval.json")):
    out[f"{f.parent.name}/{f.name}"] = json.loads(f.read_text())
pathlib.Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
PY
}

# One row set of the table: `table PRECISION RUN [SETTING ...]`, each SETTING a config override
# (`gpu.channels_last=false`, passed as `--set`) or, in capitals, an environment variable
# (`SIMTRANS_HOST_PROFILE=1`).
table() {
  local p=$1 run=$2 envs=() sets=()
  shift 2
  for a in "$@"; do
    if [[ $a == [A-Z]*=* ]]; then envs+=("$a"); else sets+=(--set "$a"); fi
  done
  env "${envs[@]}" timeout 150 ./xtask bench table --device cuda --precision "$p" "${sets[@]}" --runs-dir "$WORK/runs" --run "$run" 2>&1 | tee -a "$LOG"
  collect
}

if want tests; then
for bin in gpu-tests gpu-tests-simnet; do
[ -x "./$bin" ] || { say "1. $bin missing"; continue; }
say "1. GPU against CPU ($bin)"
timeout 600 "./$bin" --include-ignored --test-threads 1 --nocapture 2>&1 | tee "$WORK/tests.txt" | tee -a "$LOG"
say "1. $bin: exit ${PIPESTATUS[0]}"
done
fi

if want smoke; then
# Every stage's own loops (decoding ahead, copies to the GPU on the training thread) once on
# the GPU: the tables run only step 0's.
say "1s. the demo pipeline once on the GPU (tf32, one seed)"
timeout 120 ./xtask reproduce --device cuda --precision tf32 --seeds 1 --runs-dir "$WORK/runs" \
  --run smoke-tf32 2>&1 | tail -4 | tee -a "$LOG"
say "smoke: exit ${PIPESTATUS[0]}"
# And the input pipeline alone on this machine's cores, to read the JPEG-fed table rows by.
timeout 60 ./xtask bench data --runs-dir "$WORK/runs" --run data 2>&1 | tee -a "$LOG"
collect
fi

if want table; then
say "2. the table at f32, tf32, bf16"
for p in f32 tf32 bf16; do table "$p" "table-$p"; done
fi

if want find; then
say "2f. tf32 and bf16 with measured algorithms (gpu.cudnn_find=true)"
for p in tf32 bf16; do table "$p" "table-$p-find" gpu.cudnn_find=true; done
fi

if want quick; then
say "2q. the table at tf32 and bf16"
for p in tf32 bf16; do table "$p" "table-$p"; done
fi

if want host; then
say "2h. tf32 with the host's calls timed by kind (SIMTRANS_HOST_PROFILE=1), in place and packed"
table tf32 table-tf32-host SIMTRANS_HOST_PROFILE=1
table tf32 table-tf32-host-packed SIMTRANS_HOST_PROFILE=1 gpu.side_grads=false
fi

if want cl; then
say "2c. tf32 and bf16 with the chain channels-first (gpu.channels_last=false)"
for p in tf32 bf16; do table "$p" "table-$p-nchw" gpu.channels_last=false; done
fi

# The A/B switches of the `[gpu]` config, one per table at AB_PRECISION (default tf32;
# AB="gpu.FIELD=false ..." picks any; gpu.head_bf16=false, the SimNet head and discriminator
# in f32 under bf16, only matters at bf16; gpu.head_kernels=false runs the head's, the
# discriminator's and the pooling's ops on candle's ops; gpu.disc_reuse=false gives the
# discriminator its own forward and backward pass). By default the convolutions on cuDNN's
# legacy API, the ReLU masks read instead of recomputed, and cudarc's per-buffer CUDA events
# kept. Runs 7 to 12 measured the others: gpu.own_batch_norm=false (cuDNN's BatchNorm),
# gpu.fused_chain=false (one op per residual block), gpu.fused_blocks=false (layer by layer),
# gpu.side_grads=false and gpu.channels_last=false (the `host` and `cl` sections).
AB=${AB:-gpu.cudnn_graph=false gpu.relu_recompute=false gpu.event_tracking=true}
ABP=${AB_PRECISION:-tf32}
if want ab; then
say "2b. $ABP A/B, one switch each: $AB"
for switch in $AB; do
  name=$(echo "${switch#gpu.}" | tr '_=.' '---')
  table "$ABP" "table-$ABP-$name" "$switch"
done
fi

if want candle; then
say "3. candle's own CUDA convolution and BatchNorm (gpu.cudnn=false)"
timeout 120 ./xtask bench backbone --device cuda --set gpu.cudnn=false --runs-dir "$WORK/runs" --run candle 2>&1 | tee -a "$LOG"
collect
fi

if want demo; then
say "4. the demo pipeline on the GPU at ${DEMO_PRECISIONS:=f32 tf32 bf16} (${DEMO_SEEDS:-2} seeds)"
for p in $DEMO_PRECISIONS; do
  start=$(date +%s)
  timeout "${DEMO_LIMIT:-120}" ./xtask reproduce --device cuda --precision "$p" --seeds "${DEMO_SEEDS:-2}" \
    --runs-dir "$WORK/runs" --run "demo-$p" 2>&1 | tail -4 | tee -a "$LOG"
  say "demo $p: exit ${PIPESTATUS[0]} after $(($(date +%s) - start)) s"
  collect
done
fi
if want profile; then
# PROFILE ("WORKLOAD:PRECISION ...", default the training steps at tf32): each under ncu, its
# kernel times in OUT/ncu[-WORKLOAD-PRECISION].csv.xz (`python3 scripts/ncu-summary.py` sums them).
for job in ${PROFILE:-profile:tf32}; do
  [[ $job == *:* ]] || { say "5. PROFILE entry \`$job\` is not WORKLOAD:PRECISION, skipped"; continue; }
  what=${job%%:*} p=${job##*:}
  file=ncu.csv.xz
  [ "$job" = profile:tf32 ] || file=ncu-$what-$p.csv.xz
  say "5. kernel times of \`xtask bench $what\` ($p) under ncu -> $file"
  if ! command -v ncu >/dev/null; then say "ncu not found"; break; fi
  timeout "${PROFILE_LIMIT:-120}" ncu --csv --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --launch-count 8000 \
    ./xtask bench "$what" --device cuda --precision "$p" --runs-dir "$WORK/runs" --run "$what-$p" \
    >"$WORK/ncu.csv" 2>"$WORK/ncu.err"
  say "ncu exit $?: $(wc -l <"$WORK/ncu.csv") lines"
  tail -3 "$WORK/ncu.err" | tee -a "$LOG"
  xz -9 -c "$WORK/ncu.csv" >"$OUT/$file"
  collect
done
fi

if want paper; then
# The paper configuration end to end (ResNet-50 at 224 px, the paper's batch sizes, the
# real-data loader and its JPEG decoding, every stage) on a synthetic CUB tree of 4,150
# photographs of CUB's sizes, one epoch per stage from random weights (`xtask smoke`): the
# first run of that configuration on a GPU. At each of PAPER_PRECISIONS, within PAPER_LIMIT s.
for p in ${PAPER_PRECISIONS:-bf16}; do
  say "6. the paper configuration, one epoch per stage, on a synthetic CUB tree (xtask smoke, $p)"
  timeout "${PAPER_LIMIT:-180}" ./xtask smoke --device cuda --precision "$p" --runs-dir "$WORK/runs" \
    --run "paper-$p" 2>&1 | grep -E "WARN|ERROR|rror|done in|smoke:|top-1|baseline|SimTrans" | tee -a "$LOG"
  say "paper $p: exit ${PIPESTATUS[0]}"
  collect
done
fi

say "done"
