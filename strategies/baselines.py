"""Baselines: fine-tuning (lower bound), joint training (upper bound), cumulative retraining."""
from __future__ import annotations

import torch

from cl.data import Experience
from cl.registry import register_strategy
from cl.strategy import Strategy, tensor_bytes


@register_strategy("naive")
class Naive(Strategy):
    """Fine-tuning: train on each experience in turn with no protection against forgetting."""


class SeenData:
    """All training data seen so far, kept on the device."""

    def __init__(self) -> None:
        self.xs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.ts: list[torch.Tensor] = []

    def append(self, exp: Experience) -> None:
        self.xs.append(exp.x)
        self.ys.append(exp.y)
        self.ts.append(torch.full_like(exp.y, exp.task_id))

    def union(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.cat(self.xs), torch.cat(self.ys), torch.cat(self.ts)

    def __len__(self) -> int:
        return len(self.ys)

    def n_samples(self) -> int:
        return sum(len(y) for y in self.ys)

    def memory_bytes(self) -> int:
        return tensor_bytes(*self.xs, *self.ys, *self.ts)


@register_strategy("joint")
class Joint(Strategy):
    """Upper bound: one model trained on the union of all experiences, shuffled together."""

    joint_training = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen = SeenData()

    def begin_experience(self, exp: Experience) -> None:
        self.seen.append(exp)

    def train_experience(self, exp: Experience) -> None:
        if len(self.seen) == self.n_experiences:
            self.train_on(*self.seen.union())

    def steps_per_experience(self, exp: Experience) -> int:
        if len(self.seen) + 1 < self.n_experiences:
            return 0
        n = self.seen.n_samples() + len(exp)
        return self.training.epochs * -(-n // self.training.batch_size)

    def memory_bytes(self) -> int:
        return self.seen.memory_bytes()

    def extra_state(self) -> dict:
        return {"seen": [list(self.seen.xs), list(self.seen.ys), list(self.seen.ts)]}

    def load_extra_state(self, state: dict) -> None:
        self.seen.xs, self.seen.ys, self.seen.ts = (list(v) for v in state["seen"])


@register_strategy("cumulative")
class Cumulative(Joint):
    """Retrain the current model on all data seen so far at every experience."""

    joint_training = False

    def train_experience(self, exp: Experience) -> None:
        self.train_on(*self.seen.union())

    def steps_per_experience(self, exp: Experience) -> int:
        n = self.seen.n_samples() + len(exp)
        return self.training.epochs * -(-n // self.training.batch_size)
