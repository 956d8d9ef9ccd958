"""MAE, BEiT, BEiT v2 and their tokenizers as modules: visible-token encoding, mask tokens, the
patch-aggregation head, attaching frozen upstream models, and a few plain-loop steps that learn."""

from __future__ import annotations

import pytest
import torch

from components.checkpoint import save_state_file
from components.data.views import make_views
from components.errors import ReprflowError
from components.methods.base import Upstream
from components.methods.beit import BEiT, BEiTConfig
from components.methods.beitv2 import BEiTV2, BEiTV2Config
from components.methods.mae import MAE, MAEConfig
from components.methods.vqkd import VQKD, VQKDConfig
from components.methods.vqvae import VQVAE, VQVAEConfig
from components.models.backbones import build_backbone
from components.models.mim_heads import PatchAggregationHead, forward_with_mask_tokens
from components.training import TrainStep, prepare_batch

VIT = {"name": "vit_tiny", "patch_size": 4, "img_size": 16, "embed_dim": 32, "depth": 3, "num_heads": 2}
MAE_S = {"image_size": 16, "backbone": VIT, "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}
VQVAE_S = {"image_size": 16, "patch_size": 4, "num_codes": 16, "code_dim": 8, "hidden_dim": 16}
VQKD_S = {"image_size": 16, "backbone": VIT, "num_codes": 16, "code_dim": 8, "decoder_depth": 1}
BEIT_S = {"image_size": 16, "backbone": VIT, "num_codes": 16, "min_block": 4}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast, and on a loaded machine OpenMP threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(method, n=8, seed=0):
    """Smooth random images (upsampled 4x4 noise): structure a masked patch can be inferred from."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 255
    imgs = torch.nn.functional.interpolate(coarse, size=(20, 20), mode="bilinear", align_corners=False).round().to(torch.uint8)
    return prepare_batch(make_views(imgs, method.views, torch.Generator().manual_seed(seed)))


def _vqkd():
    torch.manual_seed(0)
    kd = VQKD(VQKDConfig(**VQKD_S))
    kd.use_teacher(build_backbone(VIT))
    return kd


def test_mae_encoder_sees_only_visible_tokens():
    torch.manual_seed(0)
    m = MAE(MAEConfig(**MAE_S))
    lengths = []
    hook = m.backbone.vit.blocks[0].register_forward_hook(lambda mod, inp, out: lengths.append(inp[0].shape[1]))
    out = m(_batch(m))
    hook.remove()
    assert lengths == [1 + int(16 * 0.25)]  # CLS + the 4 visible patches of 16, gathered
    out["loss"].backward()
    assert m.decoder.mask_token.grad is not None and m.backbone.vit.patch_embed.proj.weight.grad is not None


def test_mae_reconstruction_figure():
    torch.manual_seed(0)
    m = MAE(MAEConfig(**MAE_S))
    x = _batch(m, n=3)["view_0"]
    fig = m.figures(x, torch.Generator().manual_seed(0))["mae_reconstructions"]
    assert fig.dtype == torch.uint8 and fig.shape == (3, 3 * 16, 3 * 16)  # 3 rows of original | masked | reconstruction
    out = m.reconstruct(x, torch.Generator().manual_seed(0))
    # Visible patches of the reconstruction are the input's own pixels.
    from components.models.masking import patchify

    rec = patchify(out["image"], 4)
    torch.testing.assert_close(rec[~out["mask"]], out["target"][~out["mask"]])


def test_forward_with_mask_tokens_replaces_masked_patches():
    torch.manual_seed(0)
    vit = build_backbone(VIT).eval()
    token = torch.randn(1, 1, 32)
    x = torch.randn(2, 3, 16, 16)
    none = torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        full, _ = forward_with_mask_tokens(vit, x, none, token)
        torch.testing.assert_close(vit.vit.norm(full), vit.tokens(x))  # no mask: the plain forward
        mask = none.clone()
        mask[:, 15] = True  # bottom-right patch
        y = x.clone()
        y[..., 12:, 12:] += 5.0
        a, inter_a = forward_with_mask_tokens(vit, x, mask, token, layer=1)
        b, _ = forward_with_mask_tokens(vit, y, mask, token, layer=1)
    torch.testing.assert_close(a, b)  # a masked patch's pixels never reach the encoder
    assert inter_a.shape == a.shape == (2, 17, 32)
    assert not torch.allclose(a, full)


def test_patch_aggregation_head_shapes_and_gradient_flow():
    torch.manual_seed(0)
    head = PatchAggregationHead(32, depth=2, heads=2)
    cls = torch.randn(4, 32, requires_grad=True)
    patches = torch.randn(4, 9, 32, requires_grad=True)
    out = head(cls, patches)
    assert out.shape == (4, 9, 32)
    out.pow(2).mean().backward()
    assert cls.grad.abs().sum() > 0 and patches.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


def test_beitv2_aggregation_loss_trains_the_cls_token_through_late_layers():
    """L_MIM^c alone: the blocks after layer l receive gradient only through the final CLS."""
    torch.manual_seed(0)
    m = BEiTV2(BEiTV2Config(**BEIT_S, aggregation_layer=1))
    m.use_tokenizer(_vqkd())
    out = m(_batch(m))
    assert set(out) >= {"loss", "loss_mim", "loss_aggregation"}
    torch.testing.assert_close(out["loss"].detach(), out["loss_mim"] + out["loss_aggregation"])
    # Re-run with only the aggregation path differentiated.
    m.zero_grad()
    x = _batch(m)["view_0"]
    codes, mask = m.tokenize(x), m.mask(x.shape[0], x.device)
    hidden, early = forward_with_mask_tokens(m.backbone, x, mask, m.mask_token, layer=m.layer)
    agg = m.aggregation(hidden[:, 0], early[:, 1:])
    assert agg.shape == (8, 16, 32)
    from components.losses.mim import masked_token_loss

    masked_token_loss(m.head(m.backbone.vit.norm(agg)[mask]), codes, mask).backward()
    late = m.backbone.vit.blocks[2].mlp.fc2.weight.grad  # after layer 1: reached via CLS only
    assert late is not None and late.abs().sum() > 0
    assert m.aggregation.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.backbone.vit.cls_token.grad.abs().sum() > 0


def test_beit_predicts_codes_only_at_masked_positions_and_keeps_tokenizer_out_of_state():
    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(**VQVAE_S)).eval()
    m = BEiT(BEiTConfig(**BEIT_S))
    with pytest.raises(ReprflowError, match="tokenizer"):
        m(_batch(m))
    m.use_tokenizer(tok)
    assert not any(k.startswith(("_tokenizer", "tok")) for k in m.state_dict())
    assert all(not p.requires_grad for p in tok.parameters())
    seen = []
    hook = m.head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    m.mask = lambda n, device: torch.arange(16).expand(n, 16) % 3 == 0  # 6 masked of 16 per sample
    out = m(_batch(m))
    hook.remove()
    assert seen == [8 * 6]  # the classifier runs on masked positions only
    out["loss"].backward()
    assert m.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in tok.parameters())


def test_attach_through_upstream_and_mismatches(tmp_path):
    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(**VQVAE_S))
    tok(_batch(tok))  # initialise the codebook
    path = tmp_path / "state.pt"
    save_state_file({"method": tok.state_dict()}, path)  # with its manifest, as a tokenizer step writes it
    m = BEiT(BEiTConfig(**BEIT_S))
    m.attach({"tokenizer": Upstream("tokenizer", "vqvae", VQVAE_S, str(path))})
    x = _batch(m)["view_0"]
    tok.eval()
    assert torch.equal(m.tokenize(x), tok.tokenize(x))
    with pytest.raises(ReprflowError, match="num_codes"):
        BEiT(BEiTConfig(**{**BEIT_S, "num_codes": 32})).use_tokenizer(tok)
    with pytest.raises(ReprflowError, match="patches"):
        BEiT(BEiTConfig(**{**BEIT_S, "image_size": 24, "backbone": {**VIT, "patch_size": 8}, "min_block": 1})).use_tokenizer(tok)


def test_vqkd_teacher_is_frozen_and_outside_the_state():
    kd = _vqkd()
    teacher = kd._teacher[0][0]
    own = {id(p) for p in kd.parameters()}
    assert not any(id(p) in own for p in teacher.parameters())  # not a sub-module: not in state_dict
    assert not any(k.startswith("_teacher") for k in kd.state_dict())
    out = kd(_batch(kd))
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert kd.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert kd.tokenize(_batch(kd)["view_0"]).shape == (8, 16)
    with pytest.raises(ReprflowError, match="teacher_dim"):
        VQKD(VQKDConfig(**VQKD_S)).use_teacher(build_backbone({**VIT, "embed_dim": 64}))
    with pytest.raises(ReprflowError, match="teacher"):
        VQKD(VQKDConfig(**VQKD_S))(_batch(kd))


def test_configs_reject_what_cannot_work():
    with pytest.raises(ValueError, match="ViT"):
        MAEConfig(image_size=32, backbone={"name": "resnet18"})
    with pytest.raises(ValueError, match="min_block"):
        BEiTConfig(**{**BEIT_S, "min_block": 16})  # 40 % of a 4x4 grid is 6 patches
    assert MAEConfig().optim.name == "adamw" and MAEConfig().optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("name", ["mae", "vqvae", "beit", "beitv2", "vqkd"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    optim = {"lr": 3e-3, "lr_scaling": "none", "warmup_epochs": 0, "weight_decay": 0.0}
    m = {
        "mae": lambda: MAE(MAEConfig(**MAE_S, optim=optim)),
        "vqvae": lambda: VQVAE(VQVAEConfig(**VQVAE_S, optim=optim)),
        "beit": lambda: BEiT(BEiTConfig(**BEIT_S, optim=optim)),
        "beitv2": lambda: BEiTV2(BEiTV2Config(**BEIT_S, optim=optim)),
        "vqkd": lambda: VQKD(VQKDConfig(**VQKD_S, optim=optim)),
    }[name]()
    if name == "beit":
        m.use_tokenizer(VQVAE(VQVAEConfig(**VQVAE_S)))
    if name == "beitv2":
        m.use_tokenizer(_vqkd().eval())
    if name == "vqkd":
        m.use_teacher(build_backbone(VIT))
    step = TrainStep(m, global_batch=16, steps_per_epoch=20, epochs=1)
    batch = _batch(m, n=16)
    torch.manual_seed(1)
    losses = [step(batch, i)["loss"] for i in range(20)]
    assert sum(losses[-3:]) / 3 < 0.93 * sum(losses[:3]) / 3, losses
