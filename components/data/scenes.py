"""The embedded default dataset: deterministic synthetic "scenes".

Each image is a plain, noisy background of one of six muted colours with one large shape (its
class) and up to two small distractor shapes, every shape with a random colour, size and
position. Every row carries a
caption naming each shape's size, colour, kind and position (so captions can only be completed
from the image) and one pixel box per shape. Row ``i`` of a split depends only on
``(seed, split, i)``: the same settings always write the same bytes.
"""

from __future__ import annotations

import io
from typing import Any, Iterator

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
_SPLIT_SALT = {"train": 1, "val": 2, "test": 3}
LARGE_RADIUS = (0.24, 0.36)  # the class shape's radius, as a fraction of the image side
SMALL_RADIUS = (0.06, 0.09)  # distractors


def _position_word(cx: float, cy: float, size: int) -> str:
    col = ("left", "center", "right")[min(2, int(3 * cx / size))]
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / size))]
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"at the {row} {col}"


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if kind == "cross":
        w = 0.35 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if kind == "triangle":
        # Upward triangle: below the two slanted edges and above the base.
        return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
    raise ValueError(kind)


# Muted background colours with pixel noise and no texture. A textured background (stripes,
# checker, ...) is shared by every crop of a scene and survives colour jitter, so it was the
# easiest thing for instance discrimination to key on: with textures, SimCLR at the quickstart
# budget learnt backgrounds and stayed within a few points of a random-init encoder; on plain
# backgrounds what two crops of one scene share most distinctively is the shape (the label).
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "sand": (170, 150, 110),
    "teal": (80, 130, 130),
    "olive": (120, 130, 80),
    "mauve": (140, 110, 140),
    "slate": (100, 110, 140),
}


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    base = np.asarray(BACKGROUNDS[name], np.float32) + rng.normal(0, 6, size=3)
    return base + rng.normal(0, 5, size=(size, size, 3)).astype(np.float32), name


def render_scene(seed: int, split: str, index: int, size: int = 64) -> dict[str, Any]:
    """Render one scene; returns a shard row (PNG bytes, label, caption, boxes) plus its parts."""
    rng = np.random.default_rng([seed, _SPLIT_SALT[split], index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img, background = _background(rng, size)
    label = int(rng.integers(len(SHAPES)))
    objects = [(SHAPES[label], rng.uniform(*LARGE_RADIUS) * size, "large")]
    for _ in range(int(rng.integers(0, 2))):
        objects.append((SHAPES[rng.integers(len(SHAPES))], rng.uniform(*SMALL_RADIUS) * size, "small"))
    boxes, phrases = [], []
    for kind, r, size_word in objects:
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        mask = _shape_mask(kind, yy, xx, cx, cy, r)
        img[mask] = np.asarray(COLOURS[colour], np.float32) + rng.normal(0, 4, size=(int(mask.sum()), 3))
        ys, xs = np.nonzero(mask)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
        phrases.append(f"a {size_word} {colour} {kind} {_position_word(cx, cy, size)}")
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    caption = " and ".join(phrases) + f" on a {background} background"
    return {
        "id": f"scenes-{split}-{index:06d}",
        "image": buf.getvalue(),
        "label": label,
        "captions": [caption],
        "boxes": boxes,
        "source": f"scenes(seed={seed})",
    }


def scene_rows(seed: int, split: str, count: int, size: int = 64) -> Iterator[dict[str, Any]]:
    """Yield ``count`` deterministic scene rows of one split."""
    for i in range(count):
        yield render_scene(seed, split, i, size)
