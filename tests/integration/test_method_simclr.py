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


def test_small_embeds_run_as_one_task_and_match_the_ray_data_path(methods_run):
    """embed_files' two paths (one pooled Ray task below EMBED_TASK_ROWS, a Ray Data actor pool
    above) embed the run's shards identically: same ids, labels and features per file."""
    import numpy as np

    from pipelines.ray_data import embed_files
    from pipelines.steps import EncoderBuilder
    from tests.conftest import TINY_METHODS

    cfg, _ = methods_run
    data = next((cfg.storage_path() / "steps").glob("dataset_scenes_-*/data"))
    files = [str(p) for split in ("val", "test") for p in sorted((data / split).glob("*.parquet"))]
    state = next((cfg.storage_path() / "steps").glob("train_simclr_-*/state.pt"))
    build = EncoderBuilder("simclr", {**TINY_METHODS["simclr"], "optim": {"lr": 2.4, "warmup_epochs": 0}}, str(state), cfg.seed)
    task = embed_files(files, build, 32, batch_size=40)
    streamed = embed_files(files, build, 32, batch_size=40, task_rows=0)
    assert sorted(task) == sorted(streamed) == sorted(files)
    for f in files:
        ids, labels, feats = task[f]
        order = {str(i): k for k, i in enumerate(streamed[f][0])}
        idx = [order[str(i)] for i in ids]
        assert len(ids) == len(streamed[f][0]) == 96 and feats.shape == (96, 512)
        np.testing.assert_array_equal(labels, streamed[f][1][idx])
        np.testing.assert_allclose(feats, streamed[f][2][idx], rtol=1e-5, atol=1e-6)
