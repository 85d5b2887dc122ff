"""Tests for sela.export: labelling images, feature files, clustering."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import make_blobs
from sklearn.metrics import normalized_mutual_info_score

from sela.export import (
    assign_labels,
    cluster_features,
    confidences,
    list_images,
    load_features,
    load_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_argmax_and_balanced_assignment():
    torch.manual_seed(0)
    logits = [torch.randn(200, 4) + torch.tensor([3.0, 0, 0, 0]), torch.randn(200, 5)]
    argmax = assign_labels(logits)
    assert torch.equal(argmax[0], logits[0].argmax(1))
    assert torch.bincount(argmax[0], minlength=4)[0] > 150  # skewed
    balanced = assign_labels(logits, balanced=True, lam=25)
    for row, k in zip(balanced, (4, 5), strict=True):
        sizes = torch.bincount(row, minlength=k)
        assert sizes.min() >= 200 / k - 3 and sizes.max() <= 200 / k + 3
    with pytest.raises(ValueError, match="only 3; drop --balanced"):
        assign_labels([torch.randn(3, 4)], balanced=True)
    conf = confidences(logits)
    assert conf.shape == (2, 200) and bool(((conf > 0.2) & (conf <= 1)).all())


def _write_images(folder, n, size=10):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 2, 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.png"
        )


def test_list_and_load_images(tmp_path):
    _write_images(tmp_path / "imgs" / "sub", 3)
    _write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    found = list_images(tmp_path / "imgs")
    assert [p.split("imgs/")[1] for p in found] == [
        "00.png",
        "01.png",
        "sub/00.png",
        "sub/01.png",
        "sub/02.png",
    ]
    (tmp_path / "list.txt").write_text(
        f"# two images\nimgs/00.png\n\n{tmp_path / 'imgs' / 'sub' / '02.png'}\n"
    )
    listed = list_images(tmp_path / "list.txt")
    assert listed == [str(tmp_path / "imgs" / "00.png"), str(tmp_path / "imgs" / "sub" / "02.png")]
    x = load_images(listed, 8)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.uint8
    assert load_images(listed, 8, channels=1).shape == (2, 1, 8, 8)
    (tmp_path / "bad.txt").write_text("imgs/missing.png\n")
    with pytest.raises(ValueError, match="could not read 1 image"):
        load_images(list_images(tmp_path / "bad.txt"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images under"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="--images"):
        list_images(tmp_path / "nowhere")


def test_load_features_formats_and_errors(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float64)
    np.save(tmp_path / "f.npy", x)
    torch.save(torch.from_numpy(x), tmp_path / "f.pt")
    for name in ("f.npy", "f.pt"):
        loaded = load_features(tmp_path / name)
        assert loaded.dtype == torch.float32 and torch.allclose(loaded, torch.from_numpy(x).float())
    cases = {
        "empty.npy": (np.zeros((0, 3)), "is empty"),
        "flat.npy": (np.zeros(5), "must be \\(N, D\\)"),
        "cube.npy": (np.zeros((2, 2, 2)), "must be \\(N, D\\)"),
        "dict.pt": ({"features": torch.zeros(2, 2)}, "holds a dict"),
        "text.npy": (np.array([["a", "b"]]), "real numbers"),
        "nan.npy": (np.array([[np.nan, 1.0], [0.0, 1.0]]), "NaN or inf"),
        "bool.pt": (torch.ones(2, 2, dtype=torch.bool), "real numbers"),
    }
    for name, (value, message) in cases.items():
        if name.endswith(".npy"):
            np.save(tmp_path / name, value)
        else:
            torch.save(value, tmp_path / name)
        with pytest.raises(ValueError, match=message):
            load_features(tmp_path / name)
    (tmp_path / "zero.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        load_features(tmp_path / "zero.npy")
    (tmp_path / "f.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=".npy or .pt"):
        load_features(tmp_path / "f.csv")


def test_cluster_features_recovers_blobs():
    x, y = make_blobs(400, n_features=6, centers=4, cluster_std=1.0, random_state=0)
    labels, conf, best = cluster_features(torch.from_numpy(x).float(), n_clusters=4, n_heads=2, epochs=15)
    assert labels.shape == (2, 400) and conf.shape == (2, 400) and best in (0, 1)
    for row in labels:
        assert normalized_mutual_info_score(y, row.numpy()) > 0.95
    with pytest.raises(ValueError, match="exceeds the 400 rows"):
        cluster_features(torch.zeros(400, 2), n_clusters=500)
