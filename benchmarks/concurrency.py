"""Several `cl run` processes on one machine: each one's wall time, against one process alone.

Each process trains one naive run (permuted MNIST-5k, 5 tasks of 1000 samples, MLP 2x256, batch 10,
one seed) into its own SQLite store. Three settings:

    alone       one process, default threads
    default     P processes started at once, default threads (the cores shared out: cl/threads.py)
    all cores   P processes started at once, each with --threads = the machine's cores
                (what every process did before the thread budget)

    python benchmarks/concurrency.py [--processes 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cl.threads import cores
from cl.cli import positive_int
from script import run_script  # beside this script

EXPERIMENT = """
name = "concurrency"
seeds = [0]
[dataset]
name = "mnist5k"
[scenario]
name = "permuted"
n_experiences = 5
train_per_experience = 1000
[model]
name = "mlp"
hidden = [256, 256]
[training]
batch_size = 10
lr = 0.1
[[strategies]]
name = "naive"
"""


def start(folder: Path, index: int, extra: list[str]) -> subprocess.Popen:
    cl = Path(sys.executable).with_name("cl")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with open(folder / f"stderr{index}.txt", "w") as stderr:  # a file: a pipe read only at the end could fill
        return subprocess.Popen([str(cl), "run", str(folder / "exp.toml"), "--store",
                                 f"sqlite:///{folder / f'store{index}.db'}", "--no-progress", *extra],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)


def wave(folder: Path, n: int, extra: list[str]) -> list[float]:
    """Start n processes at once; the wall time of each."""
    t0 = time.perf_counter()
    procs = [start(folder, i, extra) for i in range(n)]
    walls = [0.0] * n
    pending = set(range(n))
    while pending:
        for i in list(pending):
            if procs[i].poll() is not None:
                walls[i] = time.perf_counter() - t0
                pending.discard(i)
                if procs[i].returncode != 0:
                    for other in procs:  # before the caller removes their folder
                        other.kill()
                        other.wait()
                    raise SystemExit(f"cl run failed: {(folder / f'stderr{i}.txt').read_text().strip()}")
        time.sleep(0.05)
    for i in range(n):
        for db in folder.glob(f"store{i}.db*"):
            db.unlink()
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=positive_int, default=4)
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cl-concurrency-"))
    (folder / "exp.toml").write_text(EXPERIMENT)
    try:
        print(f"{cores()} cores, {args.processes} processes, {args.repeats} repeats; wall seconds per process "
              f"(process start-up included)")
        results = {"alone": [], "default": [], "all cores": []}
        for _ in range(args.repeats):
            results["alone"] += wave(folder, 1, [])
            results["default"] += wave(folder, args.processes, [])
            results["all cores"] += wave(folder, args.processes, ["--threads", str(cores())])
        alone = statistics.median(results["alone"])
        for name, walls in results.items():
            median = statistics.median(walls)
            print(f"{name:<10} median {median:6.1f}s  (min {min(walls):.1f}, max {max(walls):.1f})  "
                  f"{median / alone:5.2f}x one process alone")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    run_script(main)
