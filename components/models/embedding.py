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
