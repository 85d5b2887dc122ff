"""Any timm model as a sela backbone: ``create_model("timm:<name>", n_clusters)`` (the optional extra
``pip install 'sela[timm]'``).

The timm network is built with ``num_classes=0`` (its classifier reset to an identity, so it outputs the
pooled (B, D) pre-logits features; heads such as MobileNetV3's ``conv_head`` stay, they are part of D) and
sits under ``body``: the backbone's state dict is timm's own with ``body.`` in front, so ``sela export``
writes a file that ``timm.create_model(name, num_classes=0, ...)`` loads with ``strict=True``
(:func:`timm_network` builds that network). timm is imported only when such a model is built.

Letters: B batch, C image channels, D features.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from sela.models.base import SelaModel, Stage

PREFIX = "timm:"
BODY = "body."  # where the timm network's keys sit in a TimmBackbone's state dict


def import_timm(arch: str = "timm:NAME"):
    """The ``timm`` package, or a ValueError that says how to install it."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"--arch {arch} needs timm: pip install 'sela[timm]'") from None
    return timm


def check_timm_name(name: str) -> str:
    """``name`` (``resnet18`` or ``resnet18.a1_in1k``) if timm knows it, else a ValueError naming how to list
    the names."""
    timm = import_timm(PREFIX + name)
    if not name or not timm.is_model(name):
        raise ValueError(
            f"timm has no model {name!r}; list them with "
            f"python -c \"import timm; print(timm.list_models('*{name.split('.')[0][:8]}*'))\""
        )
    return name


def timm_network(spec: dict[str, Any], *, pretrained: bool = False) -> nn.Module:
    """The timm network of a TimmBackbone spec (``{"arch": "timm:<name>", "in_channels": C,
    "timm_kwargs": {...}}``) with ``num_classes=0``: what ``sela export`` writes loads into it with
    ``strict=True``. ``pretrained``: timm downloads (and caches) the name's weights."""
    name = str(spec["arch"]).removeprefix(PREFIX)
    timm = import_timm(spec["arch"])
    kwargs = dict(spec.get("timm_kwargs") or {})
    return timm.create_model(
        check_timm_name(name),
        pretrained=pretrained,
        num_classes=0,
        in_chans=spec.get("in_channels", 3),
        **kwargs,
    )


def _build(timm, name: str, in_channels: int, input_size: int | None, kwargs: dict[str, Any]):
    """(the timm network, the keyword arguments it was built with): models that fix their input size
    (ViTs) are built for ``input_size`` with dynamic sizes where timm offers them; others as they come."""
    tries = [{}]
    if input_size is not None and "img_size" not in kwargs:
        tries = [{"img_size": input_size, "dynamic_img_size": True}, {"img_size": input_size}, {}]
    for extra in tries:
        try:
            used = {**kwargs, **extra}
            return timm.create_model(
                name, pretrained=False, num_classes=0, in_chans=in_channels, **used
            ), used
        except TypeError as e:
            if "unexpected keyword argument" not in str(e) or not extra:
                raise
    raise AssertionError("unreachable: the last try has no extra arguments")


class TimmBackbone(SelaModel):
    """A timm model (``num_classes=0``) under ``body``, then linear heads; D = its pre-logits width.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``resnet10t``.
        n_clusters: K per head.
        in_channels: image channels C (timm's ``in_chans``).
        input_size: the image side (px); models that fix their input size (ViTs) are built for it, with
            dynamic sizes where timm offers them (training views may be smaller).
        projector: widths of an MLP between the pooled features and the heads (none by default).
        timm_kwargs: more keyword arguments for ``timm.create_model`` (e.g. ``{"patch_size": 8}``).
    """

    def __init__(
        self,
        name: str,
        n_clusters: list[int],
        *,
        in_channels: int = 3,
        input_size: int | None = None,
        projector: tuple[int, ...] = (),
        timm_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        timm = import_timm(PREFIX + name)
        check_timm_name(name)
        self.body, self.timm_kwargs = _build(timm, name, in_channels, input_size, dict(timm_kwargs or {}))
        self.timm_name = name
        width = getattr(self.body, "head_hidden_size", None) or self.body.num_features
        self.default_input_size = input_size or int(self.body.pretrained_cfg.get("input_size", (3, 224))[-1])
        self._build_heads(int(width), n_clusters, projector)

    def _features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, D): num_classes=0 makes the classifier an identity

    def _stages(self) -> list[Stage]:
        return [("features", self._features)]


def timm_factory(name: str):
    """The registry's factory for ``timm:<name>``: ``factory(n_clusters, **kwargs) -> TimmBackbone``."""

    def factory(n_clusters: list[int], **kwargs) -> TimmBackbone:
        return TimmBackbone(name, n_clusters, **kwargs)

    return factory
