"""Periodic retraining: champion vs challenger on the same held-out shards.

``reprflow retrain FILE`` (run by a KubeRay RayCronJob, or cron + ``ray job submit``):

1. per method, read the champion (``@champion`` of ``<pipeline>-<method>``) and its data
   watermark (the train shards it has seen, see :mod:`pipelines.watermark`); list the train
   shards now; the difference is what arrived since. Nothing new anywhere: a no-op (exit 0).
2. warm-start from the champion's full training state (weights, buffers, optimizer moments;
   epoch counter and schedule restart) and train on the new shards (``retrain.data: new``) or
   on all of them (``all``) for ``retrain.epochs``;
3. embed + evaluate the challenger, and the champion's registered ``encoder/``, on the eval
   dataset as it is now (same splits, same code);
4. register the challenger (with its watermark), then, under the alias lock, move ``@champion``
   only if the champion is still the version this retrain started from (compare-and-set) and the
   challenger wins on the val selection metric by ``retrain.margin``;
5. record the decision, both scores and both watermarks (version tags + a ``retrain`` run).

Retrains of one pipeline are serialised by a file lock in the storage folder (the kernel
drops it if the process dies): a second retrain started meanwhile waits, then finds the shards
already covered by the new champion (a no-op) or, if the first lost, repeats nothing (its steps
are cached).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from components.data import shards as sh
from components.errors import ReprflowError
from pipelines import watermark as wm
from pipelines.alias import alias_lock, current_version, record_move, who
from pipelines.config import MethodSpec, PipelineConfig
from pipelines.dag import DAG, Runner, Step, StepContext, StepResult
from pipelines.register_step import log_version, model_name, registered_version_exists
from pipelines.registry import Decision, _record, gate
from pipelines.report import COLUMNS, to_markdown
from pipelines.tracking import Tracker, code_version

TAG_LAST_CHECK = "reprflow.last_retrain_check"


@dataclass
class Plan:
    """What one method's retrain will do."""

    spec: MethodSpec
    name: str
    champion: Any  # mlflow ModelVersion
    watermark: dict | None
    root: str
    files: list[str]
    new: list[str]
    settings: dict = field(default_factory=dict)
    method: str = ""


@contextmanager
def retrain_lock(storage: Path, pipeline: str, timeout: float) -> Iterator[None]:
    """Exclusive per-pipeline lock (``flock`` on ``<storage>/locks/retrain-<pipeline>.lock``).

    Works on local disks and NFSv4 mounts (Linux maps flock to NFS byte-range locks); it is
    released by the kernel when the holder dies, so it never goes stale.
    """
    path = storage / "locks" / f"retrain-{pipeline}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    holder = path.read_text().strip() or "?"
                    print(f"[retrain] another retrain of '{pipeline}' is running ({holder}); waiting for it (lock {path})", flush=True)
                    announced = True
                if time.monotonic() > deadline:
                    raise ReprflowError(f"another retrain of '{pipeline}' still holds {path} after {timeout:.0f}s; try again later") from None
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.write(fd, f"{who()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def plan_retrain(cfg: PipelineConfig, client) -> list[Plan]:
    """Per method: champion, its watermark, the train shards now and which of them are new."""
    spec = cfg.datasets[cfg.train.dataset]
    if spec.kind != "shards":
        raise ReprflowError(f"train.dataset: '{cfg.train.dataset}' is generated (kind: {spec.kind}); retraining picks up newly "
                            "arrived shards, so the train dataset must be kind: shards (made by 'reprflow ingest')")
    if not cfg.registration.enabled:
        raise ReprflowError("register.enabled: false - retraining compares against the registered @" + cfg.registration.alias)
    root = spec.uri.rstrip("/")
    files = sh.list_shards(sh.join(root, "train"))
    plans = []
    for m in cfg.methods:
        name = model_name(cfg.name, m.name)
        try:
            champ = client.get_model_version_by_alias(name, cfg.registration.alias)
        except Exception:  # noqa: BLE001 - MlflowException: no model or no alias
            raise ReprflowError(f"'{name}' has no @{cfg.registration.alias} to retrain from; run the pipeline once first ('reprflow run FILE')") from None
        mark = wm.read(client, champ)
        if mark is None:
            print(f"[retrain] {name} v{champ.version} records no watermark (registered before watermarks): every shard counts as new", flush=True)
        plans.append(Plan(m, name, champ, mark, root, files, wm.new_files(mark, root, files)))
    return plans


def _champion_encoder_config(client, run_id: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "encoder/config.json", tmp)).read_text())


def _rows(files: list[str]) -> int:
    import pyarrow.parquet as pq

    n = 0
    for f in files:
        fs, path = sh.resolve(f)
        with fs.open_input_file(path) as fh:
            n += pq.ParquetFile(fh).metadata.num_rows
    return n


def retrain_step(ctx: StepContext) -> StepResult:
    """Warm-start from the champion's training state and train on the chosen shards."""
    from components.methods.registry import build_method
    from pipelines.config import TrainSpec
    from pipelines.plots import loss_curve
    from pipelines.train_loop import run_trainer

    s = ctx.step.settings
    client = ctx.run.tracker.client
    start_dir = ctx.out_dir / "warm_start"
    start_dir.mkdir()
    # The whole folder: the state and its sha256 manifest, so a tampered champion state is refused.
    state = str(Path(client.download_artifacts(s["warm_start"]["run_id"], "training_state", str(start_dir))) / "state.pt")
    train = TrainSpec.model_validate(s["train"])
    method = build_method(s["method"], s["settings"])
    try:
        out = run_trainer(key=ctx.step.key, method=s["method"], settings=s["settings"], train=train, rows=_rows(s["files"]), files=s["files"],
                          storage=ctx.run.storage, seed=s["seed"], views=method.views, out_dir=ctx.out_dir, warm_start=state)
    finally:
        shutil.rmtree(start_dir, ignore_errors=True)  # the champion's state stays in MLflow
    loss_curve(out["history"], ctx.out_dir / "loss_curve.png", title=f"{s['method']} retraining loss (from v{s['warm_start']['version']})")
    last = out["history"][-1] if out["history"] else {}
    return StepResult(
        outputs={"state": out["state"], "method": s["method"], "settings": s["settings"]},
        metrics={f"final_{k}": v for k, v in last.items() if k in ("loss", "images_per_s", "epoch", "step")},
        history=out["history"],
        params={"method": s["method"], "warm_start": s["warm_start"], "train": s["train"], "shards": len(s["files"]), "data": s["data"]},
        artifacts=["history.json", "loss_curve.png"],
    )


def register_challenger_step(ctx: StepContext) -> StepResult:
    """Register the retrained encoder as a new version carrying its lineage and watermark."""
    s = ctx.step.settings
    run = ctx.run
    scores = ctx.inputs[s["evaluate_step"]].outputs["metrics"]
    champ_scores = ctx.inputs[s["champion_evaluate_step"]].outputs["metrics"]
    train_out = ctx.inputs[s["train_step"]].outputs
    mark = wm.compute(s["root"], s["watermark_files"])  # every train shard seen: the champion's and the new ones
    rows = "\n".join(f"| {k} | {v:.2f} | {champ_scores.get(k, float('nan')):.2f} |" for k, v in sorted(scores.items()) if "top1" in k)
    description = (
        f"**{s['method']}** retrained from v{s['champion']} of `{s['name']}` (pipeline `{s['pipeline']}`) on {s['shards']} "
        f"{'new' if s['data'] == 'new' else ''} train shards.\n\n| metric | challenger | champion v{s['champion']} (same data) |\n|---|---|---|\n{rows}\n\n"
        f"Lineage: retrain run `{run.tracker.parent_id}`, config hash `{run.config_hash}`, eval data `{s['eval_fingerprint']}`, "
        f"watermark {wm.summary(mark)}, code `{run.code_version}`."
    )
    mv = log_version(
        ctx, name=s["name"], method=s["method"], settings=s["settings"], state=train_out["state"], decode_size=s["decode_size"], description=description,
        tags={"reprflow.pipeline_run": run.tracker.parent_id, "reprflow.config_hash": run.config_hash, "reprflow.data_fingerprint": mark["fingerprint"],
              "reprflow.code_version": run.code_version, "reprflow.retrained_from": str(s["champion"]), "reprflow.retrain_data": s["data"]},
        watermark=mark,
    )
    return StepResult(outputs={"name": s["name"], "version": str(mv.version), "model_uri": f"models:/{s['name']}/{mv.version}"},
                      params={"registered_model": s["name"], "version": mv.version, "retrained_from": s["champion"]})


def decide(client, name: str, alias: str, version: str, expected_champion: str, score: float, metric: str, eval_fingerprint: str,
           margin: float, champion_score: float) -> Decision:
    """Compare-and-set: under the alias lock, promote ``version`` only if ``alias`` still points at
    ``expected_champion`` and the challenger beats it by ``margin`` (val split, same eval data)."""
    with alias_lock(client, name):
        current = current_version(client, name, alias)
        if current == str(version):
            return Decision(str(version), True, score, champion_score, expected_champion, "already the champion")
        if current != str(expected_champion):
            decision = Decision(str(version), False, score, None, current,
                                f"superseded: @{alias} moved from v{expected_champion} to v{current} while this retrain ran; not promoted")
            client.set_model_version_tag(name, version, "reprflow.val_metric", metric)
            client.set_model_version_tag(name, version, "reprflow.val_score", f"{score:.6f}")
            client.set_model_version_tag(name, version, "reprflow.eval_fingerprint", eval_fingerprint)
            _record(client, name, version, decision)
            client.set_model_version_tag(name, version, "reprflow.decision", "superseded")
            return decision
        decision = gate(client, name, version, score, metric, eval_fingerprint, alias=alias, min_improvement=margin, rescore=lambda _champ: champion_score)
        client.set_model_version_tag(name, version, "reprflow.champion_score_same_data", f"{champion_score:.6f}")
        if decision.promoted:
            record_move(client, name, alias, str(version), str(expected_champion), "promoted", decision.reason)
        return decision


def retrain(cfg: PipelineConfig, output: Path | None = None, wait_seconds: float = 6 * 3600, config_text: str | None = None) -> dict[str, Any]:
    """Retrain every method of ``cfg`` from its champion on newly arrived shards (see module doc).

    Returns ``{"status": "no-op" | "done", "methods": {method: {...decision...}}}``.
    """
    from pipelines.run import PipelineRun, build_dag
    from pipelines.steps import embed_step, evaluate_step

    t0 = time.monotonic()
    storage = cfg.storage_path()
    storage.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.tracking_uri(), cfg.mlflow.experiment or cfg.name, storage / "mlartifacts")
    client = tracker.client
    with retrain_lock(storage, cfg.name, wait_seconds):
        plans = plan_retrain(cfg, client)
        todo = [p for p in plans if p.new]
        if not todo:
            for p in plans:
                print(f"[retrain] {p.name}: no new shards since the watermark of v{p.champion.version} "
                      f"({(p.champion.tags or {}).get(wm.TAG_SUMMARY, 'none')}); nothing to do", flush=True)
                client.set_registered_model_tag(p.name, TAG_LAST_CHECK, f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} no new shards (champion v{p.champion.version})")
            return {"status": "no-op", "methods": {p.spec.name: {"champion": str(p.champion.version), "new_shards": 0} for p in plans}}

        cfg_json = cfg.model_dump(mode="json", by_alias=True)
        config_hash = hashlib.sha256(json.dumps(cfg_json, sort_keys=True).encode()).hexdigest()[:16]
        run = PipelineRun(cfg, storage, tracker, config_hash, code_version())
        full, _ = build_dag(cfg)
        dag = DAG()
        train_ds = dag.add(full.steps[f"dataset[{cfg.train.dataset}]"]).name
        eval_ds = dag.add(full.steps[f"dataset[{cfg.evaluate.dataset}]"]).name
        ev = cfg.evaluate
        ev_settings = {"knn_k": ev.knn_k, "knn_temperature": ev.knn_temperature, "linear_probe": ev.linear_probe, "dataset_step": eval_ds}
        decode = cfg.train.decode_size
        eval_fp = dag.steps[eval_ds].key
        for p in todo:
            enc = _champion_encoder_config(client, p.champion.run_id)
            p.method, p.settings = enc["method"], enc["settings"]
            m = p.spec.name
            train = cfg.method_train(p.spec).model_dump()
            train["epochs"] = cfg.retrain.epochs or train["epochs"]
            files = p.new if cfg.retrain.data == "new" else p.files
            champ_v = str(p.champion.version)
            r = dag.add(Step(f"retrain[{m}]", "retrain", retrain_step,
                             {"method": p.method, "settings": p.settings, "train": train, "seed": cfg.seed, "files": files, "data": cfg.retrain.data,
                              "warm_start": {"name": p.name, "version": champ_v, "run_id": p.champion.run_id}, "dataset_step": train_ds}, [train_ds]))
            e = dag.add(Step(f"embed[{m}]", "embed", embed_step, {"label": m, "method": p.method, "settings": p.settings, "seed": cfg.seed, "train_step": r.name,
                                                                 "dataset_step": eval_ds, "decode_size": decode, "batch_size": ev.batch_size}, [eval_ds, r.name]))
            v = dag.add(Step(f"evaluate[{m}]", "evaluate", evaluate_step, {**ev_settings, "label": m, "embed_step": e.name}, [eval_ds, e.name]))
            from pipelines.models import embed_registered_step

            champ_label = f"{m}@v{champ_v}"
            ce = dag.add(Step(f"embed[{champ_label}]", "embed", embed_registered_step,
                              {"label": champ_label, "method": p.method, "model_uri": f"models:/{p.name}/{champ_v}", "run_id": p.champion.run_id,
                               "dataset_step": eval_ds, "decode_size": decode, "batch_size": ev.batch_size}, [eval_ds]))
            cv = dag.add(Step(f"evaluate[{champ_label}]", "evaluate", evaluate_step, {**ev_settings, "label": champ_label, "embed_step": ce.name}, [eval_ds, ce.name]))
            reg = dag.add(Step(f"register[{m}]", "register", register_challenger_step,
                               {"pipeline": cfg.name, "name": p.name, "method": p.method, "settings": p.settings, "train_step": r.name, "evaluate_step": v.name,
                                "champion_evaluate_step": cv.name, "champion": champ_v, "decode_size": decode, "root": p.root, "watermark_files": p.files, "data": cfg.retrain.data,
                                "shards": len(files), "eval_fingerprint": eval_fp, "dataset_step": train_ds},
                               [train_ds, r.name, v.name, cv.name]))
            reg.still_valid = lambda result: registered_version_exists(run, result)

        tags = {"reprflow.kind": "retrain", "reprflow.pipeline": cfg.name, "reprflow.config_hash": config_hash, "reprflow.code_version": run.code_version}
        with tracker.driver_run(storage, f"{cfg.name}-retrain-{time.strftime('%Y%m%d-%H%M%S')}", cfg_json, tags) as parent:
            return _run_retrain(cfg, tracker, run, dag, todo, parent, eval_fp, output, config_text, cfg_json, t0)


def _run_retrain(cfg: PipelineConfig, tracker: Tracker, run, dag: DAG, todo: list[Plan], parent: str, eval_fp: str, output: Path | None,
                 config_text: str | None, cfg_json: dict, t0: float) -> dict[str, Any]:
    """Run the retrain DAG under ``parent``, decide per method, and write and log the table."""
    from pipelines.run import init_ray, step_events

    client, storage, ev, alias = tracker.client, cfg.storage_path(), cfg.evaluate, cfg.registration.alias
    tracker.log_text(parent, config_text or json.dumps(cfg_json, indent=2), "pipeline.yaml" if config_text else "pipeline.json")
    print(f"[retrain] pipeline '{cfg.name}': {', '.join(f'{p.name} v{p.champion.version} + {len(p.new)} new shards' for p in todo)}; MLflow run {parent}", flush=True)
    init_ray(cfg)
    runner = Runner(dag, storage, run, on_event=step_events(tracker, storage, lambda: runner.results))
    results = runner.run_all()

    metric = ev.selection_metric
    summary: dict[str, Any] = {}
    rows = []
    for p in todo:
        m = p.spec.name
        champ_v = str(p.champion.version)
        ch = results[f"evaluate[{m}]"].outputs["metrics"]
        cm = results[f"evaluate[{m}@v{champ_v}]"].outputs["metrics"]
        version = results[f"register[{m}]"].outputs["version"]
        d = decide(client, p.name, alias, version, champ_v, ch[f"val_{metric}"], metric, eval_fp, cfg.retrain.margin, cm[f"val_{metric}"])
        verdict = "superseded" if d.reason.startswith("superseded") else ("promoted" if d.promoted else "kept_champion")
        print(f"[retrain] {p.name}: challenger v{version} val {metric} {ch[f'val_{metric}']:.2f} vs champion v{champ_v} {cm[f'val_{metric}']:.2f} "
              f"(margin {cfg.retrain.margin}) -> {verdict}: {d.reason}", flush=True)
        summary[m] = {"champion": champ_v, "challenger": version, "decision": verdict, "promoted": d.promoted, "reason": d.reason,
                      "challenger_score": ch[f"val_{metric}"], "champion_score": cm[f"val_{metric}"], "new_shards": len(p.new),
                      "watermark_before": (p.champion.tags or {}).get(wm.TAG_SUMMARY, "none"), "watermark_after": wm.summary(wm.compute(p.root, p.files))}
        tracker.set_tags(parent, {f"reprflow.retrain.{m}.decision": verdict, f"reprflow.retrain.{m}.champion": champ_v,
                                  f"reprflow.retrain.{m}.challenger": version, f"reprflow.retrain.{m}.watermark_before": summary[m]["watermark_before"],
                                  f"reprflow.retrain.{m}.watermark_after": summary[m]["watermark_after"]})
        tracker.log_metrics(parent, {f"{m}.challenger.val_{metric}": ch[f"val_{metric}"], f"{m}.champion.val_{metric}": cm[f"val_{metric}"],
                                     f"{m}.promoted": float(d.promoted), f"{m}.new_shards": len(p.new)})
        for label, res, ver, promoted in ((m, ch, version, d.promoted), (f"{m}@v{champ_v} (champion)", cm, champ_v, None)):
            rows.append({"representation": label, **{c: res.get(c) for c in COLUMNS}, "registered": f"{p.name}/{ver}", "promoted": promoted})
    table = {"pipeline": cfg.name, "selection_metric": metric, "eval_dataset": ev.dataset, "rows": rows}
    output = Path(output or storage / "runs" / f"retrain-{time.strftime('%Y%m%d-%H%M%S')}")
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.md").write_text(to_markdown(table))
    (output / "retrain.json").write_text(json.dumps(summary, indent=2))
    tracker.log_artifact(parent, output / "results.md")
    tracker.log_artifact(parent, output / "retrain.json")
    tracker.finish(parent)
    print(to_markdown(table), flush=True)
    return {"status": "done", "methods": summary, "run_id": parent, "output": str(output), "mlflow_url": tracker.run_url(parent),
            "wall_seconds": time.monotonic() - t0}


