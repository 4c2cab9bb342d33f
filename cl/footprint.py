"""A lower bound on a run's memory, checked against what the device has before anything is allocated.

The bound counts what every run of a strategy must hold: the backbone's weights
(built on PyTorch's `meta` device, so an absurd `hidden = [10**12]` costs nothing
to measure), the gradients of those the experiment trains (for a strategy that
trains the backbone's own parameters), and the samples the strategy declares it
stores (`Strategy.stored_samples`), each at the size of its input as the dataset
stores it (uint8 images: one byte a pixel, before any resize; buffers keep
`batch.raw`). Optimizer moments, activations, old-model copies, logits and the
scenario's data come on top, so a run refused here could never have fitted.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from cl.strategy import ModelSpec
from cl.training import TrainingParams, is_frozen

BYTES = 4  # float32 weights and gradients


def meta_model(model: ModelSpec) -> nn.Module:
    """The configured backbone built on the meta device: its structure, with nothing allocated."""
    with torch.device("meta"), warnings.catch_warnings():
        # a backbone loading a checkpoint copies it into meta parameters: a no-op PyTorch warns about
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        return model.build()


def parameter_counts(model: ModelSpec, training: TrainingParams) -> tuple[int, int]:
    """(all, trained) parameters of the configured backbone, counted without allocating them; trained:
    those that require gradients and `training.freeze` leaves alone."""
    try:
        named = list(meta_model(model).named_parameters())
    except RuntimeError as exc:  # sizes whose product overflows: certainly too large
        if "overflow" in str(exc):
            return 2**63 - 1, 0
        raise
    return (sum(p.numel() for _, p in named),
            sum(p.numel() for name, p in named if p.requires_grad and not is_frozen(name, training)))


def lower_bound(weights: int, gradients: int, stored_samples: int, sample_bytes: int) -> tuple[int, str]:
    """(bytes, what they are) that a run must hold at least: `weights` parameters, `gradients` of them
    trained, and `stored_samples` kept samples of `sample_bytes` each."""
    total = BYTES * (weights + gradients) + stored_samples * sample_bytes
    what = f"{weights:,} model parameters"
    if gradients:
        what += f" with {gradients:,} gradients"
    if stored_samples:
        what += f" and {stored_samples:,} stored samples of {sample_bytes:,} bytes"
    return total, what


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (MemAvailable for the CPU); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"
