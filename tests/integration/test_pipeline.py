"""The quickstart pipeline (tiny settings) on a real local Ray with 2 train workers + real MLflow."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.config import parse_config
from pipelines.dag import step_dir
from pipelines.run import build_dag, run_pipeline
from pipelines.train_loop import load_state
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    cfg = parse_config(tiny_config(root / "store", name="qs", num_workers=2, epochs=2))
    t0 = time.monotonic()
    table = run_pipeline(cfg, root / "out1")
    return cfg, root, table, time.monotonic() - t0


def _runs(cfg):
    client = MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.name)
    return client, client.search_runs([exp.experiment_id], max_results=500)


def test_mlflow_records_of_a_pipeline_run(first_run):
    cfg, root, table, _ = first_run
    client, runs = _runs(cfg)
    parents = [r for r in runs if r.data.tags.get("reprflow.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["mlflow.runName"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"dataset[scenes]", "train[simclr]", "embed[simclr]", "evaluate[simclr]", "register[simclr]",
                             "embed[random-init[resnet18-small-16]]", "evaluate[random-init[resnet18-small-16]]",
                             "embed[random-init-bn[resnet18-small-16]]", "evaluate[random-init-bn[resnet18-small-16]]"}
    assert all(r.info.status == "FINISHED" for r in [parent, *children.values()])
    train = children["train[simclr]"]
    loss_hist = client.get_metric_history(train.info.run_id, "loss")
    assert sorted(m.step for m in loss_hist) == [1, 2]  # one point per epoch
    assert train.data.params["settings.method"] == "simclr" and train.data.params["settings.seed"] == "0"
    train_art = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"loss_curve.png", "history.json"} <= train_art
    assert "embeddings_pca.png" in {a.path for a in client.list_artifacts(children["embed[simclr]"].info.run_id)}
    ev = children["evaluate[simclr]"].data.metrics
    assert {"val_knn_top1", "test_knn_top1", "val_linear_top1", "test_linear_top1"} <= set(ev)
    parent_art = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.json", "pipeline.json"} <= parent_art
    assert "simclr.val_knn_top1" in parent.data.metrics
    reg = children["register[simclr]"]
    reg_art = {a.path for a in client.list_artifacts(reg.info.run_id)}
    assert {"encoder", "training_state"} <= reg_art  # the pt2 model itself is an MLflow 3 LoggedModel


def test_registered_version_alias_and_model_loads(first_run):
    cfg, root, table, _ = first_run
    client = MlflowClient(cfg.tracking_uri())
    versions = client.search_model_versions("name='qs-simclr'")
    assert [str(v.version) for v in versions] == ["1"]
    champ = client.get_model_version_by_alias("qs-simclr", "champion")
    assert str(champ.version) == "1" and champ.tags["reprflow.decision"] == "promoted"
    assert float(champ.tags["reprflow.val_score"]) == pytest.approx(table["rows"][0]["val_knn_top1"], abs=1e-3)
    assert "Lineage" in champ.description
    mlflow.set_tracking_uri(cfg.tracking_uri())
    model = mlflow.pytorch.load_model("models:/qs-simclr@champion")
    feats = model(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (3, 512)
    # Its requirements are the ones it needs, pinned (given, not inferred from whatever the process imported).
    reqs = Path(mlflow.pyfunc.get_model_dependencies("models:/qs-simclr@champion")).read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs and not any(r.startswith(("lightly", "pytorch-lightning")) for r in reqs)


def test_results_table_written_and_floor_present(first_run):
    cfg, root, table, _ = first_run
    data = json.loads((root / "out1" / "results.json").read_text())
    labels = [r["representation"] for r in data["rows"]]
    assert labels == ["simclr", "random-init[resnet18-small-16]", "random-init-bn[resnet18-small-16]"]
    md = (root / "out1" / "results.md").read_text()
    assert "| simclr |" in md and "random-init" in md and "val_knn_top1_vs_floor" in md
    # SimCLR's margin is over the stronger of its backbone's two floors; the floors have none.
    simclr, *floors = data["rows"]
    assert simclr["val_knn_top1_vs_floor"] == pytest.approx(simclr["val_knn_top1"] - max(f["val_knn_top1"] for f in floors))
    assert [f["val_knn_top1_vs_floor"] for f in floors] == [None, None]
    # The second floor: the same random-init weights with the train images' BN statistics embed differently.
    dag = build_dag(cfg)[0]
    bare, bn = (np.load(step_dir(cfg.storage_path(), dag.steps[f"embed[{label}[resnet18-small-16]]"]) / "embeddings-val.npz")["feats"]
                for label in ("random-init", "random-init-bn"))
    assert bare.shape == bn.shape and not np.allclose(bare, bn, atol=1e-3)
    assert all(0 <= r["test_knn_top1"] <= 100 for r in data["rows"])


def test_trained_with_two_workers_and_weights_changed(first_run):
    cfg, root, table, _ = first_run
    state = next((cfg.storage_path() / "steps").glob("train_simclr_-*/state.pt"))
    st = load_state(state)
    assert st["epoch"] == 2 and len(st["history"]) == 2
    # 192 rows / 2 workers / 16 per worker = 6 steps per epoch: each worker saw its half.
    assert st["global_step"] == 12


def test_rerun_skips_finished_steps(first_run):
    cfg, root, table, first_seconds = first_run
    t0 = time.monotonic()
    again = run_pipeline(cfg, root / "out2")
    assert time.monotonic() - t0 < first_seconds
    assert again["rows"][0]["val_knn_top1"] == table["rows"][0]["val_knn_top1"]
    client, runs = _runs(cfg)
    assert len([r for r in runs if r.data.tags.get("reprflow.kind") == "pipeline"]) == 2
    cached = [r for r in runs if r.data.tags.get("reprflow.cached") == "true"]
    assert len(cached) == 9  # every step: dataset, train, embed, evaluate, register, two floors x (embed, evaluate)
    assert [str(v.version) for v in client.search_model_versions("name='qs-simclr'")] == ["1"]


def test_state_api_inside_the_local_ray_asks_its_own_cluster(ray_session):
    """Ray Train V2's placement-group cleaner asks the state API, from inside the cluster, every
    second whether the train controller is alive, and kills the run's workers when it is not
    found. A second Ray (with a dashboard) on the same machine must not be asked instead: that
    killed a real pipeline run's training once (see ``pipelines.run._init_local_ray``)."""
    import subprocess
    import sys

    ray = ray_session

    @ray.remote(num_cpus=0)
    def look(actor_id: str) -> str:  # defined here: pickled by value (workers cannot import test modules)
        from ray.util.state import get_actor

        try:
            return "alive" if (a := get_actor(actor_id, timeout=20)) and a.state == "ALIVE" else f"not found: {a}"
        except Exception as e:  # what Train V2's placement-group cleaner would meet
            return f"{type(e).__name__}: {e}"

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self):
            return 1

    probe = Probe.remote()
    ray.get(probe.ping.remote())
    actor_id = probe._actor_id.hex()
    assert ray.get(look.remote(actor_id)) == "alive"
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(num_cpus=1, include_dashboard=True, dashboard_host='127.0.0.1'); "
                               "print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    try:
        assert other.stdout.readline().strip() == "up"
        assert ray.get(look.remote(actor_id)) == "alive"
    finally:
        other.stdin.close()
        other.wait(timeout=120)
        ray.kill(probe)


def test_resume_from_checkpoint_after_a_crash(ray_session, tmp_path, monkeypatch):
    cfg = parse_config(tiny_config(tmp_path / "store", name="resume", epochs=3, max_failures=0))
    monkeypatch.setenv("REPRFLOW_FAIL_AFTER_EPOCH", "2")
    with pytest.raises(Exception, match="injected fault after epoch 2"):
        run_pipeline(cfg, tmp_path / "out")
    client, runs = _runs(cfg)
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert {r.data.tags.get("mlflow.runName") for r in failed} >= {"train[simclr]"}
    monkeypatch.delenv("REPRFLOW_FAIL_AFTER_EPOCH")
    run_pipeline(cfg, tmp_path / "out")
    st = load_state(next((cfg.storage_path() / "steps").glob("train_simclr_-*/state.pt")))
    assert st["epoch"] == 3
    assert [h["resumed_from_epoch"] for h in st["history"]] == [0, 0, 2]  # epochs 1-2 not redone
    assert [h["step"] for h in st["history"]] == [6, 12, 18]
