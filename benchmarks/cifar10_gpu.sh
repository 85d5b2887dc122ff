#!/usr/bin/env bash
# The paper's CIFAR-10 setting on one GPU: ResNet-18 (CIFAR stem), 400 epochs, 10 heads x 128 clusters,
# lambda 25, labels re-assigned on a linear schedule (the original CIFAR recipe), then sela's evaluation
# (weighted kNN k = 200, T = 0.1) and the linear probe with `sela eval`.
# The paper reports 77.6 % kNN and 83.4 % linear with AlexNet on CIFAR-10.
#
#   bash benchmarks/cifar10_gpu.sh [DATA_DIR=/tmp/data/cifar10] [OUT=runs/cifar10_resnet18]
#
# DATA_DIR holds CIFAR-10 in ImageFolder layout (train/ test/), e.g. the shared JPEG copy extracted;
# use --dataset cifar10 instead for torchvision's files. SELA: the sela command (default `sela`).
# Measured runs: docs/experiments.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-/tmp/data/cifar10}
OUT=${2:-runs/cifar10_resnet18}
SELA=${SELA:-sela}
$SELA train --dataset folder --data-dir "$DATA" --arch resnet18_cifar --epochs 400 --heads 10 --clusters 128 \
  --lam 25 --label-updates 200 --label-spacing linear --batch-size 256 --lr 0.1 --weight-decay 5e-4 \
  --device cuda --out "$OUT" --no-progress
$SELA eval "$OUT"
