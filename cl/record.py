"""The typed record of one run, shared by the runner, the store, the reports and the leaderboard.

A record is written once, when the run has finished, and stored as JSON
(`to_json`) next to a few headline columns; `from_json` reads it back.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

Matrix = list[list[float | None]]


@dataclasses.dataclass
class Metrics:
    """The metrics of one accuracy matrix (definitions in cl/metrics.py); None = not measurable."""

    acc: float | None
    bwt: float | None
    fwt: float | None
    forgetting: float | None
    avg_inc_acc: float | None

    @classmethod
    def unmeasured(cls) -> "Metrics":
        """The metrics of a run that did not complete: none is measured."""
        return cls(None, None, None, None, None)


@dataclasses.dataclass
class Budgets:
    """What the run cost: memory kept beyond the model, model size, time, and sample passes."""

    wall_seconds: float
    train_seconds: float
    eval_seconds: float
    memory_bytes: int
    model_bytes: int
    forward_samples: int
    backward_samples: int
    eval_forward_samples: int
    scenario_bytes: int  # the scenario's data on the device (shared data counted once)
    # Runs trained together as one stacked model (cl/stacking.py), this one included; their wall and
    # train times are the group's (train: wall less every member's evaluation), so one run's share is
    # wall_seconds / stacked_runs; eval_seconds is this run's own.
    stacked_runs: int = 1


@dataclasses.dataclass
class RunRecord:
    run_key: str  # identity: same experiment, strategy, hyperparameters, seed, setup and code -> same key
    setup_key: str  # runs with equal setup keys may be averaged together (same protocol, device, code)
    created_at: str
    experiment: str
    strategy: str  # the label in the experiment file
    strategy_name: str  # the registered name
    params: dict[str, Any]
    seed: int
    status: str  # completed, diverged (cl.divergence's rules), failed (an exception) or pruned (cl sweep)
    setting: str
    matrix: Matrix
    task_il_matrix: Matrix | None  # class-IL scenarios only
    metrics: Metrics
    task_il_metrics: Metrics | None
    budgets: Budgets
    logs: dict[str, list[float | None]]  # strategy-logged scalars, one mean per experience
    scenario: dict[str, Any]  # the scenario's description
    config: dict[str, Any]  # the resolved experiment configuration
    provenance: dict[str, Any]  # code version, git commit, package versions, strategy package, device
    id: int | None = None  # assigned by the store
    model_stats: dict[str, float] = dataclasses.field(default_factory=dict)  # Strategy.model_statistics()
    # Runs that did not complete: {"experience": 1-based (0 = before training), "step", "reason", "traceback"}.
    failure: dict[str, Any] | None = None
    # "test" (cl run) or "validation" (cl sweep: held out of the training experiences, cl/validation.py).
    evaluated_on: str = "test"
    sweep: dict[str, Any] | None = None  # a sweep trial's {"study", "trial"} (cl/sweep.py)

    @property
    def task_il_acc(self) -> float | None:
        """Task-IL accuracy where it is measured: the task-IL matrix of class-IL runs, the run itself in task-IL."""
        if self.task_il_metrics is not None:
            return self.task_il_metrics.acc
        return self.metrics.acc if self.setting == "task-il" else None

    @property
    def headline_fwt(self) -> float | None:
        """FWT where it is informative. In class-IL the argmax over seen classes makes accuracy on a
        future experience 0 for every strategy, so the table reports the task-IL matrix's FWT instead."""
        if self.setting == "class-il":
            return self.task_il_metrics.fwt if self.task_il_metrics is not None else None
        return self.metrics.fwt

    def stopped(self) -> str:
        """Where and why a run that did not complete stopped, in one line ("" for completed runs)."""
        if self.failure is None:
            return ""
        f = self.failure
        where = "before training" if f["experience"] == 0 else f"at experience {f['experience']}, step {f['step']}"
        return f"{self.status} {where}: {f['reason']}"

    @property
    def strategy_package(self) -> str | None:
        """The distribution and version the strategy came from ("name version"), None for an unpackaged module."""
        package = self.provenance.get("strategy_package")
        return None if package is None else f"{package['name']} {package['version']}"

    def headline(self) -> dict[str, Any]:
        """The flat row the tables, the CSV and the store's columns are made of."""
        b = self.budgets
        return {"id": self.id, "experiment": self.experiment, "strategy": self.strategy,
                "strategy_name": self.strategy_name, "strategy_package": self.strategy_package,
                "params": self.params, "seed": self.seed,
                "status": self.status, "setup_key": self.setup_key,
                "code_version": self.provenance.get("code_version"), "created_at": self.created_at,
                "acc": self.metrics.acc, "task_il_acc": self.task_il_acc, "bwt": self.metrics.bwt,
                "fwt": self.headline_fwt, "forgetting": self.metrics.forgetting,
                "avg_inc_acc": self.metrics.avg_inc_acc,
                "wall_seconds": b.wall_seconds / b.stacked_runs,  # the run's share of a stacked group's time
                "memory_bytes": b.memory_bytes, "model_bytes": b.model_bytes,
                "forward_samples": b.forward_samples, "backward_samples": b.backward_samples,
                "compression_ratio": self.model_stats.get("compression_ratio"),
                "evaluated_on": self.evaluated_on, "study": None if self.sweep is None else self.sweep["study"]}

    def to_json(self) -> dict[str, Any]:
        """The record as JSON data; non-finite floats (a diverged run's NaN log means) become None, since
        JSON has no NaN and PostgreSQL's json type refuses the token Python's json module writes."""
        return _finite(dataclasses.asdict(self))

    def check(self) -> None:
        """Raise ValueError naming the first field whose type is not what cl writes: a record file edited
        by hand or written by another program (`cl import` reads such files)."""
        def refuse(name: str, value: Any, kind: str) -> None:
            raise ValueError(f"{name} must be {kind}, got {str(value)[:60]!r}")

        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _FIELD_TYPES.get(f.name)
            if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                refuse(f.name, value, kind.__name__)
        parts = {"budgets": self.budgets, "metrics": self.metrics, "task_il_metrics": self.task_il_metrics}
        for part_name, part in parts.items():
            for f in dataclasses.fields(part) if part is not None else ():
                value = getattr(part, f.name)
                if (value is not None or part_name == "budgets") and (
                        isinstance(value, bool) or not isinstance(value, (int, float))):
                    refuse(f"{part_name}.{f.name}", value, "a number")
        for f in dataclasses.fields(self.budgets):  # counts and seconds; the tables divide by stacked_runs
            value = getattr(self.budgets, f.name)
            if not math.isfinite(value) or value < (1 if f.name == "stacked_runs" else 0):
                refuse(f"budgets.{f.name}", value, "at least 1" if f.name == "stacked_runs" else "a number >= 0")
        if not isinstance(self.budgets.stacked_runs, int):
            refuse("budgets.stacked_runs", self.budgets.stacked_runs, "an integer")
        if self.failure is not None and (not isinstance(self.failure, dict)
                                         or not {"experience", "step", "reason"} <= self.failure.keys()):
            refuse("failure", self.failure, "null or a table with experience, step and reason")
        for key in ("code_version", "device"):
            if not isinstance(self.provenance.get(key), str):
                refuse(f"provenance.{key}", self.provenance.get(key), "a string")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunRecord":
        values = dict(data)
        values["metrics"] = Metrics(**values["metrics"])
        if values["task_il_metrics"] is not None:
            values["task_il_metrics"] = Metrics(**values["task_il_metrics"])
        values["budgets"] = Budgets(**values["budgets"])
        return cls(**values)


# What RunRecord.check expects of each field (fields not named here hold None or a nested structure).
_FIELD_TYPES: dict[str, type] = {
    "run_key": str, "setup_key": str, "created_at": str, "experiment": str, "strategy": str, "strategy_name": str,
    "params": dict, "seed": int, "status": str, "setting": str, "matrix": list, "metrics": Metrics,
    "budgets": Budgets, "logs": dict, "scenario": dict, "config": dict, "provenance": dict, "model_stats": dict,
    "evaluated_on": str}


def _finite(value: Any) -> Any:
    """value with every NaN or infinite float inside it (dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_finite(v) for v in value)
    return value
