"""Two source trees, the same `sela train` commands: are the results bit-identical, and is the step time the same?

A refactor must not change what a run computes. This runs each command once per tree, alternating the trees
(A B A B ...) so that both see the same machine load, then compares per command:
  * labels.csv byte for byte, and metrics.jsonl line by line without its timing fields;
  * the training throughput (images/s without the label passes, median over all epochs after the first of all
    repeats), as the ratio B / A.

    python benchmarks/compare_trees.py OLD_SRC NEW_SRC OUT [--repeat 2] [--quick]

OLD_SRC / NEW_SRC are `src` folders (e.g. of a `git worktree add /tmp/old <commit>`); OUT collects the runs.
Every run uses one thread (OMP_NUM_THREADS=1). The CIFAR-10 commands need the JPEG copy extracted to
/tmp/data/cifar10 (../shared/README.md); --quick runs the digits commands only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CIFAR = ["--dataset", "folder", "--data-dir", "/tmp/data/cifar10", "--epochs", "3"]
COMMANDS = {
    "digits": [],  # the demo: the digits recipe, sela objective, train-mode label inputs
    # flat keys such as widths= are read by trees before the config sections and after (as legacy names)
    "digits_eval": ["--epochs", "5", "--label-inputs", "eval", "--set", "widths=[16,32]"],
    "c10_fast": CIFAR,  # cpu-fast: the swapped objective
    "c10_sela": [*CIFAR, "--recipe", "cpu-sela"],  # the sela objective, recorded label inputs
}
TIMING = {"time_s", "label_time_s", "label_share", "images_per_s", "label_peak_mb", "monitor_time_s"}


def run(src: str, out: Path, extra: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sela", "train", "--out", str(out), "--no-progress", "--device", "cpu"]
    cmd += extra
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_results(a: Path, b: Path) -> str:
    if (a / "labels.csv").read_bytes() != (b / "labels.csv").read_bytes():
        return "labels.csv DIFFERS"
    ma, mb = ([{k: v for k, v in m.items() if k not in TIMING} for m in metrics(d)] for d in (a, b))
    if ma != mb:
        first = next(i for i, (x, y) in enumerate(zip(ma, mb, strict=False)) if x != y) if ma and mb else 0
        return f"metrics.jsonl DIFFERS from epoch {first + 1}"
    return "identical labels.csv and metrics"


def throughput(run_dir: Path) -> list[float]:
    """Training images/s of each epoch after the first, label passes left out (the step time)."""
    rates = [
        m["images_per_s"] * m["time_s"] / max(m["time_s"] - m["label_time_s"], 1e-9) for m in metrics(run_dir)
    ]
    return rates[1:] or rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old_src")
    p.add_argument("new_src")
    p.add_argument("out", type=Path)
    p.add_argument("--repeat", type=int, default=1, help="runs per tree and command (alternating)")
    p.add_argument("--quick", action="store_true", help="digits only")
    p.add_argument("--only", nargs="+", choices=list(COMMANDS), help="these commands only")
    args = p.parse_args()
    names = [n for n in COMMANDS if not args.quick or n.startswith("digits")]
    names = [n for n in names if not args.only or n in args.only]
    for name in names:
        rates: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.repeat):
            for tree, src in (("old", args.old_src), ("new", args.new_src)):
                out = args.out / f"{name}-{tree}-{r}"
                run(src, out, COMMANDS[name])
                rates[tree] += throughput(out)
        verdict = same_results(args.out / f"{name}-old-0", args.out / f"{name}-new-0")
        old, new = statistics.median(rates["old"]), statistics.median(rates["new"])
        print(f"{name:12s} {verdict}; images/s old {old:.0f}, new {new:.0f}: new / old = {new / old:.3f}")


if __name__ == "__main__":
    main()
