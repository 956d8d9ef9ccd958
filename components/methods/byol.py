"""BYOL (Grill et al., NeurIPS 2020): predict an EMA target network's projection of another view.

online:  encoder -> projector -> predictor            (trained)
target:  EMA(encoder) -> EMA(projector)               (tau 0.996 -> 1 along a cosine, Sec. 3.2)
loss:    2 - 2 cos(prediction of view a, target projection of view b), both ways (Eq. 2)
views:   the paper's asymmetric pair (Table 6): blur p 1.0 / 0.1, solarize p 0.0 / 0.2.
"""

from __future__ import annotations

import torch
from pydantic import Field

from components.data.views import ViewRecipe, byol_views
from components.losses.byol import byol_loss
from components.methods.base import AsymmetricViewsConfig, Method
from components.models.backbones import build_backbone
from components.models.ema import cosine_momentum, ema_update, frozen_copy
from components.models.heads import mlp_head


class BYOLConfig(AsymmetricViewsConfig):
    """BYOL settings; defaults follow the paper (4096-d hidden, 256-d output, LARS 0.2 x B/256)."""

    proj_hidden_dim: int = Field(4096, ge=1)
    proj_dim: int = Field(256, ge=1)
    pred_hidden_dim: int = Field(4096, ge=1)
    momentum: float = Field(0.996, ge=0, le=1, description="base EMA rate tau_base; rises to 1 along a cosine")

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        """LARS, base lr 0.2 per 256 images, weight decay 1.5e-6, 10 warm-up epochs (Sec. 3.2/App. C)."""
        return {"name": "lars", "lr": 0.2, "weight_decay": 1.5e-6, "warmup_epochs": 10}


class BYOL(Method):
    """Online encoder + projector + predictor; the target (their EMA, without the predictor) gets no gradient."""

    name = "byol"
    Config = BYOLConfig

    def __init__(self, cfg: BYOLConfig):
        super().__init__(cfg)
        self.encoder = build_backbone(cfg.backbone)
        self.projector = mlp_head(self.encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = mlp_head(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.target_encoder = frozen_copy(self.encoder)
        self.target_projector = frozen_copy(self.projector)

    @property
    def views(self) -> ViewRecipe:
        return byol_views(self.cfg.image_size, self.cfg.crop_scale, self.cfg.jitter_strength)  # the paper's Table 6

    def forward(self, batch):
        x1, x2 = batch["view_0"], batch["view_1"]
        p1 = self.predictor(self.projector(self.encoder(x1)))
        p2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            z1 = self.target_projector(self.target_encoder(x1))
            z2 = self.target_projector(self.target_encoder(x2))
        return {"loss": byol_loss(p1, z2) + byol_loss(p2, z1)}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Move the target towards the online network with the cosine-scheduled momentum."""
        tau = cosine_momentum(step, total_steps, self.cfg.momentum)
        ema_update(self.target_encoder, self.encoder, tau)
        ema_update(self.target_projector, self.projector, tau)
