"""ViT backbones (timm): pooled features, masked (visible-tokens) forward, layer ids; the DINO
head; multi-crop views and the by-resolution forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.data.views import make_views
from components.errors import ReprflowError
from components.methods.registry import build_method, method_config
from components.models.backbones import BackboneConfig, build_backbone
from components.models.heads import DINOHead
from components.models.multicrop import multicrop_forward

TINY_VIT = {"name": "vit_tiny", "patch_size": 4, "img_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone(TINY_VIT).eval()


def test_vit_pooled_features_any_size(vit):
    assert vit.feature_dim == 32
    assert vit(torch.randn(3, 3, 16, 16)).shape == (3, 32)
    assert vit(torch.randn(2, 3, 8, 8)).shape == (2, 32)  # local crop: position embedding resampled
    assert vit.feature_map(torch.randn(2, 3, 16, 16)).shape == (2, 32, 4, 4)


def test_vit_presets_and_validation():
    assert build_backbone({"name": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1}).feature_dim == 192
    with pytest.raises(ValueError, match="multiple of patch_size"):
        BackboneConfig(name="vit_small", patch_size=16, img_size=40)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        BackboneConfig(name="vit_tiny", embed_dim=50, num_heads=3)
    with pytest.raises(ValueError):
        BackboneConfig(name="vit_huge")


def test_vit_masked_forward_shapes_and_equals_full_forward(vit):
    x = torch.randn(3, 3, 16, 16)
    keep = torch.stack([torch.randperm(16)[:5] for _ in range(3)])
    with torch.no_grad():
        part = vit.forward_masked(x, keep)
        full = vit.forward_masked(x, torch.arange(16).expand(3, 16))
        shuffled = vit.forward_masked(x, torch.stack([torch.randperm(16) for _ in range(3)]))
    assert part.shape == (3, 1 + 5, 32)
    torch.testing.assert_close(full, vit.tokens(x))
    torch.testing.assert_close(full[:, 0], vit(x))
    # Position is added before the gather, so the token order does not change the CLS output.
    torch.testing.assert_close(shuffled[:, 0], full[:, 0], rtol=1e-4, atol=1e-5)
    # Dropping patches does change it (the masked path really drops them).
    assert not torch.allclose(part[:, 0], full[:, 0], atol=1e-4)


def test_vit_masked_forward_keeps_the_right_tokens(vit):
    """A kept token's output depends only on the kept tokens: changing a dropped patch's pixels
    leaves the output unchanged, changing a kept one does not."""
    x = torch.randn(1, 3, 16, 16)
    keep = torch.tensor([[0, 5, 10]])  # patch 15 (bottom-right 4x4) is dropped
    y = x.clone()
    y[..., 12:, 12:] += 3.0
    z = x.clone()
    z[..., :4, :4] += 3.0  # patch 0 is kept
    with torch.no_grad():
        base, dropped, kept = (vit.forward_masked(v, keep) for v in (x, y, z))
    torch.testing.assert_close(base, dropped)
    assert not torch.allclose(base, kept)


def test_vit_layer_ids_for_layer_wise_decay(vit):
    assert vit.num_layers == 3
    ids = {n: vit.layer_id(f"encoder.{n}") for n, _ in vit.named_parameters()}
    assert ids["vit.cls_token"] == ids["vit.pos_embed"] == ids["vit.patch_embed.proj.weight"] == 0
    assert ids["vit.blocks.0.attn.qkv.weight"] == 1 and ids["vit.blocks.1.mlp.fc2.bias"] == 2
    assert ids["vit.norm.weight"] == 3 and vit.layer_id("projector.0.weight") == 3
    # Through a method: the recipe's layer_decay scales block lrs, heads keep scale 1.
    m = build_method("mocov3", {"image_size": 16, "backbone": TINY_VIT, "proj_hidden_dim": 8, "proj_dim": 8, "pred_hidden_dim": 8, "optim": {"layer_decay": 0.5}})
    scales = {round(g["lr_scale"], 6) for g in m.param_groups()}
    assert scales == {0.125, 0.25, 0.5, 1.0}


def test_dino_head_is_weight_normed_with_unit_gain():
    torch.manual_seed(0)
    head = DINOHead(16, 40, hidden_dim=24, bottleneck_dim=8, layers=3)
    x = torch.randn(5, 16)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(8, 40, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight)
        ref.parametrizations.weight.original0.fill_(1.0)
        want = ref(nn.functional.normalize(head.mlp(x), dim=-1))
    torch.testing.assert_close(head(x), want)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    # Scaling the raw weight changes nothing: the gain is fixed.
    with torch.no_grad():
        before = head(x)
        head.last_layer.weight.mul_(3.0)
    torch.testing.assert_close(head(x), before)


def test_dino_head_without_norm_last_layer_trains_the_gains_and_dino_freezes_them_first():
    torch.manual_seed(0)
    head = DINOHead(16, 40, hidden_dim=24, bottleneck_dim=8, layers=3, norm_last_layer=False)
    x = torch.randn(5, 16)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(8, 40, bias=False))
    g = torch.rand(40) + 0.5
    with torch.no_grad():
        head.last_layer_g.copy_(g)
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight)
        ref.parametrizations.weight.original0.copy_(g[:, None])
        want = ref(nn.functional.normalize(head.mlp(x), dim=-1))
    torch.testing.assert_close(head(x), want)
    head(x).sum().backward()
    assert head.last_layer_g.grad is not None and head.last_layer_g.grad.abs().sum() > 0
    assert DINOHead(16, 40, hidden_dim=24, bottleneck_dim=8).last_layer_g is None  # the default keeps unit rows
    # Through the method: both halves of the last layer get no update in the freeze window.
    m = build_method("dino", {"image_size": 16, "local_size": 8, "n_local": 0, "out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 8,
                              "backbone": TINY_VIT, "norm_last_layer": False, "freeze_last_layer_epochs": 1})
    m.on_train_start(4, 8)
    for p in (m.student_head.last_layer.weight, m.student_head.last_layer_g):
        p.grad = torch.ones_like(p)
    m.on_after_backward(3)
    assert m.student_head.last_layer.weight.grad is None and m.student_head.last_layer_g.grad is None
    for p in (m.student_head.last_layer.weight, m.student_head.last_layer_g):
        p.grad = torch.ones_like(p)
    m.on_after_backward(4)
    assert m.student_head.last_layer_g.grad is not None


def test_multicrop_recipe_view_shapes():
    m = build_method("dino", {"image_size": 32, "local_size": 16, "n_local": 4, "out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 8})
    recipe = m.views
    views = make_views(torch.randint(0, 256, (5, 40, 40, 3), dtype=torch.uint8), recipe, torch.Generator().manual_seed(0))
    assert list(views) == [f"view_{i}" for i in range(6)]
    assert [tuple(v.shape) for v in views.values()] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 4
    assert all(v.dtype == torch.uint8 for v in views.values())
    g1, g2, local = recipe.views[0], recipe.views[1], recipe.views[2]
    assert (g1.blur_p, g1.solarize_p, g2.blur_p, g2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert g1.scale == (0.4, 1.0) and local.scale == (0.05, 0.4)


def test_multicrop_forward_batches_by_resolution_and_keeps_order(vit):
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return vit(x)

    views = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    head = nn.Linear(32, 6)
    with torch.no_grad():
        out = multicrop_forward(Spy(), head, views)
        want = [head(vit(v)) for v in views]
    assert calls == [(4, 3, 16, 16), (6, 3, 8, 8)]
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5)


def test_dino_rejects_crop_sizes_off_the_patch_grid():
    with pytest.raises(ReprflowError, match="multiples of the ViT patch_size"):
        method_config("dino", {"image_size": 16, "local_size": 10, "backbone": TINY_VIT})


def test_dino_jitter_strength_scales_every_crop():
    """BYOL's colour jitter (0.4, 0.4, 0.2, 0.1) x jitter_strength, on global and local crops alike."""
    small = {"image_size": 32, "local_size": 16, "n_local": 2, "out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 8}
    for s, want in ((1.0, (0.4, 0.4, 0.2, 0.1)), (2.0, (0.8, 0.8, 0.4, 0.2))):
        for v in build_method("dino", {**small, "jitter_strength": s}).views.views:
            assert (v.brightness, v.contrast, v.saturation, v.hue) == pytest.approx(want)
