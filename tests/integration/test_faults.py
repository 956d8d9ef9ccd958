"""Faults injected into real pipeline runs (real local Ray, a real `mlflow server`, no mocks).

One MLflow server (started the way `reprflow ui` starts it) sits behind a TCP gate that can
refuse connections at an exact moment; fault timing comes from pause points
(`pipelines.dag.fault_point`: a process announces its pid and waits at a named point), never
from sleeping and hoping. Every faulted pipeline must end with the same MLflow records as the
fault-free reference run of the same file (`pipelines.tracking.pipeline_records`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bench.soak_harness import (InThread, TcpGate, diff_records, free_port, kill_group, make_dataset, marker, pipeline_dict, records_of, release,
                                spawn_driver, start_mlflow, train_controllers, wait_checkpoint_registered, wait_for_file)
from components.errors import ReprflowError
from pipelines.config import parse_config
from pipelines.run import run_pipeline
from pipelines.train_loop import load_state
from pipelines.ui import stop_server

pytestmark = pytest.mark.integration
FAULT_DIR, PAUSE_AT, RETRY = "REPRFLOW_FAULT_DIR", "REPRFLOW_PAUSE_AT", "REPRFLOW_MLFLOW_RETRY_SECONDS"


@pytest.fixture(scope="module")
def env(ray_session, tmp_path_factory):
    """The shared MLflow server (behind a gate) and a shards dataset with one row of each row-level problem."""
    root = tmp_path_factory.mktemp("faults")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    proc, port = start_mlflow(root / "mlflow")
    gate = TcpGate(port)
    bad = make_dataset(root / "photos")
    try:
        yield SimpleNamespace(root=root, gate=gate, direct=f"http://127.0.0.1:{port}", data=root / "photos", bad=bad, server=proc)
    finally:
        gate.close()
        stop_server(proc)
        for k, v in saved.items():  # the Tracker bounds MLflow's own HTTP retries for this process
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def reference(env):
    """A fault-free run of the suite's pipeline: the records every faulted run must end with."""
    run_pipeline(parse_config(pipeline_dict(env.root / "ref", "fault-ref", env.data, env.gate.url)), env.root / "ref-out")
    return records_of(env.direct, "fault-ref")


def _runs(env, name):
    client = MlflowClient(env.direct)
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    out = []
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()))
    return out


def test_services_bind_loopback_only(env, ray_session):
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    ray_pids = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if session in " ".join(p.info["cmdline"] or []):
                ray_pids |= {p.pid, *(c.pid for c in p.children(recursive=True))}
        except psutil.Error:
            pass
    server = psutil.Process(env.server.pid)
    mlflow_pids = {server.pid, *(c.pid for c in server.children(recursive=True))}
    ray_socks, mlflow_socks = _listening(ray_pids), _listening(mlflow_pids)
    assert len(ray_socks) >= 3 and mlflow_socks, (ray_socks, mlflow_socks)  # gcs, raylet, agents...; the UI server
    exposed = [s for s in ray_socks + mlflow_socks if s[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_bad_rows_are_reported_in_mlflow_and_the_run_continues(env, reference):
    client, runs = _runs(env, "fault-ref")
    parent = next(r for r in runs if r.data.tags.get("reprflow.kind") == "pipeline")
    assert parent.info.status == "FINISHED" and reference["models"]["simclr"]["aliases"] == ["champion"]
    ds = next(r for r in runs if r.data.tags.get("mlflow.runName") == "dataset[photos]")
    report = json.loads(Path(client.download_artifacts(ds.info.run_id, "bad_rows.json", str(env.root / "dl"))).read_text())
    got = {}
    for b in report:
        assert b["file"].endswith("train/part-00000.parquet") and isinstance(b["row"], int) and b["reason"]
        got.setdefault(b["column"], []).append(b["id"])
    assert got == env.bad
    assert {b["action"] for b in report if b["column"] == "image"} == {"skipped"}
    assert ds.data.metrics["bad_rows"] == 5 and ds.data.metrics["skipped_rows"] == 2 and ds.data.metrics["rows_train"] == 96


def _paused_after_epoch1(cfg, tmp_path, monkeypatch, pause_at: str = "train[simclr]:epoch2"):
    """Start ``run_pipeline`` in a thread, paused at the start of simclr's epoch 2 with epoch 1's
    checkpoint recorded by the controller; returns ``(job, faults dir, pause info)``."""
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv(FAULT_DIR, str(faults))
    monkeypatch.setenv(PAUSE_AT, pause_at)
    job = InThread(lambda: run_pipeline(cfg, tmp_path / "out"))
    info = wait_for_file(marker(faults, "train[simclr]:epoch2"), 300, job.alive)
    assert info["last_checkpoint_epoch"] == 1  # epoch 1's checkpoint was reported before the pause
    wait_checkpoint_registered(cfg.storage_path() / "ray_results", 1)  # ... and recorded by the controller
    return job, faults, info


def _assert_resumed_after_epoch1(cfg) -> None:
    state = load_state(next((cfg.storage_path() / "steps").glob("train_simclr_-*/state.pt")))
    assert [h["resumed_from_epoch"] for h in state["history"]] == [0, 1]  # epoch 1 not redone
    steps = [h["step"] for h in state["history"]]
    assert steps[1] == 2 * steps[0] > 0  # the step counter continued from the checkpoint


def test_worker_sigkill_mid_epoch_resumes_and_survives_an_mlflow_blip(env, reference, tmp_path, monkeypatch, capsys):
    cfg = parse_config(pipeline_dict(tmp_path / "store", "fault-worker", env.data, env.gate.url, num_workers=1))
    job, faults, info = _paused_after_epoch1(cfg, tmp_path, monkeypatch, "train[simclr]:epoch2,before:embed[simclr]")
    worker = psutil.Process(info["pid"])
    assert info["pid"] != os.getpid() and "RayTrainWorker" in " ".join(worker.cmdline()) + worker.name()
    os.kill(info["pid"], signal.SIGKILL)
    # Later, between steps, the tracking server's port refuses connections for 2 s.
    wait_for_file(marker(faults, "before:embed[simclr]"), 300, job.alive)
    env.gate.close()
    release(faults, "before:embed[simclr]")
    time.sleep(2)
    env.gate.open()
    job.join()
    assert "unreachable while calling create_run" in capsys.readouterr().err  # the retry was announced

    _assert_resumed_after_epoch1(cfg)
    _, runs = _runs(env, "fault-worker")
    assert len([r for r in runs if r.data.tags.get("reprflow.kind") == "pipeline"]) == 1
    assert diff_records(reference, records_of(env.direct, "fault-worker")) == []


def test_train_controller_sigkill_mid_epoch_the_step_fits_again_from_its_checkpoint(env, reference, tmp_path, monkeypatch, capsys):
    # Ray Train restarts workers, not its controller: a dead controller ends fit() with an actor
    # error, and the train step starts one new fit from the newest checkpoint (train.controller_retries).
    cfg = parse_config(pipeline_dict(tmp_path / "store", "fault-controller", env.data, env.gate.url, num_workers=1))
    job, _, _ = _paused_after_epoch1(cfg, tmp_path, monkeypatch)
    controllers = train_controllers()
    assert len(controllers) == 1, controllers
    controllers[0].kill()
    job.join()
    assert "Ray Train's controller failed" in capsys.readouterr().err

    _assert_resumed_after_epoch1(cfg)
    _, runs = _runs(env, "fault-controller")
    train_runs = [r for r in runs if r.data.tags.get("mlflow.runName") == "train[simclr]"]
    assert len(train_runs) == 1 and train_runs[0].info.status == "FINISHED"  # one step, fitted twice
    assert diff_records(reference, records_of(env.direct, "fault-controller")) == []


def test_driver_sigkill_then_mlflow_down_at_registration(env, reference, tmp_path, monkeypatch):
    import ray

    data = pipeline_dict(tmp_path / "store", "fault-driver", env.data, env.gate.url)
    path = tmp_path / "fault-driver.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = parse_config(data)
    faults = tmp_path / "faults"
    faults.mkdir()
    # 1. `reprflow run` (its own process; the cluster outlives it) is SIGKILLed mid-epoch 2.
    point = "train[simclr]:epoch2"
    proc = spawn_driver(path, {**os.environ, FAULT_DIR: str(faults), PAUSE_AT: point, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
                        tmp_path / "driver.log")
    try:
        info = wait_for_file(marker(faults, point), 300, lambda: proc.poll() is None)
    finally:
        kill_group(proc)
    assert info["pid"] == proc.pid and info["last_checkpoint_epoch"] == 1, (tmp_path / "driver.log").read_text()[-2000:]
    client, runs = _runs(env, "fault-driver")
    dead_parent = next(r for r in runs if r.data.tags.get("reprflow.kind") == "pipeline")
    left = {r.data.tags["mlflow.runName"] for r in runs if r.info.status == "RUNNING"}
    assert {dead_parent.data.tags["mlflow.runName"], "train[simclr]"} <= left

    # 2. The same command again; the tracking server goes away once the model version exists.
    monkeypatch.setenv(FAULT_DIR, str(faults))
    monkeypatch.setenv(PAUSE_AT, "register[simclr]:version-created")
    job = InThread(lambda: run_pipeline(cfg, tmp_path / "out"))
    wait_for_file(marker(faults, "register[simclr]:version-created"), 300, job.alive)
    monkeypatch.setenv(RETRY, "2")
    env.gate.close()
    t0 = time.monotonic()
    release(faults, "register[simclr]:version-created")
    try:
        with pytest.raises(ReprflowError, match=rf"MLflow at {env.gate.url} is unreachable: .* failed \d+ time\(s\).*rerun the same command"):
            job.join()
        assert time.monotonic() - t0 < 60  # bounded: a 2 s budget per call, best-effort failure records
    finally:
        env.gate.open()
    monkeypatch.delenv(RETRY)
    monkeypatch.delenv(PAUSE_AT)
    runs = client.search_runs([dead_parent.info.experiment_id], max_results=1000)
    dead = [r for r in runs if r.info.run_id == dead_parent.info.run_id or r.data.tags.get("mlflow.parentRunId") == dead_parent.info.run_id]
    status = {r.data.tags["mlflow.runName"]: r.info.status for r in dead}
    assert "RUNNING" not in status.values() and status["train[simclr]"] == "FAILED" and status["dataset[photos]"] == "FINISHED"
    assert status[dead_parent.data.tags["mlflow.runName"]] == "FAILED"  # marked by the rerun, not left RUNNING
    assert "driver process died" in next(r for r in dead if r.info.run_id == dead_parent.info.run_id).data.tags["reprflow.error"]
    state_file = next((cfg.storage_path() / "steps").glob("train_simclr_-*/state.pt"))
    state = load_state(state_file)
    assert [h["resumed_from_epoch"] for h in state["history"]] == [0, 1]  # resumed from the dead driver's checkpoint
    (mv,) = client.search_model_versions("name='fault-driver-simclr'")
    assert mv.tags["reprflow.registration"] == "pending" and not client.get_registered_model("fault-driver-simclr").aliases

    # 3. Once the server is back, the same command finishes the registration without retraining.
    mtime = state_file.stat().st_mtime_ns
    run_pipeline(cfg, tmp_path / "out")
    assert state_file.stat().st_mtime_ns == mtime
    (mv,) = client.search_model_versions("name='fault-driver-simclr'")
    assert mv.version == "1" and mv.tags["reprflow.registration"] == "complete"
    assert str(client.get_model_version_by_alias("fault-driver-simclr", "champion").version) == "1"
    latest = max((r for r in client.search_runs([dead_parent.info.experiment_id], max_results=1000) if r.data.tags.get("reprflow.kind") == "pipeline"),
                 key=lambda r: r.info.start_time)
    train = next(r for r in client.search_runs([dead_parent.info.experiment_id], f"tags.mlflow.parentRunId = '{latest.info.run_id}'")
                 if r.data.tags["mlflow.runName"] == "train[simclr]")
    assert train.data.tags.get("reprflow.cached") == "true"
    assert diff_records(reference, records_of(env.direct, "fault-driver")) == []


def test_mlflow_unreachable_at_start_is_a_clear_bounded_error(tmp_path, monkeypatch):
    port = free_port()  # nothing listens there
    cfg = parse_config(pipeline_dict(tmp_path / "store", "fault-start", tmp_path / "nodata", f"http://alice:s3cret@127.0.0.1:{port}"))
    monkeypatch.setenv(RETRY, "2")
    t0 = time.monotonic()
    with pytest.raises(ReprflowError) as err:
        run_pipeline(cfg, tmp_path / "out")
    assert time.monotonic() - t0 < 20
    text = str(err.value)
    assert f"MLflow at http://***@127.0.0.1:{port} is unreachable" in text and "s3cret" not in text
    assert not (tmp_path / "store" / "steps").exists()  # stopped before any work


def test_unwritable_checkpoint_folder_fails_before_any_work(env, tmp_path):
    cfg = parse_config(pipeline_dict(tmp_path / "store", "fault-disk", env.data, env.gate.url))
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "ray_results").write_text("a file where the checkpoint folder should be")
    with pytest.raises(ReprflowError, match=rf"checkpoint folder {tmp_path / 'store' / 'ray_results'} is not writable"):
        run_pipeline(cfg, tmp_path / "out")
    assert MlflowClient(env.direct).get_experiment_by_name("fault-disk") is None  # nothing recorded, nothing ran


def test_a_shard_level_problem_fails_fast_naming_the_file(env, tmp_path):
    data = tmp_path / "photos"
    shutil.copytree(env.data, data)
    (data / "train" / "labels.csv").write_text("id,label\n")
    (data / "train" / "_SUCCESS").write_text("")  # Spark's marker: ignored
    cfg = parse_config(pipeline_dict(tmp_path / "store", "fault-shard", data, env.gate.url))
    with pytest.raises(ReprflowError, match=r"train/labels\.csv: not a Parquet shard"):
        run_pipeline(cfg, tmp_path / "out")
    client, runs = _runs(env, "fault-shard")
    ds = next(r for r in runs if r.data.tags.get("mlflow.runName") == "dataset[photos]")
    assert ds.info.status == "FAILED" and "labels.csv" in ds.data.tags["reprflow.error"]
    assert not [r for r in runs if r.data.tags.get("mlflow.runName") == "train[simclr]"]  # failed before training


def test_steps_running_when_another_fails_finish_cached_and_are_reported(tmp_path):
    """No Ray needed: the DAG layer alone. A step that fails stops scheduling, but a step already
    running finishes, is cached for the rerun and reported as interrupted (never left RUNNING)."""
    from pipelines.dag import DAG, Runner, Step, StepResult, load_cached

    def slow(ctx):
        time.sleep(1.0)
        return StepResult(outputs={"ok": True})

    def bad(ctx):
        raise RuntimeError("boom")

    dag = DAG()
    dag.add(Step("slow", "t", slow, {}))
    dag.add(Step("bad", "t", bad, {}))
    dag.add(Step("after", "t", slow, {"x": 1}, ["slow"]))
    events = []
    with pytest.raises(RuntimeError, match="boom"):
        Runner(dag, tmp_path, None, on_event=lambda e, s, i: events.append((e, s.name))).run_all()
    assert ("failed", "bad") in events and ("interrupted", "slow") in events
    assert ("start", "after") not in events  # nothing new after the failure
    assert load_cached(tmp_path, dag.steps["slow"]).outputs == {"ok": True}
