"""Multi-crop forward: run a backbone once per crop resolution, the head once on everything.

Caron et al. (SwAV, NeurIPS 2020, Sec. 3.2; DINO, ICCV 2021, Sec. 3.1) mix 2 global and N
smaller local crops. Views of one resolution are concatenated so the backbone sees one batch
per size (as DINO's ``MultiCropWrapper`` does; BatchNorm statistics then cover all views of a
size), and the head, which no longer depends on the size, runs once on all of them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def multicrop_forward(backbone: nn.Module, head: nn.Module, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``head(backbone(v))`` for every view, batched by resolution; returns one tensor per view, in order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[-2:]), []).append(i)
    feats: list[torch.Tensor | None] = [None] * len(views)
    for idx in groups.values():
        out = backbone(torch.cat([views[i] for i in idx]))
        for i, f in zip(idx, out.split([views[i].shape[0] for i in idx])):
            feats[i] = f
    out = head(torch.cat(feats))
    return list(out.split([v.shape[0] for v in views]))
