"""MeanShift (MSF) trains through the real pipeline (shared local-mode run): loss falls, encoder
changes, the momentum target follows it and the memory bank of targets is checkpointed."""

import pytest
import torch

from tests.conftest import method_outcome

pytestmark = pytest.mark.integration


def test_meanshift_learns_and_is_registered(methods_run):
    cfg, table = methods_run
    out = method_outcome(cfg, "meanshift")
    assert len(out["losses"]) == 3
    # 2 - 2cos per neighbour starts near 2 for unrelated vectors.
    assert out["losses"][-1] < 0.9 * out["losses"][0]
    assert len(out["changed"]) > 10
    assert len(out["versions"]) == 1
    assert any(r["representation"] == "meanshift" for r in table["rows"])
    state = out["state"]["method"]
    assert int(state["bank.count"]) == 3 * 6 * 32
    online, target = state["encoder.net.conv1.weight"], state["target_encoder.net.conv1.weight"]
    assert not torch.equal(online, target)
