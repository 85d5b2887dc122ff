"""Feature and head-logit extraction from a model, for kNN, linear probes and clustering metrics.

Letters: N samples, B batch, C image channels, D features, H heads, K_h clusters of head h.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass
class Extracted:
    """What :func:`extract` returns, on the CPU.

    Attributes:
        features: (N, D) float32 features, row i for sample i.
        logits: H tensors of shape (N, K_h) float32, one per head; empty when heads were not asked for.
    """

    features: Tensor
    logits: list[Tensor] = field(default_factory=list)


def _batches(images: Tensor | Iterable, batch_size: int) -> tuple[int, Iterable[tuple[Tensor, Tensor]]]:
    """The sample count N and an iterable of (uint8 images (B, C, H, W), row indices (B,))."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(
                f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} of shape "
                f"{tuple(images.shape)}; pass the raw uint8 images and let `transform` normalise them"
            )
        n = images.shape[0]
        starts = range(0, n, batch_size)
        return n, ((images[s : s + batch_size], torch.arange(s, min(s + batch_size, n))) for s in starts)
    dataset = getattr(images, "dataset", None)
    if dataset is None:
        raise ValueError(
            "images must be a uint8 tensor (N, C, H, W) or a DataLoader (with .dataset) whose batches are "
            f"(images, indices); got {type(images).__name__}"
        )
    return len(dataset), ((batch[0], batch[-1]) for batch in images)


@torch.no_grad()
def extract(
    model: nn.Module,
    images: Tensor | torch.utils.data.DataLoader,
    *,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    layer: str | None = None,
    heads: bool = True,
    progress: bool | None = None,
) -> Extracted:
    """Run ``model`` in eval mode over all images and collect its features and head logits.

    The model needs ``forward_features(x) -> (B, D)``, ``forward_head(features) -> list[(B, K_h)]`` and,
    when ``layer`` is given, ``features_by_layer(x, layer) -> (B, D_layer)`` (``sela.models.SelaModel``
    has all three). Its training mode is restored afterwards.

    Args:
        model: the network.
        images: a uint8 tensor (N, C, H, W) on any device, cut into ``batch_size`` batches in order; or a
            DataLoader over a dataset of length N whose batches are sequences with the uint8 images
            (B, C, H, W) first and the samples' indices (B,) last, e.g. ``(images, indices)``. Rows are
            placed by index, so a shuffled loader gives the same result; every index in 0..N-1 must
            appear exactly once.
        transform: maps a uint8 batch on ``device`` to the normalised float batch the model expects.
        batch_size: images per forward pass when ``images`` is a tensor (a loader brings its own).
        device: where to run; None means the device of the model's first parameter (CPU if it has none).
        layer: None for ``forward_features``; else the name of an intermediate layer whose pooled
            output becomes the features. Head logits still come from ``forward_features``, which costs
            a second pass through the backbone; pass ``heads=False`` to skip it.
        heads: also collect the logits of every head.
        progress: show a tqdm bar; None shows it only when stderr is a terminal.

    Returns:
        :class:`Extracted` with (N, D) features and H (N, K_h) logits, float32 on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    n, batches = _batches(images, batch_size)

    features: Tensor | None = None
    logits: list[Tensor] = []
    filled = torch.zeros(n, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        for x, idx in tqdm(batches, desc="extract", disable=None if progress is None else not progress):
            idx = torch.as_tensor(idx, dtype=torch.int64).cpu()  # (B,)
            if idx.shape != (x.shape[0],) or int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ValueError(
                    f"a batch of {x.shape[0]} images came with indices of shape {tuple(idx.shape)} outside "
                    f"0..{n - 1}; the dataset must return (image, index) with index in range(len(dataset))"
                )
            x = transform(x.to(device, non_blocking=True))  # (B, C, H, W) float
            base = model.forward_features(x) if layer is None or heads else None  # (B, D)
            f = base if layer is None else model.features_by_layer(x, layer)  # (B, D)
            if features is None:
                features = torch.empty(n, f.shape[1], dtype=torch.float32)
            features[idx] = f.float().cpu()
            if heads:
                out = model.forward_head(base)  # H x (B, K_h)
                if not logits:
                    logits = [torch.empty(n, o.shape[1], dtype=torch.float32) for o in out]
                for store, o in zip(logits, out, strict=True):
                    store[idx] = o.float().cpu()
            filled.index_add_(0, idx, torch.ones_like(idx))
    finally:
        model.train(was_training)

    if features is None or not bool((filled == 1).all()):
        missing, repeated = int((filled == 0).sum()), int((filled > 1).sum())
        raise ValueError(
            f"the loader covered {n - missing} of {n} samples ({missing} missing, {repeated} seen twice); "
            "use drop_last=False and a sampler that visits every index of the dataset once"
        )
    return Extracted(features=features, logits=logits)
