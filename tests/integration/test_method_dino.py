"""DINO with a tiny ViT and multi-crop trains through the real pipeline (shared local-mode run).

DINO's cross-entropy often *rises* early: centring flattens the teacher, raising its entropy.
What the student controls is KL(P_t || P_s) = loss - H(P_t); it falls only if the student
learns to predict the teacher across crops (with a frozen student it rises), and a teacher that
collapsed to uniform would give KL ~ 0 too, hence the entropy bound.
"""

import math

import pytest

from tests.conftest import method_outcome

pytestmark = pytest.mark.integration


def assert_dino_learned(out: dict, out_dim: int) -> None:
    """The shared DINO criterion (also used by the 2-worker ResNet run in test_two_workers)."""
    hist = out["state"]["history"]
    kl = [h["kl"] for h in hist]
    assert len(kl) == 3
    assert kl[-1] < 0.8 * kl[0], kl
    assert hist[-1]["teacher_entropy"] < 0.97 * math.log(out_dim), "teacher collapsed to uniform"
    assert len(out["changed"]) > 10  # the teacher (the exported encoder) followed the student
    assert len(out["versions"]) == 1


def test_dino_vit_learns_and_is_registered(methods_run):
    cfg, table = methods_run
    out = method_outcome(cfg, "dino")
    assert_dino_learned(out, 256)
    assert out["state"]["history"][-1]["teacher_temp"] == pytest.approx(0.07)  # warm-up done
    assert any(r["representation"] == "dino" for r in table["rows"])
