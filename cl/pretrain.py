"""`cl pretrain FILE`: train a backbone on a source dataset and save it for continual runs to start from.

A pretraining file is an experiment file without [scenario] and [[strategies]]:

    name = "vit-mnist5k"
    seed = 0
    output = "checkpoints/vit_mnist5k.pt"
    [dataset] ...   [model] ...   [training] ...   [transforms] ...   [divergence] ...

It trains the model, with a temporary linear head over the dataset's classes, on the whole training
set (the `joint` strategy on one experience holding every class), reports test accuracy, and writes
the feature extractor with its configuration and the SHA-256 of the training data it saw
(cl/checkpoints.py). A continual experiment then names the file in `[model] checkpoint`.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cl.checkpoints import save_checkpoint
from cl.config import ExperimentConfig, apply_override, build_experiment, read_toml
from cl.data import LabelledData
from cl.divergence import LossMonitor
from cl.errors import UserError
from cl.evaluation import Evaluator
from cl.params import params_to_dict
from cl.runner import build_scenario, build_strategy, load_datasets

KEYS = ("name", "description", "seed", "output", "dataset", "model", "training", "transforms", "divergence")


def load_pretraining(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, Path]:
    """The pretraining file as an experiment (one class-incremental experience, `joint`) and its output path."""
    raw = read_toml(Path(path), "pretraining file", "see experiments/pretrain/ for examples")
    for assignment in overrides:
        apply_override(raw, assignment)
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} in a pretraining file; valid keys: {', '.join(KEYS)} "
                        f"(it trains on the whole dataset: no [scenario] or [[strategies]])")
    output = raw.pop("output", None)
    if not isinstance(output, str) or not output or output.endswith(("/", "\\")):
        raise UserError(f"{path}: output must name the checkpoint file to write, e.g. output = \"checkpoints/x.pt\"")
    check_writable_file(Path(output), f"{path}: output")
    seed = raw.pop("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UserError(f"{path}: seed must be an integer in [0, 2**63), got {seed!r}")
    if isinstance(raw.get("dataset"), list) and len(raw["dataset"]) != 1:
        raise UserError(f"{path}: a pretraining file takes one [dataset], got {len(raw['dataset'])}")
    if isinstance(raw.get("model"), dict) and raw["model"].get("multi_head"):
        raise UserError(f"{path}: model.multi_head: pretraining trains one head over every class of the dataset; "
                        f"leave multi_head out here and set it in the continual experiment")
    experiment = {**raw, "seeds": [seed], "scenario": {"name": "class_incremental", "n_experiences": 1},
                  "strategies": [{"name": "joint"}]}
    return build_experiment(experiment, str(path)), Path(output)


def check_writable_file(path: Path, what: str) -> None:
    """Refuse, before anything trains, a file path that cannot be written: a folder, a path under a file,
    or a folder without write permission."""
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a folder; name the file to write in it, e.g. {str(path / 'backbone.pt')!r}")
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {str(path)!r} lies under {str(existing)!r}, which is a file; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{what} {str(path)!r} cannot be written (no permission in {str(existing)!r}); "
                        f"choose another path")


def data_sha256(datasets: list[LabelledData]) -> str:
    """SHA-256 of the training inputs and labels of the datasets, in order."""
    digest = hashlib.sha256()
    for data in datasets:
        for tensor in (data.x_train, data.y_train):
            digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def pretrain(config: ExperimentConfig, output: Path, device: torch.device, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate and save; returns what was saved, without the weights."""
    start = time.perf_counter()
    seed = config.seeds[0]
    datasets = load_datasets(config.datasets)
    scenario = build_scenario(config, datasets, seed).to(device)
    strategy = build_strategy(config.strategies[0], config, scenario, device, seed)
    strategy.loss_monitor = LossMonitor(config.divergence)  # a diverging pretraining stops early (exit 1)
    experience = scenario.train[0]
    with tqdm(total=strategy.steps_per_experience(experience), desc=f"pretrain {config.name}", unit="step",
              disable=None if progress else True, mininterval=0.5) as bar:
        strategy.progress = bar
        strategy.fit(experience)
        strategy.progress = None
    strategy.loss_monitor.check()
    evaluator = Evaluator(scenario, config.training.eval_batch_size)
    evaluator.mark_trained(0)
    evaluator.evaluate_row(1, strategy)
    info = {"model": config.model.name, "params": params_to_dict(config.model.params),
            "input_shape": list(scenario.input_shape), "data_sha256": data_sha256(datasets),
            "dataset": [d.description | {"name": d.name} for d in datasets],
            "test_accuracy": float(evaluator.matrix[1, 0]), "seconds": time.perf_counter() - start}
    if not strategy.all_finite():
        raise UserError(f"pretraining {config.name}: the weights are no longer finite; lower training.lr "
                        f"(now {config.training.lr}); nothing was written")
    save_checkpoint(output, {**info, "features": strategy.model.features.state_dict()})
    return info
