"""The methods whose distributed path differs, on 2 real Ray Train workers (DDP, gloo) in one
session run: NNCLR fills its support set with projections gathered from both workers (saved in
the checkpoint), MoCo v3 gathers keys across workers, DINO all-reduces its centre and cancels
the last layer's gradients after DDP's all-reduce."""

import pytest

from tests.conftest import TINY_METHODS, method_outcome
from tests.integration.test_method_dino import assert_dino_learned

pytestmark = pytest.mark.integration


def test_nnclr_two_workers_gathers_the_support_set(two_worker_run):
    cfg, table = two_worker_run
    assert cfg.train.num_workers == 2
    out = method_outcome(cfg, "nnclr")
    assert len(out["losses"]) == 3 and len(out["versions"]) == 1
    steps = out["state"]["global_step"]
    assert steps == 3 * 6  # 192 rows / 2 workers / 16 per worker, 3 epochs
    state = out["state"]["method"]
    # Each step enqueues the GLOBAL batch (2 x 16 gathered), not a worker's 16 projections.
    size = TINY_METHODS["nnclr"]["support_set_size"]
    assert int(state["support.count"]) == steps * 32
    assert int(state["support.ptr"]) == (steps * 32) % size
    bank = state["support.bank"]
    assert bank.norm(dim=1).sub(1).abs().max() < 1e-4  # every slot holds a real projection
    assert len({tuple(row.tolist()) for row in bank}) == size  # no worker wrote its rows twice
    assert any(r["representation"] == "nnclr" for r in table["rows"])


def test_mocov3_resnet_two_workers(two_worker_run):
    cfg, _ = two_worker_run
    out = method_outcome(cfg, "mocov3")
    assert len(out["losses"]) == 3
    assert out["losses"][-1] < out["losses"][0]
    assert any(k.startswith("net.layer") for k in out["changed"])
    assert len(out["versions"]) == 1


def test_dino_resnet_two_workers(two_worker_run):
    cfg, table = two_worker_run
    out = method_outcome(cfg, "dino")
    assert_dino_learned(out, 256)
    # The centre is a buffer in the checkpoint, moved away from its zero start.
    assert out["state"]["method"]["center"].abs().sum() > 0
    assert {r["representation"] for r in table["rows"]} >= {"nnclr", "mocov3", "dino"}
