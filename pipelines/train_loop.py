"""The one generic Ray Train loop: trains any method that follows the method contract.

It knows nothing of any method: it builds the method from its registry name and settings,
iterates its Ray Data shard (views already built by Ray Data), steps the optimizer through
:class:`components.training.TrainStep`, checkpoints every N epochs and reports per-epoch
metrics. The Ray Train run name is the step's key (hash of inputs + settings), so a changed
config never resumes another config's checkpoint.

Checkpoints are plain tensors (``torch.load(weights_only=True)``: loading one runs no code) with a
sha256 manifest beside each state file (``state.pt.sha256``); a state whose bytes do not match
its manifest is refused with an error naming the file. The checkpoint folder is checked for
writability and free space before training starts, not when the first epoch ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from components.checkpoint import MANIFEST_SUFFIX, load_state, manifest_path, save_state_file, verify_state, write_state_file  # noqa: F401 - re-exported
from components.errors import ReprflowError
from components.methods.base import Upstream
from components.methods.registry import build_method
from components.training import TrainStep, prepare_batch
from pipelines.dag import fault_point, fault_settings

STATE_FILE = "state.pt"
# Free space asked of the checkpoint folder beyond the estimate: room for Ray's own files.
FREE_SPACE_MARGIN = 64 * 2**20
# Local mode runs the train function in the driver process, whose Ray Train context is global:
# two local-mode fits must not overlap (distributed fits run in their own actors and may).
_LOCAL_MODE_LOCK = threading.Lock()
# Two CPUs of the cluster stay free for Ray Data's tasks (decode + views), which otherwise
# starve behind worker groups holding every CPU and the fits deadlock.
DATA_CPUS = 2


class _TrainingSlots:
    """Admits distributed fits while their workers' CPUs fit beside the data path's.

    A fit needing ``cpus`` starts when ``in_use + cpus <= cluster CPUs - DATA_CPUS``, or when no
    other fit runs (one fit always may). Counting CPUs rather than fits keeps it right when
    fits of different sizes share one process (a fixed-size semaphore sized by the first fit
    let two 2-worker fits hold all 4 CPUs of a local Ray and hang).

    When the whole cluster is this machine, a fit's torch threads (workers x threads) are also
    counted against its cores (``cores``): two fits each sized for the machine would otherwise
    run side by side with twice as many threads as cores, and OpenMP threads spinning against
    each other made each 8x slower (measured: 125 s an epoch instead of 16 s on 2 cores) -
    running them one after the other is much faster.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_use = 0.0
        self._threads = 0
        self._running = 0

    @contextlib.contextmanager
    def hold(self, cpus: float, total: float | None = None, threads: int = 0, cores: int | None = None):
        """Block until ``cpus`` (and ``threads``, if ``cores`` is given) fit, hold them for the
        ``with`` body (``total``: the cluster's CPUs; ``cores``: this machine's, when the cluster
        is this machine alone)."""
        if total is None:
            import ray

            total = ray.cluster_resources().get("CPU", 1)

        def fits() -> bool:
            if self._running == 0:
                return True
            return self._in_use + cpus <= total - DATA_CPUS and (cores is None or self._threads + threads <= cores)

        with self._cond:
            self._cond.wait_for(fits)
            self._in_use += cpus
            self._threads += threads
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= cpus
                self._threads -= threads
                self._running -= 1
                self._cond.notify_all()


def _single_machine_cores() -> int | None:
    """This machine's cores when every alive Ray node is this machine (a local cluster), else None."""
    import ray

    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        here = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - no node table: do not bound by cores
        return None
    if len(nodes) == 1 and nodes[0].get("NodeID") == here:
        return os.cpu_count() or 1
    return None


_SLOTS = _TrainingSlots()


def save_state(path: Path, method, step: TrainStep, epoch: int, global_step: int, history: list[dict], meta: dict) -> None:
    """Write the full training state (method incl. buffers/EMA/banks, optimizer, counters) and its manifest."""
    state = {
        "method": method.state_dict(),
        "optim": step.state_dict(),
        "epoch": epoch,
        "global_step": global_step,
        "history": history,
        "meta": meta,
    }
    try:
        save_state_file(state, path)
    except OSError as exc:
        raise ReprflowError(f"cannot write checkpoint {path}: {exc.strerror or exc} (disk full or folder not writable?)") from None


def checkpoint_bytes(method) -> int:
    """A generous estimate of one checkpoint's size: parameters + buffers, plus two optimizer moments per parameter."""
    params = sum(p.numel() * p.element_size() for p in method.parameters())
    buffers = sum(b.numel() * b.element_size() for b in method.buffers())
    return 3 * params + buffers + 2**20


def check_checkpoint_storage(folder: Path, need_bytes: int = 0) -> None:
    """Before training: the checkpoint folder can be created and written, and has room for
    ``need_bytes`` (plus a margin). A clear error naming the folder otherwise."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ReprflowError(f"checkpoint folder {folder} is not writable: {blocker} is a file, not a folder; "
                            "move it (or point 'storage' / REPRFLOW_STORAGE elsewhere) before training")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}-{threading.get_ident()}"
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise ReprflowError(f"checkpoint folder {folder} is not writable: {exc.strerror or exc}; "
                            "fix it (or point 'storage' / REPRFLOW_STORAGE elsewhere) before training") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes + FREE_SPACE_MARGIN:
        raise ReprflowError(f"checkpoint folder {folder} has {free / 2**20:.0f} MiB free; training needs about "
                            f"{(need_bytes + FREE_SPACE_MARGIN) / 2**20:.0f} MiB for its checkpoints; free some space "
                            "(e.g. 'reprflow gc') or point 'storage' elsewhere")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (runs on every worker, or in-process in local mode)."""
    import ray.train
    import ray.train.torch as rtt

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])  # identical init on every rank; DDP also broadcasts
    method = build_method(config["method"], config["settings"])
    if config.get("resources"):
        method.attach({k: Upstream(**v) for k, v in config["resources"].items()})
    device = rtt.get_device() if config["use_gpu"] else torch.device("cpu")
    if world > 1:
        model = rtt.prepare_model(method, parallel_strategy_kwargs={"find_unused_parameters": False})
    else:
        model = method.to(device)
    per_worker = config["batch_size"] // world
    steps_per_epoch = max(1, (config["rows"] // world) // per_worker)
    amp = torch.bfloat16 if config["use_gpu"] else None
    step = TrainStep(method, config["batch_size"], steps_per_epoch, config["epochs"], model=model, amp_dtype=amp)

    start_epoch, global_step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    resume_dir = None
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory()
    elif config.get("resume_path"):
        resume_dir = config["resume_path"]
    if resume_dir is not None:
        state = load_state(Path(resume_dir) / STATE_FILE)
        method.load_state_dict(state["method"])
        step.load_state_dict(state["optim"])
        start_epoch, global_step, history = state["epoch"], state["global_step"], state["history"]
        if rank == 0:
            print(f"[train {config['method']}] resumed from epoch {start_epoch} (step {global_step})", flush=True)
    elif config.get("warm_start_path"):
        # Warm start (retraining): continue from another run's weights, buffers and optimizer
        # moments, but with a fresh epoch counter and learning-rate schedule.
        # The champion's state comes with the manifest it was registered with: checked like a resume.
        state = load_state(Path(config["warm_start_path"]))
        method.load_state_dict(state["method"])
        step.load_state_dict(state["optim"])
        if rank == 0:
            print(f"[train {config['method']}] warm start from {config['warm_start_path']} (its epoch {state['epoch']}); schedule restarts", flush=True)

    shard = ray.train.get_dataset_shard("train")
    fail_after = config.get("fail_after_epoch")
    fault = config.get("fault")
    for epoch in range(start_epoch, config["epochs"]):
        method.train()
        t0, n, sums = time.monotonic(), 0, {}
        # Contrastive losses take their negatives from the batch: a new mix of rows every epoch.
        buffer = per_worker * config.get("shuffle_buffer_batches", 0) or None
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=buffer):
            metrics = step(prepare_batch(batch, device), global_step)
            global_step += 1
            n += 1
            if fault and n == 1 and resume_dir is None:
                # Test hook (REPRFLOW_PAUSE_AT=train[<method>]:epoch<N>): pause mid-epoch, after the
                # previous epoch's checkpoint was reported, so a test can kill this process.
                fault_point(f"train[{config['method']}]:epoch{epoch + 1}", {"rank": rank, "epoch": epoch + 1, "global_step": global_step,
                                                                           "last_checkpoint_epoch": epoch - epoch % config["checkpoint_every"]}, fault)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        seconds = time.monotonic() - t0
        epoch_metrics = {k: v / max(1, n) for k, v in sums.items()}
        epoch_metrics.update(epoch=epoch + 1, step=global_step, epoch_seconds=seconds, images_per_s=n * config["batch_size"] / max(seconds, 1e-9), resumed_from_epoch=start_epoch)
        history.append(epoch_metrics)
        if rank == 0:
            print(f"[train {config['method']}] epoch {epoch + 1}/{config['epochs']} loss {epoch_metrics.get('loss', float('nan')):.4f} "
                  f"lr {epoch_metrics.get('lr', 0):.4f} {epoch_metrics['images_per_s']:.0f} img/s ({n} steps, {seconds:.0f}s)", flush=True)
        last = epoch + 1 == config["epochs"]
        if last or (epoch + 1) % config["checkpoint_every"] == 0:
            # Ray Train's local mode (num_workers=0) keeps only a reference to the reported
            # folder instead of copying it, so there the checkpoint goes to a folder that stays
            # (in the run folder, where latest_local_checkpoint finds it after a driver crash).
            keep = config.get("local_checkpoint_dir")
            folder = Path(keep) / f"checkpoint_epoch{epoch + 1:06d}" if keep else None
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            with contextlib.nullcontext(str(folder)) if folder is not None else tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_state(Path(tmp) / STATE_FILE, method, step, epoch + 1, global_step, history, {"method": config["method"], "settings": config["settings"]})
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({k: v for k, v in epoch_metrics.items()}, checkpoint=ckpt)
        else:
            ray.train.report(epoch_metrics)
        if fail_after is not None and epoch + 1 == fail_after and start_epoch < fail_after:
            raise RuntimeError(f"injected fault after epoch {fail_after} (REPRFLOW_FAIL_AFTER_EPOCH)")


def latest_local_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder holding a complete state file under a Ray Train run folder.

    A state without its manifest was being written when the process died: skipped. A state that
    does not match its manifest was modified afterwards: refused with an error, not skipped
    (resuming from an older checkpoint would hide it).
    """
    if not run_dir.is_dir():
        return None
    best, best_epoch = None, -1
    for d in run_dir.glob("checkpoint_*"):
        f = d / STATE_FILE
        if not f.is_file():
            continue
        if not manifest_path(f).is_file():
            print(f"[train] skipping unfinished checkpoint {d} (no manifest)", flush=True)
            continue
        epoch = load_state(f)["epoch"]
        if epoch > best_epoch:
            best, best_epoch = d, epoch
    return best


def _fit_with_controller_retries(config: dict, ds, train, ray_results: Path, name: str):
    """``TorchTrainer.fit()``, started again from the newest checkpoint when the controller fails.

    Ray Train restarts a failed *worker group* itself (``max_failures``), but a failure of its
    controller actor - its process killed, or an error Ray Train classes as not retryable, such
    as its placement group removed while workers start (seen 2026-12-07) - ends ``fit()``. The
    checkpoints are on disk, so up to ``train.controller_retries`` new fits resume from the
    newest one, as after a driver crash. Errors of the training code itself (``WorkerGroupError``
    once ``max_failures`` is spent) are not retried here.
    """
    from ray.exceptions import RayActorError
    from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    for attempt in range(train.controller_retries + 1):
        resume = latest_local_checkpoint(ray_results / name)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={**config, "resume_path": str(resume) if resume else None},
            scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker={"CPU": train.cpus_per_worker}),
            run_config=RunConfig(
                name=name,
                storage_path=str(ray_results),
                failure_config=FailureConfig(max_failures=train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
            datasets={"train": ds},
        )
        try:
            return trainer.fit()
        except (ControllerError, RayActorError) as exc:
            if attempt == train.controller_retries:
                raise
            newest = latest_local_checkpoint(ray_results / name)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            print(f"[train {config['method']}] Ray Train's controller failed ({type(exc).__name__}: {first}); "
                  f"new fit {attempt + 2} of {train.controller_retries + 1} from {newest.name if newest else 'the start'}",
                  file=sys.stderr, flush=True)


def run_trainer(*, key: str, method: str, settings: dict, train, rows: int, files: list[str], storage: Path, seed: int, views, out_dir: Path,
                warm_start: str | Path | None = None, resources: dict[str, dict] | None = None) -> dict:
    """Fit a TorchTrainer for one method and copy its final state into ``out_dir``.

    Returns ``{"history": [...], "state": path}``. Resumes from the newest checkpoint of a
    previous attempt of the same key (driver crash), of this fit (worker crash) or of this
    step's previous fit (controller failure, ``train.controller_retries``); otherwise
    ``warm_start`` (a ``state.pt``) gives the starting weights and optimizer state, with the
    epoch counter and schedule restarted (retraining from a champion). ``resources`` are the
    method's references as ``Upstream`` fields (see ``Method.attach``).
    """
    from pipelines.ray_data import views_dataset

    # Checked here, with one clear error, not in workers that Ray would restart max_failures times.
    for path in [warm_start, *[r.get("state_path") for r in (resources or {}).values()]]:
        if path:
            verify_state(Path(path))
    ray_results = storage / "ray_results"
    name = f"train-{key}"
    # Checked now rather than when the first epoch ends: disk space for the kept checkpoints
    # (two, plus one being written) and the final copy in the step folder.
    probe = build_method(method, settings)
    check_checkpoint_storage(ray_results, 4 * checkpoint_bytes(probe))
    check_checkpoint_storage(out_dir, checkpoint_bytes(probe))
    del probe
    threads = train.threads_per_worker or max(1, (os.cpu_count() or 2) // max(1, train.num_workers))
    fail_after = os.environ.get("REPRFLOW_FAIL_AFTER_EPOCH")
    config = {
        "method": method, "settings": settings, "seed": seed, "threads": threads,
        "use_gpu": train.use_gpu, "batch_size": train.batch_size, "epochs": train.epochs, "rows": rows,
        "shuffle_buffer_batches": train.shuffle_buffer_batches,
        "checkpoint_every": train.checkpoint_every_epochs,
        "local_checkpoint_dir": str(ray_results / name) if train.num_workers == 0 else None,
        "warm_start_path": str(warm_start) if warm_start else None,
        "fail_after_epoch": int(fail_after) if fail_after else None,
        "fault": fault_settings(),
        "resources": resources or {},
    }
    ds = views_dataset(files, views, train.decode_size, train.data_batch_size, seed, shuffle=train.shuffle_buffer_batches > 0)
    lock = _LOCAL_MODE_LOCK if train.num_workers == 0 else _SLOTS.hold(train.num_workers * train.cpus_per_worker, threads=train.num_workers * threads,
                                                                       cores=_single_machine_cores())
    with lock:
        result = _fit_with_controller_retries(config, ds, train, ray_results, name)
    final = None
    if result.checkpoint is not None:
        final = Path(result.checkpoint.to_directory()) / STATE_FILE
    if final is None or not final.is_file():
        final = (latest_local_checkpoint(ray_results / name) or Path("/nonexistent")) / STATE_FILE
    if not final.is_file():
        raise RuntimeError(f"training finished without a checkpoint under {ray_results / name}")
    target = out_dir / STATE_FILE
    verify_state(final)
    write_state_file(final, target)
    state = load_state(target)
    (out_dir / "history.json").write_text(json.dumps(state["history"], indent=2))
    return {"history": state["history"], "state": str(target)}
