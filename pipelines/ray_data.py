"""Ray Data glue: shards -> decoded, augmented views (training) and batch inference (embedding)."""

from __future__ import annotations

import itertools
import os
import zlib
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from components.data.decode import decode_batch
from components.data.shards import count_rows, resolve
from components.data.views import ViewRecipe, views_from_encoded

_calls = itertools.count()


def _views_batch(batch: dict, recipe: ViewRecipe, decode_size: int, seed: int) -> dict:
    # Ray Data tasks share the node's cores with training: one intra-op thread each.
    torch.set_num_threads(1)
    first = str(batch["id"][0]) if len(batch["id"]) else ""
    # Seed from the run's seed, the batch's content and a per-process call counter, so views
    # differ every epoch (the pipeline is re-executed per epoch) and between batches.
    g = torch.Generator().manual_seed(hash((seed, zlib.crc32(first.encode()), os.getpid(), next(_calls))) & 0x7FFFFFFF)
    return views_from_encoded(batch, recipe, decode_size, g)


def _slices(files: list[str], batch_size: int) -> list[dict]:
    """Work items ``{file, row_group, start, stop}`` of at most ``batch_size`` rows (footers only are read)."""
    items = []
    for f in files:
        fs, path = resolve(f)
        with fs.open_input_file(path) as fh:
            meta = pq.ParquetFile(fh).metadata
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            items += [{"file": f, "row_group": rg, "start": a, "stop": min(a + batch_size, rows)} for a in range(0, rows, batch_size)]
    return items


def _views_of_slices(batch: dict, recipe: ViewRecipe, decode_size: int, seed: int):
    for f, rg, a, b in zip(batch["file"], batch["row_group"], batch["start"], batch["stop"]):
        fs, path = resolve(str(f))
        with fs.open_input_file(path) as fh:
            table = pq.ParquetFile(fh).read_row_group(int(rg), columns=recipe.columns).slice(int(a), int(b) - int(a))
        yield _views_batch({c: table.column(c).to_pylist() for c in recipe.columns}, recipe, decode_size, seed)


def views_dataset(files: list[str], recipe: ViewRecipe, decode_size: int, batch_size: int = 128, seed: int = 0,
                  shuffle: bool = False) -> "ray.data.Dataset":
    """A lazily executed dataset of ``view_i`` uint8 columns built from shard files.

    One task per slice of ``batch_size`` rows of a row group reads those rows, decodes them
    and makes their views, so encoded images never pass through Ray's object store between a
    read operator and a map operator (``read_parquet(...).map_batches(...)`` took 2.5x the wall
    time and 1.4x the CPU time on 2 cores: bench/RESULTS.md, P3). With ``shuffle`` every
    execution (epoch) visits the slices in a new random order (one block per slice, so
    ``randomize_block_order`` is a shuffle of slices; the trainer's local shuffle buffer then
    mixes rows across slices).
    """
    items = _slices(files, batch_size)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4096)))
    if shuffle:
        ds = ds.randomize_block_order()
    return ds.map_batches(_views_of_slices, fn_kwargs={"recipe": recipe, "decode_size": decode_size, "seed": seed}, batch_size=1, batch_format="numpy")


class _Embedder:
    """Ray Data UDF: builds the encoder once per actor, then decodes and embeds batches."""

    def __init__(self, build: Any, decode_size: int):
        torch.set_num_threads(max(1, (os.cpu_count() or 2)))
        self.model = build().eval()
        self.decode_size = decode_size

    def __call__(self, batch: dict) -> dict:
        imgs, keep, _ = decode_batch(batch["image"], batch["id"], self.decode_size)
        with torch.inference_mode():
            feats = self.model(torch.from_numpy(imgs).permute(0, 3, 1, 2)).float().numpy() if len(imgs) else np.zeros((0, 1), np.float32)
        labels = np.asarray([(-1 if v is None else int(v)) for v in batch["label"]], dtype=np.int64)
        return {"id": np.asarray(batch["id"])[keep], "label": labels[keep], "path": np.asarray(batch["path"])[keep], "embedding": feats}


# Up to this many rows an embed runs as ONE Ray task on a pooled worker instead of a Ray Data
# actor pool: starting the pool (a new actor process importing torch, the streaming executor)
# costs ~9 s here for a pass whose inference takes < 1 s on a few hundred images (0.65 s as a
# warm task, 2026-12-07), and an evaluation embeds every representation. Above it the rows
# stream through Ray Data, where the start-up is amortised and memory stays bounded.
EMBED_TASK_ROWS = 20_000


@ray.remote(num_cpus=1)
def _embed_in_task(files: list[str], build: Any, decode_size: int, batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The small-input path of :func:`embed_files`: the same ``_Embedder`` over each file's
    record batches, in file order, in one task."""
    embedder = _Embedder(build, decode_size)
    result = {}
    for f in files:
        fs, path = resolve(f)
        parts = []
        with fs.open_input_file(path) as fh:
            for rb in pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=["id", "image", "label"]):
                d = rb.to_pydict()
                out = embedder({"id": np.asarray(d["id"]), "image": d["image"], "label": d["label"], "path": np.full(len(d["id"]), f)})
                if len(out["id"]):
                    parts.append((out["id"], out["label"], out["embedding"]))
        if parts:
            result[f] = tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
    return result


def embed_files(files: list[str], build: Any, decode_size: int, batch_size: int = 256,
                task_rows: int = EMBED_TASK_ROWS) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batch inference over shard files: one Ray task for up to ``task_rows`` rows (see
    :data:`EMBED_TASK_ROWS`), else ONE Ray Data pass (one actor start-up). Both run the same
    decode + encoder code and give the same embeddings.

    Returns ``{file: (ids, labels, embeddings)}``. ``build`` is a picklable zero-argument
    callable returning the (preprocessing + encoder) module, so the weights are loaded once per
    actor rather than shipped with every batch.
    """
    if count_rows(files) <= task_rows:
        return ray.get(_embed_in_task.remote(files, build, decode_size, batch_size))
    ds = ray.data.read_parquet(files, columns=["id", "image", "label"], include_paths=True)
    out = ds.map_batches(
        _Embedder,
        fn_constructor_kwargs={"build": build, "decode_size": decode_size},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    parts: dict[str, list] = {}
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        for path in np.unique(b["path"]):
            m = b["path"] == path
            feats = b["embedding"][m]
            parts.setdefault(str(path), []).append((b["id"][m], b["label"][m], np.stack(feats) if feats.dtype == object else feats))
    result = {}
    for f in files:
        key = next((p for p in parts if f.endswith(p) or p.endswith(f.split("://")[-1])), None)
        chunks = parts.get(key, [])
        if chunks:
            result[f] = tuple(np.concatenate([c[i] for c in chunks]) for i in range(3))
    return result


def embed_splits(files: dict, build, decode_size: int, batch_size: int, out_dir) -> dict[str, str]:
    """Embed every split's shard files in one pass (:func:`embed_files`); write ``embeddings-<split>.npz``
    (ids, labels, feats) per split into ``out_dir``; returns ``{split: path}``."""
    import numpy as np

    splits = {split: fs for split, fs in files.items() if split in ("train", "val", "test") and fs}
    per_file = embed_files([f for fs in splits.values() for f in fs], build, decode_size, batch_size)
    outputs = {}
    for split, fs in splits.items():
        got = [per_file[f] for f in fs if f in per_file]
        if not got:
            continue
        ids, labels, feats = (np.concatenate([g[i] for g in got]) for i in range(3))
        path = f"{out_dir}/embeddings-{split}.npz"
        np.savez(path, ids=ids.astype(str), labels=labels, feats=feats.astype(np.float32))
        outputs[split] = path
    return outputs
