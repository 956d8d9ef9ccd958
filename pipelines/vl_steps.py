"""VisualBERT's own DAG steps (``VisualBERT.dag_steps``): evaluate and register.

    train[visualbert] ──► evaluate[visualbert] ──► register[visualbert]
          ▲ encoder (train[simclr] or models:/...), tokenizer (tokenizer[text])

``evaluate`` scores the eval dataset's held-out pairs (components/evaluation/vl.py): val gets
ITM accuracy (the registry's selection metric, ``val_itm_acc``); test gets ITM accuracy, the
grounding probe and zero-shot retrieval over its first :data:`RETRIEVAL_PAIRS` pairs. It runs
as one Ray task. ``register`` logs the model as ``<pipeline>-visualbert`` together with what
it needs to run: the fitted tokenizer and the frozen visual encoder's weights.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import ray
import torch

from components.checkpoint import load_state
from components.data import shards as sh
from components.data.decode import decode_batch
from components.data.regions import boxes_array, decoded_boxes, image_size
from components.data.views import make_views, normalize
from components.methods.base import Upstream
from components.methods.registry import build_method
from pipelines.dag import Step, StepContext, StepResult

RETRIEVAL_PAIRS = 500  # N x N matching scores: 250k transformer passes at 500
SELECTION_METRIC = "itm_acc"


def add_steps(dag, cfg, spec, settings: dict, train_step: str, ds_steps: dict[str, str]) -> list[str]:
    """Add ``evaluate[<name>]`` (a row of the comparison table) and ``register[<name>]``."""
    eval_ds = ds_steps[cfg.evaluate.dataset]
    refs = dag.steps[train_step].settings.get("references") or {}
    ref_steps = [r for r in refs.values() if r in dag.steps]
    train = cfg.method_train(spec)
    ev = dag.add(Step(
        f"evaluate[{spec.name}]", "evaluate", vl_evaluate_step,
        {"label": spec.name, "method": spec.name, "settings": settings, "train_step": train_step, "references": refs, "dataset_step": eval_ds,
         "decode_size": cfg.train.decode_size, "retrieval_pairs": RETRIEVAL_PAIRS, "seed": cfg.seed, "use_gpu": train.use_gpu},
        [eval_ds, train_step, *ref_steps],
    ))
    if cfg.registration.enabled:
        r = cfg.registration
        dag.add(Step(
            f"register[{spec.name}]", "register", vl_register_step,
            {"pipeline": cfg.name, "method": spec.name, "settings": settings, "train_step": train_step, "evaluate_step": ev.name, "references": refs,
             "selection_metric": SELECTION_METRIC, "alias": r.alias, "min_improvement": r.min_improvement,
             "train_fingerprint": dag.steps[train_step].key, "eval_fingerprint": dag.steps[eval_ds].key},
            [train_step, ev.name, *ref_steps],
        ))
    return [ev.name]


def _resources(ctx: StepContext, refs: dict[str, str]) -> dict[str, Upstream]:
    from pipelines.steps import upstream_of

    return {field: upstream_of(ctx, ref) for field, ref in refs.items()}


def load_eval_split(files: list[str], method, decode_size: int) -> dict[str, Any]:
    """Rows of shard files with an image that decodes and a caption -> whole-image views
    (uint8, the method's size), boxes (normalised, decoded-image coordinates) and first captions."""
    views, boxes, captions = [], [], []
    for f in files:
        rows = [r for r in sh.read_rows(f, ["id", "image", "captions", "boxes"]) if r.get("captions")]
        for i in range(0, len(rows), 256):
            chunk = rows[i : i + 256]
            imgs, keep, _ = decode_batch([r["image"] for r in chunk], [r["id"] for r in chunk], decode_size)
            kept = [r for r, k in zip(chunk, keep) if k]
            if not kept:
                continue
            views.append(make_views(torch.from_numpy(imgs), method.views)["view_0"])
            per_row = [decoded_boxes(r.get("boxes") or [], *image_size(r["image"]), decode_size) for r in kept]
            boxes.append(torch.from_numpy(boxes_array(per_row, method.cfg.max_boxes)))
            captions += [r["captions"][0] for r in kept]
    if not captions:
        return {"views": None, "boxes": None, "captions": []}
    return {"views": torch.cat(views), "boxes": torch.cat(boxes), "captions": captions}


@ray.remote(num_cpus=1)
def _evaluate_vl(method_name: str, settings: dict, state_path: str, resources: dict[str, dict], files: dict[str, list[str]],
                 decode_size: int, retrieval_pairs: int, seed: int) -> dict[str, float]:
    from components.evaluation.vl import evaluate_all, itm_accuracy

    torch.set_num_threads(1)  # the task holds one CPU; more OpenMP threads than CPUs spin against each other
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = build_method(method_name, settings)
    method.attach({k: Upstream(**v) for k, v in resources.items()})
    method.load_state_dict(load_state(state_path)["method"])
    method.to(device).eval()
    out: dict[str, float] = {}
    for split, split_files in files.items():
        data = load_eval_split(split_files, method, decode_size)
        if not data["captions"]:
            continue
        regions = [torch.cat(parts) for parts in zip(*(
            method.encode_regions(normalize(data["views"][i : i + 256].to(device)), data["boxes"][i : i + 256].to(device))
            for i in range(0, len(data["captions"]), 256)))]
        if split == "val":
            metrics = itm_accuracy(method, tuple(regions), data["captions"], seed)
        else:
            metrics = evaluate_all(method, tuple(regions), data["captions"], seed, retrieval_pairs)
        out.update({f"{split}_{k}": float(v) for k, v in metrics.items()})
        out[f"{split}_count"] = float(len(data["captions"]))
    return out


def vl_evaluate_step(ctx: StepContext) -> StepResult:
    """ITM accuracy (val, test), grounding probe and retrieval (test) of a trained VisualBERT."""
    s = ctx.step.settings
    data = ctx.inputs[s["dataset_step"]].outputs
    state = ctx.inputs[s["train_step"]].outputs["state"]
    resources = {k: v.__dict__ for k, v in _resources(ctx, s["references"]).items()}
    files = {split: data["files"][split] for split in ("val", "test") if data["files"].get(split)}
    task = _evaluate_vl.options(num_gpus=1) if s.get("use_gpu") else _evaluate_vl
    metrics = ray.get(task.remote(s["method"], s["settings"], state, resources, files, s["decode_size"], s["retrieval_pairs"], s["seed"]))
    if not metrics:
        raise RuntimeError("no held-out image-caption pairs: the eval dataset's val/test splits have no rows with captions")
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return StepResult(outputs={"metrics": metrics, "label": s["label"]}, metrics=metrics, params={"representation": s["label"]}, artifacts=["metrics.json"])


def vl_register_step(ctx: StepContext) -> StepResult:
    """Register ``<pipeline>-<method>``: ``visualbert/`` (weights as safetensors, config, the
    tokenizer file, the frozen encoder's weights and config) and ``training_state/``; the alias
    moves only if val ITM accuracy beats the champion's."""
    import mlflow
    from safetensors.torch import save_file

    from pipelines.alias import alias_lock, record_move
    from pipelines.register_step import _ensure_model, _wait_ready
    from pipelines.registry import current_alias, gate

    s = ctx.step.settings
    client = ctx.run.tracker.client
    state = ctx.inputs[s["train_step"]].outputs["state"]
    scores = ctx.inputs[s["evaluate_step"]].outputs["metrics"]
    metric = s["selection_metric"]
    score = scores.get(f"val_{metric}")
    if score is None:
        raise RuntimeError(f"evaluation produced no val_{metric}; the eval dataset needs a val split with captions")
    resources = _resources(ctx, s["references"])
    folder = ctx.out_dir / "visualbert"
    folder.mkdir()
    weights = load_state(state)["method"]
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    tok_file = resources["tokenizer"].files["tokenizer"]
    shutil.copyfile(tok_file, folder / "tokenizer.json")
    encoder = resources["encoder"].load_method()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / "visual_encoder.safetensors"))
    meta = {"method": s["method"], "settings": s["settings"], "references": s["references"],
            "visual_encoder": {"method": resources["encoder"].name, "settings": resources["encoder"].settings, "weights": "visual_encoder.safetensors"},
            "tokenizer": {"kind": resources["tokenizer"].name, "settings": resources["tokenizer"].settings, "file": "tokenizer.json"}}
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    run_id = ctx.run.tracker.child_ids[ctx.step.name]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(folder), "visualbert")
        mlflow.log_artifact(state, "training_state")
    name = f"{s['pipeline']}-{s['method']}"
    rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in sorted(scores.items()) if not k.endswith(("_count", "_pairs")))
    description = f"**{s['method']}** from pipeline `{s['pipeline']}` (weights, tokenizer and frozen visual encoder under `visualbert/`)\n\n| metric | value |\n|---|---|\n{rows}\n"
    source = f"{client.get_run(run_id).info.artifact_uri}/visualbert"
    mv = client.create_model_version(name=_ensure_model(client, name), source=source, run_id=run_id, description=description,
                                     tags={"reprflow.pipeline_run": ctx.run.tracker.parent_id, "reprflow.config_hash": ctx.run.config_hash,
                                           "reprflow.data_fingerprint": s["train_fingerprint"], "reprflow.code_version": ctx.run.code_version,
                                           "reprflow.tokenizer": str(s["references"].get("tokenizer")), "reprflow.visual_encoder": str(s["references"].get("encoder"))})
    _wait_ready(client, name, mv.version)
    with alias_lock(client, name):
        previous = current_alias(client, name, s["alias"])
        decision = gate(client, name, mv.version, score, metric, s["eval_fingerprint"], alias=s["alias"], min_improvement=s["min_improvement"])
        if decision.promoted and decision.reason != "already the champion":
            record_move(client, name, s["alias"], str(mv.version), previous.version if previous else None, "promoted", decision.reason)
    print(f"[register] {name} v{mv.version}: {'promoted to' if decision.promoted else 'did not take'} @{s['alias']} ({decision.reason})", flush=True)
    outputs = {"name": name, "version": str(mv.version), "promoted": decision.promoted, "reason": decision.reason,
               "champion_version": decision.champion_version, "model_uri": f"models:/{name}/{mv.version}"}
    return StepResult(outputs=outputs, metrics={f"val_{metric}": score, "promoted": float(decision.promoted)}, params={"registered_model": name, "version": mv.version})
