"""Losses of masked image modeling and of the visual tokenizers it predicts.

- :func:`mae_loss`: MAE (He et al., CVPR 2022, Sec. 3 "Reconstruction target"): mean squared
  error between predicted and original pixels, **on masked patches only**; with
  ``norm_pix`` each target patch is first normalised by its own mean and variance
  (``(t - mean) / sqrt(var + 1e-6)``, the paper's "normalized pixels", its default).
- :func:`masked_token_loss`: BEiT (Bao et al., ICLR 2022, Eq. 1) and BEiT v2 (Peng et al.,
  2022, Eq. 3): cross-entropy of the visual-token classifier, summed over masked positions only
  and averaged over them: ``-mean_{i in M} log p(z_i | x^M)``.
- :func:`vq_commitment_loss`: the commitment term of VQ-VAE (van den Oord et al., NeurIPS
  2017, Eq. 3) on L2-normalised vectors, ``||l2(z) - sg[l2(e_z)]||^2``; the codebook term is
  replaced by EMA updates (App. A.1 of that paper; BEiT v2 Sec. 2.1 does the same).
- :func:`vqkd_loss`: BEiT v2's VQ-KD objective (Eq. 2): ``sum_i -cos(o_i, t_i)`` between the
  decoder output ``o_i`` and the teacher's patch feature ``t_i``, plus the commitment term.
  ``1 - cos`` is used instead of ``-cos`` (same gradient; a loss that reaches 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch MSE averaged over the masked patches only.

    ``pred``, ``target``: (N, L, P) patch pixels (``target`` from :func:`~components.models.masking.patchify`);
    ``mask``: (N, L) bool or 0/1, 1 = masked (the loss sees nothing of the visible patches).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1)


def masked_token_loss(logits: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predicted visual tokens, at masked positions only.

    ``codes``: (N, L) target tokens; ``mask``: (N, L) bool, True = masked; ``logits``: (M, K)
    for the M masked positions in row-major order (``hidden[mask]`` through the head: the
    classifier never runs on visible positions), or (N, L, K) for every position.
    """
    if logits.dim() == 3:
        logits = logits[mask]
    return F.cross_entropy(logits.float(), codes[mask])


def vq_commitment_loss(z: torch.Tensor, codes_vec: torch.Tensor) -> torch.Tensor:
    """``mean_i ||z_i - sg[e_i]||^2`` (squared L2 over the code dimension, averaged over vectors).

    ``z``: encoder outputs, already L2-normalised by the quantizer; ``codes_vec``: their
    codebook vectors (unit norm), not differentiated.
    """
    return (z - codes_vec.detach()).pow(2).sum(dim=-1).mean()


def vqkd_loss(decoded: torch.Tensor, teacher: torch.Tensor, z: torch.Tensor, codes_vec: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """VQ-KD: ``mean_i (1 - cos(o_i, t_i)) + beta * mean_i ||l2(z_i) - sg[l2(e_i)]||^2``.

    ``decoded``: (..., C) decoder outputs; ``teacher``: (..., C) teacher patch features (not
    differentiated); ``z``, ``codes_vec``: (..., d) L2-normalised encoder outputs and their codes.
    """
    cos = F.cosine_similarity(decoded.float(), teacher.detach().float(), dim=-1)
    return (1 - cos).mean() + beta * vq_commitment_loss(z, codes_vec)
