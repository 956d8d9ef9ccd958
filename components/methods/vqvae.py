"""VQ-VAE image tokenizer for BEiT (van den Oord et al., NeurIPS 2017; its EMA codebook, App. A.1).

BEiT (Bao et al., ICLR 2022, Sec. 2.1) borrowed DALL-E's discrete VAE, which cannot be
downloaded here; this tokenizer is trained in the DAG instead (a ``tokenizers:`` entry). It maps
each patch of the ViT's grid to one of K codes:

encoder:  3x3 conv -> patch-size conv with stride = patch (one cell per ViT patch) -> 2 residual
          3x3 blocks (neighbouring patches inform each code, as in the dVAE) -> 1x1 to code_dim
quantise: cosine lookup in an L2-normalised, EMA-updated codebook (components/tokenizers/image_vq.py)
decoder:  mirror of the encoder, transposed patch conv back to pixels
loss:     MSE(reconstruction, image) + beta * commitment (Eq. 3; the codebook term is the EMA)
Why a VQ-VAE and not a Gumbel-softmax dVAE: see the README (deterministic argmax codes, no
temperature/KL schedules to tune in short runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.data.views import ViewRecipe, ViewSpec
from components.losses.mim import vq_commitment_loss
from components.methods.base import Method, MethodConfig
from components.tokenizers.image_vq import CosineCodebook


class VQVAEConfig(MethodConfig):
    """Tokenizer settings. ``patch_size`` must equal the ViT patch size of the method using it."""

    patch_size: int = Field(16, ge=1, le=64, description="one code per patch_size x patch_size pixels")
    num_codes: int = Field(8192, ge=2, description="K (DALL-E's dVAE: 8192)")
    code_dim: int = Field(32, ge=2, description="dimension of the (L2-normalised) codes")
    hidden_dim: int = Field(128, ge=8, description="channels of the conv encoder/decoder")
    beta: float = Field(0.25, ge=0, description="commitment weight (VQ-VAE Eq. 3)")
    decay: float = Field(0.99, gt=0, lt=1, description="EMA decay of the codebook")
    crop_scale: tuple[float, float] = Field((0.2, 1.0))

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        return {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 1}


class _Residual(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.GELU(), nn.Conv2d(ch, ch, 3, padding=1), nn.GELU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.body(x)


class _GridPool(nn.Module):
    """The contract's ``encoder``: the mean of the normalised pre-quantisation codes (N, code_dim)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return F.normalize(self.net(x), dim=1).mean(dim=(2, 3))


class VQVAE(Method):
    """Conv encoder -> cosine codebook -> conv decoder; ``tokenize`` gives (N, h*w) codes."""

    name = "vqvae"
    Config = VQVAEConfig
    is_tokenizer = True

    def __init__(self, cfg: VQVAEConfig):
        super().__init__(cfg)
        c, p = cfg.hidden_dim, cfg.patch_size
        self.enc = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, padding=1), nn.GELU(), nn.Conv2d(c // 2, c, p, stride=p),
            _Residual(c), _Residual(c), nn.GELU(), nn.Conv2d(c, cfg.code_dim, 1),
        )
        self.codebook = CosineCodebook(cfg.num_codes, cfg.code_dim, cfg.decay)
        self.dec = nn.Sequential(
            nn.Conv2d(cfg.code_dim, c, 1), _Residual(c), _Residual(c), nn.GELU(),
            nn.ConvTranspose2d(c, c // 2, p, stride=p), nn.GELU(), nn.Conv2d(c // 2, 3, 3, padding=1),
        )

    @property
    def encoder(self):
        return _GridPool(self.enc)

    @property
    def num_codes(self) -> int:
        return self.cfg.num_codes

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def views(self) -> ViewRecipe:
        return ViewRecipe(views=(ViewSpec(size=self.cfg.image_size, scale=tuple(self.cfg.crop_scale), jitter_p=0.0, gray_p=0.0, blur_p=0.0),))

    def forward(self, batch):
        x = batch["view_0"]
        z = self.enc(x).permute(0, 2, 3, 1)  # (N, h, w, d)
        q, codes, zn = self.codebook(z)
        recon = self.dec(q.permute(0, 3, 1, 2).to(x.dtype))
        rec = F.mse_loss(recon.float(), x.float())
        commit = vq_commitment_loss(zn, q)
        return {"loss": rec + self.cfg.beta * commit, "recon_mse": rec.detach(), "commitment": commit.detach(),
                "codebook_usage": self.codebook.usage_of(codes)}

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of a normalised image batch (N, 3, H, W): (N, h*w) long, row-major like ViT patches."""
        z = self.enc(x).permute(0, 2, 3, 1)
        return self.codebook.lookup(z).flatten(1)
