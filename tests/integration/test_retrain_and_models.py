"""Operating reprflow on one tiny shards pipeline (real local Ray + real MLflow, no mocks):
batch embedding from the registry, retraining with champion/challenger, the alias lock and
compare-and-set, manual promote/rollback, gc and the MLflow UI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.data import shards as sh
from components.errors import ReprflowError
from components.data.scenes import SHAPES, scene_rows
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.dag import step_dir
from pipelines.run import build_dag, run_pipeline
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NAME = "ops-simclr"


def _write_split(root: str, split: str, rows, prefix: str) -> None:
    """Write rows as ``<root>/<split>/<prefix>-00000.parquet`` (new shards get new names)."""
    tmp = f"{root}/.tmp-{prefix}-{split}"
    for f in sh.write_shards(rows, tmp, rows_per_shard=10_000):
        shutil.move(f, f"{root}/{split}/{prefix}-{Path(f).name.split('-')[-1]}")
    shutil.rmtree(tmp)


def _make_dataset(root: Path) -> None:
    for split, n in (("train", 128), ("val", 64), ("test", 64)):
        (root / split).mkdir(parents=True, exist_ok=True)
        _write_split(str(root), split, scene_rows(0, split, n, 32), "part")
    files = [f for s in sh.SPLITS for f in sh.list_shards(str(root / s))]
    sh.write_dataset_info(str(root), sh.DatasetInfo("photos", list(SHAPES), {"train": 128, "val": 64, "test": 64}, sh.fingerprint_files(files), {}))


def _add_new_shards(root: Path) -> None:
    """A second batch arrives: new train and val shards (new file names, new ids)."""
    for split, n in (("train", 64), ("val", 32)):
        rows = ({**r, "id": f"batch2-{r['id']}"} for r in scene_rows(1, split, n, 32))
        _write_split(str(root), split, rows, "batch2")


@pytest.fixture(scope="module")
def ops(ray_session, tmp_path_factory):
    """One tiny pipeline on shards, run once: champion v1 of ops-simclr."""
    root = tmp_path_factory.mktemp("ops")
    data = root / "photos"
    _make_dataset(data)
    # Ray Train's local mode (in-process, fits serialised): what these tests check is the registry and
    # the retrain logic, not workers; a 1-worker TorchTrainer cost ~30 s of start-up per fit here.
    cfg_dict = tiny_config(root / "store", name="ops", num_workers=0)
    cfg_dict["datasets"] = {"photos": {"kind": "shards", "uri": str(data)}}
    cfg_dict["train"]["dataset"] = "photos"
    cfg_dict["evaluate"]["dataset"] = "photos"
    cfg_dict["retrain"] = {"data": "new", "epochs": 1, "margin": 100}  # the first retrain cannot win
    path = root / "ops.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(path)
    run_pipeline(cfg, root / "out")
    dag, _ = build_dag(cfg)  # the step folders of this run (keys change once new shards arrive)
    dirs = {name: step_dir(cfg.storage_path(), step) for name, step in dag.steps.items()}
    return {"root": root, "data": data, "path": str(path), "cfg": cfg, "uri": cfg.tracking_uri(), "dirs": dirs}


def _client(ops) -> MlflowClient:
    return MlflowClient(ops["uri"])


def _champion(ops) -> str:
    return str(_client(ops).get_model_version_by_alias(NAME, "champion").version)


def test_embed_from_registry_equals_pipeline_embeddings(ops, capsys):
    from pipelines.models import read_embeddings

    out = ops["root"] / "emb"
    val = str(ops["data"] / "val")
    assert main(["embed", "--model", f"models:/{NAME}@champion", val, "--output", str(out), "--tracking-uri", ops["uri"]]) == 0
    assert "embedded 64 of 64 images with ops-simclr v1" in capsys.readouterr().out
    ids, emb = read_embeddings(str(out))
    ref = np.load(ops["dirs"]["embed[simclr]"] / "embeddings-val.npz")
    order = {i: k for k, i in enumerate(ref["ids"])}
    assert sorted(ids) == sorted(ref["ids"]) and emb.shape == (64, 512)
    np.testing.assert_allclose(emb, ref["feats"][[order[i] for i in ids]], rtol=1e-4, atol=1e-5)
    # Not trivially equal: a random-init encoder of the same architecture embeds differently.
    floor = np.load(ops["dirs"]["embed[random-init[resnet18-small-16]]"] / "embeddings-val.npz")
    assert not np.allclose(emb, floor["feats"][[order[i] for i in ids]], atol=1e-3)
    assert main(["embed", "--model", f"models:/{NAME}@champion", val, "--output", str(out), "--tracking-uri", ops["uri"]]) == 2  # not empty


def test_a_models_reference_resolves_to_the_registered_training_state(ops, tmp_path):
    """What a method referring to ``models:/ops-simclr@champion`` (e.g. a teacher) receives."""
    import torch

    from pipelines.models import upstream_from_registry
    from pipelines.train_loop import load_state

    up = upstream_from_registry(_client(ops), f"models:/{NAME}@champion", tmp_path)
    assert (up.kind, up.name) == ("method", "simclr") and up.settings["temperature"] == ops["cfg"].methods[0].settings["temperature"]
    teacher = up.load_method()
    trained = load_state(next(ops["dirs"]["train[simclr]"].glob("state.pt")))["method"]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(ReprflowError, match="no such registered model version"):
        upstream_from_registry(_client(ops), "models:/ops-nope@champion", tmp_path)


def test_pipeline_runs_carry_method_and_data_fingerprint_tags(ops):
    client = _client(ops)
    exp = client.get_experiment_by_name("ops")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = {r.data.tags["mlflow.runName"]: r for r in client.search_runs([exp.experiment_id], "tags.`reprflow.kind` = 'step'")}
    for step in ("train[simclr]", "evaluate[simclr]", "evaluate[random-init[resnet18-small-16]]"):
        tags = runs[step].data.tags
        assert tags["reprflow.method"] in ("simclr", "random-init[resnet18-small-16]") and len(tags["reprflow.data_fingerprint"]) == 16
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags["reprflow.watermark"].startswith("1 train shards, last train/part-00000.parquet")
    assert "Lineage" in v1.description and "val_knn_top1" in v1.description


def test_retrain_that_cannot_win_keeps_the_champion_and_records_both_scores(ops, capsys):
    from pipelines.retrain import retrain

    assert main(["retrain", ops["path"]]) == 0  # nothing arrived yet
    assert "no new shards" in capsys.readouterr().out
    _add_new_shards(ops["data"])
    out = retrain(load_config(ops["path"]))  # margin 100: no challenger can win by 100 points
    d = out["methods"]["simclr"]
    assert d["decision"] == "kept_champion" and d["champion"] == "1" and d["challenger"] == "2" and d["new_shards"] == 1
    client = _client(ops)
    assert _champion(ops) == "1"
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["reprflow.decision"] == "kept_champion" and v2.tags["reprflow.retrained_from"] == "1"
    assert float(v2.tags["reprflow.champion_score_same_data"]) == pytest.approx(d["champion_score"], abs=1e-4)
    # The champion was re-measured on the new val split (64 + 32 rows) like the challenger.
    run = client.get_run(out["run_id"])
    assert run.data.tags["reprflow.kind"] == "retrain" and run.data.tags["reprflow.retrain.simclr.decision"] == "kept_champion"
    assert run.data.metrics["simclr.champion.val_knn_top1"] == pytest.approx(d["champion_score"])
    children = {r.data.tags["mlflow.runName"]: r for r in client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    assert {"retrain[simclr]", "embed[simclr]", "evaluate[simclr]", "embed[simclr@v1]", "evaluate[simclr@v1]", "register[simclr]"} <= set(children)
    assert children["evaluate[simclr@v1]"].data.metrics["val_count"] == 96.0 == children["evaluate[simclr]"].data.metrics["val_count"]
    local = client.download_artifacts(children["retrain[simclr]"].info.run_id, "history.json", str(ops["root"]))
    history = json.loads(Path(local).read_text())
    assert [h["epoch"] for h in history] == [1] and history[0]["step"] == 2  # warm start: counters restart; 64 new rows / 32
    assert v2.tags["reprflow.watermark"].startswith("2 train shards")
    # Warm start: the challenger continued from the champion's weights (not from a fresh init).
    import torch

    from components.methods.registry import build_method
    from pipelines.train_loop import load_state

    storage = ops["cfg"].storage_path()
    challenger = load_state(storage / "steps" / f"retrain_simclr_-{children['retrain[simclr]'].data.tags['reprflow.step_key']}" / "state.pt")["method"]
    champion = load_state(ops["dirs"]["train[simclr]"] / "state.pt")["method"]
    torch.manual_seed(0)
    init = build_method("simclr", ops["cfg"].methods[0].settings).state_dict()
    keys = [k for k, v in champion.items() if k.startswith("encoder.") and v.is_floating_point() and "running" not in k]

    def dist(a, b):
        return sum(float((a[k] - b[k]).pow(2).sum()) for k in keys) ** 0.5

    assert keys and dist(challenger, champion) < 0.5 * dist(challenger, init)


def test_a_retrain_refuses_a_tampered_champion_state(ops):
    """The warm start checks the champion's training_state/ against its manifest: a modified
    state is refused by name, no version is registered, the retrain run ends FAILED."""
    from urllib.parse import urlparse

    from pipelines.retrain import retrain

    client = _client(ops)
    v1 = client.get_model_version(NAME, "1")
    uri = client.get_run(v1.run_id).info.artifact_uri
    state = Path(urlparse(uri).path if uri.startswith("file:") else uri) / "training_state" / "state.pt"
    assert (state.parent / "state.pt.sha256").is_file()  # registered with its manifest
    original = state.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    try:
        with pytest.raises(ReprflowError, match="failed its integrity check"):
            retrain(load_config(ops["path"], ["retrain.epochs=3"]))  # new step keys: nothing cached
    finally:
        state.write_bytes(original)
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{NAME}'")) == ["1", "2"]
    exp = client.get_experiment_by_name("ops")
    [last] = client.search_runs([exp.experiment_id], "tags.`reprflow.kind` = 'retrain'", order_by=["attributes.start_time DESC"], max_results=1)
    assert last.info.status == "FAILED"
    assert not list((ops["cfg"].storage_path() / "locks").glob("driver-*.lock"))  # its driver lock went with the recorded end


def test_two_concurrent_retrains_promote_exactly_once(ops):
    from pipelines.retrain import retrain

    # Any challenger wins; 2 epochs = other step keys than the first retrain's, so a new version is trained
    # (with the same settings the cached v2 would simply be judged again).
    cfg = load_config(ops["path"], ["retrain.margin=-100", "retrain.epochs=2"])
    results, errors = [], []

    def go():
        try:
            results.append(retrain(cfg))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert sorted(r["status"] for r in results) == ["done", "no-op"]
    done = next(r for r in results if r["status"] == "done")["methods"]["simclr"]
    assert done["decision"] == "promoted" and done["champion"] == "1"
    client = _client(ops)
    promoted = [v for v in client.search_model_versions(f"name='{NAME}'") if v.tags.get("reprflow.decision") == "promoted"]
    assert sorted(str(v.version) for v in promoted) == ["1", done["challenger"]]
    assert client.get_model_version(NAME, "2").tags["reprflow.decision"] == "kept_champion"
    assert _champion(ops) == done["challenger"] == "3"
    v3 = client.get_model_version(NAME, "3")
    assert v3.tags["reprflow.previous_champion"] == "1" and "reprflow.promoted_by" in v3.tags
    assert v3.tags["reprflow.watermark"].startswith("2 train shards")
    assert not [m for m in client.search_registered_models() if m.name.endswith(".alias-lock")]  # lock released


def test_retrain_with_nothing_new_is_a_noop(ops, capsys):
    assert main(["retrain", ops["path"], "--set", "retrain.margin=-100"]) == 0
    out = capsys.readouterr().out
    assert "no new shards since the watermark of v3" in out
    assert sorted(str(v.version) for v in _client(ops).search_model_versions(f"name='{NAME}'")) == ["1", "2", "3"]
    assert "no new shards" in _client(ops).get_registered_model(NAME).tags["reprflow.last_retrain_check"]


def test_compare_and_set_refuses_a_stale_challenger(ops):
    from pipelines.retrain import decide

    client = _client(ops)
    # v2 was trained from v1; the champion is now v3: promoting v2 must be refused, even though it "wins".
    d = decide(client, NAME, "champion", "2", "1", 99.0, "knn_top1", "fp", -100, 0.0)
    assert not d.promoted and d.reason.startswith("superseded") and _champion(ops) == "3"
    assert client.get_model_version(NAME, "2").tags["reprflow.decision"] == "superseded"


def test_alias_lock_excludes_a_second_holder(ops):
    from components.errors import ReprflowError
    from pipelines.alias import alias_lock

    client = _client(ops)
    with alias_lock(client, NAME):
        with pytest.raises(ReprflowError, match="has been locked"):
            with alias_lock(client, NAME, timeout=1):
                pass
    with alias_lock(client, NAME, timeout=1):  # released: free again
        pass


def test_manual_rollback_and_promote_are_recorded(ops, capsys):
    client = _client(ops)
    assert main(["rollback", NAME, "--tracking-uri", ops["uri"]]) == 0
    assert _champion(ops) == "1"
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags["reprflow.rolled_back_from"] == "3" and "@" in v1.tags["reprflow.rolled_back_by"]
    assert main(["promote", NAME, "3", "--tracking-uri", ops["uri"], "--reason", "test"]) == 0
    assert _champion(ops) == "3"
    assert client.get_model_version(NAME, "3").tags["reprflow.previous_champion"] == "1"
    history = json.loads(client.get_registered_model(NAME).tags["reprflow.alias_history"])
    assert [(h["action"], h["version"], h["previous"]) for h in history[-3:]] == [("promoted", "3", "1"), ("rolled_back", "1", "3"), ("promoted", "3", "1")]
    assert main(["promote", NAME, "99", "--tracking-uri", ops["uri"]]) == 2
    assert "not found" in capsys.readouterr().err


def test_gc_keeps_the_lineage_of_registered_versions(ops, capsys):
    storage = ops["cfg"].storage_path()
    orphan = storage / "steps" / "train_simclr_-0123456789abcdef"
    orphan.mkdir()
    (orphan / "state.pt").write_bytes(b"x" * 2048)
    crashed = storage / "steps" / "embed_simclr_-fedcba9876543210.tmp-1234abcd"
    crashed.mkdir()
    assert (storage / "ray_results").is_dir()
    before = sorted(p.name for p in (storage / "steps").iterdir())
    assert main(["gc", ops["path"], "--min-age-hours", "0"]) == 0
    out = capsys.readouterr().out
    assert "would delete" in out and orphan.name in out and crashed.name in out and "dry run" in out
    assert sorted(p.name for p in (storage / "steps").iterdir()) == before  # dry run deleted nothing
    assert main(["gc", ops["path"], "--min-age-hours", "0", "--yes"]) == 0
    left = sorted(p.name for p in (storage / "steps").iterdir())
    assert orphan.name not in left and crashed.name not in left
    assert not list((storage / "ray_results").iterdir())
    assert all(d.is_dir() for d in ops["dirs"].values())  # v1's pipeline run, floors included (v1 is still registered)
    assert len([n for n in left if n.startswith("retrain_simclr_")]) == 2  # v2's and v3's
    assert "freed" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store_and_prints_the_runs_table_url(ops):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", ops["path"], "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(l.startswith("ops: ") for l in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        exp_id = _client(ops).get_experiment_by_name("ops").experiment_id
        url = next(l for l in lines if l.startswith("ops: "))[5:]
        assert url == f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning&compareRunsMode=TABLE"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=ops", timeout=10) as r:
            assert json.load(r)["experiment"]["experiment_id"] == exp_id
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        assert _listening(port) == [f"127.0.0.1:{port}"]  # loopback only
        proc.terminate()  # SIGTERM to `reprflow ui` stops its server too
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 30
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _listening(port) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(30)


def _listening(port: int) -> list[str]:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout.splitlines()
    return [line.split()[3] for line in out]
