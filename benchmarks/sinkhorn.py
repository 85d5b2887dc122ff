"""The label solver against the original SeLa Sinkhorn-Knopp on logits that look like real use.

For each problem (logits of N samples over K clusters, lam = 25) a fresh process measures, in one run:

* ``sela``: :func:`sela.sinkhorn.assign` from a cold start at its default tol (1e-3), 1 thread;
* ``original``: a faithful NumPy float64 transcription of the original code's ``optimize_L_sk``
  (github.com/yukimasano/self-label, ``sinkhornknopp.py``): P = softmax(logits)^lam in float64, stored
  K x N; r = 1/K, c = 1/N; repeat r = (1/K) / (P c), c_new = (1/N) / (r^T P); every 10th iteration
  err = nansum(|c / c_new - 1|); c = c_new; until err < 0.1; labels = argmax_k of P * c * r. Its time
  includes the softmax and the power, as ``assign``'s includes building its kernel from the logits;
* ``warm``: ``assign`` again after the logits moved a little (``logits + 0.05 * noise``, as between two
  epochs), started from the cold solve's scaling (``init=``);
* ``floor``: one read pass over the N x K float32 logits (``torch.mv``), the least any solver that looks
  at every entry once can cost; "x floor" is sela's time over (floor x its passes);
* agreement ("agree %"): labels equal to those of a converged solve, ``assign(tol=1e-6)`` (its error
  printed as "ref err"); "path": which path ``assign`` took (float32; "+N absorb": the scaling was
  absorbed into the kernel N times; "log": the float64 log domain finished the solve).

Problems (``--problems``, default all that apply):

* ``randn``: ``randn(N, K) * 3``, i.i.d. logits: each sample has one clearly preferred cluster, clusters
  are balanced on average;
* ``lowrank``: ``x @ w``, x ~ N(0, 1) (N, 64), w ~ 0.3 N(0, 1) (64, K) (logits of std ~2.4): a linear head
  on 64-dimensional features, so the logits have rank 64 and some clusters are far from every sample
  (their scaling must span more than float32's range);
* ``checkpoint``: the logits of a trained sela model's heads over its training set (``--checkpoint``,
  a run directory or checkpoint; every head, each its own problem; N and K are the run's). Extracting
  them is a forward pass over the data (minutes on a CPU); ``--logits-cache FILE`` keeps them.

Busy machine (``--busy``): for ``randn`` and ``lowrank``, ``assign`` is timed quiet with 1 thread, then
with one spinning process per core (``os.cpu_count()`` of them, started and stopped by this script)
with torch's default thread count (one per core) and the solver's default ``threads``, and with 1
thread. "busy ratio" is the default-thread time under load over the quiet 1-thread time.

Run:

    python benchmarks/sinkhorn.py                                  # randn + lowrank, 100,000 x 1,000
    python benchmarks/sinkhorn.py --busy --checkpoint runs/c10     # + busy machine + a trained model
    python benchmarks/sinkhorn.py --sizes 10000x128 --no-original  # quick

The machine may be shared: the header prints the load average before and after; compare ratios, which
share the load, rather than absolute times across runs. Every size runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

REF_TOL = 1e-6
WARM_NOISE = 0.05
LOWRANK_D, LOWRANK_SCALE = 64, 0.3
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------------------------------------
# the original algorithm


def original_sela(logits: np.ndarray, lam: float, max_iter: int = 100_000) -> tuple[np.ndarray, int]:
    """SeLa's original ``optimize_L_sk`` in NumPy float64. Returns (labels (N,), iterations)."""
    n, k = logits.shape
    ps = logits.astype(np.float64)  # (N, K)
    ps -= ps.max(axis=1, keepdims=True)
    np.exp(ps, out=ps)
    ps /= ps.sum(axis=1, keepdims=True)  # softmax, as the network's output
    ps = ps.T  # (K, N), a view, as in the original
    ps **= lam
    r = np.ones((k, 1)) / k
    c = np.ones((n, 1)) / n
    inv_k, inv_n = 1.0 / k, 1.0 / n
    err, it = 1e6, 0
    while err > 1e-1 and it < max_iter:
        r = inv_k / (ps @ c)  # (K, 1)
        c_new = inv_n / (r.T @ ps).T  # (N, 1)
        if it % 10 == 0:
            err = np.nansum(np.abs(c / c_new - 1))
        c = c_new
        it += 1
    ps *= np.squeeze(c)  # in place, as the original: argmax_k of P * c * r
    ps = ps.T
    ps *= np.squeeze(r)
    ps = ps.T
    return np.nanargmax(ps, 0), it


# --------------------------------------------------------------------------------------------------------
# problems


def make_logits(problem: str, n: int, k: int, seed: int, cache: str | None = None) -> torch.Tensor:
    """(N, K) float32 logits of a problem (for ``checkpoint:<head>``, read from ``cache``)."""
    g = torch.Generator().manual_seed(seed)
    if problem == "randn":
        return torch.randn(n, k, generator=g).mul_(3.0)
    if problem == "lowrank":
        x = torch.randn(n, LOWRANK_D, generator=g)  # (N, D) features
        w = torch.randn(LOWRANK_D, k, generator=g).mul_(LOWRANK_SCALE)  # (D, K) a linear head
        return x @ w  # (N, K), rank D
    if problem.startswith("checkpoint:"):
        return torch.load(cache)[int(problem.split(":")[1])].float().contiguous()
    raise ValueError(f"unknown problem {problem!r}")


def checkpoint_logits(source: str, cache: str) -> list[tuple[int, int]]:
    """Extract every head's logits of a trained run over its training set into ``cache``; (N, K) per head."""
    if not os.path.exists(cache):
        from sela.eval.features import extract
        from sela.runs import load_run

        run = load_run(source, test_split=False)
        ex = extract(run.model, run.train_set.images, transform=run.transform, batch_size=512, progress=False)
        torch.save([lg.float() for lg in ex.logits], cache)
    return [tuple(lg.shape) for lg in torch.load(cache)]


# --------------------------------------------------------------------------------------------------------
# one problem, in its own process


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(fn):
    """(result, seconds, MB added at peak) of fn()."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, seconds, (_status_kb("VmHWM") - before) / 1024


def _path(res) -> str:
    path = "float32" + (f" +{res.n_absorb} absorb" if res.n_absorb else "")
    return path + (" +log" if res.log_domain else "")


def _busy(x: torch.Tensor, lam: float, default_threads: int) -> dict:
    """Quiet 1-thread time, then times with one spinning process per core."""
    from sela.sinkhorn import assign

    def timed(threads: int | None, torch_threads: int) -> float:
        torch.set_num_threads(torch_threads)
        t0, c0 = time.perf_counter(), time.process_time()
        assign(x, lam=lam, threads=threads)
        seconds = time.perf_counter() - t0
        cpu.append((time.process_time() - c0) / seconds)  # cores this process got on average
        return seconds

    cpu: list[float] = []

    quiet = min(timed(1, 1) for _ in range(2))
    quiet_cpu = cpu[-1]
    spin = [sys.executable, "-c", "while True: pass"]
    procs = [subprocess.Popen(spin) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(1.0)
        busy_default = [timed(None, default_threads) for _ in range(2)]
        busy_one = [timed(1, 1) for _ in range(2)]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {
        "quiet1": quiet,
        "busy_default": max(busy_default),
        "busy1": max(busy_one),
        "cpu": [quiet_cpu, max(cpu[-4:-2]), max(cpu[-2:])],
        "load": os.getloadavg()[0],
    }


def run_problem(problem: str, n: int, k: int, args: argparse.Namespace) -> dict:
    from sela.sinkhorn import assign

    out: dict = {"problem": problem, "n": n, "k": k}
    assign(torch.randn(64, 8), lam=args.lam)  # load kernels outside the measurements
    x = make_logits(problem, n, k, args.seed, args.logits_cache)
    out["std"] = float(x.std())
    ones = torch.ones(k)
    out["floor_s"] = min(_measure(lambda: torch.mv(x, ones))[1] for _ in range(3))

    ref = assign(x, lam=args.lam, tol=REF_TOL, max_iter=5000)
    out["ref"] = {"err": ref.error, "iter": ref.n_iter, "path": _path(ref)}

    res, sec, mb = _measure(lambda: assign(x, lam=args.lam))
    out["sela"] = {
        "s": sec,
        "iter": res.n_iter,
        "mb": mb,
        "agree": float((res.labels == ref.labels).double().mean()),
        "err": res.error,
        "path": _path(res),
        "imbalance": res.imbalance,
    }

    if args.original and n * k * 8 <= args.max_gb_original * 1e9:
        x_np = x.numpy()
        (labels, iters), sec, mb = _measure(lambda: original_sela(x_np, args.lam))
        out["original"] = {
            "s": sec,
            "iter": iters,
            "mb": mb,
            "agree": float((torch.from_numpy(labels) == ref.labels).double().mean()),
        }
        del labels

    if args.busy and not problem.startswith("checkpoint"):
        out["busy"] = _busy(x, args.lam, os.cpu_count() or 1)
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(args.seed + 1)
    for s in range(0, n, 65536):  # the next epoch: logits moved a little, solved from the last scaling
        x[s : s + 65536] += WARM_NOISE * torch.randn(x[s : s + 65536].shape, generator=g)
    res2, sec, mb = _measure(lambda: assign(x, lam=args.lam, init=res.scaling))
    out["warm"] = {"s": sec, "iter": res2.n_iter, "mb": mb, "err": res2.error}
    return out


# --------------------------------------------------------------------------------------------------------
# the table


def _sizes(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        n, k = item.lower().split("x")
        out.append((int(float(n)), int(float(k))))
    return out


def _row(*cols) -> str:
    widths = (11, 9, 6, 9, 6, 8, 8, 8, 8, 8)
    cells = [
        f"{c:>{w}}" if i != 0 else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cols, widths, strict=False))
    ]
    return " ".join(cells) + ("  " + cols[len(widths)] if len(cols) > len(widths) else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _fmt_s(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000x1000", help="NxK[,NxK...] for randn and lowrank")
    parser.add_argument("--problems", default="randn,lowrank", help="randn, lowrank (comma-separated)")
    parser.add_argument(
        "--checkpoint", help="a trained sela run (directory or checkpoint): its heads' logits"
    )
    parser.add_argument("--logits-cache", help="file for the checkpoint's logits (default: next to /tmp)")
    parser.add_argument("--busy", action="store_true", help="also time randn/lowrank with every core loaded")
    parser.add_argument("--lam", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-original", dest="original", action="store_false", help="skip the original")
    parser.add_argument("--max-gb-original", type=float, default=6.0, help="N K 8 bytes limit (default 6)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and NumPy (default 1)")
    parser.add_argument("--worker", nargs=3, metavar=("PROBLEM", "N", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        torch.set_num_threads(args.threads)
        problem, n, k = args.worker
        print(json.dumps(run_problem(problem, int(n), int(k), args)))
        return

    load0 = os.getloadavg()
    print(f"# sela.sinkhorn.assign vs the original SeLa Sinkhorn-Knopp (NumPy float64); lam = {args.lam:g}")
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(
        f"# machine: {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"numpy {np.__version__}, {args.threads} thread(s) each; "
        f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start"
    )
    print("# time: wall seconds of the whole call; iter: passes over N x K (original: iterations, 2 matvecs)")
    print(f"# agree: labels equal to assign(tol={REF_TOL:g}); x floor: time / (one mv pass x passes)")
    print()
    jobs = [(p, n, k) for p in args.problems.split(",") if p for n, k in _sizes(args.sizes)]
    if args.checkpoint:
        cache = args.logits_cache or "/tmp/sela_bench_checkpoint_logits.pt"
        args.logits_cache = cache
        shapes = checkpoint_logits(args.checkpoint, cache)
        jobs += [(f"checkpoint:{h}", n, k) for h, (n, k) in enumerate(shapes)]
        print(f"# checkpoint: {args.checkpoint}, {len(shapes)} heads, logits cached in {cache}")
    print(
        _row(
            "problem", "N", "K", "method", "time s", "iter", "agree %", "ratio", "x floor", "peak MB", "notes"
        )
    )
    busy_rows = []
    for problem, n, k in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", problem, str(n), str(k)]
        cmd += ["--lam", str(args.lam), "--seed", str(args.seed), "--threads", str(args.threads)]
        cmd += ["--max-gb-original", str(args.max_gb_original)]
        cmd += ["--logits-cache", args.logits_cache] if args.logits_cache else []
        cmd += [] if args.original else ["--no-original"]
        cmd += ["--busy"] if args.busy else []
        env = dict(os.environ, **{v: str(args.threads) for v in THREAD_VARS})  # read when NumPy loads
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(_row(problem, f"{n:,}", k, "-", "-", "-", "-", "", "", "", proc.stderr.strip()[-300:]))
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        s, o, w, ref = r["sela"], r.get("original"), r["warm"], r["ref"]
        ratio = f"{o['s'] / s['s']:.1f}x" if o else ""
        x_floor = f"{s['s'] / (r['floor_s'] * s['iter']):.1f}"
        note = f"path {s['path']}; error {s['err']:.1e}; imbalance {s['imbalance']:.3f}; "
        note += f"logit std {r['std']:.2f}; "
        note += f"ref err {ref['err']:.1e} ({ref['iter']} passes, {ref['path']})"
        row = (problem, f"{n:,}", k)
        print(
            _row(
                *row,
                "sela",
                _fmt_s(s["s"]),
                s["iter"],
                f"{100 * s['agree']:.3f}",
                ratio,
                x_floor,
                f"{s['mb']:.0f}",
                note,
            )
        )
        if o:
            print(
                _row(
                    *row,
                    "original",
                    _fmt_s(o["s"]),
                    o["iter"],
                    f"{100 * o['agree']:.3f}",
                    "",
                    "",
                    f"{o['mb']:.0f}",
                )
            )
        print(
            _row(
                *row, "warm", _fmt_s(w["s"]), w["iter"], "", "", "", f"{w['mb']:.0f}", f"error {w['err']:.1e}"
            )
        )
        print(
            _row(*row, "floor", _fmt_s(r["floor_s"]), 1, "", "", "", "", "one read pass (torch.mv)"),
            flush=True,
        )
        if "busy" in r:
            busy_rows.append((problem, n, k, r["busy"]))
    if busy_rows:
        print(f"\n# busy machine: {os.cpu_count()} spinning processes (one per core) next to the solver")
        print("# cores: CPU seconds over wall seconds of the call, the share of the machine it got")
        print(
            f"{'problem':<11} {'N':>9} {'K':>6} {'quiet 1 thr':>12} {'busy default':>13} {'busy 1 thr':>11} "
            f"{'busy ratio':>11}  cores (quiet, busy default, busy 1 thr); load after"
        )
        for problem, n, k, b in busy_rows:
            ratio = b["busy_default"] / b["quiet1"]
            print(
                f"{problem:<11} {n:>9,} {k:>6} {b['quiet1']:>12.2f} {b['busy_default']:>13.2f} "
                f"{b['busy1']:>11.2f} {ratio:>10.2f}x  {b['cpu'][0]:.2f}, {b['cpu'][1]:.2f}, "
                f"{b['cpu'][2]:.2f}; {b['load']:.1f}"
            )
    load1 = os.getloadavg()
    print(f"\n# load average {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} (1/5/15 min) at end")


if __name__ == "__main__":
    main()
