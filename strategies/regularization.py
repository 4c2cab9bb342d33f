"""Regularisation strategies: online EWC and Synaptic Intelligence.

Online EWC (Kirkpatrick et al. 2017; online form: Schwarz et al. 2018):

    loss = CE(B) + ewc_lambda / 2 * sum_i F_i (theta_i - theta*_i)^2      (the penalty's gradient in closed form)
    end of experience: F <- gamma * F + mean over its samples of (d log p(y|x) / d theta)^2
                       theta* <- theta

SI (Zenke et al. 2017):

    loss = CE(B) + c * sum_i Omega_i (theta_i - theta*_i)^2
    after every optimizer step: omega_i += -g_i * delta_i   (g: the gradient of CE alone, delta: the step)
    end of experience: Omega_i += omega_i / ((theta_i - theta*_i)^2 + xi);  omega <- 0;  theta* <- theta
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.func import functional_call

from cl.data import Experience
from cl.gradients import grouped_gradients, linear_squared_gradient_sums
from cl.losses import cross_entropy
from cl.params import param
from cl.registry import register_strategy
from cl.training import requires_grad
from cl.strategy import Batch, StepOutput, Strategy

Tensors = dict[str, torch.Tensor]


def quadratic_penalty(params: dict[str, torch.Tensor], weight: Tensors, anchor: Tensors, strength: float | torch.Tensor
                      ) -> tuple[torch.Tensor, Tensors]:
    """strength * sum_i weight_i (theta_i - anchor_i)^2 over the parameters, and its gradient
    2 * strength * weight_i (theta_i - anchor_i), by name."""
    value, grad = 0, {}
    for name, p in params.items():
        shift = p.detach() - anchor[name]  # theta - theta*
        pull = weight[name] * shift
        value = value + shift.mul_(pull).sum()  # (in place: these are one step's temporaries, and large)
        grad[name] = pull.mul_(2 * strength)
    return strength * value, grad


class AnchoredStrategy(Strategy):
    """Fine-tuning plus a quadratic pull towards the parameters at the end of the last experience.

    Subclasses set `self.weight` (per-parameter importance) and give `strength()`, the factor on
    sum weight (theta - anchor)^2 in the loss. The pull is the step's `parameter_penalty`: its gradient
    is added in closed form, not through autograd.
    """

    stackable = True
    member_state = ("weight", "anchor")

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if requires_grad(p)}

    def setup(self) -> None:
        self.anchor = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.weight = {name: torch.zeros_like(p) for name, p in self.model.named_parameters()}
        self.anchored = False  # no pull before the first experience has ended

    def parameter_penalty(self) -> tuple[torch.Tensor, Tensors] | None:
        if not self.anchored:
            return None
        return quadratic_penalty(self.trained_parameters(), self.weight, self.anchor, self.strength())

    def set_anchor(self) -> None:
        for name, p in self.model.named_parameters():
            self.anchor[name].copy_(p.detach())
        self.anchored = True


# ---------------------------------------------------------------- online EWC


@dataclasses.dataclass
class EWCParams:
    ewc_lambda: float = param(100.0, "penalty strength lambda: the loss adds lambda/2 * sum F (theta - theta*)^2",
                               low=0)
    gamma: float = param(1.0, "decay of the accumulated Fisher information at each new experience (1 = no decay)",
                          low=0, high=1)
    fisher_batch_size: int = param(64, "samples per vectorised per-sample-gradient pass when computing the Fisher "
                                       "(models not made of linear layers alone)",
                                   low=1)


@register_strategy("ewc")
class EWC(AnchoredStrategy):
    """Online EWC: a Fisher-weighted pull towards the parameters of the previous experiences."""

    Params = EWCParams
    kept = ("anchor", "weight", "anchored")  # theta*, the accumulated diagonal Fisher

    def strength(self) -> float:
        return self.params.ewc_lambda / 2

    def end_experience(self, exp: Experience) -> None:
        fisher = self.fisher(exp)
        for name in self.weight:
            self.weight[name].mul_(self.params.gamma).add_(fisher[name])
        self.set_anchor()

    def fisher(self, exp: Experience) -> Tensors:
        """Diagonal empirical Fisher: the mean over the experience's samples of the squared gradient of
        log p(y | x), with the model in eval mode. Exact either way: for models made of linear layers
        from each layer's inputs and output gradients (`linear_squared_gradient_sums`), else from
        per-sample gradients (vmapped)."""
        params = {name: p.detach() for name, p in self.model.named_parameters()}

        def log_likelihood(params: Tensors, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            logits = self.mask_to_task(functional_call(self.model, params, (x, t)), t)
            return -cross_entropy(logits, y)

        def per_sample_gradients(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> Tensors:
            rows = grouped_gradients(log_likelihood, params, x.unsqueeze(1), y.unsqueeze(1), t.unsqueeze(1))
            sums, offset = {}, 0
            for name, p in params.items():
                sums[name] = (rows[:, offset: offset + p.numel()] ** 2).sum(0).view_as(p)
                offset += p.numel()
            return sums

        def linear_sums(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> Tensors | None:
            return linear_squared_gradient_sums(self.model, lambda: cross_entropy(self.forward(x, t), y,
                                                                                  reduction="none"))

        def summed(sums_of: Callable[..., Tensors | None], chunk: int) -> Tensors | None:
            total = {name: torch.zeros_like(p) for name, p in params.items()}
            for index in torch.arange(len(exp), device=self.device).split(chunk):
                sums = sums_of(self.prepare(exp.inputs(index), train=False), exp.y[index], exp.task_ids(index))
                if sums is None:
                    return None
                for name in total:
                    total[name] += sums[name]
            return total

        with self.evaluation(), self.compute.uncounted():
            # The linear way holds only activations: it takes evaluation-sized chunks (on the quickstart's
            # MLP, 512-sample chunks made a stacked EWC run 1.2 s faster than 64). Per-sample gradients
            # hold a row of every parameter per sample: fisher_batch_size of them at a time.
            total = summed(linear_sums, self.training.eval_batch_size) \
                or summed(per_sample_gradients, self.params.fisher_batch_size)
        self.compute.add(len(exp), backward=True)
        return {name: value / len(exp) for name, value in total.items()}


# ---------------------------------------------------------------- SI


@dataclasses.dataclass
class SIParams:
    c: float = param(0.5, "penalty strength: the loss adds c * sum Omega (theta - theta*)^2", low=0)
    xi: float = param(1.0, "damping added to the squared total change when normalising the path integral", above=0)


@register_strategy("si")
class SI(AnchoredStrategy):
    """Synaptic Intelligence: importance from each parameter's contribution to the loss decrease."""

    Params = SIParams
    kept = ("anchor", "weight", "path", "anchored")  # theta*, Omega, omega of the experience under way

    def setup(self) -> None:
        super().setup()
        self.path = {name: torch.zeros_like(p) for name, p in self.model.named_parameters()}

    def strength(self) -> float:
        return self.params.c

    def adjust_gradients(self, batch: Batch, out: StepOutput) -> None:
        # The path integral uses the gradient of the task loss alone: take the penalty's gradient
        # 2c Omega (theta - theta*) back out of what backward() computed.
        self._before, self._task_grad = {}, {}
        for name, p in self.trained_parameters().items():
            if p.grad is None:
                continue
            g = p.grad.detach().clone()  # a copy: gradient clipping later scales .grad in place
            if self.anchored:
                g -= 2 * self.params.c * self.weight[name] * (p.detach() - self.anchor[name])
            self._task_grad[name], self._before[name] = g, p.detach().clone()

    def after_step(self, batch: Batch, out: StepOutput) -> None:
        params = self.trained_parameters()
        for name, before in self._before.items():
            self.path[name] -= self._task_grad[name] * (params[name].detach() - before)

    def end_experience(self, exp: Experience) -> None:
        for name, p in self.model.named_parameters():
            change = p.detach() - self.anchor[name]
            self.weight[name] += self.path[name] / (change ** 2 + self.params.xi)
            self.path[name].zero_()
        self.set_anchor()
