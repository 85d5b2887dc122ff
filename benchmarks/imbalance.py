"""Skewed classes: the paper's imbalanced CIFAR-10 splits, and the clusters a run exports scored against k-means.

Two steps:

    python benchmarks/imbalance.py make [--root /tmp/imb]
        links the CIFAR-10 JPEG copy (/tmp/data/cifar10, ImageFolder layout) into four training splits that
        share the balanced test split: ``full`` (50,000), ``light`` (class 0 halved: 47,500), ``heavy``
        (class c keeps 5,000 - 500 c: 27,500) and ``balanced`` (2,750 a class: 27,500, heavy's size).
    OMP_NUM_THREADS=1 python benchmarks/imbalance.py score RUN_DIR [RUN_DIR ...] [--k 10 128]
        for each ``sela train --dataset folder --data-dir ROOT/SPLIT`` run directory: the raw-pixel kNN floor
        of its split, sela's kNN and linear probe, the NMI / ARI of the run's own labels (every head: mean and
        best) and of clusterings of the run's features at each K: scikit-learn's KMeans (n_init 3) and
        sela's export (``sela labels RUN --k K``, equal and relaxed marginal, rho 1), with their largest
        cluster's size over the equal share. Prints a Markdown table; one JSON line per run follows it.

Measured runs: docs/experiments.md, "Skewed classes".
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor

SPLITS = {
    "full": lambda c: 5000,
    "light": lambda c: 2500 if c == 0 else 5000,
    "heavy": lambda c: 5000 - 500 * c,
    "balanced": lambda c: 2750,
}


def make(root: Path, source: Path) -> None:
    """Link ``source``'s images into ROOT/<split>/{train,test}/<class>/ (files in sorted order)."""
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    for name, keep in SPLITS.items():
        for split in ("train", "test"):
            for c, cls in enumerate(classes):
                out = root / name / split / cls
                out.mkdir(parents=True, exist_ok=True)
                files = sorted(os.listdir(source / split / cls))
                for f in files[: keep(c)] if split == "train" else files:
                    if not (out / f).is_symlink():
                        (out / f).symlink_to(source / split / cls / f)
        n = sum(len(os.listdir(root / name / "train" / cls)) for cls in classes)
        print(f"{root / name}: {n} training images")


def _features(run) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sela.eval.features import extract

    def feats(imageset):
        images = imageset.images if imageset.in_memory else imageset
        return extract(run.model, images, transform=run.transform, heads=False, progress=False).features

    return feats(run.train_set), run.train_set.targets, feats(run.test_set), run.test_set.targets


def _pixels(imageset) -> Tensor:
    x = imageset.images.flatten(1).float()  # (N, C H W)
    return torch.nn.functional.normalize(x - x.mean(0), dim=1)


def _scores(pred: np.ndarray, truth: np.ndarray, k: int) -> dict:
    sizes = np.bincount(pred, minlength=k)
    return {
        "nmi": round(float(normalized_mutual_info_score(truth, pred)), 4),
        "ari": round(float(adjusted_rand_score(truth, pred)), 4),
        "largest": round(float(sizes.max() * k / len(pred)), 2),
    }


def _export(features: Tensor, k: int, relax: float | None = None) -> np.ndarray:
    """``sela labels RUN --k K [--marginal relaxed --relax RHO]``'s clustering of the features."""
    from sela.clusters import OTKMeans

    return OTKMeans(n_clusters=k, relax=relax, seed=0).fit(features).labels_


def score(run_dir: str, ks: list[int], floors: dict) -> dict:
    from sela.eval.knn import knn_accuracy
    from sela.eval.linear import linear_probe
    from sela.runs import load_run

    run = load_run(run_dir)
    config = json.loads((Path(run_dir) / "config.json").read_text())
    data_dir = config.get("data", {}).get("data_dir") or config.get("data_dir")
    xtr, ytr, xte, yte = _features(run)
    truth = ytr.numpy()
    if data_dir not in floors:
        floors[data_dir] = knn_accuracy(_pixels(run.train_set), ytr, _pixels(run.test_set), yte)["top1"]
    out = {
        "run": run_dir,
        "split": Path(data_dir).name,
        "marginal": config.get("labels", {}).get("marginal", "uniform"),
        "relax": config.get("labels", {}).get("relax"),
        "epochs": json.loads((Path(run_dir) / "summary.json").read_text()).get("epochs"),
        "raw_knn": round(floors[data_dir], 2),
        "knn": round(knn_accuracy(xtr, ytr, xte, yte)["top1"], 2),
        "linear": round(linear_probe(xtr, ytr, xte, yte)["top1"], 2),
    }
    heads = [_scores(lab.numpy(), truth, k) for lab, k in zip(run.labels, run.model.n_clusters, strict=True)]
    out["labels_nmi_mean"] = round(float(np.mean([h["nmi"] for h in heads])), 4)
    out["labels_best"] = max(heads, key=lambda h: h["nmi"])
    z = torch.nn.functional.normalize(xtr, dim=1).numpy()
    for k in ks:
        km = KMeans(k, n_init=3, random_state=0).fit_predict(z)
        out[f"kmeans{k}"] = _scores(km, truth, k)
        out[f"sela{k}"] = _scores(_export(xtr, k), truth, k)
        out[f"sela{k}_relaxed"] = _scores(_export(xtr, k, relax=1.0), truth, k)
    return out


def _row(r: dict, ks: list[int]) -> str:
    cells = [
        r["split"],
        r["marginal"] + (f" {r['relax']:g}" if r["marginal"] == "relaxed" else ""),
        str(r["epochs"]),
    ]
    cells += [f"{r['raw_knn']:.2f}", f"{r['knn']:.2f} ({r['knn'] - r['raw_knn']:+.1f})", f"{r['linear']:.2f}"]
    cells.append(
        f"{r['labels_nmi_mean']:.3f} / {r['labels_best']['nmi']:.3f} ({r['labels_best']['largest']:.1f}x)"
    )
    for k in ks:
        km = r[f"kmeans{k}"]
        cells.append(f"{km['nmi']:.3f} / {km['ari']:.3f} ({km['largest']:.1f}x)")
        for key in (f"sela{k}", f"sela{k}_relaxed"):
            cells.append(f"{r[key]['nmi']:.3f} / {r[key]['ari']:.3f} ({r[key]['largest']:.1f}x)")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--root", default="/tmp/imb", type=Path)
    p.add_argument("--source", default="/tmp/data/cifar10", type=Path)
    p = sub.add_parser("score")
    p.add_argument("runs", nargs="+")
    p.add_argument("--k", nargs="+", type=int, default=[10, 128])
    args = parser.parse_args()
    if args.command == "make":
        make(args.root, args.source)
        return
    floors: dict = {}
    results = [score(r, args.k, floors) for r in args.runs]
    head = [
        "split",
        "marginal",
        "epochs",
        "raw-pixel kNN",
        "sela kNN (gain)",
        "linear",
        "own labels NMI mean / best",
    ]
    for k in args.k:
        head += [f"k-means K={k} NMI / ARI", f"sela --k {k}", f"sela --k {k} --marginal relaxed"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        print(_row(r, args.k))
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
