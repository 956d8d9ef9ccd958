"""The NNCLR loss: InfoNCE with a nearest neighbour from a support set as the positive.

Dwibedi et al., "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of
Visual Representations", ICCV 2021, Sec. 3.2. With ``NN(z_i, Q)`` the nearest neighbour of view
a's projection ``z_i`` in the support set ``Q``, ``p_k`` the predictions of view b, all
L2-normalised, and ``tau`` the temperature:

    L_i = -log( exp(NN(z_i, Q) . p_i / tau) / sum_k exp(NN(z_i, Q) . p_k / tau) )

and the paper's symmetric term, the same softmax taken over the neighbours instead:

    L'_i = -log( exp(NN(z_i, Q) . p_i / tau) / sum_k exp(NN(z_k, Q) . p_i / tau) )

The loss is the mean of (L_i + L'_i) / 2. Unlike SimCLR's NT-Xent there are no same-view
negatives: every term compares a neighbour with a prediction. With several workers the sums over
``k`` run over the *global* batch (gathered with gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.distributed import gather_with_grad, rank


def nnclr_loss(neighbours: torch.Tensor, predictions: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """NNCLR loss between ``neighbours`` (N, d) of view a and ``predictions`` (N, d) of view b.

    Row ``i`` of both belongs to the same image on this worker; neither needs to be normalised.
    Returns this worker's mean loss; averaged over workers (as DDP does) it is the loss of the
    global batch. The method averages it over both view orders (a->b and b->a).
    """
    a = F.normalize(neighbours, dim=1)
    b = F.normalize(predictions, dim=1)
    n = a.shape[0]
    all_a = gather_with_grad(a) if gather else a
    all_b = gather_with_grad(b) if gather else b
    target = torch.arange(n, device=a.device) + (rank() * n if gather else 0)
    over_predictions = F.cross_entropy(a @ all_b.T / temperature, target)  # L_i
    over_neighbours = F.cross_entropy(b @ all_a.T / temperature, target)  # L'_i
    return (over_predictions + over_neighbours) / 2
