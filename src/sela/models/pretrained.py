"""Load torchvision ResNet weights or released SeLa checkpoints into a ``SelaModel``.

Accepted inputs: a plain state dict, or a checkpoint dict holding one under ``"state_dict"``
(the SeLa release: ``{"state_dict": ..., "labels": ...}``). ``module.`` segments left by
``DataParallel`` are dropped; SeLa's old ResNet layout (``features.0`` .. ``features.7``) is renamed
to torchvision's. Head weights named ``top_layer``, ``top_layer<i>``, ``top_layer.0``, ``fc``,
``fc<i>`` or ``heads.<i>`` go to ``heads.<i>`` when their shapes fit.
"""

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from sela.models.base import SelaModel
from sela.models.resnet import ResNet
from sela.models.timm_backbone import BODY, TimmBackbone

_HEAD_KEY = re.compile(r"^(?:top_layer|fc|heads\.)(\d*)(?:\.0)?\.(weight|bias)$")
# SeLa's resnetv1 kept the backbone in one nn.Sequential called ``features``
_SELA_RESNET_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a state dict or a checkpoint dict, got {type(checkpoint).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(value, Tensor):
            kind = type(value).__name__
            raise ValueError(f"checkpoint entry {key!r} is a {kind}, not a tensor; pass a state dict")
        state[".".join(part for part in key.split(".") if part != "module")] = value
    return state


def _rename_sela_resnet(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "features" and len(parts) > 2 and parts[1] in _SELA_RESNET_NAMES:
        return ".".join([_SELA_RESNET_NAMES[parts[1]], *parts[2:]])
    return key


def _short(items: list[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_pretrained(
    model: SelaModel, state_dict: Mapping[str, Any], *, strict_heads: bool = False
) -> list[str]:
    """Copy pretrained weights into ``model`` in place.

    Every backbone tensor of the model must be present with the right shape (BatchNorm's
    ``num_batches_tracked`` may be absent) and the checkpoint may hold no other backbone keys;
    otherwise a ValueError names the offending keys and shapes. Head weights are copied where
    their shapes fit (e.g. not torchvision's 1000-class ``fc`` into a 128-cluster head).

    Args:
        model: the model to fill.
        state_dict: a state dict, or a checkpoint with one under ``"state_dict"``.
        strict_heads: raise instead of skipping checkpoint head weights that do not fit.

    Returns:
        Names of the model's parameters left at their initial values (skipped or absent head weights).
    """
    state = _unwrap(state_dict)
    if isinstance(model, ResNet):
        state = {_rename_sela_resnet(k): v for k, v in state.items()}
    own = model.state_dict()
    own_heads = {k for k in own if k.startswith("heads.")}
    loaded: dict[str, Tensor] = {}
    unfit_heads, unexpected, bad_shapes = [], [], []
    for key, value in state.items():
        head = _HEAD_KEY.match(key)
        if head:
            target = f"heads.{int(head.group(1) or 0)}.{head.group(2)}"
            if target in own and own[target].shape == value.shape:
                loaded[target] = value
            else:
                shape = tuple(own[target].shape) if target in own else "absent"
                unfit_heads.append(f"{key} {tuple(value.shape)} -> {target} {shape}")
        elif key not in own:
            unexpected.append(key)
        elif own[key].shape != value.shape:
            bad_shapes.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            loaded[key] = value
    missing = [
        k for k in own if k not in own_heads and k not in state and not k.endswith("num_batches_tracked")
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_short(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_short(unexpected)}")
    if bad_shapes:
        problems.append(f"shape mismatch: {_short(bad_shapes)}")
    if strict_heads and unfit_heads:
        problems.append(f"heads that do not fit: {_short(unfit_heads)}")
    if problems:
        raise ValueError(
            f"checkpoint does not fit {type(model).__name__}; "
            + "; ".join(problems)
            + ". Build the model that matches the checkpoint (architecture, in_channels, n_clusters)."
        )
    model.load_state_dict(loaded, strict=False)
    return sorted(k for k in own_heads if k not in loaded)


_ABOVE_BACKBONE = ("heads.", "projector.")


def _backbone_keys(model: SelaModel, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The checkpoint's backbone tensors under the model's names: heads, projector and classifiers
    dropped (torchvision's ``fc``, a timm model's own classifier), a plain timm state dict put under ``body.``."""
    if isinstance(model, ResNet):
        state = {_rename_sela_resnet(k): v for k, v in state.items()}
    if isinstance(model, TimmBackbone):
        classifiers = model.body.pretrained_cfg.get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        plain = not any(k.startswith(BODY) for k in state)
        state = {
            (BODY + k if plain else k): v
            for k, v in state.items()
            if not (plain and any(k.startswith(c + ".") for c in classifiers))
        }
    return {k: v for k, v in state.items() if not k.startswith(_ABOVE_BACKBONE) and not _HEAD_KEY.match(k)}


def load_backbone(model: SelaModel, state_dict: Mapping[str, Any], *, what: str = "the checkpoint") -> None:
    """Copy a checkpoint's backbone into ``model`` in place; its heads and projector stay as they are
    (fresh): ``sela train --init``. The checkpoint may be a sela one (run, export), a torchvision or a
    timm state dict; its heads and classifier are ignored.

    Raises:
        ValueError: one line naming the missing, unexpected and mis-shaped keys (a few, then counts) and
            what to do (``what`` names the checkpoint in it).
    """
    state = _backbone_keys(model, _unwrap(state_dict))
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(_ABOVE_BACKBONE)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    problems = [
        f"{name} {len(keys)} key(s): {_short(keys, 3)}"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch in", shapes))
        if keys
    ]
    if problems:
        arch = (
            model.spec.get("arch", type(model).__name__) if hasattr(model, "spec") else type(model).__name__
        )
        raise ValueError(
            f"{what} does not fit a {arch} backbone: {'; '.join(problems)}; pass the --arch (and model "
            "settings) it was trained as"
        )
    model.load_state_dict(state, strict=False)


def spec_from_state_dict(
    arch: str, checkpoint: Mapping[str, Any], *, n_clusters: list[int] | None = None, input_size: int
) -> dict[str, Any]:
    """A ``create_model`` spec for a foreign checkpoint (torchvision weights, a released SeLa model):
    the heads found in it (or ``n_clusters``, or one placeholder head), its input channels and the
    widths that the architecture's tensors show (a checkpoint that is not sela's records no spec)."""
    state = _unwrap(checkpoint)
    found = {}
    for key, value in state.items():
        m = _HEAD_KEY.match(key)
        if m and m.group(2) == "weight" and value.ndim == 2:
            found[int(m.group(1) or 0)] = int(value.shape[0])
    heads = [found[i] for i in sorted(found)]
    if n_clusters and heads and list(n_clusters) != heads:
        raise ValueError(
            f"the checkpoint has heads with K = {heads}; drop --clusters or pass --clusters {heads}"
        )
    channels = next((int(v.shape[1]) for v in state.values() if v.ndim == 4 and v.is_floating_point()), 3)
    spec: dict[str, Any] = {"arch": arch, "n_clusters": heads or list(n_clusters or [2])}
    spec.update(in_channels=channels, input_size=input_size)
    projector = []
    while f"projector.{3 * len(projector)}.weight" in state:
        projector.append(int(state[f"projector.{3 * len(projector)}.weight"].shape[0]))
    if projector:
        spec["projector"] = projector
    if arch == "convnet":
        widths = []
        while f"blocks.{len(widths)}.0.weight" in state:
            widths.append(int(state[f"blocks.{len(widths)}.0.weight"].shape[0]))
        spec.update({"widths": widths} if widths else {})
    elif arch == "alexnet":
        convs = [int(v.shape[0]) for k, v in state.items() if k.startswith("features.") and v.ndim == 4]
        spec.update({"size": convs} if len(convs) == 5 else {})
        if "classifier.4.weight" in state:
            spec["hidden_dim"] = int(state["classifier.4.weight"].shape[0])
    return spec
