"""The runner: experiment config -> scenario -> strategy.fit / evaluator -> store record."""
from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import cl
from cl.config import Component, ExperimentConfig
from cl.data import LabelledData, Scenario
from cl.errors import RunError, UserError
from cl.evaluation import Evaluator
from cl.metrics import accuracy, compute_metrics
from cl.models import model_bytes
from cl.params import params_to_dict
from cl.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES
from cl.store import ResultStore, run_key, setup_key
from cl.strategy import Strategy


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N; anything else is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 ..)")
    return torch.device("cuda", index)


def load_datasets(components: list[Component]) -> list[LabelledData]:
    return [DATASETS.get(c.name).obj(c.params) for c in components]


def build_scenario(config: ExperimentConfig, datasets: list[LabelledData], seed: int) -> Scenario:
    generator = SCENARIOS.get(config.scenario.name).obj
    return generator(datasets, config.scenario.params, seed)


def build_strategy(component: Component, config: ExperimentConfig, scenario: Scenario,
                   device: torch.device, seed: int) -> Strategy:
    """Model and strategy, initialised from `seed` (on the CPU, so any device gets the same weights)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    model_entry = MODELS.get(config.model.name)
    model = model_entry.obj(config.model.params, scenario.input_shape, scenario.n_classes, scenario.n_tasks)
    if getattr(config.model.params, "multi_head", False) and not scenario.task_labels_at_test:
        raise UserError(f"model.multi_head = true needs task ids at test time, but scenario "
                        f"{config.scenario.name!r} is {scenario.setting}; set scenario.task_labels = true")
    strategy_cls = STRATEGIES.get(component.name).obj
    return strategy_cls(model.to(device), component.params, config.training, scenario, device, seed)


@functools.cache
def git_commit() -> str | None:
    root = Path(cl.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


VERSIONED_PACKAGES = ("torchvision", "numpy", "scikit-learn", "mlxtend", "mnist1d")


def versions() -> dict[str, str | None]:
    """Versions of Python, cl and every package whose code shapes the data or the training."""
    out: dict[str, str | None] = {"cl": cl.__version__, "python": platform.python_version(),
                                  "platform": platform.platform(),
                                  "torch": torch.__version__}  # includes the build, e.g. +cpu or +cu130
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _all_finite(model: torch.nn.Module) -> bool:
    """Weights and float buffers (e.g. batch-norm statistics) are all finite: one device sync."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def run_one(config: ExperimentConfig, component: Component, scenario: Scenario, seed: int,
            device: torch.device, progress: bool = True) -> dict[str, Any]:
    """Train one strategy on one scenario and return the complete run record."""
    start = time.perf_counter()
    strategy = build_strategy(component, config, scenario, device, seed)
    evaluator = Evaluator(scenario, config.training.eval_batch_size)
    eval_seconds = 0.0

    def evaluate(row: int) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        evaluator.evaluate_row(row, strategy)
        eval_seconds += time.perf_counter() - t0

    evaluate(0)
    T = scenario.n_experiences
    for i, exp in enumerate(scenario.train):
        desc = f"{component.label} seed {seed} exp {i + 1}/{T}"
        with tqdm(total=strategy.steps_per_experience(exp), desc=desc, leave=False, disable=None if progress else True,
                  unit="step", mininterval=0.5) as bar:
            strategy.progress = bar
            strategy.fit(exp)
            strategy.progress = None
        if not _all_finite(strategy.model):
            raise RunError(f"{component.label} (seed {seed}): the loss became NaN/inf during experience {i + 1} "
                           f"and the weights are no longer finite; lower training.lr (now {config.training.lr})")
        evaluator.mark_trained(i)
        if not strategy.joint_training or i == T - 1:
            evaluate(i + 1)
    wall = time.perf_counter() - start

    metrics = compute_metrics(evaluator.matrix)
    task_il = evaluator.task_il_matrix
    if scenario.setting == "task-il":
        metrics["task_il_acc"] = metrics["acc"]
    else:
        metrics["task_il_acc"] = accuracy(task_il) if task_il is not None else None
    if task_il is not None:
        metrics["task_il"] = compute_metrics(task_il)
    params = params_to_dict(component.params)
    # The device is part of a run's identity: CPU and CUDA generators draw different streams.
    setup = {**config.setup_identity(), "device": device.type}
    return {
        "run_key": run_key(config.name, component.label, {"name": component.name, **params}, seed, setup),
        "setup_key": setup_key(setup),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "experiment": config.name, "strategy": component.label, "strategy_name": component.name,
        "params": params, "seed": seed, "status": "completed",
        "setting": scenario.setting,
        "metrics": metrics,
        "matrix": _jsonable(evaluator.matrix),
        "task_il_matrix": _jsonable(task_il) if task_il is not None else None,
        "budgets": {"wall_seconds": wall, "eval_seconds": eval_seconds, "train_seconds": wall - eval_seconds,
                    "memory_bytes": strategy.memory_bytes(), "model_bytes": model_bytes(strategy.model),
                    "forward_samples": strategy.compute.forward_samples,
                    "backward_samples": strategy.compute.backward_samples,
                    "eval_forward_samples": evaluator.eval_forward_samples},
        "scenario": scenario.description,
        "config": {**config.setup(), "strategy": {"name": component.name, "label": component.label, **params},
                   "experiment_file": config.source, "description": config.description},
        "versions": versions(), "device": device_name(device), "git_commit": git_commit(),
    }


def _jsonable(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def run_experiment(config: ExperimentConfig, store: ResultStore, device: torch.device, progress: bool = True,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every (seed, strategy) of the experiment; each finished run is stored at once."""
    datasets = load_datasets(config.datasets)
    records = []
    for seed in config.seeds:
        scenario = build_scenario(config, datasets, seed).to(device)
        for component in config.strategies:
            record = run_one(config, component, scenario, seed, device, progress)
            record["id"] = store.write(record)
            records.append(record)
            m = record["metrics"]
            log(f"run {record['id']}: {component.label:<12} seed {seed}  ACC {_fmt(m['acc'])}"
                f"  BWT {_fmt(m['bwt'])}  {record['budgets']['wall_seconds']:.1f}s")
    return records


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"
