"""The BRIEF descriptor: n_d binary intensity tests on a smoothed patch, packed into bytes.

Calonder et al., ECCV 2010, Eq. (1)-(2): for a smoothed patch p and a test pair (x, y),

    tau(p; x, y) = 1 if p(x) < p(y) else 0,     f_nd(p) = sum_i 2^(i-1) tau(p; x_i, y_i).

Bit i of the descriptor is the i-th test of the sampling pattern (:mod:`.patterns`); bits are
packed 8 to a byte, most significant bit first (``numpy.packbits`` order, also OpenCV's).

Everything is batched: keypoints are a ``(B, K, 2)`` tensor of ``(x, y)`` pixel positions with a
``(B, K)`` validity mask (images have different keypoint counts), and the tests of all
keypoints of all images are one gather, with no per-keypoint Python loop, on CPU or GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from components.brief.patterns import DEFAULT_SEED, PATTERNS, sampling_pattern
from components.brief.smoothing import box_smooth, gaussian_smooth, to_gray

SMOOTHING = ("gaussian", "box")


@dataclass(frozen=True)
class BriefConfig:
    """Descriptor settings. Defaults are the paper's: n_d = 256, S = 48, G II, Gaussian sigma = 2 on 9x9.

    ``smoothing="box"`` is the OpenCV-compatible mode (9x9 box sums, as OpenCV's integral
    image computes them, and its wider border margin); see ``bench/brief_matching.py``.
    """

    bits: int = 256
    patch_size: int = 48
    sigma: float = 2.0
    kernel_size: int = 9
    pattern: str = "GII"
    seed: int = DEFAULT_SEED
    smoothing: str = "gaussian"

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; known: {', '.join(PATTERNS)}")
        if self.smoothing not in SMOOTHING:
            raise ValueError(f"unknown smoothing {self.smoothing!r}; known: {', '.join(SMOOTHING)}")

    @property
    def border(self) -> int:
        """Pixels a keypoint must keep from the image edge for every test to read inside the image.

        Gaussian mode smooths the whole image first, so only the patch must fit (S//2). Box mode
        reads box sums centred on the test pixels, as OpenCV does, so their half-width adds.
        """
        return self.patch_size // 2 + (self.kernel_size // 2 if self.smoothing == "box" else 0)

    def to_dict(self) -> dict:
        """JSON-able settings (for params and cache keys)."""
        return asdict(self)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` booleans -> ``(..., n // 8)`` uint8, most significant bit first (``np.packbits``)."""
    n = bits.shape[-1]
    if n % 8:
        raise ValueError(f"bit count must be a multiple of 8, got {n}")
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (bits.reshape(*bits.shape[:-1], n // 8, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(..., n_bytes)`` uint8 -> ``(..., 8 * n_bytes)`` bool."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8).bool()


def round_keypoints(keypoints: torch.Tensor) -> torch.Tensor:
    """Pixel positions of ``(x, y)`` keypoints: round half up, like OpenCV's ``(int)(x + 0.5)``."""
    if keypoints.is_floating_point():
        return torch.floor(keypoints + 0.5).long()
    return keypoints.long()


def inside_border(keypoints: torch.Tensor, height: int, width: int, border: int) -> torch.Tensor:
    """``(B, K)`` mask of rounded keypoints at least ``border`` pixels from every image edge."""
    xy = round_keypoints(keypoints)
    x, y = xy[..., 0], xy[..., 1]
    return (x >= border) & (x < width - border) & (y >= border) & (y < height - border)


def binary_tests(smoothed: torch.Tensor, keypoints: torch.Tensor, pattern: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed descriptors of keypoints on already smoothed ``(B, H, W)`` images.

    ``keypoints``: ``(B, K, 2)`` ``(x, y)``; ``pattern``: ``(n_d, 4)`` offsets. Returns
    ``(descriptors (B, K, n_d/8) uint8, valid (B, K) bool)``: a keypoint whose patch would leave
    the image is marked invalid (its descriptor is all zeros), never read out of bounds.
    """
    b, h, w = smoothed.shape
    pattern = pattern.to(smoothed.device)
    reach = int(pattern.abs().max()) if len(pattern) else 0
    ok = inside_border(keypoints, h, w, reach)
    if valid is not None:
        ok = ok & valid.to(ok.device)
    xy = round_keypoints(keypoints).to(smoothed.device)
    # Invalid keypoints read the image centre instead (a safe index); their bits are zeroed below.
    xy = torch.where(ok.unsqueeze(-1), xy, torch.tensor([w // 2, h // 2], device=xy.device))
    base = (xy[..., 1] * w + xy[..., 0]).unsqueeze(-1)  # (B, K, 1)
    # Both points of every test in one gather: offsets [x_1..x_nd, y_1..y_nd] in flat pixels.
    offsets = torch.cat([pattern[:, 1] * w + pattern[:, 0], pattern[:, 3] * w + pattern[:, 2]])
    k, nd = keypoints.shape[1], pattern.shape[0]
    vals = smoothed.reshape(b, h * w).gather(1, (base + offsets).reshape(b, -1)).reshape(b, k, 2, nd)
    bits = (vals[:, :, 0] < vals[:, :, 1]) & ok.unsqueeze(-1)  # Eq. (1): tau = 1 iff p(x) < p(y)
    return pack_bits(bits), ok


class BriefExtractor:
    """Grayscale -> smoothing -> binary tests, for a batch of images on any device.

    ``BriefExtractor(BriefConfig())(images, keypoints)`` -> ``(descriptors, valid)``. The
    pattern is drawn once (fixed seed) and copied to a device the first time it is used there.
    """

    def __init__(self, config: BriefConfig | None = None):
        self.config = config or BriefConfig()
        c = self.config
        self.pattern = sampling_pattern(c.pattern, c.bits, c.patch_size, c.seed)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def border(self) -> int:
        """Pixels a keypoint must keep from the image edge (see :attr:`BriefConfig.border`)."""
        return self.config.border

    def smooth(self, gray: torch.Tensor) -> torch.Tensor:
        """The image the tests read: Gaussian (paper) or box (OpenCV-compatible) smoothing."""
        c = self.config
        if c.smoothing == "box":
            return box_smooth(gray, c.kernel_size)
        return gaussian_smooth(gray, c.sigma, c.kernel_size)

    def __call__(self, images: torch.Tensor, keypoints: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Descriptors ``(B, K, bits/8)`` uint8 and validity ``(B, K)`` of keypoints on images.

        ``images``: ``(B, 3, H, W)``/``(B, H, W, 3)`` RGB or ``(B, H, W)`` gray, any dtype; float
        gray images keep their dtype (float64 makes ties between test pixels vanishingly rare).
        Keypoints closer than :attr:`border` to an edge come back invalid.
        """
        gray = images if images.dim() == 3 and images.is_floating_point() else to_gray(images)
        h, w = gray.shape[-2:]
        ok = inside_border(keypoints, h, w, self.border)
        if valid is not None:
            ok = ok & valid.to(ok.device)
        pattern = self._on_device.setdefault(gray.device, self.pattern.to(gray.device))
        return binary_tests(self.smooth(gray), keypoints.to(gray.device), pattern, ok.to(gray.device))
