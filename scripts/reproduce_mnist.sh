#!/usr/bin/env bash
# The gallery on real MNIST: each *-mnist experiment once, its figure into docs/figures/.
#   bash scripts/reproduce_mnist.sh            (the full runs; times in docs/gallery/index.md)
#   QUICK=1 bash scripts/reproduce_mnist.sh    (a smoke run of each, tiny sizes, a few
#                                               minutes; writes no figures to docs/)
# The data: MNIST=DIR (default ../shared/data/mnist-10k) holding MNIST-format IDX files
# (train-* and/or t10k-*, plain or .gz), read with data=idx:DIR; MNIST=tfds reads tfds's
# prepared MNIST instead (data=mnist). Runs go to runs/reproduce-mnist-TIME/.
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${MNIST:-../shared/data/mnist-10k}
if [ "$MNIST" = tfds ]; then
  data=mnist
elif [ -d "$MNIST" ]; then
  data="idx:$MNIST"
else
  echo "reproduce_mnist.sh: no MNIST directory at $MNIST; set MNIST=DIR (MNIST-format IDX" \
       "files) or MNIST=tfds" >&2
  exit 2
fi
quick=${QUICK:-0}
work=runs/reproduce-mnist$([ "$quick" = 1 ] && echo -quick)-$(date +%Y%m%d-%H%M%S)
mkdir -p "$work"

# run NAME FIGURE [--set ... for the full run] -- [--set ... for QUICK=1]
run() {
  local name=$1 figure=$2
  shift 2
  local full=() smoke=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do full+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  smoke=("$@")
  local args=(--set "data=$data")
  if [ "$quick" = 1 ]; then args+=("${smoke[@]}"); else args+=("${full[@]}"); fi
  local began=$SECONDS
  hypergrad run "$name" --quiet "${args[@]+"${args[@]}"}" --workdir "$work/$name" > "$work/$name.log"
  echo "$name: $((SECONDS - began)) s"
  if [ "$quick" != 1 ]; then
    mkdir -p docs/figures
    cp "$work/$name/$figure" "docs/figures/${name//-/_}.png"
  fi
}

small=(--set data.train_size=500 --set data.val_size=200 --set data.test_size=200)
run seed-mnist methods.png -- "${small[@]}" --set steps=10 --set meta_steps=1 \
  --set val_batch_size=0
run maclaurin-mnist schedules.png -- "${small[@]}" --set steps=20 --set meta_steps=2 \
  --set grid_points=3 --set compare=step,nested
run hyper-cleaning-mnist methods.png -- "${small[@]}" --set steps=20 --set meta_steps=3 \
  --set methods=reverse,truncated:5,implicit
run grazzi-mnist hierarchy.png -- "${small[@]}" --set steps=200 --set iterations=1,10
run baydin-mnist iterations.png -- "${small[@]}" --set steps=100 --set alphas=1e-2,1e-3 \
  --set betas=1e-3
run distill-mnist images.png -- "${small[@]}" --set meta_steps=5 --set draws=2 \
  --set grid_points=3
echo "runs in $work"
