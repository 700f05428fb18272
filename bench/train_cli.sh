#!/usr/bin/env bash
# The main job as a user runs it, on a GPU: tokenize real text with `python -m train.prepare` (the Python standard
# library's sources, a 32768-piece sentencepiece tokenizer), then `python -m train --config CONFIG` for each of
# CONFIGS (default configs/doge-160m.yaml) at batch 16 on the default data path (packed documents with segment
# ids), and with SEGMENTS="true false" the same run without segment ids for comparison. Fails on any non-finite
# loss; tokens/s and MFU come from each run's own metrics.jsonl.
#
#   device run:   bash bench/train_cli.sh                 (~6 min on one H100/H200; timeout_s 598)
#   families:     CONFIGS="configs/doge-160m.yaml configs/cheems-160m.yaml" SEGMENTS=true bash bench/train_cli.sh
#   env:          STEPS=300 BATCH=16 SEGMENTS="true false" CONFIGS=... WORK=/tmp/wmjax_cli OUT=./bench_out
#   CPU smoke:    VOCAB=2048 TOK_BYTES=2000000 STEPS=60 BATCH=2 EXTRA="--set data.seq_len=128 --set model.num_hidden_layers=1" \
#                 MIN_DROP=0 bash bench/train_cli.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-./bench_out}
WORK=${WORK:-/tmp/wmjax_cli}
STEPS=${STEPS:-300}
BATCH=${BATCH:-16}
SEGMENTS=${SEGMENTS:-"true false"}
CONFIGS=${CONFIGS:-configs/doge-160m.yaml}
VOCAB=${VOCAB:-32768}
TOK_BYTES=${TOK_BYTES:-20000000}
EXTRA=${EXTRA:-}
export MIN_DROP=${MIN_DROP:-0.5}
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}

$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
if [ ! -f "$WORK/stdlib.bin" ]; then
  # the stdlib corpus of the embedded default (train/tokenizer.py stdlib_files: no tests, no site-packages)
  rm -rf "$WORK/src" && mkdir -p "$WORK/src"
  $PY -c "from train.tokenizer import stdlib_files; print('\n'.join(stdlib_files()))" | \
    xargs -d '\n' cp --parents -t "$WORK/src"
  t0=$SECONDS
  $PY -m train.prepare --input "$WORK/src" --format text \
    --output "$WORK/stdlib" --vocab-size "$VOCAB" --tokenizer-bytes "$TOK_BYTES" --tokenizer-dir "$WORK/tok" \
    2>&1 | tee "$OUT/prepare.log"
  echo "[prepare] $((SECONDS - t0)) s"
fi
cat "$WORK/stdlib.json"

RUNS=""
STOPPED=""
for config in $CONFIGS; do
  name=$(basename "$config" .yaml)
  for seg in $SEGMENTS; do
    run="$WORK/run-$name-seg-$seg"
    rm -rf "$run" "$run".prev*
    # warmup 30 (the config's 2000 is for the 24k-step recipe): a 300-step run should show the loss falling
    if ! $PY -m train --config "$config" --set run_dir="$run" --set "data.paths=[$WORK/stdlib.bin]" \
      --set data.source=tokens --set data.seq_len=2048 \
      --set train.steps="$STEPS" --set train.global_batch_size="$BATCH" --set train.grad_accum=1 \
      --set data.segment_ids="$seg" --set optimizer.warmup_steps=30 --set checkpoint.every=100000 \
      --set train.progress=false $EXTRA 2>&1 | tee "$OUT/train-$name-seg-$seg.log"; then
      STOPPED="$STOPPED $name-seg-$seg"
    fi
    cp "$run/metrics.jsonl" "$OUT/metrics-$name-seg-$seg.jsonl" || true
    RUNS="$RUNS $name-seg-$seg"
  done
done

STOPPED="$STOPPED" $PY - "$WORK" $RUNS <<'EOF'
import json, math, os, sys
work, runs = sys.argv[1], sys.argv[2:]
rates, failed = {}, []
for seg in runs:
    if seg in os.environ["STOPPED"].split():
        print(f"[train_cli] {seg}: FAILED, the run stopped with an error (see the last lines of its log)")
        failed.append(seg)
        continue
    path = f"{work}/run-{seg}/metrics.jsonl"
    recs = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    if not recs:
        print(f"[train_cli] {seg}: FAILED, no metrics (see its log)")
        failed.append(seg)
        continue
    losses = [r["loss"] for r in recs]
    bad = [r["step"] for r in recs if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))]
    if bad:
        print(f"[train_cli] {seg}: FAILED, non-finite loss or gradient at steps {bad[:5]}")
        failed.append(seg)
        continue
    # tokens/s: the records after the first 50 steps (compile and warm-up excluded), as the CLI measured them
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] > 50]
    rates[seg] = sum(tps) / len(tps)
    mfu = [r["mfu"] for r in recs if "mfu" in r and r["step"] > 50]
    mfu_s = f", MFU {sum(mfu) / len(mfu):.1%}" if mfu else ""
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"[train_cli] {seg}: {len(recs)} logged steps to {recs[-1]['step']}, loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f} (mean of first 10 logged {first:.3f}, last 10 {last:.3f}), "
          f"{rates[seg]:,.0f} tokens/s{mfu_s} (metrics.jsonl, steps > 50)")
    drop = float(os.environ["MIN_DROP"])
    if not last < first - drop:
        print(f"[train_cli] {seg}: FAILED, loss did not fall by {drop} nats ({first:.3f} -> {last:.3f})")
        failed.append(seg)
for name in sorted({r.rsplit("-seg-", 1)[0] for r in rates}):
    on, off = rates.get(f"{name}-seg-true"), rates.get(f"{name}-seg-false")
    if on and off:
        print(f"[train_cli] {name}: segment ids cost {100 * (1 - on / off):+.1f}% throughput "
              f"({on:,.0f} vs {off:,.0f} tokens/s)")
if failed:
    sys.exit(f"[train_cli] failed: {' '.join(failed)}")
EOF
