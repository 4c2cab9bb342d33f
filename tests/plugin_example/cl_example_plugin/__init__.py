"""An example cl strategy plugin: fine-tuning with an L2 penalty on the weights.

Install it (`pip install tests/plugin_example`) and it appears in
`cl list strategies`; name it in an experiment file like a built-in:

    [[strategies]]
    name = "example_l2"
    weight = 0.01
"""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from cl.params import param
from cl.registry import register_strategy
from cl.strategy import Batch, StepOutput, Strategy


@dataclasses.dataclass
class L2Params:
    weight: float = param(0.01, "L2 penalty on the weights")


@register_strategy("example_l2")
class ExampleL2(Strategy):
    """Fine-tuning whose loss adds weight * (sum of squared parameters)."""

    Params = L2Params

    def loss(self, batch: Batch) -> StepOutput:
        logits = self.forward(batch.x, batch.t)
        l2 = sum((p**2).sum() for p in self.model.parameters())
        loss = F.cross_entropy(logits, batch.y) + self.params.weight * l2
        return StepOutput(loss, logits=logits, terms={"l2": l2})
