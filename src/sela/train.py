"""The SeLa training loop: label steps (Sinkhorn) alternating with epochs of the objective's loss.

Letters: N training images, B batch, H heads, K_h clusters of head h, P the heads' input width, W ranks,
n_r the rows of one rank.

The method (Asano et al. 2020, Alg. 1): labels for all N images are assigned by the label layer
(:class:`sela.labeller.LabelState`, Sinkhorn) from every head's outputs (the first time from the randomly
initialised network), then the network is trained with cross-entropy against them on augmented views,
averaged over heads; label steps recur on a schedule. The :class:`Trainer` is a loop (:meth:`Trainer.fit`,
:meth:`Trainer.train_one_epoch`) over three parts: the plan (:class:`sela.plan.Plan`: the run's length,
learning rate and label schedule, re-planned by a time budget), the label pass
(:class:`sela.labelpass.LabelPass`: new labels from a pass over all images, or from the outputs recorded
during an epoch with ``label_inputs="recorded"``) and the sinks (:mod:`sela.sinks`: metrics.jsonl, the
console line, the health warnings). The objective (:mod:`sela.objectives`) says what the loss of a batch
is; one whose labels come online gets no label step during training and one global step after its last
epoch. Under ``torchrun`` every rank trains on its part of each global batch with
DistributedDataParallel, and the label step is sharded: each rank computes outputs for its own rows only
and the solver all-reduces K-sized vectors. The run directory's files are :mod:`sela.rundir`'s; the end of
a run (labels.csv, plots, evaluation) is :func:`sela.finish.finish_run`.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sela import distributed as dist
from sela import rundir
from sela.data import EvalTransform, ImageSet
from sela.eval.metrics import cluster_sizes
from sela.finish import finish_run
from sela.labeller import DEFAULT_RELAX, LabelState
from sela.labelpass import LABEL_HEADS, LABEL_INPUTS, ImageRows, LabelPass, TrainingDiverged
from sela.objectives import Objective
from sela.plan import Plan
from sela.schedule import LABEL_SHARE, label_pass_epochs
from sela.sinkhorn import DEFAULT_LAM
from sela.sinks import HealthCheck, Sink, default_sinks

__all__ = [
    "LABEL_HEADS",
    "LABEL_INPUTS",
    "PRECISIONS",
    "Trainer",
    "TrainingDiverged",
    "autocast_dtype",
    "finish_run",
    "native_bf16",
]

PRECISIONS = ("auto", "fp32", "bf16")


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
        model: features + a list of linear heads, from ``sela.models.create_model(...,
            normalize_heads=objective.cosine_heads)``.
        train_set: training images (in memory or streamed); its targets are never used for training.
        objective: what a batch's loss is (:mod:`sela.objectives`, e.g. ``make_objective``).
        out_dir: run directory (written by rank 0 only).
        epochs, batch_size, lr, momentum, weight_decay, lr_schedule, warmup_epochs: SGD settings;
            batch_size is the global batch over all ranks.
        lam: lambda of the label step (:class:`sela.labeller.LabelState`).
        marginal, relax: the clusters' share of the images and the relaxed marginal's KL weight
            (:class:`sela.labeller.LabelState`).
        label_updates, label_spacing, label_share: the label steps over the run (the first at step 0),
            their spacing, and the largest share of the training time that label passes may take (closer
            steps merge); see :class:`sela.plan.Plan`.
        label_heads: ``all`` heads per label step, or ``round-robin`` (one in turn; the first: all).
        label_inputs: ``eval`` (un-augmented images, eval mode), ``train`` (augmented, train mode, the
            original code's choice) or ``recorded`` (the epoch's own training outputs, no extra pass).
        eval_transform: the un-augmented transform, for the label step.
        device: where the model and (in-memory) images live.
        seed: all randomness (initial weights aside) derives from (seed, epoch).
        workers, progress: DataLoader workers for streamed datasets; tqdm bars (rank 0 only).
        sync_bn: synchronise BatchNorm across processes (CUDA only).
        precision: ``auto``, ``bf16`` or ``fp32``; see :func:`autocast_dtype`.
        time_limit_s: a wall-clock budget (seconds, label steps included): ``epochs`` is then the first plan,
            re-planned after each epoch at the measured epoch time (:meth:`sela.plan.Plan.fit_budget`); not
            bit-reproducible; resuming counts the time already spent.
        metadata: JSON-ready description of the run, stored in every checkpoint (never read here).
        log: called with one line per epoch (and a note when the budget stops the run); None: silent.
        monitor, monitor_every: ``monitor(model)`` -> a dict of JSON-ready numbers (e.g. the kNN top-1),
            called on rank 0 after every ``monitor_every``-th epoch and the last; they join that epoch's
            metrics line with their own time (``monitor_time_s``), which the epoch time leaves out.
        sinks: where the numbers go (:class:`sela.sinks.Sink`, rank 0 only); None: metrics.jsonl in
            ``out_dir`` and the console line through ``log`` (:func:`sela.sinks.default_sinks`).
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
        marginal: str = "uniform",
        relax: float = DEFAULT_RELAX,
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
        sinks: Sequence[Sink] | None = None,
    ):
        n, steps, settings = len(train_set), len(train_set) // batch_size, (label_heads, label_inputs)
        _check_settings(n, model, objective, epochs, batch_size, lr, *settings, time_limit_s, monitor_every)
        self.objective, self.train_set, self.device = objective, train_set, device
        self.eval_transform, self.metadata, self.log = eval_transform, metadata or {}, log
        objective.prepare(model)
        self.model, self.net = _place(model, device, sync_bn)
        self.out_dir, self.batch_size, self.seed, self.workers = Path(out_dir), batch_size, seed, workers
        self._advice = functools.partial(_advice, self.out_dir, lr)
        self.images = ImageRows(train_set, device, per=batch_size // dist.world_size(), workers=workers)
        self.plan = Plan(
            epochs, steps, lr, lr_schedule=lr_schedule, warmup_steps=int(warmup_epochs * steps),
            label_updates=label_updates, label_spacing=label_spacing, label_inputs=label_inputs,
            label_share=label_share, labels_at_end=objective.online_labels, time_limit_s=time_limit_s,
            pass_epochs=label_pass_epochs(eval_transform.out_size, objective.augment.out_size),
        )  # fmt: skip
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr, momentum, weight_decay=weight_decay)
        self.state = LabelState(
            len(model.n_clusters), n, lam=lam, soft=objective.soft_targets, marginal=marginal, relax=relax
        )
        self.precision, self.autocast = _autocast(precision, device)
        self.label_pass = LabelPass(
            self.model, self.state, objective, self.images, eval_transform=eval_transform,
            label_inputs=label_inputs, label_heads=label_heads, batch_size=batch_size, autocast=self.autocast,
            calibrate=label_inputs == "eval" and not objective.online_labels, advice=self._advice,
        )  # fmt: skip
        self.monitor, self.epoch = _Monitor(monitor, monitor_every), 0  # epochs completed
        self.health = HealthCheck(model.n_clusters, objective.empty_advice)
        self.progress, self.sinks = progress and dist.is_main(), _rank0_sinks(sinks, out_dir, log, self.plan)

    @property
    def epochs(self) -> int:
        """The run's length in epochs as planned now."""
        return self.plan.epochs

    def fit(self, max_epochs: int | None = None) -> list[dict]:
        """Train from ``self.epoch`` to ``epochs`` (or for at most ``max_epochs`` epochs now, e.g. to stop
        and resume later); returns the metrics of the epochs run now. The sinks close when the run ends."""
        history: list[dict] = []
        try:
            while (max_epochs is None or len(history) < max_epochs) and self.epoch < self.epochs:
                history.append(self._next_epoch())
        except BaseException:
            self.close()
            raise
        if self.epoch >= self.epochs:
            self.close()
        return history

    def _next_epoch(self) -> dict:
        """Train epoch ``self.epoch``, then re-plan, monitor, write, checkpoint and check it."""
        stats = self.train_one_epoch(self.epoch)
        self.epoch += 1
        self.plan.epoch_times.append(dist.all_reduce_mean(stats["time_s"], self.device))
        note = None
        if self.plan.time_limit_s and self.epoch < self.epochs:  # the budget re-plans the rest
            note = self.plan.fit_budget(self.epoch, stats)
            if self.plan.final_pass(self.epoch - 1):  # this epoch became the last: the final labels
                stats = _with_label_time(stats, self.update_labels(), self.state, self.model.n_clusters)
                stats.update(self.label_pass.agreement_stats())
        if dist.is_main():
            if self.monitor.due(self.epoch, self.epochs):
                stats = {**stats, **self.monitor(self.model)}
                self.net.train()
            for sink in self.sinks:
                sink.on_epoch(stats)
            self.save_checkpoint()
            self.health.on_epoch(stats)
            if note and self.log:
                self.log(note)
        return stats

    def train_one_epoch(self, epoch: int) -> dict:
        """One pass over the data in global batches, with the label steps that fall inside it."""
        self.net.train()
        start, label_time, loss_sum, seen, passes = time.perf_counter(), 0.0, 0.0, 0, 0
        first, steps = epoch * self.plan.steps_per_epoch, self.plan.steps_per_epoch
        rows, aug_gen = _epoch_draws(self.seed, epoch, len(self.train_set), self.batch_size, steps)  # (n_r,)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch",
                   disable=not self.progress, leave=False)  # fmt: skip
        self.objective.start_epoch()
        record = self._recorder(epoch, len(rows))  # {head: (n_r, K_h) buffer} when labels come from this pass
        for i, (images, idx) in enumerate(self.images(rows)):
            step = first + i
            if step in self.plan.label_steps:  # label step(s) scheduled before this optimisation step
                label_time += self.update_labels()
                self.plan.last_label_step, passes = step, passes + 1
                self.net.train()
            loss_value = self._step(step, images, idx, aug_gen, record, i * len(idx))
            loss_sum, seen = loss_sum + loss_value * len(idx), seen + len(idx)
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{seen * dist.world_size() / elapsed:.0f}")
            bar.update()
        bar.close()
        if record:
            label_time += self.label_pass.from_records(rows, record)
        if self.plan.final_pass(epoch):  # the exported labels: one global, balanced assignment
            label_time += self.update_labels()
        stats = self._epoch_stats(epoch, time.perf_counter() - start, label_time, loss_sum, seen)
        return {**stats, "label_passes": passes}

    def _step(self, step: int, images: Tensor, idx: Tensor, generator, record: dict, at: int) -> float:
        """One optimisation step on a batch (its outputs recorded from row ``at`` when ``record``); its loss."""
        lr = self.plan.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, outputs = self.objective.loss(
            self.net, images, idx, self.state, generator=generator, autocast=self.autocast
        )
        for h, buf in record.items():
            buf[at : at + len(idx)] = outputs[h]  # every batch: B / W rows
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.objective.after_step(self.model)
        value = _checked(loss, step, self.plan.steps_per_epoch, self._advice)  # one host sync per step
        for sink in self.sinks:
            sink.on_step(step, {"loss": value, "lr": lr})
        return value

    def _recorder(self, epoch: int, n_rows: int) -> dict[int | str, Tensor]:
        if not self.plan.records(epoch):
            return {}
        return self.label_pass.recorder(n_rows, self.state.n_updates + self.plan.passes_before(epoch))

    def update_labels(self) -> float:
        """Re-assign the scheduled heads' labels from a pass over all images; returns seconds taken."""
        return self.label_pass.run()

    def close(self) -> None:
        """Close the sinks (the run has ended)."""
        for sink in self.sinks:
            sink.close()

    def _epoch_stats(self, epoch: int, total: float, label_time: float, loss_sum: float, seen: int) -> dict:
        """The epoch's line of metrics.jsonl."""
        return {
            "epoch": epoch + 1,
            "loss": dist.all_reduce_mean(loss_sum / max(seen, 1), self.device),
            "lr": self.plan.lr_at((epoch + 1) * self.plan.steps_per_epoch - 1),
            "time_s": round(total, 3),
            "label_time_s": round(label_time, 3),
            "label_share": round(label_time / total, 4) if total > 0 else 0.0,
            **self.label_pass.memory_stats(),
            **self.label_pass.agreement_stats(),
            "images_per_s": round(seen * dist.world_size() / total, 1),
            "label_updates": self.state.n_updates,
            "heads": _cluster_sizes(self.state, self.model.n_clusters),
        }

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
                "plan": self.plan.state_dict(),
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
        if ckpt.get("plan"):
            self.plan.load_state_dict(ckpt["plan"])
        if dist.is_main():
            lines = rundir.truncate_metrics(self.out_dir, self.epoch)
            if not ckpt.get("plan"):  # format 1 before plans: the time spent is in the metrics
                self.plan.epoch_times = [m["time_s"] for m in lines]


def _checked(loss: Tensor, step: int, steps_per_epoch: int, advice: Callable[[], str]) -> float:
    """The loss of optimisation step ``step`` as a float; :class:`TrainingDiverged` when it is NaN or inf."""
    value = float(loss.detach())
    if not math.isfinite(value):
        epoch = step // steps_per_epoch + 1
        raise TrainingDiverged(f"loss became {value} at epoch {epoch}, step {step}; {advice()}")
    return value


def _advice(out_dir: Path, lr: float) -> str:
    """What to do after the run diverged: lower the learning rate, then resume or start again."""
    kept = (out_dir / rundir.CHECKPOINT).is_file()
    where = f"the last good checkpoint in {out_dir} is kept: " if kept else "no epoch finished: "
    then = " and --resume" if kept else " and start again"
    return f"{where}lower --lr (now {lr}){then}"


class _Monitor:
    """The Trainer's ``monitor``, due after every ``every``-th epoch and the last (never without one)."""

    def __init__(self, monitor: Callable[[nn.Module], dict] | None, every: int):
        self.monitor, self.every = monitor, every

    def due(self, done: int, epochs: int) -> bool:
        return self.monitor is not None and self.every > 0 and (done % self.every == 0 or done == epochs)

    def __call__(self, model: nn.Module) -> dict:
        """The monitor's numbers for the model as it is now, and the seconds they took."""
        start = time.perf_counter()
        result = self.monitor(model)
        return {**result, "monitor_time_s": round(time.perf_counter() - start, 3)}


def _rank0_sinks(
    sinks: Sequence[Sink] | None, out_dir, log: Callable[[str], None] | None, plan: Plan
) -> list[Sink]:
    """The sinks on rank 0 (None: :func:`sela.sinks.default_sinks`); none on the other ranks, which write nothing."""
    if not dist.is_main():
        return []
    return default_sinks(out_dir, log, plan) if sinks is None else list(sinks)


def _with_label_time(stats: dict, extra: float, state: LabelState, n_clusters: list[int]) -> dict:
    """An epoch's metrics line after ``extra`` seconds of one more label step (the run's final labels)."""
    stats = {**stats, "label_time_s": round(stats["label_time_s"] + extra, 3)}
    stats["time_s"] = round(stats["time_s"] + extra, 3)
    stats["label_share"] = round(stats["label_time_s"] / stats["time_s"], 4)
    stats.update(label_updates=state.n_updates, heads=_cluster_sizes(state, n_clusters))
    return stats


def _cluster_sizes(state: LabelState, n_clusters: list[int]) -> list[dict]:
    return [cluster_sizes(lab, k) for lab, k in zip(state.labels, n_clusters, strict=True)]


def _epoch_draws(
    seed: int, epoch: int, n: int, batch_size: int, steps: int
) -> tuple[Tensor, torch.Generator]:
    """An epoch's randomness, all from (seed, epoch): this rank's rows (n_r,) in training order and the
    generator of its augmentation; seeds torch's global generator for dropout."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # shuffling + augmentation
    # augmentation and dropout differ between ranks (or each rank would crop, flip and drop out its
    # images exactly like the others); rank 0 draws what a single process draws
    rank_seed = seed * 1_000_003 + epoch + dist.rank() * 1_000_003**2
    aug_gen = gen if dist.rank() == 0 else torch.Generator().manual_seed(rank_seed)
    torch.manual_seed(rank_seed)  # dropout
    return _epoch_rows(n, batch_size, steps, gen), aug_gen


def _epoch_rows(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Tensor:
    """This rank's rows (n_r,) of an epoch of ``steps`` global batches over ``n`` images, in training
    order: its slice of each global batch (the last partial batch dropped)."""
    world = dist.world_size()
    order = torch.randperm(n, generator=gen)[: steps * batch_size]
    # the global batch t is order[t*b:(t+1)*b]; rank r takes its r-th slice of it
    return order.view(steps, world, batch_size // world)[:, dist.rank()].reshape(-1)


def _autocast(precision: str, device: torch.device) -> tuple[str, torch.autocast]:
    """What a ``precision`` setting resolves to ("fp32" or "bf16") and the forward passes' autocast."""
    amp = autocast_dtype(precision, device)
    enabled = amp is not None
    return ("bf16" if enabled else "fp32"), torch.autocast(
        device.type, dtype=amp or torch.bfloat16, enabled=enabled
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
    monitor_every: int,
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
            label_inputs != "recorded" or not objective.online_labels,
            f"label_inputs 'recorded' needs the 'sela' objective (the {objective.name} objective has no label "
            "steps during training); use --label-inputs eval",
        ),
        (
            time_limit_s is None or time_limit_s > 0,
            f"the time limit must be > 0 minutes (or unset), got {(time_limit_s or 0) / 60:g}",
        ),
        (monitor_every >= 0, f"monitor_every must be >= 0 (0: never), got {monitor_every}"),
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
