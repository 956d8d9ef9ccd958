"""BEiT (Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022).

views:     one crop (random-resized) + flip + colour jitter 0.4 (Sec. 2.5 and its code)
tokenizer: a trained image tokenizer step (``tokenizer: <tokenizers entry>``; the paper used
           DALL-E's dVAE, here a VQ-VAE trained in the DAG: components/methods/vqvae.py), frozen,
           mapping every patch of the *uncorrupted* image to one of K codes
mask:      block-wise, ~40 % of the patches, rectangles of >= 16 patches (Algorithm 1)
encoder:   the ViT on every position, masked patch embeddings replaced by a learnt mask token
loss:      cross-entropy of a linear classifier over the K codes, on the masked positions (Eq. 1)
optim:     AdamW, lr 1.5e-3 for batch 2000 (1.9e-4 per 256), wd 0.05, 10 warm-up epochs, cosine
The representation is the encoder's CLS token on the whole image.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from components.data.views import ViewRecipe, ViewSpec
from components.errors import ReprflowError
from components.losses.mim import masked_token_loss
from components.methods.base import Method, MethodConfig, Upstream
from components.models.backbones import BackboneConfig, build_backbone
from components.models.masking import block_mask, patch_grid
from components.models.mim_heads import forward_with_mask_tokens


class BEiTConfig(MethodConfig):
    """BEiT settings; defaults are the paper's. ``num_codes`` must equal the tokenizer's."""

    backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(name="vit_base", patch_size=16, img_size=224))
    image_size: int = Field(224, ge=8, le=1024)
    tokenizer: str | None = Field(None, description="the image tokenizer: an entry of the pipeline's tokenizers section")
    num_codes: int = Field(8192, ge=2, description="K, the tokenizer's codebook size")
    mask_ratio: float = Field(0.4, gt=0, lt=1)
    min_block: int = Field(16, ge=1, description="smallest masked rectangle in patches (paper 16)")
    max_block: int | None = Field(None, ge=1, description="largest rectangle; None: the whole budget")
    color_jitter: float = Field(0.4, ge=0, le=1, description="brightness/contrast/saturation strength (0: none)")
    crop_scale: tuple[float, float] = Field((0.08, 1.0))

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        return {"name": "adamw", "lr": 1.9e-4, "betas": (0.9, 0.999), "weight_decay": 0.05, "warmup_epochs": 10}

    @model_validator(mode="after")
    def _check(self):
        h, w = patch_grid(self.image_size, self.backbone)
        budget = round(self.mask_ratio * h * w)
        if self.min_block > budget:
            raise ValueError(f"min_block {self.min_block} exceeds the masking budget of {budget} patches ({self.mask_ratio} of {h}x{w}); lower min_block")
        return self


class BEiT(Method):
    """ViT with a mask token + a linear visual-token classifier; the tokenizer is attached, frozen."""

    name = "beit"
    Config = BEiTConfig
    references = ("tokenizer",)

    def __init__(self, cfg: BEiTConfig):
        super().__init__(cfg)
        self.backbone = build_backbone(cfg.backbone)
        self.grid = patch_grid(cfg.image_size, cfg.backbone)
        d = self.backbone.feature_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.head = nn.Linear(d, cfg.num_codes)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self._tokenizer: list[nn.Module] = []  # plain list: not in state_dict

    @property
    def encoder(self):
        return self.backbone

    @property
    def views(self) -> ViewRecipe:
        c = self.cfg
        j = c.color_jitter
        spec = ViewSpec(size=c.image_size, scale=tuple(c.crop_scale), jitter_p=1.0 if j else 0.0, brightness=j, contrast=j, saturation=j, hue=0.0,
                        gray_p=0.0, blur_p=0.0)
        return ViewRecipe(views=(spec,))

    def attach(self, resources: dict[str, Upstream]) -> None:
        """Take the trained tokenizer from the upstream ``tokenizer[...]`` step."""
        up = resources.get("tokenizer")
        if up is not None:
            self.use_tokenizer(up.load_method())

    def use_tokenizer(self, tokenizer: nn.Module) -> None:
        """Use ``tokenizer`` (``tokenize(x) -> (N, L)``, ``num_codes``, ``patch_size``), frozen."""
        if tokenizer.num_codes != self.cfg.num_codes:
            raise ReprflowError(f"{self.name}: settings.num_codes is {self.cfg.num_codes} but the tokenizer has {tokenizer.num_codes} codes; make them equal")
        if tokenizer.patch_size != self.cfg.backbone.patch_size:
            raise ReprflowError(f"{self.name}: the tokenizer's patches are {tokenizer.patch_size} px, the ViT's {self.cfg.backbone.patch_size} px; make them equal")
        tokenizer = tokenizer.eval()
        for p in tokenizer.parameters():
            p.requires_grad_(False)
        self._tokenizer = [tokenizer]

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen tokenizer's codes of the uncorrupted images: (N, L) long."""
        if not self._tokenizer:
            raise ReprflowError(f"{self.name} has no tokenizer: set settings.tokenizer to an entry of the pipeline's tokenizers section")
        tok = self._tokenizer[0]
        if next(tok.parameters()).device != x.device:
            tok.to(x.device)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return tok.tokenize(x.float())

    def mask(self, n: int, device) -> torch.Tensor:
        """A batch of BEiT block masks (N, L) bool."""
        c = self.cfg
        return block_mask(n, self.grid, c.mask_ratio, c.min_block, c.max_block, device=device)

    def forward(self, batch):
        x = batch["view_0"]
        codes, mask = self.tokenize(x), self.mask(x.shape[0], x.device)
        hidden, _ = forward_with_mask_tokens(self.backbone, x, mask, self.mask_token)
        logits = self.head(self.backbone.vit.norm(hidden)[:, 1:][mask])
        loss = masked_token_loss(logits, codes, mask)
        return {"loss": loss, "mim_accuracy": (logits.argmax(-1) == codes[mask]).float().mean()}
