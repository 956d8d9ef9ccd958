"""Build the pipeline's DAG from its config and run it on Ray, recorded in MLflow.

    dataset[d] ──► train[m] ──► embed[m] ──► evaluate[m] ──► register[m]
        ├────────► tokenizer[t] ──► register[tokenizer-t]     (tokenizers: section; methods refer to them)
        ├────────► embed[random-init[<arch>]] ──► evaluate[random-init[<arch>]]     (the floor; and random-init-bn[<arch>]:
        │                                                              the same weights with the train images' BN statistics)
        └────────► embed[brief] ──► evaluate[brief]      (evaluate.brief: the BRIEF baseline)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.errors import ReprflowError
from components.methods.registry import method_class, method_config
from components.tokenizers.registry import tokenizer_kind
from pipelines.brief_step import add_brief_steps
from pipelines.config import MethodSpec, PipelineConfig, reference_graph, references_of
from pipelines.dag import DAG, Runner, Step, StepResult
from pipelines.register_step import register_step, register_tokenizer_step, registered_version_exists
from pipelines.report import arch_label, comparison_table, floor_label, write_report
from pipelines.steps import dataset_step, embed_step, evaluate_step, text_tokenizer_step, train_step
from pipelines.tracking import Tracker, code_version


def init_ray(cfg: PipelineConfig) -> None:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS``, or start a local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local cluster on loopback
    # Our own project goes to workers through PYTHONPATH on a local cluster; a submitted job
    # brings it as its working_dir.
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        _init_local_ray(cfg.ray.num_cpus or max(4, os.cpu_count() or 1))  # >= 4: Ray Data starves when train workers hold every CPU


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_local_ray(num_cpus: int) -> None:
    """Start a local Ray whose own processes ask *its* dashboard for the state API.

    Ray Train V2 runs a placement-group cleaner that asks the state API every second whether the
    train controller is alive and removes the run's placement group (killing its workers) when
    the answer is no. Without an address the state client guesses the cluster from the
    machine's running Ray processes, so with a second Ray on the same machine (another run, a
    notebook's ``ray.init()``) it asked the wrong cluster, did not find the controller, and
    killed a healthy run's training (seen 2026-12-07; Ray's fault tolerance resumed it from the
    last checkpoint). Without a dashboard it failed every check with a warning (~50 log lines a
    minute). So the dashboard runs on a port chosen here, and ``RAY_API_SERVER_ADDRESS`` names
    it while Ray starts: the raylet, and every worker it spawns, inherit it. This process's own
    environment is restored afterwards, since that variable overrides the address given to any
    later state or job-submission client (e.g. ``reprflow submit`` to another cluster).
    """
    import ray

    port = _free_port()
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


@dataclass
class PipelineRun:
    """State shared by the steps of one pipeline run."""

    config: PipelineConfig
    storage: Path
    tracker: Tracker
    config_hash: str
    code_version: str

    def method_spec(self, name: str) -> MethodSpec:
        return next(m for m in self.config.methods if m.name == name)


def build_dag(cfg: PipelineConfig, resolve_model=None) -> tuple[DAG, list[str]]:
    """The DAG of a pipeline config; returns it and the names of its evaluate steps (table rows).

    Methods and image tokenizers are added in the order their references require
    (``train[dino] -> tokenizer[vqkd] -> train[beitv2]``). ``resolve_model(uri) -> "name/version"``
    pins ``models:/`` references into step keys, so a moved alias retrains what depends on it.
    """
    dag = DAG()
    decode = cfg.train.decode_size
    ds_steps = {}
    wanted = [cfg.train.dataset, cfg.evaluate.dataset, *(cfg.tokenizer_dataset(n) for n in cfg.tokenizers)]
    for name in dict.fromkeys(wanted):
        spec = cfg.datasets[name]
        settings = {"spec": spec.model_dump(), "decode_size": decode}
        if spec.kind == "shards":
            from components.data import shards as sh

            # New or changed shards change the key, so the scan (and all below) reruns.
            settings["content"] = sh.fingerprint_files([f for s in sh.SPLITS for f in _maybe_list(sh.join(spec.uri, s))])
            if name == cfg.evaluate.dataset and not sh.read_dataset_info(spec.uri).classes:
                raise ReprflowError(f"evaluate.dataset: '{name}' ({spec.uri}) has no labels; evaluation needs a labelled dataset (class per sub-folder at ingest)")
        ds_steps[name] = dag.add(Step(f"dataset[{name}]", "dataset", dataset_step, settings)).name
    train_ds, eval_ds = ds_steps[cfg.train.dataset], ds_steps[cfg.evaluate.dataset]
    ev = cfg.evaluate
    ev_settings = {"knn_k": ev.knn_k, "knn_temperature": ev.knn_temperature, "linear_probe": ev.linear_probe, "dataset_step": eval_ds}
    evaluations, floors = [], {}
    graph = reference_graph(cfg)
    step_of: dict[tuple[str, str], str] = {}

    def references(node) -> tuple[dict[str, str], list[str]]:
        """``{field: step name | models:/ URI}`` and the step inputs they add."""
        refs, inputs = {}, []
        values = references_of(cfg).get(node, {})
        for fld, target in graph.get(node, {}).items():
            if target is None:
                uri = values[fld]
                refs[fld] = f"{uri}#{resolve_model(uri)}" if resolve_model else uri
            else:
                refs[fld] = step_of[target]
                inputs.append(step_of[target])
        return refs, inputs

    for sort, name in _reference_order(cfg, graph):
        if sort == "tokenizer":
            tok = cfg.tokenizers[name]
            ds = ds_steps[cfg.tokenizer_dataset(name)]
            if tokenizer_kind(tok.kind) == "text":
                step = Step(f"tokenizer[{name}]", "tokenizer", text_tokenizer_step, {"tokenizer": name, "kind": tok.kind, "settings": tok.settings, "dataset_step": ds}, [ds])
            else:
                settings = method_config(tok.kind, tok.settings).model_dump(mode="json")
                refs, inputs = references((sort, name))
                step = Step(f"tokenizer[{name}]", "tokenizer", train_step,
                            {"method": tok.kind, "tokenizer": name, "settings": settings, "train": cfg.method_train(tok).model_dump(), "seed": cfg.seed,
                             "dataset_step": ds, "references": refs}, [ds, *inputs])
            step_of[(sort, name)] = dag.add(step).name
            if cfg.registration.enabled:
                dag.add(Step(f"register[tokenizer-{name}]", "register", register_tokenizer_step,
                             {"pipeline": cfg.name, "tokenizer": name, "kind": tok.kind, "tokenizer_step": step.name}, [step.name]))
            continue
        spec = next(m for m in cfg.methods if m.name == name)
        method_cfg = method_config(spec.name, spec.settings)
        settings = method_cfg.model_dump(mode="json")
        train = cfg.method_train(spec)
        refs, inputs = references((sort, name))
        t = dag.add(Step(f"train[{spec.name}]", "train", train_step, {"method": spec.name, "settings": settings, "train": train.model_dump(), "seed": cfg.seed,
                                                                       "dataset_step": train_ds, "references": refs}, [train_ds, *inputs]))
        step_of[(sort, name)] = t.name
        hook = method_class(spec.name).dag_steps
        if hook:  # the method adds its own evaluate/register steps (e.g. vision-language tasks)
            module, fn = hook.split(":")
            evaluations += getattr(importlib.import_module(module), fn)(dag, cfg, spec, settings, t.name, ds_steps)
            continue
        e = dag.add(Step(f"embed[{spec.name}]", "embed", embed_step, {"label": spec.name, "method": spec.name, "settings": settings, "seed": cfg.seed, "train_step": t.name, "dataset_step": eval_ds, "decode_size": decode, "batch_size": ev.batch_size}, [eval_ds, t.name]))
        v = dag.add(Step(f"evaluate[{spec.name}]", "evaluate", evaluate_step, {**ev_settings, "label": spec.name, "embed_step": e.name}, [eval_ds, e.name]))
        evaluations.append(v.name)
        arch = arch_label(settings)
        if floor_label(arch) not in floors:
            # The random-init encoder as is, and (BatchNorm backbones) with BN statistics of the
            # train images: what a trained encoder's weights add beyond its BN statistics.
            for label, bn in ((floor_label(arch), False), (floor_label(arch, True), True)):
                if bn and getattr(getattr(method_cfg, "backbone", None), "is_vit", False):
                    continue  # LayerNorm only: the same floor
                fe = dag.add(Step(f"embed[{label}]", "embed", embed_step, {"label": label, "method": spec.name, "settings": settings, "seed": cfg.seed, "train_step": None,
                                                                          "dataset_step": eval_ds, "decode_size": decode, "batch_size": ev.batch_size, **({"bn_stats": True} if bn else {})}, [eval_ds]))
                fv = dag.add(Step(f"evaluate[{label}]", "evaluate", evaluate_step, {**ev_settings, "label": label, "embed_step": fe.name}, [eval_ds, fe.name]))
                floors[label] = fv.name
        if cfg.registration.enabled:
            dag.add(Step(
                f"register[{spec.name}]", "register", register_step,
                {"pipeline": cfg.name, "method": spec.name, "settings": settings, "train_step": t.name, "evaluate_step": v.name,
                 "selection_metric": ev.selection_metric, "alias": cfg.registration.alias, "min_improvement": cfg.registration.min_improvement,
                 "decode_size": decode, "train_fingerprint": t.key, "eval_fingerprint": dag.steps[eval_ds].key, "dataset_step": train_ds},
                [train_ds, t.name, v.name],
            ))
    # The BRIEF baseline (evaluate.brief) is one more row, after the floors.
    return dag, evaluations + list(floors.values()) + add_brief_steps(dag, cfg, eval_ds, ev_settings)


def _reference_order(cfg: PipelineConfig, graph) -> list[tuple[str, str]]:
    """Tokenizers and methods, each after what it refers to; otherwise in file order (tokenizers first)."""
    nodes = [("tokenizer", n) for n in cfg.tokenizers] + [("method", m.name) for m in cfg.methods]
    done: list[tuple[str, str]] = []

    def visit(node):
        if node in done:
            return
        for target in graph.get(node, {}).values():
            if target is not None:
                visit(target)
        done.append(node)

    for node in nodes:
        visit(node)
    return done


def _pinned_version(client, uri: str) -> str:
    from pipelines.models import resolve_version

    mv = resolve_version(client, uri)
    return f"{mv.name}/{mv.version}"


def _maybe_list(uri: str) -> list[str]:
    from components.data import shards as sh

    try:
        return sh.list_shards(uri)
    except Exception:  # noqa: BLE001 - a missing split just contributes nothing
        return []


def run_pipeline(cfg: PipelineConfig, output: Path | None = None, force: bool = False, config_text: str | None = None) -> dict[str, Any]:
    """Run a pipeline end to end; returns the comparison table (also written to ``output``).

    Before any work: the storage and checkpoint folders must be writable and MLflow reachable
    (bounded retries, then a clear error); runs left RUNNING by a driver that died are marked
    FAILED. This driver holds a lock file while it lives so later runs can tell.
    """
    from pipelines.train_loop import check_checkpoint_storage
    from pipelines.tracking import redact

    t0 = time.monotonic()
    storage = cfg.storage_path()
    try:
        storage.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReprflowError(f"storage folder {storage} cannot be created: {exc.strerror or exc}") from None
    _check_writable(storage)
    check_checkpoint_storage(storage / "ray_results")
    output = Path(output or storage / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    output.mkdir(parents=True, exist_ok=True)
    cfg_json = cfg.model_dump(mode="json", by_alias=True)
    config_hash = hashlib.sha256(json.dumps(cfg_json, sort_keys=True).encode()).hexdigest()[:16]
    tracker = Tracker(cfg.tracking_uri(), cfg.mlflow.experiment or cfg.name, storage / "mlartifacts")
    run = PipelineRun(cfg, storage, tracker, config_hash, code_version())
    dag, table_steps = build_dag(cfg, resolve_model=lambda uri: _pinned_version(tracker.client, uri))
    tags = {"reprflow.pipeline": cfg.name, "reprflow.config_hash": config_hash, "reprflow.code_version": run.code_version}
    # MLflow first (unreachable: a clear error before Ray starts), then the local Ray.
    with tracker.driver_run(storage, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", cfg_json, tags) as parent:
        init_ray(cfg)
        tracker.log_text(parent, config_text or json.dumps(cfg_json, indent=2), "pipeline.yaml" if config_text else "pipeline.json")
        print(f"[reprflow] pipeline '{cfg.name}': {len(dag.steps)} steps; MLflow run {parent} ({redact(cfg.tracking_uri())})", flush=True)

        runner = Runner(dag, storage, run, force=force, on_event=step_events(tracker, storage, lambda: runner.results))
        for name in dag.steps:
            if dag.steps[name].kind == "register":
                dag.steps[name].still_valid = lambda result: registered_version_exists(run, result)
        results = runner.run_all()
        table = comparison_table(cfg, dag, results, tracker, table_steps)
        table["wall_seconds"] = time.monotonic() - t0
        write_report(table, output, tracker, parent)
        tracker.finish(parent)
    table["output"] = str(output)
    table["mlflow_url"] = tracker.run_url(parent)
    return table


def step_events(tracker: Tracker, storage: Path, results):
    """The Runner's event callback: progress lines and one MLflow child run per step.

    ``results()`` returns the finished steps' results (for lineage tags). Shared by
    ``reprflow run`` and ``reprflow retrain``. A cached step's run carries the step's original
    ``step_seconds``, so a rerun's records match a fresh run's. Recording a failure is best
    effort: with MLflow gone it must not hide the error itself.
    """

    def on_event(event: str, step: Step, info: dict) -> None:
        tags = {"reprflow.step_key": step.key, "reprflow.step_kind": step.kind, **lineage_tags(step, results())}
        if event == "start":
            print(f"[step] {step.name} started", flush=True)
            tracker.start_child(step.name, tags)
        elif event == "cached":
            print(f"[step] {step.name} cached ({step.key}), skipped", flush=True)
            rid = tracker.start_child(step.name, {**tags, "reprflow.cached": "true"})
            if info["result"].seconds:
                tracker.log_metrics(rid, {"step_seconds": info["result"].seconds})
            _log_result(tracker, rid, step, info["result"], storage)
            tracker.finish(rid)
        elif event == "done":
            print(f"[step] {step.name} done in {info['seconds']:.0f}s", flush=True)
            rid = tracker.child_ids[step.name]
            tracker.log_metrics(rid, {"step_seconds": info["seconds"]})
            _log_result(tracker, rid, step, info["result"], storage)
            tracker.finish(rid)
        elif event == "interrupted":
            print(f"[step] {step.name} finished after another step failed; cached for the rerun", flush=True)
            rid = tracker.child_ids.get(step.name)
            if rid:
                tracker.record_failure(rid, None, status="KILLED")
        elif event == "stopped":
            print(f"[step] {step.name} stopped (Ctrl-C); a rerun resumes it from its last checkpoint", flush=True)
            rid = tracker.child_ids.get(step.name)
            if rid:
                tracker.record_failure(rid, KeyboardInterrupt("stopped by Ctrl-C; a rerun resumes it from its last checkpoint"), status="KILLED")
        elif event == "failed":
            rid = tracker.child_ids.get(step.name)
            print(f"[step] {step.name} failed: {_one_line(info['error'])}", flush=True)
            if rid:
                tracker.record_failure(rid, info["error"])

    return on_event


def _one_line(exc: BaseException) -> str:
    from pipelines.tracking import redact

    text = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__)


def lineage_tags(step: Step, results: dict[str, StepResult]) -> dict[str, str]:
    """Tags that let the MLflow UI compare step runs across methods: the representation (method
    or floor) and the fingerprint of the data the step read."""
    s = step.settings
    tags = {}
    method = s.get("label") or s.get("method")
    if method:
        tags["reprflow.method"] = str(method)
    ds = s.get("dataset_step")
    if ds in results and results[ds].outputs.get("fingerprint"):
        tags["reprflow.data_fingerprint"] = str(results[ds].outputs["fingerprint"])
    return tags


def _log_result(tracker: Tracker, run_id: str, step: Step, result: StepResult, storage: Path) -> None:
    from pipelines.dag import step_dir

    tracker.log_params(run_id, {"settings": step.settings, **({"result": result.params} if result.params else {})})
    if result.history:
        tracker.log_history(run_id, result.history)
    tracker.log_metrics(run_id, result.metrics)
    folder = step_dir(storage, step)
    for name in result.artifacts:
        if (folder / name).is_file():
            tracker.log_artifact(run_id, folder / name)


def _check_writable(path: Path) -> None:
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise ReprflowError(f"storage folder {path} is not writable: {exc.strerror}") from None
