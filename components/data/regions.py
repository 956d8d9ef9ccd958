"""Captions and boxes of shard rows as fixed-shape arrays, aligned with the decoded images.

A recipe that asks for text and regions (``ViewRecipe.caption_bytes`` / ``max_boxes``, e.g.
VisualBERT's) gets two extra numeric columns next to its views, so they travel through Ray
Data and ``iter_torch_batches`` like any tensor:

- ``caption``: one of the row's captions (drawn per sample), UTF-8, truncated at a character
  boundary and zero-padded to ``caption_bytes`` - uint8 (N, caption_bytes);
- ``boxes``: the row's boxes in the coordinates of the DECODED image (``decode_image`` resizes
  the shorter side and centre-crops; boxes follow, clipped to the crop, and those left with
  less than 1 px of width or height are dropped), normalised to [0, 1], missing ones -1 -
  float32 (N, max_boxes, 4).

EXIF rotation is not applied to boxes: datasets whose boxes refer to rotated images must be
stored upright.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

MISSING = -1.0


def encode_captions(captions: Sequence[str], width: int) -> np.ndarray:
    """Strings -> uint8 (N, width): UTF-8, cut at a character boundary, zero-padded."""
    out = np.zeros((len(captions), width), np.uint8)
    for i, text in enumerate(captions):
        data = text.encode("utf-8")[:width]
        data = data.decode("utf-8", errors="ignore").encode("utf-8")  # never end inside a character
        out[i, : len(data)] = np.frombuffer(data, np.uint8)
    return out


def decode_captions(codes: np.ndarray | torch.Tensor) -> list[str]:
    """Inverse of :func:`encode_captions`."""
    arr = codes.cpu().numpy() if torch.is_tensor(codes) else np.asarray(codes)
    return [bytes(row).rstrip(b"\0").decode("utf-8", errors="ignore") for row in arr.astype(np.uint8)]


def pick_captions(captions: Sequence[Sequence[str] | None], generator: torch.Generator | None = None) -> list[str]:
    """One caption per row, drawn uniformly (``""`` for a row without captions)."""
    out = []
    for caps in captions:
        caps = [c for c in (list(caps) if caps is not None else []) if c]
        out.append(caps[int(torch.randint(len(caps), (1,), generator=generator))] if caps else "")
    return out


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the image header (the pixels are not decoded)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def decoded_boxes(boxes: Sequence[Sequence[float]] | None, width: int, height: int, size: int) -> np.ndarray:
    """Pixel boxes ``[x0, y0, x1, y1]`` of a ``width x height`` image -> normalised boxes (K, 4)
    of its ``size x size`` decoded version (same resize + centre crop as ``decode_image``)."""
    if boxes is None or len(boxes) == 0:
        return np.zeros((0, 4), np.float32)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    b = b * np.array([nw / width, nh / height, nw / width, nh / height]) - np.array([left, top, left, top])
    b = np.clip(b, 0, size)
    keep = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
    return (b[keep] / size).astype(np.float32)


def boxes_array(per_row: Sequence[np.ndarray], max_boxes: int) -> np.ndarray:
    """Normalised boxes per row -> float32 (N, max_boxes, 4), the first ``max_boxes`` kept, rest -1."""
    out = np.full((len(per_row), max_boxes, 4), MISSING, np.float32)
    for i, b in enumerate(per_row):
        k = min(len(b), max_boxes)
        out[i, :k] = b[:k]
    return out


def text_and_regions(batch: dict, keep: np.ndarray, decode_size: int, caption_bytes: int, max_boxes: int,
                     generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """The ``caption``/``boxes`` columns for the rows kept by ``decode_batch`` (``keep`` mask)."""
    out: dict[str, np.ndarray] = {}
    rows = np.flatnonzero(keep)
    if caption_bytes:
        caps = batch.get("captions")
        chosen = pick_captions([caps[i] if caps is not None else None for i in rows], generator)
        out["caption"] = encode_captions(chosen, caption_bytes)
    if max_boxes:
        boxes = batch.get("boxes")
        per_row = []
        for i in rows:
            row_boxes = boxes[i] if boxes is not None else None
            row_boxes = [list(x) for x in row_boxes] if row_boxes is not None else []
            w, h = image_size(batch["image"][i]) if row_boxes else (decode_size, decode_size)
            per_row.append(decoded_boxes(row_boxes, w, h, decode_size))
        out["boxes"] = boxes_array(per_row, max_boxes)
    return out
