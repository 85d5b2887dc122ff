"""The SeLa AlexNet: five conv-BN-ReLU layers with max-pools, two 4096-d fully connected layers, heads.

Module names follow the SeLa release (``features.N``, ``classifier.N``; ``top_layer*`` becomes
``heads.*`` in ``load_pretrained``), so released AlexNet checkpoints load directly. Conv widths
(SeLa's ``CFG``): ``"big"`` 96-256-384-384-256 (the release) or ``"small"`` 64-192-384-256-256.

Two stems, picked by ``input_size``: above 64 px the ImageNet stem (11x11 stride-4 conv1,
3x3 stride-2 max-pools; 224 px -> 6x6 maps); at 64 px and below a CIFAR stem (3x3 stride-1 convs,
2x2 max-pools; 32 px -> 4x4 maps). Either way the last maps are adaptively average-pooled to that
grid, so other input sizes work too (ImageNet stem: >= 63 px).
"""

import math

from torch import Tensor, nn

from sela.models.base import SelaModel, Stage, check_positive_ints
from sela.models.registry import register_model

WIDTHS = {"big": (96, 256, 384, 384, 256), "small": (64, 192, 384, 256, 256)}


class AlexNet(SelaModel):
    """SeLa's AlexNet with BatchNorm; D = ``hidden_dim`` (4096).

    Args:
        n_clusters: K per head.
        input_size: image side in px; <= 64 selects the CIFAR stem.
        size: ``"big"`` or ``"small"`` conv widths, or an explicit 5-tuple of widths.
        hidden_dim: width of fc6 and fc7.
        dropout: dropout before fc6 and fc7.
        in_channels: image channels C.
    """

    def __init__(
        self,
        n_clusters: list[int],
        *,
        input_size: int = 224,
        size: str | tuple[int, ...] = "big",
        hidden_dim: int = 4096,
        dropout: float = 0.5,
        in_channels: int = 3,
    ):
        super().__init__()
        widths = WIDTHS.get(size) if isinstance(size, str) else tuple(size)
        if widths is None:
            raise ValueError(f"unknown AlexNet size {size!r}; use 'big', 'small' or five conv widths")
        check_positive_ints("AlexNet widths", widths, 5)
        check_positive_ints("input_size, hidden_dim and in_channels", (input_size, hidden_dim, in_channels))
        small = input_size <= 64
        if small:  # (kernel, stride, padding) of conv1 and conv2; 2x2 pools halve the maps
            conv12, grid = ((3, 1, 1), (3, 1, 1)), 4
        else:
            conv12, grid = ((11, 4, 2), (5, 1, 2)), 6

        def pool() -> nn.MaxPool2d:
            return nn.MaxPool2d(2, 2) if small else nn.MaxPool2d(3, 2)

        layers: list[nn.Module] = []
        c_in = in_channels
        for i, width in enumerate(widths):
            kernel, stride, padding = conv12[i] if i < 2 else (3, 1, 1)
            conv = nn.Conv2d(c_in, width, kernel, stride, padding)
            layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i in (0, 1, 4):
                layers.append(pool())
            c_in = width
        self.features = nn.Sequential(*layers)
        self.grid_pool = nn.AdaptiveAvgPool2d(grid)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(widths[-1] * grid * grid, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.default_input_size = input_size
        self._init_weights()
        self._build_heads(hidden_dim, n_clusters)

    def _init_weights(self) -> None:
        # SeLa / DeepCluster initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def _fc6(self, x: Tensor) -> Tensor:
        x = self.features[17](x)  # the last max-pool
        x = self.grid_pool(x).flatten(1)  # (B, widths[4] * grid * grid)
        return self.classifier[:3](x)

    def _stages(self) -> list[Stage]:
        f = self.features
        return [
            ("conv1", f[0:3]),
            ("conv2", f[3:7]),
            ("conv3", f[7:11]),
            ("conv4", f[11:14]),
            ("conv5", f[14:17]),
            ("fc6", self._fc6),
            ("fc7", self.classifier[3:]),
        ]


@register_model("alexnet")
def alexnet(n_clusters: list[int], **kwargs) -> AlexNet:
    """SeLa's AlexNet with BatchNorm; ``input_size=32`` for CIFAR, 224 (default) for ImageNet."""
    return AlexNet(n_clusters, **kwargs)
