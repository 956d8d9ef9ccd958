"""BEiT v2 (Peng et al., "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers", 2022).

BEiT's masked modeling with two changes:
tokenizer: VQ-KD (components/methods/vqkd.py), whose codes carry a trained teacher's semantics
           (``tokenizer: <tokenizers entry of kind vqkd>``; the DAG is dino -> vqkd -> beitv2);
patch aggregation (Sec. 3.2): the last layer's CLS token is concatenated with the patch tokens
           of layer l (paper: 9 of 12) and a shallow 2-block Transformer predicts the masked codes
           from them through the *shared* final norm and classifier: L = L_MIM + L_MIM^c. The
           early patches lack what the later layers computed, so CLS must aggregate it.
views:     crop + flip, no colour jitter (its code's defaults)
The representation is the encoder's CLS token, which patch aggregation trains.
"""

from __future__ import annotations

from pydantic import Field

from components.losses.mim import masked_token_loss
from components.methods.beit import BEiT, BEiTConfig
from components.models.mim_heads import PatchAggregationHead, forward_with_mask_tokens


class BEiTV2Config(BEiTConfig):
    """BEiT v2 settings: BEiT's plus the patch-aggregation head."""

    color_jitter: float = Field(0.0, ge=0, le=1)
    crop_scale: tuple[float, float] = Field((0.2, 1.0))
    aggregation_layer: int | None = Field(None, ge=1, description="l, whose patch tokens join the final CLS; None: depth - 3 (paper 9 of 12), at least 1")
    aggregation_depth: int = Field(2, ge=1, description="blocks of the shallow head (paper 2)")


class BEiTV2(BEiT):
    """BEiT + patch aggregation; the VQ-KD tokenizer is attached, frozen."""

    name = "beitv2"
    Config = BEiTV2Config

    def __init__(self, cfg: BEiTV2Config):
        super().__init__(cfg)
        depth = len(self.backbone.vit.blocks)
        self.layer = min(depth, cfg.aggregation_layer or max(1, depth - 3))
        heads = self.backbone.vit.blocks[0].attn.num_heads
        self.aggregation = PatchAggregationHead(self.backbone.feature_dim, cfg.aggregation_depth, heads)

    def forward(self, batch):
        x = batch["view_0"]
        codes, mask = self.tokenize(x), self.mask(x.shape[0], x.device)
        hidden, early = forward_with_mask_tokens(self.backbone, x, mask, self.mask_token, layer=self.layer)
        norm = self.backbone.vit.norm
        logits = self.head(norm(hidden)[:, 1:][mask])
        aggregated = self.aggregation(hidden[:, 0], early[:, 1:])
        logits_cls = self.head(norm(aggregated)[mask])
        loss_mim, loss_cls = masked_token_loss(logits, codes, mask), masked_token_loss(logits_cls, codes, mask)
        return {"loss": loss_mim + loss_cls, "loss_mim": loss_mim.detach(), "loss_aggregation": loss_cls.detach(),
                "mim_accuracy": (logits.argmax(-1) == codes[mask]).float().mean()}
