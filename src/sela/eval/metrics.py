"""Clustering metrics: Hungarian and many-to-one accuracy, NMI / AMI / ARI, cluster-size statistics.

Letters: N samples, P distinct predicted clusters, T distinct true classes, K clusters.

Units: accuracies are in percent (0..100), as everywhere in sela's reports; NMI, AMI and ARI keep
scikit-learn's scale (NMI in 0..1, AMI and ARI at most 1 and about 0 for chance); entropies are in nats.

Every function takes integer labels of shape (N,) as numpy arrays or torch tensors (any device).
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

ArrayLike = np.ndarray | torch.Tensor


def _as_labels(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as a 1-D int64 numpy array of non-negative labels, or a ValueError naming the fix."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, shape (N,), got shape {x.shape}; flatten it")
    if x.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer labels, got dtype {x.dtype}; cast it, e.g. x.astype(int)")
    if x.size == 0:
        raise ValueError(f"{name} is empty; pass at least one label")
    if x.min() < 0:
        raise ValueError(f"{name} holds negative labels; use labels 0, 1, 2, ...")
    return x.astype(np.int64, copy=False)


def _pair(pred: ArrayLike, truth: ArrayLike, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = _as_labels(pred, names[0]), _as_labels(truth, names[1])
    if pred.shape != truth.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same length, got {pred.shape[0]} and {truth.shape[0]}"
        )
    return pred, truth


def _contingency(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Counts ``C[p, t]`` of samples in cluster p with class t, shape (max(pred) + 1, max(truth) + 1)."""
    counts = np.zeros((pred.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(counts, (pred, truth), 1)
    return counts


def hungarian_accuracy(pred: ArrayLike, truth: ArrayLike) -> float:
    """Accuracy (percent) of the best one-to-one mapping from clusters to classes.

    The mapping maximises the number of matched samples over the contingency matrix
    (``scipy.optimize.linear_sum_assignment``). When there are more clusters than classes the extra
    clusters stay unmatched and count as wrong; with fewer clusters, some classes get no cluster.

    Args:
        pred: (N,) predicted cluster ids.
        truth: (N,) true class ids.

    Returns:
        Accuracy in percent, 0..100.
    """
    pred, truth = _pair(pred, truth, ("pred", "truth"))
    counts = _contingency(pred, truth)  # (P, T)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return 100.0 * float(counts[rows, cols].sum()) / pred.shape[0]


def many_to_one_accuracy(
    pred_train: ArrayLike,
    truth_train: ArrayLike,
    pred_test: ArrayLike | None = None,
    truth_test: ArrayLike | None = None,
) -> float:
    """Accuracy (percent) after mapping each cluster to its majority class.

    The mapping is fitted on the training pair (ties go to the smaller class id) and applied to the
    test pair; without a test pair it is evaluated on the training pair itself. Test samples in a
    cluster that no training sample fell into count as wrong.

    Args:
        pred_train: (N,) cluster ids used to fit the mapping.
        truth_train: (N,) class ids used to fit the mapping.
        pred_test: (M,) cluster ids to score, or None to score the training pair.
        truth_test: (M,) class ids to score, or None to score the training pair.

    Returns:
        Accuracy in percent, 0..100.
    """
    pred_train, truth_train = _pair(pred_train, truth_train, ("pred_train", "truth_train"))
    if (pred_test is None) != (truth_test is None):
        raise ValueError("pass both pred_test and truth_test, or neither to score the training pair")
    if pred_test is None:
        pred_test, truth_test = pred_train, truth_train
    else:
        pred_test, truth_test = _pair(pred_test, truth_test, ("pred_test", "truth_test"))
    counts = _contingency(pred_train, truth_train)  # (P, T)
    majority = counts.argmax(axis=1)  # (P,), first maximum = smallest class id
    seen = counts.sum(axis=1) > 0  # (P,)
    known = pred_test < counts.shape[0]  # (M,)
    mapped = np.full(pred_test.shape, -1, dtype=np.int64)
    mapped[known] = np.where(seen[pred_test[known]], majority[pred_test[known]], -1)
    return 100.0 * float(np.mean(mapped == truth_test))


def topk_accuracy(scores: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of class scores, for the kNN and linear evaluations.

    Args:
        scores: (M, C) class scores (any monotone scale: logits, probabilities, votes).
        labels: (M,) true classes.

    Returns:
        dict with ``top1`` and ``top5`` in percent (0..100). A sample counts for top-5 when its class
        is among the 5 best-scored classes (all classes when C <= 5); ties are broken by ``torch.topk``.
    """
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(_as_labels(labels, "labels"), device=scores.device)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"scores must have shape (M, C) with M={labels.shape[0]} like labels, got {tuple(scores.shape)}"
        )
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (M, 5)
    hits = top == labels[:, None]  # (M, 5)
    return {
        "top1": 100.0 * hits[:, 0].float().mean().item(),
        "top5": 100.0 * hits.any(dim=1).float().mean().item(),
    }


def cluster_sizes(pred: ArrayLike, n_clusters: int) -> dict[str, float]:
    """Statistics of the cluster-size distribution, for checking balance and collapse.

    Args:
        pred: (N,) cluster ids in ``[0, n_clusters)``.
        n_clusters: K, the number of clusters the labeller was asked for (empty ones included).

    Returns:
        dict with ``min`` and ``max`` (cluster sizes in samples), ``entropy`` (of the size distribution,
        in nats, at most log K), ``normalized_entropy`` (entropy / log K in 0..1; 1 for perfectly equal
        sizes, and 1 when K = 1) and ``n_empty`` (clusters with no sample).
    """
    pred = _as_labels(pred, "pred")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
    if pred.max() >= n_clusters:
        raise ValueError(
            f"pred holds cluster id {pred.max()} but n_clusters={n_clusters}; pass n_clusters > every id"
        )
    sizes = np.bincount(pred, minlength=n_clusters)  # (K,)
    p = sizes[sizes > 0] / pred.shape[0]
    entropy = float(-(p * np.log(p)).sum())
    return {
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "entropy": entropy,
        "normalized_entropy": entropy / float(np.log(n_clusters)) if n_clusters > 1 else 1.0,
        "n_empty": int((sizes == 0).sum()),
    }


def cluster_metrics(pred: ArrayLike, truth: ArrayLike, *, n_clusters: int | None = None) -> dict[str, float]:
    """The standard clustering scores of predicted clusters against true classes.

    NMI (arithmetic normalisation, scikit-learn's default), AMI and ARI come from ``sklearn.metrics``.

    Args:
        pred: (N,) predicted cluster ids.
        truth: (N,) true class ids.
        n_clusters: K, the number of clusters asked for; used to check the ids and count empty
            clusters. None means ``max(pred) + 1``.

    Returns:
        dict with ``nmi``, ``ami``, ``ari`` (scikit-learn scale), ``accuracy`` (Hungarian, percent),
        ``many_to_one`` (majority class per cluster, fitted and scored on the same pair, percent) and
        ``n_empty`` (clusters among the K with no sample).
    """
    pred, truth = _pair(pred, truth, ("pred", "truth"))
    n_clusters = int(pred.max()) + 1 if n_clusters is None else n_clusters
    sizes = cluster_sizes(pred, n_clusters)
    return {
        "nmi": float(skm.normalized_mutual_info_score(truth, pred)),
        "ami": float(skm.adjusted_mutual_info_score(truth, pred)),
        "ari": float(skm.adjusted_rand_score(truth, pred)),
        "accuracy": hungarian_accuracy(pred, truth),
        "many_to_one": many_to_one_accuracy(pred, truth),
        "n_empty": sizes["n_empty"],
    }
