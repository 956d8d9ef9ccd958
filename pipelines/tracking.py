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
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from components.data.shards import safe_uri
from components.errors import ReprflowError

MAX_PARAM_LEN = 6000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
UI_DEFAULT = "http://127.0.0.1:5000"
RETRY_SECONDS_ENV = "REPRFLOW_MLFLOW_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
TAG_DRIVER_HOST, TAG_DRIVER_PID = "reprflow.driver_host", "reprflow.driver_pid"

# ------------------------------------------------------------------ redaction

_SECRET_NAME = re.compile(r"(?i)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH)")
_NOT_SECRET_NAME = re.compile(r"(?i)(_MODE|_PATH|_FILE|_DIR|_ENABLED|_TYPE|_ID)$")


def _secret_values() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and not _NOT_SECRET_NAME.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def redact(text: Any) -> str:
    """``text`` (made a string) with URI credentials and secret environment values replaced by ``***``."""
    out = safe_uri(str(text))
    for value in _secret_values():
        if value in out:
            out = out.replace(value, "***")
    return out


# ------------------------------------------------------------------ retries

_NEVER_SENT = ("connection refused", "failed to establish a new connection", "newconnectionerror", "name or service not known",
               "temporary failure in name resolution", "nodename nor servname", "no route to host", "network is unreachable")
_MAYBE_SENT = ("connection aborted", "connection reset", "remotedisconnected", "read timed out", "readtimeout", "timed out",
               "broken pipe", "too many 502", "too many 503", "too many 504", "too many 429", "temporarily_unavailable",
               "error code 502", "error code 503", "error code 504", "error code 429", "database is locked", "bad gateway",
               "service unavailable", "gateway timeout", "max retries exceeded")
# Calls that are not harmless to repeat if the first attempt may have reached the server.
NOT_IDEMPOTENT = frozenset({"create_run", "create_experiment", "create_registered_model", "create_model_version", "create_logged_model"})


def _chain_text(exc: BaseException) -> str:
    parts, seen, cur = [], set(), exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return " | ".join(parts).lower()


def transient_kind(exc: BaseException) -> str | None:
    """``"never_sent"`` (connection refused: safe to repeat anything), ``"maybe_sent"`` (timeout,
    dropped connection, 5xx: repeat only idempotent calls), or None (a real answer: do not retry)."""
    if isinstance(exc, ConnectionRefusedError):
        return "never_sent"
    text = _chain_text(exc)
    if any(m in text for m in _NEVER_SENT):
        return "never_sent"
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(m in text for m in _MAYBE_SENT):
        return "maybe_sent"
    return None


def retry_seconds() -> float:
    """The retry budget per call (``$REPRFLOW_MLFLOW_RETRY_SECONDS``, default 120)."""
    try:
        return max(0.0, float(os.environ.get(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS)))
    except ValueError:
        raise ReprflowError(f"{RETRY_SECONDS_ENV}={os.environ[RETRY_SECONDS_ENV]!r}: expected a number of seconds") from None


def with_retries(call: Callable[[], Any], what: str, uri: str, idempotent: bool = True, budget: float | None = None) -> Any:
    """Run ``call()``; while the tracking server is unreachable, retry with exponential backoff
    (0.5 s doubling to 15 s, jittered) for at most ``budget`` seconds, then raise a
    :class:`ReprflowError` naming the server and what was being done."""
    budget = retry_seconds() if budget is None else budget
    start = time.monotonic()
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            return call()
        except ReprflowError:
            raise  # already the clear error of an inner retry loop
        except Exception as exc:  # noqa: BLE001 - classified below; real answers are re-raised untouched
            kind = transient_kind(exc)
            if kind is None or (kind == "maybe_sent" and not idempotent):
                if kind is not None:
                    raise ReprflowError(f"MLflow at {redact(uri)} dropped the request while {what} ({_first_line(exc)}); it may or may not "
                                        "have been carried out, so it is not repeated automatically. Rerun the same command: finished steps "
                                        "are cached.") from None
                raise
            elapsed = time.monotonic() - start
            if elapsed + delay > budget:
                raise ReprflowError(f"MLflow at {redact(uri)} is unreachable: {what} failed {attempt} time(s) over {elapsed:.0f}s "
                                    f"({_first_line(exc)}). Start the tracking server or fix MLFLOW_TRACKING_URI / mlflow.tracking_uri "
                                    f"(retry budget: {RETRY_SECONDS_ENV}={budget:g}), then rerun the same command: finished steps "
                                    "are cached and not redone.") from None
            if attempt == 1:
                print(f"[mlflow] {redact(uri)} unreachable while {what} ({_first_line(exc)}); retrying for up to {budget:.0f}s", file=sys.stderr, flush=True)
            time.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, 15.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__)


class RetryingClient:
    """An :class:`MlflowClient` whose every method goes through :func:`with_retries`."""

    def __init__(self, client: MlflowClient, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        if name in ("_client", "_uri"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kwargs):
            return with_retries(lambda: attr(*args, **kwargs), f"calling {name}", self._uri, idempotent=name not in NOT_IDEMPOTENT)

        call.__name__ = name
        return call

    @property
    def unwrapped(self) -> MlflowClient:
        """The plain client (no retries)."""
        return self._client


def _bound_mlflow_http_retries(uri: str) -> None:
    """MLflow's own HTTP layer retries up to ~4 minutes per request by default; reprflow's
    retries (bounded, with a clear error) replace them unless the user configured MLflow's."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


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
