"""MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

views:    one crop (random-resized, scale 0.2-1) + flip; no colour augmentation (Sec. 4, App. A.1)
mask:     75 % of the patches, uniformly at random per sample
encoder:  the ViT on the visible patches only (gathered; no mask tokens in the encoder)
decoder:  lightweight Transformer with a shared mask token and fixed sin-cos positions
loss:     MSE on the masked patches only, targets normalised per patch (the paper's default)
optim:    AdamW, lr 1.5e-4 x B/256, betas (0.9, 0.95), wd 0.05, 40 warm-up epochs, cosine
The representation is the encoder's CLS token on the whole (unmasked) image.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from components.data.views import ViewRecipe, ViewSpec
from components.losses.mim import mae_loss
from components.methods.base import Method, MethodConfig
from components.models.backbones import BackboneConfig, build_backbone
from components.models.masking import patch_grid, patchify, random_patch_mask, unpatchify
from components.models.mim_heads import MAEDecoder


class MAEConfig(MethodConfig):
    """MAE settings; defaults are the paper's (decoder 8 blocks x 512, 16 heads)."""

    backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(name="vit_base", patch_size=16, img_size=224))
    image_size: int = Field(224, ge=8, le=1024)
    mask_ratio: float = Field(0.75, ge=0.0, lt=1.0)
    decoder_dim: int = Field(512, ge=8)
    decoder_depth: int = Field(8, ge=1)
    decoder_heads: int = Field(16, ge=1)
    norm_pix_loss: bool = Field(True, description="normalise each target patch by its mean/std (paper default)")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="random-resized-crop area range")

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        return {"name": "adamw", "lr": 1.5e-4, "betas": (0.9, 0.95), "weight_decay": 0.05, "warmup_epochs": 40}

    @model_validator(mode="after")
    def _check(self):
        patch_grid(self.image_size, self.backbone)
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")
        return self


class MAE(Method):
    """ViT encoder on visible patches + MAE decoder; loss on the masked patches."""

    name = "mae"
    Config = MAEConfig

    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        self.backbone = build_backbone(cfg.backbone)
        self.patch = cfg.backbone.patch_size
        self.grid = patch_grid(cfg.image_size, cfg.backbone)
        self.decoder = MAEDecoder(self.backbone.feature_dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, 3 * self.patch**2, self.grid)

    @property
    def encoder(self):
        return self.backbone

    @property
    def views(self) -> ViewRecipe:
        c = self.cfg
        return ViewRecipe(views=(ViewSpec(size=c.image_size, scale=tuple(c.crop_scale), jitter_p=0.0, gray_p=0.0, blur_p=0.0),))

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Mask, encode, decode one batch (N, 3, S, S) of normalised images.

        Returns ``pred``/``target`` (N, L, P) patches, the ``mask`` (N, L) and the reconstructed
        image (N, 3, S, S) in the input's scale (per-patch normalisation undone with the true
        patches' statistics, as in the paper's figures; visible patches pasted back in).
        """
        mask = random_patch_mask(x.shape[0], self.grid[0] * self.grid[1], self.cfg.mask_ratio, generator, x.device)
        pred = self.decoder(self.backbone.forward_masked(x, mask.keep), mask.restore)
        target = patchify(x, self.patch)
        shown = pred.detach().float()
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            shown = shown * (var + 1e-6).sqrt() + mean
        shown = torch.where(mask.mask[..., None], shown, target)
        return {"pred": pred, "target": target, "mask": mask.mask, "image": unpatchify(shown, self.patch, self.grid)}

    def forward(self, batch):
        out = self.reconstruct(batch["view_0"])
        loss = mae_loss(out["pred"], out["target"], out["mask"], self.cfg.norm_pix_loss)
        return {"loss": loss}

    @torch.no_grad()
    def figures(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"mae_reconstructions": uint8 (3, H, W)}``: rows of original | masked | reconstruction.

        ``x``: normalised images (N, 3, S, S). For the train step to save as a PNG artifact.
        """
        from components.data.views import IMAGENET_MEAN, IMAGENET_STD

        was = self.training
        self.eval()
        out = self.reconstruct(x, generator)
        self.train(was)
        keep = (~out["mask"]).float()[..., None].expand(-1, -1, 3 * self.patch**2)
        masked = unpatchify(patchify(x, self.patch) * keep, self.patch, self.grid)  # hidden patches: the mean colour
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        cols = [((t.float() * std + mean).clamp(0, 1) * 255).to(torch.uint8) for t in (x, masked, out["image"])]
        rows = [torch.cat([c[i] for c in cols], dim=2) for i in range(x.shape[0])]  # each (3, S, 3S)
        return {"mae_reconstructions": torch.cat(rows, dim=1)}
