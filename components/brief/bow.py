"""A bag of binary words: an image-level vector from BRIEF descriptors.

A codebook of k binary words is learnt by **k-majority** clustering (Grana et al., "A fast
approach for integrating ORB descriptors in the bag of words model", SPIE 2013): k-means in
Hamming space, where points join their nearest word by Hamming distance and each word becomes
the bitwise majority vote of its members (the minimiser of the summed Hamming distance, i.e. a
per-bit median). An image is then the normalised histogram of the words its descriptors fall
on (Sivic & Zisserman's "Video Google", ICCV 2003, with BRIEF in place of SIFT).
"""

from __future__ import annotations

import torch
from torch import nn

from components.brief.descriptor import BriefConfig, BriefExtractor, pack_bits, unpack_bits
from components.brief.detector import Keypoints, detect_keypoints
from components.brief.matching import hamming_distance
from components.brief.smoothing import to_gray


def nearest_word(desc: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and Hamming distance of each descriptor's nearest codebook word (lowest index on ties)."""
    d = hamming_distance(desc, codebook, method="matmul")  # dense N x k: one matrix product
    dist, idx = d.min(dim=-1)
    return idx, dist


def k_majority(desc: torch.Tensor, k: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Learn ``k`` binary words from ``(N, n_bytes)`` uint8 descriptors; returns ``(k, n_bytes)`` uint8.

    Deterministic for a given seed: the initial words are chosen by k-means++ seeding (Arthur &
    Vassilvitskii, SODA 2007; each next word drawn with probability proportional to its squared
    Hamming distance to the words so far) from a seeded generator; a bit whose vote is tied keeps
    its previous value; an empty cluster is re-seeded with the descriptor farthest from its word.
    Stops early when no assignment changes.
    """
    n = desc.shape[0]
    if n < k:
        raise ValueError(f"k-majority needs at least k={k} descriptors, got {n}")
    words = _kmeanspp_seeds(desc, k, torch.Generator().manual_seed(seed))
    bits = unpack_bits(desc).to(torch.int32)  # (N, n_bits)
    assign = None
    for _ in range(iterations):
        new, dist = nearest_word(desc, words)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        votes = torch.zeros(k, bits.shape[1], dtype=torch.int32, device=desc.device).index_add_(0, assign, bits)
        sizes = torch.bincount(assign, minlength=k).unsqueeze(1)
        old = unpack_bits(words)
        majority = torch.where(2 * votes == sizes, old, 2 * votes > sizes)
        empty = (sizes.squeeze(1) == 0).nonzero().flatten()
        words = pack_bits(majority)
        if len(empty):
            far = dist.argsort(descending=True, stable=True)[: len(empty)]
            words[empty] = desc[far]
    return words


def _kmeanspp_seeds(desc: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    # Random initial words often put two seeds in one cluster, a local minimum Lloyd-style
    # iterations never leave; D^2 sampling spreads them out. Sampling runs on the CPU generator.
    n = desc.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=g))]
    dist = hamming_distance(desc, desc[chosen[-1]].unsqueeze(0))[:, 0].double().cpu()
    for _ in range(1, k):
        weight = dist**2
        nxt = int(torch.multinomial(weight, 1, generator=g)) if weight.sum() > 0 else int(torch.randint(n, (1,), generator=g))
        chosen.append(nxt)
        dist = torch.minimum(dist, hamming_distance(desc, desc[nxt].unsqueeze(0))[:, 0].double().cpu())
    return desc[torch.tensor(chosen, device=desc.device)].clone()


def bow_histograms(desc: torch.Tensor, valid: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``(B, K, n_bytes)`` descriptors + ``(B, K)`` validity -> ``(B, k)`` float histograms summing to 1.

    An image without a valid descriptor gets the zero vector (it has no words to count).
    """
    b, kp, _ = desc.shape
    idx, _ = nearest_word(desc.reshape(b * kp, -1), codebook)
    hist = torch.zeros(b, codebook.shape[0], dtype=torch.float32, device=desc.device)
    hist.scatter_add_(1, idx.view(b, kp), valid.float())
    return hist / hist.sum(1, keepdim=True).clamp_min(1.0)


class BriefKeypointDescriber:
    """Detect + describe a batch of images: ``(images) -> (descriptors, valid, keypoints)``.

    The detector keeps keypoints at least the descriptor's border from the edges, so every
    detected keypoint gets a full patch; ``keypoints.dropped_border`` counts the corners lost
    to that margin.
    """

    def __init__(self, config: BriefConfig, keypoints: int, detector: str = "harris", threshold_rel: float = 1e-3):
        self.extractor = BriefExtractor(config)
        self.keypoints, self.detector, self.threshold_rel = keypoints, detector, threshold_rel

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Keypoints]:
        """``images``: uint8 ``(B, 3, H, W)``/``(B, H, W, 3)``; returns ``(B, K, bits/8)``, ``(B, K)`` and the keypoints."""
        gray = to_gray(images)
        kp = detect_keypoints(gray, self.keypoints, self.extractor.border, self.detector, threshold_rel=self.threshold_rel)
        desc, valid = self.extractor(gray, kp.xy, kp.valid)
        return desc, valid, kp


class BagOfBinaryWords(nn.Module):
    """uint8 images ``(B, 3, H, W)`` -> ``(B, k)`` normalised bag-of-binary-words histograms.

    A frozen "encoder" with no trained weights besides its codebook (a buffer), so it drops
    into any code that embeds images with a module.
    """

    def __init__(self, config: BriefConfig, codebook: torch.Tensor, keypoints: int, detector: str = "harris", threshold_rel: float = 1e-3):
        super().__init__()
        self.describe = BriefKeypointDescriber(config, keypoints, detector, threshold_rel)
        self.register_buffer("codebook", codebook.to(torch.uint8))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` images -> ``(B, k)`` word histograms (rows sum to 1, or 0 without keypoints)."""
        desc, valid, _ = self.describe(images.to(self.codebook.device))
        return bow_histograms(desc, valid, self.codebook)
