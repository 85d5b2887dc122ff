"""The label pass of training: new labels for all N images from the network's heads.

:class:`LabelPass` re-assigns the scheduled heads' labels (the label layer, :class:`sela.labeller.LabelState`,
solves) from a pass over all images (:meth:`LabelPass.run`), or from the head outputs recorded during
an epoch (:meth:`LabelPass.recorder`, :meth:`LabelPass.from_records`); before the first eval-mode pass
it calibrates BatchNorm from the data; it keeps account of the memory its steps hold and of how much
each step changed every head's labels (:attr:`LabelPass.agreement`). The heads' logits
are the model's (:meth:`sela.models.SelaModel.head_logits`). :class:`ImageRows` gives the images of
given rows in batches, for this pass and the training loop alike.

Letters: N training images, H heads, K_h clusters of head h, P the heads' input width, W ranks, n_r the
rows of one rank.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from sela import distributed as dist
from sela.data import EvalTransform, ImageSet, make_loader
from sela.eval.signals import step_agreement
from sela.labeller import LabelState
from sela.objectives import Objective

LABEL_INPUTS = ("eval", "train", "recorded")
LABEL_HEADS = ("all", "round-robin")


class TrainingDiverged(RuntimeError):
    """The loss or the network's outputs became NaN or inf."""


class ImageRows:
    """The images of given rows of a training set, in order and in batches, on the device (in-memory
    images are moved there once; streamed ones are decoded by ``workers`` DataLoader workers)."""

    def __init__(self, train_set: ImageSet, device: torch.device, *, per: int, workers: int):
        self.train_set, self.device, self.per, self.workers = train_set, device, per, workers
        self.images = train_set.images.to(device) if train_set.in_memory else None

    def __call__(self, rows: Tensor, per: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of ``per`` (default: this rank's part of a global batch) rows: (uint8 images
        (b, C, H, W) on the device, their rows (b,))."""
        per = per or self.per
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


class LabelPass:
    """Label steps over all images for a model, its label state and objective.

    Args:
        model: the :class:`sela.models.SelaModel` (not its DistributedDataParallel wrapper).
        state: the labels it updates.
        objective: the augmentation (``train`` inputs), the logits' scale and the ``after_labels`` hook.
        images: the training images by row.
        eval_transform: the un-augmented transform (``eval`` inputs).
        label_inputs: ``eval``, ``train`` or ``recorded`` (its first step is a ``train`` pass).
        label_heads: ``all`` heads per step, or ``round-robin``.
        calibrate: set BatchNorm statistics from the data before the first (eval-mode) pass.
        batch_size: the global training batch (a pass's batches hold at least 256 images).
        autocast: the forward passes' autocast context.
        advice: what to do about diverged outputs (a sentence for :class:`TrainingDiverged`).

    Attributes:
        memory: (buffers, peak) bytes of this epoch's steps so far, or None; see :meth:`memory_stats`.
        agreement: per head, the NMI between its labels just before and just after its latest label step
            (:func:`sela.eval.signals.step_agreement`, over the rows the step re-assigned on this rank), or
            None before its second step (the first has no labels to compare with; an online objective's
            labels, set during training, count as labels). Computed on rank 0 only; see
            :meth:`agreement_stats`.
    """

    def __init__(
        self,
        model: nn.Module,
        state: LabelState,
        objective: Objective,
        images: ImageRows,
        *,
        eval_transform: EvalTransform,
        label_inputs: str,
        label_heads: str,
        calibrate: bool,
        batch_size: int,
        autocast: contextlib.AbstractContextManager,
        advice: Callable[[], str],
    ):
        self.model, self.state, self.objective, self.images = model, state, objective, images
        self.eval_transform, self.label_inputs, self.label_heads = eval_transform, label_inputs, label_heads
        self.calibrate, self.batch_size, self.autocast, self.advice = calibrate, batch_size, autocast, advice
        self.device = images.device
        self.memory: tuple[int, int | None] | None = None
        self.agreement: list[float | None] = [None] * len(model.n_clusters)
        self._fresh: set[int] = set()  # heads whose agreement changed since agreement_stats

    def heads(self, n_done: int) -> list[int]:
        """The heads that label step ``n_done + 1`` re-assigns: all, or one in turn (round-robin); the first
        step assigns every head (an unassigned head would train towards label 0)."""
        if self.label_heads == "all" or n_done == 0:
            return list(range(len(self.model.n_clusters)))
        return [n_done % len(self.model.n_clusters)]

    @torch.no_grad()
    def run(self) -> float:
        """Re-assign the labels of the scheduled heads from a pass over all images; returns seconds taken.

        Each rank computes the heads' inputs for its own rows (N / W), then for each head in turn fills
        one reused (N / W, K_h) logits buffer and re-labels from it (warm-started, global solve).
        """
        start = time.perf_counter()
        measured = dist.reset_peak_memory(self.device)
        rows = dist.shard_rows(len(self.images.train_set))  # (n_r,) global rows of this rank
        if self.state.n_updates == 0 and self.calibrate:
            self.calibrate_batchnorm(rows[:4096])
        dist.average_buffers(self.model)  # one network on all ranks: their BatchNorm statistics drift apart
        feats = self.head_inputs(rows)  # (n_r, P)
        if self.model.normalize_heads:  # cosine heads score normalised inputs, as in the loss
            feats = torch.nn.functional.normalize(feats, dim=1)
        buffer = torch.empty(len(rows) * max(self.model.n_clusters), device=self.device)
        feats_finite = bool(torch.isfinite(feats).all())  # one pass over (n_r, P), not one per head
        solver_copy = 0
        for h in self.heads(self.state.n_updates):
            k = self.model.n_clusters[h]
            if not (feats_finite and torch.isfinite(self.model.heads[h].weight).all()):
                raise self._diverged()
            logits = self.model.head_logits(feats, h, out=buffer[: len(rows) * k].view(len(rows), k))
            if self.objective.logit_scale != 1.0:
                logits.mul_(self.objective.logit_scale)
            self._relabel(h, logits, rows)
            self.objective.after_labels(self.model, h, feats, self.state.labels[h, rows])
            in_place = self.state.solves_in_place(k)
            solver_copy = max(solver_copy, 0 if in_place else logits.numel() * 4)  # the solver's kernel
        self.state.n_updates += 1
        held = feats.numel() * feats.element_size() + buffer.numel() * buffer.element_size() + solver_copy
        self._note_memory(held, dist.peak_memory_bytes(self.device) if measured else None)
        return time.perf_counter() - start

    def recorder(self, n_rows: int, n_done: int) -> dict[int | str, Tensor]:
        """Buffers {head: (n_r, K_h) float32} for the outputs of an epoch's training pass whose end holds
        label step ``n_done + 1``, with "z": (n_r, P) for the heads' inputs when the objective needs them.
        Memory: n_r x (sum(K_h) [+ P]) x 4 bytes."""
        record: dict[int | str, Tensor] = {
            h: torch.empty(n_rows, self.model.n_clusters[h], device=self.device) for h in self.heads(n_done)
        }
        if self.objective.needs_embeddings:
            record["z"] = torch.empty(n_rows, self.model.head_dim, device=self.device)
        return record

    @torch.no_grad()
    def from_records(self, rows: Tensor, record: dict[int | str, Tensor]) -> float:
        """Re-assign labels from the head outputs recorded during the epoch (augmented views, train mode,
        each from the network as it was at that image's step); returns seconds taken.

        ``rows`` (n_r,) are this rank's rows, disjoint between ranks; the images of the dropped last partial
        batch keep their labels.
        """
        start = time.perf_counter()
        for h in [h for h in record if h != "z"]:
            if not bool(torch.isfinite(record[h]).all()):
                raise self._diverged()
            self._relabel(h, record[h], rows)
            if "z" in record:
                self.objective.after_labels(self.model, h, record["z"], self.state.labels[h, rows])
        self.state.n_updates += 1
        self._note_memory(sum(buf.numel() * buf.element_size() for buf in record.values()), None)
        return time.perf_counter() - start

    def _relabel(self, head: int, logits: Tensor, rows: Tensor) -> None:
        """Re-assign ``head``'s labels of ``rows`` (n_r,) from ``logits`` (n_r, K_h), and note how much they
        changed: the NMI between the rows' labels before and after (one bincount of n_r: 20 ms for 1.3M)."""
        compare = dist.is_main() and (self.state.n_updates > 0 or self.objective.online_labels)
        before = self.state.labels[head, rows].clone() if compare else None  # (n_r,)
        self.state.relabel(head, logits, rows)
        if before is not None:
            self.agreement[head] = step_agreement(before, self.state.labels[head, rows])
            self._fresh.add(head)

    def agreement_stats(self) -> dict:
        """``{"label_agreement": mean NMI}`` over the heads re-labelled since the last call (each at its
        latest step, see :attr:`agreement`), rounded to 4 digits; {} when none was (no label step, or only
        the first). Resets the account for the next epoch."""
        fresh = [self.agreement[h] for h in sorted(self._fresh)]
        self._fresh = set()
        return {"label_agreement": round(sum(fresh) / len(fresh), 4)} if fresh else {}

    def calibrate_batchnorm(self, rows: Tensor) -> None:
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
        for images, _ in self.images(rows, max(256, self.batch_size)):
            with self.autocast:
                self.model.head_inputs(self.model.forward_features(self.eval_transform(images)))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum

    def head_inputs(self, rows: Tensor) -> Tensor:
        """The heads' inputs (n_r, P) for the given rows: eval mode on un-augmented images (default), or
        train mode on augmented views (the original code's choice; also the first step of "recorded")."""
        train_mode = self.label_inputs != "eval"
        self.model.train(train_mode)
        transform = self.objective.augment if train_mode else self.eval_transform
        out = torch.empty(len(rows), self.model.head_dim, device=self.device)
        s = 0
        for images, _ in self.images(rows, max(256, self.batch_size)):
            x = transform(images)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                out[s : s + len(images)] = self.model.head_inputs(self.model.forward_features(x)).float()
            s += len(images)
        return out

    def memory_stats(self) -> dict:
        """Memory of this epoch's label steps in MiB, the largest over ranks ({} when there were none);
        resets the account for the next epoch.

        ``label_buffers_mb``: the head inputs (n_r, P), logits (n_r, K) and solver kernel (n_r, K, when not
        solved in place) one rank holds; ``label_peak_mb``: measured, the peak of CUDA allocations on a GPU
        or of the process's resident memory (VmHWM, dataset and model included) on CPU.
        """
        if self.memory is None:
            return {}
        held, peak = self.memory
        self.memory = None
        peak = dist.all_reduce_max(-1.0 if peak is None else float(peak), self.device)
        return {
            "label_buffers_mb": round(dist.all_reduce_max(float(held), self.device) / 2**20, 1),
            "label_peak_mb": round(peak / 2**20, 1) if peak >= 0 else None,
        }

    def _note_memory(self, held: int, peak: int | None) -> None:
        last = self.memory or (0, None)
        self.memory = (max(last[0], held), peak if last[1] is None else max(last[1], peak or 0))

    def _diverged(self) -> TrainingDiverged:
        return TrainingDiverged(
            f"the network's outputs became NaN/inf before label update {self.state.n_updates + 1}; "
            f"{self.advice()}"
        )
