"""``SelaModel``: a backbone that maps images to D features, plus H linear heads (one per clustering).

Letters: B batch, C image channels, H heads (``len(n_clusters)``), K_h clusters of head h, D features,
P the width of the heads' input (D, or the last projector width).
Evaluation uses ``forward_features``; the labeller and the loss use ``forward_head``.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Stage = tuple[str, Callable[[Tensor], Tensor]]


class SelaModel(nn.Module):
    """Base class for sela backbones with linear cluster heads.

    Subclasses build their backbone, then call ``self._build_heads(feature_dim, n_clusters)`` and
    implement ``_stages()``: the named, ordered steps from the input image to the last feature
    map or vector. A 4-D output of the last stage is globally average-pooled into (B, D).

    Attributes:
        feature_dim: D, the width of ``forward_features``.
        n_clusters: K per head.
        projector: ``nn.Sequential`` of (Linear, BatchNorm1d, ReLU) blocks between the features and the
            heads, shared by all heads (empty, an identity, unless built with ``projector`` widths).
        head_dim: P, the heads' input width.
        heads: ``nn.ModuleList`` of ``nn.Linear(P, K_h)``, the paper's linear heads.
        default_input_size: the image side (px) the model is designed for.
        normalize_heads: L2-normalise the heads' input (B, P) rows, so that heads with unit-norm weights
            and no bias output cosine similarities (the ``swapped`` objective's prototypes); off by default.
        spec: how :func:`sela.models.create_model` built it (``create_model(**spec)`` rebuilds it).
    """

    feature_dim: int
    n_clusters: list[int]
    heads: nn.ModuleList
    default_input_size: int
    normalize_heads: bool = False
    spec: dict

    def _build_heads(self, feature_dim: int, n_clusters: list[int], projector: tuple[int, ...] = ()) -> None:
        """Linear heads (P -> K_h) on the features, through an MLP projector of the given widths if any.

        A projector lets the last layers specialise to the self-labels while the features below it,
        which evaluation uses, stay general (as the fc layers of the paper's AlexNet, or SimCLR's head).
        """
        projector = tuple(projector)
        check_positive_ints("projector widths", projector)
        self.feature_dim = feature_dim
        self.n_clusters = list(n_clusters)
        layers: list[nn.Module] = []
        d = feature_dim
        for width in projector:
            layers += [nn.Linear(d, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            d = width
        self.projector = nn.Sequential(*layers)
        self.head_dim = d
        self.heads = nn.ModuleList(nn.Linear(d, k) for k in self.n_clusters)

    def _stages(self) -> list[Stage]:
        raise NotImplementedError

    @property
    def feature_layers(self) -> list[str]:
        """Names accepted by ``features_by_layer``, from the input upwards."""
        return [name for name, _ in self._stages()]

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"expected a float image batch (B, C, H, W), got {x.dtype} of shape {tuple(x.shape)}; "
                "convert uint8 images with sela.data.EvalTransform or BatchAugment"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) float images -> (B, D) pooled features."""
        self._check_input(x)
        for _, stage in self._stages():
            x = stage(x)
        return _pool(x)  # (B, D)

    def features_by_layer(self, x: Tensor, layer: str) -> Tensor:
        """(B, C, H, W) images -> (B, D_layer) output of ``layer``, average-pooled over space if 4-D."""
        self._check_input(x)
        names = self.feature_layers
        if layer not in names:
            raise ValueError(f"unknown layer {layer!r} for {type(self).__name__}; choose one of {names}")
        for name, stage in self._stages():
            x = stage(x)
            if name == layer:
                break
        return _pool(x)  # (B, D_layer)

    def head_inputs(self, features: Tensor) -> Tensor:
        """(B, D) features -> (B, P) inputs of the heads (the projector's output; the features without one)."""
        return self.projector(features)

    def forward_head(self, features: Tensor, *, embeddings: bool = False) -> list[Tensor] | tuple:
        """(B, D) features -> list of H logits tensors, the h-th of shape (B, K_h).

        With ``embeddings=True``: (that list, the (B, P) rows the heads saw, L2-normalised when
        ``normalize_heads``).
        """
        z = self.head_inputs(features)  # (B, P)
        if self.normalize_heads:
            z = F.normalize(z, dim=1)
        logits = [head(z) for head in self.heads]
        return (logits, z) if embeddings else logits

    @torch.no_grad()
    def head_logits(self, z: Tensor, head: int, *, out: Tensor | None = None, chunk: int = 8192) -> Tensor:
        """(n, P) head inputs -> (n, K_h) float32 logits of head ``head``, computed ``chunk`` rows at a time
        into ``out`` (a preallocated (n, K_h) float32 buffer, e.g. a view of one reused for every head).

        ``z`` is what the heads see: for cosine heads (``normalize_heads``), already L2-normalised rows.
        """
        linear = self.heads[head]
        if out is None:
            out = torch.empty(len(z), linear.out_features, device=z.device)
        for s in range(0, len(z), chunk):
            torch.addmm(linear.bias, z[s : s + chunk].float(), linear.weight.t(), out=out[s : s + chunk])
        return out  # (n, K_h)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Scale every head's weight rows (the prototypes) to unit L2 norm, in place."""
        for head in self.heads:
            head.weight.div_(head.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def _make_cosine_heads(self) -> None:
        """The heads become prototypes: cosine similarity of unit-norm rows over normalised inputs, no bias
        (zeroed and frozen). :func:`sela.models.create_model` calls it for ``normalize_heads=True``, after
        the heads are built (so the random initialisation draws the same numbers either way)."""
        self.normalize_heads = True
        for head in self.heads:
            head.bias.data.zero_()
            head.bias.requires_grad_(False)
        self.normalize_prototypes()

    def forward(self, x: Tensor | list[Tensor], *, embeddings: bool = False) -> list[Tensor] | tuple:
        """(B, C, H, W) images -> list of H logits tensors (B, K_h).

        A list of batches (B_i, C, H_i, W_i), e.g. views at different sizes (multi-crop), runs the backbone
        once per batch (BatchNorm statistics per batch) and the heads once on all features: logits
        (sum B_i, K_h), rows in the list's order. One call, so one DistributedDataParallel forward.
        ``embeddings=True`` also returns the heads' (sum B_i, P) inputs (see :meth:`forward_head`).
        """
        if isinstance(x, (list, tuple)):
            if not x:
                raise ValueError("expected a non-empty list of image batches")
            return self.forward_head(torch.cat([self.forward_features(v) for v in x]), embeddings=embeddings)
        return self.forward_head(self.forward_features(x), embeddings=embeddings)


def _pool(x: Tensor) -> Tensor:
    if x.ndim == 4:
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, D)
    return x


def check_positive_ints(name: str, values: tuple[int, ...] | list[int], length: int | None = None) -> None:
    """Raise a ValueError unless ``values`` is a sequence of positive ints (of ``length`` if given)."""
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok or (length is not None and len(values) != length):
        what = f"{length} positive integers" if length else "positive integers"
        raise ValueError(f"{name} must be {what}, got {values!r}")
