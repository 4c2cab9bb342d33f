"""The runner: experiment config -> scenario -> strategy.fit / evaluator -> run record -> store."""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
import time
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from cl.config import Component, ExperimentConfig
from cl.data import LabelledData, Scenario, StreamInfo
from cl.errors import RunError, UserError
from cl.evaluation import Evaluator
from cl.metrics import compute_metrics
from cl.params import params_to_dict
from cl.provenance import code_version, provenance
from cl.record import Budgets, Metrics, RunRecord
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
    for component in config.strategies if components is None else components:
        problem = STRATEGIES.get(component.name).obj.incompatibility(component.params, stream, model)
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


def run_one(config: ExperimentConfig, component: Component, scenario: Scenario, seed: int, device: torch.device,
            progress: bool = True, pipeline: InputPipeline | None = None) -> RunRecord:
    """Train one strategy on one scenario and return its complete record."""
    start = time.perf_counter()
    strategy = build_strategy(component, config, scenario, device, seed, pipeline)
    evaluator = Evaluator(scenario, config.training.eval_batch_size)
    eval_seconds = 0.0

    def evaluate(row: int) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        evaluator.evaluate_row(row, strategy)
        eval_seconds += time.perf_counter() - t0

    evaluate(0)
    T = scenario.n_experiences
    for i, exp in enumerate(scenario.train):
        desc = f"{component.label} seed {seed} exp {i + 1}/{T}"
        with tqdm(total=strategy.steps_per_experience(exp), desc=desc, leave=False, disable=None if progress else True,
                  unit="step", mininterval=0.5) as bar:
            strategy.progress = bar
            strategy.fit(exp)
            strategy.progress = None
        if not strategy.all_finite():
            raise RunError(f"{component.label} (seed {seed}): the loss became NaN/inf during experience {i + 1} "
                           f"and the weights are no longer finite; lower training.lr (now {config.training.lr})")
        evaluator.mark_trained(i)
        if not strategy.joint_training or i == T - 1:
            evaluate(i + 1)
    wall = time.perf_counter() - start

    task_il = evaluator.task_il_matrix
    params = params_to_dict(component.params)
    origin = provenance(device, type(strategy).__module__)
    # A run's identity: the device type (CPU and CUDA generators draw different streams) and the code.
    setup = {**config.setup_identity(), "device": device.type, "code_version": code_version()}
    compute = strategy.compute
    return RunRecord(
        run_key=_key([config.name, component.label, {"name": component.name, **params}, seed, setup,
                      origin["strategy_package"]]),
        setup_key=_key(setup, 16),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        experiment=config.name, strategy=component.label, strategy_name=component.name, params=params, seed=seed,
        status="completed", setting=scenario.setting,
        matrix=_jsonable(evaluator.matrix), task_il_matrix=_jsonable(task_il) if task_il is not None else None,
        metrics=Metrics(**compute_metrics(evaluator.matrix)),
        task_il_metrics=Metrics(**compute_metrics(task_il)) if task_il is not None else None,
        budgets=Budgets(wall_seconds=wall, train_seconds=wall - eval_seconds, eval_seconds=eval_seconds,
                        memory_bytes=strategy.memory_bytes(), model_bytes=strategy.model_bytes(),
                        forward_samples=compute.forward_samples, backward_samples=compute.backward_samples,
                        eval_forward_samples=compute.eval_forward_samples, scenario_bytes=scenario.nbytes()),
        logs=strategy.logs.as_lists(T),
        scenario=scenario.description,
        config={**config.setup(), "strategy": {"name": component.name, "label": component.label, **params},
                "experiment_file": config.source, "description": config.description},
        provenance=origin,
        model_stats=strategy.model_statistics(),
    )


def _jsonable(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def run_experiment(config: ExperimentConfig, store: ResultStore, device: torch.device, progress: bool = True,
                   log: Callable[[str], None] = print) -> list[RunRecord]:
    """Run every (seed, strategy) of the experiment; each finished run is stored at once."""
    datasets = load_datasets(config.datasets)
    records = []
    for i, seed in enumerate(config.seeds):
        scenario = build_scenario(config, datasets, seed).to(device)
        pipeline = input_pipeline(config, scenario, device)
        if i == 0:
            check_compatibility(config, scenario, pipeline)  # every strategy, before the first run trains
        for component in config.strategies:
            record = run_one(config, component, scenario, seed, device, progress, pipeline)
            record.id = store.write(record)
            records.append(record)
            m = record.metrics
            log(f"run {record.id}: {component.label:<12} seed {seed}  ACC {_fmt(m.acc)}"
                f"  BWT {_fmt(m.bwt)}  {record.budgets.wall_seconds:.1f}s")
    return records


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"
