"""Hyperparameter sweeps with Optuna (`cl sweep`).

A search space lives in the experiment file, next to what it tunes: a value of a strategy table or of
`[training]` written as a table is a dimension.

    [training]
    lr = {low = 1e-3, high = 0.3, log = true}      # float (log scale); ints when low and high are ints
    [[strategies]]
    name = "der_pp"
    alpha = {low = 0.05, high = 1.0}
    buffer_size = {choices = [200, 500]}            # categorical

Each trial is one run of the strategy on the validation split (cl/validation.py): trained on each
training experience minus its held-out share, evaluated on that share; the objective is a metric
of that matrix and the test stream is never read. Optuna's pruner sees the running validation
accuracy after every experience and stops hopeless trials (stored as `pruned`).

Trials live in an Optuna study in an RDB storage (SQLite beside the result store by default,
PostgreSQL to spread one study over many machines): every worker, on any host, runs the same loop
against it (`work`), so workers can be added, killed and restarted at any time:

    until the study has N finished trials (complete, pruned, or stopped by their run):
        fail trials whose worker stopped sending heartbeats (Optuna retries them once)
        ask for as many trials as are missing (at most --stack), drop any beyond N (a race)
        train them, stacked when only float dimensions differ, and tell Optuna the outcome

Every finished trial is a run in the result store, tagged with its study and trial number.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import socket
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from cl.config import MAX_NAME, ExperimentConfig, build_experiment, read_toml
from cl.errors import Pruned, UserError
from cl.registry import STRATEGIES
from cl.params import changes
from cl.data import LabelledData
from cl.runner import Run, build_scenario, input_pipeline, model_spec, train_alone, train_together
from cl.stacking import PER_MEMBER_TRAINING, stacking_problem
from cl.footprint import meta_model
from cl.store import ResultStore

#: metric -> (direction, how a finished run's record gives it)
METRICS: dict[str, tuple[str, Callable[[Any], float | None]]] = {
    "acc": ("maximize", lambda r: r.metrics.acc),
    "avg_inc_acc": ("maximize", lambda r: r.metrics.avg_inc_acc),
    "task_il_acc": ("maximize", lambda r: r.task_il_acc),
    "bwt": ("maximize", lambda r: r.metrics.bwt),
    "forgetting": ("minimize", lambda r: r.metrics.forgetting),
}
SPACE_KEYS = {"low", "high", "log", "step", "choices"}


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Heartbeats with ask and tell are what a worker on another host needs; Optuna warns at every ask
    that they are meant for study.optimize, and that they are experimental."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


# ---------------------------------------------------------------- the search space


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched value: `name` is what Optuna and the reports call it (the strategy parameter's
    key, or training.KEY)."""

    name: str
    section: str  # "strategy" or "training"
    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    @property
    def kind(self) -> str:
        if self.choices:
            return "categorical"
        ints = all(isinstance(v, int) for v in (self.low, self.high)) and (self.step is None or isinstance(self.step, int))
        return "int" if ints else "float"

    @property
    def changes_no_shape(self) -> bool:
        """Trials differing only in such values can train as one stacked model (cl/stacking.py)."""
        return self.kind == "float" and (self.section == "strategy" or self.key in PER_MEMBER_TRAINING)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """The values a trial may take at the ends (as the trial would get them: floats for a float range)."""
        if self.choices:
            return list(self.choices)
        return [self.low, self.high] if self.kind == "int" else [float(self.low), float(self.high)]

    def describe(self) -> str:
        if self.choices:
            return f"{self.name} in {list(self.choices)}"
        step = f" step {self.step:g}" if self.step is not None else ""
        return f"{self.name} in [{self.low:g}, {self.high:g}]{step}{' (log)' if self.log else ''}"

    def as_dict(self) -> dict[str, Any]:
        """Everything that decides which values a trial may take, exactly (a study stores it)."""
        if self.choices:
            return {"name": self.name, "choices": list(self.choices)}
        return {"name": self.name, "kind": self.kind, "low": self.low, "high": self.high, "log": self.log,
                "step": self.step}


def _dimension(name: str, section: str, key: str, spec: dict[str, Any], where: str) -> Dimension:
    unknown = sorted(set(spec) - SPACE_KEYS)
    if unknown:
        raise UserError(f"{where}: {key} = {{...}} has unknown key {unknown[0]!r}; a search space is "
                        f"{{low = .., high = .., log = true|false, step = ..}} or {{choices = [..]}}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: {key} = {{choices = [...]}} needs a non-empty list and nothing else")
        if any(isinstance(c, (list, dict)) for c in choices):
            raise UserError(f"{where}: {key}: choices must be numbers, strings or booleans")
        return Dimension(name, section, key, choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not low < high:
        raise UserError(f"{where}: {key} = {{low = .., high = ..}} needs two numbers with low < high, "
                        f"got low = {low!r}, high = {high!r}")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise UserError(f"{where}: {key}: log must be true or false")
    if log and low <= 0:
        raise UserError(f"{where}: {key}: a log scale needs low > 0, got {low}")
    if step is not None and (not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0 or log):
        raise UserError(f"{where}: {key}: step must be a positive number, and not combined with log = true")
    return Dimension(name, section, key, low, high, log, step)


def first_values(dimensions: list[Dimension]) -> dict[str, Any]:
    """Every dimension at its first end (low, or the first choice): a valid experiment to check against."""
    return {d.name: d.extremes()[0] for d in dimensions}


def is_space(value: Any) -> bool:
    """A table naming low, high or choices (a table-valued parameter, like training.lr_scale, names none)."""
    return isinstance(value, dict) and bool(set(value) & SPACE_KEYS)


def search_space(raw: dict[str, Any], label: str, where: str) -> list[Dimension]:
    """The dimensions of the strategy labelled `label` and of `[training]` in a raw experiment."""
    table = _strategy_table(raw, label)
    dims = [_dimension(key, "strategy", key, value, f"{where}: [[strategies]] {label!r}")
            for key, value in table.items() if is_space(value)]
    dims += [_dimension(f"training.{key}", "training", key, value, f"{where}: [training]")
             for key, value in raw.get("training", {}).items() if is_space(value)]
    return dims


def swept_labels(raw: dict[str, Any]) -> list[str]:
    """Labels of the strategies with a search space of their own (or all, when only [training] has one)."""
    tables = [t for t in raw.get("strategies", []) if isinstance(t, dict)]
    labels = [str(t.get("label", t.get("name"))) for t in tables]
    own = [l for l, t in zip(labels, tables) if any(is_space(v) for v in t.values())]
    training = any(is_space(v) for v in raw.get("training", {}).values()) if isinstance(raw.get("training"), dict) \
        else False
    return own or (labels if training else [])


def _strategy_table(raw: dict[str, Any], label: str) -> dict[str, Any]:
    for table in raw.get("strategies", []):
        if isinstance(table, dict) and str(table.get("label", table.get("name"))) == label:
            return table
    raise UserError(f"no strategy {label!r} in this experiment")


def with_values(raw: dict[str, Any], label: str, values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw experiment with every dimension of strategy `label` (and of [training]) set
    to `values` (dimension name -> value), and the other strategies left out."""
    raw = copy.deepcopy(raw)
    table = _strategy_table(raw, label)
    raw["strategies"] = [table]
    for key in [k for k, v in table.items() if is_space(v)]:
        table[key] = values[key]
    training = raw.get("training", {})
    for key in [k for k, v in training.items() if is_space(v)]:
        training[key] = values[f"training.{key}"]
    return raw


# ---------------------------------------------------------------- the sweep


@dataclasses.dataclass
class Sweep:
    """What every worker of one study shares: the experiment, its search space and the study."""

    raw: dict[str, Any]
    source: str
    label: str
    dimensions: list[Dimension]
    metric: str
    seed: int
    storage: str
    study_name: str

    @property
    def direction(self) -> str:
        return METRICS[self.metric][0]

    def config(self, values: dict[str, Any]) -> ExperimentConfig:
        """The experiment of one trial: the values set, evaluated on the validation split, one seed."""
        config = build_experiment(with_values(self.raw, self.label, values), self.source, seeds=[self.seed])
        return dataclasses.replace(config, evaluated_on="validation")

    def first_config(self) -> ExperimentConfig:
        """The trial at every dimension's first value: what a worker checks and builds its scenario from."""
        return self.config(first_values(self.dimensions))

    def stack_key(self, values: dict[str, Any]) -> tuple:
        """Trials with equal keys differ only in values that change no shape: they can stack."""
        return tuple(values[d.name] for d in self.dimensions if not d.changes_no_shape)

    def identity(self) -> dict[str, Any]:
        """Stored with the study; a later worker must sweep the same thing: the same space, metric and
        seed, on the same setup (dataset, scenario, model, the training and validation settings, the
        strategy's fixed parameters), so that no study mixes trials of two setups. Data folders and the
        code version are left out: workers on other machines, and a fixed bug, continue a study."""
        first = self.first_config()  # the swept values at their first ends: fixed for a space
        identity = {"experiment": self.raw["name"], "label": self.label, "metric": self.metric, "seed": self.seed,
                    "space": [d.as_dict() for d in self.dimensions], "setup": first.setup_identity(),
                    "strategy": first.strategies[0].as_dict()}
        return json.loads(json.dumps(identity))  # as the study stores it (tuples become lists)


def prepare_sweep(path: str | Path, overrides: list[str], label: str | None, metric: str, seed: int | None,
                  storage: str | None, study: str | None, store_url: str) -> Sweep:
    """Read and validate the experiment file's search space: every dimension is tried at its ends
    (each choice), so a value outside a parameter's range is refused before anything trains."""
    from cl.config import apply_override

    raw = read_toml(Path(path), "experiment file", "see experiments/ for examples")
    for assignment in overrides:
        apply_override(raw, assignment)
    where = str(path)
    labels = swept_labels(raw)
    if not labels:
        raise UserError(f"{where}: nothing to sweep; write a strategy or [training] value as a search space, "
                        f"e.g. lr = {{low = 1e-3, high = 0.3, log = true}} or buffer_size = {{choices = [200, 500]}}")
    if label is None:
        if len(labels) > 1:
            raise UserError(f"{where}: strategies {', '.join(labels)} have search spaces; choose one with "
                            f"--strategy LABEL (one study per strategy)")
        label = labels[0]
    elif label not in labels:
        raise UserError(f"--strategy {label!r}: no search space for it in {where} (swept: {', '.join(labels)})")
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    dimensions = search_space(raw, label, where)
    names = [d.name for d in dimensions]
    for d in dimensions:  # each end of each dimension, the others at their first end
        for value in d.extremes():
            values = first_values(dimensions) | {d.name: value}
            build_experiment(with_values(raw, label, values), where)
    config = build_experiment(with_values(raw, label, first_values(dimensions)), where)
    if len(set(names)) != len(names):
        raise UserError(f"{where}: dimension names repeat ({names})")
    study = study or f"{config.name}.{label}"
    if len(study) > MAX_NAME:
        raise UserError(f"study name {study[:40]!r}... is {len(study)} characters long; the result store takes at "
                        f"most {MAX_NAME}: pass a shorter --study")
    return Sweep(raw, where, label, dimensions, metric, config.seeds[0] if seed is None else seed,
                 storage or default_storage(store_url), study)


def unmeasured(metric: str, strategy: type, scenario: Any) -> str | None:
    """Why runs of `strategy` on `scenario` have no value of `metric` (None when they have one)."""
    if metric in ("bwt", "forgetting", "avg_inc_acc") and strategy.joint_training:
        return "the strategy trains on every experience at once and is evaluated only after the last"
    if metric in ("bwt", "forgetting") and scenario.n_experiences < 2:
        return f"it needs at least 2 experiences, and the scenario has {scenario.n_experiences}"
    if metric == "task_il_acc" and scenario.setting == "domain-il":
        return "domain-IL runs have no task-IL accuracy"
    return None


def check_metric(sweep: Sweep, datasets: list[LabelledData]) -> None:
    """Refuse, in one line and before anything trains, an objective the sweep's runs cannot have:
    every trial would train to its end and then fail for want of a value."""
    base = sweep.first_config()
    scenario = build_scenario(base, datasets, sweep.seed)
    strategy = STRATEGIES.get(base.strategies[0].name).obj
    problem = unmeasured(sweep.metric, strategy, scenario)
    if problem is not None:
        measured = [m for m in METRICS if unmeasured(m, strategy, scenario) is None]
        raise UserError(f"--metric {sweep.metric}: {sweep.label}'s runs have none here ({problem}); "
                        f"choose one of {', '.join(measured)}")


def default_storage(store_url: str) -> str:
    """An SQLite file beside an SQLite result store (results/sweeps.db beside results/cl.db)."""
    import sqlalchemy as sa

    url = sa.engine.make_url(store_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return f"sqlite:///{Path(url.database).parent / 'sweeps.db'}"
    return "sqlite:///results/sweeps.db"


class TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE after 8 random trials (`constant_liar` keeps concurrent workers from proposing the same point),
    whose random draws for parameter p of trial n come from (seed, n, p) rather than from one stream per
    process.

    Trial numbers are handed out by the study's storage, one per trial across every process, so workers
    on one machine or many, started at the same moment with the same seed, never draw the same random
    trials (with a stream per process, every host's first worker drew the same ones); a continued study
    (a higher --trials, a restart after a kill) draws new trials; trials asked together (a stacked group)
    draw what they would draw one by one; and one process's sweep is reproducible from its seed."""

    def __init__(self, seed: int):
        super().__init__(seed=seed, constant_liar=True, n_startup_trials=8)
        self.base_seed = seed

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        seed = np.random.SeedSequence([self.base_seed, trial.number, zlib.crc32(param_name.encode())])
        state = int(seed.generate_state(1)[0])
        self._rng.rng.seed(state)  # TPE's own draws, and its random startup sampler's
        self._random_sampler._rng.rng.seed(state)
        return super().sample_independent(study, trial, param_name, param_distribution)


class RunningAccuracyPruner(optuna.pruners.BasePruner):
    """Stop a trial whose value at an experience is worse than the median of the finished trials' values at
    that experience (once `n_startup_trials` have finished, from experience `n_warmup_steps` on).

    Optuna's MedianPruner compares the best value a trial has reported so far, which suits curves that
    improve with training; a continual run's accuracy over the experiences seen so far falls as they
    accumulate, so its best is its first experience's, and that pruner stopped nothing but trials that
    learned their first experience badly."""

    def __init__(self, n_startup_trials: int = 4, n_warmup_steps: int = 2):
        self.n_startup_trials, self.n_warmup_steps = n_startup_trials, n_warmup_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        others = [t.intermediate_values[step] for t in finished if step in t.intermediate_values]
        if len(finished) < self.n_startup_trials or not others:
            return False
        value, median = trial.intermediate_values[step], float(np.median(others))
        if math.isnan(value):
            return True
        return value < median if study.direction == optuna.study.StudyDirection.MAXIMIZE else value > median


def open_study(sweep: Sweep, pruner: str = "median", heartbeat: int = 10, create: bool = True) -> optuna.Study:
    """The study in its storage (created when missing and `create`), with heartbeats, one retry of a trial
    whose worker died, a TPE sampler seeded by the sweep's seed and each trial's number, and the pruner."""
    url = sweep.storage
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not create and not path.is_file():  # --best, --report: never create a storage at a mistyped path
            raise UserError(f"no sweep storage at {path}; run `cl sweep` first, or check --storage")
        path.parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with quiet_optuna():
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except ImportError as exc:
        raise UserError(f"--storage {url!r}: its database driver {exc.name!r} is not installed; "
                        f"pip install 'psycopg[binary]' for postgresql+psycopg:// URLs") from None
    except Exception as exc:  # SQLAlchemy's errors for bad URLs and unreachable servers
        raise UserError(f"cannot open sweep storage {url!r}: {str(exc).splitlines()[0]}") from None
    # Accuracy after the first experience says little about forgetting: no pruning before the second.
    pruners = {"median": lambda: RunningAccuracyPruner(n_startup_trials=4, n_warmup_steps=2),
               "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
               "none": lambda: optuna.pruners.NopPruner()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if create:
        study = optuna.create_study(storage=storage, study_name=sweep.study_name, direction=sweep.direction,
                                    sampler=TrialSeededTPE(sweep.seed), pruner=pruners[pruner](), load_if_exists=True)
    else:
        try:
            study = optuna.load_study(study_name=sweep.study_name, storage=storage, sampler=TrialSeededTPE(sweep.seed),
                                      pruner=pruners[pruner]())
        except KeyError:
            raise UserError(f"no study {sweep.study_name!r} in {url}; run `cl sweep` first, or pass --study") from None
    known = study.user_attrs.get("sweep")
    if known is None:
        study.set_user_attr("sweep", sweep.identity())
    elif known != (identity := sweep.identity()):
        diff = changes(known, identity)
        raise UserError(f"study {sweep.study_name!r} in {url} sweeps another setup ({'; '.join(diff[:3])}"
                        f"{'; ...' if len(diff) > 3 else ''}); use the same file and options, or another --study")
    return study


def counts_towards(trial: optuna.trial.FrozenTrial) -> bool:
    """Finished by its run (complete, pruned, or stopped: diverged or failed) or running now. A trial
    failed for its worker's death (retried) or dropped as surplus does not count."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and "run_status" in trial.user_attrs


def tally(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials, as the sweep counts them."""
    trials = study.get_trials(deepcopy=False)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return sum(counts_towards(t) for t in trials) - running, running


class Heartbeat:
    """Records a heartbeat for the trials this worker is running, every `interval` seconds, so that
    other workers can fail (and retry) them when this process dies (Optuna's own heartbeat only runs
    inside study.optimize, not with ask and tell)."""

    def __init__(self, study: optuna.Study, interval: float):
        self.storage, self.interval = study._storage, interval
        self.trial_ids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            for trial_id in list(self.trial_ids):
                with contextlib.suppress(Exception):  # a trial told meanwhile; a storage hiccup
                    self.storage.record_heartbeat(trial_id)

    def watch(self, trials: list[optuna.Trial]) -> None:
        self.trial_ids = [t._trial_id for t in trials]
        for trial_id in self.trial_ids:
            self.storage.record_heartbeat(trial_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def work(sweep: Sweep, study: optuna.Study, datasets: list[LabelledData], n_trials: int, store: ResultStore,
         device: torch.device, stack: int = 4, timeout: float | None = None, progress: bool = True,
         log: Callable[[str], None] = print) -> int:
    """One worker's loop (module docstring) on `datasets` (from `check_experiment(sweep.first_config())`);
    returns how many trials this worker finished."""
    base = sweep.first_config()
    scenario = build_scenario(base, datasets, sweep.seed).to(device)
    pipeline = input_pipeline(base, scenario, device)
    strategy_class = STRATEGIES.get(base.strategies[0].name).obj
    backbone = meta_model(model_spec(base, scenario.stream_info(pipeline.output_shape)))
    stackable = stacking_problem(strategy_class, backbone) is None
    deadline = None if timeout is None else time.monotonic() + timeout
    heartbeat = Heartbeat(study, study._storage.get_heartbeat_interval() or 10)
    finished = 0
    with quiet_optuna():
        try:
            while deadline is None or time.monotonic() < deadline:
                optuna.storages.fail_stale_trials(study)
                done, running = tally(study)
                if done >= n_trials:
                    break
                room = n_trials - done - running
                if room <= 0:  # the last trials run elsewhere; wait: they may still fail and need redoing
                    time.sleep(min(2.0, heartbeat.interval))
                    continue
                trials = [study.ask() for _ in range(min(room, stack if stackable else 1))]
                heartbeat.watch(trials)  # at once: a trial that never beat is never found stale
                trials = [t for t in trials if not _surplus(study, t, n_trials)]
                values = {t.number: {d.name: d.suggest(t) for d in sweep.dimensions} for t in trials}
                for t in trials:  # which process trains it (the PostgreSQL test kills one mid-trial)
                    t.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
                groups: dict[tuple, list[optuna.Trial]] = {}
                for t in trials:
                    groups.setdefault(sweep.stack_key(values[t.number]), []).append(t)
                for group in groups.values():
                    finished += _train_group(sweep, study, group, values, scenario, pipeline, store, device,
                                             stackable, progress, log)
                heartbeat.watch([])
        finally:
            heartbeat.close()
    return finished




def _surplus(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """Two workers that asked at once may overshoot N: the trials beyond the N-th are failed at once
    (marked surplus, never trained), so the study ends with exactly N finished trials."""
    counted = sorted(t.number for t in study.get_trials(deepcopy=False) if counts_towards(t))
    if counted.index(trial.number) < n_trials:
        return False
    trial.set_user_attr("surplus", True)
    study.tell(trial, state=TrialState.FAIL)
    return True


def _train_group(sweep: Sweep, study: optuna.Study, trials: list[optuna.Trial], values: dict[int, dict[str, Any]],
                 scenario, pipeline, store: ResultStore, device: torch.device, stackable: bool, progress: bool,
                 log: Callable[[str], None]) -> int:
    """Train some trials (stacked when they can be) and tell Optuna how each ended."""
    runs = []
    for trial in trials:
        config = sweep.config(values[trial.number])
        tag = {"study": sweep.study_name, "trial": trial.number}
        runs.append(Run(config, config.strategies[0], scenario, sweep.seed, device, pipeline, None, False,
                        sweep=tag, observe=_pruning(trial, sweep.direction)))
    if len(runs) > 1 and stackable:
        train_together(runs, progress, log=log)
    else:  # (a group of one: trials that cannot stack are asked for one at a time)
        for run in runs:
            train_alone(run, progress)
    for trial, run in zip(trials, runs):
        record = run.record()
        stored = store.write_or_keep(record)
        record.id = stored if isinstance(stored, int) else None
        trial.set_user_attr("run_status", record.status)
        trial.set_user_attr("run_id", record.id)
        value = METRICS[sweep.metric][1](record) if record.status == "completed" else None
        if record.status == "completed" and value is not None and math.isfinite(value):
            study.tell(trial, value)
        elif record.status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("reason", record.stopped())
            study.tell(trial, state=TrialState.FAIL)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values[trial.number].items())
        outcome = f"validation {sweep.metric} {value:.4f}" if value is not None else record.stopped()
        where = f"run {record.id}" if record.id is not None else f"run kept in {stored}"
        log(f"trial {trial.number} ({shown}): {outcome}  [{where}, {record.headline()['wall_seconds']:.1f}s]")
    return len(trials)


def _pruning(trial: optuna.Trial, direction: str) -> Callable[[Run, int], None]:
    """After each evaluated experience: report the running validation accuracy (negated when the
    study minimises) and stop the run when the pruner says so."""
    def observe(run: Run, row: int) -> None:
        accuracy = float(np.mean(run.evaluator.matrix[row, :row]))
        trial.report(accuracy if direction == "maximize" else -accuracy, row)
        if row < run.scenario.n_experiences and trial.should_prune():
            raise Pruned(f"pruned by the sweep after experience {row}: validation accuracy {accuracy:.3f} "
                         f"was below the other trials' at that point")
    return observe


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- results


def best_experiment(sweep: Sweep, study: optuna.Study) -> dict[str, Any]:
    """The raw experiment with the best trial's values in place of the swept strategy's search space
    (the other strategies left out), ready for `cl run` on the test stream."""
    try:
        best = study.best_trial
    except ValueError:
        raise UserError(f"study {sweep.study_name!r} has no completed trial yet; run `cl sweep` first") from None
    raw = with_values(sweep.raw, sweep.label, best.params)
    raw.pop("validation", None)
    note = (f"best of study {sweep.study_name!r} (trial {best.number}, validation {sweep.metric} "
            f"{best.value:.4f}, {len(study.trials)} trials)")
    description = f"{raw['description']}; {note}" if raw.get("description") else note
    return {"name": raw.pop("name"), "description": description, **{k: v for k, v in raw.items() if k != "description"}}


def summary(sweep: Sweep, study: optuna.Study) -> str:
    """One line: how the study's trials ended, and the best one."""
    trials = study.get_trials(deepcopy=False)
    count = lambda state: sum(t.state == state for t in trials)  # noqa: E731
    stopped = sum(t.state == TrialState.FAIL and "run_status" in t.user_attrs for t in trials)
    surplus = sum(t.state == TrialState.FAIL and "surplus" in t.user_attrs for t in trials)
    line = (f"study {sweep.study_name}: {count(TrialState.COMPLETE)} complete, {count(TrialState.PRUNED)} pruned, "
            f"{stopped} stopped (diverged or failed runs)")
    others = count(TrialState.FAIL) - stopped - surplus
    if surplus:
        line += f", {surplus} surplus (asked by two workers at once, never trained)"
    if others:
        line += f", {others} lost with their worker (retried once)"
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
        line += (f"; best trial {best.number}: validation {sweep.metric} {best.value:.4f} with "
                 + ", ".join(f"{k}={_short(v)}" for k, v in best.params.items()))
    return line


def write_report(study: optuna.Study, out: Path) -> list[Path]:
    """The optimisation history and the parameter importances as PNG files in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not completed:
        raise UserError(f"study {study.study_name!r} has no completed trial yet; nothing to plot")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    charts = [("optimization_history.png", plots.plot_optimization_history)]
    if len(completed) >= 2 and len(completed[0].params) >= 1:
        charts.append(("param_importances.png", plots.plot_param_importances))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plot in charts:
            ax = plot(study)
            figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figure.savefig(out / name, dpi=100)
            plt.close(figure)
            written.append(out / name)
    return written
