"""Protocols and their strategy rows: means with Student-t 95% intervals over seeds, best values, ties.

A protocol is an experiment run with one setup (scenario, datasets, model, training budget, transforms,
device type and code version: the store's setup key), so runs of different code or settings are never
averaged together. Within it, a row is one strategy label with one set of hyperparameters; a label run
with several sets becomes one row per set, named by the parameters that differ ("er (buffer_size=200)").
Runs that failed or diverged are kept aside, never averaged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import statistics
from typing import Any

import numpy as np
from scipy import stats

from cl.config import NON_RESULT_KEYS
from cl.leaderboard.published import Published, published_for
from cl.params import changes
from cl.record import RunRecord
from cl.report import label_variants

# (key, header, +1 if higher is better else -1)
METRICS = [("acc", "ACC", 1), ("task_il_acc", "task-IL ACC", 1), ("bwt", "BWT", 1), ("forgetting", "Forgetting", -1),
           ("fwt", "FWT", 1)]
BUDGETS = [("memory_mib", "memory MiB", -1), ("compute", "compute (sample passes)", -1),
           ("wall_seconds", "wall s", -1)]
CONFIDENCE = 0.95


@dataclasses.dataclass
class Estimate:
    """The values of one number over seeds: mean and the half-width of its Student-t interval."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def half_width(self) -> float | None:
        """t_{0.975, n-1} * s / sqrt(n); None with a single seed (no interval)."""
        if self.n < 2:
            return None
        return float(stats.t.ppf(0.5 + CONFIDENCE / 2, self.n - 1)) * statistics.stdev(self.values) / math.sqrt(self.n)

    @property
    def interval(self) -> tuple[float, float]:
        h = self.half_width or 0.0
        return self.mean - h, self.mean + h


@dataclasses.dataclass
class StrategyRow:
    label: str  # the table's name for the row (with differing hyperparameters)
    name: str  # registered strategy name
    params: dict[str, Any]
    records: list[RunRecord]
    estimates: dict[str, Estimate]  # METRICS and BUDGETS keys that have values
    compression: float | None = None  # hnet: hypernetwork / target parameters
    published: Published | None = None
    best: set[str] = dataclasses.field(default_factory=set)  # columns where this row is best
    tied: bool = False  # its ACC interval overlaps the best ACC's

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.records)


@dataclasses.dataclass
class Protocol:
    title: str
    slug: str  # file-name stem, distinct for distinct titles
    experiment: str
    setting: str
    description: str
    setup_line: str
    # An experiment with several setups: what this one's differs in from the newest, "key: newest -> this".
    differences: list[str]
    rows: list[StrategyRow]  # best ACC first
    stopped: list[tuple[str, RunRecord]]  # (row label, run) of runs that did not complete
    runs: list[tuple[str, RunRecord]]  # (row label, run) of every run, in store order

    @property
    def columns(self) -> list[tuple[str, str, int]]:
        """The metric and budget columns with at least one value; in class-IL the FWT column is the
        task-IL FWT (class-IL FWT is the same for every strategy), and task-IL ACC appears only where it
        differs from ACC (class-IL)."""
        present = {k for row in self.rows for k in row.estimates}
        names = {"fwt": "task-IL FWT" if self.setting == "class-il" else "FWT"}
        return [(k, names.get(k, h), d) for k, h, d in METRICS + BUDGETS
                if k in present and not (k == "task_il_acc" and self.setting != "class-il")]


def slug(name: str) -> str:
    """A file name for a section: readable, and distinct for distinct titles (a hash of the title,
    since e.g. "a b" and "a-b" would otherwise share one)."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:80] or "experiment"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def run_values(record: RunRecord) -> dict[str, float | None]:
    """The numbers of one run that the table averages, by METRICS and BUDGETS key."""
    h = record.headline()
    return {"acc": h["acc"], "task_il_acc": h["task_il_acc"], "bwt": h["bwt"], "forgetting": h["forgetting"],
            "fwt": h["fwt"], "memory_mib": h["memory_bytes"] / 2**20,
            "compute": float(h["forward_samples"] + h["backward_samples"]), "wall_seconds": h["wall_seconds"]}


def setup_line(record: RunRecord) -> str:
    """Scenario, data, model, training budget, device and code of a protocol, in one line."""
    c = record.config
    scenario = {k: v for k, v in c["scenario"].items() if k != "name" and v not in (None, [], 0, False)}
    model = {k: v for k, v in c["model"].items() if k != "name" and v not in ("", False)}
    t = c["training"]
    datasets = ", ".join(d["name"] for d in c["datasets"])
    return (f"{record.setting}: {c['scenario']['name']} {json.dumps(scenario)} on {datasets}; "
            f"model {c['model']['name']} {json.dumps(model)}; {t['epochs']} epoch(s), batch {t['batch_size']}, "
            f"{t['optimizer']} lr {t['lr']}; ran on {record.provenance['device']}; "
            f"code {record.provenance['code_version']}")


def run_setup(record: RunRecord) -> dict[str, Any]:
    """What a run's setup key covers, from its record: the configuration without the strategy and the
    datasets' non-result keys, the device type and the code version."""
    setup = {k: v for k, v in record.config.items() if k not in ("strategy", "experiment_file", "description")}
    setup["datasets"] = [{k: v for k, v in d.items() if k not in NON_RESULT_KEYS} for d in setup.get("datasets", [])]
    return {**setup, "device": str(record.provenance.get("device", "")).partition(":")[0],
            "code_version": record.provenance.get("code_version")}


def _rows(labelled: list[tuple[str, RunRecord]], experiment: str) -> list[StrategyRow]:
    groups: dict[str, list[RunRecord]] = {}
    for label, record in labelled:
        groups.setdefault(label, []).append(record)
    rows = []
    for label, records in groups.items():
        values = [run_values(r) for r in records]
        estimates = {k: Estimate([v[k] for v in values]) for k, _, _ in METRICS + BUDGETS
                     if all(v[k] is not None and math.isfinite(v[k]) for v in values)}
        ratios = [r.model_stats.get("compression_ratio") for r in records]
        first = records[0]
        rows.append(StrategyRow(label, first.strategy_name, first.params, records, estimates,
                                compression=statistics.fmean(ratios) if all(x is not None for x in ratios) else None,
                                published=published_for(experiment, first.strategy_name, first.params)))
    rows.sort(key=lambda r: -r.estimates["acc"].mean if "acc" in r.estimates else math.inf)
    return rows


def mark_best_and_ties(rows: list[StrategyRow], columns: list[tuple[str, str, int]]) -> None:
    """`best` gets every column where a row's mean is the best (ties in the mean all marked); `tied`
    marks the rows whose ACC interval overlaps the interval of a best ACC (of any of them when several
    share the best mean). A row of one seed has no interval: it is never tied, nor tied with."""
    for key, _, direction in columns:
        means = [(r, direction * r.estimates[key].mean) for r in rows if key in r.estimates]
        if not means:
            continue
        top = max(m for _, m in means)
        for r, m in means:
            if np.isclose(m, top, rtol=0, atol=1e-12):
                r.best.add(key)
    best = [r.estimates["acc"].interval for r in rows if "acc" in r.best and r.estimates["acc"].n >= 2]
    for r in rows:
        if "acc" in r.estimates and "acc" not in r.best and r.estimates["acc"].n >= 2:
            lo, hi = r.estimates["acc"].interval
            r.tied = any(lo <= high and hi >= low for low, high in best)


def protocols(records: list[RunRecord]) -> list[Protocol]:
    """One protocol per experiment and setup key, experiments in name order, the newest setup first."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.experiment, record.setup_key), []).append(record)
    out = []
    for experiment in sorted({e for e, _ in groups}):
        keys = sorted((k for e, k in groups if e == experiment),
                      key=lambda k: max(r.created_at for r in groups[(experiment, k)]), reverse=True)
        newest = run_setup(groups[(experiment, keys[0])][0])
        for i, key in enumerate(keys):
            runs = groups[(experiment, key)]
            title = experiment if len(keys) == 1 else f"{experiment} (setup {key[:8]}{', newest' if i == 0 else ''})"
            labels = [row["strategy"] for row in label_variants([r.headline() for r in runs])]
            labelled = list(zip(labels, runs))
            completed = [(label, r) for label, r in labelled if r.status == "completed"]
            differences = changes(newest, run_setup(runs[0])) if i > 0 else []
            protocol = Protocol(title, slug(title), experiment, runs[0].setting,
                                runs[0].config.get("description") or "", setup_line(runs[0]), differences,
                                _rows(completed, experiment), [(l, r) for l, r in labelled if r.status != "completed"],
                                labelled)
            mark_best_and_ties(protocol.rows, protocol.columns)
            out.append(protocol)
    return out
