"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of Wu, Xiong, Yu, Lin, "Unsupervised feature learning via non-parametric instance
discrimination", CVPR 2018, used by SeLa for its kNN numbers: features are L2-normalised, the k
training samples with the highest cosine similarity s vote for their class with weight exp(s / T).

Letters: N training samples, M test samples, D feature dimension, C classes, B test rows per chunk.
"""

import numpy as np
import torch
from torch import Tensor

from sela.eval.metrics import topk_accuracy

KNN_K = 200  # neighbours (Wu et al. 2018; the protocol SeLa reports)
KNN_TEMPERATURE = 0.1  # temperature of the neighbours' votes

ArrayLike = np.ndarray | Tensor


def _features(x: ArrayLike, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (rows, D) matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    return x


def _labels(y: ArrayLike, n: int, name: str) -> Tensor:
    y = torch.as_tensor(y)
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the features, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class ids, got {y.dtype}; cast it, e.g. y.long()")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} holds negative class ids; use classes 0, 1, 2, ...")
    return y.long()


def _check_settings(train: Tensor, test: Tensor, *, k: int, temperature: float, chunk_size: int) -> None:
    """Raise ``ValueError`` for feature sets of different D or a non-positive k, T or chunk size."""
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train_features have D={train.shape[1]} but test_features have D={test.shape[1]}; "
            "extract both with the same model and layer"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")


def _n_classes(labels: Tensor, n_classes: int | None) -> int:
    """C: ``n_classes``, or one more than the largest label when None; it must cover every label."""
    n_max = int(labels.max()) + 1
    n_classes = n_max if n_classes is None else n_classes
    if n_classes < n_max:
        raise ValueError(f"train_labels hold class {n_max - 1} but n_classes={n_classes}; raise n_classes")
    return n_classes


def _chunk_scores(
    chunk: Tensor, train: Tensor, labels: Tensor, *, k: int, temperature: float, n_classes: int
) -> Tensor:
    """(B, C) class scores of a (B, D) ``chunk`` of test rows, each row summing to 1.

    ``train`` (N, D) is already L2-normalised; each chunk row's k most similar training rows vote for
    their label with weight exp(s / T).
    """
    chunk = torch.nn.functional.normalize(chunk, dim=1)  # (B, D)
    sim = chunk @ train.T  # (B, N)
    top_sim, top_idx = sim.topk(k, dim=1)  # (B, k)
    # Subtracting the row maximum rescales a row's votes by one constant, which the row sum removes.
    weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (B, k)
    votes = torch.zeros(chunk.shape[0], n_classes, device=chunk.device)  # (B, C)
    votes.scatter_add_(1, labels[top_idx], weights)
    return votes / votes.sum(dim=1, keepdim=True)


@torch.no_grad()
def knn_classify(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    n_classes: int | None = None,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """Class scores of each test sample from its k nearest training samples (Wu et al. 2018).

    Both feature sets are L2-normalised here, so the similarity is the cosine. For each test row the
    k most similar training rows vote for their label with weight exp(s / T). Test rows are processed
    ``chunk_size`` at a time, so the largest temporary is a (chunk_size, N) similarity block
    (256 x 50,000 float32 = 51 MB).

    Args:
        train_features: (N, D) features of the labelled bank.
        train_labels: (N,) integer classes of the bank.
        test_features: (M, D) features to classify.
        k: neighbours per test sample; clamped to N when larger.
        temperature: T in exp(s / T); smaller T gives the nearest neighbours more say.
        n_classes: C; None means ``max(train_labels) + 1``.
        chunk_size: test rows per similarity block (B).
        device: where to compute; None means the device of ``train_features`` (CPU for numpy).

    Returns:
        (M, C) float32 scores on ``device``: the weighted votes of each class divided by their row sum,
        so each row sums to 1 (dividing does not change the ranking and keeps exp(s / T) finite for
        small T).
    """
    train = _features(train_features, "train_features")
    test = _features(test_features, "test_features")
    labels = _labels(train_labels, train.shape[0], "train_labels")
    _check_settings(train, test, k=k, temperature=temperature, chunk_size=chunk_size)
    n_classes = _n_classes(labels, n_classes)

    device = train.device if device is None else torch.device(device)
    train = torch.nn.functional.normalize(train.to(device, torch.float32), dim=1)  # (N, D)
    labels = labels.to(device)
    k = min(k, train.shape[0])
    scores = torch.empty(test.shape[0], n_classes, device=device)  # (M, C)
    for start in range(0, test.shape[0], chunk_size):
        chunk = test[start : start + chunk_size].to(device, torch.float32)  # (B, D)
        votes = _chunk_scores(chunk, train, labels, k=k, temperature=temperature, n_classes=n_classes)
        scores[start : start + chunk.shape[0]] = votes
    return scores


def knn_accuracy(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    n_classes: int | None = None,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of the weighted kNN classifier of :func:`knn_classify`.

    Args:
        train_features, train_labels, test_features, k, temperature, chunk_size, device: as in
            :func:`knn_classify`.
        test_labels: (M,) integer classes of the test samples.
        n_classes: C; None means one more than the largest class in either label set.

    Returns:
        dict with ``top1`` and ``top5``, in percent (0..100). A test sample counts for top-5 when its
        class is among the 5 best-scored classes (all classes when C <= 5). Ties in the scores are
        broken by ``torch.topk``.
    """
    test_features = _features(test_features, "test_features")
    test_labels = _labels(test_labels, test_features.shape[0], "test_labels")
    if n_classes is None:
        n_classes = int(max(int(torch.as_tensor(train_labels).max()), int(test_labels.max()))) + 1
    scores = knn_classify(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        n_classes=n_classes,
        chunk_size=chunk_size,
        device=device,
    )  # (M, C)
    return topk_accuracy(scores, test_labels)
