"""Spectral contrastive learning, SCL (HaoChen et al., NeurIPS 2021).

Encoder -> projector, two views per image, and the spectral contrastive loss: align the two
views' embeddings, and push the squared inner products of different images' embeddings to 0
(negatives from the global batch).
"""

from __future__ import annotations

from pydantic import Field

from components.data.views import ViewRecipe, mocov2_view
from components.losses.scl import spectral_contrastive_loss
from components.methods.base import Method, MethodConfig
from components.models.backbones import build_backbone
from components.models.heads import mlp_head


class SCLConfig(MethodConfig):
    """SCL settings; defaults follow the authors' ImageNet recipe (3-layer 8192-wide MLP, mu 10)."""

    proj_hidden_dim: int = Field(8192, ge=1)
    proj_dim: int = Field(8192, ge=1)
    proj_layers: int = Field(3, ge=1)
    proj_last_bn: bool = Field(True, description="affine-free BatchNorm on the projector output, as the paper; False: none (SimCLR's head)")
    mu: float = Field(10.0, gt=0, description="embeddings clipped to norm sqrt(mu), loss divided by mu (1 on CIFAR, 10 on ImageNet)")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="random-resized-crop area range")
    jitter_strength: float = Field(1.0, ge=0, le=4, description="multiplies MoCo v2's colour jitter (0.4, 0.4, 0.4, 0.1); "
                                                                "2 is about SimCLR's s = 1, for data whose colours say nothing of the content")

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        """SGD, lr 0.05 per 256 images, momentum 0.9, weight decay 1e-4, cosine, no warm-up."""
        return {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 0}


class SCL(Method):
    """Encoder -> MLP projector -> spectral contrastive loss between the two views."""

    name = "scl"
    Config = SCLConfig

    def __init__(self, cfg: SCLConfig):
        super().__init__(cfg)
        self.encoder = build_backbone(cfg.backbone)
        # The authors' projector ends in BatchNorm without ReLU ("norelu"): embeddings may be
        # negative, which the squared negative term needs to reach 0.
        self.projector = mlp_head(self.encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, last_bn=cfg.proj_last_bn)

    @property
    def views(self) -> ViewRecipe:
        spec = mocov2_view(self.cfg.image_size, self.cfg.crop_scale, self.cfg.jitter_strength)  # SimSiam's recipe
        return ViewRecipe(views=(spec, spec))

    def forward(self, batch):
        z1 = self.projector(self.encoder(batch["view_0"]))
        z2 = self.projector(self.encoder(batch["view_1"]))
        return {"loss": spectral_contrastive_loss(z1, z2, self.cfg.mu)}
