"""BYOL trains through the real pipeline (shared local-mode run): loss falls, encoder changes."""

import pytest

from tests.conftest import method_outcome

pytestmark = pytest.mark.integration


def test_byol_learns_and_is_registered(methods_run):
    cfg, table = methods_run
    out = method_outcome(cfg, "byol")
    assert len(out["losses"]) == 3
    # 2 - 2cos summed over both directions starts near 4 for unrelated vectors; a falling
    # regression loss with an EMA target that barely moves means the predictor/encoder learn.
    assert out["losses"][-1] < 0.9 * out["losses"][0]
    assert len(out["changed"]) > 10
    assert len(out["versions"]) == 1
    assert any(r["representation"] == "byol" for r in table["rows"])
