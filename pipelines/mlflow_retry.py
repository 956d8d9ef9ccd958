"""Talking to an MLflow server that may be briefly unreachable, without leaking secrets.

Retries: every client call is retried with exponential backoff while the tracking server is
unreachable, for at most ``$REPRFLOW_MLFLOW_RETRY_SECONDS`` (default 120), then fails with one
clear error naming the server. A call the server may already have carried out (a timeout, a
dropped connection) is retried only if repeating it is harmless; creating a run, model or
version is retried only while connections are refused outright (the request never left).

Redaction: :func:`redact` removes credentials inside URIs and the values of secret-looking
environment variables (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ...) from any text.
"""

from __future__ import annotations

import os
import random
import sys
import re
import time
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from components.data.shards import safe_uri
from components.errors import ReprflowError

RETRY_SECONDS_ENV = "REPRFLOW_MLFLOW_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0

# ------------------------------------------------------------------ redaction

_SECRET_NAME = re.compile(r"(?i)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH)")
_NOT_SECRET_NAME = re.compile(r"(?i)(_MODE|_PATH|_FILE|_DIR|_ENABLED|_TYPE|_ID)$")


def _environ() -> dict[str, str]:
    """A snapshot of the environment. Other threads (MLflow's telemetry, Ray) set and unset
    variables while we read: iterating ``os.environ`` then raises KeyError or RuntimeError."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)  # never redact against an empty snapshot: let the error out


def _secret_values() -> list[str]:
    values = {v for k, v in _environ().items() if _SECRET_NAME.search(k) and not _NOT_SECRET_NAME.search(k) and len(v) >= 8}
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
