"""The validation split: a held-out part of each training experience, evaluated like the test stream.

Hyperparameters chosen on the test stream overfit it, so a sweep (cl/sweep.py) trains on each
training experience minus a stratified, seeded share and evaluates on that share instead of the
test stream; the test stream is never read. Runs evaluated this way say so in their record
(`evaluated_on = "validation"`) and never reach the leaderboard.

    [validation]          # optional; what cl sweep uses
    fraction = 0.1

The split is stratified per class within each experience (each class keeps its share, at least one
sample, whenever it has two or more), and its draws come from their own stream derived from the run's
seed, so they do not shift the scenario's or the training's. Experiences that share their stored
samples (permutations, rotations of one dataset) are split the same way and keep sharing the two
parts, so the stream still holds one copy of the data.
"""
from __future__ import annotations

import dataclasses

import torch

from cl.data import Scenario
from cl.errors import UserError
from cl.params import param
from cl.seeding import spawn_seeds

#: Spawn key of the validation split's stream (independent of the scenario's and the run's).
VALIDATION_STREAM = (0x56414C,)


@dataclasses.dataclass
class ValidationParams:
    """The `[validation]` table of an experiment."""

    fraction: float = param(0.1, "share of each training experience held out for validation (stratified "
                                 "per class); the rest is trained on", above=0, below=1)


def stratified_split(y: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of `y`, each sorted: per class, round(fraction * n) random samples
    (at least 1 and at most n - 1 when the class has 2 or more) go to validation."""
    labels = y.cpu()
    held_out = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        k = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
        held_out.append(members[torch.randperm(n, generator=generator)[:k]])
    validation = torch.sort(torch.cat(held_out)).values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[validation] = False
    train = torch.nonzero(keep).flatten()
    return train.to(y.device), validation.to(y.device)


def validation_scenario(scenario: Scenario, fraction: float, seed: int) -> Scenario:
    """The scenario whose training experiences lose a stratified `fraction` and whose evaluation
    stream is those held-out parts (same ids, tasks, classes and sample transforms)."""
    generator = torch.Generator().manual_seed(spawn_seeds(seed, 1, VALIDATION_STREAM)[0])
    parts: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # shared samples are split once
    train, held_out = [], []
    for exp in scenario.train:
        key = (id(exp.x), id(exp.y))
        if key not in parts:
            train_index, val_index = stratified_split(exp.y, fraction, generator)
            if len(val_index) == 0:
                # stratified_split holds out at least one sample of every class that has two or more
                raise UserError(f"experience {exp.id + 1} has a single training sample of each of its classes "
                                f"({len(exp)} samples), so [validation] can hold none out at any fraction; it "
                                f"needs at least 2 samples per class (more training samples per experience)")
            parts[key] = (exp.x[train_index], exp.y[train_index], exp.x[val_index], exp.y[val_index])
        x_train, y_train, x_val, y_val = parts[key]
        train.append(dataclasses.replace(exp, x=x_train, y=y_train))
        held_out.append(dataclasses.replace(exp, x=x_val, y=y_val))
    description = {**scenario.description, "evaluated_on": "validation", "validation_fraction": fraction,
                   "validation_sizes": [len(e) for e in held_out]}
    if "experiences" in description:  # the sizes trained on and evaluated on, after the split
        description["experiences"] = [{**d, "n_train": len(tr), "n_test": len(va)} for d, tr, va
                                      in zip(description["experiences"], train, held_out)]
    return dataclasses.replace(scenario, train=train, test=held_out, description=description)
