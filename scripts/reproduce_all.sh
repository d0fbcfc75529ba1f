#!/usr/bin/env bash
# Regenerate the figures shown in README.md (small PNGs under docs/figures/).
#   bash scripts/reproduce_all.sh          (about 3 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
work=runs/reproduce-$(date +%Y%m%d-%H%M%S)
hypergrad run seed-cnn --quiet --workdir "$work/seed-cnn"
mkdir -p docs/figures
cp "$work/seed-cnn/val_loss.png" docs/figures/seed_cnn_val_loss.png
cp "$work/seed-cnn/hparams.png" docs/figures/seed_cnn_hparams.png
hypergrad run grazzi-hierarchy --workdir "$work/grazzi-hierarchy"
cp "$work/grazzi-hierarchy/hierarchy.png" docs/figures/grazzi_hierarchy.png
