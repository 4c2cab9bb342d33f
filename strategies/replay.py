"""Experience replay (Chaudhry et al. 2019, "On tiny episodic memories").

Each step trains on the concatenation of the stream batch and a batch drawn
from a memory buffer:

    for each batch B from the stream:
        M <- sample(buffer, replay_batch_size)          (skipped while empty)
        theta <- theta - lr * grad CE(B u M)
        reservoir: offer B to the buffer
    class_balanced: at the end of each experience, rebalance the buffer
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from cl.buffers import Buffer, ClassBalanced, Reservoir
from cl.data import Experience, StreamInfo
from cl.losses import cross_entropy
from cl.params import param
from cl.registry import register_strategy
from cl.strategy import Batch, StepOutput, Strategy


@dataclasses.dataclass
class ERParams:
    buffer_size: int = param(500, "samples kept in memory", low=1)
    replay_batch_size: int = param(10, "memory samples added to each stream batch (drawn without replacement)",
                                   low=1)
    buffer: Literal["reservoir", "class_balanced"] = param(
        "reservoir", "reservoir: updated every step; class_balanced: equal slots per class, updated per experience")


@register_strategy("er")
class ExperienceReplay(Strategy):
    """Experience replay: each stream batch is trained together with a batch from a memory buffer."""

    Params = ERParams
    kept = ("buffer",)
    stackable = True

    @classmethod
    def stored_samples(cls, params: ERParams, stream: StreamInfo) -> int:
        return params.buffer_size

    def setup(self) -> None:
        policy = Reservoir() if self.params.buffer == "reservoir" else ClassBalanced()
        self.buffer = Buffer(self.params.buffer_size, policy, self.device, self.generator)

    def draw(self, batch: Batch) -> dict[str, torch.Tensor]:
        inputs = super().draw(batch)
        if len(self.buffer) > 0:
            memory = self.buffer.sample(self.params.replay_batch_size)
            inputs.update(memory_x=self.prepare(memory["x"]), memory_y=memory["y"], memory_t=memory["t"])
        return inputs

    def objective(self, inputs: dict[str, torch.Tensor]) -> StepOutput:
        x, y, t = inputs["x"], inputs["y"], inputs["t"]
        n = len(y)
        if "memory_x" in inputs:
            x = torch.cat([x, inputs["memory_x"]])
            y, t = torch.cat([y, inputs["memory_y"]]), torch.cat([t, inputs["memory_t"]])
        logits = self.forward(x, t)
        return StepOutput(cross_entropy(logits, y), logits=logits[:n])

    def after_step(self, batch: Batch, out: StepOutput) -> None:
        if self.buffer.policy.online:
            self.buffer.add(x=batch.raw, y=batch.y, t=batch.t)

    def end_experience(self, exp: Experience) -> None:
        if not self.buffer.policy.online:
            self.buffer.update(x=exp.inputs(), y=exp.y, t=exp.t)
