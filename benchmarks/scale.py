"""The label step of one head at ImageNet scale: N = 1,281,167 images, K = 3000 clusters, D = 2048.

Measures what one SeLa label step costs per head, on 1 CPU process, on 2 gloo processes (each holding
half the rows, as ``torchrun --nproc_per_node=2`` would give them) and, when CUDA is available, on one
GPU: wall time of the logits (features -> head) and of the solve, solver passes, the time and bandwidth
of one pass, and peak memory per process.

The problem is synthetic but shaped like the first label step of a randomly initialised ResNet-50:
features are ReLU'd standard normals (non-negative, like pooled ResNet features) and the head is
``nn.Linear(2048, 3000)``'s default initialisation, so each cluster gets its own offset and the argmax
clusters are unbalanced, as in a real first step. Holding all N x D features would take 10.5 GB on top of
the 15.4 GB N x K buffer, more than a 24 GB machine has; instead the features of each chunk of 8192
global rows are drawn from a generator seeded by the chunk's index, turned into logits in the one
preallocated (N / W) x K float32 buffer, and dropped. Chunk c belongs to rank c mod W, so one process
and W processes solve exactly the same problem, and the W-process labels are compared with the
one-process labels row by row. (The GPU draws with CUDA's generator: the same shape of problem, other
numbers.)

The solve is :func:`sela.sinkhorn.assign` in place (no second N x K buffer), as the Trainer does for
large heads; with W processes it all-reduces K-sized vectors each pass. One pass is then timed on its
own: the solver's two matrix-vector products per cache-sized chunk over the (n_r, K) kernel, plus the
all-reduce of the column sums.

Run (full size: ~16 GB of memory for the single process, 2 x 7.7 GB for the two; several minutes):

    python benchmarks/scale.py                      # cpu x1, cpu x2 (gloo), then cuda if present
    python benchmarks/scale.py --n 100000 --k 1000  # a quick check
    python benchmarks/scale.py --modes cuda         # the GPU alone

Measured runs: docs/scaling.md and docs/experiments.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from sela import distributed as dist
from sela.sinkhorn import assign

IMAGENET_N = 1_281_167
CHUNK = 8192  # rows per generated chunk (global row blocks; chunk c belongs to rank c mod W)
PASS_BYTES = 1 << 20  # the solver's CPU chunk: ~1 MiB of kernel rows stays in L2


def _rows_of(rank: int, world: int, n: int) -> list[tuple[int, int]]:
    """(start, stop) global row ranges of the chunks a rank holds."""
    return [(s, min(s + CHUNK, n)) for s in range(rank * CHUNK, n, world * CHUNK)]


def _head(k: int, d: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear(d, k)'s default initialisation: U(-1/sqrt(d), 1/sqrt(d)) for weight (k, d) and bias (k,)."""
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(d)
    weight = (torch.rand(k, d, generator=g) * 2 - 1) * bound
    bias = (torch.rand(k, generator=g) * 2 - 1) * bound
    return weight.to(device), bias.to(device)


def _fill_logits(buf: torch.Tensor, ranges, d: int, weight, bias, seed: int) -> None:
    """buf rows <- relu(features) @ weight.T + bias, features drawn per chunk from a seeded generator."""
    device = buf.device
    gen = torch.Generator(device=device)
    at = 0
    for start, stop in ranges:
        gen.manual_seed(seed * 1_000_003 + start // CHUNK)
        feats = torch.randn(stop - start, d, generator=gen, device=device).relu_()  # (C, D)
        torch.addmm(bias, feats, weight.t(), out=buf[at : at + stop - start])  # (C, K)
        at += stop - start


def _time_pass(kernel: torch.Tensor, scaling: torch.Tensor, repeats: int) -> float:
    """Seconds of one solver pass over this rank's kernel (n_r, K), the all-reduce included."""
    k = kernel.shape[1]
    rows = max(1, (1 << 28) // k) if kernel.is_cuda else max(16, PASS_BYTES // (4 * k))  # as the solver
    b = scaling.float()
    times = []
    for _ in range(repeats):
        _sync(kernel.device)
        t = time.perf_counter()
        col = torch.zeros(k, dtype=torch.float64, device=kernel.device)
        for s in range(0, kernel.shape[0], rows):
            x = kernel[s : s + rows]
            a = torch.mv(x, b).reciprocal_()  # (B,)
            col += torch.mv(x.t(), a)  # (K,)
        if dist.world_size() > 1:
            tdist.all_reduce(col)
        _sync(kernel.device)
        times.append(time.perf_counter() - t)
    return min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(rank: int, world: int, mode: str, args: argparse.Namespace, port: int, tmp: str) -> None:
    device = torch.device("cuda" if mode == "cuda" else "cpu")
    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1"
        )
        os.environ["MASTER_PORT"] = str(port)
        # generous: a rank may wait at the first collective while the other still computes its logits
        dist.init_from_env(device, timeout_s=3600)
    ranges = _rows_of(rank, world, args.n)
    n_local = sum(stop - start for start, stop in ranges)
    weight, bias = _head(args.k, args.d, args.seed, device)
    if device.type == "cuda":  # warm up cuBLAS and the solver's kernels on a small problem
        warm = torch.empty(min(args.n, 4 * CHUNK), args.k, device=device)
        _fill_logits(warm, _rows_of(0, 1, warm.shape[0]), args.d, weight, bias, args.seed)
        assign(warm, lam=args.lam, inplace=True)
        del warm
        torch.cuda.reset_peak_memory_stats(device)
    buf = torch.empty(n_local, args.k, dtype=torch.float32, device=device)  # (n_r, K), the one big buffer
    _sync(device)
    t0 = time.perf_counter()
    _fill_logits(buf, ranges, args.d, weight, bias, args.seed)
    _sync(device)
    t_logits = time.perf_counter() - t0
    raw = torch.zeros(args.k, dtype=torch.long, device=device)  # cluster sizes by argmax of the logits
    for s in range(0, n_local, CHUNK):
        raw += torch.bincount(buf[s : s + CHUNK].argmax(dim=1), minlength=args.k)
    dist.barrier()  # time the solve alone, from a common start
    t0 = time.perf_counter()
    res = assign(buf, lam=args.lam, tol=args.tol, inplace=True)
    _sync(device)
    t_solve = time.perf_counter() - t0
    t_pass = _time_pass(buf, res.scaling, repeats=args.pass_repeats)  # buf now holds the kernel
    warm = None
    if args.warm or device.type == "cuda":  # a later label step: the same logits, warm-started
        _fill_logits(buf, ranges, args.d, weight, bias, args.seed)
        _sync(device)
        t0 = time.perf_counter()
        again = assign(buf, lam=args.lam, tol=args.tol, inplace=True, init=res.scaling)
        _sync(device)
        warm = {"solve_s": time.perf_counter() - t0, "passes": again.n_iter, "error": again.error}
    out = {
        "mode": mode,
        "rank": rank,
        "world": world,
        "threads": torch.get_num_threads(),
        "rows": n_local,
        "logits_s": t_logits,
        "solve_s": t_solve,
        "passes": res.n_iter,
        "error": res.error,
        "converged": res.converged,
        "log_domain": res.log_domain,
        "pass_s": t_pass,
        "pass_gb_s": n_local * args.k * 4 / t_pass / 1e9,
        "buffer_gb": buf.numel() * 4 / 1e9,
        "vmhwm_gb": (dist.resident_peak_bytes() or 0) / 1e9,
        "cuda_peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "sizes": None,
        "raw_sizes": raw.cpu().tolist(),
        "warm": warm,
        "agreement": None,
    }
    # labels: one process keeps them; W processes compare theirs with them, row for row
    labels = res.labels.cpu()
    ref_path = Path(tmp) / "labels_cpu1.pt"
    if mode == "cpu" and world == 1:
        torch.save(labels, ref_path)
    elif mode == "cpu" and ref_path.exists():
        ref = torch.load(ref_path)
        mine = torch.cat([ref[start:stop] for start, stop in ranges])
        out["agreement"] = float((mine == labels).float().mean())
    out["sizes"] = torch.bincount(labels, minlength=args.k).tolist()
    out["scaling"] = res.scaling.cpu().tolist()
    (Path(tmp) / f"{mode}{world}_{rank}.json").write_text(json.dumps(out))
    if world > 1:
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, world: int, args: argparse.Namespace, tmp: str) -> list[dict]:
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, mode, args, port, tmp)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"{mode} x{world}: a process failed (exit codes {[p.exitcode for p in procs]})")
    return [json.loads((Path(tmp) / f"{mode}{world}_{r}.json").read_text()) for r in range(world)]


def _report(results: list[dict], args: argparse.Namespace, ref_scaling: list[float] | None) -> None:
    r0 = results[0]
    name = f"{r0['mode']} x{r0['world']}" + (" (gloo)" if r0["world"] > 1 else "")
    logits = max(r["logits_s"] for r in results)
    solve = max(r["solve_s"] for r in results)
    pass_s = max(r["pass_s"] for r in results)
    print(f"\n{name}: {r0['world']} process(es) x {r0['threads']} thread(s), {r0['rows']:,} rows each")
    print(f"  logits (features -> head, {args.d} -> {args.k}) {logits:8.1f} s")
    print(
        f"  solve (assign, in place)             {solve:8.1f} s   {r0['passes']} passes, "
        f"error {r0['error']:.2e}, converged {r0['converged']}, log domain {r0['log_domain']}"
    )
    print(
        f"  one pass                             {pass_s:8.3f} s   "
        + ", ".join(f"{r['pass_gb_s']:.1f} GB/s" for r in results)
        + " per process"
    )
    print(f"  solve beyond its passes (scan, exp, labels) {solve - r0['passes'] * pass_s:.1f} s")
    print(
        "  peak resident memory (VmHWM)         "
        + ", ".join(f"{r['vmhwm_gb']:.2f} GB" for r in results)
        + f"  (N x K buffer {sum(r['buffer_gb'] for r in results):.2f} GB in all)"
    )
    if r0["warm"] is not None:
        w = r0["warm"]
        print(
            f"  warm-started solve (same logits)     {w['solve_s']:8.3f} s   "
            f"{w['passes']} passes, error {w['error']:.2e}"
        )
    if r0["cuda_peak_gb"] is not None:
        print(f"  peak CUDA memory allocated           {r0['cuda_peak_gb']:.2f} GB")
    sizes = torch.tensor([r["sizes"] for r in results]).sum(0)  # (K,) over all ranks
    raw = torch.tensor([r["raw_sizes"] for r in results]).sum(0)
    print(
        f"  cluster sizes {int(sizes.min()):,} to {int(sizes.max()):,} rows (N / K = {args.n / args.k:,.0f});"
        f" by argmax of the logits {int(raw.min()):,} to {int(raw.max()):,}"
    )
    if results[0]["agreement"] is not None:
        agree = sum(r["agreement"] * r["rows"] for r in results) / args.n
        diff = max(abs(math.log(a) - math.log(b)) for a, b in zip(r0["scaling"], ref_scaling, strict=True))
        print(f"  labels equal to one process's: {100 * agree:.4f} %; max |log b - log b_1| = {diff:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=IMAGENET_N, help="images N (default ImageNet's 1,281,167)")
    p.add_argument("--k", type=int, default=3000, help="clusters K of the head (3000)")
    p.add_argument("--d", type=int, default=2048, help="feature dimension D (2048, ResNet-50)")
    p.add_argument("--lam", type=float, default=25.0, help="lambda of the solver (25)")
    p.add_argument("--tol", type=float, default=1e-3, help="solver tolerance (the Trainer's 1e-3)")
    p.add_argument("--modes", default="cpu1,cpu2,cuda", help="any of cpu1, cpu2, cuda (skipped without CUDA)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per process (1: cpu x2 then uses twice the cores of cpu x1; more threads "
        "on cores that other work shares stall at every chunk's parallel region)",
    )
    p.add_argument("--pass-repeats", type=int, default=3, help="timings of one pass (the best is kept)")
    p.add_argument(
        "--warm",
        action="store_true",
        help="on CPU too, time a warm-started solve (recomputes the logits; always done on a GPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    modes = args.modes.split(",")
    if set(modes) - {"cpu1", "cpu2", "cuda"}:
        raise SystemExit(f"--modes takes cpu1, cpu2 and cuda; got {args.modes!r}")
    print(
        f"label step of one head: N = {args.n:,}, K = {args.k}, D = {args.d}, lambda = {args.lam}, "
        f"tol = {args.tol}; N x K float32 = {args.n * args.k * 4 / 1e9:.2f} GB; torch {torch.__version__}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    ref = None
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            if mode == "cuda" and not torch.cuda.is_available():
                print("\ncuda: no CUDA device, skipped")
                continue
            if mode == "cuda":
                print(f"\ndevice: {torch.cuda.get_device_name(0)}")
            results = _run("cuda" if mode == "cuda" else "cpu", 2 if mode == "cpu2" else 1, args, tmp)
            if mode == "cpu1":
                ref = results[0]["scaling"]
            elif mode == "cpu2" and ref is None:
                for r in results:
                    r["agreement"] = None  # nothing to compare with
            _report(results, args, ref)
            print(f"  (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
