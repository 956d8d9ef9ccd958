"""VisualBERT through the real pipeline: its row of the shared session run (local mode), and a
2-worker Ray Train run that reads its frozen encoder from the registry (models:/...@champion)."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.report import VL_COLUMNS, to_markdown
from pipelines.train_loop import load_state
from tests.conftest import TINY_METHODS, TINY_TOKENIZERS, tiny_config

pytestmark = pytest.mark.integration


def test_visualbert_trains_evaluates_and_registers_with_its_tokenizer(methods_run, tmp_path):
    cfg, table = methods_run
    row = next(r for r in table["rows"] if r["representation"] == "visualbert")
    for col in ("val_itm_acc", "test_itm_acc", "test_i2t_r5", "test_t2i_r5", "test_ground_colour_image", "test_ground_colour_swapped"):
        assert 0.0 <= row[col] <= 100.0, col
    assert row["test_chance_r5"] == pytest.approx(100 * 5 / 96)
    assert "Vision-language" in to_markdown(table) and all(c in to_markdown(table) for c in VL_COLUMNS)

    state = load_state(next((cfg.storage_path() / "steps").glob("train_visualbert_-*/state.pt")))
    losses = [h["loss"] for h in state["history"]]
    assert losses[-1] < losses[0], losses
    assert not any(k.startswith(("encoder.net", "_upstream")) for k in state["method"])  # the frozen SimCLR stays out

    client = MlflowClient(cfg.tracking_uri())
    [tok] = client.search_model_versions(f"name='{cfg.name}-tokenizer-tiny-text'")
    [vb] = client.search_model_versions(f"name='{cfg.name}-visualbert'")
    assert vb.tags["reprflow.tokenizer"] == "tokenizer[tiny-text]" and vb.tags["reprflow.visual_encoder"] == "train[simclr]"
    assert float(vb.tags["reprflow.val_score"]) == pytest.approx(row["val_itm_acc"], abs=1e-4)
    local = client.download_artifacts(vb.run_id, "visualbert", str(tmp_path))
    meta = json.loads(open(f"{local}/config.json").read())
    assert meta["visual_encoder"]["method"] == "simclr" and meta["tokenizer"]["kind"] == "wordpiece"
    tok_dir = client.download_artifacts(tok.run_id, "tokenizer", str(tmp_path / "t"))
    assert open(f"{local}/tokenizer.json").read() == open(f"{tok_dir}/tokenizer.json").read()
    from safetensors.torch import load_file

    weights = load_file(f"{local}/model.safetensors")
    assert set(weights) == set(state["method"]) and torch.equal(weights["model.itm_head.weight"], state["method"]["model.itm_head.weight"])


def test_visualbert_two_workers_from_a_registered_encoder(methods_run, tmp_path):
    """2 real Ray Train workers (DDP); the encoder is the session run's SimCLR champion, resolved
    from the same MLflow store, so only the tokenizer and VisualBERT are trained here."""
    from pipelines.config import parse_config
    from pipelines.run import run_pipeline

    cfg, _ = methods_run
    settings = {**TINY_METHODS["visualbert"], "encoder": "models:/methods-simclr@champion"}
    data = tiny_config(tmp_path / "store", name="vl2", methods={"visualbert": settings}, tokenizers={"tiny-text": TINY_TOKENIZERS["tiny-text"]},
                       num_workers=2, epochs=2, batch_size=64)
    data["mlflow"] = {"tracking_uri": cfg.tracking_uri()}
    cfg2 = parse_config(data)
    table = run_pipeline(cfg2, tmp_path / "out")
    row = next(r for r in table["rows"] if r["representation"] == "visualbert")
    assert 0.0 <= row["test_itm_acc"] <= 100.0 and row["registered"] == "vl2-visualbert/1"
    state = load_state(next((cfg2.storage_path() / "steps").glob("train_visualbert_-*/state.pt")))
    assert len(state["history"]) == 2 and state["global_step"] >= 2
    [vb] = MlflowClient(cfg.tracking_uri()).search_model_versions("name='vl2-visualbert'")
    assert vb.tags["reprflow.visual_encoder"].startswith("models:/methods-simclr@champion")
