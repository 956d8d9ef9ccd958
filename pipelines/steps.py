"""The pipeline's step functions: dataset, train, embed, evaluate, register.

Each takes a :class:`~pipelines.dag.StepContext` and returns a :class:`~pipelines.dag.StepResult`;
heavy work runs on Ray (tasks, Ray Data, a TorchTrainer). ``ctx.run`` is the
:class:`~pipelines.run.PipelineRun` (config, tracker).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import ray
import torch

from components.data import shards as sh
from components.data.scenes import SHAPES, scene_rows
from components.evaluation.knn import knn_top1
from components.evaluation.linear import fit_linear_probe
from components.methods.base import Upstream
from components.methods.registry import build_method
from components.models.embedding import EmbeddingModel, estimate_bn_stats
from pipelines.dag import StepContext, StepResult

# ---------------------------------------------------------------- dataset


@ray.remote(num_cpus=1)
def _scan_file(file_uri: str, decode_size: int) -> dict:
    """Decode every row of one shard: count rows and list the bad ones with file and row."""
    return sh.scan_shard(file_uri, decode_size)


def dataset_step(ctx: StepContext) -> StepResult:
    """Materialise a dataset (render scenes, or point at existing shards), then scan it.

    Shard-level problems (not Parquet, a missing column, wrong types, no rows, a foreign file
    among the shards) stop here, naming the file. Row-level problems (images that do not decode,
    duplicate ids, empty or huge captions, bad boxes) go to ``bad_rows.json`` (file, row, id,
    column, reason, action), which is logged to MLflow; the run continues.
    """
    spec = ctx.step.settings["spec"]
    if spec["kind"] == "scenes":
        root = str(ctx.out_dir / "data")
        for split in sh.SPLITS:
            sh.write_shards(scene_rows(spec["seed"], split, spec[split], spec["image_size"]), sh.join(root, split), rows_per_shard=1024)
        classes = list(SHAPES)
    else:
        root = spec["uri"]
        classes = sh.read_dataset_info(root).classes
    files = {}
    for split in sh.SPLITS:
        files[split] = sh.list_shards(sh.join(root, split), missing_ok=True)  # a dataset may lack a split; the consumer says if it needs it
        for f in files[split]:
            sh.check_shard_schema(f)
    all_files = [f for fs_ in files.values() for f in fs_]
    scans = ray.get([_scan_file.remote(f, ctx.step.settings["decode_size"]) for f in all_files])
    rows = {s: sum(r["rows"] for r in scans if r["file"] in files[s]) for s in sh.SPLITS}
    bad = [b for r in scans for b in r["bad"]] + sh.duplicate_ids(all_files)
    (ctx.out_dir / "bad_rows.json").write_text(json.dumps(bad, indent=2))
    fingerprint = sh.fingerprint_files(all_files)
    if spec["kind"] == "scenes":
        sh.write_dataset_info(root, sh.DatasetInfo(ctx.step.name, classes, rows, fingerprint, {"generator": spec}))
    counts = {c: sum(1 for b in bad if b["column"] == c) for c in ("image", "id", "captions", "boxes")}
    skipped = len({(b["file"], b["row"]) for b in bad if b["action"] == "skipped"})
    if bad:
        parts = ", ".join(f"{n} {c}" for c, n in counts.items() if n)
        print(f"[data] {len(bad)} row problems ({parts}); {skipped} rows skipped (unusable image), the rest kept; "
              f"each listed with file and row in {ctx.out_dir / 'bad_rows.json'} (logged to MLflow)", flush=True)
    return StepResult(
        outputs={"root": root, "files": files, "classes": classes, "rows": rows, "fingerprint": fingerprint},
        metrics={"rows_" + s: n for s, n in rows.items()} | {"bad_rows": len(bad), "skipped_rows": skipped} | {f"bad_rows_{c}": n for c, n in counts.items()},
        params={"kind": spec["kind"], "root": sh.safe_uri(root), "fingerprint": fingerprint},
        artifacts=["bad_rows.json"],
    )


# ---------------------------------------------------------------- train


def train_step(ctx: StepContext) -> StepResult:
    """Train one method with the generic Ray Train loop; keep its final full state."""
    from pipelines.plots import loss_curve
    from pipelines.train_loop import run_trainer

    from pipelines.config import TrainSpec

    s = ctx.step.settings
    data = ctx.inputs[s["dataset_step"]].outputs
    train = TrainSpec.model_validate(s["train"])
    method = build_method(s["method"], s["settings"])
    resources = {f: upstream_of(ctx, ref).__dict__ for f, ref in (s.get("references") or {}).items()}
    out = run_trainer(
        key=ctx.step.key, method=s["method"], settings=s["settings"], train=train,
        rows=data["rows"]["train"], files=data["files"]["train"], storage=ctx.run.storage, seed=s["seed"],
        views=method.views, out_dir=ctx.out_dir, resources=resources,
    )
    loss_curve(out["history"], ctx.out_dir / "loss_curve.png", title=f"{s['method']} training loss")
    # Figures the method draws of itself (e.g. MAE's reconstructions), logged beside the curve.
    from pipelines.figures import method_figures

    figures = method_figures(s["method"], s["settings"], out["state"], data["files"]["train"], train.decode_size, ctx.out_dir)
    last = out["history"][-1] if out["history"] else {}
    return StepResult(
        outputs={"state": out["state"], "method": s["method"], "settings": s["settings"]},
        metrics={f"final_{k}": v for k, v in last.items() if k in ("loss", "images_per_s", "epoch", "step")},
        history=out["history"],
        params={"method": s["method"], "settings": s["settings"], "train": train.model_dump(), "seed": s["seed"], "views": method.views.to_dict()},
        artifacts=["history.json", "loss_curve.png", *figures],
    )


def upstream_of(ctx: StepContext, ref: str) -> Upstream:
    """A reference of the running step as an :class:`Upstream`: an input step's outputs, or a
    registered ``models:/`` version (its training state is downloaded into the step folder)."""
    if ref.startswith("models:/"):
        from pipelines.models import upstream_from_registry

        return upstream_from_registry(ctx.run.tracker.client, ref.split("#", 1)[0], ctx.out_dir / "upstream")
    out = ctx.inputs[ref].outputs
    kind = "tokenizer" if ref.startswith("tokenizer[") else "method"
    return Upstream(kind=kind, name=out.get("method") or out.get("kind"), settings=out.get("settings") or {},
                    state_path=out.get("state"), files=out.get("files") or {})


def text_tokenizer_step(ctx: StepContext) -> StepResult:
    """Fit a text tokenizer (``tokenizers:`` entry of a text kind) on the train split's captions."""
    from components.tokenizers.registry import text_tokenizer_fit

    s = ctx.step.settings
    data = ctx.inputs[s["dataset_step"]].outputs
    fit = text_tokenizer_fit(s["kind"])
    captions = (c for f in data["files"]["train"] for r in sh.read_rows(f, ["captions"]) for c in (r.get("captions") or []) if c)
    written = fit(captions, s["settings"], ctx.out_dir)
    files = {k: str(ctx.out_dir / v) for k, v in written.items()}
    return StepResult(outputs={"kind": s["kind"], "settings": s["settings"], "files": files},
                      params={"kind": s["kind"], "settings": s["settings"]}, artifacts=sorted(written.values()))


# ---------------------------------------------------------------- embed


BN_STATS_IMAGES = 10_000  # a floor's BatchNorm statistics come from at most this many train images


class EncoderBuilder:
    """Picklable recipe for the shippable encoder: a trained state, or a seeded random init.

    With ``bn_stats_files`` (train shard files) the encoder's BatchNorm statistics are estimated
    on their first :data:`BN_STATS_IMAGES` images (decoded at ``decode_size``) before it embeds:
    the "random-init-bn" floor, the random-init weights with the data's statistics.
    """

    def __init__(self, method: str, settings: dict, state_path: str | None, seed: int,
                 bn_stats_files: list[str] | None = None, decode_size: int | None = None):
        self.method, self.settings, self.state_path, self.seed = method, settings, state_path, seed
        self.bn_stats_files, self.decode_size = bn_stats_files, decode_size

    def __call__(self) -> EmbeddingModel:
        torch.manual_seed(self.seed)
        m = build_method(self.method, self.settings)
        if self.state_path:
            from pipelines.train_loop import load_state

            m.load_state_dict(load_state(Path(self.state_path))["method"])
        model = EmbeddingModel(m.encoder, m.cfg.image_size)
        if self.bn_stats_files:
            estimate_bn_stats(model, _train_images(self.bn_stats_files, int(self.decode_size or m.cfg.image_size)))
        return model


def _train_images(files: list[str], decode_size: int, limit: int = BN_STATS_IMAGES) -> torch.Tensor:
    """The decodable images among the first ``limit`` rows of ``files`` as uint8 (N, 3, S, S)."""
    from components.data import shards as sh
    from components.data.decode import decode_batch

    rows = (r["image"] for f in files for r in sh.read_rows(f, columns=["image"]))
    images = list(itertools.islice(rows, limit))  # stops reading at the cap
    arr, _, _ = decode_batch(images, list(range(len(images))), decode_size)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def embed_step(ctx: StepContext) -> StepResult:
    """Embed the eval dataset's splits with a frozen encoder (Ray Data batch inference)."""
    from pipelines.plots import pca_scatter
    from pipelines.ray_data import embed_splits

    s = ctx.step.settings
    data = ctx.inputs[s["dataset_step"]].outputs
    state = ctx.inputs[s["train_step"]].outputs["state"] if s.get("train_step") else None
    bn_files = data["files"].get("train") if s.get("bn_stats") else None
    build = EncoderBuilder(s["method"], s["settings"], state, s["seed"], bn_files, s["decode_size"])
    outputs = embed_splits(data["files"], build, s["decode_size"], s["batch_size"], ctx.out_dir)
    artifacts = []
    if "val" in outputs:
        z = np.load(outputs["val"])
        pca_scatter(z["feats"], z["labels"], data["classes"], ctx.out_dir / "embeddings_pca.png", title=f"{ctx.step.name}: val embeddings (PCA)")
        artifacts.append("embeddings_pca.png")
    return StepResult(outputs=outputs, params={"representation": s["label"]}, artifacts=artifacts)


# ---------------------------------------------------------------- evaluate


@ray.remote(num_cpus=1)
def _evaluate(paths: dict, num_classes: int, k: int, temperature: float, linear: bool) -> dict:
    torch.set_num_threads(1)
    z = {s: np.load(p) for s, p in paths.items()}
    tr = torch.from_numpy(z["train"]["feats"]), torch.from_numpy(z["train"]["labels"])
    out: dict[str, float] = {}
    probe = None
    if linear and "val" in z:
        probe = fit_linear_probe(*tr, torch.from_numpy(z["val"]["feats"]), torch.from_numpy(z["val"]["labels"]), num_classes)
        out["linear_weight_decay"] = probe.weight_decay
    for split in ("val", "test"):
        if split not in z:
            continue
        q, ql = torch.from_numpy(z[split]["feats"]), torch.from_numpy(z[split]["labels"])
        out[f"{split}_knn_top1"] = knn_top1(*tr, q, ql, num_classes, k, temperature)
        if probe is not None:
            out[f"{split}_linear_top1"] = probe.top1(q, ql)
        out[f"{split}_count"] = float(len(ql))
    return out


def evaluate_step(ctx: StepContext) -> StepResult:
    """kNN (cosine, k weighted) and linear-probe top-1 on val and test (a Ray task)."""
    s = ctx.step.settings
    emb = ctx.inputs[s["embed_step"]].outputs
    classes = ctx.inputs[s["dataset_step"]].outputs["classes"]
    metrics = ray.get(_evaluate.remote(emb, len(classes), s["knn_k"], s["knn_temperature"], s["linear_probe"]))
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return StepResult(outputs={"metrics": metrics, "label": s["label"]}, metrics=metrics, params={"representation": s["label"]}, artifacts=["metrics.json"])
