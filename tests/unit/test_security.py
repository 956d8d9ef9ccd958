"""Security: checkpoints load without running code and refuse tampering; credentials never reach
MLflow or the screen; ingest stays inside its input folder; services default to loopback; the
MLflow retries are bounded and never repeat a request that may have been carried out.

Real files, a real SQLite MLflow store and real sockets; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from components.data import shards as sh
from components.data.ingest import ingest_folder
from components.errors import ReprflowError
from pipelines.cli import build_parser
from pipelines.tracking import Tracker, pipeline_records, redact, with_retries
from pipelines.train_loop import (STATE_FILE, check_checkpoint_storage, latest_local_checkpoint, load_state, manifest_path, save_state,
                                  write_state_file)
from pipelines.ui import server_command

ROOT = Path(__file__).resolve().parents[2]


class _Optim:
    """The optimizer side of a checkpoint (what ``TrainStep.state_dict`` returns)."""

    def __init__(self, model):
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def state_dict(self):
        return {"optimizer": self.opt.state_dict()}


def _save(folder: Path, epoch: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = torch.nn.Linear(4, 3)
    save_state(folder / STATE_FILE, model, _Optim(model), epoch, 10 * epoch, [{"loss": 1.0}], {"method": "simclr"})
    return folder / STATE_FILE


class _Evil:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_with_manifest(tmp_path):
    path = _save(tmp_path / "ck")
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["file"] == STATE_FILE and manifest["bytes"] == path.stat().st_size and len(manifest["sha256"]) == 64
    state = load_state(path)
    assert state["epoch"] == 1 and torch.is_tensor(state["method"]["weight"])


def test_a_tampered_checkpoint_is_refused_by_name(tmp_path):
    path = _save(tmp_path / "ck")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(ReprflowError, match=rf"checkpoint {re.escape(str(path))} failed its integrity check .* modified after reprflow wrote it"):
        load_state(path)
    manifest_path(path).unlink()
    with pytest.raises(ReprflowError, match=r"has no integrity manifest"):
        load_state(path)


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"method": {"weight": torch.zeros(1)}, "payload": _Evil(marker)}, evil)
    path = tmp_path / "ck" / STATE_FILE
    path.parent.mkdir()
    write_state_file(evil, path)  # even with a matching manifest (an attacker can write both)
    with pytest.raises(ReprflowError, match=r"cannot be loaded safely .* never pickled code"):
        load_state(path)
    assert not marker.exists()
    # The same file loaded the unsafe way would have run the command: the test is meaningful.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_resume_skips_an_unfinished_checkpoint_but_refuses_a_tampered_one(tmp_path):
    run = tmp_path / "train-abc"
    _save(run / "checkpoint_epoch000001", 1)
    newest = _save(run / "checkpoint_epoch000002", 2)
    assert latest_local_checkpoint(run).name == "checkpoint_epoch000002"
    manifest_path(newest).unlink()  # died between writing the state and its manifest
    assert latest_local_checkpoint(run).name == "checkpoint_epoch000001"
    older = run / "checkpoint_epoch000001" / STATE_FILE
    older.write_bytes(older.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ReprflowError, match="failed its integrity check"):
        latest_local_checkpoint(run)


def test_a_full_disk_while_checkpointing_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    folder = tmp_path / "ck"
    path = _save(folder, 1)
    before = path.read_bytes()
    (folder / "state.tmp").symlink_to("/dev/full")  # the kernel answers ENOSPC to every write there
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ReprflowError, match=rf"cannot write checkpoint {re.escape(str(path))}: No space left on device"):
        save_state(path, model, _Optim(model), 2, 20, [], {})
    assert path.read_bytes() == before and load_state(path)["epoch"] == 1


def test_checkpoint_folder_checked_up_front(tmp_path):
    check_checkpoint_storage(tmp_path / "ok")
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(ReprflowError, match=rf"checkpoint folder {re.escape(str(blocked / 'ray_results'))} is not writable"):
        check_checkpoint_storage(blocked / "ray_results")
    import shutil

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ReprflowError, match=rf"checkpoint folder {re.escape(str(tmp_path / 'ok'))} has \d+ MiB free; training needs about"):
        check_checkpoint_storage(tmp_path / "ok", need_bytes=free + 2**40)


def test_an_upstream_model_with_a_tampered_state_is_refused(tmp_path):
    """What a later step (BEiT's tokenizer, BEiT v2's teacher, VisualBERT's encoder) loads goes
    through the same manifest check as a resume."""
    from components.methods.base import Upstream
    from components.methods.registry import build_method

    settings = {"image_size": 16, "backbone": {"name": "resnet18", "stem": "small"}, "proj_hidden_dim": 32, "proj_dim": 16}
    method = build_method("simclr", settings)
    src = tmp_path / "src.pt"
    torch.save({"method": method.state_dict()}, src)
    path = tmp_path / "train" / STATE_FILE
    path.parent.mkdir()
    write_state_file(src, path)
    up = Upstream(kind="method", name="simclr", settings=settings, state_path=str(path))
    loaded = up.load_method()
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in loaded.state_dict().items())
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ReprflowError, match="failed its integrity check"):
        up.load_method()


def test_every_state_load_goes_through_the_checked_loader():
    """One place reads training states (components/checkpoint.py): no step can skip the manifest."""
    callers = [str(p.relative_to(ROOT)) for p in sorted([*ROOT.glob("components/**/*.py"), *ROOT.glob("pipelines/**/*.py")])
               if re.search(r"(?<!`)torch\.load\(", p.read_text())]
    assert callers == ["components/checkpoint.py"], callers


def test_no_unsafe_deserialisation_anywhere_in_the_code():
    """Every torch.load passes weights_only=True; no pickle, no yaml.load, no eval/exec, no remote code."""
    offenders = []
    for path in sorted([*ROOT.glob("components/**/*.py"), *ROOT.glob("pipelines/**/*.py")]):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{path.relative_to(ROOT)}: {m.group(0)[:80]}")
        for pattern in (r"\bpickle\.loads?\(", r"\bcloudpickle\.loads?\(", r"\byaml\.load\(", r"\byaml\.unsafe_load", r"(?<![\w.])eval\(",
                        r"(?<![\w.])exec\(", r"trust_remote_code\s*=\s*True", r"\bjoblib\.load\(", r"np\.load\([^)]*allow_pickle=True"):
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders


# --------------------------------------------------------------------------- credentials


SECRETS = {"aws": "AKIAEXAMPLEKEY", "aws_secret": "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRET", "basic": "hunter2pass",
           "token": "tok_live_0123456789", "env": "sk-env-secret-value-42"}


def test_redact_survives_other_threads_changing_the_environment():
    """MLflow's telemetry thread sets and unsets variables while runs are logged (seen: KeyError
    '_MLFLOW_TELEMETRY_SESSION_ID' out of a pipeline's start)."""
    import threading

    stop = threading.Event()

    def churn():
        while not stop.is_set():
            os.environ["_REPRFLOW_TEST_CHURN"] = "x"
            os.environ.pop("_REPRFLOW_TEST_CHURN", None)

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(3000):
            redact("a value")
    finally:
        stop.set()
        t.join()


def test_redact_masks_uri_credentials_signed_urls_and_secret_environment(monkeypatch):
    monkeypatch.setenv("REPRFLOW_TEST_API_TOKEN", SECRETS["env"])
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # not a secret: a mode
    text = (f"s3://{SECRETS['aws']}:{SECRETS['aws_secret']}@bucket/photos https://alice:{SECRETS['basic']}@mlflow.internal:5000 "
            f"https://x.test/a.parquet?X-Amz-Signature={SECRETS['token']}&part=1 header {SECRETS['env']} mode disabled")
    out = redact(text)
    for value in SECRETS.values():
        assert value not in out
    assert "s3://***@bucket/photos" in out and "https://***@mlflow.internal:5000" in out and "X-Amz-Signature=***&part=1" in out
    assert "mode disabled" in out and sh.safe_uri("data/photos/train") == "data/photos/train"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module (creating one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_nothing_secret_reaches_the_mlflow_store(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REPRFLOW_TEST_API_TOKEN", SECRETS["env"])
    uri = store
    tracker = Tracker(uri, "sec", tmp_path / "art")
    config = {"datasets": {"photos": {"kind": "shards", "uri": f"s3://{SECRETS['aws']}:{SECRETS['aws_secret']}@bucket/photos"}},
              "mlflow": {"tracking_uri": f"https://alice:{SECRETS['basic']}@mlflow.internal"}, "note": f"?token={SECRETS['token']}"}
    parent = tracker.start_parent(f"run-{SECRETS['env']}", config, {"reprflow.pipeline": "sec", "source": f"https://u:{SECRETS['basic']}@h"})
    tracker.log_text(parent, json.dumps(config) + f" {SECRETS['env']}", "pipeline.yaml")
    child = tracker.start_child("dataset[photos]", {"reprflow.step_kind": "dataset"})
    tracker.log_params(child, {"settings": config})
    tracker.record_failure(child, RuntimeError(f"cannot open s3://{SECRETS['aws']}:{SECRETS['aws_secret']}@bucket/x"))
    tracker.finish(parent)
    client = MlflowClient(uri)
    stored = []
    for run_id in (parent, child):
        run = client.get_run(run_id)
        stored += [json.dumps(run.data.params), json.dumps(run.data.tags), run.info.run_name]
        for a in client.list_artifacts(run_id):
            stored.append(Path(client.download_artifacts(run_id, a.path, str(tmp_path / "dl"))).read_text())
    blob = "\n".join(stored) + capsys.readouterr().out
    for value in SECRETS.values():
        assert value not in blob
    assert "s3://***@bucket/photos" in blob and "error.txt" in {a.path for a in client.list_artifacts(child)}


def test_printed_run_urls_hide_credentials():
    tracker = Tracker.__new__(Tracker)  # only the URL formatting; no server is contacted
    tracker.uri, tracker.experiment_id, tracker.parent_id = f"https://bob:{SECRETS['basic']}@mlflow.internal", "3", "abc"
    assert tracker.run_url() == "https://***@mlflow.internal/#/experiments/3/runs/abc"


# --------------------------------------------------------------------------- ingest paths


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_ingest_refuses_files_outside_its_folder(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "cats").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png())
    (outside / "more.png").write_bytes(_png())
    (src / "cats" / "ok.png").write_bytes(_png())
    (src / "cats" / "alias.png").symlink_to(src / "cats" / "ok.png")  # a link inside the folder is fine
    (src / "cats" / "dotdot.png").symlink_to(Path("..") / ".." / "outside" / "secret.png")  # relative link through '..'
    (src / "dogs").symlink_to(outside, target_is_directory=True)  # a whole class folder elsewhere
    report = ingest_folder(src, str(tmp_path / "out"), 0.0, 0.0)
    refused = {s["file"] for s in report.skipped if "outside the input folder" in s["reason"]}
    assert refused == {"cats/dotdot.png", "dogs/more.png", "dogs/secret.png"}
    ids = {r["id"] for r in sh.read_rows(str(tmp_path / "out" / "train"))}
    assert ids == {"cats/ok.png", "cats/alias.png"}


# --------------------------------------------------------------------------- services and retries


def test_services_default_to_loopback():
    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"
    cmd = server_command("sqlite:///x.db", args.host, args.port, None)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    import pipelines  # noqa: F401 - importing the package pins Ray's local cluster to loopback

    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_bounded_retries_then_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("REPRFLOW_MLFLOW_RETRY_SECONDS", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(ReprflowError) as err:
        Tracker(f"http://carol:{SECRETS['basic']}@127.0.0.1:{port}", "exp", None)
    took = time.monotonic() - t0
    msg = str(err.value)
    attempts = int(re.search(r"failed (\d+) time", msg).group(1))
    assert 1.0 < took <= 3 + 2 and attempts >= 3  # backed off (0.5 s, 1 s, ... jittered) within the 3 s budget, then stopped
    assert f"MLflow at http://***@127.0.0.1:{port} is unreachable" in msg and "rerun the same command" in msg and SECRETS["basic"] not in msg
    assert capsys.readouterr().err.count("retrying for up to 3s") == 1


class _DroppingServer:
    """Accepts a connection, reads the request, closes without answering: a request that may have arrived."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port, self.requests = self.sock.getsockname()[1], 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            self.requests += 1
            conn.close()


def test_a_request_that_may_have_arrived_is_repeated_only_if_harmless(monkeypatch):
    from mlflow.tracking import MlflowClient as Plain

    from pipelines.tracking import RetryingClient

    monkeypatch.setenv("REPRFLOW_MLFLOW_RETRY_SECONDS", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = _DroppingServer()
    client = RetryingClient(Plain(f"http://127.0.0.1:{server.port}"), f"http://127.0.0.1:{server.port}")
    with pytest.raises(ReprflowError, match=r"dropped the request while calling create_run .* not repeated automatically"):
        client.create_run("0")
    assert server.requests == 1
    with pytest.raises(ReprflowError, match=r"is unreachable: calling get_run failed \d+ time"):
        client.get_run("abc")  # reading is harmless to repeat
    assert server.requests >= 3
    server.sock.close()


def test_a_real_answer_is_never_retried(tmp_path):
    from mlflow.exceptions import MlflowException

    calls = []

    def not_found():
        calls.append(1)
        raise MlflowException("Run 'x' not found", error_code="RESOURCE_DOES_NOT_EXIST")

    with pytest.raises(MlflowException, match="not found"):
        with_retries(not_found, "reading a run", "sqlite:///x")
    assert calls == [1]


def test_pipeline_records_of_an_empty_experiment(store, tmp_path):
    uri = store
    tracker = Tracker(uri, "empty", tmp_path / "art")
    assert pipeline_records(MlflowClient(uri), tracker.experiment_id) == {"running": [], "finished_pipeline_runs": 0, "parent": None,
                                                                          "children": {}, "models": {}}


def test_runs_of_a_dead_driver_are_marked_failed_and_a_live_ones_are_not(store, tmp_path):
    storage = tmp_path / "storage"
    alive = Tracker(store, "liveness", None)
    parent = alive.start_parent("alive", {}, {})
    alive.hold_driver_lock(storage, parent)
    child = alive.start_child("train[simclr]", {})
    other = Tracker(store, "liveness", None)
    assert other.mark_stale_runs(storage) == []  # its lock is held: a concurrent run, left alone
    alive.release_driver_lock()  # the process "died": the lock is free, MLflow was never told
    assert sorted(other.mark_stale_runs(storage)) == sorted([parent, child])
    client = MlflowClient(store)
    assert {client.get_run(r).info.status for r in (parent, child)} == {"FAILED"}
    assert "driver process died" in client.get_run(parent).data.tags["reprflow.error"]
    # Without a lock file (another storage folder): judged by host and pid, here a pid that is gone.
    ghost = Tracker(store, "liveness", None)
    gone = ghost.start_parent("ghost", {}, {})
    client.set_tag(gone, "reprflow.driver_pid", "999999999")
    assert other.mark_stale_runs(tmp_path / "elsewhere") == [gone]
