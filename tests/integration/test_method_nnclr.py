"""NNCLR trains through the real pipeline (shared local-mode run): loss falls, encoder changes,
and the checkpoint carries its filled support set."""

import pytest

from tests.conftest import TINY_METHODS, method_outcome

pytestmark = pytest.mark.integration


def test_nnclr_learns_and_is_registered(methods_run):
    cfg, table = methods_run
    out = method_outcome(cfg, "nnclr")
    assert len(out["losses"]) == 3
    assert out["losses"][-1] < out["losses"][0]
    assert len(out["changed"]) > 10
    assert len(out["versions"]) == 1
    assert any(r["representation"] == "nnclr" for r in table["rows"])
    # 3 epochs x 6 steps x 32 projections went through a 256-row support set.
    state = out["state"]["method"]
    size = TINY_METHODS["nnclr"]["support_set_size"]
    assert int(state["support.count"]) == 3 * 6 * 32 and int(state["support.ptr"]) == (3 * 6 * 32) % size
    assert state["support.bank"].norm(dim=1).sub(1).abs().max() < 1e-4
