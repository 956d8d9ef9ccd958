"""Parquet shards: the one on-disk format of reprflow's data.

One row per image: ``id`` (string), ``image`` (encoded PNG/JPEG bytes), ``label`` (nullable
int), ``captions`` (list of strings, possibly empty), ``boxes`` (list of ``[x0, y0, x1, y1]``
pixel boxes, possibly empty) and ``source`` (where the row came from). A dataset is a folder
(local or any filesystem pyarrow/fsspec understands: ``s3://``, ``gs://``) holding one
sub-folder per split (``train/``, ``val/``, ``test/``) of ``part-NNNNN.parquet`` files, plus a
``dataset.json`` with the class names and the split sizes.
"""

from __future__ import annotations

import hashlib
import json
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


def list_shards(uri: str) -> list[str]:
    """All ``*.parquet`` files directly under ``uri``, sorted; a clear error if there are none."""
    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ReprflowError(f"shard folder not found: {uri}")
    if info.type == pafs.FileType.File:
        return [uri]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    files = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    if not files:
        raise ReprflowError(f"no .parquet shards in {uri}")
    return [join(uri, f) for f in files]


def check_shard_schema(file_uri: str) -> None:
    """Fail fast, naming the file, when a shard lacks a required column or has wrong types."""
    fs, path = resolve(file_uri)
    try:
        with fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReprflowError(f"{file_uri}: not a readable Parquet file ({exc})") from None
    for name in REQUIRED_COLUMNS:
        if name not in schema.names:
            raise ReprflowError(f"{file_uri}: missing required column '{name}'")
        want = SHARD_SCHEMA.field(name).type
        got = schema.field(name).type
        if not (got == want or (want == pa.binary() and got == pa.large_binary())):
            raise ReprflowError(f"{file_uri}: column '{name}' has type {got}, expected {want}")


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
