"""Run checkpoints: what `cl run --resume` continues an interrupted run from.

After every experience the runner writes one file per run, in a folder beside the result store
(`checkpoints/<experiment>/<label>-seed<seed>-<hash of its configuration>/checkpoint.pt`): the run's
identity, the number of experiences done, the strategy's full state (`Strategy.state_dict`: model,
optimizer, buffers, old models, its random generator), the evaluator's partial matrices, the loss
monitor, the global random generators and the seconds spent. It is written atomically (temporary
file, fsync, rename), so a kill leaves the previous checkpoint or the new one, never half of one,
and it loads with `weights_only=True`. Each configuration (experiment file and `--set` values) has
its folder, so parallel runs of one file never touch each other's checkpoints; a checkpoint made by
another code version is refused, naming what changed.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl.checkpoints import save_durably
from cl.errors import UserError
from cl.params import changes, flatten

FORMAT = "cl-run-checkpoint/1"


def run_folder(root: Path, identity: dict[str, Any]) -> Path:
    """The checkpoint folder of one run: readable (experiment, strategy label, seed) and a hash of the run's
    configuration, its identity without the code version. Runs of one experiment file with other `--set`
    values (a user's parallel runs) so get folders of their own and never overwrite or remove each other's
    checkpoints, while a run resumed by changed code finds its checkpoint and is refused, naming the change."""
    configuration = {**identity, "setup": {k: v for k, v in identity["setup"].items() if k != "code_version"}}
    digest = hashlib.sha256(repr(sorted(flatten(configuration).items())).encode()).hexdigest()[:8]
    experiment, label = (re.sub(r"[^A-Za-z0-9_.-]+", "-", part).strip("-.")[:60] or "x"
                         for part in (identity["experiment"], identity["label"]))
    return root / experiment / f"{label}-seed{identity['seed']}-{digest}"


def other_configurations(folder: Path, identity: dict[str, Any]) -> list[str]:
    """What differs from `identity` in the checkpoints of the same experiment, label and seed made with other
    configurations (folders beside `folder`), one "key: old -> new; ..." line each; unreadable ones are
    skipped. A resumed run whose own folder is missing says so, since a changed `--set` is often a typo."""
    prefix = folder.name[: folder.name.rindex("-") + 1]
    found = []
    for other in sorted(folder.parent.glob(f"{glob.escape(prefix)}*/checkpoint.pt")):
        if other.parent == folder:
            continue
        with contextlib.suppress(Exception):
            saved = torch.load(other, map_location="cpu", weights_only=True)["identity"]
            if saved["experiment"] == identity["experiment"] and saved["label"] == identity["label"] \
                    and saved["seed"] == identity["seed"]:
                diff = changes(saved, identity)
                found.append("; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else ""))
    return found


def remove_run_folder(folder: Path) -> None:
    """Delete a finished run's checkpoint folder, and its experiment's folder once that is empty."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: other runs of the experiment are unfinished
        folder.parent.rmdir()


def _global_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            # Only once CUDA is in use: asking earlier would start it (a context on GPU 0) in CPU runs.
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            "python": random.getstate()}


def _set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():  # GPUs beyond those visible now keep their state
        for index, generator_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(generator_state, index)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RunCheckpoint:
    def __init__(self, folder: Path, identity: dict[str, Any]):
        self.folder = folder
        self.path = folder / "checkpoint.pt"
        self.identity = identity  # the configuration, code version and seed of the run

    def save(self, experiences_done: int, strategy: Any, evaluator: Any, loss_monitor: Any,
             seconds: float, eval_seconds: float) -> None:
        """Write the checkpoint atomically and durably (`save_durably`)."""
        payload = {"format": FORMAT, "identity": self.identity, "experiences_done": experiences_done,
                   "strategy": strategy.state_dict(), "evaluator": evaluator.state_dict(),
                   "loss_monitor": loss_monitor.state_dict(), "rng": _global_rng_state(),
                   "seconds": seconds, "eval_seconds": eval_seconds}
        save_durably(payload, self.path)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is no checkpoint; a UserError for an unreadable one or
        one made with another configuration (naming what changed)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated by hand, not a torch file
            raise UserError(f"checkpoint {self.path} is unreadable ({type(exc).__name__}); delete that folder "
                            f"to start the run again") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise UserError(f"{self.path} is not a run checkpoint of this cl; delete that folder to start again")
        if state["identity"] != self.identity:
            diff = changes(state["identity"], self.identity)
            raise UserError(f"checkpoint {self.path} was made with another configuration ({'; '.join(diff[:3])}"
                            f"{'; ...' if len(diff) > 3 else ''}); run without --resume to start over, or "
                            f"restore the configuration")
        return state

    def restore(self, state: dict[str, Any], strategy: Any, evaluator: Any, loss_monitor: Any) -> None:
        """Put the saved state back; a UserError when it does not fit the strategy (code that changed
        outside what the code version sees, e.g. an untracked plugin file)."""
        try:
            strategy.load_state_dict(state["strategy"])
            evaluator.load_state_dict(state["evaluator"])
            loss_monitor.load_state_dict(state["loss_monitor"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            detail = " ".join(str(exc).split())
            raise UserError(f"checkpoint {self.path} does not fit this code ({type(exc).__name__}: "
                            f"{detail[:160]}{'...' if len(detail) > 160 else ''}); run without --resume to "
                            f"start over") from None
        _set_global_rng_state(state["rng"])

