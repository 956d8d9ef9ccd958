"""CPU benchmarks of issue "Performance": P3 (data path) and P4 (Ray Train overhead), one run.

P3: decode + two SimCLR views at 96 px through reprflow's Ray Data path vs the best torch
    DataLoader (num_workers 0/1/2) with torchvision transforms, same shards, same cores
    (see bench/data_throughput.py, which this reuses).
P4: steady-state SimCLR steps/s of the generic loop under ``TorchTrainer`` (1 worker, all
    cores) vs a plain single-process loop calling the same ``TrainStep`` on the same views;
    the views are materialised first on both sides so only the training path is compared.
    Start-up (Ray + worker group) is reported separately. Because this machine is shared, P4
    also reports each side's CPU time per image over its whole process tree (all of Ray's
    processes for TorchTrainer), which other load moves far less than wall time.
Scale inputs: CPU ms per image of decoding a 256-px JPEG and of making views on the CPU
    (the figures bench/SCALING.md rests on).

    python bench/cpu.py            # < 10 min on 2 cores: table + JSON
    python bench/cpu.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.data import shards as sh  # noqa: E402
from components.data.scenes import scene_rows  # noqa: E402
from components.methods.registry import build_method  # noqa: E402
from components.training import TrainStep, prepare_batch  # noqa: E402

SETTINGS = {"image_size": 32, "proj_hidden_dim": 512, "proj_dim": 128, "optim": {"warmup_epochs": 0}}


def scale_inputs(n: int) -> dict:
    """CPU seconds per image of the data path's stages, for bench/SCALING.md.

    Process time of one thread, so other load on the machine inflates it less than wall time.
    Images are the anchor's 256-px JPEGs (random 16x16 colours, bicubic up, quality 90).
    """
    import io

    from PIL import Image

    from components.data.decode import decode_batch
    from components.data.views import make_views

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((256, 256), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    out = {"images": n, "jpeg_kib": sum(map(len, jpegs)) / n / 1024}
    t = time.process_time()
    imgs, _, _ = decode_batch(jpegs, list(range(n)), 256)
    out["decode_256_ms"] = (time.process_time() - t) / n * 1e3
    simclr = build_method("simclr", {"image_size": 224, "crop_scale": (0.08, 1.0)}).views
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(imgs)
    t = time.process_time()
    for i in range(0, n, 32):
        make_views(x[i : i + 32], simclr, g)
    out["views_2x224_cpu_ms"] = (time.process_time() - t) / n * 1e3
    small, _, _ = decode_batch(jpegs, list(range(n)), 128)
    p3 = build_method("simclr", {**SETTINGS, "image_size": 96}).views
    t = time.process_time()
    for i in range(0, n, 32):
        make_views(torch.from_numpy(small[i : i + 32]), p3, g)
    out["views_2x96_cpu_ms"] = (time.process_time() - t) / n * 1e3
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def _views(n: int, batch: int) -> list[dict[str, np.ndarray]]:
    from components.data.decode import decode_batch
    from components.data.views import make_views

    method = build_method("simclr", SETTINGS)
    rows = list(scene_rows(0, "train", n, 64))
    imgs, _, _ = decode_batch([r["image"] for r in rows], [r["id"] for r in rows], 64)
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(0, n - batch + 1, batch):
        v = make_views(torch.from_numpy(imgs[i : i + batch]), method.views, g)
        out.append({k: t.numpy() for k, t in v.items()})
    return out


def tree_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants (Ray's
    raylet, workers and object store are descendants of the driver that started them)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def plain_loop(batches: list[dict], epochs: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the same TrainStep in this process (epoch 0 is warm-up)."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    method = build_method("simclr", SETTINGS)
    step = TrainStep(method, len(batches[0]["view_0"]), len(batches), epochs + 1)
    s, n, t0, c0 = 0, 0, 0.0, 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            t0, c0 = time.perf_counter(), tree_cpu_seconds()
        for b in batches:
            step(prepare_batch({k: torch.from_numpy(v) for k, v in b.items()}), s)
            s += 1
            n += len(b["view_0"]) if epoch else 0
    return n / (time.perf_counter() - t0), (tree_cpu_seconds() - c0) / n * 1e3


def _train_fn(config):
    import ray.train

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    method = build_method("simclr", SETTINGS)
    shard = ray.train.get_dataset_shard("train")
    step = TrainStep(method, config["batch"], config["steps"], config["epochs"] + 1)
    s, n, t0, c0 = 0, 0, 0.0, 0.0
    for epoch in range(config["epochs"] + 1):
        if epoch == 1:  # the clock and the CPU count of the driver's whole tree (all of Ray) start
            t0, c0 = time.perf_counter(), tree_cpu_seconds(config["driver_pid"])
        for b in shard.iter_torch_batches(batch_size=config["batch"], drop_last=True):
            step(prepare_batch(b), s)
            s += 1
            n += len(b["view_0"]) if epoch else 0
        metrics = {"epoch": epoch, "images_per_s": n / (time.perf_counter() - t0) if epoch else 0.0,
                   "cpu_ms_per_image": (tree_cpu_seconds(config["driver_pid"]) - c0) / n * 1e3 if epoch else 0.0}
        if epoch < config["epochs"]:
            ray.train.report(metrics)
        else:  # Ray Train V2 keeps only metrics reported with a checkpoint (after the clock stopped)
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "metrics.json").write_text(json.dumps(metrics))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_train_loop(batches: list[dict], epochs: int) -> tuple[float, float, float]:
    """(steady-state images/s, start-up seconds, CPU ms per image of all of Ray's processes) under TorchTrainer with one worker."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t_start = time.perf_counter()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=os.environ.get("BENCH_RAY_LOGS") == "1")
    try:
        cols = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        ds = ray.data.from_items([{k: cols[k][i] for k in cols} for i in range(len(cols["view_0"]))]).materialize()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = TorchTrainer(
                _train_fn,
                train_loop_config={"threads": os.cpu_count() or 1, "batch": len(batches[0]["view_0"]), "steps": len(batches), "epochs": epochs, "driver_pid": os.getpid()},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name="bench-p4", storage_path=tmp),
                datasets={"train": ds},
            )
            t_fit = time.perf_counter()
            result = trainer.fit()
        if result.metrics is None:
            raise RuntimeError(f"TorchTrainer reported no metrics (error: {result.error!r})")
        fit_seconds = time.perf_counter() - t_fit
        ips = result.metrics["images_per_s"]
        steady = epochs * len(cols["view_0"]) / ips
        return ips, (t_fit - t_start) + (fit_seconds - steady), result.metrics["cpu_ms_per_image"]
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="p3,p4,scale", help="comma list of p3, p4, scale")
    args = ap.parse_args()
    only = set(args.only.split(","))
    import data_throughput as p3  # noqa: E402  (bench/ is on sys.path when run as a script)

    images, epochs, batch = (512, 1, 128) if args.quick else (2048, 2, 128)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {os.cpu_count()} cores", "quick": args.quick, "load_avg_1min_start": load}
    rows = []
    if "p3" in only:
        with tempfile.TemporaryDirectory() as tmp:
            files = sh.write_shards(scene_rows(0, "train", images, 128), tmp, rows_per_shard=256)
            loaders = {w: p3.bench_dataloader(files, w, epochs, batch) for w in (0, 1, 2)}
            best = max(loaders, key=loaders.get)
            ours = p3.bench_ray(files, epochs, batch, 128)
        results["P3"] = {"dataloader_img_s": loaders, "best_workers": best, "reprflow_img_s": ours, "ratio": ours / loaders[best], "target": 2.0}
        rows.append(f"| P3 data path (2 views, 96 px) | {ours:.0f} img/s Ray Data | {loaders[best]:.0f} img/s DataLoader(num_workers={best}) | {results['P3']['ratio']:.2f}x | >= 2.0x |")
    if "p4" in only:
        batches = _views(512 if args.quick else 1024, 64)
        plain, plain_cpu = plain_loop(batches, 1 if args.quick else 2)
        ray_ips, startup, ray_cpu = ray_train_loop(batches, 1 if args.quick else 2)
        results["P4"] = {"plain_img_s": plain, "torchtrainer_img_s": ray_ips, "ratio": ray_ips / plain, "startup_s": startup, "target": 0.9,
                         "plain_cpu_ms_per_img": plain_cpu, "torchtrainer_cpu_ms_per_img": ray_cpu, "cpu_time_ratio": plain_cpu / ray_cpu}
        rows.append(f"| P4 Ray Train overhead (SimCLR R18 32 px) | {ray_ips:.0f} img/s TorchTrainer | {plain:.0f} img/s plain loop | {results['P4']['ratio']:.2f}x | >= 0.9x |")
        rows.append(f"| P4 in CPU time per image (load-independent) | {ray_cpu:.1f} ms all Ray processes | {plain_cpu:.1f} ms plain loop | {plain_cpu / ray_cpu:.2f}x | >= 0.9x |")
    print("\n| target | ours | reference | ratio | goal |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if "p4" in only:
        print(f"\nTorchTrainer start-up (ray.init + worker group + first epoch overhead): {startup:.1f}s")
    if "scale" in only:
        results["scale_inputs"] = scale = scale_inputs(64 if args.quick else 256)
        print(f"CPU ms per image (one thread, process time): decode 256-px JPEG ({scale['jpeg_kib']:.0f} KiB) {scale['decode_256_ms']:.2f}, "
              f"two 224-px SimCLR views on the CPU {scale['views_2x224_cpu_ms']:.2f}, two 96-px views {scale['views_2x96_cpu_ms']:.2f}")
    results["load_avg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
