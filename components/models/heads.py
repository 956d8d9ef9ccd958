"""Projection and prediction heads (MLPs with optional BatchNorm), one concept each."""

from __future__ import annotations

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
