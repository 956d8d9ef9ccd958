"""BRIEF descriptor throughput: ours (batched torch) vs OpenCV contrib, same images and keypoints.

Both sides start from uint8 grey images and keypoint positions and end with packed 256-bit
descriptors, smoothing included (ours: Gaussian 9x9, the paper mode; OpenCV: its integral
image). One CPU thread each (``torch.set_num_threads(1)``, ``cv2.setNumThreads(1)``); the best
of ``--repeats`` timed runs after a warm-up. Ours describes the whole batch in one call; OpenCV
is called once per image (its API). When CUDA is available, ours is also timed on the GPU
(images already on the device, synchronised).

Workloads: the matching benchmark's photographs (8 x 384 px, ~500 keypoints each) and a
pipeline-like batch (256 scenes at 64 px, 32 keypoints each).

    python bench/brief_speed.py            # ~30 s
    python bench/brief_speed.py --json out/brief_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.brief.descriptor import BriefConfig, BriefExtractor  # noqa: E402
from components.brief.detector import detect_keypoints  # noqa: E402


def _best(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def workloads() -> dict[str, tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """``name -> (uint8 images (B, H, W), keypoints (B, K, 2), valid (B, K))``; keypoints by our Harris."""
    from bench.brief_matching import MARGIN, load_images
    from components.data.decode import decode_image
    from components.data.scenes import render_scene

    out = {}
    photos = load_images()
    kp = detect_keypoints(torch.from_numpy(photos).float(), 500, MARGIN, "harris", nms_radius=3, threshold_rel=1e-4)
    out["photos 8x384px"] = (photos, kp.xy, kp.valid)
    scenes = np.stack([decode_image(render_scene(0, "val", i)["image"], 64)[0] for i in range(256)])
    gray = torch.from_numpy(scenes).float() @ torch.tensor([0.299, 0.587, 0.114])
    scenes_gray = gray.round().clamp(0, 255).to(torch.uint8).numpy()
    # OpenCV needs 28 px of border, which leaves nothing of a 64-px scene for the paper's 48-px
    # patch: upscale 2x so that both sides describe the same keypoints with the same geometry.
    up = torch.nn.functional.interpolate(torch.from_numpy(scenes_gray).float().unsqueeze(1), scale_factor=2, mode="bilinear").squeeze(1)
    up_u8 = up.round().clamp(0, 255).to(torch.uint8).numpy()
    kp = detect_keypoints(up, 32, MARGIN, "harris", nms_radius=2, threshold_rel=1e-4)
    out["scenes 256x128px"] = (up_u8, kp.xy, kp.valid)
    return out


def time_ours(imgs: np.ndarray, xy: torch.Tensor, valid: torch.Tensor, device: str, repeats: int) -> float:
    """Seconds for one batched call (grey -> smoothing -> tests -> packing) on ``device``."""
    ext = BriefExtractor(BriefConfig())
    x = torch.from_numpy(imgs).to(device)
    k, v = xy.to(device), valid.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return _best(lambda: ext(x.float(), k, v), repeats, sync)


def time_opencv(imgs: np.ndarray, xy: torch.Tensor, valid: torch.Tensor, repeats: int) -> float:
    """Seconds for OpenCV contrib BRIEF (32 bytes) over every image, one compute() per image."""
    import cv2

    brief = cv2.xfeatures2d.BriefDescriptorExtractor_create(32)
    kps = [[cv2.KeyPoint(float(x), float(y), 7.0) for x, y in xy[i][valid[i]].tolist()] for i in range(len(imgs))]
    n = sum(len(k) for k in kps)

    def run():
        """One pass over every image (checks that OpenCV kept every keypoint)."""
        got = sum(len(brief.compute(im, k)[0]) for im, k in zip(imgs, kps))
        assert got == n, "OpenCV dropped keypoints: the comparison would not be like for like"

    return _best(run, repeats)


def main() -> int:
    """Time every workload, print the table and the JSON."""
    import cv2

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = []
    for name, (imgs, xy, valid) in workloads().items():
        n = int(valid.sum())
        ours = time_ours(imgs, xy, valid, "cpu", args.repeats)
        ocv = time_opencv(imgs, xy, valid, args.repeats)
        row = {"workload": name, "descriptors": n, "ours_cpu_per_s": n / ours, "opencv_cpu_per_s": n / ocv, "ratio_ours_over_opencv": ocv / ours}
        if torch.cuda.is_available():
            row["ours_gpu_per_s"] = n / time_ours(imgs, xy, valid, "cuda", args.repeats)
        rows.append(row)
    result = {"threads": 1, "bits": 256, "torch": torch.__version__, "opencv": cv2.__version__, "platform": platform.platform(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "rows": rows}
    print("| workload | descriptors | ours CPU (desc/s) | OpenCV CPU (desc/s) | ours / OpenCV | ours GPU (desc/s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gpu = f"{r['ours_gpu_per_s']:,.0f}" if "ours_gpu_per_s" in r else "- (no CUDA)"
        print(f"| {r['workload']} | {r['descriptors']} | {r['ours_cpu_per_s']:,.0f} | {r['opencv_cpu_per_s']:,.0f} | {r['ratio_ours_over_opencv']:.2f}x | {gpu} |")
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
