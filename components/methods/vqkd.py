"""VQ-KD, BEiT v2's tokenizer (Peng et al., "BEiT v2: Masked Image Modeling with Vector-Quantized
Visual Tokenizers", 2022, Sec. 2.1): codes trained to reconstruct a *teacher's* patch features.

encoder:  a ViT over the image; each patch token -> Linear-Tanh-Linear -> code_dim (small: 32)
quantise: nearest L2-normalised code by cosine, EMA codebook (components/tokenizers/image_vq.py)
decoder:  Linear to the decoder width + fixed sin-cos positions -> Transformer blocks (paper: 3)
          -> Linear-Tanh-Linear to the teacher's feature dimension
loss:     mean_i (1 - cos(o_i, t_i)) + beta * ||l2(h_i) - sg[l2(v_zi)]||^2   (Eq. 2)
teacher:  a trained encoder of this pipeline (``teacher: dino``, a method name, or a
          ``models:/...`` URI), attached frozen by the training loop and kept out of the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from timm.layers import build_sincos2d_pos_embed
from torch import nn

from components.data.views import ViewRecipe, ViewSpec
from components.errors import ReprflowError
from components.losses.mim import vqkd_loss
from components.methods.base import Method, MethodConfig, Upstream
from components.models.backbones import BackboneConfig, build_backbone
from components.models.masking import patch_grid
from components.models.mim_heads import transformer_blocks, init_weights
from components.tokenizers.image_vq import CosineCodebook


class VQKDConfig(MethodConfig):
    """VQ-KD settings; defaults are the paper's (K 8192, code dim 32, 3 decoder blocks)."""

    backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(name="vit_base", patch_size=16, img_size=224))
    image_size: int = Field(224, ge=8, le=1024)
    teacher: str | None = Field(None, description="the teacher: a method of this pipeline (e.g. dino) or models:/name@alias")
    teacher_dim: int | None = Field(None, ge=1, description="the teacher's feature width; None: the same as this encoder's")
    num_codes: int = Field(8192, ge=2)
    code_dim: int = Field(32, ge=2)
    decoder_depth: int = Field(3, ge=1)
    beta: float = Field(1.0, ge=0, description="commitment weight")
    decay: float = Field(0.99, gt=0, lt=1, description="EMA decay of the codebook")
    crop_scale: tuple[float, float] = Field((0.2, 1.0))

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        return {"name": "adamw", "lr": 5e-5, "betas": (0.9, 0.99), "weight_decay": 1e-4, "warmup_epochs": 10}

    @model_validator(mode="after")
    def _check(self):
        patch_grid(self.image_size, self.backbone)
        return self


class VQKD(Method):
    """ViT encoder -> cosine codebook -> Transformer decoder regressing the teacher's patch features."""

    name = "vqkd"
    Config = VQKDConfig
    is_tokenizer = True
    references = ("teacher",)

    def __init__(self, cfg: VQKDConfig):
        super().__init__(cfg)
        self.backbone = build_backbone(cfg.backbone)
        d = self.backbone.feature_dim
        self.grid = patch_grid(cfg.image_size, cfg.backbone)
        self.to_code = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, cfg.code_dim))
        self.codebook = CosineCodebook(cfg.num_codes, cfg.code_dim, cfg.decay)
        self.from_code = nn.Linear(cfg.code_dim, d)
        self.register_buffer("pos", build_sincos2d_pos_embed(list(self.grid), d)[None], persistent=False)
        self.decoder = transformer_blocks(d, cfg.decoder_depth, self.backbone.vit.blocks[0].attn.num_heads)
        self.decoder_norm = nn.LayerNorm(d)
        self.to_teacher = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, cfg.teacher_dim or d))
        self._teacher: list[tuple[nn.Module, int | None]] = []  # plain list: not in state_dict
        init_weights(nn.ModuleList([self.to_code, self.from_code, self.decoder, self.to_teacher]))

    @property
    def encoder(self):
        return self.backbone

    @property
    def num_codes(self) -> int:
        return self.cfg.num_codes

    @property
    def patch_size(self) -> int:
        return self.cfg.backbone.patch_size

    @property
    def views(self) -> ViewRecipe:
        return ViewRecipe(views=(ViewSpec(size=self.cfg.image_size, scale=tuple(self.cfg.crop_scale), jitter_p=0.0, gray_p=0.0, blur_p=0.0),))

    def attach(self, resources: dict[str, Upstream]) -> None:
        """Take the trained teacher (its ``encoder``, frozen) from the upstream step."""
        up = resources.get("teacher")
        if up is not None:
            self.use_teacher(up.load_method().encoder, up.settings.get("image_size"))

    def use_teacher(self, teacher: nn.Module, image_size: int | None = None) -> None:
        """Use ``teacher`` (any backbone with ``feature_map``) as the frozen target network."""
        width = self.cfg.teacher_dim or self.backbone.feature_dim
        if teacher.feature_dim != width:
            raise ReprflowError(f"vqkd: the teacher's features have {teacher.feature_dim} dimensions, the tokenizer predicts {width}: "
                                f"set settings.teacher_dim: {teacher.feature_dim}")
        teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._teacher = [(teacher, image_size)]

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's patch features on this tokenizer's grid: (N, h*w, C)."""
        if not self._teacher:
            raise ReprflowError("vqkd has no teacher: set settings.teacher to a trained method of the pipeline (e.g. dino) or a models:/ URI")
        teacher, size = self._teacher[0]
        if next(teacher.parameters()).device != x.device:
            teacher.to(x.device)
        if size and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            fm = teacher.feature_map(x)
            if fm.shape[-2:] != self.grid:
                fm = F.interpolate(fm, size=self.grid, mode="bilinear", align_corners=False)
        return fm.flatten(2).transpose(1, 2)

    def quantize(self, x: torch.Tensor):
        """Encode and quantise: ``(straight-through codes (N, L, d), indices (N, L), l2(h) (N, L, d))``."""
        h = self.backbone.tokens(x)[:, self.backbone.vit.num_prefix_tokens:]
        return self.codebook(self.to_code(h))

    def forward(self, batch):
        x = batch["view_0"]
        target = self.teacher_features(x)
        q, codes, zn = self.quantize(x)
        o = self.decoder_norm(self.decoder(self.from_code(q.to(x.dtype)) + self.pos.to(x.dtype)))
        loss = vqkd_loss(self.to_teacher(o), target, zn, q, self.cfg.beta)
        return {"loss": loss, "codebook_usage": self.codebook.usage_of(codes)}

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of a normalised image batch: (N, h*w) long, row-major like ViT patches."""
        h = self.backbone.tokens(x)[:, self.backbone.vit.num_prefix_tokens:]
        return self.codebook.lookup(self.to_code(h))
