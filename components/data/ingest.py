"""Image folder -> shards, with a deterministic train/val/test split.

Layouts: ``root/<class>/<image>`` (labelled, classes sorted by name) or ``root/<image>``
(unlabelled). Each file goes to a split by a hash of its path relative to ``root``, so the
split of a file never changes when more files arrive. Undecodable files are listed in the
report and not written; files that resolve outside ``root`` (symlinks, ``..``) are refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from components.data import shards as sh
from components.data.decode import decode_image
from components.errors import ReprflowError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_image_inside(root: Path, rel: str, report) -> bytes | None:
    """The bytes of image ``root/rel``, or None with the reason added to ``report.skipped``:
    a path resolving outside ``root`` (symlink or '..': never pull in files from elsewhere on
    the machine), a missing file, or bytes that do not decode."""
    real = (root / rel).resolve()
    if not real.is_relative_to(root) or real == root:
        report.skipped.append({"file": rel, "reason": "resolves outside the input folder (symlink or '..'); refused"})
        return None
    if not real.is_file():
        report.skipped.append({"file": rel, "reason": "image file not found"})
        return None
    data = real.read_bytes()
    _, reason = decode_image(data, 8)
    if reason:
        report.skipped.append({"file": rel, "reason": reason})
        return None
    return data


def split_of(relpath: str, val_frac: float, test_frac: float) -> str:
    """Deterministic split of a file from the sha256 of its relative path."""
    u = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2**64
    return "val" if u < val_frac else "test" if u < val_frac + test_frac else "train"


@dataclass
class IngestReport:
    """What ingest did: rows per split, classes, and every skipped file with its reason."""

    rows: dict[str, int] = field(default_factory=lambda: {s: 0 for s in sh.SPLITS})
    classes: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def _files(root: Path) -> Iterator[tuple[Path, str | None, str | None]]:
    """``(file, class or None, reason to skip or None)`` for every file under ``root``."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    for f in sorted(root.iterdir()):
        if f.is_file() and subdirs:
            yield f, None, "not inside a class folder (the input has class sub-folders)"
        elif f.is_file():
            yield f, None, None if f.suffix.lower() in IMAGE_EXTENSIONS else "not an image file extension"
    for d in subdirs:
        for f in sorted(d.rglob("*")):
            if f.is_file():
                yield f, d.name, None if f.suffix.lower() in IMAGE_EXTENSIONS else "not an image file extension"


def ingest_folder(src: str | Path, out_uri: str, val_frac: float = 0.1, test_frac: float = 0.1, rows_per_shard: int = sh.DEFAULT_ROWS_PER_SHARD, name: str | None = None) -> IngestReport:
    """Ingest an image folder into a reprflow dataset at ``out_uri``; returns the report."""
    root = Path(src).resolve()
    if not root.is_dir():
        raise ReprflowError(f"input folder not found: {src}")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ReprflowError(f"--val-frac {val_frac} and --test-frac {test_frac} must be in [0, 1) and sum below 1")
    report = IngestReport()
    listed = list(_files(root))
    files = [(f, c) for f, c, why in listed if why is None]
    if not files:
        raise ReprflowError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {src}")
    # Nothing is dropped silently: files that are not images of this layout are in the report too.
    report.skipped += [{"file": f.relative_to(root).as_posix(), "reason": why} for f, _, why in listed if why is not None]
    report.classes = sorted({c for _, c in files if c is not None})
    index = {c: i for i, c in enumerate(report.classes)}
    per_split: dict[str, list[dict]] = {s: [] for s in sh.SPLITS}
    for path, cls in files:
        rel = path.relative_to(root).as_posix()
        data = read_image_inside(root, rel, report)
        if data is None:
            continue
        split = split_of(rel, val_frac, test_frac)
        per_split[split].append({"id": rel, "image": data, "label": index[cls] if cls is not None else None, "source": rel})
    if not any(per_split.values()):
        first = report.skipped[0]
        raise ReprflowError(f"no usable images in {src}: all {len(report.skipped)} files were skipped "
                            f"(first: {first['file']}: {first['reason']})")
    for split, rows in per_split.items():
        if rows:
            sh.write_shards(rows, sh.join(out_uri, split), rows_per_shard=rows_per_shard)
        report.rows[split] = len(rows)
    files_written = [f for s in sh.SPLITS if report.rows[s] for f in sh.list_shards(sh.join(out_uri, s))]
    info = sh.DatasetInfo(name or root.name, report.classes, report.rows, sh.fingerprint_files(files_written), {"source": str(root), "skipped": len(report.skipped)})
    sh.write_dataset_info(out_uri, info)
    return report


def ingest(src: str | Path, out_uri: str, val_frac: float = 0.1, test_frac: float = 0.1, name: str | None = None,
           coco_captions: str | Path | None = None, coco_instances: str | Path | None = None) -> IngestReport:
    """``reprflow ingest``: an image folder, or with COCO-style JSON files (captions and/or
    instances) an image folder described by them (:func:`components.data.coco.ingest_coco`)."""
    if coco_captions or coco_instances:
        from components.data.coco import ingest_coco

        return ingest_coco(src, out_uri, coco_captions, coco_instances, val_frac, test_frac, name=name)
    return ingest_folder(src, out_uri, val_frac, test_frac, name=name)
