"""sela's OT k-means (``sela labels RUN --k N``) against scikit-learn's KMeans on the same features.

Both see the same rows: L2-normalised (``unit``) or centred, then L2-normalised (``centred``, what
``sela labels --k`` clusters); KMeans with ``n_init=10``.
Feature sets:
  * ``blobs``: ``make_blobs`` with equal-sized classes (N = 3000, D = 16, 10 centres, ``cluster_std`` 4.5:
    overlapping, KMeans does not reach NMI 1), over three data seeds;
  * ``blobs50``: 50 equal-sized centres in 32-d (N = 5000, ``cluster_std`` 6);
  * ``unequal``: 10 centres of 400, 300, 200, 150, 100, 80, 60, 40, 40, 30 samples in 16-d (``cluster_std``
    3.5), over two data seeds: where equal sizes are wrong and ``--relax`` (the relaxed marginal) is for;
  * ``digits``: scikit-learn's 8x8 digits as 64-d pixel vectors (1,797 images, 10 classes);
  * ``<run>``: for each RUN_DIR given, the pooled backbone features of its training images (its dataset
    must have ground truth), cut to ``--max-n`` rows.
For each temperature T (``--temps``; the plan depends on lam / T, lam = 25) and number of restarts
(``--n-init``), and for each rho of the relaxed marginal (``--relax``, at the first T and number of
restarts) it prints NMI against the ground truth as mean over ``--seeds`` seeds, the fit time, and
KMeans's NMI; a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/ot_kmeans.py [RUN_DIR ...] [--seeds 3] [--temps 0.05,0.1,0.5]

Measured runs: docs/experiments.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits, make_blobs
from sklearn.metrics import normalized_mutual_info_score as nmi
from sklearn.preprocessing import normalize

from sela.clusters import OTKMeans

UNEQUAL = [400, 300, 200, 150, 100, 80, 60, 40, 40, 30]


def run_features(source: str, max_n: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) pooled backbone features and (N,) classes of a run's training images (first ``max_n``)."""
    from sela.export import train_features
    from sela.runs import load_run

    run = load_run(source, test_split=False)
    if run.train_set.targets is None:
        raise SystemExit(f"{source}: its dataset has no ground truth to score against")
    feats = train_features(run, progress=False).numpy()
    keep = np.random.default_rng(0).permutation(len(feats))[:max_n]
    return feats[keep], run.train_set.targets.numpy()[keep]


def feature_sets(runs: list[str], max_n: int) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """name -> [(X, y), ...] (several data draws for the synthetic sets)."""
    sets = {
        "blobs": [
            make_blobs(3000, n_features=16, centers=10, cluster_std=4.5, random_state=s) for s in range(3)
        ],
        "blobs50": [make_blobs(5000, n_features=32, centers=50, cluster_std=6.0, random_state=0)],
        "unequal": [make_blobs(UNEQUAL, n_features=16, cluster_std=3.5, random_state=s) for s in range(2)],
        "digits": [load_digits(return_X_y=True)],
    }
    for source in runs:
        sets[source] = [run_features(source, max_n)]
    return sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--temps", default="0.02,0.05,0.1,0.2,0.5,1.0")
    p.add_argument("--n-init", default="1,4,10")
    p.add_argument("--max-n", type=int, default=10_000)
    p.add_argument("--prep", default="unit,centred", help="feature preparations: unit, centred")
    p.add_argument("--relax", default="", help="rho of the relaxed marginal to try, e.g. 0.1,1,10")
    args = p.parse_args()
    torch.set_num_threads(1)
    temps = [float(t) for t in args.temps.split(",")]
    restarts = [int(n) for n in args.n_init.split(",")]
    relaxes = [float(r) for r in args.relax.split(",") if r]
    print(
        "| features | prep | K | method | NMI (mean over seeds and draws) | min | largest / (N/K) | fit s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, draws in feature_sets(args.runs, args.max_n).items():
        for prep in args.prep.split(","):
            compare(name, prep, draws, temps, restarts, args.seeds, relaxes)


def prepare(x: np.ndarray, prep: str) -> np.ndarray:
    """The rows both methods see: L2-normalised (``unit``), or centred first (``centred``)."""
    x = x.astype(np.float32)
    return normalize(x - x.mean(0) if prep == "centred" else x)


def compare(
    name: str,
    prep: str,
    draws: list,
    temps: list[float],
    restarts: list[int],
    seeds: int,
    relaxes: list[float],
) -> None:
    """Print one table row per method on ``draws`` [(X, y), ...] prepared by ``prep``."""
    k = len(np.unique(draws[0][1]))
    rows = {("KMeans(n_init=10)", None, None, None): []}
    rows.update({(f"OT T={t:g} n_init={n}", t, n, None): [] for t in temps for n in restarts})
    rows.update(
        {
            (f"OT T={temps[0]:g} n_init={restarts[0]} relax={r:g}", temps[0], restarts[0], r): []
            for r in relaxes
        }
    )
    for x, y in draws:
        xn = prepare(x, prep)
        for seed in range(seeds):
            for (_, t, n, rho), scores in rows.items():
                start = time.perf_counter()
                if t is None:
                    pred = KMeans(k, n_init=10, random_state=seed).fit(xn).labels_
                else:
                    fit = OTKMeans(k, temperature=t, n_init=n, relax=rho, center=False, seed=seed).fit(xn)
                    pred = fit.labels_
                share = np.bincount(pred, minlength=k).max() / (len(pred) / k)
                scores.append((nmi(y, pred), time.perf_counter() - start, share))
    for (label, *_), scores in rows.items():
        s = np.array(scores)
        print(
            f"| {name} | {prep} | {k} | {label} | {s[:, 0].mean():.4f} | {s[:, 0].min():.4f} | "
            f"{s[:, 2].max():.2f} | {s[:, 1].mean():.2f} |"
        )


if __name__ == "__main__":
    main()
