"""Loss functions that stay fast when a step runs stacked under `torch.func.vmap`.

`F.cross_entropy` has no vmap batching rule for its `nll_loss` part, so under
vmap PyTorch runs a Python decomposition of it: on these CPUs about 0.45 ms per
call, more than the whole forward pass of a small MLP. Under vmap it is written
as log-softmax and gather, which map directly; outside vmap PyTorch's fused
kernel is kept (one autograd node instead of four). The two agree to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (N, C) logits against N class indices, as `F.cross_entropy`: the mean over the
    samples, or with reduction = "none" one value per sample."""
    if not torch._C._functorch.is_batchedtensor(logits):
        return F.cross_entropy(logits, labels, reduction=reduction)
    per_sample = -F.log_softmax(logits, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    return per_sample if reduction == "none" else per_sample.mean()
