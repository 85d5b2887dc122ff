"""The builder: settings resolved once, the CLI and Python giving the same run, old runs still working."""

import json

import pytest

from sela.build import resolve, train, user_settings
from sela.cli import main
from sela.config import upgrade

TINY = {"optim.epochs": 1, "labels.updates": 2, "model.heads": 2, "model.clusters": [10],
        "model.widths": [8, 16], "runtime.progress": False, "runtime.device": "cpu"}  # fmt: skip
TINY_FLAGS = ["--epochs", "1", "--label-updates", "2", "--heads", "2", "--clusters", "10", "--set",
              "model.widths=[8,16]", "--no-progress", "--device", "cpu"]  # fmt: skip


def _record(run) -> tuple[dict, dict]:
    config = json.loads((run / "config.json").read_text())
    config.pop("_command")
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    timing = ("time_s", "label_time_s", "label_share", "images_per_s", "label_peak_mb", "label_buffers_mb")
    return config, {k: v for k, v in metrics.items() if k not in timing}


@pytest.mark.filterwarnings("ignore:the run")  # one epoch: the verdict may well be "learned little"
def test_the_cli_and_python_give_the_same_run(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "cli"), *TINY_FLAGS]) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = train({**TINY, "runtime.out": str(tmp_path / "py")}, log=None)
    # the run ends with the verdict of its label-free signals (summary.json's "signals" and "verdict")
    verdict = [line for line in printed if line.startswith("verdict: ")]
    assert verdict == [summary["verdict"]] and printed.index(verdict[0]) == len(printed) - 1
    assert "view neighbours" in verdict[0] and "effective rank" in verdict[0] and "heads agree" in verdict[0]
    assert {"rankme", "head_nmi", "view_knn_overlap", "raw_view_knn_overlap"} <= set(summary["signals"])
    cli, py = _record(tmp_path / "cli"), _record(tmp_path / "py")
    cli[0]["runtime"].pop("out"), py[0]["runtime"].pop("out")
    assert cli == py
    assert summary == json.loads((tmp_path / "py" / "summary.json").read_text())
    assert (tmp_path / "cli" / "labels.csv").read_bytes() == (tmp_path / "py" / "labels.csv").read_bytes()


def test_precedence_defaults_recipe_toml_flags_set(tmp_path):
    from sela.data import load_dataset

    toml = tmp_path / "run.toml"
    toml.write_text("[optim]\nepochs = 7\nlr = 0.5\n[model]\nheads = 3\n")
    user = user_settings({"optim.lr": 0.2, "model.heads": 5}, toml=toml, overrides=["model.heads=6"])
    resolved = resolve(
        user, load_dataset("digits", split="train", image_size=16), device=__import__("torch").device("cpu")
    )
    cfg = resolved.config
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.model.heads) == (7, 0.2, 6)  # toml < flags < --set
    assert cfg.recipe == "digits" and cfg.labels.inputs == "train"  # the dataset's own recipe
    assert cfg.data.image_size == 16 and cfg.eval.size == 16  # the numbers the data decided, recorded
    assert "model.heads=6 (recipe: 4)" in resolved.recipe_line()


@pytest.mark.filterwarnings("ignore")
def test_an_old_flat_run_directory_still_resumes_and_evaluates(tmp_path, capsys):
    """A run written before the sections existed: config.json and the checkpoint's config in flat keys."""
    import torch

    from sela import rundir
    from sela.config import LEGACY_KEYS, flatten
    from sela.runs import load_run

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY_FLAGS, "--epochs", "2"]) == 0
    legacy = {v: k for k, v in LEGACY_KEYS.items()}
    nested = json.loads((out / "config.json").read_text())
    flat = {
        legacy.get(k, k): v
        for k, v in flatten({k: v for k, v in nested.items() if not k.startswith("_")}).items()
    }
    flat = {k: v for k, v in flat.items() if not k.startswith("augment.") or k in legacy.values()}
    flat["augment"] = {k.split(".")[1]: v for k, v in flatten(nested).items() if k.startswith("augment.")
                       and f"augment.{k.split('.')[1]}" not in legacy}  # fmt: skip
    assert upgrade(flat)["model"] == nested["model"]
    (out / "config.json").write_text(json.dumps({**flat, "_command": ["sela"]}))
    ckpt = torch.load(out / rundir.CHECKPOINT, weights_only=True)
    ckpt["config"] = flat
    torch.save(ckpt, out / rundir.CHECKPOINT)
    run = load_run(out)
    assert run.arch == "convnet" and run.image_size == 16 and run.labels.shape == (2, len(run.train_set))
    assert main(["eval", str(out), "--no-linear", "--device", "cpu"]) == 0
    # a resume with the same settings continues; another architecture is refused in one line
    assert main(["train", "--out", str(out), *TINY_FLAGS, "--epochs", "2", "--resume"]) == 0
    assert main(["train", "--out", str(out), *TINY_FLAGS, "--epochs", "3", "--resume"]) == 2
    assert "optim.epochs: 2 -> 3" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore")
def test_the_run_directory_lists_the_images_it_left_out(tmp_path, capsys):
    """The skip-and-warn policy: a count and names on the console, the full list in RUN/skipped.txt."""
    from PIL import Image

    for split, n in (("train", 40), ("test", 10)):
        for c in range(2):
            (tmp_path / "data" / split / str(c)).mkdir(parents=True)
            for i in range(n // 2):
                Image.new("RGB", (12, 12), (255 * c, 20 * (i % 5), 90)).save(
                    tmp_path / "data" / split / str(c) / f"{i}.png"
                )
    (tmp_path / "data" / "train" / "0" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "run"
    args = ["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--heads", "1", "--batch-size", "16"]
    assert main(["train", "--out", str(out), "--epochs", "1", "--no-progress", "--device", "cpu", *args]) == 0
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    assert "broken.png" in capsys.readouterr().err
    clean = tmp_path / "clean"
    (tmp_path / "data" / "train" / "0" / "broken.png").unlink()
    assert (
        main(["train", "--out", str(clean), "--epochs", "1", "--no-progress", "--device", "cpu", *args]) == 0
    )
    assert not (clean / "skipped.txt").exists()
