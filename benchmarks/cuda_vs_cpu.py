"""Do CUDA runs of a CNN land where CPU runs land? Accuracy per device and precision setting, over seeds.

The protocol of the fast-engine issue's open question: resnet18_reduced on split MNIST-5k
(class-incremental, 5 experiences), batch 10, one epoch, SGD lr 0.03; ER (buffer 500) and naive
fine-tuning; class-IL ACC and task-IL ACC per seed. Settings ("variants"):

    cpu           float32 on the CPU (the reference)
    cuda          cuDNN and cuBLAS in full float32 (`training.cuda_tf32 = false`, our default)
    cuda_tf32     TF32 convolutions and matrix products allowed (PyTorch's own default for convolutions)
    cuda_nocudnn  cuDNN switched off (PyTorch's native CUDA convolutions and batch norm)

Each (variant, seed, strategy) trains in its own process (`--jobs` at once, `--threads` CPU threads each), so
the whole grid runs in parallel on a machine with many cores. Prints one row per variant and
strategy (mean +- sd over seeds, the per-seed values, seconds per run) and writes the rows as JSON
with `--out`.

    python benchmarks/cuda_vs_cpu.py [--variants cpu cuda cuda_tf32 cuda_nocudnn] [--seeds 0 1 2]
                                     [--strategies er naive] [--jobs 6] [--threads 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cl.cli import positive_int
from script import run_script  # beside this script

VARIANTS = ("cpu", "cuda", "cuda_tf32", "cuda_nocudnn")
STRATEGIES = {"er": {"name": "er"}, "naive": {"name": "naive"}}


def experiment(seed: int, tf32: bool, strategy: str):
    from cl.config import build_experiment
    return build_experiment({
        "name": "cuda_vs_cpu", "seeds": [seed],
        "dataset": {"name": "mnist5k"},
        "scenario": {"name": "class_incremental", "n_experiences": 5},
        "model": {"name": "resnet18_reduced"},
        "training": {"epochs": 1, "batch_size": 10, "lr": 0.03, "cuda_tf32": tf32},
        "strategies": [STRATEGIES[strategy]],
    })


def one(variant: str, seed: int, strategy: str, threads: int) -> list[dict]:
    """Train one strategy for one seed under one variant, in this process."""
    import torch

    from cl.runner import check_experiment, run_experiment
    from cl.store import ResultStore

    torch.set_num_threads(threads)
    if variant == "cuda_nocudnn":
        torch.backends.cudnn.enabled = False
    device = torch.device("cpu" if variant == "cpu" else "cuda")
    with tempfile.TemporaryDirectory() as folder:
        store = ResultStore(f"sqlite:///{Path(folder) / 'runs.db'}")
        config = experiment(seed, variant == "cuda_tf32", strategy)
        records = run_experiment(config, check_experiment(config, device), store, device,
                                 progress=False, log=lambda _: None)
    return [{"variant": variant, "seed": seed, "strategy": r.strategy, "status": r.status,
             "acc": r.metrics.acc, "task_il_acc": r.task_il_acc, "seconds": r.budgets.wall_seconds} for r in records]


def grid(variants: list[str], seeds: list[int], strategies: list[str], jobs: int, threads: int) -> list[dict]:
    """Every (variant, seed, strategy) in a subprocess, `jobs` at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    todo = [(v, s, name) for v in variants for s in seeds for name in strategies]
    running: list[tuple[subprocess.Popen, str, int, str]] = []
    rows: list[dict] = []
    while todo or running:
        while todo and len(running) < jobs:
            v, s, name = todo.pop(0)
            cmd = [sys.executable, __file__, "--one", v, str(s), name, "--threads", str(threads)]
            running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             env=env), v, s, name))
        for entry in list(running):
            proc, v, s, name = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            out, err = proc.communicate()
            if proc.returncode != 0:
                print(f"{v} seed {s} {name} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}",
                      flush=True)
                continue
            got = json.loads(out.strip().splitlines()[-1])
            rows.extend(got)
            print(" ".join(f"{r['variant']} seed {r['seed']} {r['strategy']}: {outcome(r)} ({r['seconds']:.0f}s);"
                           for r in got), flush=True)
        time.sleep(0.2)
    return rows


def outcome(r: dict) -> str:
    """A run's accuracies, or its status when it stopped (diverged, failed: no accuracy)."""
    return f"ACC {r['acc']:.3f} task-IL {r['task_il_acc']:.3f}" if r["status"] == "completed" else r["status"]


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {sd:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| variant | strategy | ACC (class-IL) | task-IL ACC | per seed (ACC / task-IL) | s per run |",
             "|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for strategy in dict.fromkeys(r["strategy"] for r in rows):
            sel = sorted((r for r in rows if r["variant"] == variant and r["strategy"] == strategy),
                         key=lambda r: r["seed"])
            if not sel:
                continue
            done = [r for r in sel if r["status"] == "completed"]  # the means are over completed runs
            per_seed = ", ".join(f"{r['acc']:.3f}/{r['task_il_acc']:.3f}" if r["status"] == "completed"
                                 else r["status"] for r in sel)
            lines.append(f"| {variant} | {strategy} | {mean_sd([r['acc'] for r in done])} | "
                         f"{mean_sd([r['task_il_acc'] for r in done])} | {per_seed} | "
                         f"{statistics.median(r['seconds'] for r in sel):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--jobs", type=positive_int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads per process")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "SEED", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.one[2], args.threads)))
        return
    rows = grid(args.variants, args.seeds, args.strategies, args.jobs, args.threads)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    run_script(main)
