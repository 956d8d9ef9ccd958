"""The ``evaluate.brief`` section: validated once, and it adds the BRIEF row to the DAG only when enabled."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.errors import ReprflowError
from pipelines.config import load_config, parse_config
from pipelines.run import build_dag
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _cfg(brief: dict | None):
    data = tiny_config(Path("/tmp/unused-brief"))
    if brief is not None:
        data["evaluate"]["brief"] = brief
    return parse_config(data)


def test_brief_is_off_by_default_and_adds_two_steps_and_a_table_row_when_enabled():
    dag, rows = build_dag(_cfg(None))
    assert not any("brief" in name for name in dag.steps) and not any("brief" in r for r in rows)
    dag, rows = build_dag(_cfg({"enabled": True, "patch_size": 12}))
    assert rows[-1] == "evaluate[brief]"
    assert dag.steps["embed[brief]"].inputs == ["dataset[scenes]"]
    assert dag.steps["evaluate[brief]"].inputs == ["dataset[scenes]", "embed[brief]"]
    assert dag.steps["embed[brief]"].settings["brief"]["bits"] == 256  # the paper's n_d by default


def test_brief_settings_change_the_step_key_so_a_cached_codebook_is_not_reused():
    a = build_dag(_cfg({"enabled": True, "patch_size": 12}))[0].steps["embed[brief]"].key
    b = build_dag(_cfg({"enabled": True, "patch_size": 12, "codebook_size": 64}))[0].steps["embed[brief]"].key
    assert a != b


@pytest.mark.parametrize("brief,where", [
    ({"enabled": True, "patch_size": 30}, "evaluate.brief.patch_size: 30 leaves no room for keypoints in 32-px images"),
    ({"enabled": True, "bits": 300}, "evaluate.brief.bits"),
    ({"enabled": True, "pattern": "G2"}, "evaluate.brief.pattern"),
    ({"enabled": True, "codebook_sise": 8}, "evaluate.brief.codebook_sise: unknown key"),
])
def test_bad_brief_settings_are_rejected_with_their_dotted_path(brief, where):
    with pytest.raises(ReprflowError, match=where.replace(".", r"\.")):
        _cfg(brief)


def test_quickstart_enables_brief_with_a_patch_that_fits_its_images():
    cfg = load_config(ROOT / "pipelines" / "quickstart.yaml")
    b = cfg.evaluate.brief
    assert b.enabled and b.bits == 256 and b.patch_size < cfg.train.decode_size
    assert build_dag(cfg)[1][-1] == "evaluate[brief]"
