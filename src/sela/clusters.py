"""Clusters a person can act on: k-means with sela's label solver, a scan over K, and the balance of a
clustering.

:class:`OTKMeans` is k-means on the unit sphere whose assignment step is :func:`sela.sinkhorn.assign`
(optimal transport): every cluster receives its share of the samples (equal shares by default), so no
cluster collapses or swallows the rest. :func:`scan_k` fits it at several K and reports label-free
signals for choosing K; :func:`balance_lines` says how balanced any clustering came out and warns when it
is far from what was asked.

Letters: N samples, D features, K clusters, L k-means++ candidates.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.exceptions import NotFittedError
from torch import Tensor

from sela.labeller import feature_matrix
from sela.sinkhorn import DEFAULT_LAM, Assignment, assign

# measured against sklearn's KMeans on make_blobs, the digits' pixels and run features
# (benchmarks/ot_kmeans.py, docs/experiments.md): see OTKMeans
DEFAULT_TEMPERATURE = 0.1
DEFAULT_N_INIT = 4
DEFAULT_MAX_ITER = 100
DEFAULT_RELAX = 1.0  # rho of --marginal relaxed (in the solver's units, logits cos / T): measured, as above


def check_relax(relax: float | None) -> None:
    """``ValueError`` unless ``relax`` is None or a positive rho that :func:`sela.sinkhorn.assign` takes
    (its ``relax=``, a KL-penalised column marginal)."""
    if relax is None:
        return
    if "relax" not in inspect.signature(assign).parameters:
        raise ValueError(
            "this sela's label solver has no relaxed marginal yet (sela.sinkhorn.assign takes no relax=); "
            "use the uniform marginal (drop --marginal relaxed / --relax)"
        )
    if not (relax > 0 and math.isfinite(relax)):
        raise ValueError(f"--relax must be a positive number, got {relax}")


def solve(
    logits: Tensor,
    *,
    lam: float = DEFAULT_LAM,
    prior: Tensor | None = None,
    relax: float | None = None,
    init: Tensor | None = None,
) -> Assignment:
    """:func:`sela.sinkhorn.assign` of (N, K) logits; ``relax`` (rho > 0) is passed only when given, so
    a solver without the semi-relaxed marginal still serves the exact one."""
    if relax is None:
        return assign(logits, lam=lam, prior=prior, init=init)
    check_relax(relax)
    return assign(logits, lam=lam, prior=prior, init=init, relax=relax)


def plan_confidence(logits: Tensor, result: Assignment, lam: float) -> Tensor:
    """(N,) the largest entry of each row of the transport plan, the row normalised to sum 1 (0..1).

    The plan is Q = diag(a) P^lam diag(b) with P = softmax(logits) (:func:`sela.sinkhorn.assign`), so a
    normalised row is softmax(lam * logits + log b).
    """
    log_b = result.scaling.to(logits.device, torch.float32).log()  # (K,)
    return (lam * logits.float() + log_b).softmax(dim=1).amax(dim=1)


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def kmeans_plus_plus(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """(K, D) starting centroids from unit rows ``x`` (N, D): greedy k-means++ (Arthur and Vassilvitskii
    2007; sklearn's 2 + log K candidates per step), squared Euclidean distance 2 - 2 cos."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    rows = [first]
    closest = (2 - 2 * x @ x[first]).clamp_min(0)  # (N,) distance to the nearest chosen centroid
    for _ in range(1, k):
        if float(closest.sum()) <= 0:  # every sample sits on a centroid: any other row will do
            cand = torch.randint(n, (trials,), generator=gen)
        else:  # drawn on the CPU (the generator's device), so a GPU fit draws the same rows
            cand = torch.multinomial(closest.cpu(), trials, replacement=True, generator=gen)  # (L,)
        cand = cand.to(x.device)
        d = torch.minimum(closest[:, None], (2 - 2 * x @ x[cand].T).clamp_min(0))  # (N, L)
        best = int(d.sum(dim=0).argmin())
        closest = d[:, best]
        rows.append(int(cand[best]))
    return x[rows].clone()


def _centroids(x: Tensor, labels: Tensor, old: Tensor) -> Tensor:
    """(K, D) unit means of each cluster's members; empty clusters (possible only with a relaxed
    marginal) move to the samples farthest from their own centroids, one each."""
    sums = torch.zeros_like(old).index_add_(0, labels, x)  # (K, D)
    empty = (torch.bincount(labels, minlength=old.shape[0]) == 0).nonzero().flatten()
    if len(empty):
        own = (x * _unit(sums)[labels]).sum(dim=1)  # (N,) cos to their own centroid
        sums[empty] = x[own.argsort()[: len(empty)]]
    return _unit(sums)


@dataclass
class _Fit:
    labels: Tensor  # (N,) int64
    confidence: Tensor  # (N,) float32
    centroids: Tensor  # (K, D) unit rows
    cost: float  # sum of 1 - cos(sample, its centroid)
    n_iter: int
    converged: bool


def lloyd(
    x: Tensor, centroids: Tensor, *, temperature: float, lam: float, prior: Tensor | None,
    relax: float | None, max_iter: int,
) -> _Fit:  # fmt: skip
    """One k-means run from ``centroids`` (K, D) over unit rows ``x`` (N, D): assign by transport on
    cos / temperature, move each centroid to its members' unit mean; stop when no label changes."""
    labels, scaling, n_iter, done = None, None, 0, False
    while n_iter < max_iter and not done:
        n_iter += 1
        logits = x @ centroids.T / temperature  # (N, K)
        result = solve(logits, lam=lam, prior=prior, relax=relax, init=scaling)
        new, scaling = result.labels.to(x.device), result.scaling
        done = labels is not None and torch.equal(new, labels)
        labels = new
        if not done:
            centroids = _centroids(x, labels, centroids)
    cost = float((1 - (x * centroids[labels]).sum(dim=1)).sum())
    conf = plan_confidence(logits, result, lam).cpu()
    return _Fit(labels.cpu(), conf, centroids, cost, n_iter, done)


class OTKMeans(ClusterMixin, BaseEstimator):
    """k-means of L2-normalised features whose assignment step is optimal transport (sela's solver).

    ``fit`` centres the features (``center``: subtracts their mean) and normalises each row to unit length,
    then for each of ``n_init`` restarts: seeded k-means++
    centroids, then the iteration: scores = cos(features, centroids) / ``temperature`` (N, K); labels
    from :func:`sela.sinkhorn.assign` (``lam``; the column marginal exact and uniform, or ``prior``, or
    KL-penalised with weight ``relax`` so that sizes can follow the data); each centroid the unit mean of
    its members; until no label changes or ``max_iter``. The restart with the lowest cost (the sum of
    1 - cos between each sample and its centroid) is kept. A scikit-learn estimator, like ``KMeans``.

    The plan depends on ``lam / temperature`` only (the solver raises softmax(cos / T) to the power lam):
    250 by default, a nearly hard assignment, so the labels are those of balanced k-means (above T = 0.5
    the plan gets soft and its argmax unbalanced). Against ``sklearn.cluster.KMeans(n_init=10)`` on the
    same rows (docs/experiments.md): NMI 0.9736 against 0.9728 on equal blobs, 0.9951 / 0.9846 with 50
    blobs, 0.8659 / 0.8519 on a trained digits run's features, 0.7346 / 0.7373 on the digits' pixels.
    Centring matters for features with a large common part (a barely trained network: all cosines ~1,
    so the plan would be flat and its argmax labels unbalanced).

    Args:
        n_clusters: K.
        temperature: T of the scores (cosine units); with ``lam`` it sets how hard the plan is.
        lam: the solver's lambda.
        prior: (K,) cluster proportions for the exact marginal (default equal shares).
        relax: rho > 0 for the semi-relaxed marginal (None: exact).
        n_init: restarts, each from its own k-means++ draw.
        max_iter: the most assignment steps per restart.
        center: subtract the features' mean before normalising (``assign`` subtracts the same mean).
        seed: seed of the k-means++ draws; a fit is deterministic given it.
        device: where to compute.

    Attributes (after ``fit``):
        labels_: (N,) int64 numpy cluster of each sample.
        confidence_: (N,) float32 numpy, the largest entry of the sample's row of the plan (0..1).
        cluster_centers_: (K, D) float32 numpy unit centroids.
        inertia_: the kept restart's cost, sum over samples of 1 - cos (0..2N).
        mean_: (D,) the mean subtracted (zeros without ``center``), a tensor on ``device``.
        n_iter_: assignment steps of the kept restart; converged_: whether its labels stopped changing.
    """

    def __init__(
        self,
        n_clusters: int = 10,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        lam: float = DEFAULT_LAM,
        prior: ArrayLike | None = None,
        relax: float | None = None,
        n_init: int = DEFAULT_N_INIT,
        max_iter: int = DEFAULT_MAX_ITER,
        center: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        self.n_clusters = n_clusters
        self.temperature = temperature
        self.lam = lam
        self.prior = prior
        self.relax = relax
        self.n_init = n_init
        self.max_iter = max_iter
        self.center = center
        self.seed = seed
        self.device = device

    def _check(self, n: int) -> Tensor | None:
        if not (isinstance(self.n_clusters, int | np.integer) and 2 <= self.n_clusters <= n):
            raise ValueError(f"--k must be an integer from 2 to the {n} samples, got {self.n_clusters}")
        if not (self.temperature > 0 and self.lam > 0) or self.n_init < 1 or self.max_iter < 1:
            raise ValueError("need temperature > 0, lam > 0, n_init >= 1 and max_iter >= 1")
        check_relax(self.relax)
        if self.prior is None:
            return None
        return torch.as_tensor(np.asarray(self.prior, dtype=np.float64), device=self.device)

    def fit(self, X: ArrayLike, y: None = None) -> OTKMeans:
        """Cluster the (N, D) features ``X``; returns self."""
        x = feature_matrix(X).to(self.device)  # (N, D)
        self.mean_ = x.mean(dim=0) if self.center else torch.zeros_like(x[0])  # (D,)
        x = _unit(x - self.mean_)
        prior = self._check(x.shape[0])
        gen = torch.Generator().manual_seed(int(self.seed))
        best = None
        for _ in range(self.n_init):
            start = kmeans_plus_plus(x, int(self.n_clusters), gen)  # (K, D)
            fit = lloyd(x, start, temperature=self.temperature, lam=self.lam, prior=prior, relax=self.relax,
                        max_iter=self.max_iter)  # fmt: skip
            if best is None or fit.cost < best.cost:
                best = fit
        self.labels_ = best.labels.numpy()
        self.confidence_ = best.confidence.numpy()
        self.cluster_centers_ = best.centroids.cpu().numpy()
        self.inertia_, self.n_iter_, self.converged_ = best.cost, best.n_iter, best.converged
        return self

    def assign(self, X: ArrayLike) -> np.ndarray:
        """(M,) labels of other samples by the fitted centroids, with the same marginal over the M."""
        if not hasattr(self, "cluster_centers_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X) first")
        x = _unit(feature_matrix(X).to(self.device) - self.mean_)  # (M, D)
        logits = x @ torch.from_numpy(self.cluster_centers_).to(x.device).T / self.temperature  # (M, K)
        prior = self._check(x.shape[0])
        return solve(logits, lam=self.lam, prior=prior, relax=self.relax).labels.cpu().numpy()


# ------------------------------------------------------------------------------------------- choosing K


@dataclass
class KScore:
    """Label-free signals of a clustering into K clusters (:func:`scan_k`).

    Attributes:
        k: K.
        stability: NMI (0..1) between two clusterings of all N samples, one fitted on each random half
            of them (Lange et al. 2004, "Stability-based validation of clustering solutions"): 1 when
            the clusters do not depend on which samples were seen.
        silhouette: mean cosine silhouette (-1..1) of the first half's clustering on a subsample:
            how much closer a sample is to its own cluster than to the next one.
        largest, smallest: the largest and smallest cluster over the equal share N / K.
        cost: mean 1 - cos between a sample and its centroid (0..2).
    """

    k: int
    stability: float
    silhouette: float
    largest: float
    smallest: float
    cost: float


def score_k(
    x: Tensor, k: int, *, seed: int = 0, sample_size: int = 2000, center: bool = True, **kmeans
) -> KScore:
    """:class:`KScore` of (N, D) features ``x`` at K (centred with ``center``, then L2-normalised, as
    :class:`OTKMeans` sees them); ``kmeans``: its other settings."""
    from sklearn.metrics import normalized_mutual_info_score, silhouette_score

    n = x.shape[0]
    x = _unit(x - x.mean(dim=0)) if center else _unit(x)  # (N, D)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = (order[: n // 2], order[n // 2 :])
    fits = [OTKMeans(k, seed=seed + i, center=False, **kmeans).fit(x[rows]) for i, rows in enumerate(halves)]
    a, b = (f.assign(x) for f in fits)  # (N,) each: all samples, by each half's centroids
    sizes = np.bincount(a, minlength=k) / (n / k)  # (K,) over the equal share
    xn = x.cpu().numpy()
    cost = float(1 - (xn * fits[0].cluster_centers_[a]).sum(1).mean())
    sil = silhouette_score(xn, a, metric="cosine", sample_size=min(n, sample_size), random_state=seed)
    stability = float(normalized_mutual_info_score(a, b))
    return KScore(k, stability, float(sil), float(sizes.max()), float(sizes.min()), cost)


@dataclass
class KScan:
    """What :func:`scan_k` measured: one :class:`KScore` per K, the recommended K and why (one line)."""

    scores: list[KScore]
    best: int
    reason: str
    n: int  # samples scanned


def parse_k_list(text: str) -> list[int]:
    """The K of ``--k-scan``: a comma list (``2,5,10``), ranges (``2-20``, every K) or ranges with a step
    (``5-50:5``), or a mix; sorted, each once."""
    ks: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            span, _, step = part.partition(":")
            lo, _, hi = span.partition("-")
            ks.update(range(int(lo), int(hi or lo) + 1, int(step or 1)))
    except ValueError:
        raise ValueError(f"--k-scan takes K like 2,5,10 or 2-20 or 5-50:5, not {text!r}") from None
    if len(ks) < 2 or min(ks) < 2:
        raise ValueError(f"--k-scan needs at least two K of 2 or more, got {text!r}; e.g. 2-20")
    return sorted(ks)


def scan_k(
    x: Tensor, ks: list[int], *, seed: int = 0, max_samples: int = 20_000, progress: bool | None = None,
    **kmeans,
) -> KScan:  # fmt: skip
    """Score clusterings of (N, D) features at every K of ``ks`` (:func:`score_k`; at most ``max_samples``
    random rows) and recommend the K of the highest silhouette x stability: well separated clusters
    that two halves of the data agree on. On ``make_blobs`` with 8 centres it picks 8, on the digits'
    pixels and on a trained run's digits features 10 (docs/experiments.md). ``kmeans``:
    :class:`OTKMeans` settings.
    """
    from tqdm.auto import tqdm

    x = feature_matrix(x)
    if x.shape[0] > max_samples:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]]
    too_many = [k for k in ks if not 2 <= k <= x.shape[0] // 2]
    if too_many:
        raise ValueError(f"--k-scan {too_many}: each K must be from 2 to half the {x.shape[0]} samples")
    bar = tqdm(ks, desc="k-scan", unit="K", disable=None if progress is None else not progress)
    scores = [score_k(x, k, seed=seed, **kmeans) for k in bar]
    ranked = sorted(scores, key=lambda s: -s.silhouette * s.stability)
    best, second = ranked[0], ranked[1]
    reason = (
        f"K = {best.k}: the highest silhouette x stability ({best.silhouette:.3f} x {best.stability:.2f} = "
        f"{best.silhouette * best.stability:.3f}; next K = {second.k} with "
        f"{second.silhouette * second.stability:.3f})"
    )
    return KScan(scores, best.k, reason, x.shape[0])


def format_scan(scan: KScan) -> list[str]:
    """The scan as text lines: a table (one row per K), then the recommendation."""
    lines = [f"{'K':>5} {'stability':>9} {'silhouette':>10} {'largest':>8} {'smallest':>8} {'cost':>6}"]
    for s in scan.scores:
        mark = "  <- recommended" if s.k == scan.best else ""
        lines.append(
            f"{s.k:>5} {s.stability:>9.3f} {s.silhouette:>10.3f} {s.largest:>8.2f} {s.smallest:>8.2f} "
            f"{s.cost:>6.3f}{mark}"
        )
    return [*lines, f"recommended {scan.reason}"]


# ---------------------------------------------------------------------------------------------- balance


@dataclass
class Balance:
    """Cluster sizes of one clustering of N samples into K clusters (sizes in samples)."""

    name: str
    k: int
    n: int
    smallest: int
    median: float
    largest: int
    n_empty: int
    mean_confidence: float | None = None

    @property
    def share(self) -> float:
        """N / K, a cluster's equal share."""
        return self.n / self.k

    def line(self) -> str:
        conf = "" if self.mean_confidence is None else f", mean confidence {self.mean_confidence:.3f}"
        return (
            f"{self.name}: K = {self.k}, sizes {self.smallest} / {self.median:g} / {self.largest} (min / median "
            f"/ max), largest {self.largest / self.share:.2f}x its equal share {self.share:.1f}, "
            f"{self.n_empty} empty{conf}"
        )

    def far(self, uniform: bool = True) -> bool:
        """Far from what was asked: any empty cluster; with equal shares asked for, also the largest
        over twice its share or the smallest under a quarter of it."""
        uneven = self.largest > 2 * self.share or self.smallest < self.share / 4
        return self.n_empty > 0 or (uniform and uneven)


def balance(
    labels: ArrayLike, k: int, *, name: str = "clusters", confidence: ArrayLike | None = None
) -> Balance:
    """The :class:`Balance` of (N,) ``labels`` in 0..K-1 (and their (N,) confidences, if given)."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    if labels.size == 0 or labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"{name}: need labels in 0..{k - 1}, got {labels.size} labels")
    sizes = np.bincount(labels, minlength=k)  # (K,)
    conf = None if confidence is None else float(np.asarray(confidence).mean())
    return Balance(name, k, labels.size, int(sizes.min()), float(np.median(sizes)), int(sizes.max()),
                   int((sizes == 0).sum()), conf)  # fmt: skip


def balance_lines(
    labels: ArrayLike, n_clusters: list[int], *, names: list[str] | None = None,
    confidence: ArrayLike | None = None, uniform: bool = True,
) -> list[str]:  # fmt: skip
    """One line per clustering of (H, N) ``labels`` (K_h each): K, sizes min / median / max, the largest
    cluster over its equal share, the empty clusters (and the mean of (H, N) ``confidence``). Warns for
    each clustering that is far from what was asked (:meth:`Balance.far`; ``uniform``: equal shares)."""
    labels = np.asarray(labels)
    names = names or [f"head {h}" for h in range(len(n_clusters))]
    lines = []
    for h, k in enumerate(n_clusters):
        b = balance(labels[h], k, name=names[h], confidence=None if confidence is None else confidence[h])
        lines.append(b.line())
        if b.far(uniform):
            what = (
                f"far from equal sizes ({b.largest} and {b.smallest} images for an equal share of "
                f"{b.share:.1f}, {b.n_empty} empty)"
                if uniform
                else f"{b.n_empty} of {k} clusters empty"
            )
            warnings.warn(
                f"{b.name}: {what}: the features may not hold {k} such groups; look at the size histogram, "
                "or try another K (sela labels --k-scan)",
                stacklevel=2,
            )
    return lines
