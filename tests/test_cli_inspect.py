"""End-to-end tests of `sela eval`, `sela labels`, `sela show` and `sela cluster` on a tiny trained run."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import make_blobs
from sklearn.metrics import normalized_mutual_info_score

from sela.cli import main
from sela.data import load_dataset
from sela.rundir import read_labels_csv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """One epoch of SeLa on digits (2 heads x 10 clusters, a narrow convnet): seconds on a CPU."""
    out = tmp_path_factory.mktemp("inspect") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    args = ["train", "--epochs", "1", "--label-updates", "2", "--heads", "2", "--clusters", "10"]
    args += ["--device", "cpu", "--no-progress", "--out", str(out), "--set", "widths=[16,32]"]
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(n)
    return out


def _error(capsys, argv) -> str:
    """Run the CLI, expect exit code 2 and one line `sela: error: ...`; return that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sela: error: "), err
    return err[0]


def test_eval_writes_eval_json_and_prints_the_table(run_dir, capsys):
    assert main(["eval", str(run_dir), "--knn-k", "50", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run_dir / "eval.json").read_text())
    for key in ("knn_top1", "knn_top5", "linear_top1", "nmi", "ami", "ari", "accuracy", "heads", "best_head"):
        assert key in result, key
    assert result["arch"] == "convnet" and result["image_size"] == 16 and result["knn_k"] == 50
    assert len(result["heads"]) == 2
    for head in result["heads"]:
        assert {"train", "test", "self_labels", "sizes", "label_agreement"} <= set(head)
    best = result["best_head"]
    assert result["heads"][best]["train"]["nmi"] == max(h["train"]["nmi"] for h in result["heads"])
    assert result["knn_top1"] > 30  # ten classes: well above chance after one epoch
    assert "kNN (k=50" in out and "linear probe" in out and "self-labels" in out and "wrote" in out


def test_eval_of_a_released_style_checkpoint(run_dir, tmp_path, capsys):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state = {"module." + k.replace("heads.", "top_layer"): v for k, v in ckpt["model"].items()}
    torch.save({"state_dict": state, "labels": ckpt["labels"]}, tmp_path / "release.pth")
    assert "--arch" in _error(capsys, ["eval", str(tmp_path / "release.pth")])
    argv = ["eval", str(tmp_path / "release.pth"), "--arch", "convnet", "--dataset", "digits", "--no-linear"]
    assert main([*argv, "--layer", "block1", "-o", str(tmp_path / "e.json"), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["layer"] == "block1" and "linear_top1" not in result and "self_labels" in result["heads"][0]


def test_eval_bad_input_gives_one_line_errors(run_dir, tmp_path, capsys):
    assert "--head 7 does not exist" in _error(capsys, ["eval", str(run_dir), "--head", "7", "--no-linear"])
    assert "not a layer of convnet" in _error(capsys, ["eval", str(run_dir), "--layer", "fc9"])
    assert "does not exist" in _error(capsys, ["eval", str(tmp_path / "nothing")])
    assert "holds no checkpoint.pt" in _error(capsys, ["eval", str(tmp_path)])
    assert "--knn-k" in _error(capsys, ["eval", str(run_dir), "--knn-k", "0"])
    assert "drop --arch" in _error(capsys, ["eval", str(run_dir), "--arch", "resnet18"])


def test_labels_export_round_trip(run_dir, tmp_path, capsys):
    out = tmp_path / "export" / "labels.csv"
    assert main(["labels", str(run_dir), "-o", str(out), "--device", "cpu"]) == 0
    table = read_labels_csv(out)
    stored = torch.load(run_dir / "checkpoint.pt", weights_only=True)["labels"]
    assert torch.equal(table.labels, stored)
    assert table.ids == [str(i) for i in range(stored.shape[1])] and table.id_column == "index"
    assert table.confidence.shape == stored.shape
    assert bool(((table.confidence >= 0.1 - 1e-4) & (table.confidence <= 1)).all())  # max of 10 classes
    assert (tmp_path / "export" / "labels_sizes_head0.png").is_file()
    assert (tmp_path / "export" / "labels_sizes_head1.png").is_file()
    assert "1437 training images" in capsys.readouterr().out


def test_labels_of_new_images(run_dir, tmp_path, capsys):
    test = load_dataset("digits", split="test")
    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(30):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    assert main(["labels", str(run_dir), "--images", str(folder), "-o", str(tmp_path / "a.csv")]) == 0
    argmax = read_labels_csv(tmp_path / "a.csv")
    assert argmax.id_column == "path" and argmax.ids[0].endswith("00.png") and argmax.labels.shape == (2, 30)
    argv = ["labels", str(run_dir), "--images", str(folder), "--balanced", "-o", str(tmp_path / "b.csv")]
    assert main(argv) == 0
    balanced = read_labels_csv(tmp_path / "b.csv")
    # 30 images, 10 clusters of ~3: the plan is balanced to tol, its row-wise argmax only roughly
    sizes = torch.bincount(balanced.labels[0], minlength=10)
    assert sizes.max() <= 6 and (sizes > 0).sum() >= 7
    assert (tmp_path / "b_sizes_head1.png").is_file()
    # the same images through the model directly (the dataset's own 8 -> 16 px resize) agree
    (folder / "list.txt").write_text("\n".join(f"{i:02d}.png" for i in range(3)))
    assert (
        main(["labels", str(run_dir), "--images", str(folder / "list.txt"), "-o", str(tmp_path / "c.csv")])
        == 0
    )
    assert torch.equal(read_labels_csv(tmp_path / "c.csv").labels, argmax.labels[:, :3])


def test_labels_bad_input(run_dir, tmp_path, capsys):
    assert "add --images" in _error(capsys, ["labels", str(run_dir), "--balanced"])
    assert "does not exist" in _error(capsys, ["labels", str(run_dir), "--images", str(tmp_path / "no")])
    (tmp_path / "few").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "few" / "a.png")
    argv = [
        "labels",
        str(run_dir),
        "--images",
        str(tmp_path / "few"),
        "--balanced",
        "-o",
        str(tmp_path / "x.csv"),
    ]
    assert "drop --balanced" in _error(capsys, argv)


def _links_resolve(folder) -> int:
    """Every href / src in the report's pages names an existing file; returns how many there are."""
    links = [
        link.split("#")[0]
        for page in folder.glob("*.html")
        for link in re.findall(r'(?:href|src)="([^"]+)"', page.read_text())
    ]
    missing = [link for link in links if not (folder / link).is_file()]
    assert not missing, missing
    return len(links)


def test_show_writes_a_browsable_report(run_dir, tmp_path, capsys):
    assert (
        main(["show", str(run_dir), "-o", str(tmp_path / "report"), "--per-page", "4", "--device", "cpu"])
        == 0
    )
    report = tmp_path / "report"
    for name in ("index.html", "sizes.png", "top_clusters.png", "page_001.html"):
        assert (report / name).is_file()
    assert _links_resolve(report) > 10
    best = json.loads((run_dir / "summary.json").read_text())["best_head"]
    assert f"head {best}" in capsys.readouterr().out
    assert "--head 5 does not exist" in _error(
        capsys, ["show", str(run_dir), "--head", "5", "-o", str(report)]
    )


def test_cluster_recovers_blobs_and_rejects_bad_files(tmp_path, capsys):
    x, y = make_blobs(300, n_features=5, centers=3, cluster_std=0.8, random_state=1)
    np.save(tmp_path / "emb.npy", x.astype(np.float32))
    argv = ["cluster", str(tmp_path / "emb.npy"), "--k", "3", "--heads", "2", "--epochs", "10"]
    assert main([*argv, "-o", str(tmp_path / "c.csv")]) == 0
    table = read_labels_csv(tmp_path / "c.csv")
    assert table.labels.shape == (2, 300) and table.confidence is not None
    assert normalized_mutual_info_score(y, table.labels[0].numpy()) > 0.95
    printed = capsys.readouterr().out
    assert "best head" in printed and re.search(
        r"head 1: K = 3, sizes 100 / 100 / 100 .* mean confidence", printed
    )
    np.save(tmp_path / "empty.npy", np.zeros((0, 5), np.float32))
    np.save(tmp_path / "cube.npy", np.zeros((4, 5, 2), np.float32))
    assert "is empty" in _error(capsys, ["cluster", str(tmp_path / "empty.npy")])
    assert "must be (N, D)" in _error(capsys, ["cluster", str(tmp_path / "cube.npy")])
    assert "exceeds the 300 rows" in _error(capsys, ["cluster", str(tmp_path / "emb.npy"), "--k", "301"])
    assert "--k >= 2" in _error(capsys, ["cluster", str(tmp_path / "emb.npy"), "--k", "1"])


def test_labels_k_clusters_the_embedding_and_lays_it_out(run_dir, tmp_path, capsys):
    out, into = tmp_path / "k.csv", tmp_path / "groups"
    assert (
        main(["labels", str(run_dir), "--k", "10", "-o", str(out), "--into", str(into), "--seed", "1"]) == 0
    )
    printed = capsys.readouterr().out
    table = read_labels_csv(out)
    assert (
        table.labels.shape == (1, 1437) and table.id_column == "index" and table.confidence.shape == (1, 1437)
    )
    sizes = torch.bincount(table.labels[0], minlength=10)
    assert sizes.min() >= 140 and sizes.max() <= 148  # equal shares of 143.7
    assert "1437 training images clustered into 10 (equal sizes)" in printed
    assert re.search(r"k-means: K = 10, sizes 14\d / 14\d / 14\d .* 0 empty", printed)
    # the digits have no files: PNGs, one folder per cluster, the most confident first
    assert "10 cluster folders" in printed and "PNGs" in printed
    members = sorted((into / "000").glob("*.png"))
    assert len(members) == int(sizes[0]) and (into / "000" / "_contact_sheet.jpg").is_file()
    assert (into / "index.html").is_file() and (into / "top_clusters.png").is_file()
    assert (tmp_path / "k_sizes_head0.png").is_file()


def test_labels_print_the_balance_of_every_head(run_dir, tmp_path, capsys):
    assert main(["labels", str(run_dir), "-o", str(tmp_path / "l.csv")]) == 0
    printed = capsys.readouterr().out
    for h in (0, 1):
        assert re.search(
            rf"head {h}: K = 10, sizes \d+ / [\d.]+ / \d+ \(min / median / max\), largest", printed
        )


def test_labels_k_scan_prints_a_table_and_a_recommendation(run_dir, tmp_path, capsys):
    argv = ["labels", str(run_dir), "--k-scan", "5,10", "-o", str(tmp_path / "scan.png")]
    assert main([*argv, "--batch-size", "512"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["K", "stability"])
    assert [lines[header + 1].split()[0], lines[header + 2].split()[0]] == ["5", "10"]
    assert re.match(r"recommended K = (5|10): the highest silhouette x stability", lines[header + 3])
    assert (tmp_path / "scan.png").is_file()
    assert (tmp_path / "scan.csv").read_text().startswith("k,stability,silhouette,largest,smallest,cost")


def test_labels_into_links_or_copies_new_images(run_dir, tmp_path, capsys):
    test = load_dataset("digits", split="test")
    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(30):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    argv = ["labels", str(run_dir), "--images", str(folder), "-o", str(tmp_path / "n.csv")]
    assert main([*argv, "--k", "3", "--into", str(tmp_path / "linked")]) == 0
    linked = [p for p in (tmp_path / "linked").glob("*/*.png")]
    assert len(linked) == 30 and all(p.is_symlink() for p in linked)
    assert main([*argv, "--into", str(tmp_path / "copied"), "--copy", "--head", "1"]) == 0
    printed = capsys.readouterr().out
    copied = list((tmp_path / "copied").glob("*/*.png"))
    assert len(copied) == 30 and not any(p.is_symlink() for p in copied) and "(head 1, copies)" in printed
    by_csv = read_labels_csv(tmp_path / "n.csv")
    row = by_csv.ids.index(str(folder / "07.png"))
    assert (tmp_path / "copied" / f"{int(by_csv.labels[1, row]):03d}" / "07_07.png").is_file()


def test_labels_refuse_a_folder_sela_did_not_write(run_dir, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"not mine to overwrite")
    argv = [
        "labels",
        str(run_dir),
        "--k",
        "4",
        "--into",
        str(tmp_path / "mine"),
        "-o",
        str(tmp_path / "r.csv"),
    ]
    assert "is not empty and sela did not write it" in _error(capsys, argv)
    assert not (tmp_path / "r.csv").exists()  # refused before any work
    assert "--copy applies to --into" in _error(capsys, ["labels", str(run_dir), "--copy"])
    assert "run it first" in _error(capsys, ["labels", str(run_dir), "--k", "3", "--k-scan", "2,3"])
    assert "--k-scan takes K like" in _error(capsys, ["labels", str(run_dir), "--k-scan", "many"])
    assert "--head 5 does not exist" in _error(
        capsys,
        ["labels", str(run_dir), "--into", str(tmp_path / "h"), "--head", "5", "-o", str(tmp_path / "h.csv")],
    )


def test_labels_k_with_the_relaxed_marginal(run_dir, tmp_path, capsys):
    argv = ["labels", str(run_dir), "--k", "6", "--marginal", "relaxed", "-o", str(tmp_path / "r.csv")]
    assert main([*argv, "--relax", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "clustered into 6 (relaxed sizes, rho 0.5)" in printed and "k-means: K = 6" in printed
    assert read_labels_csv(tmp_path / "r.csv").labels.shape == (1, 1437)
    assert "--marginal and --relax apply" in _error(capsys, ["labels", str(run_dir), "--relax", "2"])
