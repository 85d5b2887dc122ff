"""Label-free signals of whether training helped, and the one-line verdict drawn from them.

A user without labels cannot compute a kNN accuracy; these need none:

  * :func:`rankme`: the effective rank of the (N, D) features (Garrido et al. 2023, "RankMe"); a collapsed
    network maps every image to (nearly) one direction, rank about 1 (a fresh network's rank is high:
    training concentrates the features, so a high rank is no proof of learning).
  * :func:`head_agreement`: the mean NMI between the H heads' labellings: heads that found structure in the
    data agree with each other (so do the heads of a collapsed network, which share its few directions).
  * :func:`step_agreement`: the NMI between one head's labels at two successive label steps (how stable the
    labels are); :func:`label_nmi` computes it from a bincount contingency, in O(N + K_a K_b).
  * :func:`view_neighbour_agreement`: for n images, the share of each image's k nearest neighbours in the
    embedding of one augmented view that are also its neighbours in the embedding of a second, independent
    view; and the same share for the views' raw pixels, the floor a network must beat to have learned what
    the augmentation keeps.
  * :func:`verdict`: those numbers as one line ("learned", "learned little", "collapsed") and a warning.

Letters: N images, D features, H heads, K_h clusters of head h, n the subsample, k neighbours, C channels,
S the views' side (px), b a batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RANKME_ROWS = 10_000  # the most rows of the SVD (the paper uses 25,600)
RANKME_ROWS_PER_DIM = 25  # rows per feature; CIFAR-10 at D = 96: 2,000 rows within 0.8 % of all 50,000
RANKME_EPS = 1e-7  # the paper's epsilon added to the normalised singular values (float32)
VIEW_IMAGES = 2_000  # images of the view-neighbour check
VIEW_K = 10  # neighbours per image
RAW_SIDE = 32  # raw pixels of views larger than this are compared at this side (antialiased)
_TIE_JITTER = 1e-6  # breaks exact ties of cosine similarities at random (a constant embedding: chance)

# the verdict's thresholds, from 18 runs and fresh networks on the digits, CIFAR-10 and Imagewoof64
# (docs/training.md, "Did it learn? The verdict")
COLLAPSED_RANK = 3.0  # collapsed or untrained-in-eval-mode networks: 1.0-2.8; every other one: 12 or more
COLLAPSED_SHARE = 0.9  # collapsed: 0.998-1.0; trained runs: 0.37 at most; fresh networks: 0.64-0.85
LEARNED_RATIO = 1.5  # runs that learned: 2.2-6.1 x raw pixels; the rest: 1.44 x at most, fresh ones 0.2-0.4 x
LEARNED_MARGIN = 0.02  # and this far above raw pixels (runs that learned: +0.04 or more; seeds move it 0.01)


class Rank(NamedTuple):
    """:func:`rankme`'s result: the effective rank (1 .. min(n, D)) and its share of the largest possible."""

    rankme: float
    fraction: float


class ViewAgreement(NamedTuple):
    """:func:`view_neighbour_agreement`'s result: the mean k-NN overlap (0 .. 1) between two views' embeddings
    and between their raw pixels; ``chance`` is k / (n - 1), the overlap of unrelated neighbourhoods."""

    embedding: float
    raw_pixels: float
    chance: float


def rankme(
    features: Tensor, *, max_rows: int = RANKME_ROWS, generator: torch.Generator | None = None
) -> Rank:
    """The effective rank of an embedding (RankMe, Garrido et al. 2023, eq. 1-2).

    ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / sum(sigma) + eps`` over the singular values sigma of
    the features as they are (not centred, as in the paper), on a random subsample of at most ``max_rows``
    rows. ``fraction`` is the rank over ``min(n, D)`` (D when the subsample has at least D rows).

    Args:
        features: (N, D) float features, one row per image.
        max_rows: rows kept (chosen with ``generator``); the paper uses 25,600.
        generator: for the subsample (None: torch's global generator).

    Returns:
        :class:`Rank`; (0, 0) for features that are all zero.
    """
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"features must be (N, D) with N, D >= 1, got shape {tuple(features.shape)}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    z = features.detach().float().cpu()
    if len(z) > max_rows:
        z = z[torch.randperm(len(z), generator=generator)[:max_rows]]  # (n, D)
    if not bool(torch.isfinite(z).all()):
        raise ValueError("features hold NaN or inf; the network diverged (see the training log)")
    sigma = torch.linalg.svdvals(z.double())  # (min(n, D),)
    total = float(sigma.sum())
    if total <= 0:
        return Rank(0.0, 0.0)
    p = sigma / total + RANKME_EPS
    rank = math.exp(float(-(p * p.log()).sum()))
    return Rank(rank, rank / min(z.shape))


def _labels(x: Tensor, name: str) -> Tensor:
    """``x`` as a 1-D int64 tensor of non-negative labels (any device), or a ValueError naming the fix."""
    x = torch.as_tensor(x)
    if x.ndim != 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of labels (N,), got shape {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer labels, got {x.dtype}")
    x = x.long()
    if int(x.min()) < 0:
        raise ValueError(f"{name} holds negative labels; use labels 0, 1, 2, ...")
    return x


def _entropy(counts: Tensor) -> float:
    """Entropy in nats of the distribution that integer ``counts`` describe."""
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


def label_nmi(a: Tensor, b: Tensor) -> float:
    """Normalised mutual information of two labellings of the same N items (0 .. 1).

    The same number as scikit-learn's ``normalized_mutual_info_score(a, b)`` (arithmetic normalisation,
    1.0 for two single-cluster labellings) from a bincount contingency table of (max(a) + 1) x (max(b) + 1)
    cells, on the labels' device: 1.3M labels of 128 clusters take about 30 ms on one CPU thread, where
    scikit-learn takes about 300 ms.

    Args:
        a, b: (N,) integer labels >= 0.
    """
    a, b = _labels(a, "a"), _labels(b, "b").to(torch.as_tensor(a).device)
    if a.shape != b.shape:
        raise ValueError(f"the labellings must have the same length, got {len(a)} and {len(b)}")
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    joint = torch.bincount(a * kb + b, minlength=ka * kb).view(ka, kb)  # (K_a, K_b) contingency
    rows, cols = joint.sum(1), joint.sum(0)  # (K_a,), (K_b,)
    h_a, h_b = _entropy(rows), _entropy(cols)
    if h_a == 0 and h_b == 0:
        return 1.0  # neither splits the data: a perfect match, as scikit-learn has it
    nz = joint > 0
    n = float(len(a))
    pij = joint[nz].double() / n
    outer = (rows[:, None].double() * cols[None, :].double())[nz] / (n * n)  # p_i p_j of the same cells
    mi = float((pij * (pij.log() - outer.log())).sum())
    return max(0.0, min(1.0, mi / (0.5 * (h_a + h_b)))) if mi > 0 else 0.0


def step_agreement(previous: Tensor, new: Tensor) -> float:
    """NMI between one head's labels of the same rows before and after a label step, (n,) each: 1 when the
    step changed nothing but the clusters' names, about 0 when the new labels are unrelated to the old."""
    return label_nmi(previous, new)


def head_agreement(labels: Tensor) -> float | None:
    """The mean NMI over all pairs of heads of their (H, N) labels (heads may have different K); None for
    a single head. Cost: H (H - 1) / 2 bincounts of N."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, N), got shape {tuple(labels.shape)}")
    pairs = list(itertools.combinations(range(labels.shape[0]), 2))
    if not pairs:
        return None
    return sum(label_nmi(labels[i], labels[j]) for i, j in pairs) / len(pairs)


def _neighbours(x: Tensor, k: int, generator: torch.Generator | None, chunk: int = 1024) -> Tensor:
    """(n, k) indices of each row's k nearest other rows of (n, d) ``x`` by cosine similarity; exact ties
    broken at random."""
    z = F.normalize(x.float(), dim=1)
    out = torch.empty(len(z), k, dtype=torch.int64)
    for s in range(0, len(z), chunk):
        sims = z[s : s + chunk] @ z.T  # (c, n)
        sims += _TIE_JITTER * torch.rand(sims.shape, generator=generator)
        sims[torch.arange(len(sims)), torch.arange(s, s + len(sims))] = -math.inf  # not itself
        out[s : s + chunk] = sims.topk(k, dim=1).indices
    return out


def knn_overlap(a: Tensor, b: Tensor, *, k: int = VIEW_K, generator: torch.Generator | None = None) -> float:
    """The mean over rows of the share of a row's k nearest neighbours (cosine, itself excluded) under (n, d)
    ``a`` that are also among its k nearest under (n, d') ``b`` (0 .. 1; k / (n - 1) by chance)."""
    if len(a) != len(b):
        raise ValueError(f"a and b need one row per item each, got {len(a)} and {len(b)} rows")
    if not 1 <= k < len(a):
        raise ValueError(f"k must be in 1 .. n - 1 = {len(a) - 1}, got {k}; use more images or a smaller k")
    na, nb = _neighbours(a.cpu(), k, generator), _neighbours(b.cpu(), k, generator)  # (n, k) each
    hits = (na[:, :, None] == nb[:, None, :]).any(2).sum(1)  # (n,) shared neighbours
    return float(hits.double().mean()) / k


def _uint8_batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """uint8 (b, C, H, W) batches from a (n, C, H, W) tensor (cut in order) or an iterable of batches."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (n, C, H, W), got {images.dtype} {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    yield from images


def _raw(view: Tensor, side: int) -> Tensor:
    """(b, C, S, S) normalised views -> (b, C s s) raw pixels, s = min(S, ``side``) (antialiased)."""
    if view.shape[-1] > side:
        view = F.interpolate(view, size=(side, side), mode="bilinear", antialias=True)
    return view.flatten(1).float().cpu()


@torch.no_grad()
def embed(
    model: nn.Module, images: Tensor | Iterable[Tensor], *, transform: nn.Module, batch_size: int = 256
) -> Tensor:
    """(n, D) float32 features (``model.forward_features`` in eval mode, its mode restored) of uint8 images,
    a (n, C, H, W) tensor or an iterable of (b, C, H, W) batches, each batch mapped by ``transform`` (e.g.
    the run's :class:`sela.data.EvalTransform`) on its own device; rows in order, on the CPU."""
    was_training = model.training
    model.eval()
    try:
        parts = [
            model.forward_features(transform(x)).float().cpu() for x in _uint8_batches(images, batch_size)
        ]
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("no images to embed; pass at least one")
    return torch.cat(parts)


@torch.no_grad()
def embed_views(
    model: nn.Module,
    images: Tensor | Iterable[Tensor],
    *,
    augment: nn.Module,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    raw_side: int = RAW_SIDE,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two independently augmented views of each image, embedded by ``model.forward_features`` in eval mode
    (its mode is restored): (n, D) features of view 1 and view 2, then (n, C s s) raw pixels of each (see
    :func:`view_neighbour_agreement`). ``augment(uint8 batch, generator)`` makes a view, e.g. the run's
    :class:`sela.data.BatchAugment`; the batches' device is where the model runs."""
    was_training = model.training
    model.eval()
    out: list[list[Tensor]] = [[], [], [], []]
    try:
        for x in _uint8_batches(images, batch_size):
            v1, v2 = augment(x, generator), augment(x, generator)  # (b, C, S, S) each, independent draws
            feats = model.forward_features(torch.cat([v1, v2])).float().cpu()  # (2b, D)
            parts = (feats[: len(x)], feats[len(x) :], _raw(v1, raw_side), _raw(v2, raw_side))
            for store, part in zip(out, parts, strict=True):
                store.append(part)
    finally:
        model.train(was_training)
    if not out[0]:
        raise ValueError("no images to embed; pass at least k + 1 images")
    f1, f2, p1, p2 = (torch.cat(parts) for parts in out)
    return f1, f2, p1, p2


def view_neighbour_agreement(
    model: nn.Module,
    images: Tensor | Iterable[Tensor],
    *,
    augment: nn.Module,
    k: int = VIEW_K,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    raw_side: int = RAW_SIDE,
) -> ViewAgreement:
    """How well the embedding keeps images' neighbours across augmentations, against raw pixels.

    Every image gets two independent views from ``augment`` (the run's training augmentation); for each,
    the share of its k nearest neighbours (cosine, itself excluded) among the first views' features that
    are also among its k nearest among the second views' features, averaged over images; then the same
    for the views' raw pixels (views larger than ``raw_side`` px compared at that side). A network that
    learned what the augmentation keeps (the object, not the crop or colour) scores clearly above raw
    pixels; an embedding the augmentation does not change scores 1; exact ties (a constant embedding)
    are broken at random, so they score about ``chance``.

    Args:
        model: a :class:`sela.models.SelaModel` (``forward_features``).
        images: the n images, uint8 (n, C, H, W) on the model's device, or an iterable of such batches
            (e.g. a subsample, :data:`VIEW_IMAGES` of them: 2,000 x 2 views of 32 px through the
            ``cpu-fast`` convnet take about 1 s on one CPU thread).
        augment: makes a normalised float view of a uint8 batch: ``augment(batch, generator)``.
        k: neighbours per image.
        generator: the views' and tie-breaks' randomness (None: torch's global generator).
        batch_size: images per forward pass when ``images`` is a tensor.
        raw_side: the raw pixels' largest side (px).

    Returns:
        :class:`ViewAgreement` (embedding, raw_pixels, chance), each 0 .. 1.
    """
    f1, f2, p1, p2 = embed_views(
        model, images, augment=augment, generator=generator, batch_size=batch_size, raw_side=raw_side
    )
    embedding = knn_overlap(f1, f2, k=k, generator=generator)
    raw = knn_overlap(p1, p2, k=k, generator=generator)
    return ViewAgreement(embedding, raw, k / (len(f1) - 1))


def verdict(signals: dict[str, float | None]) -> tuple[str, str | None]:
    """One line saying whether a run learned, from :func:`sela.finish.label_free_signals`'s flat dict, and a
    one-line warning saying what to try when it probably did not (None when it did).

    * collapsed: ``rankme`` below :data:`COLLAPSED_RANK` (the features of all images lie along about one
      direction), or ``largest_cluster_share`` at least :data:`COLLAPSED_SHARE` (a head's argmax puts
      nearly every image in one cluster);
    * learned: ``view_knn_overlap`` at least :data:`LEARNED_RATIO` times ``raw_view_knn_overlap`` and
      :data:`LEARNED_MARGIN` above it (the network keeps neighbours across augmentations clearly better
      than raw pixels do);
    * learned little: neither;
    * undecided: not collapsed, and no view signals (fewer than k + 1 images).

    Missing (None) signals are left out of the line.
    """
    view, raw = signals.get("view_knn_overlap"), signals.get("raw_view_knn_overlap")
    rank, share = signals.get("rankme"), signals.get("largest_cluster_share")
    detail = _detail(signals)
    if (rank is not None and rank < COLLAPSED_RANK) or (share is not None and share >= COLLAPSED_SHARE):
        return f"verdict: collapsed — {detail}", (
            f"the run collapsed or barely trained ({detail}): the network gives nearly every image the same "
            "features or cluster; if the loss fell, lower --lr or use fewer --clusters, else train longer"
        )
    if view is None or raw is None:
        return f"verdict: undecided (too few images for the view check) — {detail}", None
    if view >= LEARNED_RATIO * raw and view >= raw + LEARNED_MARGIN:
        return f"verdict: learned — {detail}", None
    return f"verdict: learned little — {detail}", (
        f"the run probably learned little ({detail}): it keeps an image's neighbours across augmentations "
        "no better than raw pixels do; train longer (--epochs, --time-limit) or try another --lr or --recipe"
    )


def _detail(signals: dict[str, float | None]) -> str:
    """The verdict's numbers: "view neighbours 0.41 vs 0.12 on raw pixels, effective rank 38/96, ..."."""
    view, raw = signals.get("view_knn_overlap"), signals.get("raw_view_knn_overlap")
    rank, fraction = signals.get("rankme"), signals.get("rankme_fraction")
    share = signals.get("largest_cluster_share")
    parts = []
    if view is not None and raw is not None:
        parts.append(f"view neighbours {view:.2f} vs {raw:.2f} on raw pixels")
    if rank is not None:
        parts.append(f"effective rank {rank:.0f}" + (f"/{rank / fraction:.0f}" if fraction else ""))
    if signals.get("head_nmi") is not None:
        parts.append(f"heads agree {signals['head_nmi']:.2f}")
    if signals.get("label_agreement") is not None:
        parts.append(f"labels stable {signals['label_agreement']:.2f}")
    if share is not None and share >= COLLAPSED_SHARE:
        parts.append(f"one cluster holds {share:.0%} of a head's predictions")
    return ", ".join(parts) or "no signals"
