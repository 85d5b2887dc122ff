"""Tests for sela.export: labelling images, feature files, clustering."""

import os

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


def _layout_inputs(tmp_path, n=24, k=3):
    """n image files in two folders (with repeated names), their (N,) labels and confidences."""
    _write_images(tmp_path / "imgs" / "a", n // 2)
    _write_images(tmp_path / "imgs" / "b", n - n // 2)
    paths = list_images(tmp_path / "imgs")
    labels = torch.arange(n) % k
    conf = torch.linspace(0.2, 0.9, n)
    return paths, labels, conf


def test_cluster_folders_link_or_copy_the_files_with_contact_sheets(tmp_path):
    from sela.data.reader import walk_images
    from sela.report import SHEET_NAME, write_cluster_folders

    paths, labels, conf = _layout_inputs(tmp_path)
    out = tmp_path / "imgs" / "clusters"  # inside the image folder: the reader must not list it
    layout = write_cluster_folders(out, labels, 3, confidence=conf, paths=paths, per_sheet=5, cell=16)
    assert layout.mode == "links" and layout.folders == 3 and layout.index == out / "index.html"
    members = sorted(p.name for p in (out / "001").iterdir() if p.name != SHEET_NAME)
    assert len(members) == 8 and members[0].startswith("01_") and members[0].endswith(".png")
    link = out / "001" / members[0]
    assert link.is_symlink() and os.path.samefile(link, paths[1])  # row 1: cluster 1
    sheet = Image.open(out / "001" / SHEET_NAME)
    assert sheet.size == (5 * 16 + 4 * 2, 16)  # 5 most confident, one row
    assert (out / "top_clusters.png").is_file() and "001/" in (out / "index.html").read_text()
    assert sorted(walk_images(str(tmp_path / "imgs")).paths) == sorted(paths)  # not the links a second time
    # sela's own layout is replaced: old members go, a file the user added stays
    (out / "002" / "mine.txt").write_text("keep")
    write_cluster_folders(out, torch.zeros(24, dtype=torch.long), 2, confidence=conf, paths=paths, copy=True)
    assert len([p for p in (out / "000").iterdir() if p.name != SHEET_NAME]) == 24
    assert not (out / "001").exists() and (out / "002" / "mine.txt").read_text() == "keep"
    copied = next(p for p in (out / "000").iterdir() if p.name != SHEET_NAME)
    assert not copied.is_symlink() and copied.stat().st_size > 0


def test_cluster_folders_of_images_without_files_and_a_foreign_folder(tmp_path):
    from sela.data import ImageSet
    from sela.report import check_layout_dir, write_cluster_folders

    images = ImageSet(images=torch.randint(0, 255, (12, 1, 8, 8), dtype=torch.uint8))
    labels, conf = torch.arange(12) % 4, torch.rand(12)
    layout = write_cluster_folders(tmp_path / "out", labels, 4, confidence=conf, images=images)
    assert layout.mode == "PNGs"
    png = Image.open(tmp_path / "out" / "003" / "03.png")
    assert png.size == (8, 8) and np.array_equal(np.asarray(png), images.images[3, 0].numpy())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my file")
    for target in (tmp_path / "mine", tmp_path / "mine" / "notes.txt"):
        with pytest.raises(ValueError, match="--into"):
            write_cluster_folders(target, labels, 4, confidence=conf, images=images)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my file"
    assert check_layout_dir(tmp_path / "out") == tmp_path / "out"  # sela's own: may be rewritten


def test_labels_request_rules(tmp_path):
    from sela.export import check_labels_request

    assert check_labels_request() == ([], None)
    assert check_labels_request(k_scan="2-4") == ([2, 3, 4], None)
    cases = {
        "add --images": {"balanced": True},
        "already": {"balanced": True, "images": "x", "k": 5},
        "run it first": {"k": 5, "k_scan": "2,3"},
        "drop --k-scan": {"k_scan": "2,3", "into": str(tmp_path / "o")},
        "add --into": {"copy": True},
        "--head picks": {"head": 1, "k": 4, "into": str(tmp_path / "o")},
        "apply to --k": {"marginal": "relaxed"},
        "drop --marginal uniform": {"k": 4, "marginal": "uniform", "relax": 1.0},
        "--k must be 2": {"k": 1},
    }
    for message, request in cases.items():
        with pytest.raises(ValueError, match=message):
            check_labels_request(**request)
