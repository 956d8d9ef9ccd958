"""Heads of masked image modeling and the ViT forward with mask tokens.

- :class:`MAEDecoder`: MAE's lightweight decoder (He et al., CVPR 2022, Sec. 3): the encoded
  visible tokens are projected to the decoder width, a shared learnt mask token fills every
  masked position, the sequence is put back in grid order, fixed 2-D sin-cos positions are
  added, a few Transformer blocks run and a linear layer predicts each patch's pixels.
- :func:`forward_with_mask_tokens`: BEiT's encoder input (Bao et al., ICLR 2022, Sec. 2.2):
  masked patch embeddings are replaced by a learnt mask token *before* the position embedding;
  the encoder sees every position. Also returns an intermediate layer's hidden states (BEiT v2).
- :class:`PatchAggregationHead`: BEiT v2's patch aggregation (Peng et al., 2022, Sec. 3.2):
  ``[CLS of the last layer ; patch tokens of layer l]`` through a shallow (2-block) Transformer,
  whose outputs go to the *shared* MIM head, so the CLS token must gather what the patches of
  an early layer lack.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from components.models.vit import ViTBackbone


def init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights, zero biases, unit LayerNorms (ViT/MAE init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def transformer_blocks(dim: int, depth: int, heads: int) -> nn.Sequential:
    """``depth`` pre-norm ViT blocks (timm's), MLP ratio 4."""
    return nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth)])


class MAEDecoder(nn.Module):
    """Visible tokens (N, 1 + K, in_dim), CLS first -> per-patch pixel predictions (N, L, patch_dim)."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, patch_dim: int, grid: tuple[int, int]):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = build_sincos2d_pos_embed(list(grid), dim)  # (h*w, dim), fixed as in MAE
        self.register_buffer("pos", torch.cat([torch.zeros(1, dim), pos])[None], persistent=False)
        self.blocks = transformer_blocks(dim, depth, heads)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """``restore`` (N, L) puts ``[visible..., masked...]`` back in grid order (see ``RandomMask``)."""
        x = self.embed(tokens)
        n, length = restore.shape
        fill = self.mask_token.expand(n, length + 1 - x.shape[1], -1).to(x.dtype)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos.to(x.dtype)
        return self.pred(self.norm(self.blocks(x)))[:, 1:]


def forward_with_mask_tokens(vit: ViTBackbone, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor,
                             layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``vit`` on every position, masked patch embeddings replaced by ``mask_token``.

    ``mask``: (N, L) bool, True = masked; ``mask_token``: (1, 1, D). Returns the hidden states
    after the last block **before** the final norm (N, 1 + L, D), CLS first (apply
    ``vit.vit.norm``), and those after block ``layer`` (1-based) when ``layer`` is given.
    """
    v = vit.vit
    t = v.patch_embed(x)  # (N, h, w, D) with dynamic_img_size
    t = torch.where(mask.reshape(t.shape[:-1])[..., None], mask_token.to(t.dtype), t)
    h = v.norm_pre(v.patch_drop(v._pos_embed(t)))
    inter = None
    for i, blk in enumerate(v.blocks):
        h = blk(h)
        if layer is not None and i + 1 == layer:
            inter = h
    return h, inter


class PatchAggregationHead(nn.Module):
    """``depth`` Transformer blocks over ``[cls ; patches]``; returns the patch outputs (N, L, D), un-normed."""

    def __init__(self, dim: int, depth: int = 2, heads: int = 4):
        super().__init__()
        self.blocks = transformer_blocks(dim, depth, heads)
        init_weights(self)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """``cls``: (N, D) last-layer CLS; ``patches``: (N, L, D) an intermediate layer's patch tokens."""
        return self.blocks(torch.cat([cls[:, None], patches], dim=1))[:, 1:]
