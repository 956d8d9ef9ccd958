"""Vision Transformers (timm) behind reprflow's backbone interface, plus a visible-tokens path.

``ViTBackbone`` wraps :class:`timm.models.vision_transformer.VisionTransformer` with
``num_classes=0`` and ``dynamic_img_size=True``: the position embedding is resampled to the
input's patch grid, so one backbone takes DINO's global and local crops alike. ``forward``
returns the final-norm CLS token. :meth:`ViTBackbone.forward_masked` runs only the kept
patches (MAE, He et al., CVPR 2022, Sec. 3: "the encoder is applied only on visible patches").
"""

from __future__ import annotations

import re

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# name -> (embed_dim, depth, num_heads), as in DeiT (Touvron et al., 2021) and timm.
VITS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "reg_token")


class ViTBackbone(nn.Module):
    """A timm ViT without its classifier; ``forward`` returns the CLS token (N, ``feature_dim``).

    ``cfg`` is a :class:`components.models.backbones.BackboneConfig` with a ``vit_*`` name;
    ``embed_dim``/``depth``/``num_heads`` override the preset (tiny test models).
    """

    def __init__(self, cfg):
        super().__init__()
        dim, depth, heads = VITS[cfg.name]
        dim, depth, heads = cfg.embed_dim or dim, cfg.depth or depth, cfg.num_heads or heads
        self.vit = VisionTransformer(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=dim, depth=depth, num_heads=heads,
            num_classes=0, global_pool="token", dynamic_img_size=True, drop_path_rate=cfg.drop_path_rate,
        )
        self.feature_dim = dim
        self.num_layers = depth + 1  # embeddings = 0, block i = i + 1, everything after = depth + 1
        self.config = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm, CLS first: (N, 1 + h*w, feature_dim)."""
        return self.vit.forward_features(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens laid out on their grid (N, feature_dim, h, w), like a ResNet's last stage."""
        p = self.vit.patch_embed.patch_size
        h, w = x.shape[-2] // p[0], x.shape[-1] // p[1]
        patches = self.tokens(x)[:, self.vit.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(x.shape[0], self.feature_dim, h, w)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + position embedding, prefix (CLS) tokens first: (N, 1 + h*w, D).

        The first half of timm's ``forward_features``, split off so the masked path can gather
        between the position embedding and the blocks.
        """
        return self.vit.norm_pre(self.vit.patch_drop(self.vit._pos_embed(self.vit.patch_embed(x))))

    def forward_masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Run the blocks on the visible patches only.

        ``keep``: (N, K) long indices of the patches to keep (row-major on the patch grid),
        per sample. Position embeddings are added *before* the gather, so each kept token still
        knows where it came from. Returns the normed tokens (N, 1 + K, D), CLS first; with every
        index kept in order it equals :meth:`tokens`.
        """
        t = self.embed_patches(x)
        prefix, patches = t[:, : self.vit.num_prefix_tokens], t[:, self.vit.num_prefix_tokens :]
        visible = torch.gather(patches, 1, keep[..., None].expand(-1, -1, patches.shape[-1]))
        return self.vit.norm(self.vit.blocks(torch.cat([prefix, visible], dim=1)))

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay (BEiT, Bao et al., 2022, Sec. 2.6).

        Works on any prefixed name (``encoder.vit.blocks.3.mlp.fc1.weight`` -> 4): embeddings
        are 0, block ``i`` is ``i + 1``, the final norm and anything outside the ViT (heads)
        are ``num_layers`` (lr scale 1).
        """
        m = _BLOCK.search(name)
        if m:
            return int(m.group(1)) + 1
        if any(part in _EMBEDDINGS for part in name.split(".")):
            return 0
        return self.num_layers
