"""BRIEF sampling patterns: where the n_d pixel pairs of the binary tests lie in the patch.

Calonder et al., ECCV 2010, Sec. 3.2 and Fig. 3, for an S x S patch centred on the keypoint:

- **G I**   (X, Y) i.i.d. Uniform(-S/2, S/2): tests spread evenly, up to the patch border.
- **G II**  (X, Y) i.i.d. Gaussian(0, S^2/25): isotropic Gaussian around the centre. The paper's
  best pattern (sigma^2 = S^2/25 was its best spread) and our default.
- **G III** X i.i.d. Gaussian(0, S^2/25), Y i.i.d. Gaussian(x_i, S^2/100): the second point is
  drawn around the first, so tests are more local.
- **G IV**  (x_i, y_i) drawn at random among the discrete locations of a coarse polar grid
  (a spatial quantisation of the tests).
- **G V**   x_i = (0, 0) and y_i runs over every location of a coarse polar grid of n_d points.

A pattern is an integer ``(n_d, 4)`` tensor of offsets ``(dx1, dy1, dx2, dy2)`` from the
keypoint. Continuous draws are rounded to pixels and clipped to ``[-S//2, S//2]``, so the
patch actually read is 2*(S//2)+1 pixels wide (49 for the paper's S = 48, the same window
OpenCV and scikit-image use). Draws use NumPy's PCG64 with a fixed seed, so a pattern (and so
every descriptor) is the same on every machine, run and device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PATTERNS = ("GI", "GII", "GIII", "GIV", "GV")
# Fixed so that descriptors computed by different runs, workers and machines are comparable.
DEFAULT_SEED = 2010
# The coarse polar grid of G IV: the centre plus RINGS rings of ANGLES points each.
GIV_RINGS, GIV_ANGLES = 4, 8


def sampling_pattern(kind: str = "GII", n_bits: int = 256, patch_size: int = 48, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The ``(n_bits, 4)`` int64 offsets ``(dx1, dy1, dx2, dy2)`` of pattern ``kind`` (see module doc).

    ``n_bits`` is the paper's n_d (128, 256 or 512 in its experiments; any multiple of 8 works).
    Deterministic: the same arguments always give the same tensor.
    """
    if kind not in PATTERNS:
        raise ValueError(f"unknown sampling pattern {kind!r}; known: {', '.join(PATTERNS)}")
    if n_bits <= 0 or n_bits % 8:
        raise ValueError(f"n_bits must be a positive multiple of 8 (bits are packed into bytes), got {n_bits}")
    if patch_size < 3:
        raise ValueError(f"patch_size must be at least 3, got {patch_size}")
    rng = np.random.default_rng(seed)
    s = float(patch_size)
    half = patch_size // 2
    if kind == "GI":
        pts = rng.uniform(-s / 2, s / 2, size=(n_bits, 4))
    elif kind == "GII":
        pts = rng.normal(0.0, s / 5, size=(n_bits, 4))
    elif kind == "GIII":
        x = rng.normal(0.0, s / 5, size=(n_bits, 2))
        y = x + rng.normal(0.0, s / 10, size=(n_bits, 2))
        pts = np.concatenate([x, y], axis=1)
    elif kind == "GIV":
        grid = polar_grid(GIV_RINGS, GIV_ANGLES, half, centre=True)
        pts = grid[rng.integers(len(grid), size=(n_bits, 2))].reshape(n_bits, 4)
    else:  # GV
        grid = polar_grid(*_gv_grid_shape(n_bits), half, centre=False)
        pts = np.concatenate([np.zeros((n_bits, 2)), grid], axis=1)
    return torch.from_numpy(np.clip(np.rint(pts), -half, half).astype(np.int64))


def polar_grid(rings: int, angles: int, radius: float, centre: bool = False) -> np.ndarray:
    """``(rings * angles [+1], 2)`` points: ``rings`` equally spaced rings out to ``radius``.

    Odd rings are turned by half an angular step so that, once rounded to pixels, the inner
    rings' points do not all fall on the same few pixels.
    """
    pts = [np.zeros((1, 2))] if centre else []
    for r in range(1, rings + 1):
        theta = 2 * math.pi * (np.arange(angles) + 0.5 * (r % 2)) / angles
        rad = radius * r / rings
        pts.append(np.stack([rad * np.cos(theta), rad * np.sin(theta)], axis=1))
    return np.concatenate(pts)


def _gv_grid_shape(n_bits: int) -> tuple[int, int]:
    # n_d = rings x angles; 32 directions from 256 bits on, fewer below (128 = 8 rings x 16).
    angles = 32 if n_bits >= 256 and n_bits % 32 == 0 else (16 if n_bits % 16 == 0 else 8)
    return n_bits // angles, angles
