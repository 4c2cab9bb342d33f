"""The runner: experiment config -> scenario -> strategy.fit / evaluator -> run record -> store."""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import math
import re
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from cl import threads
from cl.config import Component, ExperimentConfig
from cl.data import LabelledData, Scenario, StreamInfo
from cl.divergence import Diverged, LossMonitor, learned_nothing
from cl.errors import Pruned, RunError, UserError, first_line
from cl.evaluation import Evaluator
from cl.footprint import available_bytes, gib, lower_bound, meta_model, parameter_counts
from cl.metrics import compute_metrics
from cl.params import params_to_dict
from cl.provenance import code_version, package_of, provenance
from cl.record import Budgets, Metrics, RunRecord
from cl.resume import RunCheckpoint, other_configurations, remove_run_folder, run_folder
from cl.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES
from cl.stacking import StackedRuns, graph_problem, stacking_problem
from cl.store import ResultStore
from cl.strategy import ModelSpec, Strategy, StrategyContext
from cl.training import ComputeCount, check_prefixes
from cl.transforms import InputPipeline, channel_statistics
from cl.validation import validation_scenario


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N; anything else is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 ..)")
    return torch.device("cuda", index)


def load_datasets(components: list[Component], loaded: dict[str, LabelledData] | None = None) -> list[LabelledData]:
    """The components' datasets; with `loaded`, a dataset that an earlier call read with the same
    parameters is taken from it rather than read again (`cl run` with several files)."""
    loaded = {} if loaded is None else loaded
    datasets = []
    for c in components:
        key = f"{c.name} {c.params!r}"
        if key not in loaded:
            loaded[key] = DATASETS.get(c.name).obj(c.params)
        datasets.append(loaded[key])
    return datasets


def build_scenario(config: ExperimentConfig, datasets: list[LabelledData], seed: int) -> Scenario:
    """The run's scenario; with `config.evaluated_on == "validation"`, its training experiences minus
    the held-out share, which replaces the test stream (cl/validation.py)."""
    generator = SCENARIOS.get(config.scenario.name).obj
    scenario = generator(datasets, config.scenario.params, seed)
    if config.evaluated_on == "validation":
        scenario = validation_scenario(scenario, config.validation.fraction, seed)
    evaluated_on = "validation" if config.evaluated_on == "validation" else "test"
    for part, experiences in (("training", scenario.train), (evaluated_on, scenario.test)):
        for k, exp in enumerate(experiences):
            if len(exp.y) == 0:
                raise UserError(f"{config.source}: experience {k + 1} of {len(experiences)} (seed {seed}) has no "
                                f"{part} samples; use fewer experiences (scenario.n_experiences) or more data")
    return scenario


def input_pipeline(config: ExperimentConfig, scenario: Scenario, device: torch.device) -> InputPipeline:
    """The experiment's `[transforms]` for this scenario's data; normalisation statistics, when not
    given, come from the training inputs as stored (each distinct tensor once, before the
    experiences' permutations or rotations)."""
    p = config.transforms
    mean, std = p.mean, p.std
    if p.normalize and not mean:
        mean, std = channel_statistics(list({id(e.x): e.x for e in scenario.train}.values()))
        constant = [c for c, s in enumerate(std) if s == 0]
        if constant:
            raise UserError(f"[transforms]: channel {constant[0]} of the training data is constant (std 0), so "
                            f"normalize would divide by zero; give transforms.mean and std, or normalize = false")
    try:
        return InputPipeline(p, scenario.input_shape, device, mean, std)
    except ValueError as exc:
        raise UserError(f"[transforms]: {exc}") from None


def model_spec(config: ExperimentConfig, stream: StreamInfo) -> ModelSpec:
    """The experiment's `[model]` for this stream: its name, parameters and a builder."""
    build = functools.partial(MODELS.get(config.model.name).obj, config.model.params, stream.input_shape,
                              stream.n_classes, stream.n_tasks)
    return ModelSpec(config.model.name, config.model.params, build)


def check_compatibility(config: ExperimentConfig, scenario: Scenario, pipeline: InputPipeline,
                        components: list[Component] | None = None) -> None:
    """Refuse, before anything trains, a model or strategy (default: every one of the experiment)
    that cannot run on this scenario."""
    if getattr(config.model.params, "multi_head", False) and not scenario.task_labels_at_test:
        raise UserError(f"model.multi_head = true needs task ids at test time, but scenario "
                        f"{config.scenario.name!r} is {scenario.setting}; set scenario.task_labels = true")
    stream = scenario.stream_info(pipeline.output_shape)
    model = model_spec(config, stream)
    available = available_bytes(pipeline.device)
    weights, trained = parameter_counts(model, config.training) if available is not None else (0, 0)
    sample_bytes = math.prod(scenario.input_shape) * scenario.train[0].x.element_size()  # as buffers store them
    prefix_problem = None  # a freeze or lr_scale prefix that matches none of the backbone's parameters
    if config.training.freeze or config.training.lr_scale:
        try:
            check_prefixes([name for name, _ in meta_model(model).named_parameters()], config.training)
        except ValueError as exc:
            prefix_problem = f"{config.source}: {exc}"
    for component in config.strategies if components is None else components:
        strategy = STRATEGIES.get(component.name).obj
        # A strategy that trains more than the backbone checks the prefixes when it is built.
        if prefix_problem is not None and strategy.trainable_modules is Strategy.trainable_modules:
            raise UserError(prefix_problem)
        problem = None
        try:
            # a strategy that trains modules of its own (prompts, a hypernetwork) may train no backbone weight
            gradients = trained if strategy.trainable_modules is Strategy.trainable_modules else 0
            need, what = lower_bound(weights, gradients, strategy.stored_samples(component.params, stream),
                                     sample_bytes)
            if available is None or need <= available:  # first: incompatibility() may build the model
                problem = (strategy.incompatibility(component.params, stream, model)
                           or strategy.training_incompatibility(component.params, stream, config.training,
                                                                config.transforms))
        except UserError:
            raise
        except Exception:  # a plugin's bug: when this strategy is built for a run, that run fails with it
            if components is None:
                continue
            raise
        if available is not None and need > available:
            raise UserError(f"{config.source}: strategy {component.label!r} needs at least {gib(need)} ({what}), "
                            f"but {pipeline.device.type} has {gib(available)} free; shrink [model] or the buffer sizes")
        if problem is not None:
            raise UserError(f"{config.source}: [[strategies]] {component.label!r}: {problem}")


def check_experiment(config: ExperimentConfig, device: torch.device,
                     loaded: dict[str, LabelledData] | None = None) -> list[LabelledData]:
    """Read the experiment's datasets and check every strategy against the first seed's scenario, and
    return the datasets. `cl run` and `cl sweep` do this for every file before they open the result
    store, so that a missing dataset file or an incompatible strategy stops them before anything is
    written."""
    datasets = load_datasets(config.datasets, loaded)
    scenario = build_scenario(config, datasets, config.seeds[0]).to(device)
    check_compatibility(config, scenario, input_pipeline(config, scenario, device))
    return datasets


def build_strategy(component: Component, config: ExperimentConfig, scenario: Scenario, device: torch.device,
                   seed: int, pipeline: InputPipeline | None = None) -> Strategy:
    """The strategy, its model initialised from the run's seed (built on the CPU, so any device gets the
    same weights). It receives a description of the stream, never the scenario's samples. On CUDA it sets
    the precision of convolutions and matrix products (`training.cuda_tf32`) for every way of training:
    runs, stacked runs and `cl pretrain`."""
    if device.type == "cuda":  # PyTorch's default lets cuDNN convolutions use TF32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = config.training.cuda_tf32
    pipeline = pipeline or input_pipeline(config, scenario, device)
    check_compatibility(config, scenario, pipeline, [component])
    stream = scenario.stream_info(pipeline.output_shape)
    context = StrategyContext(stream, config.training, model_spec(config, stream), pipeline, device, seed)
    return STRATEGIES.get(component.name).obj(component.params, context)


def _key(parts: Any, length: int = 64) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


def majority_share(exp) -> float:
    """Share of the experience's most common label: the accuracy of always answering that class."""
    counts = torch.bincount(exp.y)
    return float(counts.max()) / len(exp.y)


def failure_reason(exc: BaseException) -> str:
    """One line saying why a run stopped (the traceback is kept in the record)."""
    text = first_line(exc)
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in text.lower():
        return (f"out of memory ({type(exc).__name__}: {text}); lower training.batch_size, "
                f"training.eval_batch_size or the strategy's buffer sizes")
    if isinstance(exc, RunError):
        return text
    return f"{type(exc).__name__}: {text}"


def run_identity(config: ExperimentConfig, component: Component, seed: int, device: torch.device,
                 sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """What names a run: experiment, strategy label and parameters, seed, setup (with the device type,
    since CPU and CUDA generators draw different streams, and the code version), the strategy's
    package and, for a sweep's trial, its study and number (two trials may draw the same values).
    Runs with the same identity replace each other in the store; a checkpoint belongs to one."""
    identity = {"experiment": config.name, "label": component.label,
                "strategy": {"name": component.name, **params_to_dict(component.params)}, "seed": seed,
                "setup": {**config.setup_identity(), "device": device.type, "code_version": code_version()},
                "strategy_package": package_of(STRATEGIES.get(component.name).obj.__module__)}
    if sweep is not None:
        identity["sweep"] = sweep
    return identity


def run_key(identity: dict[str, Any]) -> str:
    parts = [identity[k] for k in ("experiment", "label", "strategy", "seed", "setup", "strategy_package")]
    return _key(parts + [identity["sweep"]] if "sweep" in identity else parts)


class Run:
    """One run's life: its strategy, evaluator and checkpoint; the checks and evaluation after each
    experience; the record at the end. `run_one` drives one run; `run_stacked` several at once.

    A sweep's trial passes `sweep` (its study and number, stored with the run) and `observe`, called
    with the run and the row after each evaluation; it may raise `Pruned` to stop the run there."""

    def __init__(self, config: ExperimentConfig, component: Component, scenario: Scenario, seed: int,
                 device: torch.device, pipeline: InputPipeline | None, checkpoints: Path | None, resume: bool,
                 sweep: dict[str, Any] | None = None, observe: Callable[["Run", int], None] | None = None):
        self.start = time.perf_counter()
        self.config, self.component, self.scenario, self.seed, self.device = config, component, scenario, seed, device
        self.sweep, self.observe = sweep, observe
        self.identity = run_identity(config, component, seed, device, sweep)
        self.evaluator = Evaluator(scenario, config.training.eval_batch_size)
        self.checkpoint = RunCheckpoint(checkpoints, self.identity) if checkpoints is not None else None
        self.done, self.earlier_seconds, self.eval_seconds = 0, 0.0, 0.0  # experiences done before this process
        self.group: list[Run] = [self]  # runs trained together with this one (itself included): one wall time
        self.status, self.failure, self.current = "completed", None, 0  # current: 1-based experience
        self.strategy: Strategy | None = None  # None when building it failed (the run is then `failed`)
        with self.recording():  # a plugin's bug in __init__, build_model or setup fails this run only
            self.strategy = build_strategy(component, config, scenario, device, seed, pipeline)
        if self.strategy is None:
            return
        self.strategy.loss_monitor = LossMonitor(config.divergence)
        saved = self.checkpoint.load() if self.checkpoint is not None and resume else None
        if saved is not None:
            self.checkpoint.restore(saved, self.strategy, self.evaluator, self.strategy.loss_monitor)
            self.done, self.earlier_seconds, self.eval_seconds = (saved["experiences_done"], saved["seconds"],
                                                                  saved["eval_seconds"])
        self.current = self.done
        # Rule 3 of cl/divergence.py applies at the first evaluation after training; a joint run checkpoints
        # experiences it has not evaluated, so a resumed one may still be before it.
        self.first_evaluation = not np.isfinite(self.evaluator.matrix[1:]).any()

    @property
    def stacked_with(self) -> int:
        return len(self.group)

    @property
    def name(self) -> str:
        """How progress bars and logs name the run: its trial in a sweep, else its seed."""
        return f"trial {self.sweep['trial']}" if self.sweep is not None else f"seed {self.seed}"

    @property
    def running(self) -> bool:
        return self.status == "completed"

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Inside the block, an exception stops the run and is recorded (bad input still raises)."""
        try:
            yield
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as exc:  # the run is recorded as it stopped; the invocation goes on
            self.stop(exc)

    def stop(self, exc: BaseException) -> None:
        self.status = "pruned" if isinstance(exc, Pruned) else "diverged" if isinstance(exc, Diverged) else "failed"
        step = 0 if self.strategy is None else self.strategy.step
        self.failure = {"experience": self.current, "step": step, "reason": failure_reason(exc),
                        "traceback": "".join(traceback.format_exception(exc))}

    def evaluate(self, row: int) -> None:
        t0 = time.perf_counter()
        self.evaluator.evaluate_row(row, self.strategy)
        self.eval_seconds += time.perf_counter() - t0

    def begin(self) -> None:
        if self.done == 0:
            self.evaluate(0)

    def progress_bar(self, i: int, steps: int, progress: bool, who: str) -> tqdm:
        return tqdm(total=steps, desc=f"{self.component.label} {who} exp {i + 1}/{self.scenario.n_experiences}",
                    leave=False, disable=None if progress else True, unit="step", mininterval=0.5)

    def after_experience(self, i: int) -> None:
        """Checks and evaluation once experience i (0-based) has been trained; a checkpoint unless last."""
        strategy, T = self.strategy, self.scenario.n_experiences
        strategy.loss_monitor.check()
        if not strategy.all_finite():
            raise Diverged(f"the weights are no longer finite after training experience {i + 1}; "
                           f"lower training.lr (now {self.config.training.lr})")
        self.evaluator.mark_trained(i)
        if not strategy.joint_training or i == T - 1:
            self.evaluate(i + 1)
            if self.first_evaluation:  # rule 3 of cl/divergence.py
                self.first_evaluation = False
                own = self.evaluator.task_il_matrix if self.evaluator.task_il_matrix is not None \
                    else self.evaluator.matrix
                reason = learned_nothing(float(own[i + 1, i]), majority_share(self.scenario.test[i]),
                                         self.config.divergence.learned_margin)
                if reason is not None:
                    raise Diverged(reason)
            if self.observe is not None:
                self.observe(self, i + 1)
        if self.checkpoint is not None and i < T - 1:
            # The run's share of the wall time: resumed, it trains alone and adds its own time to this.
            self.checkpoint.save(i + 1, strategy, self.evaluator, strategy.loss_monitor,
                                 self.seconds() / self.stacked_with, self.eval_seconds)

    def seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.start

    def record(self) -> RunRecord:
        config, component, scenario, strategy = self.config, self.component, self.scenario, self.strategy
        wall = self.seconds()
        # The group's wall time went into every member's evaluations and their shared training.
        train = wall - sum(run.eval_seconds for run in self.group)
        evaluator, identity = self.evaluator, self.identity
        task_il = evaluator.task_il_matrix
        completed = self.status == "completed"
        built = strategy is not None
        compute = strategy.compute if built else ComputeCount()
        return RunRecord(
            run_key=run_key(identity),
            setup_key=_key(identity["setup"], 16),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            experiment=config.name, strategy=component.label, strategy_name=component.name,
            params=params_to_dict(component.params), seed=self.seed, status=self.status, setting=scenario.setting,
            matrix=_jsonable(evaluator.matrix), task_il_matrix=_jsonable(task_il) if task_il is not None else None,
            metrics=Metrics(**compute_metrics(evaluator.matrix)) if completed else Metrics.unmeasured(),
            task_il_metrics=Metrics(**compute_metrics(task_il)) if completed and task_il is not None else None,
            budgets=Budgets(wall_seconds=wall, train_seconds=train, eval_seconds=self.eval_seconds,
                            memory_bytes=strategy.memory_bytes() if built else 0,
                            model_bytes=strategy.model_bytes() if built else 0,
                            forward_samples=compute.forward_samples, backward_samples=compute.backward_samples,
                            eval_forward_samples=compute.eval_forward_samples, scenario_bytes=scenario.nbytes(),
                            stacked_runs=self.stacked_with),
            logs=strategy.logs.as_lists(scenario.n_experiences) if built else {},
            scenario=scenario.description,
            config={**config.setup(), "strategy": {"name": component.name, "label": component.label,
                                                   **params_to_dict(component.params)},
                    "experiment_file": config.source, "description": config.description},
            provenance=provenance(self.device, STRATEGIES.get(component.name).obj.__module__),
            model_stats=strategy.model_statistics() if completed else {},
            failure=self.failure,
            evaluated_on=config.evaluated_on,
            sweep=self.sweep,
        )


def run_one(config: ExperimentConfig, component: Component, scenario: Scenario, seed: int, device: torch.device,
            progress: bool = True, pipeline: InputPipeline | None = None,
            checkpoints: Path | None = None, resume: bool = False) -> RunRecord:
    """Train one strategy on one scenario and return its record: `completed`, or `diverged` / `failed`
    with the experience and step where it stopped and why (bad input still raises UserError).

    With `checkpoints` (a folder), a checkpoint is written after every experience; with `resume`, the
    run continues from the one found there (cl/resume.py)."""
    run = Run(config, component, scenario, seed, device, pipeline, checkpoints, resume)
    train_alone(run, progress)
    return run.record()


def train_alone(run: Run, progress: bool = True) -> None:
    """Train one run to its end (or until it stops)."""
    if not run.running:  # its strategy could not be built
        return
    with run.recording():
        run.begin()
        for i, exp in enumerate(run.scenario.train[run.done:], start=run.done):
            run.current = i + 1
            threads.rebalance()
            with run.progress_bar(i, run.strategy.steps_per_experience(exp), progress, run.name) as bar:
                run.strategy.progress = bar
                run.strategy.fit(exp)
                run.strategy.progress = None
            run.after_experience(i)


def run_stacked(config: ExperimentConfig, component: Component, scenarios: list[Scenario], seeds: list[int],
                device: torch.device, progress: bool = True, pipelines: list[InputPipeline] | None = None,
                checkpoints: list[Path] | None = None, graphs: bool = False,
                log: Callable[[str], None] = print) -> list[RunRecord]:
    """Train the runs of one strategy for several seeds as one stacked model (cl/stacking.py) and return
    their records, one per seed, as `run_one` would. The scenarios' experiences must have the same
    lengths (`stack_signature`). With `graphs` (CUDA), each experience's device steps are recorded and
    replayed as CUDA graphs (cl/graphs.py), also for a single run; one line per experience says what
    was replayed."""
    runs = [Run(config, component, scenario, seed, device, pipeline, folder, False)
            for scenario, seed, pipeline, folder in zip(scenarios, seeds, pipelines or [None] * len(seeds),
                                                        checkpoints or [None] * len(seeds))]
    train_together(runs, progress, graphs, log)
    return [run.record() for run in runs]


def train_together(runs: list[Run], progress: bool = True, graphs: bool = False,
                   log: Callable[[str], None] = print) -> None:
    """Train runs of one strategy class as one stacked model, experience by experience. A run that stops
    (diverged, failed, pruned) leaves the stack; the others go on. Their members may differ in the
    strategy's float parameters and in the learning-rate-like training parameters (cl/stacking.py)."""
    for run in runs:
        run.group = runs  # trained in lockstep, they share one wall time
        if run.running:  # not when its strategy could not be built
            with run.recording():
                run.begin()
    for i in range(runs[0].scenario.n_experiences):
        live = [run for run in runs if run.running]
        if not live:
            break
        for run in live:
            run.current = i + 1
        threads.rebalance()
        experiences = [run.scenario.train[i] for run in live]
        who = ",".join(run.name for run in live)
        engine = None
        try:
            with live[0].progress_bar(i, live[0].strategy.steps_per_experience(experiences[0]), progress, who) as bar:
                if len(live) == 1 and not graphs:
                    live[0].strategy.fit(experiences[0])
                else:
                    engine = StackedRuns([run.strategy for run in live], graphs)
                    engine.fit(experiences, bar)
                    if engine.graphs is not None:
                        log(f"{live[0].component.label} {who} exp {i + 1}: {engine.graphs.summary()}")
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as exc:  # a step of the stack failed: every run still in it stopped there
            _stop_diverged(live, engine)
            for run in live:
                if run.running:
                    run.stop(exc)
            continue
        _stop_diverged(live, engine)
        for run in live:
            if run.running:
                with run.recording():
                    run.after_experience(i)


def _stop_diverged(runs: list[Run], engine: StackedRuns | None) -> None:
    """Stop the runs whose members diverged and left the stack (the others went on training)."""
    for strategy, exc in engine.stopped if engine is not None else []:
        next(run for run in runs if run.strategy is strategy).stop(exc)


def stack_signature(scenario: Scenario) -> tuple:
    """Runs whose scenarios share this (and the strategy) can be stacked: every shape is the same."""
    return (tuple(len(e) for e in scenario.train), scenario.input_shape, scenario.n_classes, scenario.n_tasks)


def _jsonable(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def run_experiment(config: ExperimentConfig, datasets: list[LabelledData], store: ResultStore,
                   device: torch.device, progress: bool = True, log: Callable[[str], None] = print,
                   resume: bool = False, stack: bool = True, graphs: bool = False) -> list[RunRecord]:
    """Run every (strategy, seed) of the experiment on its `datasets` (from `check_experiment`, which
    has checked every strategy against them); each finished run is stored at once. Every run
    writes a checkpoint after each experience (in `store.checkpoint_root`, removed once the run is
    stored). With `resume`, completed runs already in the store are skipped and keep their ids, and
    unfinished ones continue from their last checkpoint. With `stack`, the seeds of a stackable
    strategy whose scenarios share every shape train as one stacked model (`run_stacked`); a run
    resumed from a checkpoint trains alone. With `graphs` (`--cuda-graphs`), the steps of strategies that
    allow it are replayed as CUDA graphs (cl/graphs.py); the others say once why they run eagerly."""
    scenarios, pipelines = {}, {}
    for seed in config.seeds:
        scenarios[seed] = build_scenario(config, datasets, seed).to(device)
        pipelines[seed] = input_pipeline(config, scenarios[seed], device)
    records = []
    first = scenarios[config.seeds[0]]
    backbone = meta_model(model_spec(config, first.stream_info(pipelines[config.seeds[0]].output_shape)))
    for component in config.strategies:
        pending = []
        identities = {seed: run_identity(config, component, seed, device) for seed in config.seeds}
        for seed in config.seeds:
            done = store.completed(run_key(identities[seed])) if resume else None
            if done is not None:
                records.append(done)
                log(f"{describe_run(done)}  (already stored)")
            else:
                pending.append(seed)
        strategy_class = STRATEGIES.get(component.name).obj
        if not strategy_class.resumable and resume and pending:
            log(f"{component.label}: its strategy's state cannot be checkpointed, so its unfinished runs start "
                f"from the beginning")
        # Checkpoint folders of the pending runs; none for a strategy whose state a checkpoint cannot hold.
        folders = ({seed: run_folder(store.checkpoint_root, identities[seed]) for seed in pending}
                   if strategy_class.resumable else {})
        resumed = {seed for seed, folder in folders.items() if resume and folder.exists()}
        starting = [seed for seed in folders if resume and seed not in resumed]
        for seed in starting:  # a changed --set may be a slip: say which checkpoints were left alone
            for diff in other_configurations(folders[seed], identities[seed]):
                log(f"{component.label} seed {seed}: starts from the beginning; a checkpoint of another "
                    f"configuration ({diff}) is left for its own --resume")
        graph_reason = graph_problem(strategy_class, device, backbone) if graphs else None
        graphed = graphs and graph_reason is None
        if graphs and not graphed:
            log(f"cuda graphs: {component.label} runs eagerly: {graph_reason}")
        for seed in sorted(resumed) if graphed else []:
            log(f"cuda graphs: {component.label} seed {seed} runs eagerly: it resumes from a checkpoint")
        unstackable = stacking_problem(strategy_class, backbone)
        if stack and len(pending) > 1 and strategy_class.stackable and unstackable is not None:
            log(f"{component.label}: its runs train one by one, not stacked: {unstackable}")
        for group in stack_groups(component, pending, scenarios, stack, resumed, backbone):
            if len(group) == 1 and not (graphed and group[0] not in resumed):
                seed = group[0]
                finished = [run_one(config, component, scenarios[seed], seed, device, progress, pipelines[seed],
                                    folders.get(seed), resume)]
            else:
                finished = run_stacked(config, component, [scenarios[s] for s in group], group, device, progress,
                                       [pipelines[s] for s in group], [folders.get(s) for s in group], graphed, log)
            for seed, record in zip(group, finished):
                stored = store.write_or_keep(record)
                record.id = stored if isinstance(stored, int) else None
                if seed in folders:  # finished: in the store, or kept in a file
                    remove_run_folder(folders[seed])
                records.append(record)
                log(describe_run(record) if record.id is not None else
                    f"{describe_run(record)}  NOT STORED (the store refused it): kept in {stored}")
    return records


def stack_groups(component: Component, seeds: list[int], scenarios: dict[int, Scenario], stack: bool,
                 resumed: set[int], backbone: torch.nn.Module | None = None) -> list[list[int]]:
    """The seeds to train together: one group per stack signature when the strategy (on `backbone`) is
    stackable and `stack` is on; a seed alone when it resumes from a checkpoint or shares its shapes
    with no other."""
    if not stack or stacking_problem(STRATEGIES.get(component.name).obj, backbone) is not None:
        return [[seed] for seed in seeds]
    groups: dict[tuple, list[int]] = {}
    alone = []
    for seed in seeds:
        if seed in resumed:
            alone.append([seed])
        else:
            groups.setdefault(stack_signature(scenarios[seed]), []).append(seed)
    return alone + list(groups.values())


def describe_run(record: RunRecord) -> str:
    """One line per finished run: its headline numbers, or where and why it stopped."""
    head = f"run {'(not stored)' if record.id is None else record.id}: {record.strategy:<12} seed {record.seed}"
    if record.failure is not None:
        return f"{head}  {record.stopped()}"
    m = record.metrics
    b = record.budgets
    time = f"{b.wall_seconds:.1f}s" if b.stacked_runs == 1 else \
        f"{b.wall_seconds / b.stacked_runs:.1f}s ({b.wall_seconds:.1f}s for {b.stacked_runs} stacked)"
    return f"{head}  ACC {_fmt(m.acc)}  BWT {_fmt(m.bwt)}  {time}"


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"
