"""Tests for sela.sinkhorn.assign, the balanced label solver.

Notation (as in the solver): N samples, K clusters, P = softmax(logits) row-wise, and the plan
Q = diag(a) P^lam diag(b) with rows summing to 1/N and columns to the prior c (1/K by default). Every
check of a solution recomputes Q from the returned scaling b in float64 (``_plan``), independently of
the solver's float32 kernel. Problems are small (N <= 10^4) so that the file runs in well under a minute.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sela import sinkhorn
from sela.sinkhorn import Assignment, assign, soft_codes

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(n: int, k: int, scale: float = 3.0, seed: int = 0) -> Tensor:
    """(N, K) float32 logits of a random network head: i.i.d. normal with standard deviation ``scale``."""
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


def _plan(logits: Tensor, lam: float, scaling: Tensor) -> Tensor:
    """Q = diag(a) P^lam diag(b) in float64 (N, K), with a chosen so that every row sums to exactly 1/N."""
    x = logits.double()
    log_kernel = lam * (x - x.amax(dim=1, keepdim=True)) + scaling.double().log()  # (N, K)
    return torch.softmax(log_kernel, dim=1) / x.shape[0]


def _uniform(k: int) -> Tensor:
    return torch.full((k,), 1.0 / k, dtype=torch.float64)


def _reference(logits: Tensor, lam: float, prior: Tensor | None = None, tol: float = 1e-10) -> Tensor:
    """The paper's Sinkhorn-Knopp update in plain float64, without acceleration: alternately rescale the
    rows of P^lam to 1/N (a = r / (P^lam b)) and its columns to c (b = c / (P^lam^T a)) until the column
    marginal is within ``tol`` (L1). Returns b normalised to max 1, like ``Assignment.scaling``."""
    x = logits.double()
    n, k = x.shape
    kernel = torch.exp(lam * (x - x.amax(dim=1, keepdim=True)))  # (N, K), P^lam up to row factors
    c = _uniform(k) if prior is None else prior.double()
    b = torch.ones(k, dtype=torch.float64)
    for _ in range(200_000):
        a = (1.0 / n) / (kernel @ b)  # (N,)
        col = b * (kernel.T @ a)  # (K,)
        if float((col - c).abs().sum()) < tol:
            return b / b.max()
        b = c / (kernel.T @ a)
    raise AssertionError("the reference Sinkhorn did not converge")


def _assert_valid(res: Assignment, n: int, k: int, tol: float) -> None:
    """What every result must satisfy, converged or not."""
    assert res.labels.shape == (n,) and res.labels.dtype == torch.int64
    assert ((res.labels >= 0) & (res.labels < k)).all()
    assert res.scaling.shape == (k,) and res.scaling.dtype == torch.float64
    assert torch.isfinite(res.scaling).all() and (res.scaling > 0).all()
    assert float(res.scaling.max()) == 1.0
    assert math.isfinite(res.error) and 0.0 <= res.error <= 2.0 + 1e-9
    assert res.converged == (res.error <= tol)
    assert 1 <= res.n_iter


# --------------------------------------------------------------------------------------------------------
# the solution: marginals, hard labels, agreement with references


@pytest.mark.parametrize(
    ("lam", "scale", "tol", "n", "k"),
    [
        (25.0, 3.0, 1e-3, 2000, 20),
        (25.0, 1.0, 1e-6, 2000, 20),
        (5.0, 1.0, 1e-3, 1000, 7),
        (100.0, 1.0, 1e-3, 3000, 50),
    ],
)
def test_marginals_met_to_tol(lam, scale, tol, n, k):
    x = _logits(n, k, scale)
    res = assign(x, lam=lam, tol=tol)
    _assert_valid(res, n, k, tol)
    assert res.converged
    q = _plan(x, lam, res.scaling)
    torch.testing.assert_close(
        q.sum(dim=1), torch.full((n,), 1.0 / n, dtype=torch.float64), rtol=1e-12, atol=0
    )
    err = float((q.sum(dim=0) - _uniform(k)).abs().sum())
    # the solver measures its error on a float32 kernel; the exact float64 plan agrees to float32 rounding
    assert err <= tol + 1e-6
    assert abs(err - res.error) <= 1e-6
    # the labels are the rows' argmax of that plan (float32 ties aside)
    assert float((q.argmax(dim=1) == res.labels).double().mean()) >= 0.999


def _equipartition_bound(q: Tensor, labels: Tensor, prior: Tensor) -> tuple[Tensor, Tensor]:
    """Per-cluster bound on how far hard cluster sizes n_k can be from N c_k, and the actual distance.

    Derivation. Let Qh = N Q (each row a probability vector) and n_k = #{n : l_n = k} for any labelling l.
    Then n_k - N sum_n Q[n, k] = sum_n (1[l_n = k] - Qh[n, k]) = A_k - B_k with
        A_k = sum_{n : l_n = k} (1 - Qh[n, k]) >= 0   (mass a labelled row puts elsewhere),
        B_k = sum_{n : l_n != k} Qh[n, k] >= 0        (mass other rows put on k),
    so |n_k - N c_k| <= N |sum_n Q[n, k] - c_k| + max(A_k, B_k). Both A and B sum over k to
    S = sum_n (1 - Qh[n, l_n]), the plan's total "softness": the sizes are balanced up to the marginal
    error plus how far the plan is from hard, and for well-conditioned logits (lam times the logit gaps
    large) each max(A_k, B_k) is about S / K, a few percent of N / K (see the test).
    """
    n = q.shape[0]
    qh = q * n  # (N, K)
    onehot = torch.nn.functional.one_hot(labels, q.shape[1]).double()  # (N, K)
    a = ((1 - qh) * onehot).sum(dim=0)  # (K,)
    b = (qh * (1 - onehot)).sum(dim=0)  # (K,)
    bound = n * (q.sum(dim=0) - prior).abs() + torch.maximum(a, b)
    sizes = torch.bincount(labels, minlength=q.shape[1]).double()
    return bound, (sizes - n * prior).abs()


@pytest.mark.parametrize(("scale", "rel"), [(3.0, 0.05), (1.0, 0.10)])
def test_hard_labels_close_to_equipartition(scale, rel):
    n, k, lam = 4000, 20, 25.0
    x = _logits(n, k, scale, seed=1)
    res = assign(x, lam=lam)
    q = _plan(x, lam, res.scaling)
    bound, dev = _equipartition_bound(q, res.labels, _uniform(k))
    assert (dev <= bound + 1e-9).all()  # the derived bound holds for every cluster
    # and it is informative for these logits: each cluster within `rel` of N / K (scale 3 gives ~2 %,
    # scale 1 ~5 %, as the rows of the plan are softer); the actual sizes are closer still
    assert float(bound.max()) <= rel * n / k
    assert float(dev.max()) <= rel * n / k


def test_nonuniform_prior_honoured():
    n, k, lam = 4000, 8, 25.0
    prior = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02], dtype=torch.float64)
    x = _logits(n, k, seed=2)
    res = assign(x, lam=lam, prior=prior)
    assert res.converged
    q = _plan(x, lam, res.scaling)
    assert float((q.sum(dim=0) - prior).abs().sum()) <= 1e-3 + 1e-6
    bound, dev = _equipartition_bound(q, res.labels, prior)
    assert (dev <= bound + 1e-9).all()
    # sizes follow the prior, not equipartition: within 5 % of N c_k for every cluster (the smallest is 80)
    assert (dev <= 0.05 * n * prior).all()


def test_agrees_with_plain_float64_sinkhorn():
    for lam, scale, prior in [
        (25.0, 2.0, None),
        (5.0, 1.0, None),
        (25.0, 1.0, torch.linspace(1, 2, 10, dtype=torch.float64)),
    ]:
        if prior is not None:
            prior = prior / prior.sum()
        x = _logits(400, 10, scale, seed=3)
        res = assign(x, lam=lam, prior=prior, tol=1e-7, max_iter=5000)
        b = _reference(x, lam, prior)
        torch.testing.assert_close(res.scaling, b, rtol=1e-4, atol=0)
        assert torch.equal(res.labels, _plan(x, lam, b).argmax(dim=1))


@pytest.mark.parametrize(("lam", "scale"), [(25.0, 1.0), (25.0, 3.0), (5.0, 1.0), (100.0, 0.5)])
def test_agrees_with_pot_log_sinkhorn(lam, scale):
    n, k = 300, 10
    x = _logits(n, k, scale, seed=4)
    cost = -torch.log_softmax(x.double(), dim=1).numpy()  # M = -log p, so exp(-M / reg) = p^lam
    plan_pot = ot.sinkhorn(
        np.full(n, 1.0 / n), np.full(k, 1.0 / k), cost, reg=1.0 / lam, method="sinkhorn_log",
        stopThr=1e-11, numItermax=100_000,
    )  # fmt: skip
    res = assign(x, lam=lam, tol=1e-6, max_iter=5000)
    q = _plan(x, lam, res.scaling).numpy()
    assert np.abs(q - plan_pot).max() * n < 1e-4  # entries relative to a row's total 1/N
    assert (plan_pot.argmax(axis=1) == res.labels.numpy()).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_lam_approaches_exact_balanced_assignment(seed):
    # N = K m samples: the exact balanced assignment is a linear assignment with each column repeated m times
    k, m = 4, 6
    n = k * m
    x = _logits(n, k, 1.0, seed=seed)
    cost = -torch.log_softmax(x.double(), dim=1)  # (N, K), -log p
    rows, cols = linear_sum_assignment(np.repeat(cost.numpy(), m, axis=1))
    exact = torch.from_numpy(cols // m)[np.argsort(rows)]
    opt = float(cost.gather(1, exact[:, None]).sum())
    plan_costs = []
    for lam in (1.0, 3.0, 10.0, 30.0, 100.0):
        res = assign(x, lam=lam, tol=1e-7, max_iter=20_000)
        assert res.converged, (lam, res)
        plan_costs.append(float((_plan(x, lam, res.scaling) * cost).sum()) * n)
        # entropic OT: opt <= N <Q_lam, C> <= opt + N log(K) / lam (H(Q) lies in [log N, log N + log K]);
        # slack 1e-4 covers the plan's marginal error (1e-7 times N max C)
        assert opt - 1e-4 <= plan_costs[-1] <= opt + n * math.log(k) / lam + 1e-4
    # the transport cost decreases monotonically as the regularisation 1/lam shrinks ...
    assert all(a >= b - 1e-4 for a, b in zip(plan_costs, plan_costs[1:], strict=False))
    # ... and at lam = 100 the hard labels are the exact balanced assignment (a generic problem: unique)
    assert torch.equal(res.labels, exact)
    assert float(cost.gather(1, res.labels[:, None]).sum()) == pytest.approx(opt, abs=1e-9)


# --------------------------------------------------------------------------------------------------------
# the stabilised float32 path: hard columns, huge magnitudes, collapsed networks, huge lam


def _pot_log(x: Tensor, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """POT's log-domain Sinkhorn on cost -log p: (plan (N, K), log v (K,)), exp(-M / reg) = p^lam."""
    n, k = x.shape
    cost = -torch.log_softmax(x.double(), dim=1).numpy()
    plan, log = ot.bregman.sinkhorn_log(
        np.full(n, 1.0 / n),
        np.full(k, 1.0 / k),
        cost,
        reg=1.0 / lam,
        stopThr=1e-11,
        numItermax=100_000,
        log=True,
    )
    return plan, log["log_v"]


def _stabilised_cases() -> dict[str, tuple[Tensor, float]]:
    g = torch.Generator().manual_seed(20)
    n, k = 300, 10
    # a cluster every sample puts 10-11 logits below its best: its kernel column is exp(-250) < 1e-38
    under = torch.randn(n, k, generator=g)
    under[:, 0] = under.amax(dim=1) - 10.0 - torch.rand(n, generator=g)
    # a collapsed network: every sample prefers cluster 0 by ~10 logits, all others underflow
    collapsed = torch.randn(n, k, generator=g) * 0.5
    collapsed[:, 0] += 10.0
    return {
        "underflowing_column": (under, 25.0),
        "collapsed": (collapsed, 25.0),
        "nearly_identical_rows": (
            torch.randn(1, k, generator=g) * 3 + 1e-2 * torch.randn(n, k, generator=g),
            25.0,
        ),
        "magnitude_1e4": (torch.randn(n, k, generator=g) * 1e4, 5e-4),  # lam * logits of std 5
        "offset_1e4": (torch.randn(n, k, generator=g) * 2 + 1e4, 25.0),
    }


@pytest.mark.parametrize("name", list(_stabilised_cases()))
def test_stabilised_path_matches_pot_labels_and_scaling(name):
    x, lam = _stabilised_cases()[name]
    n, k = x.shape
    res = assign(x, lam=lam, tol=1e-6, max_iter=5000)
    _assert_valid(res, n, k, 1e-6)
    assert res.converged and not res.log_domain  # float32 throughout: no float64 fallback
    plan_pot, log_v = _pot_log(x, lam)
    # labels and plan as POT's
    assert (plan_pot.argmax(axis=1) == res.labels.numpy()).all()
    assert np.abs(_plan(x, lam, res.scaling).numpy() - plan_pot).max() * n < 1e-4
    # the scaling is POT's column potential v = exp(log_v), up to a constant factor
    log_b = res.scaling.log().numpy()
    np.testing.assert_allclose(log_b - log_b.max(), log_v - log_v.max(), atol=1e-3, rtol=0)


def test_underflowing_columns_are_absorbed_not_sent_to_log_domain():
    x, lam = _stabilised_cases()["underflowing_column"]
    res = assign(x, lam=lam)
    assert res.converged and not res.log_domain and res.n_absorb >= 1
    assert float(res.scaling[0]) > 1e30 * float(res.scaling[1:].min())  # b spans more than float32 can
    # in place (no logits to rebuild from): from a cold start the kernel is built around the scaling of
    # a subsample's solve (every 8th row), the same labels
    x = torch.cat([x] * 7) + 0.1 * torch.randn(
        7 * x.shape[0], x.shape[1], generator=torch.Generator().manual_seed(26)
    )
    res = assign(x, lam=lam, tol=1e-5)
    inplace = assign(x.clone(), lam=lam, inplace=True, tol=1e-5)
    assert inplace.converged and res.converged
    assert float((inplace.labels == res.labels).double().mean()) >= 0.999


def test_inplace_cold_start_counts_the_subsample_within_max_iter():
    x = _logits(6400, 10, seed=27)  # >= 8 rows per cluster in every 8th row: the subsample start is used
    for max_iter in (2, 5, 1000):
        res = assign(x.clone(), inplace=True, max_iter=max_iter)
        _assert_valid(res, 6400, 10, 1e-3)
        assert res.n_iter <= max_iter
    assert res.converged


@pytest.mark.parametrize("seed", [0, 1])
def test_huge_lam_converges_to_the_exact_balanced_assignment(seed):
    # lam = 1e6: plain Sinkhorn would need ~1e6 passes; the continuation in lam reaches the exact balanced
    # assignment (a linear assignment with each column repeated m times) within the default max_iter
    k, m = 6, 20
    n = k * m
    x = _logits(n, k, 3.0, seed=seed)
    cost = -torch.log_softmax(x.double(), dim=1)
    rows, cols = linear_sum_assignment(np.repeat(cost.numpy(), m, axis=1))
    exact = torch.from_numpy(cols // m)[np.argsort(rows)]
    res = assign(x, lam=1e6)
    _assert_valid(res, n, k, 1e-3)
    assert res.converged and res.imbalance == pytest.approx(1.0)
    assert torch.equal(res.labels, exact)


def test_huge_lam_from_a_warm_start_still_converges():
    x = _logits(2000, 20, 3.0, seed=21)
    warm = assign(x, lam=25.0).scaling  # a scaling for another lam: a poor start at lam = 1e4
    res = assign(x, lam=1e4, init=warm)
    assert res.converged and res.imbalance < 1.1


# --------------------------------------------------------------------------------------------------------
# balance of the hard labels: imbalance, empty clusters


def test_imbalance_reports_degenerate_logits():
    n, k = 1000, 10
    x = _logits(n, k, seed=22)
    spike = x.clone()
    spike[:, 3] = 1e30
    degenerate = {"identical_rows": x[:1].repeat(n, 1), "all_zeros": torch.zeros(n, k), "column_1e30": spike}
    for name, logits in degenerate.items():
        res = assign(logits)
        # the plan is balanced (flat rows), so error is ~0 and converged, but the hard labels are not:
        # K - 1 clusters get one sample each (the repair), the rest share one cluster
        assert res.converged, name
        assert res.imbalance == pytest.approx((n - k + 1) / (n / k)), name
        assert res.n_repaired == k - 1 and int(torch.bincount(res.labels, minlength=k).min()) == 1, name
    res = assign(x)  # informative logits: balanced to a few percent
    sizes = torch.bincount(res.labels, minlength=k).double()
    assert res.imbalance == pytest.approx(float(sizes.max()) / (n / k)) and res.imbalance < 1.1
    assert res.n_repaired == 0


@pytest.mark.parametrize(("n", "k"), [(100, 100), (1000, 1000), (200, 100), (300, 100)])
def test_no_empty_cluster_when_n_is_a_small_multiple_of_k(n, k):
    x = _logits(n, k, seed=23)
    res = assign(x)
    sizes = torch.bincount(res.labels, minlength=k)
    assert int(sizes.min()) >= 1
    if n == k:
        assert torch.equal(sizes, torch.ones(k, dtype=torch.long))  # a permutation
    # the repair moved only the samples it reports; every other label is the plan's argmax
    argmax = _plan(x, 25.0, res.scaling).argmax(dim=1)
    assert int((argmax != res.labels).sum()) <= res.n_repaired
    assert res.imbalance == pytest.approx(float(sizes.max()) / (n / k))


def test_repair_keeps_argmax_labels_elsewhere_and_is_cheap():
    # N == K: the argmax leaves some clusters empty; each is filled by one sample of a cluster of >= 2
    x = _logits(100, 100, seed=1)
    res = assign(x)
    argmax = _plan(x, 25.0, res.scaling).argmax(dim=1)
    moved = argmax != res.labels
    assert int(moved.sum()) == res.n_repaired >= 1
    empty_before = set(range(100)) - set(argmax.tolist())
    assert set(res.labels[moved].tolist()) == empty_before


# --------------------------------------------------------------------------------------------------------
# threads


def test_threads_give_the_same_solution(monkeypatch):
    # the column sums are added in another order (per block), so the iterates differ by float rounding
    monkeypatch.setattr(sinkhorn, "_MIN_ELEMS_PER_THREAD", 0)  # blocks even for this small problem
    x = _logits(5000, 40, seed=25)
    one = assign(x, threads=1, tol=1e-6)
    two = assign(x, threads=2, tol=1e-6)
    torch.testing.assert_close(two.scaling, one.scaling, rtol=1e-3, atol=0)
    assert torch.equal(two.labels, one.labels)
    assert torch.get_num_threads() == 1  # the fixture's setting is restored


# --------------------------------------------------------------------------------------------------------
# symmetries and warm starts


def test_row_permutation_permutes_labels():
    x = _logits(1500, 12, seed=5)
    perm = torch.randperm(1500, generator=torch.Generator().manual_seed(0))
    a = assign(x, tol=1e-6)
    b = assign(x[perm], tol=1e-6)
    # summation order changes rounding only; to tol 1e-6 the scaling moves < 1e-3 relative
    torch.testing.assert_close(b.scaling, a.scaling, rtol=1e-3, atol=0)
    assert torch.equal(b.labels, a.labels[perm])


def test_column_permutation_permutes_labels_and_scaling():
    x = _logits(1500, 12, seed=6)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    prior = torch.linspace(1, 2, 12, dtype=torch.float64)
    prior /= prior.sum()
    a = assign(x, prior=prior, tol=1e-6)
    b = assign(x[:, perm], prior=prior[perm], tol=1e-6)
    torch.testing.assert_close(b.scaling, a.scaling[perm], rtol=1e-3, atol=0)
    assert torch.equal(perm[b.labels], a.labels)


def test_warm_start_takes_far_fewer_passes():
    x = _logits(3000, 50, seed=7)
    cold = assign(x)
    # restarting from its own solution: the first pass already meets tol
    again = assign(x, init=cold.scaling)
    assert again.n_iter == 1 and again.converged
    assert torch.equal(again.labels, cold.labels)
    # the next epoch's logits, slightly moved: fewer passes than a cold start (which Anderson acceleration
    # already keeps at ~15 here), the fewer the smaller the move (3 vs 14 and 6 vs 14 at the time of writing)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for eps, factor in ((0.01, 3), (0.05, 1.5)):
        x2 = x + eps * noise
        cold2 = assign(x2)
        warm2 = assign(x2, init=cold.scaling)
        assert warm2.converged and cold2.converged
        assert warm2.n_iter * factor <= cold2.n_iter, (eps, warm2.n_iter, cold2.n_iter)
        assert float((warm2.labels == cold2.labels).double().mean()) >= 0.99


# --------------------------------------------------------------------------------------------------------
# extreme inputs, storage, dtypes


def _extreme_cases(n: int, k: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(8)
    first = torch.zeros(n, dtype=torch.long)
    spread = torch.arange(n) % k
    onehot = torch.nn.functional.one_hot
    return {
        "uniform_1e4": (torch.rand(n, k, generator=g) * 2 - 1) * 1e4,
        "normal_1e4": torch.randn(n, k, generator=g) * 1e4,
        "all_equal": torch.zeros(n, k),
        "large_offset": torch.randn(n, k, generator=g) + 1e4,
        "onehot_same": onehot(first, k).float(),
        "onehot_same_1e4": onehot(first, k).float() * 1e4,
        "onehot_spread": onehot(spread, k).float(),
        "onehot_spread_1e4": onehot(spread, k).float() * 1e4,
        "onehot_two_cols_1e4": onehot(spread % 2, k).float() * 1e4,
    }


@pytest.mark.parametrize("lam", [1.0, 25.0, 100.0])
@pytest.mark.parametrize("name", list(_extreme_cases(2, 2)))
def test_extreme_logits_give_valid_results(name, lam):
    n, k = 200, 8
    x = _extreme_cases(n, k)[name]
    res = assign(x, lam=lam)
    # valid, not necessarily converged: at lam times a logit range of ~1e5 (the +-1e4 cases) entropic
    # Sinkhorn would need ~1e5 passes; the solver stops when 50 passes bring no progress and says so
    _assert_valid(res, n, k, 1e-3)
    # the returned scaling is always a valid warm start
    _assert_valid(assign(x, lam=lam, init=res.scaling), n, k, 1e-3)
    if name.startswith("onehot_spread"):  # already balanced: every sample keeps its own cluster
        assert res.converged and torch.equal(res.labels, torch.arange(n) % k)


def test_wide_scaling_reports_the_true_error():
    # lam = 100 on these logits needs a scaling spanning more than e^87: beyond the first float32 kernel,
    # which absorbs the scaling (stabilised Sinkhorn) instead of reporting its own (understated) error
    n, k, lam = 2000, 50, 100.0
    x = _logits(n, k, seed=0)
    res = assign(x, lam=lam)
    q = _plan(x, lam, res.scaling)
    err = float((q.sum(dim=0) - _uniform(k)).abs().sum())
    assert float(res.scaling.log().min()) < -87
    assert not res.log_domain and res.n_absorb >= 1
    assert res.converged and abs(err - res.error) <= 1e-6


def test_inplace_matches_and_overwrites():
    x = _logits(2000, 30, seed=9)
    # from the same start both build the same kernel and follow the same iterates (a cold start in place
    # first solves a subsample, see test_underflowing_columns_are_absorbed_not_sent_to_log_domain)
    ones = torch.ones(30)
    ref = assign(x, init=ones)
    buf = x.clone()
    res = assign(buf, inplace=True, init=ones)
    assert torch.equal(res.labels, ref.labels) and torch.equal(res.scaling, ref.scaling)
    assert res.n_iter == ref.n_iter
    cold = assign(x.clone(), inplace=True)
    assert cold.converged and float((cold.labels == ref.labels).double().mean()) >= 0.99
    # the buffer now holds the kernel P^lam, row-shifted: entries in (0, 1], a 1 in every row
    assert not torch.equal(buf, x)
    assert (buf > 0).all() and (buf <= 1).all() and (buf.amax(dim=1) == 1).all()
    for dtype in (torch.bfloat16, torch.float64):
        res = assign(x.to(dtype), inplace=True)
        assert float((res.labels == ref.labels).double().mean()) >= 0.99, dtype


def test_bfloat16_storage_agrees():
    x = _logits(5000, 100, seed=10)
    ref = assign(x)
    res = assign(x, storage_dtype=torch.bfloat16)
    assert res.converged
    assert float((res.labels == ref.labels).double().mean()) >= 0.99


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    x = _logits(2000, 30, seed=11).to(dtype)
    res = assign(x)
    _assert_valid(res, 2000, 30, 1e-3)
    # the kernel is built in float32 from the given values: the same problem as their float32 copy
    ref = assign(x.float())
    assert torch.equal(res.labels, ref.labels)


@pytest.fixture(scope="module")
def big_k_logits() -> Tensor:
    return _logits(10_000, 10_000, 1.0, seed=12)  # 400 MB


@pytest.mark.parametrize(("lam", "max_iter"), [(1.0, 1000), (25.0, 1000), (100.0, 30)])
def test_ten_thousand_clusters_float32_stays_finite(big_k_logits, lam, max_iter):
    # in place (as the trainer runs large problems): no second N x K buffer, and no log-domain fallback,
    # so this exercises the float32 kernel alone at its widest; lam = 100 is capped to keep the test short
    n, k = big_k_logits.shape
    res = assign(big_k_logits.clone(), lam=lam, inplace=True, max_iter=max_iter)
    _assert_valid(res, n, k, 1e-3)
    assert not res.log_domain
    if max_iter == 1000:
        assert res.converged
    assert int(torch.bincount(res.labels, minlength=k).max()) <= 10  # N / K = 1 sample per cluster


# --------------------------------------------------------------------------------------------------------
# bad inputs


def _bad_inputs() -> list[tuple[str, Tensor, dict, str]]:
    x = _logits(50, 5)
    nan, inf = x.clone(), x.clone()
    nan[3, 2] = float("nan")
    inf[7, 1] = -float("inf")
    ok_prior = _uniform(5)
    return [
        ("nan", nan, {}, "NaN or inf"),
        ("inf", inf, {}, "NaN or inf"),
        ("one_cluster", x[:, :1], {}, "at least K = 2"),
        ("fewer_samples", x[:4], {}, "at least as many samples"),
        ("one_d", x[0], {}, "2-D"),
        ("three_d", x[None], {}, "2-D"),
        ("integer", x.long(), {}, "float tensor"),
        ("lam_zero", x, {"lam": 0.0}, "lam must be"),
        ("lam_negative", x, {"lam": -1.0}, "lam must be"),
        ("lam_nan", x, {"lam": float("nan")}, "lam must be"),
        ("lam_inf", x, {"lam": float("inf")}, "lam must be"),
        ("tol_zero", x, {"tol": 0.0}, "tol > 0"),
        ("tol_nan", x, {"tol": float("nan")}, "tol > 0"),
        ("float64_beyond_float32", x.double() * 1e300, {}, "float32's range"),
        ("threads_zero", x, {"threads": 0}, "threads must be >= 1"),
        ("max_iter_zero", x, {"max_iter": 0}, "max_iter >= 1"),
        ("prior_length", x, {"prior": _uniform(4)}, "prior must have K = 5"),
        ("prior_negative", x, {"prior": torch.tensor([0.5, 0.5, 0.2, -0.1, -0.1])}, "strictly positive"),
        ("prior_zero", x, {"prior": torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])}, "strictly positive"),
        ("prior_nan", x, {"prior": torch.tensor([0.5, 0.5, float("nan"), 0.0, 0.0])}, "finite"),
        ("prior_sum", x, {"prior": ok_prior * 2}, "sum to 1"),
        ("init_length", x, {"init": torch.ones(4)}, "init must be a scaling of K = 5"),
        ("init_zero", x, {"init": torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])}, "strictly positive"),
        ("init_negative", x, {"init": -torch.ones(5)}, "strictly positive"),
        ("init_inf", x, {"init": torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0])}, "finite"),
        ("float16_inplace", x.half(), {"inplace": True}, "bfloat16"),
        ("float16_storage", x, {"storage_dtype": torch.float16}, "bfloat16"),
        ("distributed_uninitialised", x, {"distributed": True}, "not initialised"),
    ]


@pytest.mark.parametrize(
    ("logits", "kwargs", "match"), [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()]
)
def test_bad_inputs_raise_value_error(logits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign(logits, **kwargs)


def test_soft_codes_match_pot_sinkhorn_and_are_soft_and_balanced():
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=1)  # cosines
    codes = soft_codes(scores, epsilon=0.05, n_iter=200)
    assert torch.allclose(codes.sum(1), torch.ones(64), atol=1e-5)
    assert torch.allclose(codes.sum(0), torch.full((8,), 64 / 8), atol=1e-2)  # equipartition
    # the same plan as POT's balanced Sinkhorn with cost -scores, times B
    a, b = np.full(64, 1 / 64), np.full(8, 1 / 8)
    ref = ot.sinkhorn(a, b, -scores.double().numpy(), reg=0.05, method="sinkhorn_log", numItermax=2000)
    assert np.allclose(codes.double().numpy() / 64, ref, atol=1e-4)
    few = soft_codes(scores, epsilon=0.05)  # SwAV's 3 rounds: rows exact, columns roughly balanced
    assert torch.allclose(few.sum(1), torch.ones(64), atol=1e-5)
    assert few.sum(0).max() < 2 * 64 / 8 and few.max() < 1  # soft, not one-hot


def test_soft_codes_are_shift_invariant_and_survive_large_scores():
    scores = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(soft_codes(scores), soft_codes(scores + 7.0), atol=1e-5)
    big = soft_codes(scores * 1e3, epsilon=0.05)
    assert torch.isfinite(big).all() and torch.allclose(big.sum(1), torch.ones(32), atol=1e-4)


@pytest.mark.parametrize("kw", [{"epsilon": 0.0}, {"n_iter": 0}])
def test_soft_codes_reject_bad_settings(kw):
    with pytest.raises(ValueError):
        soft_codes(torch.randn(4, 3), **kw)
    with pytest.raises(ValueError, match="K >= 2"):
        soft_codes(torch.randn(4, 1))


# ----------------------------------------------------------------------------------------------------
# the semi-relaxed marginal (relax=rho)


def _skewed_logits(seed: int = 0, k: int = 8) -> Tensor:
    """(N, K) log-probabilities of samples drawn from K Gaussian clusters of very unequal sizes."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, 16, generator=gen)
    sizes = [int(500 * 0.6**i) + 20 for i in range(k)]
    x = torch.cat([centers[i] + 0.8 * torch.randn(s, 16, generator=gen) for i, s in enumerate(sizes)])
    return torch.log_softmax(x @ centers.T / 2, dim=1)


def _relaxed_objective(plan: np.ndarray, cost: np.ndarray, lam: float, rho: float) -> float:
    plan = plan / plan.sum()
    col = plan.sum(0)
    prior = np.full(plan.shape[1], 1 / plan.shape[1])
    return float(
        (plan * cost).sum()
        + (plan * np.log(plan + 1e-300)).sum() / lam
        + rho * (col * np.log(col / prior)).sum()
    )


@pytest.mark.parametrize("rho", [0.05, 0.3, 1.0, 10.0])
def test_relaxed_marginal_matches_pot_semi_relaxed_solver(rho):
    """POT's unbalanced Sinkhorn with an exact row marginal (reg_m = (inf, rho)) and the entropy as
    regulariser solves the same problem: the same column marginal, plan, objective and labels."""
    logits = _skewed_logits()
    n, k = logits.shape
    lam = 25.0
    res = assign(logits.clone(), lam=lam, relax=rho, tol=1e-8)
    assert res.converged
    cost = (-logits).double().numpy()
    with pytest.warns(UserWarning):  # POT: "the matrix c is overwritten by the one matrix" (entropy)
        ref = ot.unbalanced.sinkhorn_unbalanced(
            np.full(n, 1 / n), np.full(k, 1 / k), cost, 1 / lam, (math.inf, rho),
            reg_type="entropy", method="sinkhorn", stopThr=1e-13, numItermax=200_000,
        )  # fmt: skip
    np.testing.assert_allclose(res.marginal.numpy(), ref.sum(0) / ref.sum(), atol=2e-6)
    log_q = lam * logits.double() + res.scaling.log()
    plan = (log_q - torch.logsumexp(log_q, dim=1, keepdim=True)).exp().numpy() / n  # rows 1 / N
    np.testing.assert_allclose(plan, ref, atol=1e-6 / n, rtol=1e-4)
    assert _relaxed_objective(plan, cost, lam, rho) == pytest.approx(
        _relaxed_objective(ref, cost, lam, rho), abs=1e-9
    )
    assert (res.labels.numpy() == ref.argmax(1)).mean() > 0.999


def test_relaxed_marginal_moves_between_argmax_and_equipartition():
    """Small rho: cluster sizes follow the data (close to the argmax sizes); large rho: the equipartition."""
    logits = _skewed_logits(1)
    n, k = logits.shape
    argmax_sizes = torch.bincount(logits.argmax(1), minlength=k).double()
    sizes = {
        rho: torch.bincount(assign(logits.clone(), relax=rho).labels, minlength=k).double()
        for rho in (0.01, 1.0, 1000.0)
    }
    assert (sizes[0.01] - argmax_sizes).abs().sum() < 0.05 * n
    assert float(sizes[1000.0].max()) < 1.1 * n / k
    spread = [float(s.max() / s.min()) for s in sizes.values()]
    assert spread[0] > spread[1] > spread[2]
    balanced = assign(logits.clone())
    assert balanced.marginal is not None and torch.allclose(
        balanced.marginal, torch.full((k,), 1 / k, dtype=torch.float64)
    )


def test_relaxed_marginal_warm_start_and_bad_values():
    logits = _skewed_logits(2)
    cold = assign(logits.clone(), relax=0.5, tol=1e-4)
    warm = assign(logits.clone(), relax=0.5, tol=1e-4, init=cold.scaling)
    assert warm.n_iter < cold.n_iter / 2
    assert torch.equal(warm.labels, cold.labels) or (warm.labels != cold.labels).float().mean() < 1e-3
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="relax"):
            assign(logits.clone(), relax=bad)


def test_soft_codes_relaxed_columns_follow_the_batch():
    """Relaxed per-batch codes: columns that most rows prefer keep more mass; a huge rho is the equal split."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(256, 8, generator=gen) * 0.1
    scores[:200, 0] += 0.5  # most of the batch prefers cluster 0
    equal = soft_codes(scores)
    relaxed = soft_codes(scores, relax=0.01)
    assert float(relaxed.sum(0)[0]) > 2 * float(equal.sum(0)[0])
    torch.testing.assert_close(soft_codes(scores, relax=1e9), equal, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(relaxed.sum(1), torch.ones(256))
    with pytest.raises(ValueError, match="relax"):
        soft_codes(scores, relax=-1.0)
