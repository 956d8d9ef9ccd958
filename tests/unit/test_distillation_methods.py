"""BYOL, MoCo v3 and DINO as modules: the teacher gets no gradient and moves only by EMA, the
backbone-dependent defaults, MoCo v3's frozen patch projection, DINO's frozen last layer."""

from __future__ import annotations

import pytest
import torch

from components.data.views import make_views
from components.errors import ReprflowError
from components.methods.registry import build_method, method_config
from components.training import TrainStep, prepare_batch

VIT = {"name": "vit_tiny", "patch_size": 4, "img_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}
SMALL = {
    # ViTs keep these unit tests fast; the pipeline tests train BYOL with its paper's ResNet.
    "byol": {"image_size": 16, "backbone": VIT, "proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
    "mocov3": {"image_size": 16, "backbone": VIT, "proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
    "dino": {"image_size": 16, "local_size": 8, "n_local": 2, "backbone": VIT, "hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 32},
}
# (online, target) module attribute pairs updated by EMA.
PAIRS = {
    "byol": [("encoder", "target_encoder"), ("projector", "target_projector")],
    "mocov3": [("encoder", "key_encoder"), ("projector", "key_projector")],
    "dino": [("student", "teacher"), ("student_head", "teacher_head")],
}


def _batch(method, n=8, seed=0):
    imgs = torch.randint(0, 256, (n, 24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return prepare_batch(make_views(imgs, method.views, torch.Generator().manual_seed(seed)))


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("name", ["byol", "mocov3", "dino"])
def test_teacher_gets_no_gradient_and_moves_only_by_ema(name):
    torch.manual_seed(0)
    m = build_method(name, SMALL[name])
    step = TrainStep(m, global_batch=8, steps_per_epoch=4, epochs=2)
    out = m(_batch(m))
    out["loss"].backward()
    pairs = [(getattr(m, a), getattr(m, b)) for a, b in PAIRS[name]]
    for online, target in pairs:
        assert all(p.grad is None and not p.requires_grad for p in target.parameters())
        assert any(p.grad is not None for p in online.parameters())
    before = [_params(t) for _, t in pairs]
    step.optimizer.step()
    for (online, target), old in zip(pairs, before):
        assert all(torch.equal(p, old[k]) for k, p in target.named_parameters())
    m.on_step_end(0, step.total_steps)
    base = m.cfg.momentum  # the cosine schedule starts at the base momentum
    for (online, target), old in zip(pairs, before):
        online_p = dict(online.named_parameters())
        for k, p in target.named_parameters():
            torch.testing.assert_close(p, base * old[k] + (1 - base) * online_p[k].detach())
        assert any(not torch.equal(p, old[k]) for k, p in target.named_parameters())


def test_ema_momentum_follows_the_cosine_to_one():
    torch.manual_seed(0)
    m = build_method("byol", SMALL["byol"])
    online = _params(m.projector)
    with torch.no_grad():
        for p in m.projector.parameters():
            p.add_(1.0)
    m.on_step_end(100, 100)  # momentum 1 at the end: the target must not move
    assert all(torch.equal(p, online[k]) for k, p in m.target_projector.named_parameters())
    m.on_step_end(50, 100)  # momentum 0.998 halfway
    p = dict(m.target_projector.named_parameters())["0.weight"]
    torch.testing.assert_close(p, online["0.weight"] + 0.002 * 1.0)


def test_byol_views_are_the_papers_asymmetric_pair():
    a, b = build_method("byol", SMALL["byol"]).views.views
    assert (a.blur_p, a.solarize_p, b.blur_p, b.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert method_config("byol", {}).optim.name == "lars"


def test_mocov3_defaults_depend_on_the_backbone():
    vit = method_config("mocov3", {"backbone": VIT, "optim": {"lr": 1e-3}})
    assert (vit.optim.name, vit.optim.lr, vit.optim.weight_decay, vit.temperature, vit.proj_layers) == ("adamw", 1e-3, 0.1, 0.2, 3)
    res = method_config("mocov3", {})
    assert (res.optim.name, res.optim.lr, res.temperature, res.proj_layers) == ("lars", 0.6, 1.0, 2)
    assert method_config("mocov3", {"temperature": 0.5}).temperature == 0.5
    # The resolved settings round-trip (the pipeline stores and rebuilds them).
    assert method_config("mocov3", vit.model_dump(mode="json")) == vit
    with pytest.raises(ReprflowError, match="freeze_patch_embed needs a ViT"):
        method_config("mocov3", {"freeze_patch_embed": True})


def test_mocov3_frozen_patch_projection_stays_random():
    torch.manual_seed(0)
    m = build_method("mocov3", {**SMALL["mocov3"], "freeze_patch_embed": True, "optim": {"lr": 1.0, "warmup_epochs": 0}})
    patch = _params(m.encoder.vit.patch_embed)
    blocks = _params(m.encoder.vit.blocks)
    step = TrainStep(m, global_batch=8, steps_per_epoch=2, epochs=1)
    grouped = {id(p) for g in step.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in grouped for p in m.encoder.vit.patch_embed.parameters())
    step(_batch(m), 0)
    assert all(torch.equal(p, patch[k]) for k, p in m.encoder.vit.patch_embed.named_parameters())
    assert any(not torch.equal(p, blocks[k]) for k, p in m.encoder.vit.blocks.named_parameters())


def test_dino_last_layer_frozen_during_the_first_epoch():
    torch.manual_seed(0)
    m = build_method("dino", {**SMALL["dino"], "optim": {"lr": 0.5, "warmup_epochs": 0}})
    step = TrainStep(m, global_batch=8, steps_per_epoch=2, epochs=3)
    last = m.student_head.last_layer.weight
    first = last.detach().clone()
    mlp = _params(m.student_head.mlp)
    for i in range(2):  # epoch 1
        step(_batch(m, seed=i), i)
        assert torch.equal(last, first)
    assert any(not torch.equal(p, mlp[k]) for k, p in m.student_head.mlp.named_parameters())
    step(_batch(m, seed=2), 2)  # epoch 2: it learns
    assert not torch.equal(last, first)
    assert int(m.steps_done) == 3 and "steps_done" in m.state_dict() and "center" in m.state_dict()


def test_dino_centre_moves_in_training_only_and_schedules_need_steps_per_epoch():
    torch.manual_seed(0)
    m = build_method("dino", SMALL["dino"])
    batch = _batch(m)
    with pytest.raises(RuntimeError, match="on_train_start"):
        m(batch)
    m.on_train_start(steps_per_epoch=5, total_steps=50)
    m.eval()
    with torch.no_grad():
        out = m(batch)
    assert torch.count_nonzero(m.center) == 0
    assert out["teacher_temp"] == pytest.approx(0.04)
    assert out["kl"] == pytest.approx(float(out["loss"]) - float(out["teacher_entropy"]))
    m.train()
    with torch.no_grad():
        teacher = [m.teacher_head(m.teacher(batch[k])) for k in ("view_0", "view_1")]
        m(batch)
    torch.testing.assert_close(m.center, 0.1 * torch.cat(teacher).mean(0, keepdim=True))


def test_dino_encoder_is_the_teacher_backbone():
    m = build_method("dino", SMALL["dino"])
    assert m.encoder is m.teacher
    assert m.embed(torch.randn(2, 3, 16, 16)).shape == (2, 32)
