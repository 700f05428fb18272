#!/usr/bin/env bash
# The GPU measurements still owed by issues 4, 5 and 6, in ONE device call (a machine start costs a minute or
# more of device time; three engineers' separate calls spent this session's budget). Each step has its own
# timeout so one hang does not eat the others; logs and JSON land in $OUT (the device tool brings them back).
#
#   device run, carry [".anchors"]:   bash bench/gpu_pending.sh            (~10 min; timeout_s 598)
#   one step only:                     STEPS="dmattn" bash bench/gpu_pending.sh
#
# Steps (figures in docs/BENCHMARKS.md):
#   train     issue 6: b32 training step with HF (b4) in one process (session 4: 292k tok/s = 6.09x HF)
#   train_profile  b16 with HF, profiled, with and without XLA's command buffers
#   scaling   issue 6 on nvidia-h200-x2: DP / FSDP (shard_map and GSPMD) against one GPU
#   sample    issue 5: generate on the model path and the fused path and transformers generate, bs 1 and 16,
#             one process
#   sample_profile  issue 5: the fused path at bs 1 timed, then one generate call's kernel table (in-step times)
#   sample_variants issue 5: the fused path at bs 1 under pallas_kernels.decode.tuning variants, timed and profiled
#   sample_kernels  the fused path's decode kernels alone (bs 1; block / warp / stage variants vs the XLA reference)
#   dmattn    issue 4 follow-ups (sparse-path variants, then the full table with tokamax)
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export PYTHONPATH=".anchors/py:.:${PYTHONPATH:-}"
OUT=${OUT:-./bench_out}
mkdir -p "$OUT"
STEPS=${STEPS:-"sample_kernels sample train"}

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  echo "=== [$name] $* (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$OUT/steps.log"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== [$name] rc=${PIPESTATUS[0]} $(date -u +%H:%M:%S)" | tee -a "$OUT/steps.log"
}

python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/steps.log"
for s in $STEPS; do
  case $s in
    dmattn)
      step dmattn_sparse 120 python3 bench/dmattn.py --skip hf,fdm --check-only \
        --tune-sparse 2x8192,1x32768=cur+s0+g1+p1+p2
      step dmattn_table 150 python3 bench/dmattn.py --skip hf,fdm ;;
    sample)
      step sample 400 python3 bench/sample.py --no-long --hf-new 16 --repeats 2 --decode model,fused \
        --traceback-after 120 --json "$OUT/sample.json" ;;
    sample_profile)
      step sample_profile 150 python3 bench/sample.py --no-long --no-hf --batch-sizes 1 --repeats 2 --decode fused \
        --kernels fused --profile-top 40 --json "$OUT/sample_profile.json" ;;
    sample_variants)
      step sample_variants 400 python3 bench/sample.py --no-long --no-hf --batch-sizes 1 --repeats 2 --decode fused \
        --decode-tuning "${TUNING_SETS:-;gemv_warps=2;cache_block=64}" \
        --kernels fused --profile-top 12 --json "$OUT/sample_variants.json" ;;
    sample_kernels)
      step sample_kernels 80 python3 bench/sample.py --decode-kernels --batch-sizes 1 --json "$OUT/sample_kernels.json" ;;
    train)
      step train 170 python3 bench/train.py --batch 32 --hf-batch 4 --steps 8 --warmup 1 --json "$OUT/train.json" ;;
    train_profile)
      step train_profile 230 python3 bench/train.py --batch 16 --hf-batch 4 --steps 8 --warmup 1 --profile 2 \
        --xla-options ";xla_gpu_enable_command_buffer=" --traceback-after 120 --json "$OUT/train_profile.json" ;;
    scaling)
      step scaling 500 python3 bench/train.py --batch 16 --hf-batch '' --steps 8 --warmup 1 --scaling \
        --spmd auto,gspmd --json "$OUT/scaling.json" ;;
    *) echo "unknown step $s (train, train_profile, scaling, sample, sample_profile, sample_variants, sample_kernels, dmattn)"; exit 2 ;;
  esac
done
