"""Thin helpers over ``torch.distributed`` (launched by ``torchrun``); no process management of our own.

Rows of the dataset are split across ranks by striding: rank r holds global rows r, r + W, r + 2W, ...
(W = world size), so every rank's share differs in size by at most one row. Also here: per-process peak
memory, which is what limits how many rows (N / W) one rank can label.

Every collective here must be called by all ranks in the same order; none is called by rank 0 alone.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether the environment of ``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR) is present."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def init_from_env(device: torch.device, *, timeout_s: float = 300.0) -> bool:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); False when not launched so.

    The collective timeout bounds how long the survivors wait when a rank dies or hangs: they then fail
    with an error instead of hanging, and torchrun's elastic agent tears the job down. (A rank that exits
    is usually noticed at once by gloo, as a closed connection; the timeout covers a rank that hangs.)
    """
    if is_initialized() or not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return is_initialized()
    if timeout_s <= 0:
        raise ValueError(f"the collective timeout must be positive, got {timeout_s} s")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shard_rows(n: int, rank_: int | None = None, world: int | None = None) -> Tensor:
    """Global row indices (n_r,) held by a rank: rank, rank + W, ..."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return torch.arange(rank_, n, world)


def gather_rows(local: Tensor, n: int) -> Tensor:
    """Assemble on every rank the (n, ...) tensor whose strided rows each rank holds (see :func:`shard_rows`).

    Sends ceil(n / W) rows per rank (zero-padded), so the traffic is about n rows in all, whatever W.
    """
    world = world_size()
    expected = len(range(rank(), n, world))
    if local.shape[0] != expected:
        raise ValueError(
            f"rank {rank()} holds {local.shape[0]} rows but its shard of {n} rows has {expected}; "
            "pass the rows of sela.distributed.shard_rows(n) in order"
        )
    if world == 1:
        return local
    per = -(-n // world)  # ceil: every rank sends the same number of rows, padded
    padded = local.new_zeros((per, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    # row j of rank r is global row r + j * W
    full = torch.stack(parts, dim=1).reshape(world * per, *local.shape[1:])  # (per, W, ...) -> rows
    return full[:n]


def scatter_rows(local: Tensor, rows: Tensor, n: int) -> Tensor:
    """Combine per-rank values >= 0 (n_r, ...) for disjoint global ``rows`` (n_r,) into one (n, ...) tensor
    on every rank (integers as int64, floats as they are); rows that no rank holds are -1. One all-reduce
    (max) of n x ... values."""
    if local.shape[:1] != rows.shape:
        raise ValueError(f"{local.shape[0]} values for {rows.shape[0]} rows; give one value per row")
    local = local if local.is_floating_point() else local.long()
    full = torch.full((n, *local.shape[1:]), -1, dtype=local.dtype, device=local.device)
    full[rows.to(local.device)] = local
    if world_size() > 1:
        dist.all_reduce(full, op=dist.ReduceOp.MAX)
    return full


def all_reduce_mean(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size()


def all_reduce_max(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks, in place (unchanged in a single process); returns it."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Replace every floating-point buffer (BatchNorm running mean and variance) by its mean over ranks.

    Each rank's running statistics drift apart during training (each follows its own batches); the label
    step must see one network on all ranks, or the same image would be scored differently by each.
    """
    if world_size() == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world_size())


def barrier() -> None:
    if is_initialized():
        dist.barrier()


class PeerFailed(RuntimeError):
    """Another process of a distributed run stopped (killed, crashed, or timed out): this one stops too."""


# how torch's backends word a collective that lost a peer (gloo: a closed or reset connection; NCCL:
# a remote error or the watchdog's timeout)
_PEER_LOST = (
    "Connection closed",
    "Connection reset",
    "Broken pipe",
    "peer",
    "NCCL",
    "Gloo",
    "gloo",
    "timed out",
)


@contextlib.contextmanager
def peer_failures(what: str = "the run"):
    """Turn the error a collective raises when another rank has died into one :class:`PeerFailed` line
    (rank, what happened, the backend's first line) instead of a traceback; single-process errors pass."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, PeerFailed) or world_size() < 2:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        lost = isinstance(e, getattr(dist, "DistBackendError", ())) or any(s in str(e) for s in _PEER_LOST)
        if not lost:
            raise
        raise PeerFailed(
            f"rank {rank()} of {world_size()}: another process of {what} stopped ({first[:200]}); "
            "the last checkpoint is kept: start all processes again with --resume"
        ) from None


# --------------------------------------------------------------------------------------------------------
# peak memory of this process


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; False when this platform cannot (then peaks are unknown).

    On a GPU the window is CUDA's allocator peak; on CPU it is the peak resident set size (VmHWM).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux >= 4.0: writing 5 resets the peak resident set size to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak since :func:`reset_peak_memory`: bytes allocated by torch on a GPU (``max_memory_allocated``),
    or this process's peak resident memory (VmHWM, everything the process holds) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resident_peak_bytes()


def resident_peak_bytes() -> int | None:
    """This process's peak resident set size (VmHWM of /proc/self/status), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        return None
    return None
