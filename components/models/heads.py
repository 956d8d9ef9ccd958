"""Projection and prediction heads (MLPs with optional BatchNorm), one concept each."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, batch_norm: bool = True, last_bn: bool = False) -> nn.Sequential:
    """An MLP projector: ``layers`` linear layers, BN + ReLU between them (SimCLR/BYOL style).

    ``last_bn`` adds an affine-free BatchNorm on the output, as SimCLR v2 and MoCo v3 do.
    """
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
        if batch_norm:
            mods.append(nn.BatchNorm1d(hidden_dim))
        mods.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al., ICCV 2021, Sec. 3.1 and App. C).

    A ``layers``-deep MLP (GELU; hidden ``hidden_dim``) to a ``bottleneck_dim`` output, L2
    normalisation, then a bias-free linear layer to ``out_dim`` whose rows are unit vectors:
    ``F.linear(x, normalize(V))`` is ``weight_norm(Linear)`` with ``weight_g`` fixed to 1 (the
    paper's ``norm_last_layer``), written out so the weight stays a plain parameter (no
    parametrisation in ``state_dict``/``deepcopy``). ``last_layer.weight`` is what DINO freezes
    during the first epoch.

    ``norm_last_layer=False`` is the paper code's other setting: the rows' norms ``g`` (one per
    output, initialised to 1, parameter ``last_layer_g``) are trained, so the logits are no longer
    bounded by ``1/temperature`` (better for ViT-S/16 in the paper, less stable). Being 1-D, ``g``
    falls in the no-weight-decay group of ``components.optim``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3, batch_norm: bool = False,
                 norm_last_layer: bool = True):
        super().__init__()
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods.append(nn.Linear(dim, hidden_dim))
            if batch_norm:
                mods.append(nn.BatchNorm1d(hidden_dim))
            mods.append(nn.GELU())
            dim = hidden_dim
        mods.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*mods)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer_g = None if norm_last_layer else nn.Parameter(torch.ones(out_dim))

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        w = F.normalize(self.last_layer.weight, dim=1)
        if self.last_layer_g is not None:
            w = w * self.last_layer_g[:, None]
        return F.linear(x, w)
