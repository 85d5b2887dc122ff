"""Hostile and careless input to every command: one ``sela: error:`` line, exit code 2, no traceback, and
nothing left behind (no run directory, no half-written output, an existing run untouched)."""

import re

import numpy as np
import pytest
import torch
from cli_harness import TINY, call_sela, error_line, leftover_tmp, run_sela

pytestmark = pytest.mark.usefixtures("one_thread")

# train flags: (flags after TINY, a pattern the message must match: it names what to change)
BAD_TRAIN_FLAGS = {
    "batch-size-0": (["--batch-size", "0"], r"batch.size"),
    "batch-size-negative": (["--batch-size", "-8"], r"batch.size"),
    "lam-0": (["--lam", "0"], r"\blam"),
    "lam-negative": (["--lam", "-1"], r"\blam"),
    "lam-nan": (["--lam", "nan"], r"\blam"),
    "lam-inf": (["--lam", "inf"], r"\blam"),
    "lr-nan": (["--lr", "nan"], r"\blr\b|learning rate"),
    "epochs-0": (["--epochs", "0"], r"epochs"),
    "epochs-negative": (["--epochs", "-1"], r"epochs"),
    "data-dir-empty": (["--dataset", "folder", "--data-dir", ""], r"data.dir|data directory|folder"),
    "image-size-0": (["--image-size", "0"], r"image.size"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_FLAGS))
def test_bad_train_flag_is_one_line_and_leaves_no_run(case, tmp_path, monkeypatch):
    flags, names_the_fix = BAD_TRAIN_FLAGS[case]
    (tmp_path / "cwd" / "stray").mkdir(parents=True)  # an empty --data-dir must not scan the current dir
    monkeypatch.chdir(tmp_path / "cwd")
    out = tmp_path / "run"
    line = error_line(call_sela(["train", "--out", out, *TINY, *flags]))
    assert re.search(names_the_fix, line, re.IGNORECASE), line
    assert "last good checkpoint" not in line  # there is none: the input is refused before training
    assert not out.exists(), f"{case} left a run directory: {sorted(p.name for p in out.iterdir())}"


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero_bytes(path):
    path.write_bytes(b"")


def _foreign_state_dict(path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)


@pytest.mark.parametrize(
    "damage", [_truncated, _zero_bytes, _foreign_state_dict], ids=lambda f: f.__name__[1:]
)
def test_resume_from_a_bad_checkpoint_is_one_line_and_touches_nothing(
    damage, run_copy, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    damage(run_copy / "checkpoint.pt")
    before = _snapshot(run_copy)
    line = error_line(call_sela(["train", "--resume", "--out", run_copy, *TINY]))
    assert "checkpoint" in line, line
    assert _snapshot(run_copy) == before and not leftover_tmp(run_copy)


def test_eval_of_a_zero_byte_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty" / "checkpoint.pt"
    empty.parent.mkdir()
    empty.touch()
    line = error_line(call_sela(["eval", empty, "--device", "cpu", "--no-linear"]))
    assert str(empty) in line or "checkpoint.pt" in line, line
    assert not (tmp_path / "eval.json").exists() and not (empty.parent / "eval.json").exists()


def test_cluster_of_a_pickle_that_is_not_an_array(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"a": 1}, tmp_path / "features.pt")
    line = error_line(call_sela(["cluster", "features.pt", "--k", "2", "--epochs", "1"]))
    assert "features.pt" in line, line
    assert not (tmp_path / "labels.csv").exists()


def test_cluster_of_an_npy_whose_header_claims_3_tb(tmp_path):
    # a valid .npy header for (10**12, 3) float32 (12 TB... of which 3 TB would already be fatal) and 64 bytes
    # of data; run in a subprocess so that an attempt to allocate it cannot take the test process down
    path = tmp_path / "huge.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3)}
        )
        f.write(b"\0" * 64)
    line = error_line(run_sela(["cluster", path, "--k", "2", "--epochs", "1"], cwd=tmp_path))
    assert "huge.npy" in line, line
    assert not (tmp_path / "labels.csv").exists()


def test_output_that_is_an_existing_directory(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    np.save(tmp_path / "features.npy", np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32))
    for argv in (
        ["labels", trained_run, "--device", "cpu", "-o", taken],
        ["cluster", tmp_path / "features.npy", "--k", "2", "--epochs", "1", "-o", taken],
    ):
        line = error_line(call_sela(argv))
        assert "taken" in line, line
        assert not any(taken.iterdir()), f"{argv[0]} wrote into {taken}"
