"""The evaluator on a hand-made scenario with a strategy whose predictions are fixed."""
import contextlib

import numpy as np
import pytest
import torch

from cl.data import Experience, Scenario
from cl.evaluation import Evaluator
from cl.transforms import Permutation
from tests.helpers import DEVICES


class FixedLogits:
    """Stands in for a strategy: logits are a fixed table indexed by the sample's value."""

    def __init__(self, table, device="cpu"):
        self.table = torch.tensor(table, dtype=torch.float, device=device)
        self.model = torch.nn.Linear(1, 1)
        self.seen_task_ids = []
        self.prepared = []

    @contextlib.contextmanager
    def evaluation(self):
        was = self.model.training
        self.model.eval()
        yield
        self.model.train(was)

    def prepare(self, raw, train=True):
        self.prepared.append(train)
        return raw

    def predict(self, x, task_ids):
        self.seen_task_ids.append(task_ids)
        return self.table[x[:, 0].long()]


def scenario(setting):
    # Two experiences: classes {0, 1} and {2, 3}; test samples carry their row index in x.
    ys = [torch.tensor([0, 1, 1, 0]), torch.tensor([2, 3, 2, 3])]
    exps = []
    offset = 0
    for i, y in enumerate(ys):
        x = torch.arange(offset, offset + len(y)).float().unsqueeze(1)
        offset += len(y)
        exps.append(Experience(i, x, y, i, torch.unique(y)))
    return Scenario(exps, exps, 4, setting, setting == "task-il", {"name": "hand-made"})


# Logits per test sample (rows 0-3 belong to experience 1, rows 4-7 to experience 2).
TABLE = [
    [5, 0, 0, 9],  # y=0: overall argmax 3 (unseen after exp 1), among {0,1}: 0 -> right within task
    [0, 5, 9, 0],  # y=1: overall argmax 2, among {0,1}: 1 -> right within task
    [0, 9, 0, 0],  # y=1: right everywhere
    [0, 9, 0, 0],  # y=0: wrong everywhere
    [0, 0, 9, 0],  # y=2: right
    [9, 0, 0, 5],  # y=3: overall argmax 0 (wrong), among {2,3}: 3 (right)
    [0, 0, 1, 2],  # y=2: wrong everywhere
    [0, 0, 0, 9],  # y=3: right
]


@pytest.mark.parametrize("device", DEVICES)
def test_class_il_masks_unseen_classes_and_task_il_masks_to_experience(device):
    s = scenario("class-il").to(device)
    ev = Evaluator(s, batch_size=3)  # batch size that does not divide the experience sizes
    strat = FixedLogits(TABLE, device)
    ev.evaluate_row(0, strat)  # row 0: argmax over all 4 classes
    # exp 1: argmax per row = 3, 2, 1, 1 vs y 0, 1, 1, 0 -> 1/4; exp 2: 2, 0, 3, 3 vs 2, 3, 2, 3 -> 2/4
    assert ev.matrix[0].tolist() == [0.25, 0.5]
    ev.mark_trained(0)  # seen classes {0, 1}
    ev.evaluate_row(1, strat)
    # exp 1 over {0,1}: 0, 1, 1, 1 vs 0, 1, 1, 0 -> 3/4; exp 2 over {0,1}: never 2 or 3 -> 0
    assert ev.matrix[1].tolist() == [0.75, 0.0]
    # task-IL: exp 1 over {0,1} -> 3/4; exp 2 over {2,3}: 2, 3, 3, 3 vs 2, 3, 2, 3 -> 3/4
    assert ev.task_il_matrix[1].tolist() == [0.75, 0.75]
    ev.mark_trained(1)
    ev.evaluate_row(2, strat)  # all classes seen: same as row 0
    assert ev.matrix[2].tolist() == [0.25, 0.5]
    assert all(t is None for t in strat.seen_task_ids)  # class-IL: no task id at test
    assert strat.prepared == [False] * 12  # 3 rows x 2 experiences x 2 batches, never augmented


def test_task_il_passes_task_ids_and_masks():
    s = scenario("task-il")
    ev = Evaluator(s, batch_size=100)
    strat = FixedLogits(TABLE)
    ev.evaluate_row(0, strat)
    assert ev.matrix[0].tolist() == [0.75, 0.75]
    assert ev.task_il_matrix is None
    assert [t.tolist() for t in strat.seen_task_ids] == [[0] * 4, [1] * 4]


def test_domain_il_uses_all_classes_and_unmeasured_rows_stay_nan():
    s = scenario("domain-il")
    ev = Evaluator(s, batch_size=100)
    ev.evaluate_row(2, FixedLogits(TABLE))
    assert ev.matrix[2].tolist() == [0.25, 0.5]
    assert np.isnan(ev.matrix[:2]).all()


def test_restores_training_mode():
    s = scenario("class-il")
    strat = FixedLogits(TABLE)
    strat.model.train()
    Evaluator(s, 10).evaluate_row(0, strat)
    assert strat.model.training
    strat.model.eval()
    Evaluator(s, 10).evaluate_row(0, strat)
    assert not strat.model.training


@pytest.mark.parametrize("setting", ["class-il", "task-il", "domain-il"])
def test_matrix_shape(setting):
    ev = Evaluator(scenario(setting), 10)
    assert ev.matrix.shape == (3, 2)


def test_sample_transforms_of_test_experiences_are_applied():
    # The table row is read from x[:, 0]; a permutation that swaps the two features of each sample
    # makes the evaluator read x[:, 1] instead: 8 + (row index) -> the last 8 rows of the table.
    table = TABLE + [[9, 0, 0, 0]] * 4 + [[0, 0, 9, 0]] * 4
    s = scenario("domain-il")
    for exp in s.test:
        exp.x = torch.cat([exp.x, exp.x + 8], dim=1)
        exp.transform = Permutation(torch.tensor([1, 0]))
    ev = Evaluator(s, batch_size=100)
    ev.evaluate_row(0, FixedLogits(table))
    # exp 1 (y 0, 1, 1, 0) predicted 0 everywhere -> 2/4; exp 2 (y 2, 3, 2, 3) predicted 2 -> 2/4
    assert ev.matrix[0].tolist() == [0.5, 0.5]
