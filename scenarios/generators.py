"""Scenario generators: turn one or more LabelledData into a Scenario.

Each generator is registered with `@register_scenario(name, params=...)` and is
called as `generator(datasets, p, seed) -> Scenario`, where `seed` is the run's
seed and `p.seed` (when not none) overrides it. All randomness comes from
explicitly seeded generators derived from that one seed, never from global
RNG state, so a scenario is reproducible from (datasets, params, seed).

Conventions shared by every generator:
- experience i has `id == task_id == i`; the scenario's `setting` and
  `task_labels_at_test` decide whether the task id is used at test time;
- labels keep their global class ids (no remapping per task);
- test experience i mirrors train experience i (same task id, same classes,
  same sample transform); both list the labels present in either (blurry is
  the exception: its test experiences list their home classes);
- per-experience input transforms (permutation, rotation) are not applied
  here: each experience keeps the stored data (shared with the other
  experiences when it uses all samples) and its `transform`, applied when a
  batch is read (see cl/transforms.py), so the stream costs one copy of the data;
- samples inside an experience keep their dataset order (subsets are sorted
  back into dataset order); the runner shuffles batches.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cl.data import Experience, LabelledData, Scenario
from cl.errors import UserError
from cl.params import check_params, param
from cl.registry import register_scenario
from cl.seeding import spawn_seeds
from cl.transforms import Permutation, Rotation, SampleTransform, to_float

SEED_DOC = "scenario seed; none = the run's seed"
MAX_EXPERIENCES = 1000  # beyond this the (T+1) x T evaluation alone is absurd on any machine


# ---------------------------------------------------------------- helpers


def _resolve_seed(p: Any, seed: int) -> int:
    """`p.seed` when set, else the run seed; must be a non-negative integer."""
    resolved = p.seed if p.seed is not None else seed
    if resolved < 0:
        raise UserError(f"scenario seed must be >= 0, got {resolved}; set seed to a non-negative integer")
    return int(resolved)


def _generators(seed: int, n: int) -> list[torch.Generator]:
    """`n` independent torch generators derived from `seed`, one per random purpose.

    Child i does not depend on `n`, so generators that share a purpose (e.g. the
    class order) draw the same numbers across generators.
    """
    return [torch.Generator().manual_seed(s) for s in spawn_seeds(seed, n)]


def _validate(name: str, p: Any) -> None:
    """Check `p`'s ranges and run its `validate()` (as build_params does) for direct callers."""
    check_params(p, f"scenario {name!r}")


def _one_dataset(name: str, datasets: list[LabelledData]) -> LabelledData:
    if len(datasets) != 1:
        raise UserError(f"scenario {name!r} takes one dataset, got {len(datasets)}")
    datasets[0].check(f"scenario {name!r}")
    return datasets[0]


def _random_subset(name: str, key: str, n_total: int, k: int, gen: torch.Generator) -> torch.Tensor | None:
    """`k` random indices of range(n_total) in dataset order; None (all samples, no copy) when k == 0."""
    if k == 0:
        return None
    if k > n_total:
        raise UserError(f"scenario {name!r}: {key}={k} is more than the {n_total} samples available; "
                        f"set {key} <= {n_total} or 0 for all")
    return torch.randperm(n_total, generator=gen)[:k].sort().values


def _keep_some(name: str, key: str, indices: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """`k` random entries of `indices`, in their order (all of them when k == 0)."""
    chosen = _random_subset(name, key, len(indices), k, gen)
    return indices if chosen is None else indices[chosen]


def _indices_of(y: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Indices (in dataset order) of the samples whose label is in `classes`."""
    return torch.isin(y, torch.tensor(classes, dtype=y.dtype)).nonzero().flatten()


def _mirrored(parts: list[tuple[torch.Tensor, ...]], transforms: list[SampleTransform] | None = None
              ) -> tuple[list[Experience], list[Experience]]:
    """Train and test experiences from (x_train, y_train, x_test, y_test) per experience.

    Both experiences of a pair get the same classes (the labels present in
    either) and the same sample transform.
    """
    train, test = [], []
    for i, (x_tr, y_tr, x_te, y_te) in enumerate(parts):
        classes = torch.unique(torch.cat([y_tr, y_te])).long()
        transform = transforms[i] if transforms else None
        train.append(Experience(id=i, x=x_tr, y=y_tr, task_id=i, classes=classes, transform=transform))
        test.append(Experience(id=i, x=x_te, y=y_te, task_id=i, classes=classes.clone(), transform=transform))
    return train, test


def _scenario(name: str, p: Any, seed: int, datasets: list[LabelledData], train: list[Experience],
              test: list[Experience], *, n_classes: int, setting: str,
              task_labels_at_test: bool = False, **facts: Any) -> Scenario:
    """Wrap the streams in a Scenario with the standard JSON-able description plus `facts`."""
    description = {
        "name": name,
        "params": {**dataclasses.asdict(p), "seed": seed},
        "datasets": [d.describe() for d in datasets],
        "experiences": [{"classes": tr.classes.tolist(), "n_train": len(tr), "n_test": len(te)}
                        for tr, te in zip(train, test)],
        **facts,
    }
    return Scenario(train=train, test=test, n_classes=n_classes, setting=setting,
                    task_labels_at_test=task_labels_at_test, description=description)


def _class_order(name: str, n_classes: int, class_order: list[int], shuffle: bool,
                 gen: torch.Generator) -> list[int]:
    """The explicit order, a seeded permutation (shuffle), or 0..C-1."""
    if class_order:
        if sorted(class_order) != list(range(n_classes)):
            raise UserError(f"scenario {name!r}: class_order must list each class 0..{n_classes - 1} "
                            f"exactly once, got {class_order}; fix class_order or leave it empty")
        return list(class_order)
    if shuffle:
        return torch.randperm(n_classes, generator=gen).tolist()
    return list(range(n_classes))


def _split_sizes(name: str, n_classes: int, n_experiences: int, classes_per_experience: list[int]) -> list[int]:
    """Classes per experience: the explicit list, or as even as possible (first C % N get one more)."""
    if classes_per_experience:
        sizes = list(classes_per_experience)
        if len(sizes) != n_experiences:
            raise UserError(f"scenario {name!r}: classes_per_experience has {len(sizes)} entries but "
                            f"n_experiences={n_experiences}; give one entry per experience")
        if min(sizes) < 1 or sum(sizes) != n_classes:
            raise UserError(f"scenario {name!r}: classes_per_experience {sizes} must be positive and sum "
                            f"to the {n_classes} classes; fix classes_per_experience")
        return sizes
    if n_experiences > n_classes:
        raise UserError(f"scenario {name!r}: n_experiences={n_experiences} is more than the {n_classes} "
                        f"classes; set n_experiences <= {n_classes}")
    base, extra = divmod(n_classes, n_experiences)
    return [base + (i < extra) for i in range(n_experiences)]


def _class_groups(order: list[int], sizes: list[int]) -> list[list[int]]:
    """Consecutive chunks of `order` with the given sizes, each sorted."""
    groups, start = [], 0
    for size in sizes:
        groups.append(sorted(order[start:start + size]))
        start += size
    return groups


def _validate_class_order(p: Any) -> None:
    if p.class_order and p.shuffle_classes:
        raise ValueError("class_order and shuffle_classes are both set; set only one of them")


# ---------------------------------------------------------------- class_incremental


@dataclasses.dataclass
class ClassIncrementalParams:
    n_experiences: int = param(5, "number of experiences; the classes are split among them", low=1,
                               high=MAX_EXPERIENCES)
    class_order: list[int] = param([], "explicit class order (a permutation of all classes); empty = default",
                                   low=0)
    shuffle_classes: bool = param(False, "without class_order: seeded random class order instead of 0..C-1")
    classes_per_experience: list[int] = param([], "classes in each experience; empty = as even as possible",
                                              low=1)
    task_labels: bool = param(False, "give the task id at test time (task-il) instead of class-il")
    train_per_experience: int = param(0, "random training samples kept per experience; 0 = all", low=0)
    test_per_experience: int = param(0, "random test samples kept per experience; 0 = all", low=0)
    seed: int | None = param(None, SEED_DOC, low=0)

    def validate(self) -> None:
        _validate_class_order(self)


@register_scenario("class_incremental", params=ClassIncrementalParams)
def class_incremental(datasets: list[LabelledData], p: ClassIncrementalParams, seed: int) -> Scenario:
    """Split one dataset's classes into disjoint experiences (class-il, or task-il with task_labels).

    The class order is `class_order`, else a seeded permutation when
    `shuffle_classes`, else 0..C-1. It is cut into `classes_per_experience`
    consecutive chunks, or as evenly as possible: the first C % N experiences
    get one extra class. Every class lands in exactly one experience. With
    train_per_experience / test_per_experience > 0 each experience keeps that
    many of its samples, drawn at random (seeded).
    """
    name = "class_incremental"
    _validate(name, p)
    d = _one_dataset(name, datasets)
    seed = _resolve_seed(p, seed)
    order_gen, subset_gen, test_subset_gen = _generators(seed, 3)
    order = _class_order(name, d.n_classes, p.class_order, p.shuffle_classes, order_gen)
    groups = _class_groups(order, _split_sizes(name, d.n_classes, p.n_experiences, p.classes_per_experience))
    parts = []
    for classes in groups:
        tr = _keep_some(name, "train_per_experience", _indices_of(d.y_train, classes), p.train_per_experience,
                        subset_gen)
        te = _keep_some(name, "test_per_experience", _indices_of(d.y_test, classes), p.test_per_experience,
                        test_subset_gen)
        parts.append((d.x_train[tr], d.y_train[tr], d.x_test[te], d.y_test[te]))
    train, test = _mirrored(parts)
    return _scenario(name, p, seed, datasets, train, test, n_classes=d.n_classes,
                     setting="task-il" if p.task_labels else "class-il",
                     task_labels_at_test=p.task_labels, class_order=order)


# ---------------------------------------------------------------- permuted


@dataclasses.dataclass
class PermutedParams:
    n_experiences: int = param(10, "number of experiences, each with its own fixed input permutation", low=1,
                               high=MAX_EXPERIENCES)
    fraction: float = param(1.0, "fraction of input positions that are permuted (1 = full, 0 = identity)",
                           low=0, high=1)
    train_per_experience: int = param(0, "random training samples per experience; 0 = all", low=0)
    test_per_experience: int = param(0, "random test samples per experience; 0 = all", low=0)
    seed: int | None = param(None, SEED_DOC, low=0)


def _partial_permutation(size: int, fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, positions): round(fraction * size) random positions shuffled among themselves.

    `perm` is an index permutation of range(size) that is the identity outside
    `positions` (a position may still map to itself by chance).
    """
    k = round(fraction * size)
    positions = torch.randperm(size, generator=gen)[:k]
    perm = torch.arange(size)
    perm[positions] = positions[torch.randperm(k, generator=gen)]
    return perm, positions


def _subset_parts(name: str, d: LabelledData, p: Any, train_gen: torch.Generator,
                  test_gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """This experience's (x_train, y_train, x_test, y_test): random subsets of
    train_per_experience / test_per_experience samples, or the dataset's own tensors (shared, not copied).
    Two generators, so that the size of the test subsets never changes the training ones."""
    tr = _random_subset(name, "train_per_experience", len(d.y_train), p.train_per_experience, train_gen)
    te = _random_subset(name, "test_per_experience", len(d.y_test), p.test_per_experience, test_gen)
    x_tr, y_tr = (d.x_train, d.y_train) if tr is None else (d.x_train[tr], d.y_train[tr])
    x_te, y_te = (d.x_test, d.y_test) if te is None else (d.x_test[te], d.y_test[te])
    return x_tr, y_tr, x_te, y_te


@register_scenario("permuted", params=PermutedParams)
def permuted(datasets: list[LabelledData], p: PermutedParams, seed: int) -> Scenario:
    """Each experience applies its own fixed permutation of input positions (domain-il, e.g. permuted MNIST).

    Experience t draws round(fraction * D) of the D input positions and shuffles
    them among themselves (so fraction 0 is the identity); the same permutation
    is applied to its train and test inputs, whatever their shape. Every
    experience, the first included, is permuted. With train_per_experience /
    test_per_experience > 0 each experience draws its own random subset, as in
    the GEM protocol (1000 training samples per task).
    """
    name = "permuted"
    _validate(name, p)
    d = _one_dataset(name, datasets)
    seed = _resolve_seed(p, seed)
    perm_gen, subset_gen, test_subset_gen = _generators(seed, 3)
    size = int(np.prod(d.input_shape))
    parts, transforms, n_moved = [], [], 0
    for _ in range(p.n_experiences):
        perm, positions = _partial_permutation(size, p.fraction, perm_gen)
        n_moved = len(positions)
        parts.append(_subset_parts(name, d, p, subset_gen, test_subset_gen))
        transforms.append(Permutation(perm))
    train, test = _mirrored(parts, transforms)
    return _scenario(name, p, seed, datasets, train, test, n_classes=d.n_classes, setting="domain-il",
                     input_size=size, n_permuted_positions=n_moved)


# ---------------------------------------------------------------- rotated


@dataclasses.dataclass
class RotatedParams:
    n_experiences: int = param(10, "number of experiences, each with its own fixed rotation angle", low=1,
                               high=MAX_EXPERIENCES)
    min_angle: float = param(0.0, "smallest rotation angle in degrees (counter-clockwise)")
    max_angle: float = param(180.0, "largest rotation angle in degrees; experience t draws from slice t of the range")
    train_per_experience: int = param(0, "random training samples per experience; 0 = all", low=0)
    test_per_experience: int = param(0, "random test samples per experience; 0 = all", low=0)
    seed: int | None = param(None, SEED_DOC, low=0)

    def validate(self) -> None:
        if self.min_angle > self.max_angle:
            raise ValueError(f"min_angle={self.min_angle} is larger than max_angle={self.max_angle}; "
                             f"set min_angle <= max_angle")


def _angles(n: int, lo: float, hi: float, gen: torch.Generator) -> list[float]:
    """Angle t uniform in [lo + t*w, lo + (t+1)*w), w = (hi - lo) / n; all equal lo when lo == hi."""
    width = (hi - lo) / n
    u = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    return [lo + (t + u[t]) * width for t in range(n)]


@register_scenario("rotated", params=RotatedParams)
def rotated(datasets: list[LabelledData], p: RotatedParams, seed: int) -> Scenario:
    """Each experience rotates all images by its own fixed angle (domain-il, e.g. rotated MNIST).

    Experience t's angle is drawn uniformly from its own slice
    [min_angle + t*w, min_angle + (t+1)*w), w = (max_angle - min_angle) / n_experiences,
    so angles increase with t; with min_angle == max_angle every experience
    uses that angle. Train and test of an experience get the same rotation.
    """
    name = "rotated"
    _validate(name, p)
    d = _one_dataset(name, datasets)
    if len(d.input_shape) not in (2, 3) or min(d.input_shape[-2:]) < 2:  # (1, 40): MNIST-1D's channel, length
        raise UserError(f"scenario {name!r} needs image inputs (C, H, W) or (H, W); dataset {d.name!r} has "
                        f"input shape {list(d.input_shape)}; use an image dataset or the 'permuted' scenario")
    seed = _resolve_seed(p, seed)
    angle_gen, subset_gen, test_subset_gen = _generators(seed, 3)
    angles = _angles(p.n_experiences, p.min_angle, p.max_angle, angle_gen)
    parts = [_subset_parts(name, d, p, subset_gen, test_subset_gen) for _ in angles]
    train, test = _mirrored(parts, [Rotation(angle) for angle in angles])
    return _scenario(name, p, seed, datasets, train, test, n_classes=d.n_classes, setting="domain-il",
                     angles=angles)


# ---------------------------------------------------------------- domain_incremental


@dataclasses.dataclass
class DomainIncrementalParams:
    resize: bool = param(True, "resize images to the first dataset's height and width when sizes differ")
    seed: int | None = param(None, SEED_DOC, low=0)


def _same_space(name: str, datasets: list[LabelledData], resize: bool) -> None:
    """Check that all datasets are usable and share n_classes and (up to resizing) input shape."""
    for d in datasets:
        d.check(f"scenario {name!r}")
    first = datasets[0]
    for d in datasets[1:]:
        if d.n_classes != first.n_classes:
            raise UserError(f"scenario {name!r} needs a shared label space: {first.name!r} has "
                            f"{first.n_classes} classes but {d.name!r} has {d.n_classes}; "
                            f"use datasets with the same classes")
        if d.input_shape == first.input_shape:
            continue
        shapes = f"{first.name!r} has input shape {list(first.input_shape)}, {d.name!r} has {list(d.input_shape)}"
        if len(d.input_shape) != 3 or len(first.input_shape) != 3 or d.input_shape[0] != first.input_shape[0]:
            raise UserError(f"scenario {name!r}: {shapes}; only images (C, H, W) with the same channel "
                            f"count can be combined; use datasets with matching channels")
        if not resize:
            raise UserError(f"scenario {name!r}: {shapes}; set resize = true or use datasets of one size")


def _resized(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to (H, W) = size, in the stored dtype (uint8 rounded back);
    unchanged when already that size."""
    if tuple(x.shape[2:]) == tuple(size) or len(x) == 0:
        return x
    out = F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False)
    if x.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.clamp_(0.0, 1.0).to(x.dtype)


@register_scenario("domain_incremental", params=DomainIncrementalParams)
def domain_incremental(datasets: list[LabelledData], p: DomainIncrementalParams, seed: int) -> Scenario:
    """Experience i is dataset i; two or more datasets that share one label space (domain-il).

    All datasets need the same n_classes. Images of another height or width are
    resized (bilinear) to the first dataset's size when `resize` is true;
    channel counts must match. When some datasets store uint8 images and others
    float inputs, all are converted to float (uint8 / 255). The generator draws
    nothing at random.
    """
    name = "domain_incremental"
    _validate(name, p)
    if len(datasets) < 2:
        raise UserError(f"scenario {name!r} takes two or more datasets, got {len(datasets)}")
    _same_space(name, datasets, p.resize)
    seed = _resolve_seed(p, seed)
    size = datasets[0].input_shape[1:]
    mixed = len({d.x_train.dtype for d in datasets}) > 1  # uint8 images beside float inputs: all as float
    parts = []
    for d in datasets:
        x_tr, x_te = (to_float(d.x_train), to_float(d.x_test)) if mixed else (d.x_train, d.x_test)
        if d.input_shape != datasets[0].input_shape:
            x_tr, x_te = _resized(x_tr, size), _resized(x_te, size)
        parts.append((x_tr, d.y_train, x_te, d.y_test))
    train, test = _mirrored(parts)
    return _scenario(name, p, seed, datasets, train, test, n_classes=datasets[0].n_classes,
                     setting="domain-il", input_shape=list(datasets[0].input_shape))


# ---------------------------------------------------------------- blurry


@dataclasses.dataclass
class BlurryParams:
    n_experiences: int = param(5, "number of experiences; each class has a home experience", low=1,
                               high=MAX_EXPERIENCES)
    overlap: float = param(0.1, "fraction of each class's training samples spread over the other experiences "
                                "(below (n_experiences - 1) / n_experiences)", low=0, high=1)
    class_order: list[int] = param([], "explicit class order (a permutation of all classes); empty = default",
                                   low=0)
    shuffle_classes: bool = param(False, "without class_order: seeded random class order instead of 0..C-1")
    seed: int | None = param(None, SEED_DOC, low=0)

    def validate(self) -> None:
        if self.overlap > 0 and self.n_experiences < 2:
            raise ValueError("overlap > 0 needs n_experiences >= 2; raise n_experiences or set overlap = 0")
        most = (self.n_experiences - 1) / self.n_experiences
        if self.n_experiences >= 2 and self.overlap >= most:  # home keeps 1 - overlap; each other, overlap / (n-1)
            raise ValueError(f"overlap {self.overlap:g} leaves a class no more samples at home than in each other "
                             f"experience of {self.n_experiences}; use overlap < {most:.3g}")
        _validate_class_order(self)


def _blurry_assignment(y: torch.Tensor, home: torch.Tensor, n_experiences: int, overlap: float,
                       gen: torch.Generator) -> torch.Tensor:
    """Experience of each training sample: its class's home, except round(overlap * n_c) per class.

    Those samples (chosen at random) each go to a uniformly random other experience.
    """
    where = home[y].clone()
    for c in range(len(home)):
        idx = (y == c).nonzero().flatten()
        n_moved = round(overlap * len(idx))
        moved = idx[torch.randperm(len(idx), generator=gen)[:n_moved]]
        shift = torch.randint(1, max(n_experiences, 2), (n_moved,), generator=gen)
        where[moved] = (home[c] + shift) % n_experiences
    return where


@register_scenario("blurry", params=BlurryParams)
def blurry(datasets: list[LabelledData], p: BlurryParams, seed: int) -> Scenario:
    """Class-incremental split whose class boundaries overlap by `overlap` (class-il).

    Each class's home experience comes from an even class-incremental split of
    the class order (as in class_incremental). For every class with n_c
    training samples, round(overlap * n_c) of them (Python round: halves go to
    the even number) are moved out of the home experience, each to a uniformly
    random other experience; the rest stay home. Test experience i holds the
    test samples of the classes whose home is i. Train experiences list the
    classes present; test experiences list their home classes.
    """
    name = "blurry"
    _validate(name, p)
    d = _one_dataset(name, datasets)
    seed = _resolve_seed(p, seed)
    order_gen, move_gen = _generators(seed, 2)
    order = _class_order(name, d.n_classes, p.class_order, p.shuffle_classes, order_gen)
    groups = _class_groups(order, _split_sizes(name, d.n_classes, p.n_experiences, []))
    home = torch.empty(d.n_classes, dtype=torch.long)
    for i, classes in enumerate(groups):
        home[classes] = i
    where = _blurry_assignment(d.y_train.long(), home, p.n_experiences, p.overlap, move_gen)
    train, test = [], []
    for i, classes in enumerate(groups):
        tr, te = (where == i).nonzero().flatten(), _indices_of(d.y_test, classes)
        train.append(Experience(id=i, x=d.x_train[tr], y=d.y_train[tr], task_id=i,
                                classes=torch.unique(d.y_train[tr]).long()))
        test.append(Experience(id=i, x=d.x_test[te], y=d.y_test[te], task_id=i,
                               classes=torch.tensor(classes, dtype=torch.long)))
    return _scenario(name, p, seed, datasets, train, test, n_classes=d.n_classes, setting="class-il",
                     class_order=order, home_classes=groups)
