"""DINO's self-distillation loss, teacher centring and sharpening.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
Eq. (1)-(3): the student's and teacher's outputs become distributions over K dimensions,

    P_s(x) = softmax(g_s(x) / tau_s),    P_t(x) = softmax((g_t(x) - c) / tau_t),

(centring by c, sharpening by a small tau_t), and the student learns to match the teacher
across views:

    min  sum_{x in {x1_g, x2_g}}  sum_{x' in V, x' != x}  H(P_t(x), P_s(x')),   H(a, b) = -a . log b

where V are all crops (2 global + N local) and only the global crops go through the teacher.
Eq. (4): the centre is an EMA of the teacher's batch mean, c <- m c + (1 - m) mean_i g_t(x_i),
taken over the global batch (all ranks).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from components.distributed import is_distributed, world_size


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], center: torch.Tensor, student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """Mean cross-entropy H(P_t, P_s) over every (teacher view, student view) pair of different views.

    ``student``: per-view logits (N, K), global views first (``student[i]`` and ``teacher[i]``
    come from the same view, and such pairs are skipped); ``teacher``: the global views' teacher
    logits (N, K), not differentiated; ``center``: (K,) or (1, K). Each pair's cross-entropy is
    averaged over the batch, then the pairs are averaged (as in the paper's code).
    """
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    total, terms = 0.0, 0
    for i, p_t in enumerate(targets):
        for j, log_p_s in enumerate(log_probs):
            if i == j:
                continue
            total = total + (-p_t * log_p_s).sum(dim=-1).mean()
            terms += 1
    return total / terms


@torch.no_grad()
def dino_center(center: torch.Tensor, teacher: Sequence[torch.Tensor], momentum: float = 0.9) -> torch.Tensor:
    """Eq. (4): the new centre, ``momentum * center + (1 - momentum) * mean of the teacher logits``.

    The mean is over every global view of every image on every rank (an all-reduce of the sums
    when a process group is initialised), so all ranks keep the same centre.
    """
    logits = torch.cat([t.detach() for t in teacher])
    total = logits.sum(dim=0, keepdim=True)
    if is_distributed():
        dist.all_reduce(total)
    batch_center = total / (logits.shape[0] * world_size())
    return center * momentum + batch_center.reshape(center.shape) * (1 - momentum)


def teacher_temperature(step: int, steps_per_epoch: int, start: float = 0.04, end: float = 0.07, warmup_epochs: float = 30) -> float:
    """Sec. 3.1 / App.: tau_t rises linearly from ``start`` to ``end`` over ``warmup_epochs``, then stays."""
    warmup = warmup_epochs * steps_per_epoch
    if step >= warmup:
        return end
    return start + (end - start) * step / warmup
