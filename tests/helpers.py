"""Small builders shared by the strategy and evaluation tests."""
from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any, Iterator

import pytest
import torch

from cl.config import build_experiment
from cl.registry import STRATEGIES
from cl.runner import build_scenario, build_strategy, load_datasets, run_one
from cl.training import TrainingParams
from cl.transforms import TransformParams

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")]),
]

TRAINING_KEYS = {f.name for f in dataclasses.fields(TrainingParams)}
TRANSFORM_KEYS = {f.name for f in dataclasses.fields(TransformParams)}


def digits_experiment(strategies: list[dict[str, Any]], n_experiences: int = 5, epochs: int = 1,
                      batch_size: int = 10, lr: float = 0.05, hidden: list[int] | None = None,
                      seeds: list[int] | None = None, model: str = "mlp", **options: Any):
    """A split-digits (sklearn 8x8) class-incremental experiment: fast enough for unit tests.

    Other keyword options go to [model] (multi_head), or to [training] or [transforms] when they
    name one of their parameters, else to [scenario] (e.g. task_labels=True).
    """
    model_options = {k: options.pop(k) for k in ("multi_head",) if k in options}
    training = {k: v for k, v in options.items() if k in TRAINING_KEYS}
    transforms = {k: v for k, v in options.items() if k in TRANSFORM_KEYS}
    scenario = {k: v for k, v in options.items() if k not in TRAINING_KEYS | TRANSFORM_KEYS}
    raw = {
        "name": "test-digits",
        "seeds": seeds or [0],
        "dataset": {"name": "digits"},
        "scenario": {"name": "class_incremental", "n_experiences": n_experiences, **scenario},
        "model": {"name": model, **({"hidden": [64] if hidden is None else hidden} if model == "mlp" else {}), **model_options},
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, **training},
        "transforms": transforms,
        "strategies": strategies,
    }
    return build_experiment(raw)


@contextlib.contextmanager
def register_temporarily(name: str, cls: type) -> Iterator[type]:
    """Register a strategy class for the duration of a test."""
    STRATEGIES.register(name)(cls)
    try:
        yield cls
    finally:
        STRATEGIES._entries.pop(name, None)


CPU = torch.device("cpu")


def run(cfg, seed: int = 0, device: torch.device = CPU, index: int = 0):
    """Run strategy `index` of an experiment config for one seed; the RunRecord."""
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), seed).to(device)
    return run_one(cfg, cfg.strategies[index], scenario, seed, device, progress=False)


def strategy_for(cfg, seed: int = 0, index: int = 0, device: torch.device = CPU):
    """Strategy `index` of an experiment config, built on `device`, and its scenario (there too)."""
    scenario = build_scenario(cfg, load_datasets(cfg.datasets), seed).to(device)
    return build_strategy(cfg.strategies[index], cfg, scenario, device, seed), scenario


def resumed_beside_original(cfg, seed: int = 0, device: torch.device = CPU):
    """Strategy 0 of `cfg` trained on experience 1, checkpointed (torch.save) and restored into a
    differently initialised copy; both then train on the remaining experiences. The state is loaded
    onto the CPU first, as the runner's checkpoints are, so a restored strategy must move it to `device`.
    Returns (original, restored), which should be identical if the checkpoint is complete."""
    original, scenario = strategy_for(cfg, seed, device=device)
    original.fit(scenario.train[0])
    blob = io.BytesIO()
    torch.save(original.state_dict(), blob)
    blob.seek(0)
    restored = build_strategy(cfg.strategies[0], cfg, scenario, device, seed + 99)  # different init
    restored.load_state_dict(torch.load(blob, map_location="cpu", weights_only=True))
    for exp in scenario.train[1:]:
        original.fit(exp)
        restored.fit(exp)
    return original, restored
