"""Data-path throughput: reprflow's Ray Data views vs a torch DataLoader with torchvision transforms.

Both sides read the same Parquet shards, decode every image every epoch, and build two SimCLR
views at 96 px (random resized crop, flip, colour jitter p=0.8, grayscale p=0.2, blur p=0.5),
on the same cores. The baseline gets its best ``num_workers`` of {0, 1, 2}. Ours is the exact
function the pipeline uses (``pipelines.ray_data.views_dataset``).

    python bench/data_throughput.py            # ~3 min on 2 cores; prints a table and JSON
    python bench/data_throughput.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from components.data import shards as sh  # noqa: E402
from components.data.scenes import scene_rows  # noqa: E402
from components.data.views import two_crop_views  # noqa: E402

SIZE = 96


class ShardImages(torch.utils.data.Dataset):
    """Map-style dataset over the encoded images of Parquet shards (decoded per access)."""

    def __init__(self, files: list[str]):
        self.images = [img for f in files for img in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
        from torchvision import transforms as T

        jitter = T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8)
        self.tf = T.Compose([
            T.RandomResizedCrop(SIZE, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), jitter, T.RandomGrayscale(0.2),
            T.RandomApply([T.GaussianBlur(9, (0.1, 2.0))], p=0.5), T.PILToTensor(),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.open(io.BytesIO(self.images[i])).convert("RGB")
        return self.tf(img), self.tf(img)


def _torch_worker_init(_):
    torch.set_num_threads(1)


def bench_dataloader(files: list[str], workers: int, epochs: int, batch: int) -> float:
    torch.set_num_threads(1)
    ds = ShardImages(files)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, worker_init_fn=_torch_worker_init if workers else None, persistent_workers=workers > 0)
    n, t0 = 0, None
    for epoch in range(epochs + 1):  # epoch 0 warms up workers
        if epoch == 1:
            t0 = time.perf_counter()
        for v0, v1 in loader:
            if epoch:
                n += v0.shape[0]
    return n / (time.perf_counter() - t0)


def bench_ray(files: list[str], epochs: int, batch: int, decode_size: int) -> float:
    import ray

    from pipelines.ray_data import views_dataset

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        ds = views_dataset(files, two_crop_views(SIZE, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2), decode_size, batch_size=batch)
        n, t0 = 0, None
        for epoch in range(epochs + 1):
            if epoch == 1:
                t0 = time.perf_counter()
            for b in ds.iter_batches(batch_size=batch, batch_format="numpy"):
                if epoch:
                    n += len(b["view_0"])
        return n / (time.perf_counter() - t0)
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=128, help="side of the stored scenes images")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images, args.epochs = 256, 1
    with tempfile.TemporaryDirectory() as tmp:
        files = sh.write_shards(scene_rows(0, "train", args.images, args.image_size), tmp, rows_per_shard=256)
        results = {}
        for w in (0, 1, 2):
            results[f"DataLoader(num_workers={w})"] = bench_dataloader(files, w, args.epochs, args.batch)
            print(f"  DataLoader num_workers={w}: {results[f'DataLoader(num_workers={w})']:.0f} img/s", flush=True)
        best_name = max(results, key=results.get)
        ours = bench_ray(files, args.epochs, args.batch, args.image_size)
        print(f"  reprflow Ray Data views: {ours:.0f} img/s", flush=True)
    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores", "images": args.images,
        "epochs": args.epochs, "view_size": SIZE, "stored_size": args.image_size,
        "baseline": best_name, "baseline_img_s": results[best_name], "reprflow_img_s": ours, "ratio": ours / results[best_name],
        "all": results,
    }
    print("\n| path | images/s (2 views, 96 px) |\n|---|---|")
    for k, v in results.items():
        print(f"| torch {k} + torchvision | {v:.0f} |")
    print(f"| reprflow Ray Data (batched views) | {ours:.0f} |")
    print(f"\nratio reprflow / best DataLoader ({best_name}): {out['ratio']:.2f}x")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
