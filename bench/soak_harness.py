"""The soak's harness: a TCP gate in front of the tracking server, a throw-away MLflow server,
the tiny dataset and pipeline file, fault markers, driver processes and MLflow record diffs.

Used by ``bench/soak.py`` (the fault soak) and ``tests/integration/test_faults.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


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


def train_controllers() -> list:
    """The live processes (psutil) of Ray Train controller actors: Ray titles them ``ray::TrainController...``."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "TrainController" in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found


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
