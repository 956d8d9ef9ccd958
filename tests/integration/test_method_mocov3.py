"""MoCo v3 with a tiny ViT trains through the real pipeline (shared local-mode run)."""

import pytest

from tests.conftest import method_outcome

pytestmark = pytest.mark.integration


def test_mocov3_vit_learns_and_is_registered(methods_run):
    cfg, table = methods_run
    out = method_outcome(cfg, "mocov3")
    assert len(out["losses"]) == 3
    assert out["losses"][-1] < out["losses"][0]
    assert any(k.startswith("vit.blocks.") for k in out["changed"])
    assert len(out["versions"]) == 1
    assert any(r["representation"] == "mocov3" for r in table["rows"])
