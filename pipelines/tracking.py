"""MLflow records: one parent run per pipeline run, one child run per step.

All writes go through an explicit :class:`mlflow.MlflowClient` from the driver's main thread
(steps run in threads; MLflow's fluent API keeps per-thread state), except model logging,
which the register step does inside its own child run.

Reliability: every client call is retried with exponential backoff while the tracking server is
unreachable, for at most ``$REPRFLOW_MLFLOW_RETRY_SECONDS`` (default 120), then fails with one
clear error naming the server (finished steps are cached, so rerunning the same command
continues). A call the server may already have carried out (a timeout, a dropped connection)
is retried only if repeating it is harmless; creating a run, model or version is retried only
while connections are refused outright (the request never left). Each pipeline run holds a lock
file while its driver lives; the next run marks runs whose driver died (left RUNNING) as FAILED.

Security: everything written to MLflow (params, tags, texts, run names) and every URL printed
goes through :func:`redact`: credentials inside URIs and the values of secret-looking
environment variables (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ...) never reach the store.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient


MAX_PARAM_LEN = 6000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
UI_DEFAULT = "http://127.0.0.1:5000"
TAG_DRIVER_HOST, TAG_DRIVER_PID = "reprflow.driver_host", "reprflow.driver_pid"

# Retries and redaction live in pipelines/mlflow_retry.py; re-exported for existing importers.
from pipelines.mlflow_retry import (  # noqa: E402,F401
    DEFAULT_RETRY_SECONDS,
    RETRY_SECONDS_ENV,
    RetryingClient,
    _bound_mlflow_http_retries,
    _first_line,
    redact,
    retry_seconds,
    transient_kind,
    with_retries,
)


def runs_table_url(base: str, experiment_id: str) -> str:
    """The MLflow UI URL of an experiment's runs table (not MLflow 3's GenAI overview page)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&compareRunsMode=TABLE"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> ``{"a.b.0": value}``."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)) and d and all(isinstance(x, (dict, list, tuple)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


def code_version() -> str:
    """The git commit of the working tree (with ``-dirty``), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def set_tracking_uri_keeping_env(tracking_uri: str) -> None:
    """Point MLflow's fluent API at ``tracking_uri`` without leaking it into ``os.environ``.

    MLflow 3's ``set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; a later pipeline in the
    same process (retrain after run, tests) would then silently record into the first store,
    because the environment variable wins over the pipeline file.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


class Tracker:
    """Creates the experiment, the parent run and child runs; logs results of steps."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None):
        _bound_mlflow_http_retries(tracking_uri)
        set_tracking_uri_keeping_env(tracking_uri)
        self.uri = tracking_uri
        self.client = RetryingClient(MlflowClient(tracking_uri), tracking_uri)
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._parent_ended = False
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if artifact_root is not None and tracking_uri.startswith("sqlite:"):
                artifact_root.mkdir(parents=True, exist_ok=True)
                location = artifact_root.resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            # MLflow 3 opens untagged experiments on its GenAI overview; this marks ours as model training.
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        self.experiment = experiment
        self.parent_id: str | None = None
        self.child_ids: dict[str, str] = {}

    def start_parent(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        tags = {"reprflow.kind": "pipeline", TAG_DRIVER_HOST: socket.gethostname(), TAG_DRIVER_PID: str(os.getpid()), **tags}
        run = self.client.create_run(self.experiment_id, run_name=redact(name), tags={k: redact(v) for k, v in tags.items()})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_child(self, step_name: str, tags: dict[str, str]) -> str:
        tags = {"mlflow.parentRunId": self.parent_id or "", "reprflow.kind": "step", "reprflow.step": step_name, **tags}
        run = self.client.create_run(self.experiment_id, run_name=redact(step_name), tags={k: redact(v) for k, v in tags.items()})
        self.child_ids[step_name] = run.info.run_id
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        flat = flatten(params)
        items = [Param(redact(k)[:250], redact(v)[:MAX_PARAM_LEN]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_history(self, run_id: str, history: list[dict[str, float]], step_key: str = "epoch") -> None:
        ts = int(time.time() * 1000)
        items = []
        for row in history:
            s = int(row.get(step_key, 0))
            items += [Metric(k, float(v), ts, s) for k, v in row.items() if k != step_key and isinstance(v, (int, float)) and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, redact(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, redact(text), name)

    def log_json(self, run_id: str, data: Any, name: str) -> None:
        self.client.log_text(run_id, redact(json.dumps(data, indent=2, default=str)), name)

    def finish(self, run_id: str, status: str = "FINISHED", best_effort: bool = False) -> None:
        """End a run. ``best_effort`` (recording a failure): one short try, and no error if the
        server is gone - the next run marks a run left RUNNING by a dead driver as FAILED."""
        if not best_effort:
            self.client.set_terminated(run_id, status=status)
        else:
            try:
                with_retries(lambda: self.client.unwrapped.set_terminated(run_id, status=status), "ending a run", self.uri, budget=min(5.0, retry_seconds()))
            except Exception as exc:  # noqa: BLE001
                print(f"[mlflow] could not mark run {run_id} {status} ({_first_line(exc)}); the next run will", file=sys.stderr, flush=True)
                return
        if run_id == self.parent_id:
            self._parent_ended = True

    def record_failure(self, run_id: str, error: BaseException | None, status: str = "FAILED") -> None:
        """Tag a step run with its error, attach the traceback and end it FAILED - best effort
        (a few seconds at most), since MLflow itself may be what failed. ``error=None``: the step
        finished after another one failed (``KILLED``; its result is cached for the rerun)."""
        import traceback

        def record():
            plain = self.client.unwrapped
            if error is None:
                plain.log_batch(run_id, tags=[RunTag("reprflow.error", "finished after another step failed; its result is cached and "
                                                                       "recorded by the rerun")])
                return
            plain.log_batch(run_id, tags=[RunTag("reprflow.error", redact(repr(error))[:4000])])
            plain.log_text(run_id, redact("".join(traceback.format_exception(error))), "error.txt")

        try:
            with_retries(record, "recording a failed step", self.uri, budget=min(5.0, retry_seconds()))
        except Exception as exc:  # noqa: BLE001
            print(f"[mlflow] could not record the failure in run {run_id} ({_first_line(exc)})", file=sys.stderr, flush=True)
        self.finish(run_id, status, best_effort=True)

    def run_url(self, run_id: str | None = None) -> str:
        """Where a person finds the run in the MLflow UI (started with ``reprflow ui``)."""
        base = redact(self.uri) if self.uri.startswith("http") else UI_DEFAULT
        rid = run_id or self.parent_id
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{rid}"

    # -------------------------------------------------------------- driver liveness

    @contextmanager
    def driver_run(self, storage: Path, name: str, params: dict, tags: dict[str, str]) -> Iterator[str]:
        """The parent run of one ``reprflow run``/``retrain`` driver: runs that dead drivers left
        RUNNING are marked FAILED first; this driver's lock is held while the body runs; an
        exception (Ctrl-C included) ends the run FAILED. The body calls :meth:`finish` on success."""
        self.mark_stale_runs(storage)
        parent = self.start_parent(name, params, tags)
        self.hold_driver_lock(storage, parent)
        try:
            yield parent
        except BaseException:
            self.finish(parent, "FAILED", best_effort=True)
            raise
        finally:
            self.release_driver_lock()

    def hold_driver_lock(self, storage: Path, run_id: str) -> None:
        """Hold ``<storage>/locks/driver-<run_id>.lock`` (``flock``) while this driver lives; the
        kernel releases it when the process dies, however it dies."""
        path = storage / "locks" / f"driver-{run_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        self._lock_fd, self._lock_path = fd, path

    def release_driver_lock(self) -> None:
        """Drop the driver lock. Its file goes too once the run's end is recorded; if MLflow could
        not be told (the run is still RUNNING there), the file stays, unlocked, so the next run
        can tell this run's driver is gone and mark it FAILED."""
        if self._lock_fd is not None:
            if self._lock_path is not None and self._parent_ended:
                self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = self._lock_path = None

    def mark_stale_runs(self, storage: Path) -> list[str]:
        """Mark FAILED the pipeline runs of this experiment left RUNNING by a driver that died
        (and their step runs); returns their ids. A run counts as dead when its driver lock in
        ``storage`` is free, or, without a lock file, when its driver was on this host and its pid
        is gone. A run that cannot be judged (another host, another storage) is left alone."""
        running = self._search("attributes.status = 'RUNNING'")
        parents = [r for r in running if r.data.tags.get("reprflow.kind") in ("pipeline", "retrain") and r.info.run_id != self.parent_id]
        dead = {r.info.run_id for r in parents if not _driver_alive(storage, r)}
        live = {r.info.run_id for r in parents} - dead
        # A step run whose pipeline run has ended (or is gone) cannot still be running either.
        orphans = {r.info.run_id for r in running if r.data.tags.get("reprflow.kind") == "step"
                   and r.data.tags.get("mlflow.parentRunId") not in live and r.data.tags.get("mlflow.parentRunId") != self.parent_id}
        stale = [r.info.run_id for r in running if r.info.run_id in dead or r.info.run_id in orphans or r.data.tags.get("mlflow.parentRunId") in dead]
        for rid in stale:
            self.set_tags(rid, {"reprflow.error": "its driver process died (found RUNNING by a later run); marked FAILED"})
            self.client.set_terminated(rid, status="FAILED")
        if stale:
            print(f"[mlflow] marked {len(stale)} run(s) left RUNNING by a dead driver as FAILED", flush=True)
        return stale

    def _search(self, filter_string: str) -> list:
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, max_results=1000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out


def _driver_alive(storage: Path, run) -> bool:
    lock = storage / "locks" / f"driver-{run.info.run_id}.lock"
    if lock.exists():
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return False  # released (and removed) just now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)
        lock.unlink(missing_ok=True)
        return False
    tags = run.data.tags
    if tags.get(TAG_DRIVER_HOST) != socket.gethostname() or not tags.get(TAG_DRIVER_PID, "").isdigit():
        return True  # cannot judge from here: leave it alone
    try:
        os.kill(int(tags[TAG_DRIVER_PID]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # The pid exists; if it is younger than the run, the number was reused by another process.
    try:
        started = Path(f"/proc/{tags[TAG_DRIVER_PID]}").stat().st_mtime
        return started <= run.info.start_time / 1000 + 5
    except OSError:
        return True


def pipeline_records(client, experiment_id: str) -> dict[str, Any]:
    """What MLflow holds for the latest finished pipeline run of an experiment, as comparable keys.

    ``{"running": [...], "parent": {...}, "children": {step: {...}}, "models": {...}}``: run
    statuses, metric/param keys, artifact paths, per-epoch metric steps of train steps, and the
    registered versions made by this experiment's runs (model names without the pipeline prefix).
    Two runs of the same pipeline file leave equal records; values (scores, times) are not compared.
    """
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    parents = [r for r in runs if r.data.tags.get("reprflow.kind") == "pipeline"]
    finished = sorted((p for p in parents if p.info.status == "FINISHED"), key=lambda r: r.info.start_time)
    out: dict[str, Any] = {"running": sorted(r.data.tags.get("mlflow.runName", r.info.run_id) for r in runs if r.info.status == "RUNNING"),
                           "finished_pipeline_runs": len(finished), "parent": None, "children": {}, "models": {}}
    if not finished:
        return out
    parent = finished[-1]

    def shape(r) -> dict[str, Any]:
        return {"status": r.info.status, "metrics": sorted(r.data.metrics), "params": sorted(r.data.params),
                "artifacts": sorted(a.path for a in client.list_artifacts(r.info.run_id))}

    out["parent"] = shape(parent)
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id:
            rec = shape(r)
            if r.data.tags.get("reprflow.step_kind") == "train":
                rec["history"] = {k: sorted(m.step for m in client.get_metric_history(r.info.run_id, k)) for k in sorted(r.data.metrics)}
            out["children"][r.data.tags.get("mlflow.runName")] = rec
    prefix = parent.data.tags.get("reprflow.pipeline", "") + "-"
    ids = {r.info.run_id for r in runs}
    for mv in client.search_model_versions(max_results=10000):
        if mv.run_id in ids:
            key = mv.name[len(prefix):] if mv.name.startswith(prefix) else mv.name
            m = out["models"].setdefault(key, {"versions": 0, "pending": 0, "aliases": sorted(dict(client.get_registered_model(mv.name).aliases or {}))})
            m["versions"] += 1
            m["pending"] += int((mv.tags or {}).get("reprflow.registration") == "pending")
    return out
