"""The VisualBERT method on a tiny frozen encoder: attach, forward, feature cache, config errors,
and that it learns in a plain PyTorch loop (no Ray)."""

from __future__ import annotations

import pytest
import torch

from components.checkpoint import save_state_file
from components.data.scenes import scene_rows
from components.errors import ReprflowError
from components.methods.base import Upstream
from components.methods.registry import build_method, method_config
from components.methods.simclr import SimCLR, SimCLRConfig
from components.methods.visualbert import VisualBERT
from components.tokenizers.text import fit_wordpiece
from components.training import TrainStep, prepare_batch

TINY = {"encoder": "simclr", "tokenizer": "text", "image_size": 32, "hidden_dim": 32, "depth": 1, "num_heads": 2, "visual_dim": 256, "max_text_len": 32,
        "hard_negative_p": 0.5, "hard_negative_words": [["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]],
        "optim": {"lr": 0.02, "warmup_epochs": 0}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("vb")
    torch.manual_seed(0)
    enc_settings = {"image_size": 16, "proj_hidden_dim": 16, "proj_dim": 8}
    save_state_file({"method": SimCLR(SimCLRConfig(**enc_settings)).state_dict()}, root / "state.pt")
    rows = list(scene_rows(0, "train", 64, 32))
    fit_wordpiece([r["captions"][0] for r in rows], {}, root / "tok")
    resources = {"encoder": Upstream("method", "simclr", enc_settings, str(root / "state.pt")),
                 "tokenizer": Upstream("tokenizer", "wordpiece", {}, None, {"tokenizer": str(root / "tok" / "tokenizer.json")})}
    return resources, rows


def _batch(method, rows):
    from components.data.views import views_from_encoded

    cols = {k: [r[k] for r in rows] for k in ("id", "image", "captions", "boxes")}
    return prepare_batch({k: torch.from_numpy(v) for k, v in views_from_encoded(cols, method.views, 32).items()})


def test_attach_keeps_upstream_out_of_the_state_and_checks_sizes(upstream):
    resources, _ = upstream
    m = build_method("visualbert", TINY)
    before = set(m.state_dict())
    m.attach(resources)
    assert set(m.state_dict()) == before  # frozen encoder and tokenizer are not checkpointed
    assert not any(k.startswith(("_upstream", "encoder.net")) for k in before)
    enc = m._upstream[0].encoder
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    with pytest.raises(ReprflowError, match="visual_dim: 256"):
        build_method("visualbert", {**TINY, "visual_dim": 512}).attach(resources)
    with pytest.raises(ReprflowError, match="vocab_size"):
        build_method("visualbert", {**TINY, "vocab_size": 8}).attach(resources)
    with pytest.raises(ReprflowError, match="'encoder'"):
        method_config("visualbert", {"tokenizer": "text"}, where="p.yaml: methods[0].settings")


def test_forward_loss_cache_and_frozen_encoder(upstream):
    resources, rows = upstream
    torch.manual_seed(0)
    m = build_method("visualbert", TINY)
    m.attach(resources)
    batch = _batch(m, rows[:16])
    assert batch["view_0"].shape == (16, 3, 32, 32) and batch["boxes"].shape == (16, 2, 4)
    regions_of = m._upstream[0]
    enc = regions_of.encoder
    calls = []
    enc.feature_map = lambda x, stage=4, _f=type(enc).feature_map: (calls.append(1), _f(enc, x, stage))[1]
    out = m(batch)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0 and 0 <= out["itm_acc"] <= 1
    out["loss"].backward()
    assert all(p.grad is None for p in enc.parameters())
    assert m.model.embeddings.visual[0].weight.grad is not None
    n = len(calls)
    m(batch)  # the same samples again: features come from the cache, the encoder does not run
    assert len(calls) == n and len(regions_of.cache) == 16
    feats, regions, mask = m.encode_regions(batch["view_0"], batch["boxes"])
    cached, _, _ = regions_of.cached(batch["view_0"], batch["boxes"])
    torch.testing.assert_close(cached, feats)
    assert regions.shape == (16, 5, 4) and mask[:, 0].all()


def test_visualbert_learns_in_a_plain_loop(upstream):
    resources, rows = upstream
    torch.manual_seed(0)
    m = build_method("visualbert", {**TINY, "dropout": 0.0})
    assert isinstance(m, VisualBERT)
    m.attach(resources)
    batch = _batch(m, rows)
    step = TrainStep(m, global_batch=64, steps_per_epoch=40, epochs=1)
    losses = [step(batch, i)["loss"] for i in range(40)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_dag_puts_encoder_and_tokenizer_first_and_adds_its_own_steps(tmp_path):
    from pipelines.config import parse_config
    from pipelines.run import build_dag
    from tests.conftest import TINY_METHODS, TINY_TOKENIZERS, tiny_config

    data = tiny_config(tmp_path, methods={"visualbert": TINY_METHODS["visualbert"], "simclr": TINY_METHODS["simclr"]},
                       tokenizers={"tiny-text": TINY_TOKENIZERS["tiny-text"]})
    dag, rows = build_dag(parse_config(data))
    order = list(dag.steps)
    assert order.index("train[simclr]") < order.index("train[visualbert]") > order.index("tokenizer[tiny-text]")
    assert set(dag.steps["train[visualbert]"].inputs) == {"dataset[scenes]", "train[simclr]", "tokenizer[tiny-text]"}
    assert dag.steps["train[visualbert]"].settings["references"] == {"encoder": "train[simclr]", "tokenizer": "tokenizer[tiny-text]"}
    assert "evaluate[visualbert]" in rows and "embed[visualbert]" not in dag.steps
    assert dag.steps["register[visualbert]"].fn.__name__ == "vl_register_step"
    assert not any("random-init" in s and "visualbert" in s for s in dag.steps)
    with pytest.raises(ReprflowError, match="tokenizer: 'nope'"):
        parse_config({**data, "methods": [{"name": "visualbert", "settings": {**TINY_METHODS["visualbert"], "tokenizer": "nope"}},
                                          {"name": "simclr", "settings": TINY_METHODS["simclr"]}]})
