"""A trained backbone as plain weights, usable without sela; and the loader for what it writes.

Two shapes (:func:`backbone_payload`):
  * ResNets: a plain state dict with torchvision's keys (``conv1``, ``bn1``, ``layer1`` .. ``layer4``;
    no ``fc``). It loads with ``strict=True`` into the torchvision model built by
    :func:`torchvision_resnet`: ``torchvision.models.resnet18()`` with ``fc = nn.Identity()`` (the model then
    outputs the pooled (B, D) features), plus, for the ``_cifar`` variants, a 3x3 stride-1 ``conv1`` and
    ``maxpool = nn.Identity()`` (and for C != 3 image channels, a ``conv1`` taking C channels).
  * timm backbones (``timm:<name>``): timm's own state dict of the ``num_classes=0`` network, loadable
    with ``strict=True`` into ``timm.create_model(name, num_classes=0, in_chans=C, **timm_kwargs)``
    (:func:`sela.models.timm_backbone.timm_network`), or through timm's pretrained machinery with
    ``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`` and the same arguments.
  * every other architecture (no torchvision equivalent): ``{"spec": ..., "state_dict": ...}``, the
    backbone's state dict and the ``create_model`` spec that builds it (heads and projector left out).
:func:`load_exported` reads either back as a module mapping normalised images (B, C, S, S) to (B, D).

Letters: B batch, C image channels, S image side, D features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from sela.models.base import SelaModel
from sela.models.registry import create_model
from sela.models.resnet import STEM_WIDTH, ResNet, set_stem, stem_conv
from sela.models.timm_backbone import BODY, PREFIX, TimmBackbone, timm_network

# the parts of a SelaModel above the backbone: they fit the self-labels, not the images
_NOT_BACKBONE = ("heads.", "projector.")
# spec keys that build the heads and projector, not the backbone
_HEAD_SPEC = ("n_clusters", "normalize_heads", "projector")


def backbone_state_dict(model: SelaModel) -> dict[str, Tensor]:
    """The backbone's tensors (``heads.*`` and ``projector.*`` dropped), contiguous copies on the CPU."""
    return {
        k: v.detach().cpu().contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(_NOT_BACKBONE)
    }


def backbone_spec(model: SelaModel) -> dict[str, Any]:
    """The model's ``create_model`` spec without the heads and projector (``arch`` and backbone settings;
    for a timm backbone, the ``timm_kwargs`` it was built with)."""
    spec = {k: v for k, v in model.spec.items() if k not in _HEAD_SPEC}
    if isinstance(model, TimmBackbone):
        spec["timm_kwargs"] = dict(model.timm_kwargs)
    return spec


def timm_recipe(spec: Mapping[str, Any], path: str = "PATH") -> list[str] | None:
    """Python lines that build a timm backbone's network and load its export at ``path`` with
    ``strict=True`` (the second way: timm's own loader); None for an architecture that is not timm's."""
    arch = str(spec.get("arch", ""))
    if not arch.startswith(PREFIX):
        return None
    args = f"{arch.removeprefix(PREFIX)!r}, num_classes=0, in_chans={int(spec.get('in_channels', 3))}"
    args += "".join(f", {k}={v!r}" for k, v in (spec.get("timm_kwargs") or {}).items())
    return [
        "import timm, torch",
        f"m = timm.create_model({args})",
        f"m.load_state_dict(torch.load({path!r}, weights_only=True), strict=True)",
        f"# or: timm.create_model({args}, pretrained=True, pretrained_cfg_overlay=dict(file={path!r}))",
    ]


def torchvision_resnet(spec: Mapping[str, Any]) -> nn.Module:
    """The torchvision ResNet that a ResNet export loads into with ``strict=True``; outputs (B, D).

    ``spec`` is a backbone spec of a sela ResNet (``{"arch": "resnet18_cifar", "in_channels": 3, ...}``).
    The network is ``torchvision.models.<resnet>()`` with ``fc = nn.Identity()`` and the stem of
    :func:`sela.models.resnet.set_stem`: a ``_cifar`` arch gets a 3x3 stride-1 ``conv1`` and
    ``maxpool = nn.Identity()``, C != 3 channels a ``conv1`` taking C.
    """
    arch = str(spec.get("arch", ""))
    name, cifar = arch.removesuffix("_cifar"), arch.endswith("_cifar")
    if not name.startswith("resnet") or not hasattr(torchvision.models, name):
        raise ValueError(f"{arch!r} is not a sela ResNet; build it with sela.models.create_model(**spec)")
    net = getattr(torchvision.models, name)(weights=None)
    set_stem(net, in_channels=int(spec.get("in_channels", 3)), cifar_stem=cifar)
    net.fc = nn.Identity()
    return net


def torchvision_recipe(spec: Mapping[str, Any], path: str = "PATH") -> list[str] | None:
    """Python lines that build the model of :func:`torchvision_resnet` and load the export at ``path``
    into it with ``strict=True``; None for an architecture that is not a ResNet. The stem's line is written
    from :func:`sela.models.resnet.stem_conv`, the settings the model itself was built with."""
    arch = str(spec.get("arch", ""))
    name = arch.removesuffix("_cifar")
    if not name.startswith("resnet"):
        return None
    cifar = arch.endswith("_cifar")
    conv = stem_conv(int(spec.get("in_channels", 3)), cifar)
    lines = ["import torch, torchvision", "from torch import nn", f"m = torchvision.models.{name}()"]
    if conv is not None:
        c, k, s, p = conv
        lines.append(f"m.conv1 = nn.Conv2d({c}, {STEM_WIDTH}, {k}, stride={s}, padding={p}, bias=False)")
    if cifar:
        lines.append("m.maxpool = nn.Identity()")
    lines += [
        "m.fc = nn.Identity()",
        f"m.load_state_dict(torch.load({path!r}, weights_only=True), strict=True)",
    ]
    return lines


def backbone_payload(model: SelaModel) -> dict[str, Any]:
    """What :func:`sela.export.export_backbone` saves: a ResNet's plain state dict with torchvision's keys,
    else ``{"spec": backbone spec, "state_dict": backbone state dict}`` (see the module docstring)."""
    state = backbone_state_dict(model)
    if isinstance(model, ResNet):
        return state
    if isinstance(model, TimmBackbone):
        return {k.removeprefix(BODY): v for k, v in state.items()}
    return {"spec": backbone_spec(model), "state_dict": state}


def info_path(path: str | os.PathLike) -> Path:
    """The JSON file that ``sela export`` writes next to ``path``: spec, preprocessing, how to load."""
    return Path(path).with_suffix(".json")


class _Features(nn.Module):
    """A SelaModel's backbone as a module whose forward gives the pooled (B, D) features."""

    def __init__(self, model: SelaModel):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)  # (B, D)


def load_exported(path: str | os.PathLike, *, spec: Mapping[str, Any] | None = None) -> nn.Module:
    """Read a file of ``sela export`` back as an eval-mode module: normalised (B, C, S, S) -> (B, D).

    Args:
        path: the exported ``.pt`` file (loaded with ``weights_only=True``).
        spec: for a ResNet export (a plain state dict), its backbone spec, e.g. ``{"arch": "resnet18"}``;
            default: the ``spec`` of the JSON file that ``sela export`` writes next to it.

    Returns:
        For a ResNet, the torchvision model of :func:`torchvision_resnet`; for a timm backbone, the timm
        network (``num_classes=0``); otherwise the sela model
        (its heads are untrained placeholders; the module's forward never reaches them).
    """
    path = Path(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, not the state dict of `sela export`")
    if "state_dict" in data and "spec" in data:
        model = create_model(**data["spec"])
        missing, unexpected = model.load_state_dict(data["state_dict"], strict=False)
        missing = [k for k in missing if not k.startswith(_NOT_BACKBONE)]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit its spec: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        return _Features(model).eval()
    if spec is None:
        info = info_path(path)
        if not info.is_file():
            raise ValueError(f"{path} is a plain state dict and {info} is absent; pass spec={{'arch': ...}}")
        spec = json.loads(info.read_text())["spec"]
    net = timm_network(spec) if str(spec.get("arch", "")).startswith(PREFIX) else torchvision_resnet(spec)
    net.load_state_dict(data, strict=True)
    return net.eval()


# ------------------------------------------------------------------------------------------------- ONNX

ONNX_INPUT, ONNX_OUTPUT = "images", "features"
ONNX_OPSET = 17
_ONNX_PACKAGES = ("onnx", "onnxruntime")


def check_onnx_packages() -> None:
    """A ValueError naming the pip command when onnx or onnxruntime (an ONNX export's check) is missing."""
    import importlib.util

    missing = [name for name in _ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"an ONNX export needs {' and '.join(missing)}: pip install 'sela[onnx]' "
            "(or: pip install onnx onnxruntime)"
        )


def export_onnx(model: SelaModel, path: str | os.PathLike, *, channels: int, side: int) -> Path:
    """Write the backbone of ``model`` as an ONNX graph: ``images`` (B, C, S, S) float32, normalised ->
    ``features`` (B, D) float32, with a dynamic batch axis B (opset 17).

    The model is copied to the CPU in float32 and eval mode (BatchNorm uses its running statistics) and
    traced with torch's TorchScript-based exporter (``dynamo=False``: offline, needs no onnxscript, and
    the same weights give the same bytes); the graph is then checked with ``onnx.checker``.
    """
    import copy
    import inspect
    import warnings

    import onnx

    net = _Features(copy.deepcopy(model).cpu().float().eval()).eval()
    example = torch.zeros(2, channels, side, side)  # (B, C, S, S)
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    path = Path(path)
    with warnings.catch_warnings():  # torch's notice that this exporter is the older one
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}}, opset_version=ONNX_OPSET,
            do_constant_folding=True, **legacy,
        )  # fmt: skip
    onnx.checker.check_model(str(path))
    return path


def onnx_difference(path: str | os.PathLike, model: SelaModel, images: Tensor) -> float:
    """The largest absolute difference between onnxruntime's features of normalised ``images``
    (B, C, S, S) from the ONNX file at ``path`` and the model's own (float32, CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images.detach().float().cpu().contiguous()
    (got,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})  # (B, D)
    device = next(model.parameters()).device
    with torch.no_grad():
        expected = model.eval().forward_features(x.to(device)).float().cpu()  # (B, D)
    return float((torch.from_numpy(got) - expected).abs().max())
