"""The end of a training run: labels.csv, the plots, the evaluation, the label-free signals and verdict, and
summary.json in its run directory."""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

import torch

from sela import distributed as dist
from sela import rundir
from sela.data import ImageSet
from sela.eval.evaluate import evaluate
from sela.eval.knn import KNN_K, KNN_TEMPERATURE
from sela.eval.signals import (
    RANKME_ROWS,
    RANKME_ROWS_PER_DIM,
    VIEW_IMAGES,
    VIEW_K,
    embed,
    head_agreement,
    rankme,
    verdict,
    view_neighbour_agreement,
)
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
    ``heads`` its train and test scores and its stored ``self_labels`` scores. Without any labels:
    ``signals`` (:func:`label_free_signals`) and the one-line ``verdict`` drawn from them
    (:func:`sela.eval.signals.verdict`), with a warning when the run probably learned nothing or collapsed.
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
    start = time.perf_counter()
    summary["signals"] = label_free_signals(trainer, result.get("heads", []))
    summary["verdict"], warning = verdict(summary["signals"])
    summary["signals_time_s"] = round(time.perf_counter() - start, 2)
    if warning:
        warnings.warn(warning, stacklevel=2)
    rundir.write_json(out / rundir.SUMMARY, summary)
    return summary


def label_free_signals(trainer: Trainer, heads: list[dict]) -> dict[str, float | None]:
    """Signals of the trained run that need no labels (:mod:`sela.eval.signals`), a flat dict of floats (None
    where a signal does not apply):

    * ``rankme``, ``rankme_fraction``: the effective rank of the features (eval mode, un-augmented, as
      evaluation sees them) of a random subsample of 25 D training images (at most 10,000), and its share
      of D;
    * ``head_nmi``: the mean NMI between the heads' stored labels (None for one head);
    * ``label_agreement``: the mean over heads of the NMI between each head's labels before and after its
      latest label step (None when no head had a second step; a resumed run counts from the resume);
    * ``view_knn_overlap``, ``raw_view_knn_overlap``: :func:`sela.eval.signals.view_neighbour_agreement` of
      2,000 random training images under the run's training augmentation (10 neighbours), and of their raw
      pixels (None with fewer than 11 images);
    * ``largest_cluster_share``: the largest share of the training images that one cluster of a head's
      argmax predictions holds, over heads (from ``heads``, :func:`sela.eval.evaluate`'s entries).

    The subsample and the views are drawn from the run's seed. Cost on one CPU thread: see
    docs/training.md ("Did it learn? The verdict").
    """
    n, model = len(trainer.train_set), trainer.model
    gen = torch.Generator().manual_seed(trainer.seed)
    order = torch.randperm(n, generator=gen)  # (N,)
    rank_rows = order[: min(RANKME_ROWS, RANKME_ROWS_PER_DIM * model.feature_dim)].sort().values
    view_rows = order[:VIEW_IMAGES].sort().values  # sorted: streamed images are read in order
    batches = (images for images, _ in trainer.images(rank_rows, 256))
    rank = rankme(embed(model, batches, transform=trainer.eval_transform))
    view = raw = None
    if len(view_rows) > VIEW_K:  # k neighbours need k + 1 images
        batches = (images for images, _ in trainer.images(view_rows, 256))
        views = view_neighbour_agreement(model, batches, augment=trainer.objective.augment, generator=gen)
        view, raw = views.embedding, views.raw_pixels
    agreement = [a for a in trainer.label_pass.agreement if a is not None]
    sized = [e["sizes"]["max"] / n for e in heads if "sizes" in e]
    return {
        "rankme": round(rank.rankme, 3),
        "rankme_fraction": round(rank.fraction, 6),
        "head_nmi": _rounded(head_agreement(trainer.state.labels)),
        "label_agreement": _rounded(sum(agreement) / len(agreement) if agreement else None),
        "view_knn_overlap": _rounded(view),
        "raw_view_knn_overlap": _rounded(raw),
        "largest_cluster_share": _rounded(max(sized) if sized else None),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


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
