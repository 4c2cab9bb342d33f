"""A lean `torch.func.vmap` for the stacked engine's step (cl/stacking.py).

`torch.func.vmap(f)(*args)` flattens its arguments' pytrees, wraps every leaf as a
batched tensor, calls `f`, and unwraps the outputs' pytree, all in Python; with
`torch.func.functional_call` binding a model's parameters on top, that was a
third of a stacked step of a small MLP on these CPUs (measured: the forward of
3 stacked MLP 784-100-100-10 members took 610 us through vmap + functional_call
and 400 us through this). The stacked engine calls the same objective with the
same structure at every step, so it binds once per experience which module
attributes take which stacked tensor (`ModuleSlots`) and, per step, only wraps
those tensors at a new vmap level (`vmap_level`, `batched`) and unwraps the
outputs (`unbatched`). These are the functions `torch.func.vmap` itself is built
on (torch._C._functorch); a test checks this path against `torch.func.vmap`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch._C._functorch import _add_batch_dim, _remove_batch_dim, _vmap_decrement_nesting, _vmap_increment_nesting


@contextlib.contextmanager
def vmap_level(size: int, randomness: str = "error") -> Iterator[int]:
    """A vmap level over a leading dimension of `size`, for the duration of the block."""
    level = _vmap_increment_nesting(size, randomness)
    try:
        yield level
    finally:
        _vmap_decrement_nesting()


def batched(tensor: torch.Tensor, level: int) -> torch.Tensor:
    """`tensor` (members along dimension 0) as one member's slice at `level`."""
    return _add_batch_dim(tensor, 0, level)


def unbatched(tensor: torch.Tensor, level: int, size: int) -> torch.Tensor:
    """A result computed at `level` with members along dimension 0 again (expanded if it did not depend
    on the members)."""
    return _remove_batch_dim(tensor, level, size, 0)


class ModuleSlots:
    """Tensor attributes (parameters and buffers) of modules, resolved once, rebound for a call.

    `bound(tensors)` puts the given tensors in place of the modules' own in their `_parameters` and
    `_buffers` dicts, where `module.weight` finds them, and puts the originals back afterwards; unlike
    `functional_call` it looks the names up once, in `add`, not at every call."""

    def __init__(self) -> None:
        self.slots: list[tuple[dict[str, torch.Tensor], str]] = []

    def add(self, module: nn.Module, names: list[str]) -> None:
        for name in names:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            table = owner._parameters if attr in owner._parameters else owner._buffers
            if attr not in table:
                raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")
            self.slots.append((table, attr))

    @contextlib.contextmanager
    def bound(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        saved = [table[attr] for table, attr in self.slots]
        try:
            for (table, attr), tensor in zip(self.slots, tensors):
                table[attr] = tensor
            yield
        finally:
            for (table, attr), tensor in zip(self.slots, saved):
                table[attr] = tensor
