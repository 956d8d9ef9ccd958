"""Optimisation recipes: the optimizer, parameter groups and schedules a method declares.

The papers' results depend on these, so a method states its recipe (SimCLR: LARS, lr 0.3 x
B/256, wd 1e-6, 10 warm-up epochs, cosine) and the generic loop builds it here. LARS comes from
timm (a well-kept implementation) instead of being written again.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn


class OptimRecipe(BaseModel):
    """Optimizer + schedules. ``lr`` is per 256 images, scaled by ``lr_scaling`` to the global batch."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["sgd", "lars", "adamw"] = "lars"
    lr: float = Field(0.3, gt=0)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: float = Field(1e-6, ge=0)
    weight_decay_end: float | None = Field(None, ge=0, description="cosine weight-decay schedule end value (DINO)")
    momentum: float = Field(0.9, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = Field(10, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    exclude_norm_bias: bool = Field(True, description="no weight decay (and no LARS adaptation) on norms and biases")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay for ViTs")
    lr_scales: dict[str, float] = Field(default_factory=dict,
                                        description="lr multipliers by parameter-name prefix (a module of the method), e.g. "
                                                    "{predictor: 10}: a faster predictor (Tian et al. 2021, DirectPred)")

    @field_validator("lr_scales")
    @classmethod
    def _positive_scales(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: s for k, s in v.items() if not s > 0}
        if bad:
            raise ValueError(f"lr_scales must be > 0, got {bad}")
        return v

    def base_lr(self, global_batch: int) -> float:
        """Peak learning rate for a global batch size."""
        factor = {"linear": global_batch / 256, "sqrt": math.sqrt(global_batch / 256), "none": 1.0}[self.lr_scaling]
        return self.lr * factor


def param_groups(model: nn.Module, recipe: OptimRecipe, layer_id=None, num_layers: int = 0) -> list[dict]:
    """Split parameters into groups: weight decay off for norms/biases, optional layer-wise lr scale.

    ``layer_id(name) -> int`` maps a parameter to its depth (0 = embeddings) when
    ``recipe.layer_decay`` is set; the group's ``lr_scale`` is ``layer_decay ** (num_layers - id)``,
    times ``recipe.lr_scales[prefix]`` for a parameter under a module named by one of its keys
    (e.g. ``predictor`` for ``predictor.0.weight``). A key that names no trainable parameter is an
    error: a misspelt module would otherwise be silently ignored.
    """
    groups: dict[tuple[bool, float], dict] = {}
    used: set[str] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = recipe.exclude_norm_bias and (p.ndim <= 1 or name.endswith(".bias"))
        scale = 1.0
        if recipe.layer_decay is not None and layer_id is not None:
            scale = recipe.layer_decay ** (num_layers - layer_id(name))
        for prefix, s in recipe.lr_scales.items():
            if name == prefix or name.startswith(prefix + "."):
                scale *= s
                used.add(prefix)
        key = (no_wd, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_wd else recipe.weight_decay, "lr_scale": scale, "apply_wd": not no_wd}
        groups[key]["params"].append(p)
    unused = sorted(set(recipe.lr_scales) - used)
    if unused:
        modules = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
        raise ValueError(f"optim.lr_scales names no trainable parameters: {unused}; this model's modules: {modules}")
    return list(groups.values())


def build_optimizer(groups: Iterable[dict], recipe: OptimRecipe, lr: float) -> torch.optim.Optimizer:
    """Instantiate the recipe's optimizer over prepared parameter groups."""
    groups = list(groups)
    if recipe.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum)
    if recipe.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=recipe.betas)
    from timm.optim import Lars

    # Groups with weight_decay == 0 (norms, biases) are not LARS-adapted: SimCLR's exclusion.
    return Lars(groups, lr=lr, momentum=recipe.momentum, trust_clip=False, always_adapt=False)


def cosine_schedule(step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``start``, then cosine from ``start`` to ``end``."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / max(1, warmup_steps)
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


class Schedule:
    """Sets each group's lr (and weight decay, when scheduled) for a given global step."""

    def __init__(self, optimizer: torch.optim.Optimizer, recipe: OptimRecipe, peak_lr: float, total_steps: int, steps_per_epoch: int):
        self.optimizer, self.recipe, self.peak_lr = optimizer, recipe, peak_lr
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(int(recipe.warmup_epochs * steps_per_epoch), self.total_steps // 2)

    def lr_at(self, step: int) -> float:
        """Peak-relative learning rate at ``step`` (before a group's ``lr_scale``)."""
        r = self.recipe
        return cosine_schedule(step, self.total_steps, self.peak_lr, self.peak_lr * r.min_lr_ratio, self.warmup_steps)

    def apply(self, step: int) -> float:
        """Set every group's lr/wd for ``step``; returns the peak-relative lr."""
        lr = self.lr_at(step)
        wd = None
        if self.recipe.weight_decay_end is not None:
            wd = cosine_schedule(step, self.total_steps, self.recipe.weight_decay, self.recipe.weight_decay_end)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
            if wd is not None and g.get("apply_wd", True):
                g["weight_decay"] = wd
        return lr
