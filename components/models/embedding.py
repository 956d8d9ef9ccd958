"""The shippable encoder: preprocessing + frozen encoder in one module.

This is what is registered in MLflow and what ``embed``/``evaluate`` run, so a user needs
nothing but the model to embed images: it takes uint8 (or 0-255 float) RGB batches (N, 3, H, W)
of any size, resizes them to the training size, standardises them and returns features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.data.views import IMAGENET_MEAN, IMAGENET_STD


class EmbeddingModel(nn.Module):
    """``images (N, 3, H, W) 0-255 -> features (N, D)``."""

    def __init__(self, encoder: nn.Module, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.encoder = encoder
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=True)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return self.encoder((x - self.mean) / self.std)


@torch.no_grad()
def estimate_bn_stats(model: EmbeddingModel, images: torch.Tensor, batch_size: int = 256) -> EmbeddingModel:
    """Set every BatchNorm's running mean/variance to its statistics over ``images`` (uint8
    (N, 3, H, W)), by forward passes in train mode with no gradient and no weight change; returns
    ``model`` in eval mode.

    A random-init encoder in eval mode uses PyTorch's initial running statistics (mean 0,
    variance 1), i.e. no normalisation at all; a trained one uses statistics of its training
    views. Part of any trained encoder's lead over the bare random-init floor is therefore just
    estimated BN statistics: this gives the floor the same, so a comparison with it measures
    what the weights learnt (``bench/quality.py`` reports both floors).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
    model.train()
    # Near-equal batches: BN's cumulative average weighs every batch equally.
    for batch in images.tensor_split(max(1, -(-len(images) // batch_size))):
        model(batch)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()
