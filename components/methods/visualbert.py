"""VisualBERT (Li et al., 2019): captions and image regions through one transformer, pretrained
with masked language modeling with the image and sentence-image prediction.

Inputs per sample: the whole image (no augmentation: words like "left" or "red" must stay
true), one of its captions and its boxes (``ViewRecipe.caption_bytes``/``max_boxes``). Region
features come from a FROZEN visual encoder trained by the pipeline (``encoder``: a method of
the same pipeline file or ``models:/NAME@ALIAS``), the text ids from a tokenizer fitted on the
captions (``tokenizer``: an entry of the ``tokenizers:`` section). Both arrive through
:meth:`attach` and are kept out of ``state_dict()``.

Sentence-image prediction (Sec. 3.2): with probability ``itm_negative_p`` a sample's caption is
replaced by another sample's (never one with identical token ids); ``hard_negative_p`` of those
are instead the true caption with one word of a ``hard_negative_words`` group swapped for
another word of that group (0 = the paper: random captions only). MLM is computed on matched
pairs only, so the image is always the one the masked words describe. The sentence-image head
reads the mean of the text states by default (``itm_pool``): the paper's ``[CLS]`` works when
the transformer starts from BERT, but trained from scratch here it did not leave chance level
within 12 epochs, while the mean reached 92 % ITM accuracy (pipelines/visualbert.yaml's settings).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from components.data.regions import decode_captions
from components.data.views import ViewRecipe, ViewSpec
from components.errors import ReprflowError
from components.losses.vl import IGNORE, visualbert_loss
from components.methods.base import Method, MethodConfig, Upstream
from components.models.visualbert import FrozenRegionEncoder, VisualBert
from components.tokenizers.text import TextTokenizer, mask_tokens


class VisualBertConfig(MethodConfig):
    """VisualBERT settings: a BERT-style encoder sized for captions of synthetic scenes by default."""

    encoder: str | None = Field(None, description="frozen visual encoder: a method of this pipeline or models:/NAME@ALIAS")
    tokenizer: str | None = Field(None, description="text tokenizer: an entry of the pipeline's tokenizers: section (or models:/...)")
    image_size: int = Field(64, ge=8, le=1024, description="side the frozen encoder sees the whole image at")
    hidden_dim: int = Field(256, ge=8)
    depth: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    vocab_size: int = Field(1024, ge=8, description="embedding rows; must be >= the tokenizer's vocabulary")
    visual_dim: int = Field(256, ge=1, description="channels of the encoder's feature map at feature_stage (resnet18: 64/128/256/512)")
    feature_stage: int = Field(3, ge=1, le=4, description="ResNet stage regions are pooled from (3 = 'C4' as in Faster R-CNN); ViTs use their patch map")
    feature_cache: int = Field(50_000, ge=0, description="samples whose frozen region features each worker keeps in memory (0 = recompute every step)")
    max_text_len: int = Field(40, ge=4, description="tokens incl. [CLS]/[SEP]; longer captions are truncated")
    caption_bytes: int = Field(256, ge=16, description="UTF-8 bytes of a caption carried by the data path")
    max_boxes: int = Field(2, ge=0, description="data boxes per sample (after the whole-image region)")
    grid: int = Field(2, ge=1, le=8, description="rows without boxes get a grid x grid of boxes")
    roi_output_size: int = Field(2, ge=1, le=7, description="RoIAlign bins per side; the bins are flattened (visual_dim x bins^2 inputs)")
    mlm_prob: float = Field(0.15, gt=0, lt=1)
    itm_pool: Literal["cls", "text_mean"] = Field("text_mean", description="sentence-image head input: the mean of the text states, or [CLS] (the paper's; "
                                                  "from scratch on scenes it stays at chance for thousands of steps)")
    itm_negative_p: float = Field(0.5, ge=0, le=1, description="share of samples given a mismatched caption")
    hard_negative_p: float = Field(0.0, ge=0, le=1, description="share of those negatives made by swapping one word within a group")
    hard_negative_words: list[list[str]] = Field(default_factory=list, description="word groups for hard negatives, e.g. [[red, green], [circle, square]]")

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        """BERT's recipe: AdamW, lr 1e-4 at batch 256, weight decay 0.01, linear warm-up, then (here) cosine."""
        return {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01, "warmup_epochs": 1, "betas": (0.9, 0.999)}

    @model_validator(mode="after")
    def _needs_upstream(self):
        missing = [f for f in ("encoder", "tokenizer") if not getattr(self, f)]
        if missing:
            raise ValueError(f"visualbert needs {' and '.join(repr(m) for m in missing)}: the frozen visual encoder (a method of this "
                             "pipeline, e.g. 'simclr', or models:/NAME@ALIAS) and a text tokenizer (an entry of 'tokenizers:')")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        return self


def itm_negatives(ids: torch.Tensor, mask: torch.Tensor, negative_p: float, hard_p: float = 0.0, groups: list[torch.Tensor] | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick mismatched captions for sentence-image prediction.

    ``ids``/``mask`` (N, T): each sample's own caption. A sample drawn with ``negative_p`` gets
    another sample's caption whose ids differ from its own, or (with ``hard_p``, when its caption
    has a word of a group) its own caption with one such word replaced by another word of the
    group. Returns ``(ids, mask, labels (1 = matched), changed)`` where ``changed`` marks the
    substituted token of hard negatives. A negative always differs from the positive; a sample
    for which none exists stays matched.
    """
    n = ids.shape[0]
    dev = ids.device
    rand = lambda *shape: torch.rand(shape, generator=generator).to(dev)  # noqa: E731
    out_ids, out_mask = ids.clone(), mask.clone()
    labels = torch.ones(n, dtype=torch.long, device=dev)
    changed = torch.zeros_like(ids, dtype=torch.bool)
    negative = rand(n) < negative_p
    hard = negative & (rand(n) < hard_p)
    if groups:
        member = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long, device=dev)
        for gi, g in enumerate(groups):
            member[g[g <= ids.max()].to(dev)] = gi
        where = member[ids]  # group of each token, -1 = none
        for i in hard.nonzero().flatten().tolist():
            spots = (where[i] >= 0).nonzero().flatten()
            if len(spots) == 0:
                continue
            p = int(spots[int(rand(1) * len(spots)) % len(spots)])
            g = groups[int(where[i, p])].to(dev)
            others = g[g != ids[i, p]]
            out_ids[i, p] = others[int(rand(1) * len(others)) % len(others)]
            changed[i, p] = True
            labels[i] = 0
    same = (ids[:, None, :] == ids[None, :, :]).all(dim=-1)  # identical captions are no negatives
    score = rand(n, n).masked_fill(same, -1.0)
    j = score.argmax(dim=1)
    easy = negative & (labels == 1) & ~same[torch.arange(n, device=dev), j]
    out_ids[easy], out_mask[easy] = ids[j[easy]], mask[j[easy]]
    labels[easy] = 0
    return out_ids, out_mask, labels, changed


class VisualBERT(Method):
    """One transformer over ``[CLS] text [SEP] regions``; MLM with the image + sentence-image prediction."""

    name = "visualbert"
    Config = VisualBertConfig
    references: ClassVar[tuple[str, ...]] = ("encoder", "tokenizer")
    dag_steps: ClassVar[str | None] = "pipelines.vl_steps:add_steps"

    def __init__(self, cfg: VisualBertConfig):
        super().__init__(cfg)
        self.model = VisualBert(cfg.vocab_size, cfg.visual_dim * cfg.roi_output_size**2, cfg.hidden_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio,
                                cfg.max_text_len, cfg.dropout, cfg.itm_pool)
        self._upstream: list = []  # [FrozenRegionEncoder, TextTokenizer, hard-negative id groups]: not in state_dict

    @property
    def encoder(self) -> VisualBert:
        """The representation: the joint text-region transformer (a property, so its weights are
        not listed twice in ``state_dict()``)."""
        return self.model

    @property
    def views(self) -> ViewRecipe:
        whole = ViewSpec(size=self.cfg.image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
        return ViewRecipe(views=(whole,), caption_bytes=self.cfg.caption_bytes, max_boxes=self.cfg.max_boxes)

    def attach(self, resources: dict[str, Upstream]) -> None:
        """Load the frozen visual encoder and the tokenizer; check they fit this model's sizes."""
        enc = resources["encoder"].load_method().encoder
        if not hasattr(enc, "feature_map"):
            raise ReprflowError(f"visualbert: encoder '{resources['encoder'].name}' has no spatial feature map to pool regions from")
        c = self.cfg
        regions = FrozenRegionEncoder(enc, c.feature_stage, c.grid, c.roi_output_size, c.feature_cache)
        dim = regions.feature_map(torch.zeros(1, 3, c.image_size, c.image_size)).shape[1]
        if dim != c.visual_dim:
            raise ReprflowError(f"visualbert: encoder '{resources['encoder'].name}' gives {dim}-channel feature maps at feature_stage "
                                f"{c.feature_stage}; set visual_dim: {dim}")
        files = resources["tokenizer"].files
        if "tokenizer" not in files:
            raise ReprflowError(f"visualbert: tokenizer '{resources['tokenizer'].name}' is not a text tokenizer (files: {sorted(files)})")
        tok = TextTokenizer(files["tokenizer"], self.cfg.max_text_len)
        if tok.vocab_size > self.cfg.vocab_size:
            raise ReprflowError(f"visualbert: the tokenizer has {tok.vocab_size} tokens; set vocab_size: {tok.vocab_size} (or more)")
        groups = [torch.tensor(sorted(set(tok.word_ids(g).values()))) for g in self.cfg.hard_negative_words]
        self._upstream[:] = [regions, tok, [g for g in groups if len(g) > 1]]

    @property
    def tokenizer(self) -> TextTokenizer:
        """The attached text tokenizer."""
        if not self._upstream:
            raise RuntimeError("visualbert: call attach() first (the tokenizer and encoder are upstream steps)")
        return self._upstream[1]

    def encode_regions(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised images (N, 3, S, S) + data boxes (N, B, 4) -> region features, region boxes
        (N, R, 4) and mask (N, R), through the frozen encoder (see :class:`FrozenRegionEncoder`)."""
        if not self._upstream:
            raise RuntimeError("visualbert: call attach() first")
        return self._upstream[0](images, boxes)

    def tokenize(self, captions: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ids and mask, cut to the longest caption of the batch."""
        ids, mask = self.tokenizer(captions)
        t = max(2, int(mask.sum(dim=1).max()))
        return ids[:, :t].to(device), mask[:, :t].to(device)

    def forward(self, batch):
        device = batch["view_0"].device
        feats, regions, rmask = self._upstream[0].cached(batch["view_0"], batch["boxes"])
        ids, tmask = self.tokenize(decode_captions(batch["caption"]), device)
        _, _, groups = self._upstream
        ids, tmask, itm_labels, changed = itm_negatives(ids, tmask, self.cfg.itm_negative_p, self.cfg.hard_negative_p, groups)
        tok = self.tokenizer
        masked, mlm_labels = mask_tokens(ids, tok.special_ids, tok.mask_id, tok.vocab_size, self.cfg.mlm_prob, protect=changed)
        mlm_labels[itm_labels == 0] = IGNORE  # predict words only from the image they describe
        hidden = self.model(masked, tmask, feats, regions, rmask)
        at = mlm_labels != IGNORE
        mlm_logits = self.model.mlm_logits(hidden[:, : ids.shape[1]][at])
        itm_logits = self.model.itm_logits(hidden, tmask)
        out = visualbert_loss(mlm_logits, mlm_labels[at], itm_logits, itm_labels)
        with torch.no_grad():
            out["itm_acc"] = (itm_logits.argmax(1) == itm_labels).float().mean()
            out["mlm_acc"] = (mlm_logits.argmax(1) == mlm_labels[at]).float().mean() if at.any() else torch.zeros(())
        return out

    @torch.no_grad()
    def match_scores(self, ids, tmask, feats, regions, rmask) -> torch.Tensor:
        """Sentence-image matching score (logit of "matched" minus "mismatched") per pair (N,)."""
        logits = self.model.itm_logits(self.model(ids, tmask, feats, regions, rmask), tmask)
        return logits[:, 1] - logits[:, 0]

    @torch.no_grad()
    def word_logits(self, ids, tmask, feats, regions, rmask, positions: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (N, V) at one text position per sample (``positions`` (N,))."""
        hidden = self.model(ids, tmask, feats, regions, rmask)
        return self.model.mlm_logits(hidden[torch.arange(len(ids), device=ids.device), positions])
