#!/usr/bin/env bash
# One prepared check on a CUDA machine: the label step at paper scale and a short CIFAR-10 training run.
#
#   bash benchmarks/gpu_check.sh [CIFAR_TARBALL] [OUT_DIR]
#
# Needs the CIFAR-10 JPEG copy (ImageFolder layout in a .tar.gz). Runs from the source tree (PYTHONPATH=src),
# so nothing is installed. Prints: the Sinkhorn label step for one head at N = 1,281,167, K = 3000 (cold and
# warm start) next to the time of one read pass over the buffer; then ResNet-18 (CIFAR stem) self-labelling
# for a few minutes on CIFAR-10 with its throughput (images/s) and weighted-kNN top-1. EPOCHS sets the
# training length (default 30; the run is cut at 330 s).
# Measured runs: docs/experiments.md.
set -uo pipefail
cd "$(dirname "$0")/.."
TARBALL=${1:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${2:-runs/gpu_check}
EPOCHS=${EPOCHS:-30}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

echo "== label step, one head, N = 1,281,167, K = 3000 (float32 buffer 15.4 GB, in place)"
python3 - <<'PY'
import time, torch
from sela.sinkhorn import assign
N, K = 1_281_167, 3000
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
buf = torch.empty(N, K, device=dev)
def fill(noise=None):
    torch.randn(N, K, generator=gen, device=dev, out=buf)
    buf.mul_(3.0)
fill()
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(5): s = buf.sum()
torch.cuda.synchronize(); floor = (time.perf_counter() - t) / 5
keep = buf[:200_000].clone()  # to re-create similar logits for the warm start
torch.cuda.synchronize(); t = time.perf_counter()
r = assign(buf, inplace=True)
torch.cuda.synchronize(); cold = time.perf_counter() - t
sizes = torch.bincount(r.labels, minlength=K)
print(f"read pass over the buffer (floor): {floor * 1e3:.1f} ms")
print(f"cold start: {cold:.2f} s, {r.n_iter} passes, error {r.error:.2e}, converged {r.converged}, "
      f"cluster sizes {int(sizes.min())}..{int(sizes.max())} (N/K = {N / K:.0f})")
fill(); buf[:200_000] = keep + 0.05 * torch.randn_like(keep)  # the next epoch's logits, roughly
torch.cuda.synchronize(); t = time.perf_counter()
w = assign(buf, inplace=True, init=r.scaling)
torch.cuda.synchronize(); warm = time.perf_counter() - t
print(f"warm start: {warm:.2f} s, {w.n_iter} passes, error {w.error:.2e}")
print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
del buf, keep
PY

echo "== CIFAR-10 (JPEG copy): ResNet-18 (CIFAR stem), ${EPOCHS} epochs"
DATA=/tmp/cifar10
mkdir -p $DATA && tar xzf "$TARBALL" -C $DATA
timeout 330 python3 -m sela train --dataset folder --data-dir $DATA --arch resnet18_cifar --epochs "$EPOCHS" \
  --heads 4 --clusters 128 --batch-size 512 --lr 0.2 --label-updates 20 --out "$OUT/run" --no-progress --device cuda
echo "exit $?"
python3 - "$OUT/run" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
for r in rows[:2] + rows[-2:]:
    print(f"epoch {r['epoch']}: loss {r['loss']:.3f}  {r['images_per_s']:.0f} img/s  epoch {r['time_s']:.1f} s  "
          f"label step share {r['label_share']:.1%}")
try:
    s = json.load(open(sys.argv[1] + "/summary.json"))
    print("summary:", {k: s[k] for k in ("knn_top1", "knn_top5", "nmi", "ari", "accuracy", "train_time_s", "label_share") if k in s})
except FileNotFoundError:
    print("no summary.json (training cut by the time limit)")
PY
cp "$OUT/run/metrics.jsonl" "$OUT/run/summary.json" "${OUT_COPY:-/dev/null}" 2>/dev/null || true
