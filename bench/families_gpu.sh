#!/usr/bin/env bash
# The model families' GPU figures (issues 15-17) in one device call, each step with its own timeout; logs and JSON
# land in $OUT. Needs .gpu_work/stdlib.bin (bench/train_cli.sh's prepare step; made on the CPU beforehand) and, for
# the selective-scan peer, .anchors/mamba_cuda/csrc (mamba_ssm 2.3.2.post1's csrc/selective_scan, from
# `python3 bench/build_mamba_cuda.py --fetch`), built here for sm_90 by bench/build_mamba_cuda.py while the training
# runs go.
#
#   device run, carry [".anchors", ".gpu_work"]:
#     Cheems beside Doge, and Om:  CONFIGS="configs/doge-160m.yaml configs/cheems-160m.yaml configs/om-300m.yaml" \
#                                  SAMPLE=configs/cheems-160m.yaml,configs/om-300m.yaml PARTS="train sample" \
#                                  bash bench/families_gpu.sh
#     OTCE:                        CONFIGS=configs/otce-160m.yaml SAMPLE=configs/otce-160m.yaml bash bench/families_gpu.sh
#   env: STEPS (training steps per run, 200), CONFIGS (training configs), SAMPLE (bench/sample_families.py configs,
#        comma-separated), PARTS ("build ss train sample"), TRAIN_LIMIT / SS_LIMIT / SAMPLE_LIMIT (seconds per step),
#        SS_ARGS (bench/selective_scan.py's arguments, "--nvar 1 --no-ref")
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export PYTHONPATH=".anchors/py:.:${PYTHONPATH:-}"
OUT=${OUT:-./bench_out}
TRAIN_STEPS=${STEPS:-200}
CONFIGS=${CONFIGS:-"configs/cheems-160m.yaml configs/otce-160m.yaml configs/om-300m.yaml"}
SAMPLE=${SAMPLE:-configs/otce-160m.yaml}
TRAIN_LIMIT=${TRAIN_LIMIT:-150}
SS_LIMIT=${SS_LIMIT:-120}
SAMPLE_LIMIT=${SAMPLE_LIMIT:-150}
PARTS=${PARTS:-"build ss train sample"}
mkdir -p "$OUT"

step() {  # step NAME TIMEOUT_S CMD...: the command in its own session, killed with all its children at the limit
  local name=$1 limit=$2
  shift 2
  echo "=== [$name] $* (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$OUT/steps.log"
  setsid "$@" > "$OUT/$name.log" 2>&1 &
  local pid=$!
  ( sleep "$limit"; kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null ) &
  local watchdog=$!
  wait "$pid"
  local rc=$?
  kill "$watchdog" 2>/dev/null
  echo "=== [$name] rc=$rc $(date -u +%H:%M:%S)" | tee -a "$OUT/steps.log"
}
has() { [[ " $PARTS " == *" $1 "* ]]; }

python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/steps.log"
if has build && [ -d .anchors/mamba_cuda ]; then  # CPU-bound: runs beside the GPU steps
  (MAX_JOBS=${BUILD_JOBS:-6} timeout 300 python3 bench/build_mamba_cuda.py > "$OUT/mamba_build.log" 2>&1) &
  BUILD=$!
fi
if has train; then
  for c in $CONFIGS; do
    step "train-$(basename "$c" .yaml)" "$TRAIN_LIMIT" env CONFIGS="$c" SEGMENTS=true STEPS="$TRAIN_STEPS" WORK=.gpu_work \
      OUT="$OUT" MIN_DROP=0.5 bash bench/train_cli.sh
    grep -h "^\[train_cli\]" "$OUT/train-$(basename "$c" .yaml).log" | tee -a "$OUT/steps.log"
  done
fi
if has ss; then
  [ -n "${BUILD:-}" ] && wait "$BUILD"
  tail -1 "$OUT/mamba_build.log" 2>/dev/null | tee -a "$OUT/steps.log"
  step selective_scan "$SS_LIMIT" python3 bench/selective_scan.py ${SS_ARGS:---nvar 1 --no-ref} --json "$OUT/selective_scan.json"
  grep -E "fwd|ratio|PASS|FAIL|peer" "$OUT/selective_scan.log" | tail -20 | tee -a "$OUT/steps.log"
fi
if has sample; then
  step sample "$SAMPLE_LIMIT" python3 bench/sample_families.py --configs "$SAMPLE" --json "$OUT/sample.json"
  grep -E "tok/s|tokens/s|\|" "$OUT/sample.log" | tail -12 | tee -a "$OUT/steps.log"
fi
