"""The deep-metric-learning family on 2 real Ray Train workers (DDP, gloo): NNCLR's support set
is filled with projections gathered from both workers, and saved in the checkpoint."""

import pytest

from tests.conftest import TINY_METHODS, method_outcome, run_tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_worker_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("dml2")
    return run_tiny(root / "store", "dml2", {"nnclr": TINY_METHODS["nnclr"]}, root / "out", num_workers=2, epochs=3)


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
