"""Replay buffers: named tensor fields on the device, with a pluggable selection policy.

A `Buffer` stores whatever named tensors a strategy gives it (inputs, labels,
task ids, logits, features, ...) in preallocated rows on the run's device; the
fields and their shapes are fixed by the first insertion. What enters and what
leaves is decided by a policy:

- `Reservoir` (online, `add` every step): every sample offered so far has the same
  chance to be in the buffer (Vitter's Algorithm R, applied to a whole batch at once).
- `RingPerTask` (online): `per_task` slots for each task, overwritten first-in
  first-out, so each task keeps its latest samples (GEM's episodic memory).
- `ClassBalanced` (per experience, `update`): equal slots per class, each class's
  slots a uniform random sample of all of that class's samples seen so far.
- `Herding` (per experience): equal slots per class, new classes chosen by herding
  on L2-normalised features and stored in herding order (iCaRL).

`sample(n)` draws min(n, len) distinct filled slots (without replacement, as
Mammoth does; `replace=True` draws with replacement) and returns the fields
with the slot indices. No step of an online policy synchronises with the device.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.autograd.graph import increment_version

from cl.data import rows, tensor_bytes

Fields = dict[str, torch.Tensor]


class BufferSample:
    """Fields of sampled buffer rows (`sample["x"]`) and the slot each came from (`sample.index`)."""

    def __init__(self, fields: Fields, index: torch.Tensor):
        self.fields = fields
        self.index = index

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.fields[name]

    def __len__(self) -> int:
        return len(self.index)


class Buffer:
    """`capacity` rows of named fields (+ one scratch row for rejected writes); `policy` chooses the rows."""

    def __init__(self, capacity: int, policy: "Policy", device: torch.device, generator: torch.Generator):
        if capacity < 1:
            raise ValueError("buffer capacity must be >= 1")
        self.capacity = capacity
        self.policy = policy
        self.device = device
        self.generator = generator
        self.fields: Fields = {}
        self.size = 0  # filled slots
        self.n_seen = 0  # samples offered so far (a host int: no device sync)
        policy.check(self)

    def __len__(self) -> int:
        return self.size

    def _allocate(self, fields: Fields) -> int:
        sizes = {len(v) for v in fields.values()}
        if len(sizes) != 1:
            raise ValueError(f"buffer fields must have one length each, got {[len(v) for v in fields.values()]}")
        if not self.fields:
            self.fields = {name: torch.zeros((self.capacity + 1, *v.shape[1:]), dtype=v.dtype, device=self.device)
                           for name, v in fields.items()}
        elif fields.keys() != self.fields.keys():
            raise ValueError(f"buffer fields are {sorted(self.fields)} (fixed by the first insertion), "
                             f"got {sorted(fields)}")
        return sizes.pop()

    def add(self, task: int = 0, **fields: torch.Tensor) -> None:
        """Offer a batch (online policies); `task` is the batch's task id, used by `RingPerTask`."""
        if not self.policy.online:
            raise TypeError(f"{type(self.policy).__name__} fills the buffer once per experience: use update()")
        n = self._allocate(fields)
        slots = self.policy.place(self, n, task)
        if slots is not None:  # (most reservoir batches, once the stream is long, are rejected whole)
            with torch.no_grad():
                for name, value in fields.items():
                    write_rows(self.fields[name], slots, value)
        self.n_seen += n

    @torch.no_grad()
    def update(self, **fields: torch.Tensor) -> None:
        """Offer a whole experience (per-experience policies): the policy picks what stays of old and new."""
        if self.policy.online:
            raise TypeError(f"{type(self.policy).__name__} fills the buffer every step: use add()")
        n = self._allocate(fields)
        candidates = {name: torch.cat([self.fields[name][: self.size], value]) for name, value in fields.items()}
        keep = self.policy.select(self, candidates, self.size)
        for name, value in candidates.items():
            self.fields[name][: len(keep)] = value[keep]
        self.size = len(keep)
        self.n_seen += n

    def filled_slots(self) -> torch.Tensor | None:
        """Indices of the filled slots, or None when they are the first `len(self)` slots."""
        return self.policy.filled(self)

    def sample(self, n: int, replace: bool = False) -> BufferSample:
        """min(n, len) distinct filled rows chosen uniformly (n rows with replacement if `replace`)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty buffer; check len(buffer) first")
        if replace:
            pos = torch.randint(self.size, (n,), generator=self.generator, device=self.device)
        else:
            pos = torch.randperm(self.size, generator=self.generator, device=self.device)[:n]
        filled = self.filled_slots()
        index = pos if filled is None else filled[pos]
        return BufferSample(self.get(index), index)

    def get(self, index: torch.Tensor) -> Fields:
        return {name: rows(value, index) for name, value in self.fields.items()}

    def memory_bytes(self) -> int:
        return tensor_bytes(*(value[: self.capacity] for value in self.fields.values()))

    def state_dict(self) -> dict[str, Any]:
        return {"fields": self.fields, "size": self.size, "n_seen": self.n_seen, "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fields = {name: value.to(self.device).clone() for name, value in state["fields"].items()}
        self.size, self.n_seen = int(state["size"]), int(state["n_seen"])
        self.policy.load_state_dict(state["policy"])


#: dtypes whose CPU tensors numpy can view as arrays (not bfloat16, for one).
NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                          torch.float16, torch.float32, torch.float64})


def write_rows(t: torch.Tensor, index: torch.Tensor | slice | list[int], values: torch.Tensor) -> None:
    """t[index] = values along the first dimension (under no_grad). A list of row numbers on the CPU
    is written through numpy views of the two tensors when their dtypes allow it: 2 us for a batch of
    10 uint8 images, against 12 us to make the index a tensor and 16-18 us for torch's indexed write
    on these CPUs, paid at most ER steps. Rows listed twice get the last of their values, as in torch."""
    if isinstance(index, list):
        if (t.device.type == "cpu" and values.device.type == "cpu" and t.dtype == values.dtype
                and t.dtype in NUMPY_DTYPES):
            t.numpy()[index] = values.detach().numpy()
            increment_version(t)  # what torch's own write does: autograd then refuses stale saved copies
            return
        index = torch.tensor(index, device=t.device)
    t[index] = values


class Policy:
    """What enters and leaves a buffer. Online policies implement `place`, per-experience ones `select`."""

    online: bool = True

    def check(self, buffer: Buffer) -> None:
        """Refuse a buffer this policy cannot manage (e.g. a capacity that does not fit)."""

    def place(self, buffer: Buffer, n: int, task: int) -> torch.Tensor | slice | list[int] | None:
        """Slot of each of the next n samples; `buffer.capacity` (the scratch row) rejects one; None
        when the policy knows without a device synchronisation that it rejects them all."""
        raise TypeError(f"{type(self).__name__} has no online placement")

    def select(self, buffer: Buffer, candidates: Fields, n_old: int) -> torch.Tensor:
        """Indices into `candidates` (the n_old stored rows, then the new ones) to keep, in storage order."""
        raise TypeError(f"{type(self).__name__} has no per-experience selection")

    def filled(self, buffer: Buffer) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Reservoir(Policy):
    """Algorithm R on whole batches.

    Sample number g (0-based, counting every sample ever offered) goes to slot g
    while the buffer is not full, later to a uniform slot r in [0, g] if r <
    capacity. When two samples of one batch pick the same slot the later one
    wins, exactly as the sequential algorithm would; rejected samples go to the
    scratch row, so the update is one indexed write. On an accelerator the slots
    are computed on the device (no host synchronisation); on the CPU the same
    slots are computed in Python from the same draws, since there a dozen tensor
    operations on 10 numbers cost more than the loop (47 us against about 10 us
    per batch of 10 on these machines, paid at every ER step), as a list that
    `write_rows` writes through numpy; a batch that is rejected whole (most
    batches, once the stream is many times the capacity) writes nothing.
    """

    def __init__(self) -> None:
        self._offsets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per batch size, made once

    def place(self, buffer: Buffer, n: int, task: int) -> torch.Tensor | slice | list[int] | None:
        seen, capacity = buffer.n_seen, buffer.capacity
        buffer.size = min(seen + n, capacity)
        if seen + n <= capacity:  # still filling: a plain slice
            return slice(seen, seen + n)
        # float64: float32 draws could only reach multiples of (g + 1) / 2**24 on long streams.
        draws = torch.rand(n, generator=buffer.generator, device=buffer.device, dtype=torch.float64)
        if buffer.device.type == "cpu":  # a list: written through numpy (write_rows)
            slots = self.slots_on_host(draws.tolist(), seen, capacity)
            return slots if min(slots) < capacity else None
        return self.slots_on_device(draws, seen, capacity)

    @staticmethod
    def slots_on_host(draws: list[float], seen: int, capacity: int) -> list[int]:
        """The slots of samples seen, seen + 1, ... given their uniform draws, one at a time."""
        slots: list[int] = []
        owner: dict[int, int] = {}  # slot -> the batch position that holds it so far
        for i, r in enumerate(draws):
            g = seen + i
            slot = g if g < capacity else int(r * (g + 1))
            if slot < capacity:
                if slot in owner:  # an earlier sample of the batch loses the slot
                    slots[owner[slot]] = capacity
                owner[slot] = i
                slots.append(slot)
            else:
                slots.append(capacity)
        return slots

    def slots_on_device(self, draws: torch.Tensor, seen: int, capacity: int) -> torch.Tensor:
        """The same slots with tensor operations on the draws' device."""
        n = len(draws)
        if n not in self._offsets:
            offsets = torch.arange(n, device=draws.device)
            self._offsets[n] = offsets, offsets.unsqueeze(0) > offsets.unsqueeze(1)  # later[i, k]: k after i
        offsets, later = self._offsets[n]
        g = offsets + seen  # global sample numbers
        slot = (draws * (g + 1)).long()
        if seen < capacity:  # the batch fills the last free slots first
            slot = torch.where(g < capacity, g, slot)
        accepted = slot < capacity
        # An accepted sample loses its slot to a later one of the batch that picked the same slot (which is
        # then accepted too).
        superseded = ((slot.unsqueeze(0) == slot.unsqueeze(1)) & later).any(dim=1)
        return torch.where(accepted & ~superseded, slot, capacity)


class RingPerTask(Policy):
    """`per_task` slots for each of `n_tasks` tasks; a task's slots keep its latest samples (first in, first out)."""

    def __init__(self, per_task: int, n_tasks: int):
        if per_task < 1 or n_tasks < 1:
            raise ValueError("per_task and n_tasks must be >= 1")
        self.per_task, self.n_tasks = per_task, n_tasks
        self.count: dict[int, int] = {}  # samples offered per task
        self._filled: torch.Tensor | None = None

    def check(self, buffer: Buffer) -> None:
        if buffer.capacity != self.per_task * self.n_tasks:
            raise ValueError(f"a RingPerTask buffer needs capacity per_task * n_tasks = "
                             f"{self.per_task * self.n_tasks}, got {buffer.capacity}")

    def place(self, buffer: Buffer, n: int, task: int) -> torch.Tensor:
        if not 0 <= task < self.n_tasks:
            raise ValueError(f"task {task} outside 0..{self.n_tasks - 1}")
        m, start = self.per_task, self.count.get(task, 0)
        k = torch.arange(n, device=buffer.device)
        slot = task * m + (start + k) % m
        if n > m:  # only the last m samples of the batch survive
            slot = torch.where(k >= n - m, slot, buffer.capacity)
        self.count[task] = start + n
        buffer.size = sum(min(c, m) for c in self.count.values())
        self._filled = None
        return slot

    def task_slots(self, task: int, device: torch.device | None = None) -> torch.Tensor:
        """The filled slots of one task."""
        start = task * self.per_task
        return torch.arange(start, start + min(self.count.get(task, 0), self.per_task), device=device)

    def filled(self, buffer: Buffer) -> torch.Tensor:
        if self._filled is None:
            self._filled = torch.cat([self.task_slots(t, buffer.device) for t in sorted(self.count)])
        return self._filled

    def state_dict(self) -> dict[str, Any]:
        return {"count": dict(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = {int(k): int(v) for k, v in state["count"].items()}
        self._filled = None


class ClassBalanced(Policy):
    """Equal slots per class seen so far, rebalanced once per experience.

    Quotas are shared out by `water_fill`. Within a class, the quota is filled
    with a uniform random sample of *all* the samples of that class seen so far:
    the number taken from the stored ones is the number of old samples in a
    uniform draw of `quota` among (seen before + new), so classes that recur
    (permuted, rotated, domain-incremental and blurry streams) let new samples in
    at their fair rate. Only when a class has fewer stored samples than that
    draw asks for (its quota grew) do more new samples fill the gap.
    """

    online = False

    def __init__(self, label_field: str = "y"):
        self.label_field = label_field
        self.seen: dict[int, int] = {}  # samples of each class offered so far

    def select(self, buffer: Buffer, candidates: Fields, n_old: int) -> torch.Tensor:
        y = candidates[self.label_field]
        y_old, y_new = y[:n_old], y[n_old:]
        classes, available = torch.unique(y, return_counts=True)
        quotas = water_fill(dict(zip(classes.tolist(), available.tolist())), buffer.capacity)
        gen, device = buffer.generator, buffer.device
        keep = []
        for c, quota in quotas.items():
            old = (y_old == c).nonzero().flatten()
            new = (y_new == c).nonzero().flatten() + n_old
            before = self.seen.get(c, 0)
            draw = torch.randperm(before + len(new), generator=gen, device=device)[:quota]
            from_new = min(quota - min(int((draw < before).sum()), len(old)), len(new))
            from_old = quota - from_new
            keep += [old[torch.randperm(len(old), generator=gen, device=device)[:from_old]],
                     new[torch.randperm(len(new), generator=gen, device=device)[:from_new]]]
            self.seen[c] = before + len(new)
        return torch.cat(keep)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": dict(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = {int(k): int(v) for k, v in state["seen"].items()}


class Herding(Policy):
    """iCaRL's exemplar memory: capacity // classes seen slots per class.

    A class that already has exemplars keeps the first ones (they are stored in
    herding order, so a prefix is the best smaller set); a new class gets its
    exemplars by herding: repeatedly take the sample that brings the mean of
    the chosen L2-normalised features closest to the class mean. `features`
    maps stored inputs to feature vectors (the strategy's current extractor); it
    is called under `torch.no_grad()`, in whatever mode the model is in, so put a
    model with batch norm or dropout in eval mode inside it.
    """

    online = False

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], input_field: str = "x",
                 label_field: str = "y"):
        self.features = features
        self.input_field, self.label_field = input_field, label_field

    def select(self, buffer: Buffer, candidates: Fields, n_old: int) -> torch.Tensor:
        y = candidates[self.label_field]
        classes = torch.unique(y).tolist()
        per_class = buffer.capacity // len(classes)
        keep = []
        for c in classes:
            old = (y[:n_old] == c).nonzero().flatten()
            if len(old):
                keep.append(old[:per_class])
                continue
            new = (y[n_old:] == c).nonzero().flatten() + n_old
            with torch.no_grad():
                feats = F.normalize(self.features(candidates[self.input_field][new]), dim=1)
            keep.append(new[herding_order(feats, per_class)])
        return torch.cat(keep)


def herding_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of min(k, n) rows chosen greedily so that the running mean of the chosen rows
    stays closest to the mean of all rows (each row chosen at most once)."""
    n = len(features)
    target = features.mean(0)
    running = torch.zeros_like(target)
    available = torch.ones(n, dtype=torch.bool, device=features.device)
    chosen = []
    for step in range(1, min(k, n) + 1):
        distance = (target - (running + features) / step).norm(dim=1).masked_fill(~available, float("inf"))
        i = distance.argmin()
        chosen.append(i)
        running = running + features[i]
        available[i] = False
    return torch.stack(chosen) if chosen else torch.zeros(0, dtype=torch.long, device=features.device)


def water_fill(available: dict[int, int], capacity: int) -> dict[int, int]:
    """Slots per class: as equal as possible, never more than a class has.

    Classes in order of how many samples they have (fewest first, ties by class
    id) each take min(available, remaining slots // classes left), so a class
    with too few samples leaves its unused slots to the others and no slot stays
    empty while any class has samples to spare.
    """
    quotas = {}
    remaining = capacity
    order = sorted(available, key=lambda c: (available[c], c))
    for k, c in enumerate(order):
        quotas[c] = min(available[c], remaining // (len(order) - k))
        remaining -= quotas[c]
    return dict(sorted(quotas.items()))
