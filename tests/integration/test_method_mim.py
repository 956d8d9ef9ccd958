"""MAE, BEiT and BEiT v2 train through the real pipeline (the shared local-mode run), with their
tokenizers trained as DAG steps: tokenizer[tiny-vqvae] -> train[beit] and
train[dino] -> tokenizer[tiny-vqkd] -> train[beitv2]; both tokenizers are registered models and a
rerun reuses them from the step cache."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.train_loop import load_state
from tests.conftest import TINY_METHODS, TINY_TOKENIZERS, method_outcome, run_tiny

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", ["mae", "beit", "beitv2"])
def test_mim_method_learns_and_is_registered(methods_run, name):
    cfg, table = methods_run
    out = method_outcome(cfg, name)
    losses = out["losses"]
    assert len(losses) == 3
    # 18 steps on a cosine schedule: MAE's normalised-pixel loss moves ~1.5 % (0.98 -> 0.97),
    # BEiT's cross-entropies ~9 %; how fast each learns is checked in tests/unit/test_mim_methods.py.
    assert losses[-1] < losses[0] and min(losses[1:]) < losses[0], losses
    assert len(out["changed"]) > 10  # the encoder (ViT) itself learnt, not only the heads
    assert len(out["versions"]) == 1
    assert any(r["representation"] == name for r in table["rows"])


def _tokenizer_state(cfg, name: str) -> tuple:
    folder = next((cfg.storage_path() / "steps").glob(f"tokenizer_{name}_-*"))
    return folder, load_state(folder / "state.pt")


def _vqvae_val_reconstruction(cfg, state) -> tuple[float, float]:
    """Reconstruction MSE of 96 val scenes (one seeded view each) by the trained tiny VQ-VAE and by
    untrained ones of the same settings (mean of 3 initialisations)."""
    import numpy as np
    import torch

    from components.data.views import make_views
    from components.methods.registry import build_method
    from components.training import prepare_batch
    from pipelines.steps import _train_images

    settings = TINY_TOKENIZERS["tiny-vqvae"]["settings"]
    files = sorted(str(p) for p in next((cfg.storage_path() / "steps").glob("dataset_scenes_-*/data/val")).glob("*.parquet"))
    imgs = _train_images(files, cfg.train.decode_size, limit=96)

    def recon(m) -> float:
        with torch.no_grad():
            batch = prepare_batch(make_views(imgs, m.views, torch.Generator().manual_seed(0)))
            return float(m.eval()(batch)["recon_mse"])

    trained = build_method("vqvae", settings)
    trained.load_state_dict(state["method"])
    untrained = []
    for seed in range(3):
        torch.manual_seed(seed)
        untrained.append(recon(build_method("vqvae", settings)))
    return recon(trained), float(np.mean(untrained))


def test_tokenizers_are_trained_registered_and_reused_on_rerun(methods_run):
    cfg, _ = methods_run
    client = MlflowClient(cfg.tracking_uri())
    mtimes = {}
    for name in ("tiny-vqvae", "tiny-vqkd"):
        folder, state = _tokenizer_state(cfg, name)
        if name == "tiny-vqvae":
            # Per-epoch means of 6 steps on different crops are noise at this size (a CI run: 0.859 ->
            # 0.868 -> 0.883); the trained tokenizer's reconstruction of fixed val images is not.
            trained, untrained = _vqvae_val_reconstruction(cfg, state)
            assert trained < 0.9 * untrained, (trained, untrained)
        else:  # VQ-KD's loss (its targets are the teacher's features: the same for every epoch)
            losses = [h["loss"] for h in state["history"]]
            assert losses[-1] < losses[0], (name, losses)
        assert state["history"][-1]["codebook_usage"] > 0.2, name  # codes stay in use (no collapse)
        assert len(client.search_model_versions(f"name='{cfg.name}-tokenizer-{name}'")) == 1
        mtimes[name] = (folder / "state.pt").stat().st_mtime
    # (VQ-KD cannot take a step without its teacher, so its history is the teacher edge at work.)

    # Rerun BEiT with its tokenizer on the same storage: both come from the step cache.
    run_tiny(cfg.storage_path(), cfg.name, {"beit": TINY_METHODS["beit"]}, cfg.storage_path() / "rerun",
             tokenizers={"tiny-vqvae": TINY_TOKENIZERS["tiny-vqvae"]}, num_workers=0, epochs=3)
    exp = client.get_experiment_by_name(cfg.name)
    cached = {r.data.tags["mlflow.runName"] for r in client.search_runs([exp.experiment_id], "tags.`reprflow.cached` = 'true'", max_results=200)}
    assert {"tokenizer[tiny-vqvae]", "train[beit]"} <= cached
    folder, _ = _tokenizer_state(cfg, "tiny-vqvae")
    assert (folder / "state.pt").stat().st_mtime == mtimes["tiny-vqvae"]


def test_mae_reconstruction_figure_from_the_trained_state(methods_run, tmp_path):
    from pipelines.figures import method_figures

    cfg, _ = methods_run
    state = next((cfg.storage_path() / "steps").glob("train_mae_-*/state.pt"))
    data = next((cfg.storage_path() / "steps").glob("dataset_scenes_-*/data/train"))
    files = sorted(str(p) for p in data.glob("*.parquet"))
    spec = next(m for m in cfg.methods if m.name == "mae")
    written = method_figures("mae", spec.settings, str(state), files, cfg.train.decode_size, tmp_path, count=4)
    assert written == ["mae_reconstructions.png"]
    img = Image.open(tmp_path / written[0])
    assert img.size[0] == 3 * img.size[1] // 4  # 4 rows of original | masked | reconstruction
    # The train step drew it too, and it reached the step's MLflow run as an artifact.
    from mlflow.tracking import MlflowClient

    assert (state.parent / "mae_reconstructions.png").is_file()
    client = MlflowClient(cfg.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id], "attributes.run_name = 'train[mae]'")
    assert any("mae_reconstructions.png" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in runs)
