"""The spectral contrastive loss.

HaoChen et al., "Provable Guarantees for Self-Supervised Deep Learning with Spectral Contrastive
Loss", NeurIPS 2021, Sec. 3:

    L(f) = -2 E_{x, x+}[ f(x)^T f(x+) ] + E_{x, x-}[ (f(x)^T f(x-))^2 ]

estimated on a batch of N positive pairs ``(z1_i, z2_i)`` (two views of image i): the first term
is the mean over i of ``z1_i . z2_i``; the second the mean over the N(N-1) pairs
``(z1_i, z2_j)``, i != j, of views of different images. With several workers the negatives are
the pairs of the *global* batch (gathered with gradient).

``mu`` is the scaling parameter of the authors' code (``mu`` there; 1 for CIFAR, 10 for
ImageNet): every embedding is first projected onto the ball of radius sqrt(mu) (its norm is
clipped, not normalised) and the loss is divided by mu. Writing ``u = f / sqrt(mu)`` (norm <= 1)
this is ``-2 E[u^T u+] + mu E[(u^T u-)^2]``: mu weights the repulsion between different images
against the attraction of positive pairs.
"""

from __future__ import annotations

import math

import torch

from components.distributed import gather_with_grad, rank


def clip_norm(z: torch.Tensor, radius: float) -> torch.Tensor:
    """Rows of ``z`` with norm above ``radius`` scaled down to it; the others unchanged."""
    return z * (radius / z.norm(dim=1, keepdim=True).clamp_min(radius))


def spectral_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, mu: float = 1.0, gather: bool = True) -> torch.Tensor:
    """Spectral contrastive loss of the positive pairs ``(z1[i], z2[i])`` on this worker.

    Returns this worker's share: averaged over workers (as DDP does) it is the loss of the
    global batch, which must hold at least 2 pairs.
    """
    z1, z2 = clip_norm(z1, math.sqrt(mu)), clip_norm(z2, math.sqrt(mu))
    n = z1.shape[0]
    positive = -2 * (z1 * z2).sum(dim=1).mean()
    all1 = gather_with_grad(z1) if gather else z1
    all2 = gather_with_grad(z2) if gather else z2
    m = all1.shape[0]
    local = torch.arange(n, device=z1.device)
    idx = local + (rank() * n if gather else 0)
    # This worker's rows (z1_i vs every z2_j) and columns (every z1_j vs z2_i) of the global
    # (M x M) matrix; over all workers each off-diagonal entry is counted twice, hence the 2.
    rows = (z1 @ all2.T) ** 2
    cols = (z2 @ all1.T) ** 2
    diag = rows[local, idx].sum() + cols[local, idx].sum()
    negative = (rows.sum() + cols.sum() - diag) / (2 * n * (m - 1))
    return (positive + negative) / mu
