"""Plain data types that flow from datasets to scenarios to the runner.

Everything is a tensor; a scenario can be moved to a device once and then the
training loop only ever indexes it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

SETTINGS = ("class-il", "task-il", "domain-il")


@dataclasses.dataclass
class LabelledData:
    """A dataset as four tensors: x is float32 in [0, 1] with shape (N, *input_shape)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    description: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_train": len(self.y_train), "n_test": len(self.y_test),
                "n_classes": self.n_classes, "input_shape": list(self.input_shape), **self.description}


@dataclasses.dataclass
class Experience:
    """One step of a stream: samples, the task id, and the classes present."""

    id: int
    x: torch.Tensor
    y: torch.Tensor
    task_id: int
    classes: torch.Tensor  # sorted long tensor of the class ids present

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> "Experience":
        return dataclasses.replace(self, x=self.x.to(device), y=self.y.to(device),
                                   classes=self.classes.to(device))

    def __repr__(self) -> str:
        return (f"Experience(id={self.id}, task_id={self.task_id}, n={len(self)}, "
                f"classes={self.classes.tolist()})")


@dataclasses.dataclass
class Scenario:
    """A train stream and a test stream that mirrors it one to one.

    `setting` is one of "class-il", "task-il", "domain-il"; in "task-il" the
    task id is given at test time (`task_labels_at_test`). `description` is
    a JSON-able dict stored with every run.
    """

    train: list[Experience]
    test: list[Experience]
    n_classes: int
    setting: str
    task_labels_at_test: bool
    description: dict[str, Any]

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if len(self.train) != len(self.test):
            raise ValueError("train and test streams must have the same number of experiences")

    @property
    def n_experiences(self) -> int:
        return len(self.train)

    @property
    def n_tasks(self) -> int:
        return max(e.task_id for e in self.train) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].x.shape[1:])

    def to(self, device: torch.device | str) -> "Scenario":
        return dataclasses.replace(self, train=[e.to(device) for e in self.train],
                                   test=[e.to(device) for e in self.test])

    def __getitem__(self, index: int | slice) -> "Scenario | tuple[Experience, Experience]":
        """`s[i]` is the pair (train[i], test[i]); `s[a:b]` is a shorter Scenario."""
        if isinstance(index, slice):
            return dataclasses.replace(self, train=self.train[index], test=self.test[index])
        return self.train[index], self.test[index]

    def __len__(self) -> int:
        return self.n_experiences

    def __repr__(self) -> str:
        lines = [f"Scenario({self.description.get('name', '?')}, {self.setting}, "
                 f"{self.n_experiences} experiences, {self.n_classes} classes)"]
        for tr, te in zip(self.train, self.test):
            lines.append(f"  {tr.id}: task {tr.task_id}, train {len(tr)}, test {len(te)}, "
                         f"classes {tr.classes.tolist()}")
        return "\n".join(lines)
