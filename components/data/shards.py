"""Parquet shards: the one on-disk format of reprflow's data.

One row per image: ``id`` (string), ``image`` (encoded PNG/JPEG bytes), ``label`` (nullable
int), ``captions`` (list of strings, possibly empty), ``boxes`` (list of ``[x0, y0, x1, y1]``
pixel boxes, possibly empty) and ``source`` (where the row came from). A dataset is a folder
(local or any filesystem pyarrow/fsspec understands: ``s3://``, ``gs://``) holding one
sub-folder per split (``train/``, ``val/``, ``test/``) of ``part-NNNNN.parquet`` files, plus a
``dataset.json`` with the class names and the split sizes.

Problems are sorted by scope. A *shard-level* problem (a file that is not Parquet, a missing
column, a column of the wrong type, a shard without rows) stops the run at once with an error
naming the file: nothing in that file can be trusted. A *row-level* problem (an image that does
not decode, a duplicate id, an empty or huge caption, a box outside its image) is counted and
listed with its file and row by :func:`scan_shard` / :func:`duplicate_ids`, and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from components.errors import ReprflowError

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("label", pa.int64()),
        pa.field("captions", pa.list_(pa.string())),
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        pa.field("source", pa.string()),
    ]
)
REQUIRED_COLUMNS = ("id", "image")
SPLITS = ("train", "val", "test")
# A caption longer than this is not a caption (a pasted document, a base64 blob): reported, not used.
MAX_CAPTION_CHARS = 10_000
# Files a shard folder may hold besides shards (Spark/Hadoop markers, editor and OS droppings);
# pyarrow's dataset discovery skips the same prefixes.
IGNORED_PREFIXES = (".", "_")
# ~64 KiB PNGs x 256 rows keeps a row group a few MiB: small enough to stream, big enough to read fast.
DEFAULT_ROWS_PER_GROUP = 256
DEFAULT_ROWS_PER_SHARD = 2048


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or a URI (``s3://``, ``gs://``, ``file://``).

    pyarrow's own filesystems are used when they know the scheme; any other scheme goes
    through fsspec, so every filesystem fsspec understands works too.
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/@\s:]*)(?::[^/@\s]*)?@")
_SECRET_QUERY = re.compile(r"(?i)(?P<key>[?&;](?:[a-z0-9_\-]*(?:token|secret|password|passwd|signature|credential|sig|key|auth)[a-z0-9_\-]*))=[^&;#\s'\"]*")


def safe_uri(text: str) -> str:
    """``text`` with credentials inside URIs masked, for messages, reports and logs.

    ``s3://AKIA...:secret@bucket/x`` -> ``s3://***@bucket/x``; ``https://u:p@host`` ->
    ``https://***@host``; query values of token/secret/password/signature/key parameters
    (pre-signed URLs) -> ``***``. Works on any text, so a whole message can be passed.
    """
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group('key')}=***", text)


def write_shards(
    rows: Iterable[dict[str, Any]],
    uri: str,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
) -> list[str]:
    """Write rows (dicts with the schema's columns) as ``part-NNNNN.parquet`` files under ``uri``.

    Returns the written file URIs. Missing optional columns are filled (``label`` None,
    ``captions``/``boxes`` empty, ``source`` ""), so callers only pass what they know.
    """
    fs, root = resolve(uri)
    fs.create_dir(root, recursive=True)
    written: list[str] = []
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        if not batch:
            return
        table = pa.Table.from_pylist([_fill(r) for r in batch], schema=SHARD_SCHEMA)
        name = f"part-{len(written):05d}.parquet"
        with fs.open_output_stream(f"{root}/{name}") as sink:
            pq.write_table(table, sink, row_group_size=rows_per_group)
        written.append(join(uri, name))
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) >= rows_per_shard:
            flush()
    flush()
    return written


def _fill(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "image": row.get("image"),
        "label": row.get("label"),
        "captions": list(row.get("captions") or []),
        "boxes": [list(map(float, b)) for b in (row.get("boxes") or [])],
        "source": row.get("source") or "",
    }


def list_shards(uri: str, missing_ok: bool = False) -> list[str]:
    """All ``*.parquet`` files directly under ``uri``, sorted.

    A clear error if there are none, or if the folder holds any other file (a CSV dropped among
    the shards would otherwise be silently left out); names starting with ``.`` or ``_`` (``_SUCCESS``,
    ``.DS_Store``) are ignored. ``missing_ok``: a folder that does not exist gives ``[]``.
    """
    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        if missing_ok:
            return []
        raise ReprflowError(f"shard folder not found: {safe_uri(uri)}")
    if info.type == pafs.FileType.File:
        return [uri]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(IGNORED_PREFIXES))
    foreign = [n for n in names if not n.endswith(".parquet")]
    if foreign:
        raise ReprflowError(f"{safe_uri(join(uri, foreign[0]))}: not a Parquet shard (a shard folder holds only *.parquet files"
                            f"{f'; {len(foreign)} such files' if len(foreign) > 1 else ''}); move it out of {safe_uri(uri)}")
    if not names:
        raise ReprflowError(f"no .parquet shards in {safe_uri(uri)}")
    return [join(uri, f) for f in names]


def check_shard_schema(file_uri: str) -> None:
    """Fail fast, naming the file, on a shard-level problem: not Parquet, a required column
    missing, a column of the wrong type (optional columns are checked when present), no rows."""
    fs, path = resolve(file_uri)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            meta, schema = pf.metadata, pf.schema_arrow
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReprflowError(f"{safe_uri(file_uri)}: not a readable Parquet file ({safe_uri(str(exc))})") from None
    for name in REQUIRED_COLUMNS:
        if name not in schema.names:
            raise ReprflowError(f"{safe_uri(file_uri)}: missing required column '{name}'")
    for name in SHARD_SCHEMA.names:
        if name in schema.names and not _type_ok(schema.field(name).type, SHARD_SCHEMA.field(name).type):
            raise ReprflowError(f"{safe_uri(file_uri)}: column '{name}' has type {schema.field(name).type}, expected {SHARD_SCHEMA.field(name).type}")
    if meta.num_rows == 0:
        raise ReprflowError(f"{safe_uri(file_uri)}: shard has no rows (left by a writer that failed?); delete it or re-ingest")


def _type_ok(got: pa.DataType, want: pa.DataType) -> bool:
    """Types a reader handles as ``want``: large/view variants, any integer label, any float box."""
    if got == want:
        return True
    if pa.types.is_binary(want):
        return pa.types.is_large_binary(got) or pa.types.is_binary_view(got)
    if pa.types.is_string(want):
        return pa.types.is_large_string(got) or pa.types.is_string_view(got)
    if pa.types.is_integer(want):
        return pa.types.is_integer(got)
    if pa.types.is_list(want) or pa.types.is_fixed_size_list(want):
        if not (pa.types.is_list(got) or pa.types.is_large_list(got) or pa.types.is_fixed_size_list(got)):
            return False
        inner, inner_want = got.value_type, want.value_type
        if pa.types.is_floating(inner_want):
            return pa.types.is_floating(inner) or pa.types.is_integer(inner)
        return _type_ok(inner, inner_want)
    return False


def row_problems(row: dict[str, Any], image_size: tuple[int, int] | None) -> list[tuple[str, str]]:
    """Row-level problems of a row's captions and boxes as ``(column, reason)`` pairs.

    ``image_size`` is the decoded image's ``(width, height)`` (after EXIF rotation), or None when
    the image itself is bad (then boxes cannot be checked against it).
    """
    out: list[tuple[str, str]] = []
    for i, cap in enumerate(row.get("captions") or []):
        if cap is None or not str(cap).strip():
            out.append(("captions", f"caption {i} is empty"))
        elif len(cap) > MAX_CAPTION_CHARS:
            out.append(("captions", f"caption {i} has {len(cap)} characters, over the {MAX_CAPTION_CHARS} limit"))
    for i, box in enumerate(row.get("boxes") or []):
        if box is None or len(box) != 4 or any(v is None or not math.isfinite(v) for v in box):
            out.append(("boxes", f"box {i} {box} is not 4 finite numbers"))
            continue
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            out.append(("boxes", f"box {i} {_fmt_box(box)} has negative or zero size"))
        elif image_size is not None and (x0 < 0 or y0 < 0 or x1 > image_size[0] or y1 > image_size[1]):
            out.append(("boxes", f"box {i} {_fmt_box(box)} lies outside the {image_size[0]}x{image_size[1]} image"))
    return out


def _fmt_box(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def scan_shard(file_uri: str, decode_size: int) -> dict[str, Any]:
    """Decode every row of one shard and check its captions and boxes.

    Returns ``{"file", "rows", "bad": [{"file", "row", "id", "column", "reason", "action"}]}``;
    ``action`` is ``skipped`` for an unusable image (the data path leaves the row out of training,
    embedding and evaluation) and ``kept`` for a bad caption or box (the image is still used).
    Never raises on row content; a shard-level problem is :func:`check_shard_schema`'s job.
    """
    from components.data.decode import inspect_image

    fs, path = resolve(file_uri)
    shown = safe_uri(file_uri)
    bad, n = [], 0
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in ("id", "image", "captions", "boxes") if c in pf.schema_arrow.names]
        for rg in range(pf.num_row_groups):
            for row in pf.read_row_group(rg, columns=cols).to_pylist():
                size, reason = inspect_image(row.get("image"), decode_size)
                if row.get("id") is None:
                    bad.append({"file": shown, "row": n, "id": None, "column": "id", "reason": "id is null", "action": "kept"})
                if reason:
                    bad.append({"file": shown, "row": n, "id": row.get("id"), "column": "image", "reason": reason, "action": "skipped"})
                for column, why in row_problems(row, size):
                    bad.append({"file": shown, "row": n, "id": row.get("id"), "column": column, "reason": why, "action": "kept"})
                n += 1
    return {"file": file_uri, "rows": n, "bad": bad}


def duplicate_ids(file_uris: Sequence[str]) -> list[dict[str, Any]]:
    """Rows whose ``id`` was already used by an earlier row (in file order): bad-row entries
    naming the first occurrence. Reads only the ``id`` column; keeps one entry per distinct id."""
    first: dict[str, tuple[int, int]] = {}
    out = []
    for fi, file_uri in enumerate(file_uris):
        fs, path = resolve(file_uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            n = 0
            for rg in range(pf.num_row_groups):
                for rid in pf.read_row_group(rg, columns=["id"]).column("id").to_pylist():
                    if rid in first:
                        ff, fr = first[rid]
                        out.append({"file": safe_uri(file_uri), "row": n, "id": rid, "column": "id", "action": "kept",
                                    "reason": f"duplicate id (first at {safe_uri(file_uris[ff])} row {fr})"})
                    else:
                        first[rid] = (fi, n)
                    n += 1
    return out


def count_rows(files: Sequence[str]) -> int:
    """Rows in the given shard files, from their Parquet footers (no data read)."""
    n = 0
    for file_uri in files:
        fs, path = resolve(file_uri)
        with fs.open_input_file(path) as f:
            n += pq.ParquetFile(f).metadata.num_rows
    return n


def read_rows(uri: str, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield rows of every shard under ``uri`` (a folder or one file), row group by row group."""
    for file_uri in list_shards(uri):
        fs, path = resolve(file_uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in (columns or pf.schema_arrow.names) if c in pf.schema_arrow.names]
            for i in range(pf.num_row_groups):
                yield from pf.read_row_group(i, columns=cols).to_pylist()


@dataclass
class DatasetInfo:
    """What ``dataset.json`` records: class names, split sizes and a content fingerprint."""

    name: str
    classes: list[str]
    splits: dict[str, int]
    fingerprint: str
    extra: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def write_dataset_info(uri: str, info: DatasetInfo) -> None:
    """Write ``dataset.json`` at the dataset root."""
    fs, root = resolve(uri)
    with fs.open_output_stream(f"{root}/dataset.json") as f:
        f.write(info.to_json().encode())


def read_dataset_info(uri: str) -> DatasetInfo:
    """Read ``dataset.json``; a clear error when the folder is not a reprflow dataset."""
    fs, root = resolve(uri)
    try:
        with fs.open_input_stream(f"{root}/dataset.json") as f:
            data = json.loads(f.read().decode())
    except FileNotFoundError:
        raise ReprflowError(f"{uri} is not a reprflow dataset (no dataset.json); create one with 'reprflow ingest'") from None
    return DatasetInfo(**data)


def fingerprint_files(file_uris: Sequence[str]) -> str:
    """A content fingerprint of shard files: sha256 over (name, size, Parquet footer metadata)."""
    h = hashlib.sha256()
    for file_uri in sorted(file_uris):
        fs, path = resolve(file_uri)
        with fs.open_input_file(path) as f:
            md = pq.ParquetFile(f).metadata
            h.update(f"{file_uri.rsplit('/', 1)[-1]}:{md.num_rows}:{md.serialized_size}".encode())
            for rg in range(md.num_row_groups):
                col = md.row_group(rg).column(0)
                h.update(f"{md.row_group(rg).num_rows}:{col.total_compressed_size}".encode())
                if col.statistics is not None and col.statistics.has_min_max:
                    h.update(f"{col.statistics.min}:{col.statistics.max}".encode())
    return h.hexdigest()[:16]
