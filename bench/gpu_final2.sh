#!/usr/bin/env bash
# Session 4's last call: training b32 with transformers in the same process; generate's default path (decode="auto").
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export PYTHONPATH=".anchors/py:.:${PYTHONPATH:-}"
OUT=${OUT:-./bench_out}
mkdir -p "$OUT"
echo "=== train $(date -u +%H:%M:%S)"
timeout 170 python3 bench/train.py --batch 32 --hf-batch 4 --steps 8 --warmup 1 --json "$OUT/train.json" 2>&1 \
  | tee "$OUT/train.log" | grep -v "^\s*File"
echo "=== sample $(date -u +%H:%M:%S)"
timeout 90 python3 bench/sample.py --no-long --no-hf --repeats 2 --decode auto --json "$OUT/sample.json" 2>&1 \
  | tee "$OUT/sample.log" | grep -v "^\[results\]"
echo "=== done $(date -u +%H:%M:%S)"
