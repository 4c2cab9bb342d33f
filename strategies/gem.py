"""Gradient Episodic Memory (Lopez-Paz & Ranzato 2017) and Averaged GEM (Chaudhry et al. 2019).

Both keep an episodic memory M_k of the latest `memory_per_task` samples of each
task k (a ring buffer per task, filled while the task streams by, as in the
paper's code) and let an update through only if it does not increase the loss
on the memories of earlier tasks.

GEM, each step on a stream batch B of task t:

    g   <- grad loss(B)
    g_k <- grad loss(M_k) for every earlier task k          (one vmapped pass, rows of G)
    if some g.g_k < 0:
        v <- argmin_{v >= margin} 1/2 v'(GG' + ridge I)v + (Gg)'v   (the dual QP, exact)
        g <- g + G'v
    optimizer step with g;  M_t <- the batch (ring buffer)

A-GEM replaces the per-task constraints with one on the average:

    g_ref <- grad loss(sample_size samples drawn from the memories of earlier tasks)
    if g.g_ref < 0:  g <- g - (g.g_ref / g_ref.g_ref) g_ref

In task-IL streams each memory loss masks the logits to its task's classes.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch.func import functional_call

from cl.buffers import Buffer, RingPerTask
from cl.data import Experience, StreamInfo
from cl.gradients import batch_statistics_only, flat_grad, grouped_gradients, set_flat_grad
from cl.losses import cross_entropy
from cl.params import param
from cl.projection import agem_project, gem_project, quadprog_available
from cl.registry import register_strategy
from cl.strategy import Batch, StepOutput, Strategy


@dataclasses.dataclass
class MemoryParams:
    memory_per_task: int = param(256, "samples kept per task: the latest ones of each task (a ring buffer)",
                                 low=1)


class EpisodicMemory(Strategy):
    """Fine-tuning plus a per-task ring-buffer memory of stored samples (shared by GEM and A-GEM)."""

    kept = ("memory",)

    @classmethod
    def stored_samples(cls, params: MemoryParams, stream: StreamInfo) -> int:
        return params.memory_per_task * stream.n_tasks

    def setup(self) -> None:
        per_task = self.params.memory_per_task
        policy = RingPerTask(per_task, self.stream.n_tasks)
        self.memory = Buffer(per_task * self.stream.n_tasks, policy, self.device, self.generator)

    def begin_experience(self, exp: Experience) -> None:
        # Parameters the optimizer updates (training.freeze has been applied by now).
        self.constrained = {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def past_tasks(self) -> list[int]:
        """Tasks with samples in memory, other than the one being trained."""
        return sorted(k for k, n in self.memory.policy.count.items() if n > 0 and k != self.experience.task_id)

    def after_step(self, batch: Batch, out: StepOutput) -> None:
        self.memory.add(task=self.experience.task_id, x=batch.raw, y=batch.y, t=batch.t)


@dataclasses.dataclass
class GEMParams(MemoryParams):
    memory_strength: float = param(0.5, "margin: lower bound on the dual variables (the paper's 0.5; 0 = the "
                                        "exact projection)", low=0)
    ridge: float = param(1e-3, "added to the dual's diagonal for numerical safety (the paper's code: 1e-3)", low=0)
    solver: Literal["auto", "quadprog", "active_set"] = param(
        "auto", "dual QP solver: quadprog (optional package), active_set (our own, exact), auto = quadprog if installed")

    def validate(self) -> None:
        if self.solver == "quadprog" and not quadprog_available():
            raise ValueError("solver 'quadprog' needs the quadprog package: pip install quadprog "
                             "(or the cl-bench[gem] extra), or set solver = \"active_set\"")


@register_strategy("gem")
class GEM(EpisodicMemory):
    """GEM: each step's gradient projected so that no earlier task's memory loss increases."""

    Params = GEMParams

    def begin_experience(self, exp: Experience) -> None:
        super().begin_experience(exp)
        self._batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self._past: tuple[torch.Tensor, ...] | None = None  # earlier tasks' memories, grouped by task
        self._past_inputs: torch.Tensor | None = None  # the same, prepared once when nothing is augmented

    def memory_by_task(self) -> tuple[torch.Tensor, ...] | None:
        """(raw x, y, t, weight) of the earlier tasks' memories, each shaped (tasks, memory_per_task, ...).

        A task's slots are contiguous in the ring buffer, so this is a view and one gather; slots a
        task has not filled (fewer samples than memory_per_task) get weight 0. Earlier tasks' memories
        do not change while a task trains, so this is built once per experience.
        """
        if self._past is None:
            past = self.past_tasks()
            if not past:
                return None
            m, fields = self.params.memory_per_task, self.memory.fields
            tasks = torch.tensor(past, device=self.device)
            grouped = [fields[name][: len(fields[name]) - 1].view(-1, m, *fields[name].shape[1:])[tasks]
                       for name in ("x", "y", "t")]
            filled = torch.tensor([min(self.memory.policy.count[k], m) for k in past], device=self.device)
            weight = (torch.arange(m, device=self.device) < filled[:, None]).float()
            self._past = (*grouped, weight)
            if not self.context.pipeline.params.augments:
                self._past_inputs = self.prepare_grouped(grouped[0])
        return self._past

    def prepare_grouped(self, x: torch.Tensor) -> torch.Tensor:
        return self.prepare(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    def memory_gradients(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One gradient row per earlier task, from one vectorised forward and backward over all memories."""
        def task_loss(params: dict[str, torch.Tensor], x, y, t, w) -> torch.Tensor:
            logits = self.mask_to_task(functional_call(self.model, params, (x, t)), t)
            return (cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()

        params = {name: p.detach() for name, p in self.constrained.items()}
        with batch_statistics_only(self.model):
            if self._batch_norm and not bool(w.all()):
                # Batch norm would count a task's empty slots in its batch statistics (the weight removes
                # them from the loss only): each task not filled gets its gradient from its samples alone.
                filled = w.sum(dim=1).long().tolist()
                G = torch.cat([grouped_gradients(task_loss, params, x[k:k + 1, :n], y[k:k + 1, :n],
                                                 t[k:k + 1, :n], w[k:k + 1, :n]) for k, n in enumerate(filled)])
            else:
                G = grouped_gradients(task_loss, params, x, y, t, w)
        self.compute.add(int(w.sum()) if self._batch_norm else x.shape[0] * x.shape[1], backward=True)
        return G

    def adjust_gradients(self, batch: Batch, out: StepOutput) -> None:
        past = self.memory_by_task()
        if past is None:
            return
        x, y, t, w = past
        inputs = self._past_inputs if self._past_inputs is not None else self.prepare_grouped(x)
        G = self.memory_gradients(inputs, y, t, w)
        params = list(self.constrained.values())
        g = flat_grad(params)
        p = self.params
        projected = gem_project(g, G, p.memory_strength, p.ridge, p.solver)
        if projected is not g:
            set_flat_grad(params, projected)
        self.log("projected", float(projected is not g))


@dataclasses.dataclass
class AGEMParams(MemoryParams):
    sample_size: int = param(256, "memory samples (from all earlier tasks) behind each step's reference gradient",
                             low=1)


@register_strategy("agem")
class AGEM(EpisodicMemory):
    """A-GEM: the gradient projected when it conflicts with the average gradient of a memory sample."""

    Params = AGEMParams
    stackable = True

    def begin_experience(self, exp: Experience) -> None:
        super().begin_experience(exp)
        past = self.past_tasks()
        self._past_slots = (torch.cat([self.memory.policy.task_slots(k, self.device) for k in past])
                            if past else None)
        # The earlier tasks' memories do not change while this task trains: gathered once, and their
        # inputs prepared once when the pipeline does not augment (a draw then only indexes them).
        self._past: dict[str, torch.Tensor] | None = None
        self._past_prepared = not self.context.pipeline.params.augments
        if self._past_slots is not None:
            self._past = self.memory.get(self._past_slots)
            if self._past_prepared:
                self._past["x"] = self.prepare(self._past["x"])

    def draw(self, batch: Batch) -> dict[str, torch.Tensor]:
        inputs = super().draw(batch)
        if self._past is not None:  # sample_size memories of earlier tasks, without replacement
            pick = torch.randperm(len(self._past_slots), generator=self.generator,
                                  device=self.device)[: self.params.sample_size]
            x, y, t = (self._past[name].index_select(0, pick) for name in ("x", "y", "t"))
            inputs.update(memory_x=x if self._past_prepared else self.prepare(x), memory_y=y, memory_t=t)
        return inputs

    def objective(self, inputs: dict[str, torch.Tensor]) -> StepOutput:
        out = super().objective(inputs)
        if "memory_x" in inputs:  # the loss behind g_ref
            logits = self.forward(inputs["memory_x"], inputs["memory_t"])
            out.reference = cross_entropy(logits, inputs["memory_y"])
        return out

    def project_gradient(self, grad: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """if g.g_ref < 0:  g <- g - (g.g_ref / g_ref.g_ref) g_ref"""
        projected, conflict = agem_project(grad, reference)
        return projected, {"projected": conflict}
