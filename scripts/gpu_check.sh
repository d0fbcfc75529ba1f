#!/usr/bin/env bash
# GPU check: one prepared script for a session whose task has an accelerator (the device
# tool gives about 15 minutes in all; this aims at about 8 on one H200, each stage capped
# by `timeout`). It needs JAX's CUDA build but no network. From the repository root:
#   OUT=gpu-out MNIST=path/to/mnist-10k bash scripts/gpu_check.sh
# (MNIST: a folder with the MNIST IDX files; the stage is skipped without it.) Writes
# $OUT/status.txt (each stage's exit status and seconds; 124: hit its timeout) and
# $OUT/gpu.tar.gz holding:
#   devices.json                          jax/flax/optax versions and jax.devices()
#   seed_cnn_{a,b}/                       the default run, twice (summary, metrics)
#   deterministic_{a,b}/                  the same with --set deterministic=true, twice
#   determinism.json                      whether each pair's metrics.jsonl agree bitwise
#   mnist/                                the seed CNN on real MNIST (5000 train, 2000 test)
#   bench_population_{matmul,native}.json scripts/bench_population.py, P = 1, 16, 64, T = 50
#   bench_population_28_{matmul,native}.json  the same on 28x28 MNIST, P = 1, 16, T = 20
#   bench_unroll.json                     scripts/bench_unroll.py, T = 200 and 1000
# A failing stage does not stop the later ones; the script exits non-zero if any failed.
set -uo pipefail
OUT=${OUT:-gpu-out}
MNIST=${MNIST:-../shared/data/mnist-10k}
mkdir -p "$OUT"
res=$(mktemp -d)
failed=0
export PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...: run with a time cap, record the exit status
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/status.txt"
  [ "$rc" -eq 0 ] || failed=1
}
keep() {  # keep DIR: a run's small files into the results
  mkdir -p "$res/$(basename "$1")"
  cp "$1"/summary.json "$1"/metrics.jsonl "$1"/config.json "$res/$(basename "$1")/" 2>/dev/null
}

stage install 120 python3 -m pip install -q --no-deps --no-build-isolation -e .
stage devices 60 python3 -c "import json, jax, flax, optax; json.dump({'jax': jax.__version__, \
'flax': flax.__version__, 'optax': optax.__version__, 'devices': [str(d) for d in jax.devices()]}, \
open('$res/devices.json', 'w'), indent=2); print(jax.devices())"
for run in seed_cnn_a seed_cnn_b; do
  stage "$run" 100 python3 -m hypergrad.cli run --quiet --workdir "$res/runs/$run"
  keep "$res/runs/$run"
done
for run in deterministic_a deterministic_b; do
  stage "$run" 100 python3 -m hypergrad.cli run --quiet --workdir "$res/runs/$run" \
    --set deterministic=true
  keep "$res/runs/$run"
done
stage determinism 30 python3 - "$res" <<'PY'
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
def lines(run):
    path = res / run / "metrics.jsonl"
    if not path.exists():
        return None
    return [{k: v for k, v in json.loads(l).items() if k != "seconds"}
            for l in path.read_text().splitlines()]
out = {pair: lines(f"{pair}_a") is not None and lines(f"{pair}_a") == lines(f"{pair}_b")
       for pair in ("seed_cnn", "deterministic")}
(res / "determinism.json").write_text(json.dumps(out, indent=2) + "\n")
print(out)
PY
if [ -d "$MNIST" ]; then
  stage mnist 120 python3 -m hypergrad.cli run --quiet --workdir "$res/runs/mnist" \
    --set "data=idx:$MNIST" --set data.train_size=5000 --set data.test_size=2000 \
    --set learning_rate=0.003 --set meta_steps=10 --set val_batch_size=400
  keep "$res/runs/mnist"
fi
for conv in matmul native; do
  stage "bench_population_$conv" 150 python3 scripts/bench_population.py --sizes 1 16 64 \
    --budget 2 --repeats 3 --conv "$conv" --json "$res/bench_population_$conv.json"
done
if [ -d "$MNIST" ]; then  # the convolution rule at 28x28 (MATMUL_MAX_PIXELS)
  for conv in matmul native; do
    stage "bench_population_28_$conv" 90 python3 scripts/bench_population.py --sizes 1 16 \
      --steps 20 --budget 2 --repeats 3 --conv "$conv" --data "idx:$MNIST" \
      --json "$res/bench_population_28_$conv.json"
  done
fi
stage bench_unroll 170 python3 scripts/bench_unroll.py --steps 200 1000 --mlp-steps \
  --estimators reverse --checkpoint none step --hvp reverse forward --budget 2 --repeats 3 \
  --timeout 60 --json "$res/bench_unroll.json"
rm -rf "$res/runs"
tar -czf "$OUT/gpu.tar.gz" -C "$res" .
exit $failed
