"""A lower bound on a run's memory, checked against what the device has before anything is allocated.

The bound counts what every run of a strategy must hold: the backbone's weights
with their gradients and two optimizer moments (4 copies; built on PyTorch's
`meta` device, so an absurd `hidden = [10**12]` costs nothing to measure) and
the samples the strategy declares it stores (`Strategy.stored_samples`), each
with its input and a row of logits. Activations, old-model copies and the
scenario's data come on top, so a run refused here could never have fitted.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from cl.data import StreamInfo
from cl.strategy import ModelSpec

MODEL_COPIES = 4  # weights, gradients, two optimizer moments (Adam; SGD with momentum needs fewer)
BYTES = 4  # float32


def meta_model(model: ModelSpec) -> nn.Module:
    """The configured backbone built on the meta device: its structure, with nothing allocated."""
    with torch.device("meta"), warnings.catch_warnings():
        # a backbone loading a checkpoint copies it into meta parameters: a no-op PyTorch warns about
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        return model.build()


def parameter_count(model: ModelSpec) -> int:
    """Parameters of the configured backbone, counted without allocating them."""
    try:
        return sum(p.numel() for p in meta_model(model).parameters())
    except RuntimeError as exc:  # sizes whose product overflows: certainly too large
        if "overflow" in str(exc):
            return 2**63 - 1
        raise


def lower_bound(n: int, stream: StreamInfo, stored_samples: int) -> tuple[int, str]:
    """(bytes, what they are) that a run must hold at least, for a backbone of `n` parameters."""
    sample = (math.prod(stream.input_shape) + stream.n_classes) * BYTES
    total = MODEL_COPIES * BYTES * n + stored_samples * sample
    what = f"{n:,} model parameters x {MODEL_COPIES} copies"
    if stored_samples:
        what += f" and {stored_samples:,} stored samples"
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
