#!/usr/bin/env bash
# Self-labelling on CIFAR-10 (the shared JPEG copy) on this CPU within a wall-clock budget; prints knn_top1.
#
#   bash benchmarks/cifar10_cpu.sh [BUDGET_MINUTES=30] [OUT=runs/cifar10_cpu] [more sela train flags ...]
#
# It is the default command a user runs on an image folder, with a budget:
#   sela train --dataset folder --data-dir DATA --time-limit BUDGET --out OUT --no-progress [flags]
# sela picks the recipe from the images and the device (on a CPU: cpu-fast, the online swapped objective on a
# small convnet with half-size views; see sela/recipes.py and docs/training.md) and prints it; flags after OUT
# change any of its settings (e.g. --recipe cpu-sela for the paper's objective with SeLa-v2's options, or
# --set augment.grayscale_p=0.1). The budget covers training, label steps included; the final evaluation
# (features of 60k images and the weighted kNN, k = 200, T = 0.1) comes after it.
#
# Data: $SELA_CIFAR_DIR (default /tmp/data/cifar10, ImageFolder layout with train/ and test/), extracted from
# ../shared/data/cifar10-jpeg.tar.gz when missing. Measured runs and the kNN floors: docs/experiments.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_MIN=${1:-30}
OUT=${2:-runs/cifar10_cpu}
shift $(( $# < 2 ? $# : 2 ))
DATA=${SELA_CIFAR_DIR:-/tmp/data/cifar10}
TARBALL=../shared/data/cifar10-jpeg.tar.gz
PY=${PY:-.venv/bin/python}
if [ ! -d "$DATA/train" ]; then
  [ -f "$TARBALL" ] || { echo "no CIFAR-10 at $DATA and no $TARBALL; set SELA_CIFAR_DIR" >&2; exit 2; }
  mkdir -p "$DATA" && tar xzf "$TARBALL" -C "$DATA"
fi
rm -rf "$OUT"
start=$(date +%s)
$PY -m sela train --dataset folder --data-dir "$DATA" --time-limit "$BUDGET_MIN" --out "$OUT" --no-progress "$@"
end=$(date +%s)
echo "wall clock (training + evaluation): $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s"
$PY -c "import json; s = json.load(open('$OUT/summary.json')); print(f\"CIFAR-10 (JPEG copy) knn_top1 = {s['knn_top1']:.2f} %  (train {s['train_time_s']/60:.1f} min, label share {s['label_share']:.1%}, evaluation {s['eval_time_s']:.0f} s)\")"
