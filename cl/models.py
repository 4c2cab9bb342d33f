"""Backbones: a feature extractor followed by a single or multi-head classifier.

Every model is a `ContinualModel`: `model(x, task_ids)` returns logits over all
classes of the scenario. With `multi_head = true` each task has its own head
and `task_ids` (one per sample) picks it; a single head ignores `task_ids`.
`model(x, all_heads=True)` returns every head's logits in one pass, shape
(N, heads, classes) (a single head: heads = 1), e.g. for distilling old heads.
`model.multi_head` and `model.feature_dim` describe the configuration, and
`model.features(x)` is the feature extractor alone.
Task-incremental evaluation additionally masks logits to the experience's
classes (see cl/evaluation.py), so both options are valid task-IL baselines.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from cl.checkpoints import load_features
from cl.errors import UserError
from cl.params import param
from cl.registry import register_model


class SingleHead(nn.Linear):
    def forward(self, features: torch.Tensor, task_ids: torch.Tensor | None = None,
                all_heads: bool = False) -> torch.Tensor:
        logits = super().forward(features)
        return logits.unsqueeze(1) if all_heads else logits


class MultiHead(nn.Module):
    """One linear head per task, evaluated for all heads at once and gathered per sample."""

    def __init__(self, in_features: int, n_classes: int, n_heads: int):
        super().__init__()
        self.n_classes, self.n_heads = n_classes, n_heads
        self.weight = nn.Parameter(torch.empty(n_heads * n_classes, in_features))
        self.bias = nn.Parameter(torch.empty(n_heads * n_classes))
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)  # same scale as nn.Linear per head
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor | None = None,
                all_heads: bool = False) -> torch.Tensor:
        logits = F.linear(features, self.weight, self.bias).view(-1, self.n_heads, self.n_classes)
        if all_heads:
            return logits
        if task_ids is None:
            raise RuntimeError("a multi-head model needs task ids; use a task-incremental scenario")
        return logits[torch.arange(features.shape[0], device=features.device), task_ids]


class ContinualModel(nn.Module):
    def __init__(self, features: nn.Module, feature_dim: int, n_classes: int, n_heads: int,
                 multi_head: bool):
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.multi_head = multi_head
        self.head = MultiHead(feature_dim, n_classes, n_heads) if multi_head else SingleHead(feature_dim, n_classes)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None, all_heads: bool = False) -> torch.Tensor:
        return self.head(self.features(x), task_ids, all_heads)


@dataclasses.dataclass
class ModelParams:
    multi_head: bool = param(False, "one output head per task (task-incremental scenarios only)")


@dataclasses.dataclass
class MLPParams(ModelParams):
    hidden: list[int] = param([100, 100], "sizes of the hidden layers", low=1)


@register_model("mlp", params=MLPParams)
def mlp(p: MLPParams, input_shape: tuple[int, ...], n_classes: int, n_heads: int) -> ContinualModel:
    """Fully connected ReLU network on flattened inputs (GEM uses 784-100-100-10)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in p.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return ContinualModel(nn.Sequential(*layers), width, n_classes, n_heads, p.multi_head)


@dataclasses.dataclass
class CNNParams(ModelParams):
    channels: list[int] = param([32, 64], "output channels of the 3x3 conv + 2x2 max-pool blocks", low=1)
    hidden: int = param(256, "width of the fully connected layer before the head", low=1)


@register_model("cnn", params=CNNParams)
def cnn(p: CNNParams, input_shape: tuple[int, ...], n_classes: int, n_heads: int) -> ContinualModel:
    """Small CNN: conv-ReLU-maxpool blocks, then one hidden fully connected layer."""
    if len(input_shape) != 3:
        raise UserError(f"model 'cnn' needs image inputs (C, H, W), got shape {list(input_shape)}; use 'mlp'")
    side = min(input_shape[1:])
    if side < 2 ** len(p.channels):  # each block's 2x2 max-pool halves the image (rounding down)
        raise UserError(f"model 'cnn': {len(p.channels)} blocks halve a {side}-pixel side {len(p.channels)} times, "
                        f"to nothing; give at most {max(side.bit_length() - 1, 0)} channels entries "
                        f"(now {p.channels})")
    layers: list[nn.Module] = []
    c = input_shape[0]
    for out in p.channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = out
    layers.append(nn.Flatten())
    with torch.no_grad():
        flat = nn.Sequential(*layers)(torch.zeros(1, *input_shape)).shape[1]
    layers += [nn.Linear(flat, p.hidden), nn.ReLU()]
    return ContinualModel(nn.Sequential(*layers), p.hidden, n_classes, n_heads, p.multi_head)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@dataclasses.dataclass
class ResNetParams(ModelParams):
    width: int = param(20, "channels of the first stage (20 = GEM/A-GEM's reduced ResNet-18; 64 = full)", low=1)


@register_model("resnet18_reduced", params=ResNetParams)
def resnet18_reduced(p: ResNetParams, input_shape: tuple[int, ...], n_classes: int, n_heads: int) -> ContinualModel:
    """ResNet-18 with `width` base channels (GEM/A-GEM use 20), 3x3 stem, global average pool."""
    if len(input_shape) != 3:
        raise UserError(f"model 'resnet18_reduced' needs image inputs (C, H, W), got {list(input_shape)}")
    nf = p.width
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], nf, 3, 1, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU()]
    in_planes = nf
    for i, stride in enumerate([1, 2, 2, 2]):
        planes = nf * 2**i
        layers += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
        in_planes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return ContinualModel(nn.Sequential(*layers), in_planes, n_classes, n_heads, p.multi_head)


@dataclasses.dataclass
class ViTParams(ModelParams):
    patch_size: int = param(4, "side of the square patches (must divide the input's height and width)", low=1)
    width: int = param(64, "token width (embedding dimension)", low=1)
    depth: int = param(4, "transformer blocks", low=1)
    heads: int = param(4, "attention heads (must divide width)", low=1)
    mlp_ratio: float = param(2.0, "hidden width of each block's MLP, as a multiple of width", above=0)
    checkpoint: str = param("", "backbone weights to start from: a file written by `cl pretrain`, or a timm-format "
                                "ViT state dict (its head is ignored); empty = random initialisation")

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")


@register_model("vit", params=ViTParams)
def vit(p: ViTParams, input_shape: tuple[int, ...], n_classes: int, n_heads: int) -> ContinualModel:
    """Vision transformer (timm's VisionTransformer; class token, no classifier) on `patch_size` patches."""
    from timm.models.vision_transformer import VisionTransformer

    if len(input_shape) != 3:
        raise UserError(f"model 'vit' needs image inputs (C, H, W), got shape {list(input_shape)}; use 'mlp'")
    channels, height, width = input_shape
    if height % p.patch_size or width % p.patch_size:
        raise UserError(f"model 'vit': patch_size {p.patch_size} does not divide the {height}x{width} inputs; "
                        f"choose a divisor, or resize in [transforms]")
    features = VisionTransformer(img_size=(height, width), patch_size=p.patch_size, in_chans=channels,
                                 num_classes=0, embed_dim=p.width, depth=p.depth, num_heads=p.heads,
                                 mlp_ratio=p.mlp_ratio)
    if p.checkpoint:
        load_features(p.checkpoint, features)
    return ContinualModel(features, p.width, n_classes, n_heads, p.multi_head)


def module_bytes(*modules: nn.Module) -> int:
    """Bytes of all parameters and buffers of the modules."""
    return sum(t.numel() * t.element_size() for m in modules for t in list(m.parameters()) + list(m.buffers()))
