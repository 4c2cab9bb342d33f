"""Prompt-based continual learning on a frozen pretrained vision transformer: L2P and DualPrompt.

Both keep the backbone frozen (bit-identical through training) and learn small prompts, keys and a
linear head. The query q(x) is the frozen backbone's class-token feature without prompts.

L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022):

    K_x    = the top_k keys k_i of the pool by cos(q(x), k_i), per sample
             (with `diversify`, in training: by the smallest (1 - cos) * h_i, h_i the share of
             earlier experiences' selections that went to prompt i)
    tokens = [cls, P_i for i in K_x, patches]  -> frozen blocks -> norm
    logits = head(mean of the outputs at the prompt positions)
    loss   = CE(logits over the experience's classes) - key_lambda * mean_{i in K_x} cos(q(x), k_i)

DualPrompt (Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual
Learning", ECCV 2022), prompts as attention prefixes (prefix-tuning):

    block l in g_layers: keys and values of its attention get the G-prompt's prefix (shared by all tasks)
    block l in e_layers: ... get the prefix of E-prompt e, one E-prompt (and key k_e) per experience;
                         e = the experience being trained, and at test e = argmax_e cos(q(x), k_e)
                         over the experiences learned so far
    logits = head(class-token output)
    loss   = CE(logits over the experience's classes) - key_lambda * mean cos(q(x), k_e)
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from cl.data import StreamInfo
from cl.models import module_bytes
from cl.params import param
from cl.registry import register_strategy
from cl.strategy import Batch, ModelSpec, StepOutput, Strategy


def cosine(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(N, D) queries x (M, D) keys -> (N, M) cosine similarities."""
    return F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T


def prefixed_block(block: nn.Module, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """A timm transformer block (eval mode) whose attention keys and values are prefixed:
    K = [prefix[:, 0]; x W_k], V = [prefix[:, 1]; x W_v], with prefix of shape (N, 2, L, width)."""
    attn = block.attn
    h = block.norm1(x)
    n, tokens, _ = h.shape
    q, k, v = attn.qkv(h).reshape(n, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    pk, pv = (prefix[:, i].reshape(n, -1, attn.num_heads, attn.head_dim).transpose(1, 2) for i in (0, 1))
    out = F.scaled_dot_product_attention(q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2))
    x = x + block.ls1(attn.proj(attn.norm(out.transpose(1, 2).reshape(n, tokens, -1))))
    return x + block.ls2(block.mlp(block.norm2(x)))


class PromptStrategy(Strategy):
    """What L2P and DualPrompt share: the frozen backbone, the query, and the masked cross-entropy.
    Subclasses build `self.pool` (every learned prompt and key) in `build_pool`."""

    supported_models = ("vit",)
    loss_within_experience_classes = True  # the papers' masking

    def setup(self) -> None:
        for p in self.model.features.parameters():
            p.requires_grad_(False)
        self.pool = self.build_pool(self.model.features.embed_dim).to(self.device)

    def build_pool(self, width: int) -> nn.Module:
        raise NotImplementedError

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "pool": self.pool}  # the backbone's parameters do not require grad

    def model_bytes(self) -> int:
        return module_bytes(self.model)  # the frozen backbone and the head

    def memory_bytes(self) -> int:
        return module_bytes(self.pool) + super().memory_bytes()  # prompts and keys, instead of a buffer

    def train(self, mode: bool = True) -> None:
        super().train(mode)
        self.model.features.eval()  # frozen: no dropout, and the query is the same in training and evaluation

    def query(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.features(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the class token and position embeddings, before the blocks."""
        vit = self.model.features
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    def classify(self, features: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """The head on prompted features: the end of the prompted pass (counted with `compute.add`), not a
        pass of its own."""
        with self.compute.uncounted():
            return self.model.head(features, task_ids)

    def restrict_to_experience(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of classes outside the current experience set to the dtype's minimum (the papers' masking)."""
        mask = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        mask[self.experience.classes] = True
        return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)


# ---------------------------------------------------------------------------- L2P


@dataclasses.dataclass
class L2PParams:
    pool_size: int = param(10, "prompts in the pool (M)", low=1)
    prompt_length: int = param(5, "tokens per prompt (L_p)", low=1)
    top_k: int = param(5, "prompts selected per sample (N)", low=1)
    key_lambda: float = param(0.1, "weight of the surrogate loss pulling selected keys towards their queries",
                               low=0)
    diversify: bool = param(False, "in training, select by (1 - cos) times each prompt's share of the earlier "
                                   "experiences' selections, so new experiences favour rarely used prompts")

    def validate(self) -> None:
        if self.top_k > self.pool_size:
            raise ValueError(f"top_k ({self.top_k}) must be <= pool_size ({self.pool_size})")


class PromptPool(nn.Module):
    """`pool_size` prompts of `length` tokens with one key each (uniform initialisation, as the authors' code)."""

    def __init__(self, pool_size: int, length: int, width: int):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(pool_size, length, width).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(pool_size, width).uniform_(-1, 1))

    def select(self, query: torch.Tensor, top_k: int,
               frequency: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, the indices (N, top_k) of the keys most cosine-similar to its query, and those
        similarities. With `frequency` (M shares summing to 1): the smallest (1 - cos) * frequency."""
        similarity = cosine(query, self.keys)  # (N, pool)
        score = similarity if frequency is None else -(1 - similarity) * frequency
        index = score.topk(top_k, dim=1).indices
        return index, similarity.gather(1, index)


@register_strategy("l2p")
class L2P(PromptStrategy):
    """Learning to Prompt (Wang et al. 2022): a key-matched prompt pool on a frozen vision transformer."""

    Params = L2PParams
    kept = ("selections",)

    def setup(self) -> None:
        super().setup()
        self.selections = torch.zeros(self.params.pool_size, dtype=torch.long, device=self.device)
        self.frequency: torch.Tensor | None = None  # used by `diversify`, set per experience

    def build_pool(self, width: int) -> nn.Module:
        return PromptPool(self.params.pool_size, self.params.prompt_length, width)

    def begin_experience(self, exp) -> None:
        total = int(self.selections.sum())  # one synchronisation per experience
        self.frequency = self.selections / total if self.params.diversify and total else None

    def prompted_features(self, x: torch.Tensor,
                          frequency: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean output at the prompt positions (N, width), the selected prompts (N, top_k) and their keys'
        cosine similarities to the queries (N, top_k)."""
        vit = self.model.features
        index, similarity = self.pool.select(self.query(x), self.params.top_k, frequency)
        prompts = self.pool.prompts[index].flatten(1, 2)  # (N, top_k * length, width)
        tokens = self.embed(x)
        tokens = torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], dim=1)
        out = vit.norm(vit.blocks(tokens))
        self.compute.add(x.shape[0])  # the blocks are called directly, below what counts passes by itself
        return out[:, 1: 1 + prompts.shape[1]].mean(1), index, similarity

    def loss(self, batch: Batch) -> StepOutput:
        features, index, similarity = self.prompted_features(batch.x, self.frequency)
        self.selections += torch.bincount(index.flatten(), minlength=self.params.pool_size)
        logits = self.restrict_to_experience(self.classify(features, batch.t))
        ce = F.cross_entropy(logits, batch.y)
        pull = similarity.sum(1).mean()  # Eq. 5: summed over the selected keys, averaged over the batch
        return StepOutput(ce - self.params.key_lambda * pull, logits=logits, terms={"ce": ce, "key_similarity": pull})

    def predict(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        features, _, _ = self.prompted_features(x)
        return self.classify(features, task_ids)

    def model_statistics(self) -> dict[str, float]:
        return {"prompts_used": float((self.selections > 0).sum())}  # selected at least once in training


# ---------------------------------------------------------------------------- DualPrompt


@dataclasses.dataclass
class DualPromptParams:
    g_length: int = param(5, "G-prompt length: prefix tokens for the keys and as many for the values", low=0)
    g_layers: list[int] = param([0, 1], "blocks (0-based) whose attention gets the G-prompt (paper: 0, 1)", low=0)
    e_length: int = param(5, "E-prompt length: prefix tokens for the keys and as many for the values", low=0)
    e_layers: list[int] = param([2, 3], "blocks (0-based) whose attention gets the E-prompt (paper, ViT-B: 2, 3, 4)",
                                low=0)
    key_lambda: float = param(1.0, "weight of the loss pulling the experience's key towards its queries", low=0)

    def validate(self) -> None:
        layers = self.g_layers + self.e_layers
        if len(set(layers)) != len(layers):
            raise ValueError(f"g_layers and e_layers must be distinct block indices, got "
                             f"{self.g_layers} and {self.e_layers}")


class DualPromptPool(nn.Module):
    """The G-prompt (g_layers, 2, g_length, width), one E-prompt (e_layers, 2, e_length, width) and one key
    per experience; index 0 of the second dimension prefixes the attention keys, index 1 the values."""

    def __init__(self, p: DualPromptParams, n_experiences: int, width: int):
        super().__init__()
        self.general = nn.Parameter(torch.empty(len(p.g_layers), 2, p.g_length, width).uniform_(-1, 1))
        self.expert = nn.Parameter(torch.empty(n_experiences, len(p.e_layers), 2, p.e_length, width).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(n_experiences, width).uniform_(-1, 1))


@register_strategy("dualprompt")
class DualPrompt(PromptStrategy):
    """DualPrompt (Wang et al. 2022): a shared G-prompt and per-experience E-prompts, as attention prefixes."""

    Params = DualPromptParams

    @classmethod
    def incompatibility(cls, params: DualPromptParams, stream: StreamInfo, model: ModelSpec) -> str | None:
        reason = super().incompatibility(params, stream, model)
        if reason is None and max(params.g_layers + params.e_layers, default=-1) >= model.params.depth:
            return (f"strategy 'dualprompt': g_layers {params.g_layers} and e_layers {params.e_layers} must name "
                    f"blocks 0..{model.params.depth - 1} of the {model.params.depth}-block vit; change them or "
                    f"[model] depth")
        return reason

    def build_pool(self, width: int) -> nn.Module:
        return DualPromptPool(self.params, self.stream.n_experiences, width)

    def features(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Class-token output with the G-prompt and, per sample, E-prompt `expert[i]` as prefixes."""
        vit, p, n = self.model.features, self.params, x.shape[0]
        prefixes = {layer: self.pool.general[i].expand(n, -1, -1, -1) for i, layer in enumerate(p.g_layers)}
        prefixes.update({layer: self.pool.expert[expert, i] for i, layer in enumerate(p.e_layers)})
        tokens = self.embed(x)
        for layer, block in enumerate(vit.blocks):
            tokens = block(tokens) if layer not in prefixes else prefixed_block(block, tokens, prefixes[layer])
        self.compute.add(n)  # the blocks are called directly, below what counts passes by itself
        return vit.forward_head(vit.norm(tokens), pre_logits=True)

    def loss(self, batch: Batch) -> StepOutput:
        expert = torch.full_like(batch.y, self.experience.id)  # in training the experience's own E-prompt
        pull = cosine(self.query(batch.x), self.pool.keys[self.experience.id: self.experience.id + 1]).mean()
        logits = self.restrict_to_experience(self.classify(self.features(batch.x, expert), batch.t))
        ce = F.cross_entropy(logits, batch.y)
        return StepOutput(ce - self.params.key_lambda * pull, logits=logits, terms={"ce": ce, "key_similarity": pull})

    def predict(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        # The keys of the experiences trained so far (before any training: the first, as it was drawn).
        learned = self.pool.keys[: 1 if self.experience is None else self.experience.id + 1]
        expert = cosine(self.query(x), learned).argmax(dim=1)
        return self.classify(self.features(x, expert), task_ids)
