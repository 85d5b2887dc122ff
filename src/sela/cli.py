"""The ``sela`` command: argparse subcommands. The only module that reads argv, config files and flags.

Every subcommand turns its flags into the explicit keyword arguments of the layers below, and reports bad
input as one line ``sela: error: ...`` (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

import sela
from sela.config import TrainConfig, apply_overrides, load_toml, to_dict

DEFAULT_IMAGE_SIZE = {"digits": 16}


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
    "--arch": ("arch", str, "network: see `sela models` (default convnet)"),
    "--epochs": ("epochs", int, "training epochs"),
    "--heads": ("heads", int, "number of clustering heads H"),
    "--clusters": ("clusters", str, "clusters K per head: one number, or a comma list (one per head)"),
    "--lam": ("lam", float, "lambda: 1/strength of the entropic regularisation of the label step (25)"),
    "--label-updates": ("label_updates", int, "label assignments over the whole run (the first at step 0)"),
    "--label-spacing": ("label_spacing", str, "quadratic (dense early, default) or linear"),
    "--label-heads": ("label_heads", str, "all heads per update (default) or round-robin"),
    "--label-inputs": ("label_inputs", str, "eval (un-augmented, eval mode; default) or train (augmented)"),
    "--batch-size": ("batch_size", int, "global batch size (over all processes)"),
    "--lr": ("lr", float, "peak learning rate of SGD"),
    "--weight-decay": ("weight_decay", float, "weight decay"),
    "--lr-schedule": ("lr_schedule", str, "cosine (default) or step"),
    "--device": ("device", str, "auto (default), cpu or cuda"),
    "--seed": ("seed", int, "random seed"),
    "--out": ("out", str, "run directory (default runs/sela)"),
    "--workers": ("workers", int, "DataLoader workers for streamed datasets"),
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


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the TOML file, then flags that were given, then --set overrides."""
    cfg = load_toml(TrainConfig, args.config) if args.config else TrainConfig()
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


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from sela import distributed as dist
    from sela.data import BatchAugment, EvalTransform, load_dataset
    from sela.models import create_model, list_models
    from sela.train import CHECKPOINT, Trainer, TrainingDiverged, finish_run

    cfg = resolve_train_config(args)
    device = _device(cfg.device)
    dist.init_from_env(device)
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    out = Path(cfg.out)
    if args.resume and not (out / CHECKPOINT).is_file():
        raise UsageError(f"--resume: no {CHECKPOINT} in {out}; point --out at an existing run")
    if not args.resume and (out / CHECKPOINT).exists():
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    # validate everything before the run directory is created
    if cfg.arch not in list_models():
        raise UsageError(f"unknown architecture {cfg.arch!r}; choose one of {', '.join(list_models())}")
    clusters = _clusters_per_head(cfg)
    size = cfg.image_size or DEFAULT_IMAGE_SIZE.get(cfg.dataset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_set = load_dataset(cfg.dataset, cfg.data_dir, "train", image_size=size, strict=cfg.strict)
        test_set = _test_split(cfg, size)
    for w in caught:
        print(f"sela: warning: {w.message}", file=sys.stderr)
    if len(train_set) == 0:
        raise UsageError(f"the {cfg.dataset} training split is empty; check --data-dir")
    out_size = size or int(train_set.images.shape[-1] if train_set.in_memory else 224)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, clusters, **_model_kwargs(cfg.arch, out_size, train_set))
    a = cfg.augment
    augment = BatchAugment(
        out_size,
        crop_scale=tuple(a.crop_scale) if a.crop_scale else None,
        flip_p=a.flip_p,
        jitter=tuple(a.jitter) if a.jitter else None,
        jitter_p=a.jitter_p,
        grayscale_p=a.grayscale_p,
        blur_p=a.blur_p,
        mean=train_set.mean,
        std=train_set.std,
    )
    eval_transform = EvalTransform(out_size, mean=train_set.mean, std=train_set.std)
    trainer = Trainer(
        model,
        train_set,
        out_dir=out,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lr_schedule=cfg.lr_schedule,
        warmup_epochs=cfg.warmup_epochs,
        lam=cfg.lam,
        label_updates=cfg.label_updates,
        label_spacing=cfg.label_spacing,
        label_heads=cfg.label_heads,
        label_inputs=cfg.label_inputs,
        augment=augment.to(device),
        eval_transform=eval_transform.to(device),
        device=device,
        seed=cfg.seed,
        config=to_dict(cfg),
        workers=cfg.workers,
        progress=cfg.progress,
        sync_bn=cfg.sync_bn,
    )
    created = not out.exists()
    if args.resume:
        trainer.load_checkpoint(out / CHECKPOINT)
    elif dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        record = {
            **to_dict(cfg),
            "_command": sys.argv,
            "_version": sela.__version__,
            "_world_size": dist.world_size(),
        }
        (out / "config.json").write_text(json.dumps(record, indent=2))
    _say(
        f"sela {sela.__version__}: training {cfg.arch} on {cfg.dataset} ({len(train_set)} images, "
        f"{len(clusters)} heads x {clusters[0] if len(set(clusters)) == 1 else clusters} clusters) "
        f"on {device} x {dist.world_size()} for {cfg.epochs} epochs -> {out}"
    )
    try:
        trainer.fit()
    except TrainingDiverged as e:
        print(f"sela: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if created and trainer.epoch == 0 and dist.is_main():
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping
        raise
    summary = finish_run(trainer, test_set, knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature)
    if dist.is_main():
        _print_summary(summary, out)
    return 0


def _test_split(cfg: TrainConfig, size: int | None):
    from sela.data import SPLITS, load_dataset

    for split in ("test", "val"):
        if split in SPLITS.get(cfg.dataset, ()):
            try:
                return load_dataset(cfg.dataset, cfg.data_dir, split, image_size=size, strict=cfg.strict)
            except FileNotFoundError:
                continue
    return None


def _model_kwargs(arch: str, size: int, train_set) -> dict:
    channels = int(train_set.images.shape[1]) if train_set.in_memory else 3
    kwargs: dict = {"in_channels": channels}
    if arch in ("convnet", "alexnet"):
        kwargs["input_size"] = size
    return kwargs


def _print_summary(summary: dict, out: Path) -> None:
    keys = ["knn_top1", "knn_top5", "nmi", "ari", "accuracy", "best_head", "train_time_s", "label_share"]
    width = max(len(k) for k in keys)
    print(f"run: {out}")
    for k in keys:
        if k in summary:
            v = summary[k]
            print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    for h in summary.get("heads", []):
        print(
            f"  head {h['head']} (K={h['k']}): nmi {h['nmi']:.4f}  ari {h['ari']:.4f}  acc {h['accuracy']:.2f}"
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
# entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sela", description="Self-labelling via simultaneous clustering and representation learning."
    )
    parser.add_argument("--version", action="version", version=f"sela {sela.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_models(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        print("sela: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
