"""Soak test: N tiny pipeline runs, each with a random injected fault, on a real local Ray and a
real MLflow server; prints faults injected / survived / cleanly reported / records lost.

    python bench/soak.py --runs 6 --seed 1
    python bench/soak.py --runs 3 --faults worker_kill,driver_kill

Faults (one per run, in random order - each kind once before any repeats - at a random moment):
- ``worker_kill``   SIGKILL of the Ray Train worker process mid-epoch (FailureConfig restarts it)
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

The TCP gate, dataset and process helpers here are also used by ``tests/integration/test_faults.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAULTS = ("worker_kill", "driver_kill", "mlflow_blip", "mlflow_outage", "exception", "disk", "tamper")


# ---------------------------------------------------------------------------- harness helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpGate:
    """A TCP forwarder ``127.0.0.1:port -> 127.0.0.1:upstream`` that can be shut.

    :meth:`close` stops listening and drops every open connection, so the port refuses
    connections exactly as a server that went down would; :meth:`open` listens again on the
    same port. The upstream server itself keeps running (no restart cost between faults).
    """

    def __init__(self, upstream: int, port: int | None = None):
        self.upstream, self.port = upstream, port or free_port()
        self._srv: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.open()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(128)
        self._srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def close(self) -> None:
        srv, self._srv = self._srv, None
        if srv is not None:
            try:
                srv.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            srv.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            _hard_close(c)

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            if self._srv is not srv:
                _hard_close(client)
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
                upstream.settimeout(None)
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _hard_close(s)
                with self._lock:
                    self._conns.discard(s)


def _hard_close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def start_mlflow(folder: Path, port: int | None = None):
    """``reprflow ui``'s own server (``pipelines.ui.serve``: 127.0.0.1, one worker) on a SQLite
    store in ``folder``; returns ``(process, port)``. Stop it with ``pipelines.ui.stop_server``."""
    from pipelines.ui import serve

    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = serve(f"sqlite:///{folder / 'mlflow.db'}", "127.0.0.1", port, block=False)
    return proc, port


def make_dataset(root: Path, train: int = 96, val: int = 48, test: int = 48, bad_rows: bool = True) -> dict[str, list]:
    """A labelled shards dataset (rendered scenes, 32 px); with ``bad_rows``, its train split also
    holds one row of each row-level problem. Returns the expected bad rows ``{column: [id, ...]}``."""
    from components.data import shards as sh
    from components.data.scenes import SHAPES, scene_rows

    expected: dict[str, list] = {"image": [], "id": [], "captions": [], "boxes": []}
    for split, n in (("train", train), ("val", val), ("test", test)):
        rows = list(scene_rows(0, split, n, 32))
        if split == "train" and bad_rows:
            rows[3]["image"] = b"\x89PNG\r\n\x1a\n garbage"
            rows[5]["image"] = None
            rows[7]["id"] = rows[6]["id"]
            rows[9]["captions"] = [""]
            rows[11]["boxes"] = [[10.0, 10.0, 50.0, 20.0]]  # past the right edge of a 32-px image
            expected = {"image": [rows[3]["id"], rows[5]["id"]], "id": [rows[7]["id"]], "captions": [rows[9]["id"]], "boxes": [rows[11]["id"]]}
        sh.write_shards(rows, sh.join(str(root), split), rows_per_shard=10_000)
    files = [f for s in sh.SPLITS for f in sh.list_shards(sh.join(str(root), s))]
    sh.write_dataset_info(str(root), sh.DatasetInfo("photos", list(SHAPES), {"train": train, "val": val, "test": test}, sh.fingerprint_files(files), {}))
    return expected


def pipeline_dict(storage: Path, name: str, data: Path, tracking_uri: str, **train) -> dict:
    """The tiny pipeline of the fault suite: SimCLR on the ``photos`` shards, 2 epochs, registered."""
    return {
        "name": name, "seed": 0, "storage": str(storage),
        "datasets": {"photos": {"kind": "shards", "uri": str(data)}},
        "train": {"dataset": "photos", "num_workers": 0, "epochs": 2, "batch_size": 32, "decode_size": 32, "data_batch_size": 64, **train},
        "methods": [{"name": "simclr", "settings": {"image_size": 16, "proj_hidden_dim": 64, "proj_dim": 32, "temperature": 0.2,
                                                    "optim": {"lr": 0.6, "warmup_epochs": 0}}}],
        "evaluate": {"dataset": "photos", "batch_size": 128},
        "mlflow": {"tracking_uri": tracking_uri},
    }


def wait_for_file(path: Path, timeout: float, alive: Callable[[], bool] | None = None) -> dict:
    """Wait until a pause marker exists (returns its JSON); fail early if ``alive()`` turns False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if alive is not None and not alive():
            raise RuntimeError(f"the process died before reaching {path.name}")
        time.sleep(0.05)
    raise TimeoutError(f"{path.name} did not appear within {timeout:.0f}s")


def wait_checkpoint_registered(ray_results: Path, epoch: int, timeout: float = 120) -> None:
    """Wait until Ray Train's controller has registered the checkpoint of ``epoch``.

    A worker's ``report()`` returns once its checkpoint is uploaded, but the controller records
    it a moment later (``checkpoint_manager_snapshot.json``); a worker killed in between restarts
    from the checkpoint before. Tests that want "resumes from epoch N" wait for this.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snap in ray_results.glob("train-*/checkpoint_manager_snapshot.json"):
            try:
                latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
            except ValueError:
                continue  # being written
            if (latest.get("metrics") or {}).get("epoch", 0) >= epoch:
                return
        time.sleep(0.1)
    raise TimeoutError(f"no registered checkpoint of epoch {epoch} under {ray_results} within {timeout:.0f}s")


def marker(fault_dir: Path, point: str, suffix: str = ".paused") -> Path:
    """The file :func:`pipelines.dag.fault_point` writes (``.paused``) or waits for (``.release``)."""
    return fault_dir / ("".join(c if c.isalnum() or c in "-_." else "_" for c in point) + suffix)


def release(fault_dir: Path, point: str) -> None:
    """Let a paused fault point continue."""
    marker(fault_dir, point, ".release").write_text("go")


class InThread:
    """Run ``fn`` in a thread; :meth:`join` returns its result or re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to join()
            self.error = exc

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float = 900):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("pipeline thread still running")
        if self.error is not None:
            raise self.error
        return self.result


def spawn_driver(config_path: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``reprflow run FILE`` as its own process group (so it and only it can be killed)."""
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(config_path)], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process group started by :func:`spawn_driver` and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def diff_records(ref: dict, got: dict, path: str = "") -> list[str]:
    """Where two :func:`pipelines.tracking.pipeline_records` differ (one line per item)."""
    if isinstance(ref, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(ref) | set(got), key=str):
            if k not in got:
                out.append(f"{path}{k}: missing")
            elif k not in ref:
                out.append(f"{path}{k}: unexpected")
            else:
                out += diff_records(ref[k], got[k], f"{path}{k}.")
        return out
    return [] if ref == got else [f"{path[:-1]}: {ref!r} != {got!r}"]


def records_of(tracking_uri: str, experiment: str) -> dict:
    """:func:`pipelines.tracking.pipeline_records` of an experiment."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import pipeline_records

    client = MlflowClient(tracking_uri)
    return pipeline_records(client, client.get_experiment_by_name(experiment).experiment_id)


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
