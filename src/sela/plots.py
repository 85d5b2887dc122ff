"""PNG figures of a run: training curves, cluster-size histograms and grids of cluster samples.

Matplotlib with the non-interactive Agg backend, so it works on machines without a display.
"""

from __future__ import annotations

import os

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


def plot_cluster_sizes(labels: Tensor, n_clusters: list[int], path: str | os.PathLike) -> None:
    """One bar chart per head of the cluster sizes, sorted largest first, against the equal share."""
    h = len(n_clusters)
    fig, axes = plt.subplots(1, h, figsize=(4 * h, 3), squeeze=False)
    for i, (ax, k) in enumerate(zip(axes[0], n_clusters, strict=True)):
        sizes = torch.bincount(labels[i], minlength=k).sort(descending=True).values.numpy()
        ax.bar(np.arange(k), sizes, width=1.0)
        ax.axhline(labels.shape[1] / k, color="k", ls="--", lw=1, label="N / K")
        ax.set_title(f"head {i}: {k} clusters", fontsize=10)
        ax.set_xlabel("cluster (sorted by size)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
