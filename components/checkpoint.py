"""Training-state files: written with a sha256 manifest beside them, read back only after the
bytes match it, and loaded without executing code.

A state (``state.pt``) is a ``torch.save`` of plain tensors and containers; its manifest
(``state.pt.sha256``, JSON ``{"file", "sha256", "bytes"}``) is written last, so a crash leaves
a state without a manifest (unfinished), never a mismatched pair. :func:`load_state` refuses a
state whose bytes differ from its manifest, and ``torch.load(weights_only=True)`` refuses a
pickle that asks for anything but tensors - loading a checkpoint runs no code. Pure torch: the
training loop, the registry, retraining and upstream models of later steps all load through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from components.errors import ReprflowError

MANIFEST_SUFFIX = ".sha256"


def manifest_path(path: Path) -> Path:
    """Where the sha256 manifest of a state file lives: ``state.pt.sha256`` beside it."""
    return path.with_name(path.name + MANIFEST_SUFFIX)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state_file(state: dict, path: Path) -> None:
    """``torch.save`` a state (plain tensors and containers) to ``path`` with its manifest:
    written to ``path.tmp``, flushed to disk, then moved into place (see :func:`write_state_file`).
    OSError (disk full, folder not writable) propagates; the temporary file is removed."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    try:
        # Through a Python file: torch.save on a path turns ENOSPC into "basic_ios::clear: iostream error".
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        write_state_file(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_state_file(src: Path, dst: Path) -> None:
    """Move (or copy, if ``src`` must stay) a written state into place at ``dst`` with its manifest.

    The old manifest goes first and the new one comes last, so a crash in between leaves a state
    without a manifest (an unfinished checkpoint, skipped on resume), never a mismatched pair.
    """
    digest = sha256_file(src)
    manifest = manifest_path(dst)
    manifest.unlink(missing_ok=True)
    if src.parent == dst.parent and src.suffix == ".tmp":
        os.replace(src, dst)
    else:
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    tmp_manifest = manifest.with_suffix(".tmp-manifest")
    tmp_manifest.write_text(json.dumps({"file": dst.name, "sha256": digest, "bytes": dst.stat().st_size}) + "\n")
    os.replace(tmp_manifest, manifest)


def verify_state(path: Path, require_manifest: bool = True) -> None:
    """Refuse a state file whose bytes differ from its manifest (or, with ``require_manifest``, that has none)."""
    manifest = manifest_path(path)
    if not manifest.is_file():
        if require_manifest:
            raise ReprflowError(f"checkpoint {path} has no integrity manifest ({manifest.name}): it was not written completely by "
                                "reprflow, or its manifest was removed; refusing to load it (delete the checkpoint or its step folder and rerun)")
        return
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        raise ReprflowError(f"checkpoint manifest {manifest} is unreadable; refusing to load {path.name}") from None
    actual = sha256_file(path)
    if actual != expected:
        raise ReprflowError(f"checkpoint {path} failed its integrity check (sha256 {actual[:12]}..., manifest says {expected[:12]}...): "
                            "it was modified after reprflow wrote it; refusing to load it (delete it, or its step folder, and rerun)")


def load_state(path: Path, require_manifest: bool = True) -> dict:
    """Read a training state: integrity-checked against its manifest, then loaded without executing
    code (``weights_only``: a pickle asking for anything but tensors and plain containers is refused)."""
    path = Path(path)
    verify_state(path, require_manifest)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (not a zip), EOFError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReprflowError(f"checkpoint {path} cannot be loaded safely ({type(exc).__name__}: {first[:300]}); "
                            "reprflow loads only plain tensors, never pickled code") from None
