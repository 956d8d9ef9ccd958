"""SimCLR (Chen et al., ICML 2020): two views, a projection head and NT-Xent over the batch."""

from __future__ import annotations

from pydantic import Field

from components.data.views import ViewRecipe, ViewSpec
from components.losses.ntxent import ntxent_loss
from components.methods.base import Method, MethodConfig
from components.models.backbones import build_backbone
from components.models.heads import mlp_head


class SimCLRConfig(MethodConfig):
    """SimCLR settings; defaults follow the paper (2-layer head, 128-d output, LARS)."""

    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1)
    temperature: float = Field(0.5, gt=0)
    jitter_strength: float = Field(1.0, ge=0, le=2, description="colour distortion strength s of the paper")
    blur_p: float = Field(0.5, ge=0, le=1)
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="random-resized-crop area range (paper: 0.08-1 on ImageNet)")


class SimCLR(Method):
    """Encoder -> MLP projector -> NT-Xent between the two views, negatives from the global batch."""

    name = "simclr"
    Config = SimCLRConfig

    def __init__(self, cfg: SimCLRConfig):
        super().__init__(cfg)
        self.encoder = build_backbone(cfg.backbone)
        self.projector = mlp_head(self.encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)

    @property
    def views(self) -> ViewRecipe:
        s = self.cfg.jitter_strength
        spec = ViewSpec(size=self.cfg.image_size, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s, blur_p=self.cfg.blur_p, scale=tuple(self.cfg.crop_scale))
        return ViewRecipe(views=(spec, spec))

    def forward(self, batch):
        z1 = self.projector(self.encoder(batch["view_0"]))
        z2 = self.projector(self.encoder(batch["view_1"]))
        return {"loss": ntxent_loss(z1, z2, self.cfg.temperature)}
