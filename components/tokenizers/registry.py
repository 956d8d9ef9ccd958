"""Tokenizer kinds a pipeline's ``tokenizers:`` section may name.

Two sorts:
- image tokenizers (dVAE, VQ-KD, ...) are *methods* (``components.methods.registry.METHODS``,
  class attribute ``is_tokenizer = True``) and are trained by the generic Ray Train loop;
- text tokenizers are fitted by a function ``fit(texts, settings, out_dir) -> {name: file}``
  registered here as ``"module:function"`` (imported lazily).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Iterable

from components.errors import ReprflowError

TEXT_TOKENIZERS: dict[str, str] = {
    "wordpiece": "components.tokenizers.text:fit_wordpiece",
}


def image_tokenizer_kinds() -> list[str]:
    """Registered methods that are image tokenizers."""
    from components.methods.registry import METHODS, method_class

    return [name for name in METHODS if getattr(method_class(name), "is_tokenizer", False)]


def tokenizer_kind(kind: str) -> str:
    """"image" or "text" for a known kind; a ReprflowError listing the known kinds otherwise."""
    if kind in TEXT_TOKENIZERS:
        return "text"
    image = image_tokenizer_kinds()
    if kind in image:
        return "image"
    raise ReprflowError(f"unknown tokenizer kind '{kind}'; known kinds: {', '.join(sorted([*TEXT_TOKENIZERS, *image])) or 'none'}")


def text_tokenizer_fit(kind: str) -> Callable[[Iterable[str], dict, Path], dict[str, str]]:
    """The fit function of a text tokenizer kind."""
    if kind not in TEXT_TOKENIZERS:
        raise ReprflowError(f"unknown text tokenizer '{kind}'; known: {', '.join(sorted(TEXT_TOKENIZERS)) or 'none'}")
    module, fn = TEXT_TOKENIZERS[kind].split(":")
    return getattr(importlib.import_module(module), fn)
