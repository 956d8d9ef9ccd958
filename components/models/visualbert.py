"""VisualBERT's model (Li et al., "VisualBERT: A Simple and Performant Baseline for Vision and
Language", 2019): ONE transformer over ``[CLS] text [SEP] regions``.

- Text tokens: word + position + segment-0 embeddings (BERT).
- Region tokens (Sec. 3.1, "visual embeddings"): a region's appearance feature projected to the
  hidden size + segment-1 embedding + a box-position embedding. The paper takes regions and
  features from an object detector; here regions are the data's boxes and features are
  RoIAlign-pooled (He et al., 2017; ``torchvision.ops.roi_align``) bins of the feature map of a
  frozen visual encoder trained by the pipeline, flattened like a Faster R-CNN box head's input. The box embedding is a linear map of
  ``(x0, y0, x1, y1, w, h, area)`` in [0, 1] (as in UNITER, Chen et al., 2020), since our boxes
  carry no detector ordering.
- Every sample's regions start with the whole image; a row without boxes gets a ``grid x grid``
  grid of boxes instead (the documented fallback for datasets without boxes).
- Heads: masked-LM (BERT's transform + decoder tied to the word embeddings) and the
  sentence-image prediction head on the pooled ``[CLS]`` (2 classes: mismatched, matched).
The blocks are ``torch.nn.TransformerEncoderLayer`` (pre-norm, GELU); nothing is hand-written.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from components.models.backbones import Backbone

BOX_FREQUENCIES = 4
BOX_FEATURES = 7 * (1 + 2 * BOX_FREQUENCIES)


def region_features(feature_map: torch.Tensor, boxes: torch.Tensor, image_size: int, output_size: int = 2) -> torch.Tensor:
    """RoIAlign features of boxes: ``feature_map`` (N, C, h, w) of images ``image_size`` px wide,
    ``boxes`` (N, R, 4) normalised ``x0, y0, x1, y1`` -> (N, R, C * output_size**2).

    Each box is RoIAlign-ed to ``output_size x output_size`` bins (``aligned=True``: pixel
    centres at +0.5; adaptive sampling, ceil(bin size) points per bin side) and the bins are
    flattened channel-major, as Faster R-CNN's box head flattens its RoI bins: the coarse layout
    inside a box (where a triangle is narrow, where a ring is hollow) survives, which a mean
    would average away. On a box covering whole feature cells, each bin is the mean of its cells.
    """
    n, r = boxes.shape[:2]
    idx = torch.arange(n, device=boxes.device, dtype=boxes.dtype).repeat_interleave(r)[:, None]
    rois = torch.cat([idx, boxes.reshape(n * r, 4) * image_size], dim=1).to(feature_map.dtype)
    scale = feature_map.shape[-1] / image_size
    pooled = roi_align(feature_map, rois, output_size=(output_size, output_size), spatial_scale=scale, sampling_ratio=0, aligned=True)
    return pooled.reshape(n, r, -1)


def grid_boxes(grid: int) -> torch.Tensor:
    """A ``grid x grid`` tiling of the image as normalised boxes (grid*grid, 4), row-major."""
    t = torch.arange(grid, dtype=torch.float32) / grid
    y0, x0 = torch.meshgrid(t, t, indexing="ij")
    x0, y0 = x0.reshape(-1), y0.reshape(-1)
    return torch.stack([x0, y0, x0 + 1 / grid, y0 + 1 / grid], dim=1)


def sample_regions(boxes: torch.Tensor, grid: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The regions each sample is seen through: the whole image, then its boxes (-1 rows are
    missing), or a grid when it has none. ``boxes`` (N, B, 4) -> regions (N, 1 + max(B, grid^2), 4)
    and a validity mask (N, same)."""
    n, b = boxes.shape[:2]
    valid = (boxes >= 0).all(dim=-1)
    width = max(b, grid * grid)
    regions = torch.zeros(n, 1 + width, 4, dtype=boxes.dtype, device=boxes.device)
    mask = torch.zeros(n, 1 + width, dtype=torch.bool, device=boxes.device)
    regions[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=boxes.dtype, device=boxes.device)
    mask[:, 0] = True
    regions[:, 1 : 1 + b] = torch.where(valid[..., None], boxes, torch.zeros_like(boxes))
    mask[:, 1 : 1 + b] = valid
    empty = ~valid.any(dim=1)
    if empty.any():
        g = grid_boxes(grid).to(boxes)
        regions[empty, 1 : 1 + grid * grid] = g
        mask[empty, 1 : 1 + grid * grid] = True
    return regions, mask


def box_geometry(boxes: torch.Tensor) -> torch.Tensor:
    """``(x0, y0, x1, y1)`` -> ``g = (x0, y0, x1, y1, w, h, w*h)`` and its Fourier features
    ``sin/cos(2^k pi g)``, k < BOX_FREQUENCIES (the box-position embedding's input, BOX_FEATURES wide).

    The sinusoids (as in DETR's position encodings) let a linear map express "left third" or
    "bottom third" at once, and keep the normalised embedding from being blind to a box's scale
    (a LayerNorm of a linear map of g alone cannot tell g from 2g).
    """
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    g = torch.cat([boxes, w[..., None], h[..., None], (w * h)[..., None]], dim=-1)
    freqs = (2.0 ** torch.arange(BOX_FREQUENCIES, device=boxes.device, dtype=boxes.dtype)) * torch.pi
    angles = (g[..., None] * freqs).flatten(-2)
    return torch.cat([g, angles.sin(), angles.cos()], dim=-1)


class FrozenRegionEncoder:
    """A frozen visual encoder as a region-feature extractor: whole image + boxes -> RoIAlign
    features of its feature map (ResNets: after stage ``stage``; ViTs: the patch-token map).

    Deliberately not an ``nn.Module``: it must stay out of the owner's ``state_dict()``,
    optimizer and DDP wrapper. :meth:`cached` remembers features by sample content (at most
    ``cache_size`` samples): the encoder is frozen and the view deterministic, so a sample's
    features never change and the encoder runs once per sample instead of once per epoch.
    """

    def __init__(self, encoder: nn.Module, stage: int = 3, grid: int = 2, roi_output_size: int = 2, cache_size: int = 0):
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.stage, self.grid, self.roi_output_size, self.cache_size = stage, grid, roi_output_size, cache_size
        self.cache: dict[bytes, torch.Tensor] = {}

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's spatial features of normalised images (N, C, h, w)."""
        if isinstance(self.encoder, Backbone):
            return self.encoder.feature_map(images, self.stage)
        return self.encoder.feature_map(images)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised images (N, 3, S, S) + data boxes (N, B, 4) -> features (N, R, C * bins),
        region boxes (N, R, 4) and mask (N, R) (see :func:`sample_regions`)."""
        if next(self.encoder.parameters()).device != images.device:
            self.encoder.to(images.device)
        regions, mask = sample_regions(boxes.float(), self.grid)
        feats = region_features(self.feature_map(images).float(), regions, images.shape[-1], self.roi_output_size)
        return feats, regions, mask

    def cached(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`__call__`, reusing the features of samples seen before (same pixels and boxes)."""
        if not self.cache_size:
            return self(images, boxes)
        img, box = images.detach().cpu().contiguous(), boxes.detach().cpu().contiguous()
        keys = [hashlib.blake2b(img[i].numpy().tobytes() + box[i].numpy().tobytes(), digest_size=16).digest() for i in range(len(img))]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        fresh: dict[int, torch.Tensor] = {}
        if todo:
            feats, _, _ = self(images[todo], boxes[todo])
            fresh = dict(zip(todo, feats))
            for i, f in zip(todo, feats.cpu()):
                if len(self.cache) < self.cache_size:
                    self.cache[keys[i]] = f
        regions, mask = sample_regions(boxes.float(), self.grid)
        rows = [fresh[i] if i in fresh else self.cache[k] for i, k in enumerate(keys)]
        return torch.stack([r.to(images.device) for r in rows]), regions, mask


class VisualBertEmbeddings(nn.Module):
    """Token, position, segment and visual embeddings -> one sequence ``[text; regions]``."""

    def __init__(self, vocab_size: int, hidden: int, max_text_len: int, visual_dim: int, dropout: float):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_text_len, hidden)
        self.segment = nn.Embedding(2, hidden)
        # Frozen SSL features have very unequal channel scales and a large shared offset (post-ReLU):
        # standardised per channel over the valid regions (running statistics, like any BatchNorm),
        # the model reads colours from them within a few epochs instead of not at all.
        self.feature_norm = nn.BatchNorm1d(visual_dim, affine=False)
        # Each visual input is projected and layer-normed before the sum (as UNITER does), so
        # neither the encoder's feature scale nor the box scale can drown the other.
        self.visual = nn.Sequential(nn.Linear(visual_dim, hidden), nn.LayerNorm(hidden))
        self.box = nn.Sequential(nn.Linear(BOX_FEATURES, hidden), nn.LayerNorm(hidden))
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` (N, T), ``feats`` (N, R, visual_dim), ``boxes`` (N, R, 4) -> (N, T + R, hidden)
        and the segment ids (N, T + R): 0 for text, 1 for regions. ``region_mask`` (N, R): the
        regions present (only they enter the feature statistics); default all."""
        n, t = ids.shape
        r = feats.shape[1]
        valid = region_mask if region_mask is not None else torch.ones(n, r, dtype=torch.bool, device=feats.device)
        normed = torch.zeros_like(feats)
        normed[valid] = self.feature_norm(feats[valid])
        feats = normed
        segments = torch.cat([ids.new_zeros(n, t), ids.new_ones(n, r)], dim=1)
        pos = torch.arange(t, device=ids.device)
        text = self.word(ids) + self.position(pos)[None]
        vis = self.visual(feats) + self.box(box_geometry(boxes))
        x = torch.cat([text, vis], dim=1) + self.segment(segments)
        return self.drop(self.norm(x)), segments


class VisualBert(nn.Module):
    """Embeddings -> ``nn.TransformerEncoder`` -> MLM and sentence-image heads."""

    def __init__(self, vocab_size: int, visual_dim: int, hidden: int = 256, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0,
                 max_text_len: int = 40, dropout: float = 0.1, itm_pool: str = "cls"):
        super().__init__()
        self.itm_pool = itm_pool
        self.embeddings = VisualBertEmbeddings(vocab_size, hidden, max_text_len, visual_dim, dropout)
        layer = nn.TransformerEncoderLayer(hidden, heads, int(hidden * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(hidden), enable_nested_tensor=False)
        self.mlm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.pooler = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.itm_head = nn.Linear(hidden, 2)
        self.apply(_bert_init)

    def forward(self, ids: torch.Tensor, text_mask: torch.Tensor, feats: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, T + R, hidden). Masks are True where a token/region is present."""
        x, _ = self.embeddings(ids, feats, boxes, region_mask)
        pad = ~torch.cat([text_mask, region_mask], dim=1)
        return self.blocks(x, src_key_padding_mask=pad)

    def mlm_logits(self, hidden_text: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of text positions (decoder tied to the word embeddings)."""
        return F.linear(self.mlm_transform(hidden_text), self.embeddings.word.weight, self.mlm_bias)

    def itm_logits(self, hidden: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence-image prediction logits (N, 2); class 1 = matched. From the ``[CLS]`` state
        (``itm_pool="cls"``, the paper) or the mean of the text states (``"text_mean"``: a wrong
        word's state carries the mismatch straight to the head, which [CLS] must first learn to
        find; ``text_mask`` (N, T) marks the real tokens)."""
        if self.itm_pool == "cls":
            pooled = hidden[:, 0]
        else:
            m = text_mask.to(hidden.dtype)[..., None]
            pooled = (hidden[:, : m.shape[1]] * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return self.itm_head(self.pooler(pooled))


def _bert_init(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases (keeps tied MLM logits small at start)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
