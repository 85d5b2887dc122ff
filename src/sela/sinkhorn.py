"""The label solver: balanced label assignment by Sinkhorn-Knopp matrix scaling.

This is the optimal-transport step of SeLa (Asano, Rupprecht, Vedaldi, ICLR 2020, Sec. 3.1, eq. 6-8).
Given a head's logits for N samples over K clusters and P = softmax(logits) row-wise, it finds the plan
Q in the transport polytope

    U(r, c) = {Q >= 0 : Q 1 = r, Q^T 1 = c},   r = 1/N (rows),   c = prior (columns, default 1/K)

that minimises <Q, -log P> - (1/lambda) H(Q). The solution has the form Q = diag(a) P^lambda diag(b)
(paper's alpha, beta); each sample's hard label is argmax_k Q[n, k] = argmax_k P[n, k]^lambda b[k], which
depends on b alone. Paper symbols map to the code as follows:

    paper          code
    P^lambda       ``kernel`` (stored row-shifted: exp(lambda * (logits - rowmax)), entries in (0, 1])
    alpha, beta    ``a`` (rows, recomputed every pass, never stored), ``b = exp(beta)`` (K-vector)
    r, c           1/N, ``prior``
    lambda         ``lam``

What makes it fast, compared with the original alternating updates of r and c in float64:

* **one pass per iteration**: rows are visited in cache-sized chunks; for each chunk the row scaling
  a = 1 / (P^lambda b) and its contribution P^lambda^T a to the column marginal are computed while the
  chunk is in cache, so each iteration reads the N x K buffer once;
* **float32 without underflow**: the kernel is shifted per row (every row keeps an entry equal to 1, so
  no row can vanish) and clamped at exp(-87), the smallest normal float32, which keeps denormals out of
  the inner loop and perturbs entries by less than 1.2e-38 relative to the row maximum;
* **Anderson acceleration** of the dual update on log b (Walker and Ni 2011; applied to Sinkhorn by e.g.
  Chizat 2020), safeguarded by falling back to a plain Sinkhorn step whenever the error grows: it
  needs 5-15 passes where plain Sinkhorn needs 30-300.

When a column of the kernel underflows entirely (a cluster that no sample gives appreciable probability,
e.g. logits of magnitude 1e4 or a collapsed network), the solver switches to the log domain (float64
log-sum-exp over chunks), which is slower but exact.

With ``torch.distributed`` initialised, each rank passes its own rows; the solver all-reduces the
K-sized column marginal (and the sample count) each pass, so all ranks follow the same b and the result
equals the single-process solve of all rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Assignment", "assign", "marginal_error"]

# exp(-87) is just above the smallest normal float32 (1.18e-38).
_LOG_FLOOR = -87.0
# A column whose largest (row-shifted) log-kernel entry is below this needs b > e^69: use the log domain.
_LOG_UNDERFLOW = -69.0
_CHUNK_BYTES_CPU = 1 << 20  # ~1 MiB chunks stay in L2 cache on CPU
_CHUNK_ELEMS_CUDA = 1 << 28  # GPUs are bandwidth-bound: few large chunks
_ANDERSON_MEMORY = 5
_ANDERSON_REG = 1e-10
_RESTART_FACTOR = 2.0  # an Anderson step may raise the error a little, but not double it
_PROGRESS, _STALL_PASSES = 0.99, 50  # stop when 50 passes have not lowered the error by 1 %


@dataclass(frozen=True)
class Assignment:
    """Result of :func:`assign`.

    Attributes:
        labels: int64 (N,), hard label of each (local) sample, argmax_k Q[n, k].
        scaling: float64 (K,), the column scaling b of Q = diag(a) P^lambda diag(b), normalised to max 1.
            It fixes the labels; pass it as ``init=`` to warm-start the next solve.
        n_iter: number of passes over the N x K kernel (each pass evaluates one b).
        error: L1 distance between the column marginal of the row-normalised plan and the prior,
            sum_k |sum_n Q[n, k] - c_k| with Q's rows summing to exactly 1/N (0 means an exact solution;
            2 is the largest possible value).
        converged: whether ``error <= tol`` was reached within ``max_iter`` passes.
        log_domain: whether the log-domain path was used (some column underflowed in float32).
    """

    labels: Tensor
    scaling: Tensor
    n_iter: int
    error: float
    converged: bool
    log_domain: bool = False


def marginal_error(col: Tensor, prior: Tensor) -> float:
    """L1 distance between a column marginal ``col`` (K,) and the ``prior`` (K,), both summing to 1."""
    return float((col - prior).abs().sum())


@torch.no_grad()
def assign(
    logits: Tensor,
    *,
    lam: float = 25.0,
    prior: Tensor | None = None,
    tol: float = 1e-3,
    max_iter: int = 1000,
    init: Tensor | None = None,
    inplace: bool = False,
    storage_dtype: torch.dtype | None = None,
    distributed: bool | None = None,
) -> Assignment:
    """Assign balanced labels to N samples from their logits over K clusters.

    Args:
        logits: (N, K) float tensor of one head's outputs (any float dtype, any device). With
            ``torch.distributed`` initialised these are this rank's rows only.
        lam: lambda, the inverse strength of the entropic regularisation (paper default 25); larger
            gives harder, closer-to-exact assignments.
        prior: (K,) positive column marginal summing to 1 (cluster proportions); default uniform 1/K,
            the paper's equipartition.
        tol: stop when :attr:`Assignment.error` <= tol (L1 marginal error). The default 1e-3 keeps
            >= 99.9 % of labels equal to those of the fully converged solution in our benchmarks.
        max_iter: the most passes over the kernel.
        init: (K,) positive scaling b from a previous :class:`Assignment` to warm-start from.
        inplace: build the kernel in the memory of ``logits`` (which is overwritten) instead of a new
            N x K buffer; requires a floating ``logits`` that may be destroyed.
        storage_dtype: dtype of the N x K kernel buffer when not in place (default float32);
            ``torch.bfloat16`` halves memory at a small cost in label agreement.
        distributed: solve the global problem over all ranks (default: whenever torch.distributed is
            initialised with more than one process).

    Returns:
        an :class:`Assignment` with this rank's labels.

    Raises:
        ValueError: NaN/inf logits, K < 2, N < K (over all ranks), lam <= 0, a bad prior or init,
            a float16 kernel (``inplace=True`` with float16 logits, or ``storage_dtype=torch.float16``).
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
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
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

    chunk = _chunk_rows(n_local, k, device)
    row_max, col_max, low, finite = _scan(logits, chunk)
    if not finite:
        raise ValueError("logits contain NaN or inf; check the network outputs (a diverged loss?)")
    col_max = _all_reduce(col_max, use_dist, op="max")
    # Entries clamped at exp(-87) lose information; the log domain keeps it (decided on all ranks alike).
    clamped = bool(_all_reduce(torch.tensor([float(low * lam < _LOG_FLOOR)], device=device), use_dist) > 0)
    log_domain = bool((col_max * lam < _LOG_UNDERFLOW).any())

    n_iter = 0
    if not log_domain:
        if inplace:
            kernel = logits
        else:
            kernel = torch.empty(n_local, k, dtype=storage_dtype or torch.float32, device=device)
        _build_kernel(logits, row_max, lam, kernel, chunk)
        pass_fn = _KernelPass(kernel, chunk)
        beta, n_iter, err = _anderson_solve(pass_fn, c, beta0, n_total, tol, max_iter, use_dist)
        # The float32 kernel cannot express the huge scalings some extreme inputs need: if it stalled
        # with clamped entries and the logits still exist, finish in the log domain from where it got.
        # Also when b spans more than e^69: a clamped entry (e^-87 instead of smaller) then weighs up to
        # e^(span - 87) of its row's scaled mass, so the float32 error understates the true one.
        wide = float(beta.max() - beta.min()) > -_LOG_UNDERFLOW
        if (err > tol or wide) and clamped and not inplace and n_iter < max_iter:
            del kernel, pass_fn
            log_domain, beta0 = True, beta
    if log_domain:
        pass_fn = _LogDomainPass(logits, row_max, lam, chunk)
        beta, more, err = _anderson_solve(pass_fn, c, beta0, n_total, tol, max_iter - n_iter, use_dist)
        n_iter += more
    labels = pass_fn.labels(beta)
    scaling = torch.exp(beta - beta.max()).clamp_min_(1e-300)  # stays a valid (positive) warm start
    return Assignment(
        labels=labels, scaling=scaling, n_iter=n_iter, error=err, converged=err <= tol, log_domain=log_domain
    )


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
        red = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(t, op=red)
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
    beta = b.log()
    return beta.clamp_min(float(beta.max()) + _LOG_FLOOR)  # a hint: keep it within float32's range


def _chunk_rows(n: int, k: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(n, _CHUNK_ELEMS_CUDA // k))
    return max(16, min(n, _CHUNK_BYTES_CPU // (4 * k)))


def _scan(logits: Tensor, chunk: int) -> tuple[Tensor, Tensor, float, bool]:
    """One read pass over the logits.

    Returns row maxima (N,), column maxima of the row-shifted logits (K,), the smallest row-shifted
    logit, and whether all logits are finite.
    """
    n, k = logits.shape
    row_max = torch.empty(n, dtype=torch.float32, device=logits.device)
    col_max = torch.full((k,), -math.inf, dtype=torch.float32, device=logits.device)
    low = torch.zeros((), dtype=torch.float32, device=logits.device)
    finite = torch.ones((), dtype=torch.bool, device=logits.device)
    for s in range(0, n, chunk):
        x = logits[s : s + chunk].float()  # (B, K)
        finite &= torch.isfinite(x).all()
        m = x.amax(dim=1)  # (B,)
        row_max[s : s + chunk] = m
        shifted = x - m[:, None]  # (B, K), <= 0
        torch.maximum(col_max, shifted.amax(dim=0), out=col_max)
        torch.minimum(low, shifted.amin(), out=low)
    return row_max, col_max, float(low), bool(finite)


def _build_kernel(logits: Tensor, row_max: Tensor, lam: float, out: Tensor, chunk: int) -> None:
    """out[n, k] = exp(max(lam * (logits[n, k] - row_max[n]), -87)); safe when out is logits."""
    for s in range(0, logits.shape[0], chunk):
        x = logits[s : s + chunk].float()  # (B, K); a view when logits is float32, never written
        x = x.sub(row_max[s : s + chunk, None]).mul_(lam).clamp_min_(_LOG_FLOOR).exp_()  # new tensor
        out[s : s + chunk] = x


# --------------------------------------------------------------------------------------------------------
# one pass over the kernel: column marginal for a given b


def _scaling32(beta: Tensor) -> Tensor:
    """b = exp(beta) in float32, max 1, floored at exp(-87) so that no column's mass becomes exactly 0.

    A column whose b sits at the floor still receives (tiny) mass, so its residual stays finite and the
    next update raises it; an exact 0 would make log(col) = -inf and stall the solve.
    """
    return torch.exp((beta - beta.max()).clamp_min(_LOG_FLOOR)).float()


class _KernelPass:
    """Evaluates the column marginal of the row-normalised plan for a scaling b, one pass per call."""

    def __init__(self, kernel: Tensor, chunk: int):
        self.kernel = kernel
        self.chunk = chunk

    def log_column_mass(self, beta: Tensor, use_dist: bool) -> Tensor:
        """log sum_n Q[n, k] over all ranks' rows, each row normalised to sum 1: (K,) float64."""
        b = _scaling32(beta)  # (K,)
        col = torch.zeros_like(beta)  # float64: a float32 running sum over N rows would floor the error
        for s in range(0, self.kernel.shape[0], self.chunk):
            x = self.kernel[s : s + self.chunk]
            if x.dtype != torch.float32:
                x = x.float()
            a = torch.mv(x, b).reciprocal_()  # (B,) row scaling up to 1/N, <= e^87
            a_max = a.max()  # scale a into (0, 1] so that the float32 sum below cannot overflow
            col += torch.mv(x.t(), a / a_max).double() * a_max.double()  # (K,)
        return _all_reduce(col * b.double(), use_dist).log()

    def labels(self, beta: Tensor) -> Tensor:
        b = _scaling32(beta)
        out = torch.empty(self.kernel.shape[0], dtype=torch.long, device=self.kernel.device)
        for s in range(0, self.kernel.shape[0], self.chunk):
            x = self.kernel[s : s + self.chunk]
            torch.argmax(x.float() * b, dim=1, out=out[s : s + self.chunk])
        return out


class _LogDomainPass:
    """The same evaluation in the log domain (float64), for kernels whose columns underflow float32."""

    def __init__(self, logits: Tensor, row_max: Tensor, lam: float, chunk: int):
        self.logits = logits
        self.row_max = row_max
        self.lam = lam
        self.chunk = max(1, chunk // 2)

    def _log_kernel(self, s: int) -> Tensor:
        x = self.logits[s : s + self.chunk].double()  # (B, K)
        return (x - self.row_max[s : s + self.chunk, None].double()) * self.lam

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


# --------------------------------------------------------------------------------------------------------
# the outer iteration: Anderson-accelerated fixed point on beta = log b


def _anderson_solve(
    pass_fn, c: Tensor, beta: Tensor, n_total: int, tol: float, max_iter: int, use_dist: bool
) -> tuple[Tensor, int, float]:
    """Find beta with column marginal c. Plain Sinkhorn is beta <- beta + log c - log col(beta).

    Anderson acceleration (type II, memory m) extrapolates from the last m iterates and residuals;
    if a step increases the error, history is dropped and a plain step is taken from the best iterate.
    Returns (beta, passes, error at the returned beta).
    """
    log_c = c.log()
    xs: list[Tensor] = []
    fs: list[Tensor] = []
    best: tuple[float, Tensor, Tensor] | None = None
    last_progress = 0
    for it in range(1, max_iter + 1):
        log_col = pass_fn.log_column_mass(beta, use_dist) - math.log(n_total)  # (K,)
        err = marginal_error(log_col.exp(), c)  # col sums to 1
        f = log_c - log_col  # residual of the fixed-point map
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
    assert best is not None
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


@torch.no_grad()
def soft_codes(
    scores: Tensor, *, epsilon: float = 0.05, n_iter: int = 3, distributed: bool | None = None
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

    Returns:
        (B, K) float32 codes, each row a probability vector.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (B, K) with K >= 2, got shape {tuple(scores.shape)}")
    if epsilon <= 0 or n_iter < 1:
        raise ValueError(f"epsilon must be > 0 and n_iter >= 1, got {epsilon}, {n_iter}")
    use_dist = _use_distributed(distributed)
    z = scores.float() / epsilon
    z = (
        z - z.max(1, keepdim=True).values
    )  # a per-row shift (absorbed by the row scaling): every row keeps a 1
    q = z.exp_()  # (B, K)
    for _ in range(n_iter):
        q /= _all_reduce(q.sum(0), use_dist).clamp_min_(1e-30)  # columns: 1 each (then x B / K)
        q /= q.sum(1, keepdim=True).clamp_min_(1e-30)  # rows: 1 each
    return q
