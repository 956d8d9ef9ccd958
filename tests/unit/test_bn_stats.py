"""estimate_bn_stats: a random-init encoder's BN layers get the data's statistics, weights untouched."""

import torch
from torch import nn

from components.models.backbones import build_backbone
from components.models.embedding import EmbeddingModel, estimate_bn_stats


def test_running_stats_equal_the_datas_and_weights_are_untouched():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    model = EmbeddingModel(nn.Sequential(conv, nn.BatchNorm2d(4), nn.Flatten()), image_size=8)
    images = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    estimate_bn_stats(model, images, batch_size=16)  # 3 batches: the average of their statistics
    assert not model.training
    with torch.no_grad():
        pre = conv((images.float() - model.mean) / model.std)  # what the BN layer sees
    bn = model.encoder[1]
    torch.testing.assert_close(bn.running_mean, pre.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    # The average of the batches' unbiased variances: close to the overall one, not BN's initial 1.
    assert torch.allclose(bn.running_var, pre.var(dim=(0, 2, 3)), rtol=0.05) and not torch.allclose(bn.running_var, torch.ones(4), rtol=0.05)
    assert bn.momentum == 0.1  # restored
    after = {k: v for k, v in model.state_dict().items() if k in before}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_random_resnet_embeds_differently_with_data_statistics():
    torch.manual_seed(0)
    enc = build_backbone({"name": "resnet18", "stem": "small"})
    model = EmbeddingModel(enc, image_size=16).eval()
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    plain = model(images)
    calibrated = estimate_bn_stats(model, images)(images)
    assert plain.shape == calibrated.shape and not torch.allclose(plain, calibrated, atol=1e-3)
