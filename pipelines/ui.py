"""``reprflow ui``: the MLflow UI on the project's store, bound to loopback, opened on the runs table.

For a local store (SQLite in the storage folder) it starts ``mlflow server`` on 127.0.0.1 and
prints the URL of each pipeline experiment's runs table (MLflow 3 would otherwise open an
experiment on its GenAI overview); for an MLflow server (``MLFLOW_TRACKING_URI=http...``) it
only prints the URLs on that server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from components.errors import ReprflowError
from pipelines.tracking import runs_table_url


def tracking_uri(pipeline: str | None = None, uri: str | None = None, overrides: list[str] | None = None) -> str:
    """Which MLflow: ``--tracking-uri``, ``$MLFLOW_TRACKING_URI``, the pipeline file's store, or ``./.reprflow``."""
    if uri:
        return uri
    if pipeline:
        from pipelines.config import load_config

        return load_config(pipeline, overrides).tracking_uri()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    default = Path(".reprflow/mlflow.db").resolve()
    if default.is_file():
        return f"sqlite:///{default}"
    raise ReprflowError("which MLflow store? pass a pipeline file (its storage folder holds the local store), "
                        "--tracking-uri URI, or set MLFLOW_TRACKING_URI")


def experiment_urls(uri: str, base: str, experiment: str | None = None) -> list[tuple[str, str]]:
    """``(experiment name, runs-table URL)`` of reprflow's experiments (or just ``experiment``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ReprflowError(f"no experiment '{experiment}' in {uri}; run the pipeline first")
        return [(exp.name, runs_table_url(base, exp.experiment_id))]
    exps = [e for e in client.search_experiments() if e.name != "Default" or client.search_runs([e.experiment_id], max_results=1)]
    return [(e.name, runs_table_url(base, e.experiment_id)) for e in exps]


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url/health`` until it answers (MLflow 3 takes ~15 s to start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ReprflowError(f"mlflow server exited with code {proc.returncode} (port in use? see its output above)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ReprflowError(f"mlflow server at {url} did not answer /health within {timeout:.0f}s")


def server_command(uri: str, host: str, port: int, artifacts: Path | None) -> list[str]:
    """The ``mlflow server`` command line for a local store."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    return cmd


def serve(uri: str, host: str = "127.0.0.1", port: int = 5000, experiment: str | None = None, block: bool = True) -> subprocess.Popen | None:
    """Start the UI for a local store and print the runs-table URLs; with ``block``, run until Ctrl-C."""
    if uri.startswith(("http://", "https://")):
        for name, url in experiment_urls(uri, uri, experiment):
            print(f"{name}: {url}", flush=True)
        print(f"(the store is the MLflow server at {uri}; nothing to start)", flush=True)
        return None
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"reprflow: warning: binding the MLflow UI to {host}: anyone who can reach this machine can read and change the runs", file=sys.stderr)
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
    # Its own session, so the server's workers can be stopped as a group; Ctrl-C (SIGINT) or
    # SIGTERM to this process stops the server too.
    proc = subprocess.Popen(server_command(uri, host, port, artifacts), start_new_session=True)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if block else None
    try:
        wait_healthy(base, 120, proc)
        print(f"MLflow UI on {uri}: {base}  (Ctrl-C stops it)", flush=True)
        for name, url in experiment_urls(uri, base, experiment):
            print(f"{name}: {url}", flush=True)
        if not block:
            return proc
        proc.wait()
    except BaseException:
        stop_server(proc)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return proc


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started by :func:`serve` (its whole process group: mlflow spawns workers,
    which may outlive the leader - so the group is signalled even when the leader is gone)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # nothing of the group is left
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers still running after the leader's exit
    except ProcessLookupError:
        pass