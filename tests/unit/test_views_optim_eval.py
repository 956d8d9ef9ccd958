"""View recipes, optimisation recipes and frozen-feature evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from components.data.views import ViewSpec, augment, crop_boxes, gaussian_blur, make_views, two_crop_views
from components.evaluation.knn import knn_predict, knn_top1
from components.evaluation.linear import fit_linear_probe
from components.optim import OptimRecipe, Schedule, build_optimizer, cosine_schedule, param_groups

IDENTITY = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def _images(n=4, size=16):
    return torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_views_shapes_dtypes_and_per_sample_randomness():
    imgs = _images(8, 32)
    views = make_views(imgs, two_crop_views(24), torch.Generator().manual_seed(0))
    assert set(views) == {"view_0", "view_1"}
    assert views["view_0"].shape == (8, 3, 24, 24) and views["view_0"].dtype == torch.uint8
    assert not torch.equal(views["view_0"], views["view_1"])
    again = make_views(imgs, two_crop_views(24), torch.Generator().manual_seed(0))
    assert torch.equal(views["view_0"], again["view_0"])
    boxes = crop_boxes(1000, 32, 32, ViewSpec(), torch.Generator().manual_seed(0))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 1024
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 1 + 1e-4 and area.std() > 0.1
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 32 + 1e-4).all()


def test_identity_view_and_flip_are_exact():
    imgs = _images(3, 16)
    out = augment(imgs.permute(0, 3, 1, 2).float(), IDENTITY)
    torch.testing.assert_close(out, imgs.permute(0, 3, 1, 2), atol=1, rtol=0)
    flipped = augment(imgs.permute(0, 3, 1, 2).float(), ViewSpec(**{**IDENTITY.__dict__, "flip_p": 1.0}))
    torch.testing.assert_close(flipped, imgs.permute(0, 3, 1, 2).flip(3), atol=1, rtol=0)


def test_grayscale_and_solarize():
    imgs = _images(2, 16).permute(0, 3, 1, 2).float()
    gray = augment(imgs, ViewSpec(**{**IDENTITY.__dict__, "gray_p": 1.0}))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    sol = augment(imgs, ViewSpec(**{**IDENTITY.__dict__, "solarize_p": 1.0}))
    assert (sol <= 128).all()  # every pixel >= 128 was inverted


def test_invert_flips_every_pixel_and_keeps_the_seed_stream_when_off():
    imgs = _images(3, 16).permute(0, 3, 1, 2).float()
    inv = augment(imgs, ViewSpec(**{**IDENTITY.__dict__, "invert_p": 1.0}))
    torch.testing.assert_close(inv, (255 - imgs).to(torch.uint8), atol=1, rtol=0)
    # invert_p = 0 draws nothing: a recipe without it gives the same views as before it existed,
    # and a recipe with it gives the same views up to the inversion of some samples.
    spec = ViewSpec(size=12, scale=(0.5, 1.0), blur_p=0.5)
    plain = augment(imgs, spec, torch.Generator().manual_seed(1))
    half = augment(imgs, ViewSpec(**{**spec.__dict__, "invert_p": 0.5}), torch.Generator().manual_seed(1))
    flipped = [i for i in range(3) if not torch.equal(plain[i], half[i])]
    for i in flipped:
        torch.testing.assert_close(half[i], 255 - plain[i], atol=1, rtol=0)


def test_view_overrides_reach_every_view_of_every_method_and_bad_keys_are_refused():
    from components.errors import ReprflowError
    from components.methods.registry import build_method

    dino = build_method("dino", {"image_size": 16, "local_size": 8, "n_local": 2, "view_overrides": {"invert_p": 0.5, "hue": 0.5}})
    assert [(v.size, v.invert_p, v.hue) for v in dino.views.views] == [(16, 0.5, 0.5)] * 2 + [(8, 0.5, 0.5)] * 2
    byol = build_method("byol", {"image_size": 16, "view_overrides": {"blur_p": 0.0}})
    # only the named field changes: BYOL's asymmetric solarisation stays
    assert [(v.blur_p, v.solarize_p, v.invert_p) for v in byol.views.views] == [(0.0, 0.0, 0.0), (0.0, 0.2, 0.0)]
    with pytest.raises(ReprflowError, match="view_overrides"):
        build_method("simclr", {"view_overrides": {"size": 8}})


def test_view_overrides_config_and_views_name_the_same_viewspec_fields():
    """The pipeline-facing config (ViewOverrides) and the check in override_views list the same
    fields, in the same order, and each is a ViewSpec field: adding one to only one side fails here."""
    import dataclasses

    from components.data.views import OVERRIDABLE, ViewSpec
    from components.methods.base import ViewOverrides

    assert tuple(ViewOverrides.model_fields) == OVERRIDABLE
    assert set(OVERRIDABLE) <= {f.name for f in dataclasses.fields(ViewSpec)} - {"size", "scale", "ratio"}


def test_blur_zero_sigma_is_identity_and_blur_smooths():
    x = torch.rand(2, 3, 16, 16) * 255
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(2)), x)
    blurred = gaussian_blur(x, torch.tensor([2.0, 2.0]))
    assert blurred.diff(dim=3).abs().mean() < x.diff(dim=3).abs().mean() / 2


def test_cosine_schedule_values():
    assert cosine_schedule(0, 100, 1.0, 0.0, warmup_steps=10) == 0.0
    assert cosine_schedule(10, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_schedule(55, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_schedule(100, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)


def test_param_groups_exclude_norms_and_biases_and_lr_scaling():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    recipe = OptimRecipe(name="lars", lr=0.3, weight_decay=1e-4)
    groups = param_groups(model, recipe)
    no_wd = [g for g in groups if g["weight_decay"] == 0]
    wd = [g for g in groups if g["weight_decay"] > 0]
    assert sum(p.numel() for g in no_wd for p in g["params"]) == 4 + 4 + 4 + 2  # biases + BN
    assert sum(p.numel() for g in wd for p in g["params"]) == 16 + 8
    assert recipe.base_lr(512) == pytest.approx(0.6)
    opt = build_optimizer(groups, recipe, recipe.base_lr(512))
    sched = Schedule(opt, recipe, 0.6, total_steps=100, steps_per_epoch=10)
    assert sched.warmup_steps == 50  # 10 epochs of warm-up, capped at half the run
    sched.apply(50)
    assert all(g["lr"] == pytest.approx(0.6) for g in opt.param_groups)


def test_lr_scales_multiply_a_modules_lr_and_reject_unknown_modules():
    model = nn.Module()
    model.encoder = nn.Linear(4, 4)
    model.predictor = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    recipe = OptimRecipe(name="sgd", lr=0.1, lr_scales={"predictor": 10})
    opt = build_optimizer(param_groups(model, recipe), recipe, 0.1)
    Schedule(opt, recipe.model_copy(update={"warmup_epochs": 0}), 0.1, total_steps=100, steps_per_epoch=10).apply(0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(1.0) for p in model.predictor.parameters())
    assert all(lr_of[id(p)] == pytest.approx(0.1) for p in model.encoder.parameters())
    # weight decay still follows the parameter kind, not the module
    assert {g["weight_decay"] for g in opt.param_groups if g["lr_scale"] == 10} == {0.0, recipe.weight_decay}
    with pytest.raises(ValueError, match="predictr"):
        param_groups(model, OptimRecipe(lr_scales={"predictr": 10}))
    with pytest.raises(ValueError, match="> 0"):
        OptimRecipe(lr_scales={"predictor": 0})


def test_knn_matches_brute_force_and_separable_probe():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 5
    y = torch.arange(60) % 3
    x = centers[y] + torch.randn(60, 8, generator=g)
    q = centers[torch.arange(15) % 3] + torch.randn(15, 8, generator=g)
    pred = knn_predict(x, y, q, 3, k=5, temperature=0.1)
    xn, qn = x / x.norm(dim=1, keepdim=True), q / q.norm(dim=1, keepdim=True)
    for i in range(15):
        sims = [(float(qn[i] @ xn[j]), j) for j in range(60)]
        top = sorted(sims, reverse=True)[:5]
        votes = [0.0, 0.0, 0.0]
        for s, j in top:
            votes[int(y[j])] += math.exp(s / 0.1)
        assert int(pred[i]) == max(range(3), key=lambda c: votes[c])
    assert knn_top1(x, y, q, torch.arange(15) % 3, 3) == 100.0
    probe = fit_linear_probe(x, y, q, torch.arange(15) % 3, 3)
    assert probe.top1(q, torch.arange(15) % 3) == 100.0


def test_blur_sigma_scales_with_the_view_size():
    """sigma is given at 224 px; a 16-px view blurs with sigma * 16 / 224 (same blur relative to content)."""
    from components.data.views import ViewSpec, augment, gaussian_blur

    x = torch.rand(4, 3, 16, 16) * 255
    plain = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0, blur_p=0)
    blurred = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0, blur_p=1, blur_sigma=(2.0, 2.0))
    a = augment(x, plain, torch.Generator().manual_seed(0)).float()
    b = augment(x, blurred, torch.Generator().manual_seed(0)).float()
    expected = gaussian_blur(a, torch.full((4,), 2.0 * 16 / 224)).round().clamp(0, 255)
    assert (b - expected).abs().max() <= 1
    assert (b - gaussian_blur(a, torch.full((4,), 2.0))).abs().max() > 10  # not the unscaled 2-px blur
