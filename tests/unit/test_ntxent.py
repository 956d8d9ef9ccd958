"""NT-Xent against a direct transcription of SimCLR Eq. (1), single process and 2 gloo ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.losses.ntxent import ntxent_loss


def ntxent_reference(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """The paper's formula with explicit loops: samples 2k and 2k+1 are a positive pair."""
    z = []
    for a, b in zip(z1, z2):
        z += [a / a.norm(), b / b.norm()]
    n2 = len(z)

    def sim(i, j):
        return float(z[i] @ z[j])

    def ell(i, j):
        denom = sum(math.exp(sim(i, k) / tau) for k in range(n2) if k != i)
        return -math.log(math.exp(sim(i, j) / tau) / denom)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n2 // 2)) / n2


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_ntxent_equals_formula(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    assert ntxent_loss(z1, z2, tau).item() == pytest.approx(ntxent_reference(z1, z2, tau), rel=1e-9)


def test_ntxent_is_low_for_identical_views_and_high_for_random():
    z = torch.randn(16, 8, dtype=torch.float64)
    assert ntxent_loss(z, z, 0.1) < ntxent_loss(z, torch.randn(16, 8, dtype=torch.float64), 0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, tau: float, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        a = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
        b = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
        loss = ntxent_loss(a, b, tau)
        loss.backward()
        out[rank] = (loss.detach(), a.grad, b.grad)
    finally:
        dist.destroy_process_group()


def test_ntxent_two_ranks_equals_global_batch():
    """Per-rank losses average to the global loss; gathered gradients match the global ones."""
    tau, world = 0.3, 2
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_worker, args=(world, _free_port(), z1, z2, tau, out), nprocs=world, start_method="spawn")
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = ntxent_loss(a, b, tau, gather=False)
    full.backward()
    mean_rank_loss = (out[0][0] + out[1][0]) / 2
    assert mean_rank_loss.item() == pytest.approx(full.item(), rel=1e-9)
    assert full.item() == pytest.approx(ntxent_reference(z1, z2, tau), rel=1e-9)
    # DDP averages gradients over ranks; the all-gather backward sums every rank's contribution.
    grad_a = torch.cat([out[0][1], out[1][1]]) / world
    grad_b = torch.cat([out[0][2], out[1][2]]) / world
    torch.testing.assert_close(grad_a, a.grad)
    torch.testing.assert_close(grad_b, b.grad)
