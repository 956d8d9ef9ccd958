"""The BRIEF baseline row: embed[brief] -> evaluate[brief] in a tiny pipeline on real Ray + MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_BRIEF

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def brief_run(methods_run):
    """The BRIEF row of the shared session run (conftest's TINY_BRIEF)."""
    return methods_run


def _children(cfg):
    client = MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("reprflow.kind") == "pipeline")
    return client, {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def test_brief_row_is_in_the_comparison_table_with_knn_and_linear_numbers(brief_run):
    cfg, table = brief_run
    rows = {r["representation"]: r for r in table["rows"]}
    image_rows = [name for name, r in rows.items() if "val_knn_top1" in r]
    assert image_rows[-1] == "brief"  # after the image methods and their floors
    row = rows["brief"]
    for col in ("val_knn_top1", "test_knn_top1", "val_linear_top1", "test_linear_top1"):
        assert isinstance(row[col], float) and 0.0 <= row[col] <= 100.0, (col, row[col])
    assert "| brief |" in (Path(table["output"]) / "results.md").read_text()


def test_brief_embeddings_have_the_embed_step_format(brief_run):
    cfg, _ = brief_run
    steps = cfg.storage_path() / "steps"
    for split in ("train", "val", "test"):
        ours = np.load(next(steps.glob(f"embed_brief_-*/embeddings-{split}.npz")))
        ref = np.load(next(steps.glob(f"embed_simclr_-*/embeddings-{split}.npz")))
        assert set(ours.files) == set(ref.files) == {"ids", "labels", "feats"}
        # The same images in the same order with the same labels: only the features differ.
        assert np.array_equal(ours["ids"], ref["ids"]) and np.array_equal(ours["labels"], ref["labels"])
        feats = ours["feats"]
        assert feats.dtype == np.float32 and feats.shape == (len(ref["ids"]), TINY_BRIEF["codebook_size"])
        sums = feats.sum(1)
        # Normalised word histograms (an image without keypoints is the zero vector), not all alike.
        assert np.allclose(sums[sums > 0], 1.0, atol=1e-5) and (sums > 0).mean() > 0.9
        assert len(np.unique(feats.round(4), axis=0)) > len(feats) // 2


def test_match_plot_and_metrics_are_logged_on_the_brief_runs(brief_run):
    cfg, _ = brief_run
    client, children = _children(cfg)
    assert {"embed[brief]", "evaluate[brief]"} <= set(children)
    embed = children["embed[brief]"]
    assert embed.info.status == "FINISHED" and children["evaluate[brief]"].info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(embed.info.run_id)}
    assert {"brief_matches.png", "brief_codebook.npy", "embeddings_pca.png"} <= arts
    png = client.download_artifacts(embed.info.run_id, "brief_matches.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    m = embed.data.metrics
    assert m["pair_matches"] >= 1 and 0 <= m["pair_correct"] <= m["pair_matches"]
    assert m["train_keypoints_per_image"] > 1 and m["train_images"] == 192
    assert embed.data.params["settings.brief.patch_size"] == "12"
    ev = children["evaluate[brief]"].data.metrics
    assert {"val_knn_top1", "test_knn_top1", "val_linear_top1", "test_linear_top1"} <= set(ev)
