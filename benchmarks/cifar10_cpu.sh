#!/usr/bin/env bash
# Self-labelling on CIFAR-10 (the shared JPEG copy) on this CPU within a wall-clock budget; prints knn_top1.
#
#   bash benchmarks/cifar10_cpu.sh [BUDGET_MINUTES=30] [OUT=runs/cifar10_cpu] [more sela train flags ...]
#
# Data: $SELA_CIFAR_DIR (default /tmp/data/cifar10, ImageFolder layout with train/ and test/), extracted from
# ../shared/data/cifar10-jpeg.tar.gz when missing. Python: $PY (default .venv/bin/python).
#
# Defaults (the best measured setting): the online `--objective swapped` deviation, a 32-64-96 convnet whose
# last block does not pool, 5 heads x 128, lr 0.25, batch 256, 16 px training views of the 32 px images
# (the label step and the evaluation stay at 32 px), SimCLR-style colour jitter. OBJECTIVE=sela runs the
# paper's objective (recorded label inputs, one head re-labelled per epoch).
#
# Settings (environment): WIDTHS, POOLS, BATCH, HEADS, CLUSTERS, LR, PROJECTOR, PRECISION, OBJECTIVE,
# CROP_SIZE (side of the training views), SMALL_CROPS (multi-crop: extra views of half CROP_SIZE per image,
# swapped only), LABEL_INPUTS, LABEL_HEADS, LABEL_SPACING, LABEL_UPDATES (recorded inputs: 1000, i.e. one
# label step per epoch, merged at epoch ends), JITTER and JITTER_P (colour jitter strengths and
# probability). Flags after OUT go to `sela train` as they are (e.g. --set augment.grayscale_p=0.1).
#
# The budget covers training (label steps included); the final evaluation (features of 60k images and the
# weighted kNN, k = 200, T = 0.1) comes after it. A short probe of the real training step and of one label
# pass gives the first plan; `sela train --time-limit` then re-plans the number of epochs before every epoch
# from the measured epoch times, with the learning-rate decay and label schedule following the plan. The
# swapped objective's final label step (one pass over the data, after the last epoch) is set aside.
#
# Measured runs and the kNN floors: docs/experiments.md.
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
WIDTHS=${WIDTHS:-[32,64,96]}  # convnet block widths
BATCH=${BATCH:-256}
OBJECTIVE=${OBJECTIVE:-swapped}  # swapped: the online SwAV-style deviation (best measured); sela: the paper
LABEL_INPUTS=${LABEL_INPUTS:-$([ "$OBJECTIVE" = swapped ] && echo eval || echo recorded)}  # recorded: label steps from the training pass; eval: a pass each
LABEL_HEADS=${LABEL_HEADS:-round-robin}
LABEL_SPACING=${LABEL_SPACING:-linear}
LABEL_UPDATES=${LABEL_UPDATES:-$([ "$LABEL_INPUTS" = recorded ] && echo 1000 || echo 4)}  # recorded: every epoch
HEADS=${HEADS:-5}
CLUSTERS=${CLUSTERS:-128}
LR=${LR:-0.25}
PROJECTOR=${PROJECTOR:-[]}
POOLS=${POOLS:-[true,true,false]}  # whether each block max-pools; the last un-pooled: a 4x4 map of 16 px views
CROP_SIZE=${CROP_SIZE:-16}  # px; 16 px views cost about 0.3x of 32 px per epoch
SMALL_CROPS=${SMALL_CROPS:-0}
JITTER=${JITTER:-[0.4,0.4,0.4,0.1]}  # brightness, contrast, saturation, hue (SimCLR); sela: hue 0.4
JITTER_P=${JITTER_P:-0.8}  # sela's default: 1.0
PRECISION=${PRECISION:-auto}  # auto: bfloat16 autocast on CPUs with AVX512-BF16/AMX, else fp32
PLAN=$($PY - "$BUDGET_MIN" "$WIDTHS" "$BATCH" "$LABEL_UPDATES" "$HEADS" "$PROJECTOR" "$LABEL_INPUTS" \
  "$PRECISION" "$OBJECTIVE" "$LR" "$CLUSTERS" "$SMALL_CROPS" "$DATA" "$CROP_SIZE" "$POOLS" <<'PYEOF'
import json, sys, tempfile, time
import torch
from sela.data import BatchAugment, EvalTransform, ImageSet, load_dataset
from sela.models import create_model
from sela.objectives import SelaObjective, SwappedObjective
from sela.train import Trainer
budget_s, widths, batch, updates = float(sys.argv[1]) * 60, json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
heads, projector, inputs, precision, objective = int(sys.argv[5]), tuple(json.loads(sys.argv[6])), *sys.argv[7:10]
# label passes over the data: each scheduled step (eval/train inputs), or only one (recorded: the first;
# swapped: the final global step)
passes = 1 if inputs == "recorded" or objective == "swapped" else updates
# time the real training step (augmentation, forward, loss, backward, bookkeeping) on the first images
# of the data, best of two short epochs
probe_steps = 12
crop = int(sys.argv[14])
images = load_dataset("folder", sys.argv[13], "train").images[: probe_steps * batch]
with tempfile.TemporaryDirectory() as tmp:
    if objective == "swapped":
        small = BatchAugment(crop // 2, crop_scale=(0.1, 0.4))
        loss = SwappedObjective(BatchAugment(crop), small_crops=int(sys.argv[12]), small_augment=small)
    else:
        loss = SelaObjective(BatchAugment(crop))
    trainer = Trainer(
        create_model("convnet", [int(sys.argv[11])] * heads, widths=tuple(widths), projector=projector,
                     pools=tuple(json.loads(sys.argv[15]))),
        ImageSet(images), objective=loss, out_dir=tmp, epochs=1000, batch_size=batch, lr=float(sys.argv[10]),
        label_updates=1, label_inputs=inputs, eval_transform=EvalTransform(32),
        device=torch.device("cpu"), progress=False, precision=precision,
    )
    trainer.update_labels()
    trainer.train_one_epoch(0)  # warm-up
    times = []
    for epoch in (1, 2):
        t = time.perf_counter()
        trainer.train_one_epoch(epoch)
        times.append((time.perf_counter() - t) / probe_steps)
    step = min(times)
    # one label pass over the probe's images (eval-mode 32 px forward and the solve), warm, scaled to
    # the 50,000 training images
    t = time.perf_counter()
    trainer.update_labels()
    label_s = (time.perf_counter() - t) * 50000 / len(images)
steps_per_epoch = 50000 // batch
epoch_s = step * steps_per_epoch
epochs = max(1, int((budget_s - passes * label_s) / epoch_s))
# the time limit: the budget less the swapped objective's final label step, which the re-plan does not
# foresee (the other objectives' label steps are inside the measured epoch times)
limit_min = (budget_s - (label_s if objective == "swapped" else 0)) / 60
print(f"probe ({trainer.precision}, {objective}): {step:.3f} s/step, ~{epoch_s:.0f} s/epoch, ~{label_s:.0f} s per "
      f"label pass -> {epochs} epochs "
      f"in {budget_s/60:.0f} min (first plan; --time-limit {limit_min:.2f} re-plans it)", file=sys.stderr)
print(epochs, f"{limit_min:.2f}")
PYEOF
)
read -r EPOCHS TIME_LIMIT <<< "$PLAN"
rm -rf "$OUT"
start=$(date +%s)
.venv/bin/sela train --dataset folder --data-dir "$DATA" --arch convnet --set "widths=$WIDTHS" \
  --set "pools=$POOLS" --set "projector=$PROJECTOR" --heads "$HEADS" --clusters "$CLUSTERS" --epochs "$EPOCHS" \
  --time-limit "$TIME_LIMIT" \
  --label-updates "$LABEL_UPDATES" --label-inputs "$LABEL_INPUTS" --label-heads "$LABEL_HEADS" \
  --label-spacing "$LABEL_SPACING" --batch-size "$BATCH" --lr "$LR" --precision "$PRECISION" --objective "$OBJECTIVE" \
  --crop-size "$CROP_SIZE" --small-crops "$SMALL_CROPS" --set "augment.jitter=$JITTER" --set "augment.jitter_p=$JITTER_P" --out "$OUT" \
  --no-progress "$@"
end=$(date +%s)
echo "wall clock (training + evaluation): $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s"
$PY -c "import json; s = json.load(open('$OUT/summary.json')); print(f\"CIFAR-10 (JPEG copy) knn_top1 = {s['knn_top1']:.2f} %  (train {s['train_time_s']/60:.1f} min, label share {s.get('label_share', 0):.1%})\")"
