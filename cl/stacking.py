"""Stacked runs: several runs of one strategy trained as one model.

A benchmark is many runs of small models (seeds x strategies x hyperparameters)
trained with small batches, so each step is a few dozen tiny operations and
the time goes into launching them. Runs of one strategy that share every shape
(the same model, parameters and experience sizes; different seeds) can train
together: their parameters are stacked along a leading dimension and the
step's forward and backward run once for all of them, vmapped over the runs
(cl/mapped.py: what `torch.func.vmap` does, with the bindings resolved once).

What stays per run (a "member"): its `Strategy` object with its own scenario,
data order, initialisation, generator, buffers, logs, compute count and
evaluator. Each step of the group:

    for each member:  batch <- its next batch;  inputs <- member.draw(batch)      (own random stream)
    losses <- vmap(objective)(stacked parameters, stacked member_state, stacked inputs)
    sum(losses).backward()                       (each member's gradient lands in its slice)
    [grads += vmap(parameter_penalty)'s gradients; losses += its values           (EWC, SI)]
    [references returned: their gradients from one more backward pass over the stack, and
     grads <- vmap(project_gradient)(grads, reference gradients)          (A-GEM)]
    for each member:  member.adjust_gradients    (its .grad are views of its slice; GEM-style hooks)
    clip each member's gradient norm; one optimizer step on the stacked parameters
    for each member:  member.after_step          (buffer updates, SI's path integral)

Each member's model parameters are views of its slice of the stack, so the
optimizer's in-place update is what the member sees when it is evaluated,
checkpointed or reads its own weights in a hook. SGD and Adam act elementwise,
so one optimizer over the stack is the members' optimizers side by side; its
state is handed back to the members after every experience (checkpoints and
optimizer_policy = "keep" use the members' own optimizers). The results are
the runs trained one by one, up to floating-point reassociation.

Members may differ in hyperparameters that change no shape (a sweep's stacked trials, cl/sweep.py):
in the strategy's float parameters, which the objective then sees as the member's own 0-d tensor
(`self.params.alpha * term` works; Python branching on such a value does not), and in the
training's lr, momentum, weight_decay and grad_clip_norm, in which case each member's own
optimizer steps its slices (views of the stack) instead of one optimizer over the stack.

Two-dimensional weights are stacked in the transposed layout, (runs, in, out)
in memory: the batched matrix product then produces their gradient in the
parameter's own layout and autograd does not copy it (that copy was half of a
stacked step's time on these CPUs).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Iterator

import torch
from torch import nn

from cl.data import Experience
from cl.divergence import Diverged
from cl.errors import first_line
from cl.gradients import grad_or_zeros
from cl.graphs import StepGraphs
from cl.mapped import ModuleSlots, batched, unbatched, vmap_level
from cl.strategy import Batch, StepOutput, Strategy
from cl.training import make_optimizer

#: Training parameters stacked members may differ in (each member then steps its own optimizer).
PER_MEMBER_TRAINING = ("lr", "momentum", "weight_decay", "grad_clip_norm")
#: The key of the members' reference losses (StepOutput.reference) among the stacked objective's results.
REFERENCE = "reference loss"


def stacking_problem(strategy: type[Strategy], model: nn.Module | None = None) -> str | None:
    """Why runs of this strategy class (on this backbone, when given) cannot be stacked (None when they can)."""
    if model is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # Batch norm at batch 10 amplifies rounding: resnet18_reduced on Fashion-MNIST drifted 0.02 in its
        # parameters after 20 steps between one and two threads, as much as stacked against alone (0.02),
        # so a stacked run cannot be checked against its run alone; until a check over seeds says the
        # two agree in distribution, such backbones train alone.
        return "the model has batch-norm layers (their runs are too sensitive to rounding to check stacked)"
    if not strategy.stackable:
        return "it does not declare stackable = True"
    # The engine calls begin_fit, training_data, batches and end_fit itself: an override of what calls
    # them (fit, train_on) or of the step would be skipped.
    for hook in ("loss", "fit", "train_on", "train_experience", "trainable_modules", "train_step"):
        if getattr(strategy, hook) is not getattr(Strategy, hook):
            return f"it overrides {hook}()"
    return None


def graph_problem(strategy: type[Strategy], device: torch.device, model: nn.Module | None = None) -> str | None:
    """Why this strategy's steps (on this backbone, when given) cannot be CUDA-graphed on this device (None
    when they can; cl/graphs.py). Graphed steps run through the stacked engine, so what stops stacking stops
    graphs too."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    problem = stacking_problem(strategy, model)
    if problem is not None:
        return f"its step is not draw + objective ({problem})"
    if strategy.adjust_gradients is not Strategy.adjust_gradients:
        return "it rewrites gradients on the host (adjust_gradients)"
    return None


def stack_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The members' tensors along a new leading dimension; 2-D ones stored transposed (module doc)."""
    if tensors[0].dim() == 2:
        return torch.stack([t.detach().t() for t in tensors]).transpose(1, 2)
    return torch.stack([t.detach() for t in tensors])


def _leafwise(fn: Any, values: list[Any]) -> Any:
    """fn(tensors) at every leaf of the members' state values (a tensor, or a dict / list / tuple of them),
    the tensors being those of every value at that leaf."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return fn(values)
    if isinstance(first, dict):
        return {k: _leafwise(fn, [v[k] for v in values]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_leafwise(fn, list(parts)) for parts in zip(*values))
    raise TypeError(f"member_state holds a {type(first).__name__}; it may hold modules, tensors, or dicts, "
                    f"lists and tuples of tensors")


def member_differences(members: list[Strategy]) -> tuple[list[str], list[str]]:
    """The strategy parameters and the training parameters in which the members differ; a ValueError
    when they differ in anything stacking cannot vary per member (a shape, a branch, a schedule)."""
    def differing(objects: list[Any]) -> list[str]:
        return [f.name for f in dataclasses.fields(objects[0])
                if any(getattr(o, f.name) != getattr(objects[0], f.name) for o in objects[1:])]

    params = differing([m.params for m in members]) if dataclasses.is_dataclass(members[0].params) else []
    for name in params:
        values = [getattr(m.params, name) for m in members]
        if not all(isinstance(v, float) for v in values):
            raise ValueError(f"stacked runs differ in strategy parameter {name!r} ({values}); only float "
                             f"parameters may differ between stacked runs")
    training = differing([m.training for m in members])
    fixed = [name for name in training if name not in PER_MEMBER_TRAINING]
    if fixed:
        raise ValueError(f"stacked runs differ in training.{fixed[0]}; only {', '.join(PER_MEMBER_TRAINING)} "
                         f"may differ between stacked runs")
    return params, training


class StackedRuns:
    """Trains one experience of several member strategies (same class and shapes) at once."""

    def __init__(self, members: list[Strategy], graphs: bool = False):
        problem = stacking_problem(type(members[0]), members[0].model)
        if problem is not None:
            raise ValueError(f"{type(members[0]).__name__} cannot run stacked: {problem}")
        self._adopt(members)
        self.optimizer: torch.optim.Optimizer | None = None
        self.graphs: StepGraphs | None = None
        #: Members whose loss monitor stopped them (divergence), with why; they have left the stack.
        self.stopped: list[tuple[Strategy, Diverged]] = []
        if graphs and self.own_optimizers:
            raise ValueError("stacked runs with different training parameters cannot run with CUDA graphs")
        if graphs:  # one per experience: the parameters are stacked anew at each
            problem = graph_problem(type(self.template), self.template.device, self.template.model)
            if problem is not None:
                raise ValueError(f"{type(self.template).__name__} cannot run with CUDA graphs: {problem}")
            self.graphs = StepGraphs(self._device_step, self._sample_counts,
                                     lambda forward, backward: self.template.compute.add_samples(forward, backward))

    def _adopt(self, members: list[Strategy]) -> None:
        """Train these members (at the start, and again when some have left the stack)."""
        self.members = members
        self.template = members[0]  # its objective runs vmapped with every member's tensors bound
        self.training = self.template.training
        self.varying_params, varying_training = member_differences(members)
        # Each member steps its slices with its own optimizer (clipping is per member either way).
        self.own_optimizers = any(name != "grad_clip_norm" for name in varying_training)

    def _sample_counts(self) -> tuple[int, int]:
        count = self.template.compute
        return count.forward_samples, count.backward_samples

    # ----- one experience ------------------------------------------------------------------
    def fit(self, experiences: list[Experience], progress: Any = None) -> None:
        """What `Strategy.fit` does, for every member on its own experience: each trains on its
        `training_data` (the same length for all, or None for all). A member whose loss monitor stops it
        (divergence) leaves the stack at that step, as its run alone would stop there; the others go on
        (`stopped` lists who left, and why)."""
        experience_of = {id(member): exp for member, exp in zip(self.members, experiences)}
        for member, exp in zip(self.members, experiences):
            member.begin_fit(exp)
        # By member, not by position: members that stop leave the list, and the others keep their own data.
        data_of = {id(member): member.training_data(exp) for member, exp in zip(self.members, experiences)}
        lengths = {None if d is None else len(d) for d in data_of.values()}
        if len(lengths) != 1:
            raise ValueError(f"stacked runs need training data of one length, got {sorted(lengths, key=str)}")
        self._stack()
        try:
            for _ in range(self.training.epochs if lengths != {None} else 0):
                streams = {id(member): iter(member.batches(data_of[id(member)])) for member in self.members}
                while self.members:
                    try:
                        batches = [next(streams[id(member)]) for member in self.members]
                    except StopIteration:  # every stream has the same length
                        break
                    left = len(self.stopped)
                    self.train_step(batches)
                    if len(self.stopped) > left:
                        self._leave([member for member, _ in self.stopped[left:]])
                    if progress is not None:
                        progress.update(1)
        finally:
            if not self.own_optimizers:
                self._hand_back_optimizer()
            if self.graphs is not None:
                self.graphs.release()
        for member in self.members:
            member.end_fit(experience_of[id(member)])

    def _leave(self, stopped: list[Strategy]) -> None:
        """Stack the members that go on anew, each with its optimizer state, without those that stopped."""
        if not self.own_optimizers:
            self._hand_back_optimizer()  # every member's optimizer now holds its slice of the state
        if self.graphs is not None:
            self.graphs.release()  # recorded with the old stack's tensors
        self.members = [member for member in self.members if all(member is not s for s in stopped)]
        if self.members:
            self._adopt(self.members)
            self._stack(carry_optimizers=True)

    def _stack(self, carry_optimizers: bool = False) -> None:
        """Stack the members' parameters and buffers (members' tensors become views of the stack), the
        objective's member state, and an optimizer over the stack with the members' state. At the start
        of an experience each member first prepares its optimizer as when it trains alone; with
        `carry_optimizers` (in the middle of one) their optimizers and state carry on as they are."""
        if not carry_optimizers:
            for member in self.members:  # each run's own optimizer, as when it trains alone (its hooks may read it)
                member._prepare_optimizer()
        models = [m.model for m in self.members]
        for model in models[1:]:
            if [n for n, _ in model.named_parameters()] != [n for n, _ in models[0].named_parameters()]:
                raise ValueError("stacked runs need models with the same parameters")
        self.parameters: dict[str, torch.Tensor] = {}
        for name, p0 in models[0].named_parameters():
            member_tensors = [dict(m.named_parameters())[name] for m in models]
            stacked = stack_tensors(member_tensors).requires_grad_(p0.requires_grad)
            for k, p in enumerate(member_tensors):
                p.data = stacked.data[k]
            self.parameters[name] = stacked
        self.buffers: dict[str, torch.Tensor] = {}
        for name, b0 in models[0].named_buffers():
            member_tensors = [dict(m.named_buffers())[name] for m in models]
            stacked = torch.stack(member_tensors)
            for k, b in enumerate(member_tensors):
                b.data = stacked[k]
            self.buffers[name] = stacked
        # What the objective sees in place of the template's own tensors (bound per step, see _objective):
        # the model's parameters and buffers and those of modules in member_state (slots), other
        # member_state values (stacked leaf by leaf) and the members' differing float parameters.
        template = self.template
        self._slots = ModuleSlots()
        self._slots.add(template.model, [*self.parameters, *self.buffers])
        self._slot_tensors = [*self.parameters.values(), *self.buffers.values()]
        self.state: dict[str, Any] = {}
        names = list(template.member_state)
        if template._task_classes is not None:
            names.append("_task_classes")
        for name in names:
            values = [getattr(m, name) for m in self.members]
            if isinstance(values[0], nn.Module):
                tensors = [dict([*v.named_parameters(), *v.named_buffers()]) for v in values]
                self._slots.add(values[0], list(tensors[0]))
                self._slot_tensors += [stack_tensors([t[key] for t in tensors]) for key in tensors[0]]
            else:  # leaf by leaf, in the parameters' layout: elementwise work with them reads both in order
                self.state[name] = _leafwise(stack_tensors, values)
        self._varying_values = {name: torch.tensor([getattr(m.params, name) for m in self.members],
                                                   device=template.device) for name in self.varying_params}
        by_id = {id(p): name for name, p in self.template.model.named_parameters()}
        self._optimized_names = [by_id[id(p)] for g in self.template._parameter_groups() for p in g["params"]]
        self._clipped = [self.parameters[name] for name in self._optimized_names]
        clip = [m.training.grad_clip_norm for m in self.members]
        self._clip_norms = torch.tensor([c if c > 0 else float("inf") for c in clip], device=self.template.device) \
            if any(c > 0 for c in clip) else None
        if not self.own_optimizers:  # else each member's optimizer steps its parameters, views of its slices
            self._build_optimizer(carry_optimizers)
        self._adjusts = type(self.template).adjust_gradients is not Strategy.adjust_gradients
        self._penalized = type(self.template).parameter_penalty is not Strategy.parameter_penalty  # (bound per step)
        # Kept per-run data that member_state does not list: hidden from the template while it stands for
        # every member, so an objective that reads it fails instead of giving every run the first run's.
        self._hidden = [name for name in template.kept
                        if name not in template.member_state and _per_run(getattr(template, name, None))]

    def _build_optimizer(self, carry_state: bool = False) -> None:
        """One optimizer over the stack: the template's parameter groups, each member parameter replaced
        by its stack; with optimizer_policy = "keep" or `carry_state`, the members' optimizer state
        stacked into it."""
        template = self.template
        by_id = {id(p): name for name, p in template.model.named_parameters()}
        groups = template._parameter_groups()
        stacked_groups = [{**g, "params": [self.parameters[by_id[id(p)]] for p in g["params"]]} for g in groups]
        self.optimizer = make_optimizer(stacked_groups, self.training, capturable=self.graphs is not None)
        if self.training.optimizer_policy != "keep" and not carry_state:
            return
        member_params = zip(*[_optimized(m.optimizer) for m in self.members])
        for stacked, params in zip(_optimized(self.optimizer), member_params):
            states = [m.optimizer.state.get(p) for m, p in zip(self.members, params)]
            if not all(states):
                continue
            self.optimizer.state[stacked] = {
                key: torch.stack([s[key] for s in states]) if _per_parameter(value, params[0]) else _copy(value)
                for key, value in states[0].items()}

    def _hand_back_optimizer(self) -> None:
        """Give each member an optimizer over its own parameters holding its slice of the stack's state."""
        stacked_params = _optimized(self.optimizer)
        for k, member in enumerate(self.members):
            member._use_optimizer(make_optimizer(member._parameter_groups(), self.training))
            for stacked, p in zip(stacked_params, _optimized(member.optimizer)):
                state = self.optimizer.state.get(stacked)
                if state:
                    member.optimizer.state[p] = {
                        key: value[k].clone() if _per_parameter(value, stacked[0]) else _copy(value)
                        for key, value in state.items()}

    # ----- one step ------------------------------------------------------------------------
    def train_step(self, batches: list[Batch]) -> list[StepOutput]:
        members = self.members
        for stacked in self.parameters.values():
            stacked.grad = None
        drawn = []
        for member, batch in zip(members, batches):
            member.step += 1
            drawn.append(member.draw(batch))
        keys = list(drawn[0])
        if any(list(d) != keys for d in drawn[1:]):
            raise ValueError(f"{type(self.template).__name__}.draw() returned different keys for stacked runs; "
                             f"its branches must depend only on what all runs share (e.g. buffer fill)")
        inputs = {key: torch.stack([d[key] for d in drawn]) for key in keys}
        if self._adjusts:  # hooks between backward and the optimizer step: not one device step
            outs = self._outputs(self._counted(self._forward_backward, inputs))
            self._adjust_gradients(batches, outs)  # each member counts its own passes
            self._update()
        else:
            outs = self._outputs(self._counted(self.graphs or self._device_step, inputs))
        going_on = []
        for member, batch, out in zip(members, batches, outs):
            try:
                if member.loss_monitor is not None:
                    member.loss_monitor.add(out.loss.detach())
            except Diverged as exc:  # alone, the run would stop here, before its after_step
                self.stopped.append((member, exc))
            else:
                going_on.append((member, batch, out))
        for member, batch, out in going_on:
            member.after_step(batch, out)
            for name, value in out.terms.items():
                member.log(name, value)
        return outs

    def _counted(self, step: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """step(inputs), the passes it counted on the template counted for every other member too."""
        count = self.template.compute
        forward, backward = count.forward_samples, count.backward_samples
        result = step(inputs)
        for member in self.members[1:]:  # every member made the same passes as the template
            member.compute.add_samples(count.forward_samples - forward, count.backward_samples - backward)
        return result

    def _forward_backward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The vmapped objective of every member and the backward pass of their summed losses."""
        count = self.template.compute
        count.count_vmapped = True
        try:
            result = self._objective(inputs)
        finally:
            count.count_vmapped = False
        reference = result.pop(REFERENCE, None)
        result["loss"].sum().backward(retain_graph=reference is not None)
        penalty = self._parameter_penalty() if self._penalized else None
        if penalty is not None:
            result["loss"] = result["loss"].detach() + penalty
            result["penalty"] = penalty
        if reference is not None:
            result.update(self._project_gradients(reference))
        return {name: value.detach() for name, value in result.items()}

    def _update(self) -> None:
        if self._clip_norms is not None:
            self._clip_gradients()
        if not self.own_optimizers:
            self.optimizer.step()
            return
        self._lend_gradients()
        for member in self.members:
            member.optimizer.step()
        self._take_back_gradients()

    def _device_step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything of a step that runs on the device alone: what a CUDA graph records (cl/graphs.py)."""
        result = self._forward_backward(inputs)
        self._update()
        return result

    def _outputs(self, result: dict[str, torch.Tensor]) -> list[StepOutput]:
        """Each member's StepOutput: its slice of the stacked loss, logits and terms."""
        terms = {name: value for name, value in result.items() if name not in ("loss", "logits")}
        logits = result.get("logits")
        return [StepOutput(result["loss"][k], logits=None if logits is None else logits[k],
                           terms={name: value[k] for name, value in terms.items()})
                for k in range(len(self.members))]

    @contextlib.contextmanager
    def _members_bound(self, method: str) -> Iterator[int]:
        """A vmap level over the members (yielded) inside which the template's `method` (named in errors)
        reads every member's own tensors: its model's parameters and buffers, member_state and differing
        float parameters."""
        template, size = self.template, len(self.members)
        with vmap_level(size) as level, self._slots.bound([batched(t, level) for t in self._slot_tensors]):
            saved = {name: getattr(template, name) for name in self.state}
            if self.varying_params:  # the members' own float parameters, as 0-d tensors
                saved["params"] = template.params
                template.params = _with_values(template.params, {
                    name: batched(value, level) for name, value in self._varying_values.items()})
            hidden = {name: template.__dict__.pop(name) for name in self._hidden if name in template.__dict__}
            try:
                for name, value in self.state.items():
                    setattr(template, name, _leafwise(lambda t: batched(t[0], level), [value]))
                yield level
            except RuntimeError as exc:
                first = first_line(exc)
                if "vmap" not in first:
                    raise
                raise RuntimeError(f"{type(template).__name__}.{method} broke a rule of stacked runs: {first[:300]}; "
                                   f"draw random numbers in draw() and do not branch on tensor values (README: "
                                   f"\"Stacked runs: draw and objective\"), or train unstacked: --no-stack") from None
            except AttributeError as exc:
                if exc.name not in hidden:
                    raise
                strategy = type(template).__name__
                raise ValueError(f"{strategy}.{method} reads self.{exc.name}, which member_state does not list: "
                                 f"stacked runs would all read the first run's; add {exc.name!r} to "
                                 f"{strategy}.member_state (or train unstacked: --no-stack)") from None
            finally:
                template.__dict__.update(hidden)
                for name, value in saved.items():
                    setattr(template, name, value)

    def _objective(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every member's objective at once (the template's, run with the members bound); its loss, terms,
        logits and reference with the members along dimension 0."""
        template, size = self.template, len(self.members)
        with self._members_bound("objective") as level:
            out = template.objective({key: batched(value, level) for key, value in inputs.items()})
            if isinstance(out, torch.Tensor):
                out = StepOutput(out)
            result = {"loss": out.loss, **out.terms}
            if out.logits is not None:
                result["logits"] = out.logits
            if out.reference is not None:
                result[REFERENCE] = out.reference
            return {name: unbatched(torch.as_tensor(value, device=template.device), level, size)
                    for name, value in result.items()}

    def _parameter_penalty(self) -> torch.Tensor | None:
        """Every member's parameter_penalty at once (vmapped): its gradient added to the stack's .grad; returns
        its values, members along dimension 0 (None: the strategy has none)."""
        size = len(self.members)
        with self._members_bound("parameter_penalty") as level, torch.no_grad():
            penalty = self.template.parameter_penalty()
            if penalty is None:
                return None
            value, grad = penalty
            for name, g in grad.items():
                p, g = self.parameters[name], unbatched(g, level, size)
                p.grad = g if p.grad is None else p.grad.add_(g)
            return unbatched(torch.as_tensor(value, device=self.template.device), level, size)

    def _project_gradients(self, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every member's project_gradient at once: the gradients of the members' reference losses
        (`reference`, one per member) from one backward pass over the stack, then the template's
        project_gradient vmapped over the members' gradients. Returns its terms, members along dim 0."""
        stacked = [self.parameters[name] for name in self._optimized_names]
        references = torch.autograd.grad(reference.sum(), stacked, allow_unused=True)
        size = len(self.members)
        with self._members_bound("project_gradient") as level:
            grad, terms = self.template.project_gradient(
                {name: batched(grad_or_zeros(p.grad, p), level) for name, p in zip(self._optimized_names, stacked)},
                {name: batched(grad_or_zeros(r, p), level)
                 for name, p, r in zip(self._optimized_names, stacked, references)})
            for name, p in zip(self._optimized_names, stacked):
                p.grad = unbatched(grad[name], level, size)
            return {name: unbatched(value, level, size) for name, value in terms.items()}

    def _adjust_gradients(self, batches: list[Batch], outs: list[StepOutput]) -> None:
        """Each member's adjust_gradients, its parameters' .grad being views of its slice of the stack's."""
        self._lend_gradients()
        for member, batch, out in zip(self.members, batches, outs):
            member.adjust_gradients(batch, out)
        self._take_back_gradients()

    def _lend_gradients(self) -> None:
        """Set each member parameter's .grad to its slice of the stack's gradient (views)."""
        models = [m.model for m in self.members]
        for name, stacked in self.parameters.items():
            if stacked.grad is None:
                continue
            for k, model in enumerate(models):
                model.get_parameter(name).grad = stacked.grad[k]

    def _take_back_gradients(self) -> None:
        """Undo `_lend_gradients`, first copying back any .grad a member replaced."""
        models = [m.model for m in self.members]
        for name, stacked in self.parameters.items():  # a hook may have replaced a .grad: copy it back
            if stacked.grad is None:
                continue
            for k, model in enumerate(models):
                p = model.get_parameter(name)
                if p.grad is not None and p.grad.data_ptr() != stacked.grad[k].data_ptr():
                    stacked.grad[k].copy_(p.grad)
                p.grad = None

    def _clip_gradients(self) -> None:
        """clip_grad_norm_ for each member: its global gradient norm over its own slices."""
        grads = [p.grad for p in self._clipped if p.grad is not None]
        if not grads:
            return
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
        scale = (self._clip_norms / (norms + 1e-6)).clamp(max=1.0)  # no clipping: max norm inf
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))


def _per_run(value: Any) -> bool:
    """Whether a kept value is data of its own run: tensors, modules, objects with state (a buffer), or
    containers of them (not plain numbers, flags or lists of ids, which stacked runs share)."""
    if isinstance(value, (torch.Tensor, nn.Module)) or hasattr(value, "state_dict"):
        return True
    if isinstance(value, dict):
        return any(_per_run(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_per_run(v) for v in value)
    return False


def _with_values(params: Any, values: dict[str, Any]) -> Any:
    """A copy of a (possibly frozen) parameter dataclass with some fields replaced."""
    params = copy.copy(params)
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return params


def _optimized(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _per_parameter(value: Any, parameter: torch.Tensor) -> bool:
    """An optimizer state entry shaped like its parameter (momentum, Adam's moments), not a step count."""
    return isinstance(value, torch.Tensor) and value.shape[-parameter.dim():] == parameter.shape \
        and value.dim() >= parameter.dim() and value.dim() > 0
