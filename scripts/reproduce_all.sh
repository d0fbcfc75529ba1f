#!/usr/bin/env bash
# Regenerate the docs' figures (small PNGs under docs/figures/, shown in docs/gallery/ and docs/benchmarks/).
#   bash scripts/reproduce_all.sh          (about 13 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
work=runs/reproduce-$(date +%Y%m%d-%H%M%S)
mkdir -p docs/figures
# The seed CNN with each hyper-update (one local run each, as the guide's table compares
# them), then the three overlaid by `hypergrad plot`.
for outer in adam gd ncg; do
  hypergrad run seed-cnn --quiet --set strategy=local --set outer=$outer \
    --workdir "$work/seed-cnn-$outer"
done
cp "$work/seed-cnn-adam/val_loss.png" docs/figures/seed_cnn_val_loss.png
cp "$work/seed-cnn-adam/hparams.png" docs/figures/seed_cnn_hparams.png
hypergrad plot "$work"/seed-cnn-{adam,gd,ncg} --out "$work/compare"
cp "$work/compare/compare_val_loss.png" docs/figures/seed_cnn_compare_val_loss.png
cp "$work/compare/compare_hparams.png" docs/figures/seed_cnn_compare_hparams.png
# Per-layer x per-step learning rates and per-weight decays (Maclaurin et al. 2015, Fig. 2).
hypergrad run seed-cnn --quiet --set strategy=local --set outer=adam --set outer_lr=0.05 \
  --set hparams.learning_rate.per=layer \
  --set hparams.learning_rate.schedule=per_step --set hparams.weight_decay.per=parameter \
  --workdir "$work/seed-cnn-schedules"
cp "$work/seed-cnn-schedules/schedules.png" docs/figures/seed_cnn_schedules.png
# The loss function and the activation as hyperparameters: an MSE/CE mix, a slope per layer.
hypergrad run seed-cnn --quiet --set strategy=local --set outer=gd --set loss_mix=0.5 \
  --set hparams.leaky_slope.per=layer \
  --workdir "$work/seed-cnn-lossmix"
cp "$work/seed-cnn-lossmix/hparams.png" docs/figures/seed_cnn_lossmix_hparams.png
hypergrad run grazzi-hierarchy --workdir "$work/grazzi-hierarchy"
cp "$work/grazzi-hierarchy/hierarchy.png" docs/figures/grazzi_hierarchy.png
hypergrad run hoag --workdir "$work/hoag"
cp "$work/hoag/suboptimality.png" docs/figures/hoag_suboptimality.png
hypergrad run baydin-hd --workdir "$work/baydin-hd"
cp "$work/baydin-hd/iterations.png" docs/figures/baydin_hd_iterations.png
hypergrad run seed-recurrence --workdir "$work/seed-recurrence"
cp "$work/seed-recurrence/trajectories.png" docs/figures/seed_recurrence.png
hypergrad run maclaurin-schedules --workdir "$work/maclaurin-schedules"
cp "$work/maclaurin-schedules/schedules.png" docs/figures/maclaurin_schedules.png
hypergrad run hyper-cleaning --workdir "$work/hyper-cleaning"
cp "$work/hyper-cleaning/weights.png" docs/figures/hyper_cleaning_weights.png
cp "$work/hyper-cleaning/methods.png" docs/figures/hyper_cleaning_methods.png
hypergrad run chaos --workdir "$work/chaos" && cp "$work/chaos/chaos.png" docs/figures/chaos.png
# The gallery on real MNIST (distill-mnist among it): bash scripts/reproduce_mnist.sh
