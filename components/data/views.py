"""View recipes and their batched execution: what each sample must become for a method.

A method declares a :class:`ViewRecipe` (e.g. two 32-px crops with colour jitter; 2 global +
6 local crops); the data side executes it here without knowing which method asked. Every
random parameter is drawn per sample, and the work is batched tensor ops (RoIAlign does crop +
resize of the whole batch in one call), so the same code runs in a Ray Data CPU task or on a
training GPU.

Differences from torchvision's per-image transforms, kept on purpose for batching: the colour
jitter order is fixed (brightness, contrast, saturation, hue) instead of shuffled per image, hue
is a rotation in YIQ space (a linear approximation of the HSV hue shift), jitter + grayscale
are composed into one per-sample colour matrix (clipped once at the end, not after each op),
and an out-of-range crop is clamped instead of retried.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view: crop, flip, colour, blur and solarize settings (SimCLR's defaults)."""

    size: int = 32
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # blur_sigma is in pixels of a view of this side (the papers' 224 px); a view of side s blurs
    # with sigma * s / blur_reference_size, so a 16-px view is blurred as much *relative to its
    # content* as a 224-px one (sigma 2 px on a 16-px view would erase the shapes).
    blur_reference_size: int = 224
    solarize_p: float = 0.0
    # Probability of inverting the whole view (x -> 255 - x) after every other step. Colour jitter
    # rescales luminance but keeps its order, so "the shape is darker than its background" survives
    # every jitter; inversion flips that order and leaves the outline (README, "View overrides").
    invert_p: float = 0.0


# ViewSpec fields a pipeline may override on every view of a method's recipe (``view_overrides``);
# the crop's size and scale stay the method's (its ``image_size`` / ``crop_scale`` settings, and
# multi-crop's local crops differ from its global ones on purpose). components.methods.base.ViewOverrides
# (the pipeline-facing config) declares the same fields with their bounds; a unit test keeps the two equal.
OVERRIDABLE = ("flip_p", "jitter_p", "brightness", "contrast", "saturation", "hue", "gray_p", "blur_p", "solarize_p", "invert_p")


def override_views(recipe: "ViewRecipe", overrides: dict) -> "ViewRecipe":
    """``recipe`` with ``overrides`` (ViewSpec field -> value, fields in :data:`OVERRIDABLE`)
    set on every view; an empty dict returns it unchanged."""
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"view_overrides: {bad} cannot be overridden; allowed: {', '.join(OVERRIDABLE)}")
    if not overrides:
        return recipe
    return replace(recipe, views=tuple(replace(v, **overrides) for v in recipe.views))


@dataclass(frozen=True)
class ViewRecipe:
    """The views every sample becomes, keyed ``view_0``, ``view_1``, ... in order."""

    views: tuple[ViewSpec, ...] = field(default_factory=lambda: (ViewSpec(), ViewSpec()))
    # Vision-language methods also need the row's text and regions (components/data/regions.py):
    # > 0 adds a uint8 ``caption`` column of this many UTF-8 bytes (one caption drawn per sample)
    caption_bytes: int = 0
    # > 0 adds a float32 ``boxes`` column (N, max_boxes, 4): boxes normalised to the decoded image, -1 = none
    max_boxes: int = 0

    def to_dict(self) -> dict:
        """A JSON-able description (for configs, cache keys and MLflow params)."""
        extra = {k: v for k, v in (("caption_bytes", self.caption_bytes), ("max_boxes", self.max_boxes)) if v}
        return {"views": [asdict(v) for v in self.views], **extra}

    @property
    def keys(self) -> list[str]:
        """Batch keys of the views, in order."""
        return [f"view_{i}" for i in range(len(self.views))]

    @property
    def columns(self) -> list[str]:
        """Shard columns the recipe reads."""
        return ["id", "image", *(["captions"] if self.caption_bytes else []), *(["boxes"] if self.max_boxes else [])]


def byol_views(size: int, scale: tuple[float, float], jitter_strength: float = 1.0) -> ViewRecipe:
    """BYOL's asymmetric pair (Grill et al. 2020, Table 6), which NNCLR and MoCo v3 use too:
    colour jitter (0.4, 0.4, 0.2, 0.1) x ``jitter_strength`` with p 0.8 and grayscale 0.2 on
    both views; blur always on view 0 and with p 0.1 on view 1; solarisation (p 0.2) on view 1."""
    s = jitter_strength
    common = dict(size=size, scale=tuple(scale), brightness=0.4 * s, contrast=0.4 * s, saturation=0.2 * s, hue=min(0.5, 0.1 * s))
    return ViewRecipe(views=(ViewSpec(**common, blur_p=1.0, solarize_p=0.0), ViewSpec(**common, blur_p=0.1, solarize_p=0.2)))


def mocov2_view(size: int, scale: tuple[float, float], jitter_strength: float = 1.0) -> ViewSpec:
    """MoCo v2's augmentation (Chen et al. 2020), which SimSiam, SCL and MSF's strong view use:
    colour jitter (0.4, 0.4, 0.4, 0.1) x ``jitter_strength`` with p 0.8, grayscale 0.2, blur 0.5."""
    s = jitter_strength
    return ViewSpec(size=size, scale=tuple(scale), brightness=0.4 * s, contrast=0.4 * s, saturation=0.4 * s, hue=min(0.5, 0.1 * s))


def two_crop_views(size: int = 32, **overrides) -> ViewRecipe:
    """SimCLR's recipe: two views drawn from the same distribution."""
    spec = ViewSpec(size=size, **overrides)
    return ViewRecipe(views=(spec, spec))


def make_views(images: torch.Tensor, recipe: ViewRecipe, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Execute a recipe on a batch of uint8 images (N, H, W, 3) or (N, 3, H, W).

    Returns ``{"view_i": uint8 tensor (N, 3, size_i, size_i)}`` on the images' device.
    """
    x = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images
    x = x.float()
    return {key: augment(x, spec, generator) for key, spec in zip(recipe.keys, recipe.views)}


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _bernoulli(n: int, p: float, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Random parameters are drawn on the CPU (one generator, so a seed gives the same views on
    # any device) and copied without blocking: a blocking copy to a GPU waits for all queued
    # work, which would stall the host between the views and the training step.
    return t if t.device == device else t.to(device, non_blocking=True)


def crop_boxes(n: int, h: int, w: int, spec: ViewSpec, g: torch.Generator | None) -> torch.Tensor:
    """Random-resized-crop boxes ``(n, 4)`` as ``x0, y0, x1, y1`` in pixels."""
    area = _uniform(n, *spec.scale, g) * h * w
    log_r = _uniform(n, math.log(spec.ratio[0]), math.log(spec.ratio[1]), g)
    ratio = torch.exp(log_r)
    cw = torch.sqrt(area * ratio).clamp(1, w)
    ch = torch.sqrt(area / ratio).clamp(1, h)
    x0 = torch.rand(n, generator=g) * (w - cw)
    y0 = torch.rand(n, generator=g) * (h - ch)
    return torch.stack([x0, y0, x0 + cw, y0 + ch], dim=1)


def augment(x: torch.Tensor, spec: ViewSpec, g: torch.Generator | None = None) -> torch.Tensor:
    """One view of a float batch (N, 3, H, W) in [0, 255]; returns uint8 (N, 3, size, size)."""
    n, _, h, w = x.shape
    dev = x.device
    if n == 0:  # every image of the batch was undecodable (reported by the dataset scan): no views, no error
        return torch.zeros((0, 3, spec.size, spec.size), dtype=torch.uint8, device=dev)
    boxes = crop_boxes(n, h, w, spec, g)
    # One bilinear sample per output pixel (exact at 1:1) unless some crop shrinks by more than
    # 2x; then sampling_ratio=0 (adaptive: ceil(crop/out) samples per pixel) anti-aliases, at
    # about twice the cost. Decoding once to ~1.3x the view size keeps the fast path common.
    shrink = float(torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).max()) / spec.size
    rois = _to(torch.cat([torch.arange(n, dtype=torch.float32)[:, None], boxes], dim=1), dev)
    v = roi_align(x, rois, output_size=(spec.size, spec.size), spatial_scale=1.0, sampling_ratio=1 if shrink <= 2 else 0, aligned=True)

    flip = _to(_bernoulli(n, spec.flip_p, g), dev)
    v = torch.where(flip[:, None, None, None], v.flip(3), v)

    jit = _bernoulli(n, spec.jitter_p, g)
    gray = _bernoulli(n, spec.gray_p, g)
    if jit.any() or gray.any():
        v = _colour(v, jit, gray, spec, g)
    blur = _bernoulli(n, spec.blur_p, g)
    sigma = _uniform(n, *spec.blur_sigma, g) * (spec.size / spec.blur_reference_size)
    if blur.any():
        idx = _to(blur.nonzero().squeeze(1), dev)
        v[idx] = gaussian_blur(v[idx], _to(sigma[blur], dev))
    sol = _bernoulli(n, spec.solarize_p, g)
    if sol.any():
        v = torch.where(_to(sol, dev)[:, None, None, None] & (v >= 128), 255.0 - v, v)
    inv = _bernoulli(n, spec.invert_p, g) if spec.invert_p > 0 else None
    if inv is not None and inv.any():
        v = torch.where(_to(inv, dev)[:, None, None, None], 255.0 - v, v)
    return v.round_().clamp_(0, 255).to(torch.uint8)


_GRAY_W = torch.tensor([0.299, 0.587, 0.114])
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _colour(v: torch.Tensor, jit: torch.Tensor, gray: torch.Tensor, spec: ViewSpec, g: torch.Generator | None) -> torch.Tensor:
    """Colour jitter (brightness, contrast, saturation, hue) then grayscale, as ONE per-sample map.

    Each of these is linear in RGB, so they compose into a 3x3 matrix and an offset per sample:
    one pass over the pixels instead of six. Intermediate clipping to [0, 255] (torchvision
    clips after every op) is dropped; only the final result is clipped.
    """
    n, dev = v.shape[0], v.device

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(n, max(0.0, 1 - strength), 1 + strength, g)
        return torch.where(jit, f, torch.ones_like(f))

    b, c, s = factor(spec.brightness), factor(spec.contrast), factor(spec.saturation)
    hue = torch.where(jit, _uniform(n, -spec.hue, spec.hue, g), torch.zeros(n))
    eye = torch.eye(3).expand(n, 3, 3)
    ones_w = torch.ones(3, 1) @ _GRAY_W[None]  # x -> gray(x) in every channel
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * ones_w
    theta = hue * 2 * math.pi
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    hue_m = torch.linalg.inv(_RGB2YIQ) @ rot @ _RGB2YIQ
    m = hue_m @ sat * (b * c)[:, None, None]
    m = torch.where(gray[:, None, None], ones_w @ m, m)
    # Contrast pulls towards the image's mean gray (after brightness); gray, saturation and hue
    # maps all fix the gray axis, so the offset passes through them unchanged.
    gray_w, m = _to(_GRAY_W, dev).to(v.dtype), _to(m, dev).to(v.dtype)
    if v.is_cuda:
        # Elementwise, not einsum: a GPU may run einsum's matrix products in TF32 (10-bit
        # mantissa), which would move pixels by a rounding step against the CPU's views.
        mean_gray = (v * gray_w.view(1, 3, 1, 1)).sum((1, 2, 3)) / (v.shape[2] * v.shape[3])
        out = sum(m[:, :, j, None, None] * v[:, j : j + 1] for j in range(3))
    else:
        mean_gray = torch.einsum("c,nchw->n", gray_w, v) / (v.shape[2] * v.shape[3])
        out = torch.einsum("nij,njhw->nihw", m, v)
    offset = _to((1 - c) * b, dev).to(v.dtype) * mean_gray
    return (out + offset[:, None, None, None]).clamp_(0, 255)


def gaussian_blur(v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (0 leaves a sample unchanged)."""
    n, ch, h, w = v.shape
    k = max(3, (int(0.1 * min(h, w)) // 2) * 2 + 1)
    r = k // 2
    t = torch.arange(-r, r + 1, device=v.device, dtype=v.dtype)
    s = sigma.to(v.dtype).clamp_min(1e-3)[:, None]
    kern = torch.exp(-(t[None] ** 2) / (2 * s**2))
    kern = kern / kern.sum(dim=1, keepdim=True)
    kern = torch.where(sigma[:, None] > 0, kern, (t[None] == 0).to(v.dtype))
    weight = kern.repeat_interleave(ch, dim=0)  # (n*ch, k)
    flat = v.reshape(1, n * ch, h, w)
    # Full fp32 on a GPU too (cuDNN runs fp32 convolutions in TF32 by default), so GPU views
    # match the CPU's to rounding.
    tf32 = v.is_cuda and torch.backends.cudnn.allow_tf32
    if tf32:
        torch.backends.cudnn.allow_tf32 = False
    try:
        flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="reflect"), weight[:, None, None, :], groups=n * ch)
        flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="reflect"), weight[:, None, :, None], groups=n * ch)
    finally:
        if tf32:
            torch.backends.cudnn.allow_tf32 = True
    return flat.reshape(n, ch, h, w)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (or 0-255 float) NCHW -> float, standardised with ``mean``/``std`` (0-1 scale)."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1) * 255.0
    return (x.float() - m) / s


def views_from_encoded(batch: dict, recipe: ViewRecipe, decode_size: int, generator: torch.Generator | None = None) -> dict:
    """The data path's one function: encoded image bytes -> uint8 views (numpy, NCHW).

    ``batch`` is a column dict with ``image`` (bytes) and ``id`` (plus ``captions``/``boxes`` when
    the recipe asks for them: see :attr:`ViewRecipe.columns`). Rows whose image cannot be
    decoded are left out here; the dataset scan step has already counted and reported them.
    """
    from components.data.decode import decode_batch

    imgs, keep, _ = decode_batch(batch["image"], batch["id"], decode_size)
    views = make_views(torch.from_numpy(imgs), recipe, generator)
    out = {k: v.numpy() for k, v in views.items()}
    if recipe.caption_bytes or recipe.max_boxes:
        from components.data.regions import text_and_regions

        out.update(text_and_regions(batch, keep, decode_size, recipe.caption_bytes, recipe.max_boxes, generator))
    return out
