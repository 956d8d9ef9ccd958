"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML
2020, Eq. (1): for a positive pair (i, j) among 2N augmented samples,

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )

and the loss is the mean of l over both orderings of every pair. With several workers the
negatives are the embeddings of the *global* batch (gathered with gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.distributed import gather_with_grad, rank


def ntxent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """NT-Xent over the (global) batch of positive pairs ``(z1[i], z2[i])``.

    ``z1``, ``z2``: (N, d) projections of two views of the same N images on this worker (not
    necessarily normalised). Returns this worker's mean loss over its 2N anchors; averaged
    over workers (as DDP does) it is the loss over the global 2·N·world batch.
    """
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    n = z1.shape[0]
    all1 = gather_with_grad(z1) if gather else z1
    all2 = gather_with_grad(z2) if gather else z2
    offset = rank() * n if gather else 0
    candidates = torch.cat([all1, all2], dim=0)  # (2M, d)
    m = all1.shape[0]
    anchors = torch.cat([z1, z2], dim=0)  # (2N, d)
    logits = anchors @ candidates.T / temperature
    idx = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([idx, idx + m])
    pos_idx = torch.cat([idx + m, idx])
    logits[torch.arange(2 * n, device=z1.device), self_idx] = float("-inf")
    return F.cross_entropy(logits, pos_idx)
