"""Decode encoded image bytes into fixed-size uint8 RGB arrays, never crashing on bad input.

Every image is decoded once to a ``size x size`` uint8 array (shorter side resized, centre
crop) so that all later work is batched tensor work. An image that cannot be used is returned
as ``None`` with a reason; callers count and report it (see :class:`BadRows`).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

# A decompression bomb is rejected before its pixels are decoded; 64 Mpx is far above any real
# training image yet far below what would exhaust a worker's memory.
MAX_PIXELS = 64_000_000
MIN_SIDE = 2


def decode_image(data: bytes | None, size: int) -> tuple[np.ndarray | None, str | None]:
    """Decode one image to ``(size, size, 3)`` uint8, or return ``(None, reason)``.

    Handles EXIF orientation, grayscale/RGBA/CMYK/palette and 16-bit images; rejects empty,
    truncated or garbage bytes, tiny images and images over :data:`MAX_PIXELS`.
    """
    arr, reason, _ = _decode(data, size)
    return arr, reason


def inspect_image(data: bytes | None, size: int) -> tuple[tuple[int, int] | None, str | None]:
    """What the data path will make of an image: ``((width, height), None)`` if it decodes
    (size after EXIF rotation, the frame boxes refer to), else ``(None, reason)``."""
    _, reason, wh = _decode(data, size)
    return wh, reason


def _decode(data: bytes | None, size: int) -> tuple[np.ndarray | None, str | None, tuple[int, int] | None]:
    if data is None:
        return None, "image is null", None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None, f"image is {type(data).__name__}, not encoded bytes", None
    if len(data) == 0:
        return None, "image has zero bytes", None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                return None, f"image is {w}x{h}, over the {MAX_PIXELS} pixel limit", None
            if min(w, h) < MIN_SIDE:
                return None, f"image is {w}x{h}, smaller than {MIN_SIDE} px", None
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - a corrupt EXIF block: keep the pixels, unrotated
                pass
            img = _to_rgb(img)
            return _resize_center_crop(img, size), None, img.size
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad row, not a crash
        # Without the "<_io.BytesIO object at 0x...>" PIL puts in its messages: reports stay comparable.
        text = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))
        return None, f"undecodable image: {type(exc).__name__}: {text}"[:300], None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / max(hi, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    if max(w, h) > 8 * min(w, h):
        # A very elongated image (2 x 30M px is under the pixel limit) would be resized to an
        # enormous strip before cropping: take the central square first.
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=2.0 if min(w, h) > 2 * size else None)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


@dataclass
class BadRows:
    """Rows that could not be used, with where they came from and why (never silently dropped)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row_id: Any, reason: str, source: str = "") -> None:
        """Record one bad row."""
        self.rows.append({"id": str(row_id), "source": source, "reason": reason})

    def __len__(self) -> int:
        return len(self.rows)


def decode_batch(images: Sequence[bytes | None], ids: Sequence[Any], size: int) -> tuple[np.ndarray, np.ndarray, BadRows]:
    """Decode a batch; returns ``(uint8 array N_ok x size x size x 3, keep mask, bad rows)``."""
    bad = BadRows()
    out, keep = [], np.zeros(len(images), dtype=bool)
    for i, (data, row_id) in enumerate(zip(images, ids)):
        arr, reason = decode_image(data, size)
        if arr is None:
            bad.add(row_id, reason or "unknown")
        else:
            out.append(arr)
            keep[i] = True
    stacked = np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)
    return stacked, keep, bad
