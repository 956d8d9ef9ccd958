"""Vision-language evaluation of a VisualBERT-style matcher on held-out image-caption pairs.

- **Image-text matching (ITM) accuracy**: each image with its true caption (label 1), a HARD
  negative - the true caption with one colour or shape word changed to another of its kind -
  and an easy negative - another image's caption (different text); so half of the negatives
  are hard. A pair counts as matched when its matching score is > 0.
- **Zero-shot retrieval** image->text and text->image Recall@K over N pairs, ranked by the
  matching score of all N x N pairs (chance R@K = K/N); a retrieved caption identical to the
  true one counts as a hit (scenes can repeat a caption).
- **Grounding probe**: masked-word accuracy (argmax over the whole vocabulary) for words that
  only the image can tell - colour, shape, position - with the image's own regions vs with
  another image's regions swapped in. The gap is how much the model reads the image.

All percentages. The scorer is the method itself (``encode_regions``, ``tokenize``,
``match_scores``, ``word_logits``), so this module needs no Ray and no MLflow.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from components.data.scenes import COLOURS, SHAPES

# Words of the synthetic captions that only the image can tell ("middle" never occurs).
WORD_TYPES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": tuple(SHAPES),
    "position": ("left", "right", "top", "bottom", "center"),
}
HARD_TYPES = ("colour", "shape")

Regions = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # features (N, R, C), boxes (N, R, 4), mask (N, R)


def hard_negative(caption: str, rng: np.random.Generator, word_types: dict[str, Sequence[str]] = WORD_TYPES,
                  types: Sequence[str] = HARD_TYPES) -> str | None:
    """The caption with ONE word of ``types`` (default colour or shape) replaced by another
    word of the same type; None if it has no such word. Never equal to ``caption``."""
    words = caption.split(" ")
    spots = [(k, t) for k, w in enumerate(words) for t in types if w in word_types[t]]
    if not spots:
        return None
    k, t = spots[int(rng.integers(len(spots)))]
    choices = [w for w in word_types[t] if w != words[k]]
    words[k] = choices[int(rng.integers(len(choices)))]
    return " ".join(words)


def itm_pairs(captions: Sequence[str], rng: np.random.Generator, word_types: dict[str, Sequence[str]] = WORD_TYPES) -> list[tuple[int, str, int, str]]:
    """``(image, caption, label, kind)`` for every image: its caption ("pos"), a hard negative
    ("hard") and another image's different caption ("easy"). Images whose caption has no
    colour/shape word get a second easy negative instead of a hard one."""
    n = len(captions)
    out = []
    for i, cap in enumerate(captions):
        out.append((i, cap, 1, "pos"))
        hard = hard_negative(cap, rng, word_types)
        others = [j for j in rng.permutation(n)[: min(n, 64)] if captions[j] != cap]
        if hard is not None:
            out.append((i, hard, 0, "hard"))
        elif len(others) > 1:
            out.append((i, captions[others[1]], 0, "easy"))
        if others:
            out.append((i, captions[others[0]], 0, "easy"))
    return out


def _batched(fn, n: int, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(slice(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]) if n else torch.zeros(0)


def pair_scores(method, regions: Regions, image_idx: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Matching scores of pairs (image ``image_idx[k]``, tokenised caption ``ids[k]``)."""
    feats, boxes, rmask = regions

    def run(s: slice) -> torch.Tensor:
        i = image_idx[s]
        return method.match_scores(ids[s], mask[s], feats[i], boxes[i], rmask[i]).float().cpu()

    return _batched(run, len(image_idx), batch_size)


def itm_accuracy(method, regions: Regions, captions: Sequence[str], seed: int = 0, batch_size: int = 1024) -> dict[str, float]:
    """ITM accuracy (%) overall and per kind of pair, plus the share of hard negatives."""
    pairs = itm_pairs(captions, np.random.default_rng(seed))
    ids, mask = method.tokenize([p[1] for p in pairs], regions[0].device)
    scores = pair_scores(method, regions, torch.tensor([p[0] for p in pairs], device=regions[0].device), ids, mask, batch_size)
    labels = torch.tensor([p[2] for p in pairs])
    correct = ((scores > 0).long() == labels).float()
    kinds = np.array([p[3] for p in pairs])
    out = {"itm_acc": 100 * correct.mean().item(), "itm_pairs": float(len(pairs))}
    for kind in ("pos", "hard", "easy"):
        sel = torch.from_numpy(kinds == kind)
        out[f"itm_acc_{kind}"] = 100 * correct[sel].mean().item() if sel.any() else float("nan")
    negatives = (labels == 0).sum().item()
    out["itm_hard_share"] = 100 * float((kinds == "hard").sum()) / max(1, negatives)
    return out


def retrieval_recall(scores: torch.Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@K (%) from an (N images x N captions) score matrix whose diagonal are true pairs."""
    n = scores.shape[0]
    _, codes = np.unique(np.asarray(captions), return_inverse=True)
    same = torch.from_numpy(codes[:, None] == codes[None, :])  # caption j is a true caption of image i
    out = {}
    for k in ks:
        k_ = min(k, n)
        top_t = scores.topk(k_, dim=1).indices  # captions per image
        top_i = scores.topk(k_, dim=0).indices.T  # images per caption
        rows = torch.arange(n)[:, None]
        out[f"i2t_r{k}"] = 100 * same[rows, top_t].any(dim=1).float().mean().item()
        out[f"t2i_r{k}"] = 100 * same[top_i, rows].any(dim=1).float().mean().item()
        out[f"chance_r{k}"] = 100 * k_ / n
    out["retrieval_pairs"] = float(n)
    return out


def retrieval(method, regions: Regions, captions: Sequence[str], batch_size: int = 1024) -> dict[str, float]:
    """Score all N x N pairs and return Recall@1/5 both ways."""
    n = len(captions)
    dev = regions[0].device
    ids, mask = method.tokenize(list(captions), dev)
    img = torch.arange(n, device=dev).repeat_interleave(n)
    cap = torch.arange(n, device=dev).repeat(n)
    scores = pair_scores(method, regions, img, ids[cap], mask[cap], batch_size).reshape(n, n)
    return retrieval_recall(scores, captions)


def grounding_probe(method, regions: Regions, captions: Sequence[str], word_types: dict[str, Sequence[str]] = WORD_TYPES,
                    shift: int = 1, batch_size: int = 1024) -> dict[str, float]:
    """Masked-word accuracy (%) per word type with the own image's regions and with those of
    image ``(i + shift) mod N`` swapped in. Every occurrence of a type word that is one token
    is probed once, masked alone."""
    n = len(captions)
    dev = regions[0].device
    ids, mask = method.tokenize(list(captions), dev)
    tok = method.tokenizer
    out = {}
    for kind, words in word_types.items():
        vocab = torch.tensor(sorted(tok.word_ids(words).values()), dtype=torch.long, device=dev)
        if len(vocab) == 0:
            continue
        rows, pos = torch.isin(ids, vocab).nonzero(as_tuple=True)
        if len(rows) == 0:
            continue
        truth = ids[rows, pos]
        masked = ids[rows].clone()
        masked[torch.arange(len(rows), device=dev), pos] = tok.mask_id
        text_mask = mask[rows]
        for cond, img in (("image", rows), ("swapped", (rows + shift) % n)):
            feats, boxes, rmask = (r[img] for r in regions)

            def run(s: slice) -> torch.Tensor:
                return method.word_logits(masked[s], text_mask[s], feats[s], boxes[s], rmask[s], pos[s]).argmax(dim=1).cpu()

            pred = _batched(run, len(rows), batch_size)
            out[f"ground_{kind}_{cond}"] = 100 * (pred == truth.cpu()).float().mean().item()
        out[f"ground_{kind}_gap"] = out[f"ground_{kind}_image"] - out[f"ground_{kind}_swapped"]
        out[f"ground_{kind}_count"] = float(len(rows))
    return out


def evaluate_all(method, regions: Regions, captions: Sequence[str], seed: int = 0, retrieval_pairs: int = 500, batch_size: int = 1024) -> dict[str, float]:
    """ITM accuracy and the grounding probe on every pair; retrieval on the first
    ``retrieval_pairs`` pairs (0 = skip)."""
    was_training = method.training
    method.eval()
    try:
        out = itm_accuracy(method, regions, captions, seed, batch_size)
        out.update(grounding_probe(method, regions, captions, batch_size=batch_size))
        if retrieval_pairs:
            k = min(retrieval_pairs, len(captions))
            out.update(retrieval(method, tuple(r[:k] for r in regions), captions[:k], batch_size))
    finally:
        method.train(was_training)
    return out
