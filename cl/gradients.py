"""Gradients as flat vectors, and one gradient per group of samples in one vectorised pass.

GEM needs the loss gradient of every stored task at every step. Instead of one
backward pass per task, `grouped_gradients` maps `torch.func.grad` over the
groups with `torch.func.vmap`: the forward and backward of all groups run as
batched matrix products, one Python pass for the lot.

EWC's Fisher needs the sum over samples of every parameter's squared per-sample
gradient. For linear layers `linear_squared_gradient_sums` gets it without
per-sample gradients (see there).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import grad, vmap


def grad_or_zeros(grad: torch.Tensor | None, parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient; zeros shaped like it where autograd gave None (the parameter was unused)."""
    return torch.zeros_like(parameter) if grad is None else grad


def flat_grad(params: list[nn.Parameter], grads: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Gradients of `params` as one vector: their .grad, or `grads` (e.g. from torch.autograd.grad)
    when given; zeros where a gradient is None."""
    grads = [p.grad for p in params] if grads is None else grads
    return torch.cat([grad_or_zeros(g, p).reshape(-1) for g, p in zip(grads, params)])


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


def linear_squared_gradient_sums(model: nn.Module, per_sample_loss: Callable[[], torch.Tensor]
                                 ) -> dict[str, torch.Tensor] | None:
    """For each parameter of `model`, the sum over the batch's samples of its squared per-sample
    gradient of `per_sample_loss()` (a vector, one loss per sample), without per-sample gradients.

    A sample's gradient of a linear layer's weight is the outer product of the loss gradient at the
    layer's output and the layer's input, d_n x_n^T, so the sum of its squares over the samples is
    (d^2)^T (x^2): one matrix product per layer, exact. (The bias: the sum of d^2.) That holds when
    samples do not interact in the forward pass (true in eval mode) and every parameter belongs to
    an `nn.Linear` called once per forward on (samples, features): returns
    None otherwise (a parameter elsewhere, a layer called twice or on other shapes, shared weights),
    and the caller computes per-sample gradients instead.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    owned = {f"{name}.{kind}": getattr(m, kind) for name, m in layers.items() for kind in ("weight", "bias")
             if getattr(m, kind) is not None}
    params = dict(model.named_parameters())
    if set(params) != set(owned) or len({id(p) for p in owned.values()}) != len(owned):
        return None
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    handles = [m.register_forward_hook(lambda _, args, out, name=name: calls[name].append((args[0], out)))
               for name, m in layers.items()]
    try:
        with torch.enable_grad():
            losses = per_sample_loss()
    finally:
        for handle in handles:
            handle.remove()
    n = losses.shape[0]
    if any(len(c) != 1 or c[0][0].dim() != 2 or c[0][0].shape[0] != n for c in calls.values()):
        return None
    names = list(layers)
    deltas = torch.autograd.grad(losses.sum(), [calls[name][0][1] for name in names], allow_unused=True)
    sums = {}
    for name, delta in zip(names, deltas):
        layer, x = layers[name], calls[name][0][0].detach()
        d2 = torch.zeros(n, layer.out_features, device=x.device, dtype=x.dtype) if delta is None else delta ** 2
        sums[f"{name}.weight"] = d2.T @ (x ** 2)
        if layer.bias is not None:
            sums[f"{name}.bias"] = d2.sum(0)
    return sums
