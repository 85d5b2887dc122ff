"""Metric loggers on the sink interface (:class:`sela.sinks.Sink`): TensorBoard event files and MLflow runs.

``runtime.log`` (``--log``) picks them, a list of names:
    auto         TensorBoard when the ``tensorboard`` package is installed, else nothing (the default)
    tensorboard  event files in ``RUN/tensorboard/`` (``tensorboard --logdir runs/``)
    mlflow       an MLflow run: the resolved config as params and the same metrics, in the store at
                 ``$MLFLOW_TRACKING_URI`` when set, else a local SQLite store ``RUN/mlflow.db``
                 (``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``)
    none         neither

Both write the same numbers (:func:`step_scalars` against the global optimisation step, 0-based;
:func:`epoch_scalars` against the epoch, 1-based): the values of metrics.jsonl, renamed. A step's values are
kept in memory until the epoch ends and written then, so the training step pays a list append; nothing is
opened before the first epoch ends (a run that fails while being built leaves no files). The packages are
imported only when a logger is asked for; a missing one is a ValueError naming the pip command.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sela.sinks import Sink

LOGGERS = ("auto", "tensorboard", "mlflow", "none")
TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/: the event files
MLFLOW_DB = "mlflow.db"  # RUN/mlflow.db: the local MLflow store, unless MLFLOW_TRACKING_URI says otherwise
MLFLOW_EXPERIMENT = "sela"  # unless MLFLOW_EXPERIMENT_NAME says otherwise
# the packages each logger needs, and what to install for them
_NEEDS = {
    "tensorboard": (("tensorboard",), "pip install 'sela[tensorboard]' (or: pip install tensorboard)"),
    "mlflow": (
        ("mlflow", "sqlalchemy", "alembic"),
        "pip install 'sela[mlflow]' (or: pip install mlflow-skinny sqlalchemy alembic)",
    ),
}


def step_scalars(values: dict) -> dict[str, float]:
    """One optimisation step's numbers by name: ``train/loss`` and ``train/lr``."""
    return {"train/loss": values["loss"], "train/lr": values["lr"]}


def epoch_scalars(stats: dict) -> dict[str, float]:
    """An epoch's numbers by name, from its metrics line: the mean loss, the time and the label steps'
    share of it, the cluster sizes over all heads (smallest, largest, empty clusters) and, when the
    monitor ran, the kNN top-1 (%) and NMI."""
    heads = stats["heads"]
    scalars = {
        "epoch/loss": stats["loss"],
        "epoch/lr": stats["lr"],
        "time/epoch_s": stats["time_s"],
        "time/label_s": stats["label_time_s"],
        "time/label_share": stats["label_share"],
        "time/images_per_s": stats["images_per_s"],
        "clusters/smallest": min(h["min"] for h in heads),
        "clusters/largest": max(h["max"] for h in heads),
        "clusters/empty": sum(h["n_empty"] for h in heads),
    }
    scalars.update({f"eval/{key}": stats[key] for key in ("knn_top1", "nmi") if key in stats})
    return scalars


def chosen(log: Iterable[str]) -> list[str]:
    """The loggers a ``runtime.log`` setting asks for (``auto``: TensorBoard when installed); a
    ValueError for an unknown name, ``none`` among others, or a logger whose package is missing."""
    log = list(log)
    unknown = [name for name in log if name not in LOGGERS]
    if unknown:
        raise ValueError(f"--log must be a comma list of {', '.join(LOGGERS)}, got {','.join(log)!r}")
    if "none" in log and len(log) > 1:
        raise ValueError(f"--log none turns the loggers off; drop the others ({','.join(log)}) or none")
    names = []
    for name in log:
        if name == "auto":
            name = "tensorboard" if _installed("tensorboard") else "none"
        if name != "none" and name not in names:
            missing = [m for m in _NEEDS[name][0] if not _installed(m)]
            if missing:
                raise ValueError(f"--log {name} needs {', '.join(missing)}: {_NEEDS[name][1]}")
            names.append(name)
    return names


def metric_sinks(
    out_dir: str | os.PathLike, log: Iterable[str] = ("auto",), *, params: dict[str, Any] | None = None
) -> list[Sink]:
    """The sinks a ``runtime.log`` setting asks for, writing under the run directory ``out_dir``;
    ``params`` (the resolved config, {dotted key: value}) go to MLflow."""
    sinks: list[Sink] = []
    for name in chosen(log):
        if name == "tensorboard":
            sinks.append(TensorBoardSink(Path(out_dir) / TENSORBOARD_DIR))
        else:
            sinks.append(MlflowSink(mlflow_uri(out_dir), run_name=Path(out_dir).name, params=params))
    return sinks


def mlflow_uri(out_dir: str | os.PathLike) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else the SQLite store ``out_dir/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out_dir).resolve() / MLFLOW_DB}"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class _Buffered(Sink):
    """A sink that keeps each step's values until the epoch ends, then writes them all (:meth:`write`)."""

    def __init__(self):
        self.steps: list[tuple[int, dict, float]] = []  # (step, values, wall time in s)

    def on_step(self, step: int, values: dict) -> None:
        self.steps.append((step, values, time.time()))

    def on_epoch(self, stats: dict) -> None:
        steps, self.steps = self.steps, []
        self.write(steps, stats)

    def close(self) -> None:
        steps, self.steps = self.steps, []
        if steps:  # an epoch stopped part-way: its steps so far
            self.write(steps, None)
        self.finish()

    def write(self, steps: list[tuple[int, dict, float]], stats: dict | None) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class TensorBoardSink(_Buffered):
    """Event files in ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``), flushed after every epoch."""

    def __init__(self, log_dir: str | os.PathLike):
        super().__init__()
        self.log_dir, self.writer = Path(log_dir), None

    def write(self, steps: list[tuple[int, dict, float]], stats: dict | None) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))
        for step, values, wall in steps:
            for tag, value in step_scalars(values).items():
                self.writer.add_scalar(tag, value, step, walltime=wall)
        for tag, value in (epoch_scalars(stats) if stats else {}).items():
            self.writer.add_scalar(tag, value, stats["epoch"])
        self.writer.flush()

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowSink(_Buffered):
    """One MLflow run per training process: ``params`` once, the metrics after every epoch (in batches),
    and at the end its status (FINISHED, or FAILED / KILLED when the run stopped by an error).

    Args:
        tracking_uri: the store (:func:`mlflow_uri`).
        run_name: the MLflow run's name (the run directory's name); its ``sela.run_dir`` tag is the path.
        params: {dotted key: value}, logged as strings.
    """

    def __init__(self, tracking_uri: str, *, run_name: str, params: dict[str, Any] | None = None):
        super().__init__()
        self.tracking_uri, self.run_name, self.params = tracking_uri, run_name, dict(params or {})
        self.client, self.run_id = None, None

    def _open(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        store_log = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables"
        level = store_log.level
        store_log.setLevel(logging.WARNING)
        try:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.client.search_experiments(max_results=1)  # a new store creates its tables here
        finally:
            store_log.setLevel(level)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        tags = {"sela.run_dir": self.params.get("runtime.out", self.run_name)}
        self.run_id = self.client.create_run(experiment, run_name=self.run_name, tags=tags).info.run_id
        params = [Param(key, str(value)) for key, value in sorted(self.params.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def write(self, steps: list[tuple[int, dict, float]], stats: dict | None) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(tag, float(value), int(wall * 1000), step)
            for step, values, wall in steps
            for tag, value in step_scalars(values).items()
        ]
        now = int(time.time() * 1000)
        metrics += [
            Metric(t, float(v), now, stats["epoch"])
            for t, v in (epoch_scalars(stats) if stats else {}).items()
        ]
        with warnings.catch_warnings():  # the store's own deprecation notices are not the user's
            warnings.simplefilter("ignore")
            if self.client is None:
                self._open()
            for start in range(0, len(metrics), 1000):  # at most 1000 metrics a call
                self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def finish(self) -> None:
        if self.client is None:
            return
        error = sys.exc_info()[0]  # close() runs inside the Trainer's except block when the run failed
        status = "FINISHED" if error is None else "KILLED" if error is KeyboardInterrupt else "FAILED"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.client.set_terminated(self.run_id, status)
        self.client = None
