"""BYOL's regression loss between the online prediction and the target projection.

Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, Eq. (2):

    L(theta, xi) = || q_bar(z_theta) - z_bar'_xi ||_2^2 = 2 - 2 <q(z), z'> / (||q(z)|| ||z'||)

where q(z) is the online network's prediction of one view and z' the target network's
projection of the other view (bars: L2-normalised). The total loss symmetrises it by also
feeding view 2 to the online and view 1 to the target (Eq. (2)'s L~), which the method does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``2 - 2 cos(prediction_i, target_i)``; ``target`` is not differentiated.

    ``prediction``, ``target``: (N, d). The target is detached here as well as computed under
    no-grad by the method, so a caller cannot leak gradients into the target network by mistake.
    """
    cos = F.cosine_similarity(prediction, target.detach(), dim=1)
    return (2 - 2 * cos).mean()
