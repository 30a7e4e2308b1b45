#!/usr/bin/env bash
# Every GPU check of issue #9 in one run, for a machine with an NVIDIA GPU and no network:
#   1. (section `tests`) the GPU-against-CPU tests of crates/backbone/tests/gpu.rs (f32,
#      TF32, bf16) and crates/simnet/tests/gpu.rs (the SimNet head); a failed test runs again
#      with each recently changed default switched back in turn (1x, $BISECT, BISECT_LIMIT
#      seconds in all per binary), to name the culprit in the same call;
#      (`alt`) the whole steps layer by layer (1b) and on cuDNN's BatchNorm (1c,
#      SIMTRANS_OWN_BN=0); (`switches`) with the chain's parameters packed (1d,
#      SIMTRANS_SIDE_GRADS=0) and with the chain channels-first (1e, SIMTRANS_CHANNELS_LAST=0);
#      (`smoke`) every stage of the demo once on the GPU (tf32, one seed), and the input
#      pipeline alone (`xtask bench data`);
#   2. the workloads of BENCHMARKS.md's table (`xtask bench table`) at f32, tf32 and bf16
#      (sections `find`, `ab`, `cl` and `host`: with measured algorithm choice, one A/B switch
#      at a time, tf32 and bf16 channels-first, and tf32 with the host's calls timed by kind);
#   3. candle's own CUDA convolution and BatchNorm (SIMTRANS_CUDNN=0): the "before" figures;
#   4. the demo pipeline end to end on the GPU (`xtask reproduce --device cuda`) at each
#      precision (DEMO_PRECISIONS), for the accuracy cost of tf32 and bf16; each run
#      time-limited (DEMO_LIMIT);
#   5. (section `profile`) per-kernel times of ResNet-50 steps under Nsight Compute;
#   6. (section `paper`) the paper configuration end to end on a synthetic CUB tree, one epoch
#      per stage (`xtask smoke`), at PAPER_PRECISIONS (default bf16).
#
#   scripts/gpu-bench.sh [BIN_DIR] [OUT_DIR]
#   SECTIONS="tests table" scripts/gpu-bench.sh     # a subset (tests alt switches smoke table find quick cl host ab candle demo profile paper)
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
SECTIONS=${SECTIONS:-tests alt switches table candle demo paper}
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
  AB=${AB:-SIMTRANS_HEAD_KERNELS=0 SIMTRANS_DISC_REUSE=0}
  AB_PRECISION=${AB_PRECISION:-bf16}
  PROFILE=${PROFILE:-profile-simnet:bf16 profile-similarity:bf16}
fi
# The defaults most recently changed, each switched back in turn when a test fails.
BISECT=${BISECT:-SIMTRANS_HEAD_KERNELS=0 SIMTRANS_CUDNN_GRAPH=0 SIMTRANS_SIDE_GRADS=0 SIMTRANS_CHANNELS_LAST=0 SIMTRANS_RELU_RECOMPUTE=0 SIMTRANS_EVENT_TRACKING=1 SIMTRANS_LEAN_INFERENCE=0 SIMTRANS_OWN_BN=0 SIMTRANS_FUSED_CHAIN=0}
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

# One row set of the table: `table PRECISION RUN [VAR=VALUE ...]` (the variables switch an A/B).
table() {
  local p=$1 run=$2
  shift 2
  env "$@" timeout 150 ./xtask bench table --device cuda --precision "$p" --runs-dir "$WORK/runs" --run "$run" 2>&1 | tee -a "$LOG"
  collect
}

if want tests; then
for bin in gpu-tests gpu-tests-simnet; do
[ -x "./$bin" ] || { say "1. $bin missing"; continue; }
say "1. GPU against CPU ($bin)"
SIMTRANS_REQUIRE_GPU=1 timeout 300 "./$bin" --test-threads 1 --nocapture 2>&1 | tee "$WORK/tests.txt" | tee -a "$LOG"
rc=${PIPESTATUS[0]}
# The failed tests, from libtest's closing list (with --nocapture a test's own output splits
# its "test NAME ... FAILED" line).
failed=$(awk '/^failures:$/{f=1;next} /^test result:/{f=0} f && /^    [A-Za-z0-9_:]+$/{print $1}' \
  "$WORK/tests.txt" | sort -u | tr '\n' ' ')
if [ "$rc" != 0 ]; then
  # Which recently changed default is to blame: each failed test again with one switch turned
  # back (every test, if the run crashed before listing any), within BISECT_LIMIT seconds.
  say "1x. $bin exit $rc, failed: ${failed:-none listed}; again with one default switched back at a time: $BISECT"
  bisect_start=$SECONDS
  exact=${failed:+--exact}
  for switch in $BISECT; do
    left=$((${BISECT_LIMIT:-300} - SECONDS + bisect_start))
    [ "$left" -gt 10 ] || { say "1x. out of time (BISECT_LIMIT), $switch and after skipped"; break; }
    env "$switch" SIMTRANS_REQUIRE_GPU=1 timeout "$left" "./$bin" --test-threads 1 $exact $failed >"$WORK/bisect.txt" 2>&1
    say "1x. $switch: exit $? ($(grep -c '\.\.\. ok$' "$WORK/bisect.txt") ok, $(grep -c '\.\.\. FAILED$' "$WORK/bisect.txt") failed)"
    cat "$WORK/bisect.txt" >>"$LOG"
  done
fi
done
fi
if want alt; then
say "1b. whole-network steps with the layer-by-layer path (SIMTRANS_FUSED_BLOCKS=0)"
SIMTRANS_FUSED_BLOCKS=0 SIMTRANS_REQUIRE_GPU=1 timeout 300 ./gpu-tests resnet_training_step --nocapture 2>&1 | tee -a "$LOG"
say "1c. BatchNorm and whole steps on cuDNN's BatchNorm instead of ours (SIMTRANS_OWN_BN=0)"
SIMTRANS_OWN_BN=0 SIMTRANS_REQUIRE_GPU=1 timeout 300 ./gpu-tests --test-threads 1 --nocapture batchnorm resnet_training_step 2>&1 | tee -a "$LOG"
fi
if want switches; then
say "1d. whole steps with the chain's parameters packed (SIMTRANS_SIDE_GRADS=0)"
SIMTRANS_SIDE_GRADS=0 SIMTRANS_REQUIRE_GPU=1 timeout 300 ./gpu-tests resnet_training_step --nocapture 2>&1 | tee -a "$LOG"
say "1e. whole steps with the chain channels-first (SIMTRANS_CHANNELS_LAST=0)"
SIMTRANS_CHANNELS_LAST=0 SIMTRANS_REQUIRE_GPU=1 timeout 300 ./gpu-tests resnet_training_step --nocapture 2>&1 | tee -a "$LOG"
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
say "2f. tf32 and bf16 with measured algorithms (SIMTRANS_CUDNN_FIND=1)"
for p in tf32 bf16; do table "$p" "table-$p-find" SIMTRANS_CUDNN_FIND=1; done
fi

if want quick; then
say "2q. the table at tf32 and bf16"
for p in tf32 bf16; do table "$p" "table-$p"; done
fi

if want host; then
say "2h. tf32 with the host's calls timed by kind (SIMTRANS_HOST_PROFILE=1), in place and packed"
table tf32 table-tf32-host SIMTRANS_HOST_PROFILE=1
table tf32 table-tf32-host-packed SIMTRANS_HOST_PROFILE=1 SIMTRANS_SIDE_GRADS=0
fi

if want cl; then
say "2c. tf32 and bf16 with the chain channels-first (SIMTRANS_CHANNELS_LAST=0)"
for p in tf32 bf16; do table "$p" "table-$p-nchw" SIMTRANS_CHANNELS_LAST=0; done
fi

# The A/B switches, one per table at AB_PRECISION (default tf32; AB="VAR=VALUE ..." picks any;
# SIMTRANS_HEAD_BF16=0, the SimNet head and discriminator in f32 under bf16, only matters at bf16;
# SIMTRANS_HEAD_KERNELS=0 runs the head's, the discriminator's and the pooling's ops on candle's
# ops; SIMTRANS_DISC_REUSE=0 gives the discriminator its own forward and backward pass). By default the convolutions
# on cuDNN's legacy API, the ReLU masks read instead of recomputed, and cudarc's per-buffer
# CUDA events kept. Runs 7 to 12 measured the others: SIMTRANS_OWN_BN=0 (cuDNN's BatchNorm),
# SIMTRANS_FUSED_CHAIN=0 (one op per residual block), SIMTRANS_FUSED_BLOCKS=0 (layer by
# layer), SIMTRANS_POOL_RELEASE=1 (the driver's default memory pool), SIMTRANS_SIDE_GRADS=0
# and SIMTRANS_CHANNELS_LAST=0 (the `host` and `cl` sections).
AB=${AB:-SIMTRANS_CUDNN_GRAPH=0 SIMTRANS_RELU_RECOMPUTE=0 SIMTRANS_EVENT_TRACKING=1}
ABP=${AB_PRECISION:-tf32}
if want ab; then
say "2b. $ABP A/B, one switch each: $AB"
for switch in $AB; do
  name=$(echo "${switch#SIMTRANS_}" | tr 'A-Z_=' 'a-z--')
  table "$ABP" "table-$ABP-$name" "$switch"
done
fi

if want candle; then
say "3. candle's own CUDA convolution and BatchNorm (SIMTRANS_CUDNN=0)"
SIMTRANS_CUDNN=0 timeout 120 ./xtask bench backbone --device cuda --runs-dir "$WORK/runs" --run candle 2>&1 | tee -a "$LOG"
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
