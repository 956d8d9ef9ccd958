"""BYOL, MoCo v3 and DINO losses against loop transcriptions of their papers' formulas; the EMA
schedule; DINO's centring and teacher temperature; MoCo v3 and DINO centring across 2 gloo ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.losses.byol import byol_loss
from components.losses.dino import dino_center, dino_loss, teacher_temperature
from components.losses.mocov3 import mocov3_loss
from components.models.ema import cosine_momentum
from tests.unit.test_ntxent import _free_port


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _unit(v):
    return [x / math.sqrt(sum(float(c) ** 2 for c in x)) for x in v]


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


# ------------------------------------------------------------------ BYOL


def byol_reference(p: torch.Tensor, z: torch.Tensor) -> float:
    """Grill et al. Eq. (2): || p/|p| - z/|z| ||^2, averaged over the batch."""
    total = 0.0
    for a, b in zip(_unit(p), _unit(z)):
        total += sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))
    return total / len(p)


def test_byol_loss_equals_formula():
    p, z = _rand(6, 5, seed=0), _rand(6, 5, seed=1)
    assert byol_loss(p, z).item() == pytest.approx(byol_reference(p, z), rel=1e-12)


def test_byol_loss_bounds_and_target_gets_no_gradient():
    z = _rand(4, 3).requires_grad_()
    assert byol_loss(z * 3.0, z).item() == pytest.approx(0.0, abs=1e-12)  # same direction
    assert byol_loss(-z, z).item() == pytest.approx(4.0)  # opposite direction: the maximum
    p = _rand(4, 3, seed=2).requires_grad_()
    byol_loss(p, z).backward()
    assert z.grad is None and p.grad is not None


# ------------------------------------------------------------------ MoCo v3


def mocov3_reference(q: torch.Tensor, k: torch.Tensor, tau: float) -> float:
    """Chen et al. Eq. (1) with explicit loops, times 2 tau as in the paper's code."""
    qs, ks = _unit(q), _unit(k)
    total = 0.0
    for i, qi in enumerate(qs):
        denom = sum(math.exp(_dot(qi, kj) / tau) for kj in ks)
        total += -math.log(math.exp(_dot(qi, ks[i]) / tau) / denom)
    return 2 * tau * total / len(qs)


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_mocov3_loss_equals_formula(tau):
    q, k = _rand(5, 4, seed=3), _rand(5, 4, seed=4)
    assert mocov3_loss(q, k, tau).item() == pytest.approx(mocov3_reference(q, k, tau), rel=1e-12)


def test_mocov3_keys_get_no_gradient_and_aligned_pairs_score_lower():
    q = _rand(8, 6, seed=5).requires_grad_()
    k = _rand(8, 6, seed=6).requires_grad_()
    mocov3_loss(q, k, 0.2).backward()
    assert k.grad is None and q.grad is not None
    assert mocov3_loss(q, q, 0.2) < mocov3_loss(q, k, 0.2)


# ------------------------------------------------------------------ DINO


def dino_reference(student, teacher, center, ts: float, tt: float) -> float:
    """Caron et al. Eq. (3): sum over teacher views x and student views x' != x of H(P_t(x), P_s(x')),
    each averaged over the batch, then over the pairs."""

    def softmax(row, t):
        e = [math.exp(float(v) / t) for v in row]
        s = sum(e)
        return [x / s for x in e]

    terms = []
    for i, t_view in enumerate(teacher):
        for j, s_view in enumerate(student):
            if i == j:
                continue
            h = 0.0
            for t_row, s_row in zip(t_view, s_view):
                pt = softmax([float(a) - float(c) for a, c in zip(t_row, center)], tt)
                ps = softmax(s_row, ts)
                h += -sum(a * math.log(b) for a, b in zip(pt, ps))
            terms.append(h / len(t_view))
    return sum(terms) / len(terms)


def test_dino_loss_equals_formula_over_pairs_of_different_views():
    n, k = 3, 7
    student = [_rand(n, k, seed=10 + v) for v in range(5)]  # 2 global + 3 local
    teacher = [_rand(n, k, seed=20 + v) for v in range(2)]
    center = _rand(k, seed=30) * 0.1
    got = dino_loss(student, teacher, center, 0.1, 0.04).item()
    assert got == pytest.approx(dino_reference(student, teacher, center, 0.1, 0.04), rel=1e-10)
    # Including the 2 same-view pairs (what the reference skips) would give another value.
    with_same = dino_reference(student, teacher, center, 0.1, 0.04) * 8
    for i in range(2):
        with_same += dino_reference([student[i], student[i]], [teacher[i], teacher[i]], center, 0.1, 0.04)
    assert got != pytest.approx(with_same / 10, rel=1e-6)


def test_dino_loss_gradient_reaches_student_only():
    student = [_rand(4, 5, seed=v).requires_grad_() for v in range(3)]
    teacher = [_rand(4, 5, seed=9 + v).requires_grad_() for v in range(2)]
    dino_loss(student, teacher, torch.zeros(5, dtype=torch.float64)).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)


def test_dino_center_update_is_an_ema_of_the_teacher_batch_mean():
    teacher = [_rand(4, 3, seed=1), _rand(4, 3, seed=2)]
    center = _rand(1, 3, seed=3)
    rows = [r for t in teacher for r in t.tolist()]
    mean = [sum(r[d] for r in rows) / len(rows) for d in range(3)]
    want = [0.9 * float(center[0, d]) + 0.1 * mean[d] for d in range(3)]
    got = dino_center(center, teacher, 0.9)
    assert got.shape == (1, 3)
    assert got[0].tolist() == pytest.approx(want, rel=1e-12)
    assert torch.equal(dino_center(center, teacher, 1.0), center)  # momentum 1 keeps it


def test_teacher_temperature_warms_up_linearly_then_stays():
    assert teacher_temperature(0, 10, 0.04, 0.07, 3) == pytest.approx(0.04)
    assert teacher_temperature(15, 10, 0.04, 0.07, 3) == pytest.approx(0.055)
    assert teacher_temperature(30, 10, 0.04, 0.07, 3) == pytest.approx(0.07)
    assert teacher_temperature(500, 10, 0.04, 0.07, 3) == pytest.approx(0.07)
    assert teacher_temperature(0, 10, 0.04, 0.07, 0) == pytest.approx(0.07)  # no warm-up


# ------------------------------------------------------------------ EMA schedule


def test_cosine_momentum_start_middle_end():
    """BYOL Sec. 3.2: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2."""
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(150, 100, 0.996) == pytest.approx(1.0)  # clamped past the end


# ------------------------------------------------------------------ 2 gloo ranks


def _worker(rank: int, world: int, port: int, q: torch.Tensor, k: torch.Tensor, teacher: list, tau: float, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = q.shape[0] // world
        mine = slice(rank * n, (rank + 1) * n)
        a = q[mine].clone().requires_grad_()
        loss = mocov3_loss(a, k[mine].clone(), tau)
        loss.backward()
        center = dino_center(torch.zeros(1, teacher[0].shape[1], dtype=torch.float64), [t[mine] for t in teacher], 0.5)
        out[rank] = (loss.detach(), a.grad, center)
    finally:
        dist.destroy_process_group()


def test_mocov3_and_dino_centre_on_two_ranks_equal_the_global_batch():
    """Keys gathered from every rank with labels offset by rank: per-rank losses average to the
    global loss, gradients match it (DDP averages them); the centre is the global batch's."""
    tau, world = 0.2, 2
    q, k = _rand(6, 4, seed=7), _rand(6, 4, seed=8)
    teacher = [_rand(6, 3, seed=11), _rand(6, 3, seed=12)]
    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_worker, args=(world, _free_port(), q, k, teacher, tau, out), nprocs=world, start_method="spawn")
    full_q = q.clone().requires_grad_()
    full = mocov3_loss(full_q, k, tau, gather=False)
    full.backward()
    assert ((out[0][0] + out[1][0]) / 2).item() == pytest.approx(full.item(), rel=1e-12)
    assert full.item() == pytest.approx(mocov3_reference(q, k, tau), rel=1e-12)
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]) / world, full_q.grad)
    want = dino_center(torch.zeros(1, 3, dtype=torch.float64), teacher, 0.5)
    torch.testing.assert_close(out[0][2], want)
    torch.testing.assert_close(out[1][2], want)
