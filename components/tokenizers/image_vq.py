"""The codebook of the image tokenizers: L2-normalised vectors, cosine lookup, EMA updates.

Both image tokenizers (``components/methods/vqvae.py`` for BEiT, ``components/methods/vqkd.py``
for BEiT v2) quantise with this module:

- lookup: ``z_i = argmin_j ||l2(h_i) - l2(v_j)||^2 = argmax_j cos(h_i, v_j)`` (BEiT v2, Peng et
  al., 2022, Sec. 2.1; the L2-normalised, low-dimensional codes of Yu et al.'s ViT-VQGAN, which
  raise codebook usage);
- updates: exponential moving averages of the assigned vectors (VQ-VAE, van den Oord et al.,
  2017, App. A.1; BEiT v2 does the same), renormalised to the unit sphere, with the sums taken
  over every rank; codes unused for a while are restarted on random encoder outputs of the
  current batch (as in Jukebox / improved-VQGAN practice), and the codebook is initialised from
  the first batch's outputs - both keep all K codes alive in the short schedules run here;
- gradients: straight-through (``q = z + sg[e - z]``), the encoder gets the decoder's gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from components.distributed import is_distributed


class CosineCodebook(nn.Module):
    """``num_codes`` unit vectors of ``dim``; all state is in buffers (EMA, not the optimizer).

    ``decay``: EMA of the code vectors; a code whose share of the assignments (an EMA with decay
    0.9) falls under ``dead_fraction`` of the uniform share ``1/num_codes`` is restarted.
    """

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, dead_fraction: float = 0.03):
        super().__init__()
        self.num_codes, self.dim, self.decay, self.dead_fraction = num_codes, dim, decay, dead_fraction
        self.register_buffer("embed", F.normalize(torch.randn(num_codes, dim), dim=-1))
        self.register_buffer("usage", torch.full((num_codes,), 1.0 / num_codes))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code by cosine for each vector of ``z`` (..., dim): long indices (...)."""
        return (F.normalize(z.float(), dim=-1) @ self.embed.T).argmax(dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise ``z`` (..., dim): ``(straight-through code vectors, indices, l2(z))``.

        In training mode the codebook then moves towards the vectors assigned to it (EMA).
        """
        zn = F.normalize(z.float(), dim=-1)
        flat = zn.reshape(-1, self.dim)
        if self.training and not bool(self.initialised):
            with torch.no_grad():
                self.embed.copy_(flat[self._sample(len(flat), self.num_codes, flat.device)])
                self.initialised.fill_(True)
        codes = (flat @ self.embed.T).argmax(dim=-1)
        q = self.embed[codes].reshape(zn.shape)  # a copy: the update below does not change it
        if self.training:
            self._update(flat.detach(), codes)
        return zn + (q - zn).detach(), codes.reshape(zn.shape[:-1]), zn

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.num_codes).to(flat.dtype)
        counts, sums = onehot.sum(0), onehot.T @ flat
        if is_distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.usage.mul_(0.9).add_(counts / counts.sum().clamp_min(1), alpha=0.1)
        moved = F.normalize(self.decay * self.embed + (1 - self.decay) * F.normalize(sums, dim=-1), dim=-1)
        self.embed.copy_(torch.where((counts > 0)[:, None], moved, self.embed))
        # Restart codes nobody picks on this batch's vectors (rank 0's choice wins: DDP
        # broadcasts buffers from rank 0 before every forward).
        dead = self.usage < self.dead_fraction / self.num_codes
        if dead.any():
            self.embed[dead] = flat[self._sample(len(flat), int(dead.sum()), flat.device)]
            self.usage[dead] = 1.0 / self.num_codes

    @staticmethod
    def _sample(n: int, k: int, device) -> torch.Tensor:
        if n >= k:
            return torch.randperm(n, device=device)[:k]
        return torch.randint(0, n, (k,), device=device)

    def usage_of(self, codes: torch.Tensor) -> float:
        """Fraction of the codebook used by ``codes`` (a health metric: collapse shows as ~0)."""
        return float(torch.unique(codes).numel()) / self.num_codes
