"""The SeLa training loop: label steps (Sinkhorn) alternating with cross-entropy epochs.

Letters: N training images, B batch, H heads, K_h clusters of head h, D feature dimension, W ranks.

The method (Asano et al. 2020, Alg. 1): labels for all N images are assigned by :func:`sela.sinkhorn.assign`
from every head's outputs (the first time from the randomly initialised network), then the network is
trained with cross-entropy against them on augmented views, averaged over heads; label steps recur on a
schedule (quadratically spaced by default, as the original ImageNet recipe). With ``label_inputs="recorded"``
the label step costs no forward pass: the head outputs computed for the loss are kept, and labels are
re-assigned from them at the end of an epoch. Under ``torchrun`` every rank
trains on its part of each global batch with DistributedDataParallel, and the label step is sharded: each
rank computes outputs for its own rows only and the solver all-reduces K-sized vectors.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from sela import distributed as dist
from sela.data import BatchAugment, EvalTransform, ImageSet, make_loader
from sela.eval.metrics import cluster_sizes
from sela.sinkhorn import assign, soft_codes

CHECKPOINT = "checkpoint.pt"
LABEL_INPUTS = ("eval", "train", "recorded")
PRECISIONS = ("auto", "fp32", "bf16")
OBJECTIVES = ("sela", "swapped")
METRICS = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def label_schedule(n_updates: int, total_steps: int, spacing: str = "quadratic") -> list[int]:
    """Optimisation steps (0-based) before which labels are re-assigned; the first is always step 0.

    ``quadratic`` puts update i at total_steps * (i / n)^2 (dense early, the original ImageNet recipe),
    ``linear`` at total_steps * i / n (its CIFAR recipe). Collisions are merged, so at most n are returned.
    """
    if n_updates < 1:
        raise ValueError(f"label_updates must be >= 1 (the first assignment), got {n_updates}")
    if spacing not in ("quadratic", "linear"):
        raise ValueError(f"label spacing must be 'quadratic' or 'linear', got {spacing!r}")
    power = 2 if spacing == "quadratic" else 1
    steps = {int(total_steps * (i / n_updates) ** power) for i in range(n_updates)}
    return sorted(steps)


def label_epochs(steps: list[int], steps_per_epoch: int) -> list[int]:
    """Epochs (1-based) at whose end a recorded-output label step runs: scheduled step s > 0 moves to the
    first epoch boundary at or after it (epoch ceil(s / steps_per_epoch)); collisions are merged."""
    return sorted({-(-s // steps_per_epoch) for s in steps if s > 0})


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


def schedule_progress(
    step: int, total_steps: int, *, warmup_steps: int, anchor: tuple[int, float] | None = None
) -> float:
    """How far the decay after warm-up has come at ``step``: 0 at the end of warm-up, 1 at ``total_steps``.

    ``anchor`` = (s0, t0) says the progress was t0 at step s0 under an earlier plan (a time budget
    re-plans the run's length); from there it goes on linearly to 1 at the new ``total_steps``, so the
    learning rate stays continuous when the plan changes. Clamped to [0, 1].
    """
    start, t0 = anchor or (warmup_steps, 0.0)
    t = t0 + (1 - t0) * (step - start) / max(1, total_steps - start)
    return min(max(t, 0.0), 1.0)


def lr_at(
    step: int,
    total_steps: int,
    *,
    base_lr: float,
    schedule: str,
    warmup_steps: int,
    anchor: tuple[int, float] | None = None,
) -> float:
    """Learning rate at an optimisation step: linear warm-up, then cosine to 0 or steps of 0.1 at 50/75 %
    of the decay (its progress as :func:`schedule_progress`, ``anchor`` included)."""
    if schedule not in ("cosine", "step"):
        raise ValueError(f"lr schedule must be 'cosine' or 'step', got {schedule!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = schedule_progress(step, total_steps, warmup_steps=warmup_steps, anchor=anchor)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * t))
    return base_lr * (0.1 ** (int(t >= 0.5) + int(t >= 0.75)))


def planned_epochs(done: int, times_s: list[float], limit_s: float) -> int:
    """The run's length in epochs for a time budget: ``done`` epochs finished, which took ``times_s``
    seconds each, and as many more whole epochs as the rest of ``limit_s`` holds at the median of the last
    five epochs' times, less a reserve so that one of them may be as slow as the slowest of those five
    (the last epoch then overruns the budget only when it is slower still). Always at least one more:
    the epoch about to start is then the last one."""
    recent = sorted(times_s[-5:])
    per_epoch = recent[len(recent) // 2]
    remaining = limit_s - sum(times_s) - (recent[-1] - per_epoch)
    return done + max(1, math.floor(remaining / max(per_epoch, 1e-9) + 1e-9))


@dataclass
class LabelState:
    """The self-labels: one row of N labels per head, and each head's solver scaling for warm starts."""

    labels: Tensor  # (H, N) int64, on the CPU
    scalings: list[Tensor | None] = field(default_factory=list)
    n_updates: int = 0


class Trainer:
    """Trains a :class:`sela.models.SelaModel` on an :class:`sela.data.ImageSet` by self-labelling.

    Args:
        model: the network (features + a list of linear heads).
        train_set: training images (in memory or streamed); its targets are never used for training.
        out_dir: run directory (written by rank 0 only).
        epochs, batch_size, lr, momentum, weight_decay, lr_schedule, warmup_epochs: SGD settings;
            batch_size is the global batch over all ranks.
        lam, label_updates, label_spacing, label_heads, label_inputs: the self-labelling settings
            (see the README).
        augment: training augmentation, uint8 batch -> normalised float batch on the device.
        eval_transform: the un-augmented transform, for the label step and features.
        device: where the model and (in-memory) images live.
        seed: all randomness (initial weights aside) derives from (seed, epoch).
        config: the resolved configuration, recorded in the checkpoint and checked on resume.
        workers: DataLoader workers for streamed datasets.
        progress: show tqdm bars (rank 0 only).
        objective: ``sela`` (the paper: cross-entropy against labels from global label steps) or
            ``swapped`` (an online deviation, as SwAV: two views per image, each predicts the other's
            per-batch Sinkhorn codes over cosine-similarity heads; one global label step at the end
            gives the exported labels).
        swap_temperature, swap_epsilon: the ``swapped`` objective's softmax temperature and the
            entropic regularisation of its per-batch codes (SwAV's 0.1 and 0.05).
        swap_queue: the ``swapped`` objective's queue (SwAV): the L2-normalised head inputs of the last
            this-many full views (per process, no gradient) are scored against the current prototypes
            and balanced together with the batch, so that each batch's codes share the K clusters with
            more images than the batch holds; only the batch's codes are used. Emptied at every epoch
            start (so a resumed run continues exactly). Memory: swap_queue x P x 4 bytes; 0: no queue.
        small_crops, small_augment: multi-crop for the ``swapped`` objective (SwAV): this many extra,
            smaller views per image, made by ``small_augment``, also predict the two full views' codes
            (codes come from the full views only). Each costs about (s / S)^2 of a full view.
        precision: ``auto`` (bfloat16 autocast where the device has native bf16, else float32), ``bf16``
            or ``fp32``; see :func:`autocast_dtype`.
        time_limit_s: a wall-clock budget for training (seconds, label steps included; the final
            evaluation comes after it). ``epochs`` is then the first plan only: before each epoch from the
            second on, the run's length is re-planned to fill the rest of the budget at the measured epoch
            time (:func:`planned_epochs`), the learning-rate decay is stretched or squeezed from that step on
            (continuously) and the label schedule is laid out again for the new length. The run ends at
            the last epoch that fits at the measured speed, with room for one epoch as slow as the
            slowest of the last five (a slower last epoch can still overrun it). Timing
            decides the epoch count, so such a run is not bit-reproducible; resuming counts the time
            already spent.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: ImageSet,
        *,
        out_dir: str | os.PathLike,
        epochs: int,
        batch_size: int,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: str = "cosine",
        warmup_epochs: float = 1.0,
        lam: float = 25.0,
        label_updates: int = 40,
        label_spacing: str = "quadratic",
        label_heads: str = "all",
        label_inputs: str = "eval",
        augment: BatchAugment,
        eval_transform: EvalTransform,
        device: torch.device,
        seed: int = 0,
        config: dict | None = None,
        workers: int = 4,
        progress: bool = True,
        sync_bn: bool = False,
        precision: str = "auto",
        objective: str = "sela",
        swap_temperature: float = 0.1,
        swap_epsilon: float = 0.05,
        swap_queue: int = 0,
        small_crops: int = 0,
        small_augment: BatchAugment | None = None,
        time_limit_s: float | None = None,
    ):
        n = len(train_set)
        world = dist.world_size()
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of processes {world}")
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the dataset ({n} images); lower it")
        if label_heads not in ("all", "round-robin"):
            raise ValueError(f"label_heads must be 'all' or 'round-robin', got {label_heads!r}")
        if label_inputs not in LABEL_INPUTS:
            raise ValueError(f"label_inputs must be one of {', '.join(LABEL_INPUTS)}, got {label_inputs!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if objective == "swapped" and label_inputs == "recorded":
            raise ValueError(
                "label_inputs 'recorded' needs the 'sela' objective (the swapped objective has no label "
                "steps during training); use --label-inputs eval"
            )
        if swap_temperature <= 0 or swap_epsilon <= 0:
            raise ValueError(
                f"swap temperature and epsilon must be > 0, got {swap_temperature}, {swap_epsilon}"
            )
        if swap_queue < 0 or (swap_queue and objective != "swapped"):
            raise ValueError(
                f"the queue (swap_queue) needs the swapped objective and a size >= 0, got {swap_queue} with "
                f"objective {objective!r}; add --objective swapped or drop swap_queue"
            )
        if small_crops < 0 or (small_crops and objective != "swapped"):
            raise ValueError(
                f"small crops (multi-crop) need the swapped objective and a count >= 0, got {small_crops} "
                f"with objective {objective!r}; add --objective swapped or drop --small-crops"
            )
        if small_crops and small_augment is None:
            raise ValueError("small_crops > 0 needs small_augment, the augmentation that makes them")
        if time_limit_s is not None and not time_limit_s > 0:
            raise ValueError(f"the time limit must be > 0 minutes (or unset), got {time_limit_s / 60:g}")
        if max(model.n_clusters) > n:
            raise ValueError(
                f"{max(model.n_clusters)} clusters but only {n} training images; use --clusters <= {n}"
            )
        self.objective = objective
        self.swap_temperature = swap_temperature
        self.swap_epsilon = swap_epsilon
        self.swap_queue = swap_queue
        self._queue = torch.empty(0, model.head_dim, device=device)  # (n_q, P), newest rows first
        self.small_crops = small_crops
        self.small_augment = small_augment
        if objective == "swapped":  # the heads become prototypes: cosine similarity, no bias
            if min(model.n_clusters) < model.head_dim:
                warnings.warn(
                    f"the swapped objective with {min(model.n_clusters)} prototypes in a {model.head_dim}-d "
                    "space: the features can turn orthogonal to them all and the loss collapses to ln K "
                    f"(seen on digits); use --clusters >= {model.head_dim} or a narrower head input",
                    stacklevel=2,
                )
            model.normalize_heads = True
            for head in model.heads:
                head.bias.data.zero_()
                head.bias.requires_grad_(False)
            _normalize_prototypes(model)
        self.model = model.to(device)
        self.device = device
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        if world > 1 and sync_bn:
            if device.type != "cuda":
                raise ValueError(
                    "--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU); drop "
                    "--sync-bn on CPU, where each process normalises with its own part of the batch"
                )
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.net = self.model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.train_set = train_set
        self.images = train_set.images.to(device) if train_set.in_memory else None
        self.out_dir = Path(out_dir)
        self.epochs = epochs
        self.batch_size = batch_size
        self.steps_per_epoch = n // batch_size
        self.base_lr = lr
        self.lr_schedule = lr_schedule
        self.warmup_steps = int(warmup_epochs * self.steps_per_epoch)
        self.lr_anchor: tuple[int, float] | None = None  # set when a time budget re-plans the length
        self.lr_at(0)  # validates the schedule name
        self.time_limit_s = time_limit_s
        self.epoch_times: list[float] = []  # seconds per finished epoch (mean over ranks)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False
        )
        self.lam = lam
        self.label_updates = label_updates
        self.label_spacing = label_spacing
        self.label_heads = label_heads
        self.label_inputs = label_inputs
        self.label_steps: list[int] = []  # optimisation steps before which a label step runs
        self.label_epochs: list[int] = []  # epochs (1-based) after which a recorded label step runs
        self._lay_out_label_steps(0)
        self.augment = augment
        self.eval_transform = eval_transform
        self.seed = seed
        self.config = config or {}
        self.workers = workers
        self.progress = progress and dist.is_main()
        n_heads = len(model.n_clusters)
        self.state = LabelState(labels=torch.zeros(n_heads, n, dtype=torch.long), scalings=[None] * n_heads)
        self.epoch = 0  # epochs completed
        amp = autocast_dtype(precision, device)
        self.precision = "fp32" if amp is None else "bf16"  # what "auto" resolved to
        self.autocast = torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
        self._label_memory: tuple[int, int | None] | None = None  # (buffers, peak) bytes, this epoch

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
        if self.objective == "swapped":  # labels come online; one global step after the last epoch
            self.label_steps = []
            return
        steps = label_schedule(self.label_updates, self.total_steps, self.label_spacing)
        if self.label_inputs == "recorded":  # the first step needs a pass, the others an epoch's outputs
            self.label_epochs = [
                e for e in label_epochs(steps, self.steps_per_epoch) if e > step // self.steps_per_epoch
            ]
            self.label_steps = [0] if step == 0 else []
        else:
            self.label_steps = [s for s in steps if s >= step]

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
        while max_epochs is None or len(history) < max_epochs:
            if self.time_limit_s and self.epoch_times and self.epoch < self.epochs:
                epochs = planned_epochs(self.epoch, self.epoch_times, self.time_limit_s)
                if epochs != self.epochs:
                    self.plan(epochs)
            if self.epoch >= self.epochs:
                break
            epoch = self.epoch
            stats = self.train_one_epoch(epoch)
            self.epoch = epoch + 1
            self.epoch_times.append(dist.all_reduce_mean(stats["time_s"], self.device))
            if dist.is_main():
                self._append_metrics(stats)
                self.save_checkpoint()
            self._check_health(stats)
            history.append(stats)
        return history

    def train_one_epoch(self, epoch: int) -> dict:
        """One pass over the data in global batches, with the label steps that fall inside it."""
        self.net.train()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # shuffling + augmentation
        # augmentation and dropout differ between ranks (or each rank would crop, flip and drop out its
        # images exactly like the others); rank 0 draws what a single process draws
        aug_gen = gen if dist.rank() == 0 else torch.Generator().manual_seed(self._rank_seed(epoch))
        torch.manual_seed(self._rank_seed(epoch))  # dropout
        start, label_time, loss_sum, seen = time.perf_counter(), 0.0, 0.0, 0
        first = epoch * self.steps_per_epoch
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not self.progress,
            leave=False,
            unit="batch",
        )
        rows = self._epoch_rows(epoch, gen)  # (n_r,) global rows, this rank's part of the epoch, in order
        self._queue = self._queue[:0]  # the swapped objective's queue starts empty every epoch
        record = self._recorder(epoch, len(rows))  # {head: (n_r, K_h) buffer} when labels come from this pass
        for i, (images, idx) in enumerate(self._batches(rows)):
            step = first + i
            # label step(s) scheduled before this optimisation step
            if step in self.label_steps:
                label_time += self.update_labels(step)
                self.net.train()
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(step)
            # forward, loss averaged over heads, backward
            if self.objective == "swapped":
                loss = self._swapped_loss(images, idx, aug_gen)
            else:
                views = self._views(images, aug_gen)  # (b, C, S, S)
                targets = self.state.labels[:, idx].to(self.device, non_blocking=True)  # (H, b)
                with self.autocast:
                    outputs = self.net(views)  # H x (b, K_h)
                    loss = sum(F.cross_entropy(o.float(), t) for o, t in zip(outputs, targets, strict=True))
                    loss = loss / len(outputs)
                for h, buf in record.items():
                    buf[i * len(idx) : (i + 1) * len(idx)] = outputs[h].detach()  # every batch: B / W rows
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.objective == "swapped":
                _normalize_prototypes(self.model)
            # bookkeeping (one host sync per step keeps the bar honest)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"loss became {loss_value} at epoch {epoch + 1}, step {step}; the last good checkpoint "
                    f"in {self.out_dir} is kept: lower --lr (now {self.base_lr}) and --resume"
                )
            loss_sum += loss_value * len(idx)
            seen += len(idx)
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{seen * dist.world_size() / elapsed:.0f}")
            bar.update()
        bar.close()
        if record:
            label_time += self._labels_from_records(rows, record)
        if self.objective == "swapped" and epoch + 1 == self.epochs:
            label_time += self.update_labels()  # the exported labels: one global, balanced assignment
        total = time.perf_counter() - start
        stats = {
            "epoch": epoch + 1,
            "loss": dist.all_reduce_mean(loss_sum / max(seen, 1), self.device),
            "lr": self.lr_at(first + self.steps_per_epoch - 1),
            "time_s": round(total, 3),
            "label_time_s": round(label_time, 3),
            "label_share": round(label_time / total, 4) if total > 0 else 0.0,
            **self._label_memory_stats(),
            "images_per_s": round(seen * dist.world_size() / total, 1),
            "label_updates": self.state.n_updates,
            "heads": [
                cluster_sizes(lab, k) for lab, k in zip(self.state.labels, self.model.n_clusters, strict=True)
            ],
        }
        return stats

    def _views(
        self, images: Tensor, generator: torch.Generator, augment: BatchAugment | None = None
    ) -> Tensor:
        """Augmented float views (b, C, S, S) of a uint8 batch (by ``augment``, default the training
        augmentation), in the device's preferred memory format."""
        views = (augment or self.augment)(images, generator=generator)
        if self.device.type == "cuda":
            views = views.contiguous(memory_format=torch.channels_last)
        return views

    def _swapped_loss(self, images: Tensor, idx: Tensor, generator: torch.Generator) -> Tensor:
        """The ``swapped`` objective on a batch, averaged over heads (a scalar with its graph).

        Two full augmented views of each image (and ``small_crops`` smaller ones) go through the network
        in one call; each head's cosine scores of the full views (2b, K_h) give per-batch balanced codes
        (:func:`sela.sinkhorn.soft_codes`, no gradient; balanced together with the queue's scores when
        ``swap_queue`` is set). Each full view's codes are the targets of every
        other view: cross-entropy of softmax(scores / T), averaged over the 1 + small_crops predicting
        views and the two targets (SwAV's loss). The first view's hard codes are kept as the images'
        current labels.
        """
        b, m = len(idx), self.small_crops
        views = torch.cat([self._views(images, generator), self._views(images, generator)])  # (2b, C, S, S)
        if m:  # multi-crop: (m b, C, s, s) small views, one more backbone pass in the same forward call
            small = torch.cat([self._views(images, generator, self.small_augment) for _ in range(m)])
            views = [views, small]
        with self.autocast:
            # H x ((2 + m) b, K_h) cosine similarities; ((2 + m) b, P) unit-norm head inputs
            outputs, z = self.net(views, embeddings=True)
        loss, labels = 0.0, []
        for h, scores in enumerate(outputs):
            scores = scores.float()
            balanced = scores[: 2 * b].detach()  # (2b, K_h)
            if len(self._queue):  # (2b + n_q, K_h): the queue scored by the current prototypes
                prototypes = self.model.heads[h].weight.detach().float()  # (K_h, P), unit rows
                balanced = torch.cat([balanced, self._queue @ prototypes.t()])
            codes = soft_codes(balanced, epsilon=self.swap_epsilon)[: 2 * b]  # (2b, K_h)
            logp = F.log_softmax(scores / self.swap_temperature, dim=1).view(2 + m, b, -1)  # (2 + m, b, K_h)
            # cross-entropy of every view against each full view's codes: (2, 2 + m) mean over images
            ce = -torch.einsum("vbk,ubk->vu", codes.view(2, b, -1), logp) / b
            loss = loss + (ce.sum() - ce[0, 0] - ce[1, 1]) / (2 * (1 + m))  # a view never predicts itself
            labels.append(codes[:b].argmax(1))  # the first view's codes
        self.state.labels[:, idx] = torch.stack(labels).cpu()  # (H, b), one transfer
        if self.swap_queue:  # newest first, the oldest rows drop out
            self._queue = torch.cat([z[: 2 * b].detach().float(), self._queue])[: self.swap_queue]
        return loss / len(outputs)

    def _rank_seed(self, epoch: int) -> int:
        """This rank's seed for an epoch's augmentation and dropout (rank 0: a single process's)."""
        return self.seed * 1_000_003 + epoch + dist.rank() * 1_000_003**2

    def _epoch_rows(self, epoch: int, gen: torch.Generator) -> Tensor:
        """This rank's rows (n_r,) of the epoch, in training order: its slice of each global batch."""
        n, b, world, r = len(self.train_set), self.batch_size, dist.world_size(), dist.rank()
        order = torch.randperm(n, generator=gen)[: self.steps_per_epoch * b]  # drop the last partial batch
        # the global batch t is order[t*b:(t+1)*b]; rank r takes its r-th slice of it
        return order.view(self.steps_per_epoch, world, b // world)[:, r].reshape(-1)

    def _batches(self, rows: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """The given rows in batches of B / W: (uint8 images (b, C, H, W) on the device, indices (b,))."""
        per = self.batch_size // dist.world_size()
        if self.images is not None:
            for s in range(0, len(rows), per):
                idx = rows[s : s + per]
                yield self.images[idx.to(self.device)], idx
            return
        loader = make_loader(
            self.train_set,
            per,
            sampler=rows.tolist(),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        for images, idx in loader:
            yield images.to(self.device, non_blocking=True), idx

    # ----------------------------------------------------------------------------------------------------
    # the label step

    @torch.no_grad()
    def update_labels(self, step: int | None = None) -> float:
        """Re-assign the labels of the scheduled heads with the Sinkhorn solver; returns seconds taken.

        Each rank computes features for its own rows (N / W), then for each head in turn fills one
        reused (N / W, K_h) logits buffer and solves in place with a warm start; labels are gathered to
        every rank (H x N integers, not N x K floats).
        """
        start = time.perf_counter()
        measured = dist.reset_peak_memory(self.device)
        heads = self._scheduled_heads(self.state.n_updates)
        rows = dist.shard_rows(len(self.train_set))  # (n_r,) global rows of this rank
        if self.state.n_updates == 0 and self.label_inputs == "eval" and self.objective == "sela":
            self._calibrate_batchnorm(rows[:4096])
        dist.average_buffers(self.model)  # one network on all ranks: their BatchNorm statistics drift apart
        feats = self._features(rows)  # (n_r, P)
        buffer = torch.empty(len(rows) * max(self.model.n_clusters), device=self.device)
        solver_copy = 0
        feats_finite = bool(torch.isfinite(feats).all())  # one pass over (n_r, P), not one per head
        for h in heads:
            head = self.model.heads[h]
            if not (feats_finite and torch.isfinite(head.weight).all()):
                raise self._diverged_outputs()
            logits = buffer[: len(rows) * head.out_features].view(len(rows), head.out_features)  # (n_r, K_h)
            for s in range(0, len(rows), 8192):
                torch.addmm(head.bias, feats[s : s + 8192].float(), head.weight.t(), out=logits[s : s + 8192])
            # in place (no second N x K buffer) only where memory matters: the copy keeps the logits for
            # the solver's log-domain fallback on extreme inputs
            # decided from the largest shard, so that every rank takes the same path through the solver
            big = -(-len(self.train_set) // dist.world_size()) * head.out_features * 4 > 2**30
            result = assign(logits, lam=self.lam, init=self.state.scalings[h], inplace=big)
            self.state.labels[h] = dist.gather_rows(result.labels, len(self.train_set)).cpu()
            self.state.scalings[h] = result.scaling
            solver_copy = max(solver_copy, 0 if big else logits.numel() * 4)  # float32 kernel
        self.state.n_updates += 1
        held = feats.numel() * feats.element_size() + buffer.numel() * buffer.element_size() + solver_copy
        peak = dist.peak_memory_bytes(self.device) if measured else None
        last = self._label_memory or (0, None)
        self._label_memory = (max(last[0], held), peak if last[1] is None else max(last[1], peak or 0))
        return time.perf_counter() - start

    def _diverged_outputs(self) -> TrainingDiverged:
        return TrainingDiverged(
            f"the network's outputs became NaN/inf before label update {self.state.n_updates + 1}; the "
            f"last good checkpoint in {self.out_dir} is kept: lower --lr (now {self.base_lr}) and --resume"
        )

    def _scheduled_heads(self, n_done: int) -> list[int]:
        """The heads that label step ``n_done + 1`` re-assigns: all, or one in turn (round-robin); the first
        step assigns every head (an unassigned head would train towards label 0)."""
        if self.label_heads == "all" or n_done == 0:
            return list(range(len(self.model.n_clusters)))
        return [n_done % len(self.model.n_clusters)]

    def _recorder(self, epoch: int, n_rows: int) -> dict[int, Tensor]:
        """Buffers {head: (n_r, K_h) float32} for the outputs of this epoch's training pass, when a
        recorded-output label step ends the epoch; {} otherwise. Memory: n_r x sum(K_h) x 4 bytes."""
        if epoch + 1 not in self.label_epochs:
            return {}
        first = epoch * self.steps_per_epoch
        n_done = self.state.n_updates + sum(
            first <= s < first + self.steps_per_epoch for s in self.label_steps
        )
        return {
            h: torch.empty(n_rows, self.model.n_clusters[h], device=self.device)
            for h in self._scheduled_heads(n_done)
        }

    @torch.no_grad()
    def _labels_from_records(self, rows: Tensor, record: dict[int, Tensor]) -> float:
        """Re-assign labels from the head outputs recorded during the epoch (augmented views, train mode,
        each from the network as it was at that image's step); returns seconds taken.

        ``rows`` (n_r,) are this rank's rows, disjoint between ranks; the images of the dropped last partial
        batch keep their labels. The solve is global (K-sized all-reduces); each rank's labels are scattered
        into an (N,) vector and combined with one all-reduce.
        """
        start = time.perf_counter()
        for h, logits in record.items():
            if not bool(torch.isfinite(logits).all()):
                raise self._diverged_outputs()
            result = assign(
                logits, lam=self.lam, init=self.state.scalings[h], inplace=logits.numel() * 4 > 2**30
            )
            full = dist.scatter_rows(result.labels, rows, len(self.train_set)).cpu()  # (N,), -1: not seen
            seen = full >= 0
            self.state.labels[h, seen] = full[seen]
            self.state.scalings[h] = result.scaling
        self.state.n_updates += 1
        held = sum(buf.numel() * buf.element_size() for buf in record.values())
        last = self._label_memory or (0, None)
        self._label_memory = (max(last[0], held), last[1])
        return time.perf_counter() - start

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

    def _row_batches(self, rows: Tensor) -> Iterator[tuple[Tensor, int]]:
        """The given rows in order, in batches: (uint8 images (b, C, H, W) on the device, offset into rows)."""
        bs = max(256, self.batch_size)
        if self.images is not None:
            for s in range(0, len(rows), bs):
                yield self.images[rows[s : s + bs].to(self.device)], s
            return
        loader = make_loader(self.train_set, bs, sampler=rows.tolist(), num_workers=self.workers)
        for i, (images, _) in enumerate(loader):
            yield images.to(self.device, non_blocking=True), i * bs

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
        for images, _ in self._row_batches(rows):
            with self.autocast:
                self.model.head_inputs(self.model.forward_features(self.eval_transform(images)))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum

    def _features(self, rows: Tensor) -> Tensor:
        """The heads' inputs (n_r, P) for the given rows: eval mode on un-augmented images (default), or
        train mode on augmented views (the original code's choice; also the first step of "recorded")."""
        train_mode = self.label_inputs != "eval"
        self.model.train(train_mode)
        transform = self.augment if train_mode else self.eval_transform
        out = torch.empty(len(rows), self.model.head_dim, device=self.device)
        for images, s in self._row_batches(rows):
            x = transform(images)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                out[s : s + len(images)] = self.model.head_inputs(self.model.forward_features(x)).float()
        return out

    # ----------------------------------------------------------------------------------------------------
    # checkpoints, metrics, health

    def save_checkpoint(self) -> None:
        """Write checkpoint.pt atomically (temporary file + rename) so a crash never leaves half a file."""
        ckpt = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "labels": self.state.labels,
            "scalings": self.state.scalings,
            "label_updates_done": self.state.n_updates,
            "epoch": self.epoch,
            "plan": {  # the run's length and schedules as planned now (a time budget changes them)
                "epochs": self.epochs,
                "lr_anchor": self.lr_anchor,
                "label_steps": self.label_steps,
                "label_epochs": self.label_epochs,
                "epoch_times": self.epoch_times,
            },
            "config": self.config,
            "rng": {"torch": torch.get_rng_state()},
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / (CHECKPOINT + ".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, self.out_dir / CHECKPOINT)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Continue exactly where a run stopped (weights, optimiser, labels, scalings, epoch)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        mismatched = compare_configs(ckpt.get("config", {}), self.config)
        if mismatched:
            raise ValueError(
                f"checkpoint {path} was written with a different configuration ({'; '.join(mismatched)}); "
                "resume with the same settings or start a new --out directory"
            )
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["labels"].shape != self.state.labels.shape:
            raise ValueError(f"checkpoint {path} holds labels for another dataset or number of heads")
        self.state = LabelState(
            ckpt["labels"],
            [None if s is None else s.to(self.device) for s in ckpt["scalings"]],
            ckpt["label_updates_done"],
        )
        self.epoch = ckpt["epoch"]
        plan = ckpt.get("plan")
        if plan:
            self.epochs = plan["epochs"]
            self.lr_anchor = tuple(plan["lr_anchor"]) if plan["lr_anchor"] else None
            self.label_steps, self.label_epochs = plan["label_steps"], plan["label_epochs"]
            self.epoch_times = plan["epoch_times"]

    def _append_metrics(self, stats: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / METRICS, "a") as f:
            f.write(json.dumps(stats) + "\n")

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
            what = (  # swapped: online codes, balanced within each batch only
                "prototypes that no image's codes chose this epoch; harmless if it passes after the first "
                "epochs, else use fewer --clusters"
                if self.objective == "swapped"
                else "empty clusters (partial collapse); more label updates or a larger --lam keep clusters "
                "balanced"
            )
            warnings.warn(f"epoch {stats['epoch']}: heads {empty} have {what}", stacklevel=2)


@torch.no_grad()
def _normalize_prototypes(model: nn.Module) -> None:
    """Scale every head's weight rows (the prototypes) to unit L2 norm, in place."""
    for head in model.heads:
        head.weight.div_(head.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))


_MUST_MATCH = (
    "dataset",
    "arch",
    "widths",
    "pools",
    "projector",
    "heads",
    "clusters",
    "image_size",
    "batch_size",
    "epochs",
    "label_updates",
    "label_spacing",
    "label_heads",
    "seed",
    "objective",
    "small_crops",
    "crop_size",
    "time_limit",
)


def compare_configs(saved: dict, current: dict) -> list[str]:
    """The settings that must agree for an exact resume and differ: 'key: saved -> current'."""
    return [
        f"{k}: {saved[k]!r} -> {current[k]!r}"
        for k in _MUST_MATCH
        if k in saved and k in current and saved[k] != current[k]
    ]


# --------------------------------------------------------------------------------------------------------
# the end of a run: labels.csv, plots, evaluation, summary.json


def evaluate_run(
    model: nn.Module,
    labels: Tensor,
    train_set: ImageSet,
    test_set: ImageSet | None,
    *,
    transform: EvalTransform,
    device: torch.device,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    progress: bool = False,
) -> dict:
    """Weighted kNN top-1 on the test split and NMI/ARI/accuracy of each head's self-labels vs the truth.

    Returns {} when the training set has no ground truth. Keys: ``knn_top1``, ``knn_top5`` (percent),
    ``nmi``, ``ari``, ``accuracy`` (percent) of the best head by NMI, ``best_head`` and ``heads`` (per head).
    """
    from sela.eval.features import extract
    from sela.eval.knn import knn_accuracy
    from sela.eval.metrics import cluster_metrics

    if train_set.targets is None or (train_set.targets < 0).all():
        return {}
    truth = train_set.targets
    heads = []
    for h, k in enumerate(model.n_clusters):
        m = cluster_metrics(labels[h], truth, n_clusters=k)
        heads.append({"head": h, "k": k, **{key: m[key] for key in ("nmi", "ami", "ari", "accuracy")}})
    best = max(range(len(heads)), key=lambda i: heads[i]["nmi"])
    summary = {key: heads[best][key] for key in ("nmi", "ami", "ari", "accuracy")}
    summary.update(best_head=best, heads=heads)
    if train_set.in_memory and train_set.images[0].numel() * len(train_set) <= 5_000_000:
        # the baseline the issue asks to print beside the self-labels: k-means on raw pixels, same K
        from sklearn.cluster import KMeans
        from sklearn.metrics import normalized_mutual_info_score

        pixels = train_set.images.flatten(1).float().numpy()
        k = model.n_clusters[best]
        pred = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(pixels - pixels.mean(0))
        summary["kmeans_pixels_nmi"] = float(normalized_mutual_info_score(truth.numpy(), pred))
    if test_set is not None and test_set.targets is not None:
        source = train_set.images if train_set.in_memory else make_loader(train_set, 256)
        bank = extract(model, source, transform=transform, device=device, heads=False, progress=progress)
        source = test_set.images if test_set.in_memory else make_loader(test_set, 256)
        query = extract(model, source, transform=transform, device=device, heads=False, progress=progress)
        acc = knn_accuracy(
            bank.features,
            truth,
            query.features,
            test_set.targets,
            k=knn_k,
            temperature=knn_temperature,
            device=device,
        )
        summary = {"knn_top1": acc["top1"], "knn_top5": acc["top5"], **summary}
    return summary


def finish_run(trainer: Trainer, test_set: ImageSet | None, *, knn_k: int, knn_temperature: float) -> dict:
    """Write labels.csv, the plots and summary.json into the run directory; returns the summary."""
    from sela.plots import cluster_grid, plot_cluster_sizes, plot_curves

    if not dist.is_main():
        return {}  # the evaluation has no collectives: rank 0 alone does it while the others exit
    out, labels, train_set = trainer.out_dir, trainer.state.labels, trainer.train_set
    summary = evaluate_run(
        trainer.model,
        labels,
        train_set,
        test_set,
        transform=trainer.eval_transform,
        device=trainer.device,
        knn_k=knn_k,
        knn_temperature=knn_temperature,
        progress=trainer.progress,
    )
    from sela.export import write_labels_csv  # the CSV format `sela labels` reads back

    write_labels_csv(out / "labels.csv", labels, paths=train_set.paths)
    metrics = [json.loads(line) for line in open(out / METRICS)] if (out / METRICS).exists() else []
    plot_curves(metrics, out / "curves.png")
    plot_cluster_sizes(labels, list(trainer.model.n_clusters), out / "cluster_sizes.png")
    if train_set.in_memory:
        head = summary.get("best_head", 0)
        sizes = torch.bincount(labels[head], minlength=trainer.model.n_clusters[head])
        top = sizes.argsort(descending=True)[:12].tolist()  # the dozen largest clusters of the best head
        cluster_grid(train_set.images, labels[head], top, out / "clusters.png")
    summary = {
        "epochs": trainer.epoch,
        "label_updates": trainer.state.n_updates,
        "train_time_s": round(sum(m["time_s"] for m in metrics), 2),
        "label_time_s": round(sum(m["label_time_s"] for m in metrics), 2),
        **summary,
    }
    if metrics:
        summary["label_share"] = round(summary["label_time_s"] / max(summary["train_time_s"], 1e-9), 4)
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary
