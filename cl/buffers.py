"""Replay buffers kept as preallocated tensors on the run's device.

`TensorBuffer` holds the storage (x, y, task id), sampling and state;
`ReservoirBuffer` fills it online, `ClassBalancedBuffer` once per experience.

`ReservoirBuffer.add` is the reservoir sampling of Vitter (Algorithm R) applied to
a whole batch at once without leaving the device: sample number g (0-based,
counting every sample ever offered) goes to slot g while the buffer is not
full, later to a uniform slot r in [0, g] if r < capacity. When two samples of
one batch pick the same slot the later one wins, exactly as the sequential
algorithm would. Rejected samples are written to one scratch row past the end,
so the update is a single `index_put_` with no host synchronisation.
"""
from __future__ import annotations

from typing import Any

import torch

from cl.strategy import tensor_bytes


class TensorBuffer:
    """Preallocated (capacity + 1) rows of x, y and t; the last row is scratch space."""

    def __init__(self, capacity: int, input_shape: tuple[int, ...], device: torch.device,
                 generator: torch.Generator, x_dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise ValueError("buffer capacity must be >= 1")
        self.capacity = capacity
        self.generator = generator
        self.device = device
        self.x = torch.zeros((capacity + 1, *input_shape), dtype=x_dtype, device=device)
        self.y = torch.zeros(capacity + 1, dtype=torch.long, device=device)
        self.t = torch.zeros(capacity + 1, dtype=torch.long, device=device)
        self.n_seen = 0  # samples offered so far (host int: no device sync needed)

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n samples drawn uniformly with replacement from the filled part."""
        idx = torch.randint(len(self), (n,), generator=self.generator, device=self.device)
        return self.x[idx], self.y[idx], self.t[idx]

    def memory_bytes(self) -> int:
        c = self.capacity
        return tensor_bytes(self.x[:c], self.y[:c], self.t[:c])

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "t": self.t, "n_seen": self.n_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x.copy_(state["x"]), self.y.copy_(state["y"]), self.t.copy_(state["t"])
        self.n_seen = int(state["n_seen"])


class ReservoirBuffer(TensorBuffer):
    """Every sample offered so far has the same chance to be in the buffer."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._offsets: dict[int, torch.Tensor] = {}  # arange(b) per batch size, made once

    def _slots(self, b: int) -> torch.Tensor:
        """Slot for each of the next b samples; `capacity` (the scratch row) = rejected."""
        offsets = self._offsets.get(b)
        if offsets is None:
            offsets = self._offsets[b] = torch.arange(b, device=self.device)
        g = offsets + self.n_seen  # global sample numbers
        # float64: float32 draws could only reach multiples of (g + 1) / 2**24 on long streams.
        r = (torch.rand(b, generator=self.generator, device=self.device, dtype=torch.float64) * (g + 1)).long()
        slot = torch.where(g < self.capacity, g, r)
        accepted = slot < self.capacity
        same = slot.unsqueeze(0) == slot.unsqueeze(1)  # same[i, k]: i and k picked one slot
        later = offsets.unsqueeze(0) > offsets.unsqueeze(1)  # k comes after i
        superseded = (same & later & accepted.unsqueeze(0)).any(dim=1)
        return torch.where(accepted & ~superseded, slot, self.capacity)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        b = len(y)
        if self.n_seen + b <= self.capacity:  # still filling: plain slice copy
            s = slice(self.n_seen, self.n_seen + b)
            self.x[s], self.y[s], self.t[s] = x, y, t
        else:
            slots = self._slots(b)
            self.x[slots], self.y[slots], self.t[slots] = x, y, t
        self.n_seen += b


class ClassBalancedBuffer(TensorBuffer):
    """Equal slots per class seen so far, refilled at the end of each experience.

    The capacity is shared out by water-filling: classes in order of how many
    samples they have (fewest first, ties by class id) each take
    min(available, remaining slots // classes left), so a class with too few
    samples leaves its unused slots to the others and no slot stays empty while
    any class has samples to spare. Old classes keep a prefix of their (already
    random) samples; new classes get a random subset.
    """

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        n = len(self)
        old_x, old_y, old_t = self.x[:n], self.y[:n], self.t[:n]
        classes, available = torch.unique(torch.cat([old_y, y]), return_counts=True)
        quotas = water_fill(dict(zip(classes.tolist(), available.tolist())), self.capacity)
        keep_x, keep_y, keep_t = [], [], []
        for c, q in quotas.items():
            old = (old_y == c).nonzero().flatten()
            new = (y == c).nonzero().flatten()
            new = new[torch.randperm(len(new), generator=self.generator, device=self.device)]
            take_old = old[:q]
            take_new = new[: q - len(take_old)]
            keep_x += [old_x[take_old], x[take_new]]
            keep_y += [old_y[take_old], y[take_new]]
            keep_t += [old_t[take_old], t[take_new]]
        new_x, new_y, new_t = torch.cat(keep_x), torch.cat(keep_y), torch.cat(keep_t)
        m = len(new_y)
        self.x[:m], self.y[:m], self.t[:m] = new_x, new_y, new_t
        self.n_seen = m  # len() == number of filled slots


def water_fill(available: dict[int, int], capacity: int) -> dict[int, int]:
    """Slots per class: as equal as possible, never more than a class has."""
    quotas = {}
    remaining = capacity
    order = sorted(available, key=lambda c: (available[c], c))
    for k, c in enumerate(order):
        quotas[c] = min(available[c], remaining // (len(order) - k))
        remaining -= quotas[c]
    return dict(sorted(quotas.items()))
