"""Baselines: fine-tuning (lower bound), joint training (upper bound), cumulative retraining."""
from __future__ import annotations

from typing import Any

from cl.data import Experience, Samples, tensor_bytes
from cl.registry import register_strategy
from cl.strategy import Strategy


@register_strategy("naive")
class Naive(Strategy):
    """Fine-tuning: train on each experience in turn with no protection against forgetting."""

    stackable = True


class SeenData:
    """The training samples of every experience seen so far, in stored form (transforms applied)."""

    def __init__(self) -> None:
        self.parts: list[Samples] = []

    def append(self, exp: Experience) -> None:
        self.parts.append(Samples.of(exp))

    def union(self) -> Samples:
        return Samples.cat(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def n_samples(self) -> int:
        return sum(len(p) for p in self.parts)

    def memory_bytes(self) -> int:
        return sum(tensor_bytes(p.x, p.y, p.t) for p in self.parts)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [{"x": p.x, "y": p.y, "t": p.t} for p in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.parts = [Samples(p["x"], p["y"], p["t"]) for p in state["parts"]]


@register_strategy("joint")
class Joint(Strategy):
    """Upper bound: one model trained on the union of all experiences, shuffled together."""

    joint_training = True
    stackable = True  # its step is the default one; only `training_data` differs
    kept = ("seen",)

    def setup(self) -> None:
        self.seen = SeenData()

    def begin_experience(self, exp: Experience) -> None:
        self.seen.append(exp)

    def training_data(self, exp: Experience) -> Samples | None:
        return self.seen.union() if len(self.seen) == self.stream.n_experiences else None

    def steps_per_experience(self, exp: Experience) -> int:
        if len(self.seen) + 1 < self.stream.n_experiences:
            return 0
        return self.steps_for(self.seen.n_samples() + len(exp))


@register_strategy("cumulative")
class Cumulative(Joint):
    """Retrain the current model on all data seen so far at every experience."""

    joint_training = False

    def training_data(self, exp: Experience) -> Samples:
        return self.seen.union()

    def steps_per_experience(self, exp: Experience) -> int:
        return self.steps_for(self.seen.n_samples() + len(exp))
