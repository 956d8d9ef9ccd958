"""The self-distillation family on 2 real Ray Train workers (DDP, gloo): MoCo v3 and DINO with
ResNet backbones. MoCo v3 gathers keys across workers; DINO all-reduces its centre and cancels
the last layer's gradients after DDP's all-reduce."""

import pytest

from tests.conftest import method_outcome, run_tiny
from tests.integration.test_method_dino import assert_dino_learned

pytestmark = pytest.mark.integration

RESNET_MOCOV3 = {"image_size": 16, "temperature": 0.2, "proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64,
                 "optim": {"name": "adamw", "lr": 0.04, "weight_decay": 0.1, "warmup_epochs": 0}}
RESNET_DINO = {"image_size": 16, "local_size": 8, "n_local": 2, "hidden_dim": 64, "bottleneck_dim": 32, "out_dim": 256,
               "warmup_teacher_temp_epochs": 1, "optim": {"lr": 0.04, "warmup_epochs": 0}}


@pytest.fixture(scope="module")
def two_worker_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill2")
    return run_tiny(root / "store", "distill2", {"mocov3": RESNET_MOCOV3, "dino": RESNET_DINO}, root / "out", num_workers=2, epochs=3)


def test_mocov3_resnet_two_workers(two_worker_run):
    cfg, table = two_worker_run
    assert cfg.train.num_workers == 2
    out = method_outcome(cfg, "mocov3")
    assert len(out["losses"]) == 3
    assert out["losses"][-1] < out["losses"][0]
    assert any(k.startswith("net.layer") for k in out["changed"])
    assert len(out["versions"]) == 1


def test_dino_resnet_two_workers(two_worker_run):
    cfg, table = two_worker_run
    out = method_outcome(cfg, "dino")
    assert_dino_learned(out, 256)
    # The centre is a buffer in the checkpoint, moved away from its zero start.
    assert out["state"]["method"]["center"].abs().sum() > 0
    assert {r["representation"] for r in table["rows"]} >= {"mocov3", "dino"}
