"""Experience replay (Chaudhry et al. 2019, "On tiny episodic memories").

Each step trains on the concatenation of the stream batch and a batch drawn
from a memory buffer:

    for each batch B from the stream:
        M <- sample(buffer, replay_batch_size)          (skipped while empty)
        theta <- theta - lr * grad CE(B u M)
        reservoir: offer B to the buffer
    class-balanced: at the end of each experience, rebalance the buffer
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cl.buffers import ClassBalancedBuffer, ReservoirBuffer
from cl.data import Experience
from cl.params import param
from cl.registry import register_strategy
from cl.strategy import Batch, Strategy


@dataclasses.dataclass
class ERParams:
    buffer_size: int = param(500, "samples kept in memory")
    replay_batch_size: int = param(10, "memory samples added to each stream batch")
    buffer: Literal["reservoir", "class_balanced"] = param(
        "reservoir", "reservoir: updated every step; class_balanced: equal slots per class, updated per experience")

    def validate(self) -> None:
        if self.buffer_size < 1 or self.replay_batch_size < 1:
            raise ValueError("buffer_size and replay_batch_size must be >= 1")


@register_strategy("er")
class ExperienceReplay(Strategy):
    """Experience replay: each stream batch is trained together with a batch from a memory buffer."""

    Params = ERParams

    def __init__(self, model, params: ERParams, training, scenario, device, seed) -> None:
        super().__init__(model, params, training, scenario, device, seed)
        self.online = params.buffer == "reservoir"  # reservoir is updated every step
        buffer_cls = ReservoirBuffer if self.online else ClassBalancedBuffer
        self.buffer = buffer_cls(params.buffer_size, scenario.input_shape, device, self.generator)

    def loss(self, batch: Batch) -> torch.Tensor:
        x, y, t = batch
        if len(self.buffer) > 0:
            mx, my, mt = self.buffer.sample(self.params.replay_batch_size)
            x, y, t = torch.cat([x, mx]), torch.cat([y, my]), torch.cat([t, mt])
        return F.cross_entropy(self.forward(x, t), y)

    def train_step(self, batch: Batch) -> torch.Tensor:
        loss = super().train_step(batch)
        if self.online:
            self.buffer.add(*batch)
        return loss

    def end_experience(self, exp: Experience) -> None:
        if not self.online:
            self.buffer.update(exp.x, exp.y, torch.full_like(exp.y, exp.task_id))

    def memory_bytes(self) -> int:
        return self.buffer.memory_bytes()

    def extra_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
