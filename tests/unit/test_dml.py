"""The deep-metric-learning family: NNCLR, MSF and SCL losses against loop transcriptions of their
papers' formulas, the shared memory bank, the multi-worker paths on 2 gloo ranks, and the
methods' step mechanics (lookup before update, EMA, checkpointed banks)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.errors import ReprflowError
from components.losses.msf import msf_loss
from components.losses.nnclr import nnclr_loss
from components.losses.scl import spectral_contrastive_loss
from components.methods.registry import build_method
from components.models.memory_bank import MemoryBank
from tests.unit.test_ntxent import _free_port

TINY = {"image_size": 16, "backbone": {"name": "resnet18", "stem": "small"}}


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _unit(v):
    return v / math.sqrt(float(v @ v))


# ------------------------------------------------------------------ loop references


def nnclr_reference(nn: torch.Tensor, p: torch.Tensor, tau: float) -> float:
    """Eq. of NNCLR Sec. 3.2 and its symmetric term, one sample at a time."""
    a, b = [_unit(x) for x in nn], [_unit(x) for x in p]
    n = len(a)
    total = 0.0
    for i in range(n):
        pos = math.exp(float(a[i] @ b[i]) / tau)
        over_p = sum(math.exp(float(a[i] @ b[k]) / tau) for k in range(n))
        over_nn = sum(math.exp(float(a[k] @ b[i]) / tau) for k in range(n))
        total += (-math.log(pos / over_p) - math.log(pos / over_nn)) / 2
    return total / n


def msf_reference(u: torch.Tensor, v: torch.Tensor, bank: torch.Tensor, k: int) -> float:
    """MSF's loss: for each target, sort the candidates (itself + bank) by distance, take k."""
    total = 0.0
    for ui, vi in zip(u, v):
        ui, vi = _unit(ui), _unit(vi)
        candidates = [vi] + [_unit(z) for z in bank]
        candidates.sort(key=lambda z: float(((vi - z) ** 2).sum()))
        chosen = candidates[: min(k, len(candidates))]
        total += sum(float(((ui - z) ** 2).sum()) for z in chosen) / len(chosen)
    return total / len(u)


def scl_reference(z1: torch.Tensor, z2: torch.Tensor, mu: float) -> float:
    """-2 E[f(x)^T f(x+)] + E[(f(x)^T f(x-))^2] with the authors' norm clip and 1/mu."""

    def clip(z):
        norm = math.sqrt(float(z @ z))
        return z if norm < math.sqrt(mu) else z / norm * math.sqrt(mu)

    a, b = [clip(z) for z in z1], [clip(z) for z in z2]
    n = len(a)
    positive = sum(float(a[i] @ b[i]) for i in range(n)) / n
    negative = sum(float(a[i] @ b[j]) ** 2 for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return (-2 * positive + negative) / mu


# ------------------------------------------------------------------ losses vs formulas


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nnclr_loss_equals_formula(tau):
    nn, p = _rand(6, 5, seed=1), _rand(6, 5, seed=2)
    assert nnclr_loss(nn, p, tau).item() == pytest.approx(nnclr_reference(nn, p, tau), rel=1e-9)


def test_nnclr_loss_rewards_the_matching_prediction():
    nn = _rand(8, 4, seed=3)
    assert nnclr_loss(nn, nn, 0.1) < nnclr_loss(nn, _rand(8, 4, seed=4), 0.1)


@pytest.mark.parametrize("bank_rows,k", [(0, 5), (3, 5), (20, 5), (20, 1), (20, 21)])
def test_msf_loss_equals_formula(bank_rows, k):
    u, v, bank = _rand(5, 6, seed=5), _rand(5, 6, seed=6), _rand(bank_rows, 6, seed=7)
    assert msf_loss(u, v, bank, k).item() == pytest.approx(msf_reference(u, v, bank, k), rel=1e-9)


def test_msf_k1_is_byol_distance_and_gradient_reaches_only_the_prediction():
    u, v = _rand(4, 3, seed=8).requires_grad_(), _rand(4, 3, seed=9).requires_grad_()
    loss = msf_loss(u, v, _rand(10, 3, seed=10), k=1)
    expected = (2 - 2 * torch.nn.functional.cosine_similarity(u, v)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    assert u.grad is not None and u.grad.abs().sum() > 0 and v.grad is None


@pytest.mark.parametrize("mu,scale", [(1.0, 1.0), (10.0, 1.0), (1.0, 0.2), (0.5, 3.0)])
def test_scl_loss_equals_formula(mu, scale):
    # scale 0.2: most norms fall inside the sqrt(mu) ball (no clipping); 3.0: all are clipped.
    z1, z2 = _rand(6, 4, seed=11) * scale, _rand(6, 4, seed=12) * scale
    assert spectral_contrastive_loss(z1, z2, mu).item() == pytest.approx(scl_reference(z1, z2, mu), rel=1e-9)


def test_scl_mu_weights_the_negative_term():
    """Embeddings longer than sqrt(mu) are clipped onto that sphere, so for their directions u,
    L = -2 E[u.u+] + mu E[(u.u-)^2]: mu trades repulsion against alignment."""
    z1, z2 = torch.nn.functional.normalize(_rand(5, 3, seed=13), dim=1), torch.nn.functional.normalize(_rand(5, 3, seed=14), dim=1)
    pos = (z1 * z2).sum(1).mean().item()
    neg = (((z1 @ z2.T) ** 2).sum() - ((z1 * z2).sum(1) ** 2).sum()).item() / 20
    for mu in (1.0, 4.0, 9.0):
        assert spectral_contrastive_loss(100 * z1, 100 * z2, mu).item() == pytest.approx(-2 * pos + mu * neg, rel=1e-9)


# ------------------------------------------------------------------ memory bank


def test_memory_bank_fifo_order_and_wrap_around():
    bank = MemoryBank(size=5, dim=1)
    bank.enqueue(torch.tensor([[1.0], [2.0], [3.0]]))
    assert bank.filled == 3 and int(bank.ptr) == 3
    assert bank.contents().flatten().tolist() == [1, 2, 3]
    bank.enqueue(torch.tensor([[4.0], [5.0], [6.0]]))  # 6 overwrites the oldest (1) in slot 0
    assert bank.filled == 5 and int(bank.ptr) == 1 and int(bank.count) == 6
    assert bank.bank.flatten().tolist() == [6, 2, 3, 4, 5]
    bank.enqueue(torch.arange(10.0, 17.0)[:, None])  # larger than the bank: its last 5 rows stay
    assert sorted(bank.bank.flatten().tolist()) == [12, 13, 14, 15, 16] and int(bank.count) == 13
    assert bank.bank[int(bank.ptr) - 1].item() == 16  # the newest row sits just before the pointer


def test_memory_bank_nearest_matches_brute_force():
    bank = MemoryBank(size=64, dim=8)
    bank.enqueue(_rand(40, 8, seed=15).float())  # 24 slots stay empty and must never be returned
    query = _rand(7, 8, seed=16).float()
    rows, slots = bank.nearest(query, k=3)
    keys = bank.contents()
    for q, got_rows, got_slots in zip(query, rows, slots):
        sims = [float(torch.nn.functional.cosine_similarity(q, key, dim=0)) for key in keys]
        best = sorted(range(len(sims)), key=lambda j: -sims[j])[:3]
        assert got_slots.tolist() == best
        torch.testing.assert_close(got_rows, keys[best])
    with pytest.raises(ValueError):
        MemoryBank(4, 2).nearest(query[:, :2], k=1)


def test_memory_bank_checkpoint_round_trip(tmp_path):
    bank = MemoryBank(size=6, dim=3)
    for i in range(3):
        bank.enqueue(_rand(4, 3, seed=20 + i).float())
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    restored = MemoryBank(size=6, dim=3)
    restored.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    torch.testing.assert_close(restored.bank, bank.bank)
    assert int(restored.ptr) == int(bank.ptr) == 0 and int(restored.count) == 12 and restored.filled == 6
    restored.enqueue(torch.ones(1, 3))
    assert int(restored.ptr) == 1 and restored.bank[0].tolist() == [1, 1, 1]


# ------------------------------------------------------------------ 2 gloo ranks


def _run_rank(rank: int, world: int, port: int, fn, args: tuple, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args, world: int = 2) -> dict:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; returns ``{rank: result}``."""
    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_run_rank, args=(world, _free_port(), fn, args, out), nprocs=world, start_method="spawn")
    return dict(out)


def _loss_on_rank(rank: int, world: int, loss_fn, a: torch.Tensor, b: torch.Tensor, kwargs: dict):
    n = a.shape[0] // world
    x = a[rank * n : (rank + 1) * n].clone().requires_grad_()
    y = b[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = loss_fn(x, y, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, y.grad


def _enqueue_on_rank(rank: int, world: int):
    bank = MemoryBank(size=6, dim=2)
    bank.enqueue(torch.full((2, 2), float(rank)))  # rank 0 writes 0s, rank 1 writes 1s
    bank.enqueue(torch.full((2, 2), 10.0 + rank))
    return bank.bank.clone(), int(bank.ptr), int(bank.count)


LOSSES = {"nnclr": (nnclr_loss, {"temperature": 0.2}), "scl": (spectral_contrastive_loss, {"mu": 1.0})}
A, B = _rand(6, 5, seed=30), _rand(6, 5, seed=31)


def _everything_on_rank(rank: int, world: int) -> dict:
    out = {name: _loss_on_rank(rank, world, fn, A, B, kw) for name, (fn, kw) in LOSSES.items()}
    out["bank"] = _enqueue_on_rank(rank, world)
    return out


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    """Every multi-worker check run in ONE pair of spawned gloo ranks (spawning costs seconds)."""
    return _spawn(_everything_on_rank)


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_on_two_ranks_equal_the_global_batch(two_ranks, name):
    """Per-rank losses average to the global loss; gathered gradients match the global ones."""
    loss_fn, kwargs = LOSSES[name]
    ga, gb = A.clone().requires_grad_(), B.clone().requires_grad_()
    full = loss_fn(ga, gb, gather=False, **kwargs)
    full.backward()
    r0, r1 = two_ranks[0][name], two_ranks[1][name]
    assert ((r0[0] + r1[0]) / 2).item() == pytest.approx(full.item(), rel=1e-9)
    # DDP averages gradients over ranks; the all-gather backward sums every rank's contribution.
    torch.testing.assert_close(torch.cat([r0[1], r1[1]]) / 2, ga.grad)
    torch.testing.assert_close(torch.cat([r0[2], r1[2]]) / 2, gb.grad)


def test_memory_bank_enqueue_gathers_across_two_ranks(two_ranks):
    for rank in (0, 1):
        bank, ptr, count = two_ranks[rank]["bank"]
        assert ptr == 2 and count == 8  # 2 calls x 2 rows x 2 ranks
        # Call 1 writes 0, 0 (rank 0) then 1, 1 (rank 1) at slots 0-3; call 2 writes 10, 10 at
        # slots 4, 5 and wraps 11, 11 into slots 0, 1.
        assert bank[:, 0].tolist() == [11, 11, 1, 1, 10, 10]


# ------------------------------------------------------------------ methods


def _tiny(name: str, **extra):
    torch.manual_seed(0)
    heads = {"proj_hidden_dim": 32, "proj_dim": 16}
    if name != "scl":
        heads["pred_hidden_dim"] = 32
    return build_method(name, {**TINY, **heads, **extra})


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"view_0": torch.randn(n, 3, 16, 16, generator=g), "view_1": torch.randn(n, 3, 16, 16, generator=g)}


def test_paper_defaults_and_partial_optim_override():
    from components.methods.registry import method_config

    nnclr = method_config("nnclr")
    assert (nnclr.support_set_size, nnclr.temperature, nnclr.optim.name, nnclr.optim.lr) == (98_304, 0.1, "lars", 0.3)
    msf = method_config("meanshift", {"optim": {"lr": 0.5}})  # only lr changes
    assert (msf.k, msf.bank_size, msf.momentum, msf.optim.name, msf.optim.lr, msf.optim.weight_decay) == (5, 128_000, 0.99, "sgd", 0.5, 1e-4)
    scl = method_config("scl")
    assert (scl.mu, scl.proj_dim, scl.optim.name) == (10.0, 8192, "sgd")


def test_nnclr_looks_up_the_pre_step_support_set_then_enqueues_view_a():
    m = _tiny("nnclr", support_set_size=32)
    first = m(_batch(seed=1))  # empty set: the projection is its own positive
    assert torch.isfinite(first["loss"]) and m.support.filled == 0
    m.on_step_end(0, 10)
    assert m.support.filled == 4
    before = m.support.bank.clone()
    batch = _batch(seed=2)
    out = m(batch)
    out["loss"].backward()
    # forward must not touch the set: this step's lookup saw only earlier batches.
    torch.testing.assert_close(m.support.bank, before)
    assert int(m.support.count) == 4
    m.on_step_end(1, 10)
    assert int(m.support.count) == 8 and int(m.support.ptr) == 8
    with torch.no_grad():
        z1 = torch.nn.functional.normalize(m.projector(m.encoder(batch["view_0"])), dim=1)
    torch.testing.assert_close(m.support.bank[4:8], z1, atol=1e-5, rtol=1e-5)
    state = m.state_dict()
    assert {"support.bank", "support.ptr", "support.count"} <= set(state)
    restored = _tiny("nnclr", support_set_size=32)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.support.bank, m.support.bank)
    assert int(restored.support.ptr) == 8


def test_meanshift_step_moves_target_and_fills_bank_with_unit_targets():
    from components.training import TrainStep

    m = _tiny("meanshift", bank_size=8, k=3, optim={"lr": 0.5})
    weak, strong = m.views.views
    assert (weak.jitter_p, weak.gray_p, weak.blur_p) == (0.0, 0.0, 0.0) and strong.jitter_p > 0 and strong.blur_p > 0
    target_before = [p.clone() for p in m.target_encoder.parameters()]
    step = TrainStep(m, global_batch=4, steps_per_epoch=3, epochs=1)
    for i in range(3):
        out = step(_batch(seed=i), i)
    assert math.isfinite(out["loss"])
    assert int(m.bank.count) == 12 and int(m.bank.ptr) == 4 and m.bank.filled == 8
    torch.testing.assert_close(m.bank.bank.norm(dim=1), torch.ones(8))
    assert all(p.grad is None and not p.requires_grad for p in m.target_encoder.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(target_before, m.target_encoder.parameters())]
    online = [not torch.equal(a, b) for a, b in zip(m.encoder.parameters(), m.target_encoder.parameters())]
    assert sum(moved) > 10 and sum(online) > 10  # moved towards the online network, not onto it


def test_scl_method_gives_a_finite_loss_with_gradients():
    m = _tiny("scl", mu=1.0)
    out = m(_batch(n=6))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.encoder.net.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["nnclr", "meanshift", "scl"])
def test_methods_step_under_bf16_autocast(name):
    """GPU training runs under bf16 autocast: mixed dtypes must meet the float32 banks cleanly."""
    from components.training import TrainStep

    m = _tiny(name, **({"support_set_size": 16} if name == "nnclr" else {"bank_size": 16} if name == "meanshift" else {}))
    step = TrainStep(m, global_batch=4, steps_per_epoch=2, epochs=1, amp_dtype=torch.bfloat16)
    for i in range(2):
        out = step(_batch(seed=i), i)
    assert math.isfinite(out["loss"])
    for bank in (getattr(m, "support", None), getattr(m, "bank", None)):
        if bank is not None:
            assert bank.bank.dtype == torch.float32 and int(bank.count) == 8


@pytest.mark.parametrize("name, pick", [("scl", lambda vs: vs), ("meanshift", lambda vs: vs[1:])])
def test_jitter_strength_scales_the_moco_v2_colour_jitter(name, pick):
    """jitter_strength multiplies MoCo v2's (0.4, 0.4, 0.4, 0.1); hue is capped at 0.5 (a half turn)."""
    base, strong = (pick(_tiny(name, jitter_strength=s).views.views) for s in (1.0, 2.0))
    for b, v in zip(base, strong):
        assert (b.brightness, b.contrast, b.saturation, b.hue) == pytest.approx((0.4, 0.4, 0.4, 0.1))
        assert (v.brightness, v.contrast, v.saturation, v.hue) == pytest.approx((0.8, 0.8, 0.8, 0.2))
    assert _tiny(name, jitter_strength=4.0).views.views[-1].hue == 0.4
    with pytest.raises(ReprflowError, match="jitter_strength"):
        _tiny(name, jitter_strength=5.0)


def test_projector_and_predictor_ablation_settings():
    """``proj_last_bn: false`` drops the projector's closing BatchNorm (NNCLR, SCL, MoCo v3) and
    ``pred_layers: 0`` drops the predictor (NNCLR, MoCo v3); the paper defaults keep both, and a
    step still runs (bench/RESULTS.md uses them to find what keeps MoCo v3 from learning the scenes)."""
    from torch import nn

    small = {"image_size": 16, "proj_hidden_dim": 32, "proj_dim": 16}
    for name, extra in (("nnclr", {"pred_hidden_dim": 32, "support_set_size": 64}), ("scl", {}), ("mocov3", {"pred_hidden_dim": 32})):
        paper = build_method(name, {**small, **extra})
        assert isinstance(paper.projector[-1], nn.BatchNorm1d)
        ablated = build_method(name, {**small, **extra, "proj_last_bn": False, **({"pred_layers": 0} if name != "scl" else {})})
        assert isinstance(ablated.projector[-1], nn.Linear) and ablated.projector[-1].bias is not None
        if name != "scl":
            assert isinstance(paper.predictor, nn.Sequential) and isinstance(ablated.predictor, nn.Identity)
        ablated.on_train_start(2, 4)
        batch = {k: torch.rand(4, 3, 16, 16) for k in ("view_0", "view_1")}
        loss = ablated(batch)["loss"]
        loss.backward()
        assert torch.isfinite(loss) and ablated.encoder.net.conv1.weight.grad is not None
