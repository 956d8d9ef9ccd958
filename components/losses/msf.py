"""The mean-shift loss of MSF: pull a prediction towards the neighbours of its target.

Koohpayegani et al., "Mean Shift for Self-Supervised Learning", ICCV 2021, Sec. 3. With ``u`` the
online prediction of the strong view, ``v`` the momentum target of the weak view and ``z`` the
memory bank of past targets, all L2-normalised, ``S(v)`` is the set of the ``k`` candidates
most similar to ``v`` (cosine), where the candidates are the bank *and ``v`` itself* (so the
target is always its own first neighbour and k = 1 is BYOL's loss):

    L = 1/N sum_i 1/k sum_{z in S(v_i)} || u_i - z ||^2      (= 2 - 2 u_i . z per term)

The neighbours are chosen by the target, never by the prediction, and carry no gradient. The
official code writes the current batch into the bank before the search; we add only the
sample's own target and update the bank after the step, so other images of the batch are not
candidates for one another.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def msf_loss(prediction: torch.Tensor, target: torch.Tensor, bank: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Mean squared distance from each prediction to the ``k`` nearest neighbours of its target.

    ``prediction``, ``target``: (N, d) online prediction (strong view) and momentum target (weak
    view) of the same N images; ``bank``: (K, d) past targets (K may be 0). None needs to be
    normalised. When the bank holds fewer than ``k - 1`` rows, all candidates are used.
    """
    # At least float32 throughout: under autocast the prediction may be bf16, the bank float32.
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    u = F.normalize(prediction.to(dtype), dim=1)
    v = F.normalize(target.detach().to(dtype), dim=1)
    z = F.normalize(bank.detach().to(dtype), dim=1)
    # Candidate 0 is the sample's own target, then the bank: similarities (N, 1 + K).
    sim_target = torch.cat([torch.ones_like(v[:, :1]), v @ z.T], dim=1)
    sim_prediction = torch.cat([(u * v).sum(dim=1, keepdim=True), u @ z.T], dim=1)
    idx = sim_target.topk(min(k, sim_target.shape[1]), dim=1).indices
    return (2 - 2 * sim_prediction.gather(1, idx)).mean()
