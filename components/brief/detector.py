"""Keypoint detection on batches of image tensors: Harris or FAST-9, non-max suppression, top-k.

BRIEF is only a descriptor; the paper pairs it with standard detectors (Calonder et al., ECCV
2010, Sec. 4 uses SURF's and compares with FAST/CenSurE-style points). Two classic detectors,
both written as whole-image tensor ops so a batch runs in a few kernel calls on CPU or GPU:

- **Harris** (Harris & Stephens, 1988): R = det(M) - k tr(M)^2 of the Gaussian-weighted
  structure tensor M of Sobel gradients.
- **FAST-9** (Rosten & Drummond, ECCV 2006): a pixel is a corner when 9 contiguous pixels of
  the radius-3 Bresenham circle are all brighter than I_p + t or all darker than I_p - t; the
  score is the larger of the summed absolute excesses of the brighter and darker pixels (the
  "SAD" score of the FAST paper).

Keypoints whose descriptor patch would leave the image are not returned; how many local maxima
were dropped that way is reported per image (``dropped_border``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from components.brief.smoothing import gaussian_smooth

DETECTORS = ("harris", "fast")
# The radius-3 Bresenham circle of FAST, in order around the circle, as (dx, dy).
FAST_CIRCLE = (
    (0, -3), (1, -3), (2, -2), (3, -1), (3, 0), (3, 1), (2, 2), (1, 3),
    (0, 3), (-1, 3), (-2, 2), (-3, 1), (-3, 0), (-3, -1), (-2, -2), (-1, -3),
)


@dataclass
class Keypoints:
    """Top-k keypoints of a batch, padded to a fixed width K.

    ``xy``: ``(B, K, 2)`` int64 ``(x, y)``; ``score``: ``(B, K)``; ``valid``: ``(B, K)`` bool
    (False for padding); ``dropped_border``: ``(B,)`` local maxima lost to the border margin.
    Within an image, keypoints are sorted by decreasing score.
    """

    xy: torch.Tensor
    score: torch.Tensor
    valid: torch.Tensor
    dropped_border: torch.Tensor

    def counts(self) -> torch.Tensor:
        """Valid keypoints per image, ``(B,)``."""
        return self.valid.sum(1)


def harris_response(gray: torch.Tensor, k: float = 0.04, window_sigma: float = 1.0) -> torch.Tensor:
    """Harris corner response of ``(B, H, W)`` images (same shape)."""
    # Sobel gradients as differences of shifted views (separable [1 2 1] x [-1 0 1] / 8): a
    # single-channel conv2d is a slow path on CPU.
    p = F.pad(gray.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    dx = p[:, :, 2:] - p[:, :, :-2]  # (B, H+2, W)
    dy = p[:, 2:, :] - p[:, :-2, :]  # (B, H, W+2)
    gx = (dx[:, :-2] + 2 * dx[:, 1:-1] + dx[:, 2:]) / 8
    gy = (dy[:, :, :-2] + 2 * dy[:, :, 1:-1] + dy[:, :, 2:]) / 8
    size = 2 * math.ceil(3 * window_sigma) + 1
    # One smoothing call for the three structure-tensor entries (stacked along the batch).
    m = gaussian_smooth(torch.cat([gx * gx, gy * gy, gx * gy]), window_sigma, size)
    b = gray.shape[0]
    ixx, iyy, ixy = m[:b], m[b : 2 * b], m[2 * b :]
    return ixx * iyy - ixy * ixy - k * (ixx + iyy) ** 2


def local_max(score: torch.Tensor, radius: int) -> torch.Tensor:
    """Max of ``(B, H, W)`` scores over each ``(2 radius + 1)^2`` window (outside counts as -inf).

    Separable (rows, then columns) over shifted views: the same result as ``max_pool2d`` with
    stride 1, several times faster on CPU for single-channel maps.
    """
    h, w = score.shape[-2:]
    p = F.pad(score, (radius, radius, radius, radius), value=-math.inf)
    rows = p[..., 0:w]
    for i in range(1, 2 * radius + 1):
        rows = torch.maximum(rows, p[..., i : i + w])
    out = rows[..., 0:h, :]
    for i in range(1, 2 * radius + 1):
        out = torch.maximum(out, rows[..., i : i + h, :])
    return out


def fast_response(gray: torch.Tensor, threshold: float = 20.0, arc: int = 9) -> torch.Tensor:
    """FAST-``arc`` score of ``(B, H, W)`` images: 0 where no contiguous arc passes the test."""
    b, h, w = gray.shape
    padded = F.pad(gray.unsqueeze(1), (3, 3, 3, 3), mode="replicate").squeeze(1)
    ring = torch.stack([padded[:, 3 + dy : 3 + dy + h, 3 + dx : 3 + dx + w] for dx, dy in FAST_CIRCLE], dim=1)
    centre = gray.unsqueeze(1)
    brighter = ring > centre + threshold
    darker = ring < centre - threshold
    corner = _has_arc(brighter, arc) | _has_arc(darker, arc)
    zero = torch.zeros((), dtype=gray.dtype, device=gray.device)
    sad_b = torch.where(brighter, ring - centre - threshold, zero).sum(1)
    sad_d = torch.where(darker, centre - ring - threshold, zero).sum(1)
    return torch.where(corner, torch.maximum(sad_b, sad_d), zero)


def _has_arc(flags: torch.Tensor, arc: int) -> torch.Tensor:
    # Contiguous runs wrap around the circle: append the first arc-1 flags, then a sliding sum
    # of width `arc` (a difference of cumulative sums) equals `arc` exactly where a run fits.
    n = flags.shape[1]
    ext = torch.cat([flags, flags[:, : arc - 1]], dim=1).to(torch.int16)
    cs = F.pad(ext.cumsum(1, dtype=torch.int16), (0, 0, 0, 0, 1, 0))
    return ((cs[:, arc : arc + n] - cs[:, :n]) == arc).any(1)


def detect_keypoints(
    gray: torch.Tensor,
    max_keypoints: int,
    border: int,
    method: str = "harris",
    nms_radius: int = 2,
    threshold_rel: float = 1e-3,
    fast_threshold: float = 20.0,
) -> Keypoints:
    """Top-``max_keypoints`` local maxima per image of the detector's response.

    ``gray``: ``(B, H, W)`` float, 0..255 scale (FAST's threshold is in intensity units).
    A keypoint is a local maximum (equal to the max over its ``(2 nms_radius + 1)^2`` window;
    equal neighbours on a plateau are all kept), with a response above ``threshold_rel`` x the
    image's largest response (and above 0), at least ``border`` pixels from every edge.
    """
    if method not in DETECTORS:
        raise ValueError(f"unknown detector {method!r}; known: {', '.join(DETECTORS)}")
    b, h, w = gray.shape
    score = harris_response(gray) if method == "harris" else fast_response(gray, fast_threshold)
    peak = score == local_max(score, nms_radius)
    top = score.flatten(1).amax(1).clamp_min(0).view(b, 1, 1)
    peak &= (score > threshold_rel * top) & (score > 0)
    ys = torch.arange(h, device=gray.device).view(1, h, 1)
    xs = torch.arange(w, device=gray.device).view(1, 1, w)
    inside = (ys >= border) & (ys < h - border) & (xs >= border) & (xs < w - border)
    dropped = (peak & ~inside).flatten(1).sum(1)
    cand = torch.where(peak & inside, score, torch.full_like(score, -math.inf)).flatten(1)
    k = min(max_keypoints, h * w)
    val, idx = cand.topk(k, dim=1)
    xy = torch.stack([idx % w, idx // w], dim=-1)
    valid = torch.isfinite(val)
    if k < max_keypoints:  # tiny images: pad to the promised width
        pad = max_keypoints - k
        xy = F.pad(xy, (0, 0, 0, pad))
        val = F.pad(val, (0, pad), value=-math.inf)
        valid = F.pad(valid, (0, pad), value=False)
    xy = torch.where(valid.unsqueeze(-1), xy, torch.zeros_like(xy))
    return Keypoints(xy=xy, score=torch.where(valid, val, torch.zeros_like(val)), valid=valid, dropped_border=dropped)
