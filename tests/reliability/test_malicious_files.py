"""A pickle that runs code when it is loaded, in every place sela loads a file: nothing of it may run.

Each file is a real sela checkpoint (or a features file) with one extra object whose unpickling touches a
marker file (a harmless stand-in for ``os.system``). A loader that falls back to full unpickling
(``weights_only=False``) creates the marker; sela must refuse the file in one line instead.
"""

import pathlib
import shutil

import pytest
import torch
from cli_harness import TINY, call_sela, error_line

pytestmark = pytest.mark.usefixtures("one_thread")


class TouchOnLoad:
    """Unpickling this calls ``Path(marker).touch()``."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def poisoned_checkpoint(good: pathlib.Path, path: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    """``good`` (a sela checkpoint) with a code-running object added, written to ``path``."""
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    ckpt["notes"] = TouchOnLoad(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


# how each command is pointed at the poisoned file: (run dir, standalone file, tmp) -> argv
COMMANDS = {
    "eval-run-dir": lambda run, file, tmp: [
        "eval",
        run,
        "--device",
        "cpu",
        "--no-linear",
        "-o",
        tmp / "e.json",
    ],
    "eval-file": lambda run, file, tmp: [
        "eval",
        file,
        "--device",
        "cpu",
        "--no-linear",
        "-o",
        tmp / "e.json",
    ],
    "labels": lambda run, file, tmp: ["labels", run, "--device", "cpu", "-o", tmp / "labels.csv"],
    "show": lambda run, file, tmp: ["show", run, "--device", "cpu", "-o", tmp / "report"],
    "train-resume": lambda run, file, tmp: ["train", "--resume", "--out", run, *TINY],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_poisoned_checkpoint_runs_no_code(command, run_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    good = tmp_path / "good.pt"
    shutil.copy(run_copy / "checkpoint.pt", good)
    poisoned_checkpoint(good, run_copy / "checkpoint.pt", marker)
    file = poisoned_checkpoint(good, tmp_path / "downloaded" / "checkpoint.pt", marker)  # no run around it
    result = call_sela(COMMANDS[command](run_copy, file, tmp_path))
    assert not marker.exists(), f"sela {command} unpickled the file and ran its code: {result}"
    error_line(result)


def test_poisoned_features_file_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    features = tmp_path / "features.pt"
    torch.save({"features": torch.randn(50, 4), "notes": TouchOnLoad(marker)}, features)
    result = call_sela(["cluster", features, "--k", "2", "--epochs", "1"])
    assert not marker.exists(), f"sela cluster unpickled the file and ran its code: {result}"
    error_line(result)
    assert not (tmp_path / "labels.csv").exists()
