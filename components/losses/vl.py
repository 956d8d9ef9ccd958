"""VisualBERT's pretraining loss (Li et al., 2019, Sec. 3.2): masked language modeling with the
image plus sentence-image prediction, summed.

    L = CE(MLM logits at masked positions, original tokens) + CE(ITM logits, matched?)

MLM follows BERT (Devlin et al., 2019): the mean cross-entropy over the masked text positions
(labels -100 elsewhere). Sentence-image prediction is a 2-way classification of the ``[CLS]``
state: does the caption describe the image (1) or another one (0)?
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def visualbert_loss(mlm_logits: torch.Tensor, mlm_labels: torch.Tensor, itm_logits: torch.Tensor, itm_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mlm_logits`` (M, V) and ``mlm_labels`` (M,) of the positions that may be masked (labels
    ``-100`` where nothing is predicted), ``itm_logits`` (N, 2), ``itm_labels`` (N,) in {0, 1}.

    Returns ``{"loss", "mlm_loss", "itm_loss"}``; with no masked token in the batch the MLM
    term is 0 (not NaN).
    """
    if (mlm_labels != IGNORE).any():
        mlm = F.cross_entropy(mlm_logits.float(), mlm_labels, ignore_index=IGNORE)
    else:
        mlm = mlm_logits.sum() * 0.0
    itm = F.cross_entropy(itm_logits.float(), itm_labels)
    return {"loss": mlm + itm, "mlm_loss": mlm, "itm_loss": itm}
