"""The suite: sela's default command at one budget on every set of benchmarks/suite_sets.py, against two floors.

    python benchmarks/suite.py --minutes 10                          # every set, 2 runs at a time
    python benchmarks/suite.py --sets cifar10-2k --minutes 0.5       # a smoke test
    python benchmarks/suite.py --floors-only                          # make the sets, measure the floors
    python benchmarks/suite.py --extra-args "--set augment.flip_p=0"  # a rule against the default

Per set (made once into ``--sets-dir``, default /tmp/sela-suite/sets, from /tmp/data; see suite_sets.py):

  * the floors, with sela's own reader (``sela.build.load_splits``, as ``sela train`` reads the folder) and
    sela's own kNN (``sela.eval.knn.knn_accuracy`` with the run's ``eval.knn_k`` and ``eval.knn_temperature``,
    k = 200, T = 0.1: what summary.json's ``knn_top1`` is), train split -> test split:
      - raw pixels: the images at the set's side, flattened, the training split's mean image subtracted
        (the protocol of ../shared/README.md's reference floors: 23.72 % on Imagewoof64 against its 23.7 %),
        then L2-normalised by the kNN; ``raw_plain`` (no mean subtracted) is recorded too;
      - a random network: the network the default recipe builds for this set on this device (``sela.build``:
        ``resolve`` then ``build_model``, seeded with ``runtime.seed``, i.e. the network at epoch 0), its
        pooled features of whole images at the run's ``eval.size`` (``EvalTransform``), float32.
    They are cached in ``<set>/floors.json`` under the settings they depend on;
  * sela's run: ``python -m sela train --dataset folder --data-dir SET --time-limit MINUTES --out RUNS/<set>
    --no-progress`` and ``--extra-args`` (the test split is the set's ``test/`` folder, which ``sela train``
    reads itself), with ``OMP_NUM_THREADS=1`` (sela has no thread flag), ``--parallel`` at a time. A set whose
    run already finished in ``--out`` is collected again, not re-run.

From each run's summary.json: kNN top-1/top-5, the best head's NMI on the test split and of its self-labels,
epochs, times, the label passes' share of the time, the balance of the best head's clusters, and the
``signals`` and ``verdict`` entries when sela writes them; from its log, the recipe line.

Output in ``--out`` (default /tmp/sela-suite/out-<time>): suite.json (everything), suite.md (the table; with
signals, their Spearman correlation with kNN and with the margin over the runs), suite.png (per set the two
floors and sela's kNN). The check "floors + 3 points": sela's kNN at least 3 points above the better floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite_sets  # noqa: E402

ROOT = Path("/tmp/sela-suite")
FLOORS_FILE = "floors.json"
FLOORS_VERSION = 1  # bump when the floors' protocol changes: cached floors are then measured again
MARGIN = 3.0  # points above the better floor that a run must reach


# -------------------------------------------------------------------------------------------------- floors


def _floor_inputs(set_dir: Path):
    """The set's splits as ``sela train`` reads them, the configuration the default command resolves to
    for them, and the device it would take (CUDA when available)."""
    from sela.build import load_splits, resolve, resolve_device, settings_before_data, user_settings

    user = user_settings({"data.dataset": "folder", "data.data_dir": str(set_dir)})
    train_set, test_set = load_splits(settings_before_data(user))
    if test_set is None or test_set.targets is None:
        raise ValueError(f"{set_dir} has no labelled test split; the floors need test/<class>/ images")
    device = resolve_device("auto")
    return train_set, test_set, resolve(user, train_set, device).config, device


def _floor_key(cfg, device) -> dict:
    """What the floors depend on besides the images: sela's kNN settings and the random network."""
    import sela
    from sela.config import to_dict

    return {
        "version": FLOORS_VERSION,
        "sela": sela.__version__,
        "device": device.type,
        "recipe": cfg.recipe,
        "model": to_dict(cfg)["model"],
        "eval_size": cfg.eval.size,
        "knn_k": cfg.eval.knn_k,
        "knn_temperature": cfg.eval.knn_temperature,
    }


def raw_pixel_knn(train_set, test_set, *, centre: bool, **knn) -> float:
    """kNN top-1 (percent) of the flattened uint8 pixels scaled to [0, 1], minus the training split's mean
    image when ``centre`` (the kNN L2-normalises each row)."""
    import torch

    from sela.eval.knn import knn_accuracy

    bank = train_set.images.reshape(len(train_set), -1).float() / 255  # (N, C*H*W)
    query = test_set.images.reshape(len(test_set), -1).float() / 255  # (M, C*H*W)
    if centre:
        mean = bank.mean(dim=0, keepdim=True)  # (1, C*H*W)
        bank, query = bank - mean, query - mean
    with torch.no_grad():
        return knn_accuracy(bank, train_set.targets, query, test_set.targets, **knn)["top1"]


def random_net_knn(cfg, train_set, test_set, *, device, **knn) -> float:
    """kNN top-1 (percent) of the pooled features of the run's network, freshly initialised (seed
    ``runtime.seed``), on whole images at ``eval.size`` px normalised with the training split's statistics."""
    from sela.build import build_model, build_objective
    from sela.data import EvalTransform
    from sela.eval.features import extract
    from sela.eval.knn import knn_accuracy

    objective = build_objective(cfg, train_set, device)
    model = build_model(cfg, train_set, cosine_heads=objective.cosine_heads, init=False).to(device)
    transform = EvalTransform(cfg.eval.size, mean=train_set.mean, std=train_set.std).to(device)
    opts = dict(transform=transform, device=device, heads=False, progress=False)
    bank = extract(model, train_set.images, **opts).features  # (N, D)
    query = extract(model, test_set.images, **opts).features  # (M, D)
    return knn_accuracy(bank, train_set.targets, query, test_set.targets, device=device, **knn)["top1"]


def floors(set_dir: Path, *, compute: bool = True) -> dict | None:
    """The set's floors (percent) and what they were measured with; read from ``floors.json`` when it was
    written under the same settings, else measured (when ``compute``) and written; None when not known."""
    path = set_dir / FLOORS_FILE
    cached = json.loads(path.read_text()) if path.is_file() else None
    if not compute:
        return cached
    train_set, test_set, cfg, device = _floor_inputs(set_dir)
    key = _floor_key(cfg, device)
    if cached is not None and cached.get("key") == key:
        return cached
    start = time.perf_counter()
    knn = dict(k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature, device=device)
    result = {
        "raw": raw_pixel_knn(train_set, test_set, centre=True, **knn),
        "raw_plain": raw_pixel_knn(train_set, test_set, centre=False, **knn),
        "random": random_net_knn(cfg, train_set, test_set, **knn),
        "n_train": len(train_set),
        "n_test": len(test_set),
        "side": train_set.side(None),
        "key": key,
    }
    result["time_s"] = round(time.perf_counter() - start, 1)
    path.write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------------- runs


def sela_command(set_dir: Path, minutes: float, out: Path, extra: list[str]) -> list[str]:
    """The default command on ``set_dir`` with a budget, its run directory and ``extra``."""
    return [
        sys.executable, "-m", "sela", "train", "--dataset", "folder", "--data-dir", str(set_dir),
        "--time-limit", f"{minutes:g}", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def child_env(threads: int) -> dict[str, str]:
    """The environment of a run: ``threads`` OpenMP/MKL threads, this sela first on ``PYTHONPATH``."""
    import sela

    src = str(Path(sela.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_set(name: str, set_dir: Path, runs: Path, *, minutes: float, extra: list[str], env: dict) -> dict:
    """Run the command on one set (its log in ``runs/<name>.log``) unless its run already finished; returns
    the command, the exit status and the wall time (s)."""
    out, log = runs / name, runs / f"{name}.log"
    cmd = sela_command(set_dir, minutes, out, extra)
    if (out / "summary.json").is_file():
        return {"command": shlex.join(cmd), "rc": 0, "reused": True}
    if out.exists():
        return {"command": shlex.join(cmd), "rc": None,
                "error": f"{out} holds an unfinished run; delete it or choose another --out"}  # fmt: skip
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    return {"command": shlex.join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - start, 1)}


def _recipe_line(log: Path) -> str | None:
    """The line sela printed about the recipe it chose, from the run's log."""
    if not log.is_file():
        return None
    return next((line for line in log.read_text().splitlines() if line.startswith("recipe ")), None)


def collect(run_dir: Path, log: Path) -> dict:
    """The figures of one finished run (summary.json) and its recipe line (the log); the log's last lines
    as ``error`` when there is no summary."""
    path = run_dir / "summary.json"
    row: dict = {"recipe_line": _recipe_line(log)}
    if not path.is_file():
        tail = log.read_text().strip().splitlines()[-3:] if log.is_file() else []
        return {**row, "error": " | ".join(tail) or "no summary.json and no log"}
    s = json.loads(path.read_text())
    keys = ("knn_top1", "knn_top5", "nmi", "ami", "many_to_one", "best_head", "epochs", "label_updates",
            "train_time_s", "label_time_s", "label_share", "eval_time_s", "signals", "verdict")  # fmt: skip
    row.update({k: s[k] for k in keys if k in s})
    config = run_dir / "config.json"
    if config.is_file():  # the side it trained at: the budget may have chosen a smaller one than the set's
        row["train_side"] = json.loads(config.read_text()).get("_data", {}).get("side")
    heads = {h["head"]: h for h in s.get("heads", [])}
    best = heads.get(s.get("best_head"), {})
    if "self_labels" in best:
        row["self_label_nmi"] = best["self_labels"]["nmi"]
    if "sizes" in best:
        sizes = best["sizes"]
        row.update(balance=sizes["normalized_entropy"], smallest=sizes["min"], largest=sizes["max"],
                   empty=sizes["n_empty"], k=best["k"])  # fmt: skip
    return row


def run_all(names: list[str], dirs: dict[str, Path], runs: Path, *, parallel: int, **opts) -> dict[str, dict]:
    """:func:`run_set` on every set, ``parallel`` at a time (one line per finished run), then
    :func:`collect` each."""
    runs.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        jobs = {pool.submit(run_set, n, dirs[n], runs, **opts): n for n in names}
        for done in as_completed(jobs):
            name = jobs[done]
            results[name] = {**done.result(), **collect(runs / name, runs / f"{name}.log")}
            r = results[name]
            shown = f"kNN {r['knn_top1']:.2f} %" if "knn_top1" in r else r.get("error", "")
            print(f"[{len(results)}/{len(names)}] {name}: rc {r['rc']}, {shown}", flush=True)
    return {n: results[n] for n in names}


# ------------------------------------------------------------------------------------------------- report


def numeric_signals(rows: list[dict]) -> list[str]:
    """The signal names that hold a number in at least one run, sorted."""
    return sorted({k for r in rows for k, v in (r.get("signals") or {}).items() if _is_number(v)})


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def correlations(rows: list[dict]) -> dict[str, dict]:
    """Spearman's rho (and p) of each numeric signal with sela's kNN and with the margin over the better
    floor, over the runs that have both (at least 3)."""
    from scipy.stats import spearmanr

    out = {}
    for key in numeric_signals(rows):
        entry = {}
        for target in ("knn_top1", "margin"):
            pairs = [(r["signals"][key], r[target]) for r in rows
                     if _is_number((r.get("signals") or {}).get(key)) and r.get(target) is not None]  # fmt: skip
            if len(pairs) >= 3:
                res = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
                entry[target] = {"rho": float(res.statistic), "p": float(res.pvalue), "n": len(pairs)}
        out[key] = entry
    return out


def table_row(row: dict) -> dict:
    """One set's merged record with its margin over the better floor and the +3 check (None when unknown)."""
    f = row.get("floors") or {}
    better = max(f["raw"], f["random"]) if f else None
    knn = row.get("knn_top1")
    margin = None if better is None or knn is None else knn - better
    return {**row, "better_floor": better, "margin": margin, "passes": None if margin is None else margin >= MARGIN}


def _fmt(v, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "pass" if v else "FAIL"
    return format(v, spec) if _is_number(v) else str(v)


def markdown(rows: list[dict], meta: dict, corr: dict) -> str:
    """suite.md: the setup, one table row per set, then the correlations of the signals."""
    signals = numeric_signals(rows)
    head = ["set", "kind", "N train", "side", "trained at", "colour", "raw", "random", "sela kNN", "margin", "+3",
            "NMI", "self-label NMI", "epochs", "balance", *signals]  # fmt: skip
    verdicts = any("verdict" in r for r in rows)
    head += ["verdict"] if verdicts else []
    title = "the floors" if meta.get("floors_only") else f"{meta['minutes']:g} min per set"
    lines = [f"# sela suite: {title}", "",
             f"- {meta.get('date', '')}, sela at {meta.get('commit') or 'an unknown commit'}",
             f"- command per set: `{meta['command']}`",
             f"- extra args: `{meta['extra_args'] or '(none)'}`; {meta['parallel']} runs at a time, "
             f"{meta['threads']} thread(s) each; load average {meta['load_start']} at the start, "
             f"{meta['load_end']} at the end", "- floors and kNN: weighted kNN, k = 200, T = 0.1, train -> test, "
             "percent; margin: sela kNN minus the better floor; +3: margin >= 3 points", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in rows:
        f = r.get("floors") or {}
        cells = [r["set"], r["kind"], r["n_train"], r["side"], _fmt(r.get("train_side"), "d"), r["colour"], _fmt(f.get("raw")),
                 _fmt(f.get("random")), _fmt(r.get("knn_top1")), _fmt(r.get("margin"), "+.2f"),
                 _fmt(r.get("passes")), _fmt(r.get("nmi"), ".3f"), _fmt(r.get("self_label_nmi"), ".3f"),
                 _fmt(r.get("epochs"), "d"), _fmt(r.get("balance"), ".3f"),
                 *(_fmt((r.get("signals") or {}).get(s), ".3f") for s in signals)]  # fmt: skip
        cells += [_verdict(r.get("verdict"))] if verdicts else []
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    failed = [r for r in rows if r.get("error")]
    lines += ["", *(f"- {r['set']}: {r['error']}" for r in failed)] if failed else []
    lines += _correlation_lines(corr)
    recipes = [f"- {r['set']}: {r['recipe_line']}" for r in rows if r.get("recipe_line")]
    return "\n".join([*lines, *(["", "## Recipe lines", "", *recipes] if recipes else [])]) + "\n"


def _verdict(v) -> str:
    """A run's verdict for a table cell: a string as it is, anything else as compact JSON (60 characters)."""
    if v is None:
        return "-"
    text = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    return text.replace("|", "/")[:60]


def _correlation_lines(corr: dict) -> list[str]:
    if not corr:
        return []
    lines = ["", "## Signals against kNN (Spearman over the runs)", "",
             "| signal | rho with kNN | p | rho with margin | p | runs |", "|---|---|---|---|---|---|"]  # fmt: skip
    for key, e in corr.items():
        a, b = e.get("knn_top1", {}), e.get("margin", {})
        lines.append(f"| {key} | {_fmt(a.get('rho'), '+.3f')} | {_fmt(a.get('p'), '.3f')} | "
                     f"{_fmt(b.get('rho'), '+.3f')} | {_fmt(b.get('p'), '.3f')} | {a.get('n', b.get('n', 0))} |")  # fmt: skip
    return lines


def plot(rows: list[dict], path: Path, minutes: float) -> None:
    """suite.png: per set, bars of the raw-pixel floor, the random-network floor and sela's kNN (percent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    bars = [("raw pixels", [(r.get("floors") or {}).get("raw") for r in rows], "#bbbbbb"),
            ("random network", [(r.get("floors") or {}).get("random") for r in rows], "#888888"),
            (f"sela, {minutes:g} min", [r.get("knn_top1") for r in rows], "#1f77b4")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(rows) + 2), 4.5))
    for i, (label, values, colour) in enumerate(bars):
        if all(v is None for v in values):
            continue  # no runs (--floors-only)
        heights = [np.nan if v is None else v for v in values]
        drawn = ax.bar(x + (i - 1) * 0.27, heights, 0.27, label=label, color=colour)
        if i == 2:
            ax.bar_label(drawn, labels=[_fmt(v, ".1f") if v is not None else "" for v in values], fontsize=7)
    target = [np.nan if r.get("better_floor") is None else r["better_floor"] + MARGIN for r in rows]
    ax.scatter(x, target, marker="_", s=400, color="black", label=f"better floor + {MARGIN:g}", zorder=3)
    ax.set_xticks(x, [r["set"] for r in rows], rotation=35, ha="right")
    ax.set_ylabel("kNN top-1, test split (%)")
    ax.set_title(f"sela's default command, {minutes:g} min per set, against its floors", fontsize="medium")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main


def sela_commit() -> str | None:
    """The commit of the sela tree the runs use (``+dirty`` with uncommitted changes), None outside git."""
    import sela

    src = Path(sela.__file__).resolve().parent
    git = ["git", "-C", str(src)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode:
        return None
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=False)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="--time-limit of every run [10]")
    p.add_argument("--sets", default="", help=f"comma list of sets [all: {','.join(suite_sets.BY_NAME)}]")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time [2]")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run [1]")
    p.add_argument("--out", type=Path, default=None, help="output folder [/tmp/sela-suite/out-<time>]")
    p.add_argument("--sets-dir", type=Path, default=ROOT / "sets", help="where the sets are made [%(default)s]")
    p.add_argument("--data", type=Path, default=Path("/tmp/data"), help="the source folders [%(default)s]")
    p.add_argument("--extra-args", default="", help='appended to every sela command, e.g. "--set augment.flip_p=0"')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--floors-only", action="store_true", help="make the sets and measure the floors only")
    mode.add_argument("--skip-floors", action="store_true", help="measure no floors (cached ones are shown)")
    args = p.parse_args(argv)
    if args.parallel < 1 or args.threads < 1 or args.minutes <= 0:
        p.error("--parallel and --threads must be at least 1 and --minutes positive")
    args.out = args.out or ROOT / time.strftime("out-%Y%m%d-%H%M%S")
    return args


def prepare(specs: list[suite_sets.SetSpec], args: argparse.Namespace) -> tuple[dict, dict]:
    """Each set's folder and record (made when missing), then its floors (measured unless --skip-floors)."""
    dirs, records = {}, {}
    args.sets_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        suite_sets.ensure_source(spec.source, args.data)
        print(f"set {spec.name}: ", end="", flush=True)
        start = time.perf_counter()
        dirs[spec.name], records[spec.name] = suite_sets.make_set(spec, args.data, args.sets_dir)
        r = records[spec.name]
        print(f"{r['n_train']} train / {r['n_test']} test, {r['side']} px {r['colour']} "
              f"({time.perf_counter() - start:.1f} s)", end="", flush=True)  # fmt: skip
        f = floors(dirs[spec.name], compute=not args.skip_floors)
        records[spec.name]["floors"] = f
        shown = f"; floors raw {f['raw']:.2f} / random {f['random']:.2f} %" if f else "; floors not measured"
        print(shown, flush=True)
    return dirs, records


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    specs = suite_sets.select([n.strip() for n in args.sets.split(",") if n.strip()])
    extra = shlex.split(args.extra_args)
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = [round(v, 2) for v in os.getloadavg()]
    dirs, records = prepare(specs, args)
    runs = {}
    if not args.floors_only:
        opts = dict(minutes=args.minutes, extra=extra, env=child_env(args.threads))
        runs = run_all([s.name for s in specs], dirs, args.out / "runs", parallel=args.parallel, **opts)
    rows = [table_row({"set": s.name, **records[s.name], **runs.get(s.name, {})}) for s in specs]
    template = " ".join(["python", *sela_command(Path("SETS/<set>"), args.minutes, Path("RUNS/<set>"), extra)[1:]])
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": sela_commit(), "minutes": args.minutes, "extra_args": args.extra_args, "parallel": args.parallel,
            "threads": args.threads, "command": template, "argv": sys.argv, "sets_dir": str(args.sets_dir),
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs", "load_start": load_start,
            "load_end": [round(v, 2) for v in os.getloadavg()], "floors_only": args.floors_only}  # fmt: skip
    corr = correlations(rows)
    (args.out / "suite.json").write_text(json.dumps({**meta, "sets": rows, "spearman": corr}, indent=1))
    (args.out / "suite.md").write_text(markdown(rows, meta, corr))
    plot(rows, args.out / "suite.png", args.minutes)
    print((args.out / "suite.md").read_text())
    print(f"wrote {args.out}/suite.json, suite.md, suite.png")


if __name__ == "__main__":
    main()
