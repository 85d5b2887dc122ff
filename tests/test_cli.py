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
    "model.widths=[8,16]",
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
    assert config["data"]["dataset"] == "digits" and config["model"]["widths"] == [8, 16]
    assert config["data"]["image_size"] == 16 and "_command" in config  # the dataset's default, recorded
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
        lambda self, x, *a, **kw: sides.add((out := forward(self, x, *a, **kw)).shape[-1]) or out,
    )
    out = tmp_path / "run"
    extra = ["--objective", "swapped", "--crop-size", "12", "--small-crops", "2"]
    assert main(["train", "--out", str(out), *TINY, *extra]) == 0
    assert sides == {12, 6}  # training views at --crop-size, small views at half of it; images are 16 px
    config = json.loads((out / "config.json").read_text())
    assert (config["augment"]["crop_size"], config["augment"]["small_crops"]) == (12, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "vgg99"], "unknown architecture"),
        (["--clusters", "5000"], "clusters"),
        (["--clusters", "10,20,30"], "clusters lists 3 values for 4 heads"),
        (["--dataset", "folder", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--dataset", "imagenet22k"], "unknown dataset"),
        (["--resume"], "no checkpoint.pt"),
        (["--device", "tpu"], "--device"),
        (["--set", "epochs=two"], "integer"),
        (["--config", "/nonexistent.toml"], "does not exist"),
        (["--crop-size", "0"], "--crop-size must be >= 1"),
        (["--set", "swap_queue=8"], "swapped.queue needs the swapped objective"),
        (["--set", "swapped.epsilon=0.1"], "needs the swapped objective"),
        (["--time-limit", "0"], "--time-limit must be a positive number"),
        (["--epochs", "two"], "must be an integer"),
        (["--label-inputs", "test"], "--label-inputs must be one of"),
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
    assert json.loads((out / "config.json").read_text())["optim"]["time_limit"] == 0.0001
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["train", "--help"], ["eval", "--help"],
                                  ["labels", "--help"], ["show", "--help"], ["cluster", "--help"]])  # fmt: skip
def test_help_and_version_import_no_torch(argv):
    """The light CLI: help and version need neither torch nor matplotlib nor scikit-learn."""
    import subprocess
    import sys

    code = (
        f"import sys\nfrom sela.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'matplotlib', 'sklearn', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_the_inspection_flags_defaults_are_the_components():
    from test_config import component_default

    from sela.cli import INSPECT_DEFAULTS

    for name, (value, path) in INSPECT_DEFAULTS.items():
        assert value == component_default(path), name


def test_train_help_lists_every_flag_of_the_schema(capsys):
    from sela.config import OPTIONS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert all(o.flag in text for o in OPTIONS if o.flag)
