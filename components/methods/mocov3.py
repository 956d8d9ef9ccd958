"""MoCo v3 (Chen, Xie, He, ICCV 2021): queries against momentum keys of the whole global batch.

query:    encoder -> projector -> predictor               (trained)
key:      EMA(encoder) -> EMA(projector)                   (m 0.99 -> 1 along a cosine)
loss:     ctr(q1, k2) + ctr(q2, k1), InfoNCE with every rank's keys as candidates (Alg. 1)
views:    BYOL's asymmetric pair (blur p 1.0 / 0.1, solarize p 0.0 / 0.2), as the paper uses.
For ViTs, ``freeze_patch_embed`` keeps the random patch projection fixed: the paper's fix for
the training instability it traces to the first layer (Sec. 4.2).
"""

from __future__ import annotations

import torch
from torch import nn
from pydantic import Field, ValidationInfo, field_validator, model_validator

from components.data.views import ViewRecipe, byol_views
from components.losses.mocov3 import mocov3_loss
from components.methods.base import AsymmetricViewsConfig, Method
from components.models.backbones import build_backbone
from components.models.ema import cosine_momentum, ema_update, frozen_copy
from components.models.heads import mlp_head
from components.models.vit import VITS


def _is_vit(settings: dict) -> bool:
    b = settings.get("backbone") or {}
    return (b.get("name") if isinstance(b, dict) else b.name) in VITS


class MoCoV3Config(AsymmetricViewsConfig):
    """MoCo v3 settings. Backbone-dependent defaults (None) follow the paper's two recipes:

    ViT: 3-layer projector, temperature 0.2, AdamW lr 1.5e-4 x B/256, wd 0.1, 40 warm-up epochs;
    ResNet: 2-layer projector, temperature 1.0, LARS lr 0.6 x B/256, wd 1e-6, 10 warm-up epochs.
    """

    proj_hidden_dim: int = Field(4096, ge=1)
    proj_dim: int = Field(256, ge=1)
    pred_hidden_dim: int = Field(4096, ge=1)
    pred_layers: int = Field(2, ge=0, le=3, description="predictor depth, 2 as the paper; 0: none (queries are the projections)")
    proj_layers: int | None = Field(None, ge=2, le=4, description="None: 3 for a ViT, 2 for a ResNet")
    proj_last_bn: bool = Field(True, description="affine-free BatchNorm on the projector output, as the paper; False: none (SimCLR's head)")
    temperature: float | None = Field(None, gt=0, description="None: 0.2 for a ViT, 1.0 for a ResNet")
    momentum: float = Field(0.99, ge=0, le=1, description="base key-encoder momentum; rises to 1 along a cosine")
    freeze_patch_embed: bool = Field(False, description="ViT only: keep the random patch projection fixed (Sec. 4.2)")

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        """AdamW for a ViT, LARS for a ResNet (the paper's two recipes)."""
        if _is_vit(settings):
            return {"name": "adamw", "lr": 1.5e-4, "weight_decay": 0.1, "warmup_epochs": 40}
        return {"name": "lars", "lr": 0.6, "weight_decay": 1e-6, "warmup_epochs": 10}

    @field_validator("freeze_patch_embed")
    @classmethod
    def _needs_vit(cls, freeze: bool, info: ValidationInfo) -> bool:
        backbone = info.data.get("backbone")
        if freeze and backbone is not None and not backbone.is_vit:
            raise ValueError(f"freeze_patch_embed needs a ViT backbone, not {backbone.name}")
        return freeze

    @model_validator(mode="after")
    def _backbone_defaults(self):
        vit = self.backbone.is_vit
        self.proj_layers = self.proj_layers or (3 if vit else 2)
        self.temperature = self.temperature or (0.2 if vit else 1.0)
        return self


class MoCoV3(Method):
    """Query encoder + projector + predictor; key encoder + projector as their EMA (no gradient)."""

    name = "mocov3"
    Config = MoCoV3Config

    def __init__(self, cfg: MoCoV3Config):
        super().__init__(cfg)
        self.encoder = build_backbone(cfg.backbone)
        if cfg.freeze_patch_embed:
            self.encoder.vit.patch_embed.requires_grad_(False)
        # By default the projector ends in an affine-free BN and the predictor does not, as in the paper's code.
        self.projector = mlp_head(self.encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, last_bn=cfg.proj_last_bn)
        self.predictor = nn.Identity() if cfg.pred_layers == 0 else mlp_head(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=cfg.pred_layers)
        self.key_encoder = frozen_copy(self.encoder)
        self.key_projector = frozen_copy(self.projector)

    @property
    def views(self) -> ViewRecipe:
        return byol_views(self.cfg.image_size, self.cfg.crop_scale, self.cfg.jitter_strength)  # BYOL's, as the paper

    def forward(self, batch):
        x1, x2 = batch["view_0"], batch["view_1"]
        q1 = self.predictor(self.projector(self.encoder(x1)))
        q2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            k1 = self.key_projector(self.key_encoder(x1))
            k2 = self.key_projector(self.key_encoder(x2))
        t = self.cfg.temperature
        return {"loss": mocov3_loss(q1, k2, t) + mocov3_loss(q2, k1, t)}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Move the key encoder towards the query encoder with the cosine-scheduled momentum."""
        m = cosine_momentum(step, total_steps, self.cfg.momentum)
        ema_update(self.key_encoder, self.encoder, m)
        ema_update(self.key_projector, self.projector, m)
