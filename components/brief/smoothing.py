"""Image pre-smoothing for BRIEF's binary tests (Calonder et al., ECCV 2010, Sec. 3.1).

A binary test compares two single pixels, so it is very sensitive to noise; the paper smooths
the image first, with a Gaussian of sigma = 2 over a 9x9 window (its Fig. 2 shows sigma 1-3 all
work). OpenCV's implementation instead compares 9x9 *box* sums read from an integral image;
:func:`box_smooth` reproduces that for the OpenCV-compatible mode.

Images are ``(B, H, W)`` float tensors (any device); :func:`to_gray` makes them from RGB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma, the weights OpenCV's and PIL's RGB->gray use, so every implementation
# in the benchmark sees the same intensities.
LUMA = (0.299, 0.587, 0.114)


def to_gray(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, 3, H, W)``, ``(B, H, W, 3)`` or ``(B, H, W)`` images (any dtype) -> ``(B, H, W)`` gray.

    Values keep their scale (uint8 input gives 0..255 floats): thresholds elsewhere assume it.
    """
    x = images.to(dtype)
    if x.dim() == 3:
        return x
    if x.shape[1] == 3:
        w = torch.tensor(LUMA, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1)
    if x.shape[-1] == 3:
        w = torch.tensor(LUMA, dtype=dtype, device=x.device)
        return (x * w).sum(-1)
    raise ValueError(f"expected (B,3,H,W), (B,H,W,3) or (B,H,W) images, got shape {tuple(images.shape)}")


def gaussian_kernel1d(sigma: float, size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of standard deviation ``sigma`` sampled on ``size`` (odd) taps."""
    if size % 2 != 1 or size < 1:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    x = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def separable_filter(gray: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter ``(B, H, W)`` images by ``kernel`` (odd length) along x then y; reflected borders.

    Written as a weighted sum of shifted views rather than ``conv2d``: single-channel
    convolutions are a slow path in PyTorch's CPU backends (~15x slower here), while a handful
    of fused multiply-adds over whole images is fast on any device.
    """
    size = kernel.numel()
    pad = size // 2
    h, w = gray.shape[-2:]
    # Reflect needs the pad smaller than the side; tiny images fall back to replicate.
    mode = "reflect" if min(h, w) > pad else "replicate"
    x = F.pad(gray.unsqueeze(1), (pad, pad, pad, pad), mode=mode).squeeze(1)
    taps = kernel.tolist()
    rows = x[..., 0:w] * taps[0]
    for i in range(1, size):
        rows.add_(x[..., i : i + w], alpha=taps[i])
    out = rows[..., 0:h, :] * taps[0]
    for i in range(1, size):
        out.add_(rows[..., i : i + h, :], alpha=taps[i])
    return out


def gaussian_smooth(gray: torch.Tensor, sigma: float = 2.0, size: int = 9) -> torch.Tensor:
    """Gaussian blur of ``(B, H, W)`` images (paper: sigma = 2 on a 9x9 window); same size out."""
    if sigma <= 0:
        return gray
    return separable_filter(gray, gaussian_kernel1d(sigma, size, torch.float64))


def box_smooth(gray: torch.Tensor, size: int = 9) -> torch.Tensor:
    """Mean over a ``size x size`` box (OpenCV BRIEF's integral-image sums, divided by size^2).

    Dividing by a constant keeps every comparison of two sums unchanged. Border pixels see
    reflected pixels; OpenCV never reads them (its border margin includes the box's
    half-width), and neither does our OpenCV-compatible mode.
    """
    return separable_filter(gray, torch.full((size,), 1.0 / size, dtype=torch.float64))
