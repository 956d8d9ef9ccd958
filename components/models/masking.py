"""Patch masks for masked image modeling, and the pixel <-> patch reshapes their losses need.

- :func:`random_patch_mask`: MAE (He et al., CVPR 2022, Sec. 3 "random sampling"): the same
  number of patches per sample, chosen uniformly by sorting per-sample noise (the paper's
  "random shuffle"), so the visible tokens can be gathered into one dense batch.
- :func:`block_mask`: BEiT (Bao et al., ICLR 2022, Sec. 2.5, Algorithm 1): rectangles of at
  least ``min_block`` patches (paper 16) with aspect ratio in [0.3, 1/0.3], added until about
  ``ratio`` (paper 40 %) of the patches are masked. Every sample is drawn in the same batched
  round: a round proposes ``attempts`` rectangles per sample and keeps the first that adds new
  patches without overshooting the budget, as the paper's generator does with a Python loop.

Both take a ``torch.Generator`` so a seed fixes the mask; patches are numbered row-major on the
``(h, w)`` grid, as ViT patch tokens are.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class RandomMask(NamedTuple):
    """A random mask with ``K`` visible patches per sample out of ``L``.

    ``keep``: (N, K) indices of the visible patches; ``mask``: (N, L) bool, True = masked;
    ``restore``: (N, L) where ``cat([visible, masked])`` gathered with it is back in grid order.
    """

    keep: torch.Tensor
    mask: torch.Tensor
    restore: torch.Tensor


def random_patch_mask(n: int, num_patches: int, ratio: float, generator: torch.Generator | None = None, device=None) -> RandomMask:
    """MAE's per-sample random mask: ``int(L * (1 - ratio))`` visible patches (at least one)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} must be in [0, 1)")
    keep_n = max(1, int(num_patches * (1 - ratio)))
    noise = torch.rand(n, num_patches, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(n, num_patches, dtype=torch.bool)
    mask[:, :keep_n] = False
    mask = mask.gather(1, restore)
    return RandomMask(shuffle[:, :keep_n].to(device), mask.to(device), restore.to(device))


def block_mask(
    n: int,
    grid: tuple[int, int],
    ratio: float = 0.4,
    min_block: int = 16,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """BEiT's block-wise mask: (N, h*w) bool, True = masked; at most ``round(ratio * h*w)`` per sample.

    Each rectangle covers ``>= min_block`` patches (its area is drawn in [min_block, budget left]
    as in the paper; a rounded shape under ``min_block`` is rejected rather than kept), so every
    connected masked region has at least ``min_block`` patches. A sample stops when its budget
    is met or no proposal in a round adds patches within it (the paper's "delta == 0").
    """
    h, w = grid
    total = h * w
    target = int(round(ratio * total))
    max_block = max_block or target
    if min_block > target:
        raise ValueError(f"min_block {min_block} exceeds the masking budget {target} ({ratio:.0%} of {h}x{w} patches)")
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    count = torch.zeros(n, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool)
    rows = torch.arange(h).view(1, 1, h, 1)
    cols = torch.arange(w).view(1, 1, 1, w)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    idx = torch.arange(n)
    # Every round adds >= 1 patch to each active sample, so ``target`` rounds always suffice.
    for _ in range(target):
        if not active.any():
            break
        remaining = target - count
        hi = remaining.clamp(max=max_block).float()[:, None]
        area = min_block + (hi - min_block) * torch.rand(n, attempts, generator=generator)
        r = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, attempts, generator=generator))
        bh = torch.sqrt(area * r).round().long()
        bw = torch.sqrt(area / r).round().long()
        fits = (bh >= 1) & (bw >= 1) & (bh <= h) & (bw <= w) & (bh * bw >= min_block)
        top = (torch.rand(n, attempts, generator=generator) * (h - bh + 1).clamp(min=1)).long()
        left = (torch.rand(n, attempts, generator=generator) * (w - bw + 1).clamp(min=1)).long()
        rect = ((rows >= top[..., None, None]) & (rows < (top + bh)[..., None, None])
                & (cols >= left[..., None, None]) & (cols < (left + bw)[..., None, None]))  # (n, attempts, h, w)
        new = (rect & ~mask[:, None]).sum(dim=(2, 3))
        ok = fits & (new > 0) & (new <= remaining[:, None]) & active[:, None]
        found = ok.any(dim=1)
        first = ok.float().argmax(dim=1)
        mask |= rect[idx, first] & found[:, None, None]
        count = mask.sum(dim=(1, 2))
        active = found & (count < target)
    return mask.reshape(n, total).to(device)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Images (N, C, H, W) -> patches (N, h*w, patch*patch*C), row-major, pixels (py, px, c) inside.

    The layout of MAE's code (``patchify``), so a prediction head's output unpatchifies to an image.
    """
    n, c, hh, ww = x.shape
    if hh % patch or ww % patch:
        raise ValueError(f"image {hh}x{ww} is not a multiple of the patch size {patch}")
    h, w = hh // patch, ww // patch
    x = x.reshape(n, c, h, patch, w, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """The inverse of :func:`patchify`: (N, h*w, patch*patch*C) -> (N, C, h*patch, w*patch)."""
    n = patches.shape[0]
    h, w = grid
    x = patches.reshape(n, h, w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, h * patch, w * patch)


def patch_grid(image_size: int, backbone) -> tuple[int, int]:
    """The (h, w) patch grid a ViT ``backbone`` config gives ``image_size`` inputs; ValueError if
    the backbone is not a ViT or the size is not a multiple of its patch size."""
    if not backbone.is_vit:
        raise ValueError(f"masked image modeling needs a ViT backbone (vit_tiny/vit_small/vit_base), not {backbone.name}")
    if image_size % backbone.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the ViT patch_size {backbone.patch_size}")
    side = image_size // backbone.patch_size
    return side, side
