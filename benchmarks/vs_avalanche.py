"""Our engine against Avalanche 0.6, on the identical stream, model, optimizer and seed.

Protocols:
- quickstart: Split Fashion-MNIST class-IL (5 x 2 classes), MLP 784-256-256-10, SGD lr 0.01, batch 10, 1 epoch;
- gem: permuted MNIST-5k (20 tasks x 1000 samples), MLP 784-100-100-10, SGD lr 0.1, batch 10, 1 epoch;
- cnn: split MNIST-5k class-IL (5 x 2 classes), resnet18_reduced (GEM's ResNet-18, 20 base channels,
  batch norm), SGD lr 0.03, batch 10, 1 epoch (meant for --device cuda; its runs do not stack).

For each strategy, ours and Avalanche's (naive/Naive, er/Replay, gem/GEM, agem/AGEM, lwf/LwF, ewc/EWC)
train from the same initial weights (our model, built from the run's seed, deep-copied) on the same
experiences (`cl.interop.avalanche.to_avalanche`, exported before the clock starts). Each side evaluates
the whole test stream after every experience in its own way (ours: `cl.evaluation`; Avalanche: its
`eval` with experience accuracy), and ACC is the mean of the last row (in class-IL the last row is
not masked by the classes seen, so the two definitions agree there). Repetition r uses seed r on both
sides. Stacked: our runs of seeds 0..k-1 trained as one model (`run_stacked`), their wall time divided by k
(strategies that cannot stack: not measured), once per repetition. Within a repetition the sides take
turns at going first; each ratio is the median over repetitions of that repetition's Avalanche time
over ours, so a slow spell of the machine weighs on both sides of a ratio (seconds: medians). The
process's one-time costs (math libraries, Avalanche's import, torch.optim's first optimizer) are paid
before the clock starts (`warm_up`).

    python benchmarks/vs_avalanche.py [--protocols quickstart gem cnn] [--strategies naive er gem agem lwf ewc]
                                      [--repeats 3] [--stack 3] [--device cpu|cuda] [--data-dir DIR] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import numpy as np
import torch

from overhead import warm_up as warm_up_math  # beside this script
from cl.config import build_experiment
from cl.interop.avalanche import avalanche_module, quiet, to_avalanche
from cl.runner import build_scenario, build_strategy, input_pipeline, load_datasets, resolve_device, run_one, \
    run_stacked
from cl.stacking import stacking_problem
from cl.registry import STRATEGIES
from cl.cli import positive_int
from script import run_script  # beside this script

COMPARED = ("naive", "er", "gem", "agem", "lwf", "ewc")  # the strategies `pair` maps to Avalanche's
PROTOCOLS = {
    "quickstart": {
        "dataset": {"name": "fashion_mnist"}, "scenario": {"name": "class_incremental", "n_experiences": 5},
        "model": {"name": "mlp", "hidden": [256, 256]}, "lr": 0.01,
        "buffer": 1000, "memory_per_task": 256, "ewc_lambda": 100.0,
    },
    "gem": {
        "dataset": {"name": "mnist5k"},
        "scenario": {"name": "permuted", "n_experiences": 20, "train_per_experience": 1000},
        "model": {"name": "mlp", "hidden": [100, 100]}, "lr": 0.1,
        "buffer": 5120, "memory_per_task": 256, "ewc_lambda": 1.0,  # 100 and 10 at lr 0.1: our run diverges
    },
    "cnn": {  # the protocol of benchmarks/cuda_vs_cpu.py; batch norm: our runs train alone, unstacked
        "dataset": {"name": "mnist5k"}, "scenario": {"name": "class_incremental", "n_experiences": 5},
        "model": {"name": "resnet18_reduced"}, "lr": 0.03,
        "buffer": 500, "memory_per_task": 100, "ewc_lambda": 100.0,
    },
}


def pair(name: str, protocol: dict) -> tuple[dict, str, dict]:
    """(our strategy table, Avalanche class, its keyword arguments) for one strategy."""
    m = protocol["memory_per_task"]
    return {
        "naive": ({"name": "naive"}, "Naive", {}),
        "er": ({"name": "er", "buffer_size": protocol["buffer"], "replay_batch_size": 10}, "Replay",
               {"mem_size": protocol["buffer"]}),
        "gem": ({"name": "gem", "memory_per_task": m, "memory_strength": 0.5}, "GEM",
                {"patterns_per_exp": m, "memory_strength": 0.5}),
        "agem": ({"name": "agem", "memory_per_task": m, "sample_size": 256}, "AGEM",
                 {"patterns_per_exp": m, "sample_size": 256}),
        "lwf": ({"name": "lwf", "alpha": 1.0, "temperature": 2.0}, "LwF", {"alpha": 1.0, "temperature": 2.0}),
        "ewc": ({"name": "ewc", "ewc_lambda": protocol["ewc_lambda"]}, "EWC",
                {"ewc_lambda": protocol["ewc_lambda"], "mode": "online", "decay_factor": 1.0}),
    }[name]


def experiment(protocol: dict, strategy: dict, data_dir: str | None):
    dataset = {**protocol["dataset"], **({"data_dir": data_dir} if data_dir and protocol["dataset"]["name"]
                                         == "fashion_mnist" else {})}
    return build_experiment({
        "name": "vs-avalanche", "dataset": dataset, "scenario": protocol["scenario"], "model": protocol["model"],
        "training": {"epochs": 1, "batch_size": 10, "lr": protocol["lr"], "eval_batch_size": 2000},
        "strategies": [strategy]})


def avalanche_run(cls_name: str, kwargs: dict, model: torch.nn.Module, benchmark, lr: float,
                  device: torch.device, seed: int) -> float:
    """Avalanche's strategy trained and evaluated its own way; returns ACC (mean of the last row)."""
    from avalanche import training
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    torch.manual_seed(seed)
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = getattr(training, cls_name)(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=10, train_epochs=1, eval_mb_size=2000, device=device,
            evaluator=EvaluationPlugin(accuracy_metrics(experience=True)), **kwargs)
        strategy.eval(benchmark.test_stream)  # as ours evaluates before training (row 0 of its matrix)
        for experience in benchmark.train_stream:
            strategy.train(experience)
            results = strategy.eval(benchmark.test_stream)
    last = [v for k, v in sorted(results.items()) if k.startswith("Top1_Acc_Exp")]
    return float(np.mean(last))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocols", nargs="+", default=["quickstart", "gem"], choices=list(PROTOCOLS),
                        help="default quickstart gem (cnn: on request, for a GPU)")
    parser.add_argument("--strategies", nargs="+", default=list(COMPARED), choices=COMPARED)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--stack", type=int, default=3, help="seeds per stacked group (0: no stacked rows)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=positive_int, help="compute threads of this process, both sides alike "
                                                     "(default: PyTorch's, one per core)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    warm_up(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    header = ("protocol", "strategy", "ACC ours", "ACC avalanche", "s ours", "s avalanche", "ratio",
              "s/run stacked", "ratio stacked")
    print(" | ".join(header))
    for pname in args.protocols:
        protocol = PROTOCOLS[pname]
        for name in args.strategies:
            ours_table, av_class, av_kwargs = pair(name, protocol)
            cfg = experiment(protocol, ours_table, args.data_dir)
            datasets = load_datasets(cfg.datasets)
            component = cfg.strategies[0]
            strategy_class = STRATEGIES.get(component.name).obj
            first = build_scenario(cfg, datasets, 0).to(device)
            backbone = build_strategy(component, cfg, first, device, 0, input_pipeline(cfg, first, device)).model
            stacks = args.stack > 1 and stacking_problem(strategy_class, backbone) is None  # as `cl run` decides
            times = {"ours": [], "avalanche": [], "stacked": []}
            accs = {"ours": [], "avalanche": []}
            seeds = list(range(args.stack)) if stacks else []
            stacked_scenarios = [build_scenario(cfg, datasets, s).to(device) for s in seeds]
            for rep in range(args.repeats):
                scenario = build_scenario(cfg, datasets, rep).to(device)
                pipeline = input_pipeline(cfg, scenario, device)
                benchmark = to_avalanche(scenario, pipeline)
                model = copy.deepcopy(build_strategy(component, cfg, scenario, device, rep, pipeline).model)
                sides = ["ours", "avalanche"] + (["stacked"] if stacks else [])
                sides = sides[rep % len(sides):] + sides[:rep % len(sides)]  # each side goes first in turn
                for side in sides:
                    t0 = time.perf_counter()
                    if side == "ours":
                        record = run_one(cfg, component, scenario, rep, device, progress=False, pipeline=pipeline)
                        if record.status != "completed":
                            print(f"{pname} {name} seed {rep}: ours {record.stopped()}", flush=True)
                        accs[side].append(record.metrics.acc if record.metrics.acc is not None else float("nan"))
                    elif side == "avalanche":
                        accs[side].append(avalanche_run(av_class, av_kwargs, copy.deepcopy(model), benchmark,
                                                        protocol["lr"], device, rep))
                    else:
                        run_stacked(cfg, component, stacked_scenarios, seeds, device, progress=False)
                    times[side].append((time.perf_counter() - t0) / (args.stack if side == "stacked" else 1))
            ratio = _paired_ratio(times["avalanche"], times["ours"])
            stacked = ratio_stacked = "-"
            if stacks:
                stacked = f"{statistics.median(times['stacked']):.1f}"
                ratio_stacked = f"{_paired_ratio(times['avalanche'], times['stacked']):.2f}x"
            print(" | ".join([pname, name, _mean_sd(accs["ours"]), _mean_sd(accs["avalanche"]),
                              f"{statistics.median(times['ours']):.1f}", f"{statistics.median(times['avalanche']):.1f}",
                              f"{ratio:.2f}x", stacked, ratio_stacked]), flush=True)


def warm_up(device: torch.device) -> None:
    """Pay the process's one-time costs before anything is timed, both sides alike: the math libraries,
    Avalanche's import (seconds), and torch.optim's first optimizer (it imports torch._dynamo, 1-2 s).
    Untimed, they fell on whichever side ran first in the first repetition of the first strategy."""
    avalanche_module("avalanche.training")  # a one-line error when avalanche-lib is not installed
    from avalanche.evaluation.metrics import accuracy_metrics  # noqa: F401

    warm_up_math(device)
    torch.optim.SGD([torch.zeros(1, device=device, requires_grad=True)], lr=0.1)


def _paired_ratio(theirs: list[float], ours: list[float]) -> float:
    """The median over repetitions of their time over ours in the same repetition."""
    return statistics.median(a / b for a, b in zip(theirs, ours))


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


if __name__ == "__main__":
    run_script(main)
