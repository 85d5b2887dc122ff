"""``SelfLabeller``: SeLa's self-labelling of fixed feature vectors, in the scikit-learn estimator style.

SeLa (Asano, Rupprecht, Vedaldi, ICLR 2020) alternates two steps: (1) given the heads' logits, find
labels that split the data into equal-sized clusters while agreeing with the logits as much as
possible (an optimal-transport problem solved by Sinkhorn-Knopp, :func:`sela.sinkhorn.assign`); (2)
given the labels, train the heads by cross-entropy. Here the features are fixed, so only the heads
learn; this is the ``sela cluster`` estimator for features extracted once from a frozen backbone.

The label layer, :class:`LabelState`, holds the (H, N) labels with each head's solver scaling and does
the warm-started, rank-aware label step (:meth:`LabelState.relabel`); both the training loop and
``SelfLabeller`` use it.

Letters: N samples, D features, H heads, K_h clusters of head h, B batch, W ranks, n_r rows of one rank.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.exceptions import NotFittedError
from torch import Tensor, nn

from sela import distributed as dist
from sela.eval.linear import feature_moments
from sela.schedule import even_epochs
from sela.sinkhorn import DEFAULT_LAM, Assignment, assign

ArrayLike = np.ndarray | Tensor

_IMBALANCE_WARN = 2.0  # the largest cluster at twice its share: far from equipartition
MARGINALS = ("uniform", "relaxed", "estimated")
DEFAULT_RELAX = 1.0  # KL weight of the relaxed marginal (rho of sela.sinkhorn.assign)
_ESTIMATE_MIX = 0.5  # the estimated prior: this much of the heads' mean prediction, the rest uniform
_HARDEN = (4.0, 16.0, 64.0)  # lam factors tried when a converged plan's argmax is still unbalanced
_INPLACE_BYTES = 2**30  # solve in place (no second n_r x K buffer) when one rank's kernel exceeds 1 GiB


class LabelState:
    """The self-labels of N items under H heads, each head's solver scaling, and the update count.

    ``relabel`` re-assigns one head's labels from its logits with :func:`sela.sinkhorn.assign`,
    warm-started from that head's previous scaling. Under ``torch.distributed`` each rank passes the
    logits of its own rows: the solve is global (the solver all-reduces K-sized vectors) and the labels
    are combined on every rank with one all-reduce of N integers.

    Args:
        n_heads: H.
        n: N, the number of items labelled.
        lam: lambda of the label step (larger follows the logits more closely, smaller balances harder).
        fill: the label of an item before its first assignment.
        device: where ``labels`` lives.
        soft: 0 (the paper): hard labels only. k > 0: also keep each item's k largest entries of its
            row of the transport plan Q = diag(a) P^lambda diag(b), renormalised to sum to 1, as soft
            targets (SwAV trains on soft codes). Memory: H x N x k x 8 bytes; the solve then never runs
            in place (it needs the logits afterwards).
        marginal: the clusters' share of the items: ``uniform`` (the paper's equipartition, N / K each),
            ``relaxed`` (the semi-relaxed problem: the equal share KL-penalised with weight ``relax``,
            so that cluster sizes can follow the data; :func:`sela.sinkhorn.assign`'s ``relax``), or
            ``estimated`` (an exact marginal equal to a prior estimated at every step from the heads'
            own mean prediction, half of it mixed with uniform so that no cluster can vanish).
        relax: rho, the KL weight of the ``relaxed`` marginal (larger: closer to uniform).

    Balance. A converged plan meets its marginal, but its hard argmax labels need not (a soft plan of
    near-equal logits: an untrained network's first step, cosine scores). When the largest cluster holds
    more than twice its share, the step is solved again at 4, 16 and 64 times lambda (a harder plan, whose
    argmax follows the marginal closely) and the most balanced labels are kept; a warning names the step
    when even those stay above twice the share (a collapsed network: rows that barely differ). A warm-started
    solve that stalls short of the tolerance is solved again from a cold start, and the better one kept.

    Attributes:
        labels: (H, N) int64.
        scalings: H column scalings (K_h,) of the last solve, or None (the next solve starts cold).
        n_updates: label steps done (the trainer counts one per step, whichever heads it re-assigned).
        codes, weights: with ``soft``: (H, N, k) int32 clusters and float32 weights (rows sum to 1) of
            the soft targets; None before the first label step, and without ``soft``.
    """

    def __init__(
        self,
        n_heads: int,
        n: int,
        *,
        lam: float = DEFAULT_LAM,
        fill: int = 0,
        device: str | torch.device = "cpu",
        soft: int = 0,
        marginal: str = "uniform",
        relax: float = DEFAULT_RELAX,
    ) -> None:
        if marginal not in MARGINALS:
            raise ValueError(f"marginal must be one of {', '.join(MARGINALS)}, got {marginal!r}")
        if not (relax > 0 and math.isfinite(relax)):
            raise ValueError(f"relax must be a positive finite KL weight, got {relax}")
        if not lam > 0 or not math.isfinite(lam):
            raise ValueError(
                f"lam must be a positive, finite number, got {lam}; the paper uses {DEFAULT_LAM:g}"
            )
        if soft < 0:
            raise ValueError(f"soft must be >= 0 (0: hard labels), got {soft}")
        self.labels = torch.full((n_heads, n), fill, dtype=torch.int64, device=device)  # (H, N)
        self.scalings: list[Tensor | None] = [None] * n_heads
        self.n_updates = 0
        self.lam, self.soft, self.marginal, self.relax = lam, soft, marginal, relax
        self.balance: list[float | None] = [None] * n_heads  # each head's last hard sizes vs its marginal
        self.codes: Tensor | None = None  # (H, N, k) int32
        self.weights: Tensor | None = None  # (H, N, k) float32

    def relabel(self, head: int, logits: Tensor, rows: Tensor | None = None) -> Assignment:
        """Re-assign ``head``'s labels of ``rows`` from ``logits`` (n_r, K_h); returns the solver's result.

        ``rows`` (n_r,) are the global indices of this rank's logits, disjoint between ranks (None: all N
        rows in order, single process); rows that no rank passes keep their labels. The logits buffer may
        be overwritten (solved in place) when it is large.
        """
        n = self.labels.shape[1]
        if rows is None:
            rows = torch.arange(n)
        inplace = self.solves_in_place(logits.shape[1])
        prior = self._estimated_prior(logits) if self.marginal == "estimated" else None
        relax = self.relax if self.marginal == "relaxed" else None
        warm = self.scalings[head]
        result = assign(logits, lam=self.lam, init=warm, inplace=inplace, prior=prior, relax=relax)
        if not result.converged and warm is not None and not inplace:  # a warm start that stalled: cold
            cold = assign(logits, lam=self.lam, prior=prior, relax=relax)
            result = cold if cold.error < result.error else result
        scaling = result.scaling
        if result.converged and result.imbalance > _IMBALANCE_WARN and not inplace:
            result, scaling = self._harden(logits, result, prior, relax)
        full = dist.scatter_rows(result.labels, rows, n).to(self.labels.device)  # (N,), -1: not seen
        seen = full >= 0
        self.labels[head, seen] = full[seen]
        self.balance[head] = result.imbalance
        if self.soft:
            self._keep_soft(head, logits, scaling, rows, seen)
        # an entry of the scaling can underflow to 0 on extreme logits: then solve cold next time
        ok = bool(torch.isfinite(scaling).all() and (scaling > 0).all())
        self.scalings[head] = scaling if ok else None
        if dist.is_main():
            self._warn(head, result)
        return result

    def _harden(self, logits: Tensor, result: Assignment, prior: Tensor | None, relax: float | None):
        """Solve again at larger lambda (a harder plan) and keep the most balanced labels: (result, the
        scaling at this lambda's scale). The harder plan's scaling b^(1/f) is the warm start."""
        best, best_scaling = result, result.scaling
        for factor in _HARDEN:
            harder = assign(logits, lam=self.lam * factor, prior=prior, relax=relax)
            if harder.converged and harder.imbalance < best.imbalance:
                best, best_scaling = harder, harder.scaling.pow(1.0 / factor).clamp_min(1e-300)
            if best.imbalance <= _IMBALANCE_WARN:
                break
        return best, best_scaling

    def _estimated_prior(self, logits: Tensor) -> Tensor:
        """(K,) float64: the mean over all ranks' rows of softmax(logits), half mixed with uniform."""
        k = logits.shape[1]
        total = torch.zeros(k, dtype=torch.float64, device=logits.device)
        for s in range(0, len(logits), 8192):
            total += torch.softmax(logits[s : s + 8192].float(), dim=1).sum(0).double()
        count = torch.tensor([float(len(logits))], dtype=torch.float64, device=logits.device)
        total, count = dist.all_reduce_sum_(total), dist.all_reduce_sum_(count)
        mean = total / count.clamp_min(1.0)
        return _ESTIMATE_MIX * mean / mean.sum() + (1.0 - _ESTIMATE_MIX) / k

    def _warn(self, head: int, result: Assignment) -> None:
        """Warn at any label step whose labels are far from the marginal asked for, or did not converge."""
        step, balance = f"label step {self.n_updates + 1}, head {head}", result.imbalance
        if result.converged and balance > _IMBALANCE_WARN:
            first = " (an untrained network's first labels)" if self.n_updates == 0 else ""
            warnings.warn(
                f"{step}{first}: the largest cluster holds {balance:.1f}x its share under the {self.marginal} "
                "marginal although the solve converged, even at 64x lambda: the logits barely differ between "
                "images (a collapsed or untrained network); if it persists lower the learning rate or use "
                "fewer clusters",
                stacklevel=3,
            )
        if not result.converged:
            warnings.warn(
                f"{step}: the Sinkhorn solve did not converge (marginal error {result.error:.3g} after "
                f"{result.n_iter} passes), so its labels may be unbalanced; lower lam (now {self.lam:g}; the "
                f"paper uses {DEFAULT_LAM:g})",
                stacklevel=3,
            )

    def set_labels(self, rows: Tensor, labels: Tensor) -> None:
        """Set the labels of ``rows`` (b,) under every head to ``labels`` (H, b), e.g. an online objective's
        per-batch codes; one transfer to where the labels live. Scalings and soft codes are left as they are."""
        self.labels[:, rows] = labels.to(self.labels.device)

    def _keep_soft(self, head: int, logits: Tensor, scaling: Tensor, rows: Tensor, seen: Tensor) -> None:
        """Keep the k largest entries of each row of Q for ``rows``: Q[n] is proportional to
        exp(lam * logits[n]) * b, so its top k are those of lam * logits[n] + log b (in chunks)."""
        n_heads, n = self.labels.shape
        k = min(self.soft, logits.shape[1])
        if self.codes is None or self.codes.shape[2] != k:
            self.codes = torch.zeros((n_heads, n, k), dtype=torch.int32, device=self.labels.device)
            self.weights = torch.full((n_heads, n, k), 1.0 / k, device=self.labels.device)
        log_b = scaling.to(logits.device, torch.float32).clamp_min(1e-30).log()  # (K,)
        codes = torch.empty((len(rows), k), dtype=torch.int64, device=logits.device)
        weights = torch.empty((len(rows), k), device=logits.device)
        for s in range(0, len(rows), 8192):
            top = torch.topk(logits[s : s + 8192].float() * self.lam + log_b, k, dim=1)
            codes[s : s + 8192], weights[s : s + 8192] = top.indices, torch.softmax(top.values, dim=1)
        full_codes = dist.scatter_rows(codes, rows, n).to(self.labels.device)  # (N, k), -1: not seen
        full_weights = dist.scatter_rows(weights, rows, n).to(self.labels.device)
        self.codes[head, seen] = full_codes[seen].int()
        self.weights[head, seen] = full_weights[seen]

    def solves_in_place(self, k: int) -> bool:
        """Whether a head of ``k`` clusters is solved in place (overwriting its logits, no second n_r x K
        buffer): when one rank's kernel would exceed 1 GiB, judged from the largest shard so that every rank
        takes the same path through the solver; never with soft targets, which need the logits after it."""
        return not self.soft and -(-self.labels.shape[1] // dist.world_size()) * k * 4 > _INPLACE_BYTES

    def state_dict(self) -> dict:
        """The checkpoint's part of the label state (tensors on the CPU)."""
        state = {
            "labels": self.labels.cpu(),
            "scalings": [None if s is None else s.cpu() for s in self.scalings],
            "label_updates_done": self.n_updates,
        }
        if self.codes is not None:
            state.update(soft_codes=self.codes.cpu(), soft_weights=self.weights.cpu())
        return state

    def load_state_dict(self, state: dict, device: str | torch.device = "cpu") -> None:
        """Restore :meth:`state_dict`; a ValueError when it holds labels of another shape."""
        labels = state["labels"]
        if not isinstance(labels, Tensor) or labels.shape != self.labels.shape:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(
                f"the checkpoint holds labels of shape {shape}, not {tuple(self.labels.shape)} (heads x "
                "images): it belongs to another dataset or number of heads"
            )
        self.labels = labels.to(self.labels.device, torch.int64)
        self.scalings = [None if s is None else s.to(device) for s in state["scalings"]]
        self.n_updates = int(state["label_updates_done"])
        codes, weights = state.get("soft_codes"), state.get("soft_weights")
        if self.soft and isinstance(codes, Tensor) and isinstance(weights, Tensor):
            self.codes = codes.to(self.labels.device, torch.int32)
            self.weights = weights.to(self.labels.device, torch.float32)


def feature_matrix(x: ArrayLike, name: str = "X") -> Tensor:
    """Check and convert a feature matrix: real, finite (N, D) with N, D >= 1 -> float32 (N, D).

    Raises:
        ValueError: naming ``name`` and what to change (shape, emptiness, dtype, NaN or inf).
    """
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be (N, D), a 2-D array with one row per item, got shape {tuple(x.shape)}; reshape it"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one row and one column")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must hold real numbers, got {x.dtype}; cast it to float32")
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf; drop or impute those rows first")
    return x


class _HiddenHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear, (B, D) -> (B, K).

    The hidden activations are scaled by sqrt(2 / hidden_dim) so that, like the standardised input
    features, they have mean squared norm about 1: the same lr and weight_decay then suit both layers.
    """

    def __init__(self, n_features: int, hidden_dim: int, k: int) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(n_features, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU())
        self.out = nn.Linear(hidden_dim, k)
        self.gain = math.sqrt(2.0 / hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.hidden(x) * self.gain)  # (B, K)


class SelfLabeller(ClusterMixin, BaseEstimator):
    """Cluster fixed features into equal-sized clusters with SeLa's self-labelling.

    A scikit-learn estimator (``get_params``, ``set_params``, ``clone`` and pipelines work); like
    ``sklearn.cluster.KMeans``, ``__init__`` only stores the settings and ``fit`` sets the attributes
    that end in an underscore.

    ``fit`` standardises the features, initialises H heads at random, labels the data by Sinkhorn
    from the random heads' logits, then runs ``epochs`` epochs of SGD (momentum 0.9, cosine learning
    rate) on the cross-entropy of each head against its labels. Before the epochs at evenly spaced
    points, and once more after the last epoch, the labels are re-assigned with
    :func:`sela.sinkhorn.assign`, warm-started from the previous solve's scaling.

    Args:
        n_clusters: K for every head, or a list with one K_h per head.
        n_heads: H when ``n_clusters`` is an int; with a list it must be 1 or ``len(n_clusters)``.
        lam: the Sinkhorn lambda: larger follows the logits more closely, smaller balances harder.
        epochs: passes over the data.
        n_label_updates: label re-assignments during training, besides the initial and the final one
            (at most one per epoch: more than ``epochs - 1`` are merged).
        lr: peak SGD learning rate (cosine-annealed to 0).
        batch_size: samples per SGD step.
        weight_decay: L2 coefficient on the head weights; it keeps the logits soft so that the
            boundaries can move towards low-density regions between label updates.
        hidden_dim: None for the paper's linear heads; an int adds a hidden layer of that width
            (Linear, BatchNorm, ReLU) before the linear classifier (not in the paper).
        standardize: scale each feature to zero mean and unit variance (statistics of ``fit``'s X).
            Either way the features are then divided by one global factor that makes their mean
            squared norm 1, so that ``lr`` and ``weight_decay`` do not depend on D or on the units.
        device: where to train.
        seed: seed of the head initialisation and the batch order; a fit is deterministic given it.
        verbose: print one line per label update.

    Attributes (after ``fit``):
        labels_: (N,) int64 numpy labels of the best head, from the final Sinkhorn assignment.
        labels_per_head_: (H, N) int64 numpy labels of every head.
        heads_: ``nn.ModuleList`` of the H trained heads (on the CPU, eval mode), (B, D) -> (B, K_h).
        best_head_: index of the head used for ``labels_`` and ``predict``.
        n_iter_: number of epochs run (always ``epochs``; there is no early stop).
        n_clusters_: list of K_h, one per head.
        mean_, scale_: (D,) float32 tensors; the heads see (X - mean_) / scale_.
        history_: one dict per label assignment (initial, ``n_label_updates``, final) with ``epoch``
            (epochs trained before it), ``loss`` (mean training cross-entropy, summed over heads, over
            the epochs since the previous assignment; NaN for the initial one), ``changed`` (fraction
            of labels changed, per head; 1.0 for the initial one) and ``sinkhorn_iters`` (per head).
    """

    def __init__(
        self,
        n_clusters: int | list[int] = 10,
        *,
        n_heads: int = 1,
        lam: float = DEFAULT_LAM,
        epochs: int = 200,
        n_label_updates: int = 100,
        lr: float = 3.0,
        batch_size: int = 256,
        weight_decay: float = 3e-3,
        hidden_dim: int | None = None,
        standardize: bool = True,
        device: str | torch.device = "cpu",
        seed: int = 0,
        verbose: bool = False,
    ) -> None:
        self.n_clusters = n_clusters
        self.n_heads = n_heads
        self.lam = lam
        self.epochs = epochs
        self.n_label_updates = n_label_updates
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.hidden_dim = hidden_dim
        self.standardize = standardize
        self.device = device
        self.seed = seed
        self.verbose = verbose

    # ------------------------------------------------------------------ validation
    def _cluster_counts(self) -> list[int]:
        ks = [self.n_clusters] if isinstance(self.n_clusters, int) else list(self.n_clusters)
        if not ks or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
            raise ValueError(f"n_clusters must be an int or a list of ints, got {self.n_clusters!r}")
        if min(ks) < 2:
            raise ValueError(f"n_clusters must be at least 2 for every head, got {self.n_clusters!r}")
        if not isinstance(self.n_heads, int) or self.n_heads < 1:
            raise ValueError(f"n_heads must be an int >= 1, got {self.n_heads!r}")
        if isinstance(self.n_clusters, int):
            return ks * self.n_heads
        if self.n_heads not in (1, len(ks)):
            raise ValueError(
                f"n_clusters lists {len(ks)} heads but n_heads={self.n_heads}; "
                "leave n_heads at 1 or set it to len(n_clusters)"
            )
        return ks

    def _check_settings(self) -> None:
        checks = [
            (self.lam > 0, f"lam must be positive, got {self.lam}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.n_label_updates >= 0, f"n_label_updates must be >= 0, got {self.n_label_updates}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.hidden_dim is None or self.hidden_dim >= 1, "hidden_dim must be None or >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _as_features(self, X: ArrayLike, n_features: int | None = None) -> Tensor:
        x = feature_matrix(X)
        if n_features is not None and x.shape[1] != n_features:
            raise ValueError(f"X has {x.shape[1]} features but the labeller was fitted on {n_features}")
        return x

    def _check_fitted(self) -> None:
        if not hasattr(self, "heads_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X) first")

    # ------------------------------------------------------------------ fitting
    def _make_head(self, n_features: int, k: int) -> nn.Module:
        if self.hidden_dim is None:
            return nn.Linear(n_features, k)
        return _HiddenHead(n_features, self.hidden_dim, k)

    @torch.no_grad()
    def _logits(self, heads: nn.ModuleList, x: Tensor, chunk: int = 8192) -> list[Tensor]:
        """H tensors (N, K_h) of the heads' logits over all of x, in eval mode."""
        was_training = heads.training
        heads.eval()
        out = [torch.cat([head(x[s : s + chunk]) for s in range(0, x.shape[0], chunk)]) for head in heads]
        heads.train(was_training)
        return out

    def _standardizer(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(D,) mean and scale such that (x - mean) / scale is standardised (if asked) with mean squared
        norm 1 over the rows."""
        d = x.shape[1]
        if self.standardize:
            mean, scale = feature_moments(x)
        else:
            mean, scale = torch.zeros(d), torch.ones(d)
        # One global factor brings the mean squared norm to 1: lr and weight_decay then mean the same for
        # any feature dimension and scale, and the geometry of the data is unchanged.
        rms = float(((x - mean) / scale).pow(2).sum(dim=1).mean().sqrt())
        return mean, scale * (rms if rms > 0 else 1.0)

    def _relabel(self, heads: nn.ModuleList, x: Tensor, state: LabelState) -> dict:
        """Re-assign every head's labels by Sinkhorn, warm-started; returns what changed."""
        changed, iters = [], []
        for h, logits in enumerate(self._logits(heads, x)):  # (N, K_h) each
            old = state.labels[h].clone()
            res = state.relabel(h, logits)
            changed.append(float((state.labels[h] != old).float().mean()))
            iters.append(int(res.n_iter))
        state.n_updates += 1
        return {"changed": changed, "sinkhorn_iters": iters}

    def _train_epoch(
        self, heads: nn.ModuleList, x: Tensor, labels: list[Tensor], opt, sched, gen: torch.Generator
    ) -> float:
        """One epoch of SGD on the summed cross-entropy of the heads; returns the mean loss."""
        total = 0.0
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        for s in range(0, x.shape[0], self.batch_size):
            idx = perm[s : s + self.batch_size]  # (B,)
            xb = x[idx]  # (B, D)
            loss = sum(F.cross_entropy(head(xb), lab[idx]) for head, lab in zip(heads, labels, strict=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.shape[0]
        return total / x.shape[0]

    def fit(self, X: ArrayLike, y: None = None) -> SelfLabeller:
        """Self-label X (N, D); ``y`` is ignored (present for scikit-learn pipelines). Returns self."""
        ks = self._cluster_counts()
        self._check_settings()
        x = self._as_features(X)
        n, d = x.shape
        if max(ks) > n:
            raise ValueError(
                f"n_clusters={max(ks)} exceeds the {n} samples; pass fewer clusters or more samples"
            )
        device = torch.device(self.device)
        mean, scale = self._standardizer(x)
        x = ((x - mean) / scale).to(device)  # (N, D)

        # Heads and batch order come from the seed; the global generator is left as it was.
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            heads = nn.ModuleList(self._make_head(d, k) for k in ks).to(device)
        opt = torch.optim.SGD(heads.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        n_steps = self.epochs * math.ceil(n / self.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps)
        update_at = even_epochs(self.epochs, self.n_label_updates)  # 0 (the random heads), then evenly
        state = LabelState(len(ks), n, lam=self.lam, fill=-1, device=device)
        labels = state.labels
        history: list[dict] = []
        losses: list[float] = []
        for epoch in range(self.epochs + 1):
            if epoch in update_at or epoch == self.epochs:
                loss = float(np.mean(losses)) if losses else float("nan")
                history.append({"epoch": epoch, "loss": loss, **self._relabel(heads, x, state)})
                losses = []
                if self.verbose:
                    print(f"epoch {epoch:4d}  loss {loss:.4f}  changed {max(history[-1]['changed']):.4f}")
            if epoch < self.epochs:
                losses.append(self._train_epoch(heads, x, labels, opt, sched, gen))

        self.n_clusters_ = ks
        self.mean_, self.scale_ = mean, scale
        self.heads_ = heads.cpu().eval()
        self.labels_per_head_ = labels.cpu().numpy()  # (H, N)
        self.best_head_ = self._select_head(self._logits(self.heads_, x.cpu()), labels)
        self.labels_ = self.labels_per_head_[self.best_head_]
        self.n_iter_ = self.epochs
        self.history_ = history
        return self

    def _select_head(self, logits: list[Tensor], labels: list[Tensor]) -> int:
        """The head whose logits agree best with its own final labels (lowest mean cross-entropy)."""
        losses = [float(F.cross_entropy(lg, lab.cpu())) for lg, lab in zip(logits, labels, strict=True)]
        return int(np.argmin(losses))

    # ------------------------------------------------------------------ inference
    def predict_proba(self, X: ArrayLike, *, head: int | None = None) -> np.ndarray:
        """(N, K) softmax of a head's logits on X (N, D); ``head`` defaults to ``best_head_``."""
        self._check_fitted()
        h = self.best_head_ if head is None else head
        if not 0 <= h < len(self.heads_):
            raise ValueError(f"head must be in 0..{len(self.heads_) - 1}, got {head}")
        x = (self._as_features(X, self.mean_.shape[0]) - self.mean_) / self.scale_  # (N, D)
        return self._logits(self.heads_[h : h + 1], x)[0].softmax(dim=1).numpy()  # (N, K)

    def predict(self, X: ArrayLike, *, head: int | None = None) -> np.ndarray:
        """(N,) int64 cluster of each row of X (N, D): the argmax of the head, without balancing.

        On the training data this can differ slightly from ``labels_``, which are the balanced
        Sinkhorn labels.
        """
        return self.predict_proba(X, head=head).argmax(axis=1)

    def fit_predict(self, X: ArrayLike, y: None = None) -> np.ndarray:
        """Fit on X (N, D) and return ``labels_`` (N,)."""
        return self.fit(X).labels_
