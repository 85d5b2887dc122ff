"""A small, fast conv net for CPU-sized experiments (airbench-style).

A 3x3 conv stem at full resolution, then one block per width: conv -> 2x2 max-pool -> BN -> ReLU
-> conv -> BN -> ReLU, then a global average pool (D = last width). ``pools`` can leave a block's pool
out (its second conv then runs at 4x the pixels): for 16 px views, an un-pooled last block keeps a 4x4
map instead of 2x2. With the default widths
64-128-256 a 32 px image costs about 86 M multiply-adds (~170 MFLOPs); 16 px a quarter of that.
Pools use ``ceil_mode`` so any input of at least 1 px works; 8 px (sklearn digits) and up are sensible.
"""

import torch
from torch import Tensor, nn

from sela.models.base import SelaModel, Stage, check_positive_ints
from sela.models.registry import register_model


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ConvBlock(nn.Sequential):
    """conv(c_in -> c_out) -> 2x2 max-pool -> BN -> ReLU -> conv(c_out -> c_out) -> BN -> ReLU.

    With ``pool=False`` the max-pool is an identity (same parameter names, same resolution out as in).
    """

    def __init__(self, c_in: int, c_out: int, pool: bool = True):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            # pooling before BN: normalising a quarter of the values
            nn.MaxPool2d(2, ceil_mode=True) if pool else nn.Identity(),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            *_conv_bn(c_out, c_out),
        )


class ConvNet(SelaModel):
    """Stem + one ``ConvBlock`` per width + global average pool; D = ``widths[-1]``.

    Args:
        n_clusters: K per head.
        widths: output channels of each block; the stem has ``widths[0] // 2`` channels.
        in_channels: image channels C.
        input_size: the image side the model is meant for (sets ``default_input_size`` only).
        channels_last: keep weights and activations in ``torch.channels_last`` memory format
            (about 25 % faster training on CPU; outputs are the same).
        projector: widths of an MLP between the pooled features and the heads (none by default).
        pools: whether each block halves the resolution with its 2x2 max-pool, one per width
            (default: every block).
    """

    def __init__(
        self,
        n_clusters: list[int],
        *,
        widths: tuple[int, ...] = (64, 128, 256),
        in_channels: int = 3,
        input_size: int = 32,
        channels_last: bool = True,
        projector: tuple[int, ...] = (),
        pools: tuple[bool, ...] | None = None,
    ):
        super().__init__()
        widths = tuple(widths)
        check_positive_ints("widths", widths)
        if not widths:
            raise ValueError("widths is empty; give at least one block width, e.g. widths=(64, 128, 256)")
        check_positive_ints("in_channels and input_size", (in_channels, input_size))
        pools = (True,) * len(widths) if pools is None else tuple(pools)
        if len(pools) != len(widths) or not all(isinstance(p, bool) for p in pools):
            raise ValueError(
                f"pools needs one true/false per block ({len(widths)} widths), got {pools!r}; "
                "e.g. pools=(True, True, False) leaves the last of three blocks un-pooled"
            )
        self.pools = pools
        stem_width = max(widths[0] // 2, 1)
        self.stem = nn.Sequential(*_conv_bn(in_channels, stem_width))
        c_in = stem_width
        blocks = []
        for width, pool in zip(widths, pools, strict=True):
            blocks.append(ConvBlock(c_in, width, pool))
            c_in = width
        self.blocks = nn.ModuleList(blocks)
        self.default_input_size = input_size
        self._build_heads(widths[-1], n_clusters, projector)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _stem(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x)

    def _stages(self) -> list[Stage]:
        return [("stem", self._stem)] + [(f"block{i + 1}", block) for i, block in enumerate(self.blocks)]


@register_model("convnet")
def convnet(n_clusters: list[int], **kwargs) -> ConvNet:
    """Small fast conv net, widths 64-128-256 by default, for 8-32 px images on a CPU."""
    return ConvNet(n_clusters, **kwargs)
