"""ResNet backbones from torchvision, with torchvision's parameter names.

The backbone's modules sit at the top level of the model (``conv1, bn1, layer1 .. layer4``) so
the backbone keys of a torchvision ResNet state dict load as they are; torchvision's ``fc`` is
dropped in favour of the linear cluster heads. The ``_cifar`` variants use a 3x3 stride-1 ``conv1``
and no max-pool, the usual stem for 32 px images. :func:`stem_conv` alone decides the stem's conv.
"""

from typing import NamedTuple

import torchvision
from torch import Tensor, nn

from sela.models.base import SelaModel, Stage
from sela.models.registry import register_model


class StemConv(NamedTuple):
    """The settings of a ResNet's ``conv1``: ``nn.Conv2d(in_channels, 64, kernel_size, stride, padding)``."""

    in_channels: int
    kernel_size: int
    stride: int
    padding: int


STEM_WIDTH = 64  # conv1's output channels in every torchvision ResNet


def stem_conv(in_channels: int, cifar_stem: bool) -> StemConv | None:
    """The ``conv1`` of a sela ResNet where it differs from torchvision's (7x7, stride 2, 3 channels).

    The one place that decides a sela ResNet's stem: :class:`ResNet` builds it, and
    ``sela.models.export`` rebuilds it in torchvision (``torchvision_resnet``) and writes it out as text
    (``torchvision_recipe``). The CIFAR stem is a 3x3 stride-1 conv (and no max-pool, see
    :func:`set_stem`); C != 3 image channels keep the 7x7 stride-2 conv on C channels. None: torchvision's
    own conv1 fits.
    """
    if cifar_stem:
        return StemConv(in_channels, kernel_size=3, stride=1, padding=1)
    if in_channels != 3:
        return StemConv(in_channels, kernel_size=7, stride=2, padding=3)
    return None


def set_stem(net: nn.Module, *, in_channels: int, cifar_stem: bool) -> bool:
    """Give the torchvision ResNet ``net`` a sela ResNet's stem, in place: the ``conv1`` of
    :func:`stem_conv` (PyTorch's default init) and, for the CIFAR stem, ``maxpool = nn.Identity()``.

    Returns:
        Whether ``conv1`` was replaced.
    """
    conv = stem_conv(in_channels, cifar_stem)
    if conv is not None:
        net.conv1 = nn.Conv2d(
            conv.in_channels,
            STEM_WIDTH,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=False,
        )
    if cifar_stem:
        net.maxpool = nn.Identity()
    return conv is not None


class ResNet(SelaModel):
    """A torchvision ResNet (without ``fc``) followed by linear heads; D = 512 (resnet18) or 2048 (resnet50).

    Args:
        arch: ``"resnet18"`` or ``"resnet50"`` (any ``torchvision.models`` ResNet builder name works).
        n_clusters: K per head.
        cifar_stem: 3x3 stride-1 ``conv1`` and no max-pool (for 32 px inputs).
        in_channels: image channels C.
        zero_init_residual: passed to torchvision (zero-init the last BN of each residual block).
        projector: widths of an MLP between the pooled features and the heads (none by default).
        input_size: the image side the model is meant for (``default_input_size`` only; default 32 with
            the CIFAR stem, else 224).
    """

    def __init__(
        self,
        arch: str,
        n_clusters: list[int],
        *,
        cifar_stem: bool = False,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        projector: tuple[int, ...] = (),
        input_size: int | None = None,
    ):
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        if set_stem(net, in_channels=in_channels, cifar_stem=cifar_stem):
            # the init torchvision's builder gave the conv1 it replaced
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.default_input_size = input_size or (32 if cifar_stem else 224)
        self._build_heads(net.fc.in_features, n_clusters, projector)

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _stages(self) -> list[Stage]:
        return [
            ("stem", self._stem),
            ("layer1", self.layer1),
            ("layer2", self.layer2),
            ("layer3", self.layer3),
            ("layer4", self.layer4),
        ]


@register_model("resnet18")
def resnet18(n_clusters: list[int], **kwargs) -> ResNet:
    """ResNet-18 for 224 px images, D = 512."""
    return ResNet("resnet18", n_clusters, **kwargs)


@register_model("resnet50")
def resnet50(n_clusters: list[int], **kwargs) -> ResNet:
    """ResNet-50 for 224 px images, D = 2048."""
    return ResNet("resnet50", n_clusters, **kwargs)


@register_model("resnet18_cifar")
def resnet18_cifar(n_clusters: list[int], **kwargs) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32 px images, D = 512."""
    return ResNet("resnet18", n_clusters, cifar_stem=True, **kwargs)


@register_model("resnet50_cifar")
def resnet50_cifar(n_clusters: list[int], **kwargs) -> ResNet:
    """ResNet-50 with a 3x3 stride-1 stem and no max-pool, for 32 px images, D = 2048."""
    return ResNet("resnet50", n_clusters, cifar_stem=True, **kwargs)
