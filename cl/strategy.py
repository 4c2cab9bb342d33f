"""The strategy plugin API.

A strategy owns the model, the optimizer and whatever it keeps between
experiences (buffers, old models, importances). The runner calls
`fit(experience)` for each training experience and the evaluator calls
`predict(x, task_ids)`. The default update of one batch is

    zero_grad -> loss = self.loss(batch) -> backward -> self.adjust_gradients(batch) -> step

so most strategies override one or two hooks:

    begin_experience(exp)      before training on an experience
    loss(batch)                the training objective (default: cross-entropy)
    adjust_gradients(batch)    read / rewrite .grad between backward and step (GEM, A-GEM)
    end_experience(exp)        after training (fill buffers, snapshot the model)
    predict(x, task_ids)       logits used for evaluation (iCaRL's nearest-mean, task inference)
    memory_bytes()             what the strategy keeps beyond the model
    extra_state() / load_extra_state(state)   buffers etc. for checkpoints

Hyperparameters are a dataclass assigned to the class attribute `Params`;
register the class with `@register_strategy("name")`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cl.data import Experience, Scenario
from cl.params import NoParams, param


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor  # task id of each sample


@dataclasses.dataclass
class TrainingParams:
    """How each experience is trained (the `[training]` table of an experiment)."""

    epochs: int = param(1, "passes over each experience")
    batch_size: int = param(10, "samples per step from the current experience")
    optimizer: Literal["sgd", "adam"] = param("sgd", "optimizer")
    lr: float = param(0.01, "learning rate")
    momentum: float = param(0.0, "SGD momentum")
    weight_decay: float = param(0.0, "L2 penalty")
    eval_batch_size: int = param(2000, "samples per forward pass during evaluation")

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")


@dataclasses.dataclass
class ComputeCount:
    """Hardware-independent compute: samples through forward and backward passes."""

    forward_samples: int = 0
    backward_samples: int = 0


class Strategy:
    """Base class: plain fine-tuning. Subclasses override hooks (see module doc)."""

    Params: type = NoParams
    #: True for strategies that must see the whole stream before training (joint):
    #: the runner then evaluates only before training and after the last experience.
    joint_training: bool = False

    def __init__(self, model: nn.Module, params: Any, training: TrainingParams, scenario: Scenario,
                 device: torch.device, seed: int):
        self.model = model
        self.params = params
        self.training = training
        self.n_experiences = scenario.n_experiences
        self.n_classes = scenario.n_classes
        self.setting = scenario.setting
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.optimizer = self.make_optimizer()
        self.compute = ComputeCount()
        self.progress: Any = None  # set by the runner: an object with update(n)

    # ----- construction -------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        tr = self.training
        if tr.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=tr.lr, momentum=tr.momentum,
                               weight_decay=tr.weight_decay)

    # ----- the training loop ------------------------------------------------
    def fit(self, exp: Experience) -> None:
        self.begin_experience(exp)
        self.train_experience(exp)
        self.end_experience(exp)

    def train_experience(self, exp: Experience) -> None:
        self.train_on(exp.x, exp.y, torch.full_like(exp.y, exp.task_id))

    def train_on(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """`epochs` passes of shuffled mini-batches over (x, y, t)."""
        self.model.train()
        for _ in range(self.training.epochs):
            for batch in self.batches(x, y, t):
                self.train_step(batch)
                if self.progress is not None:
                    self.progress.update(1)

    def batches(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> Iterator[Batch]:
        order = torch.randperm(len(y), generator=self.generator, device=self.device)
        for idx in order.split(self.training.batch_size):
            yield Batch(x[idx], y[idx], t[idx])

    def steps_per_experience(self, exp: Experience) -> int:
        """Number of train_step calls `fit(exp)` makes (for progress bars)."""
        return self.training.epochs * -(-len(exp) // self.training.batch_size)

    def train_step(self, batch: Batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self.adjust_gradients(batch)
        self.optimizer.step()
        return loss

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits; counts samples toward the compute budget."""
        n = x.shape[0]
        self.compute.forward_samples += n
        if torch.is_grad_enabled():
            self.compute.backward_samples += n
        return self.model(x, t)

    # ----- hooks ------------------------------------------------------------
    def begin_experience(self, exp: Experience) -> None:
        pass

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.forward(batch.x, batch.t), batch.y)

    def adjust_gradients(self, batch: Batch) -> None:
        pass

    def end_experience(self, exp: Experience) -> None:
        pass

    def predict(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        return self.model(x, task_ids)

    def memory_bytes(self) -> int:
        return 0

    # ----- state ------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "compute": dataclasses.asdict(self.compute),
                "extra": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.compute = ComputeCount(**state["compute"])
        self.load_extra_state(state["extra"])


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
