"""Task-conditioned hypernetworks, HNET (von Oswald et al., "Continual learning with hypernetworks", ICLR 2020).

A hypernetwork f_h(e, theta_h) generates every weight W of the target network (the configured backbone)
from a learned task embedding e; the target runs on them through `torch.func.functional_call`.

    before training task T:   W*_t <- f_h(e_t, theta_h)  for every earlier task t      (stored targets)
    each step on a batch B:    L_task = CE(target(B; f_h(e_T, theta_h)))
                               [lookahead] dtheta <- the step the optimizer would take on grad L_task
                               L_reg  = beta / (T-1) * sum_{t<T} ||W*_t - f_h(e_t, theta_h + dtheta)||^2
                               theta_h <- optimizer step on grad (L_task + L_reg)
                               e_T     <- Adam step on grad L_task          (the embedding's own optimizer)
    after training task T:     e_T frozen
    prediction:                with a task id, that task's weights; without (class-IL, domain-IL),
                               every learned embedding's weights on each sample, keeping per sample the
                               prediction of lowest entropy (HNET+ENT)

Chunking: the target's weights, flattened, are cut into chunks of `chunk_size`; f_h maps the pair
(task embedding, chunk embedding) to one chunk, so one small network with learned chunk embeddings
(shared by all tasks) produces the whole target, and the hypernetwork can be smaller than its target.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from cl.data import Experience, StreamInfo
from cl.params import param
from cl.registry import register_strategy
from cl.strategy import Batch, ModelSpec, StepOutput, Strategy


@dataclasses.dataclass
class HNETParams:
    hidden: list[int] = param([10, 10], "hidden layer widths of the hypernetwork (the paper's split-MNIST: 10, 10)",
                              low=1)
    embedding_dim: int = param(96, "size of each task embedding", low=1)
    chunk_size: int = param(42000, "target weights generated per chunk; 0 = all at once (unchunked)", low=0)
    chunk_embedding_dim: int = param(96, "size of each chunk embedding (chunked only)", low=1)
    activation: Literal["relu", "elu"] = param("relu", "activation of the hypernetwork's hidden layers")
    beta: float = param(0.01, "weight of the output regulariser: beta/(T-1) * sum of squared distances to the "
                               "stored outputs for earlier tasks", low=0)
    embedding_lr: float = param(1e-3, "learning rate of the task embedding's own Adam optimizer", above=0)
    lookahead: bool = param(False, "regularise the outputs after the step the optimizer is about to take "
                                   "(the paper's look-ahead) instead of at the current parameters")
    task_inference: Literal["entropy", "latest"] = param(
        "entropy", "without task ids: 'entropy' keeps per sample the learned embedding whose prediction has the "
                   "lowest entropy; 'latest' always uses the last embedding trained (no inference)")

    def validate(self) -> None:
        if not self.hidden:
            raise ValueError("hidden must list at least one width")


class HyperNetwork(nn.Module):
    """f_h: (task embedding[, chunk embedding]) -> a chunk of the target's flattened weights.

    Parameters: `task_embeddings` (one per task, each its own Parameter so that finished ones can be
    frozen), `chunk_embeddings` (n_chunks, chunk_embedding_dim) when chunked, and the MLP `layers`.
    Initialisation as in the authors' code: embeddings N(0, 1), layers PyTorch's default.
    """

    def __init__(self, n_outputs: int, n_embeddings: int, p: HNETParams):
        super().__init__()
        self.n_outputs = n_outputs
        chunk = p.chunk_size or n_outputs
        self.n_chunks = -(-n_outputs // chunk)
        self.activation = F.relu if p.activation == "relu" else F.elu
        self.task_embeddings = nn.ParameterList(
            nn.Parameter(torch.randn(p.embedding_dim), requires_grad=False) for _ in range(n_embeddings))
        self.chunk_embeddings = nn.Parameter(torch.randn(self.n_chunks, p.chunk_embedding_dim)) if p.chunk_size else None
        widths = [p.embedding_dim + (p.chunk_embedding_dim if p.chunk_size else 0), *p.hidden, chunk]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def theta(self) -> dict[str, torch.Tensor]:
        """theta_h: every parameter except the task embeddings (what the output regulariser protects)."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("task_embeddings.")}

    def embeddings(self, index: list[int]) -> torch.Tensor:
        """The task embeddings at `index`, stacked: (len(index), embedding_dim)."""
        return torch.stack([self.task_embeddings[i] for i in index])

    def generate(self, embeddings: torch.Tensor, theta: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(E, embedding_dim) task embeddings -> (E, n_outputs) flattened target weights, all chunks of all
        embeddings in one batched pass; `theta` replaces theta_h (the look-ahead's theta_h + dtheta)."""
        theta = self.theta() if theta is None else theta
        h = embeddings
        if self.chunk_embeddings is not None:  # every (task, chunk) pair is one row
            E, chunks = embeddings.shape[0], theta["chunk_embeddings"]
            h = torch.cat([embeddings.unsqueeze(1).expand(E, self.n_chunks, -1),
                           chunks.unsqueeze(0).expand(E, -1, -1)], dim=2)
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            h = F.linear(h, theta[f"layers.{i}.weight"], theta[f"layers.{i}.bias"])
            if i < last:
                h = self.activation(h)
        return h.reshape(embeddings.shape[0], -1)[:, : self.n_outputs]


def candidate_step(optimizer: torch.optim.Optimizer) -> dict[nn.Parameter, torch.Tensor]:
    """The change `optimizer.step()` would make to each of its parameters now, without making it: the step
    is taken, measured, and undone (parameters and optimizer state restored exactly), for any optimizer."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    optimizer.step()
    delta = {p: p.detach() - b for p, b in zip(params, before)}
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    optimizer.load_state_dict(state)
    return delta


@register_strategy("hnet")
class HNET(Strategy):
    """Task-conditioned hypernetwork (von Oswald et al. 2020): generates the target's weights per task."""

    Params = HNETParams
    loss_within_experience_classes = True  # each embedding's outputs are restricted to its classes
    # targets: f_h's outputs for earlier tasks, stored before each task; previous: whose they are;
    # classes: the classes each embedding was trained on (its outputs are restricted to them).
    kept = ("targets", "previous", "classes")

    @classmethod
    def incompatibility(cls, params: HNETParams, stream: StreamInfo, model: ModelSpec) -> str | None:
        problem = super().incompatibility(params, stream, model)
        if problem is None:
            buffers = [name for name, _ in model.build().named_buffers()]
            if buffers:
                problem = (f"strategy 'hnet' generates every weight of its target network, but model "
                           f"{model.name!r} keeps batch-norm running statistics ({buffers[0]}, ...); use a "
                           f"model without them (mlp, cnn)")
        return problem

    @classmethod
    def models_description(cls) -> str:
        return "any without batch-norm running statistics (mlp, cnn)"

    # ----- the model: a hypernetwork and its (weightless) target ---------------------------------
    def setup(self) -> None:
        self.shapes = {name: p.shape for name, p in self.model.named_parameters()}
        self.n_target = sum(math.prod(s) for s in self.shapes.values())
        self.model.to("meta")  # the target's own weights are never used: f_h generates them
        self.n_embeddings = self.stream.n_tasks if self.stream.setting == "task-il" else self.stream.n_experiences
        self.hnet = HyperNetwork(self.n_target, self.n_embeddings, self.params).to(self.device)
        self.targets = torch.zeros(0, self.n_target, device=self.device)
        self.previous: list[int] = []
        self.classes = torch.zeros(self.n_embeddings, self.stream.n_classes, dtype=torch.bool, device=self.device)
        self.embedding_optimizer: torch.optim.Optimizer | None = None

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"hnet": self.hnet}

    def optimizer_parameters(self):
        # The task embeddings have their own optimizer (begin_experience), as in the paper.
        return ((name, p) for name, p in self.named_trainable_parameters() if ".task_embeddings." not in name)

    def model_statistics(self) -> dict[str, float]:
        n_hnet = sum(p.numel() for p in self.hnet.parameters())
        return {"target_parameters": self.n_target, "hypernetwork_parameters": n_hnet,
                "compression_ratio": n_hnet / self.n_target}

    def embedding_of(self, exp: Experience) -> int:
        """One embedding per task in task-IL streams, one per experience otherwise."""
        return exp.task_id if self.stream.setting == "task-il" else exp.id

    def target(self, weights: torch.Tensor, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """The target network's logits on `x` with the flattened `weights`."""
        named, offset = {}, 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            named[name] = weights[offset: offset + n].view(shape)
            offset += n
        return functional_call(self.model, named, (x, t))

    def restrict(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Logits of classes outside `classes` (bool, broadcast against logits) set to the dtype's minimum."""
        return logits.masked_fill(~classes, torch.finfo(logits.dtype).min)

    # ----- training --------------------------------------------------------------------------------
    def begin_experience(self, exp: Experience) -> None:
        self.current = self.embedding_of(exp)
        self.previous = [int(e) for e in self.classes.any(1).nonzero().flatten() if int(e) != self.current]
        with torch.no_grad():
            self.targets = (self.hnet.generate(self.hnet.embeddings(self.previous)) if self.previous
                            else torch.zeros(0, self.n_target, device=self.device))
        self.classes[self.current, exp.classes] = True
        embedding = self.hnet.task_embeddings[self.current]
        embedding.requires_grad_(True)
        self.embedding_optimizer = torch.optim.Adam([embedding], lr=self.params.embedding_lr)

    def loss(self, batch: Batch) -> StepOutput:
        weights = self.hnet.generate(self.hnet.task_embeddings[self.current].unsqueeze(0))[0]
        logits = self.restrict(self.target(weights, batch.x, batch.t), self.classes[self.current])
        return StepOutput(F.cross_entropy(logits, batch.y), logits=logits)

    def adjust_gradients(self, batch: Batch, out: StepOutput) -> None:
        """Adds the output regulariser's gradient to theta_h's (the task loss's is already there)."""
        if not self.previous or self.params.beta == 0:
            return
        theta = self.hnet.theta()
        if self.params.lookahead:
            delta = candidate_step(self.optimizer)
            theta = {name: p + delta[p] if p in delta else p for name, p in theta.items()}
        outputs = self.hnet.generate(self.hnet.embeddings(self.previous), theta)
        regulariser = (outputs - self.targets).pow(2).sum() / len(self.previous)
        (self.params.beta * regulariser).backward()
        self.log("output_distance", regulariser.detach())

    def after_step(self, batch: Batch, out: StepOutput) -> None:
        if self.training.grad_clip_norm > 0:  # the step clipped theta_h's gradient; the embedding's own too
            nn.utils.clip_grad_norm_([self.hnet.task_embeddings[self.current]], self.training.grad_clip_norm)
        self.embedding_optimizer.step()
        self.embedding_optimizer.zero_grad(set_to_none=True)

    def end_experience(self, exp: Experience) -> None:
        self.hnet.task_embeddings[self.current].requires_grad_(False)
        self.embedding_optimizer = None

    # ----- prediction --------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        if task_ids is not None:
            return self.predict_with_task_ids(x, task_ids)
        return self.predict_by_inference(x)

    def predict_with_task_ids(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Each sample through its own task's weights: one pass per task present in the batch."""
        logits = None
        for task in task_ids.unique().tolist():
            rows = task_ids == task
            weights = self.hnet.generate(self.hnet.task_embeddings[task].unsqueeze(0))[0]
            part = self.target(weights, x[rows], task_ids[rows])
            if logits is None:
                logits = part.new_empty(x.shape[0], part.shape[1])
            logits[rows] = part
        return logits

    def predict_by_inference(self, x: torch.Tensor) -> torch.Tensor:
        """HNET+ENT: every learned embedding's weights on every sample, in one vmapped pass; per sample,
        the embedding whose softmax (over its own classes) has the lowest entropy decides.

        Returned scores, per class c: log p_e(c) under each embedding e trained on c, lowered by
        log(classes) + 1 unless e is the sample's chosen embedding, then the maximum over those e. The
        argmax over all classes is the chosen embedding's prediction (its best class scores at least
        -log(classes), every other score less), and the argmax over one task's classes is that task's
        own prediction, so the evaluator's task-IL matrix measures the embeddings as if the task were known.
        """
        learned = self.classes.any(1).nonzero().flatten().tolist()
        index = learned or [0]  # before any training: the untrained first embedding, all classes
        masks = self.classes[learned] if learned else torch.ones_like(self.classes[:1])
        weights = self.hnet.generate(self.hnet.embeddings(index))
        logits = vmap(lambda w: self.target(w, x, None))(weights)  # (embeddings, samples, classes)
        self.compute.add(len(index) * x.shape[0], backward=False)
        log_p = torch.log_softmax(logits.masked_fill(~masks.unsqueeze(1), float("-inf")), dim=2)
        if self.params.task_inference == "entropy":
            choice = torch.special.entr(log_p.exp()).sum(2).argmin(0)  # (samples,)
        else:
            choice = torch.full((x.shape[0],), len(index) - 1, device=x.device)
        others = torch.arange(len(index), device=x.device).unsqueeze(1) != choice  # (embeddings, samples)
        scores = log_p - (math.log(self.stream.n_classes) + 1) * others.unsqueeze(2)
        return scores.amax(0).clamp_min(torch.finfo(scores.dtype).min)
