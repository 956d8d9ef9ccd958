"""MLflow records: one parent run per pipeline run, one child run per step.

All writes go through an explicit :class:`mlflow.MlflowClient` from the driver's main thread
(steps run in threads; MLflow's fluent API keeps per-thread state), except model logging,
which the register step does inside its own child run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_PARAM_LEN = 6000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
UI_DEFAULT = "http://127.0.0.1:5000"


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
        set_tracking_uri_keeping_env(tracking_uri)
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
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
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"reprflow.kind": "pipeline", **tags})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_child(self, step_name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=step_name,
            tags={"mlflow.parentRunId": self.parent_id or "", "reprflow.kind": "step", "reprflow.step": step_name, **tags},
        )
        self.child_ids[step_name] = run.info.run_id
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        flat = flatten(params)
        items = [Param(k[:250], str(v)[:MAX_PARAM_LEN]) for k, v in flat.items()]
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
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_json(self, run_id: str, data: Any, name: str) -> None:
        self.client.log_text(run_id, json.dumps(data, indent=2, default=str), name)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def run_url(self, run_id: str | None = None) -> str:
        """Where a person finds the run in the MLflow UI (started with ``reprflow ui``)."""
        base = self.uri if self.uri.startswith("http") else UI_DEFAULT
        rid = run_id or self.parent_id
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{rid}"
