"""What one training step costs in operator calls and kernel launches: `cl` against the bare loop.

On a GPU a step of a small model at batch 10 is launch-bound: its time is the number of kernels it
launches (and any host synchronisation), not arithmetic. This runs the naive or ER run of
benchmarks/overhead.py (lr 0.05) on split MNIST-5k (4000 training images, 400 steps) under torch.profiler, once through
`cl` and once as the bare loop, and prints per training step: operator calls, kernel launches, host
synchronisations and memory copies, and the operators `cl` calls more often than the bare loop.

    python benchmarks/profile_step.py [--device cuda] [--strategy naive|er] [--top 15]
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from overhead import STRATEGIES, bare_loop, experiment, warm_up  # beside this script
from cl.cli import positive_int
from script import run_script
from cl.runner import build_scenario, load_datasets, resolve_device, run_one

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPIES = ("cudaMemcpyAsync", "cudaMemcpy")


def counted(fn) -> collections.Counter:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    return collections.Counter({e.key: e.count for e in prof.key_averages()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strategy", default="naive", choices=list(STRATEGIES))
    parser.add_argument("--top", type=positive_int, default=15)
    args = parser.parse_args()
    device = resolve_device(args.device)
    # lr 0.05 so that this short run learns every experience (the divergence check stops one that does not).
    cfg = experiment(args.strategy, {"name": "mnist5k"}, [100, 100], lr=0.05)
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), 0).to(device)
    steps = sum(-(-len(exp) // cfg.training.batch_size) for exp in scenario.train)
    warm_up(device)
    record = run_one(cfg, cfg.strategies[0], scenario, 0, device, progress=False)  # every kernel loaded once
    if record.status != "completed":
        raise SystemExit(f"the run did not complete ({record.status}): {record.failure}")
    ours = counted(lambda: run_one(cfg, cfg.strategies[0], scenario, 0, device, progress=False))
    bare = counted(lambda: bare_loop(cfg, scenario, device, 0, replay=args.strategy == "er"))
    print(f"{args.strategy} on {device}, {steps} training steps (and 6 evaluations); per step:")
    for label, names in [("operator calls (aten::)", None), ("kernel launches", LAUNCHES),
                         ("host synchronisations", SYNCS), ("memory copies", COPIES)]:
        def total(c: collections.Counter) -> int:
            return sum(v for k, v in c.items() if (k.startswith("aten::") if names is None else k in names))
        print(f"  {label:<26} cl {total(ours) / steps:7.1f}   bare {total(bare) / steps:7.1f}")
    extra = {k: (ours[k] - bare.get(k, 0)) / steps for k in ours if k.startswith("aten::") or k in SYNCS + COPIES}
    print(f"operators cl calls more often than the bare loop (extra calls per step, top {args.top}):")
    for name, n in sorted(extra.items(), key=lambda kv: -kv[1])[:args.top]:
        if n > 0:
            print(f"  {n:6.2f}  {name}")


if __name__ == "__main__":
    run_script(main)
