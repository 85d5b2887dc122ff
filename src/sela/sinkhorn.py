"""The label solver: balanced label assignment by Sinkhorn-Knopp matrix scaling.

This is the optimal-transport step of SeLa (Asano, Rupprecht, Vedaldi, ICLR 2020, Sec. 3.1, eq. 6-8).
Given a head's logits for N samples over K clusters and P = softmax(logits) row-wise, it finds the plan
Q in the transport polytope

    U(r, c) = {Q >= 0 : Q 1 = r, Q^T 1 = c},   r = 1/N (rows),   c = prior (columns, default 1/K)

that minimises <Q, -log P> - (1/lambda) H(Q). The solution has the form Q = diag(a) P^lambda diag(b)
(paper's alpha, beta); each sample's hard label is argmax_k Q[n, k] = argmax_k P[n, k]^lambda b[k], which
depends on b alone. Paper symbols map to the code as follows:

    paper          code
    P^lambda       ``kernel`` (stored stabilised: exp(lambda logits + beta_hat - alpha_n), see below)
    alpha, beta    ``a`` (rows, recomputed every pass, never stored), ``b = exp(beta)`` (K-vector)
    r, c           1/N, ``prior``
    lambda         ``lam``

What makes it fast, compared with the original alternating updates of r and c in float64
(docs/solver.md has the measurements):

* **one pass per iteration**: rows are visited in cache-sized chunks; for each chunk the row scaling
  a = 1 / (P^lambda b) and its contribution P^lambda^T a to the column marginal are computed while the
  chunk is in cache, so each iteration reads the N x K buffer once;
* **one float32 path, stabilised** (Schmitzer 2019): the kernel stores P^lambda with a column scaling
  beta_hat absorbed and each row shifted so that its largest entry is 1, clamped at exp(-87) (the
  smallest normal float32: no denormals, no row can vanish). A pass only applies b = exp(beta - beta_hat);
  when that spans more than e^60, the kernel is rebuilt around beta (an "absorption"), so clusters far
  from every sample, logits of magnitude 1e4 or a collapsed network stay in float32;
* **Anderson acceleration** of the dual update on log b (Walker and Ni 2011; applied to Sinkhorn by e.g.
  Chizat 2020), safeguarded by falling back to a plain Sinkhorn step whenever the error grows: it
  needs 5-15 passes where plain Sinkhorn needs 30-300;
* **continuation in lambda** (epsilon scaling) for large lambda from a cold start: 25, 100, 400, ...;
* **threads as row blocks**: a pass hands a few contiguous row blocks to each thread once, and every
  torch op runs single-threaded, so a busy machine cannot stall it at hundreds of barriers.

The float64 log domain (log-sum-exp over chunks, exact but ~4x slower a pass) remains the last resort,
for tolerances below float32's resolution (~1e-7).

With ``torch.distributed`` initialised, each rank passes its own rows; the solver all-reduces the
K-sized column marginal (and the sample count) each pass, so all ranks follow the same b and the result
equals the single-process solve of all rows.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_LAM", "Assignment", "assign", "marginal_error", "relaxed_target"]

DEFAULT_LAM = 25.0  # the paper's lambda (Asano et al. 2020, Sec. 4); every caller reads this default

# exp(-87) is just above the smallest normal float32 (1.18e-38).
_LOG_FLOOR = -87.0
# Absorb the scaling into the kernel when log b spans more than this relative to the kernel's own
# shift: a clamped entry (e^-87 instead of smaller) then weighs at most K e^(60 - 87) < 2e-8 K of its
# row's mass, and the row scaling a = 1 / (K b) stays below e^60, far from float32's e^88.7.
_SPAN = 60.0
# Building the kernel in float32 rounds each exponent lam (x - m) + beta_hat - alpha to eps times the
# magnitude of its terms; for the entries that matter (exponent >= -87) that is at most ~87 plus the span
# of beta_hat. Beyond this span (relative error of kernel entries > 6e-5) it is built in float64.
_EXACT_SPAN = 400.0
_CHUNK_BYTES_CPU = 1 << 20  # ~1 MiB chunks stay in L2 cache on CPU
_CHUNK_ELEMS_CUDA = 1 << 28  # GPUs are bandwidth-bound: few large chunks
_ANDERSON_MEMORY = 5
_ANDERSON_REG = 1e-10
_RESTART_FACTOR = 2.0  # an Anderson step may raise the error a little, but not double it
_PROGRESS, _STALL_PASSES = 0.99, 50  # stop when 50 passes have not lowered the error by 1 %
_COARSE_STRIDE, _COARSE_ROWS = 8, 8  # cold start from every 8th row, if that leaves >= 8 rows a cluster
_MAX_THREADS = 8  # the passes are memory-bound: more threads than this add little
# below this many kernel entries per thread (a pass shorter than a few scheduler time slices), the
# synchronisation per pass costs more than a second thread saves on a busy machine: one thread
_MIN_ELEMS_PER_THREAD = 1 << 23
_BLOCKS_PER_THREAD = 4
_LAM_START, _LAM_FACTOR = 25.0, 4.0  # continuation in lam (epsilon scaling) for a stalled large lam


@dataclass(frozen=True)
class Assignment:
    """Result of :func:`assign`.

    Attributes:
        labels: int64 (N,), hard label of each (local) sample: argmax_k Q[n, k], except that a cluster
            the argmax leaves empty receives the sample that loses least by moving to it (see
            :func:`assign`, "Balance"), so that with N >= K no cluster is empty.
        scaling: float64 (K,), the column scaling b of Q = diag(a) P^lambda diag(b), normalised to max 1.
            It fixes the labels; pass it as ``init=`` to warm-start the next solve.
        n_iter: number of passes over the N x K kernel (each pass evaluates one b).
        error: L1 distance between the column marginal of the row-normalised plan and the prior,
            sum_k |sum_n Q[n, k] - c_k| with Q's rows summing to exactly 1/N (0 means an exact solution;
            2 is the largest possible value).
        converged: whether ``error <= tol`` was reached within ``max_iter`` passes.
        imbalance: balance of the hard labels: max_k n_k / (N c_k), the largest cluster's size over its
            share under the marginal solved to (the prior; with ``relax``, :attr:`marginal`; n_k samples
            labelled k, over all ranks). 1.0 is an exact equipartition;
            K means every sample in one cluster (uniform prior). A converged plan of informative logits
            gives about 1.05-1.5; degenerate logits (identical rows, a collapsed network) give ~K even
            with ``error`` ~0, since the plan is then balanced but flat: callers should warn above ~2.
        log_domain: whether the exact float64 log-domain path was used (the last resort, when the
            float32 kernel could not reach ``tol``).
        n_absorb: how often the scaling was absorbed into the float32 kernel (each costs about 4
            passes' time: the kernel is rebuilt from the logits); 0 when the first kernel sufficed.
        n_repaired: samples moved off their argmax cluster to fill clusters it left empty.
        marginal: float64 (K,), the column marginal the plan was solved to: the prior itself when the
            marginal is exact (``relax=None``); with ``relax``, the cluster proportions the relaxed
            problem chose (None only for results built by hand).
    """

    labels: Tensor
    scaling: Tensor
    n_iter: int
    error: float
    converged: bool
    imbalance: float = 1.0
    log_domain: bool = False
    n_absorb: int = 0
    n_repaired: int = 0
    marginal: Tensor | None = None


def marginal_error(col: Tensor, prior: Tensor) -> float:
    """L1 distance between a column marginal ``col`` (K,) and the ``prior`` (K,), both summing to 1."""
    return float((col - prior).abs().sum())


@torch.no_grad()
def assign(
    logits: Tensor,
    *,
    lam: float = DEFAULT_LAM,
    prior: Tensor | None = None,
    tol: float = 1e-3,
    max_iter: int = 1000,
    init: Tensor | None = None,
    inplace: bool = False,
    storage_dtype: torch.dtype | None = None,
    distributed: bool | None = None,
    threads: int | None = None,
    relax: float | None = None,
) -> Assignment:
    """Assign balanced labels to N samples from their logits over K clusters.

    Args:
        logits: (N, K) float tensor of one head's outputs (any float dtype, any device; values must fit
            float32). With ``torch.distributed`` initialised these are this rank's rows only.
        lam: lambda, the inverse strength of the entropic regularisation (paper default 25); larger
            gives harder, closer-to-exact assignments.
        prior: (K,) positive column marginal summing to 1 (cluster proportions); default uniform 1/K,
            the paper's equipartition.
        tol: stop when :attr:`Assignment.error` <= tol (L1 marginal error). The default 1e-3 keeps
            >= 99.9 % of labels equal to those of the fully converged solution in our benchmarks.
        max_iter: the most passes over the kernel.
        init: (K,) positive scaling b from a previous :class:`Assignment` to warm-start from.
        inplace: build the kernel in the memory of ``logits`` (which is overwritten) instead of a new
            N x K buffer; requires a floating ``logits`` that may be destroyed. The kernel is then
            re-scaled in place when the scaling is absorbed, and there is no log-domain fallback.
        storage_dtype: dtype of the N x K kernel buffer when not in place (default float32);
            ``torch.bfloat16`` halves memory at a small cost in label agreement.
        distributed: solve the global problem over all ranks (default: whenever torch.distributed is
            initialised with more than one process).
        threads: CPU threads for the passes (ignored on GPU); default ``min(torch.get_num_threads(), 8)``,
            i.e. the trainer's own thread count. Each pass queues 4 contiguous row blocks per thread once
            (Python threads running single-threaded torch ops over cache-sized chunks), so a busy machine
            delays a pass by a descheduled block, whose queued successors the other threads take, never
            by hundreds of OpenMP barriers. Problems under 2^23 kernel entries per thread use one thread.
            During the call torch's intra-op thread count is 1 and restored afterwards. Measured in
            docs/solver.md: with a spinning process on every core, the default takes 2.1-3.1x the quiet
            1-thread time on a 2-core machine already loaded by others, one thread 2.7-4.1x.
        relax: None (the paper): the plan's column marginal equals ``prior`` exactly. rho > 0: the
            *semi-relaxed* problem (rows exact, columns KL-penalised; e.g. P2OT, Zhang et al. ICLR 2024):
            minimise <Q, -logits> - (1/lam) H(Q) + rho KL(Q^T 1 || prior), so that cluster sizes may
            follow the data; rho -> inf gives the exact marginal, rho -> 0 each sample's
            argmax. The marginal it chose is :attr:`Assignment.marginal`, and ``error`` is measured
            against it. rho is on the scale of the logits' gaps (the cost per sample), so a useful range
            is about 0.1-10 for logits spanning a few units; see :func:`relaxed_target`.

    Returns:
        an :class:`Assignment` with this rank's labels.

    Raises:
        ValueError: NaN/inf logits or logits beyond float32's range, K < 2, N < K (over all ranks),
            lam <= 0, tol not > 0, a bad prior or init, a float16 kernel (``inplace=True`` with float16
            logits, or ``storage_dtype=torch.float16``), threads < 1, relax not > 0.

    Method (see docs/solver.md). The kernel P^lam is stored in float32 *stabilised*, large scalings
    absorbed into it (Schmitzer 2019, "Stabilized sparse scaling algorithms for entropy regularized
    transport problems"): with an absorbed scaling beta_hat,
    K~[n, k] = exp(lam logits[n, k] + beta_hat_k - alpha_n), where alpha_n makes each row's largest entry
    1, clamped at exp(-87). A pass evaluates b = exp(beta - beta_hat) only; when
    beta - beta_hat spans more than e^60 the kernel is rebuilt around beta (``n_absorb``), so columns that
    no sample prefers (far clusters, logits of magnitude 1e4, a collapsed network) stay representable.
    The dual iteration on beta is Anderson-accelerated. At lam > 100 a cold start (or a warm start that
    stalls) is continued in lam (epsilon scaling: lam = 25, 100, 400, ..., each stage warm-started from
    the last, beta scaled by the ratio of lams), which reaches tolerances that plain Sinkhorn at lam = 1e6
    would need ~1e6 passes for; if the float32 solve still stalls (its resolution: tol < ~1e-7), the exact
    float64 log-domain path finishes from the best point. ``converged=False`` means all of this failed
    within ``max_iter`` passes; the labels are then those of the best point found, and ``error`` says how
    good. In place, a cold start first solves every 8th row out of place and builds the kernel around
    that scaling (the in-place kernel cannot be rebuilt from the logits later, only rescaled).

    Balance. The plan's columns meet the prior to ``error``; each hard cluster size n_k then differs
    from N c_k by at most N |col_k - c_k| plus the plan's softness around k (mass that rows labelled k
    put elsewhere or others put on k), which is small when lam times the logit gaps is large but not in
    general: with N close to K, or flat rows, argmax leaves some clusters empty. After solving, every
    cluster the argmax left empty receives, one by one, the sample of a cluster holding >= 2 that loses
    least log-plan mass by moving (max_n log Q[n, k] - log Q[n, l_n]); with N >= K no cluster is empty.
    It costs one column read per empty cluster, nothing when none is empty. ``imbalance`` reports the rest.
    """
    device = logits.device
    if logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D (N, K) tensor, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    n_local, k = logits.shape
    if k < 2:
        raise ValueError(f"need at least K = 2 clusters, got K = {k}")
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a positive finite number, got {lam}")
    if not (tol > 0) or max_iter < 1:  # `not (tol > 0)` also refuses NaN
        raise ValueError(
            f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}; "
            "use e.g. the default tol=1e-3 and max_iter=1000"
        )
    if threads is None:
        threads = min(torch.get_num_threads(), _MAX_THREADS)
    if threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for the default), got {threads}")
    if relax is not None and not (relax > 0 and math.isfinite(relax)):
        raise ValueError(f"relax must be a positive finite KL weight (or None: exact marginal), got {relax}")
    kernel_dtype = logits.dtype if inplace else (storage_dtype or torch.float32)
    if kernel_dtype not in (torch.float32, torch.bfloat16, torch.float64):
        # float16 flushes kernel entries below 6e-8 (a cluster lam * 0.7 below a sample's best) to 0.
        raise ValueError(
            f"cannot store the N x K kernel in {kernel_dtype}: it needs float32's exponent range; use "
            "storage_dtype=torch.bfloat16 to halve memory, or pass bfloat16/float32 logits with inplace=True"
        )
    use_dist = _use_distributed(distributed)
    n_total = _all_reduce(torch.tensor([float(n_local)], dtype=torch.float64, device=device), use_dist)
    n_total = int(n_total.item())
    if n_total < k:
        raise ValueError(
            f"need at least as many samples as clusters for an equipartition, got N = {n_total} < K = {k}; "
            "use fewer clusters or more data"
        )
    c = _check_prior(prior, k, device)
    beta0 = _check_init(init, k, device)

    old_threads = torch.get_num_threads()
    pool = None
    if device.type == "cpu":
        torch.set_num_threads(1)  # no OpenMP regions: parallelism, if any, is one row block per thread
        if threads > 1 and n_local * k >= _MIN_ELEMS_PER_THREAD * threads:
            # each worker runs its ops single-threaded: OpenMP settings are per thread
            pool = ThreadPoolExecutor(max_workers=threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        beta0, coarse, warm = beta0, 0.0, init is not None
        stride = _coarse_stride(n_total, k) if inplace and not warm else 1
        if stride > 1:
            # in place, cold: the kernel will overwrite the logits, and absorbing a scaling later can only
            # rescale it (entries clamped at exp(-87) stay lost). So first solve a strided subsample of the
            # rows (each rank its own; the global subsample is their union) out of place, and build the
            # kernel around its scaling, close enough that the full solve rarely needs to absorb. (Out of
            # place this does not pay: the full solve still needs ~10 passes, 15 without it.)
            sub = logits[::stride].float().contiguous()  # (N / stride, K), a copy
            rows = torch.tensor([float(sub.shape[0])], dtype=torch.float64, device=device)
            n_sub = int(_all_reduce(rows, use_dist).item())
            beta0, passes, *_ = _solve(
                sub, lam, c, beta0, n_sub, tol, max_iter, use_dist, pool, threads,
                warm=False, inplace=False, kernel_dtype=torch.float32, exact_fallback=False, relax=relax,
            )  # fmt: skip
            coarse, warm = passes * n_sub / n_total, True  # in full passes: <= max_iter / stride
            del sub
        budget = max(1, max_iter - math.ceil(coarse))
        beta, n_iter, err, pass_fn, log_domain, n_absorb = _solve(
            logits, lam, c, beta0, n_total, tol, budget, use_dist, pool, threads,
            warm=warm, inplace=inplace, kernel_dtype=kernel_dtype, exact_fallback=True, relax=relax,
        )  # fmt: skip
        target = relaxed_target(c, beta, lam, relax)
        n_iter += math.ceil(coarse)
        labels = pass_fn.labels(beta)
        labels, n_repaired, imbalance = _repair(pass_fn, beta, labels, target, n_total, use_dist)
        if isinstance(pass_fn, _KernelPass):
            n_absorb = pass_fn.n_absorb
    finally:
        if pool is not None:
            pool.shutdown()
        if device.type == "cpu":
            torch.set_num_threads(old_threads)
    scaling = torch.exp(beta - beta.max()).clamp_min_(1e-300)  # stays a valid (positive) warm start
    return Assignment(
        labels=labels,
        scaling=scaling,
        n_iter=n_iter,
        error=err,
        converged=err <= tol,
        imbalance=imbalance,
        log_domain=log_domain,
        n_absorb=n_absorb,
        n_repaired=n_repaired,
        marginal=target,
    )


def relaxed_target(prior: Tensor, beta: Tensor, lam: float, relax: float | None) -> Tensor:
    """The column marginal (K,) float64 that the plan with log column scaling ``beta`` must meet.

    Exact marginal (``relax`` None): ``prior``. Semi-relaxed, KL weight rho: the optimality condition
    of min <Q, C> - eps H(Q) + rho KL(Q^T 1 || prior) with rows fixed (eps = 1 / lam) is
    log b_k = -(rho / eps) log(col_k / prior_k), i.e. col_k = prior_k exp(-beta_k / (lam rho)),
    normalised (a constant shift of beta is absorbed by the row scaling, and the columns sum to 1).
    """
    if relax is None:
        return prior
    z = prior.log() - beta / (lam * relax)
    return torch.softmax(z, dim=0)


def _solve(
    logits: Tensor,
    lam: float,
    c: Tensor,
    beta0: Tensor,
    n_total: int,
    tol: float,
    max_iter: int,
    use_dist: bool,
    pool: ThreadPoolExecutor | None,
    threads: int,
    *,
    warm: bool,
    inplace: bool,
    kernel_dtype: torch.dtype,
    exact_fallback: bool,
    relax: float | None = None,
) -> tuple[Tensor, int, float, _KernelPass | _LogDomainPass, bool, int]:
    """The solve proper: (beta, passes, error, the pass object for labels, log domain used, absorptions).

    A cold start (``warm`` False) at lam > 100 goes through the continuation in lam; a stalled warm start
    too. ``exact_fallback`` allows the float64 log domain as the last resort.
    """
    n_local, k = logits.shape
    # a few blocks per thread, queued: when the OS deschedules one thread, the others take its blocks
    blocks = _row_blocks(n_local, _BLOCKS_PER_THREAD * threads if pool else 1)
    chunk = _chunk_rows(n_local, k, logits.device)
    row_max = _scan(logits, chunk)
    kernel = _KernelPass(logits, row_max, lam, chunk, blocks, pool, inplace, kernel_dtype)
    stages = _lam_stages(lam)
    if not warm and len(stages) > 1 and not inplace and max_iter >= len(stages):
        # a large lam from a cold start: continuation in lam (epsilon scaling) from lam = 25
        beta, n_iter, err = _continuation(kernel, stages, c, n_total, tol, max_iter, use_dist, relax)
    else:
        kernel.absorb(beta0)
        beta, n_iter, err = _anderson_solve(kernel, c, beta0, n_total, tol, max_iter, use_dist, relax)
        if err > tol and len(stages) > 1 and not inplace and max_iter - n_iter >= len(stages):
            # a warm start that stalled at a large lam: the continuation from lam = 25
            beta1, more, err1 = _continuation(
                kernel, stages, c, n_total, tol, max_iter - n_iter, use_dist, relax
            )
            n_iter += more
            if err1 <= err:
                beta, err = beta1, err1
    pass_fn: _KernelPass | _LogDomainPass = kernel
    log_domain = False
    if err > tol and exact_fallback and not inplace and n_iter < max_iter:
        # float32's resolution: finish exactly in the log domain, from where it got
        n_absorb = kernel.n_absorb
        del kernel
        pass_fn = _LogDomainPass(logits, row_max, lam, chunk)
        beta_l, more, err_l = _anderson_solve(
            pass_fn, c, beta, n_total, tol, max_iter - n_iter, use_dist, relax
        )
        n_iter += more
        log_domain = True
        if err_l <= err:
            beta, err = beta_l, err_l
    if isinstance(pass_fn, _KernelPass):
        n_absorb = pass_fn.n_absorb
    return beta, n_iter, err, pass_fn, log_domain, n_absorb


# --------------------------------------------------------------------------------------------------------
# validation and setup


def _use_distributed(flag: bool | None) -> bool:
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    if flag is None:
        return available and torch.distributed.get_world_size() > 1
    if flag and not available:
        raise ValueError("distributed=True but torch.distributed is not initialised")
    return flag


def _all_reduce(t: Tensor, use_dist: bool, op: str = "sum") -> Tensor:
    if use_dist:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        ops["min"] = torch.distributed.ReduceOp.MIN
        torch.distributed.all_reduce(t, op=ops[op])
    return t


def _check_prior(prior: Tensor | None, k: int, device: torch.device) -> Tensor:
    if prior is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=device)
    p = torch.as_tensor(prior, dtype=torch.float64, device=device).flatten()
    if p.numel() != k:
        raise ValueError(f"prior must have K = {k} entries, got {p.numel()}")
    if not torch.isfinite(p).all() or (p <= 0).any():
        raise ValueError("prior must be strictly positive and finite (give every cluster some mass)")
    if abs(float(p.sum()) - 1.0) > 1e-6:
        raise ValueError(f"prior must sum to 1, got {float(p.sum()):.6g}; divide it by its sum")
    return p / p.sum()  # exactly 1 in float64: a float32 prior's rounding would floor the error at ~1e-8


def _check_init(init: Tensor | None, k: int, device: torch.device) -> Tensor:
    if init is None:
        return torch.zeros(k, dtype=torch.float64, device=device)
    b = torch.as_tensor(init, dtype=torch.float64, device=device).flatten()
    if b.numel() != k:
        raise ValueError(f"init must be a scaling of K = {k} entries (Assignment.scaling), got {b.numel()}")
    if not torch.isfinite(b).all() or (b <= 0).any():
        raise ValueError("init must be strictly positive and finite (pass a previous Assignment.scaling)")
    return b.log()


def _chunk_rows(n: int, k: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(n, _CHUNK_ELEMS_CUDA // k))
    return max(16, min(n, _CHUNK_BYTES_CPU // (4 * k)))


def _coarse_stride(n: int, k: int) -> int:
    """Row stride of the cold-start subsample: 1 (none) unless every cluster keeps ~_COARSE_ROWS rows."""
    return _COARSE_STRIDE if n >= _COARSE_STRIDE * _COARSE_ROWS * k else 1


def _row_blocks(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, end) row ranges covering 0..n, as equal as possible."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def _scan(logits: Tensor, chunk: int) -> Tensor:
    """One read pass over the logits: checks them and returns the row maxima (N,) float32.

    All entries are finite iff every row's max and min are (NaN propagates through both), which costs
    two reductions instead of a boolean N x K temporary.
    """
    n = logits.shape[0]
    hi = torch.empty(n, dtype=logits.dtype, device=logits.device)
    lo = torch.empty(n, dtype=logits.dtype, device=logits.device)
    for s in range(0, n, chunk):
        torch.amax(logits[s : s + chunk], dim=1, out=hi[s : s + chunk])  # (B,)
        torch.amin(logits[s : s + chunk], dim=1, out=lo[s : s + chunk])
    if not bool(torch.isfinite(hi).all() & torch.isfinite(lo).all()):
        raise ValueError("logits contain NaN or inf; check the network outputs (a diverged loss?)")
    if not bool(torch.isfinite(hi.float()).all() & torch.isfinite(lo.float()).all()):
        raise ValueError(
            "logits exceed float32's range (|x| > 3.4e38), in which the solver computes; "
            "rescale them (labels depend on lam * logits only: divide the logits and multiply lam)"
        )
    return hi.float()


# --------------------------------------------------------------------------------------------------------
# the stabilised float32 kernel: one pass evaluates the column marginal for a scaling b


class _KernelPass:
    """P^lam stored in float32 with a scaling beta_hat absorbed (Schmitzer 2019), evaluated per pass.

    ``kernel[n, k] = exp(max(lam (logits[n, k] - m_n) + beta_hat_k - alpha_n, -87))`` with alpha_n
    making each row's largest entry exactly 1 (m_n: the row maximum, for float32 headroom); the plan is
    Q = diag(a) kernel diag(exp(beta - beta_hat)).
    """

    def __init__(self, logits, row_max, lam, chunk, blocks, pool, inplace, dtype):
        self.logits = None if inplace else logits
        self.kernel = logits if inplace else torch.empty(logits.shape, dtype=dtype, device=logits.device)
        self.row_max = row_max
        self.lam = lam
        self.chunk = chunk
        self.blocks = blocks
        self.pool = pool
        self.beta_hat: Tensor | None = None
        self.n_absorb = 0  # absorptions during the iteration (builds for a new lam not counted)

    def _map(self, fn) -> list:
        if self.pool is None:
            return [fn(s, e) for s, e in self.blocks]
        return list(self.pool.map(lambda be: fn(*be), self.blocks))

    def _chunks(self, s: int, e: int):
        return ((i, min(i + self.chunk, e)) for i in range(s, e, self.chunk))

    def needs_absorb(self, beta: Tensor) -> bool:
        d = beta - self.beta_hat
        return float(d.max() - d.min()) > _SPAN

    def _absorb_if_wide(self, beta: Tensor) -> None:
        if self.needs_absorb(beta):
            self.absorb(beta)
            self.n_absorb += 1

    def absorb(self, beta: Tensor) -> None:
        """Rebuild the kernel around the scaling ``beta`` (K,) float64: afterwards b = 1."""
        beta_hat = beta - beta.max()
        if self.logits is None and self.beta_hat is not None:
            self._rescale(beta_hat - self.beta_hat)  # in place: the logits are gone
        else:
            # float32 rounds the exponents to eps times ~(87 + span of beta_hat); see _EXACT_SPAN
            exact = float(-beta_hat.min()) > _EXACT_SPAN
            dt = torch.float64 if exact else torch.float32
            bh = beta_hat.to(dt).clamp_min(-1e30)
            src = self.kernel if self.logits is None else self.logits  # in place: the first build only

            # with no scaling to absorb, the row maxima (of the float32 values) already shift every row's
            # largest exponent to exactly 0
            shifted = dt == torch.float32 and not bool(bh.any())

            def build(s: int, e: int) -> None:
                buf = self._buffer(dt)  # reused: a fresh 1 MB tensor per chunk costs page faults
                for i, j in self._chunks(s, e):
                    z = buf[: j - i]  # (B, K)
                    torch.sub(src[i:j].to(dt), self.row_max[i:j, None], out=z)  # <= 0, exact in float32
                    z.mul_(self.lam)
                    if not shifted:
                        z.add_(bh)
                        z.sub_(z.amax(dim=1, keepdim=True))
                    z.clamp_min_(_LOG_FLOOR)
                    if z.dtype == self.kernel.dtype == torch.float32 and z.device.type == "cpu":
                        # NumPy's float32 exp is SIMD-vectorised, ~2x torch's on CPU (same values to 2e-7)
                        np.exp(z.numpy(), out=self.kernel[i:j].detach().numpy())
                    elif z.dtype == self.kernel.dtype:
                        torch.exp(z, out=self.kernel[i:j])
                    else:
                        self.kernel[i:j] = z.float().exp_()

            self._map(build)
        self.beta_hat = beta_hat

    def _buffer(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.empty(self.chunk, self.kernel.shape[1], dtype=dtype, device=self.kernel.device)

    def _rescale(self, delta: Tensor) -> None:
        b = torch.exp((delta - delta.max()).clamp_min(_LOG_FLOOR)).float()  # (K,)

        def rescale(s: int, e: int) -> None:
            for i, j in self._chunks(s, e):
                x = self.kernel[i:j].float() * b  # (B, K)
                x /= x.amax(dim=1, keepdim=True)
                self.kernel[i:j] = x.clamp_min_(math.exp(_LOG_FLOOR))

        self._map(rescale)

    def _b(self, beta: Tensor) -> Tensor:
        d = beta - self.beta_hat
        return torch.exp((d - d.max()).clamp_min(_LOG_FLOOR)).float()  # (K,) in [e^-87, 1]

    def log_column_mass(self, beta: Tensor, use_dist: bool) -> Tensor:
        """log sum_n Q[n, k] over all ranks' rows, each row normalised to sum 1: (K,) float64."""
        self._absorb_if_wide(beta)
        b = self._b(beta)  # (K,)

        def block(s: int, e: int) -> Tensor:
            # float64: a float32 running sum over N rows would floor the error
            col = torch.zeros(b.shape, dtype=torch.float64, device=b.device)
            buf = None if self.kernel.dtype == torch.float32 else self._buffer()
            for i, j in self._chunks(s, e):
                x = self.kernel[i:j]
                if buf is not None:
                    x = buf[: j - i].copy_(x)
                a = torch.mv(x, b).reciprocal_()  # (B,) row scaling, <= e^60 (a row's 1 times b >= e^-60)
                col += torch.mv(x.t(), a)  # (K,) float32 sum of <= B terms of <= e^60
            return col

        col = sum(self._map(block))
        return _all_reduce(col * b.double(), use_dist).log()

    def labels(self, beta: Tensor) -> Tensor:
        self._absorb_if_wide(beta)
        b = self._b(beta)
        out = torch.empty(self.kernel.shape[0], dtype=torch.long, device=self.kernel.device)

        def block(s: int, e: int) -> None:
            buf = self._buffer()
            for i, j in self._chunks(s, e):
                z = torch.mul(self.kernel[i:j], b, out=buf[: j - i])  # (B, K)
                if z.device.type == "cpu":
                    # NumPy's row argmax is SIMD-vectorised, ~4x torch's on CPU; both pick the first maximum
                    out[i:j] = torch.from_numpy(np.argmax(z.numpy(), axis=1))
                else:
                    torch.argmax(z, dim=1, out=out[i:j])

        self._map(block)
        return out

    def log_ratio(self, beta: Tensor, col: int, labels: Tensor) -> Tensor:
        """log Q[n, col] - log Q[n, labels[n]] for every local row: (N,) float64."""
        b = self._b(beta).double()
        idx = torch.arange(self.kernel.shape[0], device=labels.device)
        to = self.kernel[:, col].double() * b[col]
        at = self.kernel[idx, labels].double() * b[labels]
        return (to / at).log()

    def rebuild_for(self, lam: float, beta: Tensor) -> None:
        """Rebuild for a new lam (continuation); only possible while the logits exist."""
        self.lam = lam
        self.absorb(beta)


# --------------------------------------------------------------------------------------------------------
# the exact last resort: the same evaluation in the float64 log domain


class _LogDomainPass:
    """The same evaluation in the log domain (float64), exact where float32 cannot resolve tol."""

    def __init__(self, logits: Tensor, row_max: Tensor, lam: float, chunk: int):
        self.logits = logits
        self.row_max = row_max
        self.lam = lam
        self.chunk = max(1, chunk // 2)

    def _log_kernel(self, s: int) -> Tensor:
        x = self.logits[s : s + self.chunk].double()  # (B, K)
        return (x - self.row_max[s : s + self.chunk, None].double()) * self.lam

    def needs_absorb(self, beta: Tensor) -> bool:
        return False

    def log_column_mass(self, beta: Tensor, use_dist: bool) -> Tensor:
        k = beta.numel()
        run_max = torch.full((k,), -math.inf, dtype=torch.float64, device=beta.device)
        run_sum = torch.zeros(k, dtype=torch.float64, device=beta.device)
        for s in range(0, self.logits.shape[0], self.chunk):
            z = self._log_kernel(s) + beta  # (B, K) log of P^lam diag(b)
            z -= torch.logsumexp(z, dim=1, keepdim=True)  # rows normalised to 1
            m = torch.maximum(run_max, z.amax(dim=0))  # (K,) online log-sum-exp over rows
            run_sum = run_sum * torch.exp(run_max - m).nan_to_num_(0.0) + torch.exp(z - m).sum(dim=0)
            run_max = m
        if use_dist:  # log-sum-exp across ranks: shared maximum, then a sum
            global_max = _all_reduce(run_max.clone(), True, op="max")
            run_sum = _all_reduce(run_sum * torch.exp(run_max - global_max).nan_to_num_(0.0), True)
            run_max = global_max
        return run_sum.log() + run_max

    def labels(self, beta: Tensor) -> Tensor:
        out = torch.empty(self.logits.shape[0], dtype=torch.long, device=self.logits.device)
        for s in range(0, self.logits.shape[0], self.chunk):
            torch.argmax(self._log_kernel(s) + beta, dim=1, out=out[s : s + self.chunk])
        return out

    def log_ratio(self, beta: Tensor, col: int, labels: Tensor) -> Tensor:
        x = self.logits
        idx = torch.arange(x.shape[0], device=labels.device)
        return self.lam * (x[:, col].double() - x[idx, labels].double()) + beta[col] - beta[labels]


# --------------------------------------------------------------------------------------------------------
# the outer iteration: Anderson-accelerated fixed point on beta = log b


def _anderson_solve(
    pass_fn,
    c: Tensor,
    beta: Tensor,
    n_total: int,
    tol: float,
    max_iter: int,
    use_dist: bool,
    relax: float | None = None,
) -> tuple[Tensor, int, float]:
    """Find beta with column marginal c. Plain Sinkhorn is beta <- beta + log c - log col(beta).

    Semi-relaxed (``relax`` rho): the target t(beta) = :func:`relaxed_target` moves with beta, and the
    plain step is the damped beta <- beta + (log t - log col) rho / (rho + 1 / lam) (the unbalanced
    Sinkhorn update of Chizat et al. 2018 with the rows exact); the error is |col - t|_1.
    Anderson acceleration (type II, memory m) extrapolates from the last m iterates and residuals;
    if a step increases the error, history is dropped and a plain step is taken from the best iterate.
    Returns (beta, passes, error at the returned beta).
    """
    damp = 1.0 if relax is None else relax * pass_fn.lam / (relax * pass_fn.lam + 1.0)
    xs: list[Tensor] = []
    fs: list[Tensor] = []
    best: tuple[float, Tensor, Tensor] | None = None
    last_progress = 0
    it = 0
    for it in range(1, max_iter + 1):
        log_col = pass_fn.log_column_mass(beta, use_dist) - math.log(n_total)  # (K,)
        target = relaxed_target(c, beta, pass_fn.lam, relax)  # c itself unless relaxed
        err = marginal_error(log_col.exp(), target)  # col sums to 1
        f = (target.log() - log_col) * damp  # residual of the fixed-point map
        if not (math.isfinite(err) and torch.isfinite(f).all()):
            if best is None:
                raise FloatingPointError("the label solver met a non-finite column mass at its start")
            err = math.inf  # treated as an overshoot below
        if best is None or err < best[0]:
            if best is None or err < _PROGRESS * best[0]:
                last_progress = it
            best = (err, beta, f)
        if it - last_progress > _STALL_PASSES:
            break
        elif err > _RESTART_FACTOR * best[0]:
            # The extrapolation overshot: restart from the best iterate with a plain Sinkhorn step.
            xs.clear()
            fs.clear()
            beta = best[1] + best[2]
            continue
        if err <= tol:
            return beta, it, err
        xs.append(beta)
        fs.append(f)
        if len(fs) > _ANDERSON_MEMORY + 1:
            xs.pop(0)
            fs.pop(0)
        beta = _anderson_step(xs, fs)
    if best is None:
        raise FloatingPointError("the label solver ran no pass")
    return best[1], it, best[0]


def _anderson_step(xs: list[Tensor], fs: list[Tensor]) -> Tensor:
    """Next iterate from the history of iterates xs and residuals fs (each (K,) float64)."""
    x, f = xs[-1], fs[-1]
    if len(fs) == 1:
        return x + f
    d_f = torch.stack([fs[i + 1] - fs[i] for i in range(len(fs) - 1)], dim=1)  # (K, m)
    d_x = torch.stack([xs[i + 1] - xs[i] for i in range(len(xs) - 1)], dim=1)  # (K, m)
    gram = d_f.T @ d_f  # (m, m)
    eye = torch.eye(len(fs) - 1, dtype=gram.dtype, device=gram.device)
    gram += _ANDERSON_REG * gram.diagonal().max().clamp_min(1e-30) * eye  # Tikhonov, for stability
    gamma = torch.linalg.solve(gram, d_f.T @ f)  # (m,)
    step = x + f - (d_x + d_f) @ gamma
    if not torch.isfinite(step).all():
        return x + f
    return step


def _lam_stages(lam: float) -> list[float]:
    """[lam] for lam <= 100; else 25, 100, 400, ... (each below lam), then lam."""
    if lam <= _LAM_FACTOR * _LAM_START:
        return [lam]
    stages = [_LAM_START]
    while stages[-1] * _LAM_FACTOR < lam:
        stages.append(stages[-1] * _LAM_FACTOR)
    return stages + [lam]


def _continuation(
    kernel: _KernelPass,
    stages: list[float],
    c: Tensor,
    n_total: int,
    tol: float,
    max_iter: int,
    use_dist: bool,
    relax: float | None = None,
) -> tuple[Tensor, int, float]:
    """Epsilon scaling: solve at each lam of ``stages`` in turn, each stage warm-started from the last.

    The dual potential beta / lam changes little between stages, so beta is scaled by the ratio of the
    lams. Intermediate stages are solved to tol / 10, so that the next stage starts close to tol (at a
    large lam a plain Sinkhorn pass barely moves the error, whereas the extrapolated start usually
    meets tol at once); each leaves the last stage at least one pass. Leaves the kernel at the final
    lam; returns (beta, passes, error) there.
    """
    beta = torch.zeros_like(c)  # (K,) float64
    used = 0
    for i, lam in enumerate(stages):
        if i > 0:
            beta = beta * (lam / stages[i - 1])
        kernel.rebuild_for(lam, beta)
        last = i == len(stages) - 1
        budget = max_iter - used - (len(stages) - 1 - i)  # keep one pass for each later stage
        beta, more, err = _anderson_solve(
            kernel, c, beta, n_total, tol if last else tol / 10, budget, use_dist, relax
        )
        used += more
    return beta, used, err


# --------------------------------------------------------------------------------------------------------
# balance of the hard labels


def _repair(pass_fn, beta: Tensor, labels: Tensor, c: Tensor, n_total: int, use_dist: bool):
    """Give each cluster the argmax left empty the sample that loses least by moving there.

    ``c`` (K,) is the marginal solved to. Returns (labels, samples moved, imbalance = max_k n_k / (N c_k)).
    Greedy, one empty cluster at a time: the candidate rows are those of clusters holding >= 2 samples (so no cluster is emptied), and
    the chosen one maximises log Q[n, k] - log Q[n, l_n] (over all ranks; ties go to the lowest rank).
    """
    k = c.numel()
    counts = _all_reduce(torch.bincount(labels, minlength=k).double(), use_dist)  # (K,)
    moved = 0
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        labels = labels.clone()
        rank = torch.distributed.get_rank() if use_dist else 0
        for col in empty:
            score = pass_fn.log_ratio(beta, col, labels)  # (N,)
            score = score.masked_fill(counts[labels] < 2, -math.inf)
            best = score.max() if score.numel() else torch.tensor(-math.inf, dtype=torch.float64)
            top = _all_reduce(best.reshape(1).clone(), use_dist, op="max")
            mine = (
                float(rank)
                if score.numel() and bool(best == top[0]) and math.isfinite(float(best))
                else math.inf
            )
            winner = _all_reduce(
                torch.tensor([mine], dtype=torch.float64, device=c.device), use_dist, op="min"
            )
            if not math.isfinite(float(winner[0])):
                break  # no donor anywhere: cannot happen with N >= K
            old = torch.zeros(k, dtype=torch.float64, device=c.device)
            if float(winner[0]) == rank:
                row = int(score.argmax())
                old[labels[row]] = 1.0
                labels[row] = col
            old = _all_reduce(old, use_dist)
            counts -= old
            counts[col] += 1
            moved += 1
    imbalance = float((counts / (n_total * c)).max())
    return labels, moved, imbalance


@torch.no_grad()
def soft_codes(
    scores: Tensor,
    *,
    epsilon: float = 0.05,
    n_iter: int = 3,
    distributed: bool | None = None,
    relax: float | None = None,
) -> Tensor:
    """Soft balanced assignments of a batch: a few Sinkhorn-Knopp iterations on exp(scores / epsilon).

    The online counterpart of :func:`assign` used by the ``swapped`` objective (SwAV, Caron et al. 2020):
    Q = diag(a) exp(S / epsilon) diag(b) with rows summing to 1 and columns to B / K each (equipartition
    within the batch), after ``n_iter`` alternating scalings (not run to convergence: the codes stay soft).

    Args:
        scores: (B, K) scores of this rank's rows, e.g. cosine similarities in [-1, 1].
        epsilon: entropic regularisation (1 / lambda on the scores' scale); smaller is harder.
        n_iter: column/row scaling rounds.
        distributed: balance over the global batch of all ranks (default: whenever torch.distributed
            runs more than one process); the column sums are all-reduced.
        relax: None: equal columns. rho > 0: the semi-relaxed marginal of :func:`assign` (the equal share
            KL-penalised with weight rho on the scores' scale): each column scaling is the equal one raised
            to rho / (rho + epsilon), so clusters that many images prefer keep more of them.

    Returns:
        (B, K) float32 codes, each row a probability vector.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (B, K) with K >= 2, got shape {tuple(scores.shape)}")
    if epsilon <= 0 or n_iter < 1:
        raise ValueError(f"epsilon must be > 0 and n_iter >= 1, got {epsilon}, {n_iter}")
    if relax is not None and not (relax > 0 and math.isfinite(relax)):
        raise ValueError(f"relax must be a positive finite KL weight (or None), got {relax}")
    power = 1.0 if relax is None else relax / (relax + epsilon)
    use_dist = _use_distributed(distributed)
    z = scores.float() / epsilon
    z = (
        z - z.max(1, keepdim=True).values
    )  # a per-row shift (absorbed by the row scaling): every row keeps a 1
    q = z.exp_()  # (B, K)
    for _ in range(n_iter):
        col = _all_reduce(q.sum(0), use_dist).clamp_min_(1e-30)  # (K,)
        q /= col if power == 1.0 else col.pow_(power)  # columns: 1 each (then x B / K), or relaxed
        q /= q.sum(1, keepdim=True).clamp_min_(1e-30)  # rows: 1 each
    return q
