"""The evaluator: fills the accuracy matrices of a run, row by row.

Row 0 is measured before any training, row i after training experience i.
Which logits count depends on the scenario's setting:

- class-il: argmax over the classes seen in training so far (row 0: all
  classes, since none are seen yet). A second matrix holds task-IL accuracy:
  argmax restricted to the classes of the test experience.
- task-il:  the task id is passed to `predict` and the argmax is restricted to
  the classes of the test experience.
- domain-il: argmax over all classes.

Inputs are read through each test experience's sample transform and the
strategy's input pipeline (`strategy.prepare(..., train=False)`: no
augmentation). Everything stays on the device; correct counts are summed there
and copied to the host once per row. Forward passes made here are counted by
the strategy's compute count as evaluation samples.
"""
from __future__ import annotations

import numpy as np
import torch

from cl.data import Scenario
from cl.strategy import Strategy


class Evaluator:
    def __init__(self, scenario: Scenario, batch_size: int):
        self.scenario = scenario
        self.batch_size = batch_size
        T = scenario.n_experiences
        self.matrix = np.full((T + 1, T), np.nan)
        self.task_il_matrix = np.full((T + 1, T), np.nan) if scenario.setting == "class-il" else None
        device = scenario.test[0].x.device
        self._class_masks = []  # per test experience: bool over all classes
        for exp in scenario.test:
            mask = torch.zeros(scenario.n_classes, dtype=torch.bool, device=device)
            mask[exp.classes] = True
            self._class_masks.append(mask)
        self._seen = torch.zeros(scenario.n_classes, dtype=torch.bool, device=device)

    def mark_trained(self, experience_index: int) -> None:
        """Add the classes of training experience `experience_index` to the seen set."""
        self._seen[self.scenario.train[experience_index].classes] = True

    def state_dict(self) -> dict:
        """The matrices measured so far and the classes seen (for run checkpoints)."""
        task_il = None if self.task_il_matrix is None else torch.from_numpy(self.task_il_matrix.copy())
        return {"matrix": torch.from_numpy(self.matrix.copy()), "task_il_matrix": task_il,
                "seen": self._seen.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.matrix = state["matrix"].numpy().copy()
        if state["task_il_matrix"] is not None:
            self.task_il_matrix = state["task_il_matrix"].numpy().copy()
        self._seen.copy_(state["seen"])

    @torch.inference_mode()
    def evaluate_row(self, row: int, strategy: Strategy) -> None:
        scenario = self.scenario
        T = scenario.n_experiences
        device = self._seen.device
        correct = torch.zeros(T, dtype=torch.long, device=device)
        correct_task = torch.zeros(T, dtype=torch.long, device=device)
        primary_mask = self._seen if (scenario.setting == "class-il" and row > 0) else None
        with strategy.evaluation():
            for j, exp in enumerate(scenario.test):
                exp_mask = self._class_masks[j]
                for start in range(0, len(exp), self.batch_size):
                    part = slice(start, start + self.batch_size)
                    x = strategy.prepare(exp.inputs(part), train=False)
                    y = exp.y[part]
                    t = exp.task_ids(part) if scenario.task_labels_at_test else None
                    logits = strategy.predict(x, t)
                    if scenario.setting == "task-il":
                        correct[j] += _hits(logits, y, exp_mask)
                        continue
                    correct[j] += _hits(logits, y, primary_mask)
                    if self.task_il_matrix is not None:
                        correct_task[j] += _hits(logits, y, exp_mask)
        sizes = np.array([len(e) for e in scenario.test], dtype=float)
        counts = torch.stack([correct, correct_task]).cpu().numpy()  # the row's one host copy
        self.matrix[row] = counts[0] / sizes
        if self.task_il_matrix is not None:
            self.task_il_matrix[row] = counts[1] / sizes


def _hits(logits: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Number of samples whose argmax over the `allowed` classes equals y."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return (logits.argmax(dim=1) == y).sum()
