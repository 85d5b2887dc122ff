"""Run configuration: dataclasses with defaults, an optional TOML file, and dotted overrides.

Precedence, lowest first: the defaults below, a TOML file (``--config run.toml``), command-line flags,
then ``--set section.key=value`` overrides (minGPT style). The resolved configuration is written into
every run directory as ``config.json``. This module and ``cli.py`` are the only ones that know the
configuration's schema: the CLI turns a config into the explicit keyword arguments of the layers below.
Each default is the component's own (read from its signature here), so it is written once.

Options reference: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sela.data import BatchAugment
from sela.eval.knn import KNN_K, KNN_TEMPERATURE
from sela.objectives import SelaObjective, SwappedObjective
from sela.sinkhorn import DEFAULT_LAM
from sela.train import Trainer


def component_default(component: Any, name: str) -> Any:
    """The default of keyword ``name`` of ``component`` (a function or a class's __init__)."""
    value = inspect.signature(component).parameters[name].default
    if value is inspect.Parameter.empty:
        raise TypeError(f"{component.__qualname__}({name}) has no default")
    return list(value) if isinstance(value, tuple) else value


def _list_default(component: Any, name: str):
    return field(default_factory=lambda: component_default(component, name))


@dataclass
class AugmentConfig:
    """On-device batch augmentation (defaults: :class:`sela.data.BatchAugment`'s, the SeLa CIFAR recipe)."""

    crop_scale: list[float] = _list_default(BatchAugment, "crop_scale")
    flip_p: float = component_default(BatchAugment, "flip_p")
    jitter: list[float] = _list_default(BatchAugment, "jitter")
    jitter_p: float = component_default(BatchAugment, "jitter_p")
    grayscale_p: float = component_default(BatchAugment, "grayscale_p")
    blur_p: float = component_default(BatchAugment, "blur_p")
    # the multi-crop small views' crop area range (``small_crops`` > 0 only)
    small_crop_scale: list[float] = field(default_factory=lambda: [0.1, 0.4])


@dataclass
class TrainConfig:
    """Everything a ``sela train`` run needs; docs/training.md describes each option."""

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None  # px; None: the dataset's default (digits: 16, others: native)
    strict: bool = False  # fail on unreadable images instead of skipping them
    # named settings (sela.recipes) applied over the defaults, under a TOML file and flags: "auto" picks one
    # from the data and the device (a dataset with a preset keeps it); "none": the plain defaults
    recipe: str = "auto"
    # model
    arch: str = "convnet"
    heads: int = 4
    clusters: list[int] = field(default_factory=lambda: [30])  # one K for all heads, or one per head
    widths: list[int] | None = None  # convnet block widths (None: the model's default)
    pools: list[bool] | None = None  # convnet: whether each block max-pools (None: all do)
    projector: list[int] = field(default_factory=list)  # MLP widths between features and heads (none)
    # self-labelling
    lam: float = DEFAULT_LAM
    label_updates: int = component_default(Trainer, "label_updates")
    label_spacing: str = component_default(Trainer, "label_spacing")  # "quadratic" or "linear"
    # the largest share of training time that label passes may take (closer steps are merged)
    label_share: float = component_default(Trainer, "label_share")
    label_heads: str = component_default(
        Trainer, "label_heads"
    )  # "all" or "round-robin": one head per update
    # "eval": un-augmented, eval mode; "train": augmented, train mode; "recorded": the outputs of the
    # training pass itself, label steps at epoch ends (no extra forward pass)
    label_inputs: str = component_default(Trainer, "label_inputs")
    # "sela": the paper's objective; "swapped": an online deviation (SwAV-style swapped prediction of
    # per-batch Sinkhorn codes between two views, cosine heads), with its temperature and epsilon
    objective: str = "sela"
    # sela objective: None for the paper's linear heads; T for cosine heads with scores / T (SeLa-v2)
    sela_temperature: float | None = None
    # sela objective: 0 for the paper's hard labels; k > 0: train on each image's k largest entries of
    # the label step's transport plan, renormalised (soft codes, as SwAV's)
    soft_targets: int = component_default(SelaObjective, "soft_targets")
    # sela objective with cosine heads: "learned" prototypes, or "centroids": set to the mean head input of
    # each cluster after every label step and frozen between them (DeepCluster-v2's prototypes)
    sela_prototypes: str = component_default(SelaObjective, "prototypes")
    swap_temperature: float = component_default(SwappedObjective, "temperature")
    swap_epsilon: float = component_default(SwappedObjective, "epsilon")
    # swapped: head inputs of this many recent full views (per process) join each batch's Sinkhorn
    # balancing, scored against the current prototypes (SwAV's queue); 0: the batch alone
    swap_queue: int = component_default(SwappedObjective, "queue")
    # side (px) of the augmented training views; None: the image size. Smaller views train faster;
    # the label step and evaluation still see whole images at image_size
    crop_size: int | None = None
    # side (px) of the whole images the label step (eval inputs), the final evaluation, `sela eval` and
    # `sela embed` see; None: the size at which whole images look as large as in the largest-scale
    # training views (sela.data.view_scale_size), at most the image size; config.json records the number
    eval_size: int | None = None
    # multi-crop: extra small views per image, of small_crop_size px (None: half the training view size),
    # cropped with augment.small_crop_scale (swapped: they predict the full views' codes; sela: the label)
    small_crops: int = component_default(SwappedObjective, "small_crops")
    small_crop_size: int | None = None
    # optimisation
    epochs: int = 60
    # wall-clock budget for training in minutes (None: none); epochs is then the first plan, re-planned
    # each epoch to fill the budget at the measured speed (see sela.train.Trainer)
    time_limit: float | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = component_default(Trainer, "momentum")
    weight_decay: float = component_default(Trainer, "weight_decay")
    lr_schedule: str = component_default(Trainer, "lr_schedule")  # "cosine" or "step"
    warmup_epochs: float = component_default(Trainer, "warmup_epochs")
    # runtime
    device: str = "auto"
    # forward passes: "auto" (bfloat16 autocast where the device has native bf16: CUDA, or CPUs with
    # AVX512-BF16/AMX; float32 elsewhere), "bf16" or "fp32"
    precision: str = component_default(Trainer, "precision")
    seed: int = component_default(Trainer, "seed")
    out: str = "runs/sela"
    workers: int = component_default(Trainer, "workers")  # DataLoader workers, streamed (large) datasets only
    sync_bn: bool = component_default(Trainer, "sync_bn")
    progress: bool = component_default(Trainer, "progress")
    # evaluation at the end (when the dataset has ground truth); eval_every N > 0 also gives the kNN top-1
    # and NMI of the test split every N epochs (metrics.jsonl and the epoch line; outside the time budget)
    eval_every: int = 0
    knn_k: int = KNN_K
    knn_temperature: float = KNN_TEMPERATURE
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# Per-dataset defaults, applied over TrainConfig's before a TOML file and flags. The digits preset is
# tuned for the embedded demo (8x8 digits upsampled to 16 px, a few minutes on 2 CPU cores): no flips or
# grayscale (digits are grey and flips change them), gentler crops than the natural-image recipe, and the
# original's train-mode label inputs.
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        "image_size": 16,
        "heads": 4,
        "clusters": [10],
        "epochs": 40,
        "lr": 0.03,
        "label_updates": 25,
        # measured on the demo: augmented train-mode label inputs (the original code's choice) give
        # self-label NMI 0.85 where eval-mode inputs give 0.80
        "label_inputs": "train",
        "augment": {
            "flip_p": 0.0,
            "crop_scale": [0.6, 1.0],
            "jitter": [0.4, 0.4, 0.0, 0.0],
            "grayscale_p": 0.0,
        },
    },
}

# Settings that must agree between a run and its --resume: they change the network, the data, the
# plan or the randomness (the others, e.g. workers or progress, may differ).
MUST_MATCH = (
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
    "soft_targets",
    "sela_prototypes",
    "crop_size",
    "eval_size",
    "time_limit",
)


def compare_configs(saved: dict, current: dict) -> list[str]:
    """The settings that must agree for an exact resume and differ: 'key: saved -> current'."""
    return [
        f"{k}: {saved[k]!r} -> {current[k]!r}"
        for k in MUST_MATCH
        if k in saved and k in current and saved[k] != current[k]
    ]


def data_settings(config: dict) -> dict[str, Any]:
    """What a run's recorded configuration says about its data: ``dataset``, ``data_dir``,
    ``image_size`` (the side images were resized to) and ``eval_size`` (the side the evaluation showed
    them at); None where it does not say."""
    return {key: config.get(key) for key in ("dataset", "data_dir", "image_size", "eval_size")}


def legacy_model_spec(config: dict, in_channels: int, input_size: int) -> dict[str, Any]:
    """The model spec of a run written before checkpoints recorded one (format 1), from its config:
    ``create_model(**spec)`` rebuilds its network. ``in_channels``, ``input_size``: the channels and side
    (px) of the run's images, as training gave them to the model."""
    heads, clusters = config.get("heads", 1), list(config.get("clusters") or [])
    spec: dict[str, Any] = {
        "arch": config["arch"],
        "n_clusters": clusters * heads if len(clusters) == 1 else clusters,
        "normalize_heads": config.get("objective") == "swapped",
        "in_channels": in_channels,
        "input_size": input_size,
    }
    spec.update({k: config[k] for k in ("widths", "pools", "projector") if config.get(k)})
    return spec


def train_defaults(dataset: str) -> TrainConfig:
    """TrainConfig's defaults with the preset of ``dataset`` (if any) applied."""
    preset = DATASET_PRESETS.get(dataset, {})
    data = to_dict(TrainConfig())
    for key, value in preset.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    data["dataset"] = dataset
    return from_dict(TrainConfig, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], *, where: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict, checking keys and coercing values to field types."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"known keys: {', '.join(where + k for k in known)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{name} is a section; give it as a table")
            kwargs[name] = from_dict(hint, value, where=f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def load_toml(cls: type, path: str | Path) -> Any:
    """Read a TOML file into dataclass ``cls`` (missing keys keep their defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; pass an existing .toml file to --config")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    return from_dict(cls, data)


def apply_overrides(cfg: Any, overrides: dict[str, Any] | list[str]) -> Any:
    """Return a copy of ``cfg`` with dotted overrides applied.

    ``overrides`` is a dict {"augment.grayscale_p": 0.1} of typed values, or a list of "key=value"
    strings whose values are parsed as JSON when possible (``clusters=[10,20]``, ``lr=0.1``) and kept as
    strings otherwise (``arch=resnet18``).
    """
    if isinstance(overrides, list):
        parsed = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} must look like key=value, e.g. augment.flip_p=0.5")
            try:
                parsed[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                parsed[key.strip()] = raw
        overrides = parsed
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"unknown config section {p!r} in override {key!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"unknown config key {key!r}; see `sela train --help` for the keys")
        node[leaf] = value
    return from_dict(type(cfg), data)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check/convert ``value`` to the annotated type ``hint`` (int, float, str, bool, list, X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce(v, item, f"{name}[]") for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"config key {name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"config key {name} must be an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"config key {name} must be an integer, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"config key {name} must be an integer, got {value!r}")
        return int(f)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {name} must be a number, got {value!r}") from None
    if hint is str:
        return str(value)
    return value
