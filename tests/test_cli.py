"""The command line: version, help, `sela train` on the embedded default, one-line errors for bad input."""

import json

import pytest

from sela import __version__
from sela.cli import main

TINY = [
    "--epochs",
    "1",
    "--label-updates",
    "2",
    "--heads",
    "2",
    "--clusters",
    "10",
    "--set",
    "widths=[8,16]",
    "--no-progress",
]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    assert "convnet" in capsys.readouterr().out.split()


def test_train_tiny_run_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    for name in (
        "config.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "labels.csv",
        "summary.json",
        "curves.png",
        "clusters.png",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "digits" and config["widths"] == [8, 16] and "_command" in config
    summary = json.loads((out / "summary.json").read_text())
    assert {"knn_top1", "nmi", "ari", "accuracy", "heads"} <= set(summary)
    assert "knn_top1" in capsys.readouterr().out
    # a second run into the same directory is refused; --resume of a finished run trains nothing more
    assert main(["train", "--out", str(out), *TINY]) == 2
    assert main(["train", "--out", str(out), "--resume", *TINY]) == 0


def test_eval_every_gives_the_final_evaluations_knn_during_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--eval-every", "1"]) == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(0 <= m["knn_top1"] <= 100 and "monitor_time_s" in m for m in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert metrics[-1]["knn_top1"] == pytest.approx(summary["knn_top1"])  # one definition
    assert "kNN top-1" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:the swapped objective")
def test_train_crop_size_and_small_crops(tmp_path, monkeypatch):
    from sela.data import BatchAugment

    sides = set()
    forward = BatchAugment.forward
    monkeypatch.setattr(
        BatchAugment,
        "forward",
        lambda self, x, **kw: sides.add((out := forward(self, x, **kw)).shape[-1]) or out,
    )
    out = tmp_path / "run"
    extra = ["--objective", "swapped", "--crop-size", "12", "--small-crops", "2"]
    assert main(["train", "--out", str(out), *TINY, *extra]) == 0
    assert sides == {12, 6}  # training views at --crop-size, small views at half of it; images are 16 px
    config = json.loads((out / "config.json").read_text())
    assert config["crop_size"] == 12 and config["small_crops"] == 2 and config["image_size"] == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "vgg99"], "unknown architecture"),
        (["--clusters", "5000"], "clusters"),
        (["--clusters", "10,20,30"], "--clusters lists 3 values"),
        (["--dataset", "folder", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--dataset", "imagenet22k"], "unknown dataset"),
        (["--resume"], "no checkpoint.pt"),
        (["--device", "tpu"], "--device"),
        (["--set", "epochs=two"], "integer"),
        (["--config", "/nonexistent.toml"], "does not exist"),
        (["--crop-size", "0"], "crop_size must be a positive number of px"),
        (["--set", "swap_queue=8"], "needs the swapped objective"),
        (["--time-limit", "0"], "time limit must be > 0 minutes"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_run(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sela: error:") and message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_train_time_limit_replans_the_epochs(tmp_path, capsys):
    # a budget of 6 ms: the first epoch spends it, so the first plan of 5 epochs ends after it
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--epochs", "5", "--time-limit", "0.0001"]) == 0
    assert "0.0001 min (about 5 epochs, re-planned each epoch)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["time_limit"] == 0.0001
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
