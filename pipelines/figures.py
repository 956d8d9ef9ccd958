"""Figures a trained method draws of itself (e.g. MAE's reconstructions), saved as PNG artifacts.

A method may define ``figures(x) -> {name: uint8 (3, H, W)}`` on a normalised image batch; the
train step calls :func:`method_figures` after training and logs the files it returns.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.checkpoint import load_state
from components.data import shards as sh
from components.data.decode import decode_image
from components.data.views import normalize
from components.methods.registry import build_method


def method_figures(method: str, settings: dict, state_path: str, files: list[str], decode_size: int, out_dir: Path, count: int = 8, seed: int = 0) -> list[str]:
    """Draw the trained method's figures on the first ``count`` decodable images of ``files``.

    Returns the PNG file names written into ``out_dir`` (none if the method draws nothing).
    """
    torch.manual_seed(seed)
    m = build_method(method, settings)
    if not hasattr(m, "figures") or not files:
        return []
    m.load_state_dict(load_state(state_path)["method"])
    images = []
    for row in islice(sh.read_rows(files[0], ["image"]), count * 2):
        img, _ = decode_image(row["image"], decode_size)
        if img is not None:
            images.append(img)
        if len(images) == count:
            break
    if not images:
        return []
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    size = m.cfg.image_size
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    written = []
    for name, fig in m.figures(normalize(x), torch.Generator().manual_seed(seed)).items():
        scale = max(1, 256 // fig.shape[-1])  # tiny images: enlarge so the figure is readable
        img = Image.fromarray(fig.permute(1, 2, 0).numpy()).resize((fig.shape[-1] * scale, fig.shape[-2] * scale), Image.NEAREST)
        img.save(out_dir / f"{name}.png")
        written.append(f"{name}.png")
    return written
