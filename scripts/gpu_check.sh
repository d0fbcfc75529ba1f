#!/usr/bin/env bash
# GPU check: one prepared script for a session whose task has an accelerator (the device
# tool gives about 15 minutes in all; this aims at under 10 on one H200, each stage capped
# by `timeout`). It needs JAX's CUDA build but no network. From the repository root:
#   OUT=gpu-out bash scripts/gpu_check.sh
# Writes under $OUT:
#   devices.json                      jax/flax/optax versions and jax.devices()
#   seed_cnn_summary.json, seed_cnn_metrics.jsonl      the default experiment
#   population_summary.json           seed CNN, population=16, 10 meta-steps
#   bench_unroll.json                 scripts/bench_unroll.py --steps 100 1000 --mlp-steps 10000
#   bench_population.json             scripts/bench_population.py (P = 1, 4, 16, 64 at T = 50)
#   status.txt                        each stage's exit status (124: hit its timeout)
# A failing stage does not stop the later ones; the script exits non-zero if any failed.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
work=$(mktemp -d)
failed=0

stage() {  # stage NAME SECONDS COMMAND...: run with a time cap, record the exit status
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/status.txt"
  [ "$rc" -eq 0 ] || failed=1
}

stage install 120 python3 -m pip install -q --no-deps --no-build-isolation -e .
stage devices 60 python3 -c "import json, jax, flax, optax; json.dump({'jax': jax.__version__, \
'flax': flax.__version__, 'optax': optax.__version__, 'devices': [str(d) for d in jax.devices()]}, \
open('$OUT/devices.json', 'w'), indent=2); print(jax.devices())"
stage seed_cnn 120 python3 -m hypergrad.cli run --quiet --workdir "$work/seed-cnn"
cp "$work/seed-cnn/summary.json" "$OUT/seed_cnn_summary.json" 2>/dev/null
cp "$work/seed-cnn/metrics.jsonl" "$OUT/seed_cnn_metrics.jsonl" 2>/dev/null
stage population 90 python3 -m hypergrad.cli run --quiet --workdir "$work/population" \
  --set population=16 --set meta_steps=10
cp "$work/population/summary.json" "$OUT/population_summary.json" 2>/dev/null
stage bench_unroll 270 python3 scripts/bench_unroll.py --steps 100 1000 --mlp-steps 10000 \
  --budget 2 --timeout 120 --json "$OUT/bench_unroll.json"
stage bench_population 120 python3 scripts/bench_population.py --budget 3 \
  --json "$OUT/bench_population.json"
exit $failed
