"""The register step: log the shippable encoder to MLflow, create a version, run the gate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
from safetensors.torch import save_file

from pipelines import watermark as wm
from pipelines.dag import StepContext, StepResult
from pipelines.registry import current_alias, gate
from pipelines.steps import EncoderBuilder


def model_name(pipeline: str, method: str) -> str:
    """Registered model name of a (pipeline, method) pair."""
    return f"{pipeline}-{method}"


def register_step(ctx: StepContext) -> StepResult:
    """Log model + encoder weights + full training state; register; move the alias on a win."""
    from pipelines.alias import alias_lock, record_move

    s = ctx.step.settings
    run = ctx.run
    client = run.tracker.client
    train_out = ctx.inputs[s["train_step"]].outputs
    scores = ctx.inputs[s["evaluate_step"]].outputs["metrics"]
    metric = s["selection_metric"]
    score = scores.get(f"val_{metric}")
    if score is None:
        raise RuntimeError(f"evaluation produced no val_{metric}; the eval dataset needs a val split")
    name = model_name(s["pipeline"], s["method"])
    data = ctx.inputs[s["dataset_step"]].outputs if s.get("dataset_step") else None
    mv = log_version(
        ctx, name=name, method=s["method"], settings=s["settings"], state=train_out["state"], decode_size=s["decode_size"],
        description=_description(run, s, scores),
        tags={"reprflow.pipeline_run": run.tracker.parent_id, "reprflow.config_hash": run.config_hash, "reprflow.data_fingerprint": s["train_fingerprint"], "reprflow.code_version": run.code_version},
        watermark=wm.compute(data["root"], data["files"]["train"]) if data else None,
    )
    with alias_lock(client, name):
        previous = current_alias(client, name, s["alias"])
        decision = gate(client, name, mv.version, score, metric, s["eval_fingerprint"], alias=s["alias"], min_improvement=s["min_improvement"])
        if decision.promoted and decision.reason != "already the champion":
            record_move(client, name, s["alias"], str(mv.version), previous.version if previous else None, "promoted", decision.reason)
    verdict = "promoted to" if decision.promoted else "did not take"
    print(f"[register] {name} v{mv.version}: {verdict} @{s['alias']} ({decision.reason})", flush=True)
    outputs = {"name": name, "version": str(mv.version), "promoted": decision.promoted, "reason": decision.reason,
               "champion_version": decision.champion_version, "model_uri": f"models:/{name}/{mv.version}"}
    return StepResult(outputs=outputs, metrics={f"val_{metric}": score, "promoted": float(decision.promoted)}, params={"registered_model": name, "version": mv.version})


def log_version(ctx: StepContext, *, name: str, method: str, settings: dict, state: str, decode_size: int, description: str,
                tags: dict[str, str], watermark: dict | None = None):
    """Log the shippable model, ``encoder/`` (safetensors + config.json), ``training_state/`` and
    the data watermark in the step's run, and create a READY model version of ``name``."""
    client = ctx.run.tracker.client
    run_id = ctx.run.tracker.child_ids[ctx.step.name]
    model = EncoderBuilder(method, settings, state, 0)().eval()
    example = np.random.default_rng(0).integers(0, 256, size=(2, 3, decode_size, decode_size), dtype=np.uint8)
    meta = {"method": method, "settings": settings, "image_size": model.image_size, "decode_size": decode_size,
            "input": f"uint8 (N, 3, {decode_size}, {decode_size}) RGB"}
    (ctx.out_dir / "encoder").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ctx.out_dir / "encoder" / "model.safetensors"))
    (ctx.out_dir / "encoder" / "config.json").write_text(json.dumps(meta, indent=2))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, serialization_format="pt2")
        mlflow.log_artifacts(str(ctx.out_dir / "encoder"), "encoder")
        mlflow.log_artifact(state, "training_state")
    if watermark is not None:
        wm.log(client, run_id, watermark)
    # model_id ties the version to the logged model; an MLflow server refuses a models:/ source without it.
    mv = client.create_model_version(name=_ensure_model(client, name), source=info.model_uri, run_id=run_id, description=description, tags=tags,
                                     model_id=info.model_id)
    _wait_ready(client, name, mv.version)
    if watermark is not None:
        wm.tag_version(client, name, mv.version, watermark)
    return mv


def _ensure_model(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="reprflow encoder (preprocessing + frozen backbone): uint8 RGB images -> features")
        except MlflowException:
            pass  # created concurrently
    return name


def _wait_ready(client, name: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.5)
    raise RuntimeError(f"model version {name}/{version} not READY after {timeout}s")


def _description(run, s: dict, scores: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in sorted(scores.items()) if "top1" in k)
    return (
        f"**{s['method']}** from pipeline `{s['pipeline']}`\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"Lineage: pipeline run `{run.tracker.parent_id}`, config hash `{run.config_hash}`, train data `{s['train_fingerprint']}`, "
        f"eval data `{s['eval_fingerprint']}`, code `{run.code_version}`."
    )


def registered_version_exists(run, result: StepResult) -> bool:
    """Cache check for the register step: the recorded version must still be in the registry."""
    from mlflow.exceptions import MlflowException

    try:
        run.tracker.client.get_model_version(result.outputs["name"], result.outputs["version"])
        return True
    except (MlflowException, KeyError):
        return False



TOKENIZER_DIR = "tokenizer"


def register_tokenizer_step(ctx: StepContext) -> StepResult:
    """Register a trained tokenizer as model ``<pipeline>-tokenizer-<name>``.

    Its run holds ``tokenizer/``: ``tokenizer.json`` (kind, settings) plus the trained state
    (image tokenizers: ``state.pt``, loaded with ``weights_only``) or the fitted files (text
    tokenizers). ``models:/<pipeline>-tokenizer-<name>/<version>`` can be a reference of a
    method in another pipeline (see ``pipelines.models.upstream_from_registry``).
    """
    import shutil

    s = ctx.step.settings
    client = ctx.run.tracker.client
    out = ctx.inputs[s["tokenizer_step"]].outputs
    folder = ctx.out_dir / TOKENIZER_DIR
    folder.mkdir()
    files = {}
    if out.get("state"):
        shutil.copyfile(out["state"], folder / "state.pt")
    for logical, path in (out.get("files") or {}).items():
        shutil.copyfile(path, folder / Path(path).name)
        files[logical] = Path(path).name
    meta = {"sort": "tokenizer", "kind": s["kind"], "name": s["tokenizer"], "settings": out.get("settings") or {},
            "state": "state.pt" if out.get("state") else None, "files": files}
    (folder / "tokenizer.json").write_text(json.dumps(meta, indent=2))
    run_id = ctx.run.tracker.child_ids[ctx.step.name]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(folder), TOKENIZER_DIR)
    name = f"{s['pipeline']}-tokenizer-{s['tokenizer']}"
    if not _exists(client, name):
        try:
            client.create_registered_model(name, description=f"reprflow tokenizer ({s['kind']}) trained by pipeline '{s['pipeline']}'")
        except Exception:  # noqa: BLE001 - created concurrently
            pass
    source = f"{client.get_run(run_id).info.artifact_uri}/{TOKENIZER_DIR}"
    mv = client.create_model_version(name=name, source=source, run_id=run_id,
                                     tags={"reprflow.pipeline_run": ctx.run.tracker.parent_id, "reprflow.kind": s["kind"], "reprflow.code_version": ctx.run.code_version})
    _wait_ready(client, name, mv.version)
    print(f"[register] {name} v{mv.version} (tokenizer)", flush=True)
    return StepResult(outputs={"name": name, "version": str(mv.version), "model_uri": f"models:/{name}/{mv.version}"},
                      params={"registered_model": name, "version": mv.version})


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
