"""The host half of the GPU data path: shard rows -> decoded uint8 batches in pinned memory.

A GPU eats SimCLR views of 224-px images faster than a DataLoader that applies PIL transforms
per image can make them (issue 10: the usual recipe keeps an H200 idle three quarters of the
time). Here the host only reads shards and decodes each image ONCE to a fixed-size uint8 array
(:func:`components.data.decode.decode_image`, the pipeline's own decoder with its bad-row
handling); the random views are batched tensor work on the device
(:mod:`components.data.gpu_views`). Decoding runs in a pool of threads (PIL releases the GIL
while it decodes) or processes, several batches ahead, straight into pinned memory so the copy
to the device does not block.

    batches = DecodedBatches(files, decode_size=256, batch_size=256, workers=14)
    views = DeviceViews(method.views, "cuda", seed=0)
    for b in views.iterate(batches):                 # {"view_0": normalised float on cuda, ...}
        step(b, i)

Needs no Ray. In the Ray pipeline the same split applies: a Ray Data ``map_batches`` that only
decodes (``decode_batch``) feeds uint8 batches to the training worker, which makes the views
with :class:`~components.data.gpu_views.DeviceViews` on its GPU.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from collections import deque
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from components.data.decode import BadRows, decode_image
from components.data.shards import resolve


def shard_batches(files: Sequence[str], batch_size: int, columns: Sequence[str] = ("id", "image"), drop_last: bool = True) -> Iterator[dict[str, list]]:
    """Rows of shard files in order, as column dicts of Python lists with ``batch_size`` rows.

    Batches run across file boundaries; the last short batch is dropped when ``drop_last``.
    """
    pending: dict[str, list] = {c: [] for c in columns}
    for uri in files:
        fs, path = resolve(uri)
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=list(columns)):
                for c in columns:
                    pending[c].extend(rb.column(c).to_pylist())
                while len(pending[columns[0]]) >= batch_size:
                    yield {c: v[:batch_size] for c, v in pending.items()}
                    pending = {c: v[batch_size:] for c, v in pending.items()}
    if pending[columns[0]] and not drop_last:
        yield pending


def decode_to_array(images: Sequence[bytes | None], ids: Sequence[Any], size: int, out: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """Decode into ``out`` (or a new array) ``(N, size, size, 3)`` uint8; returns the filled rows and bad rows.

    Like :func:`components.data.decode.decode_batch`, but writes each image straight into the
    destination (e.g. pinned memory) instead of stacking a list afterwards.
    """
    out = np.empty((len(images), size, size, 3), np.uint8) if out is None else out
    bad = BadRows()
    k = 0
    for data, row_id in zip(images, ids):
        arr, reason = decode_image(data, size)
        if arr is None:
            bad.add(row_id, reason or "unknown")
            continue
        out[k] = arr
        k += 1
    return out[:k], bad.rows


def _decode_pinned(images: list, ids: list, size: int, pin: bool) -> tuple[torch.Tensor, list[dict]]:
    t = torch.empty((len(images), size, size, 3), dtype=torch.uint8, pin_memory=pin)
    arr, bad = decode_to_array(images, ids, size, t.numpy())
    return t[: len(arr)], bad


class DecodedBatches:
    """Iterable of uint8 image batches ``(N, size, size, 3)`` decoded from shard files (one pass per ``iter``).

    ``workers`` threads (or processes, ``pool="process"``, when Python work per image holds the
    GIL too long) decode whole batches, at most ``prefetch`` batches ahead, in order. Rows that
    cannot be decoded are left out of their batch and recorded in :attr:`bad` (so a batch may be
    short by its bad rows). ``pin_memory`` (default: when CUDA is available) decodes into
    page-locked memory for non-blocking copies. The workers persist across passes (epochs);
    :meth:`close` (or ``with``) ends them.
    """

    def __init__(self, files: Sequence[str], decode_size: int, batch_size: int, workers: int | None = None, prefetch: int | None = None,
                 pin_memory: bool | None = None, pool: Literal["thread", "process"] = "thread", drop_last: bool = True):
        self.files, self.decode_size, self.batch_size = list(files), decode_size, batch_size
        self.workers = workers or max(1, (os.cpu_count() or 2) - 2)
        self.prefetch = prefetch or 2 * self.workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.pool, self.drop_last = pool, drop_last
        self.bad: list[dict] = []
        self._threads: cf.ThreadPoolExecutor | None = None
        self._procs: cf.ProcessPoolExecutor | None = None

    def _job(self, rows: dict) -> tuple[torch.Tensor, list[dict]]:
        if self._procs is None:
            return _decode_pinned(rows["image"], rows["id"], self.decode_size, self.pin_memory)
        # A thread waits for its process (the GIL is free meanwhile), then pins the result.
        arr, bad = self._procs.submit(decode_to_array, rows["image"], rows["id"], self.decode_size).result()
        t = torch.from_numpy(arr)
        return (t.pin_memory() if self.pin_memory else t), bad

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._threads is None:
            self._threads = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
            if self.pool == "process":
                # Not fork: the parent may hold a CUDA context and compiler threads.
                method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
                self._procs = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context(method))
        inflight: deque[cf.Future] = deque()

        def result() -> torch.Tensor:
            imgs, bad = inflight.popleft().result()
            self.bad.extend(bad)
            return imgs

        try:
            for rows in shard_batches(self.files, self.batch_size, drop_last=self.drop_last):
                inflight.append(self._threads.submit(self._job, rows))
                if len(inflight) >= self.prefetch:
                    yield result()
            while inflight:
                yield result()
        finally:
            for fut in inflight:
                fut.cancel()

    def close(self) -> None:
        """Stop the workers (a later ``iter`` starts new ones)."""
        for ex in (self._threads, self._procs):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
        self._threads = self._procs = None

    def __enter__(self) -> "DecodedBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
