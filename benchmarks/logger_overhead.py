"""Does a metric logger slow training? The same 5-epoch digits run with ``--log none`` and with a logger,
alternated (none, logger, none, ...) so both see the same machine load; the ratio of the training throughput
(images/s, median over epochs after the first) and of summary.json's ``train_time_s``, logger / none.

    python benchmarks/logger_overhead.py OUT [--log tensorboard] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def one_run(out: Path, log: str) -> tuple[float, float]:
    """(median images/s after the first epoch, train_time_s) of one run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sela", "train", "--out", str(out), "--no-progress", "--device", "cpu"]
    subprocess.run([*cmd, "--epochs", "5", "--log", log], env=env, check=True, capture_output=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return statistics.median(m["images_per_s"] for m in lines[1:]), summary["train_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--log", default="tensorboard")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    found: dict[str, list[tuple[float, float]]] = {"none": [], args.log: []}
    for i in range(args.repeat):
        for log in found:
            found[log].append(one_run(args.out / f"{log}{i}", log))
            print(f"{log:<12} run {i}: {found[log][-1][0]:.0f} images/s, train {found[log][-1][1]:.2f} s")
    speed = {log: statistics.median(r[0] for r in runs) for log, runs in found.items()}
    train = {log: statistics.median(r[1] for r in runs) for log, runs in found.items()}
    print(
        f"{args.log} / none: images/s x{speed[args.log] / speed['none']:.3f}, "
        f"train_time_s x{train[args.log] / train['none']:.3f} (medians of {args.repeat})"
    )


if __name__ == "__main__":
    main()
