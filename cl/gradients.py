"""Gradients as flat vectors, and one gradient per group of samples in one vectorised pass.

GEM needs the loss gradient of every stored task at every step. Instead of one
backward pass per task, `grouped_gradients` maps `torch.func.grad` over the
groups with `torch.func.vmap`: the forward and backward of all groups run as
batched matrix products, one Python pass for the lot.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import grad, vmap


def flat_grad(params: list[nn.Parameter], grads: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Gradients of `params` as one vector: their .grad, or `grads` (e.g. from torch.autograd.grad)
    when given; zeros where a gradient is None."""
    grads = [p.grad for p in params] if grads is None else grads
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def set_flat_grad(params: list[nn.Parameter], vector: torch.Tensor) -> None:
    """Write a flat vector back into the parameters' .grad (the inverse of `flat_grad`), in place where
    a .grad exists (in a stacked run it is a view of the stack's gradient)."""
    offset = 0
    for p in params:
        n = p.numel()
        part = vector[offset: offset + n].view_as(p)
        if p.grad is None:
            p.grad = part.clone()
        else:
            p.grad.copy_(part)
        offset += n


def grouped_gradients(loss: Callable[..., torch.Tensor], params: dict[str, torch.Tensor],
                      *groups: torch.Tensor) -> torch.Tensor:
    """Gradient of `loss(params, *slices)` for each slice along dim 0 of `groups`, as rows (groups, p).

    `params` maps names to tensors (detached parameters); the rows follow its order.
    """
    in_dims = (None,) + (0,) * len(groups)
    grads = vmap(grad(loss), in_dims=in_dims, randomness="different")(params, *groups)
    n = groups[0].shape[0]
    return torch.cat([grads[name].reshape(n, -1) for name in params], dim=1)


@contextlib.contextmanager
def batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """Inside the block, batch-norm layers in training mode normalise with the batch's statistics
    and leave their running statistics alone (a running-statistics update cannot run under vmap,
    and extra passes over memory would otherwise change what evaluation uses)."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    try:
        yield
    finally:
        for m, mean, var, count in saved:
            m.track_running_stats = True
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
