"""Shared fixtures: one real local Ray per session (on loopback) and tiny pipeline configs."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)

# Tiny per-method settings used by the shared session pipeline run (tests/integration).
# A new method adds one entry here and a test module asserting on its row.
_TINY_VIT = {"name": "vit_tiny", "patch_size": 4, "img_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}
TINY_METHODS: dict[str, dict] = {
    "simclr": {"image_size": 16, "proj_hidden_dim": 64, "proj_dim": 32, "temperature": 0.2, "optim": {"lr": 0.6, "warmup_epochs": 0}},
    "nnclr": {"image_size": 16, "proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64, "support_set_size": 256, "temperature": 0.1, "optim": {"lr": 1.2, "warmup_epochs": 0}},
    "meanshift": {"image_size": 16, "proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64, "bank_size": 256, "optim": {"lr": 0.5}},
    "scl": {"image_size": 16, "proj_hidden_dim": 64, "proj_dim": 32, "mu": 1.0, "optim": {"lr": 0.5}},
    "byol": {"image_size": 16, "proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64, "optim": {"lr": 1.0, "warmup_epochs": 0}},
    # ViT-tiny-ish (4x4 patches of 16 px) for the ViT members of the distillation family.
    "mocov3": {"image_size": 16, "backbone": {"name": "vit_tiny", "patch_size": 4, "img_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2},
               "proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64, "optim": {"lr": 0.04, "warmup_epochs": 0}},
    "dino": {"image_size": 16, "local_size": 8, "n_local": 4, "backbone": {"name": "vit_tiny", "patch_size": 4, "img_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2},
             "hidden_dim": 64, "bottleneck_dim": 32, "out_dim": 256, "warmup_teacher_temp_epochs": 1, "optim": {"lr": 0.04, "warmup_epochs": 0}},
    "mae": {"image_size": 16, "backbone": _TINY_VIT, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "optim": {"lr": 0.01, "warmup_epochs": 0}},
    "beit": {"image_size": 16, "backbone": _TINY_VIT, "tokenizer": "tiny-vqvae", "num_codes": 64, "min_block": 4, "optim": {"lr": 0.01, "warmup_epochs": 0}},
    "beitv2": {"image_size": 16, "backbone": _TINY_VIT, "tokenizer": "tiny-vqkd", "num_codes": 64, "min_block": 4, "optim": {"lr": 0.01, "warmup_epochs": 0}},
    # Reads region features from the run's SimCLR (frozen) and captions through tokenizer[tiny-text].
    "visualbert": {"encoder": "simclr", "tokenizer": "tiny-text", "image_size": 32, "hidden_dim": 32, "depth": 1, "num_heads": 2, "vocab_size": 256,
                   "max_text_len": 32, "optim": {"lr": 0.01, "warmup_epochs": 0}},
}
# Image tokenizers of the shared run (a ``tokenizers:`` entry each): BEiT's VQ-VAE and BEiT v2's
# VQ-KD, whose teacher is the run's DINO (train[dino] -> tokenizer[tiny-vqkd] -> train[beitv2]).
TINY_TOKENIZERS: dict[str, dict] = {
    # lr 0.01 unscaled (the default scaling made 0.03 per 256 an lr of 0.004 at batch 32) and 8 epochs of its
    # own (48 steps; it is tiny): plain-loop probe, 8 seeds, val reconstruction 0.53-0.66 against 0.83-0.85
    # untrained; with the fixture's 3 epochs (18 steps) 2 seeds of 8 stayed at 0.82-0.83.
    "tiny-vqvae": {"kind": "vqvae", "train": {"epochs": 8},
                   "settings": {"image_size": 16, "patch_size": 4, "num_codes": 64, "code_dim": 16, "hidden_dim": 32,
                                "optim": {"lr": 0.01, "lr_scaling": "none", "warmup_epochs": 0}}},
    "tiny-vqkd": {"kind": "vqkd", "settings": {"image_size": 16, "backbone": _TINY_VIT, "teacher": "dino", "num_codes": 64, "code_dim": 16, "decoder_depth": 1,
                                               "optim": {"lr": 0.01, "warmup_epochs": 0}}},
    "tiny-text": {"kind": "wordpiece", "settings": {"vocab_size": 200}},  # VisualBERT's captions
}
# The BRIEF row at 32-px tiny scenes: S = 12 leaves a 20x20 keypoint region; a small codebook keeps it cheap.
TINY_BRIEF = {"enabled": True, "patch_size": 12, "keypoints_per_image": 16, "codebook_size": 32, "codebook_sample": 2000}


def tiny_config(storage: Path, name: str = "tiny", methods: dict[str, dict] | None = None, tokenizers: dict[str, dict] | None = None, **train) -> dict:
    """A pipeline dict small enough for tests: 192/96/96 scenes, 2 short epochs; ``tokenizers``
    is the ``tokenizers:`` section (entries the methods refer to)."""
    methods = copy.deepcopy(methods if methods is not None else {"simclr": TINY_METHODS["simclr"]})
    return {
        **({"tokenizers": copy.deepcopy(tokenizers)} if tokenizers else {}),
        "name": name,
        "seed": 0,
        "storage": str(storage),
        "datasets": {"scenes": {"kind": "scenes", "train": 192, "val": 96, "test": 96, "image_size": 32}},
        "train": {"num_workers": 0, "epochs": 2, "batch_size": 32, "decode_size": 32, "data_batch_size": 64, **train},
        "methods": [{"name": m, "settings": s} for m, s in methods.items()],
        "evaluate": {"batch_size": 128},
    }


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test: tiny models run faster, and on a busy machine
    OpenMP's spinning threads are far slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (4 logical CPUs so Ray Data is not starved by 2 train workers)."""
    import ray

    from pipelines.run import init_ray
    from pipelines.config import parse_config

    init_ray(parse_config(tiny_config(Path("/tmp/unused"))))
    yield ray
    ray.shutdown()


def run_tiny(storage: Path, name: str, methods: dict[str, dict], output: Path | None = None, tokenizers: dict[str, dict] | None = None,
             brief: dict | None = None, **train):
    """Run a tiny pipeline with ``methods`` (and the ``tokenizers`` they refer to, and the BRIEF
    row when ``brief`` is given); returns ``(config, comparison table)``."""
    from pipelines.config import parse_config
    from pipelines.run import run_pipeline

    data = tiny_config(storage, name=name, methods=methods, tokenizers=tokenizers, **train)
    if brief:
        data["evaluate"]["brief"] = brief
    cfg = parse_config(data)
    return cfg, run_pipeline(cfg, output or storage / "out")


@pytest.fixture(scope="session")
def methods_run(ray_session, tmp_path_factory):
    """ONE session pipeline run training every method in TINY_METHODS in Ray Train local mode,
    with the BRIEF baseline row.

    Method tests assert on their own rows (loss fell, encoder changed, registered) instead of
    each paying for a pipeline run.
    """
    root = tmp_path_factory.mktemp("methods")
    # SimCLR at 4x the shared tiny lr: its 18 steps at 0.6 x 32/256 moved the loss by less than
    # the epoch-to-epoch noise of one suite run (4.217 -> 4.228), so "loss falls" was a coin toss.
    methods = {**TINY_METHODS, "simclr": {**TINY_METHODS["simclr"], "optim": {"lr": 2.4, "warmup_epochs": 0}}}
    return run_tiny(root / "store", "methods", methods, root / "out", tokenizers=TINY_TOKENIZERS, brief=TINY_BRIEF, num_workers=0, epochs=3)


# The families' 2-worker runs (DDP over gloo): one pipeline for every method whose
# distributed path differs (NNCLR's gathered support set, MoCo v3's gathered keys, DINO's
# all-reduced centre), ResNet backbones.
RESNET_MOCOV3 = {"image_size": 16, "temperature": 0.2, "proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64,
                 "optim": {"name": "adamw", "lr": 0.04, "weight_decay": 0.1, "warmup_epochs": 0}}
RESNET_DINO = {"image_size": 16, "local_size": 8, "n_local": 2, "hidden_dim": 64, "bottleneck_dim": 32, "out_dim": 256,
               "warmup_teacher_temp_epochs": 1, "optim": {"lr": 0.04, "warmup_epochs": 0}}


@pytest.fixture(scope="session")
def two_worker_run(ray_session, tmp_path_factory):
    """ONE session pipeline run with 2 real Ray Train workers: NNCLR, MoCo v3 and DINO."""
    root = tmp_path_factory.mktemp("family2")
    methods = {"nnclr": TINY_METHODS["nnclr"], "mocov3": RESNET_MOCOV3, "dino": RESNET_DINO}
    return run_tiny(root / "store", "family2", methods, root / "out", num_workers=2, epochs=3)


def method_outcome(cfg, name: str) -> dict:
    """What a method test checks: per-epoch losses, initial vs trained encoder, registry version."""
    import torch
    from mlflow.tracking import MlflowClient

    from components.methods.registry import build_method
    from pipelines.train_loop import load_state

    state_file = next((cfg.storage_path() / "steps").glob(f"train_{name}_-*/state.pt"))
    state = load_state(state_file)
    spec = next(m for m in cfg.methods if m.name == name)
    torch.manual_seed(cfg.seed)  # the train loop seeds the same way before building the method
    initial = build_method(name, spec.settings)
    trained = build_method(name, spec.settings)
    trained.load_state_dict(state["method"])
    changed = [k for k, v in trained.encoder.state_dict().items() if v.is_floating_point() and not torch.allclose(v, initial.encoder.state_dict()[k])]
    client = MlflowClient(cfg.tracking_uri())
    versions = client.search_model_versions(f"name='{cfg.name}-{name}'")
    return {"losses": [h["loss"] for h in state["history"]], "changed": changed, "versions": versions, "state": state}
