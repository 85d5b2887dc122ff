"""SelfLabeller (balanced self-labelling of fixed features) against scikit-learn's KMeans with the same K.

Feature sets:
  * ``digits-pixels``: scikit-learn's 8x8 digits as raw 64-d pixel vectors (all 1,797 images, 10 classes);
  * ``<run>``: for each RUN_DIR given, the pooled backbone features of its training images
    (``sela train`` run directory or checkpoint; its dataset must have ground truth).
Scores against the ground truth: NMI, ARI and Hungarian accuracy (percent), the balance of the
clusters (size entropy / log K, 1 = equal sizes) and the fit time, as mean +- std over seeds.

    OMP_NUM_THREADS=1 python benchmarks/cluster_vs_kmeans.py [RUN_DIR ...] [--seeds 3] [--k K]

It prints a Markdown table, one row per feature set and method. Measured runs: docs/experiments.md.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from sela.eval.metrics import cluster_metrics, cluster_sizes
from sela.labeller import SelfLabeller


def run_features(source: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) pooled backbone features and (N,) classes of a run's training images."""
    from sela.eval.features import extract
    from sela.runs import load_run

    run = load_run(source, test_split=False)
    if run.train_set.targets is None:
        raise SystemExit(f"{source}: its dataset has no ground truth to score against")
    images = run.train_set.images if run.train_set.in_memory else run.train_set
    feats = extract(run.model, images, transform=run.transform, heads=False, progress=False).features
    return feats.numpy(), run.train_set.targets.numpy()


def score(pred: np.ndarray, truth: np.ndarray, k: int) -> dict[str, float]:
    m = cluster_metrics(pred, truth, n_clusters=k)
    return {
        "nmi": m["nmi"],
        "ari": m["ari"],
        "acc": m["accuracy"],
        "balance": cluster_sizes(pred, k)["normalized_entropy"],
    }


def compare(name: str, x: np.ndarray, y: np.ndarray, k: int, seeds: list[int]) -> list[str]:
    methods = {
        "SelfLabeller": lambda s: SelfLabeller(k, seed=s).fit(x).labels_,
        "KMeans": lambda s: KMeans(k, n_init=10, random_state=s).fit(x).labels_,
    }
    rows = []
    for method, fit in methods.items():
        results = []
        for s in seeds:
            start = time.perf_counter()
            pred = np.asarray(fit(s), dtype=np.int64)
            results.append({**score(pred, y, k), "time_s": time.perf_counter() - start})
        cells = []
        columns = (("nmi", ".3f"), ("ari", ".3f"), ("acc", ".1f"), ("balance", ".3f"), ("time_s", ".2f"))
        for key, fmt in columns:
            v = np.array([r[key] for r in results])
            cells.append(f"{v.mean():{fmt}} ± {v.std():{fmt}}")
        rows.append(f"| {name} ({x.shape[0]}x{x.shape[1]}, K={k}) | {method} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", help="sela run directories whose training features to cluster")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (3)")
    parser.add_argument("--k", type=int, help="clusters (default: the number of classes)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seeds = list(range(args.seeds))

    digits = load_digits()
    sets = [("digits-pixels", digits.data.astype(np.float32), digits.target)]
    sets += [(f"run {os.path.basename(os.path.normpath(r))}", *run_features(r)) for r in args.runs]
    print("| features | method | NMI | ARI | accuracy % | balance | time s |")
    print("|---|---|---|---|---|---|---|")
    for name, x, y in sets:
        k = args.k or int(y.max()) + 1
        for row in compare(name, x, y, k, seeds):
            print(row, flush=True)


if __name__ == "__main__":
    main()
