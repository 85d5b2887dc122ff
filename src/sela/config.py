"""The one schema of a ``sela train`` run: sections that match the constructors they feed.

Every setting is declared once below, with its default, its help text, its command-line flag (if it has
one), whether a resumed run must match it, and the checks its value must pass. ``sela train --help``, the
resume check, the options tables of docs/training.md (``python -m sela.config``) and the legacy names of
runs written before the sections existed all come from these declarations.

Sections (dotted keys in ``--set``, TOML tables, ``config.json``):
    data       the images (``sela.data.load_dataset``)
    model      the network (``sela.models.create_model``)
    labels     the label steps (``sela.labeller.LabelState`` and the plan of ``sela.train.Trainer``)
    optim      optimisation and the run's length (``Trainer``)
    augment    the training views (``sela.data.BatchAugment``; multi-crop)
    sela, swapped  the options of each objective (``sela.objectives``), picked by ``objective``
    eval       evaluation: whole-image side, the kNN monitor and the final kNN
    runtime    device, precision, seed, output, workers, progress

Precedence, lowest first: these defaults, a recipe (``sela.recipes``), a TOML file, flags, ``--set``
overrides. This module imports neither torch nor any other sela module, so ``sela --help`` stays fast; a
test checks that each default equals the default of the component it feeds.

Options reference: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    resume: bool = False,
    check: str | None = None,
    choices: tuple[str, ...] | None = None,
    legacy: str | None = None,
    when: str = "",
    feeds: str | None = None,
    flag_value: Any = None,
) -> Any:
    """Declare one setting: a dataclass field with its metadata.

    Args:
        default: the value (lists are copied per instance).
        help: one line for ``--help`` and the docs table.
        flag: the ``sela train`` flag that sets it (None: ``--set`` only).
        resume: a resumed run must have the same value (it changes the network, the data, the plan or
            the randomness).
        check: ``"positive"`` (> 0, finite), ``"at_least_1"``, ``"at_least_0"`` or ``"at_least_2"`` (every
            list entry), applied when the config is resolved; None values (unset) always pass.
        choices: the accepted strings.
        legacy: the key of this setting in ``config.json`` files written before the sections existed.
        when: advice for the docs table ("when to change").
        feeds: ``"module:Component.parameter"`` (or ``"module:CONSTANT"``) whose default this one must
            equal (a test checks it).
        flag_value: for a bool flag that takes no argument, the value it sets (``--no-progress``: False).
    """
    meta = dict(help=help, flag=flag, resume=resume, check=check, choices=choices, legacy=legacy)
    meta.update(when=when, feeds=feeds, flag_value=flag_value)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _choice_text(choices: tuple[str, ...]) -> str:
    return " | ".join(choices)


@dataclass
class DataConfig:
    """The images: ``sela.data.load_dataset(dataset, data_dir, split, image_size=..., strict=...)``."""

    dataset: str = option(
        "digits", "a registered dataset (`sela datasets` lists them; digits is embedded)", flag="--dataset",
        resume=True, when="`folder`: any image tree with `train/` and `test/` (or `val/`) class folders, or a flat folder",
    )  # fmt: skip
    data_dir: str | None = option(
        None, "where the dataset lives (folder: the directory with train/ and test/)", flag="--data-dir",
        when="torchvision datasets download when online; offline, the error says where to put the files",
    )  # fmt: skip
    image_size: int | None = option(
        None, "resize images to this side in px (unset: the dataset's default, see `sela datasets`, else native)",
        flag="--image-size", resume=True, check="at_least_1", when="smaller images for speed",
    )  # fmt: skip
    strict: bool = option(
        False, "fail on unreadable images instead of skipping them", flag="--strict", flag_value=True
    )


@dataclass
class ModelConfig:
    """The network: ``sela.models.create_model(arch, clusters per head, widths=, pools=, projector=)``."""

    arch: str = option(
        "convnet", "network: see `sela models`", flag="--arch", resume=True,
        when="`convnet` for CPUs; `resnet18_cifar` (3x3 stem) for 32 px; `resnet18`, `alexnet` for larger images",
    )  # fmt: skip
    heads: int = option(
        4, "number of clustering heads H", flag="--heads", resume=True, check="at_least_1",
        when="more heads: more clusterings for the same backbone cost",
    )  # fmt: skip
    clusters: list[int] = option(
        [30], "clusters K per head: one number, or a comma list (one per head)", flag="--clusters",
        resume=True, check="at_least_2", when="about the number of classes you expect, or more",
    )  # fmt: skip
    widths: list[int] | None = option(
        None, "convnet block widths (unset: the model's own, 64-128-256)", resume=True,
        when="narrower for CPU budgets",
    )  # fmt: skip
    pools: list[bool] | None = option(
        None, "convnet: whether each block 2x2 max-pools (unset: all do)", resume=True,
        when="`[true,true,false]` keeps a larger last map for small views",
    )  # fmt: skip
    init: str | None = option(
        None, "start the backbone from these weights (heads fresh): a sela run or `sela export` file, a "
        "torchvision or timm state dict file, torchvision:<Weights>.<NAME> or timm:<name>", flag="--init",
        resume=True, when="you hold a pretrained backbone; the recipe then lowers the learning rate",
    )  # fmt: skip
    projector: list[int] = option(
        [], "MLP widths (Linear, BatchNorm, ReLU) between the pooled features and the heads", resume=True,
        when="a wide backbone; evaluation uses the features below it",
    )  # fmt: skip


@dataclass
class LabelConfig:
    """The label steps: ``LabelState(lam=)`` and the Trainer's label plan."""

    lam: float = option(
        25.0, "lambda of the label step: 1/strength of its entropic regularisation", flag="--lam",
        check="positive", feeds="sela.sinkhorn:DEFAULT_LAM", when="rarely",
    )  # fmt: skip
    updates: int = option(
        40, "label assignments over the whole run (the first at step 0)", flag="--label-updates",
        resume=True, check="at_least_1", legacy="label_updates", feeds="sela.train:Trainer.label_updates",
        when="fewer for short runs",
    )  # fmt: skip
    spacing: str = option(
        "quadratic", "quadratic (dense early) or linear", flag="--label-spacing", resume=True,
        choices=("quadratic", "linear"), legacy="label_spacing", feeds="sela.train:Trainer.label_spacing",
    )  # fmt: skip
    share: float = option(
        0.15, "the largest share of training time that label passes may take (closer steps are merged)",
        check="positive", legacy="label_share", feeds="sela.schedule:LABEL_SHARE",
    )  # fmt: skip
    heads: str = option(
        "all", "all heads per label step, or round-robin (one head per step)", flag="--label-heads",
        resume=True, choices=("all", "round-robin"), legacy="label_heads", feeds="sela.train:Trainer.label_heads",
        when="`round-robin` at ImageNet scale or with many heads",
    )  # fmt: skip
    inputs: str = option(
        "eval", "what the label step sees: eval (un-augmented, eval mode), train (augmented, train mode) or "
        "recorded (the training pass's own outputs, no extra pass)", flag="--label-inputs",
        choices=("eval", "train", "recorded"), legacy="label_inputs", feeds="sela.train:Trainer.label_inputs",
        when="see [Label inputs](#label-inputs)",
    )  # fmt: skip
    marginal: str = option(
        "uniform", "the clusters' share of the images: uniform (equal, the paper), relaxed (the equal share "
        "KL-penalised with weight --relax, so sizes can follow the data) or estimated (a prior from the "
        "heads' mean prediction)", flag="--marginal", resume=True, choices=("uniform", "relaxed", "estimated"),
        feeds="sela.labeller:LabelState.marginal", when="long-tailed folders; see [Cluster sizes](#cluster-sizes)",
    )  # fmt: skip
    relax: float = option(
        1.0, "rho, the KL weight of the relaxed marginal (larger: closer to equal clusters)", flag="--relax",
        resume=True, check="positive", feeds="sela.labeller:DEFAULT_RELAX", when="with --marginal relaxed",
    )  # fmt: skip


@dataclass
class OptimConfig:
    """Optimisation and the run's length: the Trainer's SGD and plan."""

    epochs: int = option(
        60, "training epochs (with --time-limit: the first plan); 0 with --init: one label step on the "
        "initial backbone, its labels and kNN (the pretrained features' baseline)", flag="--epochs",
        resume=True, check="at_least_0",
    )  # fmt: skip
    time_limit: float | None = option(
        None, "wall-clock budget for training in minutes: the epochs are re-planned every epoch to fill it",
        flag="--time-limit", resume=True, check="positive", when="fixed budgets; see [Time limit](#time-limit)",
    )  # fmt: skip
    batch_size: int = option(
        128, "global batch size (over all processes)", flag="--batch-size", resume=True, check="at_least_1",
        when="must divide by the number of processes",
    )  # fmt: skip
    lr: float = option(
        0.1, "peak learning rate of SGD", flag="--lr", check="positive", when="scale with the batch"
    )
    momentum: float = option(0.9, "SGD momentum", check="at_least_0", feeds="sela.train:Trainer.momentum")
    weight_decay: float = option(
        5e-4,
        "weight decay",
        flag="--weight-decay",
        check="at_least_0",
        feeds="sela.train:Trainer.weight_decay",
    )
    lr_schedule: str = option(
        "cosine", "cosine or step", flag="--lr-schedule", choices=("cosine", "step"),
        feeds="sela.train:Trainer.lr_schedule",
    )  # fmt: skip
    warmup_epochs: float = option(
        1.0, "linear warm-up of the learning rate, epochs", check="at_least_0",
        feeds="sela.train:Trainer.warmup_epochs",
    )  # fmt: skip


@dataclass
class AugmentConfig:
    """The training views: ``sela.data.BatchAugment`` (the SeLa CIFAR recipe), and multi-crop."""

    crop_size: int | None = option(
        None, "side (px) of the training views (unset: the image size); smaller trains faster",
        flag="--crop-size", resume=True, check="at_least_1", legacy="crop_size",
        when="label step and evaluation still see whole images (at --eval-size)",
    )  # fmt: skip
    crop_scale: list[float] = option(
        [0.2, 1.0], "random resized crop: the area range", feeds="sela.data:BatchAugment.crop_scale"
    )
    flip_p: float = option(
        0.5, "horizontal flip probability", feeds="sela.data:BatchAugment.flip_p", when="0 for text"
    )
    jitter: list[float] = option(
        [0.4, 0.4, 0.4, 0.4], "colour jitter strengths: brightness, contrast, saturation, hue",
        feeds="sela.data:BatchAugment.jitter", when="SimCLR-style `[0.4,0.4,0.4,0.1]` at 0.8 did better on CIFAR-10",
    )  # fmt: skip
    jitter_p: float = option(1.0, "colour jitter probability", feeds="sela.data:BatchAugment.jitter_p")
    grayscale_p: float = option(0.2, "grayscale probability", feeds="sela.data:BatchAugment.grayscale_p")
    blur_p: float = option(0.0, "Gaussian blur probability", feeds="sela.data:BatchAugment.blur_p")
    small_crops: int = option(
        0, "extra small views per image (multi-crop): swapped, they predict the full views' codes; sela, "
        "they learn the image's label", flag="--small-crops", resume=True, check="at_least_0",
        legacy="small_crops", feeds="sela.objectives:SwappedObjective.small_crops",
    )  # fmt: skip
    small_crop_size: int | None = option(
        None, "side (px) of the small views (unset: half the training view size)", check="at_least_1",
        legacy="small_crop_size",
    )  # fmt: skip
    small_crop_scale: list[float] = option([0.1, 0.4], "area range of the small views")


@dataclass
class SelaConfig:
    """Options of the paper's objective (``sela.objectives.SelaObjective``)."""

    temperature: float | None = option(
        None, "unset: the paper's linear heads; T: cosine heads with scores / T (SeLa-v2)", resume=True,
        check="positive", legacy="sela_temperature", feeds="sela.objectives:SelaObjective.temperature",
    )  # fmt: skip
    soft_targets: int = option(
        0, "0: the paper's hard labels; k: each view learns its image's k largest entries of the transport "
        "plan, renormalised", resume=True, check="at_least_0", legacy="soft_targets",
        feeds="sela.objectives:SelaObjective.soft_targets",
    )  # fmt: skip
    prototypes: str = option(
        "learned", "cosine heads: learned prototypes, or centroids (each cluster's mean head input after "
        "every label step, frozen between them)", resume=True, choices=("learned", "centroids"),
        legacy="sela_prototypes", feeds="sela.objectives:SelaObjective.prototypes",
    )  # fmt: skip


@dataclass
class SwappedConfig:
    """Options of the online objective (``sela.objectives.SwappedObjective``)."""

    temperature: float = option(
        0.1, "softmax temperature of the predictions", check="positive", legacy="swap_temperature",
        feeds="sela.objectives:SwappedObjective.temperature",
    )  # fmt: skip
    epsilon: float = option(
        0.05, "epsilon of the per-batch Sinkhorn codes", check="positive", legacy="swap_epsilon",
        feeds="sela.objectives:SwappedObjective.epsilon",
    )  # fmt: skip
    queue: int = option(
        0, "head inputs of the last N views (per process) join each batch's balancing", check="at_least_0",
        legacy="swap_queue", feeds="sela.objectives:SwappedObjective.queue", when="small batches relative to K",
    )  # fmt: skip


@dataclass
class EvalConfig:
    """Evaluation: the whole-image side, the kNN monitor during training and the final kNN."""

    size: int | None = option(
        None, "side (px) of the whole images the label step and evaluation see (unset: as large as the "
        "largest-scale training views show them, at most the image size)", flag="--eval-size", resume=True,
        check="at_least_1", legacy="eval_size", when="rarely; config.json records the number",
    )  # fmt: skip
    every: int = option(
        0, "also the test split's kNN top-1 and NMI every N epochs (metrics.jsonl, the epoch line; outside "
        "the time budget; 0: only at the end)", flag="--eval-every", check="at_least_0", legacy="eval_every",
    )  # fmt: skip
    knn_k: int = option(200, "neighbours of the kNN evaluation", check="at_least_1", legacy="knn_k",
                        feeds="sela.eval.knn:KNN_K")  # fmt: skip
    knn_temperature: float = option(
        0.1, "temperature of the kNN votes", check="positive", legacy="knn_temperature",
        feeds="sela.eval.knn:KNN_TEMPERATURE",
    )  # fmt: skip


@dataclass
class RuntimeConfig:
    """Where and how the run executes (the Trainer's runtime arguments)."""

    device: str = option("auto", "auto (CUDA when available), cpu or cuda[:N]", flag="--device")
    precision: str = option(
        "auto", "auto (bfloat16 autocast where the device has native bf16, else float32), bf16 or fp32",
        flag="--precision", choices=("auto", "fp32", "bf16"), feeds="sela.train:Trainer.precision",
        when="see [Precision](#precision)",
    )  # fmt: skip
    seed: int = option(0, "random seed", flag="--seed", resume=True, feeds="sela.train:Trainer.seed")
    out: str = option(
        "runs/sela", "run directory", flag="--out", when="an existing run needs --resume or another --out"
    )
    workers: int = option(
        4, "DataLoader workers for streamed (large) datasets", flag="--workers", check="at_least_0",
        feeds="sela.train:Trainer.workers",
    )  # fmt: skip
    sync_bn: bool = option(
        False, "synchronise BatchNorm across processes (CUDA only)", flag="--sync-bn", flag_value=True,
        feeds="sela.train:Trainer.sync_bn",
    )  # fmt: skip
    progress: bool = option(
        True, "progress bars", flag="--no-progress", flag_value=False,
        feeds="sela.train:Trainer.progress", when="--no-progress for logs and batch jobs",
    )  # fmt: skip
    log: list[str] = option(
        ["auto"], "metric loggers besides metrics.jsonl, a comma list (auto: TensorBoard in RUN/tensorboard when "
        "installed; mlflow: RUN/mlflow.db or $MLFLOW_TRACKING_URI)", flag="--log",
        choices=("auto", "tensorboard", "mlflow", "none"), feeds="sela.loggers:metric_sinks.log",
        when="`tensorboard --logdir runs/`; `--log tensorboard,mlflow` for both",
    )  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a ``sela train`` run needs, in sections; docs/training.md describes each option."""

    recipe: str = option(
        "auto", "named settings applied over the defaults: auto (chosen from the images and the device), a "
        "name from `sela.recipes.RECIPES`, or none (the plain defaults)", flag="--recipe",
    )  # fmt: skip
    objective: str = option(
        "sela", "sela (the paper's label steps) or swapped (online, SwAV-style swapped prediction)",
        flag="--objective", resume=True, when="see [Objectives](#objectives)",
    )  # fmt: skip
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sela: SelaConfig = field(default_factory=SelaConfig)
    swapped: SwappedConfig = field(default_factory=SwappedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# --------------------------------------------------------------------------------------------------------
# the schema, read from the declarations


@dataclass(frozen=True)
class Option:
    """One declared setting: its dotted key, type hint, default and metadata."""

    key: str
    hint: Any
    default: Any
    help: str
    flag: str | None
    resume: bool
    check: str | None
    choices: tuple[str, ...] | None
    legacy: str
    when: str
    feeds: str | None
    flag_value: Any

    def help_line(self) -> str:
        """The flag's ``--help`` text: what it sets, its choices, and its default (a switch: what it does)."""
        text = self.help + (f"; one of {', '.join(self.choices)}" if self.choices else "")
        if self.flag_value is not None:
            return text if self.flag_value else f"no {text}"
        return f"{text} [{'unset' if self.default is None else self.default}]"


def _options(cls: type, prefix: str = "") -> list[Option]:
    hints = typing.get_type_hints(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _options(hints[f.name], f"{prefix}{f.name}.")
            continue
        m = f.metadata
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        legacy = m["legacy"] or (f"{prefix}{f.name}" if prefix == "augment." else f.name)
        out.append(
            Option(
                key=prefix + f.name,
                hint=hints[f.name],
                default=default,
                help=m["help"],
                flag=m["flag"],
                resume=m["resume"],
                check=m["check"],
                choices=m["choices"],
                legacy=legacy,
                when=m["when"],
                feeds=m["feeds"],
                flag_value=m["flag_value"],
            )  # fmt: skip
        )
    return out


OPTIONS: list[Option] = _options(TrainConfig)
BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}
# the keys of runs written before the sections existed (flat: "label_updates", "sela_temperature", ...)
LEGACY_KEYS: dict[str, str] = {o.legacy: o.key for o in OPTIONS if o.legacy != o.key}
MUST_MATCH: tuple[str, ...] = tuple(o.key for o in OPTIONS if o.resume)


def canonical_key(key: str) -> str:
    """The dotted key of ``key`` (a legacy flat name like ``label_updates`` is translated)."""
    key = key.strip()
    return LEGACY_KEYS.get(key, key)


# --------------------------------------------------------------------------------------------------------
# dicts, TOML and overrides


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: value}."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def upgrade(config: dict) -> dict:
    """A recorded configuration in today's nested form: a run written before the sections existed (flat
    keys such as ``arch`` or ``label_updates``) is translated; keys starting with ``_`` (the command line,
    the version) are kept as they are; unknown keys are dropped."""
    if isinstance(config.get("model"), dict):
        return config
    nested: dict[str, Any] = {k: v for k, v in config.items() if k.startswith("_")}
    for key, value in flatten({k: v for k, v in config.items() if not k.startswith("_")}).items():
        key = canonical_key(key)
        if key in BY_KEY:
            node = nested
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return nested


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


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML file as {dotted key: value} (legacy flat keys translated)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; pass an existing .toml file to --config")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    return {canonical_key(k): v for k, v in flatten(table).items()}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["augment.flip_p=0.5", "model.clusters=[10,20]"]`` -> {dotted key: value}; values are JSON where
    they parse, strings otherwise (``model.arch=resnet18``); legacy flat keys are translated."""
    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value, e.g. augment.flip_p=0.5")
        try:
            parsed[canonical_key(key)] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[canonical_key(key)] = raw
    return parsed


def apply_overrides(cfg: Any, overrides: dict[str, Any] | list[str]) -> Any:
    """A copy of ``cfg`` with overrides applied: {dotted key: typed value}, or "key=value" strings
    (:func:`parse_overrides`). Legacy flat keys are accepted."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data = to_dict(cfg)
    for key, value in overrides.items():
        key = canonical_key(key)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"unknown config section {p!r} in {key!r}; see `sela train --help`")
            node = node[p]
        if leaf not in node or isinstance(node[leaf], dict):
            raise ValueError(f"unknown config key {key!r}; see docs/training.md for the keys")
        node[leaf] = value
    return from_dict(type(cfg), data)


def get(cfg: Any, key: str) -> Any:
    """The value of dotted ``key`` in a config dataclass."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Every declared check and choice; a ValueError that names the setting and its flag."""
    for o in OPTIONS:
        value = get(cfg, o.key)
        name = o.flag or o.key
        if o.choices and not set(value if isinstance(value, list) else [value]) <= set(o.choices):
            raise ValueError(f"{name} must be one of {', '.join(o.choices)}, got {value!r}")
        if o.check is None or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if o.check == "at_least_2" and not values:
            raise ValueError(f"{name} needs at least one value")
        for v in values:
            bad = {
                "positive": not (math.isfinite(v) and v > 0),
                "at_least_0": v < 0,
                "at_least_1": v < 1,
                "at_least_2": v < 2,
            }[o.check]
            if bad:
                what = {"positive": "a positive number", "at_least_0": ">= 0", "at_least_1": ">= 1"}
                raise ValueError(f"{name} must be {what.get(o.check, '>= 2')} (or unset), got {value!r}")


# --------------------------------------------------------------------------------------------------------
# what recorded configurations say


def data_settings(config: dict) -> dict[str, Any]:
    """What a run's recorded configuration (either form) says about its data: ``dataset``, ``data_dir``,
    ``image_size`` (the side images were resized to) and ``eval_size`` (the side the evaluation showed
    them at); None where it does not say."""
    config = upgrade(config)
    data, ev = config.get("data", {}), config.get("eval", {})
    return {
        "dataset": data.get("dataset"),
        "data_dir": data.get("data_dir"),
        "image_size": data.get("image_size"),
        "eval_size": ev.get("size"),
    }


def recorded_arch(config: dict) -> str | None:
    """The architecture a recorded configuration (either form) names."""
    return upgrade(config).get("model", {}).get("arch")


def model_options(model: dict) -> dict[str, Any]:
    """The keyword arguments of ``create_model`` that a model section sets beyond ``arch`` and the
    clusters: ``widths``, ``pools``, ``projector`` where given (unset or empty: the model's own)."""
    return {key: model[key] for key in ("widths", "pools", "projector") if model.get(key)}


def legacy_model_spec(config: dict, in_channels: int, input_size: int) -> dict[str, Any]:
    """The model spec of a run written before checkpoints recorded one (format 1), from its config:
    ``create_model(**spec)`` rebuilds its network. ``in_channels``, ``input_size``: the channels and side
    (px) of the run's images, as training gave them to the model."""
    config = upgrade(config)
    model = config.get("model", {})
    heads, clusters = model.get("heads", 1), list(model.get("clusters") or [])
    spec: dict[str, Any] = {
        "arch": model["arch"],
        "n_clusters": clusters * heads if len(clusters) == 1 else clusters,
        "normalize_heads": config.get("objective") == "swapped",
        "in_channels": in_channels,
        "input_size": input_size,
    }
    spec.update(model_options(model))
    return spec


def compare_configs(saved: dict, current: dict) -> list[str]:
    """The settings that must agree for an exact resume and differ: 'key: saved -> current' (either form)."""
    old, new = flatten(upgrade(saved)), flatten(upgrade(current))
    return [
        f"{k}: {old[k]!r} -> {new[k]!r}" for k in MUST_MATCH if k in old and k in new and old[k] != new[k]
    ]


# --------------------------------------------------------------------------------------------------------
# coercion


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check/convert ``value`` to the annotated type ``hint`` (int, float, str, bool, list, X | None); a
    list also accepts a comma-separated string (``--clusters 10,20``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
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
        return _integer(value, name)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {name} must be a number, got {value!r}") from None
    if hint is str:
        return str(value)
    return value


def _integer(value: Any, name: str) -> int:
    message = f"config key {name} must be an integer, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(message)
    try:
        f = float(value)
    except ValueError:
        raise ValueError(message) from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(message)
    return int(f)


# --------------------------------------------------------------------------------------------------------
# the docs table


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    return json.dumps(value) if isinstance(value, list | bool) else str(value)


def markdown_tables() -> str:
    """The options tables of docs/training.md, one per section (``python -m sela.config`` prints them)."""
    lines: list[str] = []
    sections: dict[str, list[Option]] = {}
    for o in OPTIONS:
        sections.setdefault(o.key.rpartition(".")[0] or "run", []).append(o)
    for section, options in sections.items():
        lines += [f"#### `{section}`" if section != "run" else "#### top level", ""]
        lines += [
            "| key | flag | what [default] | resume must match | when to change |",
            "|---|---|---|---|---|",
        ]
        for o in options:
            choices = f" ({_choice_text(o.choices)})" if o.choices else ""
            flag = f"`{o.flag}`" if o.flag else ""
            what = f"{o.help}{choices} [`{_shown(o.default)}`]"
            lines.append(f"| `{o.key}` | {flag} | {what} | {'yes' if o.resume else ''} | {o.when} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


DOCS_BEGIN, DOCS_END = "<!-- options: begin (python -m sela.config) -->\n", "<!-- options: end -->"


def write_docs(path: str | Path) -> None:
    """Replace the options tables between the markers of ``path`` (docs/training.md) with today's."""
    path = Path(path)
    before, rest = path.read_text().split(DOCS_BEGIN)
    path.write_text(before + DOCS_BEGIN + markdown_tables() + DOCS_END + rest.split(DOCS_END)[1])


if (
    __name__ == "__main__"
):  # python -m sela.config [docs/training.md]: print the tables, or rewrite them there
    import sys

    write_docs(sys.argv[1]) if len(sys.argv) > 1 else print(markdown_tables(), end="")
