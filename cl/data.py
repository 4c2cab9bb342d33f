"""Plain data types that flow from datasets to scenarios to the runner.

Everything is a tensor; a scenario can be moved to a device once and then the
training loop only ever indexes it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from cl.errors import UserError
from cl.transforms import SampleTransform

SETTINGS = ("class-il", "task-il", "domain-il")


@dataclasses.dataclass
class LabelledData:
    """A dataset as four tensors: x is uint8 for images (0..255) or float32, shape (N, *input_shape)."""

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

    def check(self, where: str) -> None:
        """Refuse data no scenario can use: no training or test samples, inputs and labels of
        different lengths, labels outside 0..n_classes-1, test inputs shaped unlike the training ones (a
        UserError naming `where`)."""
        for split, x, y in (("training", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if len(y) == 0:
                raise UserError(f"{where}: dataset {self.name!r} has no {split} samples; check its files "
                                f"(data_dir) or its split parameters")
            if len(x) != len(y):
                raise UserError(f"{where}: dataset {self.name!r} has {len(x)} {split} inputs but {len(y)} labels; "
                                f"check its files")
            if int(y.min()) < 0 or int(y.max()) >= self.n_classes:
                source = self.description.get("source")  # the folder a loader read, if any
                origin = f" (read from {source})" if source else ""
                raise UserError(f"{where}: dataset {self.name!r}{origin} has {split} labels outside "
                                f"0..{self.n_classes - 1} (found {int(y.min())}..{int(y.max())}); "
                                f"fix the labels or the dataset's n_classes")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise UserError(f"{where}: dataset {self.name!r} has training inputs of shape "
                            f"{list(self.x_train.shape[1:])} but test inputs of shape {list(self.x_test.shape[1:])}; "
                            f"check its files")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_train": len(self.y_train), "n_test": len(self.y_test),
                "n_classes": self.n_classes, "input_shape": list(self.input_shape), **self.description}


@dataclasses.dataclass
class Experience:
    """One step of a stream: samples, the task id, the classes present, and the sample transform.

    `x` holds the inputs as stored (uint8 images, or float), possibly shared with
    other experiences of the stream; `transform` (a permutation, a rotation, or
    None) is applied when inputs are read with `inputs(index)`, so a scenario
    never materialises one transformed copy of the data per experience.
    """

    id: int
    x: torch.Tensor
    y: torch.Tensor
    task_id: int
    classes: torch.Tensor  # sorted long tensor of the class ids present
    transform: SampleTransform | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def inputs(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Stored-form inputs of the samples at `index` (all when None), with the sample transform applied."""
        x = self.x if index is None else rows(self.x, index)
        return x if self.transform is None else self.transform(x)

    @functools.cached_property
    def t(self) -> torch.Tensor:
        """Task id of every sample (a broadcast view: no memory per sample)."""
        return torch.tensor(self.task_id, device=self.y.device).expand(len(self))

    def task_ids(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Task ids of the samples at `index`: all equal, so a slice of `t` (no gather)."""
        return self.t[: len(index)] if isinstance(index, torch.Tensor) else self.t[index]

    def to(self, device: torch.device | str, moved: dict[int, torch.Tensor] | None = None) -> "Experience":
        """A copy on `device`; tensors shared between experiences stay shared (through `moved`)."""
        moved = {} if moved is None else moved

        def move(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in moved:
                moved[id(t)] = t.to(device)
            return moved[id(t)]

        return dataclasses.replace(self, x=move(self.x), y=move(self.y), classes=self.classes.to(device),
                                   transform=None if self.transform is None else self.transform.to(device))

    def __repr__(self) -> str:
        return (f"Experience(id={self.id}, task_id={self.task_id}, n={len(self)}, "
                f"classes={self.classes.tolist()})")


@dataclasses.dataclass
class Samples:
    """Materialised samples in stored form (e.g. the union of experiences that joint training keeps)."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def inputs(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        return self.x if index is None else rows(self.x, index)

    def task_ids(self, index: torch.Tensor | slice) -> torch.Tensor:
        return rows(self.t, index)

    @classmethod
    def of(cls, exp: Experience) -> "Samples":
        """An experience's samples with its sample transform applied (no copy when it has none)."""
        return cls(exp.inputs(), exp.y, exp.t)

    @classmethod
    def cat(cls, parts: list["Samples"]) -> "Samples":
        return cls(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), torch.cat([p.t for p in parts]))


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """What a strategy may know about its stream: sizes and setting, never samples."""

    n_experiences: int
    n_classes: int
    n_tasks: int
    setting: str
    task_labels_at_test: bool
    input_shape: tuple[int, ...]  # what the model receives, after the input pipeline
    classes_recur: bool  # some class is in the training data of more than one experience (blurry, domain-IL)
    fewest_classes: int  # the fewest classes in one experience's training data


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
        moved: dict[int, torch.Tensor] = {}  # shared data is moved once and stays shared
        return dataclasses.replace(self, train=[e.to(device, moved) for e in self.train],
                                   test=[e.to(device, moved) for e in self.test])

    def nbytes(self) -> int:
        """Bytes of the distinct tensor storages behind both streams (shared data counted once)."""
        storages = {}
        for exp in self.train + self.test:
            for t in (exp.x, exp.y):
                storage = t.untyped_storage()
                storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return sum(storages.values())

    def stream_info(self, input_shape: tuple[int, ...]) -> StreamInfo:
        experiences_of_class = torch.zeros(self.n_classes, dtype=torch.long)
        for exp in self.train:
            experiences_of_class[exp.classes.cpu()] += 1
        return StreamInfo(self.n_experiences, self.n_classes, self.n_tasks, self.setting,
                          self.task_labels_at_test, tuple(input_shape), bool((experiences_of_class > 1).any()),
                          min(len(exp.classes) for exp in self.train))

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


def rows(t: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
    """t[index] along the first dimension. A 1-D long index goes
    through `index_select`: a batch of 10 uint8 images took 3.0 us that way against 10.9 us through
    advanced indexing on these CPUs, paid for every stream batch and buffer sample."""
    if isinstance(index, torch.Tensor) and index.dim() == 1 and index.dtype == torch.long:
        return t.index_select(0, index)
    return t[index]


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
