"""The strategy plugin API.

A strategy owns its model(s), the optimizer and whatever it keeps between
experiences (buffers, old models, importances). It sees a `StreamInfo` (sizes
and setting of the stream) and, while training, the current training
`Experience`; never the test stream. The runner calls `fit(experience)` for
each training experience and the evaluator calls `predict(x, task_ids)`.

Lifecycle of a run:

    construction   build_model() -> setup()         (weights drawn from the run's init stream)
    each experience fit(exp):
        trainable modules set to train mode
        begin_experience(exp)
        optimizer built (first experience, or every one with optimizer_policy = "reset";
                         with "keep", parameters added since join it)
        train_experience(exp)       default: `epochs` passes of shuffled batches of
                                    training_data(exp), each a train_step:
            zero_grad -> out = loss(batch) [= objective(draw(batch))] -> out.loss.backward()
            -> [parameter_penalty() given: its gradient added to .grad, its value to out.loss]
            -> [out.reference set: .grad <- project_gradient(.grad, grad of out.reference)]
            -> adjust_gradients(batch, out) -> clip (grad_clip_norm) -> optimizer.step()
            -> after_step(batch, out) -> out.terms logged
        end_experience(exp)         still in train mode; runs before the evaluation
    then the runner checks the trainable state is finite and evaluates
    (eval mode, `torch.inference_mode`, `predict` on `prepare(inputs, train=False)`).

Hooks to override (all optional):

    build_model()              the network to train (default: the configured backbone)
    setup()                    create buffers and other state, after build_model
    trainable_modules()        {name: module} trained, checked for NaN, counted in model_bytes,
                               checkpointed (default {"model": self.model})
    optimizer_parameters()     the named parameters the optimizer updates (default: all trainable ones)
    begin_experience(exp)      before training on an experience
    training_data(exp)         what the experience trains on: the experience (default), other
                               samples (joint's union, iCaRL's experience + exemplars), or None
    train_experience(exp)      how it trains, for a strategy with its own loop (default: train_on
                               the training_data)
    draw(batch)                what a step needs beyond the model: a dict of tensors (the batch,
                               buffer samples); every random draw of the step happens here
    objective(inputs)          the loss of those inputs: a scalar tensor, or a StepOutput with the
                               logits and named loss terms; a pure function of `inputs`, the model
                               and the `member_state` attributes (no random draws, no branching on
                               tensor values), so that it can run stacked (cl/stacking.py)
    loss(batch)                default objective(draw(batch)); a strategy that cannot split its step
                               overrides loss instead (and is then not stackable)
    parameter_penalty()        a penalty on the parameters with its gradient in closed form (EWC's and
                               SI's quadratic pull): (value, {name: gradient}); added to the loss and
                               its gradient without autograd. Tensor operations only, like objective
    project_gradient(grad, reference)  the step's gradient rewritten with the gradient of a second loss
                               the objective returned as `reference` (A-GEM): both {name: tensor}
                               over the optimized parameters; returns the new gradient and terms to
                               log. Tensor operations only (no host synchronisation, no branching
                               on values), so it runs stacked and inside CUDA graphs
    adjust_gradients(batch, out)  read / rewrite .grad between backward and step on the host, each
                               run alone (GEM's quadratic program, SI's bookkeeping)
    after_step(batch, out)     after the optimizer step (fill buffers, SI's path integral)
    end_experience(exp)        after training (snapshot the model, rebalance buffers)
    predict(x, task_ids)       evaluation logits (iCaRL's nearest mean, task inference)

Class attributes: `Params` (a parameter dataclass), `kept` (names of the
attributes that hold what the strategy keeps: they make `memory_bytes()` and
are saved by `state_dict()`), `supported_settings`, `supported_models`,
`joint_training`, `stackable` and `member_state` (see cl/stacking.py), `resumable`;
`incompatibility(params, stream, model)` refuses a stream or model in one line, and
`training_incompatibility(params, stream, training, transforms)` the `[training]` or `[transforms]` settings,
`model_statistics()` adds numbers about the model to the run record. Register the class with
`@register_strategy("name")`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

from cl.errors import UserError
from cl.data import SETTINGS, Experience, Samples, StreamInfo, rows, tensor_bytes
from cl.gradients import grad_or_zeros
from cl.models import module_bytes
from cl.losses import cross_entropy
from cl.params import NoParams
from cl.seeding import RUN_STREAMS, spawn_seeds
from cl.training import (ComputeCount, ExperienceLog, TrainingParams, all_finite, make_optimizer,
                         parameter_groups)
from cl.transforms import InputPipeline, TransformParams


class Batch(NamedTuple):
    x: torch.Tensor  # model inputs: the input pipeline applied (augmented in training)
    y: torch.Tensor  # labels
    t: torch.Tensor  # task id of each sample
    raw: torch.Tensor  # the same samples as stored (uint8 images): what a buffer keeps; prepare(raw) -> x


@dataclasses.dataclass
class StepOutput:
    """What `loss` computed, passed on to `adjust_gradients` and `after_step`."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None  # logits of the stream batch (its len(batch.y) rows)
    terms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # logged as per-experience means
    #: A second loss whose gradient `project_gradient` receives (A-GEM's loss on memory samples); None:
    #: the step's gradient is used as it is.
    reference: torch.Tensor | None = None


@dataclasses.dataclass
class ModelSpec:
    """The configured backbone: its registered name, parameters, and a builder."""

    name: str
    params: Any
    build: Callable[[], nn.Module]

    @property
    def multi_head(self) -> bool:
        return bool(getattr(self.params, "multi_head", False))


@dataclasses.dataclass
class StrategyContext:
    """Everything the runner hands a strategy: no samples of any stream."""

    stream: StreamInfo
    training: TrainingParams
    model: ModelSpec
    pipeline: InputPipeline
    device: torch.device
    seed: int  # the run's seed; weight init and the strategy's draws use independent streams of it


class Strategy:
    """Base class: plain fine-tuning. Subclasses override hooks (see the module doc)."""

    Params: type = NoParams
    #: Attributes holding what the strategy keeps between experiences: tensors, lists or dicts
    #: of tensors, numbers, or objects with state_dict()/load_state_dict() (buffers, modules).
    kept: tuple[str, ...] = ()
    #: False when state_dict() cannot hold everything the strategy keeps (state inside another library's
    #: objects): its runs then write no checkpoints, and `cl run --resume` starts them from the beginning.
    resumable: bool = True
    supported_settings: tuple[str, ...] = SETTINGS
    #: Registered model names the strategy works with; None = any.
    supported_models: tuple[str, ...] | None = None
    #: True for strategies that must see the whole stream before training (joint):
    #: the runner then evaluates only before training and after the last experience.
    joint_training: bool = False
    #: True when each experience's loss sees only that experience's classes (hnet, the prompt pools):
    #: a stream with an experience of one class, whose loss would then be 0, is refused.
    loss_within_experience_classes: bool = False
    #: True when the step is written as draw() + objective() and trains only `self.model` with the
    #: default train_experience (training_data may choose the data): the runs of the strategy that
    #: share every shape (its seeds) then train as one stacked model (cl/stacking.py). Set it only
    #: where that holds.
    stackable: bool = False
    #: Attributes the objective reads that differ between runs, besides the model and the task-IL
    #: mask: modules (a teacher), tensors, or dicts / lists of tensors (importances, anchors). When
    #: runs are stacked they are stacked once per experience, so they must not change during one.
    member_state: tuple[str, ...] = ()

    def __init__(self, params: Any, context: StrategyContext):
        self.params = params
        self.context = context
        self.stream = context.stream
        self.training = context.training
        self.device = context.device
        init_seed, strategy_seed = spawn_seeds(context.seed, 2, RUN_STREAMS)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(strategy_seed)
        self.compute = ComputeCount()
        self.logs = ExperienceLog()
        self.experience: Experience | None = None  # the experience being trained
        self.optimizer: torch.optim.Optimizer | None = None
        self.progress: Any = None  # set by the runner: an object with update(n)
        self.loss_monitor: Any = None  # set by the runner: an object with add(loss) (cl.divergence.LossMonitor)
        self.step = 0  # training steps taken in the current experience (where a failed run stopped)
        self._task_classes: torch.Tensor | None = None  # (tasks, classes) mask for task-IL training
        if self.stream.setting == "task-il" and self.training.task_il_mask:
            self._task_classes = torch.zeros(self.stream.n_tasks, self.stream.n_classes, dtype=torch.bool,
                                             device=self.device)
        # Weights come from their own stream; the global generators are left as they were. The model
        # is built on the CPU (the same weights on every device), then moved and counted before
        # setup(), so what setup() derives from it (copies, importances) is on the device and counted.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(init_seed)
            self.model = self.build_model().to(self.device)
            self.compute.attach(self.model)
            self.setup()
        self._clipped: list[nn.Parameter] = []  # set with the optimizer (_use_optimizer)
        self._optimized: list[tuple[str, nn.Parameter]] = []  # the same, named (for project_gradient)
        self._parameter_groups()  # refuse a bad freeze / lr_scale prefix before anything trains

    @classmethod
    def incompatibility(cls, params: Any, stream: StreamInfo, model: ModelSpec) -> str | None:
        """Why this strategy, with these parameters, cannot run on this stream and model (None when it
        can). Checked for every strategy of an experiment before anything trains; `model.build()` gives a
        copy to inspect."""
        name = getattr(cls, "registered_name", cls.__name__)
        if stream.setting not in cls.supported_settings:
            return (f"strategy {name!r} supports {', '.join(cls.supported_settings)} scenarios, but this one is "
                    f"{stream.setting}; choose another scenario or strategy")
        if cls.supported_models is not None and model.name not in cls.supported_models:
            return (f"strategy {name!r} works with models {', '.join(cls.supported_models)}, not {model.name!r}; "
                    f"change [model] name")
        if cls.loss_within_experience_classes and stream.fewest_classes < 2:
            return (f"strategy {name!r} restricts each experience's loss to the experience's own classes, and an "
                    f"experience of this stream has only one class, so it would learn nothing; use at least 2 "
                    f"classes per experience (scenario n_experiences)")
        return None

    @classmethod
    def training_incompatibility(cls, params: Any, stream: StreamInfo, training: TrainingParams,
                                 transforms: TransformParams) -> str | None:
        """Why this strategy cannot train with the experiment's `[training]` and `[transforms]` (None when it
        can), checked with `incompatibility`. Default: it can (the base class applies them all)."""
        return None

    @classmethod
    def stored_samples(cls, params: Any, stream: StreamInfo) -> int:
        """How many samples the strategy keeps at most; the runner's memory check counts them, each at the
        size of its input as stored, before anything is allocated (cl/footprint.py). Default: none."""
        return 0

    @classmethod
    def models_description(cls) -> str:
        """The models the strategy works with, as `cl list strategies` prints them."""
        return "any" if cls.supported_models is None else ", ".join(cls.supported_models)

    # ----- what the strategy trains ------------------------------------------------
    def build_model(self) -> nn.Module:
        """The network to train; default: the experiment's backbone (`[model]`)."""
        return self.context.model.build()

    def setup(self) -> None:
        """Create buffers and other state (called once, after build_model)."""

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of the trainable modules; those of "model" keep their own names, others get "<name>."."""
        for key, module in self.trainable_modules().items():
            prefix = "" if key == "model" else f"{key}."
            for name, p in module.named_parameters():
                yield prefix + name, p

    def optimizer_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The named parameters the optimizer updates (default: every trainable parameter). A strategy
        that updates some trainable parameters with an optimizer of its own (hnet's task embeddings)
        leaves them out here."""
        return self.named_trainable_parameters()

    def train(self, mode: bool = True) -> None:
        for module in self.trainable_modules().values():
            module.train(mode)

    # ----- the training loop ------------------------------------------------------
    def fit(self, exp: Experience) -> None:
        self.begin_fit(exp)
        self._prepare_optimizer()
        self.train_experience(exp)
        self.end_fit(exp)

    def begin_fit(self, exp: Experience) -> None:
        """What fit() does before the optimizer is prepared (the stacked engine calls it too)."""
        self.experience = exp
        self.step = 0
        if self._task_classes is not None:
            self._task_classes[exp.task_id, exp.classes] = True
        self.train()
        self.begin_experience(exp)

    def end_fit(self, exp: Experience) -> None:
        """What fit() does after training on the experience."""
        self.end_experience(exp)
        self.logs.end_experience(exp.id)

    def _parameter_groups(self) -> list[dict[str, Any]]:
        try:
            return parameter_groups(list(self.optimizer_parameters()), self.training)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    def _prepare_optimizer(self) -> None:
        """Trainable modules on the device and counted, and an optimizer over their parameters: a new
        one at the first experience and, with optimizer_policy = "reset", at every experience; with
        "keep", parameters added since (a new head in begin_experience) join the existing optimizer."""
        for module in self.trainable_modules().values():
            module.to(self.device)
            self.compute.attach(module)
        groups = self._parameter_groups()
        if self.optimizer is None or self.training.optimizer_policy == "reset":
            self._use_optimizer(make_optimizer(groups, self.training))
            return
        known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        for group in groups:
            new = [p for p in group["params"] if id(p) not in known]
            if new:
                self.optimizer.add_param_group({**group, "params": new})
        self._use_optimizer(self.optimizer)

    def _use_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._clipped = [p for g in optimizer.param_groups for p in g["params"]]  # for grad_clip_norm
        ids = {id(p) for p in self._clipped}
        self._optimized = [(name, p) for name, p in self.optimizer_parameters() if id(p) in ids]

    def train_experience(self, exp: Experience) -> None:
        data = self.training_data(exp)
        if data is not None:
            self.train_on(data)

    def training_data(self, exp: Experience) -> Experience | Samples | None:
        """What this experience trains on (None: nothing); the stacked engine asks each run the same."""
        return exp

    def train_on(self, data: Experience | Samples) -> None:
        """`epochs` passes of shuffled mini-batches over `data` (an experience or materialised samples)."""
        for _ in range(self.training.epochs):
            for batch in self.batches(data):
                self.train_step(batch)
                if self.progress is not None:
                    self.progress.update(1)

    def batches(self, data: Experience | Samples) -> Iterator[Batch]:
        """Shuffled mini-batches of `data`, gathered a chunk of batches at a time (see `_chunk_samples`).

        A gather, a sample transform or a decode of 10 samples costs mostly its fixed price (a few
        microseconds of dispatch on the CPU, a kernel launch on a GPU): each chunk's inputs, labels and task
        ids are gathered once and sliced into batches, so that price is paid once per chunk. A pipeline
        without random augmentation is applied to the whole chunk too; one with it is applied batch by
        batch, so its draws come from the generator in the same order as before. Either way the batches
        hold the same values as a batch-by-batch gather."""
        order = torch.randperm(len(data), generator=self.generator, device=self.device)
        size = self.training.batch_size
        pipeline = self.context.pipeline
        chunk = _chunk_samples(data, pipeline.output_shape, size)
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            raw, y, t = data.inputs(idx), rows(data.y, idx), data.task_ids(idx)
            x = None if pipeline.params.augments else self.prepare(raw)
            for a in range(0, len(idx), size):
                b = a + size
                yield Batch(self.prepare(raw[a:b]) if x is None else x[a:b], y[a:b], t[a:b], raw[a:b])

    def steps_per_experience(self, exp: Experience) -> int:
        """Number of train_step calls `fit(exp)` makes (for progress bars)."""
        return self.steps_for(len(exp))

    def steps_for(self, n_samples: int) -> int:
        """Number of train_step calls `train_on` makes for `n_samples` samples."""
        return self.training.epochs * -(-n_samples // self.training.batch_size)

    def train_step(self, batch: Batch) -> StepOutput:
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = self.loss(batch)
        if isinstance(out, torch.Tensor):
            out = StepOutput(out)
        out.loss.backward(retain_graph=out.reference is not None)  # the reference may share the graph
        self._add_parameter_penalty(out)
        if self.loss_monitor is not None:
            self.loss_monitor.add(out.loss.detach())
        if out.reference is not None:
            self._project_gradients(out)
        self.adjust_gradients(batch, out)
        if self.training.grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(self._clipped, self.training.grad_clip_norm)
        self.optimizer.step()
        self.after_step(batch, out)
        for name, value in out.terms.items():
            self.log(name, value)
        return out

    def _add_parameter_penalty(self, out: StepOutput) -> None:
        """parameter_penalty()'s gradient added to the parameters' .grad, its value to out.loss and logged as
        out.terms["penalty"]."""
        with torch.no_grad():
            penalty = self.parameter_penalty()
        if penalty is None:
            return
        value, grad = penalty
        for name, p in self.model.named_parameters():
            if name in grad:
                p.grad = grad[name] if p.grad is None else p.grad.add_(grad[name])
        out.loss = out.loss.detach() + value
        out.terms["penalty"] = value

    def _project_gradients(self, out: StepOutput) -> None:
        """Each optimized parameter's .grad <- project_gradient(.grad, gradient of out.reference); its terms
        join out.terms. A gradient that is None counts as zeros."""
        named = self._optimized
        params = [p for _, p in named]
        reference = torch.autograd.grad(out.reference, params, allow_unused=True)
        grad, terms = self.project_gradient(
            {name: grad_or_zeros(p.grad, p) for name, p in named},
            {name: grad_or_zeros(r, p) for (name, p), r in zip(named, reference)})
        for name, p in named:
            p.grad = grad[name]
        out.terms.update(terms)

    def prepare(self, raw: torch.Tensor, train: bool = True) -> torch.Tensor:
        """Stored inputs (a batch's `raw`, buffer samples) -> model inputs, augmented when `train`."""
        return self.context.pipeline(raw, train, self.generator)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Training logits of `self.model`. In task-IL scenarios (with `training.task_il_mask`, the
        default) the logits of classes outside each sample's task are set to the dtype's minimum."""
        return self.mask_to_task(self.model(x, t), t)

    def mask_to_task(self, logits: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Task-IL training mask (see `forward`) applied to logits computed some other way
        (e.g. through `torch.func.functional_call`); other settings: the logits unchanged."""
        if self._task_classes is None or t is None:
            return logits
        return logits.masked_fill(~self._task_classes[t], torch.finfo(logits.dtype).min)

    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a named scalar; the run stores its mean over each experience."""
        self.logs.add(name, value)

    # ----- hooks ------------------------------------------------------------
    def begin_experience(self, exp: Experience) -> None:
        pass

    def loss(self, batch: Batch) -> torch.Tensor | StepOutput:
        return self.objective(self.draw(batch))

    def draw(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The step's inputs: the batch, and whatever the step samples (buffer draws, prepared)."""
        return {"x": batch.x, "y": batch.y, "t": batch.t}

    def objective(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | StepOutput:
        """The loss of one step's inputs (see the module doc for what it may read)."""
        logits = self.forward(inputs["x"], inputs["t"])
        return StepOutput(cross_entropy(logits, inputs["y"]), logits=logits)

    def parameter_penalty(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """A penalty on the model's parameters whose gradient is known in closed form: (its value, its
        gradient by parameter name), or None. The step adds the value to the objective's loss (and logs
        it as "penalty") and the gradient to what backward() computed, as if the objective had returned
        loss + value, but without autograd: for EWC's quadratic pull on every parameter, autograd's
        graph cost 5-8x the closed form's one pass (12 ms against 1.5-2.3 ms per step for 9 stacked
        MLP 784-256-256-10 runs on 2 cores). Runs under torch.no_grad; tensor operations only (it runs
        stacked and in CUDA graphs, like objective)."""
        return None

    def project_gradient(self, grad: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The step's gradient given the gradient of `StepOutput.reference` (both by parameter name): the
        gradient to step with and terms to log. Called only when the objective set a reference."""
        return grad, {}

    def adjust_gradients(self, batch: Batch, out: StepOutput) -> None:
        pass

    def after_step(self, batch: Batch, out: StepOutput) -> None:
        pass

    def end_experience(self, exp: Experience) -> None:
        pass

    def predict(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        return self.model(x, task_ids)

    # ----- evaluation, budgets and checks ------------------------------------------
    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Eval mode and evaluation compute counting inside the block; training mode restored after."""
        modes = {name: m.training for name, m in self.trainable_modules().items()}
        self.train(False)
        try:
            with self.compute.evaluation():
                yield
        finally:
            for name, m in self.trainable_modules().items():
                m.train(modes[name])

    def all_finite(self) -> bool:
        """Every trainable parameter and float buffer is finite (one device synchronisation)."""
        return all_finite(list(self.trainable_modules().values()))

    def model_bytes(self) -> int:
        return module_bytes(*self.trainable_modules().values())

    def memory_bytes(self) -> int:
        """Bytes of what the strategy keeps beyond its trainable modules (the `kept` attributes)."""
        return sum(_bytes_of(getattr(self, name)) for name in self.kept)

    def model_statistics(self) -> dict[str, float]:
        """Numbers that describe the strategy's model, kept in the run record (`model_stats`) and shown
        by `cl show` and the leaderboard: e.g. hnet's parameter counts and compression ratio."""
        return {}

    # ----- state ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit (torch.save it). Module tensors are copies (in a
        stacked run they are views of the stack, which torch.save would write whole); the rest, like
        PyTorch's state dicts, holds references."""
        return {"modules": {name: {k: v.clone() for k, v in m.state_dict().items()}
                            for name, m in self.trainable_modules().items()},
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "compute": self.compute.state_dict(),
                "logs": self.logs.state_dict(), "task_classes": self._task_classes,
                "kept": {name: _pack(getattr(self, name)) for name in self.kept}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in self.trainable_modules().items():
            module.load_state_dict(state["modules"][name])
        if state["optimizer"] is not None:
            self._use_optimizer(make_optimizer(self._parameter_groups(), self.training))
            self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.compute.load_state_dict(state["compute"])
        self.logs.load_state_dict(state["logs"])
        if state["task_classes"] is not None:
            self._task_classes = state["task_classes"].to(self.device)
        for name in self.kept:
            current, saved = getattr(self, name), state["kept"][name]
            if isinstance(saved, dict) and _STATE in saved:
                if not hasattr(current, "load_state_dict"):
                    raise ValueError(f"kept attribute {name!r} was saved from an object with a state_dict, but is "
                                     f"{type(current).__name__} now; create it in setup()")
                current.load_state_dict(_to_device(saved[_STATE], self.device))  # checkpoints load on the CPU
            else:
                setattr(self, name, _to_device(saved, self.device))


#: Bytes of stored and decoded inputs `Strategy.batches` gathers at once: a few hundred batches of
#: small images, one or two of large ones.
CHUNK_BYTES = 16 * 2**20


def _chunk_samples(data: Experience | Samples, decoded_shape: tuple[int, ...], batch_size: int) -> int:
    """Samples per chunk of `Strategy.batches`: whole batches within `CHUNK_BYTES` (at least one)."""
    per_sample = tensor_bytes(data.x[:1]) + 4 * math.prod(decoded_shape)
    return batch_size * max(1, CHUNK_BYTES // (per_sample * batch_size))


_STATE = "__state_dict__"


def _pack(value: Any) -> Any:
    """A kept attribute as checkpoint data: objects with state_dict() become their state."""
    if hasattr(value, "state_dict"):
        return {_STATE: value.state_dict()}
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors, and lists, tuples and dicts of them, moved to `device` (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _bytes_of(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return tensor_bytes(value)
    if isinstance(value, nn.Module):
        return module_bytes(value)
    if hasattr(value, "memory_bytes"):
        return value.memory_bytes()
    if isinstance(value, (list, tuple)):
        return sum(_bytes_of(v) for v in value)
    if isinstance(value, dict):
        return sum(_bytes_of(v) for v in value.values())
    return 0
