"""Distillation strategies: LwF, iCaRL, DER and DER++.

LwF (Li & Hoiem 2016), each step on a stream batch B after the first experience:

    loss = CE(B) + alpha * sum over old tasks k of  KD_T(teacher_k(B), model_k(B))
    KD_T(p, q) = -mean_B sum_c softmax(p / T)_c log softmax(q / T)_c   over task k's classes (no T^2)
    end of experience: teacher <- frozen copy of the model

iCaRL (Rebuffi et al. 2017), each experience:

    train on the experience's samples and the exemplars with sigmoid BCE over the classes seen:
        targets: one-hot labels for the new classes, sigmoid(teacher(x)) for the old ones
    teacher <- frozen copy; exemplars: buffer_size // classes seen per class, new classes by herding
    class means <- mean L2-normalised feature of each class's exemplars
    predict: the class whose mean is nearest (or the network's head with classifier = "head")

DER / DER++ (Buzzega et al. 2020), each step:

    loss = CE(B) + alpha * MSE(model(M1.x), M1.logits)  [+ beta * CE(model(M2.x), M2.y) for DER++]
    M1, M2: independent draws of replay_batch_size samples from a reservoir buffer that stores
    inputs, labels and the logits of the training forward pass at insertion
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cl.buffers import Buffer, Herding, Reservoir
from cl.data import Experience, Samples, StreamInfo
from cl.losses import cross_entropy
from cl.params import param
from cl.registry import register_strategy
from cl.strategy import Batch, ModelSpec, StepOutput, Strategy


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with no gradients (a teacher); it stays counted in the compute."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                 classes: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the student's softened distribution against the teacher's, averaged over samples;
    with `classes` (a boolean mask over the columns), both distributions are over those classes only
    (the other softened logits are set to the dtype's minimum, so they get probability 0 and no gradient;
    masked after dividing by the temperature, since the minimum divided by T < 1 is -inf, and 0 * -inf
    is NaN)."""
    student, teacher = student / temperature, teacher / temperature
    if classes is not None:
        lowest = torch.finfo(student.dtype).min
        student, teacher = student.masked_fill(~classes, lowest), teacher.masked_fill(~classes, lowest)
    return -(F.softmax(teacher, dim=1) * F.log_softmax(student, dim=1)).sum(dim=1).mean()


# ---------------------------------------------------------------- LwF


@dataclasses.dataclass
class LwFParams:
    alpha: float = param(1.0, "weight of the distillation term (the paper's lambda_o)", low=0)
    temperature: float = param(2.0, "softening temperature T of the teacher's and the model's outputs", above=0)


@register_strategy("lwf")
class LwF(Strategy):
    """Learning without Forgetting: the old model's softened outputs on new data as extra targets."""

    Params = LwFParams
    kept = ("teacher", "old_task_classes", "finished_tasks")
    stackable = True
    member_state = ("teacher", "old_task_classes")

    def setup(self) -> None:
        self.teacher = frozen_copy(self.model)  # replaced by a copy of the model after each experience
        # old_task_classes[k, c]: class c belongs to finished task k (task-IL distils per task; other
        # settings distil one distribution over all old classes)
        self.old_task_classes = torch.zeros(self.stream.n_tasks, self.stream.n_classes, dtype=torch.bool,
                                            device=self.device)
        self.finished_tasks: list[int] = []  # task ids whose experiences have ended, in order

    def distilled_outputs(self) -> list[tuple[int, torch.Tensor]]:
        """(head, class mask) pairs whose teacher outputs are distilled."""
        old = self.old_task_classes
        if self.stream.setting == "task-il":
            multi = self.context.model.multi_head
            return [(k if multi else 0, old[k]) for k in self.finished_tasks]
        return [(0, old.any(0))] if self.finished_tasks else []

    def objective(self, inputs: dict[str, torch.Tensor]) -> StepOutput:
        x, y, t = inputs["x"], inputs["y"], inputs["t"]
        heads = self.model(x, all_heads=True)  # (N, heads, classes): one pass for CE and distillation
        logits = heads[torch.arange(len(y), device=self.device), t] if heads.shape[1] > 1 else heads[:, 0]
        loss = cross_entropy(self.mask_to_task(logits, t), y)
        outputs = self.distilled_outputs()
        if not outputs:
            return StepOutput(loss, logits=logits)
        with torch.no_grad():
            old_heads = self.teacher(x, all_heads=True)
        kd = sum(distillation(heads[:, h], old_heads[:, h], self.params.temperature, c) for h, c in outputs)
        return StepOutput(loss + self.params.alpha * kd, logits=logits, terms={"distillation": kd})

    def end_experience(self, exp: Experience) -> None:
        self.teacher.load_state_dict(self.model.state_dict())
        self.old_task_classes[exp.task_id, exp.classes] = True
        if exp.task_id not in self.finished_tasks:
            self.finished_tasks.append(exp.task_id)


# ---------------------------------------------------------------- iCaRL


@dataclasses.dataclass
class ICaRLParams:
    buffer_size: int = param(2000, "exemplars kept in total, shared equally among the classes seen", low=1)
    classifier: Literal["nme", "head"] = param(
        "nme", "prediction: nme = nearest mean of exemplars (the paper), head = the network's own output layer")


@register_strategy("icarl")
class ICaRL(Strategy):
    """iCaRL: exemplars chosen by herding, sigmoid distillation, nearest-mean-of-exemplars prediction."""

    Params = ICaRLParams

    @classmethod
    def stored_samples(cls, params: ICaRLParams, stream: StreamInfo) -> int:
        return params.buffer_size
    kept = ("buffer", "teacher", "seen_classes", "class_means")
    supported_settings = ("class-il", "task-il")  # classes that recur would only ever be distilled

    @classmethod
    def incompatibility(cls, params: ICaRLParams, stream: StreamInfo, model: ModelSpec) -> str | None:
        problem = super().incompatibility(params, stream, model)
        if problem is None and stream.classes_recur:
            problem = ("strategy 'icarl' needs each class in one experience only, but classes recur in this "
                       "stream (a blurry one?): a class seen before is only ever distilled, never learned again; "
                       "choose another scenario or strategy")
        if problem is None and params.buffer_size < stream.n_classes:
            problem = (f"strategy 'icarl' keeps buffer_size // classes seen exemplars per class, so buffer_size "
                       f"{params.buffer_size} leaves the last of the {stream.n_classes} classes none; give at least "
                       f"buffer_size = {stream.n_classes}")
        return problem

    def setup(self) -> None:
        self.buffer = Buffer(self.params.buffer_size, Herding(self.exemplar_features), self.device, self.generator)
        self.teacher = frozen_copy(self.model)
        self.seen_classes = torch.zeros(self.stream.n_classes, dtype=torch.bool, device=self.device)  # before now
        self.class_means = torch.zeros(self.stream.n_classes, self.model.feature_dim, device=self.device)

    @torch.no_grad()
    def exemplar_features(self, stored: torch.Tensor) -> torch.Tensor:
        """Features of stored inputs, in eval mode (the herding and the class means use them)."""
        with self.evaluation():
            return torch.cat([self.model.features(self.prepare(part, train=False)) for part in stored.split(512)])

    def begin_experience(self, exp: Experience) -> None:
        self.current_classes = torch.zeros_like(self.seen_classes)
        self.current_classes[exp.classes] = True

    def training_data(self, exp: Experience) -> Samples:
        data = Samples.of(exp)
        if len(self.buffer):
            memory = self.buffer.get(torch.arange(len(self.buffer), device=self.device))
            data = Samples.cat([data, Samples(memory["x"], memory["y"], memory["t"])])
        return data

    def steps_per_experience(self, exp: Experience) -> int:
        return self.steps_for(len(exp) + len(self.buffer))

    def loss(self, batch: Batch) -> StepOutput:
        logits = self.model(batch.x, batch.t)
        target = F.one_hot(batch.y, self.stream.n_classes).float()
        old = self.seen_classes
        if old.any():
            with torch.no_grad():
                target[:, old] = torch.sigmoid(self.teacher(batch.x, batch.t)[:, old])
        seen = old | self.current_classes
        return StepOutput(F.binary_cross_entropy_with_logits(logits[:, seen], target[:, seen]), logits=logits)

    def end_experience(self, exp: Experience) -> None:
        self.teacher.load_state_dict(self.model.state_dict())
        self.seen_classes |= self.current_classes
        self.buffer.update(x=exp.inputs(), y=exp.y, t=exp.t)
        self.update_class_means()

    def update_class_means(self) -> None:
        """Mean L2-normalised feature of each seen class's exemplars, normalised again (the paper's mu_y)."""
        x, y = self.buffer.fields["x"][: len(self.buffer)], self.buffer.fields["y"][: len(self.buffer)]
        features = F.normalize(self.exemplar_features(x), dim=1)
        sums = torch.zeros_like(self.class_means).index_add_(0, y, features)
        counts = torch.bincount(y, minlength=self.stream.n_classes).clamp(min=1).unsqueeze(1)
        self.class_means = F.normalize(sums / counts, dim=1)

    def predict(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        if self.params.classifier == "head":
            return self.model(x, task_ids)
        return nearest_mean_scores(self.model.features(x), self.class_means, self.seen_classes)


def nearest_mean_scores(features: torch.Tensor, class_means: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Minus the distance of each L2-normalised feature to each class mean; classes without exemplars
    get the lowest score, so the argmax is the nearest mean of exemplars."""
    distance = torch.cdist(F.normalize(features, dim=1), class_means)
    return (-distance).masked_fill(~known, torch.finfo(distance.dtype).min)


# ---------------------------------------------------------------- DER, DER++


@dataclasses.dataclass
class DERParams:
    buffer_size: int = param(500, "samples kept in the reservoir buffer, with their logits", low=1)
    replay_batch_size: int = param(10, "buffer samples in each replay draw (drawn without replacement)", low=1)
    alpha: float = param(0.3, "weight of the logit-matching term (mean squared error over logits)", low=0)


@register_strategy("der")
class DER(Strategy):
    """Dark Experience Replay: match the logits the model gave buffer samples when they were stored."""

    Params = DERParams
    kept = ("buffer",)
    stackable = True

    @classmethod
    def stored_samples(cls, params: DERParams, stream: StreamInfo) -> int:
        return params.buffer_size

    def setup(self) -> None:
        self.buffer = Buffer(self.params.buffer_size, Reservoir(), self.device, self.generator)

    def draw(self, batch: Batch) -> dict[str, torch.Tensor]:
        inputs = super().draw(batch)
        if len(self.buffer) > 0:
            memory = self.buffer.sample(self.params.replay_batch_size)
            inputs.update(m1_x=self.prepare(memory["x"]), m1_t=memory["t"], m1_logits=memory["logits"])
        return inputs

    def replay_terms(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(inputs["m1_x"], inputs["m1_t"])
        return {"logit_mse": F.mse_loss(logits, inputs["m1_logits"])}

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.params.alpha * terms["logit_mse"]

    def objective(self, inputs: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.model(inputs["x"], inputs["t"])  # unmasked: the buffer stores these
        loss = cross_entropy(self.mask_to_task(logits, inputs["t"]), inputs["y"])
        if "m1_x" not in inputs:  # the buffer is still empty
            return StepOutput(loss, logits=logits)
        terms = self.replay_terms(inputs)
        return StepOutput(loss + self.weighted(terms), logits=logits, terms=terms)

    def after_step(self, batch: Batch, out: StepOutput) -> None:
        # The logits of this step's forward pass, computed before the optimizer step, as in the paper.
        self.buffer.add(x=batch.raw, y=batch.y, t=batch.t, logits=out.logits.detach())


@dataclasses.dataclass
class DERPPParams(DERParams):
    beta: float = param(0.5, "weight of the cross-entropy on a second, independent buffer draw", low=0)


@register_strategy("der_pp")
class DERPP(DER):
    """DER++: DER plus cross-entropy on the labels of a second, independent buffer draw."""

    Params = DERPPParams

    def draw(self, batch: Batch) -> dict[str, torch.Tensor]:
        inputs = super().draw(batch)
        if "m1_x" in inputs:
            memory = self.buffer.sample(self.params.replay_batch_size)
            inputs.update(m2_x=self.prepare(memory["x"]), m2_y=memory["y"], m2_t=memory["t"])
        return inputs

    def replay_terms(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        terms = super().replay_terms(inputs)
        terms["replay_ce"] = cross_entropy(self.forward(inputs["m2_x"], inputs["m2_t"]), inputs["m2_y"])
        return terms

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.params.alpha * terms["logit_mse"] + self.params.beta * terms["replay_ce"]
