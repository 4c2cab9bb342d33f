"""Avalanche interoperability: our scenarios as Avalanche benchmarks, Avalanche's strategies in our runner.

Only this module imports avalanche (the optional extra: pip install -e ".[avalanche]"), and only when
one of its functions runs, so `cl list strategies` and every other command work without it.

- `to_avalanche(scenario, pipeline)`: the same experiences in the same order, with their task labels,
  as an Avalanche benchmark (`train_stream`, `test_stream`). Inputs are exported as the model sees them
  at evaluation: the experience's sample transform (permutation, rotation) and the input pipeline
  (decode, resize, normalisation) applied. Training augmentation is random per batch and is refused.
- The `avalanche` strategy: `{name = "avalanche", class = "Replay", params = {mem_size = 500}}` trains
  with Avalanche's own strategy class on each of our training experiences (exported as above) and
  is evaluated by our evaluator, so its runs land in our store and leaderboard like any other.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import warnings
from typing import Any, Iterator

import torch

from cl.data import Experience, Scenario
from cl.errors import UserError
from cl.params import param, required
from cl.registry import register_strategy
from cl.seeding import spawn_seeds
from cl.strategy import Strategy
from cl.transforms import InputPipeline, to_float

INSTALL = 'pip install -e ".[avalanche]" (or pip install avalanche-lib)'


def avalanche_module(name: str = "avalanche") -> Any:
    """Import an avalanche module, or say in one line how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"Avalanche interoperability needs avalanche-lib, which is not installed ({exc}); "
                        f"{INSTALL}") from None


def model_inputs(exp: Experience, pipeline: InputPipeline | None) -> torch.Tensor:
    """Every input of the experience as the model receives it at evaluation (no augmentation)."""
    raw = exp.inputs()
    return pipeline(raw, False, None) if pipeline is not None else to_float(raw)


def avalanche_dataset(exp: Experience, pipeline: InputPipeline | None) -> Any:
    """One experience as an Avalanche classification dataset (inputs, labels, task labels)."""
    utils = avalanche_module("avalanche.benchmarks.utils")
    x = model_inputs(exp, pipeline).cpu()
    y = exp.y.cpu()
    return utils._make_taskaware_tensor_classification_dataset(x, y, targets=y.tolist(), task_labels=exp.task_id)


def to_avalanche(scenario: Scenario, pipeline: InputPipeline | None = None) -> Any:
    """The scenario as an Avalanche benchmark with a train and a test stream (module docstring)."""
    if pipeline is not None and pipeline.params.augments:
        raise UserError("to_avalanche exports fixed inputs, but [transforms] augments (crop_padding, "
                        "horizontal_flip) at random per batch; export without augmentation")
    scenarios = avalanche_module("avalanche.benchmarks.scenarios.dataset_scenario")
    task_aware = avalanche_module("avalanche.benchmarks.scenarios.task_aware")
    benchmark = scenarios.benchmark_from_datasets(train=[avalanche_dataset(e, pipeline) for e in scenario.train],
                                                  test=[avalanche_dataset(e, pipeline) for e in scenario.test])
    return task_aware.with_task_labels(benchmark)  # experiences get task_label / task_labels


def avalanche_experience(exp: Experience, pipeline: InputPipeline | None) -> Any:
    """One training experience for an Avalanche strategy's train(), numbered like ours (GEM keys its
    memory by experience number)."""
    scenarios = avalanche_module("avalanche.benchmarks.scenarios.dataset_scenario")
    streams = avalanche_module("avalanche.benchmarks.scenarios.generic_scenario")
    experience = scenarios.DatasetExperience(dataset=avalanche_dataset(exp, pipeline), current_experience=exp.id)
    experience.origin_stream = streams.EagerCLStream("train_stream", [experience], set_stream_info=False)
    return experience


# ---------------------------------------------------------------- the strategy adapter


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Avalanche warns that no logger is set (ours record the run) and about its own deprecations.
    Its deprecated functions put a "once" filter for DeprecationWarning in front of any of ours at
    every call (Replay's buffer update: one warning per experience), so those are dropped where
    warnings are shown rather than by a filter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        show = warnings.showwarning

        def show_all_but_deprecations(message, category, *args, **kwargs):  # noqa: ANN001
            if not issubclass(category, DeprecationWarning):
                show(message, category, *args, **kwargs)

        warnings.showwarning = show_all_but_deprecations  # restored by catch_warnings
        yield


@dataclasses.dataclass
class AvalancheParams:
    class_name: str = required("Avalanche strategy class in avalanche.training: Naive, Replay, GEM, AGEM, "
                               "LwF, EWC, SynapticIntelligence, ...", key="class")  # a keyword in Python
    params: dict[str, Any] = param({}, "keyword arguments of that class, e.g. {mem_size = 500} for Replay")


@register_strategy("avalanche", params=AvalancheParams)
class AvalancheStrategy(Strategy):
    """Avalanche's own strategy class (Naive, Replay, GEM, ...) trained on our stream, evaluated by ours.

    Its training loop, plugins and buffers run on our experiences with our model, optimizer settings
    (training.lr, momentum, ...), batch size and epochs; our evaluator measures it. Avalanche's data
    loaders shuffle with torch's global generator, which this strategy seeds from the run's seed before
    each experience (and restores afterwards)."""

    supported_models = ("mlp", "cnn", "resnet18_reduced")

    @classmethod
    def incompatibility(cls, params: Any, stream, model) -> str | None:
        if getattr(model.params, "multi_head", False):
            return "strategy 'avalanche' trains single-head models (Avalanche's multi-head models are its own)"
        return super().incompatibility(params, stream, model)

    def setup(self) -> None:
        training = avalanche_module("avalanche.training")
        cls = getattr(training, self.params.class_name, None)
        if not isinstance(cls, type):
            raise UserError(f"strategy avalanche: class {self.params.class_name!r} is not a strategy in "
                            f"avalanche.training; e.g. Naive, Replay, GEM, AGEM, LwF, EWC")
        evaluation = avalanche_module("avalanche.training.plugins")
        self._prepare_optimizer()
        try:
            with quiet():
                self.avalanche = cls(model=self.model, optimizer=self.optimizer, criterion=torch.nn.CrossEntropyLoss(),
                                     train_mb_size=self.training.batch_size, train_epochs=self.training.epochs,
                                     eval_mb_size=self.training.eval_batch_size, device=self.device,
                                     evaluator=evaluation.EvaluationPlugin(), **self.params.params)
        except TypeError as exc:
            raise UserError(f"strategy avalanche: {self.params.class_name}(**params) refused its parameters: "
                            f"{exc}; see avalanche.training.{self.params.class_name}") from None
        self._seeds = spawn_seeds(self.context.seed, self.stream.n_experiences, (0x415641,))

    def train_experience(self, exp: Experience) -> None:
        self.avalanche.optimizer = self.optimizer  # a fresh one with optimizer_policy = "reset"
        experience = avalanche_experience(exp, self.context.pipeline)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self._seeds[exp.id])
            with quiet():
                self.avalanche.train(experience)
        self.step += len(exp) // self.training.batch_size * self.training.epochs
