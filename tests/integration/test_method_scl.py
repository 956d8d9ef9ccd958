"""SCL (spectral contrastive loss) trains through the real pipeline (shared local-mode run)."""

import pytest

from tests.conftest import method_outcome

pytestmark = pytest.mark.integration


def test_scl_learns_and_is_registered(methods_run):
    cfg, table = methods_run
    out = method_outcome(cfg, "scl")
    assert len(out["losses"]) == 3
    # The loss starts near 0 (unrelated embeddings: no alignment, little repulsion) and turns
    # negative as the two views align.
    assert out["losses"][-1] < out["losses"][0] - 0.1
    assert len(out["changed"]) > 10
    assert len(out["versions"]) == 1
    assert any(r["representation"] == "scl" for r in table["rows"])
