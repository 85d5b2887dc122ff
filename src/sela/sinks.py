"""Where training's numbers go: one small interface, :class:`Sink`, and the sinks a run has by default.

The training loop calls every sink's :meth:`Sink.on_step` after each optimisation step (the step's
loss, a float already on the host, and learning rate), :meth:`Sink.on_epoch` with each epoch's line of
metrics (the dict that metrics.jsonl stores) and :meth:`Sink.close` when the run ends; only rank 0 calls
them. A new destination (TensorBoard, MLflow) is one more subclass, passed as ``Trainer(sinks=...)``.
:class:`HealthCheck` is a sink too: it warns about collapse from the epoch's line.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from sela import rundir
from sela.plan import Plan


class Sink:
    """Receives training's numbers; every hook is a no-op here, so a sink overrides what it needs."""

    def on_step(self, step: int, values: dict) -> None:
        """After optimisation step ``step`` (0-based, global): ``values`` = {"loss": float, "lr": float}."""

    def on_epoch(self, stats: dict) -> None:
        """After an epoch: its metrics line (``epoch`` 1-based, ``loss``, ``lr``, times, ``heads``, ...)."""

    def close(self) -> None:
        """The run has ended (finished, or stopped by an error); flush and release what the sink holds."""


class JsonlSink(Sink):
    """metrics.jsonl in the run directory, one line per epoch (:func:`sela.rundir.append_metrics`)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)

    def on_epoch(self, stats: dict) -> None:
        rundir.append_metrics(self.out_dir, stats)


class ConsoleSink(Sink):
    """One line per epoch through ``log``: loss, time, label steps' time, cluster sizes, time left (from
    ``plan``, which a time budget re-plans), and the monitor's kNN top-1 when there is one."""

    def __init__(self, log: Callable[[str], None], plan: Plan):
        self.log, self.plan = log, plan

    def on_epoch(self, stats: dict) -> None:
        smallest = min(h["min"] for h in stats["heads"])
        empty = sum(h["n_empty"] for h in stats["heads"])
        left = self.plan.time_left_s(stats["epoch"])
        self.log(
            f"epoch {stats['epoch']}/{self.plan.epochs}: loss {stats['loss']:.3f}, {stats['time_s']:.1f} s "
            f"(label steps {stats['label_time_s']:.1f} s, {stats['label_share']:.0%}), clusters: smallest "
            f"{smallest}, {empty} empty; about {left / 60:.1f} min left"
            + (f"; kNN top-1 {stats['knn_top1']:.1f} %" if "knn_top1" in stats else "")
        )


class HealthCheck(Sink):
    """Warns about collapse: the loss stuck at ln K (labels unlearnable) or clusters left empty.

    Args:
        n_clusters: K per head.
        empty_advice: what to say about empty clusters (the objective's ``empty_advice``).
    """

    def __init__(self, n_clusters: list[int], empty_advice: str):
        self.n_clusters, self.empty_advice = list(n_clusters), empty_advice

    def on_epoch(self, stats: dict) -> None:
        chance = sum(math.log(k) for k in self.n_clusters) / len(self.n_clusters)
        if stats["epoch"] >= 3 and stats["loss"] > 0.98 * chance:
            warnings.warn(
                f"epoch {stats['epoch']}: loss {stats['loss']:.3f} is still at chance level ln K = {chance:.3f}; "
                "the network is not learning the labels (try a lower --lam, higher --lr or fewer clusters)",
                stacklevel=3,
            )
        empty = [h for h, s in enumerate(stats["heads"]) if s["n_empty"] > 0]
        if empty:
            warnings.warn(f"epoch {stats['epoch']}: heads {empty} have {self.empty_advice}", stacklevel=3)


def default_sinks(out_dir: str | os.PathLike, log: Callable[[str], None] | None, plan: Plan) -> list[Sink]:
    """A run's sinks unless told otherwise: metrics.jsonl in ``out_dir`` and, with a ``log``, the console
    line."""
    sinks: list[Sink] = [JsonlSink(out_dir)]
    if log is not None:
        sinks.append(ConsoleSink(log, plan))
    return sinks
