"""`reprflow ingest` of a COCO-style captions + instances JSON with a local image folder."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from components.data import shards as sh
from components.data.ingest import ingest, split_of
from components.errors import ReprflowError


def _png(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    names = [f"img{i}.png" for i in range(8)] + ["sub/nested.png"]
    for i, n in enumerate(names):
        (images / n).write_bytes(_png((20 * i, 0, 0)))
    (images / "broken.png").write_bytes(b"not a png")
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png((0, 0, 255)))
    os.symlink(outside, images / "link.png")
    listed = names + ["broken.png", "link.png", "missing.png"]
    image_entries = [{"id": i + 1, "file_name": n, "width": 40, "height": 30} for i, n in enumerate(listed)]
    captions = {"images": image_entries, "annotations": [
        {"id": 100 + i, "image_id": i + 1, "caption": f"picture number {i}"} for i in range(len(listed))] + [
        {"id": 200, "image_id": 1, "caption": "a second caption of the first"},
        {"id": 201, "image_id": 999, "caption": "an orphan"}]}
    instances = {"images": image_entries, "categories": [{"id": 2, "name": "dog"}, {"id": 1, "name": "cat"}], "annotations": [
        {"id": 300, "image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 1},
        {"id": 301, "image_id": 1, "bbox": [0, 0, 20, 10], "category_id": 2},
        {"id": 302, "image_id": 2, "bbox": [5, 5, 0, 3], "category_id": 1}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return tmp_path, images, names


def test_coco_ingest_writes_the_shard_schema(coco):
    root, images, names = coco
    out = root / "ds"
    report = ingest(images, str(out), val_frac=0.25, test_frac=0.25, coco_captions=root / "captions.json", coco_instances=root / "instances.json")
    rows = {r["id"]: r for s in sh.SPLITS if report.rows[s] for r in sh.read_rows(sh.join(str(out), s))}
    assert set(rows) == set(names)  # broken, symlinked-out and missing images are not written
    first = rows["img0.png"]
    assert first["captions"] == ["picture number 0", "a second caption of the first"]
    assert first["boxes"] == [[0.0, 0.0, 20.0, 10.0], [1.0, 2.0, 4.0, 6.0]]  # [x, y, w, h] -> corners, largest first
    assert first["label"] is None and first["source"] == "coco:img0.png"
    assert rows["img1.png"]["boxes"] == []  # its only box had no area
    assert rows["sub/nested.png"]["captions"] == ["picture number 8"]
    assert Image.open(io.BytesIO(first["image"])).size == (40, 30)
    for name in names:  # the same split rule as a folder ingest: a file's split never changes
        assert name in {r["id"] for r in sh.read_rows(sh.join(str(out), split_of(name, 0.25, 0.25)), ["id"])}
    reasons = " | ".join(f"{s['file']}: {s['reason']}" for s in report.skipped)
    for expected in ("broken.png: undecodable", "link.png: resolves outside", "missing.png: image file not found", "unknown image_id 999", "has no area"):
        assert expected in reasons
    info = sh.read_dataset_info(str(out))
    assert info.classes == [] and info.extra["categories"] == ["cat", "dog"] and info.extra["format"] == "coco"
    assert sum(report.rows.values()) == len(names)


def test_coco_ingest_errors_name_the_problem(coco, tmp_path):
    root, images, _ = coco
    with pytest.raises(ReprflowError, match="not found"):
        ingest(images, str(tmp_path / "o1"), coco_captions=root / "nope.json")
    (root / "bad.json").write_text("{not json")
    with pytest.raises(ReprflowError, match="not a JSON file"):
        ingest(images, str(tmp_path / "o2"), coco_captions=root / "bad.json")
    (root / "list.json").write_text("[1, 2]")
    with pytest.raises(ReprflowError, match="not a COCO captions file"):
        ingest(images, str(tmp_path / "o3"), coco_captions=root / "list.json")
    # Captions only (no boxes) is fine: the model falls back to a grid of boxes.
    report = ingest(images, str(tmp_path / "o4"), coco_captions=root / "captions.json")
    rows = [r for s in sh.SPLITS if report.rows[s] for r in sh.read_rows(sh.join(str(tmp_path / "o4"), s))]
    assert rows and all(r["boxes"] == [] for r in rows)
