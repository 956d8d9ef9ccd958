"""``reprflow gc``: free the storage folder of what no registered model version needs.

Kept: the step folders of every pipeline or retrain run that produced a version still in the
registry (its dataset, train, embed, evaluate, register and floor steps), so rerunning that
pipeline stays a cache hit. Removed: other step folders, half-written step folders left by a
crash (``*.tmp-*``) and Ray Train run folders (their checkpoints only serve to resume an
unfinished fit; a finished fit's state is in its step folder). Anything modified within
``min_age_hours`` is left alone, since a running pipeline may be using it. Dry run by default.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GcPlan:
    """What ``gc`` found: ``(path, bytes, reason)`` to delete, and how many step folders are kept."""

    delete: list[tuple[Path, int, str]] = field(default_factory=list)
    kept: int = 0
    live_versions: int = 0

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.delete)


def size_of(path: Path) -> int:
    """Bytes under ``path`` (files only, symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def live_step_keys(client) -> tuple[set[str], int]:
    """Step keys of every run that produced a registered version still in the registry."""
    keys: set[str] = set()
    parents: set[str] = set()
    versions = 0
    token = None
    while True:
        page = client.search_model_versions(max_results=1000, page_token=token)
        for mv in page:
            prun = (mv.tags or {}).get("reprflow.pipeline_run")
            if prun:
                parents.add(prun)
                versions += 1
        token = page.token
        if not token:
            break
    for prun in parents:
        try:
            exp = client.get_run(prun).info.experiment_id
        except Exception:  # noqa: BLE001 - the run was deleted; its version still protects nothing on disk
            continue
        for run in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{prun}'", max_results=5000):
            key = run.data.tags.get("reprflow.step_key")
            if key:
                keys.add(key)
    return keys, versions


def plan_gc(storage: Path, client, min_age_hours: float = 24.0) -> GcPlan:
    """Decide what to delete under ``storage`` (nothing is deleted here)."""
    plan = GcPlan()
    keys, plan.live_versions = live_step_keys(client)
    cutoff = time.time() - min_age_hours * 3600
    steps = storage / "steps"
    for d in sorted(steps.iterdir()) if steps.is_dir() else []:
        if d.stat().st_mtime > cutoff:
            plan.kept += 1
            continue
        if ".tmp-" in d.name:
            plan.delete.append((d, size_of(d), "half-written step folder (a crashed step)"))
            continue
        key = d.name.rsplit("-", 1)[-1]
        if key in keys:
            plan.kept += 1
        else:
            plan.delete.append((d, size_of(d), "not in the lineage of any registered version"))
    results = storage / "ray_results"
    for d in sorted(results.iterdir()) if results.is_dir() else []:
        if d.stat().st_mtime <= cutoff:
            plan.delete.append((d, size_of(d), "Ray Train checkpoints (only needed to resume an unfinished fit)"))
    return plan


def human(n: float) -> str:
    """Bytes as a short human string."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def run_gc(storage: Path, client, yes: bool = False, min_age_hours: float = 24.0) -> GcPlan:
    """Print the plan; delete it when ``yes``."""
    plan = plan_gc(storage, client, min_age_hours)
    for path, size, reason in plan.delete:
        print(f"{'delete' if yes else 'would delete'}  {human(size):>10}  {path.relative_to(storage)}  ({reason})")
        if yes:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    verb = "freed" if yes else "would free"
    print(f"{verb} {human(plan.total)} in {len(plan.delete)} folders of {storage}; kept {plan.kept} step folders "
          f"(lineage of {plan.live_versions} registered versions, or modified in the last {min_age_hours:g} h)")
    if not yes and plan.delete:
        print("dry run: add --yes to delete")
    return plan
