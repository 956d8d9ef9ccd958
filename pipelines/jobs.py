"""Submitting pipelines to a Ray cluster as Ray Jobs (``reprflow submit/jobs/logs/stop``).

``reprflow submit --address http://HEAD:8265 pipelines/x.yaml`` is ``ray job submit
--working-dir . -- python -m pipelines.cli run pipelines/x.yaml`` (``reprflow run`` from the
uploaded code) with the checks and defaults a pipeline needs:
the file is validated here first, the project folder travels as the job's ``working_dir``
(``.gitignore`` + ``.rayignore`` keep the venv, caches and data out), and the settings that
say where results go (``MLFLOW_TRACKING_URI``, ``REPRFLOW_STORAGE``) are passed through as the
job's environment when set here.

Token authentication (Ray >= 2.52 starts clusters with it): the token is read like Ray's own
CLI does - ``$RAY_AUTH_TOKEN``, else the file at ``$RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` - and sent as ``Authorization: Bearer``; ``$RAY_JOB_HEADERS`` (JSON)
adds or overrides headers (e.g. for a proxy).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import time
from pathlib import Path

from components.errors import ReprflowError

ROOT = Path(__file__).resolve().parent.parent
PASS_THROUGH_ENV = ("MLFLOW_TRACKING_URI", "REPRFLOW_STORAGE", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_EXPERIMENT_NAME")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STAGE_DIR = ".reprflow-submit"
TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (on the head node: 'ray get-auth-token'), or RAY_AUTH_TOKEN_PATH to a file "
              "holding it; on KubeRay it is in the Secret named by the RayCluster's authOptions")


def auth_token() -> str | None:
    """The Ray auth token from ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ReprflowError(f"RAY_AUTH_TOKEN_PATH={path}: file not found")
        return p.read_text().strip() or None
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() if default.is_file() else None


def request_headers() -> dict[str, str]:
    """Headers for the Jobs API: the bearer token (if any) plus ``$RAY_JOB_HEADERS``."""
    headers = {}
    token = auth_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    extra = os.environ.get("RAY_JOB_HEADERS")
    if extra:
        try:
            headers.update(json.loads(extra))
        except json.JSONDecodeError:
            raise ReprflowError(f"RAY_JOB_HEADERS is not JSON: {extra[:80]}") from None
    return headers


def dashboard_address(address: str | None) -> str:
    """``--address`` or ``$RAY_ADDRESS`` as the dashboard's http(s) URL."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        shown = f" (got {address!r})" if address else ""
        raise ReprflowError(f"pass --address http://HEAD:8265 (the Ray dashboard / Jobs API of the cluster){shown}")
    return address.rstrip("/")


def client(address: str | None):
    """A ``JobSubmissionClient`` with auth headers; user-actionable errors for refused/unreachable."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url, headers=request_headers())
    except Exception as exc:  # noqa: BLE001 - ConnectionError, AuthenticationError, RuntimeError
        raise _user_error(url, exc) from None


def _user_error(url: str, exc: BaseException) -> ReprflowError:
    text = str(exc)
    if "Authentication required" in text or "401" in text[:200]:
        return ReprflowError(f"the Ray cluster at {url} requires a token and none was sent: {TOKEN_HELP}")
    if "Authentication failed" in text or "403" in text[:200]:
        return ReprflowError(f"the Ray cluster at {url} refused the token: {TOKEN_HELP}")
    if isinstance(exc, ConnectionError) or "Failed to connect" in text:
        return ReprflowError(f"cannot reach the Ray Jobs API at {url} ({text.splitlines()[0] if text else type(exc).__name__}); "
                             "is the head running and its dashboard port (8265) reachable?")
    return ReprflowError(f"Ray Jobs API at {url}: {text.splitlines()[0] if text else type(exc).__name__}")


def _call(url: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ReprflowError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _user_error(url, exc) from None


def _stage_pipeline(pipeline: Path, working_dir: Path) -> tuple[str, Path | None]:
    """The pipeline path relative to the working dir; a file outside it is copied in for the upload."""
    pipeline = pipeline.resolve()
    try:
        return pipeline.relative_to(working_dir).as_posix(), None
    except ValueError:
        pass
    stage = working_dir / STAGE_DIR
    stage.mkdir(exist_ok=True)
    staged = stage / f"{pipeline.stem}-{secrets.token_hex(4)}.yaml"
    shutil.copyfile(pipeline, staged)
    return staged.relative_to(working_dir).as_posix(), staged


def entrypoint(command: str, pipeline_rel: str, overrides: list[str]) -> str:
    """The job's shell command: ``python -m pipelines.cli <command> <pipeline> [--set K=V ...]``.

    That is ``reprflow <command>`` run from the uploaded working dir, so it needs reprflow's
    dependencies on the cluster but not the package itself installed (nor on PATH).
    """
    parts = ["python", "-m", "pipelines.cli", command, pipeline_rel]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def submit(address: str | None, pipeline: str, overrides: list[str], command: str = "run", working_dir: str | None = None,
           env: list[str] | None = None, submission_id: str | None = None, entrypoint_num_gpus: float = 0) -> str:
    """Submit ``reprflow <command> PIPELINE`` as a Ray Job; returns the submission id."""
    from pipelines.config import load_config

    cfg = load_config(pipeline, overrides)  # a bad file fails here, not minutes later on the cluster
    wd = Path(working_dir or ROOT).resolve()
    if not (wd / "pipelines" / "cli.py").is_file():
        raise ReprflowError(f"--working-dir {wd}: not a reprflow project folder (no pipelines/cli.py)")
    env_vars = {k: os.environ[k] for k in PASS_THROUGH_ENV if os.environ.get(k)}
    for item in env or []:
        if "=" not in item:
            raise ReprflowError(f"--env {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        env_vars[k] = v
    _warn_local_only(cfg, env_vars)
    rel, staged = _stage_pipeline(Path(pipeline), wd)
    sid = submission_id or f"reprflow-{command}-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    url = dashboard_address(address)
    jobs = client(address)
    try:
        _call(url, jobs.submit_job, entrypoint=entrypoint(command, rel, overrides), submission_id=sid,
              runtime_env={"working_dir": str(wd), "env_vars": env_vars},
              metadata={"reprflow.pipeline": cfg.name, "reprflow.command": command, "reprflow.file": rel},
              entrypoint_num_gpus=entrypoint_num_gpus or None)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)  # uploaded with the package; no need to keep it here
            try:
                staged.parent.rmdir()
            except OSError:
                pass  # another submission is staging a file right now
    return sid


def _warn_local_only(cfg, env_vars: dict) -> None:
    storage = env_vars.get("REPRFLOW_STORAGE") or cfg.storage
    if not Path(storage).expanduser().is_absolute():
        print(f"reprflow: warning: storage '{storage}' is relative: on the cluster it lands in the job's temporary working dir and is lost "
              "with it; set 'storage:' to a shared mount (e.g. /mnt/reprflow) or REPRFLOW_STORAGE", file=sys.stderr)
    if not (env_vars.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri):
        print("reprflow: warning: no MLFLOW_TRACKING_URI: the job records to SQLite inside the storage folder; "
              "point it at an MLflow server (export MLFLOW_TRACKING_URI=http://mlflow:5000) to browse runs centrally", file=sys.stderr)


def list_jobs(address: str | None) -> list[dict]:
    """Jobs on the cluster, newest first: id, status, entrypoint, start time."""
    url = dashboard_address(address)
    jobs = _call(url, client(address).list_jobs)
    rows = [{"id": j.submission_id or j.job_id, "status": str(j.status.value if hasattr(j.status, "value") else j.status), "entrypoint": j.entrypoint,
             "start": j.start_time, "message": (j.message or "")[:120]} for j in jobs]
    return sorted(rows, key=lambda r: r["start"] or 0, reverse=True)


def status(address: str | None, job_id: str) -> str:
    """A job's status name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    url = dashboard_address(address)
    st = _call(url, client(address).get_job_status, job_id)
    return str(st.value if hasattr(st, "value") else st)


def logs(address: str | None, job_id: str, follow: bool = False, out=None) -> str:
    """Print a job's logs (``follow``: stream them until the job ends); returns its final status."""
    out = out or sys.stdout
    url = dashboard_address(address)
    jobs = client(address)
    if not follow:
        out.write(_call(url, jobs.get_job_logs, job_id))
        out.flush()
        return status(address, job_id)
    _call(url, jobs.get_job_status, job_id)  # a clear error for an unknown id before streaming

    async def _tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except Exception as exc:  # noqa: BLE001
        raise _user_error(url, exc) from None
    for _ in range(60):  # the log stream ends a moment before the status is final
        st = status(address, job_id)
        if st in TERMINAL:
            return st
        time.sleep(1)
    return st


def stop(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop a job; True if it was running."""
    url = dashboard_address(address)
    return bool(_call(url, client(address).stop_job, job_id))


def wait(address: str | None, job_id: str, timeout: float) -> str:
    """Poll until the job is finished (or ``timeout``); returns its status."""
    deadline = time.monotonic() + timeout
    st = status(address, job_id)
    while st not in TERMINAL and time.monotonic() < deadline:
        time.sleep(2)
        st = status(address, job_id)
    return st


def valid_submission_id(text: str) -> str:
    """argparse type: Ray submission ids are plain names."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", text):
        raise ValueError(text)
    return text
