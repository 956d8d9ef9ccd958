"""Backbones: torchvision ResNets (with a small-image stem option) behind one small interface.

A backbone maps a float image batch (N, 3, H, W) to pooled features (N, ``feature_dim``) and,
through :meth:`Backbone.feature_map`, to a spatial map for region features.
"""

from __future__ import annotations

import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


class BackboneConfig(BaseModel):
    """Which backbone: ``name`` (resnet18/34/50) and ``stem`` (imagenet, small or cifar).

    ``small`` is a 3x3 stride-1 first conv that keeps the max-pool (a 32-px input gives 16x16
    maps in layer1: ~4x cheaper than ``cifar``, which also drops the pool); ``imagenet`` is the
    original 7x7 stride-2 stem, meant for >= 96-px inputs.
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field("resnet18", pattern="^(resnet18|resnet34|resnet50)$")
    stem: str = Field("small", pattern="^(imagenet|small|cifar)$")


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier; ``forward`` returns pooled features."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        net = getattr(torchvision.models, cfg.name)(weights=None)
        if cfg.stem != "imagenet":
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if cfg.stem == "cifar":
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.feature_dim = RESNETS[cfg.name]
        self.config = cfg

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's spatial features (N, feature_dim, h, w)."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net.avgpool(self.feature_map(x)), 1)


def build_backbone(cfg: BackboneConfig | dict | None = None) -> Backbone:
    """Build a backbone from its config (a dict is validated first)."""
    if not isinstance(cfg, BackboneConfig):
        cfg = BackboneConfig.model_validate(cfg or {})
    return Backbone(cfg)
