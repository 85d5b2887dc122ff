"""The metric loggers: TensorBoard's event files and the MLflow store read back equal metrics.jsonl; the
``--log`` option; a missing package is one line naming the pip command."""

import json

import pytest

from sela import loggers
from sela.build import train
from sela.cli import main
from sela.config import flatten

pytest.importorskip("tensorboard")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"optim.epochs": 2, "labels.updates": 2, "model.heads": 2, "model.clusters": [10],
        "model.widths": [8, 16], "runtime.progress": False, "runtime.device": "cpu"}  # fmt: skip
TINY_FLAGS = ["--epochs", "1", "--label-updates", "2", "--heads", "2", "--clusters", "10", "--set",
              "model.widths=[8,16]", "--no-progress", "--device", "cpu"]  # fmt: skip


def _events(log_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _lines(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _per_step_losses_average_to_the_lines(steps: list[tuple[int, float]], lines: list[dict]) -> None:
    per_epoch = len(steps) // len(lines)
    assert [s for s, _ in steps] == list(range(len(lines) * per_epoch))
    for e, line in enumerate(lines):
        losses = [v for _, v in steps[e * per_epoch : (e + 1) * per_epoch]]
        assert sum(losses) / per_epoch == pytest.approx(line["loss"], rel=1e-6)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A 2-epoch run with both loggers and the kNN monitor every epoch."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path_factory.mktemp("logged") / "run"
    settings = {**TINY, "runtime.out": str(out), "runtime.log": ["tensorboard", "mlflow"], "eval.every": 1}
    train(settings, log=None)
    yield out
    mp.undo()


def test_tensorboard_events_equal_metrics_jsonl(logged_run):
    events, lines = _events(logged_run / loggers.TENSORBOARD_DIR), _lines(logged_run)
    assert "knn_top1" in lines[0] and "nmi" in lines[0]
    for line in lines:
        for tag, value in loggers.epoch_scalars(line).items():
            assert (line["epoch"], pytest.approx(value, rel=1e-6)) in events[tag], tag  # float32 in the file
    assert dict(events["clusters/smallest"])[2] == min(h["min"] for h in lines[1]["heads"])
    assert {"eval/knn_top1", "eval/nmi", "clusters/empty", "time/label_share"} <= set(events)
    _per_step_losses_average_to_the_lines(events["train/loss"], lines)
    assert events["train/lr"][-1][1] == pytest.approx(lines[-1]["lr"], rel=1e-6)


def test_the_mlflow_store_holds_the_config_and_the_same_metrics(logged_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=loggers.mlflow_uri(logged_run))
    (run,) = client.search_runs([client.get_experiment_by_name(loggers.MLFLOW_EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    config = json.loads((logged_run / "config.json").read_text())
    recorded = {k: str(v) for k, v in flatten(config).items() if not k.startswith("_")}
    assert run.data.params == recorded
    lines = _lines(logged_run)
    for tag, value in loggers.epoch_scalars(lines[0]).items():
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)]
        assert history == [(line["epoch"], loggers.epoch_scalars(line)[tag]) for line in lines], tag
        assert history[0][1] == value
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    _per_step_losses_average_to_the_lines(sorted((m.step, m.value) for m in losses), lines)


def test_auto_is_tensorboard_when_installed(monkeypatch):
    assert loggers.chosen(["auto"]) == ["tensorboard"] and loggers.chosen(["none"]) == []
    assert loggers.chosen(["auto", "tensorboard", "mlflow"]) == ["tensorboard", "mlflow"]
    monkeypatch.setattr(loggers, "_installed", lambda module: False)
    assert loggers.chosen(["auto"]) == []  # the default says nothing when TensorBoard is absent
    with pytest.raises(ValueError, match=r"pip install 'sela\[tensorboard\]'"):
        loggers.chosen(["tensorboard"])
    with pytest.raises(ValueError, match="drop the others"):
        loggers.chosen(["none", "mlflow"])


@pytest.mark.parametrize("name, package", [("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_package_is_one_line_with_the_pip_command(tmp_path, capsys, monkeypatch, name, package):
    real = loggers._installed
    monkeypatch.setattr(loggers, "_installed", lambda module: module != package and real(module))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY_FLAGS, "--log", name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sela: error: --log {name} needs {package}") and "pip install" in err
    assert "\n" not in err and not out.exists()


def test_an_ordinary_run_is_unchanged_and_writes_event_files(tmp_path):
    """The default (auto) adds RUN/tensorboard and changes nothing else: labels.csv and metrics.jsonl
    (times aside) as with --log none."""
    for name, log in (("default", []), ("none", ["--log", "none"])):
        assert main(["train", "--out", str(tmp_path / name), *TINY_FLAGS, *log]) == 0
    a, b = tmp_path / "default", tmp_path / "none"
    assert (a / "tensorboard").is_dir() and not (b / "tensorboard").exists()
    assert (a / "labels.csv").read_bytes() == (b / "labels.csv").read_bytes()
    timing = ("time_s", "label_time_s", "label_share", "images_per_s", "label_peak_mb", "label_buffers_mb")
    strip = [{k: v for k, v in line.items() if k not in timing} for line in _lines(a) + _lines(b)]
    assert strip[0] == strip[1]
    assert json.loads((a / "config.json").read_text())["runtime"]["log"] == ["auto"]


def test_a_stopped_epoch_still_writes_its_steps(tmp_path):
    sink = loggers.TensorBoardSink(tmp_path / "tb")
    for step in range(3):
        sink.on_step(step, {"loss": 2.0 - step / 10, "lr": 0.1})
    assert not (tmp_path / "tb").exists()  # nothing opened before there is something to write
    sink.close()
    assert [v for _, v in _events(tmp_path / "tb")["train/loss"]] == pytest.approx([2.0, 1.9, 1.8])
