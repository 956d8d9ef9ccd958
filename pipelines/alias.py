"""Moving the ``@champion`` alias safely: a registry-wide lock, compare-and-set, manual moves.

MLflow has no conditional alias update, but creating a registered model is atomic (the name is
the registry's primary key: of two concurrent creates exactly one succeeds, whatever the backend
behind the tracking server). So the lock for model ``NAME`` is a registered model
``NAME.alias-lock`` that exists only while someone decides about the alias; it carries its
holder (user, host, pid, time) and a random token. Everything that moves an alias - the
pipeline's register step, ``reprflow retrain``, ``reprflow promote``/``rollback`` - does so under
this lock, and a retrain additionally checks that the champion is still the version it started
from (compare-and-set), so of two retrains started at once exactly one can promote.
"""

from __future__ import annotations

import getpass
import json
import os
import random
import socket
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from mlflow.exceptions import MlflowException

from components.errors import ReprflowError

LOCK_SUFFIX = ".alias-lock"
TAG_TOKEN = "reprflow.lock_token"
TAG_OWNER = "reprflow.lock_owner"
TAG_SINCE = "reprflow.lock_since"
TAG_HISTORY = "reprflow.alias_history"
TAG_PREVIOUS = "reprflow.previous_champion"
HISTORY_KEEP = 20


def who() -> str:
    """``user@host`` of this process (recorded with every alias move)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - containers may run as a uid without a name
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@contextmanager
def alias_lock(client, name: str, timeout: float = 600, stale_after: float = 900) -> Iterator[str]:
    """Hold the alias lock of registered model ``name``; yields this holder's token.

    Waits up to ``timeout`` seconds. A lock older than ``stale_after`` seconds (its holder died
    inside the few seconds a decision takes) is broken.
    """
    lock = name + LOCK_SUFFIX
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                lock, tags={TAG_TOKEN: token, TAG_OWNER: f"{who()} pid {os.getpid()}", TAG_SINCE: f"{time.time():.3f}"},
                description=f"reprflow: held while the alias of '{name}' is being decided; deleted right after",
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        holder = _holder(client, lock)
        if holder and time.time() - float(holder.get(TAG_SINCE, "0")) > stale_after:
            print(f"[alias] breaking a stale lock on {name} held by {holder.get(TAG_OWNER)}", flush=True)
            _delete_if_token(client, lock, holder.get(TAG_TOKEN))
            continue
        if time.monotonic() > deadline:
            raise ReprflowError(f"the alias of '{name}' has been locked for {timeout:.0f}s by {holder.get(TAG_OWNER) if holder else '?'}; "
                                f"if that process is gone, delete the registered model '{lock}'")
        time.sleep(0.2 + 0.3 * random.random())
    try:
        yield token
    finally:
        _delete_if_token(client, lock, token)


def _holder(client, lock: str) -> dict | None:
    try:
        return dict(client.get_registered_model(lock).tags or {})
    except MlflowException:
        return None


def _delete_if_token(client, lock: str, token: str | None) -> None:
    holder = _holder(client, lock)
    if holder is not None and holder.get(TAG_TOKEN) == token:
        try:
            client.delete_registered_model(lock)
        except MlflowException:
            pass  # already gone


def current_version(client, name: str, alias: str) -> str | None:
    """The version number holding ``alias`` of ``name``, or None."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def record_move(client, name: str, alias: str, version: str, previous: str | None, action: str, reason: str) -> None:
    """Record an alias move on the version (who/when/previous) and in the model's history tag.

    Called with the lock held, right after the alias moved. A rollback keeps the target's own
    ``previous_champion``, so rolling back twice walks further back instead of ping-ponging.
    """
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    version, previous = str(version), (str(previous) if previous is not None else None)
    tags = {f"reprflow.{action}_by": who(), f"reprflow.{action}_at": when, "reprflow.alias_reason": reason[:4000]}
    if action == "rolled_back":
        tags["reprflow.rolled_back_from"] = previous or "none"
    else:
        tags[TAG_PREVIOUS] = previous or "none"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    model = client.get_registered_model(name)
    try:
        history = json.loads((model.tags or {}).get(TAG_HISTORY, "[]"))
    except json.JSONDecodeError:
        history = []
    history.append({"alias": alias, "version": version, "previous": previous, "action": action, "by": who(), "at": when})
    text = json.dumps(history[-HISTORY_KEEP:])
    while len(text) > 7500 and len(history) > 1:  # stay under MLflow's tag value limit
        history = history[1:]
        text = json.dumps(history[-HISTORY_KEEP:])
    client.set_registered_model_tag(name, TAG_HISTORY, text)


def promote(client, name: str, version: str, alias: str = "champion", reason: str = "manual promotion") -> str | None:
    """Move ``alias`` to ``version`` by hand; returns the previous holder (recorded in MLflow)."""
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise ReprflowError(f"model version {name}/{version} not found") from None
    with alias_lock(client, name):
        previous = current_version(client, name, alias)
        if previous == str(version):
            print(f"[alias] {name} v{version} already holds @{alias}", flush=True)
            return previous
        client.set_registered_model_alias(name, alias, str(version))
        record_move(client, name, alias, str(version), previous, "promoted", reason)
    print(f"[alias] {name} @{alias}: v{previous or '-'} -> v{version}", flush=True)
    return previous


def previous_champion(version) -> str | None:
    """The version ``version`` replaced as champion, from its tags (manual or gated promotion)."""
    tags = version.tags or {}
    prev = tags.get(TAG_PREVIOUS)
    if prev and prev != "none":
        return prev
    if tags.get("reprflow.decision") == "promoted":
        return tags.get("reprflow.compared_with_version")
    return None


def rollback(client, name: str, alias: str = "champion") -> tuple[str, str]:
    """Move ``alias`` back to the version the current holder replaced; returns ``(from, to)``."""
    with alias_lock(client, name):
        current = current_version(client, name, alias)
        if current is None:
            raise ReprflowError(f"'{name}' has no @{alias}; nothing to roll back")
        target = previous_champion(client.get_model_version(name, current))
        if target is None:
            raise ReprflowError(f"{name} v{current} records no previous @{alias}; use 'reprflow promote {name} VERSION'")
        try:
            client.get_model_version(name, target)
        except MlflowException:
            raise ReprflowError(f"{name} v{current} replaced v{target}, which no longer exists; use 'reprflow promote {name} VERSION'") from None
        client.set_registered_model_alias(name, alias, target)
        record_move(client, name, alias, target, current, "rolled_back", f"rollback from v{current}")
        client.set_model_version_tag(name, current, "reprflow.rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    print(f"[alias] {name} @{alias}: rolled back v{current} -> v{target}", flush=True)
    return current, target
