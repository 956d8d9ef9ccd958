"""A FIFO memory bank of embeddings, kept in buffers: one small module with one job.

Used wherever a method remembers embeddings of past batches: NNCLR's support set of projections
(Dwibedi et al., ICCV 2021), MSF's memory bank of target embeddings (Koohpayegani et al., ICCV
2021), and MoCo-style queues of negatives. The rows, the write pointer and the number of rows
ever written are buffers, so ``state_dict()`` holds the whole bank and a resumed run continues
with the same contents. ``enqueue`` gathers the rows of every rank first, so in multi-worker
training every rank holds the same bank, in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.distributed import gather_no_grad


class MemoryBank(nn.Module):
    """A first-in-first-out bank of ``size`` rows of dimension ``dim``.

    Rows are written at ``ptr`` (the oldest row's slot once full) and the pointer wraps around.
    Only the rows written so far (``filled``) take part in :meth:`nearest` and :meth:`contents`.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a memory bank needs size >= 1 and dim >= 1, got {size} x {dim}")
        self.size, self.dim = size, dim
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # rows ever enqueued

    @property
    def filled(self) -> int:
        """How many slots hold real rows (grows to ``size``, then stays)."""
        return int(min(int(self.count), self.size))

    def contents(self) -> torch.Tensor:
        """The filled rows ``(filled, dim)``, in slot order (not age order once wrapped)."""
        # Writes start at slot 0, so the filled slots are always the first ``filled`` ones.
        return self.bank[: self.filled]

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor, gather: bool = True) -> None:
        """Append ``rows`` (N, dim), overwriting the oldest rows once the bank is full.

        With ``gather`` (the default) the rows of every rank are gathered first, in rank order,
        so each rank writes the same global batch; every rank must call this with the same N
        (training drops the last incomplete batch). A batch larger than the bank keeps its last
        ``size`` rows.
        """
        rows = gather_no_grad(rows.detach()) if gather else rows.detach()
        total = rows.shape[0]
        rows = rows[-self.size :].to(self.bank.dtype)
        n, p = rows.shape[0], int(self.ptr)
        head = min(n, self.size - p)
        self.bank[p : p + head] = rows[:head]
        if n > head:  # wrap around to the start
            self.bank[: n - head] = rows[head:]
        self.ptr.fill_((p + n) % self.size)
        self.count.add_(total)

    @torch.no_grad()
    def nearest(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` filled rows with the highest cosine similarity to each query row.

        Returns ``(rows (N, k, dim), slots (N, k))``, most similar first. The rows are returned
        as stored (no gradient).
        """
        keys = self.contents()
        if keys.shape[0] < k:
            raise ValueError(f"asked for {k} neighbours but the memory bank holds {keys.shape[0]} rows")
        sim = F.normalize(query.detach().float(), dim=1) @ F.normalize(keys.float(), dim=1).T
        slots = sim.topk(k, dim=1).indices
        return keys[slots], slots
