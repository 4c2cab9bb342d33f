"""Prompt pools on a frozen pretrained vision transformer: L2P.

L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022):

    q(x)   = the frozen backbone's class-token feature, without prompts        (the query)
    K_x    = the top_k keys k_i of the pool by cos(q(x), k_i), per sample
    tokens = [cls, P_i for i in K_x, patches]  -> frozen blocks -> norm
    logits = head(mean of the outputs at the prompt positions)
    loss   = CE(logits over the experience's classes) - key_lambda * mean_{i in K_x} cos(q(x), k_i)

Only the prompts, the keys and the head train; the backbone stays bit-identical.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from cl.models import module_bytes
from cl.params import param
from cl.registry import register_strategy
from cl.strategy import Batch, StepOutput, Strategy


@dataclasses.dataclass
class L2PParams:
    pool_size: int = param(10, "prompts in the pool (M)")
    prompt_length: int = param(5, "tokens per prompt (L_p)")
    top_k: int = param(5, "prompts selected per sample (N)")
    key_lambda: float = param(0.1, "weight of the surrogate loss pulling selected keys towards their queries")

    def validate(self) -> None:
        if min(self.pool_size, self.prompt_length, self.top_k) < 1 or self.top_k > self.pool_size:
            raise ValueError(f"need pool_size, prompt_length >= 1 and 1 <= top_k <= pool_size, got "
                             f"{self.pool_size}, {self.prompt_length}, {self.top_k}")


class PromptPool(nn.Module):
    """`pool_size` prompts of `length` tokens with one key each (uniform initialisation, as the authors' code)."""

    def __init__(self, pool_size: int, length: int, width: int):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(pool_size, length, width).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(pool_size, width).uniform_(-1, 1))

    def select(self, query: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, the indices (N, top_k) of the keys most cosine-similar to its query, and those similarities."""
        similarity = F.normalize(query, dim=1) @ F.normalize(self.keys, dim=1).T  # (N, pool)
        chosen = similarity.topk(top_k, dim=1)
        return chosen.indices, chosen.values


@register_strategy("l2p")
class L2P(Strategy):
    """Learning to Prompt (Wang et al. 2022): a key-matched prompt pool on a frozen vision transformer."""

    Params = L2PParams
    supported_models = ("vit",)

    def setup(self) -> None:
        vit = self.model.features
        for p in self.model.features.parameters():
            p.requires_grad_(False)
        self.pool = PromptPool(self.params.pool_size, self.params.prompt_length, vit.embed_dim).to(self.device)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "pool": self.pool}  # the backbone's parameters do not require grad

    def model_bytes(self) -> int:
        return module_bytes(self.model)  # the frozen backbone and the head

    def memory_bytes(self) -> int:
        return module_bytes(self.pool)  # prompts and keys: what L2P keeps instead of a buffer

    def train(self, mode: bool = True) -> None:
        super().train(mode)
        self.model.features.eval()  # frozen: no dropout, and the query is the same in training and evaluation

    def query(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.features(x)

    def prompted_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean output at the prompt positions (N, width), and the selected keys' cosine similarities (N, top_k)."""
        vit = self.model.features
        index, similarity = self.pool.select(self.query(x), self.params.top_k)
        prompts = self.pool.prompts[index].flatten(1, 2)  # (N, top_k * length, width)
        tokens = vit._pos_embed(vit.patch_embed(x))
        tokens = torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], dim=1)
        out = vit.norm(vit.blocks(vit.norm_pre(tokens)))
        self.compute.add(x.shape[0])  # the blocks are called directly, below what counts passes by itself
        return out[:, 1: 1 + prompts.shape[1]].mean(1), similarity

    def loss(self, batch: Batch) -> StepOutput:
        features, similarity = self.prompted_features(batch.x)
        logits = self.restrict_to_experience(self.model.head(features, batch.t))
        ce = F.cross_entropy(logits, batch.y)
        pull = similarity.mean()
        return StepOutput(ce - self.params.key_lambda * pull, logits=logits, terms={"ce": ce, "key_similarity": pull})

    def restrict_to_experience(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of classes outside the current experience set to the dtype's minimum (the paper's masking)."""
        mask = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        mask[self.experience.classes] = True
        return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)

    def predict(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        features, _ = self.prompted_features(x)
        return self.model.head(features, task_ids)
