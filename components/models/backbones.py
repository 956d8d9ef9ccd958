"""Backbones: torchvision ResNets (with a small-image stem option) and timm ViTs, one interface.

A backbone maps a float image batch (N, 3, H, W) to pooled features (N, ``feature_dim``) and,
through ``feature_map``, to a spatial map for region features. ViTs (``components/models/vit.py``)
also run on visible tokens only (``forward_masked``) and give ``layer_id``/``num_layers`` for
layer-wise lr decay.
"""

from __future__ import annotations

import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from components.models.vit import VITS, ViTBackbone

RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


class BackboneConfig(BaseModel):
    """Which backbone: ``name`` (resnet18/34/50, vit_tiny/small/base) and its options.

    ResNets: ``stem`` ``small`` is a 3x3 stride-1 first conv that keeps the max-pool (a 32-px
    input gives 16x16 maps in layer1: ~4x cheaper than ``cifar``, which also drops the pool);
    ``imagenet`` is the original 7x7 stride-2 stem, meant for >= 96-px inputs.
    ViTs: ``patch_size`` and ``img_size`` (the size the position embedding is made for; other
    sizes, e.g. local crops, get it resampled); ``embed_dim``/``depth``/``num_heads`` override
    the preset (None keeps it), for tiny models.
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field("resnet18", pattern="^(resnet18|resnet34|resnet50|vit_tiny|vit_small|vit_base)$")
    stem: str = Field("small", pattern="^(imagenet|small|cifar)$", description="ResNets only")
    patch_size: int = Field(16, ge=1, le=64, description="ViTs only")
    img_size: int = Field(224, ge=8, le=1024, description="ViTs only: size of the position-embedding grid")
    embed_dim: int | None = Field(None, ge=8, description="ViTs only; None = the preset's")
    depth: int | None = Field(None, ge=1, description="ViTs only; None = the preset's")
    num_heads: int | None = Field(None, ge=1, description="ViTs only; None = the preset's")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="ViTs only: stochastic depth")

    @property
    def is_vit(self) -> bool:
        """True for the timm ViTs."""
        return self.name in VITS

    @model_validator(mode="after")
    def _check_vit(self):
        if self.is_vit:
            if self.img_size % self.patch_size:
                raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
            dim, _, heads = VITS[self.name]
            if (self.embed_dim or dim) % (self.num_heads or heads):
                raise ValueError(f"embed_dim {self.embed_dim or dim} is not divisible by num_heads {self.num_heads or heads}")
        return self


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

    def feature_map(self, x: torch.Tensor, stage: int = 4) -> torch.Tensor:
        """Spatial features after ResNet stage ``stage`` (1-4; default the last: (N, feature_dim, h, w)).
        Stage 3 is the "C4" map Faster R-CNN pools regions from (VisualBERT's region features)."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4)[:stage]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net.avgpool(self.feature_map(x)), 1)


def build_backbone(cfg: BackboneConfig | dict | None = None) -> Backbone | ViTBackbone:
    """Build a backbone from its config (a dict is validated first)."""
    if not isinstance(cfg, BackboneConfig):
        cfg = BackboneConfig.model_validate(cfg or {})
    return ViTBackbone(cfg) if cfg.is_vit else Backbone(cfg)
