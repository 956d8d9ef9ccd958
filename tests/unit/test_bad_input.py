"""Bad input: every row-level problem counted and reported with file and row (never a crash,
never silently dropped), every shard-level problem a fast error naming the file, every section
of the pipeline file validated, and property tests throwing random bytes and rows at the data path."""

from __future__ import annotations

import io
import os
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from components.data import shards as sh
from components.data.decode import MAX_PIXELS, decode_batch, decode_image, inspect_image
from components.data.ingest import ingest_folder
from components.data.views import two_crop_views, views_from_encoded
from components.errors import ReprflowError
from pipelines.cli import main
from pipelines.config import load_config
from tests.conftest import tiny_config


def _img(mode: str, size=(20, 12), fmt: str = "PNG", **kw) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65535, size[::-1])).astype(np.uint16))
    elif mode == "F":
        img = Image.fromarray(rng.random(size[::-1]).astype(np.float32))
    else:
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb() -> bytes:
    side = int(MAX_PIXELS**0.5) + 10
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")  # a few KB, 64 Mpx when decoded
    return buf.getvalue()


def _exif_rotated() -> bytes:
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees: 10 wide x 30 high
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


GOOD = {  # unusual but valid images: decoded, never reported
    "grayscale": _img("L"), "rgba": _img("RGBA"), "cmyk": _img("CMYK", fmt="JPEG"), "16bit": _img("I;16"),
    "palette": _img("P"), "float": _img("F", fmt="TIFF"), "exif": _exif_rotated(), "gif": _img("P", fmt="GIF"),
}


def _bad_images() -> dict[str, tuple[bytes | None, str]]:
    png = _img("RGB", (40, 40))
    return {
        "truncated": (png[: len(png) // 2], "undecodable"),
        "garbage": (b"\x89PNG\r\n\x1a\n\x00\x00 not really", "undecodable"),
        "zero": (b"", "zero bytes"),
        "null": (None, "null"),
        "one_px": (_img("RGB", (1, 1)), "smaller than"),
        "bomb": (_bomb(), "pixel limit"),
    }


def test_every_row_level_problem_is_reported_with_file_row_and_reason(tmp_path):
    rows = [{"id": f"good-{k}", "image": v, "captions": ["a caption"], "boxes": [[0, 0, 5, 5]]} for k, v in GOOD.items()]
    rows += [{"id": f"bad-{k}", "image": data} for k, (data, _) in _bad_images().items()]
    ok = _img("RGB", (32, 24))
    rows += [
        {"id": "good-grayscale", "image": ok},  # duplicate of the first row's id
        {"id": "empty-caption", "image": ok, "captions": ["fine", "   "]},
        {"id": "huge-caption", "image": ok, "captions": ["x" * (sh.MAX_CAPTION_CHARS + 1)]},
        {"id": "box-outside", "image": ok, "boxes": [[0, 0, 10, 10], [20, 4, 40, 8]]},
        {"id": "box-negative", "image": ok, "boxes": [[10, 10, 4, 20]]},
        {"id": "box-nan", "image": ok, "boxes": [[0, 0, float("nan"), 3]]},
        {"id": "exif-box", "image": GOOD["exif"], "boxes": [[0, 0, 10, 30]]},  # fits the rotated frame, not the stored one
    ]
    (f1,) = sh.write_shards(rows[:10], str(tmp_path / "a"))
    (f2,) = sh.write_shards(rows[10:], str(tmp_path / "b"))
    for f in (f1, f2):
        sh.check_shard_schema(f)  # row problems are not shard problems
    scans = [sh.scan_shard(f, 16) for f in (f1, f2)]
    assert [s["rows"] for s in scans] == [10, len(rows) - 10]
    bad = [b for s in scans for b in s["bad"]] + sh.duplicate_ids([f1, f2])
    where = {(b["id"], b["column"]): b for b in bad}
    assert not [b for b in bad if b["id"].startswith("good-") and b["column"] != "id"]
    for name, (_, reason) in _bad_images().items():
        b = where[(f"bad-{name}", "image")]
        assert reason in b["reason"] and b["action"] == "skipped" and b["file"] in (f1, f2)
        assert rows[b["row"] + (10 if b["file"] == f2 else 0)]["id"] == f"bad-{name}"  # the row number points at the row
    dup = where[("good-grayscale", "id")]
    assert dup["file"] == f2 and dup["row"] == len(GOOD) + len(_bad_images()) - 10 and f"first at {f1} row 0" in dup["reason"]
    assert "caption 1 is empty" in where[("empty-caption", "captions")]["reason"]
    assert "over the" in where[("huge-caption", "captions")]["reason"]
    assert "box 1 [20, 4, 40, 8] lies outside the 32x24 image" == where[("box-outside", "boxes")]["reason"]
    assert "negative or zero size" in where[("box-negative", "boxes")]["reason"]
    assert "not 4 finite numbers" in where[("box-nan", "boxes")]["reason"]
    assert ("exif-box", "boxes") not in where
    assert {b["action"] for b in bad if b["column"] != "image"} == {"kept"}
    assert len(bad) == len(_bad_images()) + 6  # nothing else, nothing twice


def test_odd_but_valid_images_decode_and_exif_rotation_applies():
    for name, data in GOOD.items():
        arr, why = decode_image(data, 16)
        assert why is None and arr.shape == (16, 16, 3) and arr.dtype == np.uint8, name
    assert inspect_image(GOOD["exif"], 16) == ((10, 30), None)
    # A 2 x 5000 strip is valid; decoding crops its centre instead of resizing it to 16 x 40000 first.
    strip = io.BytesIO()
    Image.new("RGB", (2, 5000), (200, 10, 10)).save(strip, format="PNG")
    arr, why = decode_image(strip.getvalue(), 16)
    assert why is None and arr.shape == (16, 16, 3) and arr[..., 0].mean() > 150


def test_data_path_skips_exactly_the_rows_the_scan_reports(tmp_path):
    images = [GOOD["palette"], None, b"junk", GOOD["cmyk"], b"", GOOD["16bit"]]
    imgs, keep, bad = decode_batch(images, [str(i) for i in range(6)], 16)
    assert keep.tolist() == [True, False, False, True, False, True] and imgs.shape == (3, 16, 16, 3) and len(bad) == 3
    views = views_from_encoded({"id": np.array([str(i) for i in range(6)], dtype=object), "image": np.array(images, dtype=object)},
                               two_crop_views(8), 16, torch.Generator().manual_seed(0))
    assert {k: v.shape[0] for k, v in views.items()} == {"view_0": 3, "view_1": 3}
    # A batch where nothing decodes yields empty views, not an exception.
    empty = views_from_encoded({"id": np.array(["a"], dtype=object), "image": np.array([b"x"], dtype=object)}, two_crop_views(8), 16)
    assert all(v.shape[0] == 0 for v in empty.values())


@pytest.mark.parametrize("table,message", [
    (pa.table({"id": ["a"], "image": [1]}), r"column 'image' has type int64, expected binary"),
    (pa.table({"id": [1], "image": [b"x"]}), r"column 'id' has type int64, expected string"),
    (pa.table({"id": ["a"], "image": [b"x"], "label": ["cat"]}), r"column 'label' has type string, expected int64"),
    (pa.table({"id": ["a"], "image": [b"x"], "captions": ["one caption"]}), r"column 'captions' has type string"),
    (pa.table({"id": ["a"], "image": [b"x"], "boxes": [["0,0,1,1"]]}), r"column 'boxes' has type list<element: string>, expected list"),
    (pa.table({"image": [b"x"]}), r"missing required column 'id'"),
    (pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.binary())}), r"shard has no rows"),
])
def test_shard_level_problems_fail_fast_naming_the_file(tmp_path, table, message):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(table, path)
    with pytest.raises(ReprflowError, match=rf"{path}: {message}"):
        sh.check_shard_schema(str(path))


def test_compatible_column_types_are_accepted(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"id": pa.array(["a"], pa.large_string()), "image": pa.array([b"x"], pa.large_binary()),
                             "label": pa.array([1], pa.int32()), "boxes": [[[0.0, 0.0, 1.0, 1.0]]], "captions": [["c"]]}), path)
    sh.check_shard_schema(str(path))


def test_foreign_files_among_shards_fail_fast_and_markers_are_ignored(tmp_path):
    sh.write_shards([{"id": "a", "image": b"x"}], str(tmp_path))
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".DS_Store").write_text("")
    assert sh.list_shards(str(tmp_path)) == [str(tmp_path / "part-00000.parquet")]
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReprflowError, match=rf"{tmp_path / 'notes.txt'}: not a Parquet shard"):
        sh.list_shards(str(tmp_path))
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "part-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ReprflowError, match=r"part-00001.parquet: not a readable Parquet file"):
        sh.check_shard_schema(str(tmp_path / "part-00001.parquet"))
    assert sh.list_shards(str(tmp_path / "missing"), missing_ok=True) == []


# --------------------------------------------------------------------------- pipeline files


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(name="has space"), r"name: String should match pattern"),
    (lambda d: d.update(seed="zero"), r"seed: Input should be a valid integer"),
    (lambda d: d.update(storage="s3://bucket/cache"), r"storage: 's3://bucket/cache': storage must be a local or mounted path"),
    (lambda d: d["datasets"]["scenes"].update(kind="csv"), r"datasets\.scenes\.kind: Input should be 'scenes' or 'shards'"),
    (lambda d: d["datasets"]["scenes"].update(image_size=4), r"datasets\.scenes\.image_size: Input should be greater than or equal to 8"),
    (lambda d: d["train"].update(num_workers=-1), r"train\.num_workers: Input should be greater than or equal to 0"),
    (lambda d: d["train"].update(use_gpu="maybe"), r"train\.use_gpu: Input should be a valid boolean"),
    (lambda d: d.update(methods=[]), r"methods: List should have at least 1 item"),
    (lambda d: d.update(methods=[{"settings": {}}]), r"methods\[0\]\.name: Field required"),
    (lambda d: d.update(tokenizers={"t": {"kind": "nosuch"}}), r"tokenizers\.t\.kind: "),
    (lambda d: d.update(tokenizers={"t": {"kind": "wordpiece", "dataset": "nope"}}), r"tokenizers\.t\.dataset: dataset 'nope' is not defined"),
    (lambda d: d["evaluate"].update(selection_metric="loss"), r"evaluate\.selection_metric: Input should be 'knn_top1' or 'linear_top1'"),
    (lambda d: d["evaluate"].update(brief={"enabled": True, "bits": 100}), r"evaluate\.brief\.bits: Input should be 128, 256 or 512"),
    (lambda d: d.update(register={"alias": "9lives"}), r"register\.alias: String should match pattern"),
    (lambda d: d.update(register={"min_improvement": -1}), r"register\.min_improvement: Input should be greater than or equal to 0"),
    (lambda d: d.update(mlflow={"tracking_uri": 5, "experiment": None}), r"mlflow\.tracking_uri: Input should be a valid string"),
    (lambda d: d.update(mlflow={"uri": "x"}), r"mlflow\.uri: unknown key"),
    (lambda d: d.update(ray={"num_cpus": 0}), r"ray\.num_cpus: Input should be greater than or equal to 1"),
    (lambda d: d.update(retrain={"data": "some"}), r"retrain\.data: Input should be 'new' or 'all'"),
    (lambda d: d.update(retrain={"margin": 500}), r"retrain\.margin: Input should be less than or equal to 100"),
    (lambda d: d.update(train=5), r"train: Input should be a valid dictionary"),
    (lambda d: d.update(datasets=["scenes"]), r"datasets: Input should be a valid dictionary"),
])
def test_an_invalid_value_in_every_section_is_named(tmp_path, capsys, mutate, message):
    data = tiny_config(tmp_path / "store")
    mutate(data)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ReprflowError, match=message):
        load_config(path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"reprflow: error: {path}: ") and err.count("\n") == 1


@pytest.mark.parametrize("text,message", [
    ("", r"must be a mapping of sections, got NoneType"),
    ("- a\n- b\n", r"must be a mapping of sections, got list"),
    ("name: [unclosed\n", r"not valid YAML"),
    ("just a string", r"must be a mapping of sections, got str"),
])
def test_a_file_that_is_not_a_pipeline_is_named(tmp_path, capsys, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reprflow: error: ") and str(path) in err and err.count("\n") == 1
    with pytest.raises(ReprflowError, match=message):
        load_config(path)


# --------------------------------------------------------------------------- property tests

# REPRFLOW_HYPOTHESIS_EXAMPLES=500 for a longer search than make test affords.
_FAST = settings(max_examples=int(os.environ.get("REPRFLOW_HYPOTHESIS_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def image_bytes(draw):
    """Valid encodings of random small images, often damaged: truncated, bytes flipped, or junk."""
    kind = draw(st.sampled_from(["valid", "truncated", "flipped", "junk", "none", "empty"]))
    if kind == "junk":
        return draw(st.binary(max_size=300))
    if kind == "none":
        return None
    if kind == "empty":
        return b""
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "CMYK", "I;16", "LA"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    seed = draw(st.integers(0, 2**16))
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    img = img.convert(mode) if mode != "I;16" else Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        img.convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flipped":
        b = bytearray(data)
        for i in draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=8)):
            b[i] ^= 0xFF
        return bytes(b)
    return data


@_FAST
@given(data=st.one_of(st.binary(max_size=2000), image_bytes()), size=st.sampled_from([8, 16, 33]))
def test_property_decode_never_raises(data, size):
    arr, why = decode_image(data, size)
    if arr is None:
        assert isinstance(why, str) and why
    else:
        assert why is None and arr.shape == (size, size, 3) and arr.dtype == np.uint8
    wh, why2 = inspect_image(data, size)
    assert (wh is None) == (arr is None) and why2 == why


_ids = st.text(alphabet=string.ascii_letters + string.digits + "/._-é ", min_size=0, max_size=12)
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_rows = st.lists(st.fixed_dictionaries({
    "id": st.one_of(_ids, st.sampled_from(["dup", "dup2"])),
    "image": image_bytes(),
    "label": st.one_of(st.none(), st.integers(-5, 50)),
    "captions": st.lists(st.one_of(st.text(max_size=30), st.just(""), st.just("y" * (sh.MAX_CAPTION_CHARS + 5))), max_size=3),
    "boxes": st.lists(st.lists(_floats, min_size=4, max_size=4), max_size=3),
}), min_size=1, max_size=12)


@_FAST
@given(rows=_rows, per_shard=st.integers(1, 5))
def test_property_random_rows_are_all_accounted_for(tmp_path_factory, rows, per_shard):
    root = tmp_path_factory.mktemp("rows")
    files = sh.write_shards(rows, str(root), rows_per_shard=per_shard, rows_per_group=2)
    for f in files:
        sh.check_shard_schema(f)
    scans = [sh.scan_shard(f, 16) for f in files]
    assert sum(s["rows"] for s in scans) == len(rows)
    bad = [b for s in scans for b in s["bad"]] + sh.duplicate_ids(files)
    skipped = {(b["file"], b["row"]) for b in bad if b["action"] == "skipped"}
    decodable = [decode_image(r["image"], 16)[0] is not None for r in rows]
    assert len(skipped) == decodable.count(False)  # every unusable image reported, nothing else skipped
    ids = [str(r["id"]) for r in rows]
    assert sum(1 for b in bad if b["column"] == "id") == len(ids) - len(set(ids))
    for b in bad:
        assert b["file"] in files and 0 <= b["row"] < len(rows) and b["reason"]
    # The data path (Ray Data's map function, here called directly) agrees: it keeps the decodable rows.
    batch = {"id": np.array(ids, dtype=object), "image": np.array([r["image"] for r in rows], dtype=object)}
    views = views_from_encoded(batch, two_crop_views(8), 16, torch.Generator().manual_seed(0))
    assert views["view_0"].shape[0] == sum(decodable)


@_FAST
@given(st.lists(st.tuples(st.sampled_from(["a.png", "b.jpg", "c.gif", "sub/d.png", "e.txt", "f.PNG"]), image_bytes()), min_size=1, max_size=6, unique_by=lambda t: t[0]))
def test_property_ingest_never_crashes_and_accounts_for_every_file(tmp_path_factory, files):
    src = tmp_path_factory.mktemp("src")
    for name, data in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data or b"")
    out = tmp_path_factory.mktemp("out")
    try:
        report = ingest_folder(src, str(out / "ds"), 0.3, 0.3)
    except ReprflowError as exc:
        assert "no images" in str(exc) or "no usable images" in str(exc)  # said, not crashed
        return
    written = [r["id"] for s in sh.SPLITS if report.rows[s] for r in sh.read_rows(sh.join(str(out / "ds"), s))]
    skipped = [s["file"] for s in report.skipped]
    assert sorted(written + skipped) == sorted(n for n, _ in files)  # every file: written or reported, once
    for rid in written:
        assert decode_image((src / rid).read_bytes(), 8)[0] is not None
