#!/usr/bin/env bash
# SeLa on CIFAR-10 (the shared JPEG copy) on this CPU within a wall-clock budget; prints knn_top1.
#
#   bash benchmarks/cifar10_cpu.sh [BUDGET_MINUTES=30] [OUT=runs/cifar10_cpu] [more sela train flags ...]
#
# Settings (environment): WIDTHS, BATCH, HEADS, LR, PROJECTOR, LABEL_INPUTS, LABEL_HEADS, LABEL_SPACING,
# LABEL_UPDATES (recorded: 1000, i.e. one label step per epoch, merged at epoch ends); flags after OUT go to
# `sela train` as they are (e.g. --set augment.jitter_p=0.8).
#
# The budget covers training (label steps included); the final evaluation (features of 60k images and
# the weighted kNN, k = 200, T = 0.1) comes after it. The number of epochs that fits is estimated from a
# short throughput probe of the same model, so the learning-rate and label schedules span the whole run.
# Reference floors on this copy (same kNN): raw pixels 41.6 %, random 4-layer convnet 42.0 %.
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
WIDTHS=${WIDTHS:-[32,64,128]}
BATCH=${BATCH:-256}
LABEL_INPUTS=${LABEL_INPUTS:-recorded}  # recorded: label steps from the training pass; eval: a pass each
LABEL_HEADS=${LABEL_HEADS:-round-robin}
LABEL_SPACING=${LABEL_SPACING:-linear}
LABEL_UPDATES=${LABEL_UPDATES:-$([ "$LABEL_INPUTS" = recorded ] && echo 1000 || echo 4)}  # recorded: every epoch
HEADS=${HEADS:-10}
LR=${LR:-0.15}
PROJECTOR=${PROJECTOR:-[]}
EPOCHS=$($PY - "$BUDGET_MIN" "$WIDTHS" "$BATCH" "$LABEL_UPDATES" "$HEADS" "$PROJECTOR" "$LABEL_INPUTS" <<'PYEOF'
import json, sys, time
import torch
from sela.data import BatchAugment
from sela.models import create_model
budget_s, widths, batch, updates = float(sys.argv[1]) * 60, json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
heads, projector = int(sys.argv[5]), tuple(json.loads(sys.argv[6]))
passes = 1 if sys.argv[7] == "recorded" else updates  # recorded: only the first step is a pass
model = create_model("convnet", [128] * heads, widths=tuple(widths), projector=projector)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
aug = BatchAugment(32)
x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
times = []
for i in range(6):
    t = time.perf_counter()
    loss = sum(o.logsumexp(1).mean() for o in model(aug(x)))
    opt.zero_grad(); loss.backward(); opt.step()
    times.append(time.perf_counter() - t)
step = sorted(times[1:])[len(times[1:]) // 2]
steps_per_epoch = 50000 // batch
epoch_s = step * steps_per_epoch
label_s = epoch_s / 3 * 50000 / (steps_per_epoch * batch)  # one forward pass over the data
epochs = max(1, int((budget_s - passes * label_s) / epoch_s))
print(f"probe: {step:.3f} s/step, ~{epoch_s:.0f} s/epoch -> {epochs} epochs in {budget_s/60:.0f} min", file=sys.stderr)
print(epochs)
PYEOF
)
rm -rf "$OUT"
start=$(date +%s)
.venv/bin/sela train --dataset folder --data-dir "$DATA" --arch convnet --set "widths=$WIDTHS" \
  --set "projector=$PROJECTOR" --heads "$HEADS" --clusters 128 --epochs "$EPOCHS" \
  --label-updates "$LABEL_UPDATES" --label-inputs "$LABEL_INPUTS" --label-heads "$LABEL_HEADS" \
  --label-spacing "$LABEL_SPACING" --batch-size "$BATCH" --lr "$LR" --out "$OUT" --no-progress "$@"
end=$(date +%s)
echo "wall clock (training + evaluation): $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s"
$PY -c "import json; s = json.load(open('$OUT/summary.json')); print(f\"CIFAR-10 (JPEG copy) knn_top1 = {s['knn_top1']:.2f} %  (train {s['train_time_s']/60:.1f} min, label share {s.get('label_share', 0):.1%})\")"
