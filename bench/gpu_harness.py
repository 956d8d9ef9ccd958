"""The harness of ``bench/gpu.py`` (the GPU benchmark script): the JSON report, the time budget,
the anchor process, step and loader timing, FLOP counting, the synthetic JPEG shards, the matrix-
product peak, ``--prepare`` (the files the device call carries) and the summary table.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CARRY = ROOT / "build" / "gpucarry"  # /build/ is git-ignored: it travels only when carried

import numpy as np  # noqa: E402
import torch  # noqa: E402


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
    """The seconds a whole run may take, counted from its creation."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
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
# timing


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
    """FLOPs of one step on ``batch`` (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step(batch, index)
    return float(fc.get_total_flops())


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


# ---------------------------------------------------------------------------------------------
# shards, peak, --prepare, summary


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
