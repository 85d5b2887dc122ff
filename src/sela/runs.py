"""Open a trained model for inspection: a ``sela train`` run, a sela checkpoint, or a foreign checkpoint.

Accepted sources (:func:`load_run`):
  * a run directory written by ``sela train --out DIR`` (it holds ``checkpoint.pt``);
  * a sela checkpoint file (``checkpoint.pt``; it carries its own configuration);
  * a plain state dict, e.g. torchvision ResNet weights (heads, if any, are read from ``fc``);
  * a released SeLa checkpoint ``{"state_dict": ..., "labels": ...}``.
For the last two the architecture and the dataset are not recorded and must be given.

Checkpoints are pickles: open only files you trust. Letters: N training images, H heads, K_h clusters.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sela.data import SPLITS, EvalTransform, ImageSet, load_dataset
from sela.models import SelaModel, create_model, list_models, load_pretrained

CHECKPOINT = "checkpoint.pt"
# head weights as load_pretrained maps them: top_layer<i>, fc<i>, heads.<i> (optionally ".0")
_HEAD_KEY = re.compile(r"^(?:top_layer|fc|heads\.)(\d*)(?:\.0)?\.weight$")


@dataclass
class Run:
    """A model ready for evaluation, with the data it was (or is to be) evaluated on.

    Attributes:
        model: the network in eval mode on its device.
        labels: (H, N) int64 self-labels of ``train_set`` stored with the model, or None.
        train_set: the training split (its targets are only used for evaluation).
        test_set: the test (or val) split, or None when the dataset has none.
        transform: the un-augmented evaluation transform (uint8 -> normalised float, ``image_size`` px).
        image_size: the side (px) the model sees.
        dataset, arch: names, as ``sela train`` takes them.
        config: the run's resolved configuration ({} for foreign checkpoints).
        source: the path that was opened; ``run_dir``: the run directory, or None.
        summary: the run's summary.json ({} when absent).
        untrained_heads: heads whose weights were not in the checkpoint (their outputs mean nothing).
        notes: things the caller should tell the user (labels dropped, heads missing, ...).
    """

    model: SelaModel
    labels: Tensor | None
    train_set: ImageSet
    test_set: ImageSet | None
    transform: EvalTransform
    image_size: int
    dataset: str
    arch: str
    config: dict = field(default_factory=dict)
    source: Path = Path(".")
    run_dir: Path | None = None
    summary: dict = field(default_factory=dict)
    untrained_heads: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def trained_heads(self) -> list[int]:
        return [h for h in range(len(self.model.n_clusters)) if h not in self.untrained_heads]


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` on the CPU: tensors-only first, then (for older pickles with numpy arrays) in full."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, ImportError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None


def _is_sela_checkpoint(ckpt: Any) -> bool:
    return (
        isinstance(ckpt, dict)
        and isinstance(ckpt.get("model"), dict)
        and isinstance(ckpt.get("config"), dict)
    )


def _state_dict(ckpt: Any) -> dict[str, Tensor]:
    state = ckpt
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                state = ckpt[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            "the checkpoint holds no state dict (a dict of tensors, or one under 'state_dict' or 'model'); "
            "pass a run directory, a sela checkpoint.pt or model weights"
        )
    return {".".join(p for p in k.split(".") if p != "module"): v for k, v in state.items()}


def _head_sizes(state: dict[str, Tensor]) -> list[int]:
    """K_h of each head found in a state dict, in head order ([] when it has none)."""
    found = {}
    for key, value in state.items():
        m = _HEAD_KEY.match(key)
        if m and value.ndim == 2:
            found[int(m.group(1) or 0)] = int(value.shape[0])
    return [found[i] for i in sorted(found)]


def _input_channels(state: dict[str, Tensor]) -> int | None:
    """Channels C of the first convolution's weights (C_out, C, kh, kw), or None."""
    return next((int(v.shape[1]) for v in state.values() if v.ndim == 4 and v.is_floating_point()), None)


def _shape_kwargs(arch: str, state: dict[str, Tensor]) -> dict[str, Any]:
    """Width settings of the architecture as the checkpoint's tensors have them (convnet, alexnet), and
    the projector's widths (Linear weights at projector.0, .3, ...)."""
    projector = []
    while f"projector.{3 * len(projector)}.weight" in state:
        projector.append(int(state[f"projector.{3 * len(projector)}.weight"].shape[0]))
    if projector:
        return {
            **_shape_kwargs(arch, {k: v for k, v in state.items() if not k.startswith("projector.")}),
            "projector": tuple(projector),
        }
    if arch == "convnet":
        widths = []
        while f"blocks.{len(widths)}.0.weight" in state:
            widths.append(int(state[f"blocks.{len(widths)}.0.weight"].shape[0]))
        return {"widths": tuple(widths)} if widths else {}
    if arch == "alexnet":
        convs = [int(v.shape[0]) for k, v in state.items() if k.startswith("features.") and v.ndim == 4]
        fc = state.get("classifier.4.weight")
        kwargs: dict[str, Any] = {"size": tuple(convs)} if len(convs) == 5 else {}
        if fc is not None:
            kwargs["hidden_dim"] = int(fc.shape[0])
        return kwargs
    return {}


def _as_label_matrix(labels: Any) -> Tensor | None:
    """Released / sela labels as (H, N) int64, or None when they are not integer label arrays."""
    if labels is None:
        return None
    t = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, Tensor) else labels
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim not in (1, 2):
        return None
    return (t[None] if t.ndim == 1 else t).long()


def _test_split(dataset: str, data_dir: str | None, size: int | None) -> ImageSet | None:
    for split in ("test", "val"):
        if split in SPLITS.get(dataset, ()):
            try:
                return load_dataset(dataset, data_dir, split, image_size=size)
            except FileNotFoundError:
                continue
    return None


def load_run(
    source: str | os.PathLike,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    image_size: int | None = None,
    arch: str | None = None,
    clusters: list[int] | None = None,
    device: torch.device | str = "cpu",
    default_image_size: dict[str, int] | None = None,
    test_split: bool = True,
) -> Run:
    """Open ``source`` (see the module docstring) with the data it is to be evaluated on.

    Args:
        source: a run directory, a sela checkpoint, a state dict file or a released SeLa checkpoint.
        dataset, data_dir, image_size: the data; for a sela run they default to the run's own and
            override it when given. ``image_size`` is the side (px) the model sees.
        arch: the architecture; required for foreign checkpoints, must match for sela runs.
        clusters: K per head for foreign checkpoints without heads (default: the heads found in the
            checkpoint; with none, one placeholder head that is reported as untrained).
        device: where the model runs.
        default_image_size: side (px) per dataset name when neither the run nor ``image_size`` set one
            (``sela train`` trains digits at 16 px).
        test_split: also load the test (or val) split when the dataset has one.

    Raises:
        ValueError (FileNotFoundError for missing paths): with a message that names the fix.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory or a checkpoint file")
    run_dir = None
    if path.is_dir():
        if not (path / CHECKPOINT).is_file():
            raise ValueError(f"{path} holds no {CHECKPOINT}; pass a run directory of `sela train --out DIR`")
        run_dir, path = path, path / CHECKPOINT
    elif path.name == CHECKPOINT and (path.parent / "config.json").is_file():
        run_dir = path.parent
    ckpt = read_checkpoint(path)
    notes: list[str] = []

    # what the source says about itself, then what the caller says
    if _is_sela_checkpoint(ckpt):
        config = dict(ckpt["config"])
        if arch is not None and arch != config.get("arch"):
            raise ValueError(f"{path} was trained as {config.get('arch')!r}; drop --arch {arch}")
        arch = config.get("arch")
        dataset = dataset or config.get("dataset")
        data_dir = data_dir if data_dir is not None else config.get("data_dir")
        image_size = image_size or config.get("image_size")
        labels = _as_label_matrix(ckpt.get("labels"))
    else:
        config = {}
        if arch is None or dataset is None:
            raise ValueError(
                f"{path} is not a sela run, so give its architecture and data: --arch NAME --dataset NAME"
            )
        labels = _as_label_matrix(ckpt.get("labels")) if isinstance(ckpt, dict) else None
    if arch not in list_models():
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(list_models())}")
    state = _state_dict(ckpt)

    # data
    size = image_size or (default_image_size or {}).get(dataset)
    train_set = load_dataset(dataset, data_dir, "train", image_size=size)
    if len(train_set) == 0:
        raise ValueError(f"the {dataset} training split is empty; check --data-dir")
    test_set = _test_split(dataset, data_dir, size) if test_split else None
    out_size = size or (int(train_set.images.shape[-1]) if train_set.in_memory else 224)

    # model: heads and input channels as the checkpoint has them
    ks = _head_sizes(state)
    if clusters and ks and list(clusters) != ks:
        raise ValueError(f"the checkpoint has heads with K = {ks}; drop --clusters or pass --clusters {ks}")
    ks = ks or list(clusters or [2])
    channels = _input_channels(state) or 3
    kwargs: dict[str, Any] = {"in_channels": channels, **_shape_kwargs(arch, state)}
    # pools are not in the weights (an un-pooled block has the same parameters): the config says
    if arch == "convnet" and config.get("pools"):
        kwargs["pools"] = tuple(config["pools"])
    if arch in ("convnet", "alexnet"):
        kwargs["input_size"] = out_size
    model = create_model(arch, ks, **kwargs)
    model.normalize_heads = config.get("objective") == "swapped"  # cosine heads, as trained
    skipped = load_pretrained(model, state)
    untrained = sorted({int(name.split(".")[1]) for name in skipped})
    if untrained:
        notes.append(f"heads {untrained} are not in the checkpoint; their cluster metrics are skipped")
    model = model.to(device).eval()
    transform = EvalTransform(out_size, mean=train_set.mean, std=train_set.std).to(device)
    check_fits(model, train_set, transform, arch=arch, image_size=out_size)

    if labels is not None and (labels.shape[0] != len(ks) or labels.shape[1] != len(train_set)):
        notes.append(
            f"the checkpoint's labels {tuple(labels.shape)} do not match {len(ks)} heads x "
            f"{len(train_set)} {dataset} training images; they are not evaluated"
        )
        labels = None
    summary = {}
    if run_dir is not None and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    return Run(
        model=model,
        labels=labels,
        train_set=train_set,
        test_set=test_set,
        transform=transform,
        image_size=out_size,
        dataset=dataset,
        arch=arch,
        config=config,
        source=Path(source),
        run_dir=run_dir,
        summary=summary,
        untrained_heads=untrained,
        notes=notes,
    )


@torch.no_grad()
def check_fits(
    model: nn.Module, images: ImageSet, transform: EvalTransform, *, arch: str, image_size: int
) -> None:
    """Run two images through the model; a ValueError says what to change when they do not fit."""
    n = min(2, len(images))
    sample = images.images[:n] if images.in_memory else torch.stack([images[i][0] for i in range(n)])
    c = int(sample.shape[1])
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != c:
        raise ValueError(
            f"the images have {c} channels but {arch} takes {first.in_channels}; use weights trained on "
            f"{c}-channel images or a dataset with {first.in_channels}-channel images"
        )
    x = transform(sample.to(next(model.parameters()).device))
    try:
        model.forward_features(x)
    except RuntimeError as e:
        raise ValueError(
            f"{c}x{image_size}x{image_size} images do not fit {arch} ({str(e).strip().splitlines()[0]}); "
            f"pass --image-size {getattr(model, 'default_input_size', image_size)}"
        ) from None
