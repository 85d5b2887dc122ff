"""The suite's set maker (benchmarks/suite_sets.py) and report (benchmarks/suite.py) on a tiny fake folder."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import suite  # noqa: E402
import suite_sets  # noqa: E402
from suite_sets import SetSpec  # noqa: E402

CLASSES = ["a", "b", "c"]
N_TRAIN = (12, 10, 8)  # per class
N_TEST = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """data/fake/{train,test}/{a,b,c}/NNNN.png: 12 x 12 RGB noise, classes of 12, 10, 8 training images."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, counts in (("train", N_TRAIN), ("test", (N_TEST,) * 3)):
        for name, n in zip(CLASSES, counts, strict=True):
            (root / "fake" / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "fake" / split / name / f"{i:04d}.png")
    return root


def _names(folder: Path) -> dict[str, list[str]]:
    return {c.name: sorted(p.name for p in c.iterdir()) for c in sorted(folder.iterdir())}


def test_keep_counts_balanced_longtail_proportional():
    assert suite_sets.keep_counts([50, 40], SetSpec("x", "s", "k", per_class=20)) == [20, 20]
    tail = SetSpec("x", "s", "k", per_class=1000, longtail=True)
    assert suite_sets.keep_counts([5000] * 10, tail) == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]
    prop = suite_sets.keep_counts([5923, 6742, 5958], SetSpec("x", "s", "k", total=1000))
    assert sum(prop) == 1000 and prop == [318, 362, 320]  # 318.05, 362.03, 319.93: the largest remainder +1
    assert suite_sets.keep_counts([3, 4], SetSpec("x", "s", "k")) == [3, 4]
    with pytest.raises(ValueError, match="class 1 has 4 images, 5 asked"):
        suite_sets.keep_counts([9, 4], SetSpec("x", "s", "k", per_class=5))


def test_choose_is_seeded_and_sorted():
    files = {"a": [Path(f"{i:02d}") for i in range(20)], "b": [Path(f"{i:02d}") for i in range(20)]}
    first = suite_sets.choose(files, [5, 3], seed=0)
    assert first == suite_sets.choose(files, [5, 3], seed=0)
    assert first != suite_sets.choose(files, [5, 3], seed=1)
    assert [len(v) for v in first.values()] == [5, 3]
    assert all(v == sorted(v) for v in first.values())


def test_make_set_subset_copies_bytes_and_is_reused(source, tmp_path):
    spec = SetSpec("fake-6", "fake", "objects", per_class=6)
    folder, record = suite_sets.make_set(spec, source, tmp_path)
    assert record["n_train"] == 18 and record["n_test"] == 12 and record["side"] == 12
    assert record["colour"] == "colour" and record["counts"]["train"] == {"a": 6, "b": 6, "c": 6}
    chosen = _names(folder / "train")
    src = source / "fake" / "train" / "a" / chosen["a"][0]
    assert (folder / "train" / "a" / chosen["a"][0]).read_bytes() == src.read_bytes()
    assert _names(folder / "test") == _names(source / "fake" / "test")  # the whole test split
    stamp = (folder / suite_sets.SPEC_FILE).stat().st_mtime_ns
    assert suite_sets.make_set(spec, source, tmp_path)[1] == record
    assert (folder / suite_sets.SPEC_FILE).stat().st_mtime_ns == stamp  # reused, not made again
    again = tmp_path / "again"
    assert _names(suite_sets.make_set(spec, source, again)[0] / "train") == chosen  # deterministic


def test_make_set_grey_resized_longtail(source, tmp_path):
    spec = SetSpec("fake-grey", "fake", "objects", per_class=8, longtail=True, grey=True, side=6)
    folder, record = suite_sets.make_set(spec, source, tmp_path)
    assert record["counts"]["train"] == {"a": 8, "b": 7, "c": 6}  # round(8 x (1 - 0.1 c))
    assert record["counts"]["test"] == {"a": N_TEST, "b": N_TEST, "c": N_TEST}  # balanced
    assert record["side"] == 6 and record["colour"] == "grey"
    with Image.open(next((folder / "test" / "b").iterdir())) as img:
        assert img.mode == "L" and img.size == (6, 6) and img.format == "PNG"
    # a changed specification makes the set again
    wider = SetSpec("fake-grey", "fake", "objects", per_class=8, longtail=True, grey=True, side=8)
    assert suite_sets.make_set(wider, source, tmp_path)[1]["side"] == 8
    assert not list(tmp_path.glob(".*tmp*"))


def test_select_names_sets():
    assert [s.name for s in suite_sets.select(["imagewoof64", "mnist-10k"])] == ["mnist-10k", "imagewoof64"]
    with pytest.raises(ValueError, match="unknown set"):
        suite_sets.select(["nope"])


def test_report_rows_margin_check_and_correlations(tmp_path):
    rows = [
        suite.table_row({"set": f"s{i}", "kind": "objects", "n_train": 10, "side": 8, "colour": "grey",
                         "floors": {"raw": 40.0, "random": 42.0 + i}, "knn_top1": 44.0 + 2 * i,
                         "signals": {"rankme": float(i), "label_agreement": 5.0 - i, "note": "x"},
                         "verdict": {"status": "learning"} if i else "fine|ok"})
        for i in range(4)
    ]  # fmt: skip
    assert [r["margin"] for r in rows] == [2.0, 3.0, 4.0, 5.0]
    assert [r["passes"] for r in rows] == [False, True, True, True]
    corr = suite.correlations(rows)
    assert set(corr) == {"label_agreement", "rankme"}
    assert corr["rankme"]["knn_top1"]["rho"] == pytest.approx(1.0)
    assert corr["label_agreement"]["margin"]["rho"] == pytest.approx(-1.0)
    meta = {"minutes": 1, "extra_args": "", "parallel": 2, "threads": 1, "command": "sela train",
            "load_start": [0], "load_end": [0]}  # fmt: skip
    text = suite.markdown(rows, meta, corr)
    assert "| s0 | objects | 10 | 8 | - | grey | 40.00 | 42.00 | 44.00 | +2.00 | FAIL |" in text
    assert "| rankme | +1.000 |" in text
    assert text.count(' | {"status":"learning"} |') == 3 and " | fine/ok |" in text  # a cell holds no "|"


def test_collect_reads_summary_and_recipe_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    summary = {"knn_top1": 50.5, "nmi": 0.3, "epochs": 7, "best_head": 1, "label_share": 0.1,
               "heads": [{"head": 0}, {"head": 1, "k": 20, "self_labels": {"nmi": 0.4},
                          "sizes": {"min": 2, "max": 9, "n_empty": 0, "normalized_entropy": 0.97}}]}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    log = tmp_path / "run.log"
    log.write_text("warming up\nrecipe cpu-fast (CPU...): objective=swapped\nepoch 1/7\n")
    (run / "config.json").write_text(json.dumps({"_data": {"side": 48}}))
    row = suite.collect(run, log)
    assert row["train_side"] == 48  # the side the budget chose
    assert row["recipe_line"].startswith("recipe cpu-fast")
    assert row["self_label_nmi"] == 0.4 and row["balance"] == 0.97 and row["epochs"] == 7
    assert "signals" not in row
    missing = suite.collect(tmp_path / "none", log)
    assert "epoch 1/7" in missing["error"]


def test_ensure_source_extracts_a_missing_folder(source, tmp_path):
    import tarfile

    archives = tmp_path / "shared"
    archives.mkdir()
    with tarfile.open(archives / suite_sets.ARCHIVES["mnist"], "w:gz") as tar:
        tar.add(source / "fake", arcname="mnist")  # the MNIST archive holds mnist/{train,test}
    data = tmp_path / "data"
    folder = suite_sets.ensure_source("mnist", data, archives)
    assert folder == data / "mnist" and _names(folder / "test") == _names(source / "fake" / "test")
    with pytest.raises(ValueError, match="is missing and so is"):
        suite_sets.ensure_source("cifar10", data, archives)
