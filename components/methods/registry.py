"""Method registry: name -> class. Adding a method = its file + one line here + tests."""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from components.errors import ReprflowError
from components.methods.base import Method, MethodConfig

# name -> "module:Class"; imported lazily so a method's optional dependencies load only when used.
METHODS: dict[str, str] = {
    "simclr": "components.methods.simclr:SimCLR",
    "byol": "components.methods.byol:BYOL",
    "mocov3": "components.methods.mocov3:MoCoV3",
    "dino": "components.methods.dino:DINO",
    "nnclr": "components.methods.nnclr:NNCLR",
    "meanshift": "components.methods.meanshift:MeanShift",
    "scl": "components.methods.scl:SCL",
    "mae": "components.methods.mae:MAE",
    "beit": "components.methods.beit:BEiT",
    "beitv2": "components.methods.beitv2:BEiTV2",
    "vqvae": "components.methods.vqvae:VQVAE",
    "vqkd": "components.methods.vqkd:VQKD",
    "visualbert": "components.methods.visualbert:VisualBERT",
}


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; a ReprflowError listing the known names otherwise."""
    if name not in METHODS:
        raise ReprflowError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def method_config(name: str, settings: dict[str, Any] | None = None, where: str = "") -> MethodConfig:
    """Validate ``settings`` against the method's config; errors name the dotted field path."""
    cls = method_class(name)
    try:
        return cls.Config.model_validate(settings or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        path = ".".join(str(p) for p in err["loc"])
        prefix = f"{where}." if where else ""
        raise ReprflowError(f"{prefix}{path}: {err['msg']}") from None


def build_method(name: str, settings: dict[str, Any] | MethodConfig | None = None) -> Method:
    """Build a method from its name and (validated or raw) settings."""
    cfg = settings if isinstance(settings, MethodConfig) else method_config(name, settings)
    return method_class(name)(cfg)
