"""Named, measured training recipes, and the rule that picks one from the data and the device.

A recipe is a set of ``sela train`` settings (dotted config keys, as in config.json) that suits a kind of data
and machine. ``sela train`` applies it over the defaults and under a TOML file, flags and ``--set`` overrides,
so any field can still be changed. The rule (:func:`choose`) looks only at what any image folder has: the
images' side and channels, their number, and the device; never at a dataset's name. A registered dataset
may name a recipe of its own (the embedded digits: ``digits``), which ``auto`` then takes.

Recipes:
    digits    the embedded demo (8x8 digits upsampled to 16 px, a few minutes on 2 CPU cores): 4 heads x 10,
              40 epochs, lr 0.03, 25 label steps from augmented train-mode inputs, no flips or grayscale
              (digits are grey and flips change them), crops of 0.6-1.
    cpu-fast  a time budget on a CPU: the online ``swapped`` objective on half-size views with a small
              convnet whose blocks pool down to a 4x4 map (measured: docs/experiments.md).
    cpu-sela  cpu-fast with the paper's offline objective and the SeLa-v2 improvements that measured well:
              label steps every epoch from the training pass's own outputs (no extra pass), cosine heads
              with a temperature, lambda 10 (:func:`_sela_v2`), crops of 0.08-1 of the area on colour images.
    gpu-fast  a time budget on one GPU: ResNet-18, the swapped objective, multi-crop (not yet measured).
    gpu-sela  gpu-fast with cpu-sela's offline objective and options (not yet measured).
    paper     the paper's CIFAR-10 protocol as the original code publishes it: AlexNet with BatchNorm on
              images upsampled to 224 px, 10 heads x 128 clusters, lambda 10, 400 epochs, a label step per
              epoch re-labelling one head in turn from augmented train-mode outputs, lr 0.03 with steps,
              the original augmentation (:func:`_paper` lists what still differs).
    paper-resnet18  the same protocol with ResNet-18 (CIFAR stem) at the images' own size.

Data-dependent parts of the fast recipes: the training views are half the image side (the label step and
evaluation see whole images, at the scale the views showed them: ``sela.data.view_scale_size``);
greyscale images (one channel, or three equal ones) get no colour jitter of hue or saturation and no
grayscale conversion, and the same crops and flips as colour images; the number of clusters is at most N / 20 so that every cluster
can hold a few dozen images; the batch is at most the largest power of two <= N / 2 (:func:`batch_cap`);
with a time budget, the training side is the largest of :func:`candidate_sides` that affords
:data:`MIN_EPOCHS` epochs at the measured cost (:func:`side_for_budget`, measured by :mod:`sela.sizing`).

A pretrained start (``--init``, :attr:`DataFacts.pretrained`) changes every recipe (:func:`_from_pretrained`):
the network is the one the weights fit, the learning rate is a tenth, a warm-up of at least one epoch lets the
fresh heads settle before the backbone moves far, and the first labels are clusters of the pretrained features
(eval-mode label inputs on un-augmented images at step 0). ``auto`` then picks the offline objective
(``cpu-sela``, ``gpu-sela``), whose training starts from those labels (measured: docs/experiments.md).

This module imports no torch at import time (the CLI lists the recipes in ``--help``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sela.config import BY_KEY

if TYPE_CHECKING:
    import torch

    from sela.data import ImageSet

MIXED_SHARE = 0.05  # a folder with 5-95 % greyscale images mixes the two
MIXED_GRAYSCALE_P = 0.5  # grey views on such a folder (measured: docs/experiments.md, "Colour as a nuisance")
# budget-aware sizing (sela.sizing measures, side_for_budget decides; docs/experiments.md, "Budget-aware sizing")
MIN_SIDE = 32  # px: a time budget shrinks the training side no further (never below the images' own)
MIN_EPOCHS = 30  # the passes a budget must buy before a larger side is worth its cost
# an epoch's time over N x the timed steps' time per image: the label passes, which take at most LABEL_SHARE
# (0.15, sela.schedule) of the time, 1 / (1 - 0.15)
EPOCH_OVERHEAD = 1.18
RECIPES = ("digits", "cpu-fast", "cpu-sela", "gpu-fast", "gpu-sela", "paper", "paper-resnet18")


@dataclass(frozen=True)
class DataFacts:
    """What the rule looks at: image side (px), channels, greyscale, number of images, device type, and
    whether the backbone starts from pretrained weights (``--init``)."""

    side: int
    channels: int
    grey: bool
    n: int
    device: str
    pretrained: bool = False
    grey_share: float = 0.0  # of the sampled 3-channel images, the share with R = G = B

    @property
    def mixed(self) -> bool:
        """Colour and greyscale images together (5-95 % of the sample grey)."""
        return not self.grey and MIXED_SHARE <= self.grey_share <= 1.0 - MIXED_SHARE

    def describe(self) -> str:
        kind = "greyscale" if self.grey else f"{self.channels}-channel"
        if self.mixed:
            kind += f" ({self.grey_share:.0%} greyscale)"
        start = ", a pretrained backbone" if self.pretrained else ""
        return f"{self.device.upper()}, {self.n} {kind} images of {self.side} px{start}"


def data_facts(
    train_set: ImageSet, side: int, device: torch.device, *, pretrained: bool = False
) -> DataFacts:
    """The facts of a training set (greyscale: one channel, or three equal channels on a sample);
    ``pretrained``: the backbone starts from weights (``--init``)."""
    grey, share = train_set.channels == 1, 0.0
    if train_set.in_memory and train_set.channels == 3:
        sample = train_set.images[:: max(1, len(train_set) // 256)]  # (n, 3, H, W)
        per_image = ((sample[:, 0] == sample[:, 1]) & (sample[:, 1] == sample[:, 2])).flatten(1).all(1)  # (n,)
        share = float(per_image.float().mean())
        grey = bool(per_image.all())
    return DataFacts(
        side=side, channels=train_set.channels, grey=grey, n=len(train_set), device=device.type,
        pretrained=pretrained, grey_share=share,
    )  # fmt: skip


def choose(facts: DataFacts, own: str | None = None) -> tuple[str, str]:
    """The recipe for these data and device, and why (one line); ``own``: the recipe a registered dataset
    names for itself (the digits demo's), taken when given."""
    if own is not None:
        return own, f"{facts.describe()}: the dataset's own recipe"
    if facts.pretrained:
        name = "gpu-sela" if facts.device == "cuda" else "cpu-sela"
        return (
            name,
            f"{facts.describe()}: the offline objective, its first labels clusters of the weights' features",
        )
    if facts.device == "cuda":
        return "gpu-fast", f"{facts.describe()}: a GPU, so ResNet-18 with the online objective"
    return "cpu-fast", f"{facts.describe()}: a CPU, so the small convnet on half-size views"


def candidate_sides(side: int) -> list[int]:
    """The training sides a budget may choose, largest first: the images' own, then steps of 3/4
    (multiples of 8) down to :data:`MIN_SIDE`; just the images' own side at or below it."""
    out = [side]
    while True:
        nxt = max(MIN_SIDE, 8 * round(out[-1] * 0.75 / 8))
        if nxt >= out[-1]:
            return out
        out.append(nxt)


def side_for_budget(costs: dict[int, float], budget_s: float | None, *, epochs: int) -> tuple[int, str]:
    """The training side and why, from the measured seconds per epoch at each candidate side
    (``costs``, largest side first, as measured by :func:`sela.sizing.choose_side`).

    With a budget (s): the largest side at which the budget buys at least :data:`MIN_EPOCHS` epochs, else
    the smallest measured one. Without one: the first (the images' own side), with how long ``epochs``
    epochs will take."""
    if not costs:
        raise ValueError("side_for_budget needs the cost of at least one side")
    sides = list(costs)
    if budget_s is None:
        side = sides[0]
        return side, f"{side} px, about {_duration(costs[side] * epochs)} for {epochs} epochs"
    fits = [s for s in sides if budget_s / costs[s] >= MIN_EPOCHS]
    side = fits[0] if fits else sides[-1]
    got = f"{side} px: about {budget_s / costs[side]:.0f} epochs in {_duration(budget_s)}"
    if side == sides[0]:
        return side, got
    skipped = ", ".join(f"{s} px {budget_s / costs[s]:.0f}" for s in sides if s > side)
    return side, f"{got} (the images' side would give fewer than {MIN_EPOCHS}: {skipped})"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def settings(name: str, facts: DataFacts) -> dict[str, Any]:
    """The config settings of recipe ``name`` for these data (dotted keys for the augment section)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)} (or auto)")
    out = _recipe(name, facts)
    return _from_pretrained(out) if facts.pretrained else out


# the settings that pick the network: a pretrained start takes the one its weights fit
NETWORK_KEYS = ("model.arch", "model.widths", "model.pools")
PRETRAINED_LR_SCALE = 0.1


def _from_pretrained(out: dict[str, Any]) -> dict[str, Any]:
    """A recipe for a pretrained backbone: the weights' network, a tenth of the learning rate, a warm-up of
    at least one epoch, and label passes over un-augmented images in eval mode instead of augmented train-mode
    ones, so that the first labels are clusters of the pretrained features (as SCAN and TEMI start). Label
    steps from the training pass's outputs (``recorded``, cpu-sela's) stay: as eval passes every epoch they
    took 73 % of a 4-minute Imagewoof64 run (issue 32's measurement)."""
    out = {k: v for k, v in out.items() if k not in NETWORK_KEYS}
    out["optim.lr"] = PRETRAINED_LR_SCALE * out.get("optim.lr", BY_KEY["optim.lr"].default)
    warmup = out.get("optim.warmup_epochs", BY_KEY["optim.warmup_epochs"].default)
    out["optim.warmup_epochs"] = max(1.0, warmup)
    if out.get("labels.inputs", BY_KEY["labels.inputs"].default) == "train":
        out["labels.inputs"] = "eval"  # "recorded" stays: its per-epoch steps cost no extra pass
    return out


def _recipe(name: str, facts: DataFacts) -> dict[str, Any]:
    if name == "digits":
        return _digits()
    if name.startswith("paper"):
        return _paper(resnet=name == "paper-resnet18")
    out = _gpu_fast(facts) if name.startswith("gpu") else _cpu_fast(facts)
    sela = name.endswith("-sela")
    if sela:
        out.update(_sela_v2())
    out["model.clusters"] = [min(out["model.clusters"][0], max(10, facts.n // 20))]
    out["optim.batch_size"] = min(out["optim.batch_size"], batch_cap(facts.n))
    out.update(_augment(facts, sela))
    return out


def batch_cap(n: int) -> int:
    """The largest batch a fast recipe uses on N images: the largest power of two <= N / 2 (at least 8),
    so that a small folder gets two or more steps an epoch instead of a batch larger than the data."""
    return max(8, 2 ** int(math.log2(max(n // 2, 1))))


def _cpu_fast(facts: DataFacts) -> dict[str, Any]:
    view = max(8, facts.side // 2)
    # pool until the last map is about 4 x 4 (16 px views: pooled, pooled, un-pooled)
    n_pools = min(3, max(0, round(math.log2(view / 4))))
    return {
        "objective": "swapped",
        "model.arch": "convnet",
        "model.widths": [32, 64, 96],
        "model.pools": [i < n_pools for i in range(3)],
        "model.heads": 5,
        "model.clusters": [128],
        "augment.crop_size": view,
        "optim.batch_size": 256,
        "optim.lr": 0.25,
        "labels.inputs": "eval",
        "labels.heads": "round-robin",
        "labels.spacing": "linear",
        "labels.updates": 4,
    }


def _sela_v2() -> dict[str, Any]:
    """The offline objective with those of SeLa-v2's training improvements (Caron et al. 2020, Sec. 4) that
    measured well here (docs/experiments.md, CIFAR-10 in 15 CPU minutes): cosine heads with T = 0.1 (51.96 %
    without them), hard labels (soft codes: within noise), learned prototypes (centroids: 54.56 %), label
    steps every epoch from the training pass's own outputs, and no small crops (57.79 %; 2 small crops:
    55.60 %, 4: 53.30 %: at a budget, more epochs beat more views). Lambda 10 on scores / T (the original
    code's CIFAR value), measured at 30 minutes: 61.98 % over five runs, against 61.60 % (two runs) with
    5 and 61.47 % (one) with 20, within the noise; 2 (SwAV's epsilon) left the first labels unbalanced."""
    return {
        "objective": "sela",
        "sela.temperature": 0.1,
        "labels.lam": 10.0,  # on scores / T: exp(10 x 10 cos)
        "augment.small_crops": 0,
        "labels.inputs": "recorded",
        "labels.updates": 1000,  # merged to one per epoch: every epoch ends with a label step
        "labels.heads": "all",
    }


def _gpu_fast(facts: DataFacts) -> dict[str, Any]:
    return {
        "objective": "swapped",
        "model.arch": "resnet18_cifar" if facts.side <= 64 else "resnet18",
        "model.heads": 3,
        "model.clusters": [512],
        "optim.batch_size": 512,
        "optim.lr": 0.6,
        "augment.small_crops": 4,
        "labels.inputs": "eval",
        "optim.epochs": 200,
    }


def _augment(facts: DataFacts, sela: bool) -> dict[str, Any]:
    """The augmentation of the fast recipes: SimCLR's colour jitter on colour images; on greyscale ones the
    same crops and flips with brightness and contrast only (no colour to be invariant to; flips and crops of
    0.2-1 measured 4.5-5.9 points better than no flips and crops of 0.5-1 on two greyscale sets and 1.0
    worse, a run's noise, on handwritten digits: docs/experiments.md, "Rules by leave-one-set-out"; the
    digits demo keeps its own recipe). ``sela``: crops of 0.08-1 of
    the area (the offline objective learns each image's label from one view per epoch and gained from
    harder views: docs/experiments.md, crop scale rows of issue 21)."""
    jitter = [0.4, 0.4, 0.0, 0.0] if facts.grey else [0.4, 0.4, 0.4, 0.1]
    out: dict[str, Any] = {"augment.jitter": jitter, "augment.jitter_p": 0.8}
    if facts.grey:
        out["augment.grayscale_p"] = 0.0
    elif facts.mixed:  # colour and grey photos of the same kinds: colourfulness must not be a feature
        out["augment.grayscale_p"] = MIXED_GRAYSCALE_P
    if sela:
        out["augment.crop_scale"] = [0.08, 1.0]
    return out


def _paper(resnet: bool) -> dict[str, Any]:
    """The published CIFAR-10 setting of the original code (yukimasano/self-label, ``scripts/cifar.sh``
    and ``cifar.py``): AlexNet (BatchNorm) on images upsampled to 224 px, 10 heads x 128, lambda 10,
    400 epochs, 400 label steps on a linear schedule (the first at step 0), one head in turn, label
    inputs augmented in train mode, SGD lr 0.03, batch 128, momentum 0.9, weight decay 5e-4, steps of
    0.1 late in the run, no warm-up; crops of 0.2-1 of the image, colour jitter 0.4 (hue 0.4 too),
    grey 0.2, flips. Differences that remain: the learning-rate steps fall at 50 and 75 % of the run
    (the original: epochs 240 and 320 of 400, 60 and 80 %); labels start from the random network's
    outputs (the original: a random equipartition); evaluation sees the whole image (the original: a
    224 px centre crop of a 256 px resize). ``resnet``: ResNet-18 with the CIFAR stem at the images'
    own size instead of AlexNet (not in the paper)."""
    out: dict[str, Any] = {
        "objective": "sela",
        "model.arch": "alexnet",
        "data.image_size": 224,
        "model.heads": 10,
        "model.clusters": [128],
        "labels.lam": 10.0,
        "optim.epochs": 400,
        "optim.batch_size": 128,
        "optim.lr": 0.03,
        "optim.lr_schedule": "step",
        "optim.warmup_epochs": 0.0,
        "labels.updates": 400,
        "labels.spacing": "linear",
        "labels.heads": "round-robin",
        "labels.inputs": "train",
        "augment.crop_scale": [0.2, 1.0],
        "augment.jitter": [0.4, 0.4, 0.4, 0.4],
        "augment.jitter_p": 1.0,
        "augment.grayscale_p": 0.2,
        "augment.flip_p": 0.5,
    }
    if resnet:
        out.update({"model.arch": "resnet18_cifar", "data.image_size": None})
    return out


def _digits() -> dict[str, Any]:
    """The embedded demo's settings (the digits dataset names this recipe): measured on the demo, augmented
    train-mode label inputs (the original code's choice) give self-label NMI 0.85 where eval-mode inputs give
    0.80; no flips or grayscale (digits are grey and flips change them), gentler crops than photographs'."""
    return {
        "model.heads": 4,
        "model.clusters": [10],
        "optim.epochs": 40,
        "optim.lr": 0.03,
        "labels.updates": 25,
        "labels.inputs": "train",
        "augment.flip_p": 0.0,
        "augment.crop_scale": [0.6, 1.0],
        "augment.jitter": [0.4, 0.4, 0.0, 0.0],
        "augment.grayscale_p": 0.0,
    }
