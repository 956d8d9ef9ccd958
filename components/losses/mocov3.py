"""MoCo v3's contrastive loss: InfoNCE of queries against the keys of the whole global batch.

Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV
2021, Eq. (1) and Algorithm 1: for a query q (predictor output of one view) and the keys k
(momentum-encoder projections of the other view, one per image in the global batch),

    L_q = -log( exp(q . k+ / tau) / sum_k exp(q . k / tau) )

with q and k L2-normalised and k+ the key of the same image. Keys carry no gradient, so they
are gathered without it; this rank's queries' positives sit at ``rank * N + i`` in the gathered
keys. As in the paper's code, the loss is multiplied by 2 tau (it keeps the gradient scale
independent of tau); the method symmetrises it, ctr(q1, k2) + ctr(q2, k1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.distributed import gather_no_grad, rank


def mocov3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, gather: bool = True) -> torch.Tensor:
    """``2 tau * CE(q k_all^T / tau, positives)`` for this rank's (N, d) queries and keys.

    ``k`` is treated as constant. With several ranks the keys of every rank are the
    candidates, so each rank's loss is its share of the loss over the global batch.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    keys = gather_no_grad(k) if gather else k
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + (rank() * q.shape[0] if gather else 0)
    return F.cross_entropy(logits, labels) * (2 * temperature)
