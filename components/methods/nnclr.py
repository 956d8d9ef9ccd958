"""NNCLR (Dwibedi et al., ICCV 2021): the positive is a nearest neighbour from a support set.

Encoder -> projector -> predictor. The projection of each view is replaced by its nearest
neighbour (cosine) in a FIFO support set of past projections, and the NNCLR loss pulls it towards
the *prediction* of the other view, both view orders averaged. After the step the support set
receives the batch's view-a projections, gathered from every worker, so the lookup of a step
never sees its own batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from pydantic import Field

from components.data.views import ViewRecipe, byol_views
from components.losses.nnclr import nnclr_loss
from components.methods.base import AsymmetricViewsConfig, Method
from components.models.backbones import build_backbone
from components.models.heads import mlp_head
from components.models.memory_bank import MemoryBank


class NNCLRConfig(AsymmetricViewsConfig):
    """NNCLR settings; defaults follow the paper (Sec. 4 and the appendix)."""

    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(256, ge=1)
    proj_layers: int = Field(3, ge=1, description="the paper's projector: 3 layers, BN on every one")
    proj_last_bn: bool = Field(True, description="affine-free BatchNorm on the projector output, as the paper; False: none (SimCLR's head)")
    pred_hidden_dim: int = Field(4096, ge=1)
    pred_layers: int = Field(2, ge=0, le=3, description="predictor depth, 2 as the paper; 0: none (queries are the projections)")
    support_set_size: int = Field(98_304, ge=1, description="FIFO support set of past projections (paper: 98,304)")
    temperature: float = Field(0.1, gt=0)

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        """LARS, lr 0.3 per 256 images, weight decay 1e-6, 10 warm-up epochs, cosine."""
        return {"name": "lars", "lr": 0.3, "weight_decay": 1e-6, "warmup_epochs": 10}


class NNCLR(Method):
    """Encoder -> projector -> predictor; nearest neighbours from a support set as positives."""

    name = "nnclr"
    Config = NNCLRConfig

    def __init__(self, cfg: NNCLRConfig):
        super().__init__(cfg)
        self.encoder = build_backbone(cfg.backbone)
        self.projector = mlp_head(self.encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, last_bn=cfg.proj_last_bn)
        self.predictor = nn.Identity() if cfg.pred_layers == 0 else mlp_head(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=cfg.pred_layers)
        self.support = MemoryBank(cfg.support_set_size, cfg.proj_dim)
        self._pending: torch.Tensor | None = None  # this step's projections, enqueued in on_step_end

    @property
    def views(self) -> ViewRecipe:
        # BYOL's asymmetric recipe, which the paper uses: blur always on one view, rarely on the
        # other, solarisation only on the second.
        return byol_views(self.cfg.image_size, self.cfg.crop_scale, self.cfg.jitter_strength)

    def neighbours(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest support-set row of each projection (the projection itself while empty)."""
        z = F.normalize(z.detach(), dim=1)
        if self.support.filled == 0:  # only the very first step
            return z
        return self.support.nearest(z, k=1)[0][:, 0].to(z.dtype)

    def forward(self, batch):
        z1 = self.projector(self.encoder(batch["view_0"]))
        z2 = self.projector(self.encoder(batch["view_1"]))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        nn1, nn2 = self.neighbours(z1), self.neighbours(z2)
        loss = (nnclr_loss(nn1, p2, self.cfg.temperature) + nnclr_loss(nn2, p1, self.cfg.temperature)) / 2
        self._pending = F.normalize(z1.detach().float(), dim=1)
        # Mean cosine between a projection and its neighbour: how far the positives are shifted.
        return {"loss": loss, "nn_similarity": (nn1 * self._pending.to(nn1.dtype)).sum(dim=1).mean()}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Add this step's view-a projections (from every worker) to the support set."""
        if self._pending is not None:
            self.support.enqueue(self._pending)
            self._pending = None
