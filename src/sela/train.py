"""The SeLa training loop: label steps (Sinkhorn) alternating with epochs of the objective's loss.

Letters: N training images, B batch, H heads, K_h clusters of head h, P the heads' input width, W ranks,
n_r the rows of one rank.

The method (Asano et al. 2020, Alg. 1): labels for all N images are assigned by the label layer
(:class:`sela.labeller.LabelState`, Sinkhorn) from every head's outputs (the first time from the randomly
initialised network), then the network is trained with cross-entropy against them on augmented views,
averaged over heads; label steps recur on a schedule (:mod:`sela.schedule`). With
``label_inputs="recorded"`` the label step costs no forward pass: the head outputs computed for the loss
are kept, and labels are re-assigned from them at the end of an epoch. The objective
(:mod:`sela.objectives`) says what the loss of a batch is; the ``swapped`` one labels online and gets one
global label step after its last epoch. Under ``torchrun`` every rank trains on its part of each global
batch with DistributedDataParallel, and the label step is sharded: each rank computes outputs for its own
rows only and the solver all-reduces K-sized vectors. The run directory's files are :mod:`sela.rundir`'s.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sela import distributed as dist
from sela import rundir
from sela.data import EvalTransform, ImageSet, make_loader
from sela.eval.evaluate import evaluate
from sela.eval.knn import KNN_K, KNN_TEMPERATURE
from sela.eval.metrics import cluster_sizes
from sela.labeller import LabelState
from sela.objectives import Objective
from sela.plots import cluster_grid, plot_cluster_sizes, plot_curves
from sela.schedule import (
    LABEL_SHARE,
    label_epochs,
    label_pass_epochs,
    label_schedule,
    lr_at,
    min_label_gap,
    planned_epochs,
    schedule_progress,
    space_out,
    typical_epoch_s,
)
from sela.sinkhorn import DEFAULT_LAM

LABEL_INPUTS = ("eval", "train", "recorded")
LABEL_HEADS = ("all", "round-robin")
PRECISIONS = ("auto", "fp32", "bf16")


class TrainingDiverged(RuntimeError):
    """The loss or the network's outputs became NaN or inf."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: any CUDA GPU with bf16 support, or a CPU with
    AVX512-BF16 or AMX instructions (where oneDNN's bf16 convolutions run about twice as fast as float32;
    on other CPUs bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch >= 2.1; absent: assume no
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward passes for a ``precision`` setting, None for float32.

    ``auto``: bfloat16 where the device has it natively (see :func:`native_bf16`), else float32;
    ``bf16``: bfloat16 (an error where the device cannot); ``fp32``: float32 throughout.
    Weights, optimiser state, the loss and the Sinkhorn solve stay float32 in every case.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"precision bf16 is not available on {device.type}; use --precision fp32")
    return torch.bfloat16


class Trainer:
    """Trains a :class:`sela.models.SelaModel` on an :class:`sela.data.ImageSet` by self-labelling.

    Args:
        model: the network (features + a list of linear heads), built by ``sela.models.create_model``.
        train_set: training images (in memory or streamed); its targets are never used for training.
        objective: what a batch's loss is (:class:`sela.objectives.SelaObjective` or ``SwappedObjective``).
        out_dir: run directory (written by rank 0 only).
        epochs, batch_size, lr, momentum, weight_decay, lr_schedule, warmup_epochs: SGD settings;
            batch_size is the global batch over all ranks.
        lam: lambda of the label step (:class:`sela.labeller.LabelState`).
        label_updates, label_spacing: label steps over the run (the first at step 0), and their spacing
            (:func:`sela.schedule.label_schedule`).
        label_share: the largest share of the training time that label passes may take (eval and train
            inputs: each step is a pass over all images). Steps closer than that allows are merged
            (:func:`sela.schedule.min_label_gap`), judged from the images' and views' sizes, or, with a
            time budget, from the measured times; so the first epoch holds no label pass after step 0.
        label_heads: ``all`` heads per label step, or ``round-robin`` (one in turn; the first step
            assigns all).
        label_inputs: ``eval`` (un-augmented images, eval mode), ``train`` (augmented, train mode, the
            original code's choice) or ``recorded`` (the epoch's own training outputs, no extra pass).
        eval_transform: the un-augmented transform, for the label step.
        device: where the model and (in-memory) images live.
        seed: all randomness (initial weights aside) derives from (seed, epoch).
        workers: DataLoader workers for streamed datasets.
        progress: show tqdm bars (rank 0 only).
        sync_bn: synchronise BatchNorm across processes (CUDA only).
        precision: ``auto``, ``bf16`` or ``fp32``; see :func:`autocast_dtype`.
        time_limit_s: a wall-clock budget for training (seconds, label steps included). ``epochs`` is then
            the first plan only: before each epoch from the second on, the run's length is re-planned to
            fill the rest of the budget at the measured epoch time (:func:`sela.schedule.planned_epochs`),
            the learning-rate decay is stretched or squeezed from that step on (continuously) and the label
            schedule is laid out again. Timing decides the epoch count, so such a run is not
            bit-reproducible; resuming counts the time already spent.
        metadata: JSON-ready description of the run, stored in every checkpoint (never read here).
        log: called with one line per epoch (and a note when the budget stops the run); None: silent.
        monitor, monitor_every: ``monitor(model)`` -> a dict of JSON-ready numbers (e.g. the kNN top-1 of
            :func:`sela.eval.evaluate`), called on rank 0 after every ``monitor_every``-th epoch and after
            the last; its numbers join that epoch's metrics.jsonl line and log line, with its own time
            (``monitor_time_s``), which the epoch time, the label share and the time budget leave out.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: ImageSet,
        *,
        objective: Objective,
        out_dir: str | os.PathLike,
        epochs: int,
        batch_size: int,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: str = "cosine",
        warmup_epochs: float = 1.0,
        lam: float = DEFAULT_LAM,
        label_updates: int = 40,
        label_spacing: str = "quadratic",
        label_share: float = LABEL_SHARE,
        label_heads: str = "all",
        label_inputs: str = "eval",
        eval_transform: EvalTransform,
        device: torch.device,
        seed: int = 0,
        workers: int = 4,
        progress: bool = True,
        sync_bn: bool = False,
        precision: str = "auto",
        time_limit_s: float | None = None,
        metadata: dict | None = None,
        log: Callable[[str], None] | None = None,
        monitor: Callable[[nn.Module], dict] | None = None,
        monitor_every: int = 0,
    ):
        n = len(train_set)
        _check_settings(n, model, objective, epochs, batch_size, lr, label_heads, label_inputs, time_limit_s)
        self.objective, self.train_set, self.device = objective, train_set, device
        objective.prepare(model)
        self.model, self.net = _place(model, device, sync_bn)
        self.images = train_set.images.to(device) if train_set.in_memory else None
        self.out_dir = Path(out_dir)
        # the plan: the run's length and its schedules (a time budget changes them)
        self.epochs, self.batch_size, self.steps_per_epoch = epochs, batch_size, n // batch_size
        self.base_lr, self.lr_schedule = lr, lr_schedule
        self.warmup_steps = int(warmup_epochs * self.steps_per_epoch)
        self.lr_anchor: tuple[int, float] | None = None  # set when a time budget re-plans the length
        self.lr_at(0)  # validates the schedule name
        self.time_limit_s = time_limit_s
        self.epoch_times: list[float] = []  # seconds per finished epoch (mean over ranks)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False
        )
        # the label steps
        self.state = LabelState(len(model.n_clusters), n, lam=lam, soft=objective.soft_targets)
        self.label_updates, self.label_spacing = label_updates, label_spacing
        self.label_heads, self.label_inputs = label_heads, label_inputs
        self.label_steps: list[int] = []  # optimisation steps before which a label step runs
        self.label_epochs: list[int] = []  # epochs (1-based) after which a recorded label step runs
        self.label_share, self.last_label_step = label_share, None
        self.pass_epochs = label_pass_epochs(eval_transform.out_size, objective.augment.out_size)
        self._lay_out_label_steps(0)
        self.eval_transform = eval_transform
        self.seed, self.workers, self.metadata, self.log = seed, workers, metadata or {}, log
        if monitor_every < 0:
            raise ValueError(f"monitor_every must be >= 0 (0: never), got {monitor_every}")
        self.monitor, self.monitor_every = monitor, monitor_every
        self._note: str | None = None  # said after the epoch's line (the budget stopped the run)
        self.progress = progress and dist.is_main()
        self.epoch = 0  # epochs completed
        amp = autocast_dtype(precision, device)
        self.precision = "fp32" if amp is None else "bf16"  # what "auto" resolved to
        self.autocast = torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
        self._label_memory: tuple[int, int | None] | None = None  # (buffers, peak) bytes, this epoch

    # ----------------------------------------------------------------------------------------------------
    # the plan

    @property
    def total_steps(self) -> int:
        """Optimisation steps of the whole run as planned now."""
        return self.epochs * self.steps_per_epoch

    def lr_at(self, step: int) -> float:
        return lr_at(
            step,
            self.total_steps,
            base_lr=self.base_lr,
            schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps,
            anchor=self.lr_anchor,
        )

    def _lay_out_label_steps(self, step: int) -> None:
        """The label schedule for the planned length, from optimisation step ``step`` on."""
        if not self.objective.label_steps:  # labels come online; one global step after the last epoch
            self.label_steps = []
            return
        steps = label_schedule(self.label_updates, self.total_steps, self.label_spacing)
        if self.label_inputs == "recorded":  # the first step needs a pass, the others an epoch's outputs
            self.label_epochs = [
                e for e in label_epochs(steps, self.steps_per_epoch) if e > step // self.steps_per_epoch
            ]
            self.label_steps = [0] if step == 0 else []
        else:  # every step a pass over the data: no closer together than the label share allows
            gap = min_label_gap(self.pass_epochs, self.steps_per_epoch, self.label_share)
            self.label_steps = space_out([s for s in steps if s >= step], gap, after=self.last_label_step)

    def plan(self, epochs: int) -> None:
        """Change the run's length to ``epochs`` from the next epoch on (a time budget's re-plan): the
        learning-rate decay continues from where it is to 0 at the new end, the label schedule is laid out
        again for the new length from here on."""
        step = self.epoch * self.steps_per_epoch  # the next optimisation step
        start = max(step, self.warmup_steps)
        progress = schedule_progress(
            start, self.total_steps, warmup_steps=self.warmup_steps, anchor=self.lr_anchor
        )
        self.lr_anchor = (start, progress)
        self.epochs = epochs
        self._lay_out_label_steps(step)

    # ----------------------------------------------------------------------------------------------------
    # the loop

    def fit(self, max_epochs: int | None = None) -> list[dict]:
        """Train from ``self.epoch`` to ``epochs`` (or for at most ``max_epochs`` epochs now, e.g. to stop
        and resume later); returns the metrics of the epochs run now."""
        history: list[dict] = []
        while (max_epochs is None or len(history) < max_epochs) and self.epoch < self.epochs:
            epoch = self.epoch
            stats = self.train_one_epoch(epoch)
            self.epoch = epoch + 1
            self.epoch_times.append(dist.all_reduce_mean(stats["time_s"], self.device))
            if self.time_limit_s and self.epoch < self.epochs:
                stats = self._replan(stats)
            if dist.is_main() and self._monitor_due():
                stats = {**stats, **self._monitored()}
            if dist.is_main():
                rundir.append_metrics(self.out_dir, stats)
                self.save_checkpoint()
                self._report(stats)
            self._check_health(stats)
            if self._note and self.log and dist.is_main():
                self.log(self._note)
            self._note = None
            history.append(stats)
        return history

    def _monitor_due(self) -> bool:
        every = self.monitor_every
        return (
            self.monitor is not None and every > 0 and (self.epoch % every == 0 or self.epoch == self.epochs)
        )

    def _monitored(self) -> dict:
        """The monitor's numbers for the model as it is now, and the seconds they took."""
        start = time.perf_counter()
        result = self.monitor(self.model)
        self.net.train()
        return {**result, "monitor_time_s": round(time.perf_counter() - start, 3)}

    def _replan(self, stats: dict) -> dict:
        """Fit the run's length to the rest of the time budget (measured label-pass cost included); when
        no further epoch fits, this one was the last: it gets the final label step it would have had."""
        if self.objective.label_steps and self.label_inputs != "recorded" and stats["label_passes"]:
            train_s = max(stats["time_s"] - stats["label_time_s"], 1e-9)
            self.pass_epochs = stats["label_time_s"] / stats["label_passes"] / train_s
        epochs = planned_epochs(self.epoch, self.epoch_times, self.time_limit_s)
        if epochs != self.epochs:
            self.plan(epochs)
        if self.epoch < self.epochs:
            return stats
        if self.epoch == 1:
            self._note = (
                f"the first epoch took {stats['time_s']:.0f} s of the {self.time_limit_s:.0f} s budget: stopping "
                "after it; for more epochs give a longer --time-limit, or make each cheaper (a smaller "
                "--crop-size or --image-size, fewer --heads, --recipe cpu-fast)"
            )
        if not self.objective.label_steps:  # the exported labels: one global, balanced assignment
            extra = self.update_labels()
            stats = {**stats, "label_time_s": round(stats["label_time_s"] + extra, 3)}
            stats["time_s"] = round(stats["time_s"] + extra, 3)
            stats["label_share"] = round(stats["label_time_s"] / stats["time_s"], 4)
            stats.update(label_updates=self.state.n_updates, heads=self._cluster_sizes())
        return stats

    def _report(self, stats: dict) -> None:
        """One line for the epoch: loss, time, label steps' time, cluster sizes, time left."""
        if self.log is None:
            return
        smallest = min(h["min"] for h in stats["heads"])
        empty = sum(h["n_empty"] for h in stats["heads"])
        left = (self.epochs - self.epoch) * typical_epoch_s(self.epoch_times)
        self.log(
            f"epoch {stats['epoch']}/{self.epochs}: loss {stats['loss']:.3f}, {stats['time_s']:.1f} s (label "
            f"steps {stats['label_time_s']:.1f} s, {stats['label_share']:.0%}), clusters: smallest {smallest}, "
            f"{empty} empty; about {left / 60:.1f} min left"
            + (f"; kNN top-1 {stats['knn_top1']:.1f} %" if "knn_top1" in stats else "")
        )

    def train_one_epoch(self, epoch: int) -> dict:
        """One pass over the data in global batches, with the label steps that fall inside it."""
        self.net.train()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # shuffling + augmentation
        # augmentation and dropout differ between ranks (or each rank would crop, flip and drop out its
        # images exactly like the others); rank 0 draws what a single process draws
        aug_gen = gen if dist.rank() == 0 else torch.Generator().manual_seed(self._rank_seed(epoch))
        torch.manual_seed(self._rank_seed(epoch))  # dropout
        start, label_time, loss_sum, seen, passes = time.perf_counter(), 0.0, 0.0, 0, 0
        first = epoch * self.steps_per_epoch
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch",
                   disable=not self.progress, leave=False)  # fmt: skip
        rows = self._epoch_rows(epoch, gen)  # (n_r,) global rows, this rank's part of the epoch, in order
        self.objective.start_epoch()
        record = self._recorder(epoch, len(rows))  # {head: (n_r, K_h) buffer} when labels come from this pass
        for i, (images, idx) in enumerate(self._batches(rows)):
            step = first + i
            if step in self.label_steps:  # label step(s) scheduled before this optimisation step
                label_time += self.update_labels()
                self.last_label_step, passes = step, passes + 1
                self.net.train()
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(step)
            loss, outputs = self.objective.loss(
                self.net, images, idx, self.state, generator=aug_gen, autocast=self.autocast
            )
            for h, buf in record.items():
                buf[i * len(idx) : (i + 1) * len(idx)] = outputs[h]  # every batch: B / W rows
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.objective.after_step(self.model)
            loss_value = self._checked(loss, epoch, step)  # one host sync per step keeps the bar honest
            loss_sum, seen = loss_sum + loss_value * len(idx), seen + len(idx)
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{seen * dist.world_size() / elapsed:.0f}")
            bar.update()
        bar.close()
        if record:
            label_time += self._labels_from_records(rows, record)
        if not self.objective.label_steps and epoch + 1 == self.epochs:
            label_time += self.update_labels()  # the exported labels: one global, balanced assignment
        stats = self._epoch_stats(epoch, time.perf_counter() - start, label_time, loss_sum, seen)
        return {**stats, "label_passes": passes}

    def _checked(self, loss: Tensor, epoch: int, step: int) -> float:
        """The loss as a float; :class:`TrainingDiverged` when it is NaN or inf."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss became {value} at epoch {epoch + 1}, step {step}; {self._advice()}")
        return value

    def _advice(self) -> str:
        kept = (self.out_dir / rundir.CHECKPOINT).is_file()
        where = f"the last good checkpoint in {self.out_dir} is kept: " if kept else "no epoch finished: "
        then = " and --resume" if kept else " and start again"
        return f"{where}lower --lr (now {self.base_lr}){then}"

    def _epoch_stats(self, epoch: int, total: float, label_time: float, loss_sum: float, seen: int) -> dict:
        """The epoch's line of metrics.jsonl."""
        return {
            "epoch": epoch + 1,
            "loss": dist.all_reduce_mean(loss_sum / max(seen, 1), self.device),
            "lr": self.lr_at((epoch + 1) * self.steps_per_epoch - 1),
            "time_s": round(total, 3),
            "label_time_s": round(label_time, 3),
            "label_share": round(label_time / total, 4) if total > 0 else 0.0,
            **self._label_memory_stats(),
            "images_per_s": round(seen * dist.world_size() / total, 1),
            "label_updates": self.state.n_updates,
            "heads": self._cluster_sizes(),
        }

    def _cluster_sizes(self) -> list[dict]:
        return [
            cluster_sizes(lab, k) for lab, k in zip(self.state.labels, self.model.n_clusters, strict=True)
        ]

    def _rank_seed(self, epoch: int) -> int:
        """This rank's seed for an epoch's augmentation and dropout (rank 0: a single process's)."""
        return self.seed * 1_000_003 + epoch + dist.rank() * 1_000_003**2

    def _epoch_rows(self, epoch: int, gen: torch.Generator) -> Tensor:
        """This rank's rows (n_r,) of the epoch, in training order: its slice of each global batch."""
        n, b, world, r = len(self.train_set), self.batch_size, dist.world_size(), dist.rank()
        order = torch.randperm(n, generator=gen)[: self.steps_per_epoch * b]  # drop the last partial batch
        # the global batch t is order[t*b:(t+1)*b]; rank r takes its r-th slice of it
        return order.view(self.steps_per_epoch, world, b // world)[:, r].reshape(-1)

    def _batches(self, rows: Tensor, per: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The given rows in order, in batches of ``per`` (default B / W): (uint8 images (b, C, H, W) on
        the device, their rows (b,))."""
        per = per or self.batch_size // dist.world_size()
        if self.images is not None:
            for s in range(0, len(rows), per):
                idx = rows[s : s + per]
                yield self.images[idx.to(self.device)], idx
            return
        pin = self.device.type == "cuda"
        loader = make_loader(
            self.train_set, per, sampler=rows.tolist(), num_workers=self.workers, pin_memory=pin
        )
        for images, idx in loader:
            yield images.to(self.device, non_blocking=True), idx

    # ----------------------------------------------------------------------------------------------------
    # the label step

    @torch.no_grad()
    def update_labels(self) -> float:
        """Re-assign the labels of the scheduled heads from a pass over all images; returns seconds taken.

        Each rank computes the heads' inputs for its own rows (N / W), then for each head in turn fills
        one reused (N / W, K_h) logits buffer and re-labels from it (warm-started, global solve).
        """
        start = time.perf_counter()
        measured = dist.reset_peak_memory(self.device)
        heads = self._scheduled_heads(self.state.n_updates)
        rows = dist.shard_rows(len(self.train_set))  # (n_r,) global rows of this rank
        if self.state.n_updates == 0 and self.label_inputs == "eval" and self.objective.label_steps:
            self._calibrate_batchnorm(rows[:4096])
        dist.average_buffers(self.model)  # one network on all ranks: their BatchNorm statistics drift apart
        feats = self._head_inputs(rows)  # (n_r, P)
        if self.model.normalize_heads:  # cosine heads score normalised inputs, as in the loss
            feats = torch.nn.functional.normalize(feats, dim=1)
        buffer = torch.empty(len(rows) * max(self.model.n_clusters), device=self.device)
        feats_finite = bool(torch.isfinite(feats).all())  # one pass over (n_r, P), not one per head
        solver_copy = 0
        for h in heads:
            head = self.model.heads[h]
            if not (feats_finite and torch.isfinite(head.weight).all()):
                raise self._diverged_outputs()
            logits = buffer[: len(rows) * head.out_features].view(len(rows), head.out_features)  # (n_r, K_h)
            for s in range(0, len(rows), 8192):
                chunk = logits[s : s + 8192]
                torch.addmm(head.bias, feats[s : s + 8192].float(), head.weight.t(), out=chunk)
            if self.objective.logit_scale != 1.0:
                logits.mul_(self.objective.logit_scale)
            self.state.relabel(h, logits, rows)
            self.objective.after_labels(self.model, h, feats, self.state.labels[h, rows])
            in_place = self.state.solves_in_place(head.out_features)
            solver_copy = max(
                solver_copy, 0 if in_place else logits.numel() * 4
            )  # the solver's float32 kernel
        self.state.n_updates += 1
        held = feats.numel() * feats.element_size() + buffer.numel() * buffer.element_size() + solver_copy
        self._note_label_memory(held, dist.peak_memory_bytes(self.device) if measured else None)
        return time.perf_counter() - start

    @torch.no_grad()
    def _labels_from_records(self, rows: Tensor, record: dict[int | str, Tensor]) -> float:
        """Re-assign labels from the head outputs recorded during the epoch (augmented views, train mode,
        each from the network as it was at that image's step); returns seconds taken.

        ``rows`` (n_r,) are this rank's rows, disjoint between ranks; the images of the dropped last partial
        batch keep their labels.
        """
        start = time.perf_counter()
        heads = [h for h in record if h != "z"]
        for h in heads:
            if not bool(torch.isfinite(record[h]).all()):
                raise self._diverged_outputs()
            self.state.relabel(h, record[h], rows)
            if "z" in record:
                self.objective.after_labels(self.model, h, record["z"], self.state.labels[h, rows])
        self.state.n_updates += 1
        self._note_label_memory(sum(buf.numel() * buf.element_size() for buf in record.values()), None)
        return time.perf_counter() - start

    def _diverged_outputs(self) -> TrainingDiverged:
        return TrainingDiverged(
            f"the network's outputs became NaN/inf before label update {self.state.n_updates + 1}; "
            f"{self._advice()}"
        )

    def _scheduled_heads(self, n_done: int) -> list[int]:
        """The heads that label step ``n_done + 1`` re-assigns: all, or one in turn (round-robin); the first
        step assigns every head (an unassigned head would train towards label 0)."""
        if self.label_heads == "all" or n_done == 0:
            return list(range(len(self.model.n_clusters)))
        return [n_done % len(self.model.n_clusters)]

    def _recorder(self, epoch: int, n_rows: int) -> dict[int | str, Tensor]:
        """Buffers {head: (n_r, K_h) float32} for the outputs of this epoch's training pass, when a
        recorded-output label step ends the epoch, with "z": (n_r, P) for the heads' inputs when the
        objective needs them; {} otherwise. Memory: n_r x (sum(K_h) [+ P]) x 4 bytes."""
        if epoch + 1 not in self.label_epochs:
            return {}
        first = epoch * self.steps_per_epoch
        n_done = self.state.n_updates + sum(
            first <= s < first + self.steps_per_epoch for s in self.label_steps
        )
        record: dict[int | str, Tensor] = {
            h: torch.empty(n_rows, self.model.n_clusters[h], device=self.device)
            for h in self._scheduled_heads(n_done)
        }
        if self.objective.needs_embeddings:
            record["z"] = torch.empty(n_rows, self.model.head_dim, device=self.device)
        return record

    def _calibrate_batchnorm(self, rows: Tensor) -> None:
        """Set BatchNorm running statistics from the data before the first, eval-mode label step.

        A fresh network's running statistics (mean 0, variance 1) do not match its activations, so its
        eval-mode outputs barely differ between images and the first labels would be close to random.
        """
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        self.model.train()
        for images, _ in self._batches(rows, max(256, self.batch_size)):
            with self.autocast:
                self.model.head_inputs(self.model.forward_features(self.eval_transform(images)))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum

    def _head_inputs(self, rows: Tensor) -> Tensor:
        """The heads' inputs (n_r, P) for the given rows: eval mode on un-augmented images (default), or
        train mode on augmented views (the original code's choice; also the first step of "recorded")."""
        train_mode = self.label_inputs != "eval"
        self.model.train(train_mode)
        transform = self.objective.augment if train_mode else self.eval_transform
        out = torch.empty(len(rows), self.model.head_dim, device=self.device)
        s = 0
        for images, _ in self._batches(rows, max(256, self.batch_size)):
            x = transform(images)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                out[s : s + len(images)] = self.model.head_inputs(self.model.forward_features(x)).float()
            s += len(images)
        return out

    def _note_label_memory(self, held: int, peak: int | None) -> None:
        last = self._label_memory or (0, None)
        self._label_memory = (max(last[0], held), peak if last[1] is None else max(last[1], peak or 0))

    def _label_memory_stats(self) -> dict:
        """Memory of this epoch's label steps in MiB, the largest over ranks ({} when there were none).

        ``label_buffers_mb``: the head inputs (n_r, P), logits (n_r, K) and solver kernel (n_r, K, when not
        solved in place) one rank holds; ``label_peak_mb``: measured, the peak of CUDA allocations on a GPU
        or of the process's resident memory (VmHWM, dataset and model included) on CPU.
        """
        if self._label_memory is None:
            return {}
        held, peak = self._label_memory
        self._label_memory = None
        peak = dist.all_reduce_max(-1.0 if peak is None else float(peak), self.device)
        return {
            "label_buffers_mb": round(dist.all_reduce_max(float(held), self.device) / 2**20, 1),
            "label_peak_mb": round(peak / 2**20, 1) if peak >= 0 else None,
        }

    # ----------------------------------------------------------------------------------------------------
    # checkpoints and health

    def save_checkpoint(self) -> None:
        """Write checkpoint.pt atomically (:func:`sela.rundir.save_checkpoint`; its schema is there)."""
        rundir.save_checkpoint(
            self.out_dir,
            {
                "model_spec": getattr(self.model, "spec", None),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                **self.state.state_dict(),
                "epoch": self.epoch,
                "plan": {
                    "epochs": self.epochs,
                    "lr_anchor": self.lr_anchor,
                    "label_steps": self.label_steps,
                    "label_epochs": self.label_epochs,
                    "epoch_times": self.epoch_times,
                },
                "config": self.metadata,
                "rng": {"torch": torch.get_rng_state()},
            },
        )

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Continue exactly where a run stopped (weights, optimiser, labels, scalings, epoch, plan);
        metrics.jsonl keeps the lines of the checkpoint's epochs only, each once."""
        ckpt = rundir.load_checkpoint(path)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}") from None
        self.state.load_state_dict(ckpt, self.device)
        self.epoch = ckpt["epoch"]
        plan = ckpt.get("plan")
        if plan:
            self.epochs = plan["epochs"]
            self.lr_anchor = tuple(plan["lr_anchor"]) if plan["lr_anchor"] else None
            self.label_steps, self.label_epochs = plan["label_steps"], plan["label_epochs"]
            self.epoch_times = plan["epoch_times"]
            self.last_label_step = plan.get("last_label_step")
            self.pass_epochs = plan.get("pass_epochs", self.pass_epochs)
        if dist.is_main():
            lines = rundir.truncate_metrics(self.out_dir, self.epoch)
            if not plan:  # format 1 before plans: the time spent is in the metrics
                self.epoch_times = [m["time_s"] for m in lines]

    def _check_health(self, stats: dict) -> None:
        """Warn about collapse: loss stuck at ln K (labels unlearnable) or clusters left empty."""
        if not dist.is_main():
            return
        chance = sum(math.log(k) for k in self.model.n_clusters) / len(self.model.n_clusters)
        if stats["epoch"] >= 3 and stats["loss"] > 0.98 * chance:
            warnings.warn(
                f"epoch {stats['epoch']}: loss {stats['loss']:.3f} is still at chance level ln K = {chance:.3f}; "
                "the network is not learning the labels (try a lower --lam, higher --lr or fewer clusters)",
                stacklevel=2,
            )
        empty = [h for h, s in enumerate(stats["heads"]) if s["n_empty"] > 0]
        if empty:
            warnings.warn(
                f"epoch {stats['epoch']}: heads {empty} have {self.objective.empty_advice}", stacklevel=2
            )


def _check_settings(
    n: int,
    model: nn.Module,
    objective: Objective,
    epochs: int,
    batch_size: int,
    lr: float,
    label_heads: str,
    label_inputs: str,
    time_limit_s: float | None,
) -> None:
    """The Trainer's argument checks: a ValueError that names the fix."""
    world = dist.world_size()
    checks = [
        (epochs >= 1, f"epochs must be >= 1, got {epochs}"),
        (batch_size >= 1, f"batch size must be >= 1, got {batch_size}"),
        (
            batch_size % world == 0,
            f"batch size {batch_size} must be divisible by the number of processes {world}",
        ),
        (batch_size <= n, f"batch size {batch_size} is larger than the dataset ({n} images); lower it"),
        (math.isfinite(lr) and lr > 0, f"the learning rate must be a positive number, got {lr}"),
        (label_heads in LABEL_HEADS, f"label_heads must be 'all' or 'round-robin', got {label_heads!r}"),
        (
            label_inputs in LABEL_INPUTS,
            f"label_inputs must be one of {', '.join(LABEL_INPUTS)}, got {label_inputs!r}",
        ),
        (
            label_inputs != "recorded" or objective.label_steps,
            f"label_inputs 'recorded' needs the 'sela' objective (the {objective.name} objective has no label "
            "steps during training); use --label-inputs eval",
        ),
        (
            time_limit_s is None or time_limit_s > 0,
            f"the time limit must be > 0 minutes (or unset), got {(time_limit_s or 0) / 60:g}",
        ),
        (
            max(model.n_clusters) <= n,
            f"{max(model.n_clusters)} clusters but only {n} training images; use --clusters <= {n}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _place(model: nn.Module, device: torch.device, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """The model on its device (channels-last on CUDA), and the module that trains it: the model itself,
    or its DistributedDataParallel wrapper (with synchronised BatchNorm if asked) under torchrun."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if dist.world_size() > 1 and sync_bn:
        if device.type != "cuda":
            raise ValueError(
                "--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU); drop "
                "--sync-bn on CPU, where each process normalises with its own part of the batch"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dist.world_size() == 1:
        return model, model
    ids = [device.index] if device.type == "cuda" else None
    return model, nn.parallel.DistributedDataParallel(model, device_ids=ids)


# --------------------------------------------------------------------------------------------------------
# the end of a run: labels.csv, plots, evaluation, summary.json


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
    linear probe (the keys ``sela eval`` writes, with the same meaning: ``knn_top1``, and the cluster
    scores of the best head's argmax on the test split, ``self_labels`` per head in ``heads``).
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
    """curves.png, cluster_sizes.png and (in-memory images) clusters.png of the run's largest clusters."""
    out, labels, train_set = trainer.out_dir, trainer.state.labels, trainer.train_set
    plot_curves(metrics, out / "curves.png")
    plot_cluster_sizes(labels, list(trainer.model.n_clusters), out / "cluster_sizes.png")
    if train_set.in_memory:
        sizes = torch.bincount(labels[0], minlength=trainer.model.n_clusters[0])
        top = sizes.argsort(descending=True)[:12].tolist()  # the dozen largest clusters of head 0
        cluster_grid(train_set.images, labels[0], top, out / "clusters.png")
