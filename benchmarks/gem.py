"""GEM's speed: `cl` against a per-task-loop GEM (the way GEM is usually written) and Avalanche.

The GEM paper's protocol on the offline MNIST-5k data (experiments/gem_permuted_mnist5k.toml):
20 permutations x 1000 training samples, one epoch, batch 10, SGD lr 0.1, MLP
784-100-100-10, 256 memories per task, margin 0.5, ridge 1e-3, quadprog. Three
implementations train on the identical stream:

- cl: the `gem` strategy (memory gradients of all earlier tasks in one vmapped pass);
- loop: written in this script like the paper's code: a float memory per task, one
  forward and backward per earlier task each step, quadprog on the dual. It uses the
  same initial weights, batch order and ring-buffer memory as cl, so its accuracy
  should match cl's up to floating-point summation order;
- avalanche: Avalanche's `GEM` (when avalanche-lib is installed) with the same model,
  initial weights and data (its memory: 256 random samples of each finished experience).

Each side trains and evaluates (accuracy on all 20 test tasks after every task);
the script prints final ACC and wall time per side (median over --repeats, the
sides alternating order) and the ratios loop/cl and avalanche/cl.

    python benchmarks/gem.py [--repeats 3] [--tasks 20] [--device cpu] [--skip-avalanche]
                             [--experiment experiments/gem_rotated_mnist5k.toml]

`--experiment` runs another GEM-protocol file (its `gem` entry) instead of the
permutations, e.g. the rotations: the loop then checks our GEM on that stream too.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cl.config import load_experiment
from cl.registry import MODELS
from cl.runner import build_scenario, load_datasets, resolve_device, run_one
from cl.seeding import RUN_STREAMS, spawn_seeds
from cl.cli import positive_int
from script import run_script  # beside this script

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "gem_permuted_mnist5k.toml"
MEMORY, MARGIN, RIDGE, LR, BATCH = 256, 0.5, 1e-3, 0.1, 10


def initial_model(cfg, scenario, seed: int):
    init_seed, _ = spawn_seeds(seed, 2, RUN_STREAMS)  # the run's weight stream, as cl derives it
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        return MODELS.get("mlp").obj(cfg.model.params, scenario.input_shape, scenario.n_classes, 1)


def test_accuracies(model, scenario, device) -> list[float]:
    model.eval()
    with torch.inference_mode():
        accs = [float((model(exp.inputs().float().div_(255)).argmax(1) == exp.y).float().mean())
                for exp in scenario.test]
    model.train()
    return accs


def project2cone2(g: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The paper's projection: the dual QP in float64 with quadprog."""
    import quadprog

    mem = G.double().cpu().numpy()
    P = mem @ mem.T
    P = 0.5 * (P + P.T) + np.eye(len(mem)) * RIDGE
    q = -(mem @ g.double().cpu().numpy())
    v = quadprog.solve_qp(P, q, np.eye(len(mem)), np.zeros(len(mem)) + MARGIN)[0]
    return torch.from_numpy(v @ mem + g.double().cpu().numpy()).float().to(g.device)


def loop_gem(cfg, scenario, device, seed: int) -> float:
    """GEM as usually written: one backward pass per earlier task, every step."""
    model = initial_model(cfg, scenario, seed).to(device)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    _, strategy_seed = spawn_seeds(seed, 2, RUN_STREAMS)
    gen = torch.Generator(device=device)
    gen.manual_seed(strategy_seed)
    n_tasks = len(scenario.train)
    mem_x = torch.zeros(n_tasks, MEMORY, *scenario.input_shape, device=device)
    mem_y = torch.zeros(n_tasks, MEMORY, dtype=torch.long, device=device)

    def flat() -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in params])

    test_accuracies(model, scenario, device)  # the initial evaluation cl makes too
    for t, exp in enumerate(scenario.train):
        count = 0
        for idx in torch.randperm(len(exp), generator=gen, device=device).split(BATCH):
            x, y = exp.inputs(idx).float().div_(255), exp.y[idx]
            grads = []
            for k in range(t):
                opt.zero_grad()
                F.cross_entropy(model(mem_x[k]), mem_y[k]).backward()
                grads.append(flat())
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if grads:
                G, g = torch.stack(grads), flat()
                if bool((G @ g < 0).any()):
                    new, offset = project2cone2(g, G), 0
                    for p in params:
                        p.grad.copy_(new[offset: offset + p.numel()].view_as(p))
                        offset += p.numel()
            opt.step()
            slots = (count + torch.arange(len(y), device=device)) % MEMORY  # the ring buffer of cl's memory
            mem_x[t, slots], mem_y[t, slots] = x, y
            count += len(y)
        accs = test_accuracies(model, scenario, device)
    return float(np.mean(accs))


def avalanche_benchmark(scenario):
    """The stream as Avalanche tensors (built before the clock: the other sides' data is ready too)."""
    from avalanche.benchmarks import tensors_benchmark

    def tensors(stream):
        return [(exp.inputs().float().div_(255), exp.y) for exp in stream]

    return tensors_benchmark(tensors(scenario.train), tensors(scenario.test), task_labels=[0] * len(scenario.train))


def avalanche_gem(cfg, scenario, device, seed: int, bench) -> float:
    """Avalanche's GEM, evaluated its own way; ACC is the mean of its last evaluation's accuracies."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import GEM
    from avalanche.training.plugins import EvaluationPlugin

    model = initial_model(cfg, scenario, seed).to(device)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified": none is wanted
        strategy = GEM(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                       criterion=torch.nn.CrossEntropyLoss(), patterns_per_exp=MEMORY, memory_strength=MARGIN,
                       train_mb_size=BATCH, train_epochs=1, eval_mb_size=1000, device=device,
                       evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    strategy.eval(bench.test_stream)
    for exp in bench.train_stream:
        strategy.train(exp)
        results = strategy.eval(bench.test_stream)
    return float(np.mean([v for k, v in results.items() if k.startswith("Top1_Acc_Exp")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--tasks", type=positive_int, default=20, help="number of permutations (the protocol: 20)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-avalanche", action="store_true")
    parser.add_argument("--experiment", default=str(EXPERIMENT), help="a GEM-protocol experiment file with a gem entry")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = load_experiment(args.experiment, overrides=[f"scenario.n_experiences={args.tasks}"])
    gem = next(c for c in cfg.strategies if c.name == "gem")
    protocol = (gem.params.memory_per_task, gem.params.memory_strength, gem.params.ridge, cfg.training.lr,
                cfg.training.batch_size, cfg.training.epochs, cfg.training.optimizer)
    if protocol != (MEMORY, MARGIN, RIDGE, LR, BATCH, 1, "sgd"):
        raise SystemExit(f"{args.experiment} is not the GEM protocol this script implements "
                         f"(memory, margin, ridge, lr, batch, epochs, optimizer = {protocol})")
    sides = ["cl", "loop"]
    try:
        if not args.skip_avalanche:
            import avalanche  # noqa: F401
            sides.append("avalanche")
    except ImportError:
        print("avalanche-lib is not installed: timing cl and the loop only (pip install avalanche-lib)")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.tasks} tasks, {args.repeats} repeats")
    times: dict[str, list[float]] = {name: [] for name in sides}
    accs: dict[str, list[float]] = {name: [] for name in sides}
    for rep in range(args.repeats):
        scenario = build_scenario(cfg, load_datasets(cfg.datasets), rep).to(device)
        bench = avalanche_benchmark(scenario) if "avalanche" in sides else None
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in order:
            t0 = time.perf_counter()
            if name == "cl":
                record = run_one(cfg, gem, scenario, rep, device, progress=False)
                if record.status != "completed":
                    raise SystemExit(f"gem.py: cl's run of seed {rep} {record.stopped()}")
                acc = record.metrics.acc
            elif name == "avalanche":
                acc = avalanche_gem(cfg, scenario, device, rep, bench)
            else:
                acc = loop_gem(cfg, scenario, device, rep)
            times[name].append(time.perf_counter() - t0)
            accs[name].append(acc)
            print(f"  seed {rep} {name:<9} ACC {acc:.3f}  {times[name][-1]:6.1f}s", flush=True)
    for name in sides:
        line = (f"{name:<9} ACC {statistics.mean(accs[name]):.3f}  wall median {statistics.median(times[name]):6.1f}s")
        if name != "cl":
            ratio = statistics.median(o / c for o, c in zip(times[name], times["cl"]))
            line += f"  {name}/cl {ratio:.2f}x (median of per-seed ratios)"
        print(line)


if __name__ == "__main__":
    run_script(main)
