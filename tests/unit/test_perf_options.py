"""Opt-in speed paths give the results of the plain ones: device views, the GPU data path's
decoders, and TrainStep's PerfOptions (channels-last, fused optimizers, compile, lazy metrics).

Every test runs on the CPU; where CUDA is present (the device machine) the device cases run too.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from components.data.decode import decode_batch
from components.data.gpu_decode import decode_jpegs
from components.data.gpu_loader import DecodedBatches, decode_to_array
from components.data.gpu_views import DeviceViews
from components.data.shards import write_shards
from components.data.views import ViewSpec, ViewRecipe, make_views, normalize
from components.methods.registry import build_method
from components.training import PerfOptions, TrainStep, prepare_batch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RECIPE = ViewRecipe(views=(ViewSpec(size=24, blur_p=0.5, solarize_p=0.3), ViewSpec(size=12, scale=(0.05, 0.4))))


def _jpeg(arr: np.ndarray, quality: int = 95, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    low = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC))


@pytest.mark.parametrize("device", DEVICES)
def test_device_views_equal_cpu_views_for_the_same_seed(device):
    imgs = torch.randint(0, 256, (6, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ref = {k: normalize(v) for k, v in make_views(imgs, RECIPE, torch.Generator().manual_seed(7)).items()}
    dv = DeviceViews(RECIPE, device, seed=7, channels_last=True)
    batches = list(dv.iterate([imgs, imgs]))  # the side-stream path on CUDA
    first, second = batches[0], batches[1]
    level = 1 / (0.224 * 255)  # one uint8 level after normalisation (largest of the three channels)
    for k in ref:
        got = first[k]
        assert got.device.type == device and got.is_contiguous(memory_format=torch.channels_last)
        diff = (got.cpu() - ref[k]).abs()
        if device == "cpu":
            assert torch.equal(got, ref[k])
        else:  # roi_align/conv on the GPU round differently: at most one level, rarely
            assert diff.max() <= 1.01 * level and (diff > 1e-4).float().mean() < 0.01
        # the generator moves on: the next batch of the same images gets new views
        assert not torch.equal(second[k].cpu(), got.cpu())


def test_decoded_batches_match_decode_batch_and_record_bad_rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"id": f"r{i}", "image": _jpeg(_smooth(rng, 40 + 4 * i, 36))} for i in range(10)]
    rows[3]["image"] = b"not an image"
    files = write_shards(rows, str(tmp_path), rows_per_shard=4)  # batches cross shard files
    want, keep, _ = decode_batch([r["image"] for r in rows], [r["id"] for r in rows], 32)
    with DecodedBatches(files, 32, batch_size=5, workers=2, prefetch=1, pin_memory=False) as loader:
        got = list(loader)
    assert [len(b) for b in got] == [4, 5]  # batch 1 lost its bad row; order kept
    assert torch.equal(torch.cat(got), torch.from_numpy(want))
    with DecodedBatches(files, 32, batch_size=4, workers=2, pin_memory=False) as loader:  # two passes, same workers
        assert [sum(len(b) for b in loader) for _ in range(2)] == [7, 7]  # 10 rows: the short last batch dropped
        assert [b["id"] for b in loader.bad] == ["r3", "r3"]
    arr, bad = decode_to_array([rows[0]["image"], None], ["a", "b"], 32)
    assert arr.shape == (1, 32, 32, 3) and bad[0]["id"] == "b" and "null" in bad[0]["reason"]


@pytest.mark.parametrize("device", DEVICES)
def test_device_jpeg_decode_matches_the_pipeline_decoder(device):
    rng = np.random.default_rng(0)
    same = _smooth(rng, 32, 32)
    big = _smooth(rng, 48, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: must go through decode_image's exif_transpose
    png = io.BytesIO()
    Image.fromarray(same).save(png, format="PNG")
    blobs = [_jpeg(same), _jpeg(big), _jpeg(big, exif=exif), png.getvalue(), _jpeg(same)[:-200], b"", _jpeg(same[..., 0].copy())]
    ids = list(range(len(blobs)))
    want, keep_want, bad_want = decode_batch(blobs, ids, 32)
    got, keep, bad = decode_jpegs(blobs, ids, 32, device)
    assert keep.tolist() == keep_want.tolist() and [r["id"] for r in bad.rows] == [r["id"] for r in bad_want.rows]
    got = got.cpu().permute(0, 2, 3, 1).int()
    want = torch.from_numpy(want).int()
    tol = 0 if device == "cpu" else 3  # nvJPEG's IDCT rounds differently
    for i in (0, 2, 3, 4):  # kept rows: no resize, EXIF (PIL path), PNG (PIL path), grayscale JPEG
        assert (got[i] - want[i]).abs().max() <= tol
    assert (got[1] - want[1]).abs().float().mean() < 2.0  # resized: PIL bilinear vs antialiased bilinear


def _simclr(optim: str = "lars"):
    """A tiny SimCLR (a 1-block ViT: its patch embedding is the convolution channels-last reaches)."""
    backbone = {"name": "vit_tiny", "patch_size": 4, "img_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}
    settings = {"image_size": 16, "proj_hidden_dim": 32, "proj_dim": 16, "backbone": backbone, "optim": {"name": optim, "lr": 0.01, "warmup_epochs": 0}}
    torch.manual_seed(0)
    return build_method("simclr", settings)


def _run(method, perf: dict, steps: int = 2) -> tuple[list[float], dict]:
    imgs = torch.randint(0, 256, (8, 20, 20, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    views = make_views(imgs, method.views, torch.Generator().manual_seed(4))
    step = TrainStep(method, 8, steps, 1, perf=perf)
    losses = [float(step(prepare_batch(views), i)["loss"]) for i in range(steps)]
    step.check_finite()
    return losses, {k: v.detach().clone() for k, v in method.state_dict().items()}


@pytest.mark.parametrize("optim", ["lars", "adamw", "sgd"])
def test_perf_options_do_not_change_training(optim):
    base_losses, base = _run(_simclr(optim), {}, steps=3)
    perf = {"channels_last": True, "fused_optimizer": True, "sync_metrics": False, "tf32": True, "cudnn_benchmark": True}
    fast_losses, fast = _run(_simclr(optim), perf, steps=3)
    assert base_losses[-1] != base_losses[0]  # it trained
    np.testing.assert_allclose(fast_losses, base_losses, rtol=1e-5)
    # AdamW's first updates are ~lr * sign(g): a weight whose gradient is ~0 may move the other
    # way after a rounding difference (channels-last convolutions round differently: 0.24 % of the
    # weights moved > 1e-4 on an AVX2-only EPYC, < 0.2 % on the machine of 2026-11). A different update rule
    # would move most weights, so 1 % still tells the two apart.
    diff = torch.cat([(fast[k] - v).abs().flatten() for k, v in base.items() if v.is_floating_point()])
    assert diff.max() <= 2 * 0.01 * 3 + 1e-6 and (diff > 1e-4).float().mean() < 1e-2


def test_compiled_step_matches_eager_and_keeps_weight_names():
    base_losses, base = _run(_simclr("adamw"), {}, steps=2)
    for how in ("method", "modules"):
        method = _simclr("adamw")
        losses, state = _run(method, {"compile": how, "compile_backend": "eager"}, steps=2)
        assert state.keys() == base.keys()  # checkpoints stay loadable either way
        np.testing.assert_allclose(losses, base_losses, rtol=1e-4)
        torch.testing.assert_close(state["encoder.vit.blocks.0.attn.qkv.weight"], base["encoder.vit.blocks.0.attn.qkv.weight"], rtol=1e-4, atol=1e-5)


def test_lazy_metrics_catch_a_non_finite_loss_at_the_check():
    bad = {"view_0": torch.full((4, 3, 16, 16), float("nan")), "view_1": torch.zeros(4, 3, 16, 16)}
    lazy = TrainStep(_simclr(), 4, 2, 1, perf=PerfOptions(sync_metrics=False))
    out = lazy(bad, 0)
    assert torch.is_tensor(out["loss"])  # no host sync in the step
    with pytest.raises(FloatingPointError, match="since step 0"):
        lazy.check_finite()
    eager = TrainStep(_simclr(), 4, 2, 1)
    with pytest.raises(FloatingPointError, match="at step 0"):
        eager(bad, 0)
    with pytest.raises(ValueError):
        PerfOptions(compile="everything")
