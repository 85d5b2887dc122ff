"""Labels stay with their files (issue 30, cases 1, 15 and 16): a run records its training file list
(files.json); when the folder changes afterwards, every command that maps labels to files realigns them by
path and says so, ``--resume`` refuses in one line naming the change, and the commands that need no training
images (export, embed, labels --images) run without the training folder."""

import csv
import shutil

import numpy as np
import pytest
from cli_harness import call_sela, error_line
from PIL import Image

from sela.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TR = ["--epochs", "1", "--image-size", "16", "--heads", "1", "--clusters", "10", "--batch-size", "64"]
TR += ["--no-progress", "--device", "cpu", "--precision", "fp32"]


def digit_folder(folder, n=120, start=0):
    """``n`` digit PNGs (8 px, grey) in a flat folder, named by their index in the digits set."""
    folder.mkdir(parents=True, exist_ok=True)
    images = load_dataset("digits", split="train").images[start : start + n, 0].numpy()
    for i, image in enumerate(images, start):
        Image.fromarray(image).save(folder / f"d{i:04d}.png")
    return folder


def read_labels(path):
    with open(path, newline="") as f:
        return {row["path"]: int(row["head0"]) for row in csv.DictReader(f)}


@pytest.fixture
def folder_run(tmp_path, monkeypatch):
    """A run trained on a flat folder of 120 digit PNGs: (run dir, folder)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SELA_CACHE", str(tmp_path / "cache"))
    images, run = digit_folder(tmp_path / "images"), tmp_path / "run"
    result = call_sela(["train", "--dataset", "folder", "--data-dir", images, "--out", run, *TR])
    assert result.code == 0, str(result)
    return run, images


def _change(images):
    """Case 1: one image removed, another added (the same N)."""
    (images / "d0005.png").unlink()
    digit_folder(images, n=1, start=500)
    return str(images / "d0005.png"), str(images / "d0500.png")


def test_labels_realign_by_path_after_the_folder_changed(folder_run, tmp_path):
    run, images = folder_run
    trained = read_labels(run / "labels.csv")
    removed, added = _change(images)
    result = call_sela(["labels", run, "-o", tmp_path / "now.csv", "--device", "cpu"])
    assert result.code == 0, str(result)
    notes = [line for line in result.err.splitlines() if "changed since the run" in line]
    assert len(notes) == 1 and "1 added" in notes[0] and "1 removed" in notes[0], result.err
    now = read_labels(tmp_path / "now.csv")
    assert set(now) == set(trained) - {removed} | {added}
    assert all(now[p] == trained[p] for p in now if p != added), "a surviving file lost its label"
    assert 0 <= now[added] < 10


def test_show_and_eval_use_the_realigned_labels(folder_run, tmp_path):
    run, images = folder_run
    _change(images)
    for argv in (
        ["show", run, "-o", tmp_path / "report"],
        ["eval", run, "--no-linear", "-o", tmp_path / "e.json"],
    ):
        result = call_sela([*argv, "--device", "cpu"])
        assert result.code == 0, str(result)
        assert "realigned by path" in result.err, result.err


def test_resume_on_a_changed_folder_is_refused_in_one_line(folder_run):
    run, images = folder_run
    before = (run / "checkpoint.pt").read_bytes()
    (images / "d0007.png").unlink()  # case 15: the file removed "as told"
    line = error_line(
        call_sela(["train", "--resume", "--dataset", "folder", "--data-dir", images, "--out", run, *TR])
    )
    assert "1 removed" in line and "d0007.png" in line, line
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_on_another_folder_with_the_same_n_is_refused(folder_run, tmp_path):
    run, _ = folder_run
    other = digit_folder(tmp_path / "other", start=300)  # 120 other images: same N, other files
    line = error_line(
        call_sela(["train", "--resume", "--dataset", "folder", "--data-dir", other, "--out", run, *TR])
    )
    assert "changed" in line and "120 added" in line, line


def test_resume_on_the_same_files_moved_elsewhere_continues_with_a_note(folder_run, tmp_path):
    run, images = folder_run
    moved = shutil.copytree(images, tmp_path / "moved", copy_function=shutil.copy2)
    result = call_sela(["train", "--resume", "--dataset", "folder", "--data-dir", moved, "--out", run, *TR])
    assert result.code == 0, str(result)
    assert "data.data_dir" in result.out, result.out


def test_a_run_without_a_file_list_still_resumes_and_evaluates(folder_run, tmp_path):
    run, images = folder_run
    (run / "files.json").unlink()  # a run written before files.json
    result = call_sela(["labels", run, "-o", tmp_path / "old.csv", "--device", "cpu"])
    assert result.code == 0 and result.err.count("records no file list") == 1, str(result)
    result = call_sela(["train", "--resume", "--dataset", "folder", "--data-dir", images, "--out", run, *TR])
    assert result.code == 0 and "records no file list" in result.out, str(result)


def test_export_embed_and_label_new_images_without_the_training_folder(folder_run, tmp_path):
    run, images = folder_run
    new = digit_folder(tmp_path / "new", n=5, start=900)
    shutil.rmtree(images)  # case 16: another machine, without the training folder
    for argv in (
        ["export", run, "-o", tmp_path / "w.pt"],
        ["embed", run, new, "-o", tmp_path / "e.npy"],
        ["labels", run, "--images", new, "-o", tmp_path / "new.csv"],
    ):
        result = call_sela([*argv, "--device", "cpu"])
        assert result.code == 0, f"{argv[0]}: {result}"
    line = error_line(call_sela(["labels", run, "-o", tmp_path / "x.csv", "--device", "cpu"]))
    assert "--data-dir" in line and "root=" not in line, line


def test_digits_runs_keep_their_labels_by_index(trained_run, tmp_path):
    result = call_sela(["labels", trained_run, "-o", tmp_path / "l.csv", "--device", "cpu"])
    assert result.code == 0 and "realigned" not in result.err and "file list" not in result.err, str(result)
    rows = np.loadtxt(tmp_path / "l.csv", delimiter=",", skiprows=1, usecols=1, dtype=int)
    trained = np.loadtxt(trained_run / "labels.csv", delimiter=",", skiprows=1, usecols=1, dtype=int)
    assert (rows == trained).all()
