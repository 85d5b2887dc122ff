"""The ``sela`` command: argparse subcommands. The only module that reads argv, config files and flags.

Every subcommand turns its flags into the explicit keyword arguments of the layers below, and reports bad
input as one line ``sela: error: ...`` (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import sela
from sela.config import TrainConfig, apply_overrides, component_default, load_toml, to_dict, train_defaults
from sela.eval.knn import KNN_K, KNN_TEMPERATURE
from sela.labeller import SelfLabeller
from sela.recipes import RECIPES
from sela.sinkhorn import DEFAULT_LAM

DEFAULT_IMAGE_SIZE = {"digits": 16}  # px the embedded digits (8 px) are upsampled to


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------------------
# sela train

_TRAIN_FLAGS = {
    # flag: (config key, type, help)
    "--dataset": ("dataset", str, "digits (default, embedded), cifar10, cifar100, svhn, stl10 or folder"),
    "--data-dir": ("data_dir", str, "where the dataset lives (folder: the directory with train/ and test/)"),
    "--image-size": (
        "image_size",
        int,
        "resize images to this many px (default: the dataset's own; digits 16)",
    ),
    "--recipe": (
        "recipe",
        str,
        f"auto (default: chosen from the images and the device), {', '.join(RECIPES)} or none (plain defaults)",
    ),
    "--arch": ("arch", str, "network: see `sela models` (default convnet)"),
    "--epochs": ("epochs", int, "training epochs (with --time-limit: the first plan)"),
    "--time-limit": (
        "time_limit",
        float,
        "wall-clock budget for training in minutes: the number of epochs is re-planned every epoch to fill it",
    ),
    "--heads": ("heads", int, "number of clustering heads H"),
    "--clusters": ("clusters", str, "clusters K per head: one number, or a comma list (one per head)"),
    "--lam": (
        "lam",
        float,
        f"lambda: 1/strength of the entropic regularisation of the label step ({DEFAULT_LAM:g})",
    ),
    "--label-updates": ("label_updates", int, "label assignments over the whole run (the first at step 0)"),
    "--label-spacing": ("label_spacing", str, "quadratic (dense early, default) or linear"),
    "--label-heads": ("label_heads", str, "all heads per update (default) or round-robin"),
    "--label-inputs": (
        "label_inputs",
        str,
        "eval (un-augmented, eval mode; default), train (augmented, train mode) or recorded (the training pass's outputs, no extra pass)",
    ),
    "--objective": (
        "objective",
        str,
        "sela (default: the paper's label steps) or swapped (online, SwAV-style: two views predict each other's per-batch codes)",
    ),
    "--crop-size": (
        "crop_size",
        int,
        "side (px) of the training views (default: the image size); smaller trains faster, evaluation stays at the image size",
    ),
    "--eval-size": (
        "eval_size",
        int,
        "side (px) of the whole images the label step and evaluation see (default: as large as the largest-scale training views show them, at most the image size)",
    ),
    "--small-crops": (
        "small_crops",
        int,
        "extra small views per image (multi-crop; half the view size by default): swapped, they predict the full views' codes; sela, they learn the image's label",
    ),
    "--batch-size": ("batch_size", int, "global batch size (over all processes)"),
    "--lr": ("lr", float, "peak learning rate of SGD"),
    "--weight-decay": ("weight_decay", float, "weight decay"),
    "--lr-schedule": ("lr_schedule", str, "cosine (default) or step"),
    "--device": ("device", str, "auto (default), cpu or cuda"),
    "--precision": (
        "precision",
        str,
        "auto (default: bfloat16 autocast where the device has native bf16, else float32), bf16 or fp32",
    ),
    "--seed": ("seed", int, "random seed"),
    "--out": ("out", str, "run directory (default runs/sela)"),
    "--workers": ("workers", int, "DataLoader workers for streamed datasets"),
    "--eval-every": (
        "eval_every",
        int,
        "also give the test split's kNN top-1 and NMI every N epochs (metrics.jsonl, the epoch line; outside the time budget)",
    ),
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a network by self-labelling",
        description="Train by self-labelling (SeLa). Defaults < --config TOML < flags < --set overrides.",
    )
    for flag, (_, typ, text) in _TRAIN_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--config", help="TOML file of settings (keys as in config.json)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set augment.grayscale_p=0.1 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument(
        "--sync-bn", action="store_true", default=None, help="synchronise BatchNorm across processes"
    )
    p.add_argument("--strict", action="store_true", default=None, help="fail on unreadable images")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def resolve_train_config(args: argparse.Namespace, recipe: dict | None = None) -> TrainConfig:
    """Defaults (with the dataset's preset), a recipe's settings, then the TOML file, then flags given,
    then --set overrides."""
    toml = tomllib_load(args.config) if args.config else {}
    dataset = args.dataset or toml.get("dataset") or TrainConfig.dataset
    for item in args.set:
        if item.startswith("dataset="):
            dataset = item.partition("=")[2]
    cfg = apply_overrides(apply_overrides(train_defaults(dataset), recipe or {}), _flatten(toml))
    flags = {}
    for flag, (key, _, _) in _TRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            flags[key] = value
    if "clusters" in flags:
        try:
            flags["clusters"] = [int(k) for k in str(flags["clusters"]).split(",")]
        except ValueError:
            raise UsageError(
                f"--clusters takes integers like 30 or 10,20,30; got {flags['clusters']!r}"
            ) from None
    for key in ("sync_bn", "strict"):
        if getattr(args, key):
            flags[key] = True
    if args.no_progress:
        flags["progress"] = False
    cfg = apply_overrides(cfg, flags)
    return apply_overrides(cfg, args.set)


def tomllib_load(path: str) -> dict:
    """The table of a TOML config file (checked against TrainConfig's keys when applied)."""
    load_toml(TrainConfig, path)  # validates the file and its keys, with a clear message
    import tomllib

    return tomllib.loads(Path(path).read_text())


def _flatten(table: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _clusters_per_head(cfg: TrainConfig) -> list[int]:
    if len(cfg.clusters) == 1:
        return cfg.clusters * cfg.heads
    if len(cfg.clusters) != cfg.heads:
        raise UsageError(
            f"--clusters lists {len(cfg.clusters)} values for {cfg.heads} heads; give one or {cfg.heads}"
        )
    return cfg.clusters


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def _check_train_config(cfg: TrainConfig, out: Path, *, resume: bool, settled: bool = True) -> None:
    """Everything that can be checked before data is read or the run directory exists; with ``settled``
    (the recipe and the data-dependent settings applied), also that a resumed run's settings match."""
    from sela import rundir
    from sela.config import compare_configs
    from sela.models import list_models

    holder = rundir.RunLock(out).holder()
    if holder is not None:
        raise UsageError(
            f"{out} is in use by another sela train (pid {holder}); wait for it to finish or choose another --out"
        )
    positive_or_unset = ("image_size", "crop_size", "small_crop_size", "eval_size")
    checks = [
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (math.isfinite(cfg.lam) and cfg.lam > 0, f"--lam must be a positive number, got {cfg.lam}"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be a positive number, got {cfg.lr}"),
        (
            cfg.heads >= 1 and bool(cfg.clusters) and min(cfg.clusters) >= 2,
            "need --heads >= 1 and --clusters >= 2 per head",
        ),
        (cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}"),
        (cfg.eval_every >= 0, f"--eval-every must be >= 0 (0: only at the end), got {cfg.eval_every}"),
        (
            cfg.arch in list_models(),
            f"unknown architecture {cfg.arch!r}; choose one of {', '.join(list_models())}",
        ),
    ]
    checks += [
        (
            getattr(cfg, key) is None or getattr(cfg, key) >= 1,
            f"{key} must be a positive number of px (or unset)",
        )
        for key in positive_or_unset
    ]
    if cfg.time_limit is not None:
        checks.append(
            (
                math.isfinite(cfg.time_limit) and cfg.time_limit > 0,
                "the time limit must be > 0 minutes (or unset)",
            )
        )
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    _clusters_per_head(cfg)
    has_run = (out / rundir.CHECKPOINT).exists()
    if resume and not has_run:
        raise UsageError(f"--resume: no {rundir.CHECKPOINT} in {out}; point --out at an existing run")
    if not resume and has_run:
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and settled:
        mismatched = compare_configs(rundir.read_json(out / rundir.CONFIG), to_dict(cfg))
        if mismatched:
            raise UsageError(
                f"{out} was trained with different settings ({'; '.join(mismatched)}); resume with the "
                "same settings or start a new --out directory"
            )


def _image_size(cfg: TrainConfig) -> int | None:
    """The side (px) images are resized to: the config's, else the dataset's default, else None (native)."""
    return cfg.image_size or DEFAULT_IMAGE_SIZE.get(cfg.dataset)


def _load_train_data(cfg: TrainConfig):
    """The training and test splits (warnings printed as one line each); a UsageError when empty."""
    from sela.data import load_dataset
    from sela.runs import load_test_split

    size = _image_size(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_set = load_dataset(cfg.dataset, cfg.data_dir, "train", image_size=size, strict=cfg.strict)
        test_set = load_test_split(cfg.dataset, cfg.data_dir, size, strict=cfg.strict)
    for w in caught:
        print(f"sela: warning: {w.message}", file=sys.stderr)
    if len(train_set) == 0:
        raise UsageError(f"the {cfg.dataset} training split is empty; check --data-dir")
    return train_set, test_set


def _apply_recipe(args: argparse.Namespace, cfg: TrainConfig, train_set, device) -> TrainConfig:
    """The configuration with its recipe applied (flags and --set still win); says which and why."""
    from sela import recipes
    from sela.config import DATASET_PRESETS

    name, why = cfg.recipe, "asked for"
    if name == "auto" and cfg.dataset in DATASET_PRESETS:
        _say(f"settings: the {cfg.dataset} preset (--recipe NAME to choose another)")
        return apply_overrides(cfg, {"recipe": "none"})
    if name == "none":
        return cfg
    side = train_set.side(_image_size(cfg))
    facts = recipes.data_facts(train_set, side, device)
    if name == "auto":
        name, why = recipes.choose(facts)
    try:
        chosen = recipes.settings(name, facts)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = apply_overrides(resolve_train_config(args, chosen), {"recipe": name})
    _say(f"recipe {name} ({why}; --recipe NAME to choose): {_recipe_shown(cfg, chosen)}")
    return cfg


def _recipe_shown(cfg: TrainConfig, chosen: dict) -> str:
    """The recipe's settings as the run uses them; a flag, TOML or --set value that replaced one is shown
    with the recipe's value after it, e.g. ``heads=1 (recipe: 5)``."""
    used = to_dict(cfg)
    shown = []
    for key, value in chosen.items():
        section, _, name = key.rpartition(".")
        actual = used[section][name] if section else used[key]
        same = list(actual) == list(value) if isinstance(value, (list, tuple)) else actual == value
        shown.append(f"{name}={actual}" + ("" if same else f" (recipe: {value})"))
    return ", ".join(shown)


def _with_eval_size(cfg: TrainConfig, train_set) -> TrainConfig:
    """The configuration with ``eval_size`` resolved to a number (sela.data.view_scale_size when unset)."""
    from sela.data import view_scale_size

    if cfg.eval_size is not None:
        return cfg
    side = train_set.side(_image_size(cfg))
    size = view_scale_size(side, cfg.crop_size or side, cfg.augment.crop_scale)
    return apply_overrides(cfg, {"eval_size": size})


def _build_trainer(cfg: TrainConfig, train_set, device, out: Path, test_set=None):
    """The model, the objective and the Trainer that a configuration describes (``test_set``: for
    ``eval_every``)."""
    import torch

    from sela.data import EvalTransform
    from sela.models import create_model
    from sela.objectives import OBJECTIVES, make_objective
    from sela.train import Trainer

    side = train_set.side(_image_size(cfg))
    view = cfg.crop_size or side  # training views; the label step and evaluation: eval_size
    augment = _batch_augment(cfg.augment, view, cfg.augment.crop_scale, train_set).to(device)
    small_side = cfg.small_crop_size or max(view // 2, 1)
    small = _batch_augment(cfg.augment, small_side, cfg.augment.small_crop_scale, train_set).to(device)
    if cfg.objective == "swapped":
        if cfg.soft_targets:
            raise UsageError(
                "soft_targets is an option of --objective sela (the swapped objective's codes are soft)"
            )
        options = dict(
            temperature=cfg.swap_temperature, epsilon=cfg.swap_epsilon, queue=cfg.swap_queue,
            small_crops=cfg.small_crops, small_augment=small,
        )  # fmt: skip
    elif cfg.objective == "sela":
        if cfg.swap_queue:
            raise UsageError("swap_queue needs the swapped objective: add --objective swapped or drop it")
        options = dict(
            temperature=cfg.sela_temperature, small_crops=cfg.small_crops, small_augment=small,
            soft_targets=cfg.soft_targets, prototypes=cfg.sela_prototypes,
        )  # fmt: skip
    else:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    objective = make_objective(cfg.objective, augment, **options)
    torch.manual_seed(cfg.seed)  # the model's initial weights
    model = create_model(
        cfg.arch, _clusters_per_head(cfg), normalize_heads=objective.cosine_heads,
        **_model_kwargs(cfg, side, train_set.channels),
    )  # fmt: skip
    names = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_schedule", "warmup_epochs", "lam")
    names += ("label_updates", "label_spacing", "label_heads", "label_inputs", "seed", "workers", "progress")
    names += ("sync_bn", "precision", "label_share")
    eval_transform = EvalTransform(cfg.eval_size or side, mean=train_set.mean, std=train_set.std).to(device)
    return Trainer(
        model,
        train_set,
        objective=objective,
        out_dir=out,
        eval_transform=eval_transform,
        monitor=_knn_monitor(cfg, train_set, test_set, eval_transform, device),
        monitor_every=cfg.eval_every,
        device=device,
        time_limit_s=None if cfg.time_limit is None else cfg.time_limit * 60,
        metadata=to_dict(cfg),
        log=_say,
        **{name: getattr(cfg, name) for name in names},
    )


def _knn_monitor(cfg: TrainConfig, train_set, test_set, transform, device):
    """``eval_every``'s monitor: the kNN top-1 and the best head's NMI on the test split, as the final
    evaluation computes them (sela.eval.evaluate without the linear probe); None without labelled test
    images."""
    from sela.eval.evaluate import evaluate

    if not cfg.eval_every or test_set is None or test_set.targets is None or not len(test_set):
        return None

    def monitor(model) -> dict:
        result = evaluate(
            model, train_set, test_set, transform=transform, linear=False, device=device,
            knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature, workers=cfg.workers, progress=False,
        )  # fmt: skip
        return {key: result[key] for key in ("knn_top1", "nmi") if key in result}

    return monitor


def _batch_augment(a, side: int, scale: list[float] | None, train_set):
    from sela.data import BatchAugment

    jitter = tuple(a.jitter) if a.jitter else None
    return BatchAugment(
        side, crop_scale=tuple(scale) if scale else None, flip_p=a.flip_p, jitter=jitter, jitter_p=a.jitter_p,
        grayscale_p=a.grayscale_p, blur_p=a.blur_p, mean=train_set.mean, std=train_set.std,
    )  # fmt: skip


def _start_run(trainer, cfg: TrainConfig, out: Path, *, resume: bool) -> None:
    """Resume from the checkpoint, or record the new run's config.json (rank 0)."""
    from sela import distributed as dist
    from sela import rundir

    if resume:
        trainer.load_checkpoint(out / rundir.CHECKPOINT)
    elif dist.is_main():
        record = {**to_dict(cfg), "_command": sys.argv, "_version": sela.__version__}
        rundir.write_json(out / rundir.CONFIG, {**record, "_world_size": dist.world_size()})


def cmd_train(args: argparse.Namespace) -> int:
    """resolve -> check -> build -> fit -> report."""
    from sela import distributed as dist
    from sela import rundir
    from sela.train import TrainingDiverged, finish_run

    cfg = resolve_train_config(args)
    device = _init_device(cfg.device)
    out = Path(cfg.out)
    _check_train_config(cfg, out, resume=args.resume, settled=False)  # before reading the data
    train_set, test_set = _load_train_data(cfg)
    cfg = _with_eval_size(_apply_recipe(args, cfg, train_set, device), train_set)
    _check_train_config(cfg, out, resume=args.resume)
    trainer = _build_trainer(cfg, train_set, device, out, test_set)
    created = not out.exists()
    lock = rundir.RunLock(out).acquire() if dist.is_main() else None
    try:
        _start_run(trainer, cfg, out, resume=args.resume)
        _say(_train_banner(cfg, trainer, train_set, device, out))
        trainer.fit()
        summary = finish_run(trainer, test_set, knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature)
    except TrainingDiverged as e:
        print(f"sela: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, ValueError):
        if created and trainer.epoch == 0 and dist.is_main():
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping
        raise
    finally:
        if lock is not None:
            lock.release()
    if dist.is_main():
        _print_summary(summary, out)
    return 0


def _init_device(name: str):
    """The device, with the process group joined under torchrun (each rank on its own GPU)."""
    import torch

    from sela import distributed as dist

    device = _device(name)
    dist.init_from_env(device)
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _train_banner(cfg: TrainConfig, trainer, train_set, device, out: Path) -> str:
    from sela import distributed as dist

    clusters = _clusters_per_head(cfg)
    length = f"{cfg.epochs} epochs"
    if cfg.time_limit is not None:
        length = f"{cfg.time_limit:g} min (about {trainer.epochs} epochs, re-planned each epoch)"
    return (
        f"sela {sela.__version__}: training {cfg.arch} on {cfg.dataset} ({len(train_set)} images, "
        f"{len(clusters)} heads x {clusters[0] if len(set(clusters)) == 1 else clusters} clusters) "
        f"on {device} x {dist.world_size()} ({trainer.precision}) for {length} -> {out}"
    )


def _model_kwargs(cfg: TrainConfig, side: int, channels: int) -> dict:
    """create_model's keyword arguments beyond the heads: what the config sets, the images' channels and
    side (each architecture rejects a setting it does not take)."""
    kwargs: dict = {"in_channels": channels, "input_size": side}
    kwargs.update(
        {key: tuple(getattr(cfg, key)) for key in ("widths", "pools", "projector") if getattr(cfg, key)}
    )
    return kwargs


def _print_summary(summary: dict, out: Path) -> None:
    keys = ["knn_top1", "knn_top5", "nmi", "ami", "many_to_one", "best_head", "train_time_s", "label_share"]
    keys.append("eval_time_s")
    width = max(len(k) for k in keys)
    print(f"run: {out}")
    for k in keys:
        if k in summary:
            v = summary[k]
            print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    for h in summary.get("heads", []):
        s = h.get("self_labels")
        if s:
            print(
                f"  head {h['head']} (K={h['k']}) self-labels: nmi {s['nmi']:.4f}  ami {s['ami']:.4f}  "
                f"ari {s['ari']:.4f}  many-to-one {s['many_to_one']:.2f}"
            )


def _say(msg: str) -> None:
    from sela import distributed as dist

    if dist.is_main():
        print(msg, flush=True)


# --------------------------------------------------------------------------------------------------------
# small commands


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered architectures")
    p.set_defaults(func=lambda args: print("\n".join(__import__("sela.models").models.list_models())) or 0)


# --------------------------------------------------------------------------------------------------------
# inspecting runs: sela eval, sela labels, sela show, sela cluster


def _add_source_flags(p: argparse.ArgumentParser) -> None:
    """The model and data flags of a run or checkpoint (a sela run records them; others need them)."""
    p.add_argument("--dataset", help="dataset (default: the run's); needed for non-sela checkpoints")
    p.add_argument("--data-dir", help="where the dataset lives (default: the run's)")
    p.add_argument("--image-size", type=int, help="px the model sees (default: the run's)")
    p.add_argument("--arch", help="architecture of a non-sela checkpoint: see `sela models`")
    p.add_argument("--clusters", help="K per head (comma list) for a checkpoint without heads")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    from sela.eval.features import extract
    from sela.train import Trainer

    batch, workers = component_default(extract, "batch_size"), component_default(Trainer, "workers")
    p.add_argument("--batch-size", type=int, default=batch, help=f"images per forward pass ({batch})")
    p.add_argument(
        "--workers", type=int, default=workers, help=f"DataLoader workers for streamed datasets ({workers})"
    )


def _open_run(args: argparse.Namespace, *, test_split: bool = True):
    from sela.runs import load_run

    clusters = None
    if args.clusters:
        try:
            clusters = [int(k) for k in args.clusters.split(",")]
        except ValueError:
            raise UsageError(f"--clusters takes integers like 30 or 10,20, not {args.clusters!r}") from None
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError(f"need --batch-size >= 1 and --workers >= 0; got {args.batch_size}, {args.workers}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = load_run(
            args.source,
            dataset=args.dataset,
            data_dir=args.data_dir,
            image_size=args.image_size,
            arch=args.arch,
            clusters=clusters,
            device=_device(args.device),
            default_image_size=DEFAULT_IMAGE_SIZE,
            test_split=test_split,
        )
    for w in caught:
        print(f"sela: warning: {w.message}", file=sys.stderr)
    for note in run.notes:
        print(f"sela: note: {note}", file=sys.stderr)
    return run


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a run or checkpoint: kNN, linear probe and cluster scores of every head",
        description="Evaluate a sela run directory, a sela checkpoint, torchvision ResNet weights or a "
        "released SeLa checkpoint: weighted kNN, a linear probe on frozen features, and NMI/AMI/ARI/"
        "accuracy of every head on train and test and of the stored self-labels. Writes eval.json.",
    )
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    _add_source_flags(p)
    p.add_argument("--head", type=int, help="report this head (default: the best NMI on the training split)")
    p.add_argument("--layer", help="features from this layer (e.g. block2, layer3; default: pooled output)")
    p.add_argument("--knn-k", type=int, default=KNN_K, help=f"neighbours of the kNN classifier ({KNN_K})")
    p.add_argument(
        "--knn-t",
        type=float,
        default=KNN_TEMPERATURE,
        help=f"temperature of the kNN votes ({KNN_TEMPERATURE})",
    )
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument("-o", "--output", help="eval.json path (default: RUN_DIR/eval.json, else ./eval.json)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from sela.eval.evaluate import evaluate, format_report

    if args.knn_k < 1 or args.knn_t <= 0:
        raise UsageError(f"--knn-k must be >= 1 and --knn-t > 0, got {args.knn_k} and {args.knn_t}")
    run = _open_run(args)
    if args.layer and args.layer not in run.model.feature_layers:
        raise UsageError(
            f"--layer {args.layer!r} is not a layer of {run.arch}; choose {run.model.feature_layers}"
        )
    result = evaluate(
        run.model,
        run.train_set,
        run.test_set,
        transform=run.transform,
        labels=run.labels,
        untrained_heads=run.untrained_heads,
        head=args.head,
        layer=args.layer,
        knn_k=args.knn_k,
        knn_temperature=args.knn_t,
        linear=not args.no_linear,
        device=run.device,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    out = Path(args.output) if args.output else (run.run_dir or Path(".")) / "eval.json"
    record = {
        "source": str(args.source),
        "arch": run.arch,
        "dataset": run.dataset,
        "image_size": run.image_size,
        **result,
        "_command": sys.argv,
        "_version": sela.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    n_test = len(run.test_set) if run.test_set is not None else 0
    print(
        f"{run.arch} on {run.dataset}: {len(run.train_set)} train / {n_test} test images, {run.image_size} px"
    )
    print(format_report(result))
    print(f"wrote {out}")
    return 0


def _add_labels(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "labels",
        help="export a run's self-labels, or label new images with its heads",
        description="Write the training set's self-labels (path or index, one column per head, each "
        "head's softmax confidence) and a cluster-size histogram per head; with --images, label new "
        "images with the trained heads instead (argmax, or balanced over the set with --balanced).",
    )
    p.add_argument("source", metavar="RUN_DIR")
    p.add_argument("-o", "--output", default="labels.csv", help="CSV path (default ./labels.csv)")
    p.add_argument("--images", metavar="PATH", help="a folder of images or a text file with one path a line")
    p.add_argument("--balanced", action="store_true", help="with --images: equal-sized clusters (Sinkhorn)")
    p.add_argument(
        "--lam", type=float, default=DEFAULT_LAM, help=f"lambda of the balanced assignment ({DEFAULT_LAM:g})"
    )
    _add_source_flags(p)
    p.set_defaults(func=cmd_labels)


def cmd_labels(args: argparse.Namespace) -> int:
    from sela.export import export_run_labels, label_images

    if args.balanced and not args.images:
        raise UsageError(
            "--balanced applies to new images; add --images PATH (a run's own labels are balanced)"
        )
    run = _open_run(args, test_split=False)
    if args.images:
        path, plots, labels = label_images(
            run, args.images, args.output, balanced=args.balanced, lam=args.lam, batch_size=args.batch_size
        )
        what = f"{labels.shape[1]} new images ({'balanced' if args.balanced else 'argmax'})"
    else:
        path, plots = export_run_labels(run, args.output, batch_size=args.batch_size, workers=args.workers)
        what = f"{len(run.train_set)} training images (self-labels)"
    print(f"wrote {path}: {what} x {len(run.model.n_clusters)} heads, with confidences")
    print(f"wrote {len(plots)} cluster-size histograms: {', '.join(str(p) for p in plots)}")
    return 0


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="render a run's clusters as PNG grids and a static HTML report",
        description="Render sample images of every cluster of a head (sorted by purity with ground truth, "
        "by size otherwise), cluster-size histograms and index.html with pages of clusters.",
    )
    p.add_argument("source", metavar="RUN_DIR")
    p.add_argument("-o", "--output", help="report folder (default RUN_DIR/report)")
    p.add_argument("--head", type=int, help="head to show (default: the run's best head, else 0)")
    from sela.report import render_report

    for flag, what in (
        ("per_page", "clusters per page"),
        ("samples", "images per cluster"),
        ("top", "clusters in top_clusters.png"),
    ):
        value = component_default(render_report, flag)
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=value, help=f"{what} ({value})")
    _add_source_flags(p)
    p.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    from sela.report import render_report

    run = _open_run(args, test_split=False)
    if run.labels is None:
        raise UsageError(
            f"{args.source} holds no self-labels of these training images to show; "
            "pass the run directory of `sela train` with its own data"
        )
    head = args.head if args.head is not None else int(run.summary.get("best_head", 0))
    out = Path(args.output) if args.output else (run.run_dir or Path(".")) / "report"
    index = render_report(
        run.train_set,
        run.labels,
        list(run.model.n_clusters),
        out,
        head=head,
        title=f"sela: {run.arch} on {run.dataset}",
        info={"source": str(args.source)},
        per_page=args.per_page,
        samples=args.samples,
        top=args.top,
    )
    pages = len(list(out.glob("page_*.html")))
    print(f"wrote {index} ({pages} page(s) of head {head}'s clusters, sizes.png, top_clusters.png)")
    return 0


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster",
        help="self-label your own embedding (.npy / .pt, N x D) into balanced clusters",
        description="Balanced self-labelling (SeLa) of fixed features with SelfLabeller: linear heads "
        "trained against Sinkhorn labels. Writes a labels CSV (index, head columns, confidences).",
    )
    p.add_argument("features", metavar="FEATURES", help="an (N, D) array saved with np.save or torch.save")
    p.add_argument("--k", type=int, default=10, help="clusters per head (10)")
    p.add_argument("--heads", type=int, default=1, help="number of heads (1)")
    p.add_argument(
        "--lam", type=float, default=DEFAULT_LAM, help=f"lambda of the label step ({DEFAULT_LAM:g})"
    )
    epochs = component_default(SelfLabeller, "epochs")
    p.add_argument(
        "--epochs",
        type=int,
        default=epochs,
        help=f"passes over the features ({epochs}; 40 gave NMI 0.70 vs 0.76 on digits)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")
    p.add_argument("-o", "--output", default="labels.csv", help="CSV path (default ./labels.csv)")
    p.set_defaults(func=cmd_cluster)


def cmd_cluster(args: argparse.Namespace) -> int:
    import time

    from sela.eval.metrics import cluster_sizes
    from sela.export import cluster_features, load_features, write_labels_csv

    if args.k < 2 or args.heads < 1 or args.epochs < 1 or not (math.isfinite(args.lam) and args.lam > 0):
        raise UsageError("need --k >= 2, --heads >= 1, --epochs >= 1 and --lam > 0")
    device = _device(args.device)
    x = load_features(args.features)  # (N, D)
    start = time.perf_counter()
    labels, conf, best = cluster_features(
        x,
        n_clusters=args.k,
        n_heads=args.heads,
        lam=args.lam,
        epochs=args.epochs,
        seed=args.seed,
        device=device,
    )
    path = write_labels_csv(args.output, labels, confidence=conf)
    print(
        f"clustered {x.shape[0]} x {x.shape[1]} features into {args.heads} x {args.k} clusters "
        f"in {time.perf_counter() - start:.1f} s; best head {best}"
    )
    for h, row in enumerate(labels):
        s = cluster_sizes(row, args.k)
        print(
            f"  head {h}: sizes {s['min']}..{s['max']}, {s['n_empty']} empty, mean confidence "
            f"{float(conf[h].mean()):.3f}"
        )
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------------------------
# using a trained network without sela: sela embed, sela export


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="write the features of images (a folder or a file list) from a run's backbone",
        description="Run images through a trained backbone and write their (N, D) features with the image "
        "paths; -o's suffix picks the format: .npy (paths in <stem>.paths.txt next to it), .pt "
        '({"features", "paths"}, torch.load(weights_only=True)) or .csv (path, f0 .. f{D-1}). Images are '
        "fitted to the run's input size and normalised as in training.",
    )
    p.add_argument("source", metavar="RUN_DIR")
    p.add_argument("images", metavar="IMAGES", help="a folder of images or a text file with one path a line")
    p.add_argument("-o", "--output", required=True, help="features file: .npy, .pt or .csv")
    p.add_argument("--layer", help="features from this layer (e.g. block2, layer3; default: pooled output)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_source_flags(p)
    p.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    from sela.export import check_embedding_path, embed_images, list_images, write_embedding

    check_embedding_path(args.output)
    if not Path(args.images).exists():
        raise UsageError(f"{args.images} does not exist; pass a folder of images or a text file of paths")
    list_images(args.images)  # an empty IMAGES fails before the run is opened
    run = _open_run(args, test_split=False)
    features, paths = embed_images(
        run,
        args.images,
        layer=args.layer,
        batch_size=args.batch_size,
        progress=False if args.no_progress else None,
    )
    written = write_embedding(args.output, features, paths)
    also = f" (image paths in {written[1]})" if len(written) > 1 else ""
    print(f"wrote {written[0]}: {features.shape[0]} images x {features.shape[1]} features{also}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's backbone weights for use without sela (torchvision keys for the ResNets)",
        description="Write the trained backbone (no heads, no projector) as a state dict: for the ResNets "
        "with torchvision's keys, loadable with strict=True into torchvision.models.resnet18() etc. with "
        'fc = nn.Identity(); for other architectures as {"spec", "state_dict"}, read by '
        "sela.models.load_exported. A JSON file next to it records the preprocessing and how to load it.",
    )
    p.add_argument("source", metavar="RUN_DIR")
    p.add_argument("-o", "--output", required=True, help="weights file: .pt or .pth")
    _add_source_flags(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from sela.export import WEIGHT_FORMATS, export_backbone

    out = Path(args.output)
    if out.is_dir() or out.suffix.lower() not in WEIGHT_FORMATS:
        raise UsageError(f"-o {out}: give a weights file name ending in .pt or .pth, like weights.pt")
    run = _open_run(args, test_split=False)
    weights, info = export_backbone(run, out, extra={"_command": sys.argv, "_version": sela.__version__})
    layout = "torchvision keys" if json.loads(info.read_text())["layout"] == "torchvision" else "sela spec"
    print(f"wrote {weights}: {run.arch} backbone, D = {run.model.feature_dim}, {layout}; how to load: {info}")
    return 0


# --------------------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sela", description="Self-labelling via simultaneous clustering and representation learning."
    )
    parser.add_argument("--version", action="version", version=f"sela {sela.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_models(sub)
    _add_eval(sub)
    _add_labels(sub)
    _add_show(sub)
    _add_cluster(sub)
    _add_embed(sub)
    _add_export(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, like errors (no source line)."""
    print(f"sela: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _run(argv)
    finally:
        warnings.showwarning = shown


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"sela: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed outside the run directory's atomic writes (plots, reports)
        what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
        print(f"sela: error: {what}: could not write {e.filename or 'a file'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sela: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
