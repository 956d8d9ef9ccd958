"""`reprflow submit` against a real Ray head (`ray start`, token authentication on) and a real
`mlflow server`, both on loopback and both stopped by PID afterwards.

The head is a separate Ray cluster with its own temp dir and ports; this test never calls
ray.init, so it does not clash with the session's in-process Ray.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines import jobs
from pipelines.cli import main
from pipelines.ui import wait_healthy
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def _pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (our head's private temp dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head with token auth, dashboard on 127.0.0.1, and an MLflow server; stopped by PID."""
    tmp = tmp_path_factory.mktemp("submit")
    temp_dir = tempfile.mkdtemp(prefix="rfh-", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    token = secrets.token_hex(24)
    dash, client_port, agent_http, agent_grpc, metrics, rt_agent, mlflow_port = _free_ports(7)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           # The machine is shared with other Ray instances whose memory counts against this node's
           # OOM threshold; let the kernel, not Ray's monitor, decide here.
           "RAY_memory_monitor_refresh_ms": "0"}
    env.pop("RAY_ADDRESS", None)
    ray_cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port=0", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dash}", "--num-cpus=4", f"--temp-dir={temp_dir}", f"--ray-client-server-port={client_port}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={rt_agent}", "--include-dashboard=true"]
    ray_log = open(tmp / "ray-start.log", "w")
    ray_proc = subprocess.Popen(ray_cmd, env=env, stdout=ray_log, stderr=subprocess.STDOUT, start_new_session=True)
    mlflow_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    mlflow_log = open(tmp / "mlflow.log", "w")
    mlflow_proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts"),
         "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
        env=mlflow_env, stdout=mlflow_log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_healthy(f"http://127.0.0.1:{mlflow_port}", 180, mlflow_proc)
        deadline = time.monotonic() + 180
        while True:  # the Jobs API answers once the dashboard is up
            assert ray_proc.poll() is None, (tmp / "ray-start.log").read_text()[-3000:]
            try:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setenv("RAY_AUTH_TOKEN", token)
                    jobs.list_jobs(address)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        yield {"address": address, "token": token, "mlflow": f"http://127.0.0.1:{mlflow_port}", "tmp": tmp, "temp_dir": temp_dir}
    finally:
        _kill_group(ray_proc, 15)   # `ray start --block` stops the head's processes when terminated (else SIGKILL)
        _kill_group(mlflow_proc)
        for pid in _pids_mentioning(temp_dir):  # anything of this head still alive (a job driver)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ray_log.close()
        mlflow_log.close()


def test_token_is_required_and_a_wrong_one_is_refused(head, monkeypatch, tmp_path):
    # A fresh process with a clean environment and HOME (no ~/.ray/auth_token): what a user's shell
    # sees. (In this pytest process the session's ray.init has switched Ray's client to token mode.)
    script = (
        "import os, sys\n"
        "from pipelines.cli import main\n"
        f"r1 = main(['jobs', '--address', '{head['address']}'])\n"
        "os.environ['RAY_AUTH_TOKEN'] = 'not-the-token'\n"
        f"r2 = main(['jobs', '--address', '{head['address']}'])\n"
        "print('EXIT', r1, r2)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "EXIT 2 2" in out.stdout, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("reprflow: error:")]
    assert len(errors) == 2
    assert "requires a token and none was sent" in errors[0] and "RAY_AUTH_TOKEN" in errors[0]
    assert "refused the token" in errors[1] and "ray get-auth-token" in errors[1]
    monkeypatch.setenv("RAY_AUTH_TOKEN", head["token"])
    assert main(["jobs", "--address", head["address"]]) == 0


def test_submit_runs_the_pipeline_as_a_ray_job_recorded_on_the_mlflow_server(head, monkeypatch, capsys):
    storage = head["tmp"] / "store"
    cfg = tiny_config(storage, name="sub", num_workers=1, epochs=1)
    cfg["datasets"]["scenes"].update(train=128, val=64, test=64)
    path = head["tmp"] / "sub.yaml"  # outside the project: submit stages a copy into the upload
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("RAY_AUTH_TOKEN", head["token"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", head["mlflow"])  # passed through to the job
    assert main(["submit", "--address", head["address"], str(path)]) == 0
    sid = capsys.readouterr().out.strip().splitlines()[-1]
    assert sid.startswith("reprflow-run-sub-")
    assert not list((ROOT / jobs.STAGE_DIR).glob("*.yaml")) if (ROOT / jobs.STAGE_DIR).exists() else True  # staged copy removed
    status = jobs.wait(head["address"], sid, 1500)
    log = jobs.client(head["address"]).get_job_logs(sid)
    assert status == "SUCCEEDED", log[-4000:]
    assert "[reprflow] pipeline 'sub'" in log and "[register] sub-simclr v1: promoted to @champion" in log
    info = next(j for j in jobs.list_jobs(head["address"]) if j["id"] == sid)
    assert info["entrypoint"].startswith("python -m pipelines.cli run .reprflow-submit/sub-") and info["status"] == "SUCCEEDED"
    assert main(["logs", sid, "--address", head["address"]]) == 0
    assert "[step] train[simclr] done" in capsys.readouterr().out
    client = MlflowClient(head["mlflow"])
    exp = client.get_experiment_by_name("sub")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("reprflow.kind") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert client.get_model_version_by_alias("sub-simclr", "champion").version == "1"
    assert (storage / "steps").is_dir() and not (storage / "mlflow.db").exists()  # records went to the server
    assert any((head["tmp"] / "artifacts").rglob("model.safetensors"))  # artifacts proxied by the server


def test_stop_a_submitted_job(head, monkeypatch, capsys):
    cfg = tiny_config(head["tmp"] / "store2", name="sub-stop", num_workers=1, epochs=50)
    path = head["tmp"] / "stop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("RAY_AUTH_TOKEN", head["token"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", head["mlflow"])
    assert main(["submit", "--address", head["address"], str(path), "--id", "reprflow-stop-test"]) == 0
    assert main(["stop", "reprflow-stop-test", "--address", head["address"]]) == 0
    assert "stop requested" in capsys.readouterr().out
    assert jobs.wait(head["address"], "reprflow-stop-test", 120) == "STOPPED"
    assert main(["logs", "no-such-job", "--address", head["address"]]) == 2
