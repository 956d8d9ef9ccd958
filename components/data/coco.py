"""COCO-style captions + instances JSON with a local image folder -> shards (the same schema).

``captions.json`` (COCO ``captions_*.json``): ``images`` (``id``, ``file_name``) and
``annotations`` (``image_id``, ``caption``). ``instances.json`` (COCO ``instances_*.json``,
optional): ``annotations`` (``image_id``, ``bbox`` as ``[x, y, width, height]`` pixels,
``category_id``) and ``categories`` (``id``, ``name``). Either file may be left out, not both.

Each image becomes one row: ``id`` = its ``file_name``, its captions in annotation order, its
boxes as ``[x0, y0, x1, y1]`` largest first (so a model that keeps the first K keeps the K
largest), ``label`` None (a COCO image has many categories; they are listed in
``dataset.json``). Splits come from the same hash of the file name as ``reprflow ingest`` of a
folder, so they never change as images are added. Local files only; missing, undecodable or
out-of-folder images, boxes without area and annotations of unknown images are listed in the
report, never written. Shards are written split by split, streaming (COCO does not fit in memory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from components.data import shards as sh
from components.data.ingest import IngestReport, read_image_inside, split_of
from components.errors import ReprflowError


def _load(path: str | Path | None, what: str) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ReprflowError(f"COCO {what} file not found: {path}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReprflowError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images", []), list) or not isinstance(data.get("annotations", []), list):
        raise ReprflowError(f"{path}: not a COCO {what} file (expected 'images' and 'annotations' lists)")
    return data


def coco_index(captions: dict, instances: dict, report: IngestReport) -> tuple[dict[Any, dict], list[str]]:
    """``{image id: {"file_name", "captions", "boxes"}}`` and the category names, from the two files."""
    images: dict[Any, dict] = {}
    for data in (captions, instances):
        for img in data.get("images", []):
            if "id" in img and img.get("file_name"):
                images.setdefault(img["id"], {"file_name": str(img["file_name"]), "captions": [], "boxes": []})
    for ann in captions.get("annotations", []):
        entry = images.get(ann.get("image_id"))
        if entry is None:
            report.skipped.append({"file": "captions", "reason": f"caption annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')}"})
        elif isinstance(ann.get("caption"), str) and ann["caption"].strip():
            entry["captions"].append(ann["caption"].strip())
    for ann in instances.get("annotations", []):
        entry = images.get(ann.get("image_id"))
        bbox = ann.get("bbox")
        if entry is None:
            report.skipped.append({"file": "instances", "reason": f"instance annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')}"})
        elif not (isinstance(bbox, list) and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0):
            report.skipped.append({"file": entry["file_name"], "reason": f"box {bbox} of annotation {ann.get('id')} has no area; not written"})
        else:
            x, y, w, h = (float(v) for v in bbox)
            entry["boxes"].append([x, y, x + w, y + h])
    for entry in images.values():
        entry["boxes"].sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    cats = sorted(instances.get("categories", []), key=lambda c: c.get("id", 0))
    return images, [str(c.get("name")) for c in cats]


def ingest_coco(image_dir: str | Path, out_uri: str, captions_json: str | Path | None = None, instances_json: str | Path | None = None,
                val_frac: float = 0.1, test_frac: float = 0.1, rows_per_shard: int = sh.DEFAULT_ROWS_PER_SHARD, name: str | None = None) -> IngestReport:
    """Ingest a COCO-style dataset into a reprflow dataset at ``out_uri``; returns the report."""
    root = Path(image_dir).resolve()
    if not root.is_dir():
        raise ReprflowError(f"image folder not found: {image_dir}")
    if captions_json is None and instances_json is None:
        raise ReprflowError("COCO ingest needs --coco-captions and/or --coco-instances")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ReprflowError(f"--val-frac {val_frac} and --test-frac {test_frac} must be in [0, 1) and sum below 1")
    report = IngestReport()
    images, categories = coco_index(_load(captions_json, "captions"), _load(instances_json, "instances"), report)
    if not images:
        raise ReprflowError(f"no images listed in {captions_json or instances_json}")
    by_split: dict[str, list[dict]] = {s: [] for s in sh.SPLITS}
    for entry in sorted(images.values(), key=lambda e: e["file_name"]):
        by_split[split_of(entry["file_name"], val_frac, test_frac)].append(entry)

    def rows(entries: list[dict]) -> Iterator[dict]:
        for entry in entries:
            rel = entry["file_name"]
            data = read_image_inside(root, rel, report)
            if data is None:
                continue
            yield {"id": rel, "image": data, "label": None, "captions": entry["captions"], "boxes": entry["boxes"], "source": f"coco:{rel}"}

    written: list[str] = []
    for split, entries in by_split.items():
        counted = _Counted(rows(entries))
        if entries:
            files = sh.write_shards(counted, sh.join(out_uri, split), rows_per_shard=rows_per_shard)
            written += files
        report.rows[split] = counted.n
    if not written:
        raise ReprflowError(f"no usable images under {image_dir} (see the {len(report.skipped)} skipped entries)")
    info = sh.DatasetInfo(name or root.name, [], report.rows, sh.fingerprint_files(written),
                          {"source": str(root), "format": "coco", "categories": categories, "skipped": len(report.skipped)})
    sh.write_dataset_info(out_uri, info)
    return report


class _Counted:
    """An iterator that counts what it yields."""

    def __init__(self, it: Iterator[dict]):
        self.it, self.n = it, 0

    def __iter__(self):
        for row in self.it:
            self.n += 1
            yield row
