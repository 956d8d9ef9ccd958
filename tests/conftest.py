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
TINY_METHODS: dict[str, dict] = {
    "simclr": {"image_size": 16, "proj_hidden_dim": 64, "proj_dim": 32, "temperature": 0.2, "optim": {"lr": 0.6, "warmup_epochs": 0}},
}


def tiny_config(storage: Path, name: str = "tiny", methods: dict[str, dict] | None = None, **train) -> dict:
    """A pipeline dict small enough for tests: 192/96/96 scenes, 2 short epochs."""
    methods = copy.deepcopy(methods if methods is not None else {"simclr": TINY_METHODS["simclr"]})
    return {
        "name": name,
        "seed": 0,
        "storage": str(storage),
        "datasets": {"scenes": {"kind": "scenes", "train": 192, "val": 96, "test": 96, "image_size": 32}},
        "train": {"num_workers": 0, "epochs": 2, "batch_size": 32, "decode_size": 32, "data_batch_size": 64, **train},
        "methods": [{"name": m, "settings": s} for m, s in methods.items()],
        "evaluate": {"batch_size": 128},
    }


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (4 logical CPUs so Ray Data is not starved by 2 train workers)."""
    import ray

    from pipelines.run import init_ray
    from pipelines.config import parse_config

    init_ray(parse_config(tiny_config(Path("/tmp/unused"))))
    yield ray
    ray.shutdown()
