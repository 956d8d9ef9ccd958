"""Shards, scenes, decoding and ingest."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data import shards as sh
from components.data.decode import MAX_PIXELS, decode_image
from components.data.ingest import ingest_folder, split_of
from components.data.scenes import COLOURS, SHAPES, render_scene, scene_rows
from components.errors import ReprflowError


def _png(arr, mode=None, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_shards_round_trip_local_and_fsspec(tmp_path):
    rows = list(scene_rows(0, "train", 5, 32))
    for uri in (str(tmp_path / "ds"), "memory://reprflow-test/ds"):
        files = sh.write_shards(rows, uri, rows_per_shard=2)
        assert len(files) == 3
        back = list(sh.read_rows(uri))
        assert [r["id"] for r in back] == [r["id"] for r in rows]
        assert back[0]["image"] == rows[0]["image"] and back[0]["captions"] == rows[0]["captions"]
        assert back[0]["boxes"] == [pytest.approx(b) for b in rows[0]["boxes"]]
        assert sh.fingerprint_files(files) == sh.fingerprint_files(list(reversed(files)))


def test_shards_optional_columns_filled(tmp_path):
    sh.write_shards([{"id": 1, "image": b"x"}], str(tmp_path))
    (row,) = sh.read_rows(str(tmp_path))
    assert row == {"id": "1", "image": b"x", "label": None, "captions": [], "boxes": [], "source": ""}


def test_shard_schema_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "image": [1]}), bad)
    with pytest.raises(ReprflowError, match="bad.parquet: column 'image' has type int64"):
        sh.check_shard_schema(str(bad))
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"id": ["a"]}), missing)
    with pytest.raises(ReprflowError, match="missing required column 'image'"):
        sh.check_shard_schema(str(missing))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(ReprflowError, match="junk.parquet: not a readable Parquet file"):
        sh.check_shard_schema(str(junk))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ReprflowError, match="no .parquet shards"):
        sh.list_shards(str(tmp_path / "nothing"))


def test_scenes_are_deterministic_and_consistent():
    a, b = render_scene(7, "val", 3), render_scene(7, "val", 3)
    assert a == b
    assert render_scene(7, "test", 3)["image"] != a["image"]
    for row in scene_rows(0, "train", 30):
        caption = row["captions"][0]
        assert caption.startswith("a large ") and SHAPES[row["label"]] in caption.split(" and ")[0]
        assert any(c in caption for c in COLOURS)
        assert len(row["boxes"]) == caption.count(" and ") + 1
        for x0, y0, x1, y1 in row["boxes"]:
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


@pytest.mark.parametrize("data,reason", [
    (None, "null"), (b"", "zero bytes"), (b"garbage bytes", "undecodable"),
])
def test_decode_rejects_bad_bytes(data, reason):
    arr, why = decode_image(data, 16)
    assert arr is None and reason in why


def test_decode_rejects_truncated_tiny_and_bombs():
    png = _png(np.zeros((40, 40, 3), np.uint8) + 100)
    assert decode_image(png[: len(png) // 2], 16)[0] is None
    assert "smaller than" in decode_image(_png(np.zeros((1, 1, 3), np.uint8)), 16)[1]
    side = int(MAX_PIXELS**0.5) + 10
    big = Image.new("L", (side, side))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    assert "pixel limit" in decode_image(buf.getvalue(), 16)[1]


def test_decode_modes_and_exif():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)
    for data in (
        _png(rgb[..., 0], "L"),
        _png(np.dstack([rgb, np.full((20, 30), 128, np.uint8)]), "RGBA"),
        _png(rgb[..., 0].astype(np.uint16) * 257),
        _png(rgb, fmt="JPEG"),
    ):
        arr, why = decode_image(data, 16)
        assert why is None and arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    pal = Image.fromarray(rgb).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 16)[1] is None
    cmyk = Image.fromarray(rgb).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), 16)[1] is None
    # EXIF orientation 6 (rotate 90 CW on display): a 20x30 landscape becomes portrait before cropping.
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    arr, _ = decode_image(buf.getvalue(), 30)
    assert arr[0, :, 0].mean() > 200 and arr[-1, :, 0].mean() < 60  # red band moved to the top


def test_ingest_labelled_and_flat(tmp_path):
    src = tmp_path / "src"
    for cls in ("cats", "dogs"):
        (src / cls).mkdir(parents=True)
        for i in range(12):
            (src / cls / f"{i}.png").write_bytes(_png(np.full((8, 8, 3), i * 10, np.uint8)))
    (src / "dogs" / "broken.png").write_bytes(b"\x89PNG broken")
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    os.symlink(outside, src / "cats" / "link.png")
    rep = ingest_folder(src, str(tmp_path / "out"), 0.2, 0.2)
    assert rep.classes == ["cats", "dogs"]
    assert sum(rep.rows.values()) == 24
    reasons = {s["file"]: s["reason"] for s in rep.skipped}
    assert "undecodable" in reasons["dogs/broken.png"] and "outside" in reasons["cats/link.png"]
    info = sh.read_dataset_info(str(tmp_path / "out"))
    assert info.splits == rep.rows
    labels = {r["id"]: r["label"] for s in sh.SPLITS if rep.rows[s] for r in sh.read_rows(sh.join(str(tmp_path / "out"), s))}
    assert labels["cats/3.png"] == 0 and labels["dogs/3.png"] == 1
    # Same file, same split, whatever else is in the folder.
    assert split_of("cats/3.png", 0.2, 0.2) == split_of("cats/3.png", 0.2, 0.2)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    rep = ingest_folder(flat, str(tmp_path / "flat-out"), 0.0, 0.0)
    assert rep.rows["train"] == 1 and next(sh.read_rows(str(tmp_path / "flat-out/train")))["label"] is None
    with pytest.raises(ReprflowError, match="no images"):
        (tmp_path / "empty").mkdir()
        ingest_folder(tmp_path / "empty", str(tmp_path / "x"))
