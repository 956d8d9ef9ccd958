"""GPU benchmarks of issue 10, in ONE device call, side by side with the anchor (lightly's recipe).

P1  end to end: SimCLR ResNet-50, 224 px, batch 256, bf16, through reprflow's own data path:
    Parquet shards -> host threads/processes decode each JPEG once to 256x256 uint8 (the
    pipeline's decoder, into pinned memory, prefetched) -> random views batched ON THE GPU with
    per-sample parameters (components/data/gpu_views.py: copy + views on a side stream, one
    step ahead) -> components.training.TrainStep. Against reprflow's model-step-only figure
    from the same run (goal >= 0.90x) and the anchor's end to end (goal >= 3.4x). The loaders
    are also timed alone (threads, processes, nvJPEG on the device).
P2  model steps, bf16, against the anchor's eager steps (goal >= 1.3x): SimCLR R50,
    DINO ViT-S/16 2x224 + 6x96, MAE ViT-B/16 (75 % masked; goal MFU >= 35 % of the bf16 matrix
    product peak measured here). Each as ``eager`` (channels-last for the ResNet, fused
    optimizer, TF32, cuDNN autotuning, no host sync per step) and ``compiled`` (+ torch.compile).
    MAE is the registry's (components/methods/mae.py).

The anchor (../shared/bench/gpu_anchor.py) runs first, in its own process, so neither run
shares the GPU or the cores with the other. Compiled variants are skipped when the time
budget would be overrun (each skip is printed); ``--only`` reruns a subset in a second call.

    python bench/gpu.py --prepare      # here: anchor copy + wheels (lightly, pydantic) -> build/gpucarry
    python bench/gpu.py --quick        # CPU smoke test, tiny sizes (< 2 min), no anchor
    # the device call (carry ["build/gpucarry"]), one line:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site build/gpucarry/*.whl && \
      export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 bench/gpu.py --anchor build/gpucarry/gpu_anchor.py --out $OUT

The harness (report, time budget, anchor process, step and loader timing, shards, matrix-product
peak, ``--prepare``, summary table) lives in ``bench/gpu_harness.py``.

Prints one JSON line per figure, a table last, and writes $OUT/gpu_results.json after each figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.gpu_harness import (CARRY, Budget, Report, count_flops, make_shards, matmul_peak, prepare, run_anchor, run_for,  # noqa: E402
                               summary, time_step)

# Compile cost guesses (s) on an H200 with 16 cores and a cold cache; a variant is skipped when
# fewer seconds than this plus its timing are left in the budget.
COMPILE_COST = {"simclr": 90, "mae": 75, "dino": 110}


# ---------------------------------------------------------------------------------------------
# methods


def simclr_settings(quick: bool) -> dict:
    if quick:
        return {"image_size": 32, "backbone": {"name": "resnet18", "stem": "imagenet"}, "proj_hidden_dim": 64, "proj_dim": 32, "crop_scale": (0.08, 1.0)}
    # lightly's SimCLRTransform (the anchor): min_scale 0.08, jitter 0.8/0.8/0.8/0.2 p 0.8, gray 0.2, blur 0.5
    return {"image_size": 224, "backbone": {"name": "resnet50", "stem": "imagenet"}, "proj_hidden_dim": 2048, "proj_dim": 128, "crop_scale": (0.08, 1.0)}


def dino_settings(quick: bool) -> dict:
    if quick:
        vit = {"name": "vit_small", "patch_size": 16, "img_size": 32, "depth": 1}
        return {"image_size": 32, "local_size": 16, "n_local": 2, "backbone": vit, "out_dim": 1024, "hidden_dim": 64, "bottleneck_dim": 32, "freeze_last_layer_epochs": 0}
    # The anchor's lightly DINO: ViT-S/16, head 2048-256-65536, no last-layer freeze.
    vit = {"name": "vit_small", "patch_size": 16, "img_size": 224}
    return {"image_size": 224, "local_size": 96, "n_local": 6, "backbone": vit, "freeze_last_layer_epochs": 0}


def mae_settings(quick: bool) -> dict:
    if quick:
        return {"image_size": 32, "backbone": {"name": "vit_base", "patch_size": 16, "img_size": 32, "depth": 1}, "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4}
    return {"image_size": 224, "backbone": {"name": "vit_base", "patch_size": 16, "img_size": 224}, "mask_ratio": 0.75,
            "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}


def build_mae(quick: bool) -> tuple[nn.Module, str]:
    """(MAE module, where it came from): ``components/methods/mae.py`` through the registry."""
    from components.methods.registry import build_method

    return build_method("mae", mae_settings(quick)), "registry"


# ---------------------------------------------------------------------------------------------
# P2: model steps


def views_batch(recipe, n: int, dev: torch.device, decode: int, channels_last: bool) -> dict:
    """A real batch of views (made by the device path) from random 'decoded' images."""
    from components.data.gpu_views import DeviceViews

    imgs = torch.randint(0, 256, (n, decode, decode, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return DeviceViews(recipe, dev, seed=0, channels_last=channels_last, side_stream=False)(imgs)


def bench_model(name: str, build, batch_size: int, variants: list[tuple[str, dict]], args, dev, peak, report: Report, budget: Budget) -> dict:
    """Time each variant of one method's step; returns {variant: TrainStep} of those that ran."""
    from components.training import TrainStep

    amp = torch.bfloat16 if dev.type == "cuda" else None  # CPU bf16 autocast is slow: the smoke test skips it
    warmup, iters = (1, 1) if args.quick else (5, 20)
    steps, flops = {}, None
    variants = list(variants)
    for variant, perf in variants:
        if perf.get("compile", "off") != "off" and not args.quick:
            need = COMPILE_COST.get(name, 90) + 15
            if budget.left() < need:
                report.add(figure=f"{name}_step", variant=variant, skipped=f"budget: ~{need}s needed, {budget.left():.0f}s left")
                continue
        try:
            torch.manual_seed(0)
            method, source = build()
            method = method.to(dev)
            step = TrainStep(method, batch_size, 10_000, 10, amp_dtype=amp, perf=perf)
            batch = views_batch(method.views, batch_size, dev, args.decode_size, perf.get("channels_last", False))
            dt, first, loss0 = time_step(step, batch, dev, warmup, iters)
            if flops is None:
                flops = count_flops(step, batch, warmup + iters)
            row = report.add(figure=f"{name}_step", variant=variant, source=source, batch=batch_size, img_per_s=batch_size / dt, step_ms=dt * 1e3,
                             first_step_s=first, loss_step0=loss0, tflops=flops / dt / 1e12, mfu=flops / dt / peak, perf=perf, amp=str(amp))
            steps[variant] = (step, batch, row)
        except Exception as e:  # noqa: BLE001 - keep the other figures
            report.add(figure=f"{name}_step", variant=variant, error=repr(e)[:400])
            if perf.get("compile") == "method":  # e.g. host-side work in forward: compile the sub-modules instead
                variants.append((variant + "-modules", {**perf, "compile": "modules"}))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return steps


def perf_variants(convnet: bool, compile_how: str, quick: bool, no_compile: bool) -> list[tuple[str, dict]]:
    eager = {"channels_last": convnet, "fused_optimizer": True, "sync_metrics": False, "tf32": True, "cudnn_benchmark": True}
    out = [("eager", eager)]
    if not no_compile:
        out.append(("compiled", {**eager, "compile": compile_how, **({"compile_backend": "eager"} if quick else {})}))
    return out


def best(steps: dict) -> tuple[str, tuple] | None:
    if not steps:
        return None
    return max(steps.items(), key=lambda kv: kv[1][2]["img_per_s"])


# ---------------------------------------------------------------------------------------------
# P1: end to end


def bench_p1(files: list[str], recipe, simclr: tuple | None, args, dev, report: Report, budget: Budget) -> None:
    from components.data.gpu_decode import decode_jpegs
    from components.data.gpu_loader import DecodedBatches, shard_batches
    from components.data.gpu_views import DeviceViews

    stream = files * 200  # one long pass: no drain of the prefetch queue between epochs
    # The views' layout is the one the step was timed (and compiled) with.
    views = DeviceViews(recipe, dev, seed=0, channels_last=bool(simclr and simclr[1][0].perf.channels_last))
    loaders = {}

    def decoded(pool):
        return DecodedBatches(stream, args.decode_size, args.batch, workers=args.workers, pool=pool)

    for pool in ("thread", "process"):
        try:
            with decoded(pool) as loader:
                ips = run_for(args.loader_seconds, views.iterate(loader), lambda b: None, dev, args.warm)
            loaders[pool] = ips
            report.add(figure="p1_loader_only", decoder=f"PIL in {args.workers} {pool}{'es' if pool == 'process' else 's'}", views="device", img_per_s=ips)
        except Exception as e:  # noqa: BLE001
            report.add(figure="p1_loader_only", decoder=pool, error=repr(e)[:400])
    try:
        def nvjpeg():
            for rows in shard_batches(stream, args.batch):
                yield decode_jpegs(rows["image"], rows["id"], args.decode_size, dev)[0]

        ips = run_for(args.loader_seconds, views.iterate(nvjpeg()), lambda b: None, dev, args.warm)
        report.add(figure="p1_loader_only", decoder=f"nvJPEG on {dev.type} (torchvision.io.decode_jpeg)", views="device", img_per_s=ips)
        loaders["nvjpeg"] = ips
    except Exception as e:  # noqa: BLE001
        report.add(figure="p1_loader_only", decoder="nvjpeg", error=repr(e)[:400])
    if simclr is None or not loaders:
        report.add(figure="p1_end_to_end", error="no SimCLR step or no loader ran")
        return
    variant, (step, _, row) = simclr
    # End to end with the loaders fast enough alone to feed the step (at most two, fastest
    # first): threads share the GIL with the step's kernel launches, processes do not.
    fast = sorted((p for p in loaders if loaders[p] >= 1.05 * row["img_per_s"]), key=loaders.get, reverse=True)[: 1 if args.quick else 2]
    i = [10_000]

    def train(b):
        step(b, i[0])
        i[0] += 1

    for pool in fast or [max(loaders, key=loaders.get)]:
        if report.get("p1_end_to_end") and budget.left() < args.seconds + 30:
            report.add(figure="p1_end_to_end", loader=pool, skipped=f"budget: {budget.left():.0f}s left")
            continue
        try:
            if pool == "nvjpeg":
                ips = run_for(args.seconds, views.iterate(nvjpeg()), train, dev, args.warm)
            else:
                with decoded(pool) as loader:
                    ips = run_for(args.seconds, views.iterate(loader), train, dev, args.warm)
            step.check_finite()
            report.add(figure="p1_end_to_end", loader=pool, step_variant=variant, batch=args.batch, img_per_s=ips,
                       step_only_img_per_s=row["img_per_s"], ratio_to_step_only=ips / row["img_per_s"])
        except Exception as e:  # noqa: BLE001
            report.add(figure="p1_end_to_end", loader=pool, error=repr(e)[:400])


# ---------------------------------------------------------------------------------------------


def check_device_views(dev: torch.device, size: int, decode: int, report: Report) -> None:
    """Views on the device vs the CPU for the same seed: how many uint8 levels apart."""
    from components.data.views import make_views, two_crop_views

    recipe = two_crop_views(size, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    imgs = torch.randint(0, 256, (16, decode, decode, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cpu = make_views(imgs, recipe, torch.Generator().manual_seed(1))
    got = make_views(imgs.to(dev), recipe, torch.Generator().manual_seed(1))
    diff = torch.stack([(got[k].cpu().int() - cpu[k].int()).abs() for k in cpu])
    report.add(figure="check_views_device_vs_cpu", device=dev.type, max_levels=int(diff.max()), frac_differing=float((diff > 0).float().mean()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (CPU smoke test)")
    ap.add_argument("--prepare", action="store_true", help="copy the anchor and download the wheels into build/gpucarry, then exit")
    ap.add_argument("--anchor", default=None, help="path of gpu_anchor.py to run first ('auto': build/gpucarry or ../shared/bench)")
    ap.add_argument("--anchor-timeout", type=float, default=200)
    ap.add_argument("--budget", type=float, default=330, help="seconds for the whole script, anchor included")
    ap.add_argument("--only", default="simclr,p1,mae,dino", help="comma list of simclr, p1, mae, dino")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--seconds", type=float, default=None, help="P1 end-to-end timing")
    ap.add_argument("--loader-seconds", type=float, default=None)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: cores - 2, as the anchor's DataLoader)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_results.json and anchor.log")
    args = ap.parse_args()
    if args.prepare:
        return prepare()
    budget = Budget(args.budget)
    q = args.quick
    args.batch = 8 if q else 256
    args.decode_size = 48 if q else 256
    args.seconds = args.seconds or (2 if q else 15)
    args.loader_seconds = args.loader_seconds or (0.5 if q else 4)
    args.warm = 1 if q else 3  # batches before the clock starts (the anchor: 3)
    args.workers = args.workers or (2 if q else max(1, (os.cpu_count() or 2) - 2))
    only = set(args.only.split(","))
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    anchor = {}
    path = args.anchor
    if path == "auto":
        path = next((str(p) for p in (CARRY / "gpu_anchor.py", ROOT.parent / "shared" / "bench" / "gpu_anchor.py") if p.is_file()), None)
    if path:
        anchor = run_anchor(Path(path).resolve(), q, args.anchor_timeout, out)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cores": os.cpu_count(), "quick": q, "command": " ".join(sys.argv), "anchor": anchor}
    report = Report(out, meta)
    peak = matmul_peak(dev, q)
    report.add(figure="bf16_matmul_peak" if dev.type == "cuda" else "fp32_matmul_peak", tflops=peak / 1e12)
    try:
        check_device_views(dev, 32 if q else 224, args.decode_size, report)
    except Exception as e:  # noqa: BLE001
        report.add(figure="check_views_device_vs_cpu", error=repr(e)[:400])

    from components.methods.registry import build_method

    simclr = None
    recipe = build_method("simclr", simclr_settings(q)).views
    if "simclr" in only or "p1" in only:
        simclr = best(bench_model("simclr", lambda: (build_method("simclr", simclr_settings(q)), "registry"), args.batch,
                                  perf_variants(True, "method", q, args.no_compile), args, dev, peak, report, budget))
    if "p1" in only:
        with tempfile.TemporaryDirectory() as tmp:
            files = make_shards(tmp, 64 if q else 4096, args.decode_size, args.workers)
            bench_p1(files, recipe, simclr, args, dev, report, budget)
    simclr = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "mae" in only:
        bench_model("mae", lambda: build_mae(q), 4 if q else 256, perf_variants(False, "method", q, args.no_compile), args, dev, peak, report, budget)
    if "dino" in only:
        bench_model("dino", lambda: (build_method("dino", dino_settings(q)), "registry"), 4 if q else 128,
                    perf_variants(False, "modules", q, args.no_compile), args, dev, peak, report, budget)
    summary(report, anchor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
