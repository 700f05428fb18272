#!/usr/bin/env bash
# Session 4's last device call: sampling (model and fused paths, each with XLA's default command buffers and with
# the while loop captured as a CUDA graph, transformers in the same process) and the b32 training step.
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export PYTHONPATH=".anchors/py:.:${PYTHONPATH:-}"
OUT=${OUT:-./bench_out}
mkdir -p "$OUT"
echo "=== sample $(date -u +%H:%M:%S)"
timeout 330 python3 bench/sample.py --no-long --hf-new 16 --repeats 2 --decode model,fused \
  --xla-options ";xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
  --traceback-after 120 --json "$OUT/sample.json" 2>&1 | tee "$OUT/sample.log" | grep -v "^\[results\]"
echo "=== train $(date -u +%H:%M:%S)"
timeout 150 python3 bench/train.py --batch 32 --hf-batch '' --steps 8 --warmup 1 --json "$OUT/train.json" 2>&1 \
  | tee "$OUT/train.log" | grep -v "^\s*File"
echo "=== done $(date -u +%H:%M:%S)"
