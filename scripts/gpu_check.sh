#!/usr/bin/env bash
# GPU check, for a machine with an accelerator and JAX's CUDA build but no network:
# installs this checkout without dependencies, prints the devices, runs the unroll
# benchmark and the default experiment, and writes their results under $OUT.
#   OUT=gpu-out bash scripts/gpu_check.sh
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
python3 scripts/bench_unroll.py --repeats 5 --json "$OUT/bench_unroll_gpu.json"
work=$(mktemp -d)
python3 -m hypergrad.cli run --quiet --workdir "$work/seed-cnn"
cp "$work/seed-cnn/summary.json" "$OUT/seed_cnn_summary.json"
cp "$work/seed-cnn/metrics.jsonl" "$OUT/seed_cnn_metrics.jsonl"
