"""A thin DAG layer on Ray: steps with declared inputs, cached by a hash of inputs + settings.

A :class:`Step` names its upstream steps and its settings; its key is the sha256 of its kind,
settings and its inputs' keys, so a changed setting anywhere upstream changes every key below
it. A finished step leaves ``<storage>/steps/<name>-<key>/result.json`` (written last, after an
atomic rename of the folder), which is what makes a rerun skip it. Steps whose inputs are done
run concurrently (threads on the driver; the work itself runs as Ray tasks or a TorchTrainer).

:func:`fault_point` is the one test hook of the pipeline: with ``REPRFLOW_FAULT_DIR`` and
``REPRFLOW_PAUSE_AT`` set, the named points (``before:<step>``, ``<step>:version-created``,
``train[<method>]:epoch<N>``) write ``<dir>/<point>.paused`` (pid, details) and wait for
``<dir>/<point>.release``, so a fault test can kill a process or cut a connection at an exact
moment instead of sleeping and hoping. Unset (always, outside tests) it costs one dict lookup.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

CODE_VERSION = "2"  # bump when a step's outputs change meaning, so old caches are not reused (2: state files carry a sha256 manifest)
FAULT_DIR_ENV, PAUSE_AT_ENV, PAUSE_TIMEOUT_ENV = "REPRFLOW_FAULT_DIR", "REPRFLOW_PAUSE_AT", "REPRFLOW_PAUSE_TIMEOUT"


def fault_settings() -> dict | None:
    """The pause points asked for in this process's environment (passed on to Ray Train workers,
    whose environment is the cluster's), or None."""
    folder, points = os.environ.get(FAULT_DIR_ENV), os.environ.get(PAUSE_AT_ENV)
    if not folder or not points:
        return None
    return {"dir": folder, "pause_at": [p.strip() for p in points.split(",") if p.strip()],
            "timeout": float(os.environ.get(PAUSE_TIMEOUT_ENV, "300"))}


def _point_file(folder: str, name: str, suffix: str) -> Path:
    return Path(folder) / ("".join(c if c.isalnum() or c in "-_." else "_" for c in name) + suffix)


def fault_point(name: str, info: dict | None = None, settings: dict | None = None) -> None:
    """Pause here if a test asked for it (see the module docstring); otherwise return at once."""
    settings = settings if settings is not None else fault_settings()
    if not settings or name not in settings["pause_at"]:
        return
    marker = _point_file(settings["dir"], name, ".paused")
    release = _point_file(settings["dir"], name, ".release")
    if marker.exists():
        return  # each point pauses once per test
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"point": name, "pid": os.getpid(), "time": time.time(), **(info or {})}))
    os.replace(tmp, marker)
    deadline = time.monotonic() + settings.get("timeout", 300)
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass
class StepResult:
    """What a step leaves: outputs (paths/values), final metrics, per-epoch history, params, artifacts."""

    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # file names inside the step folder
    seconds: float = 0.0  # how long the step took when it ran (a cached step keeps its original time)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> "StepResult":
        return cls(**json.loads(text))


@dataclass
class Step:
    """One node: ``fn(ctx) -> StepResult`` where ``ctx`` gives inputs' results and an output folder."""

    name: str
    kind: str
    fn: Callable[["StepContext"], StepResult]
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    key: str = ""
    # Called with a cached result; returning False re-runs the step (e.g. a registered version was deleted).
    still_valid: Callable[[StepResult], bool] | None = None


@dataclass
class StepContext:
    """What a running step sees: its folder, settings, finished inputs and the run's shared state."""

    step: Step
    out_dir: Path
    inputs: dict[str, StepResult]
    run: Any  # the pipeline run (config, tracking, Ray) - opaque to the DAG layer


def settings_key(kind: str, settings: dict[str, Any], input_keys: list[str]) -> str:
    """sha256 of a step's kind, settings and its inputs' keys (first 16 hex chars)."""
    blob = json.dumps({"v": CODE_VERSION, "kind": kind, "settings": settings, "inputs": sorted(input_keys)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class DAG:
    """Steps in insertion order (inputs must be added first); computes keys as steps are added."""

    def __init__(self) -> None:
        self.steps: dict[str, Step] = {}

    def add(self, step: Step) -> Step:
        for dep in step.inputs:
            if dep not in self.steps:
                raise ValueError(f"step {step.name} depends on unknown step {dep}")
        step.key = settings_key(step.kind, step.settings, [self.steps[d].key for d in step.inputs])
        self.steps[step.name] = step
        return step


def step_dir(storage: Path, step: Step) -> Path:
    """The folder that holds a step's outputs."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in step.name)
    return storage / "steps" / f"{safe}-{step.key}"


def load_cached(storage: Path, step: Step) -> StepResult | None:
    """The step's result if a previous run finished it (and it is still valid), else None."""
    marker = step_dir(storage, step) / "result.json"
    if not marker.is_file():
        return None
    try:
        result = StepResult.from_json(marker.read_text())
    except (OSError, ValueError, TypeError) as exc:  # unreadable marker: run the step again
        print(f"[dag] {step.name}: cached result unreadable ({exc}); running it again", flush=True)
        return None
    if step.still_valid is not None and not step.still_valid(result):
        return None
    return result


class Runner:
    """Runs a DAG: cached steps are skipped, ready steps run concurrently, failures stop the run.

    ``on_event(event, step, info)`` is called with ``start``, ``cached``, ``done``, ``failed``, ``stopped`` (Ctrl-C) and
    ``interrupted`` (finished, but after another step failed: cached, not recorded as done); the
    pipeline uses it for progress lines and MLflow child runs.
    """

    def __init__(self, dag: DAG, storage: Path, run: Any, force: bool = False, max_parallel: int = 4, on_event=None):
        self.dag, self.storage, self.run, self.force = dag, storage, run, force
        self.max_parallel = max_parallel
        self.on_event = on_event or (lambda *a: None)
        self.results: dict[str, StepResult] = {}
        self.cached: set[str] = set()
        self._lock = threading.Lock()

    def _execute(self, step: Step) -> StepResult:
        final = step_dir(self.storage, step)
        tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        ctx = StepContext(step=step, out_dir=tmp, inputs={d: self.results[d] for d in step.inputs}, run=self.run)
        t0 = time.monotonic()
        try:
            result = step.fn(ctx)
            result.seconds = time.monotonic() - t0
            # The step may have written absolute paths of its temp folder; point them at the final one.
            text = result.to_json().replace(str(tmp), str(final))
            # The marker goes in before the folder is published, so a reader never finds a step
            # folder with a half-written result.json (a step thread left running after Ctrl-C
            # finished while the next run read the cache: CI saw an empty marker).
            (tmp / "result.json").write_text(text)
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            try:
                tmp.rename(final)
            except OSError:
                # Another runner published the same step (same key: same settings and inputs)
                # between the two lines above; theirs is as good as ours.
                if not (final / "result.json").is_file():
                    raise
                return StepResult.from_json((final / "result.json").read_text())
            return StepResult.from_json(text)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def run_all(self) -> dict[str, StepResult]:
        """Run every step; on the first failure, schedule nothing more, let the running steps
        finish (their results are cached, so no finished work is lost), report them as
        ``interrupted`` (or ``failed``), then raise the first error. On Ctrl-C
        (``KeyboardInterrupt``) it does not wait: running steps are reported ``stopped`` and the
        interrupt propagates (the CLI then shuts Ray down, ending their fits)."""
        pending = dict(self.dag.steps)
        running: dict[Future, Step] = {}
        error: BaseException | None = None
        pool = ThreadPoolExecutor(max_workers=self.max_parallel)
        stopped = False
        try:
            while running or (pending and error is None):
                for name, step in list(pending.items()) if error is None else []:
                    if not all(d in self.results for d in step.inputs):
                        continue
                    del pending[name]
                    cached = None if self.force else load_cached(self.storage, step)
                    if cached is not None:
                        self.results[name] = cached
                        self.cached.add(name)
                        self.on_event("cached", step, {"result": cached})
                        continue
                    fault_point(f"before:{name}")
                    self.on_event("start", step, {})
                    running[pool.submit(self._timed, step)] = step
                if not running:
                    continue
                try:
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    # Ctrl-C: do not wait for running steps (a fit can take hours). Each is recorded
                    # as stopped; finished steps are cached and a rerun resumes training from its
                    # last checkpoint. The caller shuts Ray down, which ends the running fits.
                    stopped = True
                    for step in running.values():
                        self._report("stopped", step, {})
                    raise
                for fut in done:
                    step = running.pop(fut)
                    try:
                        result, seconds = fut.result()
                    except BaseException as exc:
                        self._report("failed", step, {"error": exc})
                        error = error or exc
                        continue
                    self.results[step.name] = result
                    if error is not None:
                        self._report("interrupted", step, {"result": result, "seconds": seconds})
                        continue
                    try:
                        self.on_event("done", step, {"result": result, "seconds": seconds})
                    except BaseException as exc:  # recording failed (e.g. MLflow gone): the result is cached
                        error = exc
        finally:
            pool.shutdown(wait=not stopped, cancel_futures=stopped)
        if error is not None:
            raise error
        return self.results

    def _report(self, event: str, step: Step, info: dict) -> None:
        """An event on the failure path: recording it must not hide the error itself."""
        try:
            self.on_event(event, step, info)
        except Exception as exc:  # noqa: BLE001
            print(f"[dag] could not record that {step.name} {event}: {exc}", flush=True)

    def _timed(self, step: Step) -> tuple[StepResult, float]:
        t0 = time.monotonic()
        return self._execute(step), time.monotonic() - t0
