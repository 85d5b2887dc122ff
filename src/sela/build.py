"""Settings resolved once, then the run built from them. ``sela train`` and Python users call the same functions.

Resolution (:func:`resolve`), lowest first: the schema's defaults (:mod:`sela.config`), the recipe
(:mod:`sela.recipes`: asked for, the dataset's own, or chosen from the images and the device), then the
user's settings: a TOML file, flags, ``--set`` overrides (:func:`user_settings` merges them in that order).
The data-dependent numbers are then fixed (the image side of a dataset that has a default, the evaluation
side) and recorded in config.json, so a run describes itself.

Building (:func:`build_trainer`): the objective from its registry (it says whether the heads are cosine
heads before the model exists), the model, the two batch augmentations, the evaluation transform, the kNN
monitor and the :class:`sela.train.Trainer`. :func:`train` does the whole run: check the run directory,
read the data, resolve, build, record or resume, fit, finish.

From Python::

    from sela.build import train
    summary = train({"optim.epochs": 5, "model.heads": 2}, out="runs/py")
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import sela
from sela import distributed as dist
from sela import recipes, rundir, sizing, weights
from sela.config import (
    TrainConfig,
    apply_overrides,
    canonical_key,
    compare_configs,
    data_settings,
    flatten,
    model_options,
    parse_overrides,
    read_toml,
    to_dict,
    validate,
)
from sela.data import BatchAugment, EvalTransform, ImageSet, dataset_info, view_scale_size
from sela.data.datasets import resize_images
from sela.loggers import chosen, metric_sinks
from sela.models import check_arch, clusters_per_head, create_model
from sela.objectives import OBJECTIVES, make_objective
from sela.runs import load_split, load_test_split
from sela.train import Trainer, TrainingDiverged, finish_run

Log = Callable[[str], None]
TRAIN_FAILURES = (TrainingDiverged, dist.PeerFailed)  # a run that started and then failed: exit code 1
PATH_KEYS = ("runtime.out", "data.data_dir")  # settings that name a path: ``~`` is expanded


def user_settings(
    settings: dict[str, Any] | None = None,
    *,
    toml: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The user's settings as {dotted key: value}, lowest first: a TOML file, ``settings`` (the flags),
    ``overrides`` (``["augment.flip_p=0.5"]`` strings or a dict). Legacy flat keys are translated; ``~``
    in a path (``PATH_KEYS``) is expanded."""
    merged = read_toml(toml) if toml else {}
    merged.update(upgrade_keys(settings or {}))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    merged.update(upgrade_keys(overrides or {}))
    for key in PATH_KEYS:  # the shell leaves `--out=~/x` as it is
        if isinstance(merged.get(key), str):
            merged[key] = os.path.expanduser(merged[key])
    return merged


def upgrade_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """{key: value} with legacy flat keys as dotted ones (a nested dict is flattened first)."""
    return {canonical_key(k): v for k, v in flatten(settings).items()}


def settings_before_data(user: dict[str, Any]) -> TrainConfig:
    """The defaults with the user's settings, checked as far as they can be before any image is read: the
    schema's checks, and names that registries must know (dataset, architecture, objective)."""
    cfg = apply_overrides(TrainConfig(), user)
    validate(cfg)
    dataset_info(cfg.data.dataset)
    check_arch(cfg.model.arch)
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    clusters_per_head(cfg.model.clusters, cfg.model.heads)
    chosen(cfg.runtime.log)  # a logger's missing package fails before any image is read
    if cfg.optim.epochs == 0 and not cfg.model.init:
        raise ValueError(
            "--epochs 0 trains nothing; it needs --init SOURCE (the clusters of those weights' features)"
        )
    if cfg.optim.epochs == 0 and cfg.optim.time_limit is not None:
        raise ValueError("--epochs 0 trains nothing; drop --time-limit")
    return cfg


@dataclass
class Resolved:
    """A configuration resolved for a training set: the config, the recipe's settings, and why."""

    config: TrainConfig
    recipe: dict[str, Any] = field(default_factory=dict)
    why: str = ""

    def recipe_line(self) -> str:
        """One line: the recipe, why, and its settings as the run uses them (a replaced value shows the
        recipe's after it, ``model.heads=1 (recipe: 5)``)."""
        name = self.config.recipe
        if name == "none":
            return "recipe none: the plain defaults"
        used = flatten(to_dict(self.config))
        shown = []
        for key, value in self.recipe.items():
            same = used[key] == (list(value) if isinstance(value, tuple) else value)
            shown.append(f"{key}={used[key]}" + ("" if same else f" (recipe: {value})"))
        return f"recipe {name} ({self.why}; --recipe NAME to choose): {', '.join(shown)}"


def resolve(
    user: dict[str, Any],
    train_set: ImageSet,
    device: torch.device,
    *,
    start: dict[str, Any] | None = None,
    cost: sizing.EpochCost | None = None,
) -> Resolved:
    """Defaults < recipe < the network ``--init``'s weights fit < the user's settings, for these images on
    this device; then the image side (the dataset's default when it has one) and the evaluation side fixed
    as numbers. ``start``: that network's settings (default: read from ``model.init``'s source). A fast
    recipe's training side follows the time budget (:mod:`sela.sizing`; ``cost``: seconds per epoch of a
    configuration, measured by default); the images are resized to it by :func:`fit_to_side`."""
    cfg = settings_before_data(user)
    info = dataset_info(cfg.data.dataset)
    if start is None:
        start = weights.start_network(cfg.model.init) if cfg.model.init else {}
    side = train_set.side(cfg.data.image_size or start.get("data.image_size") or info.default_image_size)
    facts = recipes.data_facts(train_set, side, device, pretrained=cfg.model.init is not None)
    name, why = cfg.recipe, "asked for"
    if name == "auto":
        name, why = recipes.choose(facts, own=info.recipe)
    chosen = {} if name == "none" else recipes.settings(name, facts)
    if sizing.applies(name, user, start, train_set):
        side, because = sizing.choose_side(name, facts, user, start, train_set, device, cost=cost or sizing.epoch_seconds)
        why = f"{why}; {because}"
        if side != facts.side:
            chosen = {**recipes.settings(name, replace(facts, side=side)), "data.image_size": side}
    cfg = apply_overrides(apply_overrides(TrainConfig(), {**chosen, **start}), {**user, "recipe": name})
    fixed: dict[str, Any] = {}
    if cfg.data.image_size is None and info.default_image_size is not None:
        fixed["data.image_size"] = info.default_image_size
    if cfg.eval.size is None:
        side = train_set.side(cfg.data.image_size or fixed.get("data.image_size"))
        fixed["eval.size"] = view_scale_size(side, cfg.augment.crop_size or side, cfg.augment.crop_scale)
    cfg = apply_overrides(cfg, fixed)
    validate(cfg)
    _check_objective_options(cfg, user)
    return Resolved(cfg, chosen, why)


def _check_objective_options(cfg: TrainConfig, user: dict[str, Any]) -> None:
    """A user setting of an objective's section (``sela.*``, ``swapped.*``: a section named like a
    registered objective) that the run's objective does not read is a mistake: say so instead of ignoring
    it."""
    for key in user:
        section = key.partition(".")[0]
        if section in OBJECTIVES and section != cfg.objective:
            raise ValueError(f"{key} needs the {section} objective: add --objective {section} or drop it")


# --------------------------------------------------------------------------------------------------------
# building


def image_side(cfg: TrainConfig, train_set: ImageSet) -> int:
    """The side (px) of the training images as the model sees them."""
    return train_set.side(cfg.data.image_size or dataset_info(cfg.data.dataset).default_image_size)


def batch_augment(
    cfg: TrainConfig, side: int, scale: list[float] | None, train_set: ImageSet
) -> BatchAugment:
    """The augmentation section as a :class:`sela.data.BatchAugment` making views of ``side`` px."""
    a = cfg.augment
    return BatchAugment(
        side, crop_scale=tuple(scale) if scale else None, flip_p=a.flip_p,
        jitter=tuple(a.jitter) if a.jitter else None, jitter_p=a.jitter_p, grayscale_p=a.grayscale_p,
        blur_p=a.blur_p, mean=train_set.mean, std=train_set.std,
    )  # fmt: skip


def build_objective(cfg: TrainConfig, train_set: ImageSet, device: torch.device):
    """The run's objective with its views: the full views at ``augment.crop_size`` (else the image side),
    the small ones at ``augment.small_crop_size`` (else half of that)."""
    view = cfg.augment.crop_size or image_side(cfg, train_set)
    augment = batch_augment(cfg, view, cfg.augment.crop_scale, train_set).to(device)
    small_side = cfg.augment.small_crop_size or max(view // 2, 1)
    small = batch_augment(cfg, small_side, cfg.augment.small_crop_scale, train_set).to(device)
    options = to_dict(getattr(cfg, cfg.objective)) if hasattr(cfg, cfg.objective) else {}
    if OBJECTIVES[cfg.objective].online_labels and cfg.labels.marginal == "relaxed":
        options["relax"] = cfg.labels.relax  # the per-batch codes relaxed like the label steps
    return make_objective(
        cfg.objective, augment, small_crops=cfg.augment.small_crops, small_augment=small, **options
    )


def build_model(cfg: TrainConfig, train_set: ImageSet, *, cosine_heads: bool, init: bool = True):
    """The network the model section describes, for these images (seeded with ``runtime.seed``); with
    ``init``, its backbone starts from ``model.init``'s weights when set (heads fresh)."""
    m = cfg.model
    kwargs: dict[str, Any] = {"in_channels": train_set.channels, "input_size": image_side(cfg, train_set)}
    kwargs.update({key: tuple(value) for key, value in model_options(to_dict(m)).items()})
    torch.manual_seed(cfg.runtime.seed)
    model = create_model(
        m.arch, clusters_per_head(m.clusters, m.heads), normalize_heads=cosine_heads, **kwargs
    )
    if init and m.init:
        weights.init_backbone(model, m.init)
    return model


def knn_monitor(cfg: TrainConfig, train_set: ImageSet, test_set: ImageSet | None, transform, device):
    """``eval.every``'s monitor: the kNN top-1 and the best head's NMI on the test split, as the final
    evaluation computes them (without the linear probe); None without labelled test images."""
    from sela.eval.evaluate import evaluate

    if not cfg.eval.every or test_set is None or test_set.targets is None or not len(test_set):
        return None
    e = cfg.eval

    def monitor(model) -> dict:
        result = evaluate(
            model, train_set, test_set, transform=transform, linear=False, device=device, knn_k=e.knn_k,
            knn_temperature=e.knn_temperature, workers=cfg.runtime.workers, progress=False,
        )  # fmt: skip
        return {key: result[key] for key in ("knn_top1", "nmi") if key in result}

    return monitor


def build_trainer(
    cfg: TrainConfig,
    train_set: ImageSet,
    device: torch.device,
    *,
    test_set: ImageSet | None = None,
    log: Log | None = None,
    init: bool = True,
) -> Trainer:
    """The model, the objective and the :class:`sela.train.Trainer` that a resolved configuration
    describes (``test_set``: for ``eval.every``; ``init``: load ``model.init``'s weights, not when resuming).
    ``optim.epochs`` 0 plans one epoch that :func:`train` never runs (it labels only). Its sinks (rank 0):
    metrics.jsonl and the console line (:func:`sela.sinks.default_sinks`), then the loggers of
    ``runtime.log`` (:func:`sela.loggers.metric_sinks`)."""
    objective = build_objective(cfg, train_set, device)
    model = build_model(cfg, train_set, cosine_heads=objective.cosine_heads, init=init)
    transform = EvalTransform(cfg.eval.size or image_side(cfg, train_set), mean=train_set.mean,
                              std=train_set.std).to(device)  # fmt: skip
    o, lab, r = cfg.optim, cfg.labels, cfg.runtime
    trainer = Trainer(
        model, train_set, objective=objective, out_dir=r.out, eval_transform=transform,
        monitor=knn_monitor(cfg, train_set, test_set, transform, device), monitor_every=cfg.eval.every,
        device=device, time_limit_s=None if o.time_limit is None else o.time_limit * 60,
        metadata=to_dict(cfg), log=log, epochs=max(o.epochs, 1), batch_size=o.batch_size, lr=o.lr, momentum=o.momentum,
        weight_decay=o.weight_decay, lr_schedule=o.lr_schedule, warmup_epochs=o.warmup_epochs, lam=lab.lam,
        marginal=lab.marginal, relax=lab.relax,
        label_updates=lab.updates, label_spacing=lab.spacing, label_share=lab.share, label_heads=lab.heads,
        label_inputs=lab.inputs, seed=r.seed, workers=r.workers, progress=r.progress, sync_bn=r.sync_bn,
        precision=r.precision,
    )  # fmt: skip
    if dist.is_main():
        trainer.sinks += metric_sinks(r.out, r.log, params=flatten(to_dict(cfg)))
    return trainer


# --------------------------------------------------------------------------------------------------------
# the whole run


def resolve_device(name: str) -> torch.device:
    """The device a ``--device`` setting names: auto (CUDA when available), cpu, cuda or cuda:N."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def device_for(name: str) -> torch.device:
    """:func:`resolve_device`, with the process group joined under torchrun (each rank on its own GPU)."""
    device = resolve_device(name)
    dist.init_from_env(device)
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_out_dir(out: Path, *, resume: bool, force: bool = False) -> None:
    """The run directory is free for this run: not locked by another, holding a run only when resuming,
    and holding no files that sela did not write (unless ``force``: the user's files of the run's names,
    config.json or labels.csv, would be replaced)."""
    holder = rundir.RunLock(out).holder()
    if holder is not None:
        raise ValueError(
            f"{out} is in use by another sela train (pid {holder}); wait for it to finish or choose another --out"
        )
    has_run = (out / rundir.CHECKPOINT).exists()
    if resume and not has_run:
        raise ValueError(f"--resume: no {rundir.CHECKPOINT} in {out}; point --out at an existing run")
    if not resume and has_run:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory; choose another --out")
    if not resume and not force and not rundir.is_run_dir(out) and out.is_dir() and any(out.iterdir()):
        first = sorted(p.name for p in out.iterdir())[0]
        raise ValueError(
            f"{out} is not empty and is not a sela run (it holds {first}, ...); choose a new or empty --out, "
            "or pass --force to write the run into it (files of the run's names are replaced)"
        )


def check_resume(cfg: TrainConfig, out: Path, train_set: ImageSet | None = None) -> list[str]:
    """A resumed run's settings that must match its recorded ones (``resume=True`` in the schema), and its
    training images its recorded file list (:func:`check_files`); returns the notes to tell the user."""
    saved = rundir.read_json(out / rundir.CONFIG)
    mismatched = compare_configs(saved, to_dict(cfg))
    if mismatched:
        raise ValueError(
            f"{out} was trained with different settings ({'; '.join(mismatched)}); resume with the same "
            "settings or start a new --out directory"
        )
    return [] if train_set is None else check_files(out, train_set, cfg.data.data_dir, saved)


def check_files(out: Path, train_set: ImageSet, data_dir: str | None, saved: dict) -> list[str]:
    """The training images are the ones the run started with (files.json), matched by path: a file added
    or removed is refused in one line (the labels would not fit), a moved folder or a file modified in
    place is a note. A run without files.json (older sela) is checked by the number of images only."""
    was = data_settings(saved).get("data_dir")
    moved = [f"data.data_dir is {data_dir!r}; the run was trained on {was!r}"] if was != data_dir else []
    recorded = rundir.read_file_list(out)
    if recorded is None:
        return [f"{out} records no file list (sela before {rundir.FILES}): only the number of images "
                "is checked", *moved]  # fmt: skip
    match = rundir.match_files(recorded, rundir.FileList.of(train_set.paths, len(train_set), data_dir))
    if not match.same:
        raise ValueError(
            f"--resume: the training images changed since {out} was trained ({match.describe()}); "
            "restore them, or train a new --out"
        )
    if match.modified:
        moved.append(f"{len(match.modified)} training file(s) modified since the run started (e.g. "
                     f"{match.modified[0]}); each keeps its label")  # fmt: skip
    return moved


def load_splits(cfg: TrainConfig) -> tuple[ImageSet, ImageSet | None]:
    """The training split and the test (or val) split of the data section."""
    d = cfg.data
    size = d.image_size or dataset_info(d.dataset).default_image_size
    progress = None if cfg.runtime.progress else False  # --no-progress: no decode bar either
    train_set = load_split(d.dataset, d.data_dir, "train", size, strict=d.strict, progress=progress)
    if len(train_set) == 0:
        raise ValueError(f"the {d.dataset} training split is empty; check --data-dir")
    return train_set, load_test_split(d.dataset, d.data_dir, size, strict=d.strict, progress=progress)


def banner(cfg: TrainConfig, trainer: Trainer, train_set: ImageSet, device: torch.device) -> str:
    """The run's first line: what trains on what, where, for how long."""
    clusters = clusters_per_head(cfg.model.clusters, cfg.model.heads)
    length = f"{cfg.optim.epochs} epochs"
    if cfg.optim.time_limit is not None:
        length = f"{cfg.optim.time_limit:g} min (about {trainer.epochs} epochs, re-planned each epoch)"
    return (
        f"sela {sela.__version__}: training {cfg.model.arch} on {cfg.data.dataset} ({len(train_set)} images, "
        f"{len(clusters)} heads x {clusters[0] if len(set(clusters)) == 1 else clusters} clusters) "
        f"on {device} x {dist.world_size()} ({trainer.precision}) for {length} -> {cfg.runtime.out}"
    )


def _recorded_start(out: Path) -> dict[str, Any]:
    """What a resumed run keeps as it recorded it: its training side (which the budget chose when the run
    started) and, after ``--init``, its network (the source need not exist any more)."""
    recorded = rundir.read_json(out / rundir.CONFIG)
    model = recorded.get("model", {})
    kept = {"data.image_size": recorded["data"]["image_size"]} if recorded.get("data", {}).get("image_size") else {}
    if model.get("init"):
        kept.update({f"model.{k}": model[k] for k in ("arch", "widths", "pools") if model.get(k) is not None})
    return kept


def fit_to_side(cfg: TrainConfig, images: ImageSet) -> ImageSet:
    """``images`` at the run's training side: a side the recipe chose after the images were read
    (:mod:`sela.sizing`) resizes those in memory as the reader would have (shorter side, then the
    central square; statistics kept); otherwise the set itself."""
    side = cfg.data.image_size
    if not side or not images.in_memory or tuple(images.images.shape[-2:]) == (side, side):
        return images
    return replace(images, images=resize_images(images.images, side), mean=images.mean, std=images.std)


def label_only(trainer: Trainer) -> None:
    """``--epochs 0``: one label step on the initial backbone (every head), checkpointed; no training."""
    if trainer.state.n_updates == 0:  # a resumed baseline has its labels already
        trainer.update_labels()
        if dist.is_main():
            trainer.save_checkpoint()
    trainer.close()


def _record(cfg: TrainConfig, out: Path, command: list[str], train_set: ImageSet) -> None:
    """config.json (the settings, the command, the version, the images' channels, side and statistics,
    which let ``sela export``/``embed`` run without the training folder), files.json, and skipped.txt when
    the reader left unreadable images out."""
    if dist.is_main():
        record = {**to_dict(cfg), "_command": command, "_version": sela.__version__}
        images = {"channels": train_set.channels, "side": image_side(cfg, train_set),
                  "mean": list(train_set.mean), "std": list(train_set.std)}  # fmt: skip
        rundir.write_json(out / rundir.CONFIG, {**record, "_world_size": dist.world_size(), "_data": images})
        rundir.write_file_list(out, rundir.FileList.of(train_set.paths, len(train_set), cfg.data.data_dir))
        rundir.write_skipped(out, train_set.skipped)


def train(
    settings: dict[str, Any] | None = None,
    *,
    toml: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    log: Log | None = print,
    command: list[str] | None = None,
) -> dict:
    """One ``sela train`` run: check, read the data, resolve, build, record (or resume), fit, finish.

    Args:
        settings, toml, overrides: the user's settings (:func:`user_settings`), e.g.
            ``{"optim.epochs": 5, "runtime.out": "runs/py"}``.
        resume: continue the run in ``runtime.out`` from its checkpoint (its training images must be the
            ones it recorded in files.json).
        force: write into a non-empty ``runtime.out`` that is not a sela run (files of the run's names
            are replaced); without it such a directory is refused.
        log: called with each line the run reports (rank 0); None: silent.
        command: recorded in config.json (the CLI's argv; default ``sys.argv``).

    Returns the summary (summary.json's content; {} on ranks other than 0).
    Raises ValueError for bad settings (before anything is written), :class:`sela.train.TrainingDiverged`
    when the loss or the outputs become NaN (the last good checkpoint is kept), and
    :class:`sela.distributed.PeerFailed` when another process of a distributed run stops.
    """
    say = (lambda line: log(line) if dist.is_main() else None) if log else None
    user = user_settings(settings, toml=toml, overrides=overrides)
    first = settings_before_data(user)
    out = Path(first.runtime.out)
    device = device_for(first.runtime.device)
    check_out_dir(out, resume=resume, force=force)
    train_set, test_set = load_splits(first)
    resolved = resolve(user, train_set, device, start=_recorded_start(out) if resume else None)
    cfg = resolved.config
    train_set, test_set = fit_to_side(cfg, train_set), test_set and fit_to_side(cfg, test_set)
    notes = check_resume(cfg, out, train_set) if resume else []
    for line in [resolved.recipe_line(), *(f"note: {n}" for n in notes)] if say else ():
        say(line)
    trainer = build_trainer(cfg, train_set, device, test_set=test_set, log=say, init=not resume)
    command = sys.argv if command is None else command
    summary = _fit(trainer, cfg, test_set, resume=resume, command=command, say=say)
    for line in summary_lines(summary, out) if say else ():
        say(line)
    return summary


def _fit(
    trainer: Trainer, cfg: TrainConfig, test_set: ImageSet | None, *, resume: bool, command: list[str], say
) -> dict:
    """Hold the run directory's lock; record the run (or load its checkpoint), fit (``--epochs 0``: label
    only), finish."""
    out = Path(cfg.runtime.out)
    created = not out.exists()
    lock = rundir.RunLock(out).acquire() if dist.is_main() else None
    try:
        with dist.peer_failures("this sela train"):
            if resume:
                trainer.load_checkpoint(out / rundir.CHECKPOINT)
            else:
                _record(cfg, out, command, trainer.train_set)
            if say:
                say(banner(cfg, trainer, trainer.train_set, trainer.device))
            trainer.fit() if cfg.optim.epochs else label_only(trainer)
            return finish_run(
                trainer, test_set, knn_k=cfg.eval.knn_k, knn_temperature=cfg.eval.knn_temperature
            )
    except (KeyboardInterrupt, ValueError):
        if created and trainer.epoch == 0 and dist.is_main():
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping
        raise
    finally:
        if lock is not None:
            lock.release()


def summary_lines(summary: dict, out: Path) -> list[str]:
    """The run's summary as the lines ``sela train`` ends with (the first names the run directory; the
    verdict of the label-free signals comes last, before the notes)."""
    keys = ["knn_top1", "knn_top5", "nmi", "ami", "many_to_one", "best_head", "train_time_s", "label_share"]
    keys.append("eval_time_s")
    width = max(len(k) for k in keys)
    lines = [f"run: {out}"]
    for k in (k for k in keys if k in summary):
        v = summary[k]
        lines.append(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    for h in summary.get("heads", []):
        s = h.get("self_labels")
        if s:
            lines.append(
                f"  head {h['head']} (K={h['k']}) self-labels: nmi {s['nmi']:.4f}  ami {s['ami']:.4f}  "
                f"ari {s['ari']:.4f}  many-to-one {s['many_to_one']:.2f}"
            )
    lines += [summary["verdict"]] if "verdict" in summary else []  # from the label-free signals
    return lines + [f"note: {note}" for note in summary.get("notes", [])]
