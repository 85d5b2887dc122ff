"""Tests for sela.plots: the PNG figures of a run."""

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from sela.plots import plot_cluster_sizes


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_cluster_sizes draws, kept open for the test to read."""
    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", drawn.append)
    yield drawn
    for fig in drawn:
        close(fig)


def test_every_head_side_by_side(tmp_path, figures):
    labels = torch.stack([torch.arange(60) % 3, torch.zeros(60, dtype=torch.long)])  # (2, 60)
    path = plot_cluster_sizes(labels, [3, 4], tmp_path / "sizes.png")
    assert path == tmp_path / "sizes.png" and Image.open(path).size == (800, 300)
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == [
        "head 0: 3 clusters, 60 images, 0 empty",
        "head 1: 4 clusters, 60 images, 3 empty",
    ]
    heights = [[p.get_height() for p in ax.patches] for ax in axes]
    assert heights == [[20, 20, 20], [60, 0, 0, 0]]  # sorted largest first
    assert axes[1].lines[0].get_ydata()[0] == 15  # N / K


def test_one_head_with_its_histogram(tmp_path, figures):
    labels = torch.randint(0, 9, (1, 100))
    path = plot_cluster_sizes(labels, [10], tmp_path / "h.png", histogram=True, heads=[3])
    assert path.is_file() and Image.open(path).size == (900, 300)
    bars, hist = figures[0].axes
    assert bars.get_title() == "head 3: 10 clusters, 100 images, 1 empty"
    assert hist.get_xlabel() == "cluster size (images)"
    assert sum(p.get_height() for p in hist.patches) == 10  # every cluster counted once
