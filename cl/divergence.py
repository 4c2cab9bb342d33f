"""Divergence detection: a run is `diverged`, not `completed`, when its training goes wrong.

Three rules, all documented in the README ("Failures, resuming and reproducibility"):

1. **Non-finite loss**: any training step's loss is NaN or infinite.
2. **Exploding loss**: the mean training loss over a check window (`check_every` steps) exceeds
   `factor * max(|L0|, 1)`, where L0 is the loss of the run's first step (at initialisation), for
   `patience` consecutive windows.
3. **Nothing learned**: right after training its first experience (joint training: its only one),
   the run's accuracy on that experience's test data among its own classes (in class-IL, the task-IL
   view) is no better than always answering its most common class (its largest class share +
   `learned_margin`); not applied when that experience's test data has a single class. Only the first: there no strategy has a reason not to learn, while a
   strategy that later stops learning new experiences (intransigence, e.g. EWC with a huge lambda)
   shows a result, not a failure.

The loss rules do not synchronise the host at every step: the losses are summed on the device and
looked at once per window and at the end of each experience.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from cl.errors import RunError
from cl.params import param


class Diverged(RunError):
    """The run diverged; the message says which rule fired."""


@dataclasses.dataclass
class DivergenceParams:
    """The `[divergence]` table of an experiment."""

    check_every: int = param(50, "training steps per check window (one host synchronisation each)", low=1)
    factor: float = param(10.0, "a window whose mean loss exceeds factor * max(|first step's loss|, 1) explodes",
                          above=1)
    patience: int = param(3, "consecutive exploding windows that mark a run diverged", low=1)
    learned_margin: float = param(0.01, "after training an experience, its accuracy must exceed the share of "
                                        "its most common test class by more than this; negative = off")


class LossMonitor:
    """Rules 1 and 2 on the training loss, accumulated on its device."""

    def __init__(self, params: DivergenceParams):
        self.params = params
        # The window's losses, as the device tensors they are: summed (in float64, so that a sum of finite
        # losses cannot overflow) only when the window is checked. Nothing runs on the device per step.
        self.losses: list[torch.Tensor] = []
        self.initial: float | None = None  # the run's first loss, read at the first check
        self.exploding = 0

    def add(self, loss: torch.Tensor) -> None:
        """Record one step's (detached, scalar) loss; checks when a window is full."""
        self.losses.append(loss)
        if len(self.losses) >= self.params.check_every:
            self.check()

    def check(self) -> None:
        """Look at the window so far (one synchronisation) and raise `Diverged` if a rule fires."""
        if not self.losses:
            return
        window = torch.stack(self.losses).double()
        steps, self.losses = len(self.losses), []
        if self.initial is None:
            total, self.initial = torch.stack([window.sum(), window[0]]).tolist()
        else:
            total = float(window.sum())
        if not math.isfinite(total):
            raise Diverged("the training loss became NaN/inf; lower training.lr or clip gradients "
                           "(training.grad_clip_norm)")
        mean = total / steps
        limit = self.params.factor * max(abs(self.initial), 1.0)
        self.exploding = self.exploding + 1 if mean > limit else 0
        if self.exploding >= self.params.patience:
            raise Diverged(f"the training loss exploded: mean {mean:.4g} over the last {steps} steps, above "
                           f"{limit:.4g} ({self.params.factor:g} x max(|first loss {self.initial:.4g}|, 1)) for "
                           f"{self.params.patience} checks in a row; lower training.lr")

    def state_dict(self) -> dict:
        self.check()  # a checkpoint is taken at an experience boundary: no open window
        return {"initial": self.initial, "exploding": self.exploding}

    def load_state_dict(self, state: dict) -> None:
        self.initial, self.exploding = state["initial"], state["exploding"]


def learned_nothing(accuracy: float, majority_share: float, margin: float) -> str | None:
    """Rule 3: the reason a just-trained experience counts as not learned, or None."""
    if margin < 0 or majority_share >= 1 or accuracy > majority_share + margin:
        return None  # (an experience of one class has nothing to tell apart: the rule cannot apply)
    return (f"after training, accuracy on the experience is {accuracy:.3f}, no better than always answering its "
            f"most common class ({majority_share:.3f}); change training.lr (too high collapses to one "
            f"class, too low learns nothing) or check the data")
