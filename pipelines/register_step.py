"""The register step: log the shippable encoder to MLflow, create a version, run the gate.

No half-registered model: a version is created tagged ``reprflow.registration=pending`` (with
the step key and the training state's sha256) and tagged ``complete`` only after the gate has
run. If MLflow goes away in between, the step fails with a clear error; the rerun of the same
command finds the pending version of the same training state and finishes it (artifacts logged
into its own run, gate, alias) instead of training or registering again.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
from safetensors.torch import save_file

from components.errors import ReprflowError
from pipelines import watermark as wm
from pipelines.dag import StepContext, StepResult, fault_point
from pipelines.registry import current_alias, gate
from pipelines.steps import EncoderBuilder

TAG_REGISTRATION = "reprflow.registration"  # pending -> complete
TAG_REGISTER_KEY = "reprflow.register_key"  # the register step's key
TAG_STATE_SHA = "reprflow.state_sha256"  # the registered training state


# Register steps run in driver threads; torch.export (pt2 serialisation) keeps global tracing
# state, and two exports at once fail with "fake tensor in the exported program constants".
_EXPORT_LOCK = threading.Lock()


def _model_requirements() -> list[str]:
    """What loading the exported encoder needs (MLflow adds itself). Given, not inferred: MLflow's
    inference loads the model in a subprocess (~10 s per version here, 2026-12-07) and lists
    whatever the environment happened to import (lightly, pytorch-lightning, matplotlib ...)."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


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
    state_sha = _state_sha(train_out["state"])
    mv = log_version(
        ctx, name=name, method=s["method"], settings=s["settings"], state=train_out["state"], decode_size=s["decode_size"],
        description=_description(run, s, scores),
        tags={"reprflow.pipeline_run": run.tracker.parent_id, "reprflow.config_hash": run.config_hash, "reprflow.data_fingerprint": s["train_fingerprint"], "reprflow.code_version": run.code_version,
              TAG_REGISTRATION: "pending", TAG_REGISTER_KEY: ctx.step.key, TAG_STATE_SHA: state_sha},
        watermark=wm.compute(data["root"], data["files"]["train"]) if data else None,
        resume=pending_version(client, name, ctx.step.key, state_sha),
    )
    fault_point(f"{ctx.step.name}:version-created", {"version": str(mv.version)})
    with alias_lock(client, name):
        previous = current_alias(client, name, s["alias"])
        decision = gate(client, name, mv.version, score, metric, s["eval_fingerprint"], alias=s["alias"], min_improvement=s["min_improvement"])
        if decision.promoted and decision.reason != "already the champion":
            record_move(client, name, s["alias"], str(mv.version), previous.version if previous else None, "promoted", decision.reason)
    complete_registration(client, name, mv.version, run.tracker.parent_id)
    verdict = "promoted to" if decision.promoted else "did not take"
    print(f"[register] {name} v{mv.version}: {verdict} @{s['alias']} ({decision.reason})", flush=True)
    outputs = {"name": name, "version": str(mv.version), "promoted": decision.promoted, "reason": decision.reason,
               "champion_version": decision.champion_version, "model_uri": f"models:/{name}/{mv.version}"}
    return StepResult(outputs=outputs, metrics={f"val_{metric}": score, "promoted": float(decision.promoted)}, params={"registered_model": name, "version": mv.version})


def log_version(ctx: StepContext, *, name: str, method: str, settings: dict, state: str, decode_size: int, description: str,
                tags: dict[str, str], watermark: dict | None = None, resume=None):
    """Log the shippable model, ``encoder/`` (safetensors + config.json), ``training_state/`` and
    the data watermark in the step's run, and create a READY model version of ``name``.

    ``resume``: a version left pending by an interrupted attempt of this step (same training
    state): its artifacts are logged into this run again and it is returned, no new version.
    """
    from pipelines.tracking import with_retries
    from components.checkpoint import manifest_path

    client = ctx.run.tracker.client
    run_id = ctx.run.tracker.child_ids[ctx.step.name]
    model = EncoderBuilder(method, settings, state, 0)().eval()
    example = np.random.default_rng(0).integers(0, 256, size=(2, 3, decode_size, decode_size), dtype=np.uint8)
    meta = {"method": method, "settings": settings, "image_size": model.image_size, "decode_size": decode_size,
            "input": f"uint8 (N, 3, {decode_size}, {decode_size}) RGB"}
    (ctx.out_dir / "encoder").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ctx.out_dir / "encoder" / "model.safetensors"))
    (ctx.out_dir / "encoder" / "config.json").write_text(json.dumps(meta, indent=2))
    state_files = [state] + ([str(manifest_path(Path(state)))] if manifest_path(Path(state)).is_file() else [])
    info = {}

    def log_artifacts():
        with mlflow.start_run(run_id=run_id):
            if resume is None:
                with _EXPORT_LOCK:  # torch.export is not thread-safe: concurrent register steps corrupt each other's traces
                    info["model"] = mlflow.pytorch.log_model(model, name="model", input_example=example, serialization_format="pt2",
                                                               pip_requirements=_model_requirements())
            mlflow.log_artifacts(str(ctx.out_dir / "encoder"), "encoder")
            for f in state_files:
                mlflow.log_artifact(f, "training_state")

    # Creating a logged model is not harmless to repeat after a dropped request: retried only while refused.
    with_retries(log_artifacts, f"logging {name}'s artifacts", ctx.run.tracker.uri, idempotent=False)
    if watermark is not None:
        wm.log(client, run_id, watermark)
    if resume is not None:
        print(f"[register] {name} v{resume.version}: finishing the registration an interrupted run left pending (no retraining)", flush=True)
        mv = resume
        client.update_model_version(name, str(mv.version), description=description)  # its lineage: this run
    else:
        # model_id ties the version to the logged model; an MLflow server refuses a models:/ source without it.
        mv = client.create_model_version(name=_ensure_model(client, name), source=info["model"].model_uri, run_id=run_id, description=description, tags=tags,
                                         model_id=info["model"].model_id)
    _wait_ready(client, name, mv.version)
    if watermark is not None:
        wm.tag_version(client, name, mv.version, watermark)
    return mv


def pending_version(client, name: str, step_key: str, state_sha: str | None = None):
    """The newest version of ``name`` left ``pending`` by an earlier attempt of the register step
    ``step_key`` (with the same training state, when ``state_sha`` is given), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    found = [v for v in versions if (v.tags or {}).get(TAG_REGISTRATION) == "pending" and (v.tags or {}).get(TAG_REGISTER_KEY) == step_key
             and (state_sha is None or (v.tags or {}).get(TAG_STATE_SHA) == state_sha)]
    return max(found, key=lambda v: int(v.version)) if found else None


def complete_registration(client, name: str, version, parent_run: str | None) -> None:
    """Mark a version's registration complete (the gate has run), recorded under this pipeline run."""
    if parent_run:
        client.set_model_version_tag(name, str(version), "reprflow.pipeline_run", parent_run)
    client.set_model_version_tag(name, str(version), TAG_REGISTRATION, "complete")


def _state_sha(state: str) -> str:
    from components.checkpoint import manifest_path

    m = manifest_path(Path(state))
    if m.is_file():
        return json.loads(m.read_text())["sha256"]
    import hashlib

    return hashlib.sha256(Path(state).read_bytes()).hexdigest()


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
    """Cache check for the register step: the recorded version must still be in the registry,
    its registration complete."""
    from mlflow.exceptions import MlflowException

    try:
        mv = run.tracker.client.get_model_version(result.outputs["name"], result.outputs["version"])
        return (mv.tags or {}).get(TAG_REGISTRATION) != "pending"
    except (MlflowException, KeyError):
        return False



TOKENIZER_DIR = "tokenizer"
TOKENIZER_META = "reprflow-tokenizer.json"  # beside the fitted files, which may be called tokenizer.json themselves


def register_tokenizer_step(ctx: StepContext) -> StepResult:
    """Register a trained tokenizer as model ``<pipeline>-tokenizer-<name>``.

    Its run holds ``tokenizer/``: ``reprflow-tokenizer.json`` (kind, settings, file names) plus the trained state
    (image tokenizers: ``state.pt`` and its sha256 manifest, loaded with ``weights_only``) or the fitted files (text
    tokenizers). ``models:/<pipeline>-tokenizer-<name>/<version>`` can be a reference of a
    method in another pipeline (see ``pipelines.models.upstream_from_registry``).
    """
    import shutil

    from components.checkpoint import MANIFEST_SUFFIX, verify_state, write_state_file

    s = ctx.step.settings
    client = ctx.run.tracker.client
    out = ctx.inputs[s["tokenizer_step"]].outputs
    folder = ctx.out_dir / TOKENIZER_DIR
    folder.mkdir()
    files = {}
    if out.get("state"):
        verify_state(Path(out["state"]))
        write_state_file(Path(out["state"]), folder / "state.pt")  # with its sha256 manifest, checked on load
    for logical, path in (out.get("files") or {}).items():
        if Path(path).name in (TOKENIZER_META, "state.pt", "state.pt" + MANIFEST_SUFFIX):
            raise ReprflowError(f"tokenizer file {path!r} would overwrite the registry's own {Path(path).name}; rename it")
        shutil.copyfile(path, folder / Path(path).name)
        files[logical] = Path(path).name
    meta = {"sort": "tokenizer", "kind": s["kind"], "name": s["tokenizer"], "settings": out.get("settings") or {},
            "state": "state.pt" if out.get("state") else None, "files": files}
    (folder / TOKENIZER_META).write_text(json.dumps(meta, indent=2))
    run_id = ctx.run.tracker.child_ids[ctx.step.name]

    def log_folder():
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifacts(str(folder), TOKENIZER_DIR)

    from pipelines.tracking import with_retries

    with_retries(log_folder, f"logging the {TOKENIZER_DIR}/ artifacts", ctx.run.tracker.uri)
    name = f"{s['pipeline']}-tokenizer-{s['tokenizer']}"
    if not _exists(client, name):
        try:
            client.create_registered_model(name, description=f"reprflow tokenizer ({s['kind']}) trained by pipeline '{s['pipeline']}'")
        except ReprflowError:
            raise  # MLflow unreachable: the retries' clear error
        except Exception:  # noqa: BLE001 - created concurrently
            pass
    # As for encoders: pending until waited READY; a rerun finishes a pending version of the same step.
    mv = pending_version(client, name, ctx.step.key)
    if mv is None:
        source = f"{client.get_run(run_id).info.artifact_uri}/{TOKENIZER_DIR}"
        mv = client.create_model_version(name=name, source=source, run_id=run_id,
                                         tags={"reprflow.pipeline_run": ctx.run.tracker.parent_id, "reprflow.kind": s["kind"], "reprflow.code_version": ctx.run.code_version,
                                               TAG_REGISTRATION: "pending", TAG_REGISTER_KEY: ctx.step.key})
    _wait_ready(client, name, mv.version)
    complete_registration(client, name, mv.version, ctx.run.tracker.parent_id)
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
