"""Where ``sela train --init SOURCE`` takes its starting weights from, and the network they need.

Sources:
  * a sela run directory (or its ``checkpoint.pt``), or a file of ``sela export``;
  * a torchvision or timm state dict on disk (e.g. ``torch.save(torchvision.models.resnet18().state_dict())``);
  * a library weights name, fetched through the library's own download and cache:
    ``torchvision:ResNet18_Weights.IMAGENET1K_V1`` (``torchvision.models.get_weight``) or
    ``timm:resnet18.a1_in1k`` (``timm.create_model(..., pretrained=True)``).
Files are read with ``weights_only=True`` (:func:`sela.rundir.load_file`). The backbone starts from the
weights; heads and projector start fresh (:func:`sela.models.pretrained.load_backbone`). A sela source and a
library name also say which network they fit (:func:`start_network`); a plain state dict needs ``--arch``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from sela import rundir
from sela.models import SelaModel, check_arch
from sela.models.export import info_path
from sela.models.pretrained import load_backbone
from sela.models.registry import TIMM_PREFIX
from sela.models.timm_backbone import check_timm_name, timm_network

TORCHVISION_PREFIX = "torchvision:"
_OFFLINE = "on a machine without internet, download the weights elsewhere and pass the file: --init PATH"


def _torchvision_weights(name: str):
    """The torchvision weights enum member ``name`` (``ResNet18_Weights.IMAGENET1K_V1``)."""
    import torchvision

    try:
        return torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(
            f'torchvision has no weights {name!r}; list them with python -c "import torchvision; '
            "print(list(torchvision.models.get_model_weights('resnet18')))\""
        ) from None


def _torchvision_arch(name: str) -> str:
    """The sela architecture of torchvision weights: ``ResNet18_Weights.X`` -> ``resnet18``."""
    arch = type(_torchvision_weights(name)).__name__.removesuffix("_Weights").lower()
    try:
        return check_arch(arch)
    except ValueError:
        raise ValueError(
            f"--init torchvision:{name}: sela builds torchvision's ResNets (resnet18, resnet50); for other "
            "networks use timm weights (--init timm:NAME)"
        ) from None


def _locate(source: str) -> Path:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"--init {source} does not exist; pass a sela run directory, a weights file, "
            f"{TORCHVISION_PREFIX}<Weights>.<NAME> or {TIMM_PREFIX}<name>"
        )
    if path.is_dir():
        if not (path / rundir.CHECKPOINT).is_file():
            raise ValueError(f"--init {source}: the directory holds no {rundir.CHECKPOINT} of `sela train`")
        return path / rundir.CHECKPOINT
    return path


def _read_file(source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(the state dict, the spec of the network it fits or {}) of a run, an export or a state dict file."""
    path = _locate(source)
    data = rundir.load_file(path, what="weights file")
    if not isinstance(data, dict):
        raise ValueError(f"--init {source} holds a {type(data).__name__}, not a state dict")
    if rundir.checkpoint_format(data) is not None:  # a sela training checkpoint
        spec = data.get("model_spec") or {"arch": (data.get("config") or {}).get("model", {}).get("arch")}
        return data["model"], spec
    if isinstance(data.get("state_dict"), dict) and isinstance(data.get("spec"), dict):  # sela export
        return data["state_dict"], data["spec"]
    info = info_path(path)  # a plain export (ResNet, timm) has its spec in the JSON next to it
    spec = json.loads(info.read_text()).get("spec", {}) if info.is_file() else {}
    return data, spec if isinstance(spec, dict) else {}


def start_network(source: str) -> dict[str, Any]:
    """The model settings (dotted keys) of the network ``source``'s weights fit: ``model.arch`` and, for a
    sela convnet, ``model.widths`` and ``model.pools``; {} for a plain state dict that does not say."""
    if source.startswith(TORCHVISION_PREFIX):
        return {"model.arch": _torchvision_arch(source.removeprefix(TORCHVISION_PREFIX))}
    if source.startswith(TIMM_PREFIX):
        name = check_timm_name(source.removeprefix(TIMM_PREFIX))
        return {"model.arch": TIMM_PREFIX + name.split(".")[0]}
    spec = _read_file(source)[1]
    out = {f"model.{key}": spec[key] for key in ("widths", "pools") if spec.get(key)}
    return {"model.arch": spec["arch"], **out} if spec.get("arch") else {}


def _download(source: str, model: SelaModel) -> dict[str, Tensor]:
    """The state dict of a library weights name, through the library's download and cache."""
    try:
        if source.startswith(TORCHVISION_PREFIX):
            weights = _torchvision_weights(source.removeprefix(TORCHVISION_PREFIX))
            return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
        spec = {**model.spec, "arch": source, "timm_kwargs": getattr(model, "timm_kwargs", None)}
        return timm_network(spec, pretrained=True).state_dict()
    except (OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--init {source}: could not download the weights ({first}); {_OFFLINE}") from None


def init_backbone(model: SelaModel, source: str) -> None:
    """Start ``model``'s backbone from ``source``'s weights (see the module docstring); heads stay fresh."""
    if source.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        state = _download(source, model)
    else:
        state = _read_file(source)[0]
    load_backbone(model, state, what=f"--init {source}")
