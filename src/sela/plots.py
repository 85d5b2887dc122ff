"""PNG figures of a run: training curves, cluster-size histograms and grids of cluster samples.

Matplotlib with the non-interactive Agg backend, so it works on machines without a display.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def plot_curves(metrics: list[dict], path: str | os.PathLike) -> None:
    """Loss, learning rate, throughput and label-step share per epoch (from metrics.jsonl rows)."""
    if not metrics:
        return
    epochs = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    panels = [
        ("loss", "cross-entropy (mean over heads)"),
        ("lr", "learning rate"),
        ("images_per_s", "images / s"),
        ("label_share", "label-step share of epoch time"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.plot(epochs, [m.get(key, np.nan) for m in metrics], marker="o", ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cluster_sizes(
    labels: Tensor,
    n_clusters: list[int],
    path: str | os.PathLike,
    *,
    histogram: bool = False,
    heads: list[int] | None = None,
) -> Path:
    """Each head's cluster sizes: bars sorted largest first against the equal share N / K.

    Training's ``cluster_sizes.png`` and the report's ``sizes.png`` show every head side by side;
    ``sela export`` writes one head per file with ``histogram=True``.

    Args:
        labels: (H, N) cluster of each image, one row per head.
        n_clusters: K of each head.
        histogram: also a histogram of the sizes right of each head's bars (then one row per head).
        heads: the heads' numbers in the titles (default 0 .. H-1), e.g. ``[3]`` for ``labels[3:4]``.
    """
    labels = torch.as_tensor(labels).long().cpu()
    h = len(n_clusters)
    names = list(range(h)) if heads is None else list(heads)
    rows, cols, size = (h, 2, (9, 3 * h)) if histogram else (1, h, (4 * h, 3))
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    for i, k in enumerate(n_clusters):
        sizes = torch.bincount(labels[i], minlength=k).numpy()  # (K,)
        bars = axes[i][0] if histogram else axes[0][i]
        empty = int((sizes == 0).sum())
        _size_bars(
            bars, sizes, title=f"head {names[i]}: {k} clusters, {int(sizes.sum())} images, {empty} empty"
        )
        if histogram:
            _size_histogram(axes[i][1], sizes)
        if histogram or i == 0:
            bars.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _size_bars(ax, sizes: np.ndarray, *, title: str) -> None:
    """(K,) cluster sizes as bars, largest first, with the equal share N / K dashed."""
    k = len(sizes)
    ax.bar(np.arange(k), np.sort(sizes)[::-1], width=1.0)
    ax.axhline(sizes.sum() / k, color="k", ls="--", lw=1, label="N / K")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("cluster (sorted by size)")
    ax.legend(fontsize=8)


def _size_histogram(ax, sizes: np.ndarray) -> None:
    """How many of the K clusters have each size, with the equal share N / K dashed."""
    k = len(sizes)
    ax.hist(sizes, bins=min(50, max(5, k // 2)))
    ax.axvline(sizes.sum() / k, color="k", ls="--", lw=1)
    ax.set_xlabel("cluster size (images)")
    ax.set_ylabel("clusters")


def cluster_grid(
    images: Tensor,
    labels: Tensor,
    clusters: list[int],
    path: str | os.PathLike,
    *,
    per_cluster: int = 10,
    titles: list[str] | None = None,
    seed: int = 0,
) -> None:
    """A grid: one row per cluster in ``clusters``, ``per_cluster`` random member images each.

    Args:
        images: uint8 (N, C, H, W).
        labels: (N,) cluster of each image.
        clusters: which clusters to show, top to bottom.
        titles: one row label per cluster (default "cluster k (n)").
    """
    gen = torch.Generator().manual_seed(seed)
    rows = len(clusters)
    fig, axes = plt.subplots(rows, per_cluster, figsize=(per_cluster * 0.9, rows * 0.95), squeeze=False)
    for r, k in enumerate(clusters):
        members = (labels == k).nonzero().flatten()
        pick = members[torch.randperm(len(members), generator=gen)[:per_cluster]]
        for c in range(per_cluster):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(pick):
                img = images[pick[c]].permute(1, 2, 0).numpy()
                ax.imshow(
                    img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", interpolation="nearest"
                )
        label = titles[r] if titles else f"cluster {k} ({len(members)})"
        axes[r][0].text(-0.1, 0.5, label, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.18, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_k_scan(
    ks: list[int], signals: dict[str, list[float]], best: int, path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Label-free signals against K (``sela labels --k-scan``): one line per signal, the recommended K
    marked.

    Args:
        ks: the K scanned, in order.
        signals: name -> one value per K (e.g. stability, silhouette, their product; any scale near 0..1).
        best: the recommended K (a dashed vertical line).
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, values in signals.items():
        ax.plot(ks, values, marker="o", ms=4, label=name)
    ax.axvline(best, color="k", ls="--", lw=1, label=f"recommended K = {best}")
    ax.set_xscale("log" if max(ks) / min(ks) > 20 else "linear")
    ax.set_xticks(ks, [str(k) for k in ks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("K (clusters)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
