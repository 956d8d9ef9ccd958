"""JPEG decoding on the training device (nvJPEG through ``torchvision.io.decode_jpeg``), PIL for the rest.

An option of the GPU data path (:mod:`components.data.gpu_loader` decodes on host threads):
when the host's cores are the bottleneck, a batch of JPEGs is decoded by the GPU in one call
and resized there to the fixed ``size x size`` that :func:`components.data.decode.decode_image`
produces (shorter side to ``size``, centre crop; bilinear with antialiasing, so pixels differ
from PIL's by rounding where a resize happens). Everything the device decoder does not handle
like the pipeline's decoder goes through ``decode_image`` instead, so the bad-row rules hold:
not a JPEG, CMYK or other modes, an EXIF orientation, a missing end-of-image marker (nvJPEG
may decode a truncated file without complaint), sizes out of range or over 8:1, or a device
decode error.
Runs on the CPU too (``device="cpu"``: libjpeg through the same call).
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from components.data.decode import MAX_PIXELS, MIN_SIDE, BadRows, decode_image


def _device_decodable(data: bytes | None) -> bool:
    """True when the fast path decodes ``data`` exactly as the PIL path would (up to rounding)."""
    if not data or data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - let decode_image produce the reason
        return False
    ok_size = min(w, h) >= MIN_SIDE and w * h <= MAX_PIXELS and max(w, h) <= 8 * min(w, h)  # decode_image pre-crops strips
    return img.format == "JPEG" and img.mode in ("RGB", "L") and orientation == 1 and ok_size


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> ``(N, 3, size, size)``: shorter side to ``size`` (bilinear, antialiased), centre crop."""
    h, w = img.shape[-2:]
    if (h, w) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    x = F.interpolate(img.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size].round_().clamp_(0, 255).to(torch.uint8)


def decode_jpegs(images: Sequence[bytes | None], ids: Sequence[Any], size: int, device: torch.device | str = "cuda") -> tuple[torch.Tensor, np.ndarray, BadRows]:
    """Decode a batch to uint8 ``(N_ok, 3, size, size)`` on ``device``; returns ``(images, keep mask, bad rows)``.

    The same contract as :func:`components.data.decode.decode_batch`, channels first.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    n = len(images)
    fast = [i for i in range(n) if _device_decodable(images[i])]
    decoded: dict[int, torch.Tensor] = {}
    if fast:
        blobs = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in fast]
        try:
            outs = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
            decoded = dict(zip(fast, outs))
        except RuntimeError:  # one bad file fails the batched call: decode one by one below
            decoded = {}
            for i, blob in zip(fast, blobs):
                try:
                    decoded[i] = decode_jpeg(blob, mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
    bad = BadRows()
    keep = np.zeros(n, dtype=bool)
    out: list[torch.Tensor | None] = [None] * n
    # Resize images of one shape together (a shard usually holds few shapes).
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, t in decoded.items():
        by_shape.setdefault(tuple(t.shape[-2:]), []).append(i)
    for idx in by_shape.values():
        resized = resize_center_crop(torch.stack([decoded[i] for i in idx]), size)
        for i, r in zip(idx, resized):
            out[i] = r
    for i in range(n):
        if out[i] is None:
            arr, reason = decode_image(images[i], size)
            if arr is None:
                bad.add(ids[i], reason or "unknown")
                continue
            out[i] = torch.tensor(arr).permute(2, 0, 1).to(device)  # a copy: PIL's array is read-only
        keep[i] = True
    kept = [t for t in out if t is not None]
    stacked = torch.stack(kept) if kept else torch.zeros((0, 3, size, size), dtype=torch.uint8, device=device)
    return stacked, keep, bad
