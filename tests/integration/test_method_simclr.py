"""SimCLR trains through the real pipeline (shared local-mode run): loss falls, encoder changes."""

import pytest

from tests.conftest import method_outcome

pytestmark = pytest.mark.integration


def test_simclr_learns_and_is_registered(methods_run):
    cfg, table = methods_run
    out = method_outcome(cfg, "simclr")
    assert len(out["losses"]) == 3
    assert out["losses"][-1] < out["losses"][0]
    assert len(out["changed"]) > 10
    assert len(out["versions"]) == 1
    assert any(r["representation"] == "simclr" for r in table["rows"])
