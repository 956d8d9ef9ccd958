"""The one generic Ray Train loop: trains any method that follows the method contract.

It knows nothing of any method: it builds the method from its registry name and settings,
iterates its Ray Data shard (views already built by Ray Data), steps the optimizer through
:class:`components.training.TrainStep`, checkpoints every N epochs and reports per-epoch
metrics. The Ray Train run name is the step's key (hash of inputs + settings), so a changed
config never resumes another config's checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from components.methods.base import Upstream
from components.methods.registry import build_method
from components.training import TrainStep, prepare_batch

STATE_FILE = "state.pt"
# Local mode runs the train function in the driver process, whose Ray Train context is global:
# two local-mode fits must not overlap (distributed fits run in their own actors and may).
_LOCAL_MODE_LOCK = threading.Lock()
_SLOTS: threading.BoundedSemaphore | None = None
_SLOTS_LOCK = threading.Lock()


def _training_slots(workers: int, cpus_per_worker: float) -> threading.BoundedSemaphore:
    """How many distributed fits may run at once without starving Ray Data of CPUs.

    Two CPUs stay free for the data path; the rest is shared by concurrent worker groups.
    """
    global _SLOTS
    import ray

    with _SLOTS_LOCK:
        if _SLOTS is None:
            total = ray.cluster_resources().get("CPU", 1)
            _SLOTS = threading.BoundedSemaphore(max(1, int((total - 2) // max(1.0, workers * cpus_per_worker))))
        return _SLOTS


def save_state(path: Path, method, step: TrainStep, epoch: int, global_step: int, history: list[dict], meta: dict) -> None:
    """Write the full training state (method incl. buffers/EMA/banks, optimizer, counters)."""
    state = {
        "method": method.state_dict(),
        "optim": step.state_dict(),
        "epoch": epoch,
        "global_step": global_step,
        "history": history,
        "meta": meta,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict:
    """Read a training state without executing code (``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


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
        state = load_state(Path(config["warm_start_path"]))
        method.load_state_dict(state["method"])
        step.load_state_dict(state["optim"])
        if rank == 0:
            print(f"[train {config['method']}] warm start from {config['warm_start_path']} (its epoch {state['epoch']}); schedule restarts", flush=True)

    shard = ray.train.get_dataset_shard("train")
    fail_after = config.get("fail_after_epoch")
    for epoch in range(start_epoch, config["epochs"]):
        method.train()
        t0, n, sums = time.monotonic(), 0, {}
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=None):
            metrics = step(prepare_batch(batch, device), global_step)
            global_step += 1
            n += 1
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
    """The newest checkpoint folder holding a complete state file under a Ray Train run folder."""
    if not run_dir.is_dir():
        return None
    best, best_epoch = None, -1
    for d in run_dir.glob("checkpoint_*"):
        f = d / STATE_FILE
        if f.is_file():
            try:
                epoch = load_state(f)["epoch"]
            except Exception:  # noqa: BLE001 - a torn checkpoint is skipped, not fatal
                continue
            if epoch > best_epoch:
                best, best_epoch = d, epoch
    return best


def run_trainer(*, key: str, method: str, settings: dict, train, rows: int, files: list[str], storage: Path, seed: int, views, out_dir: Path,
                warm_start: str | Path | None = None, resources: dict[str, dict] | None = None) -> dict:
    """Fit a TorchTrainer for one method and copy its final state into ``out_dir``.

    Returns ``{"history": [...], "state": path}``. Resumes from the newest checkpoint of a
    previous attempt of the same key (driver crash) or of this fit (worker crash); otherwise
    ``warm_start`` (a ``state.pt``) gives the starting weights and optimizer state, with the
    epoch counter and schedule restarted (retraining from a champion). ``resources`` are the
    method's references as ``Upstream`` fields (see ``Method.attach``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_data import views_dataset

    ray_results = storage / "ray_results"
    name = f"train-{key}"
    resume = latest_local_checkpoint(ray_results / name)
    threads = train.threads_per_worker or max(1, (os.cpu_count() or 2) // max(1, train.num_workers))
    fail_after = os.environ.get("REPRFLOW_FAIL_AFTER_EPOCH")
    config = {
        "method": method, "settings": settings, "seed": seed, "threads": threads,
        "use_gpu": train.use_gpu, "batch_size": train.batch_size, "epochs": train.epochs, "rows": rows,
        "checkpoint_every": train.checkpoint_every_epochs,
        "local_checkpoint_dir": str(ray_results / name) if train.num_workers == 0 else None,
        "resume_path": str(resume) if resume else None,
        "warm_start_path": str(warm_start) if warm_start else None,
        "fail_after_epoch": int(fail_after) if fail_after else None,
        "resources": resources or {},
    }
    ds = views_dataset(files, views, train.decode_size, train.data_batch_size, seed)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker={"CPU": train.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=str(ray_results),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
    )
    lock = _LOCAL_MODE_LOCK if train.num_workers == 0 else _training_slots(train.num_workers, train.cpus_per_worker)
    with lock:
        result = trainer.fit()
    final = None
    if result.checkpoint is not None:
        final = Path(result.checkpoint.to_directory()) / STATE_FILE
    if final is None or not final.is_file():
        final = (latest_local_checkpoint(ray_results / name) or Path("/nonexistent")) / STATE_FILE
    if not final.is_file():
        raise RuntimeError(f"training finished without a checkpoint under {ray_results / name}")
    target = out_dir / STATE_FILE
    target.write_bytes(final.read_bytes())
    state = load_state(target)
    (out_dir / "history.json").write_text(json.dumps(state["history"], indent=2))
    return {"history": state["history"], "state": str(target)}
