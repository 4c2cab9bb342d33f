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
import inspect
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


def avalanche_task_label(exp: Experience, task_labels_at_test: bool) -> int:
    """The experience's task label in Avalanche: its task id in task-IL, else 0, as in Avalanche's own class-
    and domain-incremental benchmarks (its LwF, for one, distils a single head only over the classes of
    the experience's task label: with one label per experience it distilled the first experience's only)."""
    return exp.task_id if task_labels_at_test else 0


def avalanche_dataset(exp: Experience, pipeline: InputPipeline | None, task_labels_at_test: bool) -> Any:
    """One experience as an Avalanche classification dataset (inputs, labels, task labels)."""
    utils = avalanche_module("avalanche.benchmarks.utils")
    x = model_inputs(exp, pipeline).cpu()
    y = exp.y.cpu()
    return utils._make_taskaware_tensor_classification_dataset(
        x, y, targets=y.tolist(), task_labels=avalanche_task_label(exp, task_labels_at_test))


def to_avalanche(scenario: Scenario, pipeline: InputPipeline | None = None) -> Any:
    """The scenario as an Avalanche benchmark with a train and a test stream (module docstring)."""
    if pipeline is not None and pipeline.params.augments:
        raise UserError("to_avalanche exports fixed inputs, but [transforms] augments (crop_padding, "
                        "horizontal_flip) at random per batch; export without augmentation")
    scenarios = avalanche_module("avalanche.benchmarks.scenarios.dataset_scenario")
    task_aware = avalanche_module("avalanche.benchmarks.scenarios.task_aware")
    labels = scenario.task_labels_at_test
    benchmark = scenarios.benchmark_from_datasets(train=[avalanche_dataset(e, pipeline, labels) for e in scenario.train],
                                                  test=[avalanche_dataset(e, pipeline, labels) for e in scenario.test])
    return task_aware.with_task_labels(benchmark)  # experiences get task_label / task_labels


def avalanche_experience(exp: Experience, pipeline: InputPipeline | None, task_labels_at_test: bool) -> Any:
    """One training experience for an Avalanche strategy's train(), numbered like ours (GEM keys its
    memory by experience number)."""
    scenarios = avalanche_module("avalanche.benchmarks.scenarios.dataset_scenario")
    streams = avalanche_module("avalanche.benchmarks.scenarios.generic_scenario")
    experience = scenarios.DatasetExperience(dataset=avalanche_dataset(exp, pipeline, task_labels_at_test),
                                             current_experience=exp.id)
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


# The strategy classes' arguments that the adapter sets itself, and from what.
SET_BY_CL = {"model": "[model]", "optimizer": "[training]", "criterion": "the cross-entropy loss",
             "train_mb_size": "training.batch_size", "train_epochs": "training.epochs",
             "eval_mb_size": "training.eval_batch_size", "device": "--device", "evaluator": "our evaluator"}


def avalanche_class(name: str) -> type:
    """The strategy class `name` of avalanche.training, or a UserError naming it."""
    training = avalanche_module("avalanche.training")
    templates = avalanche_module("avalanche.training.templates")
    found = getattr(training, name, None)
    if not (isinstance(found, type) and issubclass(found, templates.SupervisedTemplate)):
        raise UserError(f"strategy avalanche: class {name!r} is not a strategy in avalanche.training; "
                        f"e.g. Naive, Replay, GEM, AGEM, LwF, EWC")
    return found


def accepted_parameters(name: str) -> list[str]:
    """The keyword arguments strategy class `name` takes besides those the adapter sets: its own and, when
    it passes the rest on (**base_kwargs), those of Avalanche's SupervisedTemplate."""
    templates = avalanche_module("avalanche.training.templates")
    own = inspect.signature(avalanche_class(name).__init__).parameters.values()
    names = [p.name for p in own if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if any(p.kind == p.VAR_KEYWORD for p in own):
        names += [p.name for p in inspect.signature(templates.SupervisedTemplate.__init__).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return sorted(set(names) - {"self"} - set(SET_BY_CL))


def required_parameters(name: str) -> list[str]:
    """The keyword arguments without a default that strategy class `name` needs besides those the adapter sets."""
    own = inspect.signature(avalanche_class(name).__init__).parameters.values()
    return [p.name for p in own if p.default is p.empty and p.kind == p.KEYWORD_ONLY and p.name not in SET_BY_CL]


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
    resumable = False  # Avalanche's buffers, teachers and importances live in its own objects

    @classmethod
    def incompatibility(cls, params: AvalancheParams, stream, model) -> str | None:
        if getattr(model.params, "multi_head", False):
            return "strategy 'avalanche' trains single-head models (Avalanche's multi-head models are its own)"
        problem = super().incompatibility(params, stream, model)
        if problem is None:
            accepted = accepted_parameters(params.class_name)  # a UserError naming an unknown class
            ours = sorted(set(params.params) & set(SET_BY_CL))
            unknown = sorted(set(params.params) - set(SET_BY_CL) - set(accepted))
            missing = [name for name in required_parameters(params.class_name) if name not in params.params]
            if ours:
                problem = f"strategy 'avalanche': params.{ours[0]} is set by cl from {SET_BY_CL[ours[0]]}; leave it out"
            elif unknown:
                problem = (f"strategy 'avalanche': {params.class_name} takes no parameter {unknown[0]!r}; it takes "
                           f"{', '.join(accepted)}")
            elif missing:
                problem = (f"strategy 'avalanche': {params.class_name} needs {', '.join(missing)}; give them in "
                           f"params, e.g. params = {{{missing[0]} = ...}}")
        return problem

    @classmethod
    def training_incompatibility(cls, params: AvalancheParams, stream, training, transforms) -> str | None:
        ignored = [what for what, used in (
            ("[transforms] augmentation (crop_padding, horizontal_flip)", transforms.augments),
            ("gradient clipping (training.grad_clip_norm)", training.grad_clip_norm > 0),
            ("task-IL mask (training.task_il_mask: set it to false)", stream.setting == "task-il"
             and training.task_il_mask)) if used]
        if ignored:
            return (f"strategy 'avalanche' trains with Avalanche's own loop, which has no {ignored[0]}, so its runs "
                    f"would not train like the others'")
        return None

    def setup(self) -> None:
        cls = avalanche_class(self.params.class_name)
        evaluation = avalanche_module("avalanche.training.plugins")
        self._prepare_optimizer()
        with quiet():  # parameter names were checked by incompatibility(); Avalanche checks their values
            self.avalanche = cls(model=self.model, optimizer=self.optimizer, criterion=torch.nn.CrossEntropyLoss(),
                                 train_mb_size=self.training.batch_size, train_epochs=self.training.epochs,
                                 eval_mb_size=self.training.eval_batch_size, device=self.device,
                                 evaluator=evaluation.EvaluationPlugin(), **self.params.params)
        self._seeds = spawn_seeds(self.context.seed, self.stream.n_experiences, (0x415641,))

    def train_experience(self, exp: Experience) -> None:
        self.avalanche.optimizer = self.optimizer  # a fresh one with optimizer_policy = "reset"
        experience = avalanche_experience(exp, self.context.pipeline, self.stream.task_labels_at_test)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self._seeds[exp.id])
            with quiet():
                self.avalanche.train(experience)
        self.step += len(exp) // self.training.batch_size * self.training.epochs
