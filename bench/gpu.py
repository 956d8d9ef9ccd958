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

Prints one JSON line per figure, a table last, and writes $OUT/gpu_results.json after each figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CARRY = ROOT / "build" / "gpucarry"  # /build/ is git-ignored: it travels only when carried

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# Compile cost guesses (s) on an H200 with 16 cores and a cold cache; a variant is skipped when
# fewer seconds than this plus its timing are left in the budget.
COMPILE_COST = {"simclr": 90, "mae": 75, "dino": 110}


class Report:
    """Figures as JSON lines, kept in a file that survives a timeout."""

    def __init__(self, out: Path | None, meta: dict):
        self.rows: list[dict] = []
        self.meta = meta
        self.path = out / "gpu_results.json" if out else None

    def add(self, **row) -> dict:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            self.path.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        return row

    def get(self, figure: str, **match) -> dict | None:
        for r in self.rows:
            if r.get("figure") == figure and all(r.get(k) == v for k, v in match.items()) and "error" not in r and "skipped" not in r:
                return r
        return None


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------------------------------
# the anchor


def run_anchor(path: Path, quick: bool, timeout: float, out: Path | None) -> dict[str, dict]:
    """Run the anchor script in its own process; returns its JSON figures by name."""
    cmd = [sys.executable, str(path)] + (["--quick"] if quick else [])
    print(f"[anchor] {' '.join(cmd)}", flush=True)
    figures: dict[str, dict] = {}
    lines = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(path.parent))
    t0 = time.monotonic()
    try:
        for line in proc.stdout:
            lines.append(line)
            print(f"[anchor] {line.rstrip()}", flush=True)
            if line.startswith("{"):
                try:
                    row = json.loads(line)
                    figures[row.get("figure", "?")] = row
                except json.JSONDecodeError:
                    pass
            if time.monotonic() - t0 > timeout:
                proc.kill()
                print(f"[anchor] killed after {timeout:.0f}s", flush=True)
                break
    finally:
        proc.wait()
    if out:
        (out / "anchor.log").write_text("".join(lines))
    return figures


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


def time_step(step, batch: dict, dev: torch.device, warmup: int, iters: int) -> tuple[float, float, float]:
    """(seconds per step, seconds of the first step incl. compilation, loss of the first step)."""
    t = time.perf_counter()
    out = step(batch, 0)
    sync(dev)
    first = time.perf_counter() - t
    loss0 = float(out["loss"])
    for i in range(1, warmup):
        step(batch, i)
    sync(dev)
    t = time.perf_counter()
    for i in range(iters):
        step(batch, warmup + i)
    sync(dev)
    dt = (time.perf_counter() - t) / iters
    step.check_finite()
    return dt, first, loss0


def count_flops(step, batch: dict, index: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step(batch, index)
    return float(fc.get_total_flops())


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


def make_shards(folder: str, n: int, size: int, workers: int) -> list[str]:
    """The anchor's synthetic JPEGs (random 16x16 colours, bicubic to size x size, quality 90) as shards."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from components.data.shards import write_shards

    rng = np.random.default_rng(0)
    lows = [rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8) for _ in range(n)]

    def encode(low):
        buf = io.BytesIO()
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    with ThreadPoolExecutor(workers) as ex:
        blobs = list(ex.map(encode, lows))
    return write_shards(({"id": f"img{i}", "image": b} for i, b in enumerate(blobs)), folder, rows_per_shard=1024)


def run_for(seconds: float, batches, consume, dev: torch.device, warm: int) -> float:
    """Images/s over ``seconds`` after ``warm`` batches (the anchor's way of timing its loader)."""
    n, t0, k = 0, None, 0
    for b in batches:
        consume(b)
        k += 1
        if k == warm:
            sync(dev)
            t0 = time.perf_counter()
        elif k > warm:
            n += next(iter(b.values())).shape[0]
            if time.perf_counter() - t0 > seconds:
                break
    sync(dev)
    return n / (time.perf_counter() - t0)


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


def matmul_peak(dev: torch.device, quick: bool) -> float:
    """bf16 matrix-product FLOP/s measured here (the anchor's way: 8192^3, 3 warm-up, mean of 10)."""
    n = 512 if quick else 8192
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(dev)
    return 2 * n**3 / ((time.perf_counter() - t) / 10)


def check_device_views(dev: torch.device, size: int, decode: int, report: Report) -> None:
    """Views on the device vs the CPU for the same seed: how many uint8 levels apart."""
    from components.data.views import make_views, two_crop_views

    recipe = two_crop_views(size, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    imgs = torch.randint(0, 256, (16, decode, decode, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cpu = make_views(imgs, recipe, torch.Generator().manual_seed(1))
    got = make_views(imgs.to(dev), recipe, torch.Generator().manual_seed(1))
    diff = torch.stack([(got[k].cpu().int() - cpu[k].int()).abs() for k in cpu])
    report.add(figure="check_views_device_vs_cpu", device=dev.type, max_levels=int(diff.max()), frac_differing=float((diff > 0).float().mean()))


def prepare() -> int:
    """Fill build/gpucarry with what the device lacks: the anchor, lightly and pydantic wheels (~3 MiB)."""
    CARRY.mkdir(parents=True, exist_ok=True)
    anchor = ROOT.parent / "shared" / "bench" / "gpu_anchor.py"
    shutil.copy(anchor, CARRY / "gpu_anchor.py")
    from importlib.metadata import version

    pins = ["lightly==1.6.0", f"pydantic=={version('pydantic')}", f"pydantic-core=={version('pydantic-core')}",
            f"annotated-types=={version('annotated-types')}", f"typing-inspection=={version('typing-inspection')}",
            f"typing-extensions=={version('typing-extensions')}"]  # pydantic wants a newer one than the device may have
    plat = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        plat += ["--platform", p]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *plat, "-d", str(CARRY), *pins], check=True)
    size = sum(f.stat().st_size for f in CARRY.iterdir()) / 2**20
    print(f"{CARRY} ({size:.1f} MiB): {sorted(f.name for f in CARRY.iterdir())}")
    return 0


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


def summary(report: Report, anchor: dict) -> None:
    """The table of targets (ours vs the anchor) and every figure."""
    def ips(r):
        return r["img_per_s"] if r and "img_per_s" in r else None

    def fmt(x, spec=".0f"):
        return "-" if x is None else format(x, spec)

    def ratio(a, b):
        return a / b if a and b else None

    def best_of(fig):
        rows = [r for r in report.rows if r.get("figure") == fig and "img_per_s" in r]
        return max(rows, key=lambda r: r["img_per_s"]) if rows else None

    e2e = best_of("p1_end_to_end")
    lines = ["| target | reprflow | reference | ratio | goal |", "|---|---|---|---|---|"]
    a_e2e = ips(anchor.get("lightly_simclr_end_to_end"))
    lines.append(f"| P1 SimCLR R50 224 end to end vs own step | {fmt(ips(e2e))} img/s | {fmt(e2e and e2e['step_only_img_per_s'])} img/s step only | "
                 f"{fmt(e2e and e2e['ratio_to_step_only'], '.2f')}x | >= 0.90x |")
    lines.append(f"| P1 SimCLR R50 224 end to end vs anchor | {fmt(ips(e2e))} img/s | {fmt(a_e2e)} img/s lightly DataLoader | {fmt(ratio(ips(e2e), a_e2e), '.2f')}x | >= 3.4x |")
    summary_rows = {"p1": {"end_to_end": ips(e2e), "vs_step": e2e and e2e["ratio_to_step_only"], "vs_anchor": ratio(ips(e2e), a_e2e)}}
    for name, afig, label in (("simclr", "simclr_r50_model_step", "SimCLR R50 224 step"), ("dino", "dino_vits16_model_step", "DINO ViT-S/16 2x224+6x96 step"),
                              ("mae", "mae_vitb16_model_step", "MAE ViT-B/16 step")):
        b = best_of(f"{name}_step")
        a = ips(anchor.get(afig))
        lines.append(f"| P2 {label} | {fmt(ips(b))} img/s ({b['variant'] if b else '-'}) | {fmt(a)} img/s anchor eager | {fmt(ratio(ips(b), a), '.2f')}x | >= 1.3x |")
        summary_rows[name] = {"img_per_s": ips(b), "variant": b and b["variant"], "vs_anchor": ratio(ips(b), a), "mfu": b and b["mfu"]}
    mae = best_of("mae_step")
    lines.append(f"| P2 MAE ViT-B/16 MFU ({mae['source'] if mae else '-'}) | {fmt(mae and 100 * mae['mfu'], '.1f')} % | "
                 f"{fmt(mae and mae['tflops'], '.0f')} TFLOP/s of the peak | | >= 35 % |")
    print("\n" + "\n".join(lines))
    print("\n| figure | variant / loader | img/s | TFLOP/s | MFU | note |\n|---|---|---|---|---|---|")
    for r in report.rows:
        print(f"| {r['figure']} | {r.get('variant') or r.get('decoder') or r.get('loader') or ''} | {fmt(r.get('img_per_s'))} | {fmt(r.get('tflops'), '.1f')} | "
              f"{fmt(r.get('mfu'), '.3f')} | {r.get('error') or r.get('skipped') or r.get('source') or ''} |")
    for name, r in anchor.items():
        print(f"| anchor {name} | | {fmt(r.get('img_per_s'))} | {fmt(r.get('tflops'), '.1f')} | {fmt(r.get('mfu'), '.3f')} | {r.get('error', '')} |")
    report.meta["summary"] = summary_rows
    report.add(figure="summary", **summary_rows)


if __name__ == "__main__":
    sys.exit(main())
