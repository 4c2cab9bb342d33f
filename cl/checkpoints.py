"""Pretrained backbone checkpoints: written by `cl pretrain`, read by models with a `checkpoint` parameter.

A checkpoint is one `torch.save`d dict (loaded with `weights_only=True`):
{"format": FORMAT, "model": registered name, "params": the [model] table, "input_shape",
"features": the feature extractor's state dict, "data_sha256": hash of the training data it saw,
"dataset": the dataset's description, "test_accuracy", "seconds"}. A plain state dict in timm's
format (e.g. a ViT-B/16 someone brings) is accepted too; its classifier head is ignored.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cl.errors import UserError, first_line

FORMAT = "cl-pretrained-backbone/1"


def save_durably(payload: Any, path: Path) -> None:
    """`torch.save` atomically and durably: temporary file, fsync, rename, fsync of the folder. A kill or
    a power loss leaves the previous file (or none), never half of one or an empty one (a rename can
    reach the disk before the data it names unless the data is synced first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    save_durably({"format": FORMAT, **payload}, Path(path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict; a UserError naming the problem for a missing or unreadable file."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model.checkpoint {str(path)!r}: no such file; write one with `cl pretrain FILE`") from None
    except Exception as exc:  # truncated zip, not a torch file, unpicklable content
        raise UserError(f"model.checkpoint {str(path)!r} is not a readable checkpoint ({type(exc).__name__}: "
                        f"{(first_line(exc) or 'empty')[:120]}); it may be truncated: write it again") from None
    if not isinstance(blob, dict):
        raise UserError(f"model.checkpoint {str(path)!r} holds a {type(blob).__name__}, not a state dict")
    return blob


def load_features(path: str | Path, features: nn.Module) -> None:
    """Load a checkpoint's feature-extractor weights into `features`; every tensor must match in name
    and shape, or a UserError says which one does not and what the checkpoint was made with."""
    blob = read_checkpoint(path)
    ours = blob.get("format") == FORMAT
    state = blob["features"] if ours else {k: v for k, v in blob.items() if not k.startswith("head.")}
    made_with = f" (it was made with model {blob['model']!r} {blob['params']})" if ours else ""
    expected = features.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        if wrong:
            what = f"{wrong[0]} has shape {list(state[wrong[0]].shape)}, the model {list(expected[wrong[0]].shape)}"
        else:
            what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise UserError(f"model.checkpoint {str(path)!r} does not fit the configured [model]: {what}{made_with}; "
                        f"set [model] to the checkpoint's configuration")
    features.load_state_dict(state)
