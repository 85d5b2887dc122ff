"""The end of a training run: labels.csv, the plots, the evaluation and summary.json in its run directory."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from sela import distributed as dist
from sela import rundir
from sela.data import ImageSet
from sela.eval.evaluate import evaluate
from sela.eval.knn import KNN_K, KNN_TEMPERATURE
from sela.plots import cluster_grid, plot_cluster_sizes, plot_curves

if TYPE_CHECKING:
    from sela.train import Trainer


def finish_run(
    trainer: Trainer,
    test_set: ImageSet | None,
    *,
    knn_k: int = KNN_K,
    knn_temperature: float = KNN_TEMPERATURE,
) -> dict:
    """Write labels.csv, the plots and summary.json into the run directory; returns the summary.

    The summary is the run's totals (``epochs``, ``label_updates``, ``train_time_s``, ``label_time_s``,
    ``label_share``, ``eval_time_s``) and :func:`sela.eval.evaluate` of the trained model without the
    linear probe (the keys ``sela eval`` writes, with the same meaning): ``knn_top1`` and ``knn_top5``;
    ``nmi``, ``ami``, ``ari``, ``many_to_one`` (and ``accuracy`` only when the head has as many clusters as
    there are classes) of the best head's argmax predictions (``best_head``, chosen by NMI on the training
    split) on ``split``, the test split (the training split without a labelled one); and per head in
    ``heads`` its train and test scores and its stored ``self_labels`` scores.
    """
    if not dist.is_main():
        return {}  # the evaluation has no collectives: rank 0 alone does it while the others exit
    out, labels, train_set = trainer.out_dir, trainer.state.labels, trainer.train_set
    rundir.write_labels_csv(out / rundir.LABELS, labels, paths=train_set.paths)
    metrics = rundir.read_metrics(out)
    _plot_run(trainer, metrics)
    start = time.perf_counter()
    result = evaluate(
        trainer.model,
        train_set,
        test_set,
        transform=trainer.eval_transform,
        labels=labels,
        knn_k=knn_k,
        knn_temperature=knn_temperature,
        linear=False,
        device=trainer.device,
        workers=trainer.workers,
        progress=trainer.progress,
    )
    train_time = round(sum(m["time_s"] for m in metrics), 2)
    label_time = round(sum(m["label_time_s"] for m in metrics), 2)
    summary = {
        "epochs": trainer.epoch,
        "label_updates": trainer.state.n_updates,
        "train_time_s": train_time,
        "label_time_s": label_time,
        "label_share": round(label_time / max(train_time, 1e-9), 4),
        "eval_time_s": round(time.perf_counter() - start, 2),
        **result,
    }
    rundir.write_json(out / rundir.SUMMARY, summary)
    return summary


def _plot_run(trainer: Trainer, metrics: list[dict]) -> None:
    """curves.png (when an epoch ran: not for ``--epochs 0``), cluster_sizes.png and (in-memory images)
    clusters.png of the run's largest clusters."""
    out, labels, train_set = trainer.out_dir, trainer.state.labels, trainer.train_set
    if metrics:
        rundir.atomic_write(out / "curves.png", lambda tmp: plot_curves(metrics, tmp))
    n_clusters = list(trainer.model.n_clusters)
    rundir.atomic_write(out / "cluster_sizes.png", lambda tmp: plot_cluster_sizes(labels, n_clusters, tmp))
    if train_set.in_memory:
        sizes = torch.bincount(labels[0], minlength=trainer.model.n_clusters[0])
        top = sizes.argsort(descending=True)[:12].tolist()  # the dozen largest clusters of head 0
        rundir.atomic_write(
            out / "clusters.png", lambda tmp: cluster_grid(train_set.images, labels[0], top, tmp)
        )
