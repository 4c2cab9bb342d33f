"""Small builders shared by the strategy and evaluation tests."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from cl.config import build_experiment

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")]),
]


def digits_experiment(strategies: list[dict[str, Any]], n_experiences: int = 5, epochs: int = 1,
                      batch_size: int = 10, lr: float = 0.05, hidden: list[int] | None = None,
                      seeds: list[int] | None = None, **scenario: Any):
    """A split-digits (sklearn 8x8) class-incremental experiment: fast enough for unit tests."""
    raw = {
        "name": "test-digits",
        "seeds": seeds or [0],
        "dataset": {"name": "digits"},
        "scenario": {"name": "class_incremental", "n_experiences": n_experiences, **scenario},
        "model": {"name": "mlp", "hidden": hidden or [64]},
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr},
        "strategies": strategies,
    }
    return build_experiment(raw)
