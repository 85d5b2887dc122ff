"""Feature and head-logit extraction from a model, for kNN, linear probes and clustering metrics.

Letters: N samples, B batch, C image channels, D features, H heads, K_h clusters of head h.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter; the CPU when it has none."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode and restore its training mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _indices(idx: Tensor | Iterable[int], n_images: int, n: int) -> Tensor:
    """A batch's (B,) int64 row indices on the CPU, checked to be one per image and within 0..n-1."""
    idx = torch.as_tensor(idx, dtype=torch.int64).cpu()  # (B,)
    if idx.shape != (n_images,) or int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(
            f"a batch of {n_images} images came with indices of shape {tuple(idx.shape)} outside "
            f"0..{n - 1}; the dataset must return (image, index) with index in range(len(dataset))"
        )
    return idx


def _forward(model: nn.Module, x: Tensor, *, layer: str | None, heads: bool) -> tuple[Tensor, list[Tensor]]:
    """The (B, D) features of a normalised batch and, when ``heads``, its H (B, K_h) head logits."""
    base = model.forward_features(x) if layer is None or heads else None  # (B, D)
    f = base if layer is None else model.features_by_layer(x, layer)  # (B, D)
    return f, list(model.forward_head(base)) if heads else []  # H x (B, K_h)


def _write(store: Tensor | None, idx: Tensor, rows: Tensor, n: int) -> Tensor:
    """``store`` with the (B, d) ``rows`` written at ``idx``; an (n, d) float32 CPU tensor made when None."""
    if store is None:
        store = torch.empty(n, rows.shape[1], dtype=torch.float32)
    store[idx] = rows.float().cpu()
    return store


def _coverage_error(filled: Tensor, n: int) -> ValueError:
    """The error for a loader whose indices did not visit each of the n samples exactly once."""
    missing, repeated = int((filled == 0).sum()), int((filled > 1).sum())
    return ValueError(
        f"the loader covered {n - missing} of {n} samples ({missing} missing, {repeated} seen twice); "
        "use drop_last=False and a sampler that visits every index of the dataset once"
    )


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
    device = _model_device(model) if device is None else torch.device(device)
    n, batches = _batches(images, batch_size)

    features: Tensor | None = None
    logits: list[Tensor] = []
    filled = torch.zeros(n, dtype=torch.int64)  # (N,) times each row was written
    with _eval_mode(model):
        for x, idx in tqdm(batches, desc="extract", disable=None if progress is None else not progress):
            idx = _indices(idx, x.shape[0], n)  # (B,)
            x = transform(x.to(device, non_blocking=True))  # (B, C, H, W) float
            f, out = _forward(model, x, layer=layer, heads=heads)  # (B, D), H x (B, K_h)
            features = _write(features, idx, f, n)
            stores = logits or [None] * len(out)  # no stores before the first batch
            logits = [_write(store, idx, o, n) for store, o in zip(stores, out, strict=True)]
            filled.index_add_(0, idx, torch.ones_like(idx))

    if features is None or not bool((filled == 1).all()):
        raise _coverage_error(filled, n)
    return Extracted(features=features, logits=logits)
