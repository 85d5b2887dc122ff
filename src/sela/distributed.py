"""Thin helpers over ``torch.distributed`` (launched by ``torchrun``); no process management of our own.

Rows of the dataset are split across ranks by striding: rank r holds global rows r, r + W, r + 2W, ...
(W = world size), so every rank's share differs in size by at most one row.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor


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

    The collective timeout bounds how long the survivors wait when a rank dies: they then fail with an
    error instead of hanging, and torchrun's elastic agent tears the job down.
    """
    if is_initialized() or not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return is_initialized()
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
    """Assemble the (n, ...) tensor whose strided rows each rank holds (see :func:`shard_rows`)."""
    world = world_size()
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


def all_reduce_mean(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size()


def barrier() -> None:
    if is_initialized():
        dist.barrier()
