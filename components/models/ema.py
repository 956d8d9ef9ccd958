"""Momentum (EMA) helpers shared by every method with a target/teacher network.

Methods say *which* module pairs are updated and with what schedule; the mechanics live here.
BYOL (Grill et al., 2020, Sec. 3.1): tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Momentum rising from ``base`` at step 0 to ``final`` at ``total_steps`` along a half cosine."""
    t = min(max(step / max(1, total_steps), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * t) + 1) / 2


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off (the initial target/teacher)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for parameters; buffers copied."""
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.mul_(momentum).add_(po.detach(), alpha=1 - momentum)
    for bt, bo in zip(target.buffers(), online.buffers()):
        bt.copy_(bo)
