"""Colour as a nuisance: does a folder that mixes colour and greyscale photos of the same kinds cluster by colour?

    python benchmarks/mixed_colour.py make [--out /tmp/mixed] [--per-class 1000] [--grey 0.3]
        a folder of CIFAR-10 JPEGs (/tmp/data/cifar10; ``per-class`` training images of each class, the whole
        test split), ``grey`` of each class's files saved in greyscale (mode L) at random; the list of grey
        files is ROOT/grey.txt.
    OMP_NUM_THREADS=1 python benchmarks/mixed_colour.py score RUN_DIR [RUN_DIR ...]
        for each ``sela train --dataset folder --data-dir ROOT`` run: how much its clusters follow colour
        rather than content: the NMI of every head's labels with the grey/colour flag (0: independent) next
        to their NMI with the classes, the largest grey share of any cluster of at least 10 images, and the
        share of the grey images that sit in clusters of >= 80 % grey images ("gathered"); the same for the
        ten clusters ``sela labels RUN --k 10`` exports; sela's kNN.

A cluster "gathers the greyscale ones" when it holds mostly grey images while they are 30 % of the folder.
Measured runs: docs/experiments.md, "Colour as a nuisance".
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import normalized_mutual_info_score


def make(out: Path, source: Path, per_class: int, grey: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    grey_files = []
    for split in ("train", "test"):
        for cls in sorted(p.name for p in (source / split).iterdir()):
            files = sorted((source / split / cls).iterdir())
            files = files[:per_class] if split == "train" else files
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                target = out / split / cls / f.name
                with Image.open(f) as img:
                    if rng.random() < grey:
                        img.convert("L").save(target, quality=95)
                        grey_files.append(str(target))
                    else:
                        img.convert("RGB").save(target, quality=95)
    (out / "grey.txt").write_text("\n".join(grey_files) + "\n")
    print(f"{out}: {len(grey_files)} grey files listed in {out / 'grey.txt'}")


def score(run_dir: str) -> dict:
    from sela.runs import load_run

    run = load_run(run_dir, test_split=False)
    config = json.loads((Path(run_dir) / "config.json").read_text())
    root = Path(config.get("data", {}).get("data_dir") or config.get("data_dir"))
    grey_list = set((root / "grey.txt").read_text().split())
    is_grey = np.array([str(Path(p)) in grey_list for p in run.train_set.paths], dtype=int)  # (N,)
    truth = run.train_set.targets.numpy()
    out = {"run": run_dir, "grey_share": round(float(is_grey.mean()), 3)}
    rows = []
    for lab in run.labels.numpy():
        counts = np.bincount(lab, minlength=lab.max() + 1)
        grey_counts = np.bincount(lab, weights=is_grey, minlength=lab.max() + 1)
        big = counts >= 10
        share = np.where(big, grey_counts / np.maximum(counts, 1), 0.0)
        gathered = float(grey_counts[share >= 0.8].sum() / max(is_grey.sum(), 1))
        rows.append({
            "nmi_grey": normalized_mutual_info_score(is_grey, lab),
            "nmi_class": normalized_mutual_info_score(truth, lab),
            "max_grey_share": float(share.max()),
            "gathered": gathered,
        })  # fmt: skip
    for key in rows[0]:
        out[key] = round(float(np.mean([r[key] for r in rows])), 4)
    out["worst_head_max_grey_share"] = round(max(r["max_grey_share"] for r in rows), 3)
    from sela.clusters import OTKMeans
    from sela.eval.features import extract

    images = run.train_set.images if run.train_set.in_memory else run.train_set
    feats = extract(run.model, images, transform=run.transform, heads=False, progress=False).features
    k10 = OTKMeans(n_clusters=10, seed=0).fit(feats).labels_  # `sela labels RUN --k 10`
    counts, grey_counts = np.bincount(k10, minlength=10), np.bincount(k10, weights=is_grey, minlength=10)
    out["k10_nmi_grey"] = round(float(normalized_mutual_info_score(is_grey, k10)), 4)
    out["k10_nmi_class"] = round(float(normalized_mutual_info_score(truth, k10)), 4)
    out["k10_max_grey_share"] = round(float((grey_counts / np.maximum(counts, 1)).max()), 3)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    out["knn"] = summary.get("knn_top1")
    out["epochs"] = summary.get("epochs")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--out", type=Path, default=Path("/tmp/mixed"))
    p.add_argument("--source", type=Path, default=Path("/tmp/data/cifar10"))
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--grey", type=float, default=0.3)
    p = sub.add_parser("score")
    p.add_argument("runs", nargs="+")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out, args.source, args.per_class, args.grey)
        return
    print(
        "| run | epochs | kNN | NMI(labels, grey flag) | NMI(labels, class) | max grey share | grey gathered "
        "| --k 10: NMI grey / class, max grey share |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in map(score, args.runs):
        print(
            f"| {r['run']} | {r['epochs']} | {r['knn']:.2f} | {r['nmi_grey']:.3f} | {r['nmi_class']:.3f} | "
            f"{r['max_grey_share']:.2f} (worst head {r['worst_head_max_grey_share']:.2f}) | {r['gathered']:.1%} | "
            f"{r['k10_nmi_grey']:.3f} / {r['k10_nmi_class']:.3f}, {r['k10_max_grey_share']:.2f} |"
        )


if __name__ == "__main__":
    main()
