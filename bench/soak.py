"""Soak test: N tiny pipeline runs, each with a random injected fault, on a real local Ray and a
real MLflow server; prints faults injected / survived / cleanly reported / records lost.

    python bench/soak.py --runs 6 --seed 1
    python bench/soak.py --runs 3 --faults worker_kill,driver_kill

Faults (one per run, in random order - each kind once before any repeats - at a random moment):
- ``worker_kill``   SIGKILL of the Ray Train worker process mid-epoch (FailureConfig restarts it)
- ``controller_kill`` SIGKILL of Ray Train's controller actor mid-epoch (the train step fits again
                    from the newest checkpoint: ``train.controller_retries``)
- ``driver_kill``   SIGKILL of a ``reprflow run`` process (mid-training, between steps or mid-
                    registration); the same command is run again
- ``mlflow_blip``   the tracking server's port refuses connections for a few seconds mid-run
- ``mlflow_outage`` the port stays closed past the retry budget (start, mid-run or registration):
                    the run must stop with a clear error; rerun once the server is back
- ``exception``     an exception in the training loop after an epoch (no restarts left); rerun
- ``disk``          the checkpoint folder cannot be written: a clear error before training; fix, rerun
- ``tamper``        a driver dies after a checkpoint, then the checkpoint is modified: the rerun
                    must refuse it by name; remove it, rerun

*Survived*: the final MLflow records of the pipeline (latest finished pipeline run: child runs,
statuses, metric and param keys, artifacts, per-epoch steps of training metrics; registered
versions; no run left RUNNING) equal those of a fault-free run of the same file. *Records lost*:
how many of those items differ. *Cleanly reported*: every failure a person saw was one clear
``reprflow: error:`` line (or the injected exception itself), never an unrelated traceback.

The TCP gate, dataset and process helpers live in ``bench/soak_harness.py`` (shared with
``tests/integration/test_faults.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.soak_harness import (InThread, TcpGate, diff_records, kill_group, make_dataset, marker, pipeline_dict,  # noqa: E402
                                records_of, release, spawn_driver, start_mlflow, train_controllers, wait_checkpoint_registered, wait_for_file)

FAULTS = ("worker_kill", "controller_kill", "driver_kill", "mlflow_blip", "mlflow_outage", "exception", "disk", "tamper")


# ---------------------------------------------------------------------------- the soak


class Soak:
    """Shared state of a soak: the work folder, the server behind its gate, the dataset."""

    def __init__(self, work: Path, seed: int):
        self.work, self.rng = work, random.Random(seed)
        self.server, port = start_mlflow(work / "mlflow")
        self.direct = f"http://127.0.0.1:{port}"
        self.gate = TcpGate(port)
        self.data = work / "photos"
        self.invocations = 0  # pipeline runs started (in this process or as a `reprflow run` process)
        make_dataset(self.data)

    def config(self, name: str, **train):
        return pipeline_dict(self.work / name / "store", name, self.data, self.gate.url, **train)

    def run(self, name: str, **train):
        from pipelines.config import parse_config
        from pipelines.run import run_pipeline

        self.invocations += 1
        return run_pipeline(parse_config(self.config(name, **train)), self.work / name / "out")

    def pause_env(self, name: str, point: str) -> Path:
        folder = self.work / name / "faults"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.update({"REPRFLOW_FAULT_DIR": str(folder), "REPRFLOW_PAUSE_AT": point})
        return folder

    @staticmethod
    def clear_env() -> None:
        for k in ("REPRFLOW_FAULT_DIR", "REPRFLOW_PAUSE_AT", "REPRFLOW_FAIL_AFTER_EPOCH", "REPRFLOW_MLFLOW_RETRY_SECONDS"):
            os.environ.pop(k, None)

    def close(self) -> None:
        from pipelines.ui import stop_server

        self.gate.close()
        stop_server(self.server)


def _expect_clean(fn: Callable[[], Any], errors: list[str], injected: str | None = None) -> bool:
    """Run ``fn``; a failure must be a ReprflowError (or carry the injected message). Returns True if it ran through."""
    from components.errors import ReprflowError

    try:
        fn()
        return True
    except ReprflowError as exc:
        errors.append(f"clean: {str(exc)[:160]}")
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        errors.append(("clean (injected): " if injected and injected in text else "UNCLEAN: ") + f"{type(exc).__name__}: {text[:160]}")
    return False


def scenario(soak: Soak, fault: str, name: str) -> tuple[str, list[str]]:
    """Inject ``fault`` into the pipeline ``name``, rerun until it completes; returns (detail, errors)."""
    rng, errors = soak.rng, []
    if fault == "worker_kill":
        epoch = rng.choice([1, 2])
        point = f"train[simclr]:epoch{epoch}"
        folder = soak.pause_env(name, point)
        job = InThread(lambda: soak.run(name, num_workers=1))
        info = wait_for_file(marker(folder, point), 600, job.alive)
        if epoch > 1:
            wait_checkpoint_registered(soak.work / name / "store" / "ray_results", epoch - 1)
        os.kill(info["pid"], signal.SIGKILL)
        _expect_clean(job.join, errors)
        detail = f"SIGKILL worker pid {info['pid']} in epoch {epoch}"
    elif fault == "controller_kill":
        point = "train[simclr]:epoch2"
        folder = soak.pause_env(name, point)
        job = InThread(lambda: soak.run(name, num_workers=1))
        wait_for_file(marker(folder, point), 600, job.alive)
        wait_checkpoint_registered(soak.work / name / "store" / "ray_results", 1)
        controllers = train_controllers()
        if len(controllers) != 1:
            errors.append(f"UNCLEAN: expected one Ray Train controller process, found {len(controllers)}")
        for p in controllers:
            p.kill()
        _expect_clean(job.join, errors)
        detail = f"SIGKILL controller pid {', '.join(str(p.pid) for p in controllers)} in epoch 2"
    elif fault == "driver_kill":
        point = rng.choice(["train[simclr]:epoch2", "before:embed[simclr]", "before:register[simclr]", "register[simclr]:version-created"])
        folder = soak.work / name / "faults"
        folder.mkdir(parents=True, exist_ok=True)
        cfg_path = soak.work / name / "pipeline.json"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(json.dumps(soak.config(name)))
        import ray

        env = {**os.environ, "REPRFLOW_FAULT_DIR": str(folder), "REPRFLOW_PAUSE_AT": point, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        proc = spawn_driver(cfg_path, env, soak.work / name / "driver.log")
        soak.invocations += 1
        info = wait_for_file(marker(folder, point), 600, lambda: proc.poll() is None)
        kill_group(proc)
        soak.clear_env()
        _expect_clean(lambda: soak.run(name), errors)
        detail = f"SIGKILL driver at {point} (pid {info['pid']})"
    elif fault in ("mlflow_blip", "mlflow_outage"):
        point = rng.choice(["before:train[simclr]", "before:embed[simclr]", "before:register[simclr]", "register[simclr]:version-created"])
        folder = soak.pause_env(name, point)
        if fault == "mlflow_outage":
            os.environ["REPRFLOW_MLFLOW_RETRY_SECONDS"] = "3"
        job = InThread(lambda: soak.run(name))
        wait_for_file(marker(folder, point), 600, job.alive)
        soak.gate.close()
        release(folder, point)
        down = rng.uniform(1, 4) if fault == "mlflow_blip" else None
        if down:
            time.sleep(down)
            soak.gate.open()
        ok = _expect_clean(job.join, errors)
        if not down:
            soak.gate.open()
        soak.clear_env()
        if not ok:
            _expect_clean(lambda: soak.run(name), errors)
        detail = f"tracking port closed at {point}" + (f" for {down:.1f}s" if down else " past the retry budget")
    elif fault == "exception":
        os.environ["REPRFLOW_FAIL_AFTER_EPOCH"] = "1"
        _expect_clean(lambda: soak.run(name, max_failures=0), errors, injected="injected fault")
        soak.clear_env()
        _expect_clean(lambda: soak.run(name, max_failures=0), errors)
        detail = "exception after epoch 1, no restarts left"
    elif fault == "disk":
        blocked = soak.work / name / "store" / "ray_results"
        blocked.parent.mkdir(parents=True, exist_ok=True)
        blocked.write_text("not a folder")
        _expect_clean(lambda: soak.run(name), errors)
        blocked.unlink()
        _expect_clean(lambda: soak.run(name), errors)
        detail = "checkpoint folder unwritable"
    elif fault == "tamper":
        point = "train[simclr]:epoch2"
        folder = soak.work / name / "faults"
        folder.mkdir(parents=True, exist_ok=True)
        cfg_path = soak.work / name / "pipeline.json"
        cfg_path.write_text(json.dumps(soak.config(name)))
        import ray

        env = {**os.environ, "REPRFLOW_FAULT_DIR": str(folder), "REPRFLOW_PAUSE_AT": point, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        proc = spawn_driver(cfg_path, env, soak.work / name / "driver.log")
        soak.invocations += 1
        wait_for_file(marker(folder, point), 600, lambda: proc.poll() is None)
        kill_group(proc)
        state = next((soak.work / name / "store" / "ray_results").glob("train-*/checkpoint_*/state.pt"))
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
        refused = not _expect_clean(lambda: soak.run(name), errors)
        if refused:
            shutil.rmtree(state.parent.parent)
        else:
            errors.append("UNCLEAN: a tampered checkpoint was loaded")
        _expect_clean(lambda: soak.run(name), errors)
        detail = f"killed in epoch 2, then modified {state.parent.name}/state.pt"
    else:
        raise ValueError(fault)
    soak.clear_env()
    return detail, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=6, help="pipeline runs, one random fault each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    p.add_argument("--work", help="work folder (default: a new temporary folder, removed at the end)")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults: {', '.join(sorted(unknown))}")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    work = Path(args.work or tempfile.mkdtemp(prefix="reprflow-soak-"))
    from pipelines.config import parse_config
    from pipelines.run import init_ray

    t_start = time.monotonic()
    init_ray(parse_config(pipeline_dict(work / "unused", "init", work, "sqlite:///unused.db")))
    soak = Soak(work, args.seed)
    results = []
    try:
        t0 = time.monotonic()
        soak.run("soak-ref")
        ref = records_of(soak.direct, "soak-ref")
        print(f"[soak] fault-free reference run: {time.monotonic() - t0:.0f}s, {len(ref['children'])} step runs", flush=True)
        # Every kind once (in random order) before any repeats, so a small N still covers them all.
        order = []
        while len(order) < args.runs:
            order += soak.rng.sample(faults, len(faults))
        for i, fault in enumerate(order[: args.runs]):
            name = f"soak-{i}-{fault.replace('_', '-')}"
            t0 = time.monotonic()
            soak.invocations = 0
            try:
                detail, errors = scenario(soak, fault, name)
            except Exception as exc:  # noqa: BLE001 - the harness itself failed: counts as not survived
                detail, errors = "harness error", [f"UNCLEAN: harness: {type(exc).__name__}: {exc}"]
            soak.clear_env()
            if not soak.gate._srv:
                soak.gate.open()
            try:
                lost = diff_records(ref, records_of(soak.direct, name))
            except Exception as exc:  # noqa: BLE001
                lost = [f"records unreadable: {exc}"]
            clean = not any(e.startswith("UNCLEAN") for e in errors)
            results.append({"run": name, "fault": fault, "detail": detail, "survived": not lost, "clean": clean, "lost": len(lost),
                            "runs": soak.invocations, "seconds": round(time.monotonic() - t0)})
            print(f"[soak] {name}: {detail}; {'survived' if not lost else 'NOT survived'}"
                  f"{'' if clean else ' (UNCLEAN error)'}; records lost {len(lost)}; {time.monotonic() - t0:.0f}s", flush=True)
            for line in errors + lost[:10]:
                print(f"         {line}", flush=True)
    finally:
        soak.close()
        import ray

        ray.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    injected = len(results)
    survived = sum(r["survived"] for r in results)
    clean = sum(r["clean"] for r in results)
    lost = sum(r["lost"] for r in results)
    print()
    print("| run | fault | what | survived | clean errors | pipeline runs | records lost | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['fault']} | {r['detail']} | {'yes' if r['survived'] else 'NO'} | {'yes' if r['clean'] else 'NO'} | {r['runs']} | {r['lost']} | {r['seconds']} |")
    print(f"\nfaults injected: {injected}   survived: {survived}   cleanly reported: {clean}   records lost: {lost}   "
          f"({time.monotonic() - t_start:.0f}s)")
    return 0 if survived == injected and clean == injected and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
