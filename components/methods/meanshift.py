"""Mean Shift, MSF (Koohpayegani et al., ICCV 2021): pull a view towards its target's neighbours.

Online encoder -> projector -> predictor on a *strong* view; a momentum target encoder ->
projector on a *weak* view (crop + flip only). The target's k nearest neighbours in a memory
bank of past targets (and the target itself) are the positives: the prediction is pulled to
all of them. After the step the target network moves towards the online one and the bank
receives the batch's targets, gathered from every worker.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from components.data.views import ViewRecipe, ViewSpec, mocov2_view
from components.losses.msf import msf_loss
from components.methods.base import Method, MethodConfig
from components.models.backbones import build_backbone
from components.models.ema import cosine_momentum, ema_update, frozen_copy
from components.models.heads import mlp_head
from components.models.memory_bank import MemoryBank


class MeanShiftConfig(MethodConfig):
    """MSF settings; defaults follow the paper's ResNet-50 recipe (MLPs 4096 -> 512)."""

    proj_hidden_dim: int = Field(4096, ge=1)
    proj_dim: int = Field(512, ge=1)
    pred_hidden_dim: int = Field(4096, ge=1)
    bank_size: int = Field(128_000, ge=1, description="memory bank of past target embeddings (paper: 128,000)")
    k: int = Field(5, ge=1, description="nearest neighbours of the target, itself included (paper: 5)")
    momentum: float = Field(0.99, ge=0, le=1, description="target EMA momentum at step 0")
    momentum_final: float = Field(1.0, ge=0, le=1, description="momentum at the last step (half cosine); = momentum for a constant one")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="random-resized-crop area range of both views")
    jitter_strength: float = Field(1.0, ge=0, le=4, description="multiplies the strong view's colour jitter (MoCo v2's 0.4, 0.4, 0.4, 0.1)")
    target_view: Literal["weak", "strong"] = Field("weak", description="the target's view: 'weak' (crop + flip; the paper's default MSF w/s) or 'strong' "
                                                                       "(MoCo v2's, as the online view: the paper's s/s variant) - with weak targets the "
                                                                       "neighbours share what a crop keeps, colour included")

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        """SGD, lr 0.05 per 256 images, momentum 0.9, weight decay 1e-4, cosine, no warm-up."""
        return {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 0}


class MeanShift(Method):
    """Online encoder/projector/predictor, momentum target, memory bank of targets."""

    name = "meanshift"
    Config = MeanShiftConfig

    def __init__(self, cfg: MeanShiftConfig):
        super().__init__(cfg)
        self.encoder = build_backbone(cfg.backbone)
        self.projector = mlp_head(self.encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = mlp_head(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.target_encoder = frozen_copy(self.encoder)
        self.target_projector = frozen_copy(self.projector)
        self.bank = MemoryBank(cfg.bank_size, cfg.proj_dim)
        self._pending: torch.Tensor | None = None  # this step's targets, enqueued in on_step_end

    @property
    def views(self) -> ViewRecipe:
        size, scale = self.cfg.image_size, tuple(self.cfg.crop_scale)
        strong = mocov2_view(size, scale, self.cfg.jitter_strength)  # MoCo v2's: jitter 0.4/0.4/0.4/0.1, gray, blur
        weak = ViewSpec(size=size, scale=scale, jitter_p=0.0, gray_p=0.0, blur_p=0.0) if self.cfg.target_view == "weak" else strong
        return ViewRecipe(views=(weak, strong))  # view_0 -> target, view_1 -> online

    def forward(self, batch):
        prediction = self.predictor(self.projector(self.encoder(batch["view_1"])))
        with torch.no_grad():
            target = F.normalize(self.target_projector(self.target_encoder(batch["view_0"])).float(), dim=1)
        loss = msf_loss(prediction, target, self.bank.contents(), self.cfg.k)
        self._pending = target
        return {"loss": loss}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Move the target network towards the online one; add this step's targets to the bank."""
        m = cosine_momentum(step, total_steps, self.cfg.momentum, self.cfg.momentum_final)
        ema_update(self.target_encoder, self.encoder, m)
        ema_update(self.target_projector, self.projector, m)
        if self._pending is not None:
            self.bank.enqueue(self._pending)
            self._pending = None
