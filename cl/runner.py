"""The runner: experiment config -> scenario -> strategy.fit / evaluator -> run record -> store."""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
import shutil
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from cl.config import Component, ExperimentConfig
from cl.data import LabelledData, Scenario, StreamInfo
from cl.divergence import Diverged, LossMonitor, learned_nothing
from cl.errors import RunError, UserError
from cl.evaluation import Evaluator
from cl.footprint import available_bytes, gib, lower_bound, parameter_count
from cl.metrics import compute_metrics
from cl.params import params_to_dict
from cl.provenance import code_version, package_of, provenance
from cl.record import Budgets, Metrics, RunRecord
from cl.resume import RunCheckpoint, run_folder
from cl.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES
from cl.store import ResultStore
from cl.strategy import ModelSpec, Strategy, StrategyContext
from cl.transforms import InputPipeline, channel_statistics


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


def load_datasets(components: list[Component]) -> list[LabelledData]:
    return [DATASETS.get(c.name).obj(c.params) for c in components]


def build_scenario(config: ExperimentConfig, datasets: list[LabelledData], seed: int) -> Scenario:
    generator = SCENARIOS.get(config.scenario.name).obj
    return generator(datasets, config.scenario.params, seed)


def input_pipeline(config: ExperimentConfig, scenario: Scenario, device: torch.device) -> InputPipeline:
    """The experiment's `[transforms]` for this scenario's data; normalisation statistics, when not
    given, come from the training inputs as stored (each distinct tensor once, before the
    experiences' permutations or rotations)."""
    p = config.transforms
    mean, std = p.mean, p.std
    if p.normalize and not mean:
        mean, std = channel_statistics(list({id(e.x): e.x for e in scenario.train}.values()))
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
    n_parameters = parameter_count(model) if available is not None else 0
    for component in config.strategies if components is None else components:
        strategy = STRATEGIES.get(component.name).obj
        need, what = lower_bound(n_parameters, stream, strategy.stored_samples(component.params, stream))
        if available is not None and need > available:  # first: incompatibility() may build the model
            raise UserError(f"strategy {component.label!r} needs at least {gib(need)} ({what}), but "
                            f"{pipeline.device.type} has {gib(available)} free; shrink [model] or the buffer sizes")
        problem = strategy.incompatibility(component.params, stream, model)
        if problem is not None:
            raise UserError(problem)


def build_strategy(component: Component, config: ExperimentConfig, scenario: Scenario, device: torch.device,
                   seed: int, pipeline: InputPipeline | None = None) -> Strategy:
    """The strategy, its model initialised from the run's seed (built on the CPU, so any device gets the
    same weights). It receives a description of the stream, never the scenario's samples."""
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
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in text.lower():
        return (f"out of memory ({type(exc).__name__}: {text}); lower training.batch_size, "
                f"training.eval_batch_size or the strategy's buffer sizes")
    if isinstance(exc, RunError):
        return text
    return f"{type(exc).__name__}: {text}"


def run_identity(config: ExperimentConfig, component: Component, seed: int, device: torch.device) -> dict[str, Any]:
    """What names a run: experiment, strategy label and parameters, seed, setup (with the device type,
    since CPU and CUDA generators draw different streams, and the code version) and the strategy's
    package. Runs with the same identity replace each other in the store; a checkpoint belongs to one."""
    return {"experiment": config.name, "label": component.label,
            "strategy": {"name": component.name, **params_to_dict(component.params)}, "seed": seed,
            "setup": {**config.setup_identity(), "device": device.type, "code_version": code_version()},
            "strategy_package": package_of(STRATEGIES.get(component.name).obj.__module__)}


def run_key(identity: dict[str, Any]) -> str:
    return _key([identity[k] for k in ("experiment", "label", "strategy", "seed", "setup", "strategy_package")])


def run_one(config: ExperimentConfig, component: Component, scenario: Scenario, seed: int, device: torch.device,
            progress: bool = True, pipeline: InputPipeline | None = None,
            checkpoints: Path | None = None, resume: bool = False) -> RunRecord:
    """Train one strategy on one scenario and return its record: `completed`, or `diverged` / `failed`
    with the experience and step where it stopped and why (bad input still raises UserError).

    With `checkpoints` (a folder), a checkpoint is written after every experience; with `resume`, the
    run continues from the one found there (cl/resume.py)."""
    start = time.perf_counter()
    identity = run_identity(config, component, seed, device)
    strategy = build_strategy(component, config, scenario, device, seed, pipeline)
    strategy.loss_monitor = LossMonitor(config.divergence)
    evaluator = Evaluator(scenario, config.training.eval_batch_size)
    checkpoint = RunCheckpoint(checkpoints, identity) if checkpoints is not None else None
    saved = checkpoint.load() if checkpoint is not None and resume else None
    done, earlier_seconds, eval_seconds = 0, 0.0, 0.0
    if saved is not None:
        checkpoint.restore(saved, strategy, evaluator, strategy.loss_monitor)
        done, earlier_seconds, eval_seconds = saved["experiences_done"], saved["seconds"], saved["eval_seconds"]

    def evaluate(row: int) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        evaluator.evaluate_row(row, strategy)
        eval_seconds += time.perf_counter() - t0

    T = scenario.n_experiences
    status, failure, current = "completed", None, done  # current: 1-based experience being trained
    first_evaluation = done == 0
    try:
        if done == 0:
            evaluate(0)
        for i, exp in enumerate(scenario.train[done:], start=done):
            current = i + 1
            desc = f"{component.label} seed {seed} exp {i + 1}/{T}"
            with tqdm(total=strategy.steps_per_experience(exp), desc=desc, leave=False,
                      disable=None if progress else True, unit="step", mininterval=0.5) as bar:
                strategy.progress = bar
                strategy.fit(exp)
                strategy.progress = None
            strategy.loss_monitor.check()
            if not strategy.all_finite():
                raise Diverged(f"the weights are no longer finite after training experience {i + 1}; "
                               f"lower training.lr (now {config.training.lr})")
            evaluator.mark_trained(i)
            if not strategy.joint_training or i == T - 1:
                evaluate(i + 1)
                if first_evaluation:  # rule 3 of cl/divergence.py
                    first_evaluation = False
                    own = evaluator.task_il_matrix if evaluator.task_il_matrix is not None else evaluator.matrix
                    reason = learned_nothing(float(own[i + 1, i]), majority_share(scenario.test[i]),
                                             config.divergence.learned_margin)
                    if reason is not None:
                        raise Diverged(reason)
            if checkpoint is not None and i < T - 1:
                checkpoint.save(i + 1, strategy, evaluator, strategy.loss_monitor,
                                earlier_seconds + time.perf_counter() - start, eval_seconds)
    except (KeyboardInterrupt, UserError):
        raise
    except Exception as exc:  # the run is recorded as it stopped; the invocation goes on
        status = "diverged" if isinstance(exc, Diverged) else "failed"
        failure = {"experience": current, "step": strategy.step, "reason": failure_reason(exc),
                   "traceback": traceback.format_exc()}
    wall = earlier_seconds + time.perf_counter() - start

    task_il = evaluator.task_il_matrix
    completed = status == "completed"
    compute = strategy.compute
    return RunRecord(
        run_key=run_key(identity),
        setup_key=_key(identity["setup"], 16),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        experiment=config.name, strategy=component.label, strategy_name=component.name,
        params=params_to_dict(component.params), seed=seed, status=status, setting=scenario.setting,
        matrix=_jsonable(evaluator.matrix), task_il_matrix=_jsonable(task_il) if task_il is not None else None,
        metrics=Metrics(**compute_metrics(evaluator.matrix)) if completed else Metrics.unmeasured(),
        task_il_metrics=Metrics(**compute_metrics(task_il)) if completed and task_il is not None else None,
        budgets=Budgets(wall_seconds=wall, train_seconds=wall - eval_seconds, eval_seconds=eval_seconds,
                        memory_bytes=strategy.memory_bytes(), model_bytes=strategy.model_bytes(),
                        forward_samples=compute.forward_samples, backward_samples=compute.backward_samples,
                        eval_forward_samples=compute.eval_forward_samples, scenario_bytes=scenario.nbytes()),
        logs=strategy.logs.as_lists(T),
        scenario=scenario.description,
        config={**config.setup(), "strategy": {"name": component.name, "label": component.label,
                                               **params_to_dict(component.params)},
                "experiment_file": config.source, "description": config.description},
        provenance=provenance(device, type(strategy).__module__),
        model_stats=strategy.model_statistics() if completed else {},
        failure=failure,
    )


def _jsonable(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def run_experiment(config: ExperimentConfig, store: ResultStore, device: torch.device, progress: bool = True,
                   log: Callable[[str], None] = print, resume: bool = False) -> list[RunRecord]:
    """Run every (seed, strategy) of the experiment; each finished run is stored at once. Every run
    writes a checkpoint after each experience (in `store.checkpoint_root`, removed once the run is
    stored). With `resume`, completed runs already in the store are skipped and keep their ids, and
    unfinished ones continue from their last checkpoint."""
    datasets = load_datasets(config.datasets)
    records = []
    for i, seed in enumerate(config.seeds):
        scenario = build_scenario(config, datasets, seed).to(device)
        pipeline = input_pipeline(config, scenario, device)
        if i == 0:
            check_compatibility(config, scenario, pipeline)  # every strategy, before the first run trains
        for component in config.strategies:
            if resume:
                done = store.completed(run_key(run_identity(config, component, seed, device)))
                if done is not None:
                    records.append(done)
                    log(f"{describe_run(done)}  (already stored)")
                    continue
            folder = run_folder(store.checkpoint_root, config.name, component.label, seed)
            record = run_one(config, component, scenario, seed, device, progress, pipeline, folder, resume)
            stored = store.write_or_keep(record)
            record.id = stored if isinstance(stored, int) else None
            shutil.rmtree(folder, ignore_errors=True)  # finished: in the store, or kept in a file
            records.append(record)
            log(describe_run(record) if record.id is not None else
                f"{describe_run(record)}  NOT STORED (the store refused it): kept in {stored}")
    return records


def describe_run(record: RunRecord) -> str:
    """One line per finished run: its headline numbers, or where and why it stopped."""
    head = f"run {'(not stored)' if record.id is None else record.id}: {record.strategy:<12} seed {record.seed}"
    if record.failure is not None:
        return f"{head}  {record.stopped()}"
    m = record.metrics
    return f"{head}  ACC {_fmt(m.acc)}  BWT {_fmt(m.bwt)}  {record.budgets.wall_seconds:.1f}s"


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"
