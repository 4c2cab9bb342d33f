"""Training parameters, optimizer construction and the compute count.

`TrainingParams` is the `[training]` table of an experiment. The optimizer is
built from the strategy's trainable parameters after the strategy's own set-up:
frozen parameters (`freeze`) are excluded and stop receiving gradients, and
`lr_scale` gives parameter groups their own learning rate.

`ComputeCount` is the hardware-independent compute budget. Every module the
strategy trains (and every copy of it, such as a teacher made with
`copy.deepcopy`) counts the samples of each forward pass: as forward samples,
and also as backward samples when autograd is recording. Passes made while the
evaluator runs are counted apart as evaluation samples. `ExperienceLog` holds
the named scalars a strategy logs, one mean per experience.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

from cl.params import param


@dataclasses.dataclass
class TrainingParams:
    """How each experience is trained (the `[training]` table of an experiment)."""

    epochs: int = param(1, "passes over each experience", low=1)
    batch_size: int = param(10, "samples per step from the current experience", low=1)
    optimizer: Literal["sgd", "adam"] = param("sgd", "optimizer")
    lr: float = param(0.01, "learning rate", above=0)
    momentum: float = param(0.0, "SGD momentum", low=0, below=1)
    weight_decay: float = param(0.0, "L2 penalty: weight_decay * weights added to each gradient", low=0, below=1)
    optimizer_policy: Literal["reset", "keep"] = param(
        "reset", "reset: a fresh optimizer state at every experience (Mammoth, Avalanche); keep: one for the run")
    grad_clip_norm: float = param(0.0, "clip the global gradient norm to this value before each step; 0 = off",
                                   low=0)
    freeze: list[str] = param([], "parameter-name prefixes that are not trained, e.g. [\"features\"]")
    lr_scale: dict[str, float] = param({}, "learning-rate multiplier per parameter-name prefix, e.g. {head = 10.0}; "
                                           "use freeze to stop training parameters", above=0)
    task_il_mask: bool = param(True, "task-IL scenarios: train each sample's logits over its task's classes "
                                     "only (as the GEM code does); false = over all classes")
    eval_batch_size: int = param(2000, "samples per forward pass during evaluation", low=1)
    cuda_tf32: bool = param(False, "CUDA only: let convolutions and matrix products use TF32 (faster on "
                                   "Ampere and later cards, ~1e-3 relative error); false = full float32, as on CPU")


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_frozen(name: str, training: TrainingParams) -> bool:
    """Whether `training.freeze` keeps the parameter called `name` from training."""
    return any(_matches(name, prefix) for prefix in training.freeze)


def check_prefixes(names: list[str], training: TrainingParams) -> None:
    """Raise ValueError naming a `freeze` or `lr_scale` prefix that matches none of these parameter names."""
    for key, prefixes in (("freeze", training.freeze), ("lr_scale", list(training.lr_scale))):
        for prefix in prefixes:
            if not any(_matches(n, prefix) for n in names):
                tops = sorted({n.split(".")[0] for n in names})
                raise ValueError(f"training.{key}: {prefix!r} matches no parameter; parameter names start "
                                 f"with {', '.join(tops)}")


def parameter_groups(named: list[tuple[str, nn.Parameter]], training: TrainingParams) -> list[dict[str, Any]]:
    """Optimizer parameter groups: frozen parameters left out, `lr_scale` prefixes in groups of their own.

    Raises ValueError naming a `freeze` or `lr_scale` prefix that matches no parameter.
    """
    check_prefixes([n for n, _ in named], training)
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in named:
        if is_frozen(name, training):
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        scaled = [prefix for prefix in training.lr_scale if _matches(name, prefix)]
        groups.setdefault(max(scaled, key=len) if scaled else "", []).append(p)
    if not groups:
        raise ValueError("every parameter is frozen (training.freeze); leave something to train")
    return [{"params": ps, "lr": training.lr * training.lr_scale.get(prefix, 1.0)}
            for prefix, ps in groups.items()]


def make_optimizer(groups: list[dict[str, Any]], training: TrainingParams,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """The `[training]` optimizer; `capturable` for steps recorded in a CUDA graph (Adam keeps its step
    count on the device)."""
    if training.optimizer == "adam":
        return torch.optim.Adam(groups, lr=training.lr, weight_decay=training.weight_decay, capturable=capturable)
    return DirectSGD(groups, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)


class DirectSGD(torch.optim.SGD):
    """`torch.optim.SGD` with a direct step and zero_grad where torch's general path has nothing to do.

    torch.optim wraps every `step` and `zero_grad` in a profiler range, hook dispatch and a grad-mode
    switch, and its CPU update is one `add_` per parameter: about 40 us per training step on these
    CPUs, 5% of an ER step of an MLP 784-100-100-10 at batch 10. When no group uses momentum, weight
    decay, nesterov or maximize and no optimizer hook is registered, the update is p <- p - lr * grad
    for each parameter with a gradient, applied here with one foreach call per group: torch's own
    arithmetic, so the parameters equal torch.optim.SGD's bit for bit (tests/test_strategies.py).
    Anything else (momentum, a hook, a closure) runs torch's SGD step, hooks included.
    """

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is not None or not self._plain():
            torch_step = torch.optim.SGD.step
            if not getattr(torch_step, "hooked", False):  # torch wraps a class's step when it first builds one
                torch_step = torch.optim.Optimizer.profile_hook_step(torch_step)
            return torch_step(self, closure)
        with torch.no_grad():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    torch._foreach_add_(params, [p.grad for p in params], alpha=-group["lr"])
        return None

    step.hooked = True  # type: ignore[attr-defined]  # torch.optim: do not wrap this step in its hook runner

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _plain(self) -> bool:
        """No momentum, weight decay, nesterov or maximize in any group, and no optimizer hook."""
        if self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks \
                or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks:
            return False
        return all(g["momentum"] == 0 and g["weight_decay"] == 0 and not g["nesterov"] and not g["maximize"]
                   and not g["differentiable"] for g in self.param_groups)


class ComputeCount:
    """Hardware-independent compute: samples through forward and backward passes.

    `attach(module)` makes the module and its direct submodules (e.g. a model's
    `features` and `head`) count. A pass counts once, by the batch size of its
    first argument, however deep it then goes; a call whose input is the output of
    the previous counted call (`model.head(model.features(x))`) continues that pass
    and is not counted again. Its samples count as backward samples too when its
    output requires a gradient. Calls inside `torch.func.vmap` see one mapped slice,
    not the batch, and are not counted: count those passes with `add(n)`. The stacked
    engine, whose vmap maps over runs rather than samples, sets `count_vmapped`.
    """

    def __init__(self) -> None:
        self.forward_samples = 0
        self.backward_samples = 0
        self.eval_forward_samples = 0
        self.evaluating = False
        self.count_vmapped = False  # count calls inside vmap by their logical batch (cl/stacking.py)
        self._depth = 0  # 1 while a counted forward call is in progress
        self._last_output: Callable[[], Any] = lambda: None  # weak reference to the last counted output

    def add(self, n: int, backward: bool | None = None) -> None:
        """Count a forward pass of `n` samples; also as backward samples when `backward`
        (default: when autograd is recording)."""
        if self.evaluating:
            self.eval_forward_samples += n
            return
        self.forward_samples += n
        if torch.is_grad_enabled() if backward is None else backward:
            self.backward_samples += n

    def add_samples(self, forward: int, backward: int) -> None:
        """Add training samples counted elsewhere (a replayed CUDA graph repeats a counted step)."""
        self.forward_samples += forward
        self.backward_samples += backward

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Count the passes made inside the block as evaluation samples."""
        self.evaluating = True
        try:
            yield
        finally:
            self.evaluating = False

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Passes made inside the block are not counted (the caller counts them with `add`)."""
        depth, self._depth = self._depth, 1
        try:
            yield
        finally:
            self._depth = depth

    def attach(self, module: nn.Module) -> None:
        """Count every forward pass that enters `module` or one of its direct submodules.

        The modules' classes are swapped for counting subclasses (see `CountedModule`)
        rather than given forward hooks: a hooked call takes PyTorch's slow path, which
        cost 45 us per forward of the quickstart MLP on these machines (about 9% of a
        batch-10 training step); the subclass costs a few.
        """
        for m in {id(m): m for m in [module, *module.children()]}.values():
            if not isinstance(m, CountedModule):
                m.__class__ = _counting_class(type(m))
            m.__dict__["_compute_count"] = self

    def __deepcopy__(self, memo: dict[int, Any]) -> "ComputeCount":
        return self  # copies of counted modules (teachers) count into the same budget

    def state_dict(self) -> dict[str, int]:
        return {"forward_samples": self.forward_samples, "backward_samples": self.backward_samples,
                "eval_forward_samples": self.eval_forward_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.forward_samples = int(state["forward_samples"])
        self.backward_samples = int(state["backward_samples"])
        self.eval_forward_samples = int(state["eval_forward_samples"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ComputeCount) and self.state_dict() == other.state_dict()


class CountedModule:
    """Mixin placed before a module's class: each call adds its batch to the module's `ComputeCount`.

    `copy.deepcopy` keeps the counting class and the count (a teacher copy is
    counted); pickling (`torch.save(module)`) stores the plain class, without the count.
    """

    _uncounted_class: type

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        count = self.__dict__["_compute_count"]
        if count._depth:  # inside a counted call: already counted
            return super().__call__(*args, **kwargs)
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x is count._last_output() \
                or (_is_vmapped(x) and not count.count_vmapped):
            return super().__call__(*args, **kwargs)
        count._depth = 1
        try:
            out = super().__call__(*args, **kwargs)
        finally:
            count._depth = 0
        if isinstance(out, torch.Tensor):
            count._last_output = weakref.ref(out)
        count.add(x.shape[0], backward=isinstance(out, torch.Tensor) and requires_grad(out))
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__dict__, memo))
        return clone

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        state = {k: v for k, v in self.__dict__.items() if k != "_compute_count"}
        return _restore_module, (self._uncounted_class, state)


_COUNTING_CLASSES: dict[type, type] = {}


def _counting_class(cls: type) -> type:
    counted = _COUNTING_CLASSES.get(cls)
    if counted is None:
        counted = _COUNTING_CLASSES[cls] = type(cls.__name__, (CountedModule, cls), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "_uncounted_class": cls})
    return counted


def _is_vmapped(x: torch.Tensor) -> bool:
    """True for a tensor seen inside torch.func.vmap (its first dimension is not the batch)."""
    return bool(torch._C._functorch.is_batchedtensor(x))


def requires_grad(x: torch.Tensor) -> bool:
    """Whether autograd records `x`; inside vmap, that of the stacked tensor it is a slice of."""
    while _is_vmapped(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x.requires_grad


def _restore_module(cls: type, state: dict[str, Any]) -> nn.Module:
    module = cls.__new__(cls)
    module.__setstate__(state)
    return module


class ExperienceLog:
    """Named scalars a strategy logs, reduced to one mean per experience.

    Values may be device tensors: they are summed on the device and copied to
    the host once, when the experience ends.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, int] = {}
        self.means: dict[str, dict[int, float]] = {}  # name -> {experience index: mean}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().reshape(())
        self._sums[name] = self._sums.get(name, 0.0) + value
        self._counts[name] = self._counts.get(name, 0) + 1

    def end_experience(self, index: int) -> None:
        names = list(self._sums)
        sums = [self._sums[n] for n in names]
        tensors = [i for i, v in enumerate(sums) if isinstance(v, torch.Tensor)]
        if tensors:  # one host copy for all tensor-valued logs
            values = torch.stack([sums[i] for i in tensors]).tolist()
            for i, v in zip(tensors, values):
                sums[i] = v
        for name, total in zip(names, sums):
            self.means.setdefault(name, {})[index] = float(total) / self._counts[name]
        self._sums, self._counts = {}, {}

    def as_lists(self, n_experiences: int) -> dict[str, list[float | None]]:
        """{name: [mean during experience 1, ..., T]} (None where nothing was logged)."""
        return {name: [by_exp.get(i) for i in range(n_experiences)] for name, by_exp in self.means.items()}

    def state_dict(self) -> dict[str, dict[int, float]]:
        return {name: dict(by_exp) for name, by_exp in self.means.items()}

    def load_state_dict(self, state: dict[str, dict[int, float]]) -> None:
        self.means = {name: {int(i): float(v) for i, v in by_exp.items()} for name, by_exp in state.items()}


def all_finite(modules: list[nn.Module]) -> bool:
    """Parameters and float buffers (e.g. batch-norm statistics) are all finite: one device sync."""
    tensors = [t for m in modules for t in m.state_dict().values() if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
